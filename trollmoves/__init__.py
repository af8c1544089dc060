"""trollmoves: move files for satellite-data processing chains and announce them over posttroll.

The copy engine is the package's core::

    import trollmoves
    result = trollmoves.copy("/data/in/file.h5", "sftp://user@host/data/out/")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trollmoves.errors import TransferError
from trollmoves.transfer import Result, RetryPolicy, transfer

__version__ = "1.0.0.dev0"
__all__ = ["Result", "RetryPolicy", "TransferError", "__version__", "copy", "move"]


def copy(src: Any, dst: Any, *, checksum: str | None = None, create_dirs: bool = True,
         hardlink: bool = True, backup_hosts: Sequence[str] | None = None,
         retry: RetryPolicy | None = None, callback: Any = None,
         src_options: Mapping[str, Any] | None = None,
         dst_options: Mapping[str, Any] | None = None, **options: Any) -> Result:
    """Copy one file from ``src`` to ``dst``; both are URLs, local paths or ``UPath`` objects.

    A ``dst`` ending in ``/`` keeps the source's file name. The file appears at the destination
    complete or not at all. ``options`` are connection parameters for the remote side(s)
    (``ssh_key_filename``, ``endpoint_url``, ``connection_uptime``, ...); ``src_options`` and
    ``dst_options`` apply to one side only. ``checksum`` (e.g. ``"sha256"``) reads the delivered
    file back and compares. ``backup_hosts`` are tried in order when the destination host cannot
    be reached. Raises a :class:`~trollmoves.errors.TransferError` subclass on failure.
    """
    return transfer(src, dst, checksum=checksum, create_dirs=create_dirs, hardlink=hardlink,
                    backup_hosts=backup_hosts, retry=retry, callback=callback,
                    src_options=src_options, dst_options=dst_options, **options)


def move(src: Any, dst: Any, **kwargs: Any) -> Result:
    """Like :func:`copy`, then remove the source (a plain rename when both are local)."""
    return transfer(src, dst, delete_source=True, **kwargs)
