"""The receiving side of the message-driven front ends (dispatcher, s3downloader, fetcher).

    SUB sockets -> size bound -> decode -> handle(message)

A :class:`Receiver` owns its ZeroMQ sockets in a thread of its own. Publishers are subscribed
at the ``addresses`` given and/or found through a posttroll nameserver: each service is asked
for once, and with ``addr_listener`` the nameserver's announcements add and remove publishers
while running. Every message is bounded in size (``zmq.MAXMSGSIZE``: ZeroMQ drops a connection
that brings a larger one and would not connect again by itself; the receiver logs it, handles
what arrived before and connects again), decoded inside its own try (a message that is not a
posttroll message is a WARNING and skipped) and handled inside its own try (an ERROR, then the
next message). Nothing sleeps: the poll returns for a message, a
wake-up (stop, resubscribe), a nameserver's deadline or the periodic ``tick`` (heartbeats).

:class:`Control` is the main thread's side: signal handlers, the config file watcher and the
receive thread only post a request to it (a flag and a byte in a pipe), and the main thread
acts on it. So nothing but a flag and a write runs inside a signal handler.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import zmq
from posttroll.address_receiver import get_configured_address_port
from posttroll.backends.zmq.ns import create_nameserver_address
from posttroll.backends.zmq.socket import set_up_client_socket
from posttroll.message import _MAGICK, Message
from zmq.utils.monitor import recv_monitor_message

from trollmoves.config import file_signature
from trollmoves.control import FileWatch, Signature, install_signals
from trollmoves.subscription import BATCH, MAX_MESSAGE_BYTES, Waker, posttroll_topic
from trollmoves.wakeup import WakePipe

LOG = logging.getLogger(__name__)

#: Subject prefix of the nameserver's announcements of publishers.
ADDRESS_TOPIC = "pytroll://address"
#: Characters of a bad message (or of an error about it) shown in a log line.
EXCERPT = 80
_POSTTROLL_KEYS = frozenset({"topics", "addresses", "nameserver", "services", "addr_listener",
                             "timeout"})


def clip(value: Any, limit: int = EXCERPT) -> str:
    """``str(value)`` cut to ``limit`` characters (for log lines about data from the wire)."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _as_tuple(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class SubscriberSettings:
    """Where messages come from and which subjects are wanted."""

    topics: tuple[str, ...] = (_MAGICK,)  #: subject prefixes
    addresses: tuple[str, ...] = ()  #: publishers to connect to directly (``tcp://host:port``)
    nameserver: str | None = "localhost"  #: None: only ``addresses``
    services: tuple[str, ...] = ("",)  #: services asked from the nameserver; ``""``: all
    addr_listener: bool = True  #: subscribe to publishers the nameserver announces later
    timeout: float = 10.0  #: seconds the nameserver has to answer

    @classmethod
    def from_posttroll(cls, settings: Mapping[str, Any]) -> SubscriberSettings:
        """Read the dict posttroll's ``create_subscriber_from_dict_config`` takes, by its rules:
        ``nameserver: false`` with ``addresses`` means those addresses only, otherwise a
        nameserver is asked too (localhost unless named); ``services`` ``""`` is every
        service and None none; ``addr_listener`` is off unless set."""
        for key in sorted(set(settings) - _POSTTROLL_KEYS):
            LOG.warning("Subscriber option %r is not supported; ignored", key)
        addresses = _as_tuple(settings.get("addresses"))
        nameserver = settings.get("nameserver", "localhost")
        topics = settings.get("topics")
        return cls(
            topics=(_MAGICK,) if topics is None else _as_tuple(topics),
            addresses=addresses,
            nameserver=None if nameserver is False and addresses else str(
                nameserver or "localhost"),
            services=_as_tuple(settings.get("services", "")),
            addr_listener=bool(settings.get("addr_listener", False)),
            timeout=float(settings.get("timeout", 10.0)))

    def describe(self) -> str:
        """A short text for log lines."""
        sources = list(self.addresses)
        if self.nameserver is not None:
            services = ", ".join(s or "all services" for s in self.services) or "no service"
            sources.append(f"nameserver {self.nameserver} ({services})")
        return f"topics {', '.join(self.topics)} from {', '.join(sources) or 'nowhere'}"


def decode(raw: bytes, origin: str) -> Message | None:
    """The posttroll message in ``raw``; None, logged as a WARNING, when it is not one."""
    try:
        if not raw:
            raise ValueError("empty message")
        return Message(rawstr=raw.decode("utf-8"))
    except Exception as err:  # noqa: BLE001 - whatever the decoder makes of malformed input
        LOG.warning("Dropped a message from %s that is not a posttroll message (%s: %s): %r",
                    origin, type(err).__name__, clip(err), raw[:EXCERPT])
        return None


