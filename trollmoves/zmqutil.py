"""ZeroMQ helpers: close a bound socket and know when its port is free again.

``socket.close()`` only hands the socket to ZeroMQ's background threads; the listening port is
released a moment later. A service restarting on the same port (a reloaded section) must wait
for that, or its bind fails with "Address already in use"::

    close_and_wait(sock)                 # returns once the port can be bound again

For a socket that something else closes (e.g. ``posttroll.publisher.Publisher.stop()``),
watch it first, from the thread that uses the socket::

    released = ReleaseWatch(publisher.publish_socket)
    publisher.stop()
    released.wait()

Both are for sockets bound to one endpoint that connect nowhere (request and publish sockets).
They use a socket monitor: ZeroMQ reports ``EVENT_CLOSED`` once the listening file descriptor is
closed, so nothing polls. The monitor reports that event only, and its receiving end is closed
only after the event arrived: ZeroMQ sends monitor events with a blocking send, so an event for
a monitor nobody reads any more would hang ZeroMQ's own thread (and every socket with it).
"""

from __future__ import annotations

import logging
import threading
import uuid

import zmq
from zmq.utils.monitor import parse_monitor_message

LOG = logging.getLogger(__name__)

#: Seconds :func:`close_and_wait` waits for ZeroMQ to release a port by default.
CLOSE_TIMEOUT = 5.0


class ReleaseWatch:
    """Watch a bound socket that is about to be closed; :meth:`wait` returns once its endpoint
    (``LAST_ENDPOINT``) is released. Create it from the thread that uses the socket."""

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self.endpoint: bytes = sock.get(zmq.LAST_ENDPOINT) or b""
        address = f"inproc://trollmoves-release-{uuid.uuid4().hex}"  # unique: never collides
        sock.monitor(address, zmq.EVENT_CLOSED)
        self._monitor: zmq.Socket[bytes] = sock.context.socket(zmq.PAIR)
        self._monitor.connect(address)

    def wait(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Block until the endpoint is released (True) or ``timeout`` seconds passed (False)."""
        if not self.endpoint:  # never bound: nothing to release, and no event will come
            self._monitor.close(linger=0)
            return True
        if self._monitor.poll(int(timeout * 1000)) and self._released():
            self._monitor.close(linger=0)
            return True
        LOG.warning("ZeroMQ did not release %s within %g s", self.endpoint.decode(), timeout)
        # keep reading in the background: the event must find a reader when it comes
        threading.Thread(target=self._drain, name="zmq-release", daemon=True).start()
        return False

    def _released(self) -> bool:
        event = parse_monitor_message(self._monitor.recv_multipart())
        return event["event"] == zmq.EVENT_CLOSED and event["endpoint"] == self.endpoint

    def _drain(self) -> None:
        while not self._released():
            pass
        self._monitor.close(linger=0)


def close_and_wait(sock: zmq.Socket[bytes], timeout: float = CLOSE_TIMEOUT,
                   linger: int | None = None) -> bool:
    """Close ``sock`` (``linger`` milliseconds for unsent messages; None: the socket's own
    setting) and wait up to ``timeout`` seconds until its port is free; False on timeout."""
    if sock.closed:
        return True
    watch = ReleaseWatch(sock)
    sock.close(linger=linger)
    return watch.wait(timeout)
