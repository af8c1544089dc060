"""The copy engine: one ``copy``/``move`` for every protocol fsspec serves.

A transfer writes under a hidden temporary name beside the target, checks the size (and a
checksum when asked), then renames; object stores, whose uploads are atomic, are written in
place. Transient failures are retried with backoff within a bounded budget, also on backup
hosts; every other failure raises at once. No text leaving this module holds a password.
"""

from __future__ import annotations

import contextlib
import errno
import ftplib
import hashlib
import logging
import os
import posixpath
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trollmoves import errors, protocols
from trollmoves.filesystems import (
    DEFAULT_CONNECTION_UPTIME,
    POOL,
    Endpoint,
    endpoint,
    filesystem_path,
    local_filesystem,
)
from trollmoves.urls import Location, parse

LOG = logging.getLogger(__name__)

#: Protocols where a written object appears whole or not at all.
ATOMIC_PROTOCOLS = frozenset({"s3", "gs", "gcs", "az", "abfs", "memory"})
#: Protocols without real directories to create.
FLAT_PROTOCOLS = frozenset({"s3", "gs", "gcs", "az", "abfs"})
CHUNK = 8 * 1024 * 1024


class _Interrupts:
    """Lets a shutdown cut short the retry pauses of the transfers under way, and only those."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._generation = 0

    def current(self) -> int:
        """The generation a transfer starting now belongs to."""
        with self._changed:
            return self._generation

    def pause(self, seconds: float, generation: int) -> bool:
        """Wait ``seconds``; True (at once) when interrupted since ``generation`` began."""
        with self._changed:
            return self._changed.wait_for(lambda: self._generation != generation, seconds)

    def interrupt(self) -> None:
        """Wake and cancel every pause of the transfers started so far."""
        with self._changed:
            self._generation += 1
            self._changed.notify_all()


_INTERRUPTS = _Interrupts()


@dataclass(frozen=True)
class Result:
    """What a completed transfer delivered."""

    dst: str  #: destination URL, password removed
    size: int  #: bytes delivered
    checksum: str | None  #: ``algorithm:hexdigest`` when a checksum was asked for
    seconds: float  #: wall time including retries
    src: str = ""  #: source URL, password removed

    @property
    def rate(self) -> float:
        """Throughput in bytes per second."""
        return self.size / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently transient failures are retried."""

    attempts: int = 3  #: tries per host list, the first included
    backoff: float = 0.5  #: first pause in seconds, doubled each time
    budget: float = 60.0  #: give up once this many seconds have passed


def _with_options(target: Any, options: Mapping[str, Any]) -> tuple[Location, dict[str, Any]]:
    """Parse a target; a ``UPath`` contributes its own storage options."""
    opts = dict(getattr(target, "storage_options", None) or {})
    opts.update(options)
    if hasattr(target, "protocol") and hasattr(target, "storage_options"):
        target = str(target)
    return parse(target), opts


def temporary_name(path: str) -> str:
    """The hidden name a file is written under beside ``path`` before it is renamed."""
    head, tail = posixpath.split(path)
    return posixpath.join(head, f".{tail}.{uuid.uuid4().hex[:12]}.part")


class _Side:
    """One end of a transfer: where it is, and how to reach it."""

    def __init__(self, loc: Location, options: Mapping[str, Any]) -> None:
        self.loc = loc
        self.ep: Endpoint = endpoint(loc, options)
        self.path = filesystem_path(loc)

    @property
    def protocol(self) -> str:
        return self.loc.protocol