class _Sockets:
    """The sockets of one subscription, registered in the receive thread's poller."""

    def __init__(self, settings: SubscriberSettings, poller: zmq.Poller, max_bytes: int
                 ) -> None:
        self.settings = settings
        self._poller = poller
        self._max_bytes = max_bytes
        self._subs: dict[str, zmq.Socket] = {}  #: publisher address -> SUB socket
        self._monitors: dict[zmq.Socket, str] = {}  #: monitor -> publisher address
        self._lookups: dict[zmq.Socket, tuple[str, float]] = {}  #: REQ -> service, deadline
        self._listener: zmq.Socket | None = None  #: the nameserver's address announcements

    # -- setting up -------------------------------------------------------------------------
    def open(self) -> None:
        """Connect to the addresses and ask the nameserver; raise when the settings fail."""
        try:
            for address in self.settings.addresses:
                self.add(address)
            if self.settings.nameserver is not None:
                if self.settings.addr_listener:
                    self._listen(self.settings.nameserver)
                for service in self.settings.services:
                    self._ask(self.settings.nameserver, service)
        except Exception:
            self.close()
            raise

    def _socket(self, kind: int, address: str) -> zmq.Socket:
        sock = set_up_client_socket(kind, address, {zmq.MAXMSGSIZE: self._max_bytes,
                                                    zmq.LINGER: 0})
        self._poller.register(sock, zmq.POLLIN)
        return sock

    def _close(self, sock: zmq.Socket) -> None:
        self._poller.unregister(sock)
        sock.close(linger=0)

    def add(self, address: str) -> None:
        """Subscribe to the publisher at ``address`` (once)."""
        if address in self._subs:
            return
        sock = self._socket(zmq.SUB, address)
        for topic in self.settings.topics:
            sock.setsockopt_string(zmq.SUBSCRIBE, posttroll_topic(topic))
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._poller.register(monitor, zmq.POLLIN)
        self._subs[address], self._monitors[monitor] = sock, address
        LOG.info("Subscribing to %s for %s", address, ", ".join(self.settings.topics))

    def remove(self, address: str) -> None:
        """Unsubscribe from the publisher at ``address``."""
        if self._drop(address):
            LOG.info("Unsubscribed from %s", address)

    def _drop(self, address: str) -> bool:
        sock = self._subs.pop(address, None)
        if sock is None:
            return False
        sock.disable_monitor()
        for monitor in [m for m, a in self._monitors.items() if a == address]:
            del self._monitors[monitor]
            self._close(monitor)
        self._close(sock)
        return True

    def _listen(self, nameserver: str) -> None:
        host = urlsplit(nameserver).hostname if "://" in nameserver else nameserver
        sock = self._socket(zmq.SUB, f"tcp://{host}:{get_configured_address_port()}")
        sock.setsockopt_string(zmq.SUBSCRIBE, ADDRESS_TOPIC)
        self._listener = sock

    def _ask(self, nameserver: str, service: str) -> None:
        sock = self._socket(zmq.REQ, create_nameserver_address(nameserver))
        sock.send_string(Message("/oper/ns", "request", {"service": service}).encode())
        self._lookups[sock] = (service, time.monotonic() + self.settings.timeout)

    def close(self) -> None:
        """Close every socket."""
        for address in list(self._subs):
            self._drop(address)
        for sock in [*self._lookups, *([self._listener] if self._listener else [])]:
            self._close(sock)
        self._lookups.clear()
        self._listener = None

    # -- receiving --------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """When the earliest nameserver lookup times out (monotonic clock), or None."""
        return min((deadline for _, deadline in self._lookups.values()), default=None)

    def read(self, ready: Mapping[Any, int], go_on: Callable[[], bool]
             ) -> Iterator[tuple[str, bytes]]:
        """(publisher address, raw message) of the messages waiting on the ready sockets; a
        socket is read while ``go_on()`` holds, at most BATCH at a time."""
        for address, sock in list(self._subs.items()):
            if sock in ready:
                yield from self._recv(address, sock, go_on, BATCH)

    @staticmethod
    def _recv(address: str, sock: zmq.Socket, go_on: Callable[[], bool], limit: float
              ) -> Iterator[tuple[str, bytes]]:
        count = 0
        while count < limit and go_on():
            try:
                raw = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            count += 1
            yield address, raw

    def drain(self, address: str, go_on: Callable[[], bool]) -> Iterator[tuple[str, bytes]]:
        """Everything still waiting on the socket of ``address`` (while ``go_on()`` holds)."""
        sock = self._subs.get(address)
        if sock is not None:
            yield from self._recv(address, sock, go_on, math.inf)

    def lost(self, ready: Mapping[Any, int]) -> list[str]:
        """The addresses whose connection dropped, from the ready monitors."""
        dropped = []
        for monitor, address in list(self._monitors.items()):
            if monitor in ready and self._disconnected(monitor):
                LOG.warning("Lost the connection to %s (the publisher stopped, or sent a "
                            "message over %d bytes, which is refused); connecting again",
                            address, self._max_bytes)
                dropped.append(address)
        return dropped

    @staticmethod
    def _disconnected(monitor: zmq.Socket) -> bool:
        found = False
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return found
            found = found or event["event"] == zmq.EVENT_DISCONNECTED

    def reconnect(self, address: str) -> None:
        """Connect to ``address`` anew: after a refused message ZeroMQ would not."""
        sock = self._subs.get(address)
        if sock is None:
            return
        with contextlib.suppress(zmq.ZMQError):  # already gone with the refused message
            sock.disconnect(address)
        sock.connect(address)

    def service(self, ready: Mapping[Any, int]) -> None:
        """Deal with the nameserver's answers and announcements, and expired lookups."""
        for sock, (service, deadline) in list(self._lookups.items()):
            if sock in ready:
                del self._lookups[sock]
                raw = sock.recv(zmq.NOBLOCK)
                self._close(sock)
                self._found(service, decode(raw, f"nameserver {self.settings.nameserver}"))
            elif time.monotonic() >= deadline:
                del self._lookups[sock]
                self._close(sock)
                LOG.warning("Nameserver %s did not answer within %g s for service %r%s",
                            self.settings.nameserver, self.settings.timeout, service,
                            self._later())
        if self._listener is not None and self._listener in ready:
            for _ in range(BATCH):
                try:
                    raw = self._listener.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._announced(decode(raw, f"nameserver {self.settings.nameserver}"))

    def _later(self) -> str:
        if self.settings.addr_listener:
            return "; publishers it announces from now on are subscribed"
        return "; set addr_listener to subscribe to publishers it announces later"

    def _subscribe_found(self, address: Any) -> None:
        if not isinstance(address, str):
            return
        try:
            self.add(address)
        except zmq.ZMQError as err:
            LOG.error("Cannot subscribe to %s, which the nameserver named: %s", clip(address),
                      err)

    def _found(self, service: str, reply: Message | None) -> None:
        entries = reply.data if reply is not None and isinstance(reply.data, list) else []
        addresses = [e.get("URI") for e in entries if isinstance(e, Mapping)]
        if not addresses:
            LOG.warning("Nameserver %s knows no publisher of %s yet%s",
                        self.settings.nameserver, repr(service) if service else "any service",
                        self._later())
        for address in addresses:
            self._subscribe_found(address)

    def _announced(self, message: Message | None) -> None:
        data = message.data if message is not None and isinstance(message.data, Mapping) else {}
        address = data.get("URI")
        if not isinstance(address, str):
            return
        if data.get("status", True):
            offered = data.get("service") or []
            offered = [offered] if isinstance(offered, str) else offered
            if any(not s or s in offered for s in self.settings.services):
                self._subscribe_found(address)
        elif address not in self.settings.addresses:
            self.remove(address)


