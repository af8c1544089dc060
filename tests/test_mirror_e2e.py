"""The mirror end to end: ``move_it_mirror.py`` between servers and clients, all processes on
loopback, ours and trollmoves 0.19's.

Every chain starts downstream first (clients, then the mirror, then the servers), so that each
process is connected when its publisher's first heartbeat comes; a heartbeat received is the
proof that a subscription is in place. Nothing sleeps: every wait is a log line, a message or
a file, with a deadline.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from posttroll.message import Message
from posttroll.publisher import Publisher

from tests.moveit import (
    Deployment,
    Listener,
    MoveItProcess,
    drop,
    installed,
    ports,
    reference_available,
    script,
    start_server,
    wait_for,
    wait_receiving,
    write_ini,
)
from tests.test_client_e2e import client_section, dirs, hrit_name, hrit_server_section
from trollmoves.requester import Requester

pytestmark = pytest.mark.skipif(installed("move_it_mirror.py") is None,
                                reason="move_it_mirror.py is not installed (pip install -e .)")
TOPIC = "/1b/hrit"
MIRROR_BEAT = "/heartbeat/move_it_mirror"


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Deployment]:
    """Processes for one test, all stopped at the end."""
    env = Deployment(tmp_path)
    yield env
    env.close()


def start_mirror(setup: Deployment, sections: dict[str, dict[str, Any]], port: int
                 ) -> MoveItProcess:
    """Start ``move_it_mirror.py -v -p port`` with ``sections``; ready once it serves."""
    directory = setup.tmp / "mirror"
    directory.mkdir(exist_ok=True)
    config = write_ini(directory / "mirror.ini", sections)
    mirror = MoveItProcess("mirror", directory,
                           [*script("move_it_mirror.py"), "-v", "-p", str(port), str(config)])
    setup.procs.append(mirror)
    mirror.start(r"move_it_mirror ready")
    return mirror


def mirror_section(upstream_ports: list[int], stage: Path, request_port: int, **extra: Any
                   ) -> dict[str, Any]:
    return {"providers": " ".join(f"127.0.0.1:{p}" for p in upstream_ports),
            "client_topic": TOPIC, "topic": TOPIC, "destination": f"{stage}/",
            "request_port": request_port, "request_address": "127.0.0.1",
            "info": "network=dmz", **extra}


def announced(listener: Listener, count: int) -> list[Message]:
    """Wait for ``count`` files announced (by a server or the mirror) on the listener."""
    return listener.collect(
        lambda ms: len([m for m in ms if m.type == "file" and "request_address" in m.data])
        >= count, what=f"{count} announcements")


def delivered(listener: Listener, names: list[str]) -> list[Message]:
    """Wait for a client's final ``file`` message of every name."""
    def done(messages: list[Message]) -> bool:
        return set(names) <= {m.data["uid"] for m in messages
                              if m.type == "file" and "origin" in m.data}
    return listener.collect(done, what=f"{len(names)} delivered files")


