"""Unit tests of the client: duplicates, hot spare, destinations, messages, rewriting, REQ side.

The last tests run a :class:`ClientSection` in-process against a fake server made of an XPUB
socket (so the test knows when the client's subscription has arrived) and a ROUTER socket.
"""

from __future__ import annotations

import bz2
import datetime as dt
import io
import logging
import os
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq
from posttroll.message import Message

from tests.moveit import DEADLINE, Listener, wait_for
from trollmoves import unpack
from trollmoves.client import ClientSection, ClientSettings
from trollmoves.config import read_ini
from trollmoves.delivery import (
    DeliveryError,
    Destination,
    compose_destination,
    final_data,
    message_type,
    push_request,
    rewrite_metadata,
    unpack_files,
)
from trollmoves.hotspare import Action, DoneCache, State, Tracker, file_key
from trollmoves.requester import (
    Requester,
    RequesterPool,
    RequestError,
    RequestMultiplexer,
    RequestTimeout,
    tcp_address,
)
from trollmoves.subscription import (
    HEARTBEAT_TOPIC,
    SubscriptionSet,
    parse_providers,
    posttroll_topic,
)


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def announcement(uid: str = "H-000-MSG4-202611211000-__", server: str = "127.0.0.1:9",
                 **extra: Any) -> Message:
    data = {"sensor": "seviri", "platform_name": "MSG4", "uri": f"/src/{uid}", "uid": uid,
            "request_address": server, **extra}
    return Message("/1b/hrit", "file", data)


# ------------------------------------------------------------------------------------ hotspare

def test_file_key_is_the_sorted_uids_anywhere_in_the_data() -> None:
    assert file_key({"uid": "a", "uri": "/a"}) == ("a",)
    dataset = {"dataset": [{"uid": "b"}, {"uid": "a"}], "platform_name": "x"}
    assert file_key(dataset) == ("a", "b")
    assert file_key({"uri": "/x"}) is None
    assert file_key("text") is None


def test_done_cache_is_bounded_in_size_and_age() -> None:
    clock = Clock()
    cache = DoneCache(size=3, max_age=60, clock=clock)
    for name in "abcd":
        cache.add((name,))
    assert ("a",) not in cache and ("d",) in cache and len(cache) == 3
    clock.advance(61)
    assert ("d",) not in cache and len(cache) == 0


def test_primary_requests_once_and_acks_the_other_announcers() -> None:
    tracker: Tracker[str] = Tracker()
    key = ("f",)
    assert tracker.announce(key, "server1") is Action.REQUEST
    assert tracker.announce(key, "server2") is Action.JOINED
    assert tracker.next_source(key) == "server1"
    assert tracker.announce(key, "server3") is Action.JOINED
    assert tracker.finish(key, delivered=True) == ["server2", "server3"]
    assert tracker.announce(key, "server4") is Action.ACK
    assert len(tracker) == 0


def test_a_failed_transfer_tries_the_next_announcer_then_is_forgotten() -> None:
    tracker: Tracker[str] = Tracker()
    key = ("f",)
    tracker.announce(key, "server1")
    tracker.announce(key, "server2")
    assert tracker.next_source(key) == "server1"
    assert tracker.next_source(key) == "server2"
    assert tracker.next_source(key) is None
    assert tracker.finish(key, delivered=False) == []
    assert tracker.announce(key, "server1") is Action.REQUEST  # asked again later


def test_hot_spare_waits_then_requests_when_nobody_claimed_the_file() -> None:
    clock = Clock()
    tracker: Tracker[str] = Tracker(processing_delay=0.2, clock=clock)
    key = ("f",)
    assert tracker.announce(key, "server1") is Action.WAIT
    assert tracker.next_deadline() == pytest.approx(clock.now + 0.2)
    assert tracker.due() == []
    clock.advance(0.2)
    assert tracker.due() == [key]
    assert tracker.state(key) is State.ACTIVE
    assert tracker.due() == []  # started once only
    assert tracker.next_source(key) == "server1"


