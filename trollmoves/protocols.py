"""Transfer primitives for the protocols where fsspec's generic path is slow.

fsspec's FTP file objects open one data connection per block, and asyncssh's ``put`` machinery
costs milliseconds per small file; these functions do the same work in one STOR/RETR, or in one
pipelined SFTP exchange. S3 uploads have their own multipart loop (:mod:`trollmoves.s3upload`).
Everything else goes through fsspec's own ``put_file``/``get_file``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping
from typing import Any

from fsspec.asyn import sync

from trollmoves import opensftp
from trollmoves.errors import VerificationError

#: Files up to this size are uploaded over SFTP in one pipelined exchange.
SFTP_SMALL_FILE = 4 * 1024 * 1024
FTP_BLOCK = 1 << 20


def ftp_put(fs: Any, lpath: str, rpath: str, callback: Any = None) -> None:
    """Upload with a single STOR."""
    size = os.path.getsize(lpath)
    if callback is not None:
        callback.set_size(size)
    sent = 0

    def progress(block: bytes) -> None:
        nonlocal sent
        sent += len(block)
        if callback is not None:
            callback.absolute_update(sent)

    with open(lpath, "rb") as handle:
        fs.ftp.storbinary(f"STOR {rpath}", handle, blocksize=FTP_BLOCK, callback=progress)


def ftp_get(fs: Any, rpath: str, lpath: str, callback: Any = None) -> None:
    """Download with a single RETR."""
    got = 0
    with open(lpath, "wb") as handle:
        def write(block: bytes) -> None:
            nonlocal got
            handle.write(block)
            got += len(block)
            if callback is not None:
                callback.absolute_update(got)

        fs.ftp.retrbinary(f"RETR {rpath}", write, blocksize=FTP_BLOCK)


def put(fs: Any, protocol: str, lpath: str, rpath: str, callback: Any = None) -> None:
    """Upload a local file to ``rpath`` on ``fs``."""
    if protocol == "ftp":
        ftp_put(fs, lpath, rpath, callback)
        return
    if protocol == "s3" and hasattr(fs, "_call_s3"):
        from trollmoves import s3upload  # botocore only for S3 users

        s3upload.put_file(fs, lpath, rpath, callback)
        return
    kwargs: dict[str, Any] = {}
    if callback is not None:
        kwargs["callback"] = callback
    fs.put_file(lpath, rpath, **kwargs)


def get(fs: Any, protocol: str, rpath: str, lpath: str, callback: Any = None) -> None:
    """Download ``rpath`` on ``fs`` to a local file."""
    if protocol == "ftp":
        ftp_get(fs, rpath, lpath, callback)
    elif callback is not None:
        fs.get_file(rpath, lpath, callback=callback)
    else:
        fs.get_file(rpath, lpath)


async def _sftp_deliver(fs: Any, data: bytes, tmp: str, final: str) -> int:
    """Write ``data`` to ``tmp``, check its size, rename it to ``final``: three round trips.

    After the open, the writes, the size check and the close go out back to back without
    waiting for replies (asyncio starts tasks in the order they were made, and a file opened
    with ``block_size=0`` sends each write as one request, so the server sees them in this
    order); the rename follows only a file whose every write succeeded and whose size matches.
    """
    async with fs._pool.get() as sftp:
        handle = await sftp.open(tmp, "wb", block_size=0)
        step = sftp.limits.max_write_len or SFTP_SMALL_FILE
        view = memoryview(data)
        writes = [handle.write(view[offset:offset + step], offset)
                  for offset in range(0, len(data), step)]
        results = await asyncio.gather(*writes, handle.stat(), handle.close(),
                                       return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            with contextlib.suppress(Exception):
                await handle.close()
            raise failures[0]
        attrs = results[-2]
        if attrs.size != len(data):
            raise VerificationError(f"wrote {attrs.size} bytes, source has {len(data)}")
        await sftp.posix_rename(tmp, final)
        return attrs.size


def quick_delivery(protocol: str, size: int, fs: Any, options: Mapping[str, Any]
                   ) -> Callable[[str, str, str, Any], int] | None:
    """``deliver(lpath, tmp, final, callback) -> size``: write, check the size, rename, in as few
    round trips as the protocol allows; None when the generic path is as good.

    ``options`` are the ones ``fs`` was built with: they tell whether the OpenSSH client can
    stand in for asyncssh (see :mod:`trollmoves.opensftp`).
    """
    if protocol != "ssh" or not hasattr(fs, "_pool"):
        return None
    sessions = opensftp.sessions_for(fs, options)
    if sessions is None and size > SFTP_SMALL_FILE:
        return None

    def deliver(lpath: str, tmp: str, final: str, callback: Any = None) -> int:
        if sessions is not None:
            delivered = sessions.upload(lpath, tmp, final, callback)
            if delivered is not None:
                return delivered
        if size > SFTP_SMALL_FILE:  # the OpenSSH client turned out unusable: asyncssh's put
            put(fs, protocol, lpath, tmp, callback)
            got = fs.size(tmp)
            if got != size:
                raise VerificationError(f"wrote {got} bytes, source has {size}")
            fs.mv(tmp, final)
            return size
        with open(lpath, "rb") as handle:
            data = handle.read()
        return sync(fs.loop, _sftp_deliver, fs, data, tmp, final)

    return deliver
