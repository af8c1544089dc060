"""Build the messages a server sends: announcements of files and replies to requests.

Functions of a config section and a file (or a request); no sockets, no threads, no I/O
but reading an archive's index. The shapes are trollmoves 0.19's (see PROTOCOL.md)::

    info = file_info(section, "/src/H-000-MSG4-202611211000-__", fields)
    Message(section["topic"], "file", info)
    # {"sensor": "seviri", ..., "uri": "/src/H-...", "uid": "H-...",
    #  "request_address": "10.0.0.5:9092"}

:func:`announcement_info` picks request mode (the section has ``request_port``) or stand-alone
mode (no request socket: the message carries a serialized fsspec filesystem instead);
:func:`dataset_info` announces the members of an archive (``unpack = tar``/``zip``) in place.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import socket
import tarfile
import zipfile
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
from posttroll.message import Message
from posttroll.publisher import get_own_ip

from trollmoves import unpack, wire
from trollmoves.urls import SSH_SCHEMES

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


def _is_secret(key: Any, value: Any) -> bool:
    lowered = str(key).lower()
    values = value if isinstance(value, list) else [value]
    return (lowered == "key" or any(word in lowered for word in SECRET_WORDS)
            or any(isinstance(v, str) and "PRIVATE KEY-----" in v for v in values))


def secret_options(options: Any, prefix: str = "") -> list[str]:
    """The keys (``a__b`` for nested ones) of ``options`` that hold a secret.

    Secrets are passwords, pass phrases, tokens, secret and access keys (by their name) and
    key contents (a value holding a private key), at any depth.
    """
    if not isinstance(options, Mapping):
        return []
    found = []
    for key, value in options.items():
        if isinstance(value, Mapping):
            found.extend(secret_options(value, f"{prefix}{key}__"))
        elif _is_secret(key, value):
            found.append(f"{prefix}{key}")
    return found


def _without_secrets(options: Mapping[str, Any]) -> dict[str, Any]:
    return {key: _without_secrets(value) if isinstance(value, Mapping) else value
            for key, value in options.items()
            if isinstance(value, Mapping) or not _is_secret(key, value)}


def _public_options(section: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Protocol and options of the section's ``filesystem`` group, secrets left out.

    Default: SSH to this host. ``user`` is SSH's ``username``; a numeric ``port`` an integer.
    """
    options = _without_secrets(section.get("filesystem") or {})
    protocol = str(options.pop("protocol", "ssh")).lower()
    if protocol in SSH_SCHEMES:
        protocol = "ssh"
        options.setdefault("host", socket.gethostname())
        if "user" in options:
            options.setdefault("username", options.pop("user"))
    if isinstance(options.get("port"), str) and options["port"].isdigit():
        options["port"] = int(options["port"])
    return protocol, options


def filesystem_json(protocol: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """fsspec's own JSON form (``to_json``) of the ``protocol`` filesystem made with ``options``.

    The instance is never initialised: sshfs connects in its constructor and the archive
    filesystems open their file, but ``to_json`` needs only the class and the arguments, which
    are set here as fsspec's instance factory sets them.
    """
    cls = fsspec.get_filesystem_class(protocol)  # the registry also sets ``cls.protocol``
    detached = cls.__new__(cls)
    detached.storage_args, detached.storage_options = (), dict(options)
    return json.loads(detached.to_json())


def _netloc(options: Mapping[str, Any]) -> str:
    host = options.get("host")
    if not host:
        return ""
    user = options.get("username")
    port = options.get("port")
    return (f"{user}@" if user else "") + str(host) + (f":{port}" if port else "")


def standalone_info(section: Mapping[str, Any], path: str, fields: Mapping[str, Any]
                    ) -> dict[str, Any]:
    """Stand-alone data: filesystem JSON, full uri (also the uid), path, ``info`` and fields."""
    protocol, options = _public_options(section)
    uri = f"{protocol}://{_netloc(options)}{path}"
    info: dict[str, Any] = {"filesystem": filesystem_json(protocol, options), "uri": uri,
                            "uid": uri, "path": path}
    info.update(parse_info(section.get("info")))
    info.update(fields)
    return info


def archive_members(kind: str, path: str) -> list[str]:
    """The files in the local ``tar``/``zip`` archive ``path``, named as fsspec's archive
    filesystem names them (what consumers open); read without extracting.

    Raises :class:`~trollmoves.unpack.UnsafeArchiveError` for a member named outside the
    archive (absolute, ``..``) and :class:`~trollmoves.unpack.UnpackError` for an unreadable one.
    """
    try:
        with open(path, "rb") as handle:
            names = list(fsspec.get_filesystem_class(kind)(fo=handle).find(""))
    except (OSError, EOFError, ValueError, tarfile.TarError, zipfile.BadZipFile) as err:
        raise unpack.UnpackError(f"cannot list {path}: {err}") from err
    for name in names:
        try:
            unpack.safe_member_path(name)
        except unpack.UnsafeArchiveError as err:
            raise unpack.UnsafeArchiveError(f"refused {path}: {err}") from None
    return names


def dataset_info(section: Mapping[str, Any], path: str, members: list[str],
                 fields: Mapping[str, Any]) -> dict[str, Any]:
    """Stand-alone data of an archive: a ``dataset`` with one entry per member, each with its
    archive filesystem chained to the section's (``tar://a.h5::ssh://host/archive.tar``)."""
    kind = str(section["unpack"])
    protocol, options = _public_options(section)
    filesystem = filesystem_json(kind, {"fo": path, "target_protocol": protocol,
                                        "target_options": options})
    archive = f"{protocol}://{_netloc(options)}{path}"
    info: dict[str, Any] = {"dataset": [
        {"filesystem": filesystem, "uri": f"{kind}://{member}::{archive}",
         "uid": f"{kind}://{member}", "path": member} for member in members]}
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
    return wire.message(request.subject, kind, _cleaned(data))


def ack_reply(request: Message) -> Message:
    """Reply to an ``ack``: the request's data, destination stripped of credentials."""
    return wire.message(request.subject, "ack", _cleaned(request.data))


def pong(request: Message, station: str | None) -> Message:
    """Reply to a ``ping``."""
    return wire.message(request.subject, "pong", {"station": station or "unknown"})


def info_reply(request: Message, files: list[str], max_count: int, uptime: dt.timedelta
               ) -> Message:
    """Reply to an ``info`` request."""
    return wire.message(request.subject, "info",
                        {"files": files, "max_count": max_count, "uptime": str(uptime)})


def unknown_reply(request: Message) -> Message:
    """Reply to a request of a type the server does not serve."""
    return wire.message(request.subject, "unknown")


def error_reply(subject: str, text: str) -> Message:
    """A failure: type ``err`` with a text (which must hold no secret)."""
    return wire.message(subject or "/error", "err", text)
