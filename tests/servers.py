"""Real servers on loopback for integration tests and benchmarks.

Every server runs in its own process, listens on 127.0.0.1 only and writes its output to a log
file in the directory it was started in. Readiness is detected from a line the server prints
(sshd, pyftpdlib, moto) or, for servers that print nothing (vsftpd), by connecting to the port.

The handles returned by the ``start_*`` functions are context managers; ``stop()`` terminates
the server and all processes it forked (then kills them after a timeout) and ``kill()`` sends
SIGKILL to all of them at once, which simulates a crashed server.

This module does not depend on pytest; see ``tests/conftest.py`` for the fixtures.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

HOST = "127.0.0.1"
"""The only address the servers listen on."""

START_TIMEOUT = 20.0
"""Default number of seconds a server has to become ready."""

STOP_TIMEOUT = 5.0
"""Default number of seconds a server has to exit after SIGTERM before it is killed."""

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
"""The sftp subsystem used by default (``"internal-sftp"`` is the alternative)."""

FTP_USER = "troll"
FTP_PASSWORD = "s3cret-pw"
VSFTPD = "/usr/sbin/vsftpd"
VSFTPD_USER = "trollftp"

AWS_ACCESS_KEY_ID = "testing"
AWS_SECRET_ACCESS_KEY = "testing"
AWS_REGION = "us-east-1"

_TAIL_CHARS = 20_000


class ServerStartError(RuntimeError):
    """A server process failed to become ready."""


class ServerUnavailable(RuntimeError):
    """A server cannot be started on this machine (missing program, not root...)."""


def free_port(host: str = HOST) -> int:
    """Return a TCP port that is free on ``host`` right now (the OS may reuse it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float = START_TIMEOUT,
                  ) -> None:
    """Connect to ``host:port`` until it accepts, or raise ``TimeoutError`` after ``timeout``.

    Each attempt uses a socket timeout; after a refused connection the next attempt comes after
    waiting up to 20 ms for ``proc`` to exit (then ``ServerStartError`` is raised).
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"nothing accepted connections on {host}:{port} in {timeout} s")
        try:
            with socket.create_connection((host, port), timeout=min(remaining, 1.0)):
                return
        except OSError:
            pass
        try:
            proc.wait(timeout=min(0.02, max(remaining, 0.001)))
        except subprocess.TimeoutExpired:
            continue
        raise ServerStartError(f"process exited with code {proc.returncode}")


# --------------------------------------------------------------------------------------------
# Process management


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """Return (parent pid, start time) of ``pid`` from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    if fields[0] == b"Z":
        return None
    return int(fields[1]), int(fields[19])


