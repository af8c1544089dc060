"""The client end to end: ``move_it_client.py`` and servers as processes, as a user runs them.

Servers are ours (``move_it_server.py`` of this package); tests marked ``@interop`` run with
trollmoves 0.19's server too, and the hot-spare pair test mixes our client with 0.19's. Files
are put in place with a rename, as producers do; nothing sleeps: every wait is a log line, a
message or a file with a deadline.
"""

from __future__ import annotations

import bz2
import io
import re
import signal
import socket
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from posttroll.message import Message

from tests.moveit import (
    Deployment,
    FakeServer,
    Held,
    Listener,
    MoveItProcess,
    drop,
    installed,
    ports,
    push_ok,
    reference_available,
    script,
    start_client,
    wait_for,
    write_ini,
)

OURS = installed("move_it_server.py") is not None
SERVER_KINDS = [pytest.param("ours", marks=pytest.mark.skipif(not OURS, reason="no server yet")),
                pytest.param("0.19", marks=[pytest.mark.reference, pytest.mark.skipif(
                    not reference_available(), reason="trollmoves 0.19 not installed")])]
PATTERN = "H-000-{platform_name}-{nominal_time:%Y%m%d%H%M}-__"


def hrit_name(number: int, platform: str = "MSG4") -> str:
    """A file name matching :data:`PATTERN`."""
    return f"H-000-{platform}-20261121{10 + number // 60:02d}{number % 60:02d}-__"


@pytest.fixture
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    """Processes for one test; the server is ours unless parametrized (indirect) otherwise."""
    kind = getattr(request, "param", "ours")
    if kind == "ours" and not OURS:
        pytest.skip("move_it_server.py is not installed")
    env = Deployment(tmp_path, reference_server=kind == "0.19")
    yield env
    env.close()


def interop(func: Any) -> Any:
    """Run a test with our server and with trollmoves 0.19's."""
    return pytest.mark.parametrize("setup", SERVER_KINDS, indirect=True)(func)


def hrit_server_section(src: Path, **extra: Any) -> dict[str, Any]:
    return {"origin": f"{src}/{PATTERN}", "topic": "/1b/hrit",
            "info": "sensor=seviri;variant=0DEG", **extra}


def client_section(server_port: int, destination: str, publish_port: int, **extra: Any
                   ) -> dict[str, Any]:
    return {"providers": f"127.0.0.1:{server_port}", "destination": destination,
            "topic": "/1b/hrit", "publish_port": publish_port, **extra}


def dirs(tmp_path: Path, *names: str) -> list[Path]:
    made = []
    for name in names:
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        made.append(tmp_path / name)
    return made


# ------------------------------------------------------------------------------------ tests

@interop
def test_local_destination_and_the_published_messages(setup: Deployment, tmp_path: Path) -> None:
    src, dst = dirs(tmp_path, "src", "dst")
    server_port, req = setup.server({"hrit": hrit_server_section(src)})
    (client_port,) = ports(1)
    setup.client({"hrit": client_section(server_port, f"file://{dst}/{{platform_name}}/",
                                         client_port)})
    listener = setup.listen(client_port)
    setup.run()
    names = [hrit_name(n) for n in range(5)]
    for name in names:
        drop(src, name)
    listener.collect(lambda ms: len({m.data["uid"] for m in ms if m.type == "file"}) == 5,
                     what="5 delivered files")
    for name in names:
        assert (dst / "MSG4" / name).read_bytes() == b"x" * 1024
    origin = f"127.0.0.1:{req['hrit']}"
    push = next(m for m in listener.of_type("push") if m.data["uid"] == names[0])
    assert push.subject == "/1b/hrit"
    assert push.data["destination"] == f"file://{socket.gethostname()}{dst}/MSG4/"
    assert push.data["request_address"] == origin and push.data["sensor"] == "seviri"
    ack = next(m for m in listener.of_type("ack") if m.data["uid"] == names[0])
    assert "destination" not in ack.data and ack.data["request_address"] == origin
    final = next(m for m in listener.of_type("file") if m.data["uid"] == names[0]).data
    assert final == {"sensor": "seviri", "variant": "0DEG", "platform_name": "MSG4",
                     "nominal_time": final["nominal_time"], "uri": f"{dst}/MSG4/{names[0]}",
                     "uid": names[0], "origin": origin}
    assert final["nominal_time"].isoformat() == "2026-11-21T10:00:00"
    assert sorted(listener.uids("file")) == sorted(names)  # each once


