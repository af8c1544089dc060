"""``move_it_server.py`` end to end, as a process: announcements, pushes (local and SFTP),
backlog, reload, unpacking, bad input, and trollmoves 0.19's client requesting from it.

Nothing sleeps: listeners connect before the server starts (it announces nothing during its
first second), and every other wait is a reply, a message, a file or a log line with a deadline.
"""

from __future__ import annotations

import bz2
import os
import random
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
from posttroll.message import Message

from tests.moveit import (
    Listener,
    MoveItProcess,
    ports,
    reference_available,
    start_client,
    start_server,
    wait_for,
    wait_receiving,
    write_ini,
)
from tests.test_server import Requester
from tests.test_unpack import make_tar

PATTERN = "H-000-{platform_name}-{nominal_time:%Y%m%d%H%M}-__"
DEADLINE = 20.0


def hrit(minute: int) -> str:
    return f"H-000-MSG4-2026112110{minute:02d}-__"


def drop(directory: Path, name: str, content: bytes = b"x" * 1024) -> Path:
    """Put a file in place as producers do: write aside, then rename."""
    tmp = directory / f".{uuid.uuid4().hex}.tmp"
    tmp.write_bytes(content)
    os.replace(tmp, directory / name)
    return directory / name


def hrit_section(src: Path, port: int, **items: Any) -> dict[str, Any]:
    return {"origin": str(src / PATTERN), "topic": "/1b/hrit", "request_port": port,
            "request_address": "127.0.0.1", "info": "sensor=seviri;variant=0DEG",
            "station": "e2e", **items}


def announcement(listener: Listener, uid: str) -> Message:
    """Wait for the announcement of ``uid``."""
    found = listener.collect(lambda ms: [m for m in ms if m.type == "file"
                                         and m.data.get("uid") == uid], what=uid)
    return next(m for m in found if m.type == "file" and m.data.get("uid") == uid)


@dataclass
class Served:
    """The module's server process and what it watches."""

    proc: MoveItProcess
    listener: Listener
    tmp: Path
    ports: dict[str, int]

    def requester(self, section: str = "hrit") -> Requester:
        return Requester(self.ports[section])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, sshd_server: Any) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("served")
    for name in ("src", "packed", "tars", "work"):
        (tmp / name).mkdir()
    pub, hrit_port, packed_port, tars_port = ports(4)
    config = write_ini(tmp / "server.ini", {
        "hrit": hrit_section(
            tmp / "src", hrit_port,
            connection_parameters__ssh_key_filename=sshd_server.key_filename,
            connection_parameters__known_hosts=str(sshd_server.known_hosts)),
        "packed": {"origin": str(tmp / "packed" / "{name}.h5.bz2"), "topic": "/packed",
                   "request_port": packed_port, "compression": "bzip",
                   "working_directory": str(tmp / "work")},
        "tars": {"origin": str(tmp / "tars" / "{name}.tar"), "topic": "/tars",
                 "request_port": tars_port, "compression": "tar",
                 "working_directory": str(tmp / "work" / "tar")},
    })
    listener = Listener([pub])  # connected before the first announcement
    proc = start_server(tmp, config, pub)
    listener.wait_connected()
    yield Served(proc, listener, tmp, {"hrit": hrit_port, "packed": packed_port,
                                       "tars": tars_port})
    listener.close()
    proc.stop()
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log_tail()
    assert "move_it_server stopped" in proc.log_text()


def test_announcement_reaches_a_posttroll_subscriber(served: Served) -> None:
    src = drop(served.tmp / "src", hrit(0))
    message = announcement(served.listener, src.name)
    assert message.subject == "/1b/hrit"
    assert message.data["uri"] == str(src)
    assert message.data["sensor"] == "seviri" and message.data["platform_name"] == "MSG4"
    assert message.data["request_address"] == f"127.0.0.1:{served.ports['hrit']}"
    served.listener.collect(lambda ms: served.listener.of_type("beat"), what="a heartbeat")
    beat = served.listener.of_type("beat")[0]
    assert (beat.subject, beat.data) == ("/heartbeat/move_it_server", {"min_interval": 30})


def test_push_delivers_locally_and_over_sftp(served: Served, sshd_server: Any,
                                             tmp_path: Path) -> None:
    src = drop(served.tmp / "src", hrit(1), b"local and remote")
    data = announcement(served.listener, src.name).data
    client = served.requester()
    try:
        local = client("push", {**data, "destination": f"file://vm{tmp_path}/local/"})
        assert local.type == "file" and local.data["destination"] == f"file://vm{tmp_path}/local/"
        assert (tmp_path / "local" / src.name).read_bytes() == b"local and remote"
        remote = client("push", {**data, "destination": sshd_server.url(tmp_path / "sftp") + "/"})
        assert remote.type == "file", remote.data
        assert (tmp_path / "sftp" / src.name).read_bytes() == b"local and remote"
    finally:
        client.close()


