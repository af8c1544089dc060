"""Remove files at given times: :class:`DelayedRemover`, one thread blocking on a condition.

The server removes served files ``remove_delay`` seconds after a push or an ack, and unpacked
copies nobody asked for after ``unpacked_retention``::

    remover = DelayedRemover("hrit")
    remover.start()
    remover.schedule("/data/in/file", 30.0)
    ...
    remover.stop(); remover.join()     # files not yet due stay where they are
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time

LOG = logging.getLogger(__name__)


class DelayedRemover:
    """Remove files at given times, from one thread blocking on a condition (no polling).

    Scheduling a file that is already scheduled keeps the earlier of the two times.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"remove-{name}", daemon=True)

    def start(self) -> None:
        """Start the removal thread."""
        self._thread.start()

    def schedule(self, path: str, delay: float) -> None:
        """Remove ``path`` in ``delay`` seconds (or earlier, if already due earlier)."""
        when = time.monotonic() + delay
        with self._cond:
            if path in self._due and self._due[path] <= when:
                return
            self._due[path] = when
            heapq.heappush(self._heap, (when, path))
            self._cond.notify()
        LOG.debug("%s: removing %s in %.1f s", self.name, path, delay)

    def pending(self) -> int:
        """How many files wait for removal."""
        with self._cond:
            return len(self._due)

    def _run(self) -> None:
        with self._cond:
            while not self._stopping:
                if not self._heap:
                    self._cond.wait()
                    continue
                when, path = self._heap[0]
                wait = when - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                if self._due.get(path) != when:
                    continue  # rescheduled earlier: this entry is stale
                del self._due[path]
                self._cond.release()
                try:
                    remove_file(path, self.name)
                finally:
                    self._cond.acquire()

    def stop(self) -> None:
        """Stop; files not yet due stay where they are."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
            left = len(self._due)
        if left:
            LOG.info("%s: %d file(s) left that were due for removal later", self.name, left)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the removal thread to end."""
        if self._thread.is_alive():
            self._thread.join(timeout)


def remove_file(path: str, name: str) -> None:
    """Remove ``path`` now; a missing file is fine, other failures are logged (as ``name``)."""
    try:
        os.remove(path)
    except FileNotFoundError:
        LOG.debug("%s: %s was already removed", name, path)
    except OSError as err:
        LOG.warning("%s: cannot remove %s: %s", name, path, err)
    else:
        LOG.debug("%s: removed %s", name, path)
