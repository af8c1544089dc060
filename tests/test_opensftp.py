"""Small-file SFTP uploads through the OpenSSH client, against a real sshd on loopback."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fsspec.callbacks import Callback

import trollmoves
from trollmoves import errors, opensftp
from trollmoves.filesystems import POOL
from trollmoves.movers import move_it
from trollmoves.transfer import RetryPolicy


def _processes() -> dict[int, tuple[int, list[bytes]]]:
    """Every process: its parent's id and its command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                found[int(entry)] = (parent, handle.read().split(b"\0"))
        except OSError:
            continue
    return found


def _ssh_children() -> list[int]:
    """Process ids of the OpenSSH clients this test process started and has not reaped."""
    me = os.getpid()
    return [pid for pid, (parent, argv) in _processes().items()
            if parent == me and os.path.basename(argv[0]) == b"ssh"]


@pytest.fixture(autouse=True)
def fresh_pool() -> Any:
    POOL.close_all()
    yield
    POOL.close_all()


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    src = tmp_path / "src"
    src.mkdir()
    made = []
    for index, size in enumerate([0, 1, 65_536, 300_000, 1_500_000]):
        path = src / f"f{index}.bin"
        path.write_bytes(os.urandom(size))
        made.append(path)
    return made


def _fake_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    """Put an ``ssh`` running ``script`` first on PATH."""
    fake = tmp_path / "bin" / "ssh"
    fake.parent.mkdir()
    fake.write_text(script)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")


def _key(server: Any) -> dict[str, Any]:
    return {"ssh_private_key_file": server.key_filename}


def test_small_files_go_through_the_openssh_client(sshd_server: Any, files: list[Path],
                                                   tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out" / "deep"  # missing directories are created on the way
    caplog.set_level(logging.DEBUG, logger="trollmoves.opensftp")
    for path in files:
        final = move_it(str(path), sshd_server.url(out) + "/", attrs=_key(sshd_server))
        assert final.endswith(path.name)
        assert (out / path.name).read_bytes() == path.read_bytes()
    assert "Started an OpenSSH sftp session" in caplog.text
    assert "staying with asyncssh" not in caplog.text
    assert len(_ssh_children()) == 1  # one session, reused for every file
    # files keep coming here: the next one is opened ahead, hidden, until the session ends
    [ahead] = [p for p in out.iterdir() if p.name not in {f.name for f in files}]
    assert ahead.name.startswith(".trollmoves-") and ahead.name.endswith(".part")
    POOL.close_all()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in files)


def test_the_file_opened_ahead_is_removed_when_the_program_ends(sshd_server: Any,
                                                                files: list[Path],
                                                                tmp_path: Path) -> None:
    out = tmp_path / "exit"
    script = (
        "import sys, trollmoves\n"
        "for path in sys.argv[3:]:\n"
        "    trollmoves.copy(path, sys.argv[1], ssh_key_filename=sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", script, sshd_server.url(out) + "/",
                    sshd_server.key_filename, *map(str, files)], check=True, timeout=60)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in files)


def test_sessions_close_with_the_pooled_connection(sshd_server: Any, files: list[Path],
                                                   tmp_path: Path) -> None:
    trollmoves.copy(files[2], sshd_server.url(tmp_path / "a"), **_key(sshd_server))
    assert _ssh_children()
    POOL.close_all()
    assert _ssh_children() == []


def test_parallel_uploads_share_a_bounded_set_of_sessions(sshd_server: Any, files: list[Path],
                                                          tmp_path: Path) -> None:
    out = tmp_path / "par"
    sizes = {}
    jobs = []
    for index in range(40):
        src = files[index % len(files)]
        name = f"p{index:02d}.bin"
        sizes[name] = src.read_bytes()
        jobs.append((src, sshd_server.url(out / name)))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda job: trollmoves.copy(*job, **_key(sshd_server)), jobs))
    assert 1 <= len(_ssh_children()) <= opensftp.MAX_SESSIONS
    POOL.close_all()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == sizes


def test_refused_write_is_a_permission_error_and_leaves_nothing(sshd_factory: Any,
                                                                files: list[Path],
                                                                tmp_path: Path) -> None:
    server = sshd_factory(sftp_server="/usr/lib/openssh/sftp-server -R")
    (tmp_path / "ro").mkdir()
    with pytest.raises(errors.AccessDeniedError):
        trollmoves.copy(files[3], server.url(tmp_path / "ro" / "x"), **_key(server))
    assert list((tmp_path / "ro").iterdir()) == []


def test_a_killed_client_is_retried_on_a_new_session(sshd_server: Any, files: list[Path],
                                                     tmp_path: Path) -> None:
    out = tmp_path / "k"
    trollmoves.copy(files[3], sshd_server.url(out / "first"), **_key(sshd_server))
    [pid] = _ssh_children()
    os.kill(pid, signal.SIGKILL)
    trollmoves.copy(files[4], sshd_server.url(out / "second"), **_key(sshd_server),
                    retry=RetryPolicy(attempts=2, backoff=0.05, budget=10))
    assert (out / "second").read_bytes() == files[4].read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["first", "second"]


