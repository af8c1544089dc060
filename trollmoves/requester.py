"""The REQ side of the request protocol: one posttroll message out, one reply back.

Each server address gets a small pool of REQ sockets so that several files can be requested
from it at once, either blocking (:meth:`Requester.request`) or many at a time from one
thread's poll loop (:class:`RequestMultiplexer`). A socket whose request timed out is closed
and never reused (the "lazy pirate" pattern: a REQ socket that missed its reply is stuck in
the wrong state), so a late reply can never be taken for the answer to a later request.
A multiplexed request may have a grace period: past its timeout its socket is kept that much
longer for a late reply, while the caller finds out (e.g. with a ``ping`` on another socket)
whether the server is alive, and may :meth:`RequestMultiplexer.cancel` it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import zmq
from posttroll.backends.zmq.socket import set_up_client_socket
from posttroll.message import Message, MessageError

from trollmoves import wire

LOG = logging.getLogger(__name__)

#: Largest reply accepted; a bigger one drops the connection and the request times out.
MAX_REPLY_BYTES = 64 * 1024 * 1024
#: Idle sockets kept per server address.
MAX_IDLE_SOCKETS = 32
#: Server addresses remembered at once (announcements name them, so they are bounded).
MAX_ADDRESSES = 256


class RequestError(Exception):
    """A request that got no usable reply."""


class RequestTimeout(RequestError, TimeoutError):
    """No reply came within the timeout; the socket used was discarded."""


def tcp_address(address: str) -> str:
    """``host:port`` (a ``request_address``) as a ZeroMQ endpoint ``tcp://host:port``."""
    address = str(address).strip()
    if "://" in address:
        return address
    if ":" not in address:
        raise ValueError(f"request address {address!r} is not host:port")
    return f"tcp://{address}"


def parse_reply(raw: bytes, address: str) -> Message:
    """Decode a reply; :class:`RequestError` when it is not a posttroll message."""
    try:
        return wire.decode(raw)
    except (MessageError, ValueError, UnicodeDecodeError) as err:
        raise RequestError(f"invalid reply from {address}: {err}") from None


class Requester:
    """Reusable REQ sockets to one server address, and blocking requests over them."""

    def __init__(self, address: str, max_idle: int = MAX_IDLE_SOCKETS) -> None:
        self.address = tcp_address(address)
        self._idle: deque[zmq.Socket] = deque()
        self._max_idle = max_idle
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self) -> zmq.Socket:
        """An idle socket, or a new one; give it back with :meth:`release` or :meth:`discard`."""
        with self._lock:
            if self._closed:
                raise RequestError(f"requester for {self.address} is closed")
            if self._idle:
                return self._idle.pop()
        try:
            return set_up_client_socket(zmq.REQ, self.address,
                                        {zmq.MAXMSGSIZE: MAX_REPLY_BYTES, zmq.LINGER: 0})
        except zmq.ZMQError as err:  # an address ZeroMQ cannot connect to ("bad host:x")
            raise RequestError(f"cannot connect to {self.address}: {err}") from None

    def release(self, sock: zmq.Socket) -> None:
        """Return a socket whose request got its reply, for reuse."""
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(sock)
                return
        sock.close(linger=0)

    @staticmethod
    def discard(sock: zmq.Socket) -> None:
        """Close a socket whose request got no reply: it is never reused (lazy pirate)."""
        sock.close(linger=0)

    def request(self, message: Message, timeout: float) -> Message:
        """Send ``message`` and return the reply; raise :class:`RequestError` when none comes.

        ``timeout`` is in seconds. A socket that timed out or got garbage is discarded.
        """
        sock = self.acquire()
        try:
            sock.setsockopt(zmq.RCVTIMEO, max(0, int(timeout * 1000)))
            sock.send_string(wire.encode(message))
            raw = sock.recv()
        except zmq.Again:
            self.discard(sock)
            raise RequestTimeout(f"no reply from {self.address} within {timeout:g} s") from None
        except zmq.ZMQError as err:
            self.discard(sock)
            raise RequestError(f"{self.address}: {err}") from None
        except BaseException:
            self.discard(sock)
            raise
        self.release(sock)
        return parse_reply(raw, self.address)

    def close(self) -> None:
        """Close every idle socket; requests in progress close theirs when they end."""
        with self._lock:
            self._closed = True
            idle, self._idle = list(self._idle), deque()
        for sock in idle:
            sock.close(linger=0)


class RequesterPool:
    """One :class:`Requester` per server address, the least recently used forgotten first."""

    def __init__(self, max_addresses: int = MAX_ADDRESSES) -> None:
        self._requesters: OrderedDict[str, Requester] = OrderedDict()
        self._max = max_addresses
        self._lock = threading.Lock()

    def get(self, address: str) -> Requester:
        """The requester for ``address`` (``host:port`` or ``tcp://host:port``)."""
        key = tcp_address(address)
        with self._lock:
            requester = self._requesters.get(key)
            if requester is not None:
                self._requesters.move_to_end(key)
                return requester
            requester = self._requesters[key] = Requester(key)
            evicted = (self._requesters.popitem(last=False)[1]
                       if len(self._requesters) > self._max else None)
        if evicted is not None:
            evicted.close()
        return requester

    def request(self, address: str, message: Message, timeout: float) -> Message:
        """Send ``message`` to ``address`` and return the reply (see :meth:`Requester.request`)."""
        return self.get(address).request(message, timeout)

    def close(self) -> None:
        """Close all requesters."""
        with self._lock:
            requesters = list(self._requesters.values())
            self._requesters.clear()
        for requester in requesters:
            requester.close()


