"""What a client asks for and what it announces: destinations, push requests, final messages.

Pure functions over posttroll messages and the client's settings, following PROTOCOL.md:

- the destination template is filled from the announcement with trollsift;
- the ``push`` request carries the destination with ``login`` credentials, the published copy of
  it carries none;
- the final ``file`` message has ``uri`` at the destination (scheme and host dropped when the
  destination is on this machine), ``origin`` = the server's request address, and neither
  ``request_address`` nor ``destination``;
- ``key = a:b|c:d`` settings rewrite message fields.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import posixpath
import socket
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from posttroll.message import Message
from trollsift import compose

from trollmoves import unpack, wire
from trollmoves.urls import LOCAL_SCHEMES

#: Schemes of object stores: never local, and their "user" is an access key, never published.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs"})
#: Items of a request that the final message does not carry.
REQUEST_ONLY_KEYS = ("request_address", "destination", "backup_targets")
_LIST_KEYS = ("dataset", "collection")


class DeliveryError(Exception):
    """A file that cannot be requested or announced as delivered (bad template, bad URL...)."""


def compose_destination(template: str, data: Mapping[str, Any]) -> str:
    """Fill the trollsift fields of a destination template from a message's data.

    The result must stay under the template's fixed base directory (the part before its first
    field): a field whose value climbs out of it (``{platform_name}`` = ``../..``) is refused.
    """
    try:
        url = compose(template, dict(data))
    except KeyError as err:
        raise DeliveryError(f"destination {template!r} needs {err} which the message lacks"
                            ) from None
    except (ValueError, TypeError, AttributeError) as err:
        raise DeliveryError(f"cannot fill destination {template!r}: {err}") from None
    base, fields = _template_parts(template)
    if fields and (not url.startswith(base) or ".." in unquote(url[len(base):]).split("/")):
        culprits = [f"{name} = {data.get(name)!r}" for name in fields
                    if ".." in unquote(str(data.get(name, "")))] or list(fields)
        raise DeliveryError(f"destination {template!r} filled with {', '.join(culprits)} "
                            f"leaves {base or 'its directory'}")
    return url


@functools.lru_cache(maxsize=64)
def _template_parts(template: str) -> tuple[str, tuple[str, ...]]:
    """The fixed base directory of a destination template (up to the last ``/`` before the
    first field) and the names of its fields."""
    fields = tuple(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(template)
                                 if name))
    head = template.split("{", 1)[0]
    return head[:head.rfind("/") + 1], fields


def is_plain_name(uid: Any) -> bool:
    """True when ``uid`` is a file name that stays in the directory it is joined to."""
    return (isinstance(uid, str) and uid not in {"", ".", ".."} and "\0" not in uid
            and posixpath.basename(uid) == uid)


def check_file_names(data: Mapping[str, Any]) -> None:
    """Raise :class:`DeliveryError` unless every ``uid`` of the files in ``data`` is a plain
    file name (it names the file at the destination, where ``../x`` would leave it)."""
    def check(item: dict[str, Any]) -> dict[str, Any]:
        if "uid" in item and not is_plain_name(item["uid"]):
            raise DeliveryError(f"field uid = {item['uid']!r} is not a plain file name")
        return item

    map_files(data, check)


@functools.lru_cache(maxsize=256)
def is_local_host(host: str) -> bool:
    """True when ``host`` is empty or names this machine (an address one can bind to here)."""
    if not host or host.lower() == "localhost":
        return True
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return False
    if ipaddress.ip_address(address).is_loopback:
        return True
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def _netloc(host: str, port: int | None, userinfo: str | None = None) -> str:
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return f"{userinfo}@{netloc}" if userinfo else netloc


@dataclass(frozen=True)
class Destination:
    """A composed destination directory URL."""

    scheme: str  #: ``file`` for a plain path
    host: str
    port: int | None
    path: str
    user: str | None = None
    password: str | None = None
    ftp_root: str | None = None  #: local directory an FTP destination is served from

    @classmethod
    def parse(cls, url: str, ftp_root: str | None = None) -> Destination:
        """Parse a destination URL or a plain local path (``ftp_root``: see
        :meth:`local_directory`)."""
        if "://" not in url:
            return cls("file", "", None, os.path.abspath(os.path.expanduser(url))
                       + ("/" if url.endswith("/") else ""), ftp_root=ftp_root)
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError as err:
            raise DeliveryError(f"invalid port in destination {parts.scheme}://"
                                f"{parts.hostname}...") from err
        user = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        scheme = parts.scheme.lower() or "file"
        return cls(scheme, parts.hostname or "", port, unquote(parts.path), user, password,
                   ftp_root)

    @property
    def is_local(self) -> bool:
        """True when the files land on this machine's file system."""
        if self.scheme in LOCAL_SCHEMES:
            return True
        return self.scheme not in OBJECT_STORES and is_local_host(self.host)

    def _url(self, userinfo: str | None, path: str | None = None) -> str:
        host = self.host or (socket.gethostname() if self.scheme in LOCAL_SCHEMES else "")
        return f"{self.scheme}://{_netloc(host, self.port, userinfo)}{path or self.path}"

    def request_url(self, login: str | None = None) -> str:
        """The destination as the server must get it: with ``login`` (``user[:pass]``)."""
        if login:
            user, sep, password = login.partition(":")
            userinfo = quote(user, safe="") + (":" + quote(password, safe="") if sep else "")
        elif self.user is not None:
            userinfo = quote(self.user, safe="")
            if self.password is not None:
                userinfo += ":" + quote(self.password, safe="")
        else:
            userinfo = None
        return self._url(userinfo)

    def public_url(self) -> str:
        """The destination as it may be published: without any credentials."""
        return self._url(None)

    def file_uri(self, uid: str, login: str | None = None) -> str:
        """Where the file ``uid`` ends up: a plain path when it is on this machine (under
        ``ftp_root`` for FTP), else a URL with the user."""
        path = posixpath.join(self.path, uid)
        if self.is_local:
            return posixpath.join(self.local_directory() or self.path, uid)
        user = login.partition(":")[0] if login else self.user
        if self.scheme in OBJECT_STORES:
            user = None
        return self._url(quote(user, safe="") if user else None, path)

    def local_directory(self, ftp_root: str | None = None) -> str | None:
        """The directory on this machine the files land in, or None when they leave it.

        With ``ftp_root`` (given here or to :meth:`parse`) an FTP destination is taken to be
        served from that local directory.
        """
        ftp_root = ftp_root or self.ftp_root
        if self.scheme == "ftp" and ftp_root:
            return os.path.join(ftp_root, self.path.lstrip("/"))
        if self.is_local:
            return self.path
        return None


