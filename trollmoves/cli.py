"""The ``trollmoves`` command: ``trollmoves copy``, and the front ends as sub-commands."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from fsspec.callbacks import Callback

from trollmoves import __version__
from trollmoves.errors import TransferError
from trollmoves.transfer import transfer

#: Sub-commands served by a front end's own ``main(argv)``: name -> (module, help).
FRONT_ENDS: dict[str, tuple[str, str]] = {
    "client": ("trollmoves.client", "request announced files"),
    "demo": ("trollmoves.demo", "run a server and a client on loopback and show files arrive"),
    "server": ("trollmoves.server", "announce files and serve transfer requests"),
    "mirror": ("trollmoves.mirror", "relay announcements and transfers between networks"),
    "check": ("trollmoves.check", "validate a configuration file"),
    "s3download": ("trollmoves.s3downloader", "download announced S3 objects"),
    "dispatch": ("trollmoves.dispatcher", "push local files to targets by rules"),
    "fetch": ("trollmoves.fetcher", "download what others announce"),
}

PROGRESS_THRESHOLD = 8 * 1024 * 1024


class ProgressBar(Callback):
    """A one-line progress bar on a terminal, redrawn at most ten times a second."""

    def __init__(self, stream: Any = sys.stderr, width: int = 30) -> None:
        super().__init__()
        self.stream = stream
        self.width = width
        self.started = time.monotonic()
        self._drawn = 0.0

    def call(self, *args: Any, **kwargs: Any) -> None:
        """Redraw when enough time has passed (fsspec calls this on every update)."""
        now = time.monotonic()
        if not self.size or self.size < PROGRESS_THRESHOLD:
            return
        if now - self._drawn < 0.1 and self.value < self.size:
            return
        self._drawn = now
        done = min(1.0, self.value / self.size)
        rate = self.value / max(now - self.started, 1e-6) / 1e6
        bar = "#" * int(done * self.width)
        self.stream.write(f"\r[{bar:<{self.width}}] {done:6.1%} {rate:8.1f} MB/s")
        if self.value >= self.size:
            self.stream.write("\n")
        self.stream.flush()


def parse_value(text: str) -> Any:
    """A command-line or config value: JSON when it parses (numbers, booleans), else text."""
    lowered = text.strip().lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """Turn ``key=value`` pairs into options; ``a__b=c`` nests as ``{"a": {"b": c}}``."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"option {pair!r} is not of the form key=value")
        *parents, leaf = key.split("__")
        node = options
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = parse_value(value)
    return options


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"


def copy_main(argv: Sequence[str] | None = None) -> int:
    """``trollmoves copy SRC DST``: copy one file between any two URLs."""
    parser = argparse.ArgumentParser(prog="trollmoves copy", description=copy_main.__doc__)
    parser.add_argument("src", help="source URL or local path")
    parser.add_argument("dst", help="destination URL or path; a trailing / keeps the name")
    parser.add_argument("--checksum", metavar="ALGO", help="verify with this hash (e.g. sha256)")
    parser.add_argument("--move", action="store_true", help="remove the source afterwards")
    parser.add_argument("--no-hardlink", action="store_true", help="always copy the bytes")
    parser.add_argument("--no-create-dirs", action="store_true",
                        help="fail instead of creating missing destination directories")
    parser.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                        help="connection parameter, e.g. ssh_key_filename=~/.ssh/id_ed25519 "
                             "or client_kwargs__endpoint_url=http://127.0.0.1:9000")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = parse_options(args.option)
    except ValueError as err:
        parser.error(str(err))
    progress = None if args.quiet or not sys.stderr.isatty() else ProgressBar()
    try:
        result = transfer(args.src, args.dst, delete_source=args.move, checksum=args.checksum,
                          hardlink=not args.no_hardlink, create_dirs=not args.no_create_dirs,
                          callback=progress, **options)
    except TransferError as err:
        print(f"trollmoves copy: {err}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as err:
        print(f"trollmoves copy: invalid arguments: {err}", file=sys.stderr)
        return 2
    summary = (f"{result.src} -> {result.dst}: {_human(result.size)} in {result.seconds:.3f} s "
               f"({result.rate / 1e6:.1f} MB/s)")
    if result.checksum:
        summary += f" {result.checksum}"
    print(summary)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trollmoves`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"copy": ("trollmoves.cli:copy_main", "copy one file between two URLs")}
    commands.update({name: (f"{module}:main", text) for name, (module, text) in FRONT_ENDS.items()})
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in commands:
        if argv and argv[0] == "--version":
            print(f"trollmoves {__version__}")
            return 0
        width = max(len(name) for name in commands)
        lines = [f"  {name:<{width}}  {text}" for name, (_, text) in sorted(commands.items())]
        out = sys.stdout if not argv or argv[0] in {"-h", "--help"} else sys.stderr
        if argv and argv[0] not in {"-h", "--help"}:
            print(f"trollmoves: unknown command {argv[0]!r}", file=out)
        print("usage: trollmoves COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines), file=out)
        return 0 if out is sys.stdout else 2
    module_name, func_name = commands[argv[0]][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
