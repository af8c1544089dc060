"""Script logging: whatever a library puts in a message or traceback, no password gets out."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from trollmoves.logs import setup_logging


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
