"""Unit tests of URL parsing, composition and redaction."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import pytest

from trollmoves.urls import parse, redact_text, redact_url, strip_credentials


@pytest.mark.parametrize(("url", "protocol", "host", "port", "user", "path"), [
    ("/data/in/file.h5", "file", "", None, None, "/data/in/file.h5"),
    ("file:///data/x", "file", "", None, None, "/data/x"),
    ("file://vm/dst/MSG4/", "file", "", None, None, "/dst/MSG4/"),
    ("sftp://bob@host:2222/srv/x", "ssh", "host", 2222, "bob", "/srv/x"),
    ("scp://host/srv/x", "ssh", "host", None, None, "/srv/x"),
    ("ftp://u:p%40ss@ftp.example/in/", "ftp", "ftp.example", None, "u", "/in/"),
    ("s3://bucket/prefix/name", "s3", "bucket", None, None, "/prefix/name"),
])
def test_parse(url: str, protocol: str, host: str, port: int | None, user: str | None,
               path: str) -> None:
    loc = parse(url)
    assert (loc.protocol, loc.host, loc.port, loc.user, loc.path) == (protocol, host, port,
                                                                         user, path)


def test_parse_password_is_unquoted_and_never_shown() -> None:
    loc = parse("ftp://u:p%40ss@h/a")
    assert loc.password == "p@ss"
    assert "p@ss" not in str(loc) and "p%40ss" not in str(loc)
    assert loc.url(with_password=True) == "ftp://u:p%40ss@h/a"


def test_trailing_slash_marks_directory_and_join_keeps_name() -> None:
    loc = parse("s3://bucket/prefix/")
    assert loc.is_dir
    assert loc.join("f.nc").url() == "s3://bucket/prefix/f.nc"
    assert parse("s3://bucket/prefix/name").fs_path == "bucket/prefix/name"
    assert not parse("s3://bucket/prefix/name").is_dir


def test_parse_accepts_pathlike_and_parse_results(tmp_path: Path) -> None:
    assert parse(tmp_path / "a").path == os.path.join(tmp_path, "a")
    assert parse(urlparse("sftp://h/x")).host == "h"
    assert parse("relative/name").path == os.path.abspath("relative/name")


def test_backup_host_keeps_everything_but_the_host() -> None:
    loc = parse("scp://u:pw@primary:22/d/f").with_host("backup")
    assert loc.url(with_password=True) == "scp://u:pw@backup:22/d/f"


def test_bad_port_is_a_clear_error_without_password() -> None:
    with pytest.raises(ValueError, match="invalid port") as info:
        parse("ftp://u:hunter2@h:99999999/x")
    assert "hunter2" not in str(info.value)


def test_redaction() -> None:
    text = "failed ftp://u:hunter2@h/x and s3://k:s3cr3t@b/y"
    assert redact_url(text) == "failed ftp://u:***@h/x and s3://k:***@b/y"
    assert strip_credentials("ftp://u:pw@h/x") == "ftp://u@h/x"
    assert redact_text("key 'abcdef' refused", ["abcdef"]) == "key '***' refused"


def test_chained_url_names_the_member() -> None:
    loc = parse("tar://data/a.h5::ssh://vm/src/j01_202611211000.tar")
    assert loc.name == "a.h5"
    assert loc.protocol == "tar"


def test_key_value_secrets_are_redacted_in_free_text() -> None:
    assert redact_text("connect(password='hunter2', port=22)") == "connect(password='***', port=22)"
    assert redact_text("{'client_secret': 'abc', 'x': 1}") == "{'client_secret': '***', 'x': 1}"
    assert redact_text('{"token": "t0k"}') == '{"token": "***"}'
    prose = "[sa] filesystem__password: passwords and secret keys are refused"
    assert redact_text(prose) == prose
