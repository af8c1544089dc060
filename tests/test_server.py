"""The server's parts in-process: message builders, request socket (real ZeroMQ), sections
(real posttroll publisher), path checks, delayed removal, unpacking."""

from __future__ import annotations

import bz2
import datetime as dt
import gzip
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from posttroll.message import Message
from posttroll.publisher import Publisher

from tests.moveit import Listener, wait_for
from tests.servers import free_port
from tests.test_unpack import make_tar
from trollmoves import announce, check
from trollmoves.config import ConfigError
from trollmoves.removal import DelayedRemover
from trollmoves.request_server import EAGER_WORKERS, RequestServer, Workers
from trollmoves.server import Section, ServerContext, destination_for, validate_sections
from trollmoves.service import ServiceRunner

DEADLINE = 10.0
ORIGIN = "H-000-{platform_name}-{nominal_time:%Y%m%d%H%M}-__"
pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")


# -- message builders --------------------------------------------------------------------------

def test_info_items() -> None:
    assert announce.parse_info("sensor=seviri; variant=0DEG;channels=VIS006, IR_108;;bad") == {
        "sensor": "seviri", "variant": "0DEG", "channels": ["VIS006", "IR_108"]}
    assert announce.parse_info(None) == {}


def test_request_mode_announcement_has_the_0_19_shape() -> None:
    section = {"topic": "/1b/hrit", "info": "sensor=seviri;variant=0DEG", "request_port": 49643,
               "request_address": "127.0.0.1"}
    fields = {"platform_name": "MSG4", "nominal_time": dt.datetime(2026, 11, 21, 10)}
    info = announce.announcement_info(section, "/src/H-000-MSG4-202611211000-__", fields)
    assert list(info) == ["sensor", "variant", "platform_name", "nominal_time", "uri", "uid",
                          "request_address"]
    assert info["uid"] == "H-000-MSG4-202611211000-__"
    assert info["request_address"] == "127.0.0.1:49643"
    encoded = Message("/1b/hrit", "file", info).encode()
    assert '"nominal_time": "2026-11-21T10:00:00"' in encoded
    assert announce.request_address({"request_port": 9}) == f"{announce.own_ip()}:9"


def test_standalone_announcement() -> None:
    section = {"topic": "/x", "info": "sensor=viirs",
               "filesystem": {"protocol": "ssh", "host": "vm", "password": "no!"}}
    info = announce.announcement_info(section, "/src/npp.h5", {"platform_name": "npp"})
    assert info["filesystem"] == {"cls": "sshfs.spec:SSHFileSystem", "protocol": "ssh",
                                  "args": [], "host": "vm"}
    assert info["uri"] == info["uid"] == "ssh://vm/src/npp.h5"
    assert info["sensor"] == "viirs" and info["platform_name"] == "npp"


def test_replies() -> None:
    request = Message("/t", "push", {"uri": "/a", "destination": "sftp://u:pw@host:22/d/"})
    reply = announce.push_reply(request)
    assert (reply.type, reply.data["destination"]) == ("file", "sftp://host:22/d/")
    assert request.data["destination"].startswith("sftp://u:pw@")  # the request is untouched
    assert announce.push_reply(Message("/t", "push", {"dataset": []})).type == "dataset"
    assert announce.ack_reply(request).data["destination"] == "sftp://host:22/d/"
    assert announce.pong(request, None).data == {"station": "unknown"}
    assert announce.unknown_reply(request).type == "unknown"
    assert announce.clean_url("/local/path") == "/local/path"


def test_destination_for(tmp_path: Path) -> None:
    assert destination_for("sftp://h/d/", "sub/x/") == "sftp://h/d/sub/x/"
    assert destination_for("file://vm/d/name") == "file://vm/d/name"
    assert destination_for(str(tmp_path)) == f"{tmp_path}/"  # an existing directory
    assert destination_for(f"file://host{tmp_path}") == f"file://host{tmp_path}/"


def test_whole_file_checks() -> None:
    sections = {"a": {"request_port": 9}, "b": {"request_port": 9}}
    with pytest.raises(ConfigError, match=r"\[b\] request_port: port 9 is already used by "):
        validate_sections("x.ini", sections)
    with pytest.raises(ConfigError, match=r"\[a\] prog: compression = xrit needs prog"):
        validate_sections("x.ini", {"a": {"compression": "xrit"}})
    with pytest.raises(ConfigError, match=r"\[a\] origin: invalid pattern: expected '}'"):
        validate_sections("x.ini", {"a": {"origin": "/data/{name"}})


