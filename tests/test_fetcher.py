"""pytroll-fetcher end to end (as a process) and trollmoves 0.19's stand-alone server as the peer.

Our announcements come from an XPUB socket, which tells when the fetcher has subscribed (no
slow-joiner guess); trollmoves 0.19 announces its backlog 3 s after its start, by which time
the fetcher started before it is connected. Every wait is a message or a log line with a
deadline. 0.19's messages name only this host (``socket.gethostname()``): a ``~/.ssh/config``
entry in the test home sends that name to the test sshd, as a consumer site would configure it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
import zmq
from posttroll.message import Message

from tests.moveit import (
    REFERENCE,
    Listener,
    MoveItProcess,
    ports,
    reference_available,
    script,
    start_server,
    write_ini,
)
from tests.servers import HOST, SSHServer
from tests.test_receiver import bad_messages
from tests.test_standalone import (
    MEMBERS,
    PLAIN,
    files_of,
    make_zip,
    sshd_filesystem,
    trollflow2_read,
)
from tests.test_unpack import make_tar
from trollmoves import announce, fetcher, messages
from trollmoves.config import read_ini
from trollmoves.subscription import MAX_MESSAGE_BYTES

DEADLINE = 20.0
PATTERN = "{platform_name}_{start_time:%Y%m%d%H%M}"
FIELDS = {"platform_name": "npp", "sensor": "viirs"}
START = dt.datetime(2026, 11, 21, 10)


def start_fetcher(directory: Path, destination: Path, source_port: int, topic: str,
                  connection_parameters: dict[str, Any] | None = None
                  ) -> tuple[MoveItProcess, Listener]:
    """Start pytroll-fetcher listening to ``source_port``; return it and a listener connected
    to its publisher."""
    (publish_port,) = ports(1)
    config = directory / "fetcher.yaml"
    config.write_text(yaml.safe_dump({
        "destination": f"{destination}/{{platform_name}}",
        "subscriber_config": {"addresses": [f"tcp://{HOST}:{source_port}"], "topics": [topic],
                              "nameserver": False},
        "publisher_config": {"name": "fetcher", "port": publish_port, "nameservers": False},
        **({"connection_parameters": connection_parameters} if connection_parameters else {})}))
    # connected before the fetcher starts: a subscription takes effect some time after the
    # connection is up (PUB/SUB slow joiner), and the fetcher publishes as soon as it fetched
    listener = Listener([publish_port])
    proc = MoveItProcess("fetcher", directory, [*script("pytroll-fetcher"), "-v", str(config)])
    try:
        proc.start(r"pytroll-fetcher ready")
        listener.wait_connected()
    except BaseException:
        listener.close()
        proc.stop()
        raise
    return proc, listener


def fetched(listener: Listener, count: int) -> list[Message]:
    """Wait for ``count`` file messages from the fetcher."""
    return listener.collect(lambda m: len([x for x in m if x.type == "file"]) >= count,
                            DEADLINE, f"{count} fetched files")


# -- our announcements ----------------------------------------------------------------------

class Announcer:
    """Publishes posttroll messages on an XPUB socket, which reports subscriptions."""

    def __init__(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.XPUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # every (re)subscription is reported
        self.port = self.sock.bind_to_random_port(f"tcp://{HOST}")

    def wait_subscribed(self, timeout: float = DEADLINE) -> None:
        """Wait for a subscriber's subscription (unsubscriptions, from a connection that was
        lost, are skipped)."""
        while True:
            if not self.sock.poll(int(timeout * 1000)):
                raise AssertionError("nobody subscribed")
            if self.sock.recv().startswith(b"\x01"):
                return

    def send(self, subject: str, kind: str, data: dict[str, Any]) -> None:
        """Publish one message."""
        self.sock.send_string(Message(subject, kind, data).encode())

    def close(self) -> None:
        """Close the socket."""
        self.sock.close(0)


def test_the_fetcher_downloads_every_announced_file_and_keeps_going(
        tmp_path: Path, sshd_server: SSHServer) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "npp_202611211000.h5").write_bytes(PLAIN)
    make_tar(src / "j01_202611211000.tar", MEMBERS)
    make_zip(src / "n20_202611211000.zip", MEMBERS)
    (src / "shared.nc").write_bytes(b"on a shared disk")
    section = read_ini(write_ini(tmp_path / "server.ini", {"sa": {
        "origin": "/x", "topic": "/sa", "info": "sensor=viirs",
        **sshd_filesystem(sshd_server)}}), "server")["sa"]

    announcer = Announcer()
    # the messages name the key file too (client_keys): only the configured one is used
    keys = {"hosts": {f"{sshd_server.host}:{sshd_server.port}": {
        "ssh_key_filename": sshd_server.key_filename}}}
    proc, listener = start_fetcher(tmp_path, tmp_path / "dst", announcer.port, "/sa", keys)
    try:
        announcer.wait_subscribed()
        for name in ("npp_202611211000.h5", "gone_202611211000.h5"):
            announcer.send("/sa/plain", "file", announce.standalone_info(
                section, str(src / name), FIELDS))
        for kind, platform in (("tar", "j01"), ("zip", "n20")):
            archive = str(src / f"{platform}_202611211000.{kind}")
            announcer.send(f"/sa/{kind}", "dataset", announce.dataset_info(
                {**section, "unpack": kind}, archive, announce.archive_members(kind, archive),
                {"platform_name": platform}))
        announcer.send("/sa/shared", "file", announce.standalone_info(
            {**section, "filesystem": {"protocol": "file"}}, str(src / "shared.nc"), FIELDS))
        messages = fetched(listener, 6)
    finally:
        announcer.close()
        listener.close()
        proc.stop()

    dst = tmp_path / "dst"
    assert (dst / "npp" / "npp_202611211000.h5").read_bytes() == PLAIN
    assert (dst / "npp" / "shared.nc").read_bytes() == b"on a shared disk"
    for platform in ("j01", "n20"):
        assert {name: (dst / platform / name).read_bytes() for name in MEMBERS} == MEMBERS
    assert "Could not fetch ssh://" in proc.log_text() and "gone_202611211000.h5" in (
        proc.log_text())
    files = [m for m in messages if m.type == "file"]
    assert [m.subject for m in files] == ["/sa/plain", "/sa/tar", "/sa/tar", "/sa/zip",
                                          "/sa/zip", "/sa/shared"]
    first = files[0].data
    assert first == {"sensor": "viirs", "platform_name": "npp",
                     "uri": str(dst / "npp" / "npp_202611211000.h5"),
                     "uid": "npp_202611211000.h5"}
    assert files[2].data["uri"] == str(dst / "j01" / "sub" / "b.h5")


def test_bad_messages_do_not_stop_the_fetcher(tmp_path: Path) -> None:
    """Random bytes, a text that is no posttroll message, JSON nested too deep, a field leading
    out of the destination and a message over the size bound are each logged; the next good
    message is fetched."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.nc").write_bytes(b"good")
    (src / "escaping.nc").write_bytes(b"bad")
    announcer = Announcer()
    proc, listener = start_fetcher(tmp_path, tmp_path / "dst" / "in", announcer.port, "/sa")
    try:
        announcer.wait_subscribed()
        bad = bad_messages("/sa/x")
        for kind in ("random bytes", "not posttroll", "deeply nested"):
            announcer.sock.send(bad[kind])
        announcer.send("/sa/x", "file", {"uri": str(src / "escaping.nc"), "uid": "escaping.nc",
                                         "platform_name": "../.."})
        announcer.send("/sa/x", "file", {"uri": "file://[x/a.nc", "uid": "a.nc",
                                         "platform_name": "npp"})
        announcer.sock.send(bad["oversize"])
        announcer.wait_subscribed()  # the oversize message cost the connection; it is back
        announcer.send("/sa/x", "file", {"uri": str(src / "good.nc"), "uid": "good.nc",
                                         "platform_name": "npp"})
        [good] = [m for m in fetched(listener, 1) if m.type == "file"]
        for reason in ("UnicodeDecodeError", "ValueError", "RecursionError"):
            proc.wait_log(rf"WARNING .*not a posttroll message \({reason}")
        proc.wait_log(r"ERROR .*Could not fetch .*escaping\.nc: field platform_name='\.\./\.\.'")
        proc.wait_log(r"ERROR .*Could not fetch file://\[x/a\.nc")
        proc.wait_log(rf"WARNING .*Lost the connection to tcp://{HOST}:{announcer.port} .*over "
                      rf"{MAX_MESSAGE_BYTES} bytes")
        assert proc.proc.poll() is None
    finally:
        announcer.close()
        listener.close()
        proc.stop()
    assert good.data["uri"] == str(tmp_path / "dst" / "in" / "npp" / "good.nc")
    assert not (tmp_path / "escaping.nc").exists() and not (tmp_path / "dst" / "escaping.nc"
                                                                 ).exists()


