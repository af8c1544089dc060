"""Pytest fixtures starting real loopback servers (implementation in ``tests/servers.py``).

Session-scoped servers are shared by all tests: never stop or kill them in a test, use the
``*_factory`` fixtures for servers a test may kill. When a test fails, the log lines the servers
it used wrote during that test are added to the failure report.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest

from tests import servers
from tests.servers import FTPServer, ManagedServer, S3Server, SSHKeys, SSHServer

S = TypeVar("S", bound=ManagedServer)


class ServerFactory(Generic[S]):
    """Callable starting servers in fresh tmp dirs; all are stopped at the end of the test."""

    def __init__(self, start: Callable[..., S], tmp_path_factory: pytest.TempPathFactory,
                 name: str, **defaults: Any) -> None:
        self._start = start
        self._tmp = tmp_path_factory
        self._name = name
        self._defaults = defaults
        self.servers: list[S] = []

    def __call__(self, **kwargs: Any) -> S:
        """Start one server; ``kwargs`` go to the ``servers.start_*`` function."""
        server = self._start(self._tmp.mktemp(self._name), **{**self._defaults, **kwargs})
        self.servers.append(server)
        return server

    def stop_all(self) -> None:
        """Stop every server this factory started (also done automatically)."""
        for server in reversed(self.servers):
            server.stop()


def _start_or_skip(start: Callable[..., S], *args: Any, **kwargs: Any) -> S:
    try:
        return start(*args, **kwargs)
    except servers.ServerUnavailable as err:
        pytest.skip(str(err))


# ----------------------------------------------------------------------------------------- HOME


@pytest.fixture(scope="session", autouse=True)
def test_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A throwaway HOME for the whole session (subprocesses inherit it).

    Its ``.ssh/known_hosts`` receives the host key of every sshd the tests start, so SSH
    clients verify host keys as in production without touching the real home directory.
    """
    with servers.isolated_home(tmp_path_factory.mktemp("home")) as home:
        yield home


# ------------------------------------------------------------------------------------------ SSH


@pytest.fixture(scope="session")
def ssh_keys(tmp_path_factory: pytest.TempPathFactory) -> SSHKeys:
    """Throwaway host key and client key pair shared by all sshd fixtures."""
    return servers.make_ssh_keys(tmp_path_factory.mktemp("ssh-keys"))


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory, ssh_keys: SSHKeys) -> Iterator[SSHServer]:
    """Session-wide OpenSSH sshd on 127.0.0.1 (do not stop it in tests)."""
    server = _start_or_skip(servers.start_sshd, tmp_path_factory.mktemp("sshd"), keys=ssh_keys)
    yield server
    server.stop()


@pytest.fixture
def sshd_factory(tmp_path_factory: pytest.TempPathFactory,
                 ssh_keys: SSHKeys) -> Iterator[ServerFactory[SSHServer]]:
    """``sshd_factory(port=None, sftp_server=...)`` starts a private sshd (same keys as
    ``sshd_server``) that the test may ``stop()``/``kill()``; all are stopped at teardown."""
    factory = ServerFactory(lambda *a, **k: _start_or_skip(servers.start_sshd, *a, **k),
                            tmp_path_factory, "sshd", keys=ssh_keys)
    yield factory
    factory.stop_all()


# ------------------------------------------------------------------------------------------ FTP


@pytest.fixture(scope="session")
def ftp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FTPServer]:
    """Session-wide pyftpdlib server; user ``troll``/``s3cret-pw``, home ``ftp_server.root``."""
    server = servers.start_ftpd(tmp_path_factory.mktemp("ftpd"))
    yield server
    server.stop()


@pytest.fixture
def ftp_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory[FTPServer]]:
    """``ftp_factory(root=None, user=..., password=..., port=0)`` starts a private pyftpdlib
    server the test may ``stop()``/``kill()``; all are stopped at teardown."""
    factory = ServerFactory(servers.start_ftpd, tmp_path_factory, "ftpd")
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def vsftpd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FTPServer]:
    """Session-wide vsftpd with system user ``trollftp``/``s3cret-pw`` (skipped unless root)."""
    server = _start_or_skip(servers.start_vsftpd, tmp_path_factory.mktemp("vsftpd"))
    yield server
    server.stop()


# ------------------------------------------------------------------------------------------- S3


@pytest.fixture(scope="session")
def aws_env() -> Iterator[dict[str, str]]:
    """Fake AWS credentials/region in os.environ for the rest of the session; no ~/.aws."""
    with pytest.MonkeyPatch.context() as patch:
        for name in servers.AWS_UNSET_VARS:
            patch.delenv(name, raising=False)
        env = servers.aws_test_env()
        for name, value in env.items():
            patch.setenv(name, value)
        yield env


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory, aws_env: dict[str, str]
              ) -> Iterator[S3Server]:
    """Session-wide moto S3 server process at ``s3_server.endpoint_url``."""
    server = servers.start_moto(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """Name of a fresh, empty bucket in ``s3_server``; deleted after the test."""
    name = s3_server.create_bucket()
    yield name
    # best-effort cleanup (the test may have deleted the bucket itself)
    with contextlib.suppress(Exception):
        s3_server.delete_bucket(name)


# ------------------------------------------------------------------------ logs in failure report

NO_SKIP_VAR = "TROLLMOVES_NO_SKIP"
_log_offsets = pytest.StashKey[dict[Path, int]]()


def _servers_used(item: pytest.Item) -> list[ManagedServer]:
    found: dict[int, ManagedServer] = {}
    for value in getattr(item, "funcargs", {}).values():
        candidates = value.servers if isinstance(value, ServerFactory) else [value]
        for candidate in candidates:
            if isinstance(candidate, ManagedServer):
                found[id(candidate)] = candidate
    return list(found.values())


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[None]:
    """Attach the servers' log output written during a failed test to its report.

    With TROLLMOVES_NO_SKIP=1 (CI) a skipped test fails: a server or the reference peer that
    cannot start must not turn the integration tests into silent passes.
    """
    report = yield
    if report.skipped and os.environ.get(NO_SKIP_VAR) == "1" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, which {NO_SKIP_VAR}=1 forbids: {reason}"
    if call.when == "setup":
        item.stash[_log_offsets] = {path: _size(path) for server in _servers_used(item)
                                    for path in server.log_paths}
    elif report.failed:
        offsets = item.stash.get(_log_offsets, {})
        for server in _servers_used(item):
            for path in server.log_paths:
                try:
                    with open(path, "rb") as log:
                        log.seek(offsets.get(path, 0))
                        text = log.read().decode(errors="replace")
                except OSError:
                    continue
                if len(text) > 20_000:
                    text = "...\n" + text[-20_000:]
                report.sections.append((f"server log: {server.name} ({path})", text))
    return report
