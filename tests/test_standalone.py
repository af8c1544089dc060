"""Stand-alone mode: announcements carrying an fsspec filesystem, read remotely from a real sshd.

The consumer is written exactly as trollflow2 does it (``AbstractFileSystem.from_json`` on the
message's ``filesystem``, then ``path``, else ``uid``); ``trollmoves.messages.open_files`` and
``paths`` read the same files with host keys verified. Nothing sleeps: the listener connects
before the server announces anything, every other wait has a deadline.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fsspec import AbstractFileSystem, get_filesystem_class
from posttroll.message import Message

from tests.moveit import Listener, drop, ports, script, start_server, write_ini
from tests.servers import SSHServer
from tests.test_unpack import make_tar
from trollmoves import announce, copy, messages, unpack
from trollmoves.config import ConfigError, read_ini
from trollmoves.filesystems import endpoint, filesystem_path
from trollmoves.server import Section, ServerContext, validate_sections
from trollmoves.urls import parse

DEADLINE = 20.0
PLAIN = b"plain bytes " * 100
MEMBERS = {"a.h5": b"first member", "sub/b.h5": b"second member " * 10}


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    """Write a zip archive of ``members``."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def trollflow2_read(data: dict[str, Any]) -> bytes:
    """Read an announced file exactly as trollflow2 does."""
    filesystem = AbstractFileSystem.from_json(json.dumps(data["filesystem"]))
    with filesystem.open(data.get("path", data["uid"])) as handle:
        return handle.read()


def files_of(message: Message) -> list[dict[str, Any]]:
    """The entries of a file or dataset message."""
    return message.data["dataset"] if message.type == "dataset" else [message.data]


def sshd_filesystem(sshd: SSHServer) -> dict[str, str]:
    """``filesystem__*`` items reaching ``sshd``: public options only (a key file's path)."""
    return {"filesystem__host": sshd.host, "filesystem__port": str(sshd.port),
            "filesystem__user": sshd.user, "filesystem__client_keys": sshd.key_filename}


# -- unit: the JSON, the shapes, the secrets ----------------------------------------------

def test_filesystem_json_is_what_to_json_gives_for_a_built_instance(tmp_path: Path) -> None:
    archive = str(make_zip(tmp_path / "x.zip", MEMBERS))
    zip_cls = get_filesystem_class("zip")
    built = json.loads(zip_cls(fo=archive).to_json())
    assert announce.filesystem_json("zip", {"fo": archive}) == built
    local = get_filesystem_class("file")(auto_mkdir=True, skip_instance_cache=True)
    assert announce.filesystem_json("file", {"auto_mkdir": True}) == json.loads(local.to_json())


def test_sshfs_filesystem_json_needs_no_connection() -> None:
    section = {"topic": "/x", "filesystem": {"host": "no-such-host.invalid", "port": "2222",
                                             "user": "troll", "client_keys": "/k/id"}}
    info = announce.announcement_info(section, "/src/a b.h5", {"n": 1})
    assert info["filesystem"] == {"cls": "sshfs.spec:SSHFileSystem", "protocol": "ssh",
                                  "args": [], "host": "no-such-host.invalid", "port": 2222,
                                  "client_keys": "/k/id", "username": "troll"}
    assert info["uri"] == info["uid"] == "ssh://troll@no-such-host.invalid:2222/src/a b.h5"
    assert (info["path"], info["n"]) == ("/src/a b.h5", 1)


def test_default_filesystem_is_ssh_to_this_host_and_file_is_a_shared_disk() -> None:
    info = announce.announcement_info({"topic": "/x"}, "/src/f.nc", {})
    assert info["filesystem"]["host"] == socket.gethostname()
    assert info["uri"] == f"ssh://{socket.gethostname()}/src/f.nc"
    shared = announce.announcement_info({"topic": "/x", "filesystem": {"protocol": "file"}},
                                        "/mnt/f.nc", {})
    assert shared["uri"] == "file:///mnt/f.nc"
    assert AbstractFileSystem.from_json(json.dumps(shared["filesystem"])).protocol[0] == "file"


