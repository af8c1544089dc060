"""The REQ side of the request protocol: one posttroll message out, one reply back.

Each server address gets a small pool of REQ sockets so that several files can be requested
from it at once. A socket whose request timed out is closed and never reused (the "lazy
pirate" pattern: a REQ socket that missed its reply is stuck in the wrong state), so a late
reply can never be taken for the answer to a later request.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque

import zmq
from posttroll.backends.zmq.socket import set_up_client_socket
from posttroll.message import Message, MessageError

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
    address = address.strip()
    if "://" in address:
        return address
    if ":" not in address:
        raise ValueError(f"request address {address!r} is not host:port")
    return f"tcp://{address}"


class Requester:
    """Requests to one server address over reusable REQ sockets."""

    def __init__(self, address: str, max_idle: int = MAX_IDLE_SOCKETS) -> None:
        self.address = tcp_address(address)
        self._idle: deque[zmq.Socket] = deque()
        self._max_idle = max_idle
        self._lock = threading.Lock()
        self._closed = False

    def _checkout(self) -> zmq.Socket:
        with self._lock:
            if self._closed:
                raise RequestError(f"requester for {self.address} is closed")
            if self._idle:
                return self._idle.pop()
        sock = set_up_client_socket(zmq.REQ, self.address,
                                    {zmq.MAXMSGSIZE: MAX_REPLY_BYTES, zmq.LINGER: 0})
        return sock

    def _checkin(self, sock: zmq.Socket) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(sock)
                return
        sock.close(linger=0)

    def request(self, message: Message, timeout: float) -> Message:
        """Send ``message`` and return the reply; raise :class:`RequestError` when none comes.

        ``timeout`` is in seconds. A socket that timed out or got garbage is discarded.
        """
        sock = self._checkout()
        try:
            sock.send_string(message.encode())
            if not sock.poll(timeout=max(0, int(timeout * 1000)), flags=zmq.POLLIN):
                raise RequestTimeout(f"no reply from {self.address} within {timeout:g} s")
            raw = sock.recv()
        except BaseException:
            sock.close(linger=0)
            raise
        self._checkin(sock)
        try:
            return Message(rawstr=raw)
        except (MessageError, ValueError, UnicodeDecodeError) as err:
            raise RequestError(f"invalid reply from {self.address}: {err}") from None

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
