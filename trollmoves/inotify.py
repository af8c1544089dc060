"""A thin Linux inotify binding (libc through ctypes): watches and raw events, no threads.

::

    with Inotify() as ino:
        wd = ino.add_watch("/data/in", IN_CLOSE_WRITE | IN_MOVED_TO)
        for event in ino.read():          # [] when nothing is waiting (non-blocking)
            print(event.wd == wd, event.name, event.mask & IN_ISDIR)

The descriptor (:attr:`Inotify.fd`) is non-blocking and close-on-exec; wait for it with
``select``/``poll``. Errors are ``OSError`` with the errno inotify gave (``ENOSPC``: the watch
limit is reached, ``EMFILE``: no instance or descriptor left, ``EACCES``, ``ENOENT``...).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from typing import NamedTuple, Self

IN_ACCESS = 0x00000001
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_CLOSE_NOWRITE = 0x00000010
IN_OPEN = 0x00000020
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000

#: Bytes read at once: room for hundreds of events.
READ_SIZE = 64 * 1024
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)


class Event(NamedTuple):
    """One inotify event: ``name`` is empty for events about the watched directory itself,
    ``wd`` is -1 for ``IN_Q_OVERFLOW``."""

    wd: int
    mask: int
    cookie: int
    name: str


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


_LIBC: ctypes.CDLL | None = None


def _call(result: int, what: str = "") -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), *([what] if what else []))
    return result


def parse_events(buffer: bytes) -> list[Event]:
    """The events in what a read of an inotify descriptor returned."""
    events = []
    offset, end = 0, len(buffer)
    size = _HEADER.size
    while offset + size <= end:
        wd, mask, cookie, length = _HEADER.unpack_from(buffer, offset)
        offset += size
        name = buffer[offset:offset + length].rstrip(b"\0") if length else b""
        offset += length
        events.append(Event(wd, mask, cookie, os.fsdecode(name)))
    return events


class Inotify:
    """One inotify instance (a non-blocking descriptor); close it with :meth:`close`."""

    def __init__(self) -> None:
        global _LIBC
        if _LIBC is None:
            _LIBC = _libc()
        self._libc = _LIBC
        self.fd: int = _call(self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))

    def add_watch(self, path: str, mask: int) -> int:
        """Watch ``path`` for the events in ``mask``; return the watch descriptor (the same
        one again for a path already watched, whose mask is then replaced)."""
        return _call(self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask), path)

    def rm_watch(self, wd: int) -> bool:
        """Stop a watch (an ``IN_IGNORED`` event follows); False when it was gone already."""
        try:
            _call(self._libc.inotify_rm_watch(self.fd, wd))
        except OSError as err:
            if err.errno == errno.EINVAL:
                return False
            raise
        return True

    def read(self) -> list[Event]:
        """The events waiting now; [] when there are none."""
        try:
            buffer = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return []
        return parse_events(buffer)

    def close(self) -> None:
        """Close the descriptor (every watch ends with it)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
