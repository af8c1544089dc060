"""The unpacker registry: stream decompressors, xRIT through an external program, safe archives."""

from __future__ import annotations

import bz2
import gzip
import io
import os
import stat
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from trollmoves import unpack
from trollmoves.unpack import UnpackError, UnsafeArchiveError


def make_tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None,
             hardlinks: dict[str, str] | None = None) -> Path:
    """Write a tar archive with regular ``members`` and symbolic/hard ``links``."""
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for kind, table in ((tarfile.SYMTYPE, links), (tarfile.LNKTYPE, hardlinks)):
            for name, target in (table or {}).items():
                info = tarfile.TarInfo(name)
                info.type = kind
                info.linkname = target
                archive.addfile(info)
    return path


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_registry_names_and_suffixes() -> None:
    assert {"bzip", "bz2", "gzip", "xrit", "tar", "zip"} <= set(unpack.names())
    assert unpack.get("BZ2").name == "bzip"
    assert unpack.handles("tar", "/x/pass.tar.gz")
    assert unpack.handles("xrit", "H-000-MSG4__-MSG4________-IR_108___-000001___-202611211000-C_")
    assert not unpack.handles("bzip", "file.h5")
    with pytest.raises(UnpackError, match=r"unknown unpacker 'os\.system'"):
        unpack.get("os.system")


@pytest.mark.parametrize(("name", "compress", "suffix"),
                         [("bzip", bz2.compress, ".bz2"), ("gzip", gzip.compress, ".gz")])
def test_stream_decompression(tmp_path: Path, name: str, compress: object, suffix: str) -> None:
    src = tmp_path / f"data.h5{suffix}"
    src.write_bytes(compress(b"payload" * 1000))  # type: ignore[operator]
    out = unpack.unpack(name, str(src), str(tmp_path / "work"))
    assert out == [str(tmp_path / "work" / "data.h5")]
    assert Path(out[0]).read_bytes() == b"payload" * 1000
    assert listing(tmp_path / "work") == ["data.h5"]  # no temporary file left


def test_unhandled_name_is_returned_unchanged(tmp_path: Path) -> None:
    src = tmp_path / "plain.h5"
    src.write_bytes(b"x")
    assert unpack.unpack("bzip", str(src), str(tmp_path / "work")) == [str(src)]


def test_corrupt_input_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "broken.bz2"
    src.write_bytes(b"not bzip2 at all")
    with pytest.raises(UnpackError, match="cannot decompress"):
        unpack.unpack("bzip", str(src), str(tmp_path / "work"))
    assert listing(tmp_path / "work") == []


def test_default_target_is_beside_the_source(tmp_path: Path) -> None:
    src = tmp_path / "x.gz"
    src.write_bytes(gzip.compress(b"x"))
    assert unpack.unpack("gzip", str(src)) == [str(tmp_path / "x")]


FAKE_XRIT = """#!{python}
import os, sys
src = sys.argv[1]
if "fail" in src:
    sys.exit("corrupt segment")
name = os.path.basename(src)[:-2] + "__"
with open(src, "rb") as fin, open(name, "wb") as fout:
    fout.write(fin.read().upper())
"""


@pytest.fixture
def xrit_prog(tmp_path: Path) -> str:
    prog = tmp_path / "xRITDecompress"
    prog.write_text(FAKE_XRIT.format(python=sys.executable))
    prog.chmod(prog.stat().st_mode | stat.S_IXUSR)
    return str(prog)


def test_xrit_runs_the_program_without_shell(tmp_path: Path, xrit_prog: str) -> None:
    src = tmp_path / "H-000-MSG4-IR_108-000001-202611211000-C_"
    src.write_bytes(b"segment")
    out = unpack.unpack("xrit", str(src), str(tmp_path / "work"), prog=xrit_prog)
    assert out == [str(tmp_path / "work" / "H-000-MSG4-IR_108-000001-202611211000-__")]
    assert Path(out[0]).read_bytes() == b"SEGMENT"
    assert listing(tmp_path / "work") == [os.path.basename(out[0])]


