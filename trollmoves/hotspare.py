"""Which announced file to request, when, and from whom: duplicate suppression and hot spare.

A file is identified by its key, the sorted ``uid`` values of an announcement (one for a
``file`` message, several for a ``dataset``). For every key the :class:`Tracker` keeps the
announcements in the order they came (the first announcer is asked first, the others get an
``ack`` once the file is here) and one state:

``WAITING``
    a hot spare (``processing_delay`` > 0) gives the primary client time to claim the file;
``PEER``
    another client published a ``push``: wait for its ``ack`` (or client ``file``) until the
    takeover deadline, then take over;
``QUEUED``
    to be requested as soon as a transfer slot is free (:meth:`Tracker.start_next`, in the
    order the files were queued); a ``push`` of another client meanwhile moves the file to
    ``PEER``, its ``ack`` or ``file`` message ends it, so a backlog is never pushed by both;
``ACTIVE``
    this client has sent the push request; the file is never started twice.

At most ``max_queued`` files are queued: a file that would be one more is dropped with a
warning naming it and forgotten (not acknowledged, so the server keeps it; a hot spare or a later
announcement requests it). Finished keys go to a bounded :class:`DoneCache`, so memory stays
flat however many files pass. The tracker holds no sockets and no threads: the caller feeds it
events and a clock.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

LOG = logging.getLogger(__name__)

FileKey = tuple[str, ...]
A = TypeVar("A")

#: Finished files remembered by default.
DEFAULT_CACHE_SIZE = 10_000
#: Seconds a finished file is remembered by default.
DEFAULT_CACHE_AGE = 24 * 3600.0
#: Files queued for a free transfer slot at most, by default.
DEFAULT_MAX_QUEUED = 100_000


def _uids(data: Any) -> Iterator[str]:
    """Every string ``uid`` anywhere in ``data`` (without recursion: data may nest deep)."""
    pending = [data]
    while pending:
        item = pending.pop()
        if isinstance(item, Mapping):
            for key, value in item.items():
                if key == "uid" and isinstance(value, str):
                    yield value
                elif isinstance(value, Mapping | list):
                    pending.append(value)
        elif isinstance(item, list):
            pending.extend(item)


def file_key(data: Any) -> FileKey | None:
    """The key of the file(s) a message's data announces, or None when it names no ``uid``."""
    uids = tuple(sorted(set(_uids(data))))
    return uids or None


