"""The sectioned-service runner: start, reload only what changed, keep running on bad edits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.moveit import wait_for
from trollmoves.config import ConfigError
from trollmoves.service import ServiceRunner

DEADLINE = 10.0


class Recorder:
    """A worker factory that records what happens to its workers."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.events: list[tuple[str, str]] = []
        self.fail = fail or set()
        self.lock = threading.Lock()

    def __call__(self, name: str, section: dict[str, Any]) -> Recorder.Worker:
        return Recorder.Worker(self, name, section)

    def log(self, what: str, name: str) -> None:
        with self.lock:
            self.events.append((what, name))

    class Worker:
        def __init__(self, owner: Recorder, name: str, section: dict[str, Any]) -> None:
            self.owner, self.name, self.section = owner, name, section

        def start(self) -> None:
            if self.name in self.owner.fail:
                raise OSError("port in use")
            self.owner.log("start", self.name)

        def stop(self) -> None:
            self.owner.log("stop", self.name)

        def join(self, timeout: float | None = None) -> None:
            self.owner.log("join", self.name)


def server_ini(**sections: str) -> str:
    """A server config: one section per keyword, named after it, watching ``/x/<value>``."""
    return "".join(f"[{name}]\norigin = /x/{origin}\ntopic = /t/{name}\n\n"
                   for name, origin in sections.items())


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "server.ini"
    path.write_text(server_ini(a="{name}", b="{name}"))
    return path


@pytest.fixture
def runner(config: Path) -> Iterator[tuple[ServiceRunner, Recorder]]:
    recorder = Recorder()
    service = ServiceRunner(config, "server", recorder, watch_config=False)
    yield service, recorder
    service.stop()


def test_start_and_reload_only_changed(runner: tuple[ServiceRunner, Recorder],
                                       config: Path) -> None:
    service, recorder = runner
    service.start()
    assert sorted(service.workers) == ["a", "b"]
    recorder.events.clear()
    config.write_text(server_ini(a="{name}", b="{other}.h5", c="{name}"))
    result = service.reload()
    assert (result.added, result.changed, result.removed) == (["c"], ["b"], [])
    assert recorder.events[:2] == [("stop", "b"), ("join", "b")]  # port free before restart
    assert sorted(recorder.events[2:]) == [("start", "b"), ("start", "c")]
    recorder.events.clear()
    config.write_text(server_ini(c="{name}"))
    result = service.reload()
    assert sorted(result.removed) == ["a", "b"] and not result.added
    assert ("start", "c") not in recorder.events
    assert sorted(service.sections) == ["c"]


def test_a_removed_section_is_reported_once_its_worker_stopped(config: Path) -> None:
    recorder = Recorder()
    removed: list[tuple[str, dict[str, Any]]] = []

    def on_removed(name: str, section: Any) -> None:
        recorder.log("removed", name)
        removed.append((name, dict(section)))
        if name == "b":
            raise RuntimeError("a failing clean-up does not stop the reload")

    service = ServiceRunner(config, "server", recorder, watch_config=False,
                            on_removed=on_removed)
    try:
        service.start()
        config.write_text(server_ini(c="{name}"))
        result = service.reload()
        assert sorted(result.removed) == ["a", "b"] and result.added == ["c"]
        for name in ("a", "b"):
            assert recorder.events.index(("join", name)) < recorder.events.index(
                ("removed", name))
        assert sorted(name for name, _ in removed) == ["a", "b"]
        assert all(section["origin"] == "/x/{name}" for _, section in removed)
        assert sorted(service.sections) == ["c"]
    finally:
        service.stop()


def test_bad_edit_keeps_running_sections(runner: tuple[ServiceRunner, Recorder],
                                         config: Path, caplog: pytest.LogCaptureFixture) -> None:
    service, recorder = runner
    service.start()
    recorder.events.clear()
    config.write_text("[a]\norigin = /x/{name}\ntopic = /t\nrequest_port = many\n")
    result = service.reload()
    assert isinstance(result.error, ConfigError)
    assert "[a] request_port" in str(result.error)
    assert recorder.events == []
    assert sorted(service.workers) == ["a", "b"]
    assert "running sections are kept" in caplog.text


def test_bad_file_at_start_raises(tmp_path: Path) -> None:
    path = tmp_path / "bad.ini"
    path.write_text("[a]\ntopic = /t\n")
    with pytest.raises(ConfigError, match="needs origin"):
        ServiceRunner(path, "server", Recorder(), watch_config=False).start()


def test_failed_section_is_retried_on_reload(config: Path) -> None:
    recorder = Recorder(fail={"b"})
    service = ServiceRunner(config, "server", recorder, watch_config=False)
    try:
        assert service.start().failed == ["b"]
        assert sorted(service.workers) == ["a"]
        recorder.fail.clear()
        result = service.reload()
        assert result.changed == ["b"]
        assert sorted(service.workers) == ["a", "b"]
    finally:
        service.stop()