def test_a_bad_config_is_refused_with_its_key(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "fetcher.yaml"
    config.write_text("destination: /tmp\npublisher_config: {}\nsubscriber_config: {}\n"
                      "destinaton: typo\n")
    assert fetcher.main([str(config)]) == 2
    assert "'destinaton' was unexpected" in capsys.readouterr().err
    config.write_text("destination: /tmp\npublisher_config: {}\nsubscriber_config: {}\n"
                      "connection_parameters: {ssh_key_filename: /k/id}\n")
    assert fetcher.main([str(config)]) == 2
    assert "connection_parameters: say which hosts these options are for" in (
        capsys.readouterr().err)


# -- unit: where configured options go, paths from fields ------------------------------------

HOSTS = fetcher.HostOptions({"data.example.com": {"ssh_key_filename": "/k/data"},
                             "data.example.com:2222": {"ssh_key_filename": "/k/2222"},
                             "minio.example.com:9000": {"key": "AK", "secret": "SK"}},
                            {"connection_uptime": 60})


@pytest.mark.parametrize(("filesystem", "uri", "expected"), [
    ({"protocol": "ssh", "host": "data.example.com"}, "ssh://data.example.com/d/f.h5",
     {"connection_uptime": 60, "ssh_key_filename": "/k/data"}),
    ({"protocol": "ssh", "host": "DATA.example.com", "port": 2222}, "ssh://x/d/f.h5",
     {"connection_uptime": 60, "ssh_key_filename": "/k/2222"}),
    ({"protocol": "ssh", "host": "evil.example.com"}, "ssh://evil.example.com/d/f.h5", {}),
    ({"protocol": "zip", "fo": "/d/a.zip", "target_protocol": "ssh",
      "target_options": {"host": "data.example.com"}}, "zip://m.h5",
     {"connection_uptime": 60, "ssh_key_filename": "/k/data"}),
    ({"protocol": "s3", "client_kwargs": {"endpoint_url": "http://minio.example.com:9000"}},
     "s3://bucket/k/f.h5", {"connection_uptime": 60, "key": "AK", "secret": "SK"}),
    ({"protocol": "s3", "endpoint_url": "http://evil.example.com:9000"}, "s3://bucket/k/f.h5",
     {}),
    ({"protocol": "s3"}, "s3://minio.example.com/k/f.h5", {}),
])
def test_configured_options_go_only_to_the_hosts_they_name(
        filesystem: dict[str, Any], uri: str, expected: dict[str, Any]) -> None:
    source = messages.download_source({"filesystem": filesystem, "uri": uri, "uid": uri})
    assert HOSTS.for_source(source) == expected


def test_message_options_are_an_allowlist() -> None:
    """Only where the file is comes from a message: no ssh config, key file, proxy command."""
    source = messages.download_source({"uri": "ssh://h/d/f.h5", "filesystem": {
        "protocol": "ssh", "host": "h", "port": 2222, "username": "u",
        "config": ["/tmp/evil_ssh_config"], "client_keys": ["/root/.ssh/id_rsa"],
        "proxy_command": "touch /tmp/owned", "known_hosts": None, "password": "pw"}})
    assert (source.url, source.options) == ("ssh://h/d/f.h5", {"port": 2222, "username": "u"})
    s3 = messages.download_source({"uri": "s3://b/k", "filesystem": {
        "protocol": "s3", "anon": True, "key": "AK", "secret": "SK", "client_kwargs": {
            "endpoint_url": "http://minio:9000", "region_name": "r", "verify": False}}})
    assert s3.options == {"anon": True, "client_kwargs": {"endpoint_url": "http://minio:9000",
                                                          "region_name": "r"}}


def test_a_field_leading_out_of_the_destination_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "f.nc"
    source.write_bytes(b"x")
    published: list[Message] = []
    worker = fetcher.Fetcher(str(tmp_path / "dst" / "{platform_name}"), published.append)
    info = {"uri": str(source), "uid": "f.nc"}
    with pytest.raises(messages.UnsafePathError, match=r"field platform_name='\.\./\.\./x'"):
        worker.fetch({**info, "platform_name": "../../x"})
    assert worker.fetch({**info, "platform_name": "npp"}) == str(tmp_path / "dst" / "npp" /
                                                                 "f.nc")


# -- trollmoves 0.19's stand-alone server as the peer ---------------------------------------

def _reference_standalone() -> bool:
    if not reference_available():
        return False
    check = [str(REFERENCE / "bin" / "python"), "-I", "-c",
             "import pytroll_collectors.fsspec_to_message, sshfs"]
    return subprocess.run(check, capture_output=True, check=False).returncode == 0


@dataclass
class Reference:
    """What trollmoves 0.19's stand-alone server announced, and what our fetcher made of it."""

    src: Path
    dst: Path
    announced: list[Message] = field(default_factory=list)
    fetched: list[Message] = field(default_factory=list)


@contextlib.contextmanager
def ssh_config_for_this_host(home: Path, sshd: SSHServer) -> Iterator[None]:
    """Send SSH connections to this host's name to ``sshd`` (``~/.ssh/config``)."""
    config = home / ".ssh" / "config"
    saved = config.read_text() if config.exists() else None
    config.write_text((saved or "") + (
        f"\nHost {socket.gethostname()}\n  HostName {sshd.host}\n  Port {sshd.port}\n"
        f"  User {sshd.user}\n  IdentityFile {sshd.key_filename}\n"))
    try:
        yield
    finally:
        if saved is None:
            config.unlink()
        else:
            config.write_text(saved)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, test_home: Path,
              sshd_server: SSHServer) -> Iterator[Reference]:
    """0.19's server announcing a file, a tar and a zip (its backlog); our fetcher and a
    listener subscribed to it before it started."""
    if not _reference_standalone():
        pytest.skip("trollmoves 0.19 with pytroll-collectors and sshfs is not installed in "
                    f"{REFERENCE} (its stand-alone mode needs them)")
    tmp = tmp_path_factory.mktemp("reference")
    ref = Reference(tmp / "src", tmp / "dst")
    ref.src.mkdir()
    (ref.src / "npp_202611211000.h5").write_bytes(PLAIN)
    make_tar(ref.src / "j01_202611211000.tar", MEMBERS)
    make_zip(ref.src / "n20_202611211000.zip", MEMBERS)
    config = write_ini(tmp / "server.ini", {
        "plain": {"origin": str(ref.src / f"{PATTERN}.h5"), "topic": "/ref/plain",
                  "info": "sensor=viirs", "nameserver": "false"},
        "tarred": {"origin": str(ref.src / f"{PATTERN}.tar"), "topic": "/ref/tar",
                   "unpack": "tar", "nameserver": "false"},
        "zipped": {"origin": str(ref.src / f"{PATTERN}.zip"), "topic": "/ref/zip",
                   "unpack": "zip", "nameserver": "false"}})
    (port,) = ports(1)
    with contextlib.ExitStack() as stack:
        stack.enter_context(ssh_config_for_this_host(test_home, sshd_server))
        proc, fetched_listener = start_fetcher(tmp, ref.dst, port, "/ref")
        stack.callback(proc.stop)
        stack.callback(fetched_listener.close)
        listener = Listener([port])
        stack.callback(listener.close)
        stack.callback(start_server(tmp, config, port, reference=True).stop)
        listener.wait_connected()
        ref.announced = listener.collect(
            lambda m: len([x for x in m if x.type != "beat"]) >= 3, DEADLINE, "0.19's backlog")
        ref.fetched = fetched(fetched_listener, 5)
        yield ref


