"""The mirror's parts in-process: single flight, staging, the announcement registry, and a
mirror section fetching from a real server section over real ZeroMQ requests."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from posttroll.message import Message

from tests.moveit import wait_for
from tests.servers import free_port
from tests.test_server import RecordingPublisher, new_file, start_section
from trollmoves.config import ConfigError
from trollmoves.mirror import (
    FetchError,
    MirrorSection,
    Registry,
    SingleFlight,
    Staging,
    validate_mirror,
)
from trollmoves.requester import RequesterPool
from trollmoves.server import Section, ServerContext

DEADLINE = 10.0
pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")


def joined(caplog: pytest.LogCaptureFixture, count: int) -> Callable[[], bool]:
    """A predicate: ``count`` callers are waiting for a flight in progress."""
    return lambda: caplog.text.count("Waiting for the call in flight") >= count


@pytest.fixture
def debug_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="trollmoves.mirror")
    return caplog


# -- single flight and staging -----------------------------------------------------------------

def test_concurrent_calls_share_one_execution(debug_log: pytest.LogCaptureFixture) -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    release, calls = threading.Event(), []

    def work() -> int:
        calls.append(1)
        release.wait(DEADLINE)
        return 42

    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(flight.run, "k", work, DEADLINE) for _ in range(5)]
        wait_for(joined(debug_log, 4), DEADLINE, "4 callers joining the first")
        assert flight.in_flight("k")
        release.set()
        assert [f.result(DEADLINE) for f in futures] == [42] * 5
    assert len(calls) == 1 and not flight.in_flight("k")
    assert flight.run("k", lambda: 7) == 7  # a later call runs again


def test_a_failure_reaches_every_caller_and_the_next_call_retries(
        debug_log: pytest.LogCaptureFixture) -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    release = threading.Event()

    def fail() -> int:
        release.wait(DEADLINE)
        raise FetchError("upstream down")

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(flight.run, "k", fail, DEADLINE) for _ in range(3)]
        wait_for(joined(debug_log, 2), DEADLINE, "2 callers joining the first")
        release.set()
        for future in futures:
            with pytest.raises(FetchError, match="upstream down"):
                future.result(DEADLINE)
    assert flight.run("k", lambda: 1) == 1


def test_a_waiting_caller_gives_up_after_its_timeout() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    started, release = threading.Event(), threading.Event()

    def slow() -> int:
        started.set()
        release.wait(DEADLINE)
        return 1

    with ThreadPoolExecutor(1) as pool:
        leader = pool.submit(flight.run, "k", slow)
        assert started.wait(DEADLINE)
        with pytest.raises(TimeoutError):
            flight.run("k", slow, timeout=0.05)
        release.set()
        assert leader.result(DEADLINE) == 1


def test_staged_files_are_reused_while_they_exist(tmp_path: Path) -> None:
    staging, fetched = Staging(), []
    staged = tmp_path / "a.h5"

    def fetch() -> dict[str, str]:
        fetched.append(1)
        staged.write_bytes(b"data")
        return {"/up/a.h5": str(staged)}

    assert staging.get(("a.h5",), fetch) == {"/up/a.h5": str(staged)}
    assert staging.get(("a.h5",), fetch) == staging.staged(("a.h5",))
    assert len(fetched) == 1
    staged.unlink()  # removed after delivery, or by hand
    assert staging.staged(("a.h5",)) == {}
    staging.get(("a.h5",), fetch)
    assert len(fetched) == 2


# -- the announcement registry -----------------------------------------------------------------

def announcement(uid: str, address: str, subject: str = "/1b/hrit", **extra: Any) -> Message:
    return Message(subject, "file", {"uri": f"/src/{uid}", "uid": uid,
                                     "request_address": address, **extra})


def test_registry_relays_a_file_once_and_keeps_every_source() -> None:
    registry = Registry()
    first, second = announcement("a", "10.0.0.1:9"), announcement("a", "10.0.0.2:9")
    assert registry.add(("a",), first)
    assert not registry.add(("a",), second)
    again = announcement("a", "10.0.0.1:9", sensor="seviri")
    assert not registry.add(("a",), again)  # replaces that source's older announcement
    assert registry.sources(("a",)) == [again, second]
    registry.settle(("a",), fetched=False)
    assert registry.add(("a",), second)  # relayed again after a failed fetch
    assert not registry.add(("a",), second)


def test_registry_is_bounded_in_size_and_age() -> None:
    now = [0.0]
    registry = Registry(capacity=2, max_age=60, clock=lambda: now[0])
    for uid in "abc":
        registry.add((uid,), announcement(uid, "h:1"))
    assert len(registry) == 2 and registry.sources(("a",)) == []
    now[0] = 61
    assert registry.add(("b",), announcement("b", "h:1"))  # forgotten: relayed as new
    assert len(registry) == 1


# -- a mirror section against a real server section ---------------------------------------------

@pytest.fixture
def workers() -> Iterator[list[Section]]:
    started: list[Section] = []
    yield started
    for section in started:
        section.stop()
    for section in started:
        section.join(DEADLINE)


def start_mirror(workers: list[Section], tmp_path: Path, **config: Any
                 ) -> tuple[MirrorSection, RecordingPublisher]:
    publisher = RecordingPublisher()
    requesters = RequesterPool()
    settings = {"providers": [f"127.0.0.1:{free_port()}"], "destination": str(tmp_path / "stage"),
                "client_topic": "/1b/hrit", "request_port": free_port(),
                "request_address": "127.0.0.2", "info": "via=mirror", "transfer_req_timeout": 20,
                **config}
    mirror = MirrorSection("hrit", settings, ServerContext(publisher, grace=0), requesters)
    workers.append(mirror)
    mirror.start()
    return mirror, publisher


def upstream_file(workers: list[Section], tmp_path: Path, minute: int = 0
                  ) -> tuple[Section, Message]:
    """A started server section and its announcement of one new file."""
    server, publisher = start_section(workers, tmp_path)
    new_file(tmp_path / "src", minute)
    return server, wait_for(lambda: publisher.sent, DEADLINE, "an announcement")[0]


def push(uid: str, destination: Path, data: dict[str, Any] | None = None) -> Message:
    return Message("/1b/hrit", "push", {**(data or {"uid": uid, "uri": f"/src/{uid}"}),
                                        "destination": str(destination) + "/"})


def count_requests(server: Section, kind: str = "push",
                   before: Callable[[], None] = lambda: None) -> list[Message]:
    """Record the requests of ``kind`` that ``server`` answers; ``before()`` runs first."""
    assert server.requests is not None
    handle, requests = server.requests.handle, []

    def counting(message: Message) -> Message:
        if message.type == kind:
            requests.append(message)
            before()
        return handle(message)

    server.requests.handle = counting
    return requests


def test_relay_with_own_request_address_once_per_file(workers: list[Section],
                                                      tmp_path: Path) -> None:
    mirror, publisher = start_mirror(workers, tmp_path,
                                     origin="/anywhere/H-000-{platform_name}-{time}-__")
    mirror.on_upstream(announcement("H-000-MSG4-1-__", "10.0.0.1:9", sensor="seviri"))
    mirror.on_upstream(announcement("H-000-MSG4-1-__", "10.0.0.2:9"))
    mirror.on_upstream(announcement("other-name", "10.0.0.1:9"))  # does not match origin
    mirror.on_upstream(Message("/1b/hrit", "file", {"uid": "H-000-MSG4-2-__", "uri": "/x"}))
    mirror.on_upstream(Message("/heartbeat/move_it_server", "beat", {"min_interval": 30}))
    [relayed] = publisher.sent
    assert (relayed.subject, relayed.type) == ("/1b/hrit", "file")
    assert relayed.data == {"via": "mirror", "uri": "/src/H-000-MSG4-1-__",
                            "uid": "H-000-MSG4-1-__", "sensor": "seviri",
                            "request_address": f"127.0.0.2:{mirror.config['request_port']}"}
    info = mirror.handle(Message("/1b", "info"))
    assert info.data["files"] == ["/1b/hrit/H-000-MSG4-1-__"]


def test_concurrent_pushes_fetch_once(workers: list[Section], tmp_path: Path,
                                      debug_log: pytest.LogCaptureFixture) -> None:
    server, upstream = upstream_file(workers, tmp_path)
    mirror, _ = start_mirror(workers, tmp_path)
    uid = upstream.data["uid"]
    pushes = count_requests(server, "push", lambda: wait_for(joined(debug_log, 3), DEADLINE))
    mirror.on_upstream(upstream)
    destinations = [tmp_path / f"client{n}" for n in range(4)]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda d: mirror.handle(push(uid, d, upstream.data)),
                                destinations))
    assert [r.type for r in replies] == ["file"] * 4
    assert len(pushes) == 1
    assert pushes[0].data["destination"].endswith(f"{tmp_path}/stage/")
    for destination in destinations:
        assert (destination / uid).read_bytes() == b"segment"
    assert replies[0].data["uri"] == str(tmp_path / "stage" / uid)  # as 0.19 replies
    acks = count_requests(server, "ack")
    mirror.on_upstream(upstream)  # announced again once fetched: acked, as a client does
    wait_for(lambda: acks, DEADLINE, "an ack upstream")
    assert "fetched H-000-MSG4-202611211000-__ from 127.0.0.1" in debug_log.text


def test_ack_and_delete_clean_staging_then_a_push_fetches_again(workers: list[Section],
                                                                tmp_path: Path) -> None:
    server, upstream = upstream_file(workers, tmp_path)
    mirror, _ = start_mirror(workers, tmp_path, delete=True, remove_delay=3600)
    pushes = count_requests(server)
    mirror.on_upstream(upstream)
    uid = upstream.data["uid"]
    staged = tmp_path / "stage" / uid
    assert mirror.handle(push(uid, tmp_path / "one", upstream.data)).type == "file"
    assert staged.exists() and mirror.remover.pending() == 1
    assert mirror.handle(Message("/1b/hrit", "ack", upstream.data)).type == "ack"
    mirror.remove_delay = 0
    mirror.handle(Message("/1b/hrit", "ack", upstream.data))
    wait_for(lambda: not staged.exists(), DEADLINE, "the staged copy removed")
    assert mirror.handle(push(uid, tmp_path / "two", upstream.data)).type == "file"
    assert len(pushes) == 2 and (tmp_path / "two" / uid).exists()


def test_staged_copies_go_after_their_retention_without_delete(workers: list[Section],
                                                                tmp_path: Path) -> None:
    server, upstream = upstream_file(workers, tmp_path)
    mirror, _ = start_mirror(workers, tmp_path, staging_retention=0.2)
    pushes = count_requests(server)
    mirror.on_upstream(upstream)
    uid = upstream.data["uid"]
    staged = tmp_path / "stage" / uid
    assert mirror.handle(push(uid, tmp_path / "one", upstream.data)).type == "file"
    wait_for(lambda: not staged.exists(), DEADLINE, "the staged copy expired")
    assert mirror.handle(push(uid, tmp_path / "two", upstream.data)).type == "file"
    assert len(pushes) == 2 and (tmp_path / "two" / uid).read_bytes() == b"segment"


def test_a_zero_staging_retention_keeps_staged_copies(workers: list[Section],
                                                      tmp_path: Path) -> None:
    _, upstream = upstream_file(workers, tmp_path)
    mirror, _ = start_mirror(workers, tmp_path, staging_retention=0)
    mirror.on_upstream(upstream)
    uid = upstream.data["uid"]
    assert mirror.handle(push(uid, tmp_path / "one", upstream.data)).type == "file"
    assert (tmp_path / "stage" / uid).exists() and mirror.remover.pending() == 0


def test_a_dataset_is_staged_and_delivered_whole(workers: list[Section], tmp_path: Path) -> None:
    _, first = upstream_file(workers, tmp_path)
    second = new_file(tmp_path / "src", 1)
    mirror, publisher = start_mirror(workers, tmp_path)
    items = [{"uid": first.data["uid"], "uri": first.data["uri"]},
             {"uid": second.name, "uri": str(second)}]
    mirror.on_upstream(Message("/1b/hrit", "dataset", {
        "dataset": items, "platform_name": "MSG4",
        "request_address": first.data["request_address"]}))
    [relayed] = publisher.sent
    assert relayed.type == "dataset" and relayed.data["dataset"] == items
    reply = mirror.handle(push("", tmp_path / "dst", relayed.data))
    assert reply.type == "dataset"
    for item in items:
        assert (tmp_path / "stage" / item["uid"]).exists()
        assert (tmp_path / "dst" / item["uid"]).read_bytes() == b"segment"


def test_unreachable_upstream_is_a_prompt_error(workers: list[Section], tmp_path: Path) -> None:
    mirror, publisher = start_mirror(workers, tmp_path, req_timeout=0.2)
    down = announcement("a.h5", f"127.0.0.1:{free_port()}")
    mirror.on_upstream(down)
    started = time.monotonic()
    reply = mirror.handle(push("a.h5", tmp_path / "dst"))
    assert reply.type == "err" and "cannot fetch a.h5 from upstream" in reply.data
    assert "no reply" in reply.data and time.monotonic() - started < 2
    mirror.on_upstream(down)  # announced again: relayed again
    assert len(publisher.sent) == 2


def test_refused_pushes(workers: list[Section], tmp_path: Path) -> None:
    _, upstream = upstream_file(workers, tmp_path)
    mirror, _ = start_mirror(workers, tmp_path)
    mirror.on_upstream(upstream)
    uid = upstream.data["uid"]
    unknown = mirror.handle(push("nope", tmp_path / "dst"))
    assert unknown.type == "err" and "nope was not announced by this mirror" in unknown.data
    forged = mirror.handle(push(uid, tmp_path / "dst", {"uid": uid, "uri": "/etc/passwd"}))
    assert forged.type == "err" and "/etc/passwd is not a file this mirror announced" in forged.data
    assert mirror.handle(Message("/1b/hrit", "push", upstream.data)).type == "err"  # no destination
    assert mirror.handle(Message("/1b/hrit", "ping")).type == "pong"


@pytest.mark.parametrize(("section", "problem"), [
    ({"providers": ["h:1"], "destination": "/stage"}, r"\[m\] request_port: a mirror section"),
    ({"providers": ["h:1"], "destination": "sftp://far.example.com/stage", "request_port": 9},
     r"\[m\] destination: the staging directory must be on this machine"),
    ({"providers": ["h:1"], "destination": "/stage", "request_port": 9, "origin": "/a/{b"},
     r"\[m\] origin: invalid pattern"),
])
def test_whole_file_checks(section: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        validate_mirror("m.ini", {"m": section})
    validate_mirror("m.ini", {"m": {"providers": ["h:1"], "destination": "file:///stage/",
                                    "request_port": 9}})
