"""Time the dispatcher against trollmoves 0.19's, dispatching many small files to SFTP.

    python benchmarks/bench_dispatcher.py [--files 1000] [--size 1024] [--only ours|reference]

Both ``dispatcher.py`` scripts run as subprocesses with the same YAML config shape, subscribed
to a posttroll publisher on loopback, pushing to the same real sshd (``tests/servers.py``).
Each gets one warm-up message, resent until its file arrives (so both are subscribed and
their start-up is not timed); then all messages are sent, and the time from the first message
sent to the last file present at the target is measured. trollmoves 0.19 is taken from its
own virtual env (``TROLLMOVES_REFERENCE_VENV``, default /opt/trollmoves019).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from posttroll.message import Message
from posttroll.publisher import Publisher

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import servers

REFERENCE = Path(os.environ.get("TROLLMOVES_REFERENCE_VENV", "/opt/trollmoves019"))
OURS = Path(sys.executable).with_name("dispatcher.py")
TOPIC = "/bench/dispatch"


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds passed; return its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def count_files(directory: Path, names: set[str]) -> int:
    """How many of ``names`` are present in ``directory`` (temporary files do not count)."""
    try:
        return sum(1 for entry in os.scandir(directory) if entry.name in names)
    except FileNotFoundError:
        return 0


def ssh_env(work: Path, sshd: servers.SSHServer) -> dict[str, str]:
    """A HOME whose ~/.ssh/known_hosts knows our sshd (both dispatchers verify host keys)."""
    home = work / "home"
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    (home / ".ssh" / "known_hosts").write_text(sshd.known_hosts.read_text())
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    env.update(HOME=str(home), PYTHONSAFEPATH="1")
    return env


def run_one(label: str, script: Path, work: Path, sshd: servers.SSHServer, sources: list[Path],
            env: dict[str, str], timeout: float) -> float | None:
    """Dispatch ``sources`` with one dispatcher script; return the seconds taken."""
    out = work / f"out-{label}"
    out.mkdir()  # trollmoves 0.19 does not create the target directory over SFTP
    feeder = Publisher(f"tcp://127.0.0.1:{servers.free_port()}").start()
    address = f"tcp://127.0.0.1:{feeder.port_number}"
    config = work / f"{label}.yaml"
    config.write_text(yaml.safe_dump({
        "posttroll_subscriber": {"subscribe_addresses": [address], "nameserver": False},
        "sftp_target": {
            "host": f"sftp://{sshd.user}@{sshd.host}:{sshd.port}",
            "connection_parameters": {"ssh_private_key_file": sshd.key_filename},
            "directory": str(out),
            "dispatch_configs": [{"topics": [TOPIC]}]}}))
    log = (work / f"{label}.log").open("w")
    proc = subprocess.Popen([str(script), str(config)], stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, env=env)

    def send(path: Path) -> None:
        feeder.send(Message(TOPIC, "file", {"uri": str(path), "uid": path.name,
                                            "platform_name": "bench"}).encode())

    try:
        warmup = work / "src" / "warmup.bin"
        deadline = time.monotonic() + 60
        while not (out / warmup.name).exists():  # resend until subscribed (slow joiner)
            if proc.poll() is not None or time.monotonic() > deadline:
                print(f"{label}: no warm-up file; its log:")
                print(Path(log.name).read_text()[-3000:])
                return None
            send(warmup)
            wait_until((out / warmup.name).exists, 0.5)
        names = {path.name for path in sources}
        start = time.perf_counter()
        for path in sources:
            send(path)
        done = wait_until(lambda: count_files(out, names) == len(names), timeout, 0.02)
        seconds = time.perf_counter() - start
        if not done:
            print(f"{label}: only {count_files(out, names)} of {len(names)} files after "
                  f"{timeout:.0f} s; the end of its log:")
            print(Path(log.name).read_text()[-3000:])
            return None
        return seconds
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        feeder.stop()


def main() -> None:
    """Parse options, start sshd, time both dispatchers, print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000, help="number of files (1000)")
    parser.add_argument("--size", type=int, default=1024, help="bytes per file (1024)")
    parser.add_argument("--only", choices=["ours", "reference"], help="run one side only")
    parser.add_argument("--timeout", type=float, default=1800, help="give up after (s)")
    args = parser.parse_args()
    reference = REFERENCE / "bin" / "dispatcher.py"
    with tempfile.TemporaryDirectory(prefix="bench-dispatcher-") as tmp:
        work = Path(tmp)
        (work / "src").mkdir()
        sources = []
        for index in range(args.files):
            path = work / "src" / f"file{index:05d}.bin"
            path.write_bytes(os.urandom(args.size))
            sources.append(path)
        (work / "src" / "warmup.bin").write_bytes(b"warm-up")
        with servers.start_sshd(work / "sshd") as sshd:
            env = ssh_env(work, sshd)
            results: dict[str, float | None] = {}
            if args.only != "reference":
                results["ours"] = run_one("ours", OURS, work, sshd, sources, env, args.timeout)
            if args.only != "ours":
                if reference.exists():
                    results["trollmoves 0.19"] = run_one("reference", reference, work, sshd,
                                                         sources, env, args.timeout)
                else:
                    print(f"(no {reference}: skipping trollmoves 0.19)")
    print(f"\n{args.files} files x {args.size} B to SFTP (sshd on loopback), "
          "first message sent -> last file present:")
    for label, seconds in results.items():
        if seconds is None:
            print(f"  {label:<16} failed")
        else:
            print(f"  {label:<16} {seconds:8.2f} s  {args.files / seconds:8.1f} files/s")
    ours, ref = results.get("ours"), results.get("trollmoves 0.19")
    if ours and ref:
        print(f"  ratio: ours is {ref / ours:.1f}x faster than trollmoves 0.19")


if __name__ == "__main__":
    main()