# -- delayed removal ---------------------------------------------------------------------------

def test_delayed_removal(tmp_path: Path) -> None:
    remover = DelayedRemover("test")
    remover.start()
    try:
        soon, later = tmp_path / "soon", tmp_path / "later"
        soon.write_text("x")
        later.write_text("x")
        remover.schedule(str(later), 3600)
        remover.schedule(str(soon), 3600)
        remover.schedule(str(soon), 0)  # the earlier time wins
        remover.schedule(str(soon), 3600)
        wait_for(lambda: not soon.exists(), DEADLINE)
        assert later.exists() and remover.pending() == 1
    finally:
        remover.stop()
        remover.join(DEADLINE)
    assert later.exists()  # not due: left alone at stop


# -- the request socket ------------------------------------------------------------------------

class Requester:
    """A REQ socket like trollmoves 0.19's client (one request, one reply)."""

    def __init__(self, port: int) -> None:
        self.sock = zmq.Context.instance().socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, int(DEADLINE * 1000))
        self.sock.connect(f"tcp://127.0.0.1:{port}")

    def __call__(self, kind: str, data: Any = None, subject: str = "/t") -> Message:
        self.sock.send_string(Message(subject, kind, data if data is not None else {}).encode())
        return Message(rawstr=self.sock.recv())

    def close(self) -> None:
        self.sock.close(0)


