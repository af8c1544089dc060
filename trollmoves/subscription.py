"""One subscription set over several posttroll publishers, with heartbeat monitoring.

Each provider (``host:port``, optionally ``host:port/topic``) gets its own SUB socket, so that a
provider that fell silent for longer than ``heartbeat_alarm_scale`` times its heartbeat interval
can be resubscribed alone. Messages are read without blocking the caller longer than asked,
bounded in size, and anything that is not a posttroll message is dropped with a log line.
The set belongs to the thread that polls it (ZeroMQ sockets are not thread safe); a
:class:`Waker` lets other threads interrupt that poll.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import zmq
from posttroll.backends.zmq.socket import set_up_client_socket
from posttroll.message import _MAGICK, Message

from trollmoves import wire

LOG = logging.getLogger(__name__)

#: Largest message accepted from a publisher (a bigger one drops that connection).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: Heartbeat interval assumed until a provider's ``beat`` says otherwise.
DEFAULT_BEAT_INTERVAL = 30.0
#: Prefix of the heartbeat subjects of servers, mirrors and clients.
HEARTBEAT_TOPIC = "/heartbeat/move_it"
#: Messages queued per provider on this side: a burst of announcements waits here instead of
#: being dropped by the publisher (whose own queue holds only 1000 by default).
RECEIVE_QUEUE = 100_000
#: Messages read from one socket before the others get their turn.
BATCH = 256
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


@dataclass(frozen=True)
class Provider:
    """One publisher to subscribe to."""

    address: str  #: ``tcp://host:port``
    topics: tuple[str, ...]  #: subject prefixes


def posttroll_topic(topic: str) -> str:
    """The wire prefix of a posttroll subject (``/a/b`` -> ``pytroll://a/b``)."""
    if topic.startswith(_MAGICK):
        return topic
    return _MAGICK + (topic if topic.startswith("/") else "/" + topic)


def parse_providers(providers: Iterable[str], topics: Sequence[str]) -> list[Provider]:
    """Providers from ``host:port`` or ``host:port/topic`` items; a provider's own topic is
    subscribed in addition to ``topics``."""
    parsed: dict[str, list[str]] = {}
    for item in providers:
        item = item.strip()
        if not item:
            continue
        if "://" in item:
            item = item.split("://", 1)[1]
        hostport, sep, own_topic = item.partition("/")
        wanted = parsed.setdefault(f"tcp://{hostport}", list(topics))
        if sep and own_topic and "/" + own_topic not in wanted:
            wanted.append("/" + own_topic)
    return [Provider(address, tuple(dict.fromkeys(t))) for address, t in parsed.items()]


class _Feed:
    """The socket and liveness of one provider."""

    def __init__(self, provider: Provider, now: float) -> None:
        self.provider = provider
        self.sock: zmq.Socket | None = None
        self.last_seen = now
        self.interval = DEFAULT_BEAT_INTERVAL
        self.heard = False

    def connect(self) -> zmq.Socket:
        sock = set_up_client_socket(zmq.SUB, self.provider.address,
                                    {zmq.MAXMSGSIZE: MAX_MESSAGE_BYTES, zmq.LINGER: 0,
                                     zmq.RCVHWM: RECEIVE_QUEUE})
        for topic in self.provider.topics:
            sock.setsockopt_string(zmq.SUBSCRIBE, posttroll_topic(topic))
        self.sock = sock
        return sock


class SubscriptionSet:
    """SUB sockets over ``providers`` in the caller's poller; resubscribes a silent provider.

    ``alarm_scale`` (``heartbeat_alarm_scale``) times the provider's heartbeat interval is
    how long it may stay silent; None or 0 disables the check. The thread owning ``poller``
    passes what its poll returned to :meth:`read`.
    """

    def __init__(self, providers: Sequence[Provider], poller: zmq.Poller,
                 alarm_scale: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.alarm_scale = alarm_scale or 0.0
        self._poller = poller
        self._feeds: dict[zmq.Socket, _Feed] = {}
        now = clock()
        for provider in providers:
            self._attach(_Feed(provider, now))
            LOG.info("Subscribing to %s for %s", provider.address, ", ".join(provider.topics))

    def _attach(self, feed: _Feed) -> None:
        sock = feed.connect()
        self._feeds[sock] = feed
        self._poller.register(sock, zmq.POLLIN)

    def _detach(self, sock: zmq.Socket) -> None:
        self._poller.unregister(sock)
        del self._feeds[sock]
        sock.close(linger=0)

    @property
    def providers(self) -> list[Provider]:
        """The providers subscribed to."""
        return [feed.provider for feed in self._feeds.values()]

    def read(self, ready: Mapping[Any, int]) -> list[tuple[Provider, Message]]:
        """The messages waiting on the sockets that ``ready`` (the poll result) names."""
        received: list[tuple[Provider, Message]] = []
        now = self._clock()
        for sock, feed in list(self._feeds.items()):
            if sock not in ready:
                continue
            for _ in range(BATCH):
                try:
                    raw = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                message = self._decode(raw, feed)
                if message is not None:
                    self._seen(feed, message, now)
                    received.append((feed.provider, message))
                if not sock.getsockopt(_EVENTS) & _POLLIN:  # cheaper than a failing read
                    break
        return received

    def _decode(self, raw: bytes, feed: _Feed) -> Message | None:
        try:
            return wire.decode(raw)
        except Exception as err:  # noqa: BLE001 - garbage raises many kinds (RecursionError...)
            LOG.warning("Dropped a message from %s that is not a posttroll message (%s: %.200s)"
                        ": %r", feed.provider.address, type(err).__name__, err, raw[:80])
            return None

    def _seen(self, feed: _Feed, message: Message, now: float) -> None:
        feed.last_seen = now
        if not feed.heard:
            feed.heard = True
            LOG.info("Receiving from %s", feed.provider.address)
        if message.type == "beat" and isinstance(message.data, dict):
            try:
                interval = float(message.data.get("min_interval") or DEFAULT_BEAT_INTERVAL)
            except (TypeError, ValueError):
                return
            if interval > 0:
                feed.interval = interval

    def next_check(self) -> float | None:
        """Clock time at which the next provider counts as silent, or None."""
        if not self.alarm_scale or not self._feeds:
            return None
        return min(f.last_seen + f.interval * self.alarm_scale for f in self._feeds.values())

    def resubscribe_silent(self) -> list[Provider]:
        """Resubscribe every provider silent for longer than allowed; return them."""
        if not self.alarm_scale:
            return []
        now = self._clock()
        silent = [(sock, feed) for sock, feed in self._feeds.items()
                  if now - feed.last_seen > feed.interval * self.alarm_scale]
        for sock, feed in silent:
            LOG.warning("No message or heartbeat from %s for %.1f s; resubscribing",
                        feed.provider.address, now - feed.last_seen)
            self._detach(sock)
            feed.last_seen = now
            feed.heard = False
            self._attach(feed)
        return [feed.provider for _, feed in silent]

    def close(self) -> None:
        """Close every socket."""
        for sock in list(self._feeds):
            self._detach(sock)


class Waker:
    """Makes a poll in another thread return at once: a socket pair in that thread's poller."""

    def __init__(self, poller: zmq.Poller) -> None:
        self._poller = poller
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        poller.register(self._read, zmq.POLLIN)

    def wake(self) -> None:
        """Wake the poll (any thread)."""
        with contextlib.suppress(BlockingIOError, OSError):  # already woken, or closed
            self._write.send(b"\0")

    def clear(self, ready: Mapping[Any, int]) -> None:
        """Consume the wake-ups, if ``ready`` (the poll result) says there are some."""
        if self._read in ready:
            with contextlib.suppress(BlockingIOError, OSError):
                while self._read.recv(4096):
                    pass

    def close(self) -> None:
        """Close the socket pair."""
        self._poller.unregister(self._read)
        self._read.close()
        self._write.close()