def test_bzip2_unpacking(served: Served, tmp_path: Path) -> None:
    drop(served.tmp / "packed", "npp.h5.bz2", bz2.compress(b"payload"))
    data = announcement(served.listener, "npp.h5").data
    assert data["uri"] == str(served.tmp / "work" / "npp.h5")
    client = served.requester("packed")
    try:
        assert client("push", {**data, "destination": f"{tmp_path}/"}).type == "file"
        assert (tmp_path / "npp.h5").read_bytes() == b"payload"
    finally:
        client.close()


def test_tar_unpacking_and_unsafe_tar_refused(served: Served, tmp_path: Path) -> None:
    tars = served.tmp / "tars"
    make_tar(tmp_path / "evil.tar", {"../../../evil.sh": b"#!"}).rename(tars / "evil.tar")
    make_tar(tmp_path / "pass.tar", {"a.h5": b"a", "sub/b.h5": b"b"}).rename(tars / "pass.tar")
    data = announcement(served.listener, "b.h5").data
    assert data["uri"] == str(served.tmp / "work" / "tar" / "sub" / "b.h5")
    served.proc.wait_log(r"tars: refused .*evil\.tar: member '\.\./\.\./\.\./evil\.sh' leads out")
    uids = [m.data.get("uid") for m in served.listener.messages if m.subject == "/tars"]
    assert uids == ["a.h5", "b.h5"]
    assert not list(served.tmp.parent.rglob("evil.sh"))
    client = served.requester("tars")
    try:
        assert client("push", {**data, "destination": f"{tmp_path}/dst/"}).type == "file"
        assert (tmp_path / "dst" / "b.h5").read_bytes() == b"b"
    finally:
        client.close()


def test_bad_input_gets_a_reply_or_a_clean_drop(served: Served) -> None:
    port = served.ports["hrit"]
    ctx = zmq.Context.instance()

    def req(payload: bytes) -> Message:
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")
        try:
            sock.send(payload)
            assert sock.poll(int(DEADLINE * 1000)), "no reply"
            return Message(rawstr=sock.recv())
        finally:
            sock.close(0)

    noise = random.Random(3).randbytes(4096)
    assert "not a posttroll message" in req(noise).data
    assert "not a posttroll message" in req(b"hello, is this the FTP server?").data
    assert "request too large" in req(b"pytroll://x push " + b"x" * 10_000_000).data
    passwd = Message("/1b/hrit", "push", {"uri": "/etc/passwd", "destination": "/tmp/x/"})
    assert req(passwd.encode().encode()).data == "/etc/passwd is not served by section hrit"
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    try:
        dealer.send_multipart([b"first", b"second", b"third"])  # no envelope, three frames
        assert dealer.poll(int(DEADLINE * 1000))
        assert b"expected exactly one message frame" in dealer.recv_multipart()[-1]
    finally:
        dealer.close(0)
    served.proc.wait_log(r"hrit: refused a request from 127\.0\.0\.1", count=4)
    served.proc.wait_log(r"hrit: refused push request: /etc/passwd is not served")
    client = served.requester()
    try:
        assert client("ping").data == {"station": "e2e"}  # still serving
    finally:
        client.close()
    assert served.proc.is_running


def start_listening_server(tmp_path: Path, sections: dict[str, dict[str, Any]], pub: int,
                           *extra: str) -> tuple[MoveItProcess, Listener]:
    listener = Listener([pub])
    proc = start_server(tmp_path, write_ini(tmp_path / "server.ini", sections), pub,
                        extra=extra)
    listener.wait_connected()
    return proc, listener


def test_backlog_polling_and_a_directory_that_appears_later(tmp_path: Path) -> None:
    src, late = tmp_path / "src", tmp_path / "not" / "yet"
    src.mkdir()
    old = [drop(src, hrit(m)) for m in range(3)]
    drop(src, hrit(4), b"")  # empty: never announced
    pub, port, late_port = ports(3)
    sections = {"hrit": hrit_section(src, port, watchdog_timeout=0.1),
                "late": hrit_section(late, late_port, topic="/late", watchdog_timeout=0.1)}
    proc, listener = start_listening_server(tmp_path, sections, pub, "-w")
    try:
        for path in old:
            announcement(listener, path.name)
        client = Requester(port)
        try:
            info = client("info", {"max_count": 10}, subject="/1b/hrit")
        finally:
            client.close()
        assert sorted(info.data["files"]) == [f"/1b/hrit/{p.name}" for p in old]
        proc.wait_log(rf"late: directory {late} does not exist yet")
        late.mkdir(parents=True)
        announcement(listener, drop(late, hrit(9)).name)
        proc.wait_log(rf"late: directory {late} appeared")
    finally:
        listener.close()
        proc.stop()