@interop
def test_same_files_from_two_servers_are_requested_once(setup: Deployment, tmp_path: Path) -> None:
    src1, src2, dst = dirs(tmp_path, "src1", "src2", "dst")
    port1, req1 = setup.server({"hrit": hrit_server_section(src1)}, name="server1")
    port2, req2 = setup.server({"hrit": hrit_server_section(src2)}, name="server2")
    (client_port,) = ports(1)
    section = client_section(port1, f"{dst}/", client_port)
    section["providers"] = f"127.0.0.1:{port1} 127.0.0.1:{port2}"
    client = setup.client({"hrit": section})
    listener = setup.listen(client_port)
    setup.run()
    names = [hrit_name(n) for n in range(4)]
    for name in names:
        drop(src1, name)
        drop(src2, name)
    listener.collect(lambda ms: len(listener.uids("file")) == 4, what="4 files")
    assert sorted(listener.uids("push")) == sorted(names)  # requested once each
    # every file came from one server and the other one got an ack
    client.wait_log(r"Sent ack for H-000-MSG4", count=4)
    origins = {m.data["origin"] for m in listener.of_type("file")}
    assert origins <= {f"127.0.0.1:{req1['hrit']}", f"127.0.0.1:{req2['hrit']}"}


def test_hot_spare_with_the_primary_killed_mid_stream(setup: Deployment, tmp_path: Path) -> None:
    src, dst = dirs(tmp_path, "src", "dst")
    server_port, _ = setup.server({"hrit": hrit_server_section(src)})
    primary_port, spare_port = ports(2)
    primary_section = client_section(server_port, f"{dst}/", primary_port,
                                     transfer_req_timeout=2)
    primary_section["providers"] += f" 127.0.0.1:{spare_port}"
    # the spare leaves a file to the primary only if the primary's push comes within its
    # delay: far longer than that takes on a loaded machine, or both may push and announce it
    spare_section = client_section(server_port, f"{dst}/", spare_port, transfer_req_timeout=2,
                                   processing_delay=5)
    spare_section["providers"] += f" 127.0.0.1:{primary_port}"
    primary = setup.client({"hrit": primary_section}, name="primary")
    spare = setup.client({"hrit": spare_section}, name="spare")
    from_primary, from_spare = setup.listen(primary_port), setup.listen(spare_port)
    setup.run()
    names = [hrit_name(n) for n in range(30)]
    for name in names[:15]:
        drop(src, name)
    from_primary.collect(lambda ms: len(from_primary.uids("file")) >= 5, what="first files")
    primary.kill()  # while it has pushes in flight
    for name in names[15:]:
        drop(src, name)

    def accounted() -> set[str]:
        from_primary.drain()
        from_spare.drain()
        # the one window a crash can hit: the primary's ack sent, its file message not
        acked_only = set(from_primary.uids("ack")) - set(from_primary.uids("file"))
        return set(from_primary.uids("file") + from_spare.uids("file")) | acked_only

    # the spare takes over after its delay, the pushes in flight after 2 x 2 + 5 s
    wait_for(lambda: accounted() == set(names), timeout=60, what="every file")
    announced = from_primary.uids("file") + from_spare.uids("file")
    assert len(announced) == len(set(announced))  # none twice
    assert len(names) - len(announced) <= 1
    assert all((dst / name).read_bytes() == b"x" * 1024 for name in names)
    assert spare.log_text().count("Delivered H-000") >= 15


