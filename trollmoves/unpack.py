"""Registry of named unpackers: bzip2, gzip, xRIT (external program), tar and zip.

Config files name an unpacker (``compression = bzip``); the name is looked up here and nothing
from a config is ever evaluated as code::

    from trollmoves import unpack
    paths = unpack.unpack("tar", "/data/in/pass.tar", "/data/work")   # -> list of files
    unpack.handles("bzip", "x.h5.bz2")                                  # -> True

Every unpacker has the signature ``func(path, target_dir, **options) -> list[str]`` and returns
the paths of the files it produced, in archive order. Outputs appear complete or not at all:
they are written under a temporary name (or in a temporary directory) inside ``target_dir``
and renamed into place. A file whose name does not end with one of the unpacker's suffixes is
not touched: :func:`unpack` returns ``[path]``.

Archives are extracted safely: an archive with an absolute member, a ``..`` component, a link
leading outside the target directory or a device file is refused as a whole
(:class:`UnsafeArchiveError`) and nothing of it is written.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import logging
import os
import posixpath
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from trollmoves.transfer import temporary_name

LOG = logging.getLogger(__name__)

CHUNK = 1024 * 1024
#: Seconds an external decompressor (xRITDecompress) may run.
DEFAULT_PROGRAM_TIMEOUT = 300.0

UnpackFunction = Callable[..., list[str]]


class UnpackError(Exception):
    """A file could not be unpacked; nothing was left in the target directory."""


class UnsafeArchiveError(UnpackError):
    """An archive member would land outside the target directory (or is a special file)."""


@dataclass(frozen=True)
class Unpacker:
    """One registered unpacker."""

    name: str
    func: UnpackFunction
    suffixes: tuple[str, ...]  #: file name endings this unpacker handles

    def handles(self, filename: str) -> bool:
        """True when ``filename`` ends with one of the suffixes."""
        return filename.endswith(self.suffixes)


REGISTRY: dict[str, Unpacker] = {}


def register(name: str, suffixes: tuple[str, ...], aliases: tuple[str, ...] = ()
             ) -> Callable[[UnpackFunction], UnpackFunction]:
    """Register ``func(path, target_dir, **options) -> list[str]`` under ``name`` (and aliases)."""
    def decorate(func: UnpackFunction) -> UnpackFunction:
        entry = Unpacker(name, func, suffixes)
        for key in (name, *aliases):
            REGISTRY[key] = entry
        return func
    return decorate


def names() -> list[str]:
    """Every registered name, aliases included."""
    return sorted(REGISTRY)


def get(name: str) -> Unpacker:
    """The unpacker registered as ``name``; :class:`UnpackError` for an unknown name."""
    try:
        return REGISTRY[str(name).lower()]
    except KeyError:
        raise UnpackError(f"unknown unpacker {name!r}; known: {', '.join(names())}") from None


def handles(name: str, filename: str) -> bool:
    """True when the unpacker ``name`` would unpack a file called ``filename``."""
    return get(name).handles(os.path.basename(filename))


def unpack(name: str, path: str, target_dir: str | None = None, **options: Any) -> list[str]:
    """Unpack ``path`` with the unpacker ``name`` into ``target_dir`` (default: beside it).

    Returns the produced files, or ``[path]`` when the name lacks the unpacker's suffixes.
    ``options`` go to the unpacker (``prog`` and ``timeout`` for xrit).
    """
    unpacker = get(name)
    if not unpacker.handles(os.path.basename(path)):
        LOG.debug("%s is not a %s file, left as it is", path, unpacker.name)
        return [path]
    target = os.path.abspath(target_dir or os.path.dirname(os.path.abspath(path)))
    os.makedirs(target, exist_ok=True)
    outputs = unpacker.func(os.path.abspath(path), target, **options)
    LOG.debug("Unpacked %s (%s) to %s", path, unpacker.name, ", ".join(outputs))
    return outputs


# -- helpers ---------------------------------------------------------------------------------

def _strip_suffix(name: str, suffixes: tuple[str, ...]) -> str:
    for suffix in suffixes:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


@contextlib.contextmanager
def _temporary_file(final: str) -> Iterator[str]:
    """A temporary name beside ``final``, renamed to it when the block succeeds."""
    tmp = temporary_name(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def _temporary_directory(target_dir: str, prefix: str) -> Iterator[str]:
    """A hidden scratch directory inside ``target_dir`` (same file system: renames are cheap)."""
    scratch = tempfile.mkdtemp(prefix=f".{prefix}-", dir=target_dir)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _decompress_stream(opener: Callable[[str], Any], path: str, target_dir: str,
                       suffixes: tuple[str, ...]) -> list[str]:
    name = _strip_suffix(os.path.basename(path), suffixes)
    final = os.path.join(target_dir, name)
    if os.path.abspath(final) == os.path.abspath(path):
        raise UnpackError(f"unpacking {path} would overwrite it; use another target directory")
    try:
        with _temporary_file(final) as tmp, opener(path) as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, CHUNK)
    except (OSError, EOFError, ValueError) as err:
        raise UnpackError(f"cannot decompress {path}: {err}") from err
    return [final]


# -- stream decompressors ------------------------------------------------------------------

BZIP_SUFFIXES = (".bz2", ".bz")
GZIP_SUFFIXES = (".gz",)


@register("bzip", BZIP_SUFFIXES, aliases=("bz2", "bzip2"))
def bunzip(path: str, target_dir: str, **options: Any) -> list[str]:
    """Decompress a bzip2 file; the output drops the ``.bz2`` suffix."""
    return _decompress_stream(bz2.open, path, target_dir, BZIP_SUFFIXES)


@register("gzip", GZIP_SUFFIXES, aliases=("gz",))
def gunzip(path: str, target_dir: str, **options: Any) -> list[str]:
    """Decompress a gzip file; the output drops the ``.gz`` suffix."""
    return _decompress_stream(gzip.open, path, target_dir, GZIP_SUFFIXES)


@register("xrit", ("C_",))
def xrit(path: str, target_dir: str, prog: str | None = None,
         timeout: float = DEFAULT_PROGRAM_TIMEOUT, **options: Any) -> list[str]:
    """Run the xRIT decompressor ``prog`` (argv, no shell) on a ``...C_`` segment.

    The program writes ``...__`` into its working directory, a scratch directory inside
    ``target_dir``; what it wrote is moved into ``target_dir``.
    """
    if not prog:
        raise UnpackError("xrit unpacking needs the decompressor program (prog / "
                          "xritdecompressor)")
    with _temporary_directory(target_dir, "xrit") as scratch:
        try:
            done = subprocess.run([os.path.expanduser(prog), path], cwd=scratch,
                                  stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise UnpackError(f"cannot run {prog} on {path}: {err}") from err
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).decode(errors="replace").strip()[-500:]
            raise UnpackError(f"{prog} failed on {path} (exit {done.returncode}): {detail}")
        produced = sorted(e.name for e in os.scandir(scratch) if e.is_file(follow_symlinks=False))
        if not produced:
            raise UnpackError(f"{prog} produced nothing from {path}")
        expected = os.path.basename(path)[:-2] + "__"
        produced.sort(key=lambda n: n != expected)  # the expected segment first
        outputs = []
        for name in produced:
            final = os.path.join(target_dir, name)
            os.replace(os.path.join(scratch, name), final)
            outputs.append(final)
    return outputs


# -- archives --------------------------------------------------------------------------------

def safe_member_path(name: str) -> str:
    """Normalize an archive member name; refuse absolute names and ``..`` components."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        raise UnsafeArchiveError(f"member {name!r} has an absolute path")
    parts = [p for p in clean.split("/") if p not in {"", "."}]
    if ".." in parts:
        raise UnsafeArchiveError(f"member {name!r} leads out of the target directory (..)")
    if not parts:
        raise UnsafeArchiveError(f"member {name!r} has an empty name")
    return "/".join(parts)


