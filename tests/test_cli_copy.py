"""``trollmoves copy`` as a user runs it: a subprocess, its output and its exit code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

TROLLMOVES = shutil.which("trollmoves") or ""


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [TROLLMOVES] if TROLLMOVES else [sys.executable, "-m", "trollmoves.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120,
                          env=env, stdin=subprocess.DEVNULL)


def test_copy_prints_summary_and_checksum(tmp_path: Path) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(2_000_000))
    done = _run("copy", str(src), f"{tmp_path}/out/", "--checksum", "sha256", "--no-hardlink")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "a.bin").read_bytes() == src.read_bytes()
    assert "1.9 MiB" in done.stdout and "MB/s" in done.stdout and "sha256:" in done.stdout


def test_copy_failure_is_a_clear_error_and_nonzero_exit(tmp_path: Path) -> None:
    done = _run("copy", str(tmp_path / "missing"), str(tmp_path / "x"))
    assert done.returncode == 1
    assert "source not found" in done.stderr and "Traceback" not in done.stderr


def test_copy_bad_option_syntax(tmp_path: Path) -> None:
    done = _run("copy", "-o", "novalue", str(tmp_path / "a"), str(tmp_path / "b"))
    assert done.returncode == 2
    assert "key=value" in done.stderr


def test_copy_to_sftp_with_options_hides_secrets(sshd_server: Any, tmp_path: Path) -> None:
    src = tmp_path / "s.bin"
    src.write_bytes(b"x" * 1000)
    dst = sshd_server.url(tmp_path / "remote") + "/"
    done = _run("copy", str(src), dst, "-o", f"ssh_key_filename={sshd_server.key_filename}",
                "-o", "ssh_connection_timeout=5")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "remote" / "s.bin").read_bytes() == src.read_bytes()


def test_copy_wrong_ftp_password_never_printed(ftp_server: Any, tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"y" * 10)
    url = f"ftp://{ftp_server.user}:Not-The-Pass-42@{ftp_server.host}:{ftp_server.port}/x/"
    done = _run("copy", "-v", str(src), url)
    assert done.returncode == 1
    assert "authentication failed" in done.stderr
    assert "Not-The-Pass-42" not in done.stderr + done.stdout


def test_copy_to_s3_with_nested_option(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "o.bin"
    src.write_bytes(b"z" * 5000)
    env = dict(os.environ, **s3_server.env)
    env.pop("AWS_ENDPOINT_URL_S3", None)  # the endpoint must come from the option
    done = _run("copy", str(src), f"s3://{s3_bucket}/p/", "-o",
                f"client_kwargs__endpoint_url={s3_server.endpoint_url}", env=env)
    assert done.returncode == 0, done.stderr
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="p/o.bin")["Body"].read()
    assert body == src.read_bytes()


@pytest.mark.parametrize("args", [["--help"], []])
def test_help_lists_commands(args: list[str]) -> None:
    done = _run(*args)
    assert done.returncode == 0
    assert "copy" in done.stdout
