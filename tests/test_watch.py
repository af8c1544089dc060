"""Directory watching for origin patterns: inotify and polling, backlog, missing directories.

"Not reported" is checked without waiting for a timeout: a sentinel file written afterwards is
reported after anything that came before it, so once it arrives the queue says everything.
Races of the inotify reader (a directory's files landing before its watch, a full event
queue) are made certain by holding the reader in the sink while the disk changes.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trollmoves import inotify
from trollmoves.watch import OriginPattern, OriginWatcher, nearest_existing_parent

DEADLINE = 10.0


class Sink:
    """Collects reported files in a queue; holds the reporting thread at a file named in
    :attr:`hold_at` until :attr:`release` is set (:attr:`holding` tells it got there)."""

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.hold_at = ""
        self.holding = threading.Event()
        self.release = threading.Event()

    def __call__(self, path: str, fields: dict[str, Any]) -> None:
        self.queue.put((path, fields))
        if path == self.hold_at:
            self.holding.set()
            self.release.wait(DEADLINE)

    def next(self) -> tuple[str, dict[str, Any]]:
        return self.queue.get(timeout=DEADLINE)

    def until(self, path: Path | str) -> list[str]:
        """Every path reported up to and including ``path``."""
        seen = []
        while True:
            got, _ = self.next()
            seen.append(got)
            if got == str(path):
                return seen


@pytest.fixture(params=[False, True], ids=["inotify", "polling"])
def polling(request: pytest.FixtureRequest) -> bool:
    return request.param


@pytest.fixture
def watchers() -> Iterator[list[OriginWatcher]]:
    started: list[OriginWatcher] = []
    yield started
    for watcher in started:
        watcher.stop()
    for watcher in started:
        watcher.join(DEADLINE)


def watch(watchers: list[OriginWatcher], origin: Path | str, polling: bool = False,
          **kwargs: Any) -> Sink:
    sink = Sink()
    watcher = OriginWatcher(str(origin), sink, polling=polling, poll_interval=0.05, **kwargs)
    watchers.append(watcher)
    watcher.start()
    assert watcher.ready.wait(DEADLINE)
    return sink


def write(path: Path, data: bytes = b"data") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- patterns --------------------------------------------------------------------------------

def test_pattern_base_and_recursion() -> None:
    flat = OriginPattern("/data/in/H-{platform}-{time:%Y%m%d%H%M}-__")
    assert (flat.base, flat.recursive) == ("/data/in", False)
    nested = OriginPattern("/data/{platform}/{time:%Y/%m/%d}/{name}.h5")
    assert (nested.base, nested.recursive) == ("/data", True)
    fields = nested.match("/data/npp/2026/11/21/x.h5")
    assert fields is not None and fields["platform"] == "npp" and fields["time"].day == 21
    assert nested.match("/data/npp/extra/2026/11/21/x.h5") is None  # too deep
    assert nested.match("/data/npp/2026/11/21/.x.h5") is None  # hidden: temporary
    assert OriginPattern("/d/{a}/.{b}").match("/d/x/.y") == {"a": "x", "b": "y"}


def test_pattern_directory_levels() -> None:
    nested = OriginPattern("/data/{platform}/{time:%Y/%m/%d}/{name}.h5")
    assert nested.levels == ("*", "????", "??", "??")
    assert nested.may_hold("npp", 1) and nested.may_hold(".staging", 1)
    assert nested.may_hold("2026", 2) and not nested.may_hold("20261", 2)
    assert not nested.may_hold("x", 5)  # below the files' directory
    assert OriginPattern("/data/in/{name}.h5").levels == ()
    assert OriginPattern("/tmp/in/{p}_{t:%Y}/{s}.h5", skip_levels=-3).levels == ("in", "*_????")


def test_pattern_skip_levels() -> None:
    origin = "/tmp/in/{platform}_{time:%Y%m%d}/{sensor}_{platform}.h5"
    assert OriginPattern(origin, skip_levels=-2).base == "/tmp/in"
    assert OriginPattern(origin, skip_levels=-3).base == "/tmp"
    assert OriginPattern(origin, skip_levels=-1).base == "/tmp/in"  # a field: ignored


def test_nearest_existing_parent(tmp_path: Path) -> None:
    assert nearest_existing_parent(str(tmp_path / "a" / "b")) == str(tmp_path)


# -- both watching methods -------------------------------------------------------------------

def test_new_files_reported_once(watchers: list[OriginWatcher], tmp_path: Path,
                                 polling: bool) -> None:
    sink = watch(watchers, tmp_path / "H-{platform}-{num:d}.dat", polling)
    written = write(tmp_path / "H-MSG4-1.dat")
    path, fields = sink.next()
    assert (path, fields) == (str(written), {"platform": "MSG4", "num": 1})
    write(tmp_path / "H-MSG4-2.dat", b"")  # empty: skipped
    write(tmp_path / "other.txt")  # no match
    write(tmp_path / ".H-MSG4-3.dat")  # hidden
    with open(written, "ab"):  # opened for writing and closed, unchanged: the same file
        pass
    sentinel = write(tmp_path / "H-MSG4-9.dat")
    seen = sink.until(sentinel)
    assert str(tmp_path / "H-MSG4-2.dat") not in seen
    assert all("other" not in p and "/.H" not in p for p in seen)


def test_backlog(watchers: list[OriginWatcher], tmp_path: Path, polling: bool) -> None:
    old = [write(tmp_path / f"f{i}.dat") for i in range(3)]
    write(tmp_path / "empty.dat", b"")
    sink = watch(watchers, tmp_path / "{name}.dat", polling)
    assert [sink.next()[0] for _ in old] == [str(p) for p in old]
    sentinel = write(tmp_path / "new.dat")
    assert sink.until(sentinel) == [str(sentinel)]


def test_backlog_disabled(watchers: list[OriginWatcher], tmp_path: Path, polling: bool) -> None:
    write(tmp_path / "old.dat")
    sink = watch(watchers, tmp_path / "{name}.dat", polling, backlog=False)
    sentinel = write(tmp_path / "new.dat")
    assert sink.until(sentinel) == [str(sentinel)]


def test_missing_directory_is_waited_for(watchers: list[OriginWatcher], tmp_path: Path,
                                         polling: bool, caplog: pytest.LogCaptureFixture
                                         ) -> None:
    caplog.set_level(logging.INFO, logger="trollmoves.watch")
    base = tmp_path / "not" / "yet"
    watcher_sink = watch(watchers, base / "{name}.dat", polling, name="late")
    assert f"directory {base} does not exist yet" in caplog.text
    base.mkdir(parents=True)
    first = write(base / "a.dat")
    assert watcher_sink.next()[0] == str(first)
    assert f"directory {base} appeared" in caplog.text
    second = write(base / "b.dat")
    assert watcher_sink.until(second)[-1] == str(second)


def test_nested_pattern(watchers: list[OriginWatcher], tmp_path: Path, polling: bool) -> None:
    sink = watch(watchers, tmp_path / "{platform}" / "{day}" / "{name}.h5", polling)
    deep = write(tmp_path / "npp" / "20261121" / "x.h5")
    path, fields = sink.next()
    assert (path, fields) == (str(deep), {"platform": "npp", "day": "20261121", "name": "x"})
    write(tmp_path / "npp" / "y.h5")  # not deep enough
    sentinel = write(tmp_path / "j01" / "20261121" / "z.h5")
    assert sink.until(sentinel) == [str(sentinel)]


# -- inotify specifics -----------------------------------------------------------------------

def test_moved_in_and_renamed_files(watchers: list[OriginWatcher], tmp_path: Path) -> None:
    incoming = tmp_path / "in"
    incoming.mkdir()
    sink = watch(watchers, incoming / "{name}.dat")
    outside = write(tmp_path / "outside.dat")
    os.rename(outside, incoming / "moved.dat")
    assert sink.next()[0] == str(incoming / "moved.dat")
    partial = write(incoming / "partial.tmp")  # written under another name, then renamed
    os.rename(partial, incoming / "renamed.dat")
    assert sink.next()[0] == str(incoming / "renamed.dat")


def test_file_open_for_writing_is_not_reported(watchers: list[OriginWatcher],
                                               tmp_path: Path) -> None:
    sink = watch(watchers, tmp_path / "{name}.dat")
    with open(tmp_path / "slow.dat", "wb") as handle:
        handle.write(b"first half")
        handle.flush()
        sentinel = write(tmp_path / "sentinel.dat")
        assert sink.until(sentinel) == [str(sentinel)]
        handle.write(b"second half")
    assert sink.next()[0] == str(tmp_path / "slow.dat")


def test_directory_tree_moved_in(watchers: list[OriginWatcher], tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    sink = watch(watchers, base / "{platform}" / "{name}.h5")
    staging = tmp_path / "staging" / "npp"
    write(staging / "a.h5")
    write(staging / "b.h5")
    os.rename(staging, base / "npp")
    assert sorted([sink.next()[0], sink.next()[0]]) == [str(base / "npp" / "a.h5"),
                                                        str(base / "npp" / "b.h5")]


def test_base_directory_deleted_and_recreated(watchers: list[OriginWatcher],
                                              tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    sink = watch(watchers, base / "{name}.dat")
    first = write(base / "a.dat")
    assert sink.next()[0] == str(first)
    shutil.rmtree(base)
    base.mkdir()
    again = write(base / "b.dat")
    assert sink.until(again)[-1] == str(again)


def test_symlinked_base_reports_configured_paths(watchers: list[OriginWatcher],
                                                 tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    sink = watch(watchers, tmp_path / "link" / "{name}.dat")
    write(real / "x.dat")
    assert sink.next()[0] == str(tmp_path / "link" / "x.dat")


def test_base_directory_moved_away_and_recreated(watchers: list[OriginWatcher],
                                                tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    sink = watch(watchers, base / "{name}.dat")
    first = write(base / "a.dat")
    assert sink.next()[0] == str(first)
    os.rename(base, tmp_path / "old")
    write(tmp_path / "old" / "stale.dat")  # no longer in the watched place: never reported
    base.mkdir()
    again = write(base / "b.dat")
    assert sink.until(again) == [str(again)]


def test_waited_for_parent_removed_too(watchers: list[OriginWatcher], tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    base = tmp_path / "a" / "b" / "c"
    sink = watch(watchers, base / "{name}.dat")
    shutil.rmtree(tmp_path / "a")  # the directory watched while waiting goes too
    first = write(base / "x.dat")  # creates a, b and c again
    assert sink.next()[0] == str(first)


def test_files_of_a_directory_created_before_its_watch_are_found(
        watchers: list[OriginWatcher], tmp_path: Path) -> None:
    sink = watch(watchers, tmp_path / "{platform}" / "{day}" / "{name}.h5")
    sink.hold_at = str(tmp_path / "npp" / "1" / "hold.h5")
    write(Path(sink.hold_at))
    assert sink.holding.wait(DEADLINE)
    # the reader is held: j01/2 and its files exist before they can be watched
    early = [write(tmp_path / "j01" / "2" / f"{name}.h5") for name in ("a", "b")]
    sink.release.set()
    assert sorted(p for p, _ in [sink.next(), sink.next(), sink.next()]) == sorted(
        [sink.hold_at, *map(str, early)])
    later = write(tmp_path / "j01" / "2" / "c.h5")  # and it is watched from now on
    assert sink.until(later)[-1] == str(later)


def test_directory_moved_out_is_not_watched_any_more(watchers: list[OriginWatcher],
                                                     tmp_path: Path) -> None:
    base = tmp_path / "base"
    sink = watch(watchers, base / "{platform}" / "{name}.h5")
    first = write(base / "npp" / "a.h5")
    assert sink.next()[0] == str(first)
    os.rename(base / "npp", tmp_path / "npp")
    write(tmp_path / "npp" / "b.h5")  # outside: its events must not name base/npp/b.h5
    os.rename(tmp_path / "npp", base / "j01")  # back in under another name: watched again
    sentinel = write(base / "j01" / "c.h5")
    seen = sink.until(sentinel)
    assert str(base / "npp" / "b.h5") not in seen
    assert str(base / "j01" / "b.h5") in seen  # found by the scan of the moved-in directory


def test_directories_the_pattern_cannot_use_are_not_watched(watchers: list[OriginWatcher],
                                                            tmp_path: Path) -> None:
    (tmp_path / "20261121").mkdir()
    (tmp_path / "not-a-day" / "deeper").mkdir(parents=True)
    sink = watch(watchers, tmp_path / "{day:%Y%m%d}" / "{name}.h5")
    watched = sorted(path for path, _ in watchers[-1]._dirs.values())
    assert watched == [str(tmp_path), str(tmp_path / "20261121")]
    sentinel = write(tmp_path / "20261121" / "a.h5")
    assert sink.until(sentinel) == [str(sentinel)]


def test_event_queue_overflow_is_followed_by_a_scan(watchers: list[OriginWatcher],
                                                    tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 1_000_000:
        pytest.skip(f"the inotify queue holds {limit} events: too many to fill")
    caplog.set_level(logging.INFO, logger="trollmoves.watch")
    sink = watch(watchers, tmp_path / "{name}.dat", name="full")
    sink.hold_at = str(tmp_path / "hold.dat")  # named before it exists: the reader is fast
    write(Path(sink.hold_at))
    assert sink.holding.wait(DEADLINE)
    pair = [write(tmp_path / "a.dat"), write(tmp_path / "b.dat")]
    for number in range(limit + 10):  # a close after writing each, alternating: none merged
        os.close(os.open(pair[number % 2], os.O_WRONLY))
    lost = write(tmp_path / "lost.dat")  # its event finds the queue full
    sink.release.set()
    assert sink.until(lost)[-1] == str(lost)
    sentinel = write(tmp_path / "sentinel.dat")  # reported once the scan is over
    assert sink.until(sentinel) == [str(sentinel)]
    assert "full: the inotify event queue overflowed; scanning" in caplog.text
    assert "full: 1 file(s) not reported yet" in caplog.text


def test_inotify_events_are_parsed(tmp_path: Path) -> None:
    with inotify.Inotify() as ino:
        wd = ino.add_watch(str(tmp_path), inotify.IN_CLOSE_WRITE | inotify.IN_CREATE)
        assert ino.read() == []  # nothing yet, and no blocking
        (tmp_path / "sub").mkdir()
        write(tmp_path / "file-with-a-long-name.dat")
        events = ino.read()
        assert [(e.wd, e.name) for e in events] == [
            (wd, "sub"), (wd, "file-with-a-long-name.dat"), (wd, "file-with-a-long-name.dat")]
        assert events[0].mask & inotify.IN_ISDIR and events[2].mask & inotify.IN_CLOSE_WRITE
        assert ino.rm_watch(wd) and not ino.rm_watch(wd)
        with pytest.raises(FileNotFoundError):
            ino.add_watch(str(tmp_path / "missing"), inotify.IN_CREATE)


# -- directories inotify cannot watch ---------------------------------------------------------

UNWATCHABLE_SCRIPT = textwrap.dedent("""
    import os, queue, resource, sys
    from trollmoves.watch import OriginWatcher

    directory, how = sys.argv[1], sys.argv[2]
    files = queue.Queue()
    watcher = OriginWatcher(directory + "/{name}.dat", lambda path, fields: files.put(path),
                            poll_interval=0.05)
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    if how == "no-descriptors":  # inotify needs a file descriptor: none is left
        lowest_free = os.dup(0)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, limits[1]))
    watcher.start()  # must return, not retry at full speed
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    os.chmod(directory, 0o755)
    with open(directory + "/a.dat", "w") as handle:
        handle.write("data")
    print("polling" if watcher.polling else "inotify", files.get(timeout=20), flush=True)
    watcher.stop()
    watcher.join()