class Receiver:
    """Receives posttroll messages in a thread of its own and hands each to ``handle``.

    ``tick`` is called from the receive thread at the start and every ``tick_interval``
    seconds (heartbeats); ``on_exit`` when the thread ends, whatever the reason.
    """

    def __init__(self, settings: SubscriberSettings, handle: Callable[[Message], None], *,
                 tick: Callable[[], None] | None = None, tick_interval: float = 30.0,
                 max_bytes: int = MAX_MESSAGE_BYTES, on_exit: Callable[[], None] | None = None,
                 name: str = "receiver") -> None:
        self.settings = settings
        self._handle = handle
        self._tick = tick
        self._tick_interval = tick_interval
        self._max_bytes = max_bytes
        self._on_exit = on_exit
        self._poller = zmq.Poller()
        self._waker = Waker(self._poller)
        self._sockets: _Sockets | None = None
        self._pending: SubscriberSettings | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None  #: what ended the thread, if not a stop

    # -- control (any thread) ---------------------------------------------------------------
    def start(self) -> None:
        """Subscribe (raising when the settings do not work) and start receiving."""
        try:
            self._sockets = self._open(self.settings)
        except Exception:
            self._waker.close()
            raise
        self._thread.start()

    def resubscribe(self, settings: SubscriberSettings) -> None:
        """Replace the subscription (the current one stays if the new one fails)."""
        with self._lock:
            self._pending = settings
        self._waker.wake()

    def stop(self) -> None:
        """Stop after the message being handled."""
        self._stopping.set()
        self._waker.wake()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the receive thread to end."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the receive thread -----------------------------------------------------------------
    def _open(self, settings: SubscriberSettings) -> _Sockets:
        sockets = _Sockets(settings, self._poller, self._max_bytes)
        sockets.open()
        return sockets

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as err:
            LOG.exception("The receive loop stopped on an unexpected error")
            self.error = err
        finally:
            if self._sockets is not None:
                self._sockets.close()
            self._waker.close()
            if self._on_exit is not None:
                self._on_exit()

    def _loop(self) -> None:
        next_tick = time.monotonic()
        while not self._stopping.is_set():
            if self._tick is not None and time.monotonic() >= next_tick:
                self._call_tick()
                next_tick = time.monotonic() + self._tick_interval
            ready = dict(self._poller.poll(self._poll_timeout(next_tick)))
            self._waker.clear(ready)
            self._apply_pending()
            assert self._sockets is not None
            self._sockets.service(ready)
            for origin, raw in self._sockets.read(ready, self._going_on):
                self._deliver(origin, raw)
            for address in self._sockets.lost(ready):
                for origin, raw in self._sockets.drain(address, self._going_on):
                    self._deliver(origin, raw)
                self._sockets.reconnect(address)

    def _going_on(self) -> bool:
        return not self._stopping.is_set()

    def _poll_timeout(self, next_tick: float) -> int | None:
        deadlines = [next_tick] if self._tick is not None else []
        assert self._sockets is not None
        lookup = self._sockets.next_deadline()
        if lookup is not None:
            deadlines.append(lookup)
        if not deadlines:
            return None
        return max(0, math.ceil((min(deadlines) - time.monotonic()) * 1000))

    def _call_tick(self) -> None:
        try:
            self._tick()  # type: ignore[misc]
        except Exception:
            LOG.exception("Periodic task of the receive loop failed")

    def _apply_pending(self) -> None:
        with self._lock:
            settings, self._pending = self._pending, None
        if settings is None:
            return
        try:
            sockets = self._open(settings)
        except Exception as err:  # noqa: BLE001 - keep receiving as before
            LOG.error("Cannot subscribe to %s, keeping the current subscription: %s",
                      settings.describe(), err)
            return
        assert self._sockets is not None
        self._sockets.close()
        self._sockets, self.settings = sockets, settings
        LOG.info("Resubscribed: %s", settings.describe())

    def _deliver(self, origin: str, raw: bytes) -> None:
        message = decode(raw, origin)
        if message is None:
            return
        try:
            self._handle(message)
        except Exception:
            LOG.exception("Could not handle %s message on %s from %s", clip(message.type),
                          clip(message.subject), origin)


