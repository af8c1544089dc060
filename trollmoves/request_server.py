"""Answer posttroll requests on a ZeroMQ ROUTER socket: :class:`RequestServer`.

The request half of a server or mirror section (``request_port``). One thread owns the ROUTER
socket and answers quick requests at once; slow ones (pushes) run on a pool of worker threads,
which hand their replies back over an inproc socket. Malformed input gets an ``err`` reply.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import zmq
from posttroll.backends.zmq import get_context
from posttroll.backends.zmq.socket import close_socket, set_up_server_socket
from posttroll.message import Message

from trollmoves import announce
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
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"push-{name}")
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
                for sock, _ in poller.poll():
                    if sock is self._replies:
                        frames = self._replies.recv_multipart()
                        if frames == [b"STOP"]:
                            draining = True
                            poller.unregister(self._router)
                        else:
                            self._in_flight -= 1
                            self._router.send_multipart(frames)
                    elif not draining:
                        self._receive()
        except Exception:
            LOG.exception("%s: the request loop failed", self.name)
            if self.on_death is not None:
                self.on_death()
        finally:
            self._pool.shutdown(wait=True)
            for sock in [*self._reply_sockets, self._replies]:
                close_socket(sock)
            # the last replies may leave; a restarted section can then bind the port at once
            close_and_wait(self._router, linger=REPLY_LINGER_MS)

    def _receive(self) -> None:
        """Read one request; answer it or hand it to the pool."""
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
            message = Message(rawstr=payload.decode("utf-8"))
        except Exception as err:  # noqa: BLE001 - posttroll raises many kinds on garbage
            LOG.warning("%s: refused a request from %s: not a posttroll message (%s: %.80r)",
                        self.name, peer, type(err).__name__, payload[:80])
            self._reply_now(identity, announce.error_reply(
                "", "invalid request: not a posttroll message"))
            return
        if not self.is_slow(message):
            self._reply_now(identity, self._answer(message))
        elif self._in_flight >= self.max_pending:
            LOG.warning("%s: busy, refused a %s request from %s: %d already running or waiting",
                        self.name, message.type, peer, self._in_flight)
            self._reply_now(identity, announce.error_reply(message.subject, BUSY))
        else:
            self._in_flight += 1
            self._pool.submit(self._answer_later, identity, message, time.monotonic())

    def _reply_now(self, identity: bytes, reply: Message) -> None:
        assert self._router is not None
        self._router.send_multipart([identity, b"", reply.encode().encode()])

    # -- answering --------------------------------------------------------------------------
    def _answer(self, message: Message) -> Message:
        try:
            return self.handle(message)
        except Exception as err:  # a request must always get a reply
            LOG.exception("%s: failed to handle a %s request", self.name, message.type)
            return announce.error_reply(message.subject, f"server error: {type(err).__name__}")

    def _answer_later(self, identity: bytes, message: Message, received: float) -> None:
        waited = time.monotonic() - received
        if self.expire_after is not None and waited >= self.expire_after:
            LOG.warning("%s: dropped a %s request that waited %.1f s for a worker; its requester "
                        "has given up", self.name, message.type, waited)
            reply = announce.error_reply(message.subject,
                                         f"{BUSY} (the request waited {waited:.1f} s)")
        else:
            reply = self._answer(message)
        self._send_reply([identity, b"", reply.encode().encode()])

    def _send_reply(self, frames: list[bytes]) -> None:
        sock = getattr(self._local, "socket", None)
        if sock is None:
            sock = get_context().socket(zmq.PUSH)
            sock.connect(self._inproc)
            self._local.socket = sock
            with self._reply_lock:
                self._reply_sockets.append(sock)
        sock.send_multipart(frames)


def _peer(frame: zmq.Frame) -> str:
    try:
        return frame.get("Peer-Address")
    except (zmq.ZMQError, AttributeError):
        return "an unknown peer"
