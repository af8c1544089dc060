"""Answer posttroll requests on a ZeroMQ ROUTER socket: :class:`RequestServer`.

The request half of a server or mirror section (``request_port``). One thread owns the ROUTER
socket and answers quick requests at once; slow ones (pushes) run on a pool of worker threads,
which hand their replies back over an inproc socket. Malformed input gets an ``err`` reply.

The pool wakes few threads for quick pushes (a local copy is a hard link and a rename): more
threads than cores only fight over the interpreter lock. A push that waits longer than
:data:`WORKER_PATIENCE` wakes one more thread, up to the pool size, so slow transfers (remote
hosts) still run side by side.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq
from posttroll.backends.zmq import get_context
from posttroll.backends.zmq.socket import close_socket, set_up_server_socket
from posttroll.message import Message

from trollmoves import announce, wire
from trollmoves.zmqutil import close_and_wait

LOG = logging.getLogger(__name__)

#: Largest request answered; bigger ones get an ``err`` reply.
MAX_REQUEST_BYTES = 1024 * 1024
#: Largest message ZeroMQ accepts at all; the connection of a peer sending more is dropped.
HARD_REQUEST_LIMIT = 16 * 1024 * 1024
#: Milliseconds the last replies get to leave when a request socket closes.
REPLY_LINGER_MS = 1000
#: Pushes served at once per section.
TRANSFER_WORKERS = 8
#: Slow requests accepted per worker (running or waiting); more get a "busy" reply at once.
PENDING_PER_WORKER = 4
#: Messages read from a socket per wake-up of the socket thread, at most.
BATCH = 64
#: Workers woken at once for slow requests; the others join when requests keep waiting.
EAGER_WORKERS = 2
#: Seconds a slow request waits for a busy worker before one more worker is woken.
WORKER_PATIENCE = 0.005
BUSY = "server busy, retry later"


class RequestServer:
    """A ROUTER socket answering posttroll requests; slow ones run on a thread pool.

    ``handle(message)`` returns the reply; for messages where ``is_slow(message)`` it runs on one
    of ``workers`` threads, others are answered at once. One thread owns the ROUTER socket; the
    pool hands replies back to it over an inproc socket. Malformed input (wrong frames, not a
    posttroll message, larger than ``max_bytes``) gets an ``err`` reply and a log line.

    At most ``max_pending`` slow requests (default ``PENDING_PER_WORKER`` per worker) run or wait
    at a time; more are answered ``err`` "server busy, retry later" at once. A slow request that
    waited ``expire_after`` seconds or more for a worker is answered ``err`` without being
    handled: its requester has given up by then, and a file copied for nobody would either
    land unannounced or be delivered twice when the request is repeated.
    :meth:`stop` stops reading requests; :meth:`join` waits for the replies in flight. Should the
    socket thread fail, it says so in the log and calls ``on_death()``.
    """

    def __init__(self, name: str, port: int, handle: Callable[[Message], Message],
                 is_slow: Callable[[Message], bool], *, workers: int = TRANSFER_WORKERS,
                 max_pending: int | None = None, expire_after: float | None = None,
                 max_bytes: int = MAX_REQUEST_BYTES,
                 on_death: Callable[[], None] | None = None) -> None:
        self.name = name
        self.port = port
        self.handle = handle
        self.is_slow = is_slow
        self.max_bytes = max_bytes
        self.max_pending = max_pending if max_pending is not None else PENDING_PER_WORKER * workers
        self.expire_after = expire_after
        self.on_death = on_death
        self._in_flight = 0  # slow requests running or waiting; used by the socket thread only
        self._inproc = f"inproc://trollmoves-replies-{id(self)}"
        self._pool = Workers(workers, f"push-{name}")
        self._local = threading.local()
        self._reply_sockets: list[zmq.Socket[bytes]] = []
        self._reply_lock = threading.Lock()
        self._router: zmq.Socket[bytes] | None = None
        self._replies: zmq.Socket[bytes] | None = None
        self._thread = threading.Thread(target=self._serve, name=f"requests-{name}", daemon=True)

    def start(self) -> None:
        """Bind the sockets (errors such as a port in use raise here) and start serving."""
        options = {zmq.MAXMSGSIZE: HARD_REQUEST_LIMIT}
        self._router, _, _ = set_up_server_socket(zmq.ROUTER, f"tcp://*:{self.port}", options)
        self._replies = get_context().socket(zmq.PULL)
        self._replies.bind(self._inproc)
        self._thread.start()
        LOG.info("%s: serving requests on port %d", self.name, self.port)

    @property
    def pending(self) -> int:
        """Slow requests running or waiting for a worker."""
        return self._in_flight

    def stop(self) -> None:
        """Stop reading requests (the thread finishes the ones in flight)."""
        if self._thread.is_alive():
            self._send_reply([b"STOP"])

    def join(self, timeout: float | None = None) -> None:
        """Wait until every reply in flight was sent and the sockets are closed."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the socket thread ------------------------------------------------------------------
    def _serve(self) -> None:
        assert self._router is not None and self._replies is not None
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._replies, zmq.POLLIN)
        draining = False
        try:
            while not (draining and self._in_flight == 0):
                patience = self._pool.patience()
                ready = poller.poll(None if patience is None else max(1, int(patience * 1000)))
                self._pool.spread()
                for sock, _ in ready:
                    if sock is self._replies:
                        if self._send_replies() and not draining:
                            draining = True
                            poller.unregister(self._router)
                    elif not draining:
                        for _ in range(BATCH):  # what came meanwhile, without polling again
                            self._receive()
                            if not _readable(self._router):
                                break
        except Exception:
            LOG.exception("%s: the request loop failed", self.name)
            if self.on_death is not None:
                self.on_death()
        finally:
            self._pool.shutdown()
            for sock in [*self._reply_sockets, self._replies]:
                close_socket(sock)
            # the last replies may leave; a restarted section can then bind the port at once
            close_and_wait(self._router, linger=REPLY_LINGER_MS)

    def _send_replies(self) -> bool:
        """Pass the replies the workers made on to the requesters; True once told to stop."""
        assert self._router is not None and self._replies is not None
        stop = False
        for _ in range(BATCH):
            frames = self._replies.recv_multipart()
            if frames == [b"STOP"]:
                stop = True
            else:
                self._in_flight -= 1
                self._router.send_multipart(frames)
            if not _readable(self._replies):
                break
        return stop

    def _receive(self) -> None:
        """Read one (waiting) request; answer it or hand it to the pool."""
        assert self._router is not None
        frames = self._router.recv_multipart(copy=False)
        identity = frames[0].bytes
        peer = _peer(frames[-1])
        if len(frames) != 3 or frames[1].bytes != b"":
            LOG.warning("%s: refused a request from %s: %d frame(s) instead of an envelope and "
                        "one message", self.name, peer, len(frames) - 1)
            self._reply_now(identity, announce.error_reply(
                "", "invalid request: expected exactly one message frame"))
            return
        payload = frames[2].bytes
        if len(payload) > self.max_bytes:
            LOG.warning("%s: refused a request from %s: %d bytes, more than %d", self.name, peer,
                        len(payload), self.max_bytes)
            self._reply_now(identity, announce.error_reply(
                "", f"request too large ({len(payload)} bytes, at most {self.max_bytes})"))
            return
        try:
            message = wire.decode(payload.decode("utf-8"))
        except Exception as err:  # noqa: BLE001 - posttroll raises many kinds on garbage
            LOG.warning("%s: refused a request from %s: not a posttroll message (%s: %.80r)",
                        self.name, peer, type(err).__name__, payload[:80])
            self._reply_now(identity, announce.error_reply(
                "", "invalid request: not a posttroll message"))
            return
        if not self.is_slow(message):
            self._router.send_multipart([identity, b"", self._answer(message)])
        elif self._in_flight >= self.max_pending:
            LOG.warning("%s: busy, refused a %s request from %s: %d already running or waiting",
                        self.name, message.type, peer, self._in_flight)
            self._reply_now(identity, announce.error_reply(message.subject, BUSY))
        else:
            self._in_flight += 1
            self._pool.submit(self._answer_later, identity, message, time.monotonic())

    def _reply_now(self, identity: bytes, reply: Message) -> None:
        assert self._router is not None
        self._router.send_multipart([identity, b"", wire.encode(reply).encode()])

    # -- answering --------------------------------------------------------------------------
    def _answer(self, message: Message) -> bytes:
        """The encoded reply to ``message``."""
        try:
            return wire.encode(self.handle(message)).encode()
        except Exception as err:  # a request must always get a reply
            LOG.exception("%s: failed to handle a %s request", self.name, message.type)
            reply = announce.error_reply(message.subject, f"server error: {type(err).__name__}")
            return wire.encode(reply).encode()

    def _answer_later(self, identity: bytes, message: Message, received: float) -> None:
        waited = time.monotonic() - received
        if self.expire_after is not None and waited >= self.expire_after:
            LOG.warning("%s: dropped a %s request that waited %.1f s for a worker; its requester "
                        "has given up", self.name, message.type, waited)
            reply = wire.encode(announce.error_reply(
                message.subject, f"{BUSY} (the request waited {waited:.1f} s)")).encode()
        else:
            reply = self._answer(message)
        self._send_reply([identity, b"", reply])

    def _send_reply(self, frames: list[bytes]) -> None:
        sock = getattr(self._local, "socket", None)
        if sock is None:
            sock = get_context().socket(zmq.PUSH)
            sock.connect(self._inproc)
            self._local.socket = sock
            with self._reply_lock:
                self._reply_sockets.append(sock)
        sock.send_multipart(frames)


