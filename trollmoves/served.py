"""Which local files a section serves, checked before any push or ack is acted upon.

A section serves the files it announced (the last :data:`SERVED_CAPACITY` of them) and any file
its full ``origin`` pattern matches once ``..`` and symbolic links are resolved; a request for
anything else is refused::

    served = ServedFiles("hrit", OriginPattern("/data/in/{name}.h5"))
    served.add("/work/unpacked.h5", created=True)      # an unpacked copy, announced
    path = served.check("file:///data/in/x.h5")        # the real path, or RequestRefused
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

from trollmoves.urls import LOCAL_SCHEMES
from trollmoves.watch import OriginPattern

#: Announced files remembered per section to serve pushes for them.
SERVED_CAPACITY = 100_000


_DELETED = " (deleted)"


def real_path(path: str) -> str:
    """``os.path.realpath(path)``, asked of the kernel for an existing file (one open and
    one readlink of ``/proc/self/fd``, instead of a look at every component of the path)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (OSError, ValueError):
        return os.path.realpath(path)
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc
        real = ""
    finally:
        os.close(fd)
    if not real.startswith("/") or real.endswith(_DELETED):  # gone meanwhile, or no path
        return os.path.realpath(path)
    return real


class RequestRefused(Exception):
    """A request the section does not serve; the text goes back to the requester."""


class ServedFiles:
    """The files one section serves; thread-safe."""

    def __init__(self, name: str, pattern: OriginPattern | None = None,
                 capacity: int = SERVED_CAPACITY) -> None:
        self.name = name
        self.capacity = capacity
        self.patterns = [pattern] if pattern is not None else []
        if pattern is not None:  # paths are checked once links are resolved: so is the base
            real_base = os.path.realpath(pattern.base)
            if real_base != pattern.base:
                self.patterns.append(OriginPattern(real_base + pattern.origin[len(pattern.base):]))
        self._announced: OrderedDict[str, bool] = OrderedDict()  # real path: created here
        self._lock = threading.Lock()

    def add(self, path: str, created: bool = False) -> None:
        """Serve ``path`` from now on; ``created``: this server made it (an unpacked copy)."""
        real = real_path(path)
        with self._lock:
            self._announced[real] = created
            self._announced.move_to_end(real)
            if len(self._announced) > self.capacity:
                self._announced.popitem(last=False)

    def created(self, real: str) -> bool:
        """True when the served file ``real`` (a real path) was made by this server."""
        with self._lock:
            return self._announced.get(real, False)

    def check(self, uri: Any) -> str:
        """The real local path of a requested file; :class:`RequestRefused` unless served."""
        if not isinstance(uri, str):
            raise RequestRefused("invalid uri")
        parts = urlsplit(uri)
        if parts.scheme.lower() not in LOCAL_SCHEMES or not parts.path:
            raise RequestRefused(f"{uri} is not a local file of this server")
        real = real_path(parts.path)
        with self._lock:
            announced = real in self._announced
        if not (announced or any(p.match(real) is not None for p in self.patterns)):
            raise RequestRefused(f"{parts.path} is not served by section {self.name}")
        return real