def map_files(data: Mapping[str, Any], func: Callable[[dict[str, Any]], dict[str, Any]]
              ) -> dict[str, Any]:
    """A copy of ``data`` where each file item (a dict with ``uid`` or ``uri``) went through
    ``func``; items of ``dataset`` and ``collection`` lists are visited too."""
    out = dict(data)
    for key in _LIST_KEYS:
        if isinstance(out.get(key), list):
            out[key] = [map_files(item, func) if isinstance(item, Mapping) else item
                        for item in out[key]]
    if "uid" in out or "uri" in out:
        out = func(out)
    return out


def push_request(announcement: Message, destination: Destination, login: str | None = None,
                 backup_targets: list[str] | None = None) -> tuple[Message, Message]:
    """The ``push`` request for an announcement, and its credential-free copy to publish
    (the same message when the request carries no credentials and no backup targets)."""
    public = wire.message(announcement.subject, "push",
                          {**announcement.data, "destination": destination.public_url()})
    request_url = destination.request_url(login)
    if request_url == public.data["destination"] and not backup_targets:
        return public, public
    data = {**announcement.data, "destination": request_url}
    if backup_targets:
        data["backup_targets"] = list(backup_targets)
    return wire.message(announcement.subject, "push", data), public


def ack_request(announcement: Message) -> Message:
    """The ``ack`` request (and public ``ack``) for an announcement: its data, unchanged."""
    return wire.message(announcement.subject, "ack", dict(announcement.data))