class Workers:
    """Up to ``size`` threads running submitted calls in order. A call wakes a thread at once
    while fewer than ``eager`` run; else it waits for a thread to finish, and once it has waited
    ``wait`` seconds :meth:`spread` wakes one more thread for it (up to ``size``).

    The owner calls :meth:`spread` at the latest ``patience()`` seconds from now (its poll
    timeout). :meth:`shutdown` runs the calls submitted, then ends the threads.
    """

    def __init__(self, size: int, name: str, eager: int = EAGER_WORKERS,
                 wait: float = WORKER_PATIENCE) -> None:
        self.size = max(1, size)
        self.eager = max(1, min(eager, self.size))
        self.wait = wait
        self.name = name
        self._calls: deque[tuple[float, Callable[..., None], tuple[Any, ...]]] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for a call
        self._notified = 0  # idle threads told to take a call, not awake yet
        self._starting = 0  # threads started for a call, not running yet
        self._running = 0  # threads running a call
        self._stopping = False

    @property
    def _woken(self) -> int:
        return self._notified + self._starting

    def submit(self, func: Callable[..., None], *args: Any) -> None:
        """Run ``func(*args)`` on a worker (what it raises is logged)."""
        with self._cond:
            self._calls.append((time.monotonic(), func, args))
            if self._running + self._woken < self.eager:
                self._wake()

    def patience(self) -> float | None:
        """Seconds until a waiting call has waited long enough to wake one more thread; None
        when no call waits for a thread or every thread is busy."""
        with self._cond:
            if len(self._calls) <= self._woken or self._running + self._woken >= self.size:
                return None
            return max(0.0, self._calls[self._woken][0] + self.wait - time.monotonic())

    def spread(self) -> None:
        """Wake one more thread for every call that waited ``wait`` seconds (up to ``size``)."""
        with self._cond:
            limit = time.monotonic() - self.wait
            while (len(self._calls) > self._woken and self._running + self._woken < self.size
                   and self._calls[self._woken][0] <= limit):
                self._wake()

    def shutdown(self) -> None:
        """Run the calls submitted, then end every thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()  # the idle threads take what waits, then end
            threads = list(self._threads)
        for thread in threads:
            thread.join()

    def _wake(self) -> None:
        """Have one more thread take a call (holding the lock)."""
        if self._idle > self._notified:
            self._notified += 1
            self._cond.notify()
        elif len(self._threads) < self.size:
            self._starting += 1
            thread = threading.Thread(target=self._work, name=f"{self.name}_{len(self._threads)}",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        with self._cond:
            self._starting -= 1
            while True:
                if self._calls:  # a thread that is awake takes the next call
                    _, func, args = self._calls.popleft()
                    self._running += 1
                    self._cond.release()
                    try:
                        func(*args)
                    except Exception:  # logged; the thread goes on
                        LOG.exception("%s: a call failed", self.name)
                    finally:
                        self._cond.acquire()
                        self._running -= 1
                elif self._stopping:
                    return
                else:
                    self._idle += 1
                    self._cond.wait()
                    self._idle -= 1
                    self._notified = max(0, self._notified - 1)


_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain numbers: no enum per call


def _readable(sock: zmq.Socket[bytes]) -> bool:
    """True when a message is waiting on ``sock`` (a socket option: cheaper than polling or
    a failing non-blocking read)."""
    return bool(sock.getsockopt(_EVENTS) & _POLLIN)


def _peer(frame: zmq.Frame) -> str:
    try:
        return frame.get("Peer-Address")
    except (zmq.ZMQError, AttributeError):
        return "an unknown peer"
