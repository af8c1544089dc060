"""``trollmoves demo``: a server and a client on loopback, sample files, and their latency.

Everything happens in a temporary directory with a built-in configuration: the server watches
``src/`` and announces each new file, the client requests it into ``dst/<platform_name>/`` and
announces it delivered. The demo drops a few sample files, shows each arrive with the time from
"file closed in src" to "the client announced it complete in dst", then stops both and exits.
No network access, nameserver or other service is needed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import zmq
from posttroll.message import Message, MessageError
from zmq.utils.monitor import recv_monitor_message

from trollmoves.subscription import posttroll_topic

TOPIC = "/demo/sample"
PLATFORM = "demosat"
SERVER_INI = """\
[demo]
# announce every file called <platform_name>-<counter>.txt that appears in src/
origin = {src}/{{platform_name}}-{{counter}}.txt
topic = {topic}
request_port = {request_port}
request_address = 127.0.0.1
info = sensor=demo-sensor
nameserver = false
"""
CLIENT_INI = """\
[demo]
# request what the server announces into dst/<platform_name>/
providers = 127.0.0.1:{server_port}
topic = {topic}
destination = file://{dst}/{{platform_name}}/
publish_port = {publish_port}
nameservers = false
"""


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on the loopback interface right now."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class Process:
    """A trollmoves sub-command run as a child process, its output kept for inspection."""

    def __init__(self, name: str, argv: list[str], echo: TextIO | None) -> None:
        self.name = name
        self.lines: deque[str] = deque(maxlen=2000)
        self._changed = threading.Condition()
        self._echo = echo
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
            if self._echo is not None:
                self._echo.write(f"  [{self.name}] {line}")
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> bool:
        """Wait for an output line matching ``pattern``; False on timeout or exit."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if any(regex.search(line) for line in self.lines):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    return False
                self._changed.wait(remaining)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not ended within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout)

    def tail(self, count: int = 15) -> str:
        """The last output lines."""
        return "\n".join(f"  [{self.name}] {line}" for line in list(self.lines)[-count:])


class Arrivals:
    """Subscribes to the client's publisher and notes when each ``file`` message comes."""

    def __init__(self, port: int) -> None:
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt_string(zmq.SUBSCRIBE, posttroll_topic(TOPIC))
        monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.connected = bool(monitor.poll(10_000))
        if self.connected:
            recv_monitor_message(monitor)
        self.sock.disable_monitor()
        monitor.close(0)

    def next_file(self, timeout: float) -> tuple[float, Message] | None:
        """The next ``file`` message and when it came, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(remaining * 1000) + 1):
                return None
            raw = self.sock.recv()
            now = time.monotonic()
            try:
                message = Message(rawstr=raw)
            except MessageError:
                continue
            if message.type == "file" and isinstance(message.data, dict):
                return now, message
        return None

    def close(self) -> None:
        """Close the socket."""
        self.sock.close(0)


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "trollmoves.cli", *args]


def _drop(src: Path, name: str, content: bytes) -> float:
    """Write a sample file aside and rename it into ``src``; return when it was in place."""
    tmp = src / f".{name}.part"
    tmp.write_bytes(content)
    os.replace(tmp, src / name)
    return time.monotonic()


def run_demo(workdir: Path, files: int, interval: float, timeout: float, verbose: bool,
             out: TextIO) -> int:
    """Run the demo in ``workdir``; return the exit status."""
    src, dst = workdir / "src", workdir / "dst"
    src.mkdir()
    dst.mkdir()
    server_port, request_port, publish_port = free_ports(3)
    server_ini = workdir / "server.ini"
    server_ini.write_text(SERVER_INI.format(src=src, topic=TOPIC, request_port=request_port))
    client_ini = workdir / "client.ini"
    client_ini.write_text(CLIENT_INI.format(server_port=server_port, topic=TOPIC, dst=dst,
                                            publish_port=publish_port))
    echo = out if verbose else None
    print(f"trollmoves demo in {workdir} (removed at the end unless --keep)\n"
          f"  server config: {server_ini}\n  client config: {client_ini}", file=out)
    client = Process("client", _command("client", "-v", str(client_ini)), echo)
    server = Process("server", _command("server", "-v", "-p", str(server_port),
                                        str(server_ini)), echo)
    arrivals: Arrivals | None = None
    try:
        if not client.wait_for(rf"Receiving from tcp://127\.0\.0\.1:{server_port}\b", timeout):
            print("The client did not hear from the server in time:", file=out)
            print(server.tail() + "\n" + client.tail(), file=out)
            return 1
        arrivals = Arrivals(publish_port)
        if not arrivals.connected:
            print("Could not connect to the client's publisher", file=out)
            return 1
        print(f"Server and client are up; dropping {files} file(s) into {src}", file=out)
        return _send_and_watch(src, dst, files, interval, timeout, arrivals, out,
                               (server, client))
    finally:
        if arrivals is not None:
            arrivals.close()
        client.stop()
        server.stop()
        print("Server and client stopped.", file=out)


def _send_and_watch(src: Path, dst: Path, files: int, interval: float, timeout: float,
                    arrivals: Arrivals, out: TextIO, procs: Sequence[Process]) -> int:
    latencies = []
    for number in range(1, files + 1):
        name = f"{PLATFORM}-{number:03d}.txt"
        content = f"sample file {number} of the trollmoves demo\n".encode()
        dropped = _drop(src, name, content)
        arrived = arrivals.next_file(timeout)
        if arrived is None:
            print(f"  {name}: did not arrive within {timeout:g} s", file=out)
            print("\n".join(p.tail() for p in procs), file=out)
            return 1
        when, message = arrived
        uri = message.data.get("uri", "?")
        intact = Path(uri).is_file() and Path(uri).read_bytes() == content
        latency = (when - dropped) * 1000
        latencies.append(latency)
        print(f"  {name} -> {uri}  {latency:7.1f} ms{'' if intact else '  (content differs!)'}",
              file=out)
        if not intact:
            return 1
        if number < files and interval > 0:
            time.sleep(interval)  # pacing the sample files, so each latency stands alone
    delivered = sum(1 for _ in dst.rglob("*.txt"))
    print(f"{delivered} file(s) arrived in {dst}; latency median "
          f"{statistics.median(latencies):.1f} ms, max {max(latencies):.1f} ms", file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trollmoves demo``."""
    parser = argparse.ArgumentParser(prog="trollmoves demo", description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--files", type=int, default=5, help="sample files (default 5)")
    parser.add_argument("--interval", type=float, default=0.2,
                        help="seconds between sample files (default 0.2)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for start-up and for each file (default 30)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (configs, files) afterwards")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the server's and the client's log")
    args = parser.parse_args(argv)
    if args.files < 1:
        parser.error("--files must be at least 1")
    workdir = Path(tempfile.mkdtemp(prefix="trollmoves-demo-"))
    try:
        return run_demo(workdir, args.files, args.interval, args.timeout, args.verbose,
                        sys.stdout)
    except KeyboardInterrupt:
        return 130
    finally:
        if args.keep:
            print(f"Kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
