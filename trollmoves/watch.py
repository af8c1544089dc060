"""Watch the directories of a trollsift ``origin`` pattern and report the files that arrive.

A file counts when it is closed after writing or moved in (inotify, through watchdog's
inotify observer), or, with polling, once its size and time stamp held still between two scans.
Empty files, hidden files (``.name``, unless the pattern's name starts with a dot) and files the
pattern does not fully match are skipped; the same file (path, inode, size, time stamp) is never
reported twice.

Directory levels of the pattern may hold fields (``/data/{platform}/{time:%Y%m%d}/{name}.h5``):
the fixed base directory (``/data``) is then watched recursively. ``skip_levels``
(``origin_inotify_base_dir_skip_levels``, e.g. -2) picks the watched directory by cutting that
many components from the end of the pattern, as trollmoves always did. A base directory that
does not exist yet is waited for: its nearest existing parent is watched until it appears,
and the files already in it are then reported.

A directory inotify cannot watch (unreadable, or the inotify watch or instance limit reached)
is polled instead, with an ERROR in the log naming it.

Each matching file goes to ``sink(path, fields)``, where ``fields`` are the values parsed from
the path; the sink should only queue it (it runs on the watcher's thread)::

    files = queue.SimpleQueue()
    watcher = OriginWatcher("/data/{platform}/{name}.h5", lambda p, f: files.put((p, f)))
    watcher.start()     # files already there are reported first (unless backlog=False)
    ...
    watcher.stop(); watcher.join()
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import stat
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import trollsift
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileSystemEvent,
)
from watchdog.observers.inotify import InotifyObserver

LOG = logging.getLogger(__name__)
# watchdog warns when a directory created with sub-directories gets its watches twice; harmless
warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning,
                        module="watchdog")

FileSink = Callable[[str, dict[str, Any]], None]

#: Files remembered to suppress duplicate reports.
SEEN_CAPACITY = 100_000
DEFAULT_POLL_INTERVAL = 1.0

_FILE_EVENTS = [FileClosedEvent, FileMovedEvent, DirCreatedEvent, DirMovedEvent, DirDeletedEvent]
_DIR_EVENTS = [DirCreatedEvent, DirMovedEvent, DirDeletedEvent]


class OriginPattern:
    """A trollsift ``origin``: the directory to watch and the full-path matching."""

    def __init__(self, origin: str, skip_levels: int | None = None) -> None:
        origin = os.path.expanduser(origin)
        if not os.path.isabs(origin):
            origin = os.path.join(os.getcwd(), origin)
        self.origin = origin
        self.parser = trollsift.Parser(origin)
        self.glob = trollsift.globify(origin)
        self.depth = origin.count("/")
        self.hidden_ok = os.path.basename(origin).startswith(".")
        directory = os.path.dirname(origin)
        parts = directory.split("/")
        fixed: list[str] = []
        for part in parts:
            if "{" in part:
                break
            fixed.append(part)
        base = "/".join(fixed) or "/"
        if skip_levels is not None:
            chosen = "/".join(origin.split("/")[:skip_levels]) or "/"
            if "{" in chosen or not (base + "/").startswith(chosen.rstrip("/") + "/"):
                LOG.warning("origin_inotify_base_dir_skip_levels=%s gives %s, which is not a "
                            "fixed directory of %s; watching %s", skip_levels, chosen, origin,
                            base)
            else:
                base = chosen
        self.base = os.path.normpath(base)
        self.recursive = self.base != os.path.normpath(directory)

    def match(self, path: str) -> dict[str, Any] | None:
        """The fields parsed from ``path``, or None when the pattern does not fully match."""
        if path.count("/") != self.depth:
            return None
        if not self.hidden_ok and os.path.basename(path).startswith("."):
            return None
        try:
            return self.parser.parse(path)
        except ValueError:
            return None

    def existing(self) -> list[str]:
        """Paths of the files already present that the pattern may match, sorted."""
        return sorted(glob.iglob(self.glob))


def nearest_existing_parent(path: str) -> str:
    """The deepest existing directory on the way to ``path``."""
    current = os.path.abspath(path)
    while not os.path.isdir(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


class _SeenFiles:
    """A bounded memory of reported files, so one file is never reported twice."""

    def __init__(self, capacity: int = SEEN_CAPACITY) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[str, tuple[int, int, int]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, path: str, key: tuple[int, int, int]) -> bool:
        """Remember ``path`` with ``key``; False when it was already there with that key."""
        with self._lock:
            if self._seen.get(path) == key:
                return False
            self._seen[path] = key
            self._seen.move_to_end(path)
            if len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
            return True


def _file_key(info: os.stat_result) -> tuple[int, int, int]:
    return info.st_ino, info.st_size, info.st_mtime_ns


class OriginWatcher:
    """Report the files arriving under ``origin`` to ``sink(path, fields)``.

    ``polling`` scans every ``poll_interval`` seconds instead of using inotify (for file
    systems without it: NFS, some container mounts). ``backlog`` reports the files already
    present at start.
    """

    def __init__(self, origin: str, sink: FileSink, *, polling: bool = False,
                 backlog: bool = True, poll_interval: float = DEFAULT_POLL_INTERVAL,
                 skip_levels: int | None = None, name: str = "") -> None:
        self.pattern = OriginPattern(origin, skip_levels)
        self.sink = sink
        self.polling = polling
        self.backlog = backlog
        self.poll_interval = poll_interval
        self.name = name or origin
        self._seen = _SeenFiles()
        self._stopping = threading.Event()
        self._lock = threading.RLock()
        self._observer: Any = None
        self._watch: Any = None
        self._watched_root = ""  # the real path inotify watches, events come relative to it
        self._watched_dir = ""  # the same directory as configured
        self._waiting = False
        self._poller: threading.Thread | None = None
        #: set once the watch is in place and the files already there were handled
        self.ready = threading.Event()

    @property
    def base(self) -> str:
        """The directory watched (recursively when the pattern has directory fields)."""
        return self.pattern.base

    @property
    def waiting(self) -> bool:
        """True while the base directory does not exist."""
        return self._waiting

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start watching; with ``backlog``, the files already there are reported first."""
        LOG.info("%s: watching %s%s for %s (%s)", self.name, self.base,
                 " recursively" if self.pattern.recursive else "", self.pattern.origin,
                 "polling" if self.polling else "inotify")
        if self.polling:
            self._start_polling(report_existing=self.backlog)
            return
        try:
            self._observer = InotifyObserver(generate_full_events=True)
        except OSError as err:  # no inotify instance or file descriptor left
            self._poll_instead(self.base, err, report_existing=self.backlog)
            return
        self._observer.daemon = True
        self._observer.start()
        with self._lock:
            self._arm(initial=True)
            if self._poller is None:  # else the poller says when it is ready
                self.ready.set()

    def stop(self) -> None:
        """Stop reporting files."""
        self._stopping.set()
        if self._observer is not None:
            self._observer.stop()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the watching threads to end."""
        for thread in (self._observer, self._poller):
            if thread is not None:
                with contextlib.suppress(RuntimeError):
                    thread.join(timeout)

    # -- reporting --------------------------------------------------------------------------
    def offer(self, path: str) -> bool:
        """Report ``path`` if it matches, is a non-empty regular file and is new."""
        fields = self.pattern.match(path)
        if fields is None:
            return False
        try:
            info = os.stat(path)
        except OSError as err:
            LOG.debug("%s: %s vanished before it was reported: %s", self.name, path, err)
            return False
        if not stat.S_ISREG(info.st_mode):
            return False
        if info.st_size == 0:
            LOG.debug("%s: skipping empty file %s", self.name, path)
            return False
        if not self._seen.add(path, _file_key(info)):
            return False
        self.sink(path, fields)
        return True

    def _offer_all(self, paths: Iterable[str]) -> int:
        count = 0
        for path in paths:
            if self._stopping.is_set():
                break
            count += self.offer(path)
        return count

    def _walk(self, directory: str) -> Iterable[str]:
        for root, _dirs, files in os.walk(directory):
            for name in sorted(files):
                yield os.path.join(root, name)

    # -- inotify ----------------------------------------------------------------------------
    def _arm(self, initial: bool = False) -> None:
        """Watch the base directory, or its nearest parent until the base appears; poll
        instead when inotify cannot watch it."""
        while not self._stopping.is_set():
            if self._watch is not None:
                self._observer.unschedule(self._watch)
                self._watch = None
            # one look at the disk decides both: the base appearing between two looks left it
            # watched for directory events only, and the files arriving in it unreported
            parent = nearest_existing_parent(self.base)
            exists = parent == os.path.abspath(self.base)
            directory = self.base if exists else parent
            if not exists:
                if directory != self._watched_dir:
                    LOG.warning("%s: directory %s does not exist yet; waiting for it "
                                "(watching %s)", self.name, self.base, directory)
                self._waiting = True
            try:
                watched = self._schedule(directory, recursive=exists and self.pattern.recursive,
                                         events=_FILE_EVENTS if exists else _DIR_EVENTS)
            except OSError as err:
                self._poll_instead(directory, err, report_existing=self.backlog or not initial)
                return
            if not watched:
                continue  # it vanished meanwhile
            if exists:
                self._after_base_watched(initial)
                return
            if nearest_existing_parent(self.base) == directory:
                return  # nothing appeared between the check and the watch

    def _schedule(self, directory: str, recursive: bool, events: list[Any]) -> bool:
        """Watch ``directory``; False when it vanished, OSError when inotify cannot watch it."""
        root = os.path.realpath(directory)
        if not os.access(root, os.R_OK | os.X_OK):  # watchdog would watch it without a word
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), directory)
        try:
            self._watch = self._observer.schedule(_Handler(self), root, recursive=recursive,
                                                  event_filter=events)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                LOG.debug("%s: cannot watch %s: %s", self.name, directory, err)
                return False
            raise
        self._watched_root = root
        self._watched_dir = directory
        return True

    def _after_base_watched(self, initial: bool) -> None:
        if self._waiting:
            self._waiting = False
            LOG.info("%s: directory %s appeared, watching it", self.name, self.base)
            found = self._offer_all(self.pattern.existing())
        elif initial and self.backlog:
            found = self._offer_all(self.pattern.existing())
        else:
            return
        LOG.info("%s: %d file(s) already in %s", self.name, found, self.base)

    def _translate(self, path: str) -> str:
        """An event path under the watched real path, as a path under the configured one."""
        if self._watched_root == self._watched_dir or not path.startswith(self._watched_root):
            return path
        return self._watched_dir + path[len(self._watched_root):]

    def on_event(self, event: FileSystemEvent) -> None:
        """Handle one watchdog event (on the observer's thread)."""
        if self._stopping.is_set() or self._poller is not None:
            return
        src = self._translate(os.fsdecode(event.src_path)) if event.src_path else ""
        dest = self._translate(os.fsdecode(event.dest_path)) if event.dest_path else ""
        with self._lock:
            if self._waiting:
                if nearest_existing_parent(self.base) != self._watched_dir:
                    self._arm()
            elif isinstance(event, FileClosedEvent):
                self.offer(src)
            elif isinstance(event, FileMovedEvent):
                if dest:
                    self.offer(dest)
            elif src == self._watched_dir and isinstance(event, DirDeletedEvent | DirMovedEvent):
                LOG.warning("%s: directory %s disappeared", self.name, self.base)
                self._waiting = True  # what arrives until it is watched again is scanned for
                self._arm()
            elif isinstance(event, DirCreatedEvent | DirMovedEvent) and self.pattern.recursive:
                # files may have landed before the new directory was watched
                self._offer_all(self._walk(dest or src))

    # -- polling ----------------------------------------------------------------------------
    def _poll_instead(self, directory: str, err: OSError, report_existing: bool) -> None:
        LOG.error("%s: cannot watch %s with inotify (%s); polling it every %g s instead",
                  self.name, directory, err.strerror or err, self.poll_interval)
        self._start_polling(report_existing)

    def _start_polling(self, report_existing: bool) -> None:
        """Poll from now on; ``report_existing``: report the files already there at once."""
        self.polling = True
        self._poller = threading.Thread(target=self._poll, args=(report_existing,),
                                        name=f"poll-{self.name}", daemon=True)
        self._poller.start()

    def _scan(self) -> dict[str, tuple[int, int, int]]:
        found = {}
        for path in self.pattern.existing():
            if self.pattern.match(path) is None:
                continue
            try:
                info = os.stat(path)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode) and info.st_size > 0:
                found[path] = _file_key(info)
        return found

    def _poll(self, report_existing: bool) -> None:
        previous: dict[str, tuple[int, int, int]] | None = None
        while not self._stopping.is_set():
            exists = os.path.isdir(self.base)
            if exists and self._waiting:
                LOG.info("%s: directory %s appeared, watching it", self.name, self.base)
            elif not exists and not self._waiting:
                LOG.warning("%s: directory %s does not exist yet; waiting for it",
                            self.name, self.base)
            current = self._scan() if exists else {}
            if previous is None and exists:
                self._first_poll(current, report_existing)
            else:
                stable = [p for p, key in current.items() if (previous or {}).get(p) == key]
                self._offer_all(stable)
            self._waiting = not exists
            previous = current
            self.ready.set()
            self._stopping.wait(self.poll_interval)

    def _first_poll(self, current: dict[str, tuple[int, int, int]],
                    report_existing: bool) -> None:
        if report_existing:
            found = self._offer_all(current)
            LOG.info("%s: %d file(s) already in %s", self.name, found, self.base)
        else:
            for path, key in current.items():
                self._seen.add(path, key)


class _Handler:
    """Hands watchdog events to the watcher (the minimal interface watchdog calls)."""

    def __init__(self, watcher: OriginWatcher) -> None:
        self.watcher = watcher

    def dispatch(self, event: FileSystemEvent) -> None:
        """Called by watchdog for every event of the watch."""
        try:
            self.watcher.on_event(event)
        except Exception:  # the observer thread must survive whatever happens
            LOG.exception("%s: failed to handle %s", self.watcher.name, event)
