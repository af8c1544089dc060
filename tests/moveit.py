"""Run trollmoves servers and clients (ours, or trollmoves 0.19 as the reference) as processes.

Used by the end-to-end tests and the benchmarks. Each process is a
:class:`tests.servers.ManagedServer`: its output goes to a log file, readiness is a log line,
``stop()`` sends SIGTERM and ``kill()`` SIGKILL. :class:`Listener` subscribes to publishers and
keeps every posttroll message, and knows when its connections are up (socket monitor), so no
test has to sleep to get around the PUB/SUB slow-joiner problem. :class:`FakeServer` stands in
for a server whose every reply the test decides (late, never, or at once).
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from posttroll.message import Message
from zmq.utils.monitor import recv_monitor_message

from tests.servers import HOST, ManagedServer, free_port
from trollmoves.subscription import Waker, posttroll_topic

#: trollmoves 0.19 in its own virtual environment (never imported, only run).
REFERENCE = Path(os.environ.get("TROLLMOVES_REFERENCE_VENV", "/opt/trollmoves019"))
DEADLINE = 20.0


def reference_available() -> bool:
    """True when trollmoves 0.19's scripts are installed."""
    return (REFERENCE / "bin" / "move_it_server.py").exists()


def installed(name: str) -> str | None:
    """Path of our console script ``name`` in this environment, or None."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def script(name: str, reference: bool = False) -> list[str]:
    """The command running console script ``name``: ours (this environment) or 0.19's."""
    if reference:
        return [str(REFERENCE / "bin" / "python"), str(REFERENCE / "bin" / name)]
    found = installed(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (pip install -e .)")
    return [sys.executable, found]


def write_ini(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write an INI file from ``{section: {key: value}}``."""
    lines = []
    for name, items in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {value}" for key, value in items.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def wait_for(predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "",
             interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def drop(directory: Path, name: str, content: bytes = b"x" * 1024, rename: bool = True
         ) -> Path:
    """Put a file in place as producers do: written aside and renamed into place, or (with
    ``rename=False``) written in place and closed."""
    final = directory / name
    if not rename:
        final.write_bytes(content)
        return final
    tmp = directory / f".{uuid.uuid4().hex}.tmp"
    tmp.write_bytes(content)
    os.replace(tmp, final)
    return final


class MoveItProcess(ManagedServer):
    """A ``move_it_server.py`` or ``move_it_client.py`` process."""

    def __init__(self, name: str, directory: Path, argv: list[str],
                 env: Mapping[str, str] | None = None) -> None:
        super().__init__(name, directory)
        self.argv = argv
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))

    def start(self, ready: str, timeout: float = DEADLINE) -> re.Match[str]:
        """Start and wait for a log line matching ``ready``."""
        self._spawn(self.argv, ready=re.compile(ready), env=self.env)
        return self._wait_ready_line(timeout)

    def wait_log(self, pattern: str, timeout: float = DEADLINE, count: int = 1) -> list[str]:
        """Wait until ``count`` log lines match ``pattern``; return them."""
        regex = re.compile(pattern)

        def matches() -> list[str]:
            found = [line for line in self.log_text().splitlines() if regex.search(line)]
            return found if len(found) >= count else []

        return wait_for(matches, timeout, f"{count} x {pattern!r} in {self.log_path}")


def logging_args(directory: Path, reference: bool, verbose: bool = True) -> list[str]:
    """Logging to the process output: ``-v`` (debug) or nothing (info) for ours, a debug log
    config for 0.19 (whose ``-v`` logs nothing more, and whose readiness lines are debug)."""
    if not reference:
        return ["-v"] if verbose else []
    config = directory / "log.yaml"
    config.write_text(
        "version: 1\ndisable_existing_loggers: false\n"
        "formatters: {plain: {format: '[%(asctime)s %(levelname)-8s %(name)s] %(message)s'}}\n"
        "handlers: {out: {class: logging.StreamHandler, formatter: plain, "
        "stream: 'ext://sys.stdout'}}\n"
        "root: {level: DEBUG, handlers: [out]}\n")
    return ["-c", str(config)]


def start_server(directory: Path, config: Path, port: int, *, reference: bool = False,
                 verbose: bool = True,
                 extra: Iterable[str] = (), env: Mapping[str, str] | None = None
                 ) -> MoveItProcess:
    """Start a server publishing on ``port``; ready once it watches its directories."""
    name = "ref-server" if reference else "server"
    argv = [*script("move_it_server.py", reference),
            *logging_args(directory, reference, verbose),
            "-p", str(port), *extra, str(config)]
    proc = MoveItProcess(name, directory, argv, env)
    proc.start(r"Using (os-based|polling) notifier" if reference else r"move_it_server ready")
    return proc


def start_client(directory: Path, config: Path, *, reference: bool = False,
                 verbose: bool = True,
                 name: str = "client", env: Mapping[str, str] | None = None) -> MoveItProcess:
    """Start a client; ready once every section has its publisher and subscriptions."""
    argv = [*script("move_it_client.py", reference),
            *logging_args(directory, reference, verbose),
            str(config)]
    proc = MoveItProcess(name, directory, argv, env)
    proc.start(r"Subscribing to|Add listener" if reference else r"Running \d+ section")
    return proc


def wait_receiving(client: MoveItProcess, port: int, reference: bool = False) -> None:
    """Wait until ``client`` has received a message from the publisher on ``port``: its
    subscription is in place there (servers send a heartbeat soon after they start)."""
    if reference:
        client.wait_log(r"Receiving \(SUB\) pytroll://heartbeat/move_it_server")
    else:
        client.wait_log(rf"Receiving from tcp://[^ ]+:{port}\b")


class Listener:
    """Subscribes to publishers and records every message they send."""

    def __init__(self, ports: Iterable[int], topic: str = "") -> None:
        self._ctx = zmq.Context.instance()
        self.sock = self._ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)  # keep everything: a test counts messages
        self.sock.setsockopt_string(zmq.SUBSCRIBE, posttroll_topic(topic) if topic else "")
        self._monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.ports = list(ports)
        self.messages: list[Message] = []
        self._connected = 0
        for port in self.ports:
            self.sock.connect(f"tcp://{HOST}:{port}")

    def wait_connected(self, timeout: float = DEADLINE) -> None:
        """Wait until every publisher has accepted the connection (subscriptions sent)."""
        deadline = time.monotonic() + timeout
        while self._connected < len(self.ports):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._monitor.poll(int(remaining * 1000)):
                raise AssertionError(f"listener connected to {self._connected} of {self.ports}")
            recv_monitor_message(self._monitor)
            self._connected += 1

    def drain(self, timeout: float = 0.0) -> list[Message]:
        """Read what has arrived (waiting up to ``timeout`` for the first message)."""
        new = []
        wait = int(timeout * 1000)
        while self.sock.poll(wait):
            new.append(Message(rawstr=self.sock.recv()))
            wait = 0
        self.messages.extend(new)
        return new

    def collect(self, predicate: Callable[[list[Message]], Any], timeout: float = DEADLINE,
                what: str = "") -> list[Message]:
        """Receive until ``predicate(messages)`` holds; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not predicate(self.messages):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kinds = [(m.type, m.data.get("uid") if isinstance(m.data, dict) else None)
                         for m in self.messages]
                raise AssertionError(f"timed out waiting for {what or predicate}; got {kinds}")
            self.drain(min(remaining, 0.5))
        return self.messages

    def of_type(self, kind: str) -> list[Message]:
        """The messages of one type received so far."""
        return [m for m in self.messages if m.type == kind]

    def uids(self, kind: str) -> list[str]:
        """The ``uid`` of every message of one type, in order."""
        return [m.data.get("uid") for m in self.of_type(kind)]

    def close(self) -> None:
        """Close the sockets."""
        self.sock.disable_monitor()
        self._monitor.close(0)
        self.sock.close(0)


class Deployment:
    """Servers, clients and listeners run together (servers ours, or 0.19's), stopped by
    :meth:`close`.

    Clients start first and servers at :meth:`run`, so that every client is connected when a
    server sends its first heartbeat, which tells that its subscription is in place.
    Listeners made before :meth:`run` are in place just as early (see :meth:`listen`).
    """

    def __init__(self, tmp_path: Path, reference_server: bool = False, verbose: bool = True
                 ) -> None:
        self.tmp = tmp_path
        self.reference = reference_server
        self.verbose = verbose
        self.procs: list[MoveItProcess] = []
        self.listeners: list[Listener] = []
        self._servers: list[tuple[Path, Path, int]] = []
        self._clients: list[tuple[MoveItProcess, list[int], bool]] = []
        self._running = False

    def server(self, sections: dict[str, dict[str, Any]], name: str = "server"
               ) -> tuple[int, dict[str, int]]:
        """Plan a server (started by :meth:`run`); return its publish and request ports."""
        pub_port, *req_ports = ports(1 + len(sections))
        request_ports = {}
        for (section, items), port in zip(sections.items(), req_ports, strict=True):
            items.setdefault("request_port", port)
            items.setdefault("request_address", "127.0.0.1")
            items.setdefault("nameserver", "false")
            request_ports[section] = int(items["request_port"])
        directory = self.tmp / name
        directory.mkdir(exist_ok=True)
        self._servers.append((directory, write_ini(directory / "server.ini", sections),
                              pub_port))
        return pub_port, request_ports

    def client(self, sections: dict[str, dict[str, Any]], name: str = "client",
               reference: bool = False) -> MoveItProcess:
        """Start a client (ours, or 0.19's with ``reference``)."""
        for items in sections.values():
            items.setdefault("nameservers", "false")
        directory = self.tmp / name
        directory.mkdir(exist_ok=True)
        proc = start_client(directory, write_ini(directory / "client.ini", sections), name=name,
                            reference=reference, verbose=self.verbose)
        self.procs.append(proc)
        providers = {int(p.split("/")[0].rsplit(":", 1)[1])
                     for items in sections.values() for p in str(items["providers"]).split()}
        self._clients.append((proc, sorted(providers), reference))
        return proc

    def run(self) -> None:
        """Start the servers; wait until every client hears from every server it uses."""
        for directory, config, port in self._servers:
            self.procs.append(start_server(directory, config, port, reference=self.reference,
                                           verbose=self.verbose))
        self._running = True
        for listener in self.listeners:
            listener.wait_connected()
        server_ports = {port for _, _, port in self._servers}
        for proc, providers, reference in self._clients:
            for port in server_ports.intersection(providers):
                wait_receiving(proc, port, reference)

    def listen(self, *publish_ports: int) -> Listener:
        """A listener on some publishers, connected once the servers run.

        Make it before :meth:`run`: a publisher drops what it sends before a new subscription
        has reached it, some time after the connection is up (PUB/SUB slow joiner), and a
        listener made at once after :meth:`run` could miss the first messages of the files a
        test puts in place right away. Made earlier, it is subscribed while the servers start
        (they announce nothing in their first second), as the clients are.
        """
        listener = Listener(publish_ports)
        self.listeners.append(listener)
        if self._running:
            listener.wait_connected()
        return listener

    def close(self) -> None:
        """Close the listeners, stop every process."""
        for listener in self.listeners:
            listener.close()
        for proc in reversed(self.procs):
            proc.stop()


def ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports."""
    found: set[int] = set()
    while len(found) < count:
        found.add(free_port())
    return sorted(found)


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock on."""
        self.now += seconds


def announcement(uid: str = "H-000-MSG4-202611211000-__", server: str = "127.0.0.1:9",
                 **extra: Any) -> Message:
    """A server's ``file`` announcement of ``uid`` on ``/1b/hrit``."""
    data = {"sensor": "seviri", "platform_name": "MSG4", "uri": f"/src/{uid}", "uid": uid,
            "request_address": server, **extra}
    return Message("/1b/hrit", "file", data)


def push_ok(request: Message) -> Message:
    """Reply like a server that delivered the file (and answers other requests in kind)."""
    if request.type == "push":
        return Message(request.subject, "file", {**request.data, "destination": "x"})
    if request.type == "ping":
        return Message(request.subject, "pong", {"station": "fake"})
    return Message(request.subject, request.type, request.data)


@dataclass(frozen=True)
class Held:
    """A request the fake server has not answered (yet)."""

    identity: bytes
    request: Message


class FakeServer:
    """A posttroll-speaking server in a thread: XPUB for announcements, ROUTER for requests.

    ``handler(request)`` returns the reply, or None to hold the request (see :attr:`held` and
    :meth:`reply`). Every socket is used by the server's thread only; other threads hand it
    their work through a queue and a :class:`~trollmoves.subscription.Waker`.
    """

    def __init__(self, handler: Callable[[Message], Message | None] = push_ok) -> None:
        self.ctx = zmq.Context.instance()
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscriber's subscriptions, not one
        self.pub_port = self.pub.bind_to_random_port(f"tcp://{HOST}")
        self.router = self.ctx.socket(zmq.ROUTER)
        self.req_port = self.router.bind_to_random_port(f"tcp://{HOST}")
        self.handler = handler
        self.requests: list[Message] = []
        self.held: list[Held] = []
        self.subscriptions: list[bytes] = []
        self._lock = threading.Lock()
        self._work: queue.SimpleQueue[tuple[zmq.Socket, list[bytes]]] = queue.SimpleQueue()
        self._poller = zmq.Poller()
        self._waker = Waker(self._poller)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def request_address(self) -> str:
        """``host:port`` of the request socket."""
        return f"{HOST}:{self.req_port}"

    def _serve(self) -> None:
        self._poller.register(self.router, zmq.POLLIN)
        self._poller.register(self.pub, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(self._poller.poll())
            self._waker.clear(ready)
            while not self._work.empty():
                sock, frames = self._work.get()
                sock.send_multipart(frames)
            if self.pub in ready:
                with self._lock:
                    self.subscriptions.append(self.pub.recv())
            if self.router in ready:
                self._answer(*self.router.recv_multipart())
        self._waker.close()
        self.pub.close(0)
        self.router.close(0)

    def _answer(self, identity: bytes, empty: bytes, payload: bytes) -> None:
        request = Message(rawstr=payload)
        with self._lock:
            self.requests.append(request)
        reply = self.handler(request)
        if reply is None:
            with self._lock:
                self.held.append(Held(identity, request))
        else:
            self.router.send_multipart([identity, empty, reply.encode().encode()])

    def _hand_over(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        self._work.put((sock, frames))
        self._waker.wake()

    def reply(self, held: Held, reply: Message) -> None:
        """Answer a held request now (any thread)."""
        with self._lock:
            self.held.remove(held)
        self._hand_over(self.router, [held.identity, b"", reply.encode().encode()])

    def publish(self, message: Message) -> Message:
        """Publish ``message`` (any thread); return it."""
        self._hand_over(self.pub, [message.encode().encode()])
        return message

    def publish_raw(self, raw: bytes) -> None:
        """Publish bytes as they are (any thread)."""
        self._hand_over(self.pub, [raw])

    def announce(self, uid: str, request_address: str | None = None, **extra: Any) -> Message:
        """Announce ``uid``, to be requested from this server (or ``request_address``)."""
        return self.publish(announcement(uid, request_address or self.request_address, **extra))

    def subscribers(self, topic: str) -> int:
        """How many subscriptions to ``topic`` (a posttroll subject) have arrived."""
        wanted = posttroll_topic(topic).encode()
        with self._lock:
            return sum(1 for s in self.subscriptions
                       if s[:1] == b"\x01" and wanted.startswith(s[1:]))

    def subscribed(self, topic: str) -> bool:
        """True once somebody subscribed to ``topic``."""
        return self.subscribers(topic) > 0

    def requested(self, kind: str) -> list[str]:
        """The ``uid`` of every request of type ``kind`` so far, in order."""
        with self._lock:
            return [r.data.get("uid") for r in self.requests
                    if r.type == kind and isinstance(r.data, dict)]

    def close(self) -> None:
        """Stop the thread and close the sockets."""
        self._stop.set()
        self._waker.wake()
        self._thread.join()
