"""Bounded work queues of the message-driven front ends: in order per key, drained at a stop.

The receive loop of the dispatcher or the s3downloader turns each message into jobs and
submits them; jobs of one key (a dispatch target, a download's local file) run one at a time and
in order, different keys side by side on a small thread pool, keys taking turns::

    queues = JobQueues(workers=4, max_queued=10_000)
    queues.submit("target-a", "H-000-MSG4-...", deliver_it)   # blocks while the queues are full
    ...
    queues.close()                       # refuse new jobs, release blocked submitters
    dropped = queues.drain(timeout=30)   # let the queued jobs run, at most that long
    queues.join()                        # wait for the jobs that are running

The queues hold at most ``max_queued`` jobs that have not started: a full queue blocks
``submit`` (backpressure: the receive loop stops reading and messages wait in the socket
buffers), so memory stays bounded. ``drain`` returns the jobs that did not start in time,
for the caller to log one by one: a delivery whose message was consumed is never dropped
silently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One unit of work: ``run`` it; ``key`` orders it, ``label`` names it in log lines."""

    key: str
    label: str
    run: Callable[[], None]


class JobQueues:
    """Jobs run one at a time and in order per key, keys side by side on ``workers`` threads."""

    def __init__(self, workers: int, max_queued: int, name: str = "jobs") -> None:
        self.max_queued = max_queued
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._changed = threading.Condition()
        self._queues: dict[str, deque[Job]] = {}  #: a key is here while a runner is scheduled
        self._queued = 0  #: jobs not started
        self._running = 0
        self._closed = False

    def __len__(self) -> int:
        """The number of jobs that have not started."""
        with self._changed:
            return self._queued

    def submit(self, key: str, label: str, run: Callable[[], None]) -> bool:
        """Queue ``run`` behind the other jobs of ``key``; wait while the queues are full.

        Returns False, without queueing, once :meth:`close` was called.
        """
        job = Job(key, label, run)
        with self._changed:
            if self._queued >= self.max_queued and not self._closed:
                LOG.warning("%d jobs are waiting; not accepting more until one starts",
                            self._queued)
                self._changed.wait_for(lambda: self._closed or self._queued < self.max_queued)
            if self._closed:
                return False
            self._queued += 1
            queue = self._queues.get(key)
            if queue is not None:
                queue.append(job)
                return True
            self._queues[key] = deque([job])
            self._executor.submit(self._run_next, key)
        return True

    def _run_next(self, key: str) -> None:
        with self._changed:
            queue = self._queues.get(key)
            if not queue:  # emptied by drain()
                self._queues.pop(key, None)
                return
            job = queue.popleft()
            self._queued -= 1
            self._running += 1
            self._changed.notify_all()
        try:
            job.run()
        except Exception:
            LOG.exception("Unexpected error in job %s of %s", job.label, job.key)
        with self._changed:
            self._running -= 1
            if queue:  # to the back of the pool's queue: other keys get their turn
                self._executor.submit(self._run_next, key)
            else:
                del self._queues[key]
            self._changed.notify_all()

    def close(self) -> None:
        """Accept no more jobs; submitters waiting for room return False."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def drain(self, timeout: float | None) -> list[Job]:
        """Close, let the queued jobs run for up to ``timeout`` seconds (None: no limit), then
        drop those that did not start and return them. Jobs still running go on; see
        :meth:`join`."""
        self.close()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self._queued or self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._changed.wait(left)
            dropped = [job for queue in self._queues.values() for job in queue]
            for queue in self._queues.values():
                queue.clear()
            self._queued = 0
        return dropped

    def join(self) -> None:
        """Wait until the running jobs are finished and the threads are gone."""
        self._executor.shutdown(wait=True)
