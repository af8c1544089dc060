"""Logging for the console scripts: ``-v``, ``-l LOGFILE``, ``-c LOG_CONFIG`` and redaction."""

from __future__ import annotations

import argparse
import logging
import logging.config
import logging.handlers

import yaml

from trollmoves.urls import SECRET_WORDS, redact_text

_TRACEBACKS = logging.Formatter()
LOG_FORMAT = "[%(asctime)s %(levelname)-8s %(name)s] %(message)s"


def may_hold_secret(text: str) -> bool:
    """False when :func:`~trollmoves.urls.redact_text` would leave ``text`` as it is: it has
    no ``@`` (a URL password is ``scheme://user:password@``) and no secret option name
    (``password=``...). A few substring tests instead of the regular expressions, which cost
    tens of microseconds per log line."""
    if "@" in text:
        return True
    folded = text.casefold()
    return any(word in folded for word in SECRET_WORDS)


class RedactingFilter(logging.Filter):
    """Replace URL passwords in every record, whatever the code that logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Render the record's message and traceback once, redacted."""
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        redacted = redact_text(message) if may_hold_secret(message) else message
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(_TRACEBACKS.formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def add_logging_arguments(parser: argparse.ArgumentParser, log_file: bool = True,
                          log_config: bool = True) -> None:
    """Add the logging options every trollmoves script shares."""
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    if log_file:
        parser.add_argument("-l", "--log", dest="log", metavar="LOGFILE",
                            help="log to this file (rotated at midnight) instead of stderr")
    if log_config:
        parser.add_argument("-c", "--log-config", dest="log_config", metavar="LOG_CONFIG",
                            help="YAML logging configuration (logging.config.dictConfig)")


def setup_logging(args: argparse.Namespace) -> None:
    """Configure logging from parsed arguments; every handler gets the redaction filter.

    A log file rotates every ``args.log_rotation_days`` midnights (default 1) and keeps
    ``args.log_rotation_backup`` old files (default 7) when the arguments carry them.
    """
    config_file = getattr(args, "log_config", None)
    if config_file:
        with open(config_file) as handle:
            logging.config.dictConfig(yaml.safe_load(handle))
    else:
        log_file = getattr(args, "log", None)
        if log_file:
            days = getattr(args, "log_rotation_days", None) or 1
            backups = getattr(args, "log_rotation_backup", None)
            handler: logging.Handler = logging.handlers.TimedRotatingFileHandler(
                log_file, when="midnight", interval=days,
                backupCount=7 if backups is None else backups)
        else:
            handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    for noisy in ("asyncssh", "botocore", "s3fs", "aiobotocore", "urllib3", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