def _hash_file(fs: Any, path: str, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _kernel_copy(src: str, dst: str, callback: Any = None) -> None:
    """Copy a local file to a new local file inside the kernel (copy_file_range/sendfile)."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        size = os.fstat(fin.fileno()).st_size
        if callback is not None:
            callback.set_size(size)
        offset = 0
        try:
            while offset < size:
                sent = os.copy_file_range(fin.fileno(), fout.fileno(), min(size - offset, 1 << 30))
                if sent == 0:
                    break
                offset += sent
                if callback is not None:
                    callback.absolute_update(offset)
        except OSError as err:
            if err.errno not in {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}:
                raise
            fin.seek(offset)
            fout.seek(offset)
            shutil.copyfileobj(fin, fout, CHUNK)


def _stream(sfs: Any, spath: str, dfs: Any, dpath: str, callback: Any) -> None:
    """Remote to remote: read and write in chunks, never holding the file in memory."""
    with sfs.open(spath, "rb") as fin, dfs.open(dpath, "wb") as fout:
        done = 0
        while chunk := fin.read(CHUNK):
            fout.write(chunk)
            done += len(chunk)
            if callback is not None:
                callback.absolute_update(done)


class _Attempt:
    """One try of one transfer between two resolved sides."""

    def __init__(self, src: _Side, dst: _Side, *, checksum: str | None, create_dirs: bool,
                 hardlink: bool, delete_source: bool, callback: Any, uptime: float) -> None:
        self.src, self.dst = src, dst
        self.checksum = checksum
        self.create_dirs = create_dirs
        self.hardlink = hardlink
        self.delete_source = delete_source
        self.callback = callback
        self.uptime = uptime
        #: the remote temporary file a lost connection kept this attempt from removing
        self.left_behind: str | None = None

    def run(self) -> tuple[int, str | None]:
        """Deliver the file; return (size, checksum)."""
        if self.src.loc.is_local and self.dst.loc.is_local:
            return self._local()
        with POOL.use(self.src.ep, self.uptime) as sfs, POOL.use(self.dst.ep, self.uptime) as dfs:
            return self._remote(sfs, dfs)

    # -- local to local ---------------------------------------------------------------------
    def _local(self) -> tuple[int, str | None]:
        spath, dpath = self.src.path, self.dst.path
        size = _source_size(os.stat, spath)
        self._make_local_parent(dpath)
        if self.delete_source and not self.checksum and _try(os.rename, spath, dpath):
            return size, None
        tmp = temporary_name(dpath)
        try:
            if not (self.hardlink and _try(os.link, spath, tmp)):
                _kernel_copy(spath, tmp, self.callback)
            expected = self._source_checksum(self.src, None)
            self._verify(local_filesystem(), tmp, size, expected)
            os.replace(tmp, dpath)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return size, expected

    def _make_local_parent(self, path: str) -> None:
        parent = os.path.dirname(path)
        if os.path.isdir(parent):
            return
        if not self.create_dirs:
            raise errors.DestinationMissingError(f"{parent} does not exist")
        os.makedirs(parent, exist_ok=True)

    # -- anything involving a remote side --------------------------------------------------
    def _remote(self, sfs: Any, dfs: Any) -> tuple[int, str | None]:
        spath, dpath = self.src.path, self.dst.path
        size = _source_size(os.stat if self.src.loc.is_local else sfs.size, spath)
        if self.dst.loc.is_local:
            self._make_local_parent(dpath)
        atomic = self.dst.protocol in ATOMIC_PROTOCOLS
        target = dpath if atomic else temporary_name(dpath)
        quick = None
        if self.src.loc.is_local and not self.checksum and not atomic:
            quick = protocols.quick_delivery(self.dst.protocol, size, dfs,
                                             self.dst.ep.kwargs)
        try:
            if quick is not None:
                self._creating_parent(dfs, target,
                                      lambda: quick(spath, target, dpath, self.callback))
                self._finish(sfs, spath)
                return size, None
            self._creating_parent(dfs, target, lambda: self._send(sfs, spath, dfs, target))
            expected = self._source_checksum(self.src, sfs)
            self._verify(dfs, target, size, expected)
            if not atomic:
                dfs.mv(target, dpath)
        except BaseException as err:
            # a remote temporary file cannot be removed over a lost connection (a later
            # attempt that gets through does it); a local one can
            if not atomic and (self.dst.loc.is_local or not _is_connection_loss(err)):
                _remove_quietly(dfs, target)
            elif not atomic:
                self.left_behind = target
            raise
        self._finish(sfs, spath)
        return size, expected

    def _finish(self, sfs: Any, spath: str) -> None:
        """Remove the source of a move, once the destination is complete."""
        if self.delete_source:
            sfs.rm_file(spath) if not self.src.loc.is_local else os.unlink(spath)

    def _creating_parent(self, dfs: Any, target: str, action: Callable[[], object]) -> None:
        """Run ``action``; if it failed for a missing directory, create it and run it again."""
        try:
            action()
        except Exception as err:
            # the destination directory is created only when a write says it is missing:
            # one round trip saved for every file of a stream into an existing directory
            if not _may_be_missing_parent(err, self.dst):
                raise
            if not self.create_dirs:
                parent = posixpath.dirname(target)
                raise errors.DestinationMissingError(f"{parent} does not exist") from err
            dfs.makedirs(posixpath.dirname(target), exist_ok=True)
            action()

    def _send(self, sfs: Any, spath: str, dfs: Any, target: str) -> None:
        if self.src.loc.is_local:
            protocols.put(dfs, self.dst.protocol, spath, target, self.callback)
        elif self.dst.loc.is_local:
            protocols.get(sfs, self.src.protocol, spath, target, self.callback)
        elif sfs is dfs:
            dfs.cp_file(spath, target)
        else:
            _stream(sfs, spath, dfs, target, self.callback)

    def _source_checksum(self, side: _Side, fs: Any) -> str | None:
        if not self.checksum:
            return None
        return _hash_file(fs or local_filesystem(), side.path, self.checksum)

    def _verify(self, fs: Any, path: str, size: int, expected: str | None) -> None:
        got = fs.size(path)
        if got != size:
            raise errors.VerificationError(f"wrote {got} bytes, source has {size}")
        if expected is not None:
            actual = _hash_file(fs, path, self.checksum)
            if actual != expected:
                raise errors.VerificationError(
                    f"{self.checksum} mismatch: source {expected}, destination {actual}")


def _may_be_missing_parent(err: BaseException, dst: _Side) -> bool:
    """Whether a failed write may be due to a missing directory (FTP says 550 for both)."""
    if dst.loc.is_local or dst.protocol in FLAT_PROTOCOLS:
        return False
    if isinstance(err, ftplib.error_perm):
        return str(err).startswith("550")
    return errors.classify(err) is errors.SourceMissingError


def _source_size(stat: Any, path: str) -> int:
    try:
        info = stat(path)
    except FileNotFoundError as err:
        raise errors.SourceMissingError(f"{path} does not exist") from err
    size = info.st_size if hasattr(info, "st_size") else info
    return int(size)


def _try(func: Any, *args: Any) -> bool:
    try:
        func(*args)
    except OSError:
        return False
    return True


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _remove_quietly(fs: Any, path: str) -> None:
    try:
        fs.rm_file(path)
    except Exception:  # noqa: BLE001 - cleanup after a failure must not mask it
        LOG.debug("Could not remove temporary %s", path)


def _remove_left_behind(dest: _Side, left_behind: list[tuple[_Side, str]],
                        uptime: float) -> None:
    """Remove, through the connection that just delivered, the temporary files that earlier
    attempts to the same host lost their connection over."""
    paths = [path for side, path in left_behind if side is dest]
    if not paths:
        return
    with POOL.use(dest.ep, uptime) as fs:
        for path in paths:
            _remove_quietly(fs, path)


def _is_connection_loss(err: BaseException) -> bool:
    return errors.classify(err).transient


def _hosts(loc: Location, backup_hosts: Sequence[str] | None) -> list[Location]:
    hosts = [loc]
    for host in backup_hosts or ():
        if host and host != loc.host:
            hosts.append(loc.with_host(host))
    return hosts


def transfer(src: Any, dst: Any, *, delete_source: bool = False, checksum: str | None = None,
             create_dirs: bool = True, hardlink: bool = True,
             backup_hosts: Sequence[str] | None = None, retry: RetryPolicy | None = None,
             callback: Any = None, src_options: Mapping[str, Any] | None = None,
             dst_options: Mapping[str, Any] | None = None, **options: Any) -> Result:
    """Copy (or move, with ``delete_source``) one file; see :func:`trollmoves.copy`."""
    started = time.monotonic()
    generation = _INTERRUPTS.current()
    retry = retry or RetryPolicy()
    uptime = float(options.get("connection_uptime", DEFAULT_CONNECTION_UPTIME))
    src_loc, s_opts = _with_options(src, {**options, **(src_options or {})})
    dst_loc, d_opts = _with_options(dst, {**options, **(dst_options or {})})
    if src_loc.is_dir:
        raise errors.ConfigurationError("the source must be a file, not a directory",
                                        src_loc.url(), dst_loc.url())
    if dst_loc.is_dir:
        dst_loc = dst_loc.join(src_loc.name)
    if checksum and checksum not in hashlib.algorithms_available:
        raise errors.ConfigurationError(f"unknown checksum algorithm {checksum!r}",
                                        src_loc.url(), dst_loc.url())
    source = _Side(src_loc, s_opts)
    destinations = [_Side(loc, d_opts) for loc in _hosts(dst_loc, backup_hosts)]
    secrets = source.ep.secrets + tuple(s for d in destinations for s in d.ep.secrets)
    failures: list[str] = []
    last: BaseException | None = None
    delay = retry.backoff
    left_behind: list[tuple[_Side, str]] = []
    for attempt in range(1, max(1, retry.attempts) + 1):
        for dest in destinations:
            trial = _Attempt(source, dest, checksum=checksum, create_dirs=create_dirs,
                             hardlink=hardlink, delete_source=delete_source,
                             callback=callback, uptime=uptime)
            try:
                size, digest = trial.run()
            except Exception as err:  # noqa: BLE001 - every failure is classified below
                if trial.left_behind is not None:
                    left_behind.append((dest, trial.left_behind))
                kind = errors.classify(err)
                if not kind.transient:
                    raise _as_error(kind, err, secrets, source, dest) from None
                POOL.discard(source.ep)
                POOL.discard(dest.ep)
                last = err
                failures.append(f"{dest.loc.url()}: {errors.describe(err, secrets)}")
                LOG.warning("Transfer %s -> %s failed (attempt %d): %s", source.loc.url(),
                            dest.loc.url(), attempt, errors.describe(err, secrets))
                continue
            _remove_left_behind(dest, left_behind, uptime)
            seconds = time.monotonic() - started
            result = Result(dest.loc.url(), size, f"{checksum}:{digest}" if digest else None,
                            seconds, source.loc.url())
            LOG.debug("Delivered %s (%d bytes, %.3f s)", result.dst, size, seconds)
            return result
        if attempt >= retry.attempts or time.monotonic() - started + delay > retry.budget:
            break
        if _INTERRUPTS.pause(delay, generation):
            break
        delay *= 2
    assert last is not None
    detail = "; ".join(failures[-len(destinations):])
    raise errors.ConnectionFailedError(
        f"gave up after {attempt} attempt(s): {detail}", source.loc.url(), dst_loc.url()
    ) from None


def _as_error(kind: type[errors.TransferError], err: BaseException, secrets: Sequence[str],
              source: _Side, dest: _Side) -> errors.TransferError:
    detail = err.detail if isinstance(err, errors.TransferError) else errors.describe(err, secrets)
    if kind is errors.SourceMissingError and source.loc.is_local and os.path.exists(source.path):
        kind = errors.DestinationMissingError
    return kind(detail, source.loc.url(), dest.loc.url())


def interrupt_retries() -> None:
    """Give up the retry pauses of every transfer under way (used at shutdown); transfers
    started afterwards retry as usual."""
    _INTERRUPTS.interrupt()