#: Called with the reply, or with the error when there is none.
ReplyCallback = Callable[[Message | None, RequestError | None], None]


@dataclass(eq=False)
class PendingRequest:
    """A request in flight in a :class:`RequestMultiplexer` (to :meth:`~RequestMultiplexer.cancel`
    it)."""

    requester: Requester
    sock: zmq.Socket
    deadline: float
    callback: ReplyCallback
    grace: float = 0.0  #: seconds the socket is kept past ``deadline`` for a late reply
    on_late: Callable[[], None] | None = None  #: called when the grace period begins
    late: bool = False  #: in its grace period


class RequestMultiplexer:
    """Many requests in flight at once, their sockets in the poller of the thread owning this.

    That thread calls :meth:`handle` with what its poll returned and :meth:`expire` when
    :meth:`next_deadline` has passed; callbacks run in that thread. Not thread safe.
    """

    def __init__(self, pool: RequesterPool, poller: zmq.Poller,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._poller = poller
        self._clock = clock
        self._in_flight: dict[zmq.Socket, PendingRequest] = {}
        self._deadlines: list[tuple[float, int, zmq.Socket]] = []
        self._seq = itertools.count()

    def send(self, address: str, message: Message | str, timeout: float,
             callback: ReplyCallback, *, grace: float = 0.0,
             on_late: Callable[[], None] | None = None) -> PendingRequest | None:
        """Send ``message`` (or its encoded form) to ``address``; ``callback`` gets the reply
        or the error later (at once when it cannot be sent: then None is returned).

        With ``grace`` > 0 a request without a reply after ``timeout`` seconds keeps waiting
        ``grace`` seconds more on the same socket; ``on_late()`` is called when that begins.
        Raises ValueError for an address that is not ``host:port``.
        """
        requester = self._pool.get(address)
        try:
            sock = requester.acquire()
        except RequestError as err:
            callback(None, err)
            return None
        try:
            text = message if isinstance(message, str) else wire.encode(message)
            sock.send_string(text, zmq.NOBLOCK)
        except zmq.ZMQError as err:
            requester.discard(sock)
            callback(None, RequestError(f"cannot send to {requester.address}: {err}"))
            return None
        pending = PendingRequest(requester, sock, self._clock() + timeout, callback, grace,
                                 on_late)
        self._in_flight[sock] = pending
        self._push_deadline(pending)
        self._poller.register(sock, zmq.POLLIN)
        return pending

    def cancel(self, pending: PendingRequest) -> bool:
        """Abandon a request in flight (no callback; its socket is discarded). False when it
        had ended already."""
        if self._in_flight.get(pending.sock) is not pending:
            return False
        self._end(pending.sock)
        pending.requester.discard(pending.sock)
        return True

    def handle(self, ready: Mapping[Any, int]) -> None:
        """Deliver the replies that arrived (``ready`` as returned by the poller)."""
        for sock in [s for s in ready if s in self._in_flight]:
            entry = self._end(sock)
            try:
                raw = sock.recv(zmq.NOBLOCK)
            except zmq.ZMQError as err:
                entry.requester.discard(sock)
                self._call(entry, None, RequestError(f"{entry.requester.address}: {err}"))
                continue
            try:
                reply = parse_reply(raw, entry.requester.address)
            except RequestError as err:
                entry.requester.discard(sock)
                self._call(entry, None, err)
                continue
            entry.requester.release(sock)
            self._call(entry, reply, None)

    def expire(self) -> None:
        """Give up the requests whose timeout (and grace period) has passed; their sockets are
        discarded."""
        now = self._clock()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, sock = heapq.heappop(self._deadlines)
            entry = self._in_flight.get(sock)
            if entry is None or entry.deadline > now:
                continue
            if entry.grace > 0 and not entry.late:
                entry.late = True
                entry.deadline = now + entry.grace
                self._push_deadline(entry)
                if entry.on_late is not None:
                    self._guarded(entry, entry.on_late)
                continue
            self._end(sock)
            entry.requester.discard(sock)
            self._call(entry, None, RequestTimeout(
                f"no reply from {entry.requester.address} in time"))

    def next_deadline(self) -> float | None:
        """When the earliest request in flight times out, or None."""
        while self._deadlines and self._deadlines[0][2] not in self._in_flight:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def __len__(self) -> int:
        """Requests in flight."""
        return len(self._in_flight)

    def close(self) -> None:
        """Abandon every request in flight (no callback) and close their sockets."""
        for sock in list(self._in_flight):
            self._end(sock).requester.discard(sock)
        self._deadlines.clear()

    def _push_deadline(self, entry: PendingRequest) -> None:
        heapq.heappush(self._deadlines, (entry.deadline, next(self._seq), entry.sock))

    def _end(self, sock: zmq.Socket) -> PendingRequest:
        self._poller.unregister(sock)
        return self._in_flight.pop(sock)

    @classmethod
    def _call(cls, entry: PendingRequest, reply: Message | None, error: RequestError | None
              ) -> None:
        cls._guarded(entry, lambda: entry.callback(reply, error))

    @staticmethod
    def _guarded(entry: PendingRequest, func: Callable[[], None]) -> None:
        """Run a callback of ``entry``; what it raises is logged (the caller's loop goes on)."""
        try:
            func()
        except Exception:
            LOG.exception("Handling the reply from %s failed", entry.requester.address)