class DoneCache:
    """Keys of finished files: at most ``size`` of them, none older than ``max_age`` seconds."""

    def __init__(self, size: int = DEFAULT_CACHE_SIZE, max_age: float = DEFAULT_CACHE_AGE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._items: OrderedDict[FileKey, float] = OrderedDict()
        self._size = max(1, size)
        self._max_age = max_age
        self._clock = clock

    def add(self, key: FileKey) -> None:
        """Remember ``key`` as finished now."""
        self._items[key] = self._clock()
        self._items.move_to_end(key)
        self._expire()

    def __contains__(self, key: object) -> bool:
        self._expire()
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def _expire(self) -> None:
        limit = self._clock() - self._max_age
        while self._items:
            oldest, stamp = next(iter(self._items.items()))
            if len(self._items) <= self._size and stamp >= limit:
                break
            del self._items[oldest]


class Action(enum.Enum):
    """What the caller must do after an announcement."""

    REQUEST = "request"  #: queued: request it when a slot is free (:meth:`Tracker.start_next`)
    WAIT = "wait"  #: hot spare: nothing yet, :meth:`Tracker.due` will queue the key later
    DROPPED = "dropped"  #: the queue is full: not requested (logged)
    ACK = "ack"  #: the file is already here: send ``ack`` to this announcer
    JOINED = "joined"  #: the file is in progress; this announcer gets an ``ack`` at the end


class State(enum.Enum):
    """State of a file in progress."""

    WAITING = "waiting"
    PEER = "peer"
    QUEUED = "queued"
    ACTIVE = "active"


@dataclass
class _Entry(Generic[A]):
    state: State
    announcements: list[A] = field(default_factory=list)
    deadline: float | None = None
    peer_done: bool = False


class Tracker(Generic[A]):
    """Duplicate suppression and the hot-spare state machine of one client section.

    ``processing_delay`` is how long a hot spare waits before requesting; ``takeover_timeout``
    how long it waits for the ``ack`` of a client that published a ``push``; ``max_queued`` how
    many files may wait for a free transfer slot. Thread safe.
    """

    def __init__(self, processing_delay: float = 0.0, takeover_timeout: float = 10.0,
                 cache_size: int = DEFAULT_CACHE_SIZE, cache_age: float = DEFAULT_CACHE_AGE,
                 clock: Callable[[], float] = time.monotonic,
                 max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        self.processing_delay = max(0.0, processing_delay)
        self.takeover_timeout = takeover_timeout
        self.max_queued = max(1, max_queued)
        self._clock = clock
        self._entries: dict[FileKey, _Entry[A]] = {}
        self._queue: OrderedDict[FileKey, None] = OrderedDict()  # the QUEUED keys, in order
        self._done = DoneCache(cache_size, cache_age, clock)
        self._timers: list[tuple[float, int, FileKey]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()

    # -- events -----------------------------------------------------------------------------
    def announce(self, key: FileKey, announcement: A) -> Action:
        """A server announced ``key``; say what to do about it."""
        with self._lock:
            if key in self._done:
                return Action.ACK
            entry = self._entries.get(key)
            if entry is not None:
                entry.announcements.append(announcement)
                if entry.state is State.PEER and len(entry.announcements) == 1:
                    return Action.WAIT
                return Action.JOINED
            entry = self._entries[key] = _Entry(State.WAITING, [announcement])
            if self.processing_delay > 0:
                self._schedule(key, entry, self._clock() + self.processing_delay)
                return Action.WAIT
            return Action.REQUEST if self._enqueue(key, entry) else Action.DROPPED

    def peer_push(self, key: FileKey) -> None:
        """Another client published a ``push`` for ``key``: it is transferring that file.

        Unless this client has sent its own push already, it leaves the file to the other one
        until ``takeover_timeout`` after that client's last push.
        """
        with self._lock:
            if key in self._done:
                return
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry(State.PEER)
            elif entry.state is State.ACTIVE:
                return
            self._queue.pop(key, None)
            entry.state = State.PEER
            self._schedule(key, entry, self._clock() + self.takeover_timeout)

    def peer_done(self, key: FileKey) -> None:
        """Another client published ``ack`` or its ``file`` message: ``key`` is delivered."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.state is State.ACTIVE:
                entry.peer_done = True
                return
            self._entries.pop(key, None)
            self._queue.pop(key, None)
            self._done.add(key)

    def due(self) -> list[FileKey]:
        """Queue the keys whose wait is over (hot-spare delay, takeover); return them."""
        now = self._clock()
        queued = []
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                deadline, _, key = heapq.heappop(self._timers)
                entry = self._entries.get(key)
                if entry is None or entry.deadline != deadline or entry.state not in {
                        State.WAITING, State.PEER}:
                    continue
                entry.deadline = None
                if not entry.announcements:
                    del self._entries[key]  # a peer's push for a file never announced to us
                    continue
                if entry.state is State.PEER:
                    LOG.warning("%s: another client pushed it but did not ack it within %g s; "
                                "taking over", key[0], self.takeover_timeout)
                if self._enqueue(key, entry):
                    queued.append(key)
        return queued

    def next_deadline(self) -> float | None:
        """Clock time of the next wait that ends, or None."""
        with self._lock:
            while self._timers:
                deadline, _, key = self._timers[0]
                entry = self._entries.get(key)
                if entry is not None and entry.deadline == deadline:
                    return deadline
                heapq.heappop(self._timers)
            return None

    # -- transfers ----------------------------------------------------------------------------
    def start_next(self) -> FileKey | None:
        """The first queued key, now active (the caller sends its push), or None."""
        with self._lock:
            if not self._queue:
                return None
            key, _ = self._queue.popitem(last=False)
            self._entries[key].state = State.ACTIVE
            return key

    def next_source(self, key: FileKey) -> A | None:
        """Take the next announcement to request active ``key`` from (None: no announcer left)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.state is not State.ACTIVE or not entry.announcements:
                return None
            return entry.announcements.pop(0)

    def finish(self, key: FileKey, delivered: bool) -> list[A]:
        """End the transfer of ``key``; return the announcers that must still get an ``ack``.

        An undelivered file is forgotten, so that a later announcement requests it again.
        """
        with self._lock:
            entry = self._entries.pop(key, None)
            self._queue.pop(key, None)
            if delivered or (entry is not None and entry.peer_done):
                self._done.add(key)
                return list(entry.announcements) if entry is not None else []
            return []

    # -- inspection ---------------------------------------------------------------------------
    def state(self, key: FileKey) -> State | None:
        """The state of ``key``, or None when it is not in progress."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.state

    def peer_delivered(self, key: FileKey) -> bool:
        """True when another client announced ``key`` delivered while this one transferred it."""
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and entry.peer_done

    def is_done(self, key: FileKey) -> bool:
        """True when ``key`` is known to be delivered."""
        with self._lock:
            return key in self._done

    @property
    def queued(self) -> int:
        """Number of files waiting for a free transfer slot."""
        with self._lock:
            return len(self._queue)

    def __len__(self) -> int:
        """Number of files in progress (waiting, watched, queued or transferring)."""
        with self._lock:
            return len(self._entries)

    def _enqueue(self, key: FileKey, entry: _Entry[A]) -> bool:
        """Queue ``key`` for a free slot; drop it (logged, forgotten) when the queue is full."""
        if len(self._queue) >= self.max_queued:
            del self._entries[key]
            LOG.warning("Not requesting %s: %d files wait for a free transfer slot already; "
                        "dropped (the server keeps it, a later announcement requests it)",
                        key[0], len(self._queue))
            return False
        entry.state = State.QUEUED
        self._queue[key] = None
        return True

    def _schedule(self, key: FileKey, entry: _Entry[A], deadline: float) -> None:
        entry.deadline = deadline
        heapq.heappush(self._timers, (deadline, next(self._seq), key))