class SlowHandler:
    """Answers ``ping`` at once; ``push`` waits at a barrier, so two pushes must overlap."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=DEADLINE)
        self.release = threading.Event()
        self.overlapping = threading.Event()

    def __call__(self, message: Message) -> Message:
        if message.type == "push":
            self.barrier.wait()  # raises unless another push is in the handler too
            self.overlapping.set()
            self.release.wait(DEADLINE)
            return Message(message.subject, "file", message.data)
        if message.type == "boom":
            raise RuntimeError("handler bug")
        return announce.pong(message, "here")


@pytest.fixture
def request_server() -> Iterator[tuple[RequestServer, SlowHandler]]:
    handler = SlowHandler()
    server = RequestServer("test", free_port(), handler, lambda m: m.type == "push",
                           max_bytes=4096)
    server.start()
    yield server, handler
    handler.release.set()
    server.stop()
    server.join(DEADLINE)


def overlapping_pushes(server: RequestServer, handler: SlowHandler
                       ) -> tuple[list[threading.Thread], list[Message], list[Requester]]:
    """Two pushes from two clients, both inside the handler when this returns."""
    clients = [Requester(server.port) for _ in range(2)]
    replies: list[Message] = []
    threads = [threading.Thread(target=lambda c=c: replies.append(c("push", {"uri": "/a"})))
               for c in clients]
    for thread in threads:
        thread.start()
    assert handler.overlapping.wait(DEADLINE)
    return threads, replies, clients


def test_pushes_run_concurrently(request_server: tuple[RequestServer, SlowHandler]) -> None:
    server, handler = request_server
    threads, replies, clients = overlapping_pushes(server, handler)
    pinger = Requester(server.port)
    assert pinger("ping").type == "pong"  # answered while both pushes are in flight
    handler.release.set()
    for thread in threads:
        thread.join(DEADLINE)
    assert [r.type for r in replies] == ["file", "file"]
    for client in [*clients, pinger]:
        client.close()


def _release_and_stop(release: threading.Event, threads: list[threading.Thread],
                      server: RequestServer, clients: list[Any]) -> None:
    """Let the held handlers go, then stop the threads, the server and the clients."""
    release.set()
    for thread in threads:
        thread.join(DEADLINE)
    server.stop()
    server.join(DEADLINE)
    for client in clients:
        client.close()


def test_slow_pushes_beyond_the_eager_workers_still_run_side_by_side() -> None:
    handler = SlowHandler()
    handler.barrier = threading.Barrier(EAGER_WORKERS + 2, timeout=DEADLINE)
    server = RequestServer("test", free_port(), handler, lambda m: m.type == "push", workers=8)
    server.start()
    clients = [Requester(server.port) for _ in range(EAGER_WORKERS + 2)]
    replies: list[Message] = []
    threads = [threading.Thread(target=lambda c=c: replies.append(c("push", {"uri": "/a"})))
               for c in clients]
    try:
        for thread in threads:
            thread.start()
        assert handler.overlapping.wait(DEADLINE)  # all of them in the handler at once
    finally:
        _release_and_stop(handler.release, threads, server, clients)
    assert [r.type for r in replies] == ["file"] * len(clients)


class Calls:
    """Calls that record their order and may block until released."""

    def __init__(self) -> None:
        self.done: list[int] = []
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()
        self.threads: set[str] = set()

    def quick(self, number: int) -> None:
        self.threads.add(threading.current_thread().name)
        self.done.append(number)

    def blocking(self, number: int) -> None:
        self.entered.release()
        assert self.release.wait(DEADLINE)
        self.quick(number)


def test_workers_run_quick_calls_in_order_on_few_threads() -> None:
    pool, calls = Workers(8, "quick", eager=1, wait=3600), Calls()
    last = threading.Event()
    for number in range(20):
        pool.submit(calls.quick, number)
    pool.submit(last.set)
    assert last.wait(DEADLINE)
    assert calls.done == list(range(20))
    assert calls.threads == {"quick_0"}  # one thread kept up: no other was woken
    pool.shutdown()


def test_workers_wake_more_threads_for_calls_that_wait() -> None:
    pool, calls = Workers(3, "slow", eager=1, wait=0), Calls()
    try:
        for number in range(4):
            pool.submit(calls.blocking, number)
        assert calls.entered.acquire(timeout=DEADLINE)  # the eager one
        assert pool.patience() == 0.0
        pool.spread()  # the owner's duty once patience() has passed: two more threads
        assert calls.entered.acquire(timeout=DEADLINE)
        assert calls.entered.acquire(timeout=DEADLINE)
        assert pool.patience() is None  # the fourth waits: every thread is busy
    finally:
        calls.release.set()
        pool.shutdown()  # runs the fourth too
    assert sorted(calls.done) == [0, 1, 2, 3]
    assert len(calls.threads) == 3


def test_a_failing_call_leaves_the_worker_running(caplog: pytest.LogCaptureFixture) -> None:
    pool, calls = Workers(1, "failing"), Calls()
    pool.submit(lambda: 1 / 0)
    pool.submit(calls.quick, 1)
    pool.shutdown()
    assert calls.done == [1]
    assert "failing: a call failed" in caplog.text


def test_stop_finishes_requests_in_flight(request_server: tuple[RequestServer, SlowHandler]
                                          ) -> None:
    server, handler = request_server
    threads, replies, clients = overlapping_pushes(server, handler)
    server.stop()
    handler.release.set()
    server.join(DEADLINE)
    for thread in threads:
        thread.join(DEADLINE)
    assert [r.type for r in replies] == ["file", "file"]
    for client in clients:
        client.close()


def test_handler_failure_still_gets_a_reply(request_server: tuple[RequestServer, SlowHandler]
                                            ) -> None:
    client = Requester(request_server[0].port)
    reply = client("boom")
    assert (reply.type, reply.data) == ("err", "server error: RuntimeError")
    client.close()


class BlockingHandler:
    """Holds every push until released; counts the pushes it was given."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()
        self.handled = 0

    def __call__(self, message: Message) -> Message:
        self.handled += 1
        self.entered.release()
        self.release.wait(DEADLINE)
        return Message(message.subject, "file", message.data)


def start_blocking_server(**options: Any) -> tuple[RequestServer, BlockingHandler]:
    handler = BlockingHandler()
    server = RequestServer("test", free_port(), handler, lambda m: m.type == "push", workers=1,
                           **options)
    server.start()
    return server, handler


