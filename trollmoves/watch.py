"""Watch the directories of a trollsift ``origin`` pattern and report the files that arrive.

A file counts when it is closed after writing or moved in (inotify, read directly by one thread
per watcher: :mod:`trollmoves.inotify`), or, with polling, once its size and time stamp held
still between two scans. Empty files, hidden files (``.name``, unless the pattern's name starts
with a dot) and files the pattern does not fully match are skipped; the same file (path, inode,
size, time stamp) is never reported twice.

Directory levels of the pattern may hold fields (``/data/{platform}/{time:%Y%m%d}/{name}.h5``):
the fixed base directory (``/data``) is then watched with the sub-directories that can hold
matching files (down to the file level, each level matching its part of the pattern); a
directory created or moved in later is watched as it appears, and the files that landed in it
before its watch was in place are found by a scan. ``skip_levels``
(``origin_inotify_base_dir_skip_levels``, e.g. -2) picks the watched directory by cutting that
many components from the end of the pattern, as trollmoves always did. A base directory that
does not exist yet (or is removed or moved away later) is waited for: its nearest existing
parent is watched until it appears, and the files already in it are then reported. When the
kernel's event queue overflows, the directories are scanned again and the files not reported
yet are reported.

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
import fnmatch
import glob
import logging
import os
import select
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import trollsift

from trollmoves.inotify import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_ISDIR,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    IN_UNMOUNT,
    Inotify,
)

LOG = logging.getLogger(__name__)

FileSink = Callable[[str, dict[str, Any]], None]

#: Files remembered to suppress duplicate reports.
SEEN_CAPACITY = 100_000
DEFAULT_POLL_INTERVAL = 1.0

_SELF_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED
#: A directory holding files of the pattern: files closed after writing or moved in.
_FILE_LEVEL = IN_CLOSE_WRITE | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
#: A directory above the file level: its sub-directories coming and going.
_DIR_LEVEL = IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
#: The nearest existing parent of a missing base directory: whatever appears in it.
_PARENT = IN_CREATE | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR


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
        # the glob of each directory level below the base, down to the files' directory
        base_parts = [part for part in self.base.split("/") if part]
        self.levels: tuple[str, ...] = tuple(
            part for part in trollsift.globify(directory).split("/") if part)[len(base_parts):]

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

    def may_hold(self, name: str, level: int) -> bool:
        """Whether a directory ``name`` at ``level`` below the base (1: a child of the base)
        can hold matching files, itself or below."""
        return 0 < level <= len(self.levels) and fnmatch.fnmatchcase(name, self.levels[level - 1])

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
        self._inotify: Inotify | None = None
        self._dirs: dict[int, tuple[str, int]] = {}  # watch descriptor: directory, level
        self._base_wd: int | None = None
        self._parent_wd: int | None = None  # the nearest parent while the base is missing
        self._watched_dir = ""  # the directory watched last (the base or that parent)
        self._waiting = False
        self._reader: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None  # pipe that ends the reader's wait
        self._wake_lock = threading.Lock()
        self._poller: threading.Thread | None = None
        #: set once the watch is in place and the files already there were handled
        self.ready = threading.Event()

    @property
    def base(self) -> str:
        """The directory watched (with its sub-directories when the pattern has fields there)."""
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
            self._inotify = Inotify()
            self._wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as err:  # no inotify instance or file descriptor left
            self._close_inotify()
            self._poll_instead(self.base, err, report_existing=self.backlog)
            return
        # the events of the files arriving meanwhile wait in the kernel: they are read once
        # the files already there are reported
        self._arm(initial=True)
        if self._poller is not None:  # the poller says when it is ready
            self._close_inotify()
            return
        self._reader = threading.Thread(target=self._read_events, name=f"inotify-{self.name}",
                                        daemon=True)
        self._reader.start()
        self.ready.set()

    def stop(self) -> None:
        """Stop reporting files."""
        self._stopping.set()
        with self._wake_lock:
            if self._wake is not None:
                with contextlib.suppress(OSError):
                    os.write(self._wake[1], b"!")

    def join(self, timeout: float | None = None) -> None:
        """Wait for the watching threads to end."""
        for thread in (self._reader, self._poller):
            if thread is not None:
                with contextlib.suppress(RuntimeError):
                    thread.join(timeout)
        if self._reader is None or not self._reader.is_alive():
            self._close_inotify()

    def _close_inotify(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        with self._wake_lock:
            if self._wake is not None:
                for fd in self._wake:
                    os.close(fd)
                self._wake = None

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

    def _files_below(self, directory: str, level: int) -> Iterator[str]:
        """The files at the pattern's file level in ``directory`` (at ``level``) and below."""
        try:
            with os.scandir(directory) as entries:
                found = sorted(entries, key=lambda entry: entry.name)
        except OSError:
            return
        bottom = level >= len(self.pattern.levels)
        for entry in found:
            if bottom:
                yield entry.path
            elif self.pattern.may_hold(entry.name, level + 1) and _is_dir(entry):
                yield from self._files_below(entry.path, level + 1)

    # -- inotify: the watches ---------------------------------------------------------------
    def _arm(self, initial: bool = False, rescan: bool = False) -> None:
        """Watch the base directory and its sub-directories, or its nearest parent until the
        base appears; poll instead when inotify cannot watch it. ``rescan``: report the files
        there that were not reported yet (after a queue overflow)."""
        assert self._inotify is not None
        self._unwatch_all()
        while not self._stopping.is_set():
            # one look at the disk decides both: the base appearing between two looks left it
            # watched for directory events only, and the files arriving in it unreported
            parent = nearest_existing_parent(self.base)
            exists = parent == os.path.abspath(self.base)
            if not exists:
                if parent != self._watched_dir:
                    LOG.warning("%s: directory %s does not exist yet; waiting for it "
                                "(watching %s)", self.name, self.base, parent)
                self._waiting = True
            try:
                if exists:
                    wd = self._base_wd = self._watch_tree(self.base, 0)
                else:
                    wd = self._parent_wd = self._add_watch(parent, _PARENT)
            except OSError as err:
                self._unwatch_all()
                self._poll_instead(err.filename or parent, err,
                                   report_existing=self.backlog or not initial or rescan)
                return
            if wd is None:
                self._unwatch_all()
                continue  # it vanished meanwhile
            self._watched_dir = parent
            if exists:
                self._after_base_watched(initial, rescan)
                return
            if nearest_existing_parent(self.base) == parent:
                return  # nothing appeared between the check and the watch
            self._unwatch_all()

    def _add_watch(self, directory: str, mask: int) -> int | None:
        """Watch ``directory``; None when it vanished, OSError when inotify cannot watch it."""
        assert self._inotify is not None
        if not os.access(directory, os.R_OK | os.X_OK):  # root may watch what it cannot list
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), directory)
        try:
            return self._inotify.add_watch(directory, mask)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                LOG.debug("%s: cannot watch %s: %s", self.name, directory, err)
                return None
            raise

    def _watch_tree(self, directory: str, level: int) -> int | None:
        """Watch ``directory`` (at ``level`` below the base) and its sub-directories down to
        the file level; return its watch descriptor, None when it vanished. OSError when
        inotify cannot watch one of them."""
        bottom = level >= len(self.pattern.levels)
        wd = self._add_watch(directory, _FILE_LEVEL if bottom else _DIR_LEVEL)
        if wd is None:
            return None
        self._dirs[wd] = (directory, level)
        if not bottom:
            try:
                with os.scandir(directory) as entries:
                    children = [entry for entry in entries
                                if self.pattern.may_hold(entry.name, level + 1) and _is_dir(entry)]
            except (FileNotFoundError, NotADirectoryError):
                return wd  # going away: its own events tell
            for child in children:
                self._watch_tree(child.path, level + 1)
        return wd

    def _unwatch_tree(self, directory: str) -> None:
        """Stop watching ``directory`` and everything below it (it moved away)."""
        assert self._inotify is not None
        prefix = directory.rstrip("/") + "/"
        for wd, (path, _) in list(self._dirs.items()):
            if path == directory or path.startswith(prefix):
                del self._dirs[wd]
                with contextlib.suppress(OSError):
                    self._inotify.rm_watch(wd)

    def _unwatch_all(self) -> None:
        assert self._inotify is not None
        wds = [*self._dirs, *([self._parent_wd] if self._parent_wd is not None else [])]
        self._dirs.clear()
        self._base_wd = self._parent_wd = None
        for wd in wds:
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(wd)

    def _after_base_watched(self, initial: bool, rescan: bool = False) -> None:
        if self._waiting:
            self._waiting = False
            LOG.info("%s: directory %s appeared, watching it", self.name, self.base)
        elif not (rescan or (initial and self.backlog)):
            return
        found = self._offer_all(self.pattern.existing())
        LOG.info("%s: %d file(s) %s in %s", self.name, found,
                 "not reported yet" if rescan else "already", self.base)

    # -- inotify: the events ----------------------------------------------------------------
    def _read_events(self) -> None:
        """The reader thread: wait for events, handle them, until stopped or polling."""
        assert self._inotify is not None and self._wake is not None
        waiter = select.poll()
        waiter.register(self._inotify.fd, select.POLLIN)
        waiter.register(self._wake[0], select.POLLIN)
        try:
            while not self._stopping.is_set() and self._poller is None:
                waiter.poll()
                try:
                    events = self._inotify.read()
                except OSError as err:  # the kernel says no more: scan instead
                    self._poll_instead(self.base, err, report_existing=True)
                    return
                for event in events:
                    if self._stopping.is_set() or self._poller is not None:
                        return
                    try:
                        self._on_event(event.wd, event.mask, event.name)
                    except Exception:  # the reader must survive whatever happens
                        LOG.exception("%s: failed to handle the inotify event %s", self.name,
                                      event)
        finally:
            # polling from now on, the watches are of no use; stopped, the reader closes them
            # itself in case join() gave up waiting for it
            if self._poller is not None or self._stopping.is_set():
                self._close_inotify()

    def _on_event(self, wd: int, mask: int, name: str) -> None:
        """Handle one inotify event (on the reader thread)."""
        if mask & IN_Q_OVERFLOW:
            LOG.warning("%s: the inotify event queue overflowed; scanning %s again", self.name,
                        self.base)
            self._arm(rescan=True)
            return
        if self._waiting:
            if wd == self._parent_wd and nearest_existing_parent(self.base) != self._watched_dir:
                self._arm()
            return
        watched = self._dirs.get(wd)
        if watched is None:
            return  # the last events of a watch that was removed
        directory, level = watched
        if not name:  # about the watched directory itself
            if mask & _SELF_GONE:
                if wd == self._base_wd:
                    LOG.warning("%s: directory %s disappeared", self.name, self.base)
                    self._waiting = True  # what arrives until it is watched again is scanned for
                    self._arm()
                elif mask & IN_IGNORED:
                    del self._dirs[wd]
            return
        path = os.path.join(directory, name)
        if mask & IN_ISDIR:
            if mask & IN_MOVED_FROM:
                self._unwatch_tree(path)
            elif mask & (IN_CREATE | IN_MOVED_TO) and self.pattern.may_hold(name, level + 1):
                self._watch_new(path, level + 1)
        elif mask & (IN_CLOSE_WRITE | IN_MOVED_TO) and level >= len(self.pattern.levels):
            self.offer(path)

    def _watch_new(self, directory: str, level: int) -> None:
        """A directory was created or moved in: watch it, then report the files that landed
        in it before its watch was in place."""
        try:
            if self._watch_tree(directory, level) is None:
                return
        except OSError as err:
            self._poll_instead(err.filename or directory, err, report_existing=True)
            return
        self._offer_all(self._files_below(directory, level))

    # -- polling ----------------------------------------------------------------------------
    def _poll_instead(self, directory: str, err: OSError, report_existing: bool) -> None:
        """Poll from now on (the inotify reader ends); ``report_existing`` as below."""
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


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False
