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
``cls`` item, with the copy engine's rules (SSH host keys are verified against
``~/.ssh/known_hosts``). Of the message's filesystem items only those saying *where* the file
is are used (:data:`MESSAGE_OPTIONS`: host, port, user name, S3 endpoint); how to authenticate
or connect (key files, ssh config files, proxy commands, ...) is the consumer's own business.

Message fields also name local paths (``/data/{platform_name}``): :func:`compose_path` refuses
values that would lead out of the template's fixed base directory. :func:`local_file_data`
builds the data of the ``file`` message announcing a local copy of an announced file.
"""

from __future__ import annotations

import os
import posixpath
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, urlsplit

from fsspec.core import OpenFile
from trollsift import compose
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
#: Items of an announcement that describe the remote file, not a local copy of it.
REMOTE_ITEMS = ("dataset", "collection", "filename", "compress", "tst", "uri", "uid", "file_list",
                "path", "filesystem")


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
    """The local path of an announced file, or None when the file is not on this machine (or
    its ``uri`` is not a valid URI)."""
    uri = str(info.get("uri") or "")
    filesystem = info.get("filesystem")
    if isinstance(filesystem, Mapping) and filesystem.get("protocol", "file") not in {
            "file", "local"}:
        return None
    if "::" in uri:
        return None
    try:
        parts = urlsplit(uri)
    except ValueError:  # e.g. file://[x (an unclosed IPv6 host)
        return None
    if parts.scheme.lower() not in LOCAL_SCHEMES:
        return None
    return parts.path if parts.scheme else uri


def local_file_data(info: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The data of the ``file`` message announcing ``path``, a local copy of the announced
    file ``info`` (an item of :func:`iter_files`): its metadata, ``uri`` = the path, ``uid`` =
    the file name."""
    data = {key: value for key, value in info.items() if key not in REMOTE_ITEMS}
    data["uri"] = path
    data["uid"] = os.path.basename(path)
    return data


# -- paths from message fields -----------------------------------------------------------------

class UnsafePathError(ValueError):
    """Message fields would put a composed path outside its template's base directory."""


def template_base(template: str) -> str:
    """The fixed directory a path template starts with: the part before its first field, up to
    the last ``/`` (``/data/{platform}/x`` -> ``/data``; ``""`` for ``{dir}/x``)."""
    prefix = ""
    for literal, field_name, _, _ in string.Formatter().parse(template):
        prefix += literal
        if field_name is not None:
            break
    else:
        return posixpath.normpath(prefix) if prefix else ""
    if "/" not in prefix:
        return ""
    return prefix[:prefix.rindex("/")] or "/"


def is_under(path: str, base: str) -> bool:
    """Whether ``path`` (normalized) stays in the directory ``base`` (``""``: the relative
    paths that do not climb out of their start)."""
    norm = posixpath.normpath(path)
    base = posixpath.normpath(base) if base else "."
    if posixpath.isabs(norm) != posixpath.isabs(base):
        return False
    if base == ".":
        return norm != ".." and not norm.startswith("../")
    return norm == base or norm.startswith(base.rstrip("/") + "/")


def _leads_out(value: Any) -> bool:
    text = str(value)
    return text.startswith(("/", "~")) or ".." in text.replace("\\", "/").split("/")