def test_a_push_from_the_primary_cancels_the_wait_and_its_ack_ends_it() -> None:
    clock = Clock()
    tracker: Tracker[str] = Tracker(processing_delay=0.2, takeover_timeout=10, clock=clock)
    key = ("f",)
    tracker.announce(key, "server1")
    tracker.peer_push(key)
    clock.advance(5)
    assert tracker.due() == [] and tracker.state(key) is State.PEER
    tracker.peer_done(key)
    clock.advance(60)
    assert tracker.due() == [] and tracker.is_done(key) and len(tracker) == 0
    assert tracker.announce(key, "server2") is Action.ACK


def test_the_spare_takes_over_when_the_primary_pushed_but_never_acked() -> None:
    clock = Clock()
    tracker: Tracker[str] = Tracker(processing_delay=0.2, takeover_timeout=10, clock=clock)
    key = ("f",)
    tracker.announce(key, "server1")
    tracker.peer_push(key)
    clock.advance(10)
    assert tracker.due() == [key]
    assert tracker.next_source(key) == "server1"
    tracker.peer_push(key)  # a late push of the primary changes nothing now
    assert tracker.state(key) is State.ACTIVE and tracker.due() == []


def test_news_from_the_primary_before_the_announcement() -> None:
    clock = Clock()
    tracker: Tracker[str] = Tracker(processing_delay=0.2, takeover_timeout=10, clock=clock)
    pushed, acked = ("p",), ("a",)
    tracker.peer_push(pushed)
    tracker.peer_done(acked)
    assert tracker.announce(acked, "server1") is Action.ACK
    assert tracker.announce(pushed, "server1") is Action.WAIT  # waits for the primary's ack
    clock.advance(10)
    assert tracker.due() == [pushed]


def test_a_push_for_a_file_never_announced_here_is_forgotten() -> None:
    clock = Clock()
    tracker: Tracker[str] = Tracker(processing_delay=0.2, takeover_timeout=1, clock=clock)
    tracker.peer_push(("x",))
    clock.advance(1)
    assert tracker.due() == [] and len(tracker) == 0 and tracker.next_deadline() is None


def test_an_ack_seen_during_our_own_transfer_does_not_start_another() -> None:
    tracker: Tracker[str] = Tracker()
    key = ("f",)
    tracker.announce(key, "server1")
    tracker.peer_done(key)
    assert tracker.state(key) is State.ACTIVE
    tracker.next_source(key)
    tracker.finish(key, delivered=False)
    assert tracker.is_done(key)


def test_tracker_memory_is_bounded_over_many_files() -> None:
    tracker: Tracker[str] = Tracker(cache_size=1000)
    for number in range(100_000):
        key = (f"file-{number}",)
        tracker.announce(key, "s1")
        tracker.next_source(key)
        tracker.finish(key, delivered=True)
    assert len(tracker) == 0 and len(tracker._done) == 1000
    assert tracker.announce(("file-99999",), "s2") is Action.ACK


# ------------------------------------------------------------------------------ destinations

def test_destination_is_composed_from_the_message() -> None:
    data = announcement(nominal_time=dt.datetime(2026, 11, 21, 10)).data
    url = compose_destination("file:///dst/{platform_name}/{nominal_time:%Y%m%d}/", data)
    assert url == "file:///dst/MSG4/20261121/"
    with pytest.raises(DeliveryError, match="orbit_number"):
        compose_destination("/dst/{orbit_number}/", data)


def test_push_request_carries_login_and_the_published_copy_none() -> None:
    dest = Destination.parse("ftp://ftp.example.org:2121/dst/MSG4/")
    request, public = push_request(announcement(), dest, "user:pa:ss", ["backup1"])
    assert request.type == public.type == "push"
    assert request.data["destination"] == "ftp://user:pa%3Ass@ftp.example.org:2121/dst/MSG4/"
    assert request.data["backup_targets"] == ["backup1"]
    assert public.data["destination"] == "ftp://ftp.example.org:2121/dst/MSG4/"
    assert "backup_targets" not in public.data
    assert public.data["uid"] == "H-000-MSG4-202611211000-__"


def test_credentials_in_the_destination_itself_are_used_but_never_published() -> None:
    dest = Destination.parse("sftp://me:secret@host/dst/")
    request, public = push_request(announcement(), dest)
    assert request.data["destination"] == "sftp://me:secret@host/dst/"
    assert "secret" not in public.encode() and "me@" not in public.encode()


