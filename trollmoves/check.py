"""``trollmoves check CONFIG``: tell what kind of configuration a file is, and validate it.

INI files: a section with ``providers`` and ``origin``/``request_port`` makes a mirror file,
``providers`` alone a client file, ``origin``/``listen`` alone a server file. YAML files: with
``subscribe-topic`` an s3downloader file, with ``subscriber_config``/``publisher_config`` a
fetcher file, otherwise a dispatcher file. ``--kind`` overrides the
guess. Exit status 0 when the file is valid, 1 with the error (file, section, key) otherwise.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from trollmoves.config import ConfigError, read_ini, read_yaml

INI_KINDS = ("server", "client", "mirror")
YAML_KINDS = ("dispatcher", "s3downloader", "fetcher")
_YAML_SUFFIXES = (".yaml", ".yml")


def _ini_kind(path: str) -> str:
    parser = configparser.RawConfigParser()
    try:
        if not parser.read(path):
            return "server"  # unreadable: read_ini says why
    except configparser.Error:
        return "server"  # not INI: read_ini says where
    kinds = set()
    for name in parser.sections():
        keys = set(parser[name])
        client = "providers" in keys
        server = bool(keys & {"origin", "listen", "request_port"})
        kinds.add("mirror" if client and server else "client" if client else
                  "server" if server else None)
    kinds.discard(None)
    if "mirror" in kinds or kinds == {"server", "client"}:
        return "mirror"
    if len(kinds) == 1:
        return kinds.pop()
    raise ConfigError(path, None, None, "cannot tell the kind of configuration: no section has "
                      "origin, listen or providers (use --kind)")


def _yaml_kind(path: str) -> str:
    data = None
    with contextlib.suppress(OSError, yaml.YAMLError):  # read_yaml reports these
        data = yaml.safe_load(Path(path).read_text())
    if isinstance(data, dict) and "subscribe-topic" in data:
        return "s3downloader"
    if isinstance(data, dict) and data.keys() & {"subscriber_config", "publisher_config"}:
        return "fetcher"
    return "dispatcher"


def detect_kind(path: str) -> str:
    """The kind of configuration in ``path`` (server, client, mirror, dispatcher, ...)."""
    if Path(path).suffix.lower() in _YAML_SUFFIXES:
        return _yaml_kind(path)
    return _ini_kind(path)


def check(path: str, kind: str | None = None) -> tuple[str, Any]:
    """Validate ``path`` as ``kind`` (guessed when None); return the kind and what was read."""
    kind = kind or detect_kind(path)
    if kind in INI_KINDS:
        sections = read_ini(path, kind)
        if kind == "server":
            from trollmoves.server import validate_sections  # whole-file checks of the server
            validate_sections(path, sections)
        elif kind == "mirror":
            from trollmoves.mirror import validate_mirror  # and of the mirror
            validate_mirror(path, sections)
        return kind, sections
    if kind == "dispatcher":
        from trollmoves.dispatcher import read_config  # rules, aliases and conditions too
        return kind, read_config(path)
    if kind == "fetcher":
        from trollmoves.fetcher import read_config as read_fetcher  # and per-host options
        return kind, read_fetcher(path)
    return kind, read_yaml(path, kind)


def main(argv: Sequence[str] | None = None) -> int:
    """``trollmoves check [--kind KIND] CONFIG...``."""
    parser = argparse.ArgumentParser(prog="trollmoves check", description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", metavar="CONFIG", help="configuration file(s)")
    parser.add_argument("--kind", choices=INI_KINDS + YAML_KINDS,
                        help="the kind of configuration (default: guessed)")
    args = parser.parse_args(argv)
    status = 0
    for path in args.configs:
        try:
            kind, content = check(path, args.kind)
        except ConfigError as err:
            print(f"{err}", file=sys.stderr)
            status = 1
            continue
        count = f", {len(content)} section(s)" if kind in INI_KINDS else ""
        print(f"{path}: valid {kind} configuration{count}")
    return status


if __name__ == "__main__":
    sys.exit(main())
