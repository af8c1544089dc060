"""Script logging: whatever a library puts in a message or traceback, no password gets out."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from trollmoves.logs import may_hold_secret, setup_logging
from trollmoves.urls import redact_text


def test_log_file_has_no_passwords_in_messages_or_tracebacks(tmp_path: Path) -> None:
    log_file = tmp_path / "x.log"
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        setup_logging(argparse.Namespace(verbose=True, log=str(log_file), log_config=None))
        log = logging.getLogger("trollmoves.test")
        log.info("pushing to %s", "ftp://user:hunter2@host/dir/")
        try:
            raise RuntimeError("login failed with password='hunter2'")
        except RuntimeError:
            log.exception("transfer to sftp://u:s3cr3t@h/ failed")
        for handler in root.handlers:
            handler.flush()
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    text = log_file.read_text()
    assert "ftp://user:***@host/dir/" in text and "Traceback" in text
    assert "hunter2" not in text and "s3cr3t" not in text


@pytest.mark.parametrize("text", [
    "Delivered H-000-MSG4 from 127.0.0.1:9 to file://host/dst/ in 1.2 ms",
    "sent /src/a.h5 to /dst/a.h5", "ftp://user:hunter2@host/dir/", "connect(password='x')",
    "{'client_secret': 'abc'}", '{"TOKEN": "t0k"}', "PassPhrase=abc", "\u017fecret=abc",
    "user@host said hello", "no secret here, token-free", "credentials: none"])
def test_redaction_is_skipped_only_where_it_would_change_nothing(text: str) -> None:
    if redact_text(text) != text:
        assert may_hold_secret(text)


def test_the_log_lines_of_every_file_skip_redaction() -> None:
    assert not may_hold_secret("Delivered H-000 from 127.0.0.1:9 to file://h/dst/ in 1.2 ms")
    assert not may_hold_secret("hrit: sent /src/H-000 to /dst/H-000")