def test_local_destination_is_named_with_this_host_in_requests() -> None:
    dest = Destination.parse("/dst/MSG4/")
    assert dest.is_local and dest.local_directory() == "/dst/MSG4/"
    assert dest.public_url() == f"file://{socket.gethostname()}/dst/MSG4/"
    assert dest.file_uri("a.h5") == "/dst/MSG4/a.h5"


@pytest.mark.parametrize(("url", "uri"), [
    ("file:///dst/", "/dst/a.h5"),
    ("sftp://localhost/dst/", "/dst/a.h5"),
    ("sftp://127.0.0.1:2222/dst/", "/dst/a.h5"),
    ("s3://bucket/prefix/", "s3://bucket/prefix/a.h5"),
    ("ftp://remote.invalid/dst/", "ftp://user@remote.invalid/dst/a.h5"),
])
def test_final_uri_drops_scheme_and_host_only_when_local(url: str, uri: str) -> None:
    assert Destination.parse(url).file_uri("a.h5", login="user:pw") == uri


def test_local_directory_of_an_ftp_destination_is_under_ftp_root() -> None:
    assert Destination.parse("ftp://remote.invalid/pub/MSG4/").local_directory() is None
    remote = Destination.parse("ftp://remote.invalid/pub/MSG4/", ftp_root="/srv/ftp")
    assert remote.local_directory() == "/srv/ftp/pub/MSG4/"
    assert remote.file_uri("a.h5") == "ftp://remote.invalid/pub/MSG4/a.h5"
    local = Destination.parse("ftp://127.0.0.1/pub/MSG4/", ftp_root="/srv/ftp")
    assert local.file_uri("a.h5") == "/srv/ftp/pub/MSG4/a.h5"  # a path this machine can read
    assert Destination.parse("ftp://127.0.0.1/pub/").file_uri("a.h5") == "/pub/a.h5"  # as 0.19
    assert Destination.parse("s3://bucket/x/").local_directory() is None


# ---------------------------------------------------------------------------- final messages

def test_final_message_has_destination_uri_and_origin_only() -> None:
    ann = announcement(server="10.0.0.1:9094")
    dest = Destination.parse("/dst/MSG4/")
    reply = Message("/1b/hrit", "file", {**ann.data, "destination": "file://vm/dst/MSG4/"})
    data = final_data(ann, dest, reply=reply)
    assert data["uri"] == "/dst/MSG4/H-000-MSG4-202611211000-__"
    assert data["origin"] == "10.0.0.1:9094"
    assert "request_address" not in data and "destination" not in data
    assert data["sensor"] == "seviri" and ann.data["uri"].startswith("/src/")  # input intact


def test_final_message_of_a_dataset_relocates_every_file() -> None:
    ann = Message("/x", "dataset", {"dataset": [{"uid": "a", "uri": "/s/a"},
                                                {"uid": "b", "uri": "/s/b"}],
                                    "request_address": "h:1"})
    data = final_data(ann, Destination.parse("/d/"))
    assert [f["uri"] for f in data["dataset"]] == ["/d/a", "/d/b"]
    assert message_type(data) == "dataset"


def test_metadata_rewriting() -> None:
    data = {"platform_name": "NOAA-20", "sensor": "viirs", "orbit": 5}
    rewrite_metadata(data, {"platform_name": "NOAA-20:noaa20|Suomi-NPP:npp",
                            "sensor": "avhrr/3:avhrr", "orbit": "5:6", "absent": "a:b"})
    assert data == {"platform_name": "noaa20", "sensor": "viirs", "orbit": "6"}
    assert rewrite_metadata({"station": "x"}, {"station": "norrkoping"}) == {
        "station": "norrkoping"}


