"""The copy engine on the local and in-memory file systems."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
from upath import UPath

import trollmoves
from trollmoves import errors


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "H-000-MSG4-202611211000-__"
    path.parent.mkdir()
    path.write_bytes(os.urandom(100_000))
    return path


def _no_leftovers(directory: Path) -> None:
    assert not [p.name for p in directory.iterdir() if p.name.endswith(".part")]


def test_copy_hard_links_on_the_same_filesystem(source: Path, tmp_path: Path) -> None:
    result = trollmoves.copy(source, f"{tmp_path}/out/")
    target = tmp_path / "out" / source.name
    assert target.read_bytes() == source.read_bytes()
    assert os.stat(target).st_ino == os.stat(source).st_ino
    assert result.size == 100_000 and result.dst == str(target)
    _no_leftovers(target.parent)


def test_copy_without_hardlink_copies_bytes_and_checks_checksum(source: Path,
                                                                 tmp_path: Path) -> None:
    target = tmp_path / "copy.bin"
    result = trollmoves.copy(source, target, hardlink=False, checksum="sha256")
    assert os.stat(target).st_ino != os.stat(source).st_ino
    assert result.checksum == "sha256:" + hashlib.sha256(source.read_bytes()).hexdigest()
    assert target.read_bytes() == source.read_bytes()


def test_copy_replaces_an_existing_file_atomically(source: Path, tmp_path: Path) -> None:
    target = tmp_path / "t.bin"
    target.write_bytes(b"old")
    trollmoves.copy(source, target, hardlink=False)
    assert target.read_bytes() == source.read_bytes()
    _no_leftovers(tmp_path)


def test_move_renames_and_removes_source(source: Path, tmp_path: Path) -> None:
    data = source.read_bytes()
    trollmoves.move(source, f"file://{tmp_path}/moved/")
    assert not source.exists()
    assert (tmp_path / "moved" / source.name).read_bytes() == data


def test_missing_source_is_a_permanent_clear_error(tmp_path: Path) -> None:
    with pytest.raises(errors.SourceMissingError, match="source not found") as info:
        trollmoves.copy(tmp_path / "nope", tmp_path / "out")
    assert not info.value.transient
    assert not (tmp_path / "out").exists()


def test_missing_directory_is_not_created_when_told_not_to(source: Path, tmp_path: Path) -> None:
    with pytest.raises(errors.DestinationMissingError):
        trollmoves.copy(source, tmp_path / "absent" / "x", create_dirs=False)
    assert not (tmp_path / "absent").exists()


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody may write into: mode 0555, and immutable when we are root."""
    path = tmp_path / "ro"
    path.mkdir()
    path.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    immutable = os.geteuid() == 0
    if immutable and subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
        pytest.skip("cannot make a read-only directory as root here (chattr +i failed)")
    yield path
    if immutable:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    path.chmod(stat.S_IRWXU)


def test_read_only_destination_is_refused(source: Path, read_only_dir: Path) -> None:
    for hardlink in (True, False):
        with pytest.raises(errors.AccessDeniedError, match="permission denied"):
            trollmoves.copy(source, read_only_dir / "x", hardlink=hardlink)
    assert list(read_only_dir.iterdir()) == []


def test_read_only_destination_is_refused_even_for_root(source: Path, tmp_path: Path) -> None:
    # a file where a directory should be cannot be written by anybody
    (tmp_path / "blocker").write_text("not a directory")
    with pytest.raises(errors.TransferError) as info:
        trollmoves.copy(source, tmp_path / "blocker" / "x", hardlink=False)
    assert "blocker" in str(info.value)


def test_memory_filesystem_both_directions_and_between(source: Path, tmp_path: Path) -> None:
    trollmoves.copy(source, "memory://engine-test/a/")
    mem = fsspec.filesystem("memory")
    assert mem.cat_file(f"/engine-test/a/{source.name}") == source.read_bytes()
    trollmoves.copy(f"memory://engine-test/a/{source.name}", "memory://engine-test/b/renamed")
    assert mem.cat_file("/engine-test/b/renamed") == source.read_bytes()
    trollmoves.copy("memory://engine-test/b/renamed", f"{tmp_path}/back/")
    assert (tmp_path / "back" / "renamed").read_bytes() == source.read_bytes()


def test_upath_objects_are_accepted(source: Path, tmp_path: Path) -> None:
    trollmoves.copy(UPath(source), UPath("memory://upath-test/x.bin"))
    trollmoves.copy(UPath("memory://upath-test/x.bin"), UPath(tmp_path) / "y.bin")
    assert (tmp_path / "y.bin").read_bytes() == source.read_bytes()


def test_concurrent_copies_to_the_same_target_never_leave_partial_files(
        source: Path, tmp_path: Path) -> None:
    target = tmp_path / "same.bin"
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            trollmoves.copy(source, target, hardlink=False)
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            failures.append(err)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert target.read_bytes() == source.read_bytes()
    _no_leftovers(tmp_path)


def test_unknown_checksum_algorithm(source: Path, tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigurationError, match="unknown checksum"):
        trollmoves.copy(source, tmp_path / "x", checksum="nosuchhash")


def test_directory_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigurationError, match="must be a file"):
        trollmoves.copy(f"{tmp_path}/", tmp_path / "x")


def test_interrupt_cuts_pauses_under_way_but_not_later_transfers() -> None:
    from trollmoves.transfer import _INTERRUPTS, interrupt_retries

    generation = _INTERRUPTS.current()
    waiter = threading.Thread(target=lambda: results.append(_INTERRUPTS.pause(60, generation)))
    results: list[bool] = []
    waiter.start()
    interrupt_retries()
    waiter.join(10)
    assert results == [True]
    # a transfer started afterwards waits out its pauses
    assert _INTERRUPTS.pause(0.01, _INTERRUPTS.current()) is False


def test_pool_closes_idle_connections_and_restarts_its_janitor() -> None:
    from trollmoves.filesystems import FilesystemPool, endpoint
    from trollmoves.urls import parse

    pool = FilesystemPool()
    ep = endpoint(parse("memory://pool-test/x"), {})
    for _ in range(2):  # the expiry thread ends when the pool empties, and starts again
        with pool.use(ep, uptime=0.05):
            pass
        assert len(pool) == 1
        tick = threading.Event()
        for _ in range(250):  # at most 5 s
            if not len(pool) or tick.wait(0.02):
                break
        assert len(pool) == 0