def test_archive_members_are_listed_without_extracting(tmp_path: Path) -> None:
    tar = make_tar(tmp_path / "x.tar", MEMBERS)
    assert announce.archive_members("tar", str(tar)) == ["a.h5", "sub/b.h5"]
    assert announce.archive_members("zip", str(make_zip(tmp_path / "x.zip", MEMBERS))) == [
        "a.h5", "sub/b.h5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tar", "x.zip"]
    with pytest.raises(unpack.UnsafeArchiveError, match=r"\.\."):
        announce.archive_members("tar", str(make_tar(tmp_path / "bad.tar", {"../up": b"x"})))
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(unpack.UnpackError, match="cannot list"):
        announce.archive_members("zip", str(tmp_path / "broken.zip"))


def test_secrets_are_found_at_any_depth() -> None:
    options = {"host": "h", "client_keys": "/path/id", "password": "pw",
               "client_kwargs": {"aws_secret_access_key": "s", "endpoint_url": "http://x"},
               "key": "AKIA", "client_host_keys": "-----BEGIN OPENSSH PRIVATE KEY-----\nx"}
    assert announce.secret_options(options) == [
        "password", "client_kwargs__aws_secret_access_key", "key", "client_host_keys"]
    info = announce.announcement_info({"topic": "/x", "filesystem": options}, "/f", {})
    assert "pw" not in json.dumps(info) and "PRIVATE" not in json.dumps(info)