def test_xrit_failures_are_reported(tmp_path: Path, xrit_prog: str) -> None:
    src = tmp_path / "fail; rm -rf ~-C_"
    src.write_bytes(b"segment")
    with pytest.raises(UnpackError, match="corrupt segment"):
        unpack.unpack("xrit", str(src), str(tmp_path / "work"), prog=xrit_prog)
    with pytest.raises(UnpackError, match="needs the decompressor"):
        unpack.unpack("xrit", str(src), str(tmp_path / "work"))
    assert listing(tmp_path / "work") == []


def test_tar_extracts_members_with_their_paths(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "pass.tar", {"a.h5": b"a", "sub/b.h5": b"b"},
                       links={"sub/link": "../a.h5"}, hardlinks={"c.h5": "a.h5"})
    out = unpack.unpack("tar", str(archive), str(tmp_path / "work"))
    work = tmp_path / "work"
    assert out == [str(work / "a.h5"), str(work / "sub" / "b.h5"), str(work / "sub" / "link"),
                   str(work / "c.h5")]
    assert (work / "sub" / "link").read_bytes() == b"a"
    assert listing(work) == ["a.h5", "c.h5", "sub", "sub/b.h5", "sub/link"]


@pytest.mark.parametrize(("members", "links", "problem"), [
    ({"../evil.sh": b"x"}, {}, "leads out"),
    ({"ok/../../evil.sh": b"x"}, {}, "leads out"),
    ({"/etc/evil": b"x"}, {}, "absolute path"),
    ({"a.h5": b"a"}, {"passwd": "/etc/passwd"}, "absolute path"),
    ({"a.h5": b"a"}, {"sub/up": "../../etc/passwd"}, "outside the target"),
])
def test_tar_unsafe_archives_are_refused_whole(tmp_path: Path, members: dict[str, bytes],
                                               links: dict[str, str], problem: str) -> None:
    archive = make_tar(tmp_path / "bad.tar", members, links=links)
    work = tmp_path / "deep" / "work"
    with pytest.raises(UnsafeArchiveError, match=problem):
        unpack.unpack("tar", str(archive), str(work))
    assert listing(work) == []
    assert listing(tmp_path / "deep") == ["work"]


def test_tar_hardlink_outside_and_devices_are_refused(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "bad.tar", {}, hardlinks={"h": "../../etc/passwd"})
    with pytest.raises(UnsafeArchiveError, match="leads out"):
        unpack.unpack("tar", str(archive), str(tmp_path / "work"))
    with tarfile.open(tmp_path / "dev.tar", "w") as tar:
        info = tarfile.TarInfo("null")
        info.type = tarfile.CHRTYPE
        tar.addfile(info)
    with pytest.raises(UnsafeArchiveError, match="special file"):
        unpack.unpack("tar", str(tmp_path / "dev.tar"), str(tmp_path / "work"))


def test_compressed_tar(tmp_path: Path) -> None:
    path = tmp_path / "pass.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo("x.h5")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))
    assert unpack.unpack("tar", str(path), str(tmp_path)) == [str(tmp_path / "x.h5")]


def test_broken_tar(tmp_path: Path) -> None:
    (tmp_path / "broken.tar").write_bytes(b"\0garbage" * 100)
    with pytest.raises(UnpackError, match="cannot extract"):
        unpack.unpack("tar", str(tmp_path / "broken.tar"), str(tmp_path / "work"))


def test_zip(tmp_path: Path) -> None:
    path = tmp_path / "pass.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.h5", b"a")
        archive.writestr("sub/b.h5", b"b")
    out = unpack.unpack("zip", str(path), str(tmp_path / "work"))
    assert out == [str(tmp_path / "work" / "a.h5"), str(tmp_path / "work" / "sub" / "b.h5")]


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/../../b"])
def test_zip_unsafe_names_are_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("fine.h5", b"a")
        archive.writestr(zipfile.ZipInfo(name), b"x")
    with pytest.raises(UnsafeArchiveError):
        unpack.unpack("zip", str(path), str(tmp_path / "work"))
    assert listing(tmp_path / "work") == []


def test_zip_symlinks_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "link.zip"
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        unpack.unpack("zip", str(path), str(tmp_path / "work"))
