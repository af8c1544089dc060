"""S3 uploads with the per-part work off the event loop.

s3fs's ``put_file`` reads each part in the event-loop thread, sends parts in lockstep batches
(a batch waits for its slowest part), hands botocore the part as a ``BytesIO`` (which aiohttp
reads and sends in 64 KiB pieces) and lets botocore hash it in that same thread: the SigV4
payload SHA-256 (signed whenever the endpoint is plain http) and the CRC32 checksum. The AWS CLI
does that work in ten threads.

Here a fixed number of parts is always in flight; each part is read into a reusable buffer and
hashed in a worker thread (``preadv``, ``hashlib`` and ``zlib.crc32`` release the GIL, so both
cores hash), and botocore is given the digests ready-made: the CRC32 as the ``ChecksumCRC32``
parameter, the SHA-256 through :class:`PrehashedS3SigV4Auth`; aiohttp sends the buffer through
:class:`PartPayload`, without the copies its ``BytesPayload`` makes. What is sent and what the
server verifies is what botocore would send by itself: the payload is signed exactly when
botocore would sign it, and a CRC32 checksum (``ChecksumAlgorithm=CRC32``, as the AWS CLI
declares it) is sent whenever the client's ``request_checksum_calculation`` asks for one (the
default).

Delivery stays atomic: a file of more than one part goes up as a multipart upload that is aborted
on any failure, after the parts still in flight have been stopped, so neither an object nor an
unfinished upload remains. A file of up to one part is a single ``PutObject``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import math
import mimetypes
import os
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import aiohttp.payload
import botocore.auth
from fsspec.asyn import sync
from fsspec.callbacks import DEFAULT_CALLBACK

from trollmoves import errors

LOG = logging.getLogger(__name__)

#: Part size of multipart uploads, and the largest file sent in one PUT. 8 MiB, as the AWS CLI
#: uses: enough parts to keep the parallel uploads busy for files of a few dozen MiB.
PART_SIZE = 8 * 1024 * 1024
#: Parts in flight at once, each holding one part-sized buffer (64 MiB in all). Against moto
#: on 2 cores 4 to 10 measured alike; 8 leaves room for the latency of a distant store (the AWS
#: CLI runs 10).
PARALLEL_PARTS = 8
#: S3's limit on the number of parts of one upload; larger files get larger parts.
MAX_PARTS = 10_000
_MIB = 1024 * 1024
#: Bytes of a part handed to the socket at a time.
SEND_CHUNK = 1024 * 1024

_T = TypeVar("_T")


class Part(bytearray):
    """The bytes of one part (or of a whole small file) with the digests botocore needs.

    A ``bytearray``, because botocore wraps ``bytes`` bodies of uploads in a ``BytesIO``.
    """

    __slots__ = ("crc32", "sha256")

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.sha256: str | None = None  #: hex SHA-256 for the SigV4 payload hash
        self.crc32: str | None = None  #: base64 CRC32, the ``x-amz-checksum-crc32`` value


class PrehashedS3SigV4Auth(botocore.auth.S3SigV4Auth):
    """botocore's S3 SigV4 signer, taking a :class:`Part`'s SHA-256 instead of hashing it again.

    It decides exactly as botocore does whether the payload is signed at all; only where
    botocore would hash the body, a ``Part`` body that carries its digest supplies it.
    """

    def payload(self, request: Any) -> str:
        """The payload hash of ``request`` (hex SHA-256, or botocore's placeholder)."""
        body = request.body
        if isinstance(body, Part) and body.sha256 is not None:
            streaming = getattr(self, "_is_streaming_checksum_payload", None)
            if not (streaming is not None and streaming(request)) and \
                    self._should_sha256_sign_payload(request):
                return body.sha256
        return super().payload(request)


class PartPayload(aiohttp.payload.Payload):
    """How aiohttp sends a :class:`Part`: slices of a memory view of it.

    aiohttp's own ``BytesPayload`` copies a ``bytearray`` in the event-loop thread (a slice to
    the content length, and without ``Expect`` a join with the headers); here the socket is
    given views of the part.
    """

    _autoclose = True

    def __init__(self, value: Part, *args: Any, **kwargs: Any) -> None:
        super().__init__(value, *args, **kwargs)
        self._size = len(value)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        """The part as text (aiohttp's interface; not used for uploads)."""
        return bytes(self._value).decode(encoding, errors)

    async def write(self, writer: Any) -> None:
        """Send the whole part."""
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        """Send the part, or its first ``content_length`` bytes."""
        view = memoryview(self._value)
        end = len(view) if content_length is None else min(content_length, len(view))
        for start in range(0, end, SEND_CHUNK):
            await writer.write(view[start:min(start + SEND_CHUNK, end)])


_INSTALL_LOCK = threading.Lock()
_payload_registered = False
_EXECUTOR_LOCK = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def install() -> bool:
    """Register :class:`PartPayload` with aiohttp (once) and make :class:`PrehashedS3SigV4Auth`
    botocore's ``s3v4`` signer; True when that signer is in place.

    The signer signs every request exactly as botocore's own class does (a body that is not a
    :class:`Part` is hashed as before). Another replacement (botocore's CRT signer, when awscrt
    is installed) is left in place; then botocore keeps hashing parts itself.
    """
    global _payload_registered
    with _INSTALL_LOCK:
        if not _payload_registered:
            aiohttp.payload.PAYLOAD_REGISTRY.register(PartPayload, Part,
                                                      order=aiohttp.payload.Order.try_first)
            _payload_registered = True
        current = botocore.auth.AUTH_TYPE_MAPS.get("s3v4")
        if current is botocore.auth.S3SigV4Auth:
            botocore.auth.AUTH_TYPE_MAPS["s3v4"] = PrehashedS3SigV4Auth
            return True
        return current is PrehashedS3SigV4Auth


def _thread_pool() -> ThreadPoolExecutor:
    global _executor
    with _EXECUTOR_LOCK:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1),
                                           thread_name_prefix="trollmoves-s3")
        return _executor


