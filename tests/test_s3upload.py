"""S3 uploads through trollmoves.s3upload, against the moto server on loopback.

What goes on the wire is read with a botocore ``before-send`` handler on the real client (an
observer: requests are sent unchanged). Integrity is checked on what the server stored: the object
read back, and the composite CRC32 the server computed from the parts it received.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zlib
from pathlib import Path
from typing import Any

import botocore.auth
import botocore.exceptions
import pytest
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from fsspec.asyn import sync
from fsspec.callbacks import Callback

import trollmoves
from trollmoves import errors, s3upload
from trollmoves.filesystems import endpoint
from trollmoves.urls import parse

MIB = 1024 * 1024


def _file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def _crc32(data: bytes) -> bytes:
    return zlib.crc32(data).to_bytes(4, "big")


def _composite_crc32(data: bytes, part_size: int) -> str:
    """S3's checksum of a multipart object: the CRC32 of the parts' CRC32s."""
    parts = [data[i:i + part_size] for i in range(0, len(data), part_size)]
    return base64.b64encode(_crc32(b"".join(_crc32(p) for p in parts))).decode()


def _stored(server: Any, bucket: str, key: str) -> bytes:
    return server.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def _no_object_and_no_upload(server: Any, bucket: str, key: str) -> None:
    client = server.client()
    with pytest.raises(botocore.exceptions.ClientError) as info:
        client.head_object(Bucket=bucket, Key=key)
    assert info.value.response["Error"]["Code"] in {"404", "NoSuchKey"}
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


class Wire:
    """Records the requests an s3fs file system sends: operation, headers, body digest."""

    def __init__(self, fs: Any) -> None:
        sync(fs.loop, fs.set_session)
        self.requests: list[tuple[str, dict[str, str], int, str]] = []
        fs.s3.meta.events.register("before-send.s3", self._seen)

    def _seen(self, request: Any, event_name: str, **kwargs: Any) -> None:
        body = bytes(request.body or b"")
        headers = {k.lower(): v.decode() if isinstance(v, bytes) else v
                   for k, v in request.headers.items()}
        self.requests.append((event_name.rsplit(".", 1)[-1], headers, len(body),
                              hashlib.sha256(body).hexdigest()))

    def operations(self) -> list[str]:
        return [op for op, *_ in self.requests]

    def bodies(self, operation: str) -> list[tuple[dict[str, str], int, str]]:
        return [(h, n, d) for op, h, n, d in self.requests if op == operation]


def _fs(server: Any, bucket: str, **options: Any) -> Any:
    """A new s3fs file system built as the engine builds it."""
    return endpoint(parse(f"s3://{bucket}/"), {**server.storage_options(), **options}).build()


class Progress(Callback):
    """An fsspec callback remembering every value it was told."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[int] = []

    def call(self, *args: Any, **kwargs: Any) -> None:
        self.values.append(self.value)


# -- through the copy engine ---------------------------------------------------------------------

def test_multipart_upload_arrives_byte_identical(s3_server: Any, s3_bucket: str,
                                                 tmp_path: Path) -> None:
    src = _file(tmp_path / "big.bin", 2 * s3upload.PART_SIZE + 3 * MIB + 17)
    data = src.read_bytes()
    progress = Progress()
    result = trollmoves.copy(src, f"s3://{s3_bucket}/in/", callback=progress,
                             **s3_server.storage_options())
    assert result.size == len(data)
    assert hashlib.sha256(_stored(s3_server, s3_bucket, "in/big.bin")).hexdigest() == \
        hashlib.sha256(data).hexdigest()
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="in/big.bin",
                                          ChecksumMode="ENABLED")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    # the server's checksum of the parts it received agrees with the file's
    # (S3 appends "-<parts>" to it; moto's HEAD does not)
    assert head["ChecksumCRC32"].split("-")[0] == _composite_crc32(data, s3upload.PART_SIZE)
    assert progress.size == len(data)
    assert progress.values[-1] == len(data)
    assert progress.values == sorted(progress.values)
    assert s3_server.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_small_file_progress_and_content_type(s3_server: Any, s3_bucket: str,
                                              tmp_path: Path) -> None:
    src = _file(tmp_path / "small.nc", 300_000)
    progress = Progress()
    trollmoves.copy(src, f"s3://{s3_bucket}/s/", callback=progress, **s3_server.storage_options())
    assert _stored(s3_server, s3_bucket, "s/small.nc") == src.read_bytes()
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="s/small.nc")
    assert head["ContentType"] == "application/x-netcdf"  # guessed from the name, as s3fs does
    assert (progress.size, progress.values[-1]) == (300_000, 300_000)


