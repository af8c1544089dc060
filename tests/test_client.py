"""Unit tests of the client: duplicates, hot spare, destinations, messages, rewriting, REQ side.

A whole :class:`~trollmoves.client.ClientSection` against fake servers: test_client_section.py.
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
from typing import Any

import pytest
import zmq
from posttroll.message import Message

from tests.moveit import DEADLINE, Clock, announcement, wait_for
from trollmoves import unpack
from trollmoves.client import ClientSettings
from trollmoves.config import read_ini
from trollmoves.delivery import (
    DeliveryError,
    Destination,
    check_file_names,
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
    RequestError,
    RequestTimeout,
)
from trollmoves.subscription import (
    parse_providers,
    posttroll_topic,
)

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
    assert tracker.state(key) is State.QUEUED and tracker.next_source(key) is None
    assert tracker.start_next() == key and tracker.start_next() is None
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
    assert tracker.start_next() == key
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
    assert tracker.state(key) is State.QUEUED and tracker.queued == 1
    assert tracker.due() == []  # queued once only
    assert tracker.start_next() == key and tracker.state(key) is State.ACTIVE
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
    assert tracker.start_next() == key
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
    tracker.start_next()
    tracker.peer_done(key)
    assert tracker.state(key) is State.ACTIVE
    tracker.next_source(key)
    tracker.finish(key, delivered=False)
    assert tracker.is_done(key)


def test_a_queued_file_pushed_or_delivered_by_the_other_client_is_not_pushed_here() -> None:
    clock = Clock()
    tracker: Tracker[str] = Tracker(takeover_timeout=10, clock=clock)  # a primary, 1 slot
    first, pushed, acked = ("a",), ("b",), ("c",)
    for key in (first, pushed, acked):
        assert tracker.announce(key, "server1") is Action.REQUEST
    assert tracker.start_next() == first and tracker.state(first) is State.ACTIVE
    assert tracker.state(pushed) is State.QUEUED and tracker.queued == 2
    tracker.peer_push(pushed)  # the hot spare took over the backlog
    tracker.peer_push(acked)
    tracker.peer_done(acked)
    assert tracker.state(pushed) is State.PEER and tracker.is_done(acked)
    assert tracker.queued == 0 and tracker.start_next() is None  # the slot frees: nothing
    assert tracker.next_source(pushed) is None
    clock.advance(9)
    tracker.peer_push(pushed)  # the other client is still at it (next announcer)
    clock.advance(9)
    assert tracker.due() == []
    clock.advance(1)
    assert tracker.due() == [pushed] and tracker.start_next() == pushed  # it went silent


def test_a_file_queued_by_the_spare_is_left_to_the_primary_that_pushes_it() -> None:
    clock = Clock()
    tracker: Tracker[str] = Tracker(processing_delay=0.2, takeover_timeout=10, clock=clock)
    keys = [("a",), ("b",)]
    for key in keys:
        tracker.announce(key, "server1")
    clock.advance(0.2)
    assert tracker.due() == keys and tracker.queued == 2  # no free slot yet
    tracker.peer_push(keys[0])  # the primary's backlog moved on meanwhile
    tracker.peer_done(keys[1])
    assert tracker.start_next() is None and tracker.state(keys[0]) is State.PEER


def test_the_queue_is_bounded_and_a_file_beyond_it_is_dropped_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    tracker: Tracker[str] = Tracker(processing_delay=0.2, clock=clock, max_queued=2)
    with caplog.at_level(logging.WARNING, logger="trollmoves.hotspare"):
        for name in "abc":
            assert tracker.announce((name,), "s1") is Action.WAIT
        clock.advance(0.2)
        assert tracker.due() == [("a",), ("b",)]
    assert "Not requesting c: 2 files wait" in caplog.text
    assert tracker.state(("c",)) is None and not tracker.is_done(("c",))  # forgotten
    assert tracker.start_next() == ("a",)
    tracker.processing_delay = 0
    assert tracker.announce(("c",), "s2") is Action.REQUEST  # room again: announced again
    assert tracker.announce(("d",), "s2") is Action.DROPPED


def test_tracker_memory_is_bounded_over_many_files() -> None:
    tracker: Tracker[str] = Tracker(cache_size=1000)
    for number in range(100_000):
        key = (f"file-{number}",)
        tracker.announce(key, "s1")
        tracker.start_next()
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


@pytest.mark.parametrize(("template", "fields", "culprit"), [
    ("/dst/{platform_name}/", {"platform_name": "../.."}, "platform_name = '../..'"),
    ("file:///dst/{platform_name}/{sensor}/", {"platform_name": "a/../../etc", "sensor": "x"},
     "platform_name = 'a/../../etc'"),
    ("sftp://host/dst/x{sensor}/", {"sensor": "/%2e%2e/"}, "sensor = '/%2e%2e/'"),
    ("/dst/{platform_name}.{sensor}/", {"platform_name": ".", "sensor": ""},
     "platform_name, sensor"),
])
def test_a_destination_field_that_leaves_the_base_directory_is_refused(
        template: str, fields: dict[str, str], culprit: str) -> None:
    with pytest.raises(DeliveryError) as refused:
        compose_destination(template, fields)
    assert culprit in str(refused.value) and template.split("{")[0] in str(refused.value)


def test_destination_fields_may_hold_dots_that_stay_inside() -> None:
    data = {"platform_name": "..MSG4", "sensor": "a.b"}
    assert compose_destination("/dst/{platform_name}/{sensor}/", data) == "/dst/..MSG4/a.b/"
    assert compose_destination("/dst/../other/", data) == "/dst/../other/"  # the operator's


@pytest.mark.parametrize("uid", ["../elsewhere/x.bz2", "/etc/x", "a/b", "..", "", 5, None])
def test_a_uid_that_is_not_a_plain_file_name_is_refused(uid: Any) -> None:
    with pytest.raises(DeliveryError, match="field uid"):
        check_file_names({"uid": uid, "uri": "/src/x"})
    with pytest.raises(DeliveryError, match="field uid"):
        check_file_names({"dataset": [{"uid": "ok", "uri": "/s/ok"}, {"uid": uid}]})
    check_file_names({"uid": "H-000-MSG4-202611211000-__", "uri": "/src/x"})


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


def test_unpacking_refuses_a_uid_that_leaves_the_directory(tmp_path: Any) -> None:
    target, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    target.mkdir()
    elsewhere.mkdir()
    victim = elsewhere / "x.bz2"
    victim.write_bytes(bz2.compress(b"not yours"))
    with pytest.raises(unpack.UnpackError, match="not a plain file name"):
        unpack_files({"uid": "../elsewhere/x.bz2"}, "bzip", str(target),
                     Destination.parse(f"{target}/"), delete=True)
    assert sorted(os.listdir(elsewhere)) == ["x.bz2"] and not os.listdir(target)


def test_unpacking_needs_the_file_on_this_machine() -> None:
    with pytest.raises(unpack.UnpackError, match="off this machine"):
        unpack_files({"uid": "x.tar"}, "tar", None, Destination.parse("s3://b/x/"))


# ---------------------------------------------------------------------------------- requester

def test_a_timed_out_socket_is_discarded_so_a_late_reply_is_never_taken() -> None:
    router = zmq.Context.instance().socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    requester = Requester(f"127.0.0.1:{port}")

    def received() -> list[bytes]:
        assert router.poll(int(DEADLINE * 1000)), "no request reached the server"
        return router.recv_multipart()

    def timed_out_after_arriving() -> bool:
        # a request is sent in the background: the discarded socket may take it along
        # unsent (on a loaded machine the connection is not even up after 0.05 s), so
        # time out until one got through
        with pytest.raises(RequestTimeout):
            requester.request(Message("/t", "ping", {"n": 1}), timeout=0.05)
        return bool(router.poll(100))

    wait_for(timed_out_after_arriving, what="a timed-out request at the server")
    first, empty, _ = received()
    result: list[Message] = []
    thread = threading.Thread(target=lambda: result.append(
        requester.request(Message("/t", "ping", {"n": 2}), DEADLINE)))
    thread.start()
    while True:  # requests of the other timed-out attempts may arrive in between
        second, _, payload = received()
        if Message(rawstr=payload).data == {"n": 2}:
            break
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


def test_the_example_config_reads() -> None:
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "client.ini")
    sections = read_ini(path, "client")
    settings = [ClientSettings.from_section(name, s) for name, s in sections.items()]
    assert [s.compression for s in settings] == [None, "tar"]
