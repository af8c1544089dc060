"""Check the loopback server fixtures with third-party clients."""

from __future__ import annotations

import ftplib
import io
import os
import subprocess
from pathlib import Path

import paramiko
import pytest

from tests import servers

PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)


def _sftp(server: servers.SSHServer) -> tuple[paramiko.SSHClient, paramiko.SFTPClient]:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.load_host_keys(str(server.known_hosts))
    client.connect(**server.connect_kwargs())
    return client, client.open_sftp()


def test_sshd_sftp_put_get(sshd_server: servers.SSHServer, tmp_path: Path) -> None:
    """A file goes up and comes back down through the sshd's sftp subsystem."""
    client, sftp = _sftp(sshd_server)
    with client, sftp:
        remote = tmp_path / "remote.bin"
        sftp.putfo(io.BytesIO(PAYLOAD), str(remote))
        assert remote.read_bytes() == PAYLOAD
        back = io.BytesIO()
        sftp.getfo(str(remote), back)
        assert back.getvalue() == PAYLOAD
    assert sshd_server.url(remote) == (
        f"sftp://{sshd_server.user}@127.0.0.1:{sshd_server.port}{remote}")


def test_sshd_native_sftp_client(sshd_server: servers.SSHServer, tmp_path: Path) -> None:
    """``ssh_opts()`` is enough for OpenSSH's own sftp client in batch mode."""
    src = tmp_path / "src.txt"
    src.write_text("hello")
    dst = tmp_path / "dst.txt"
    batch = f"put {src} {dst}\n"
    subprocess.run(["sftp", *sshd_server.ssh_opts(), "-b", "-",
                    f"{sshd_server.user}@{sshd_server.host}"],
                   input=batch.encode(), check=True, capture_output=True, timeout=30)
    assert dst.read_text() == "hello"


def test_sshd_sshfs(sshd_server: servers.SSHServer, tmp_path: Path) -> None:
    """fsspec's sshfs (asyncssh) works with ``asyncssh_options()``."""
    from sshfs import SSHFileSystem

    fs = SSHFileSystem(**sshd_server.asyncssh_options(), skip_instance_cache=True)
    fs.pipe_file(str(tmp_path / "f.txt"), b"hello")
    assert fs.cat_file(str(tmp_path / "f.txt")) == b"hello"


def test_sshd_refuses_wrong_key(sshd_server: servers.SSHServer, tmp_path: Path) -> None:
    """A key that is not in AuthorizedKeysFile is refused."""
    other = servers.make_ssh_keys(tmp_path)
    kwargs = dict(sshd_server.connect_kwargs(), key_filename=str(other.client_key))
    with paramiko.SSHClient() as client:
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        with pytest.raises(paramiko.AuthenticationException):
            client.connect(**kwargs)


def test_sshd_factory_kill_and_restart(sshd_factory, tmp_path: Path) -> None:
    """A private sshd can be killed (dropping open sessions) and restarted on its port."""
    server = sshd_factory()
    client, sftp = _sftp(server)
    with client, sftp:
        sftp.putfo(io.BytesIO(b"x"), str(tmp_path / "a"))
        server.kill()
        assert not server.is_running
        with pytest.raises((OSError, EOFError, paramiko.SSHException)):
            sftp.putfo(io.BytesIO(b"y"), str(tmp_path / "b"))
    again = sshd_factory(port=server.port)
    client, sftp = _sftp(again)
    with client, sftp:
        assert sftp.listdir(str(tmp_path)) == ["a"]


def _ftp_roundtrip(server: servers.FTPServer) -> None:
    with ftplib.FTP() as ftp:
        ftp.connect(server.host, server.port, timeout=10)
        ftp.login(server.user, server.password)
        ftp.mkd("sub")
        ftp.storbinary("STOR sub/file.bin", io.BytesIO(PAYLOAD))
        assert server.path("sub/file.bin").read_bytes() == PAYLOAD
        back = io.BytesIO()
        ftp.retrbinary("RETR sub/file.bin", back.write)
        assert back.getvalue() == PAYLOAD
        ftp.delete("sub/file.bin")
        ftp.rmd("sub")


def _ftp_login_refused(server: servers.FTPServer, user: str, password: str) -> None:
    with ftplib.FTP() as ftp:
        ftp.connect(server.host, server.port, timeout=10)
        with pytest.raises(ftplib.error_perm, match=r"^530"):
            ftp.login(user, password)


def test_ftp_login_stor_retr(ftp_server: servers.FTPServer) -> None:
    """Login, STOR and RETR through the pyftpdlib server process."""
    _ftp_roundtrip(ftp_server)
    assert ftp_server.url("a/b.txt") == f"ftp://troll@127.0.0.1:{ftp_server.port}/a/b.txt"


def test_ftp_refuses_wrong_password_and_anonymous(ftp_server: servers.FTPServer) -> None:
    """A wrong password and anonymous login get 530."""
    _ftp_login_refused(ftp_server, ftp_server.user, "wrong")
    _ftp_login_refused(ftp_server, "anonymous", "guest@example.com")


def test_ftp_factory_kill(ftp_factory) -> None:
    """A private FTP server can be killed; the client then sees a connection error."""
    server = ftp_factory()
    with ftplib.FTP() as ftp:
        ftp.connect(server.host, server.port, timeout=10)
        ftp.login(server.user, server.password)
        server.kill()
        with pytest.raises((OSError, EOFError, ftplib.Error)):
            ftp.nlst()


def test_vsftpd(vsftpd_server: servers.FTPServer) -> None:
    """vsftpd with a local user: login, STOR and RETR work.

    (A wrong password is not tried here: PAM answers it only after a ~2 s delay.)
    """
    _ftp_roundtrip(vsftpd_server)


def test_s3_put_get(s3_server: servers.S3Server, s3_bucket: str) -> None:
    """boto3 put/get against the moto server process, with credentials from the env."""
    import boto3

    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    client.put_object(Bucket=s3_bucket, Key="dir/obj.bin", Body=PAYLOAD)
    body = client.get_object(Bucket=s3_bucket, Key="dir/obj.bin")["Body"].read()
    assert body == PAYLOAD
    names = [b["Name"] for b in client.list_buckets()["Buckets"]]
    assert s3_bucket in names


def test_s3_s3fs(s3_server: servers.S3Server, s3_bucket: str) -> None:
    """s3fs works with ``storage_options()``."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options())
    fs.pipe(f"{s3_bucket}/x.txt", b"hello")
    assert fs.cat(s3_server.url(s3_bucket, "x.txt")) == b"hello"