def test_settings_take_unknown_keys_as_rewrites(tmp_path: Any) -> None:
    ini = tmp_path / "client.ini"
    ini.write_text("[DEFAULT]\nreq_timeout = 2\n[eumetcast]\n"
                   "providers = a:9010 b:9010/other/topic\ndestination = /dst/\n"
                   "topic = /1b/hrit\nplatform_name = MSG4:meteosat11\nnameservers = false\n"
                   "processing_delay = 0.2\nbackup_targets = h1 h2\n")
    settings = ClientSettings.from_section("eumetcast", read_ini(ini, "client")["eumetcast"])
    assert settings.rewrites == {"platform_name": "MSG4:meteosat11"}
    assert settings.nameservers is False and settings.req_timeout == 2
    assert settings.transfer_req_timeout == 10 and settings.processing_delay == 0.2
    assert settings.backup_targets == ("h1", "h2")
    assert settings.publisher_name == "move_it_eumetcast"
    subs = {p.address: p.topics for p in settings.subscriptions()}
    assert subs == {"tcp://a:9010": ("/1b/hrit", "/heartbeat/move_it"),
                    "tcp://b:9010": ("/1b/hrit", "/heartbeat/move_it", "/other/topic")}


def test_providers_and_topics() -> None:
    providers = parse_providers(["h:1", "h:1/t", "", "tcp://g:2"], ["/a"])
    assert [(p.address, p.topics) for p in providers] == [("tcp://h:1", ("/a", "/t")),
                                                          ("tcp://g:2", ("/a",))]
    assert posttroll_topic("/1b/hrit") == "pytroll://1b/hrit"
    assert posttroll_topic("x") == "pytroll://x"


# -------------------------------------------------------------------------------- unpacking

def _tar(path: Any, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))


def test_unpacking_a_tar_gives_a_dataset_at_the_destination(tmp_path: Any) -> None:
    _tar(tmp_path / "pass.tar", {"a.h5": b"a", "sub/b.h5": b"bb"})
    dest = Destination.parse(f"{tmp_path}/")
    data = {"uid": "pass.tar", "uri": str(tmp_path / "pass.tar"), "platform_name": "j01"}
    out = unpack_files(data, "tar", str(tmp_path), dest, delete=True)
    assert message_type(out) == "dataset" and out["platform_name"] == "j01"
    assert out["dataset"] == [{"uid": "a.h5", "uri": f"{tmp_path}/a.h5"},
                              {"uid": "b.h5", "uri": f"{tmp_path}/sub/b.h5"}]
    assert (tmp_path / "sub/b.h5").read_bytes() == b"bb" and not (tmp_path / "pass.tar").exists()


def test_unpacking_bzip2_gives_one_file_and_others_pass(tmp_path: Any) -> None:
    (tmp_path / "x.h5.bz2").write_bytes(bz2.compress(b"payload"))
    dest = Destination.parse(str(tmp_path) + "/")
    out = unpack_files({"uid": "x.h5.bz2", "uri": "?"}, "bzip", str(tmp_path), dest)
    assert out == {"uid": "x.h5", "uri": f"{tmp_path}/x.h5"}
    assert (tmp_path / "x.h5.bz2").exists()
    plain = {"uid": "y.h5", "uri": "/d/y.h5"}
    assert unpack_files(plain, "bzip", str(tmp_path), dest) == plain


def test_a_tar_with_parent_members_is_refused(tmp_path: Any) -> None:
    target = tmp_path / "in"
    target.mkdir()
    _tar(target / "evil.tar", {"../escaped": b"x", "ok": b"y"})
    with pytest.raises(unpack.UnsafeArchiveError):
        unpack_files({"uid": "evil.tar"}, "tar", str(target), Destination.parse(str(target)))
    assert sorted(os.listdir(tmp_path)) == ["in"] and os.listdir(target) == ["evil.tar"]


def test_unpacking_needs_the_file_on_this_machine() -> None:
    with pytest.raises(unpack.UnpackError, match="off this machine"):
        unpack_files({"uid": "x.tar"}, "tar", None, Destination.parse("s3://b/x/"))


# ---------------------------------------------------------------------------------- requester

