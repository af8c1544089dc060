"""The shared receive loop (trollmoves.receiver) and the bounded job queues (trollmoves.jobqueue).

Publishers are real ZeroMQ sockets on loopback; an XPUB socket tells when the receiver has
subscribed, so no test guesses how long a connection takes. The nameserver test runs posttroll's
own nameserver in this process on free ports.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from posttroll.message import Message

from tests.servers import HOST, free_port
from trollmoves.config import file_signature
from trollmoves.jobqueue import JobQueues
from trollmoves.receiver import Control, Receiver, SubscriberSettings, decode
from trollmoves.subscription import MAX_MESSAGE_BYTES

TOPIC = "/receiver/test"
DEADLINE = 20.0


def bad_messages(topic: str, big: int = MAX_MESSAGE_BYTES + 1_000_000) -> dict[str, bytes]:
    """Messages a receiver must survive, each starting with ``topic``'s wire prefix so that it
    passes the SUB filter: random bytes, a text that is not a posttroll message, JSON nested
    ~100 000 deep (~200 KB) and one larger than the size bound (``big`` bytes)."""
    prefix = f"pytroll:/{topic}".encode()
    header = f"pytroll:/{topic} file user@host 2026-11-21T10:00:00 v1.01 application/json "
    return {
        "random bytes": prefix + random.Random(4711).randbytes(2000),
        "not posttroll": prefix + b" this is not a posttroll message",
        "deeply nested": (header + "[" * 100_000 + "]" * 100_000).encode(),
        "oversize": prefix + b" " + b"x" * big,
    }


# -------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("kind", ["random bytes", "not posttroll", "deeply nested"])
def test_decode_refuses_what_is_not_a_posttroll_message(
        kind: str, caplog: pytest.LogCaptureFixture) -> None:
    raw = bad_messages(TOPIC, big=10)[kind]
    assert decode(raw, "tcp://origin:1") is None
    [record] = [r for r in caplog.records if r.name == "trollmoves.receiver"]
    assert record.levelno == logging.WARNING
    assert "from tcp://origin:1 that is not a posttroll message" in record.getMessage()
    assert len(record.getMessage()) < 500  # the reason and the excerpt are cut short


def test_decode_reads_posttroll_messages() -> None:
    message = decode(Message(TOPIC, "file", {"uid": "a"}).encode().encode(), "x")
    assert message is not None and (message.subject, message.data) == (TOPIC, {"uid": "a"})
    assert decode(b"", "x") is None


def test_posttroll_settings_follow_posttroll_rules(caplog: pytest.LogCaptureFixture) -> None:
    direct = SubscriberSettings.from_posttroll({"addresses": ["tcp://a:1"], "nameserver": False,
                                                "topics": ["/t"], "translate": True})
    assert (direct.addresses, direct.nameserver, direct.topics) == (("tcp://a:1",), None, ("/t",))
    assert "'translate' is not supported" in caplog.text
    ns = SubscriberSettings.from_posttroll({"nameserver": False, "services": None})
    assert (ns.nameserver, ns.services, ns.addr_listener) == ("localhost", (), False)
    assert SubscriberSettings.from_posttroll({}).services == ("",)


# ----------------------------------------------------------------------------- the loop


class Feed:
    """An XPUB socket on a free loopback port: knows when a subscriber is there."""

    def __init__(self, topic: str = TOPIC) -> None:
        self.topic = topic  #: the default subject
        self.sock = zmq.Context.instance().socket(zmq.XPUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # every (re)subscription is reported
        self.port = self.sock.bind_to_random_port(f"tcp://{HOST}")
        self.address = f"tcp://{HOST}:{self.port}"

    def wait_subscribed(self) -> None:
        """Wait for a subscription (a new one after a reconnection, too); unsubscriptions
        (a lost connection) are skipped."""
        while True:
            assert self.sock.poll(int(DEADLINE * 1000)), "nobody subscribed"
            if self.sock.recv().startswith(b"\x01"):
                return

    def send(self, data: dict, kind: str = "file", subject: str | None = None) -> None:
        """Publish a posttroll message."""
        self.sock.send_string(Message(subject or self.topic, kind, data).encode())

    def send_raw(self, raw: bytes) -> None:
        """Publish bytes as they are."""
        self.sock.send(raw)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close(0)


@pytest.fixture
def feed() -> Iterator[Feed]:
    """A publisher for the receiver under test."""
    feed = Feed()
    yield feed
    feed.close()


def test_bad_messages_and_failing_handlers_do_not_stop_the_loop(
        feed: Feed, caplog: pytest.LogCaptureFixture) -> None:
    """Each bad message is a WARNING, a handler error an ERROR; the loop goes on, and a
    message over the size bound costs only its connection, which comes back."""
    handled: queue.SimpleQueue[Message] = queue.SimpleQueue()

    def handle(message: Message) -> None:
        if message.data.get("uid") == "boom":
            raise RuntimeError("handler failed")
        handled.put(message)

    exited = threading.Event()
    receiver = Receiver(SubscriberSettings((TOPIC,), (feed.address,), None), handle,
                        max_bytes=1_000_000, on_exit=exited.set)
    receiver.start()
    try:
        feed.wait_subscribed()
        for kind, raw in bad_messages(TOPIC, big=2_000_000).items():
            if kind != "oversize":
                feed.sock.send(raw)
        feed.send({"uid": "boom"})
        feed.send({"uid": "first"})
        assert handled.get(timeout=DEADLINE).data == {"uid": "first"}
        feed.send_raw(bad_messages(TOPIC, big=2_000_000)["oversize"])
        feed.wait_subscribed()  # the receiver dropped the connection and connected again
        feed.send({"uid": "second"})
        assert handled.get(timeout=DEADLINE).data == {"uid": "second"}
    finally:
        receiver.stop()
        receiver.join(DEADLINE)
    assert exited.is_set() and receiver.error is None
    text = caplog.text
    for reason in ("UnicodeDecodeError", "ValueError", "RecursionError"):
        assert f"not a posttroll message ({reason}" in text
    assert "Could not handle file message on /receiver/test" in text
    assert "handler failed" in text
    assert f"Lost the connection to {feed.address}" in text


def test_ticks_and_resubscription(feed: Feed) -> None:
    """The tick runs at the start; resubscribe moves to another publisher."""
    ticks = threading.Event()
    handled: queue.SimpleQueue[Message] = queue.SimpleQueue()
    other = Feed()
    receiver = Receiver(SubscriberSettings((TOPIC,), (feed.address,), None), handled.put,
                        tick=ticks.set, tick_interval=3600)
    receiver.start()
    try:
        assert ticks.wait(DEADLINE)
        feed.wait_subscribed()
        receiver.resubscribe(SubscriberSettings((TOPIC,), (other.address,), None))
        other.wait_subscribed()
        other.send({"uid": "from the other"})
        assert handled.get(timeout=DEADLINE).data == {"uid": "from the other"}
        assert receiver.settings.addresses == (other.address,)
    finally:
        receiver.stop()
        receiver.join(DEADLINE)
        other.close()


def test_a_subscription_that_cannot_work_fails_at_start() -> None:
    receiver = Receiver(SubscriberSettings((TOPIC,), ("nonsense://x",), None), print)
    with pytest.raises(zmq.ZMQError):
        receiver.start()


@pytest.fixture
def nameserver() -> Iterator[str]:
    """posttroll's nameserver in this process, on free ports (multicast off)."""
    import posttroll
    from posttroll.ns import NameServer

    ports = {"nameserver_port": free_port(), "address_publish_port": free_port(),
             "broadcast_port": free_port()}
    with posttroll.config.set(**ports):
        server = NameServer(multicast_enabled=False, restrict_to_localhost=True)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        yield "localhost"
        server.stop()
        thread.join(DEADLINE)


