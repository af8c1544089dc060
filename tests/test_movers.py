"""The classic mover facade: same names and signatures, every transfer through the engine."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from trollmoves import errors
from trollmoves.movers import (
    MOVERS,
    FileMover,
    FtpMover,
    S3Mover,
    ScpMover,
    SftpMover,
    move_it,
)


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    path = tmp_path / "avhrr_20261121_1000.l1b"
    path.write_bytes(os.urandom(50_000))
    return path


def test_movers_mapping() -> None:
    assert MOVERS["file"] is FileMover and MOVERS[""] is FileMover
    assert MOVERS["ftp"] is FtpMover
    assert MOVERS["scp"] is ScpMover and MOVERS["sftp"] is SftpMover
    assert MOVERS["s3"] is S3Mover


def test_file_mover_copy_and_move(origin: Path, tmp_path: Path) -> None:
    data = origin.read_bytes()
    FileMover(str(origin), f"file://{tmp_path}/copied/").copy()
    assert (tmp_path / "copied" / origin.name).read_bytes() == data
    FileMover(origin, urlparse(f"file://{tmp_path}/moved/renamed")).move()
    assert (tmp_path / "moved" / "renamed").read_bytes() == data
    assert not origin.exists()


def test_sftp_mover_with_classic_attrs(sshd_server: Any, origin: Path, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    attrs = {"ssh_private_key_file": sshd_server.key_filename, "ssh_connection_timeout": 5,
             "connection_uptime": 5, "made_up_option": 1}
    with caplog.at_level(logging.DEBUG, logger="trollmoves"):
        SftpMover(origin, sshd_server.url(tmp_path / "sftp") + "/", attrs=attrs).copy()
    assert (tmp_path / "sftp" / origin.name).read_bytes() == origin.read_bytes()
    assert "made_up_option" in caplog.text


def test_scp_mover_backup_targets(sshd_server: Any, origin: Path, tmp_path: Path) -> None:
    primary = sshd_server.url(tmp_path / "scp").replace("sftp://", "scp://", 1)
    primary = primary.replace("127.0.0.1", "127.0.0.2", 1) + "/"
    ScpMover(origin, primary, attrs={"ssh_key_filename": sshd_server.key_filename},
             backup_targets=["127.0.0.1"]).copy()
    assert (tmp_path / "scp" / origin.name).exists()


def test_ftp_mover(ftp_server: Any, origin: Path) -> None:
    FtpMover(origin, ftp_server.url("movers/", with_password=True)).copy()
    assert ftp_server.path(f"movers/{origin.name}").read_bytes() == origin.read_bytes()


def test_s3_mover_trailing_slash_rule(s3_server: Any, s3_bucket: str, origin: Path) -> None:
    attrs = {"client_kwargs": {"endpoint_url": s3_server.endpoint_url},
             "key": s3_server.access_key, "secret": s3_server.secret_key}
    S3Mover(origin, f"s3://{s3_bucket}/level1/", attrs=attrs).copy()
    S3Mover(origin, f"s3://{s3_bucket}/level1/other_name", attrs=attrs).copy()
    listing = s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert sorted(o["Key"] for o in listing) == sorted([f"level1/{origin.name}",
                                                        "level1/other_name"])


def test_move_it_returns_destination_and_calls_hook(ftp_server: Any, origin: Path) -> None:
    calls = []
    url = ftp_server.url("hooked/", with_password=True)
    final = move_it(str(origin), url, hook=lambda *args: calls.append(args), rel_path="2026/11")
    assert final == ftp_server.url(f"hooked/2026/11/{origin.name}")
    assert ftp_server.password not in final
    assert calls == [(str(origin), final)]
    assert ftp_server.path(f"hooked/2026/11/{origin.name}").exists()


def test_move_it_failure_raises_and_skips_hook(tmp_path: Path) -> None:
    calls = []
    with pytest.raises(errors.SourceMissingError):
        move_it(str(tmp_path / "nope"), f"{tmp_path}/out/", hook=lambda *a: calls.append(a))
    assert calls == []