""")


def _command(how: str, directory: Path) -> list[str]:
    """Run the script where inotify cannot watch ``directory``, for a real reason."""
    script = [sys.executable, "-c", UNWATCHABLE_SCRIPT, str(directory), how]
    if how == "watch-limit":  # a user namespace of our own, allowed no inotify watch at all
        unshare = shutil.which("unshare")
        probe = subprocess.run([unshare or "unshare", "--user", "--map-root-user", "true"],
                               capture_output=True) if unshare else None
        if probe is None or probe.returncode != 0:
            pytest.skip("no user namespaces here (unshare --user)")
        limit = "echo 0 > /proc/sys/user/max_inotify_watches && exec \"$@\""
        return [unshare, "--user", "--map-root-user", "sh", "-c", limit, "sh", *script]
    if how == "unreadable":
        directory.chmod(0o000)
        if os.geteuid() == 0:  # root reads anything: drop that privilege
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root without setpriv")
            return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *script]
    return script


@pytest.mark.parametrize("how", ["watch-limit", "no-descriptors", "unreadable"])
def test_unwatchable_directory_is_polled(tmp_path: Path, how: str) -> None:
    directory = tmp_path / "in"
    directory.mkdir()
    run = subprocess.run(_command(how, directory), capture_output=True, text=True,
                         timeout=2 * DEADLINE)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["polling", str(directory / "a.dat")]
    assert f"cannot watch {directory} with inotify" in run.stderr
    assert "polling it every 0.05 s instead" in run.stderr


def _inotify_descriptors() -> int:
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            found += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        except OSError:
            continue
    return found


def test_a_reader_join_gave_up_on_closes_its_inotify_when_it_ends(tmp_path: Path) -> None:
    sink = Sink()
    watcher = OriginWatcher(str(tmp_path / "{name}.dat"), sink, poll_interval=0.05)
    before = _inotify_descriptors()
    watcher.start()
    assert watcher.ready.wait(DEADLINE) and _inotify_descriptors() == before + 1
    sink.hold_at = str(tmp_path / "hold.dat")
    write(Path(sink.hold_at))
    assert sink.holding.wait(DEADLINE)  # the reader is busy in the sink
    watcher.stop()
    watcher.join(0.01)  # gives up: the reader is still held
    assert watcher._reader is not None and watcher._reader.is_alive()
    sink.release.set()
    watcher._reader.join(DEADLINE)
    assert _inotify_descriptors() == before