def _descendants(pid: int) -> list[tuple[int, int]]:
    """Return (pid, start time) of all descendants of ``pid`` (Linux /proc; else empty)."""
    children: dict[int, list[tuple[int, int]]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        stat = _proc_stat(int(entry))
        if stat is not None:
            children.setdefault(stat[0], []).append((int(entry), stat[1]))
    found: list[tuple[int, int]] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def _signal_if_same(pid: int, start: int, sig: int) -> None:
    """Send ``sig`` to ``pid`` unless it has exited (or its pid was reused)."""
    stat = _proc_stat(pid)
    if stat is None or stat[1] != start:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _make_preexec() -> Any:
    """Return a preexec_fn that makes the child get SIGTERM when the test process dies.

    Linux delivers it when the forking *thread* exits, so it is only set from the main thread.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not \
            threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return preexec


class ManagedServer:
    """A server subprocess whose combined stdout/stderr goes to ``log_path``.

    Subclasses provide ``host`` and ``port``. Usable as a context manager (stops on exit).
    """

    host: str = HOST
    port: int = 0

    def __init__(self, name: str, directory: str | os.PathLike[str]) -> None:
        self.name = name
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_path = self.directory / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None
        self._signal = threading.Event()
        self._match: re.Match[str] | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def _spawn(self, argv: list[str], ready: re.Pattern[str] | None = None,
               env: dict[str, str] | None = None) -> None:
        """Start ``argv``; lines of its output are appended to the log and matched to ``ready``."""
        self._signal.clear()
        self._match = None
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed by the pump thread
        log.write(f"=== {time.strftime('%H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        log.flush()
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=env, start_new_session=True, preexec_fn=_make_preexec(),
            )
        except BaseException:
            log.close()
            raise
        self._pump = threading.Thread(target=self._pump_output, args=(self.proc, log, ready),
                                      name=f"{self.name}-log", daemon=True)
        self._pump.start()

    def _pump_output(self, proc: subprocess.Popen[bytes], log: Any,
                     ready: re.Pattern[str] | None) -> None:
        assert proc.stdout is not None
        try:
            for raw in iter(proc.stdout.readline, b""):
                log.write(raw)
                log.flush()
                if ready is not None and self._match is None:
                    match = ready.search(raw.decode(errors="replace"))
                    if match:
                        self._match = match
                        self._signal.set()
        finally:
            log.close()
            proc.stdout.close()
            self._signal.set()

    def _wait_ready_line(self, timeout: float) -> re.Match[str]:
        """Wait for the readiness line; raise ServerStartError if the process exits first."""
        if not self._signal.wait(timeout):
            self.stop()
            raise ServerStartError(f"{self.name} not ready after {timeout} s\n{self.log_tail()}")
        if self._match is None:
            self.stop()
            raise ServerStartError(f"{self.name} exited before it was ready\n{self.log_tail()}")
        return self._match

    @property
    def pid(self) -> int | None:
        """Process id of the main server process."""
        return None if self.proc is None else self.proc.pid

    @property
    def is_running(self) -> bool:
        """True while the main server process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Terminate the server and its forked children; SIGKILL whatever outlives ``timeout``."""
        proc = self.proc
        if proc is None:
            return
        children = _descendants(proc.pid)
        if proc.poll() is None:
            proc.terminate()
        for pid, start in children:
            _signal_if_same(pid, start, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        for pid, start in children:
            _signal_if_same(pid, start, signal.SIGKILL)
        self._join_pump(timeout)

    def kill(self) -> None:
        """SIGKILL the server and all its children at once (simulates a crash)."""
        proc = self.proc
        if proc is None:
            return
        children = _descendants(proc.pid)
        if proc.poll() is None:
            proc.kill()
        for pid, start in children:
            _signal_if_same(pid, start, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT)
        self._join_pump(STOP_TIMEOUT)

    def _join_pump(self, timeout: float) -> None:
        if self._pump is not None:
            self._pump.join(timeout)

    # -- logs --------------------------------------------------------------------------------

    @property
    def log_paths(self) -> list[Path]:
        """All log files of this server."""
        return [self.log_path]

    def log_text(self) -> str:
        """Whole content of the log file(s)."""
        parts = []
        for path in self.log_paths:
            with contextlib.suppress(FileNotFoundError):
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def log_tail(self, chars: int = _TAIL_CHARS) -> str:
        """The last ``chars`` characters of the log (for error messages)."""
        text = self.log_text()
        return text if len(text) <= chars else "...\n" + text[-chars:]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<{type(self).__name__} {self.name} {self.host}:{self.port} {state}>"


# --------------------------------------------------------------------------------------------
# OpenSSH


@dataclass(frozen=True)
class SSHKeys:
    """A throwaway host key and client key pair (ed25519, no passphrase)."""

    client_key: Path
    host_key: Path

    @property
    def client_pub(self) -> Path:
        """The client public key (used as AuthorizedKeysFile)."""
        return self.client_key.with_name(self.client_key.name + ".pub")

    @property
    def host_pub(self) -> Path:
        """The host public key."""
        return self.host_key.with_name(self.host_key.name + ".pub")


def make_ssh_keys(directory: str | os.PathLike[str]) -> SSHKeys:
    """Generate a host key and a client key pair in ``directory`` with ssh-keygen."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keys = SSHKeys(client_key=directory / "id_ed25519", host_key=directory / "ssh_host_ed25519")
    procs = []
    for path, comment in ((keys.client_key, "trollmoves-test-client"),
                          (keys.host_key, "trollmoves-test-host")):
        path.unlink(missing_ok=True)
        procs.append(subprocess.Popen(
            [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for proc in procs:
        out, _ = proc.communicate(timeout=START_TIMEOUT)
        if proc.returncode:
            raise ServerStartError(f"ssh-keygen failed: {out.decode(errors='replace')}")
    return keys


def current_user() -> str:
    """Name of the user the tests (and the sshd) run as."""
    return pwd.getpwuid(os.geteuid()).pw_name


class SSHServer(ManagedServer):
    """A running OpenSSH sshd on 127.0.0.1 accepting ``user`` with ``key_filename``."""

    def __init__(self, directory: str | os.PathLike[str], keys: SSHKeys,
                 sftp_server: str = SFTP_SERVER) -> None:
        super().__init__("sshd", directory)
        self.keys = keys
        self.user = current_user()
        self.sftp_server = sftp_server
        self.config_path = self.directory / "sshd_config"
        self.known_hosts = self.directory / "known_hosts"

    @property
    def key_filename(self) -> str:
        """Path of the client private key."""
        return str(self.keys.client_key)

    def url(self, path: str | os.PathLike[str]) -> str:
        """``sftp://user@127.0.0.1:port/abs/path`` for a local path (made absolute)."""
        abspath = os.path.abspath(os.fspath(path))
        return f"sftp://{self.user}@{self.host}:{self.port}{quote(abspath)}"

    def ssh_opts(self, tool: str = "sftp") -> list[str]:
        """OpenSSH client options to reach this server non-interactively.

        ``tool`` is ``"sftp"``/``"scp"`` (port given with ``-P``) or ``"ssh"`` (``-p``).
        The user and host are not included: add ``f"{server.user}@{server.host}"``.
        """
        port_flag = "-p" if tool == "ssh" else "-P"
        return ["-i", self.key_filename, port_flag, str(self.port),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR"]

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``paramiko.SSHClient.connect``."""
        return {"hostname": self.host, "port": self.port, "username": self.user,
                "key_filename": self.key_filename, "look_for_keys": False,
                "allow_agent": False, "timeout": 10}

    def asyncssh_options(self) -> dict[str, Any]:
        """Keyword arguments for ``asyncssh.connect`` and ``sshfs.SSHFileSystem``."""
        return {"host": self.host, "port": self.port, "username": self.user,
                "client_keys": [self.key_filename], "known_hosts": None}

    def _write_config(self) -> None:
        for path in (self.keys.host_key, self.keys.client_pub, self.directory):
            if re.search(r"\s", str(path)):
                raise ValueError(f"sshd config paths may not contain whitespace: {path}")
        lines = [
            f"Port {self.port}",
            f"ListenAddress {self.host}",
            f"HostKey {self.keys.host_key}",
            f"AuthorizedKeysFile {self.keys.client_pub}",
            "PidFile none",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "HostbasedAuthentication no",
            "StrictModes no",
            "UsePAM no",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "AllowAgentForwarding no",
            "MaxStartups 200",
            "MaxSessions 200",
            "MaxAuthTries 20",
            "LoginGraceTime 30",
            "LogLevel INFO",
            f"Subsystem sftp {self.sftp_server}",
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _start(self, port: int, timeout: float) -> None:
        self.port = port
        self._write_config()
        self._spawn([SSHD, "-D", "-e", "-f", str(self.config_path)],
                    ready=re.compile(r"Server listening on \S+ port (\d+)"))
        self._wait_ready_line(timeout)
        host_pub = self.keys.host_pub.read_text().split()
        entry = f"[{self.host}]:{self.port} {host_pub[0]} {host_pub[1]}\n"
        self.known_hosts.write_text(entry)
        trust_host_key(entry)


TEST_HOME_VAR = "TROLLMOVES_TEST_HOME"


def trust_host_key(entry: str) -> None:
    """Add a known_hosts line to ``~/.ssh/known_hosts`` when HOME is a throwaway test home.

    SSH clients (ours, trollmoves 0.19's paramiko, OpenSSH) then verify the test servers'
    host key as they would in production; a real home directory is never written.
    """
    home = os.environ.get("HOME", "")
    if not home or os.environ.get(TEST_HOME_VAR) != home:
        return
    path = Path(home) / ".ssh" / "known_hosts"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(entry)


@contextlib.contextmanager
def isolated_home(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Point HOME at ``directory`` (with an empty ``.ssh``) for the duration; restore after."""
    home = Path(directory)
    (home / ".ssh").mkdir(mode=0o700, parents=True, exist_ok=True)
    saved = {name: os.environ.get(name) for name in ("HOME", TEST_HOME_VAR, "PYENV_ROOT")}
    os.environ.setdefault("PYENV_ROOT", os.path.expanduser("~/.pyenv"))  # pyenv shims need it
    os.environ["HOME"] = os.environ[TEST_HOME_VAR] = str(home)
    try:
        yield home
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _ensure_privsep_dir() -> None:
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)


def start_sshd(directory: str | os.PathLike[str], *, keys: SSHKeys | None = None,
               port: int | None = None, sftp_server: str = SFTP_SERVER,
               timeout: float = START_TIMEOUT) -> SSHServer:
    """Start ``sshd -D -e`` on 127.0.0.1 with its config and log in ``directory``.

    ``keys`` defaults to a new pair generated in ``directory``. ``port=None`` picks a free port
    (retrying on a bind race); give the port of a stopped server to restart on the same port.
    """
    if not os.path.exists(SSHD):
        raise ServerUnavailable(f"{SSHD} is not installed")
    directory = Path(directory)
    if keys is None:
        keys = make_ssh_keys(directory / "keys")
    _ensure_privsep_dir()
    server = SSHServer(directory, keys, sftp_server=sftp_server)
    attempts = 1 if port is not None else 5
    for attempt in range(attempts):
        try:
            server._start(port if port is not None else free_port(), timeout)
            return server
        except ServerStartError:
            if attempt == attempts - 1 or "Address already in use" not in server.log_text():
                raise
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# FTP


class FTPServer(ManagedServer):
    """A running FTP server on 127.0.0.1 with one read-write user whose home is ``root``."""

    def __init__(self, name: str, directory: str | os.PathLike[str], root: Path, user: str,
                 password: str) -> None:
        super().__init__(name, directory)
        self.root = root
        self.user = user
        self.password = password

    def url(self, relpath: str = "", with_password: bool = False) -> str:
        """``ftp://user@127.0.0.1:port/relpath`` (``relpath`` is relative to the FTP root)."""
        cred = quote(self.user, safe="")
        if with_password:
            cred += ":" + quote(self.password, safe="")
        return f"ftp://{cred}@{self.host}:{self.port}/{quote(str(relpath).lstrip('/'))}"

    def path(self, relpath: str = "") -> Path:
        """Local path of ``relpath`` inside the FTP root."""
        return self.root / str(relpath).lstrip("/")


_FTPD_SCRIPT = Path(__file__).with_name("_ftpd.py")


def start_ftpd(directory: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None,
               user: str = FTP_USER, password: str = FTP_PASSWORD, port: int = 0,
               buffer_size: int = 1024 * 1024, timeout: float = START_TIMEOUT) -> FTPServer:
    """Start a pyftpdlib server process on 127.0.0.1 (``port=0``: a free port).

    ``root`` (default ``directory/root``) is the user's home; anonymous login is refused.
    Failed logins are answered without pyftpdlib's usual 3 s delay.
    """
    directory = Path(directory)
    root_path = Path(root) if root is not None else directory / "root"
    root_path.mkdir(parents=True, exist_ok=True)
    server = FTPServer("ftpd", directory, root_path.resolve(), user, password)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server._spawn([sys.executable, str(_FTPD_SCRIPT), "--host", server.host,
                   "--port", str(port), "--root", str(server.root), "--user", user,
                   "--password", password, "--buffer-size", str(buffer_size)],
                  ready=re.compile(r"^READY (\d+)"), env=env)
    server.port = int(server._wait_ready_line(timeout).group(1))
    return server


class VsftpdServer(FTPServer):
    """A running vsftpd (logs: process output plus ``vsftpd.log`` with the protocol)."""

    @property
    def log_paths(self) -> list[Path]:
        """The process output and vsftpd's own log."""
        return [self.log_path, self.directory / "vsftpd-protocol.log"]

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop vsftpd and remove its FTP root (it lives outside the test tmp dir)."""
        super().stop(timeout)
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    _owns_root = False


def _ensure_system_user(user: str, password: str) -> None:
    """Create (or fix) local user ``user`` with ``password``; vsftpd needs its home to exist."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--home-dir", "/", "--shell", "/bin/sh",
                        "--comment", "trollmoves vsftpd test user", user],
                       check=True, capture_output=True)
    else:
        if not os.path.isdir(entry.pw_dir):
            subprocess.run(["usermod", "--home", "/", user], check=True, capture_output=True)
    subprocess.run(["chpasswd"], input=f"{user}:{password}\n".encode(), check=True,
                   capture_output=True)


def start_vsftpd(directory: str | os.PathLike[str], *, user: str = VSFTPD_USER,
                 password: str = FTP_PASSWORD, port: int | None = None,
                 timeout: float = START_TIMEOUT) -> VsftpdServer:
    """Start vsftpd on 127.0.0.1 with a local system user (created if needed; root only).

    The FTP root is a fresh world-readable directory in the system temp dir owned by ``user``
    (the pytest tmp dirs are not traversable by other users); it is removed by ``stop()``.
    Raises ``ServerUnavailable`` if vsftpd is missing or the tests do not run as root.
    """
    if not os.path.exists(VSFTPD):
        raise ServerUnavailable(f"{VSFTPD} is not installed")
    if os.geteuid() != 0 or not shutil.which("useradd"):
        raise ServerUnavailable("vsftpd needs root to create its local test user")
    _ensure_system_user(user, password)
    entry = pwd.getpwnam(user)
    os.makedirs("/var/run/vsftpd/empty", mode=0o755, exist_ok=True)
    directory = Path(directory)
    root = Path(tempfile.mkdtemp(prefix="trollmoves-vsftpd-"))
    os.chmod(root, 0o755)
    os.chown(root, entry.pw_uid, entry.pw_gid)
    server = VsftpdServer("vsftpd", directory, root, user, password)
    server._owns_root = True
    attempts = 1 if port is not None else 5
    for attempt in range(attempts):
        server.port = port if port is not None else free_port()
        config = directory / "vsftpd.conf"
        config.write_text("\n".join([
            "listen=YES", "listen_ipv6=NO", f"listen_address={server.host}",
            f"listen_port={server.port}", "background=NO", "anonymous_enable=NO",
            "local_enable=YES", "write_enable=YES", "local_umask=022", f"local_root={root}",
            "chroot_local_user=NO", "pam_service_name=vsftpd", "userlist_enable=NO",
            "seccomp_sandbox=NO", "secure_chroot_dir=/var/run/vsftpd/empty",
            "pasv_enable=YES", f"pasv_address={server.host}", "connect_from_port_20=NO",
            "max_clients=0", "max_per_ip=0", "delay_failed_login=0",
            "delay_successful_login=0", "syslog_enable=NO", "xferlog_enable=YES",
            "log_ftp_protocol=YES", "xferlog_std_format=NO",
            f"vsftpd_log_file={directory / 'vsftpd-protocol.log'}",
            "ftpd_banner=trollmoves test vsftpd ready.", "",
        ]))
        server._spawn([VSFTPD, str(config)])
        assert server.proc is not None
        try:
            wait_for_port(server.host, server.port, server.proc, timeout)
            return server
        except ServerStartError as err:
            ManagedServer.stop(server)  # keeps the FTP root for the next attempt
            if attempt == attempts - 1:
                server.stop()
                raise ServerStartError(f"vsftpd exited: {err}\n{server.log_tail()}") from err
        except TimeoutError as err:
            server.stop()
            raise ServerStartError(f"vsftpd not ready: {err}\n{server.log_tail()}") from err
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# S3 (moto)


def aws_test_env() -> dict[str, str]:
    """Environment variables that point AWS SDKs at fake credentials and no real config."""
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), HOST, "localhost"]))
    return {
        "AWS_ACCESS_KEY_ID": AWS_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": AWS_REGION,
        "AWS_REGION": AWS_REGION,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


AWS_UNSET_VARS = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                  "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN",
                  "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                  "AWS_CONTAINER_CREDENTIALS_FULL_URI")
"""AWS variables to remove from the environment of tests."""


class S3Server(ManagedServer):
    """A running moto S3 server (separate process) at ``endpoint_url``."""

    region = AWS_REGION
    access_key = AWS_ACCESS_KEY_ID
    secret_key = AWS_SECRET_ACCESS_KEY

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        super().__init__("moto", directory)

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:port``."""
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses: fake credentials, region and ``AWS_ENDPOINT_URL_S3``."""
        return dict(aws_test_env(), AWS_ENDPOINT_URL_S3=self.endpoint_url)

    def client(self, **kwargs: Any) -> Any:
        """A boto3 S3 client for this server (explicit credentials, independent of env)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, **kwargs)

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options: ``s3fs.S3FileSystem(**server.storage_options())``."""
        return {"key": self.access_key, "secret": self.secret_key,
                "endpoint_url": self.endpoint_url,
                "client_kwargs": {"region_name": self.region}}

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (default: a unique ``test-<hex>`` name) and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete all objects (and versions) in the bucket and the bucket itself."""
        client = self.client()
        paginator = client.get_paginator("list_object_versions")
        for page in paginator.paginate(Bucket=name):
            objects = [{"Key": o["Key"], "VersionId": o["VersionId"]}
                       for o in page.get("Versions", []) + page.get("DeleteMarkers", [])]
            if objects:
                client.delete_objects(Bucket=name, Delete={"Objects": objects, "Quiet": True})
        client.delete_bucket(Bucket=name)

    def reset(self) -> None:
        """Forget all state in the moto server (all buckets of all tests!)."""
        request = urllib.request.Request(self.endpoint_url + "/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def url(self, bucket: str, key: str = "") -> str:
        """``s3://bucket/key``."""
        return f"s3://{bucket}/{key.lstrip('/')}"


def _http_ok(url: str, timeout: float) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        response.read()


def start_moto(directory: str | os.PathLike[str], *, port: int | None = None,
               timeout: float = START_TIMEOUT) -> S3Server:
    """Start ``python -m moto.server`` on 127.0.0.1 (``port=None``: a free port).

    Ready once werkzeug prints its "Running on" line and an HTTP GET on / answers.
    """
    server = S3Server(directory)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **aws_test_env())
    attempts = 1 if port is not None else 5
    for attempt in range(attempts):
        server.port = port if port is not None else free_port()
        server._spawn([sys.executable, "-m", "moto.server", "-H", server.host,
                       "-p", str(server.port)],
                      ready=re.compile(r"Running on http://"), env=env)
        try:
            server._wait_ready_line(timeout)
            break
        except ServerStartError:
            if attempt == attempts - 1 or "Address already in use" not in server.log_text():
                raise
    try:
        _http_ok(server.endpoint_url + "/", timeout)
    except OSError as err:
        server.stop()
        raise ServerStartError(f"moto does not answer HTTP: {err}\n{server.log_tail()}") from err
    return server