def test_publishers_found_through_the_nameserver(nameserver: str) -> None:
    """A publisher registered before the start is asked for; one that starts later is
    subscribed from the nameserver's announcement."""
    from posttroll.publisher import create_publisher_from_dict_config

    handled: queue.SimpleQueue[Message] = queue.SimpleQueue()
    publishers = []

    def publisher(name: str) -> Any:
        pub = create_publisher_from_dict_config({"name": name, "port": 0,
                                                 "nameservers": [nameserver]}).start()
        publishers.append(pub)
        return pub

    def wait_for(pub: Any, uid: str) -> None:
        """Send until the receiver has it: subscriptions take a moment (slow joiner)."""
        while True:
            pub.send(Message(TOPIC, "file", {"uid": uid}).encode())
            try:
                if handled.get(timeout=0.2).data["uid"] == uid:
                    return
            except queue.Empty:
                continue

    early = publisher("early")
    # registered before the start: its registration reaches the nameserver asynchronously
    from posttroll.ns import get_pub_address
    deadline = time.monotonic() + DEADLINE
    while not get_pub_address("early", timeout=1, nameserver=nameserver):
        assert time.monotonic() < deadline, "the early publisher never registered"
    settings = SubscriberSettings((TOPIC,), (), nameserver, ("early", "late"), timeout=5)
    receiver = Receiver(settings, handled.put)
    try:
        done = threading.Thread(target=wait_for, args=(early, "early"), daemon=True)
        receiver.start()
        done.start()
        done.join(DEADLINE)
        assert not done.is_alive(), "nothing from the publisher registered before the start"
        late = publisher("late")
        done = threading.Thread(target=wait_for, args=(late, "late"), daemon=True)
        done.start()
        done.join(DEADLINE)
        assert not done.is_alive(), "nothing from the publisher registered later"
    finally:
        receiver.stop()
        receiver.join(DEADLINE)
        for pub in publishers:
            pub.stop()