# ------------------------------------------------------------------------- the main thread


class Control:
    """What the main thread of a front end waits for: a stop or a reload request.

    Signal handlers, the config file watcher and other threads only post a request; :meth:`wait`
    returns it in the main thread, where the work is done.
    """

    STOP = "stop"
    RELOAD = "reload"

    def __init__(self) -> None:
        self._wakeup = WakePipe()
        self._stop = False
        self._reload = False
        self._restore: list[Callable[[], None]] = []
        self._watch: FileWatch | None = None

    def request_stop(self) -> None:
        """Ask :meth:`wait` to return STOP (safe from any thread or signal handler)."""
        self._stop = True
        self._wakeup.poke()

    def request_reload(self) -> None:
        """Ask :meth:`wait` to return RELOAD (safe from any thread or signal handler)."""
        self._reload = True
        self._wakeup.poke()

    def install_signals(self, reload: bool = False) -> None:
        """SIGTERM and SIGINT request a stop (a second one ends the process at once); with
        ``reload``, SIGHUP requests a reload. Call from the main thread."""
        self._restore.append(install_signals(self.request_stop,
                                             self.request_reload if reload else None))

    def watch(self, path: str, loaded: Signature) -> None:
        """Request a reload whenever the file at ``path`` changes (watchdog, no polling);
        ``loaded`` is the :func:`~trollmoves.config.file_signature` of the version in use, so
        that a change made before the watch began is not missed."""
        seen = [loaded]

        def changed() -> None:
            seen[0] = file_signature(path)
            self.request_reload()

        self._watch = FileWatch(path, lambda: seen[0], changed)

    def wait(self) -> str:
        """Block until a request comes; STOP wins over RELOAD."""
        while True:
            if self._stop:
                return self.STOP
            if self._reload:
                self._reload = False
                return self.RELOAD
            self._wakeup.wait()

    def close(self) -> None:
        """Stop watching, put the previous signal handlers back, close the pipe."""
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        while self._restore:
            self._restore.pop()()
        self._wakeup.close()


def run_until_stopped(name: str, serve: Callable[[Control], None]) -> int:
    """Run ``serve(control)`` with SIGTERM/SIGINT wired to ``control``; the exit status.

    0 after a requested stop, 1 when ``serve`` raised (logged with its traceback).
    """
    control = Control()
    control.install_signals()
    try:
        serve(control)
    except Exception:
        LOG.exception("%s stopped on an error", name)
        return 1
    finally:
        control.close()
    LOG.info("%s stopped", name)
    return 0