def test_whole_file_checks_skip_the_sections_they_name(config: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    def refuse_b(path: str, sections: dict[str, dict[str, Any]]) -> None:
        if "b" in sections:
            raise ConfigError(path, "b", "request_port", "used twice")

    service = ServiceRunner(config, "server", Recorder(), validate=refuse_b, watch_config=False)
    try:
        assert service.start().invalid == ["b"]
        assert sorted(service.workers) == ["a"]
        assert f"Section b skipped: {config}: [b] request_port: used twice" in caplog.text
    finally:
        service.stop()

    def refuse_all(path: str, sections: dict[str, dict[str, Any]]) -> None:
        raise ConfigError(path, next(iter(sections)), "request_port", "used twice")

    service = ServiceRunner(config, "server", Recorder(), validate=refuse_all, watch_config=False)
    with pytest.raises(ConfigError, match=r"\[a\] request_port: used twice"):
        service.start()  # nothing valid is left


def test_invalid_sections_are_skipped_at_start(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "server.ini"
    path.write_text(server_ini(good="{name}") + "[no_origin]\ntopic = /t\n\n"
                    "[bad_port]\norigin = /x/{name}\ntopic = /t\nrequest_port = many\n")
    recorder = Recorder()
    service = ServiceRunner(path, "server", recorder, watch_config=False)
    try:
        result = service.start()
        assert result.invalid == ["no_origin", "bad_port"] and result.added == ["good"]
        assert sorted(service.workers) == ["good"]
        assert f"Section no_origin skipped: {path}: [no_origin]: needs origin" in caplog.text
        assert f"Section bad_port skipped: {path}: [bad_port] request_port: " in caplog.text
    finally:
        service.stop()


def test_section_edited_into_an_invalid_one_keeps_running(runner: tuple[ServiceRunner, Recorder],
                                                          config: Path) -> None:
    service, recorder = runner
    service.start()
    recorder.events.clear()
    config.write_text(server_ini(b="{name}", c="{name}") + "[a]\ntopic = /t\n")
    result = service.reload()
    assert (result.invalid, result.added, result.changed, result.removed) == (["a"], ["c"], [],
                                                                               [])
    assert recorder.events == [("start", "c")]
    assert sorted(service.workers) == ["a", "b", "c"]


def test_run_reloads_on_file_change_and_stops(config: Path) -> None:
    recorder = Recorder()
    service = ServiceRunner(config, "server", recorder)
    thread = threading.Thread(target=service.run, kwargs={"install_signals": False})
    thread.start()
    try:
        wait_for(lambda: sorted(service.workers) == ["a", "b"])
        tmp = config.with_suffix(".new")
        tmp.write_text(server_ini(a="{name}", d="{name}"))
        os.replace(tmp, config)  # how editors and config managers save
        wait_for(lambda: sorted(service.workers) == ["a", "d"])
        service.request_stop()
        thread.join(DEADLINE)
        assert not thread.is_alive()
        assert ("join", "a") in recorder.events and ("join", "d") in recorder.events
    finally:
        service.request_stop()
        thread.join(DEADLINE)


class Mortal:
    """A worker factory whose workers can be killed; the second start of a section fails."""

    def __init__(self) -> None:
        self.workers: list[Mortal.Worker] = []
        self.starts = 0
        self.lock = threading.Lock()

    def __call__(self, name: str, section: dict[str, Any]) -> Mortal.Worker:
        worker = Mortal.Worker(self)
        with self.lock:
            self.workers.append(worker)
        return worker

    class Worker:
        def __init__(self, owner: Mortal) -> None:
            self.owner = owner
            self.dead = False

        def start(self) -> None:
            with self.owner.lock:
                self.owner.starts += 1
                if self.owner.starts == 2:
                    raise OSError("port in use, this once")

        def stop(self) -> None:
            pass

        def join(self, timeout: float | None = None) -> None:
            pass

        def alive(self) -> bool:
            return not self.dead


def test_dead_worker_is_restarted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "server.ini"
    path.write_text(server_ini(a="{name}"))
    factory = Mortal()
    service = ServiceRunner(path, "server", factory, watch_config=False,
                            restart_backoff=(0.0, 0.0))
    thread = threading.Thread(target=service.run, kwargs={"install_signals": False})
    thread.start()
    try:
        wait_for(lambda: factory.starts == 1)
        factory.workers[0].dead = True  # as a worker whose thread died...
        service.check_workers()  # ...tells the runner
        wait_for(lambda: factory.starts == 3 and "a" in service.workers)  # 2nd start failed
        assert service.workers["a"] is factory.workers[2]
        assert "Section a stopped working; restarting it in 0 s" in caplog.text
        assert "Section a could not start: port in use, this once" in caplog.text
    finally:
        service.request_stop()
        thread.join(DEADLINE)


SIGNAL_SCRIPT = textwrap.dedent("""
    import logging, sys
    from trollmoves.service import ServiceRunner

    class W:
        def __init__(self, name, section):
            self.name = name
        def start(self):
            print("start", self.name, flush=True)
        def stop(self):
            print("stop", self.name, flush=True)
        def join(self, timeout=None):
            print("join", self.name, flush=True)

    ServiceRunner(sys.argv[1], "server", W, watch_config=False).run()
    print("done", flush=True)
""")


def test_signals_reload_and_stop(config: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SIGNAL_SCRIPT, str(config)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        assert [proc.stdout.readline().split() for _ in range(2)] == [["start", "a"],
                                                                      ["start", "b"]]
        config.write_text(server_ini(a="{name}"))
        proc.send_signal(signal.SIGHUP)
        assert proc.stdout.readline().split() == ["stop", "b"]
        assert proc.stdout.readline().split() == ["join", "b"]
        proc.send_signal(signal.SIGTERM)
        rest = proc.stdout.read().split("\n")
        assert rest[:3] == ["stop a", "join a", "done"]
        assert proc.wait(DEADLINE) == 0
    finally:
        proc.kill()