# ----------------------------------------------------------------------------- control


def test_control_stop_reload_and_file_watch(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("a: 1\n")
    loaded = file_signature(config)
    control = Control()
    try:
        config.write_text("a: 1.5\n")  # edited before the watch began: seen as a change
        control.watch(str(config), loaded)
        assert control.wait() == Control.RELOAD
        replacement = tmp_path / "new.yaml"
        replacement.write_text("a: 2\n")
        replacement.replace(config)
        assert control.wait() == Control.RELOAD
        threading.Thread(target=control.request_stop).start()
        assert control.wait() == Control.STOP
        control.request_reload()
        assert control.wait() == Control.STOP  # a stop wins
    finally:
        control.close()


# --------------------------------------------------------------------------- job queues


def test_jobs_run_in_order_one_at_a_time_per_key() -> None:
    queues = JobQueues(workers=3, max_queued=100)
    release = threading.Event()
    ran_b = threading.Event()
    order: list[str] = []
    running: list[int] = [0]
    overlaps: list[int] = []
    lock = threading.Lock()

    def job_a(index: int) -> None:
        with lock:
            running[0] += 1
            overlaps.append(running[0])
        if index == 0:
            assert release.wait(DEADLINE)
        with lock:
            order.append(f"a{index}")
            running[0] -= 1

    for index in range(5):
        assert queues.submit("a", f"a{index}", lambda index=index: job_a(index))
    assert queues.submit("b", "b", ran_b.set)
    assert ran_b.wait(DEADLINE)  # b ran while a's first job was blocked
    assert order == []
    release.set()
    assert queues.drain(DEADLINE) == []
    queues.join()
    assert order == [f"a{index}" for index in range(5)]
    assert max(overlaps) == 1


def test_a_full_queue_blocks_the_submitter_until_there_is_room() -> None:
    queues = JobQueues(workers=1, max_queued=2)
    started, release = threading.Event(), threading.Event()
    done: list[str] = []

    def first() -> None:
        started.set()
        assert release.wait(DEADLINE)
        done.append("first")

    queues.submit("k", "first", first)
    assert started.wait(DEADLINE)  # running: not counted as queued
    queues.submit("k", "second", lambda: done.append("second"))
    queues.submit("k", "third", lambda: done.append("third"))
    submitted = threading.Event()

    def fourth() -> None:
        queues.submit("k", "fourth", lambda: done.append("fourth"))
        submitted.set()

    threading.Thread(target=fourth, daemon=True).start()
    assert not submitted.wait(0.2), "a full queue accepted a job"
    assert len(queues) == 2
    release.set()
    assert submitted.wait(DEADLINE)
    assert queues.drain(DEADLINE) == []
    queues.join()
    assert done == ["first", "second", "third", "fourth"]


def test_close_releases_a_blocked_submitter_and_drain_returns_what_did_not_start() -> None:
    queues = JobQueues(workers=1, max_queued=1)
    started, release = threading.Event(), threading.Event()
    queues.submit("k", "running", lambda: (started.set(), release.wait(DEADLINE)))
    assert started.wait(DEADLINE)
    queues.submit("k", "queued", lambda: None)
    result: list[bool] = []
    blocked = threading.Thread(target=lambda: result.append(
        queues.submit("k", "refused", lambda: None)))
    blocked.start()
    queues.close()
    blocked.join(DEADLINE)
    assert result == [False]
    dropped = queues.drain(0)
    assert [(job.key, job.label) for job in dropped] == [("k", "queued")]
    release.set()
    queues.join()
    assert not queues.submit("k", "late", lambda: None)