def test_busy_reply_when_too_many_pushes_wait() -> None:
    server, handler = start_blocking_server(max_pending=2)
    clients = [Requester(server.port) for _ in range(3)]
    replies: dict[int, Message] = {}
    threads = [threading.Thread(target=lambda i=i: replies.update({i: clients[i]("push")}))
               for i in range(2)]
    try:
        threads[0].start()
        assert handler.entered.acquire(timeout=DEADLINE)  # the only worker is busy
        threads[1].start()  # waits for the worker
        wait_for(lambda: server.pending == 2, DEADLINE)
        busy = clients[2]("push")  # answered at once, while the others still wait
        assert (busy.type, busy.data) == ("err", "server busy, retry later")
    finally:
        _release_and_stop(handler.release, threads, server, clients)
    assert [replies[i].type for i in range(2)] == ["file", "file"]
    assert handler.handled == 2


def test_push_that_waited_too_long_is_not_handled() -> None:
    server, handler = start_blocking_server(expire_after=0)
    client = Requester(server.port)
    try:
        reply = client("push", {"uri": "/a"})
        assert reply.type == "err" and reply.data.startswith("server busy, retry later")
        assert handler.handled == 0
    finally:
        server.stop()
        server.join(DEADLINE)
        client.close()


@pytest.mark.parametrize(("frames", "problem"), [
    ([b"", b"\x00\xff random \x80 bytes"], "not a posttroll message"),
    ([b"", b"GET / HTTP/1.1"], "not a posttroll message"),
    ([b"", b"pytroll://t push"], "not a posttroll message"),
    ([b"no envelope"], "expected exactly one message frame"),
    ([b"", b"a", b"b"], "expected exactly one message frame"),
    ([b"", b"x" * 5000], "request too large"),
])
def test_malformed_requests_get_an_error(request_server: tuple[RequestServer, SlowHandler],
                                         frames: list[bytes], problem: str,
                                         caplog: pytest.LogCaptureFixture) -> None:
    server, _ = request_server
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{server.port}")
    try:
        dealer.send_multipart(frames)
        assert dealer.poll(int(DEADLINE * 1000))
        reply = Message(rawstr=dealer.recv_multipart()[-1])
        assert reply.type == "err" and problem in reply.data
        assert "refused a request from 127.0.0.1" in caplog.text
    finally:
        dealer.close(0)
    client = Requester(server.port)
    assert client("ping").type == "pong"  # still serving
    client.close()


# -- sections ----------------------------------------------------------------------------------