class FakeServer:
    """A posttroll-speaking server: XPUB for announcements, ROUTER for requests."""

    def __init__(self, handler: Callable[[Message], Message | None]) -> None:
        self.ctx = zmq.Context.instance()
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub_port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.router = self.ctx.socket(zmq.ROUTER)
        self.req_port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.handler = handler
        self.requests: list[Message] = []
        self.subscriptions: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def request_address(self) -> str:
        return f"127.0.0.1:{self.req_port}"

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.pub, zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _ in poller.poll(20):
                if sock is self.pub:
                    self.subscriptions.append(self.pub.recv())
                    continue
                address, empty, payload = self.router.recv_multipart()
                request = Message(rawstr=payload)
                self.requests.append(request)
                reply = self.handler(request)
                if reply is not None:
                    self.router.send_multipart([address, empty, reply.encode().encode()])
        self.pub.close(0)
        self.router.close(0)

    def subscribed(self, topic: str) -> bool:
        return any(s[:1] == b"\x01" and posttroll_topic(topic).encode().startswith(s[1:])
                   for s in self.subscriptions)

    def announce(self, uid: str) -> Message:
        message = announcement(uid, self.request_address)
        self.pub.send_string(message.encode())
        return message

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def push_ok(request: Message) -> Message:
    """Reply like a server that delivered the file."""
    if request.type == "push":
        return Message(request.subject, "file", {**request.data, "destination": "x"})
    return Message(request.subject, request.type, request.data)


@pytest.fixture
def fake_server() -> Iterator[Callable[..., FakeServer]]:
    started: list[FakeServer] = []

    def start(handler: Callable[[Message], Message | None] = push_ok) -> FakeServer:
        server = FakeServer(handler)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def test_requester_gets_the_reply(fake_server: Callable[..., FakeServer]) -> None:
    server = fake_server(lambda req: Message(req.subject, "pong", {"station": "here"}))
    requester = Requester(server.request_address)
    for _ in range(3):  # the socket is reused
        reply = requester.request(Message("/t", "ping", {}), timeout=5)
        assert reply.type == "pong" and reply.data == {"station": "here"}
    requester.close()
    assert tcp_address("h:1") == "tcp://h:1"


def test_a_timed_out_socket_is_discarded_so_a_late_reply_is_never_taken() -> None:
    router = zmq.Context.instance().socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    requester = Requester(f"127.0.0.1:{port}")
    with pytest.raises(RequestTimeout):
        requester.request(Message("/t", "ping", {"n": 1}), timeout=0.05)
    first, empty, _ = router.recv_multipart()
    result: list[Message] = []
    thread = threading.Thread(
        target=lambda: result.append(requester.request(Message("/t", "ping", {"n": 2}), 5)))
    thread.start()
    second, _, _ = router.recv_multipart()
    assert first != second  # a new socket
    router.send_multipart([first, empty, Message("/t", "pong", {"n": 1}).encode().encode()])
    router.send_multipart([second, empty, Message("/t", "pong", {"n": 2}).encode().encode()])
    thread.join()
    assert result[0].data == {"n": 2}
    requester.close()
    router.close(0)


def test_a_garbage_reply_is_an_error() -> None:
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def answer() -> None:
        address, empty, _ = router.recv_multipart()
        router.send_multipart([address, empty, b"not posttroll"])

    thread = threading.Thread(target=answer)
    thread.start()
    with pytest.raises(RequestError, match="invalid reply"):
        Requester(f"127.0.0.1:{port}").request(Message("/t", "ping", {}), timeout=5)
    thread.join()
    router.close(0)


def test_multiplexer_delivers_replies_and_times_out_without_reuse(
        fake_server: Callable[..., FakeServer]) -> None:
    def answer(request: Message) -> Message | None:
        return None if request.data.get("n") == 1 else Message("/t", "pong", request.data)

    server = fake_server(answer)
    poller = zmq.Poller()
    pool = RequesterPool()
    clock = Clock()
    mux = RequestMultiplexer(pool, poller, clock=lambda: clock.now)
    results: dict[int, Any] = {}
    for n in (1, 2, 3):
        mux.send(server.request_address, Message("/t", "ping", {"n": n}), 5,
                 lambda reply, error, n=n: results.__setitem__(n, reply or error))
    assert len(mux) == 3 and mux.next_deadline() == clock.now + 5
    deadline = time.monotonic() + DEADLINE
    while len(results) < 2 and time.monotonic() < deadline:
        mux.handle(dict(poller.poll(50)))
    assert results[2].data == {"n": 2} and results[3].data == {"n": 3}
    clock.advance(5)
    mux.expire()
    assert isinstance(results[1], RequestTimeout) and len(mux) == 0
    assert mux.next_deadline() is None
    with pytest.raises(ValueError):
        mux.send("no-port", Message("/t", "ping", {}), 1, lambda reply, error: None)
    mux.close()
    pool.close()