def _probe_until(heard: Callable[[], bool], probe: Callable[[str], Any]) -> None:
    """Announce probe files (``probe(uid)``) until ``heard()``: a subscription between two
    clients is known to be in place only once a message went through it."""
    sent = 0

    def check() -> bool:
        nonlocal sent
        if heard():
            return True
        probe(f"probe-{sent}")
        sent += 1
        return False

    wait_for(check, interval=0.5, what="a message between the clients")


def test_hot_spare_pair_with_a_backlog_pushes_every_file_once(tmp_path: Path) -> None:
    """More files than ``workers``: what waits in the primary's queue is the spare's to take
    after its delay, and a file one client pushed or delivered is never pushed by the other."""
    names = [f"f{number:02d}.h5" for number in range(20)]

    def hold_the_primarys(request: Message) -> Message | None:
        primarys = "/primary/" in str(request.data.get("destination"))
        return None if primarys and request.data.get("uid") in names else push_ok(request)

    main = FakeServer(hold_the_primarys)
    for_primary, for_spare = FakeServer(), FakeServer()  # probes that one client hears alone
    primary_port, spare_port = ports(2)
    procs: list[MoveItProcess] = []

    def client(name: str, own: int, providers: list[int], **extra: Any) -> MoveItProcess:
        directory = tmp_path / name
        directory.mkdir()
        section = {"providers": " ".join(f"127.0.0.1:{port}" for port in providers),
                   "destination": f"{tmp_path}/{name}/", "topic": "/1b/hrit",
                   "publish_port": own, "nameservers": "false", "workers": 2,
                   "transfer_req_timeout": 60, **extra}
        proc = start_client(directory, write_ini(directory / "client.ini", {"hrit": section}),
                            name=name)
        procs.append(proc)
        return proc

    listener = Listener([primary_port, spare_port])
    try:
        spare = client("spare", spare_port, [main.pub_port, for_spare.pub_port, primary_port],
                       processing_delay=2)
        primary = client("primary", primary_port,
                         [main.pub_port, for_primary.pub_port, spare_port])
        wait_for(lambda: main.subscribers("/1b/hrit") == 2, what="both clients subscribed")
        for proc, peer, probes in ((primary, spare_port, for_spare),
                                   (spare, primary_port, for_primary)):
            _probe_until(lambda p=proc, port=peer: f"Receiving from tcp://127.0.0.1:{port}"
                         in p.log_text(), lambda uid, s=probes: s.announce(uid,
                                                                            main.request_address))
        listener.wait_connected()
        # the primary pushes two files (held), which fill its slots; the spare knows before
        # they are announced to both (were they announced first, the primary's pushes would
        # have to reach the spare within its delay, or both would push them)
        for name in names[:2]:
            for_primary.announce(name, main.request_address)
        wait_for(lambda: all(f"Another client is transferring {name}" in spare.log_text()
                             for name in names[:2]), what="the spare hearing of the pushes")
        for name in names:
            main.announce(name)
        # the primary queues the other 18; the spare takes those after 2 s
        wait_for(lambda: len(set(re.findall(r"Another client delivered (f\d\d)",
                                            primary.log_text()))) == 18,
                 what="the primary hearing of the spare's 18 files")
        held: list[Held] = wait_for(lambda: list(main.held) if len(main.held) == 2 else [],
                                    what="the primary's two pushes")
        assert sorted(h.request.data["uid"] for h in held) == names[:2]
        for request in held:
            main.reply(request, push_ok(request.request))
        listener.collect(lambda ms: set(names) <= set(listener.uids("file")), what="all files")
        wait_for(lambda: all(f"Another client delivered {name}" in spare.log_text()
                             for name in names[:2]), what="the spare hearing of the last two")
    finally:
        listener.close()
        for proc in procs:
            proc.stop()
        for server in (main, for_primary, for_spare):
            server.close()
    pushed = [uid for uid in main.requested("push") if uid in names]
    assert sorted(pushed) == names  # each file pushed once, by one client or the other
    announced = [uid for uid in listener.uids("file") if uid in names]
    assert sorted(announced) == names


