"""Read the files a posttroll message announces, whatever its type.

``file`` messages carry one file in their data; ``dataset`` messages a list under ``dataset``;
``collection`` messages a list under ``collection`` whose items are files or datasets. Every
file comes out as one flat dict: the message's shared metadata plus the file's own items.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from trollmoves.urls import LOCAL_SCHEMES

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
