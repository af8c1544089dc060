"""The classic mover classes and ``move_it``, kept for code that imports them.

They hold no copy loop of their own: each is a name for :func:`trollmoves.copy` with the
connection parameters (``attrs``) and ``backup_targets`` of trollmoves' earlier releases.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from trollmoves.transfer import Result, transfer
from trollmoves.urls import Location, parse, strip_credentials

LOG = logging.getLogger(__name__)


class Mover:
    """Copy or move ``origin`` (a local path) to ``destination`` (a URL or parse result)."""

    #: URL schemes this class is registered for in :data:`MOVERS`.
    schemes: tuple[str, ...] = ()

    def __init__(self, origin: str | os.PathLike[str], destination: Any,
                 attrs: Mapping[str, Any] | None = None,
                 backup_targets: Sequence[str] | None = None) -> None:
        self.origin = os.fspath(origin)
        self.destination: Location = parse(destination)
        self.attrs = dict(attrs or {})
        self.backup_targets = list(backup_targets or [])

    def _target(self) -> str:
        return self.destination.url(with_password=True)

    def copy(self) -> Result:
        """Copy the file to its destination."""
        return transfer(self.origin, self._target(), backup_hosts=self.backup_targets,
                        **self.attrs)

    def move(self) -> Result:
        """Copy the file to its destination, then remove the origin."""
        return transfer(self.origin, self._target(), delete_source=True,
                        backup_hosts=self.backup_targets, **self.attrs)


class FileMover(Mover):
    """Local copies: a hard link when on the same file system, else a kernel-side copy."""

    schemes = ("", "file")


class FtpMover(Mover):
    """Uploads over FTP; credentials from the URL or ``~/.netrc``."""

    schemes = ("ftp",)


class ScpMover(Mover):
    """Uploads over SSH (served by the SFTP subsystem, which every OpenSSH server has)."""

    schemes = ("scp",)


class SftpMover(Mover):
    """Uploads over SFTP."""

    schemes = ("sftp", "ssh")


class S3Mover(Mover):
    """Uploads to S3; a destination ending in ``/`` keeps the file name."""

    schemes = ("s3",)


#: Mover class by URL scheme.
MOVERS: dict[str, type[Mover]] = {
    scheme: cls for cls in (FileMover, FtpMover, ScpMover, SftpMover, S3Mover)
    for scheme in cls.schemes
}


def _destination(pathname: str, destination: Any, rel_path: str | None) -> Location:
    loc = parse(destination)
    if rel_path:
        # rel_path names a directory below the destination, as the server's sub-folders do
        loc = replace(loc, path=posixpath.join(loc.path, rel_path, ""), is_dir=True, raw="")
    if loc.is_dir:
        loc = loc.join(os.path.basename(pathname))
    return loc


def move_it(pathname: str | os.PathLike[str], destination: Any,
            attrs: Mapping[str, Any] | None = None,
            hook: Callable[[str, str], Any] | None = None, rel_path: str | None = None,
            backup_targets: Sequence[str] | None = None) -> str:
    """Copy ``pathname`` to ``destination`` (``rel_path`` below it when given).

    Returns the final destination URL without password; ``hook(pathname, url)`` is called
    after a successful transfer.
    """
    pathname = os.fspath(pathname)
    target = _destination(pathname, destination, rel_path)
    mover_cls = MOVERS.get(target.scheme, Mover)
    mover_cls(pathname, target.url(with_password=True), attrs, backup_targets).copy()
    final = strip_credentials(target.url(with_password=True))
    if hook is not None:
        hook(pathname, final)
    return final