def test_bad_destination_and_vanished_source_are_errors_for_that_file_only(
        setup: Deployment, tmp_path: Path) -> None:
    src, dst = dirs(tmp_path, "src", "dst")
    (dst / "MSG1").write_text("a file where a directory should be")
    server_port, _ = setup.server({"hrit": hrit_server_section(src)})
    (client_port,) = ports(1)
    # the delay gives the test the time to remove the source once it is announced: far
    # longer than that takes on a loaded machine
    client = setup.client({"hrit": client_section(server_port, f"{dst}/{{platform_name}}/",
                                                  client_port, processing_delay=2)})
    listener = setup.listen(client_port, server_port)
    setup.run()
    drop(src, hrit_name(1, "MSG1"))  # destination cannot be created
    vanishing = drop(src, hrit_name(2, "MSG2"))
    listener.collect(lambda ms: hrit_name(2, "MSG2") in listener.uids("file"),
                     what="announcement")
    vanishing.unlink()  # the client waits processing_delay before requesting
    client.wait_log(r"(Cannot request|did not deliver|No transfer of) H-000-MSG2", timeout=20)
    drop(src, hrit_name(3, "MSG3"))
    listener.collect(lambda ms: any(m.data.get("uid") == hrit_name(3, "MSG3") and
                                    m.type == "file" and "origin" in m.data for m in ms),
                     what="a good file after the bad ones")
    client.wait_log(r"Cannot request H-000-MSG1.*cannot create")
    delivered = [m.data["uid"] for m in listener.of_type("file") if "origin" in m.data]
    assert delivered == [hrit_name(3, "MSG3")]
    assert client.is_running


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def test_tar_and_bzip2_unpacking_and_an_unsafe_tar_refused(setup: Deployment, tmp_path: Path
                                                           ) -> None:
    tar_src, bz_src, tar_dst, bz_dst = dirs(tmp_path, "src/tar", "src/bz", "dst/tar", "dst/bz")
    server_port, _ = setup.server({
        "tar": {"origin": f"{tar_src}/{{platform_name}}_{{number}}.tar", "topic": "/tar"},
        "bz": {"origin": f"{bz_src}/{{name}}.bz2", "topic": "/bz"}})
    tar_port, bz_port = ports(2)
    client = setup.client({
        "tar": {"providers": f"127.0.0.1:{server_port}", "topic": "/tar",
                "destination": f"{tar_dst}/", "publish_port": tar_port, "compression": "tar",
                "delete": "true"},
        "bz": {"providers": f"127.0.0.1:{server_port}", "topic": "/bz",
               "destination": f"{bz_dst}/", "publish_port": bz_port, "compression": "bzip"}})
    listener = setup.listen(tar_port, bz_port)
    setup.run()
    drop(tar_src, "j01_1.tar", _tar_bytes({"../escaped.h5": b"evil", "ok.h5": b"ok"}))
    drop(tar_src, "j01_2.tar", _tar_bytes({"a.h5": b"a", "sub/b.h5": b"bb"}))
    drop(bz_src, "npp.h5.bz2", bz2.compress(b"payload"))
    listener.collect(lambda ms: len([m for m in ms if m.type in {"file", "dataset"}]) == 2,
                     what="a dataset and a file")
    dataset = listener.of_type("dataset")[0].data
    assert dataset["platform_name"] == "j01" and "origin" in dataset
    assert dataset["dataset"] == [{"uid": "a.h5", "uri": f"{tar_dst}/a.h5"},
                                  {"uid": "b.h5", "uri": f"{tar_dst}/sub/b.h5"}]
    assert (tar_dst / "sub/b.h5").read_bytes() == b"bb"
    assert not (tar_dst / "j01_2.tar").exists()  # delete = true
    bunzipped = listener.of_type("file")[0].data
    assert bunzipped["uid"] == "npp.h5" and bunzipped["uri"] == f"{bz_dst}/npp.h5"
    assert (bz_dst / "npp.h5").read_bytes() == b"payload"
    client.wait_log(r"could not unpack it: refused")
    assert not (tmp_path / "dst" / "escaped.h5").exists()
    assert not (tar_dst / "ok.h5").exists()
    # all three were delivered; the refused tar's ack comes after the other messages maybe
    listener.collect(lambda ms: len(listener.of_type("ack")) >= 3, what="three acks")
    assert sorted(m.data["uid"] for m in listener.of_type("ack")) == [
        "j01_1.tar", "j01_2.tar", "npp.h5.bz2"]


