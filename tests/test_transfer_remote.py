"""The copy engine against real servers on loopback: OpenSSH sshd, pyftpdlib and moto S3."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec.callbacks import Callback

import trollmoves
from trollmoves import errors
from trollmoves.filesystems import POOL
from trollmoves.transfer import RetryPolicy

FAST_RETRY = RetryPolicy(attempts=2, backoff=0.05, budget=10)


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "npp_202611211000.h5"
    path.parent.mkdir()
    path.write_bytes(os.urandom(300_000))
    return path


def _ssh(server: Any) -> dict[str, Any]:
    return {"ssh_key_filename": server.key_filename}


def _hidden_leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".part")]


# -- SFTP / SCP -----------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["sftp", "scp", "ssh"])
def test_ssh_upload_keeps_name_with_trailing_slash(sshd_server: Any, payload: Path,
                                                   tmp_path: Path, scheme: str) -> None:
    out = tmp_path / "remote" / scheme
    url = sshd_server.url(out).replace("sftp://", f"{scheme}://", 1) + "/"
    result = trollmoves.copy(payload, url, **_ssh(sshd_server))
    assert (out / payload.name).read_bytes() == payload.read_bytes()
    assert result.dst.endswith(f"/{scheme}/{payload.name}")
    assert _hidden_leftovers(out) == []


def test_ssh_download_and_rename(sshd_server: Any, payload: Path, tmp_path: Path) -> None:
    trollmoves.copy(sshd_server.url(payload), tmp_path / "dl" / "renamed.h5", **_ssh(sshd_server))
    assert (tmp_path / "dl" / "renamed.h5").read_bytes() == payload.read_bytes()


def test_ssh_move_removes_remote_source(sshd_server: Any, payload: Path, tmp_path: Path) -> None:
    data = payload.read_bytes()
    trollmoves.move(sshd_server.url(payload), f"{tmp_path}/moved/", **_ssh(sshd_server))
    assert (tmp_path / "moved" / payload.name).read_bytes() == data
    assert not payload.exists()


def test_ssh_overwrites_existing_target(sshd_server: Any, payload: Path, tmp_path: Path) -> None:
    target = tmp_path / "existing.h5"
    target.write_bytes(b"old content")
    trollmoves.copy(payload, sshd_server.url(target), checksum="sha256", **_ssh(sshd_server))
    assert target.read_bytes() == payload.read_bytes()


def test_ssh_connection_is_pooled_and_closed_when_idle(sshd_server: Any, payload: Path,
                                                       tmp_path: Path) -> None:
    POOL.close_all()
    options = {**_ssh(sshd_server), "connection_uptime": 0.3}
    for index in range(5):
        trollmoves.copy(payload, sshd_server.url(tmp_path / f"p{index}"), **options)
    assert len(POOL) == 1
    closed = threading.Event()

    def pool_empty() -> bool:
        return len(POOL) == 0

    deadline = 10.0
    while not pool_empty() and deadline > 0:
        closed.wait(0.05)
        deadline -= 0.05
    assert pool_empty()


def test_ssh_wrong_key_fails_at_once_with_auth_error(sshd_server: Any, payload: Path,
                                                     tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    with pytest.raises(errors.AuthenticationError):
        trollmoves.copy(payload, sshd_server.url(tmp_path / "x"), ssh_key_filename=str(other),
                        retry=RetryPolicy(attempts=3, backoff=30))
    assert not (tmp_path / "x").exists()


def test_ssh_backup_host_used_when_primary_refuses(sshd_server: Any, payload: Path,
                                                   tmp_path: Path) -> None:
    # sshd listens on 127.0.0.1 only: the same port on 127.0.0.2 refuses connections
    primary = (sshd_server.url(tmp_path / "b") + "/").replace("127.0.0.1", "127.0.0.2", 1)
    result = trollmoves.copy(payload, primary, backup_hosts=["127.0.0.1"], retry=FAST_RETRY,
                             **_ssh(sshd_server))
    assert "127.0.0.1" in result.dst
    assert (tmp_path / "b" / payload.name).read_bytes() == payload.read_bytes()


def test_ssh_unreachable_without_backup_is_a_clear_transient_error(
        sshd_server: Any, payload: Path, tmp_path: Path) -> None:
    url = sshd_server.url(tmp_path / "c").replace("127.0.0.1", "127.0.0.2", 1)
    with pytest.raises(errors.ConnectionFailedError, match="gave up after 2 attempt"):
        trollmoves.copy(payload, url, retry=FAST_RETRY, **_ssh(sshd_server))


def test_ssh_read_only_server_refuses_write(sshd_factory: Any, payload: Path,
                                            tmp_path: Path) -> None:
    server = sshd_factory(sftp_server="/usr/lib/openssh/sftp-server -R")
    (tmp_path / "ro").mkdir()
    with pytest.raises(errors.AccessDeniedError):
        trollmoves.copy(payload, server.url(tmp_path / "ro" / "x"), **_ssh(server))
    assert list((tmp_path / "ro").iterdir()) == []


class _KillAt(Callback):
    """Kill a server once a transfer has passed a given number of bytes."""

    def __init__(self, server: Any, at: int) -> None:
        super().__init__()
        self.server, self.at, self.killed = server, at, False

    def call(self, *args: Any, **kwargs: Any) -> None:
        if not self.killed and self.value >= self.at:
            self.killed = True
            self.server.kill()


def test_ssh_server_killed_mid_transfer_leaves_no_visible_file(sshd_factory: Any,
                                                               tmp_path: Path) -> None:
    server = sshd_factory()
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(64 * 1024 * 1024))
    out = tmp_path / "killed"
    out.mkdir()
    killer = _KillAt(server, 8 * 1024 * 1024)
    with pytest.raises(errors.ConnectionFailedError) as info:
        trollmoves.copy(big, server.url(out) + "/", callback=killer, retry=FAST_RETRY,
                        **_ssh(server))
    assert killer.killed
    assert not (out / "big.bin").exists()
    assert [p for p in out.iterdir() if not p.name.startswith(".")] == []
    assert "big.bin" in str(info.value)


# -- FTP --------------------------------------------------------------------------------------

def test_ftp_upload_with_password_and_nested_dirs(ftp_server: Any, payload: Path) -> None:
    url = ftp_server.url("in/deep/", with_password=True)
    result = trollmoves.copy(payload, url)
    assert ftp_server.path(f"in/deep/{payload.name}").read_bytes() == payload.read_bytes()
    assert ftp_server.password not in result.dst
    assert _hidden_leftovers(ftp_server.path("in/deep")) == []


def test_ftp_download(ftp_server: Any, payload: Path, tmp_path: Path) -> None:
    ftp_server.path("dl").mkdir(exist_ok=True)
    ftp_server.path("dl/f.bin").write_bytes(payload.read_bytes())
    trollmoves.copy(ftp_server.url("dl/f.bin", with_password=True), f"{tmp_path}/got/")
    assert (tmp_path / "got" / "f.bin").read_bytes() == payload.read_bytes()


def test_ftp_credentials_from_netrc(ftp_server: Any, payload: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    netrc = home / ".netrc"
    netrc.write_text(f"machine {ftp_server.host} login {ftp_server.user} "
                     f"password {ftp_server.password}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    url = f"ftp://{ftp_server.host}:{ftp_server.port}/netrc/"
    trollmoves.copy(payload, url)
    assert ftp_server.path(f"netrc/{payload.name}").read_bytes() == payload.read_bytes()


def test_an_edited_netrc_is_read_again(ftp_server: Any, payload: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    netrc = home / ".netrc"
    monkeypatch.setenv("HOME", str(home))
    url = f"ftp://{ftp_server.host}:{ftp_server.port}/rotated/"
    wrong = "x" * (len(ftp_server.password) + 7)  # another size: the edit shows in a stat
    netrc.write_text(f"machine {ftp_server.host} login {ftp_server.user} password {wrong}\n")
    netrc.chmod(0o600)
    with pytest.raises(errors.AuthenticationError):
        trollmoves.copy(payload, url, retry=FAST_RETRY)
    netrc.write_text(f"machine {ftp_server.host} login {ftp_server.user} "
                     f"password {ftp_server.password}\n")  # the password was rotated
    trollmoves.copy(payload, url, retry=FAST_RETRY)
    assert ftp_server.path(f"rotated/{payload.name}").read_bytes() == payload.read_bytes()


def test_ftp_wrong_password_is_an_auth_error_without_the_password(ftp_server: Any,
                                                                  payload: Path) -> None:
    url = f"ftp://{ftp_server.user}:wrong-Secret-1@{ftp_server.host}:{ftp_server.port}/x/"
    with pytest.raises(errors.AuthenticationError) as info:
        trollmoves.copy(payload, url)
    assert "wrong-Secret-1" not in str(info.value)
    assert "***" in str(info.value)


def test_ftp_server_down_is_a_connection_error(ftp_factory: Any, payload: Path) -> None:
    server = ftp_factory()
    url = server.url("x/", with_password=True)
    server.stop()
    with pytest.raises(errors.ConnectionFailedError) as info:
        trollmoves.copy(payload, url, retry=FAST_RETRY)
    assert server.password not in str(info.value)


# -- S3 ---------------------------------------------------------------------------------------

def _s3(server: Any) -> dict[str, Any]:
    return server.storage_options()


def test_s3_trailing_slash_rule(s3_server: Any, s3_bucket: str, payload: Path) -> None:
    trollmoves.copy(payload, f"s3://{s3_bucket}/prefix/", **_s3(s3_server))
    trollmoves.copy(payload, f"s3://{s3_bucket}/prefix/new_name", **_s3(s3_server))
    keys = sorted(o["Key"] for o in
                  s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == sorted([f"prefix/{payload.name}", "prefix/new_name"])


def test_s3_download_and_remote_to_remote_stream(s3_server: Any, s3_bucket: str,
                                                 sshd_server: Any, payload: Path,
                                                 tmp_path: Path) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="a/obj.bin", Body=payload.read_bytes())
    trollmoves.copy(f"s3://{s3_bucket}/a/obj.bin", f"{tmp_path}/s3dl/", **_s3(s3_server))
    assert (tmp_path / "s3dl" / "obj.bin").read_bytes() == payload.read_bytes()
    trollmoves.copy(f"s3://{s3_bucket}/a/obj.bin", sshd_server.url(tmp_path / "r2r") + "/",
                    src_options=_s3(s3_server), dst_options=_ssh(sshd_server))
    assert (tmp_path / "r2r" / "obj.bin").read_bytes() == payload.read_bytes()


def test_s3_missing_bucket_is_not_created(s3_server: Any, payload: Path) -> None:
    with pytest.raises(errors.DestinationMissingError):
        trollmoves.copy(payload, "s3://no-such-bucket-here/x/", **_s3(s3_server))
    names = [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    assert "no-such-bucket-here" not in names


def test_s3_endpoint_shorthand_and_checksum(s3_server: Any, s3_bucket: str,
                                            payload: Path) -> None:
    result = trollmoves.copy(payload, f"s3://{s3_bucket}/c/", checksum="md5",
                             key=s3_server.access_key, secret=s3_server.secret_key,
                             endpoint_url=s3_server.endpoint_url)
    assert result.checksum and result.checksum.startswith("md5:")
    s3 = fsspec.filesystem("s3", skip_instance_cache=True, **_s3(s3_server))
    assert s3.cat_file(f"{s3_bucket}/c/{payload.name}") == payload.read_bytes()


def test_ssh_unknown_host_key_is_refused_unless_checking_is_disabled(
        sshd_server: Any, payload: Path, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    url = sshd_server.url(tmp_path / "hk" / "x")
    with pytest.raises(errors.AuthenticationError, match=r"[Hh]ost key"):
        trollmoves.copy(payload, url, known_hosts=str(empty), **_ssh(sshd_server))
    assert not (tmp_path / "hk" / "x").exists()
    trollmoves.copy(payload, url, known_hosts=None, **_ssh(sshd_server))
    assert (tmp_path / "hk" / "x").read_bytes() == payload.read_bytes()