def test_a_password_in_the_filesystem_options_is_refused_at_load(tmp_path: Path) -> None:
    config = write_ini(tmp_path / "server.ini", {"sa": {
        "origin": str(tmp_path / "{name}.h5"), "topic": "/sa",
        "filesystem__host": "vm", "filesystem__password": "s3cret-pw"}})
    with pytest.raises(ConfigError) as raised:
        validate_sections(str(config), read_ini(config, "server"))
    assert str(raised.value).startswith(f"{config}: [sa] filesystem__password: passwords")
    assert "s3cret-pw" not in str(raised.value)
    # the program says the same and stops
    run = subprocess.run([*script("move_it_server.py"), "-p", "0", str(config)],
                         capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert run.returncode == 1
    assert "[sa] filesystem__password: passwords, secret keys" in run.stderr
    assert "s3cret-pw" not in run.stderr + run.stdout


def test_a_standalone_section_opens_no_request_socket(tmp_path: Path) -> None:
    section = Section("sa", {"origin": str(tmp_path / "{name}.tar"), "topic": "/sa",
                             "unpack": "tar"}, ServerContext(publisher=None))
    assert section.requests is None and section.archive_kind == "tar"


# -- consumers ------------------------------------------------------------------------------

def test_download_source_for_each_kind_of_announcement() -> None:
    plain = {"filesystem": {"cls": "x.Y", "protocol": "ssh", "args": [], "host": "h",
                            "port": 22, "proxy_command": "touch /tmp/owned",
                            "known_hosts": None}, "uid": "ssh://h/d/a b.h5", "k": 1}
    source = messages.download_source(plain)
    assert (source.url, source.options) == ("ssh://h/d/a%20b.h5", {"port": 22})
    member = {"filesystem": {"protocol": "zip", "fo": "/d/x.zip", "target_protocol": "ssh",
                             "target_options": {"host": "h", "username": "u"}},
              "uid": "zip://sub/b.h5"}
    source = messages.download_source(member)
    assert (source.url, source.options) == ("zip://sub/b.h5::ssh://h/d/x.zip", {"username": "u"})
    assert messages.download_source({"uri": "/local/f"}).url == "/local/f"


def test_the_engine_reads_archive_members_through_chained_urls(tmp_path: Path) -> None:
    loc = parse("tar://sub/b.h5::ssh://h:2222/d/x.tar")
    ep = endpoint(loc, {"ssh_key_filename": "/k/id", "tar": {"compression": None}})
    assert filesystem_path(loc) == "sub/b.h5"
    assert (ep.protocol, ep.kwargs["fo"], ep.kwargs["target_protocol"]) == ("tar", "/d/x.tar",
                                                                          "ssh")
    target = ep.kwargs["target_options"]
    assert (target["host"], target["port"], target["client_keys"]) == ("h", 2222, ["/k/id"])
    assert "known_hosts" in target and ep.kwargs["compression"] is None
    archive = make_zip(tmp_path / "x.zip", MEMBERS)
    copy(f"zip://sub/b.h5::{archive}", str(tmp_path / "b.h5"))
    assert (tmp_path / "b.h5").read_bytes() == MEMBERS["sub/b.h5"]


@pytest.fixture
def served(tmp_path: Path, sshd_server: SSHServer) -> Iterator[tuple[Path, Listener]]:
    """Our move_it_server.py in stand-alone mode (plain, tar and zip sections) announcing
    files reachable through ``sshd_server``, and a listener connected to it."""
    src = tmp_path / "src"
    src.mkdir()
    pattern = "{platform_name}_{start_time:%Y%m%d%H%M}"
    config = write_ini(tmp_path / "server.ini", {
        "DEFAULT": {**sshd_filesystem(sshd_server), "info": "sensor=viirs"},
        "plain": {"origin": str(src / f"{pattern}.h5"), "topic": "/sa/plain"},
        "tarred": {"origin": str(src / f"{pattern}.tar"), "topic": "/sa/tar", "unpack": "tar"},
        "zipped": {"origin": str(src / f"{pattern}.zip"), "topic": "/sa/zip", "unpack": "zip"}})
    (port,) = ports(1)
    listener = Listener([port])
    server = start_server(tmp_path, config, port)
    try:
        listener.wait_connected()
        yield src, listener
        assert "serving requests" not in server.log_text()
    finally:
        listener.close()
        server.stop()


def test_a_trollflow2_consumer_reads_plain_files_and_archive_members_over_ssh(
        served: tuple[Path, Listener], tmp_path: Path) -> None:
    src, listener = served
    drop(src, "npp_202611211000.h5", PLAIN)
    make_tar(tmp_path / "j01.tar", MEMBERS).rename(src / "j01_202611211000.tar")
    make_zip(tmp_path / "n20.zip", MEMBERS).rename(src / "n20_202611211000.zip")
    received = listener.collect(lambda m: len([x for x in m if x.type != "beat"]) >= 3)
    by_subject = {m.subject: m for m in received if m.type != "beat"}

    plain = by_subject["/sa/plain"]
    assert plain.type == "file"
    assert plain.data["path"] == str(src / "npp_202611211000.h5")
    assert plain.data["uri"].startswith("ssh://") and plain.data["uid"] == plain.data["uri"]
    assert (plain.data["sensor"], plain.data["platform_name"]) == ("viirs", "npp")
    assert trollflow2_read(plain.data) == PLAIN

    for subject, kind in (("/sa/tar", "tar"), ("/sa/zip", "zip")):
        message = by_subject[subject]
        assert message.type == "dataset"
        entries = message.data["dataset"]
        assert [e["uid"] for e in entries] == [f"{kind}://a.h5", f"{kind}://sub/b.h5"]
        assert entries[1]["uri"].startswith(f"{kind}://sub/b.h5::ssh://")
        assert entries[0]["filesystem"]["target_protocol"] == "ssh"
        assert [trollflow2_read(e) for e in entries] == list(MEMBERS.values())
        # the same reader without "path" (trollflow2 then opens the uid)
        assert trollflow2_read({k: v for k, v in entries[1].items() if k != "path"}
                               ) == MEMBERS["sub/b.h5"]

    # our one-call consumer API, with host keys verified against ~/.ssh/known_hosts; the key
    # file is the consumer's own (the one a message names is not used)
    everything = [m for m in received if m.type != "beat"]
    key = {"client_keys": [plain.data["filesystem"]["client_keys"]]}
    opened = [f for m in everything for f in messages.open_files(m, **key)]
    contents = []
    for handle in opened:
        with handle as f:
            contents.append(f.read())
    expected = [PLAIN, *MEMBERS.values(), *MEMBERS.values()]
    assert sorted(contents) == sorted(expected)
    assert sorted(p.read_bytes() for m in everything for p in messages.paths(m, **key)) == (
        sorted(expected))
    assert sorted(os.listdir(src)) == ["j01_202611211000.tar", "n20_202611211000.zip",
                                       "npp_202611211000.h5"]
