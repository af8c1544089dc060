"""A whole client section in-process against fake servers (real ZeroMQ sockets in threads).

Each fake server is an XPUB socket (so the test knows when the client's subscription has
arrived) and a ROUTER socket whose replies the test decides: at once, late, or never. Waits are
on messages, log lines and sockets; nothing sleeps.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq
from posttroll.message import Message

from tests.moveit import (
    DEADLINE,
    Clock,
    FakeServer,
    Listener,
    ports,
    push_ok,
    wait_for,
)
from trollmoves import client as client_module
from trollmoves.client import ClientSection, ClientSettings
from trollmoves.requester import (
    Requester,
    RequesterPool,
    RequestError,
    RequestMultiplexer,
    RequestTimeout,
    tcp_address,
)
from trollmoves.subscription import HEARTBEAT_TOPIC, SubscriptionSet, parse_providers

#: ``transfer_req_timeout`` (and ``req_timeout``) of the tests that wait for a push to be late:
#: they take that long, and it must be far longer than a message or a reply takes on a
#: loaded machine, or a reply may count as missing.
LATE = 2.0


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
    # a probe sent after the one that got through may still be on its way: once a last
    # message came, every earlier one has (one socket), and none is left to mix in later
    client._publish(Message("/probe", "fence", {}))
    watcher.collect(lambda ms: any(m.type == "fence" for m in ms), what="the last probe")
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
        # the two pushes are in flight together: the err may come after good's file message
        wait_for(lambda: "No transfer of bad" in caplog.text, what="the refusal logged")
    assert [m.data["uid"] for m in watcher.of_type("file")] == ["good"]
    assert [m.data["uid"] for m in watcher.of_type("ack")] == ["good"]
    assert "not reachable" in caplog.text


def test_hot_spare_section_leaves_the_file_to_the_primary(
        watchers: list[Listener],
        section: Callable[..., ClientSection], fake_server: Callable[..., FakeServer]) -> None:
    server = fake_server()
    primary = fake_server()  # stands in for the primary client's publisher
    # a delay far longer than the messages take, however loaded the machine
    spare = section([f"127.0.0.1:{server.pub_port}", f"127.0.0.1:{primary.pub_port}"],
                    processing_delay=60)
    watcher = _subscribed_watcher(spare, [server, primary], watchers)
    message = server.announce("a.h5")
    primary.publish(Message("/1b/hrit", "push", message.data))
    primary.publish(Message("/1b/hrit", "ack", message.data))
    wait_for(lambda: spare.tracker.is_done(("a.h5",)), what="primary's ack")
    spare.tracker.processing_delay = 0.2  # not to wait a minute for the next one
    server.announce("b.h5")  # nobody claims this one: the spare takes it after its delay
    watcher.collect(lambda ms: any(m.type == "file" for m in ms))
    assert server.requested("push") == ["b.h5"]
    # the primary's ack may come before the server's announcement (another socket): the
    # spare then acks a.h5 to the server, which is all it may ever ask for it
    assert {r.type for r in server.requests if r.data["uid"] == "a.h5"} <= {"ack"}


def test_hot_spare_section_takes_over_a_push_never_acked(
        watchers: list[Listener],
        section: Callable[..., ClientSection], fake_server: Callable[..., FakeServer],
        caplog: pytest.LogCaptureFixture) -> None:
    server = fake_server()
    primary = fake_server()
    spare = section([f"127.0.0.1:{server.pub_port}", f"127.0.0.1:{primary.pub_port}"],
                    processing_delay=60)  # only a push ends it
    spare.tracker.takeover_timeout = 1.0  # 2 x transfer_req_timeout + 60 by default
    watcher = _subscribed_watcher(spare, [server, primary], watchers)
    message = server.announce("a.h5")
    primary.publish(Message("/1b/hrit", "push", message.data))  # then dies
    with caplog.at_level(logging.WARNING, logger="trollmoves.hotspare"):
        watcher.collect(lambda ms: any(m.type == "file" for m in ms))
    assert [r.data["uid"] for r in server.requests] == ["a.h5"]
    assert "taking over" in caplog.text


def test_the_ack_of_an_unpacked_file_goes_out_with_its_announcement(
        watchers: list[Listener], section: Callable[..., ClientSection],
        fake_server: Callable[..., FakeServer], tmp_path: Any) -> None:
    """A client that dies while unpacking leaves the file to its hot spare: no ``ack`` before
    the announcement of what came out."""
    uid = "H-000-MSG4-202611211000-C_"
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    program = tmp_path / "xritdecompress"  # waits at the gate, then "decompresses"
    program.write_text(f'#!/bin/sh\nread go < {gate}\ncp "$1" "$(basename "$1" C_)__"\n')
    program.chmod(0o755)

    def deliver(request: Message) -> Message:
        if request.type == "push":
            (tmp_path / "MSG4").mkdir(exist_ok=True)
            (tmp_path / "MSG4" / uid).write_bytes(b"compressed")
        return push_ok(request)

    server = fake_server(deliver)
    client = section([f"127.0.0.1:{server.pub_port}"], compression="xrit",
                     xritdecompressor=str(program))
    watcher = _subscribed_watcher(client, [server], watchers)
    server.announce(uid)
    with open(gate, "w") as go:  # returns once the decompressor waits at the gate
        probe = Message("/probe", "beat", {"after": "delivery"})
        client._publish(probe)  # anything sent before it arrives before it
        watcher.collect(lambda ms: any(m.data == probe.data for m in ms), what="the probe")
        assert [m.type for m in watcher.messages if m.type != "beat"] == ["push"]
        go.write("go\n")
    watcher.collect(lambda ms: any(m.type == "file" for m in ms), what="the announcement")
    assert [m.type for m in watcher.messages if m.type != "beat"] == ["push", "ack", "file"]
    assert watcher.of_type("file")[0].data["uid"] == uid[:-2] + "__"
    wait_for(lambda: client.tracker.is_done((uid,)), what="the file settled")


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
            server.publish(message)
        server.publish_raw(b"not posttroll at all")
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
    server.publish(Message("/heartbeat/move_it_server", "beat", {"min_interval": 5}))
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


def test_a_restarted_section_binds_its_publish_port_again_at_once(
        fake_server: Callable[..., FakeServer], tmp_path: Any) -> None:
    server = fake_server()
    (port,) = ports(1)
    settings = ClientSettings(name="again", providers=(f"127.0.0.1:{server.pub_port}",),
                              destination=f"{tmp_path}/", topic="/1b/hrit", nameservers=False,
                              publish_port=port)
    for _ in range(3):  # as a reload does: join, then start the new section
        client = ClientSection(settings)
        client.start()
        assert client.publisher.port_number == port
        client.stop()
        client.join(5)


def test_a_section_whose_thread_dies_says_so(fake_server: Callable[..., FakeServer],
                                             tmp_path: Any) -> None:
    server = fake_server()
    died = threading.Event()
    settings = ClientSettings(name="mortal", providers=(f"127.0.0.1:{server.pub_port}",),
                              destination=f"{tmp_path}/", topic="/1b/hrit", nameservers=False)
    client = ClientSection(settings, on_death=died.set)
    client.tracker.due = lambda: 1 / 0  # type: ignore[method-assign]  # a bug in the loop
    client.start()
    assert client.alive()
    wait_for(lambda: server.subscribed("/1b/hrit"), what="client subscription")
    server.announce("a.h5")  # the loop runs a round
    assert died.wait(DEADLINE) and not client.alive()
    client.stop()
    client.join(5)


# ---------------------------------------------------------------------------- bad input

NESTED_JSON = b"[" * 100_000 + b"]" * 100_000  # 200 KB: RecursionError inside posttroll


def test_undecodable_messages_and_bad_addresses_leave_the_section_serving(
        watchers: list[Listener], section: Callable[..., ClientSection],
        fake_server: Callable[..., FakeServer], caplog: pytest.LogCaptureFixture) -> None:
    server = fake_server()
    client = section([f"127.0.0.1:{server.pub_port}"])
    watcher = _subscribed_watcher(client, [server], watchers)
    header = (b"pytroll://1b/hrit file someone@host 2026-11-21T10:00:00.000000 v1.01 "
              b"application/json ")
    with caplog.at_level(logging.WARNING):
        server.publish_raw(header + NESTED_JSON)
        server.publish_raw(header + b'{"uid": ' * 50_000 + b"1" + b"}" * 50_000)
        server.publish_raw(random.Random(5).randbytes(4096))
        server.announce("bad-host", request_address="bad host:99")
        server.announce("bad-port", request_address="127.0.0.1:notaport")
        server.announce("good")
        watcher.collect(lambda ms: any(m.type == "file" for m in ms))
    assert watcher.uids("file") == ["good"] and server.requested("push") == ["good"]
    assert caplog.text.count("not a posttroll message (RecursionError") == 2
    assert "No transfer of bad-host from bad host:99: cannot connect" in caplog.text
    assert "No transfer of bad-port from 127.0.0.1:notaport: cannot connect" in caplog.text


def test_a_malformed_request_address_is_a_request_error_when_blocking_too() -> None:
    pool = RequesterPool()
    try:
        with pytest.raises(RequestError, match="cannot connect to tcp://bad host:99"):
            pool.request("bad host:99", Message("/t", "ping", {}), 1)
    finally:
        pool.close()


def test_a_uid_or_a_destination_field_leaving_the_destination_is_not_requested(
        watchers: list[Listener], section: Callable[..., ClientSection],
        fake_server: Callable[..., FakeServer], caplog: pytest.LogCaptureFixture) -> None:
    server = fake_server()
    client = section([f"127.0.0.1:{server.pub_port}"])
    watcher = _subscribed_watcher(client, [server], watchers)
    with caplog.at_level(logging.ERROR):
        server.announce("../elsewhere/x.bz2")
        server.announce("a.h5", platform_name="../..")
        server.announce("good")
        watcher.collect(lambda ms: any(m.type == "file" for m in ms))
    assert server.requested("push") == ["good"] and watcher.uids("push") == ["good"]
    assert "Cannot request ../elsewhere/x.bz2: field uid = '../elsewhere/x.bz2'" in caplog.text
    assert "Cannot request a.h5: destination" in caplog.text
    assert "platform_name = '../..'" in caplog.text


def test_a_reply_that_cannot_be_announced_still_frees_its_slot(
        watchers: list[Listener], section: Callable[..., ClientSection],
        fake_server: Callable[..., FakeServer], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = client_module.final_data

    def final_data(announcement: Message, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if announcement.data["uid"].startswith("boom"):
            raise RuntimeError("cannot build the final message")
        return real(announcement, *args, **kwargs)

    monkeypatch.setattr(client_module, "final_data", final_data)
    server = fake_server()
    client = section([f"127.0.0.1:{server.pub_port}"], workers=1)
    watcher = _subscribed_watcher(client, [server], watchers)
    with caplog.at_level(logging.ERROR):
        for uid in ("boom1", "boom2", "good"):
            server.announce(uid)
        watcher.collect(lambda ms: any(m.type == "file" for m in ms))
    assert server.requested("push") == ["boom1", "boom2", "good"]
    assert watcher.uids("file") == ["good"]
    assert "boom1 was delivered by" in caplog.text and "boom2 was delivered by" in caplog.text
    assert not client.tracker.is_done(("boom1",))
    wait_for(lambda: client.tracker.is_done(("good",)), what="good finished")  # after its file


# ------------------------------------------------------------------------------ late replies

def _announced_by_both(first: FakeServer, second: FakeServer, caplog: pytest.LogCaptureFixture,
                       uid: str = "a.h5") -> None:
    """``uid`` announced by ``first`` (and pushed there), then by ``second``, as the client
    has seen it.

    Both announcements go out on ``first``'s publisher, one right after the other: on one
    socket their order is certain, and the second one is in long before the push can be late
    (the client asks the server a ``request_address`` names, whoever published it)."""
    first.announce(uid)
    first.announce(uid, second.request_address)
    wait_for(lambda: f"Announcement of {uid} from {second.request_address}: joined"
             in caplog.text, what="the second announcement")
    assert wait_for(lambda: first.requested("push"), what="the push") == [uid]


def test_a_late_push_reply_is_caught_and_the_file_is_not_asked_elsewhere(
        watchers: list[Listener], section: Callable[..., ClientSection],
        fake_server: Callable[..., FakeServer], caplog: pytest.LogCaptureFixture) -> None:
    def answer_late(request: Message) -> Message | None:
        """Hold pushes; answer them right after the ping that their lateness brings."""
        if request.type == "push":
            return None
        for held in list(slow.held):
            slow.reply(held, push_ok(held.request))
        return push_ok(request)

    slow, other = fake_server(answer_late), fake_server()
    client = section([f"127.0.0.1:{slow.pub_port}", f"127.0.0.1:{other.pub_port}"],
                     transfer_req_timeout=LATE, req_timeout=LATE)
    watcher = _subscribed_watcher(client, [slow, other], watchers)
    with caplog.at_level(logging.DEBUG, logger="trollmoves"):
        _announced_by_both(slow, other, caplog)
        watcher.collect(lambda ms: any(m.type == "file" for m in ms))
        wait_for(lambda: other.requested("ack"), what="the ack to the other server")
    assert [r.type for r in slow.requests] == ["push", "ping"]
    assert [r.type for r in other.requests] == ["ack"]
    watcher.drain()
    assert [m.type for m in watcher.messages] == ["push", "ack", "file"]
    assert watcher.of_type("file")[0].data["origin"] == slow.request_address
    assert f"has not answered the push of a.h5 within {LATE:g} s" in caplog.text


def test_a_push_to_a_server_that_answers_nothing_goes_to_the_next_announcer(
        watchers: list[Listener], section: Callable[..., ClientSection],
        fake_server: Callable[..., FakeServer], caplog: pytest.LogCaptureFixture) -> None:
    dead, other = fake_server(lambda request: None), fake_server()
    client = section([f"127.0.0.1:{dead.pub_port}", f"127.0.0.1:{other.pub_port}"],
                     transfer_req_timeout=LATE, req_timeout=0.2)  # no ping is answered
    watcher = _subscribed_watcher(client, [dead, other], watchers)
    with caplog.at_level(logging.DEBUG, logger="trollmoves"):
        _announced_by_both(dead, other, caplog)
        watcher.collect(lambda ms: any(m.type == "file" for m in ms))
    assert [r.type for r in dead.requests] == ["push", "ping"]
    assert [r.type for r in other.requests] == ["push"]
    assert watcher.of_type("file")[0].data["origin"] == other.request_address
    assert "no reply to the push nor to a ping" in caplog.text


def test_a_live_server_that_never_answers_the_push_is_not_replaced(
        watchers: list[Listener], section: Callable[..., ClientSection],
        fake_server: Callable[..., FakeServer], caplog: pytest.LogCaptureFixture) -> None:
    stuck = fake_server(lambda request: None if request.type == "push" else push_ok(request))
    other = fake_server()
    client = section([f"127.0.0.1:{stuck.pub_port}", f"127.0.0.1:{other.pub_port}"],
                     transfer_req_timeout=LATE, req_timeout=LATE, workers=1)
    watcher = _subscribed_watcher(client, [stuck, other], watchers)
    with caplog.at_level(logging.DEBUG, logger="trollmoves"):
        _announced_by_both(stuck, other, caplog)
        wait_for(lambda: "answers pings but not the push" in caplog.text, what="giving up")
        other.announce("b.h5")  # the slot is free again
        watcher.collect(lambda ms: any(m.type == "file" for m in ms))
    assert [r.type for r in stuck.requests] == ["push", "ping"]
    assert other.requested("push") == ["b.h5"]  # a.h5 never: it may still arrive from stuck
    assert watcher.uids("file") == ["b.h5"] and not client.tracker.is_done(("a.h5",))


def test_a_takeover_the_primary_finishes_after_all_is_announced_once(
        watchers: list[Listener],
        section: Callable[..., ClientSection], fake_server: Callable[..., FakeServer],
        caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()

    def slow(request: Message) -> Message | None:
        release.wait(DEADLINE)  # the spare's push is in flight until the primary has announced
        return push_ok(request)

    server = fake_server(slow)
    primary = fake_server()
    # the server holds the spare's push until the primary's file message is in: the push
    # must not time out meanwhile
    spare = section([f"127.0.0.1:{server.pub_port}", f"127.0.0.1:{primary.pub_port}"],
                    processing_delay=0.1, transfer_req_timeout=DEADLINE)
    spare.tracker.takeover_timeout = 1.0  # 2 x transfer_req_timeout + 0.1 by default
    watcher = _subscribed_watcher(spare, [server, primary], watchers)
    message = server.announce("a.h5")
    primary.publish(Message("/1b/hrit", "push", message.data))  # then is slow to finish
    with caplog.at_level(logging.WARNING):
        wait_for(lambda: server.requests, what="the spare's takeover push")
        primary.publish(Message("/1b/hrit", "file", {"uid": "a.h5", "uri": "/dst/a.h5"}))
        wait_for(lambda: spare.tracker.peer_delivered(("a.h5",)), what="the primary's file")
        release.set()
        watcher.collect(lambda ms: any(m.type == "ack" for m in ms))
        wait_for(lambda: "not announcing it again" in caplog.text, what="the decision logged")
        wait_for(lambda: spare.tracker.is_done(("a.h5",)), what="the transfer finished")
    assert watcher.of_type("file") == []