def test_failure_aborts_the_multipart_upload(s3_server: Any, s3_bucket: str,
                                             tmp_path: Path) -> None:
    """A part failing (here: the progress callback raising after the first part) stops the
    parts still in flight and aborts the upload: no object, no unfinished upload."""
    src = _file(tmp_path / "big.bin", 2 * s3upload.PART_SIZE + MIB)

    class Stop(Callback):
        def call(self, *args: Any, **kwargs: Any) -> None:
            if self.value:
                raise RuntimeError("stop here")

    with pytest.raises(errors.TransferError, match="stop here"):
        trollmoves.copy(src, f"s3://{s3_bucket}/x/big.bin", callback=Stop(),
                        **s3_server.storage_options())
    _no_object_and_no_upload(s3_server, s3_bucket, "x/big.bin")


def test_profile_and_endpoint_options_reach_the_multipart_upload(
        s3_server: Any, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[trolls]\naws_access_key_id = {s3_server.access_key}\n"
                           f"aws_secret_access_key = {s3_server.secret_key}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    src = _file(tmp_path / "p.bin", s3upload.PART_SIZE + MIB)
    url = f"s3://{s3_bucket}/p/"
    trollmoves.copy(src, url, profile="trolls", endpoint_url=s3_server.endpoint_url)
    assert _stored(s3_server, s3_bucket, "p/p.bin") == src.read_bytes()
    with pytest.raises(errors.TransferError, match="profile"):
        trollmoves.copy(src, url, profile="nobody", endpoint_url=s3_server.endpoint_url)


# -- the requests on the wire ------------------------------------------------------------------

def test_parts_are_sent_whole_with_their_digests(s3_server: Any, s3_bucket: str,
                                                 tmp_path: Path) -> None:
    fs = _fs(s3_server, s3_bucket)
    wire = Wire(fs)
    src = _file(tmp_path / "w.bin", 2 * s3upload.PART_SIZE + 5)
    s3upload.put_file(fs, str(src), f"{s3_bucket}/w.bin")
    assert wire.operations() == ["CreateMultipartUpload", "UploadPart", "UploadPart",
                                 "UploadPart", "CompleteMultipartUpload"]
    parts = wire.bodies("UploadPart")
    assert sorted(n for _, n, _ in parts) == [5, s3upload.PART_SIZE, s3upload.PART_SIZE]
    data = src.read_bytes()
    crcs = {base64.b64encode(_crc32(data[i:i + s3upload.PART_SIZE])).decode()
            for i in range(0, len(data), s3upload.PART_SIZE)}
    for headers, _, digest in parts:
        # plain http: the payload is signed, with the SHA-256 of exactly the bytes sent
        assert headers["x-amz-content-sha256"] == digest
        assert headers["expect"] == "100-continue"  # an early refusal is S3's error, no reset
        assert headers["x-amz-sdk-checksum-algorithm"] == "CRC32"
    assert {h["x-amz-checksum-crc32"] for h, _, _ in parts} == crcs
    assert wire.bodies("CreateMultipartUpload")[0][0]["x-amz-checksum-algorithm"] == "CRC32"
    assert _stored(s3_server, s3_bucket, "w.bin") == data


@pytest.mark.parametrize("size", [0, 1, s3upload.PART_SIZE])
def test_up_to_one_part_is_one_put(s3_server: Any, s3_bucket: str, tmp_path: Path,
                                   size: int) -> None:
    fs = _fs(s3_server, s3_bucket)
    wire = Wire(fs)
    src = _file(tmp_path / "one.bin", size)
    progress = Progress()
    s3upload.put_file(fs, str(src), f"{s3_bucket}/one.bin", progress)
    assert wire.operations() == ["PutObject"]
    ((headers, length, digest),) = wire.bodies("PutObject")
    assert length == size
    assert headers["x-amz-content-sha256"] == digest
    assert headers["x-amz-checksum-crc32"] == base64.b64encode(_crc32(src.read_bytes())).decode()
    assert headers["expect"] == "100-continue"
    assert _stored(s3_server, s3_bucket, "one.bin") == src.read_bytes()
    assert progress.size == size and progress.value == size


def test_checksums_only_when_the_client_config_asks(s3_server: Any, s3_bucket: str,
                                                    tmp_path: Path) -> None:
    """``request_checksum_calculation=when_required`` (for stores without flexible checksums):
    no CRC32 on the parts, as botocore would send them."""
    fs = _fs(s3_server, s3_bucket,
             config_kwargs={"request_checksum_calculation": "when_required"})
    wire = Wire(fs)
    src = _file(tmp_path / "r.bin", s3upload.PART_SIZE + 1)
    s3upload.put_file(fs, str(src), f"{s3_bucket}/r.bin")
    for _, headers, _, digest in wire.requests:
        assert not any(name.startswith("x-amz-checksum") for name in headers)
        assert headers["x-amz-content-sha256"] == digest
    assert _stored(s3_server, s3_bucket, "r.bin") == src.read_bytes()


def test_unsigned_payload_when_configured(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    fs = _fs(s3_server, s3_bucket, config_kwargs={"s3": {"payload_signing_enabled": False}})
    wire = Wire(fs)
    src = _file(tmp_path / "u.bin", s3upload.PART_SIZE + 1)
    s3upload.put_file(fs, str(src), f"{s3_bucket}/u.bin")
    for headers, _, _ in wire.bodies("UploadPart"):
        assert headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
        assert "x-amz-checksum-crc32" in headers  # integrity rests on the checksum
    assert _stored(s3_server, s3_bucket, "u.bin") == src.read_bytes()


def test_source_shrinking_mid_upload_aborts(s3_server: Any, s3_bucket: str,
                                            tmp_path: Path) -> None:
    src = _file(tmp_path / "s.bin", 3 * 5 * MIB)

    class Truncate(Callback):
        def call(self, *args: Any, **kwargs: Any) -> None:
            if self.value:
                os.truncate(src, 1)

    fs = _fs(s3_server, s3_bucket)
    with pytest.raises(errors.VerificationError, match="shrank"):
        s3upload.put_file(fs, str(src), f"{s3_bucket}/s.bin", Truncate(), part_size=5 * MIB,
                          parallel=1)
    _no_object_and_no_upload(s3_server, s3_bucket, "s.bin")


# -- pieces ------------------------------------------------------------------------------------

def _request(url: str, body: Any, *, signing: bool | None = None,
             headers: dict[str, str] | None = None) -> AWSRequest:
    request = AWSRequest(method="PUT", url=url, data=body, headers=headers or {})
    s3_config = {} if signing is None else {"payload_signing_enabled": signing}
    request.context.update(client_config=Config(s3=s3_config), has_streaming_input=True)
    return request


def _part(data: bytes, sha256: str | None = "own") -> s3upload.Part:
    part = s3upload.Part(len(data))
    part[:] = data
    part.sha256 = hashlib.sha256(data).hexdigest() if sha256 == "own" else sha256
    return part


@pytest.mark.parametrize(("url", "signing", "headers"), [
    ("http://127.0.0.1:9000/b/k", None, {}),
    ("http://127.0.0.1:9000/b/k", False, {}),
    ("https://s3.example.org/b/k", None, {"x-amz-checksum-crc32": "AAAAAA=="}),
    ("https://s3.example.org/b/k", None, {}),
    ("https://s3.example.org/b/k", True, {"x-amz-checksum-crc32": "AAAAAA=="}),
])
def test_prehashed_signer_hashes_as_botocore(url: str, signing: bool | None,
                                             headers: dict[str, str]) -> None:
    credentials = Credentials("AKIDEXAMPLE", "secret")
    ours = s3upload.PrehashedS3SigV4Auth(credentials, "s3", "us-east-1")
    theirs = botocore.auth.S3SigV4Auth(credentials, "s3", "us-east-1")
    data = os.urandom(100_000)
    for body in (_part(data), _part(data, None), data, b""):
        expected = theirs.payload(_request(url, body, signing=signing, headers=headers))
        assert ours.payload(_request(url, body, signing=signing, headers=headers)) == expected


def test_prehashed_signer_takes_the_digest_the_part_carries() -> None:
    auth = s3upload.PrehashedS3SigV4Auth(Credentials("AKIDEXAMPLE", "secret"), "s3", "us-east-1")
    part = _part(b"abc", sha256="f" * 64)  # not this part's hash: shows it is not recomputed
    assert auth.payload(_request("http://127.0.0.1:9000/b/k", part)) == "f" * 64


def test_fill_part_reads_and_hashes(tmp_path: Path) -> None:
    src = _file(tmp_path / "f.bin", 3000)
    data = src.read_bytes()
    fd = os.open(src, os.O_RDONLY)
    try:
        part = s3upload.fill_part(fd, 1000, s3upload.Part(1500), sign=True, checksum=True)
        assert bytes(part) == data[1000:2500]
        assert part.sha256 == hashlib.sha256(data[1000:2500]).hexdigest()
        assert part.crc32 == base64.b64encode(_crc32(data[1000:2500])).decode()
        bare = s3upload.fill_part(fd, 0, s3upload.Part(10), sign=False, checksum=False)
        assert (bare.sha256, bare.crc32) == (None, None)
        with pytest.raises(errors.VerificationError, match="shrank"):
            s3upload.fill_part(fd, 2000, s3upload.Part(1500), sign=True, checksum=True)
    finally:
        os.close(fd)


def test_part_size_keeps_within_the_part_limit() -> None:
    assert s3upload.part_size_for(0) == s3upload.PART_SIZE
    limit = s3upload.PART_SIZE * s3upload.MAX_PARTS
    assert s3upload.part_size_for(limit) == s3upload.PART_SIZE
    for size in (limit + 1, 5 * 1024**4):
        part = s3upload.part_size_for(size)
        assert part % MIB == 0
        assert -(-size // part) <= s3upload.MAX_PARTS