class RecordingPublisher:
    """Stands in for posttroll's Publisher: keeps what is sent."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send(self, text: str) -> None:
        self.sent.append(Message(rawstr=text))


@pytest.fixture
def sections() -> Iterator[list[Section]]:
    started: list[Section] = []
    yield started
    for section in started:
        section.stop()
    for section in started:
        section.join(DEADLINE)


def start_section(sections: list[Section], tmp_path: Path, publisher: Any = None,
                  **config: Any) -> tuple[Section, Any]:
    publisher = publisher or RecordingPublisher()
    context = ServerContext(publisher, grace=0)
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    settings = {"origin": str(src / ORIGIN), "topic": "/1b/hrit", "request_port": free_port(),
                "request_address": "127.0.0.1", "info": "sensor=seviri", "station": "st1",
                **config}
    section = Section("hrit", settings, context)
    sections.append(section)
    section.start()
    assert section.watcher is not None and section.watcher.ready.wait(DEADLINE)
    return section, publisher


def new_file(directory: Path, minute: int, data: bytes = b"segment", suffix: str = "") -> Path:
    path = directory / f"H-000-MSG4-2026112110{minute:02d}-__{suffix}"
    path.write_bytes(data)
    return path


def announced(publisher: RecordingPublisher, count: int = 1) -> list[Message]:
    return wait_for(lambda: publisher.sent if len(publisher.sent) >= count else None, DEADLINE)


def test_section_announces_and_serves(sections: list[Section], tmp_path: Path) -> None:
    section, publisher = start_section(sections, tmp_path)
    src = new_file(tmp_path / "src", 0)
    [message] = announced(publisher)
    assert (message.subject, message.type) == ("/1b/hrit", "file")
    assert message.data["uri"] == str(src)
    assert message.data["request_address"] == f"127.0.0.1:{section.config['request_port']}"
    client = Requester(section.config["request_port"])
    try:
        assert client("ping").data == {"station": "st1"}
        info = client("info", {"max_count": 10}, subject="/1b/hrit")
        assert info.data["files"] == ["/1b/hrit/H-000-MSG4-202611211000-__"]
        dst = tmp_path / "dst"
        reply = client("push", {**message.data, "destination": f"file://u:secret@vm{dst}/"})
        assert reply.type == "file", reply.data
        assert reply.data["destination"] == f"file://vm{dst}/"
        assert reply.data["request_address"] == message.data["request_address"]
        assert (dst / src.name).read_bytes() == b"segment"
        rel = client("push", {**message.data, "path": "sub/renamed", "destination": f"{dst}/"})
        assert rel.type == "file" and (dst / "sub" / "renamed").exists()
        assert client("whatever").type == "unknown"
        assert src.exists()  # delete is not set
    finally:
        client.close()


def test_push_retries_end_before_the_requester_gives_up(sections: list[Section],
                                                      tmp_path: Path) -> None:
    section, _ = start_section(sections, tmp_path, transfer_req_timeout=4)
    assert section.retry.budget < section.transfer_req_timeout == 4
    assert section.requests is not None and section.requests.expire_after == 4


def test_push_path_checks(sections: list[Section], tmp_path: Path) -> None:
    section, _ = start_section(sections, tmp_path)
    src_dir = tmp_path / "src"
    (src_dir / "H-000-MSG4-202611211001-__").symlink_to("/etc/passwd")
    outside = tmp_path / "H-000-MSG4-202611211002-__"
    outside.write_text("secret")
    unannounced = new_file(src_dir, 3)  # matches the pattern: served even if not yet announced
    client = Requester(section.config["request_port"])
    dst = tmp_path / "dst"
    try:
        for uri in ["/etc/passwd", f"{src_dir}/../../../etc/passwd",
                    f"{src_dir}/H-000-MSG4-202611211001-__",
                    f"{src_dir}/../H-000-MSG4-202611211002-__",
                    f"sftp://elsewhere{src_dir}/H-000-MSG4-202611211000-__"]:
            reply = client("push", {"uri": uri, "destination": f"{dst}/"})
            assert reply.type == "err", uri
            assert "not served" in reply.data or "not a local file" in reply.data
        assert not dst.exists()
        missing = client("push", {"uri": f"{src_dir}/H-000-MSG4-202611211009-__",
                                  "destination": f"{dst}/"})
        assert missing.type == "err" and "not found" in missing.data
        assert client("push", {"uri": str(unannounced), "destination": f"{dst}/"}).type == "file"
        assert client("push", {"uri": str(unannounced)}).data == "a push needs a destination"
        assert client("push", "text").type == "err"
        assert client("ack", {"nothing": 1}).data == "no file (uri) in the request"
    finally:
        client.close()


def test_delete_after_push_and_ack(sections: list[Section], tmp_path: Path) -> None:
    section, publisher = start_section(sections, tmp_path, delete=True, remove_delay=0)
    pushed, acked = new_file(tmp_path / "src", 0), new_file(tmp_path / "src", 1)
    first, second = announced(publisher, 2)
    client = Requester(section.config["request_port"])
    try:
        assert client("push", {**first.data, "destination": f"{tmp_path}/dst/"}).type == "file"
        assert client("ack", {**second.data, "destination": "ftp://u:pw@h/"}).data[
            "destination"] == "ftp://h/"
        wait_for(lambda: not pushed.exists() and not acked.exists(), DEADLINE)
        assert (tmp_path / "dst" / pushed.name).exists()
    finally:
        client.close()


def test_compressed_files_are_unpacked_and_kept_a_while(sections: list[Section],
                                                        tmp_path: Path) -> None:
    work = tmp_path / "work"
    section, publisher = start_section(
        sections, tmp_path, origin=str(tmp_path / "src" / (ORIGIN + ".bz2")), compression="bzip",
        working_directory=str(work), unpacked_retention=3600, remove_delay=0)
    src = new_file(tmp_path / "src", 0, bz2.compress(b"decompressed"), ".bz2")
    [message] = announced(publisher)
    unpacked = work / "H-000-MSG4-202611211000-__"
    assert message.data["uri"] == str(unpacked)
    assert message.data["nominal_time"] == dt.datetime(2026, 11, 21, 10)
    assert unpacked.read_bytes() == b"decompressed" and src.exists()
    client = Requester(section.config["request_port"])
    try:
        reply = client("push", {**message.data, "destination": f"{tmp_path}/dst/"})
        assert reply.type == "file"
        assert (tmp_path / "dst" / unpacked.name).read_bytes() == b"decompressed"
        wait_for(lambda: not unpacked.exists(), DEADLINE)  # removed once delivered
    finally:
        client.close()


def test_originals_not_unpacked_stay_without_delete(sections: list[Section],
                                                   tmp_path: Path) -> None:
    """With compression but no delete, only what the server unpacked is removed."""
    work = tmp_path / "work"
    section, publisher = start_section(
        sections, tmp_path, origin=str(tmp_path / "src" / "{name}"), compression="bzip",
        working_directory=str(work), unpacked_retention=3600, remove_delay=0)
    src = tmp_path / "src"
    (src / "plain.dat").write_bytes(b"no bz2 suffix")
    (src / "broken.bz2").write_bytes(b"not bzip2 data")
    (src / "good.bz2").write_bytes(bz2.compress(b"unpacked"))
    messages = {m.data["uid"]: m for m in announced(publisher, 3)}
    assert sorted(messages) == ["broken.bz2", "good", "plain.dat"]
    client = Requester(section.config["request_port"])
    try:
        assert client("push", {**messages["plain.dat"].data,
                               "destination": f"{tmp_path}/dst/"}).type == "file"
        assert client("ack", messages["broken.bz2"].data).type == "ack"
        assert client("ack", messages["good"].data).type == "ack"
        # removals run in order of their due time: once the unpacked copy is gone, the
        # originals would be gone too had they been scheduled
        wait_for(lambda: not (work / "good").exists(), DEADLINE)
        assert (src / "plain.dat").exists() and (src / "broken.bz2").exists()
        assert (src / "good.bz2").exists()
        assert section.remover.pending() == 0
    finally:
        client.close()


def test_unrequested_unpacked_copies_expire(sections: list[Section], tmp_path: Path) -> None:
    work = tmp_path / "work"
    _, publisher = start_section(
        sections, tmp_path, origin=str(tmp_path / "src" / "{name}.gz"), compression="gzip",
        working_directory=str(work), unpacked_retention=0)
    (tmp_path / "src" / "a.gz").write_bytes(gzip.compress(b"a"))
    announced(publisher)
    wait_for(lambda: not (work / "a").exists(), DEADLINE)


def test_unsafe_archive_is_not_announced(sections: list[Section], tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    _, publisher = start_section(
        sections, tmp_path, origin=str(tmp_path / "src" / "{name}.tar"), compression="tar",
        working_directory=str(tmp_path / "work"))
    make_tar(tmp_path / "evil.tar", {"../../escape.sh": b"x"}).rename(
        tmp_path / "src" / "evil.tar")
    make_tar(tmp_path / "good.tar", {"a.h5": b"a", "b.h5": b"b"}).rename(
        tmp_path / "src" / "good.tar")
    messages = announced(publisher, 2)
    assert [m.data["uid"] for m in messages] == ["a.h5", "b.h5"]
    assert "evil.tar: member '../../escape.sh' leads out" in caplog.text
    assert not (tmp_path / "escape.sh").exists()


def test_real_publisher_and_subscriber(sections: list[Section], tmp_path: Path) -> None:
    publisher = Publisher(f"tcp://127.0.0.1:{free_port()}", name="move_it_server").start()
    listener = Listener([publisher.port_number], "/1b/hrit")
    try:
        listener.wait_connected()
        # the subscription takes effect some time after the connection is up (slow joiner):
        # probes until one got through
        probe = Message("/1b/hrit/probe", "beat", {}).encode()
        wait_for(lambda: (publisher.send(probe), listener.drain(0.01))[1], DEADLINE,
                 "the subscription")
        start_section(sections, tmp_path, publisher=publisher)
        src = new_file(tmp_path / "src", 0)
        listener.collect(lambda msgs: [m for m in msgs if m.type == "file"],
                         what="the announcement")
        [message] = listener.of_type("file")
        assert message.data["uri"] == str(src) and message.data["sensor"] == "seviri"
    finally:
        listener.close()
        publisher.stop()


def test_listen_section_relays_local_files(sections: list[Section], tmp_path: Path) -> None:
    upstream = Publisher(f"tcp://127.0.0.1:{free_port()}", name="upstream").start()
    publisher = RecordingPublisher()
    context = ServerContext(publisher, grace=0)
    local = tmp_path / "x.h5"
    local.write_text("x")
    section = Section("relay", {"listen": "/new", "topic": "/relayed",
                                "request_port": free_port(), "request_address": "10.0.0.1",
                                "nameserver": False,
                                "addresses": [f"tcp://127.0.0.1:{upstream.port_number}"]},
                      context)
    sections.append(section)
    section.start()
    try:
        def relayed() -> list[Message]:
            upstream.send(Message("/new/a", "file", {"uri": "ssh://far/away.h5",
                                                     "uid": "away.h5"}).encode())
            upstream.send(Message("/new/a", "file", {"uri": str(local), "uid": "x.h5"}).encode())
            return publisher.sent
        [message, *_] = wait_for(relayed, DEADLINE, interval=0.05)
        assert (message.subject, message.data["uid"]) == ("/relayed", "x.h5")
        assert message.data["request_address"] == f"10.0.0.1:{section.config['request_port']}"
        assert all(m.data["uid"] == "x.h5" for m in publisher.sent)
        assert section.served.check(str(local)) == str(local)
    finally:
        section.stop()
        section.join(DEADLINE)
        sections.remove(section)
        upstream.stop()


def test_reloaded_section_always_rebinds_its_port(tmp_path: Path) -> None:
    """ZeroMQ closes sockets in the background: each restart must wait until the port is free."""
    port = free_port()
    config = tmp_path / "server.ini"
    (tmp_path / "src").mkdir()
    context = ServerContext(RecordingPublisher(), grace=0)

    def write(round_: int) -> None:
        config.write_text(f"[hrit]\norigin = {tmp_path}/src/{{name}}\ntopic = /t\n"
                          f"request_port = {port}\nstation = round{round_}\n")

    write(0)
    runner = ServiceRunner(config, "server", lambda name, section: Section(name, section, context),
                           watch_config=False)
    runner.start()
    try:
        for round_ in range(1, 51):
            client = Requester(port)
            assert client("ping").data == {"station": f"round{round_ - 1}"}
            client.close()
            write(round_)
            result = runner.reload()
            assert (result.changed, result.failed) == (["hrit"], []), f"round {round_}"
    finally:
        runner.stop()


def test_a_listen_section_that_cannot_subscribe_reports_its_death(tmp_path: Path) -> None:
    died = threading.Event()
    context = ServerContext(RecordingPublisher(), grace=0, on_death=died.set)
    section = Section("relay", {"listen": "/new", "topic": "/relayed", "nameserver": False,
                                "addresses": ["tcp://127.0.0.1:not-a-port"]}, context)
    section.start()
    try:
        assert died.wait(DEADLINE)
        assert not section.alive()
    finally:
        section.stop()
        section.join(DEADLINE)


# -- trollmoves check --------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "kind"), [
    ("[a]\norigin = /x/{name}\ntopic = /t\n", "server"),
    ("[a]\nlisten = /in\ntopic = /t\n", "server"),
    ("[a]\nproviders = h:9010\ndestination = /d/\ntopic = /t\n", "client"),
    ("[a]\nproviders = h:9010\ndestination = /d/\norigin = /d/{n}\nrequest_port = 9\n",
     "mirror"),
])
def test_check_detects_and_validates(tmp_path: Path, text: str, kind: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.ini"
    path.write_text(text)
    assert check.detect_kind(str(path)) == kind
    assert check.main([str(path)]) == 0
    assert f"valid {kind} configuration, 1 section(s)" in capsys.readouterr().out


def test_check_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.ini"
    bad.write_text("[a]\norigin = /x/{name}\ntopic = /t\nrequest_port = 70000\n")
    unknown = tmp_path / "unknown.ini"
    unknown.write_text("[a]\nkey = value\n")
    assert check.main([str(bad), str(unknown)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: [a] request_port: 70000 is greater than the maximum of 65535" in err
    assert f"{unknown}: cannot tell the kind" in err


def test_check_example_config() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "server.ini"
    kind, sections = check.check(str(example))
    assert kind == "server" and set(sections) == {"msg4-hrit", "viirs-sdr", "relay"}