def test_disable_backlog_and_config_reload(tmp_path: Path) -> None:
    src, other = tmp_path / "src", tmp_path / "other"
    src.mkdir()
    other.mkdir()
    old = drop(src, hrit(0))
    pub, port, new_port = ports(3)
    sections = {"hrit": hrit_section(src, port), "incomplete": {"topic": "/no/origin"}}
    proc, listener = start_listening_server(tmp_path, sections, pub, "--disable-backlog")
    try:
        proc.wait_log(r"Section incomplete skipped: .*\[incomplete\]: needs origin")
        del sections["incomplete"]
        new = drop(src, hrit(1))
        announcement(listener, new.name)
        assert old.name not in [m.data.get("uid") for m in listener.of_type("file")]
        # a new section: the running one is left alone
        sections["other"] = hrit_section(other, new_port, topic="/other", station="two")
        write_ini(tmp_path / "server.ini.new", sections).replace(tmp_path / "server.ini")
        proc.wait_log(r"Reloaded .*added \['other'\], changed \[\], removed \[\]")
        client = Requester(new_port)
        try:
            assert client("ping").data == {"station": "two"}
        finally:
            client.close()
        # a broken edit changes nothing
        (tmp_path / "server.ini").write_text("[hrit]\norigin = /x/{a}\ntopic = /t\n"
                                             "request_port = not-a-port\n")
        proc.wait_log(r"Configuration not reloaded.*\[hrit\] request_port")
        drop(other, hrit(2))
        announcement(listener, hrit(2))
        # SIGHUP with a good file again: "other" removed
        write_ini(tmp_path / "server.ini", {"hrit": hrit_section(src, port)})
        proc.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        proc.wait_log(r"removed \['other'\]")
        assert proc.log_text().count("Started section hrit") == 1
    finally:
        listener.close()
        proc.stop()


def test_a_section_that_stops_working_is_restarted(tmp_path: Path) -> None:
    pub, port = ports(2)
    src = tmp_path / "src"
    src.mkdir()
    proc, listener = start_listening_server(tmp_path, {
        "hrit": hrit_section(src, port),
        "relay": {"listen": "/new", "topic": "/relayed", "nameserver": "false",
                  "addresses": "tcp://127.0.0.1:not-a-port"}}, pub)
    try:
        proc.wait_log(r"ERROR .*relay: the listener stopped; the section no longer works")
        proc.wait_log(r"ERROR .*Section relay stopped working; restarting it in 1 s")
        proc.wait_log(r"Section relay stopped working; restarting it in 2 s")  # backing off
        assert proc.log_text().count("Started section relay") >= 2
        assert proc.log_text().count("Started section hrit") == 1  # the others run on
        announcement(listener, drop(src, hrit(0)).name)
    finally:
        listener.close()
        proc.stop()


@pytest.mark.reference
@pytest.mark.skipif(not reference_available(), reason="trollmoves 0.19 not installed")
def test_reference_client_requests_from_our_server(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    pub, port, client_port = ports(3)
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    config = write_ini(client_dir / "client.ini", {"hrit": {
        "providers": f"127.0.0.1:{pub}", "destination": f"file://{dst}/",
        "topic": "/1b/hrit", "publish_port": client_port, "nameservers": "false"}})
    client = start_client(client_dir, config, reference=True)
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    server = start_server(server_dir, write_ini(server_dir / "server.ini", {
        "hrit": hrit_section(src, port, delete="True", remove_delay=0)}), pub)
    try:
        wait_receiving(client, pub, reference=True)  # our first heartbeat reached it
        src_file = drop(src, hrit(5), b"from our server to 0.19")
        wait_for(lambda: (dst / src_file.name).exists(), DEADLINE, "the delivered file")
        assert (dst / src_file.name).read_bytes() == b"from our server to 0.19"
        server.wait_log(rf"hrit: sent {src_file} to {dst}/{src_file.name}")
        wait_for(lambda: not src_file.exists(), DEADLINE, "the source removed after the ack")
    finally:
        client.kill()  # the reference peer's shutdown is not under test here
        server.stop()