# --------------------------------------------------------------------------- client section

@pytest.fixture
def section(tmp_path: Any) -> Iterator[Callable[..., ClientSection]]:
    running: list[ClientSection] = []

    def start(providers: list[str], **options: Any) -> ClientSection:
        settings = ClientSettings(name="test", providers=tuple(providers),
                                  destination=f"{tmp_path}/{{platform_name}}/", topic="/1b/hrit",
                                  nameservers=False, **options)
        client = ClientSection(settings)
        client.start()
        running.append(client)
        return client

    yield start
    for client in running:
        client.stop()
        client.join(5)


@pytest.fixture
def watchers() -> Iterator[list[Listener]]:
    made: list[Listener] = []
    yield made
    for listener in made:
        listener.close()


def _subscribed_watcher(client: ClientSection, servers: list[FakeServer],
                        made: list[Listener]) -> Listener:
    """A listener on the client's publisher, once the client is subscribed to ``servers``
    and the listener to the client (a probe got through)."""
    watcher = Listener([client.publisher.port_number])
    made.append(watcher)
    watcher.wait_connected()
    for server in servers:
        wait_for(lambda s=server: s.subscribed("/1b/hrit"), what="client subscription")
    probe = Message("/probe", "beat", {})
    wait_for(lambda: (client._publish(probe), watcher.drain(0.01))[1], what="watcher")
    watcher.messages.clear()
    return watcher


def test_section_requests_once_from_the_first_server_and_acks_the_other(
        watchers: list[Listener],
        section: Callable[..., ClientSection], fake_server: Callable[..., FakeServer],
        tmp_path: Any) -> None:
    first, second = fake_server(), fake_server()
    client = section([f"127.0.0.1:{first.pub_port}", f"127.0.0.1:{second.pub_port}"])
    watcher = _subscribed_watcher(client, [first, second], watchers)
    first.announce("a.h5")
    wait_for(lambda: first.requests, what="push")
    second.announce("a.h5")
    messages = watcher.collect(lambda ms: any(m.type == "file" for m in ms))
    assert [m.type for m in messages] == ["push", "ack", "file"]
    wait_for(lambda: second.requests, what="ack to the second server")
    assert [r.type for r in first.requests] == ["push"]
    assert [r.type for r in second.requests] == ["ack"]
    final = watcher.of_type("file")[0].data
    assert final["uri"] == f"{tmp_path}/MSG4/a.h5" and final["origin"] == first.request_address
    assert os.path.isdir(tmp_path / "MSG4")  # create_target_directory


def test_a_refused_file_is_not_announced_and_the_section_goes_on(
        watchers: list[Listener],
        section: Callable[..., ClientSection], fake_server: Callable[..., FakeServer],
        caplog: pytest.LogCaptureFixture) -> None:
    def refuse_bad(request: Message) -> Message:
        if request.data["uid"] == "bad":
            return Message(request.subject, "err", "bad not reachable")
        return push_ok(request)

    server = fake_server(refuse_bad)
    client = section([f"127.0.0.1:{server.pub_port}"])
    watcher = _subscribed_watcher(client, [server], watchers)
    with caplog.at_level(logging.ERROR, logger="trollmoves.client"):
        server.announce("bad")
        server.announce("good")
        watcher.collect(lambda ms: any(m.type == "file" for m in ms))
    assert [m.data["uid"] for m in watcher.of_type("file")] == ["good"]
    assert [m.data["uid"] for m in watcher.of_type("ack")] == ["good"]
    assert "No transfer of bad" in caplog.text and "not reachable" in caplog.text