def test_server_mirror_client_and_dispatcher_chained(setup: Deployment, tmp_path: Path) -> None:
    """Two servers announcing the same files, a mirror, a client and a dispatcher after it."""
    src1, src2, stage, dst, dispatched = dirs(tmp_path, "src1", "src2", "stage", "dst",
                                              "dispatched")
    port1, req1 = setup.server({"hrit": hrit_server_section(src1)}, name="server1")
    port2, req2 = setup.server({"hrit": hrit_server_section(src2)}, name="server2")
    mirror_port, mirror_req, client_port = ports(3)
    dispatcher_config = tmp_path / "dispatcher.yaml"
    dispatcher_config.write_text(yaml.safe_dump({
        "posttroll_subscriber": {"subscribe_addresses": [f"tcp://127.0.0.1:{client_port}"],
                                 "nameserver": False},
        "local": {"host": "", "directory": str(dispatched),
                  "dispatch_configs": [{"topics": [TOPIC]}]}}))
    dispatcher = MoveItProcess("dispatcher", tmp_path,
                               [*script("dispatcher.py"), "-v", str(dispatcher_config)])
    setup.procs.append(dispatcher)
    dispatcher.start(r"Dispatcher ready")  # connected before the client binds
    client = setup.client({"hrit": client_section(mirror_port, f"{dst}/{{platform_name}}/",
                                                  client_port)})
    listener = Listener([mirror_port, port1, client_port])
    setup.listeners.append(listener)
    mirror = start_mirror(setup, {"hrit": mirror_section([port1, port2], stage, mirror_req)},
                          mirror_port)
    setup.run()
    for port in (port1, port2):
        wait_receiving(mirror, port)
    wait_receiving(client, mirror_port)
    listener.wait_connected()
    names = [hrit_name(n) for n in range(4)]
    for name in names:
        drop(src1, name)
        drop(src2, name)
    finals = [m for m in delivered(listener, names) if m.type == "file" and "origin" in m.data]
    mirror_address = f"127.0.0.1:{mirror_req}"
    assert sorted(m.data["uid"] for m in finals) == sorted(names)  # once each
    assert {m.data["origin"] for m in finals} == {mirror_address}
    for name in names:
        assert (stage / name).read_bytes() == b"x" * 1024
        assert (dst / "MSG4" / name).read_bytes() == b"x" * 1024
        wait_for(lambda name=name: (dispatched / name).exists(), what=f"{name} dispatched")
    announcements = [m for m in listener.of_type("file") if "request_address" in m.data]
    mirrored = [m for m in announcements if m.data["request_address"] == mirror_address]
    assert sorted(m.data["uid"] for m in mirrored) == sorted(names)  # once each
    upstream = {m.data["uid"]: m for m in announcements if m not in mirrored}
    for message in mirrored:
        assert (message.subject, message.type) == (TOPIC, "file")
        uri = message.data["uri"]  # from the server that announced the file first
        assert uri in {f"{src}/{message.data['uid']}" for src in (src1, src2)}
        assert message.data == {**upstream[message.data["uid"]].data, "network": "dmz",
                                "request_address": mirror_address, "uri": uri}
    assert any(m.subject == MIRROR_BEAT and m.type == "beat" for m in listener.messages)
    # each file came from one of the servers, and the other one got an ack
    sources = rf"127\.0\.0\.1:(?:{req1['hrit']}|{req2['hrit']})"
    mirror.wait_log(rf"fetched H-000-MSG4.* from {sources}", count=len(names))
    acked = re.compile(rf"{sources} answered ack to ack of (H-000-MSG4\S+)")
    wait_for(lambda: set(acked.findall(mirror.log_text())) == set(names), what="acks")
    dispatcher.wait_log(r"Dispatched .*H-000-MSG4", count=len(names))


def test_two_clients_asking_for_the_same_files_cost_one_upstream_transfer_each(
        setup: Deployment, tmp_path: Path) -> None:
    src, stage, dst1, dst2 = dirs(tmp_path, "src", "stage", "dst1", "dst2")
    server_port, _ = setup.server({"hrit": hrit_server_section(src)})
    mirror_port, mirror_req, port1, port2 = ports(4)
    clients = [setup.client({"hrit": client_section(mirror_port, f"{dst}/", port)}, name=name)
               for name, dst, port in (("client1", dst1, port1), ("client2", dst2, port2))]
    mirror = start_mirror(setup, {"hrit": mirror_section([server_port], stage, mirror_req)},
                          mirror_port)
    setup.run()
    wait_receiving(mirror, server_port)
    for client in clients:
        wait_receiving(client, mirror_port)
    names = [hrit_name(n) for n in range(5)]
    for name in names:
        drop(src, name)
    for client in clients:
        client.wait_log(r"Delivered H-000-MSG4", count=len(names))
    for name in names:
        assert (dst1 / name).exists() and (dst2 / name).exists()
    server = next(p for p in setup.procs if p.name == "server")
    assert len(server.wait_log(r"sent .*H-000-MSG4")) == len(names)  # one upstream push each
    assert len(mirror.wait_log(r"fetched H-000-MSG4")) == len(names)
    assert len(mirror.wait_log(r"hrit: sent .*H-000-MSG4", count=2 * len(names))) == 10


def test_upstream_server_stopped_is_a_clean_error_and_later_files_pass(
        setup: Deployment, tmp_path: Path) -> None:
    src, stage, dst = dirs(tmp_path, "src", "stage", "dst")
    server_port, req_port, probe_port, mirror_port, mirror_req, client_port = ports(6)
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    server_config = write_ini(server_dir / "server.ini", {"hrit": hrit_server_section(
        src, request_port=req_port, request_address="127.0.0.1", nameserver="false")})
    # stands for the stopped server: announces a file whose request port is dead
    probe = Publisher(f"tcp://127.0.0.1:{probe_port}", name="probe").start()
    try:
        client = setup.client({"hrit": client_section(mirror_port, f"{dst}/", client_port)})
        listener = Listener([mirror_port])
        setup.listeners.append(listener)
        mirror = start_mirror(setup, {"hrit": mirror_section(
            [server_port, probe_port], stage, mirror_req, req_timeout=0.5)}, mirror_port)
        server = start_server(server_dir, server_config, server_port)
        wait_receiving(mirror, server_port)
        wait_receiving(client, mirror_port)
        listener.wait_connected()
        first, lost, later = hrit_name(1), hrit_name(2), hrit_name(3)
        drop(src, first)
        client.wait_log(rf"Delivered {first}")

        server.stop()
        drop(src, lost)
        announcement = Message(TOPIC, "file", {"uri": str(src / lost), "uid": lost,
                                               "request_address": f"127.0.0.1:{req_port}"})

        def relayed() -> bool:
            probe.send(announcement.encode())
            listener.drain(0.05)
            return lost in listener.uids("file")

        wait_for(relayed, what="the mirror relaying the probe's announcement")
        client.wait_log(rf"{lost} from 127\.0\.0\.1:{mirror_req}: err cannot fetch {lost} from "
                        rf"upstream: 127\.0\.0\.1:{req_port}: no reply")
        mirror.wait_log(rf"cannot fetch {lost} from upstream")
        assert mirror.is_running

        server.start(r"move_it_server ready")  # its backlog announces both files again
        drop(src, later)
        client.wait_log(rf"Delivered {later}")
        client.wait_log(rf"Delivered {lost}")  # re-announced: its fetch had failed
        assert (dst / lost).exists() and (dst / later).exists()
        assert listener.uids("file").count(first) == 1  # delivered once: not re-announced
    finally:
        probe.stop()
    mirror.stop()
    assert mirror.proc is not None and mirror.proc.returncode == 0
    assert "move_it_mirror stopped" in mirror.log_text()


