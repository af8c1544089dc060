"""Build the messages a server sends: announcements of files and replies to requests.

Pure functions of a config section and a file (or a request); no sockets, no threads. The
shapes are trollmoves 0.19's (see PROTOCOL.md)::

    info = file_info(section, "/src/H-000-MSG4-202611211000-__", fields)
    Message(section["topic"], "file", info)
    # {"sensor": "seviri", ..., "uri": "/src/H-...", "uid": "H-...",
    #  "request_address": "10.0.0.5:9092"}

:func:`announcement_info` picks request mode (the section has ``request_port``) or stand-alone
mode (no request socket: the message carries a serialized fsspec filesystem instead).
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
from posttroll.message import Message
from posttroll.publisher import get_own_ip

#: Filesystem options never copied into a stand-alone announcement.
SECRET_WORDS = ("password", "passphrase", "secret", "token", "credential")


def parse_info(text: str | None) -> dict[str, Any]:
    """Parse an ``info`` item, ``k=v;k=v``; a value with commas becomes a list."""
    info: dict[str, Any] = {}
    for item in (text or "").split(";"):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            continue
        info[key] = [v.strip() for v in value.split(",")] if "," in value else value
    return info


@functools.cache
def own_ip() -> str:
    """This host's address as other hosts see it (posttroll's choice), loopback as last resort."""
    try:
        return get_own_ip()
    except OSError:
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"


def request_address(section: Mapping[str, Any]) -> str | None:
    """``<request_address or own ip>:<request_port>``, or None without ``request_port``."""
    port = section.get("request_port")
    if port is None:
        return None
    return f"{section.get('request_address') or own_ip()}:{port}"


def file_info(section: Mapping[str, Any], path: str, fields: Mapping[str, Any]
              ) -> dict[str, Any]:
    """Request-mode data: ``info`` items, parsed fields, uri, uid and request_address."""
    info = parse_info(section.get("info"))
    info.update(fields)
    info["uri"] = path
    info["uid"] = os.path.basename(path)
    address = request_address(section)
    if address is not None:
        info["request_address"] = address
    return info


def relay_info(section: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """A relayed (``listen``) message's data: ``info`` items, the data, request_address."""
    info = parse_info(section.get("info"))
    info.update(data)
    address = request_address(section)
    if address is not None:
        info["request_address"] = address
    return info


def public_filesystem(section: Mapping[str, Any]) -> dict[str, Any]:
    """The fsspec filesystem of a stand-alone section, as consumers rebuild it from JSON.

    From the section's ``filesystem`` group (``filesystem__protocol = ssh``,
    ``filesystem__host = ...``); default: SSH to this host. Secret options are left out.
    """
    options = dict(section.get("filesystem") or {})
    protocol = str(options.pop("protocol", "ssh"))
    if protocol in {"ssh", "sftp", "scp"}:
        options.setdefault("host", socket.gethostname())
    cls = fsspec.get_filesystem_class(protocol)
    public = {k: v for k, v in options.items()
              if not any(word in k.lower() for word in SECRET_WORDS)}
    return {"cls": f"{cls.__module__}.{cls.__name__}", "protocol": protocol, "args": [],
            **public}


def standalone_info(section: Mapping[str, Any], path: str, fields: Mapping[str, Any]
                    ) -> dict[str, Any]:
    """Stand-alone data: filesystem JSON, full uri (also the uid), ``info`` items and fields.

    Only plain files for now; announcing archive members (``unpack = tar``/``zip``, a
    ``dataset`` of chained tar filesystems) is left to the stand-alone work (issue 4).
    """
    filesystem = public_filesystem(section)
    protocol = filesystem["protocol"]
    host = filesystem.get("host")
    uri = f"{protocol}://{host}{path}" if host and protocol != "file" else path
    info: dict[str, Any] = {"filesystem": filesystem, "uri": uri, "uid": uri}
    info.update(parse_info(section.get("info")))
    info.update(fields)
    return info


def announcement_info(section: Mapping[str, Any], path: str, fields: Mapping[str, Any]
                      ) -> dict[str, Any]:
    """The data announcing ``path``: request mode with ``request_port``, else stand-alone."""
    if section.get("request_port") is not None:
        return file_info(section, path, fields)
    return standalone_info(section, path, fields)


# -- replies -------------------------------------------------------------------------------

def clean_url(url: Any) -> Any:
    """``url`` without user name and password (other values are returned unchanged)."""
    if not isinstance(url, str) or "@" not in url or "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _cleaned(data: Any) -> Any:
    if isinstance(data, Mapping) and "destination" in data:
        return {**data, "destination": clean_url(data["destination"])}
    return data


def push_reply(request: Message) -> Message:
    """Success of a push: ``file``/``dataset``/``collection`` with the request's data, the
    destination stripped of credentials."""
    data = request.data
    kind = request.type
    if isinstance(data, Mapping):
        for key, value in (("uri", "file"), ("dataset", "dataset"), ("collection", "collection")):
            if key in data:
                kind = value
                break
    return Message(request.subject, kind, _cleaned(data))


def ack_reply(request: Message) -> Message:
    """Reply to an ``ack``: the request's data, destination stripped of credentials."""
    return Message(request.subject, "ack", _cleaned(request.data))


def pong(request: Message, station: str | None) -> Message:
    """Reply to a ``ping``."""
    return Message(request.subject, "pong", {"station": station or "unknown"})


def info_reply(request: Message, files: list[str], max_count: int, uptime: dt.timedelta
               ) -> Message:
    """Reply to an ``info`` request."""
    return Message(request.subject, "info",
                   {"files": files, "max_count": max_count, "uptime": str(uptime)})


def unknown_reply(request: Message) -> Message:
    """Reply to a request of a type the server does not serve."""
    return Message(request.subject, "unknown")


def error_reply(subject: str, text: str) -> Message:
    """A failure: type ``err`` with a text (which must hold no secret)."""
    return Message(subject or "/error", "err", text)