def test_without_an_openssh_client_asyncssh_does_the_work(sshd_server: Any, files: list[Path],
                                                          tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    trollmoves.copy(files[3], sshd_server.url(tmp_path / "n" / "x"), **_key(sshd_server))
    assert (tmp_path / "n" / "x").read_bytes() == files[3].read_bytes()
    assert _ssh_children() == []


def test_a_client_that_cannot_log_in_falls_back_to_asyncssh(sshd_server: Any, files: list[Path],
                                                            tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    _fake_ssh(tmp_path, monkeypatch,
              "#!/bin/sh\necho 'Permission denied (publickey).' >&2\nexit 255\n")
    caplog.set_level(logging.DEBUG, logger="trollmoves.opensftp")
    for index in range(3):
        trollmoves.copy(files[2], sshd_server.url(tmp_path / "f" / f"x{index}"),
                        **_key(sshd_server))
    assert len(list((tmp_path / "f").iterdir())) == 3
    assert caplog.text.count("staying with asyncssh") == 1  # tried once per connection
    assert "Permission denied (publickey)" in caplog.text


def test_options_the_openssh_client_cannot_honour_keep_asyncssh() -> None:
    base = {"_host": "127.0.0.1", "port": 2222, "username": "troll",
            "client_keys": ["~/.ssh/k"], "known_hosts": None}
    argv = opensftp.ssh_argv(base)
    assert argv is not None
    assert argv[-4:] == ["-s", "--", "127.0.0.1", "sftp"]
    assert argv[argv.index("-p"):argv.index("-p") + 2] == ["-p", "2222"]
    assert "StrictHostKeyChecking=no" in argv and "IdentitiesOnly=yes" in argv
    strict = opensftp.ssh_argv({**base, "known_hosts": "/etc/kh"})
    assert strict is not None and "UserKnownHostsFile=/etc/kh" in strict
    assert "StrictHostKeyChecking=yes" in strict
    for extra in ({"password": "secret"}, {"passphrase": "x"}, {"known_hosts": ()},
                  {"encryption_algs": ["aes256-ctr"]}, {"client_keys": [object()]},
                  {"proxy_command": "nc %h %p"}):
        assert opensftp.ssh_argv({**base, **extra}) is None, extra


class _Progress(Callback):
    def __init__(self) -> None:
        super().__init__()
        self.updates: list[int] = []

    def call(self, *args: Any, **kwargs: Any) -> None:
        self.updates.append(self.value)


def test_large_file_streams_through_the_client_with_progress(sshd_server: Any, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(40 * 1024 * 1024 + 123))
    progress = _Progress()
    caplog.set_level(logging.DEBUG, logger="trollmoves.opensftp")
    trollmoves.copy(big, sshd_server.url(tmp_path / "out") + "/", callback=progress,
                    **_key(sshd_server))
    assert (tmp_path / "out" / "big.bin").read_bytes() == big.read_bytes()
    assert "Started an OpenSSH sftp session" in caplog.text
    assert progress.size == big.stat().st_size
    assert progress.updates == sorted(progress.updates) and len(progress.updates) > 10
    assert progress.updates[-1] == big.stat().st_size


def test_changing_directories_and_a_vanished_directory_leave_nothing_behind(
        sshd_server: Any, files: list[Path], tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for index in range(6):  # two files to one, two to two, and so on
        target = one if index // 2 % 2 == 0 else two
        trollmoves.copy(files[3], sshd_server.url(target / f"f{index}"), **_key(sshd_server))
    assert sorted(p.name for p in one.iterdir() if not p.name.startswith(".")) == [
        "f0", "f1", "f4", "f5"]
    shutil.rmtree(one)  # with the file opened ahead in it
    trollmoves.copy(files[2], sshd_server.url(one / "again"), **_key(sshd_server))
    POOL.close_all()
    assert sorted(p.name for p in one.iterdir()) == ["again"]
    assert sorted(p.name for p in two.iterdir()) == ["f2", "f3"]
    assert (one / "again").read_bytes() == files[2].read_bytes()


def test_a_login_shell_that_prints_text_is_detected_and_asyncssh_takes_over(
        sshd_server: Any, files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    _fake_ssh(tmp_path, monkeypatch,
              "#!/bin/sh\necho 'Welcome to the ground station'\nexec cat >/dev/null\n")
    caplog.set_level(logging.DEBUG, logger="trollmoves.opensftp")
    trollmoves.copy(files[2], sshd_server.url(tmp_path / "w" / "x"), **_key(sshd_server))
    assert (tmp_path / "w" / "x").read_bytes() == files[2].read_bytes()
    assert "does the login shell print something" in caplog.text


def test_a_refused_rename_of_a_file_opened_ahead_leaves_no_copy(sshd_server: Any,
                                                                files: list[Path],
                                                                tmp_path: Path) -> None:
    out = tmp_path / "r"
    for name in ("a", "b"):  # the second rename opens a file ahead
        trollmoves.copy(files[2], sshd_server.url(out / name), **_key(sshd_server))
    (out / "taken").mkdir()
    (out / "taken" / "inside").write_text("a non-empty directory cannot be renamed over")
    with pytest.raises(errors.TransferError):
        trollmoves.copy(files[3], sshd_server.url(out / "taken"), **_key(sshd_server),
                        retry=RetryPolicy(attempts=1))
    POOL.close_all()
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "taken"]


def _sftp_servers(sshd_pid: int) -> list[int]:
    """Process ids of the sftp-server processes below the sshd ``sshd_pid``."""
    processes = _processes()

    def below_sshd(pid: int) -> bool:
        while pid > 1:
            pid = processes.get(pid, (0, []))[0]
            if pid == sshd_pid:
                return True
        return False

    return [pid for pid, (_, argv) in processes.items()
            if os.path.basename(argv[0]) == b"sftp-server" and below_sshd(pid)]


def test_a_hung_sftp_server_is_given_up_and_a_new_session_delivers(
        sshd_factory: Any, files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A server that stops answering while its connection lives (a stuck NFS mount)."""
    server = sshd_factory()
    monkeypatch.setattr(opensftp, "REPLY_TIMEOUT", 1.0)
    out = tmp_path / "out"
    trollmoves.copy(files[3], server.url(out / "first"), **_key(server))  # a session is up
    assert server.proc is not None
    stuck = _sftp_servers(server.proc.pid)  # asyncssh's and the OpenSSH client's
    assert len(stuck) == 2
    for pid in stuck:
        os.kill(pid, signal.SIGSTOP)
    try:
        with caplog.at_level(logging.WARNING, logger="trollmoves.transfer"):
            trollmoves.copy(files[3], server.url(out / "second"), **_key(server))
        assert _ssh_children() != []  # the new session
        POOL.close_all()
        assert _ssh_children() == []  # and the one given up: killed, not waited for
    finally:
        for pid in stuck:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert (out / "second").read_bytes() == files[3].read_bytes()
    assert ("(attempt 1): ConnectionFailedError: connection failed: no reply from the SFTP "
            "server for 1 s") in caplog.text
    # the stuck server opens the first attempt's temporary file once it runs again: hidden
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "first", "second"]


# an SFTP server that answers the greeting and the open, then reads nothing more
_DEAF_SERVER = textwrap.dedent("""
    import os, struct, sys, time
    def packet():
        head = os.read(0, 5)
        length, kind = struct.unpack(">IB", head)
        body = b""
        while len(body) < length - 1:
            body += os.read(0, length - 1 - len(body))
        return kind, body
    def send(kind, body):
        os.write(1, struct.pack(">IB", len(body) + 1, kind) + body)
    def string(value):
        return struct.pack(">I", len(value)) + value
    packet()
    send(2, struct.pack(">I", 3) + string(b"posix-rename@openssh.com") + string(b"1"))
    kind, body = packet()
    send(102, body[:4] + string(b"handle"))
    time.sleep(3600)
""")


def test_a_server_that_takes_no_more_data_is_given_up(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(opensftp, "REPLY_TIMEOUT", 0.5)
    # this server's writes are 32 KiB: 2 MiB in flight are more than the 1 MiB pipe holds
    monkeypatch.setattr(opensftp, "WINDOW", 64)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(8 * 1024 * 1024))
    session = opensftp.Session([sys.executable, "-c", _DEAF_SERVER])
    with pytest.raises(errors.ConnectionFailedError, match=r"took no data for 0\.5 s"):
        session.upload(str(big), "/x/.big.part", "/x/big")
    assert session.hung
    session.close()  # at once: the process is killed
    assert session._proc.returncode == -signal.SIGKILL


class _KillClients(Callback):
    """Kills the OpenSSH clients at the first progress report."""

    def call(self, *args: Any, **kwargs: Any) -> None:
        if self.value and not getattr(self, "done", False):
            self.done = True
            for pid in _ssh_children():
                os.kill(pid, signal.SIGKILL)


def test_a_temporary_file_a_lost_connection_left_is_removed_by_the_retry(
        sshd_server: Any, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(8 * 1024 * 1024))
    out = tmp_path / "lost"
    trollmoves.copy(big, sshd_server.url(out / "big"), callback=_KillClients(),
                    retry=RetryPolicy(attempts=2, backoff=0.05, budget=30), **_key(sshd_server))
    assert (out / "big").read_bytes() == big.read_bytes()
    POOL.close_all()
    assert [p.name for p in out.iterdir()] == ["big"]
