"""What every long-running front end does in its main thread: watch its config file, take signals.

Both only post a request (a callback that pokes a :class:`~trollmoves.wakeup.WakePipe`); the
work is done where the request is read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from watchdog.events import (
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from trollmoves.config import file_signature

LOG = logging.getLogger(__name__)

Signature = tuple[int, int, int] | None
#: Events that may change a file: written, replaced by a rename, (re)linked, removed. Not
#: modifications: a log file in the same directory would wake the watcher all the time.
_FILE_EVENTS = [FileClosedEvent, FileMovedEvent, FileCreatedEvent, FileDeletedEvent,
                DirMovedEvent]


class _Changed(FileSystemEventHandler):
    def __init__(self, path: str, loaded: Callable[[], Signature],
                 on_change: Callable[[], None]) -> None:
        super().__init__()
        self.path, self.loaded, self.on_change = path, loaded, on_change

    def on_any_event(self, event: FileSystemEvent | None) -> None:
        """Any event in the directory may be the file: compare its signature."""
        if file_signature(self.path) != self.loaded():
            self.on_change()


class FileWatch:
    """Call ``on_change`` whenever the file at ``path`` differs from the version in use.

    ``loaded()`` gives the :func:`~trollmoves.config.file_signature` (inode, size, mtime) of
    the version in use; a change made before the watch began is reported at once. Watchdog
    events, no polling; where the directory cannot be watched, a warning says to use SIGHUP.
    """

    def __init__(self, path: str, loaded: Callable[[], Signature],
                 on_change: Callable[[], None]) -> None:
        self._observer: Any = None
        directory = os.path.dirname(os.path.abspath(path))
        handler = _Changed(path, loaded, on_change)
        observer = Observer()
        observer.schedule(handler, directory, recursive=False, event_filter=_FILE_EVENTS)
        observer.daemon = True
        try:
            observer.start()
        except OSError as err:
            LOG.warning("Cannot watch %s for changes (%s); reload with SIGHUP", directory, err)
            return
        self._observer = observer
        handler.on_any_event(None)

    def stop(self) -> None:
        """Stop watching (idempotent)."""
        if self._observer is not None:
            self._observer.stop()
            with contextlib.suppress(RuntimeError):
                self._observer.join()
            self._observer = None


def install_signals(on_stop: Callable[[], None], on_reload: Callable[[], None] | None = None
                    ) -> Callable[[], None]:
    """SIGTERM and SIGINT call ``on_stop`` (a second one ends the process at once); SIGHUP
    calls ``on_reload`` when given. Call from the main thread; returns the undo function."""
    def stopping(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        on_stop()

    handlers: dict[int, Callable[[int, Any], None]] = {signal.SIGTERM: stopping,
                                                       signal.SIGINT: stopping}
    if on_reload is not None:
        handlers[signal.SIGHUP] = lambda signum, frame: on_reload()
    saved = {signum: signal.getsignal(signum) for signum in handlers}
    for signum, handler in handlers.items():
        signal.signal(signum, handler)

    def restore() -> None:
        for signum, handler in saved.items():
            signal.signal(signum, handler)

    return restore