def test_sftp_destination_with_login(setup: Deployment, tmp_path: Path, sshd_server: Any) -> None:
    src, dst = dirs(tmp_path, "src", "dst")
    section = hrit_server_section(
        src, connection_parameters__ssh_key_filename=sshd_server.key_filename,
        connection_parameters__known_hosts=str(sshd_server.known_hosts))
    server_port, _ = setup.server({"hrit": section})
    (client_port,) = ports(1)
    destination = f"sftp://127.0.0.1:{sshd_server.port}{dst}/{{platform_name}}/"
    setup.client({"hrit": client_section(server_port, destination, client_port,
                                        login=sshd_server.user)})
    listener = setup.listen(client_port)
    setup.run()
    name = hrit_name(7)
    drop(src, name)
    final = listener.collect(lambda ms: listener.of_type("file"))[-1].data
    assert (dst / "MSG4" / name).read_bytes() == b"x" * 1024
    assert final["uri"] == f"{dst}/MSG4/{name}"  # 127.0.0.1 is this machine
    push = listener.of_type("push")[0].data
    assert push["destination"] == f"sftp://127.0.0.1:{sshd_server.port}{dst}/MSG4/"


def test_s3_destination(setup: Deployment, tmp_path: Path, s3_server: Any, s3_bucket: str) -> None:
    (src,) = dirs(tmp_path, "src")
    section = hrit_server_section(
        src, connection_parameters__client_kwargs__endpoint_url=s3_server.endpoint_url,
        connection_parameters__key=s3_server.access_key,
        connection_parameters__secret=s3_server.secret_key)
    server_port, _ = setup.server({"hrit": section})
    (client_port,) = ports(1)
    setup.client({"hrit": client_section(server_port, f"s3://{s3_bucket}/{{platform_name}}/",
                                        client_port)})
    listener = setup.listen(client_port)
    setup.run()
    name = hrit_name(8)
    drop(src, name)
    final = listener.collect(lambda ms: listener.of_type("file"))[-1].data
    assert final["uri"] == f"s3://{s3_bucket}/MSG4/{name}"
    body = s3_server.client().get_object(Bucket=s3_bucket, Key=f"MSG4/{name}")["Body"].read()
    assert body == b"x" * 1024


@pytest.mark.reference
@pytest.mark.skipif(not (OURS and reference_available()), reason="needs our server and 0.19")
@pytest.mark.parametrize("primary_kind", ["0.19", "ours"])
def test_hot_spare_pair_of_our_client_and_the_reference_client_with_our_server(
        setup: Deployment, tmp_path: Path, primary_kind: str) -> None:
    src, dst = dirs(tmp_path, "src", "dst")
    server_port, _ = setup.server({"hrit": hrit_server_section(src)})
    primary_port, spare_port = ports(2)
    kinds = {"primary": (primary_kind, primary_port, spare_port, {}),
             "spare": ("ours" if primary_kind == "0.19" else "0.19", spare_port, primary_port,
                       # 0.19 requests one file after the other: give it time to claim them
                       {"processing_delay": 3})}
    for name, (kind, own, peer, extra) in kinds.items():
        section = client_section(server_port, f"{dst}/", own, **extra)
        section["providers"] += f" 127.0.0.1:{peer}"
        setup.client({"hrit": section}, name=name, reference=kind == "0.19")
    listener = setup.listen(primary_port, spare_port)
    setup.run()
    names = [hrit_name(n) for n in range(10)]
    for name in names:
        drop(src, name)
    listener.collect(lambda ms: set(listener.uids("file")) == set(names), what="every file")
    assert sorted(listener.uids("file")) == sorted(names)
    assert sorted(listener.uids("push")) == sorted(names)  # the spare never stepped in