def _clip(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def compose_path(template: str, fields: Mapping[str, Any]) -> str:
    """``template`` (trollsift) composed with message ``fields``, normalized.

    Raises :class:`UnsafePathError` naming the field(s) whose value leads out of the template's
    fixed base directory (:func:`template_base`), and KeyError/ValueError/TypeError when the
    fields do not fit the template.
    """
    path = compose(template, dict(fields))
    base = template_base(template)
    if is_under(path, base):
        return posixpath.normpath(path)
    used = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    culprits = [name for name in dict.fromkeys(used) if _leads_out(fields.get(name, ""))]
    named = ", ".join(f"{name}={_clip(fields.get(name))}" for name in culprits or used)
    raise UnsafePathError(f"field {named} puts {template!r} at {_clip(path)}, outside "
                          f"{base or 'its relative start'!r}")


# -- reaching the announced files --------------------------------------------------------------

#: Filesystem items a message may set: where the file is, nothing about how to authenticate or
#: connect (key and config files, proxy commands, credentials come from the consumer's side).
MESSAGE_OPTIONS = frozenset({"host", "port", "username", "endpoint_url", "anon", "region_name",
                             "client_kwargs"})
#: The items of an S3 ``client_kwargs`` a message may set.
MESSAGE_CLIENT_KWARGS = frozenset({"endpoint_url", "region_name"})
#: Items of an archive filesystem naming the archive and the filesystem it is read through.
_ARCHIVE_ITEMS = ("fo", "target_protocol", "target_options")


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

    def with_options(self, options: Mapping[str, Any]) -> Source:
        """The same file with the consumer's own ``options`` over those of the message."""
        return replace(self, options={**self.options, **options}) if options else self


def message_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The filesystem items of a message that the consumer uses (:data:`MESSAGE_OPTIONS`)."""
    kept = {k: v for k, v in options.items() if k in MESSAGE_OPTIONS}
    client_kwargs = kept.pop("client_kwargs", None)
    if isinstance(client_kwargs, Mapping):
        allowed = {k: v for k, v in client_kwargs.items() if k in MESSAGE_CLIENT_KWARGS}
        if allowed:
            kept["client_kwargs"] = allowed
    return kept


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
    filesystem. Only the items of :data:`MESSAGE_OPTIONS` are kept. Without a filesystem, the
    ``uri`` as it is. Raises ValueError for an unknown protocol.
    """
    uri = str(info.get("uri") or info.get("uid") or "")
    filesystem = info.get("filesystem")
    if not isinstance(filesystem, Mapping):
        return Source(uri, {}, dict(info))
    protocol = _first(filesystem.get("protocol")) or urlsplit(uri).scheme or "file"
    path = info.get("path")
    if not isinstance(path, str) or not path:
        path = filesystem_class(protocol)._strip_protocol(str(info.get("uid") or uri))
    archive = {key: filesystem.get(key) for key in _ARCHIVE_ITEMS}
    if not archive["target_protocol"]:
        options = message_options(filesystem)
        return Source(_url(protocol, options, path), options, dict(info))
    target_options = archive["target_options"]
    inner = message_options(target_options if isinstance(target_options, Mapping) else {})
    inner_url = _url(str(archive["target_protocol"]), inner, str(archive["fo"] or ""))
    return Source(f"{protocol}://{path}::{inner_url}", inner, dict(info))


def _data(message: Any) -> Any:
    return getattr(message, "data", message)


def open_files(message: Any, mode: str = "rb", **options: Any) -> list[OpenFile]:
    """fsspec ``OpenFile`` objects for every file a ``file``/``dataset``/``collection``
    message (a posttroll Message or its data) announces, in order.

    ``options`` are the consumer's own connection options (``client_keys``, S3 ``key`` and
    ``secret``, ...) for the filesystems of this message. Files on the same filesystem (an
    archive's members, one host) share one instance; it connects here, the files open on
    ``with``.
    """
    built: dict[str, Any] = {}
    files = []
    for info in iter_files(_data(message)):
        ep, path = download_source(info).with_options(options).endpoint()
        if ep.key not in built:
            built[ep.key] = local_filesystem() if ep.protocol == "file" else ep.build()
        files.append(OpenFile(built[ep.key], path, mode=mode))
    return files


def paths(message: Any, **options: Any) -> list[UPath]:
    """``UPath`` objects for every file a message announces (connecting on first use), with
    the consumer's own connection ``options`` as for :func:`open_files`."""
    found = []
    for info in iter_files(_data(message)):
        ep, path = download_source(info).with_options(options).endpoint()
        found.append(UPath(path, protocol=ep.protocol, **ep.storage_options))
    return found