async def _in_thread(func: Callable[..., _T], *args: Any) -> _T:
    """Run ``func`` in the worker threads; if cancelled, return only once it has finished
    (it may be reading a descriptor that is closed after a cancellation)."""
    future = asyncio.get_running_loop().run_in_executor(_thread_pool(), func, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: its failure does not matter any more
        raise


def part_size_for(size: int, part_size: int = PART_SIZE) -> int:
    """``part_size``, or the smallest whole number of MiB above it that keeps a file of
    ``size`` bytes within :data:`MAX_PARTS` parts."""
    if size <= part_size * MAX_PARTS:
        return part_size
    return math.ceil(size / MAX_PARTS / _MIB) * _MIB


def fill_part(fd: int, offset: int, part: Part, sign: bool, checksum: bool) -> Part:
    """Read ``len(part)`` bytes at ``offset`` of ``fd`` into ``part`` and compute its digests."""
    length = len(part)
    with memoryview(part) as view:
        got = 0
        while got < length:
            count = os.preadv(fd, [view[got:]], offset + got)
            if count == 0:
                raise errors.VerificationError(
                    f"the source shrank while being uploaded (read {offset + got} bytes, "
                    f"expected at least {offset + length})")
            got += count
    part.sha256 = hashlib.sha256(part).hexdigest() if sign else None
    part.crc32 = base64.b64encode(zlib.crc32(part).to_bytes(4, "big")).decode() if checksum \
        else None
    return part


def _expect_continue(params: dict[str, Any], **kwargs: Any) -> None:
    """Send a :class:`Part`'s headers first and its body once the server accepts them, as
    botocore does for file bodies: a refusal (credentials, permission, region) then arrives as
    S3's error rather than as a connection reset in the middle of the body."""
    if isinstance(params.get("body"), Part):
        params["headers"]["Expect"] = "100-continue"


def _checksum_args(part: Part) -> dict[str, str]:
    """The parameters of a part's checksum: the two headers botocore itself would send."""
    if part.crc32 is None:
        return {}
    return {"ChecksumAlgorithm": "CRC32", "ChecksumCRC32": part.crc32}


def _wants_checksum(client: Any) -> bool:
    """Whether botocore would add a CRC32 checksum to an upload on this client."""
    setting = getattr(client.meta.config, "request_checksum_calculation", None)
    return setting == "when_supported"


def _signs_payload(client: Any, checksum: bool) -> bool:
    """Whether botocore will SHA-256 sign upload payloads on this client (then we hash them in
    the worker threads). The rule of ``S3SigV4Auth``; a wrong guess costs speed, not
    correctness."""
    explicit = (getattr(client.meta.config, "s3", None) or {}).get("payload_signing_enabled")
    if explicit is not None:
        return bool(explicit)
    # over https with a checksum header, botocore leaves streaming bodies unsigned
    return not str(client.meta.endpoint_url).startswith("https") or not checksum


async def _all_succeed(tasks: list[asyncio.Future[None]]) -> None:
    """Wait for ``tasks``; on the first failure cancel the others, wait for them, and raise."""
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _abort(fs: Any, bucket: str, key: str, upload_id: str) -> None:
    try:
        await fs._call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
    except Exception as err:  # noqa: BLE001 - the upload's own failure is what is raised
        LOG.warning("Could not abort the multipart upload to s3://%s/%s (%s); its parts stay "
                    "until the bucket's lifecycle rules remove them", bucket, key,
                    errors.describe(err))


class _Upload:
    """One file going to one object."""

    def __init__(self, fs: Any, fd: int, size: int, bucket: str, key: str, callback: Any,
                 part_size: int, parallel: int) -> None:
        self.fs, self.fd, self.size = fs, fd, size
        self.bucket, self.key = bucket, key
        self.callback = callback
        self.part_size = part_size_for(size, part_size)
        self.parallel = max(1, parallel)
        self.sign = False
        self.checksum = False

    async def run(self, content_type: str | None) -> None:
        """Upload: one PUT for up to one part, else a multipart upload aborted on failure."""
        fs = self.fs
        await fs.set_session()
        client = await fs.get_s3(self.bucket)
        self.checksum = _wants_checksum(client)
        prehashed = install()
        for operation in ("PutObject", "UploadPart"):
            client.meta.events.register(f"before-call.s3.{operation}", _expect_continue,
                                        unique_id=f"trollmoves-expect-continue-{operation}")
        self.sign = prehashed and _signs_payload(client, self.checksum)
        extra = {"ContentType": content_type} if content_type else {}
        self.callback.set_size(self.size)
        if self.size <= self.part_size:
            part = await _in_thread(fill_part, self.fd, 0, Part(self.size), self.sign,
                                    self.checksum)
            await fs._call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=part,
                              **_checksum_args(part), **extra)
            self.callback.relative_update(self.size)
            return
        if self.checksum:
            extra["ChecksumAlgorithm"] = "CRC32"
        mpu = await fs._call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key,
                                **extra)
        upload_id = mpu["UploadId"]
        try:
            parts = await self._parts(upload_id)
            await fs._call_s3("complete_multipart_upload", Bucket=self.bucket, Key=self.key,
                              UploadId=upload_id, MultipartUpload={"Parts": parts})
        except BaseException:
            await _abort(fs, self.bucket, self.key, upload_id)
            raise

    async def _parts(self, upload_id: str) -> list[dict[str, Any]]:
        """Upload every part, ``parallel`` at a time; the list ``complete`` needs."""
        count = math.ceil(self.size / self.part_size)
        uploaded: list[dict[str, Any]] = [{} for _ in range(count)]
        numbers = iter(range(count))  # shared: each worker takes the next part not yet taken

        async def worker() -> None:
            buffer: Part | None = None  # reused: a part is read only after the last one is sent
            for index in numbers:
                offset = index * self.part_size
                length = min(self.part_size, self.size - offset)
                part = buffer if buffer is not None and len(buffer) == length else Part(length)
                buffer = part
                await _in_thread(fill_part, self.fd, offset, part, self.sign, self.checksum)
                answer = await self.fs._call_s3(
                    "upload_part", Bucket=self.bucket, Key=self.key, UploadId=upload_id,
                    PartNumber=index + 1, Body=part, **_checksum_args(part))
                uploaded[index] = {"PartNumber": index + 1, "ETag": answer["ETag"]}
                if part.crc32 is not None:
                    uploaded[index]["ChecksumCRC32"] = part.crc32
                self.callback.relative_update(length)

        await _all_succeed([asyncio.ensure_future(worker())
                            for _ in range(min(self.parallel, count))])
        return uploaded


async def _put_file(fs: Any, lpath: str, rpath: str, callback: Any, part_size: int,
                    parallel: int) -> None:
    bucket, key, _ = fs.split_path(rpath)
    fd = os.open(lpath, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        upload = _Upload(fs, fd, size, bucket, key, callback, part_size, parallel)
        await upload.run(mimetypes.guess_type(lpath)[0])
    finally:
        os.close(fd)
    path = rpath
    while path:  # s3fs caches listings: forget the target's and its parents', as put_file does
        fs.invalidate_cache(path)
        path = fs._parent(path)


def put_file(fs: Any, lpath: str, rpath: str, callback: Any = None, *,
             part_size: int = PART_SIZE, parallel: int = PARALLEL_PARTS) -> None:
    """Upload local ``lpath`` to ``rpath`` (``bucket/key``) on the s3fs file system ``fs``.

    ``callback`` (an fsspec callback) gets the size, then an update after every part.
    """
    sync(fs.loop, _put_file, fs, lpath, rpath, callback or DEFAULT_CALLBACK, part_size,
         parallel)