def test_demo_runs_by_itself_and_exits_zero() -> None:
    if not OURS:
        pytest.skip("move_it_server.py is not installed")
    done = subprocess.run([*script("trollmoves"), "demo", "--files", "3", "--interval", "0"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 file(s) arrived" in done.stdout and "Server and client stopped" in done.stdout


def test_reload_restarts_only_the_changed_section_and_sigterm_stops_cleanly(
        setup: Deployment, tmp_path: Path) -> None:
    src, dst_a, dst_b, dst_b2 = dirs(tmp_path, "src", "a", "b", "b2")
    server_port, _ = setup.server({"hrit": hrit_server_section(src)})
    port_a, port_b = ports(2)
    sections = {"a": client_section(server_port, f"{dst_a}/", port_a),
                "b": client_section(server_port, f"{dst_b}/", port_b)}
    client = setup.client(sections)
    from_a = setup.listen(port_a)  # section a is not restarted
    setup.run()
    config = tmp_path / "client" / "client.ini"
    text = config.read_text().replace(f"destination = {dst_b}/", f"destination = {dst_b2}/")
    config.write_text(text)
    client.proc.send_signal(signal.SIGHUP)
    client.wait_log(r"Reloaded .*changed \['b'\]")
    from_b = setup.listen(port_b)  # its first files may be missed: it is offered many
    # the restarted section hears of no heartbeat for 30 s: offer files until it gets one
    deadline = time.monotonic() + 20
    number = 0
    while not from_b.of_type("file"):
        assert time.monotonic() < deadline, "the reloaded section delivered nothing"
        drop(src, hrit_name(number))
        number += 1
        from_b.drain(timeout=0.5)
    name = from_b.uids("file")[0]
    from_a.collect(lambda ms: name in from_a.uids("file"), what="the same file in section a")
    assert (dst_a / name).exists() and (dst_b2 / name).exists()
    assert not any(dst_b.iterdir())
    assert "Stopped section a" not in client.log_text()
    client.proc.send_signal(signal.SIGTERM)
    assert client.proc.wait(10) == 0
    assert "Stopped 2 section(s)" in client.log_text()


def test_ftp_destination_with_ftp_root_login_and_unpacking(
        setup: Deployment, tmp_path: Path, ftp_server: Any) -> None:
    (src,) = dirs(tmp_path, "src")
    server_port, _ = setup.server({"bz": {"origin": f"{src}/{{name}}.bz2", "topic": "/bz"}})
    (client_port,) = ports(1)
    sub = f"client-{tmp_path.name}"
    login = f"{ftp_server.user}:{ftp_server.password}"
    setup.client({"bz": {"providers": f"127.0.0.1:{server_port}", "topic": "/bz",
                         "destination": f"ftp://127.0.0.1:{ftp_server.port}/{sub}/",
                         "login": login, "ftp_root": str(ftp_server.root),
                         "publish_port": client_port, "compression": "bzip", "delete": "true"}})
    listener = setup.listen(client_port)
    setup.run()
    drop(src, "npp.h5.bz2", bz2.compress(b"payload"))
    final = listener.collect(lambda ms: listener.of_type("file"))[-1].data
    local = Path(ftp_server.root) / sub
    assert (local / "npp.h5").read_bytes() == b"payload"
    assert not (local / "npp.h5.bz2").exists()
    assert final["uid"] == "npp.h5"
    assert final["uri"] == str(local / "npp.h5")  # 127.0.0.1 is this machine
    push = listener.of_type("push")[0].encode()
    assert ftp_server.password not in push and ftp_server.password not in final["uri"]