Rewrites = dict[str, str]


def rewrite_metadata(data: dict[str, Any], rewrites: Mapping[str, str]) -> dict[str, Any]:
    """Apply ``key = a:b|c:d`` settings to the top-level fields of ``data`` (in place).

    With a mapping (every ``|`` item holds a ``:``), a value found in it is replaced and any
    other value kept; a setting without ``:`` replaces the value whatever it was.
    """
    for key, spec in rewrites.items():
        if key not in data:
            continue
        items = spec.split("|")
        if all(":" in item for item in items):
            table = dict(item.split(":", 1) for item in items)
            value = data[key]
            if isinstance(value, str | int | float) and str(value) in table:
                data[key] = table[str(value)]
        else:
            data[key] = spec
    return data


def final_data(announcement: Message, destination: Destination, *, login: str | None = None,
               reply: Message | None = None, rewrites: Mapping[str, str] | None = None
               ) -> dict[str, Any]:
    """The data of the client's final ``file`` message for a delivered announcement."""
    origin = announcement.data.get("request_address")
    if reply is not None and isinstance(reply.data, Mapping):
        origin = reply.data.get("request_address", origin)

    def relocate(item: dict[str, Any]) -> dict[str, Any]:
        uid = item.get("uid") or posixpath.basename(str(item.get("uri", "")))
        return {**item, "uri": destination.file_uri(uid, login)}

    data = map_files(announcement.data, relocate)
    for key in REQUEST_ONLY_KEYS:
        data.pop(key, None)
    if origin is not None:
        data["origin"] = origin
    return rewrite_metadata(data, rewrites or {})


def unpack_files(data: Mapping[str, Any], kind: str, local_dir: str | None,
                 destination: Destination, *, login: str | None = None, delete: bool = False,
                 **options: Any) -> dict[str, Any]:
    """Unpack the delivered files that the unpacker ``kind`` handles, where they landed.

    A file item becomes the file it unpacked to, or a ``dataset`` of its members; ``delete``
    removes the packed file afterwards. Raises :class:`~trollmoves.unpack.UnpackError` (also
    for an archive with a member that would land outside ``local_dir``).
    """
    unpacker = unpack.get(kind)

    def unpack_item(item: dict[str, Any]) -> dict[str, Any]:
        uid = item.get("uid")
        if not isinstance(uid, str) or not unpacker.handles(uid):
            return item
        if not is_plain_name(uid):
            raise unpack.UnpackError(f"refused to unpack {uid!r}: not a plain file name")
        if local_dir is None:
            raise unpack.UnpackError(f"{uid} was delivered off this machine; it cannot be "
                                     "unpacked here")
        packed = os.path.join(local_dir, uid)
        outputs = unpack.unpack(kind, packed, local_dir, **options)
        if delete and outputs != [packed]:
            os.unlink(packed)
        files = [{"uid": os.path.basename(out),
                  "uri": destination.file_uri(os.path.relpath(out, local_dir), login)}
                 for out in outputs]
        rest = {k: v for k, v in item.items() if k not in {"uid", "uri"}}
        return {**rest, **files[0]} if len(files) == 1 else {**rest, "dataset": files}

    return map_files(data, unpack_item)


def message_type(data: Mapping[str, Any]) -> str:
    """``dataset``/``collection`` when the data holds those lists, else ``file``."""
    for key in _LIST_KEYS:
        if isinstance(data.get(key), list):
            return key
    return "file"