def _check_link(member: str, link: str, relative_to_member: bool) -> None:
    """Refuse a link whose target is absolute or resolves outside the archive root."""
    if link.startswith("/"):
        raise UnsafeArchiveError(f"link {member!r} points to the absolute path {link!r}")
    base = posixpath.dirname(member) if relative_to_member else ""
    resolved = posixpath.normpath(posixpath.join(base, link))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchiveError(f"link {member!r} points outside the target directory")


def _check_tar_members(members: list[tarfile.TarInfo]) -> list[str]:
    names = []
    for member in members:
        name = safe_member_path(member.name)
        if member.issym():
            _check_link(name, member.linkname, relative_to_member=True)
        elif member.islnk():
            safe_member_path(member.linkname)
        elif not (member.isfile() or member.isdir()):
            raise UnsafeArchiveError(f"member {member.name!r} is a special file")
        names.append(name)
    return names


def _move_tree_into(scratch: str, target_dir: str, members: list[str]) -> list[str]:
    """Move extracted members from ``scratch`` into ``target_dir``; return the files."""
    outputs = []
    for name in members:
        src = os.path.join(scratch, name)
        dst = os.path.join(target_dir, name)
        if os.path.isdir(src) and not os.path.islink(src):
            os.makedirs(dst, exist_ok=True)
            continue
        if not os.path.lexists(src):  # a member listed twice: already moved
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
        if dst not in outputs:
            outputs.append(dst)
    return outputs


#: tarfile's "data" filter (Python >= 3.11.4) as a second line of defence behind our checks
_TAR_FILTER: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
_TAR_FILTER_ERROR: type[Exception] = getattr(tarfile, "FilterError", UnsafeArchiveError)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


@register("tar", TAR_SUFFIXES)
def untar(path: str, target_dir: str, **options: Any) -> list[str]:
    """Extract a (compressed) tar archive; members keep their relative paths."""
    try:
        with tarfile.open(path, "r:*") as archive:
            members = archive.getmembers()
            member_names = _check_tar_members(members)
            with _temporary_directory(target_dir, "untar") as scratch:
                archive.extractall(scratch, members=members, **_TAR_FILTER)
                return _move_tree_into(scratch, target_dir, member_names)
    except UnsafeArchiveError as err:
        raise UnsafeArchiveError(f"refused {path}: {err}") from None
    except _TAR_FILTER_ERROR as err:
        raise UnsafeArchiveError(f"refused {path}: {err}") from None
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UnpackError(f"cannot extract {path}: {err}") from err


@register("zip", (".zip",))
def unzip(path: str, target_dir: str, **options: Any) -> list[str]:
    """Extract a zip archive; members keep their relative paths, links are refused."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            member_names = []
            for info in infos:
                member_names.append(safe_member_path(info.filename))
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise UnsafeArchiveError(f"member {info.filename!r} is a symbolic link")
            with _temporary_directory(target_dir, "unzip") as scratch:
                for info, name in zip(infos, member_names, strict=True):
                    dest = os.path.join(scratch, name)
                    if info.is_dir():
                        os.makedirs(dest, exist_ok=True)
                        continue
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    with archive.open(info) as fin, open(dest, "wb") as fout:
                        shutil.copyfileobj(fin, fout, CHUNK)
                return _move_tree_into(scratch, target_dir, member_names)
    except UnsafeArchiveError as err:
        raise UnsafeArchiveError(f"refused {path}: {err}") from None
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as err:
        raise UnpackError(f"cannot extract {path}: {err}") from err