@pytest.mark.reference
@pytest.mark.skipif(not reference_available(), reason="trollmoves 0.19 not installed")
def test_between_a_reference_server_and_a_reference_client(tmp_path: Path) -> None:
    setup = Deployment(tmp_path, reference_server=True)
    try:
        src, stage, dst = dirs(tmp_path, "src", "stage", "dst")
        server_port, req = setup.server({"hrit": hrit_server_section(src)})
        mirror_port, mirror_req, client_port = ports(3)
        # a trollmoves 0.19 client subscribes to the heartbeats of move_it_server and of
        # move_it_<its section>: named "mirror", it hears the mirror's and shows it is connected
        client = setup.client({"mirror": client_section(
            mirror_port, f"{dst}/{{platform_name}}/", client_port)}, reference=True)
        mirror = start_mirror(setup, {"hrit": mirror_section([server_port], stage, mirror_req)},
                              mirror_port)
        listener = setup.listen(client_port)  # before run: connected as the processes start
        setup.run()
        wait_receiving(mirror, server_port)
        client.wait_log(rf"Receiving \(SUB\) pytroll:/{MIRROR_BEAT} beat")
        names = [hrit_name(n) for n in range(3)]
        for name in names:
            drop(src, name)
        finals = delivered(listener, names)
        for name in names:
            assert (dst / "MSG4" / name).read_bytes() == b"x" * 1024
            assert (stage / name).exists()
        assert {m.data["origin"] for m in finals if m.type == "file" and "origin" in m.data} == {
            f"127.0.0.1:{mirror_req}"}
        mirror.wait_log(rf"fetched H-000-MSG4.* from 127\.0\.0\.1:{req['hrit']}",
                        count=len(names))
    finally:
        setup.close()


def test_a_file_announced_before_a_config_edit_is_served_after_it(setup: Deployment,
                                                                  tmp_path: Path) -> None:
    src, stage, dst = dirs(tmp_path, "src", "stage", "dst")
    server_port, _ = setup.server({"hrit": hrit_server_section(src)})
    mirror_port, mirror_req = ports(2)
    listener = Listener([mirror_port])
    setup.listeners.append(listener)
    section = mirror_section([server_port], stage, mirror_req)
    mirror = start_mirror(setup, {"hrit": section}, mirror_port)
    setup.run()
    wait_receiving(mirror, server_port)
    listener.wait_connected()
    name = hrit_name(4)
    drop(src, name)
    [relayed] = [m for m in announced(listener, 1)
                 if m.type == "file" and m.data.get("uid") == name]
    write_ini(tmp_path / "mirror" / "mirror.ini", {"hrit": {**section, "info": "network=dmz2"}})
    mirror.wait_log(r"Reloaded .*changed \['hrit'\]")
    requester = Requester(f"tcp://127.0.0.1:{mirror_req}")
    try:
        reply = requester.request(
            Message(TOPIC, "push", {**relayed.data, "destination": f"{dst}/"}), timeout=20)
    finally:
        requester.close()
    assert reply.type == "file", reply.data
    assert (dst / name).read_bytes() == b"x" * 1024
    staged = [p for p in stage.rglob("*") if p.is_file()]
    assert len(staged) == 1
    # renamed: the old section, its registry and its staged copy go; the new one starts afresh
    write_ini(tmp_path / "mirror" / "mirror.ini", {"hrit2": section})
    mirror.wait_log(r"Reloaded .*added \['hrit2'\], changed \[\], removed \['hrit'\]")
    mirror.wait_log(r"hrit: section removed; 1 staged copy removed")
    assert not staged[0].exists()

