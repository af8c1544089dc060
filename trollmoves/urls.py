"""Parse, compose and redact the URLs that name files for the copy engine."""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any
from urllib.parse import quote, unquote, urlsplit

#: URL schemes that reach a host over SSH; all are served by sshfs (SFTP subsystem).
SSH_SCHEMES = frozenset({"ssh", "sftp", "scp"})
#: Schemes naming the local file system.
LOCAL_SCHEMES = frozenset({"", "file", "local"})

REDACTED = "***"
#: Option names containing one of these words hold secrets (and so does ``key``, s3fs's).
SECRET_WORDS = ("password", "passwd", "passphrase", "secret", "token", "credential")
_SECRET_NAME = r"[\w-]*(?:" + "|".join(SECRET_WORDS) + r")[\w-]*"
#: ``password=value`` and ``'password': 'value'`` (a dict's repr); prose such as
#: "password: refused" is left alone.
_KEY_VALUE = re.compile(
    r"(?P<key>" + _SECRET_NAME + r"\s*=\s*)(?P<quote>['\"]?)(?P<value>[^'\"\s,;)}\]]+)"
    r"|(?P<qkey>['\"]" + _SECRET_NAME + r"['\"]\s*:\s*)(?P<q>['\"])(?P<qvalue>[^'\"]*)",
    re.IGNORECASE)
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@")


@dataclass(frozen=True)
class Location:
    """One file (or directory, when ``is_dir`` is set) reachable through some protocol."""

    scheme: str
    path: str
    host: str = ""
    port: int | None = None
    user: str | None = None
    password: str | None = None
    is_dir: bool = False
    raw: str = ""

    @property
    def protocol(self) -> str:
        """The fsspec protocol serving this location."""
        if self.scheme in LOCAL_SCHEMES:
            return "file"
        if self.scheme in SSH_SCHEMES:
            return "ssh"
        if self.scheme == "s3a":
            return "s3"
        return self.scheme

    @property
    def is_local(self) -> bool:
        """True when the location is on this machine's file system."""
        return self.protocol == "file"

    @property
    def name(self) -> str:
        """The last component of the path (of the innermost file for chained URLs)."""
        path = self.path.split("::", 1)[0].split("://", 1)[-1] if "::" in self.path else self.path
        return posixpath.basename(path.rstrip("/"))

    @property
    def fs_path(self) -> str:
        """The path as the fsspec file system expects it (``bucket/key`` for object stores)."""
        if self.protocol in {"s3", "gs", "gcs", "az", "abfs"}:
            return f"{self.host}/{self.path.lstrip('/')}".rstrip("/")
        return self.path

    def join(self, name: str) -> Location:
        """The file ``name`` inside this (directory) location."""
        return replace(self, path=posixpath.join(self.path, name), is_dir=False,
                       raw=_join_raw(self.raw, name))

    def with_host(self, host: str) -> Location:
        """The same location on another host (for backup targets)."""
        return replace(self, host=host, raw="")

    def url(self, with_password: bool = False) -> str:
        """Compose the URL back; the password is replaced unless asked for."""
        if self.raw and "::" in self.raw:
            return self.raw if with_password else redact_url(self.raw)
        if self.is_local:
            return self.path + ("/" if self.is_dir and not self.path.endswith("/") else "")
        netloc = ""
        if self.user is not None:
            netloc = quote(self.user, safe="")
            if self.password is not None:
                netloc += ":" + (quote(self.password, safe="") if with_password else REDACTED)
            netloc += "@"
        netloc += self.host
        if self.port is not None:
            netloc += f":{self.port}"
        path = self.path if self.path.startswith("/") or not self.path else "/" + self.path
        if self.is_dir and not path.endswith("/"):
            path += "/"
        return f"{self.scheme}://{netloc}{path}"

    def __str__(self) -> str:
        return self.url()


def _join_raw(raw: str, name: str) -> str:
    if not raw or "::" in raw:
        return raw
    return raw if raw.endswith(name) else raw.rstrip("/") + "/" + name


def parse(target: Any) -> Location:
    """Parse a URL, a local path, a ``PathLike`` or a parse result into a :class:`Location`.

    A trailing ``/`` marks a directory: the engine then appends the source file name.
    """
    if hasattr(target, "geturl"):
        target = target.geturl()
    target = os.fspath(target) if isinstance(target, os.PathLike) else str(target)
    if not target:
        raise ValueError("empty URL")
    if "://" not in target:  # a local path: depends on the working directory and $HOME
        return _parse(target)
    return _parse_url(target)


@lru_cache(maxsize=1024)
def _parse_url(target: str) -> Location:
    """URLs repeat (a stream of files to one directory): each is parsed once."""
    return _parse(target)


def _parse(target: str) -> Location:
    is_dir = target.endswith("/")
    if "::" in target or "://" not in target:
        if "://" not in target:
            path = os.path.expanduser(target)
            return Location(scheme="", path=os.path.abspath(path) + ("/" if is_dir else ""),
                            is_dir=is_dir, raw=target)
        return Location(scheme=target.split("://", 1)[0], path=target, is_dir=is_dir, raw=target)
    parts = urlsplit(target)
    scheme = parts.scheme.lower()
    path = unquote(parts.path)
    if scheme in LOCAL_SCHEMES:
        # file://host/path and file:///path both name a local path; the host is informative only
        return Location(scheme="file", path=path or "/", is_dir=is_dir, raw=target)
    try:
        port = parts.port
    except ValueError as err:
        raise ValueError(f"invalid port in {redact_url(target)}") from err
    return Location(
        scheme=scheme,
        path=path,
        host=parts.hostname or "",
        port=port,
        user=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
        is_dir=is_dir,
        raw=target,
    )


def redact_url(url: str) -> str:
    """Replace the password part of every URL in ``url`` with ``***``."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", str(url))


def strip_credentials(url: str) -> str:
    """Drop the password (keep the user) from every URL in ``url``."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}@", str(url))


def _redact_match(match: re.Match[str]) -> str:
    if match["key"] is not None:
        return f"{match['key']}{match['quote']}{REDACTED}"
    return f"{match['qkey']}{match['q']}{REDACTED}"


def is_secret_key(name: str) -> bool:
    """Whether an option of this name holds a secret."""
    lowered = name.lower()
    return lowered == "key" or any(word in lowered for word in SECRET_WORDS)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove URL passwords, ``password=...``-like values and every given secret string."""
    text = redact_url(text)
    text = _KEY_VALUE.sub(_redact_match, text)
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, REDACTED)
            quoted = quote(secret, safe="")
            if quoted != secret:
                text = text.replace(quoted, REDACTED)
    return text
