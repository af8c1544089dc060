"""Unit tests of error classification: what is retried, what fails at once."""

from __future__ import annotations

import errno
import ftplib
import socket

import pytest

from trollmoves import errors


def _caused(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


@pytest.mark.parametrize(("exc", "kind"), [
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), errors.ConnectionFailedError),
    (ConnectionResetError(), errors.ConnectionFailedError),
    (TimeoutError(), errors.ConnectionFailedError),
    (socket.gaierror(-2, "Name or service not known"), errors.ConnectionFailedError),
    (OSError(errno.EHOSTUNREACH, "no route"), errors.ConnectionFailedError),
    (ftplib.error_temp("421 too many users"), errors.ConnectionFailedError),
    (ftplib.error_perm("530 Login incorrect."), errors.AuthenticationError),
    (ftplib.error_perm("550 No such file"), errors.AccessDeniedError),
    (FileNotFoundError(errno.ENOENT, "gone"), errors.SourceMissingError),
    (PermissionError(errno.EACCES, "denied"), errors.AccessDeniedError),
    (RuntimeError("odd"), errors.TransferError),
    (_caused(PermissionError("x"), ConnectionResetError()), errors.AccessDeniedError),
    (_caused(RuntimeError("wrapped"), TimeoutError()), errors.ConnectionFailedError),
])
def test_classify(exc: BaseException, kind: type[errors.TransferError]) -> None:
    assert errors.classify(exc) is kind


def test_asyncssh_auth_failure_is_not_retried() -> None:
    import asyncssh

    exc = _caused(PermissionError("Permission denied"),
                  asyncssh.PermissionDenied("Permission denied"))
    assert errors.classify(exc) is errors.AuthenticationError
    assert errors.classify(asyncssh.ConnectionLost("lost")).transient


def test_botocore_codes() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    denied = ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "x"}}, "PutObject")
    assert errors.classify(denied) is errors.AuthenticationError
    assert errors.classify(EndpointConnectionError(endpoint_url="http://h")).transient


def test_describe_redacts_secrets() -> None:
    text = errors.describe(RuntimeError("login as u with hunter2 to ftp://u:hunter2@h/"),
                           ["hunter2"])
    assert "hunter2" not in text
    assert text.startswith("RuntimeError:")


def test_error_types_are_builtin_compatible() -> None:
    assert issubclass(errors.SourceMissingError, FileNotFoundError)
    assert issubclass(errors.AccessDeniedError, PermissionError)
    assert issubclass(errors.ConnectionFailedError, ConnectionError)
    err = errors.SourceMissingError("nope", "/a", "sftp://h/b")
    assert str(err) == "source not found (/a -> sftp://h/b): nope"
