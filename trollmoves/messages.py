"""Read the files a posttroll message announces, whatever its type.

``file`` messages carry one file in their data; ``dataset`` messages a list under ``dataset``;
``collection`` messages a list under ``collection`` whose items are files or datasets. Every
file comes out as one flat dict: the message's shared metadata plus the file's own items.

A consumer reaches the announced files with one call, whether the message carries an fsspec
``filesystem`` item (stand-alone servers) or only a ``uri``::

    for handle in open_files(message):      # fsspec OpenFile objects
        with handle as f:
            data = f.read()
    paths(message)                          # the same files as UPath objects
    download_source(info)                   # URL + options for the copy engine

The filesystem a message names is rebuilt from its protocol (fsspec's registry), never from its
``cls`` item, with the copy engine's rules (SSH host keys are verified, against
``~/.ssh/known_hosts`` unless the message names another file) and without the options that
would run programs or forward connections on this machine (:data:`UNSAFE_OPTIONS`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from fsspec.core import OpenFile
from upath import UPath

from trollmoves.filesystems import (
    Endpoint,
    endpoint,
    filesystem_class,
    filesystem_path,
    local_filesystem,
)
from trollmoves.urls import LOCAL_SCHEMES, parse

FILE_TYPES = frozenset({"file", "dataset", "collection"})
_LIST_KEYS = ("dataset", "collection")


def _flatten(data: Mapping[str, Any], inherited: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    shared = {**inherited, **{k: v for k, v in data.items() if k not in _LIST_KEYS}}
    for key in _LIST_KEYS:
        if isinstance(data.get(key), list):
            for item in data[key]:
                if isinstance(item, Mapping):
                    yield from _flatten(item, shared)
            return
    if "uri" in shared or "uid" in shared:
        yield shared


def iter_files(data: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Yield one metadata dict per announced file of a ``file``/``dataset``/``collection`` data."""
    if not isinstance(data, Mapping):
        return
    yield from _flatten(data, {})


def local_path(info: Mapping[str, Any]) -> str | None:
    """The local path of an announced file, or None when the file is not on this machine."""
    uri = str(info.get("uri") or "")
    filesystem = info.get("filesystem")
    if isinstance(filesystem, Mapping) and filesystem.get("protocol", "file") not in {
            "file", "local"}:
        return None
    if "::" in uri:
        return None
    parts = urlsplit(uri)
    if parts.scheme.lower() not in LOCAL_SCHEMES:
        return None
    return parts.path if parts.scheme else uri


# -- reaching the announced files --------------------------------------------------------------

#: Filesystem items a message may not set: they run programs, load code or forward connections
#: on the consumer's machine.
UNSAFE_OPTIONS = frozenset({"proxy_command", "tunnel", "agent_forwarding", "agent_path",
                            "x11_forwarding", "x11_display", "x11_auth_path", "pkcs11_provider"})
_SERIALIZATION_ITEMS = ("cls", "protocol", "args")


@dataclass(frozen=True)
class Source:
    """One announced file as the copy engine reads it."""

    url: str  #: plain (``ssh://host/path``) or chained (``tar://member::ssh://host/a.tar``)
    options: dict[str, Any]  #: connection options for :func:`trollmoves.copy`
    info: dict[str, Any]  #: the file's metadata (see :func:`iter_files`)

    def endpoint(self) -> tuple[Endpoint, str]:
        """The engine's description of the filesystem, and the file's path in it."""
        loc = parse(self.url)
        return endpoint(loc, self.options), filesystem_path(loc)


def _safe_options(options: Mapping[str, Any]) -> dict[str, Any]:
    safe = {k: v for k, v in options.items()
            if k not in UNSAFE_OPTIONS and k not in _SERIALIZATION_ITEMS}
    if not isinstance(safe.get("known_hosts", ""), str):  # host keys are always verified
        del safe["known_hosts"]
    return safe


def _url(protocol: str, options: dict[str, Any], path: str) -> str:
    """``protocol://[host]path``; the host leaves the options for the URL."""
    host = options.pop("host", None)
    quoted = quote(path)
    if host:
        return f"{protocol}://{host}{'' if quoted.startswith('/') else '/'}{quoted}"
    return f"{protocol}://{quoted}"


def _first(protocol: Any) -> str | None:
    if isinstance(protocol, list | tuple):
        protocol = protocol[0] if protocol else None
    return str(protocol) if protocol else None


def download_source(info: Mapping[str, Any]) -> Source:
    """Where one announced file (an item of :func:`iter_files`) is, for the copy engine.

    With a ``filesystem`` item, its protocol and options and the file's ``path`` (else its
    ``uid`` or ``uri``, stripped of the protocol); archive filesystems (``fo``,
    ``target_protocol``, ``target_options``) become a chained URL whose options go to the inner
    filesystem. Without one, the ``uri`` as it is. Raises ValueError for an unknown protocol.
    """
    uri = str(info.get("uri") or info.get("uid") or "")
    filesystem = info.get("filesystem")
    if not isinstance(filesystem, Mapping):
        return Source(uri, {}, dict(info))
    options = _safe_options(filesystem)
    protocol = _first(filesystem.get("protocol")) or urlsplit(uri).scheme or "file"
    path = info.get("path")
    if not isinstance(path, str) or not path:
        path = filesystem_class(protocol)._strip_protocol(str(info.get("uid") or uri))
    target = options.pop("target_protocol", None)
    if not target:
        return Source(_url(protocol, options, path), options, dict(info))
    inner = _safe_options(options.pop("target_options", None) or {})
    inner_url = _url(str(target), inner, str(options.pop("fo", "")))
    if options:
        inner[protocol] = options
    return Source(f"{protocol}://{path}::{inner_url}", inner, dict(info))


def _data(message: Any) -> Any:
    return getattr(message, "data", message)


def open_files(message: Any, mode: str = "rb") -> list[OpenFile]:
    """fsspec ``OpenFile`` objects for every file a ``file``/``dataset``/``collection``
    message (a posttroll Message or its data) announces, in order.

    Files on the same filesystem (an archive's members, one host) share one instance; it
    connects here, the files open on ``with``.
    """
    built: dict[str, Any] = {}
    files = []
    for info in iter_files(_data(message)):
        ep, path = download_source(info).endpoint()
        if ep.key not in built:
            built[ep.key] = local_filesystem() if ep.protocol == "file" else ep.build()
        files.append(OpenFile(built[ep.key], path, mode=mode))
    return files


def paths(message: Any) -> list[UPath]:
    """``UPath`` objects for every file a message announces (connecting on first use)."""
    found = []
    for info in iter_files(_data(message)):
        ep, path = download_source(info).endpoint()
        found.append(UPath(path, protocol=ep.protocol, **ep.storage_options))
    return found