def _by_subject(messages: list[Message]) -> dict[str, Message]:
    return {m.subject: m for m in messages if m.type != "beat"}


def test_a_trollflow2_consumer_reads_what_0_19_announces(reference: Reference) -> None:
    announced = _by_subject(reference.announced)
    assert trollflow2_read(announced["/ref/plain"].data) == PLAIN
    for subject in ("/ref/tar", "/ref/zip"):
        assert [trollflow2_read(e) for e in files_of(announced[subject])] == list(
            MEMBERS.values())


def test_our_announcements_are_0_19s_plus_path(reference: Reference) -> None:
    """Same keys, types and values as 0.19's (default filesystem: SSH to this host)."""
    announced = _by_subject(reference.announced)
    fields = {"platform_name": "npp", "start_time": START}
    ours = announce.standalone_info({"info": "sensor=viirs"},
                                    str(reference.src / "npp_202611211000.h5"), fields)
    assert ours.pop("path") == str(reference.src / "npp_202611211000.h5")
    theirs = dict(announced["/ref/plain"].data)
    # 0.19 writes the class path by hand with a dot, fsspec's to_json with a colon: both load
    assert ours["filesystem"].pop("cls") == "sshfs.spec:SSHFileSystem"
    assert theirs["filesystem"].pop("cls") == "sshfs.spec.SSHFileSystem"
    assert ours == theirs
    for kind, platform in (("tar", "j01"), ("zip", "n20")):
        archive = str(reference.src / f"{platform}_202611211000.{kind}")
        ours = announce.dataset_info({"unpack": kind}, archive,
                                     announce.archive_members(kind, archive),
                                     {"platform_name": platform, "start_time": START})
        assert [entry.pop("path") for entry in ours["dataset"]] == list(MEMBERS)
        assert ours == announced[f"/ref/{kind}"].data


def test_the_fetcher_downloads_what_0_19_announces(reference: Reference) -> None:
    dst = reference.dst
    assert (dst / "npp" / "npp_202611211000.h5").read_bytes() == PLAIN
    for platform in ("j01", "n20"):
        assert {name: (dst / platform / name).read_bytes() for name in MEMBERS} == MEMBERS
    plain = next(m for m in reference.fetched if m.subject == "/ref/plain")
    assert plain.type == "file"
    assert plain.data["uri"] == str(dst / "npp" / "npp_202611211000.h5")
    assert (plain.data["sensor"], plain.data["uid"]) == ("viirs", "npp_202611211000.h5")
    assert "filesystem" not in plain.data
