"""A self-pipe: signal handlers and other threads poke it, the main thread blocks on it."""

from __future__ import annotations

import contextlib
import os
import select


class WakePipe:
    """Wake a thread blocked in :meth:`wait` from any thread or signal handler."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.set_blocking(self._read_fd, True)
        self._closed = False

    def poke(self) -> None:
        """Make the current or next :meth:`wait` return (safe anywhere, also once closed)."""
        if self._closed:  # the descriptor number may already belong to another file
            return
        with contextlib.suppress(BlockingIOError, OSError):  # already poked, or closing
            os.write(self._write_fd, b"!")

    def wait(self, timeout: float | None = None) -> None:
        """Block until poked, or for ``timeout`` seconds; consume the pokes."""
        readable, _, _ = select.select([self._read_fd], [], [], timeout)
        if readable:
            os.read(self._read_fd, 4096)

    def close(self) -> None:
        """Close both ends; later pokes do nothing."""
        self._closed = True
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