def test_hot_spare_section_leaves_the_file_to_the_primary(
        watchers: list[Listener],
        section: Callable[..., ClientSection], fake_server: Callable[..., FakeServer]) -> None:
    server = fake_server()
    primary = fake_server()  # stands in for the primary client's publisher
    spare = section([f"127.0.0.1:{server.pub_port}", f"127.0.0.1:{primary.pub_port}"],
                    processing_delay=0.5)
    watcher = _subscribed_watcher(spare, [server, primary], watchers)
    message = server.announce("a.h5")
    primary.pub.send_string(Message("/1b/hrit", "push", message.data).encode())
    primary.pub.send_string(Message("/1b/hrit", "ack", message.data).encode())
    wait_for(lambda: spare.tracker.is_done(("a.h5",)), what="primary's ack")
    server.announce("b.h5")  # nobody claims this one: the spare takes it after its delay
    watcher.collect(lambda ms: any(m.type == "file" for m in ms))
    assert [r.data["uid"] for r in server.requests] == ["b.h5"]


def test_the_example_config_reads() -> None:
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "client.ini")
    sections = read_ini(path, "client")
    settings = [ClientSettings.from_section(name, s) for name, s in sections.items()]
    assert [s.compression for s in settings] == [None, "tar"]


def test_hot_spare_section_takes_over_a_push_never_acked(
        watchers: list[Listener],
        section: Callable[..., ClientSection], fake_server: Callable[..., FakeServer],
        caplog: pytest.LogCaptureFixture) -> None:
    server = fake_server()
    primary = fake_server()
    spare = section([f"127.0.0.1:{server.pub_port}", f"127.0.0.1:{primary.pub_port}"],
                    processing_delay=0.5, transfer_req_timeout=0.3)
    watcher = _subscribed_watcher(spare, [server, primary], watchers)
    message = server.announce("a.h5")
    primary.pub.send_string(Message("/1b/hrit", "push", message.data).encode())  # then dies
    with caplog.at_level(logging.WARNING, logger="trollmoves.hotspare"):
        watcher.collect(lambda ms: any(m.type == "file" for m in ms))
    assert [r.data["uid"] for r in server.requests] == ["a.h5"]
    assert "taking over" in caplog.text


def test_odd_announcements_are_logged_and_the_section_goes_on(
        watchers: list[Listener],
        section: Callable[..., ClientSection], fake_server: Callable[..., FakeServer],
        caplog: pytest.LogCaptureFixture) -> None:
    server = fake_server()
    client = section([f"127.0.0.1:{server.pub_port}"])
    watcher = _subscribed_watcher(client, [server], watchers)
    odd = [Message("/1b/hrit", "file", "just text"),
           Message("/1b/hrit", "file", {"uid": "a", "uri": "/a", "request_address": "noport"}),
           Message("/1b/hrit", "file", {"uid": "b", "uri": "/b", "request_address": 12}),
           Message("/1b/hrit", "file", {"uid": "c", "request_address": "bad host:x"}),
           Message("/1b/hrit", "dataset", {"dataset": "not a list", "request_address": "h:1"})]
    with caplog.at_level(logging.ERROR):
        for message in odd:
            server.pub.send_string(message.encode())
        server.pub.send(b"not posttroll at all")
        server.announce("good")
        watcher.collect(lambda ms: any(m.type == "file" for m in ms))
    assert [m.data["uid"] for m in watcher.of_type("file")] == ["good"]
    assert "Cannot request a" in caplog.text and "Cannot request b" in caplog.text


def test_a_silent_provider_is_resubscribed(fake_server: Callable[..., FakeServer]) -> None:
    server = fake_server()
    clock = Clock()
    poller = zmq.Poller()
    providers = parse_providers([f"127.0.0.1:{server.pub_port}"], ["/1b/hrit", HEARTBEAT_TOPIC])
    subscriptions = SubscriptionSet(providers, poller, alarm_scale=2, clock=clock)
    wait_for(lambda: server.subscribed("/heartbeat/move_it_server"), what="subscription")
    server.pub.send_string(Message("/heartbeat/move_it_server", "beat",
                                   {"min_interval": 5}).encode())
    wait_for(lambda: subscriptions.read(dict(poller.poll(50))), what="the beat")
    assert subscriptions.next_check() == clock.now + 10  # 2 x the announced 5 s
    clock.advance(9)
    assert subscriptions.resubscribe_silent() == []
    clock.advance(2)
    before = len(server.subscriptions)
    assert subscriptions.resubscribe_silent() == providers
    wait_for(lambda: len(server.subscriptions) > before, what="a new subscription")
    assert subscriptions.next_check() == clock.now + 10
    subscriptions.close()
