"""Transfer exceptions and the classification of library errors into them.

Every failure of the copy engine surfaces as a :class:`TransferError` subclass whose text names
the source and destination with credentials redacted. ``transient`` tells the retry loop whether
trying again can help.
"""

from __future__ import annotations

import errno
import ftplib
import socket
from collections.abc import Iterable

from trollmoves.urls import redact_text

_TRANSIENT_ERRNOS = {
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.EAGAIN,
}


class TransferError(Exception):
    """A copy or move that did not complete; the destination is left untouched."""

    transient = False
    reason = "transfer failed"

    def __init__(self, detail: str, src: str = "", dst: str = "") -> None:
        self.detail = detail
        self.src = src
        self.dst = dst
        where = f" ({src} -> {dst})" if src or dst else ""
        super().__init__(f"{self.reason}{where}: {detail}")


class SourceMissingError(TransferError, FileNotFoundError):
    """The source file does not exist (or vanished during the transfer)."""

    reason = "source not found"


class DestinationMissingError(TransferError, FileNotFoundError):
    """The destination directory or bucket does not exist and may not be created."""

    reason = "destination directory not found"


class AccessDeniedError(TransferError, PermissionError):
    """The file system refused to read the source or write the destination."""

    reason = "permission denied"


class AuthenticationError(TransferError, PermissionError):
    """The server refused the credentials."""

    reason = "authentication failed"


class ConnectionFailedError(TransferError, ConnectionError):
    """The server could not be reached, or the connection broke; worth retrying."""

    transient = True
    reason = "connection failed"


class VerificationError(TransferError):
    """The delivered file differs from the source in size or checksum."""

    reason = "verification failed"


class ConfigurationError(TransferError, ValueError):
    """The URL or an option cannot be used as given."""

    reason = "invalid transfer settings"


def _chain(exc: BaseException) -> Iterable[BaseException]:
    """Yield the exception and its causes/contexts, innermost last."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _type_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _classify_one(exc: BaseException) -> type[TransferError] | None:
    """Return the error class for one exception, or None when it says nothing definite."""
    names = _type_names(exc)
    if isinstance(exc, TransferError):
        return type(exc)
    if names & {"SFTPPermissionDenied", "SFTPWriteProtect"}:
        return AccessDeniedError
    if names & {"SFTPNoSuchFile", "SFTPNoSuchPath"}:
        return SourceMissingError
    if names & {"SFTPConnectionLost", "SFTPNoConnection"}:
        return ConnectionFailedError
    # authentication, as reported by asyncssh / paramiko / ftplib / botocore
    if names & {"PermissionDenied", "AuthenticationException", "BadAuthenticationType",
                "HostKeyNotVerifiable", "BadHostKeyException"}:
        return AuthenticationError
    if isinstance(exc, ftplib.error_perm):
        code = str(exc)[:3]
        if code in {"530", "331", "332"}:
            return AuthenticationError
        if code == "550":
            return AccessDeniedError
        return TransferError
    if isinstance(exc, ftplib.error_temp | ftplib.error_reply | EOFError):
        return ConnectionFailedError
    code = getattr(exc, "response", {}) or {}
    code = code.get("Error", {}).get("Code", "") if isinstance(code, dict) else ""
    if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}:
        return AuthenticationError
    if code in {"AccessDenied", "AllAccessDisabled"}:
        return AccessDeniedError
    if code in {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"}:
        return ConnectionFailedError
    if names & {"ConnectionLost", "EndpointConnectionError", "ConnectTimeoutError",
                "ReadTimeoutError", "ConnectionClosedError", "ClientConnectorError",
                "ServerDisconnectedError", "FSTimeoutError", "SSHException"}:
        return ConnectionFailedError
    if names & {"DisconnectError", "ChannelOpenError"}:
        return ConnectionFailedError
    if isinstance(exc, TimeoutError | socket.timeout | ConnectionError | socket.gaierror):
        return ConnectionFailedError
    if isinstance(exc, PermissionError):
        return AccessDeniedError
    if isinstance(exc, FileNotFoundError):
        return SourceMissingError
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return ConnectionFailedError
    return None


def classify(exc: BaseException) -> type[TransferError]:
    """Map any library exception to the :class:`TransferError` subclass that describes it."""
    found = [kind for kind in map(_classify_one, _chain(exc)) if kind is not None]
    if AuthenticationError in found:  # libraries wrap refused logins in generic errors
        return AuthenticationError
    return found[0] if found else TransferError


def describe(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """A one-line description of an exception, with every secret removed."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror and not exc.filename:
        text = exc.strerror
    return redact_text(f"{type(exc).__name__}: {text}", secrets)
