"""SFTP uploads through the OpenSSH client (``ssh -s host sftp``).

asyncssh frames, encrypts and logs every SSH packet in Python: about 1 ms of CPU per small file,
and the event loop's thread for every byte of a large one. The OpenSSH client does that work in
C, as OpenSSH's own ``sftp`` does; here Python only writes SFTP requests into the client's
standard input and reads the replies. A small file costs three round trips: the open; the
writes, a size check and the close back to back; the rename.

Used only where the OpenSSH client can do exactly what the asyncssh connection would: key or
agent authentication (never a password or a key passphrase), host keys checked against the same
``known_hosts`` file (or not at all when that is disabled), default ciphers. Otherwise, or when
``ssh`` is missing or cannot log in, the caller keeps using asyncssh. Sessions belong to one
pooled SSH file system and are closed with it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import posixpath
import select
import shutil
import struct
import subprocess
import tempfile
import threading
import uuid
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from trollmoves.errors import ConnectionFailedError, VerificationError
from trollmoves.filesystems import ssh_cipher_preference
from trollmoves.urls import redact_text

LOG = logging.getLogger(__name__)

#: asyncssh options this path reproduces with the OpenSSH client; any other one rules it out.
_SUPPORTED = frozenset({"_host", "host", "port", "username", "client_keys", "known_hosts",
                        "connect_timeout", "encryption_algs", "max_sessions", "timeout"})
#: OpenSSH client sessions per pooled connection (one upload at a time in each).
MAX_SESSIONS = 4
#: Write requests in flight per upload (OpenSSH's sftp keeps 64 x 32 KiB).
WINDOW = 16

# SFTP version 3 (draft-ietf-secsh-filexfer-02) packet types, flags and status codes
_INIT, _VERSION, _OPEN, _CLOSE, _WRITE, _FSTAT, _REMOVE = 1, 2, 3, 4, 6, 8, 13
_STATUS, _HANDLE, _ATTRS, _EXTENDED, _EXTENDED_REPLY = 101, 102, 105, 200, 201
_WRITE_FLAGS = 0x02 | 0x08 | 0x10  # WRITE | CREAT | TRUNC
_SPARE_FLAGS = 0x02 | 0x08 | 0x20  # WRITE | CREAT | EXCL
_ATTR_SIZE, _ATTR_UIDGID, _ATTR_PERMISSIONS, _ATTR_ACMODTIME = 0x1, 0x2, 0x4, 0x8
_ATTR_EXTENDED = 0x80000000
_NO_SUCH_FILE, _PERMISSION_DENIED = 2, 3
_POSIX_RENAME = b"posix-rename@openssh.com"
_LIMITS = b"limits@openssh.com"
_DEFAULT_WRITE = 32 * 1024  # every SFTP server must accept this much per write
_DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")
_PIPE_SIZE = 1 << 20
_MAX_WRITE = 255 * 1024  # OpenSSH's sftp-server takes 256 KiB packets
_MAX_PACKET = 4 * 1024 * 1024
#: Seconds the OpenSSH client may take to log in and start the SFTP server.
HANDSHAKE_TIMEOUT = 60.0
#: Seconds a running session may go without taking a request or sending a reply: a server
#: stuck that long (a hung sftp-server on a dead NFS mount, whose connection still answers
#: keep-alives) is given up, so that the transfer fails or is retried instead of hanging.
REPLY_TIMEOUT = 120.0
_READ_CHUNK = 64 * 1024


class SFTPStatusError(OSError):
    """A request the SFTP server refused with a status code."""


def _string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


class _Reply:
    """One SFTP reply packet being decoded."""

    def __init__(self, kind: int, body: bytes) -> None:
        self.kind = kind
        self.body = body
        self.pos = 0

    def uint32(self) -> int:
        value = struct.unpack_from(">I", self.body, self.pos)[0]
        self.pos += 4
        return value

    def uint64(self) -> int:
        value = struct.unpack_from(">Q", self.body, self.pos)[0]
        self.pos += 8
        return value

    def string(self) -> bytes:
        size = self.uint32()
        value = self.body[self.pos:self.pos + size]
        self.pos += size
        return value

    def size_attr(self) -> int | None:
        """The size in an ATTRS structure (other attributes are skipped)."""
        flags = self.uint32()
        return self.uint64() if flags & _ATTR_SIZE else None


@dataclass(frozen=True)
class _Spare:
    """A hidden file opened ahead in ``directory``, for the next upload there."""

    directory: str
    path: str
    handle: bytes  #: as sent in requests (length-prefixed)


@dataclass(frozen=True)
class _Opening:
    """The open request of a spare file, whose reply has not been read yet."""

    directory: str
    path: str
    request_id: int


class Session:
    """One ``ssh -s sftp`` process: requests go out on its stdin, replies come on its stdout."""

    def __init__(self, argv: Sequence[str]) -> None:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the session
        stdin_r, stdin_w = os.pipe()
        try:
            self._proc = subprocess.Popen(argv, stdin=stdin_r, stdout=subprocess.PIPE,
                                          stderr=self._stderr, start_new_session=True)
        except OSError as err:
            os.close(stdin_w)
            self._stderr.close()
            raise ConnectionFailedError(f"cannot start {argv[0]}: {err.strerror}") from err
        finally:
            os.close(stdin_r)
        assert self._proc.stdout is not None
        self._out = stdin_w  # written with os.write: one system call per batch of requests
        with contextlib.suppress(OSError):  # fewer hand-overs to ssh for large files
            fcntl.fcntl(stdin_w, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        os.set_blocking(stdin_w, False)  # a full pipe is waited on with a timeout
        self._in: IO[bytes] = self._proc.stdout
        self._in_fd = self._in.fileno()
        self._received = bytearray()  # read from the client, not decoded yet
        self._readable = select.poll()
        self._readable.register(self._in_fd, select.POLLIN)
        self._writable = select.poll()
        self._writable.register(stdin_w, select.POLLOUT)
        #: set when the server stopped answering: the session is only fit to be killed
        self.hung = False
        self._next_id = 0
        self._early: dict[int, _Reply] = {}
        self._opening: _Opening | None = None  #: a file being opened for the next upload
        self._last_dir: str | None = None
        try:
            self._handshake()
        except Exception as err:
            if isinstance(err, ConnectionFailedError):
                reason = err.detail
            elif isinstance(err, OSError):
                reason = self.failure()
            else:
                reason = f"the SFTP server's greeting is not SFTP ({type(err).__name__})"
            self.close()
            raise ConnectionFailedError(reason) from err

    def _handshake(self) -> None:
        """INIT/VERSION within :data:`HANDSHAKE_TIMEOUT`, then the server's limits if told."""
        self._send(struct.pack(">IBI", 5, _INIT, 3))
        version = self._read(HANDSHAKE_TIMEOUT, "no SFTP greeting within {:g} s")
        if version.kind != _VERSION:
            raise ConnectionFailedError("the SFTP server did not start")
        version.uint32()
        extensions = {}
        while version.pos < len(version.body):
            name = version.string()
            extensions[name] = version.string()
        self.usable = _POSIX_RENAME in extensions
        self.write_size = _DEFAULT_WRITE
        if self.usable and _LIMITS in extensions:
            [limits] = self._exchange(self._extended(_LIMITS))
            if limits.kind == _EXTENDED_REPLY:
                limits.uint64()  # max packet length
                limits.uint64()  # max read length
                self.write_size = min(limits.uint64() or _DEFAULT_WRITE, _MAX_WRITE)

    # -- framing ---------------------------------------------------------------------------
    def _request(self, kind: int, payload: bytes) -> tuple[int, bytes]:
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        head = struct.pack(">IBI", len(payload) + 5, kind, self._next_id)
        return self._next_id, head + payload

    def _extended(self, name: bytes, *args: bytes) -> tuple[int, bytes]:
        return self._request(_EXTENDED, _string(name) + b"".join(map(_string, args)))

    def _send(self, data: bytes | memoryview) -> None:
        """Write all of ``data`` to the client; ConnectionFailedError when it is gone or takes
        nothing for :data:`REPLY_TIMEOUT` seconds."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._out, view):]
            except BlockingIOError:
                self._wait(self._writable, REPLY_TIMEOUT,
                           "the SFTP server took no data for {:g} s")
            except OSError as err:  # a broken pipe: the client exited
                raise ConnectionFailedError(self.failure()) from err

    def _wait(self, poller: select.poll, timeout: float, what: str) -> None:
        """Wait until ``poller`` says ready; give the session up after ``timeout`` seconds."""
        if not poller.poll(timeout * 1000):
            self.hung = True
            raise ConnectionFailedError(what.format(timeout))

    def _fill(self, count: int, timeout: float, what: str) -> None:
        """Receive until ``count`` bytes are buffered (``what``: the timeout's message)."""
        while len(self._received) < count:
            self._wait(self._readable, timeout, what)
            chunk = os.read(self._in_fd, max(_READ_CHUNK, count - len(self._received)))
            if not chunk:
                raise ConnectionFailedError(self.failure())
            self._received += chunk

    def _read(self, timeout: float | None = None,
              what: str = "no reply from the SFTP server for {:g} s") -> _Reply:
        """The next reply packet; ConnectionFailedError when nothing comes for ``timeout``
        seconds (:data:`REPLY_TIMEOUT` by default)."""
        timeout = REPLY_TIMEOUT if timeout is None else timeout
        self._fill(5, timeout, what)
        length, kind = struct.unpack_from(">IB", self._received)
        if not 5 <= length <= _MAX_PACKET:  # e.g. text a login shell printed on the channel
            raise ConnectionFailedError(
                f"not an SFTP packet (length {length}); does the login shell print something?")
        self._fill(length + 4, timeout, what)
        body = bytes(self._received[5:length + 4])
        del self._received[:length + 4]
        return _Reply(kind, body)

    def _post_write(self, handle: bytes, offset: int, data: memoryview) -> int:
        """Send one write request without copying ``data``; return its id."""
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        head = struct.pack(">IBI", 5 + len(handle) + 12 + len(data), _WRITE, self._next_id)
        self._send(head + handle + struct.pack(">QI", offset, len(data)))
        self._send(data)
        return self._next_id

    def _post(self, *requests: tuple[int, bytes]) -> list[int]:
        """Send requests back to back; return their ids (replies are read with _reply_to)."""
        self._send(b"".join(packet for _, packet in requests))
        return [request_id for request_id, _ in requests]

    def _reply_to(self, request_id: int) -> _Reply:
        """The reply to one request, keeping any that arrive before it."""
        while request_id not in self._early:
            reply = self._read()
            self._early[reply.uint32()] = reply
        return self._early.pop(request_id)

    def _exchange(self, *requests: tuple[int, bytes]) -> list[_Reply]:
        """Send requests back to back, then collect their replies, in request order."""
        return [self._reply_to(request_id) for request_id in self._post(*requests)]

    @staticmethod
    def _check(reply: _Reply, path: str) -> None:
        """Raise for an error status (OK and the expected reply types pass)."""
        if reply.kind != _STATUS:
            return
        code = reply.uint32()
        if code == 0:
            return
        message = reply.string().decode("utf-8", "replace")
        number = {_NO_SUCH_FILE: 2, _PERMISSION_DENIED: 13}.get(code, 5)  # ENOENT/EACCES/EIO
        error = {2: FileNotFoundError, 13: PermissionError}.get(number, SFTPStatusError)
        raise error(number, message or f"SFTP status {code}", path)

    # -- the one operation -------------------------------------------------------------------
    def upload(self, lpath: str, tmp: str, final: str, callback: Any = None) -> int:
        """Copy the local file ``lpath`` to ``tmp``, check its size, rename it over ``final``.

        Writes stream with up to :data:`WINDOW` requests in flight; the size check and the
        close follow the last write at once, and the rename only a complete file. When files
        keep coming to one directory, the rename also opens a hidden file there for the next
        one (removed when the session ends): a small file then costs two round trips.
        """
        directory = posixpath.dirname(tmp)
        with open(lpath, "rb") as source:
            size = os.fstat(source.fileno()).st_size
            if callback is not None:
                callback.set_size(size)
            spare = self._take_spare()
            ahead = spare is not None and spare.directory == directory
            if spare is not None and ahead:
                tmp, handle = spare.path, spare.handle
            else:
                handle = self._open(tmp, spare)
            try:
                self._write(source, handle, size, tmp, callback)
                self._finish(tmp, final, directory)
            except ConnectionFailedError:
                raise
            except BaseException:
                if ahead:  # the caller cleans up the name it gave, not this one
                    self._remove_quietly(tmp)
                raise
        return size

    def _open(self, tmp: str, stale: _Spare | None) -> bytes:
        """Open ``tmp`` for writing (and let go of a spare file opened for another directory)."""
        requests = [] if stale is None else [self._request(_CLOSE, stale.handle),
                                             self._request(_REMOVE, _string(stale.path.encode()))]
        *ignored, open_id = self._post(*requests, self._request(
            _OPEN, _string(tmp.encode()) + struct.pack(">II", _WRITE_FLAGS, 0)))
        for request_id in ignored:
            self._reply_to(request_id)
        opened = self._reply_to(open_id)
        self._check(opened, tmp)
        if opened.kind != _HANDLE:
            raise SFTPStatusError(5, "unexpected reply to open", tmp)
        return _string(opened.string())

    def _write(self, source: IO[bytes], handle: bytes, size: int, tmp: str,
               callback: Any) -> None:
        """Stream ``source`` into the open ``handle``, check its size and close it."""
        writes: deque[tuple[int, int]] = deque()  # (request id, end offset) in flight
        sent = 0
        buffer = bytearray(min(self.write_size, max(size, 1)))
        view = memoryview(buffer)
        try:
            while count := source.readinto(buffer):
                writes.append((self._post_write(handle, sent, view[:count]), sent + count))
                sent += count
                if len(writes) >= WINDOW:
                    self._acknowledged(writes.popleft(), tmp, callback)
        except ConnectionFailedError:
            raise  # the session is lost: nothing more to say to it
        except BaseException:
            # a write was refused or the source could not be read: close, drain, give up
            ids = self._post(self._request(_CLOSE, handle))
            for request_id in [w for w, _ in writes] + ids:
                self._reply_to(request_id)
            raise
        stat_id, close_id = self._post(self._request(_FSTAT, handle),
                                       self._request(_CLOSE, handle))
        refused: list[BaseException] = []
        for pending in writes:
            try:
                self._acknowledged(pending, tmp, callback)
            except OSError as err:
                refused.append(err)
        stat, closed = self._reply_to(stat_id), self._reply_to(close_id)
        if refused:
            raise refused[0]
        self._check(stat, tmp)
        self._check(closed, tmp)
        got = stat.size_attr() if stat.kind == _ATTRS else None
        if got != size or sent != size:
            raise VerificationError(f"wrote {got} bytes, source has {size}"
                                    + ("" if sent == size else f" (read {sent})"))

    def _finish(self, tmp: str, final: str, directory: str) -> None:
        """Rename the complete file; open the next one beside it if files keep coming here.

        Only the rename's reply is waited for: the server creates the spare file (the slowest
        step on many file systems) while the caller gets on with the next file.
        """
        rename = self._extended(_POSIX_RENAME, tmp.encode(), final.encode())
        if self._last_dir != directory:
            self._last_dir = directory
            [renamed] = self._exchange(rename)
        else:
            path = posixpath.join(directory, f".trollmoves-{uuid.uuid4().hex[:12]}.part")
            rename_id, open_id = self._post(rename, self._request(
                _OPEN, _string(path.encode()) + struct.pack(">II", _SPARE_FLAGS, 0)))
            self._opening = _Opening(directory, path, open_id)
            renamed = self._reply_to(rename_id)
        self._check(renamed, final)

    def _take_spare(self) -> _Spare | None:
        """The file opened ahead, once its open is answered (None if there is none)."""
        opening, self._opening = self._opening, None
        if opening is None:
            return None
        opened = self._reply_to(opening.request_id)
        if opened.kind != _HANDLE:
            return None
        return _Spare(opening.directory, opening.path, _string(opened.string()))

    def _remove_quietly(self, path: str) -> None:
        with contextlib.suppress(OSError, ConnectionFailedError):
            self._exchange(self._request(_REMOVE, _string(path.encode())))

    def _acknowledged(self, write: tuple[int, int], path: str, callback: Any) -> None:
        """Wait for one write's reply; report progress up to its end."""
        request_id, end = write
        self._check(self._reply_to(request_id), path)
        if callback is not None:
            callback.absolute_update(end)

    def failure(self) -> str:
        """What the OpenSSH client said before it stopped (first lines, redacted)."""
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "the OpenSSH client stopped answering"
        self._stderr.seek(0)
        said = self._stderr.read(2000).decode("utf-8", "replace").strip()
        detail = "; ".join(line for line in said.splitlines()[:3] if line)
        return redact_text(f"ssh exited with status {self._proc.returncode}"
                           + (f": {detail}" if detail else ""))

    def close(self) -> None:
        """Remove the spare file, end the session and reap the process (kill it if hung)."""
        if self.hung:
            self._proc.kill()
        elif self._opening is not None and self._proc.poll() is None:
            with contextlib.suppress(OSError, ConnectionFailedError):
                spare = self._take_spare()
                if spare is not None:
                    self._exchange(self._request(_CLOSE, spare.handle),
                                   self._request(_REMOVE, _string(spare.path.encode())))
        with contextlib.suppress(OSError):
            os.close(self._out)
        with contextlib.suppress(OSError):
            self._in.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()


def ssh_argv(options: Mapping[str, Any], ssh: str = "ssh") -> list[str] | None:
    """The OpenSSH client command matching asyncssh ``options``, or None if there is none."""
    ciphers = options.get("encryption_algs")
    if set(options) - _SUPPORTED or (ciphers is not None
                                     and list(ciphers) != ssh_cipher_preference()):
        return None
    host = options.get("_host") or options.get("host")
    keys = options.get("client_keys")
    known = options.get("known_hosts", "~/.ssh/known_hosts")
    if not host or (keys is not None and not all(isinstance(k, str) for k in keys)):
        return None
    argv = [ssh, "-x", "-a", "-q", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3",
            "-o", "Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com"]
    if known is None:
        argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    elif isinstance(known, str):
        argv += ["-o", "StrictHostKeyChecking=yes", "-o", "UpdateHostKeys=no",
                 "-o", f"UserKnownHostsFile={os.path.expanduser(known)}",
                 "-o", "GlobalKnownHostsFile=/dev/null", "-o", "CheckHostIP=no"]
    else:
        return None
    # asyncssh reads ~/.ssh from $HOME; the OpenSSH client from the password database: name
    # the same configuration and keys explicitly so that both behave alike
    config = os.path.expanduser("~/.ssh/config")
    argv += ["-F", config if os.path.exists(config) else "none"]
    if keys:
        argv += ["-o", "IdentitiesOnly=yes"]
    else:
        keys = [path for name in _DEFAULT_KEYS
                if os.path.exists(path := os.path.expanduser(f"~/.ssh/{name}"))]
    for key in keys:
        argv += ["-i", os.path.expanduser(key)]
    if options.get("connect_timeout"):
        argv += ["-o", f"ConnectTimeout={max(1, round(float(options['connect_timeout'])))}"]
    if options.get("port"):
        argv += ["-p", str(int(options["port"]))]
    if options.get("username"):
        argv += ["-l", str(options["username"])]
    return [*argv, "-s", "--", str(host), "sftp"]


class Sessions:
    """The OpenSSH sessions of one pooled connection: up to :data:`MAX_SESSIONS` at once."""

    def __init__(self, argv: list[str] | None) -> None:
        self.argv = argv
        #: no OpenSSH client for this connection (options it cannot honour, or it failed to
        #: log in): asyncssh does the work instead
        self.broken = argv is None
        self._idle: list[Session] = []
        self._count = 0
        self._changed = threading.Condition()
        self._closed = False

    def upload(self, lpath: str, tmp: str, final: str, callback: Any = None) -> int | None:
        """Upload through a free session; None when the OpenSSH client cannot be used."""
        session = self._take()
        if session is None:
            return None
        try:
            size = session.upload(lpath, tmp, final, callback)
        except (FileNotFoundError, PermissionError, SFTPStatusError):
            self._give(session)  # the server refused one request; the session is fine
            raise
        except BaseException:
            self._drop(session)  # lost, or in an unknown state
            raise
        self._give(session)
        return size

    def _take(self) -> Session | None:
        with self._changed:
            while True:
                if self.broken or self._closed:
                    return None
                if self._idle:
                    return self._idle.pop()
                if self._count < MAX_SESSIONS:
                    self._count += 1
                    break
                self._changed.wait()
        assert self.argv is not None
        try:
            session = Session(self.argv)
            if session.usable:
                LOG.debug("Started an OpenSSH sftp session to %s", self.argv[-2])
                return session
            session.close()
            reason = f"the SFTP server lacks {_POSIX_RENAME.decode()}"
        except Exception as err:  # noqa: BLE001 - whatever it was, asyncssh takes over
            reason = str(err)
        LOG.debug("OpenSSH client not usable here, staying with asyncssh: %s", reason)
        with self._changed:
            self._count -= 1
            self.broken = True
            self._changed.notify_all()
        return None

    def _give(self, session: Session) -> None:
        with self._changed:
            if not self._closed:
                self._idle.append(session)
                self._changed.notify()
                return
        self._drop(session)

    def _drop(self, session: Session) -> None:
        session.close()
        with self._changed:
            self._count -= 1
            self._changed.notify()

    def close(self) -> None:
        """Close idle sessions now; busy ones when their upload returns."""
        with self._changed:
            self._closed = True
            idle, self._idle = self._idle, []
            self._changed.notify_all()
        for session in idle:
            self._drop(session)


_SESSIONS: weakref.WeakKeyDictionary[Any, Sessions] = weakref.WeakKeyDictionary()
_SESSIONS_LOCK = threading.Lock()


def sessions_for(fs: Any, options: Mapping[str, Any]) -> Sessions | None:
    """The OpenSSH sessions to use beside the pooled SSH file system ``fs``, if any."""
    with _SESSIONS_LOCK:
        found = _SESSIONS.get(fs)
        if found is None:
            ssh = shutil.which("ssh")
            found = _SESSIONS[fs] = Sessions(ssh_argv(options, ssh) if ssh else None)
    return None if found.broken else found


@atexit.register
def close_all() -> None:
    """Close every OpenSSH session (at exit: their spare files are removed)."""
    with _SESSIONS_LOCK:
        found = list(_SESSIONS.values())
        _SESSIONS.clear()
    for sessions in found:
        sessions.close()


def close_for(fs: Any) -> None:
    """Close the OpenSSH sessions that belong to ``fs`` (when the pool closes it)."""
    with _SESSIONS_LOCK:
        found = _SESSIONS.pop(fs, None)
    if found is not None:
        found.close()
