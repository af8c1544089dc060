"""End to end: ``dispatcher.py`` as a subprocess, fed real posttroll messages, real targets.

Every test binds a publisher (a ZeroMQ XPUB socket sending posttroll messages, or any
bytes) on a free loopback port and points the dispatcher's ``posttroll_subscriber`` at it.
PUB/SUB drops what is sent before the subscription is in place, so ``Feeder.sync`` sends
probe ``beat`` messages until the dispatcher logs that it ignored one: from then on it
receives everything.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from posttroll.message import Message
from posttroll.subscriber import Subscriber

from tests import servers
from tests.moveit import wait_for
from tests.test_receiver import Feed, bad_messages
from trollmoves.subscription import MAX_MESSAGE_BYTES

DISPATCHER = str(Path(sys.executable).with_name("dispatcher.py"))
TROLLMOVES = str(Path(sys.executable).with_name("trollmoves"))
TOPIC = "/e2e/data"
TIMEOUT = 15.0


class DispatcherProcess:
    """``dispatcher.py -v`` running in the background; its log lines are collected."""

    def __init__(self, config: Path, *options: str, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.proc = subprocess.Popen([DISPATCHER, "-v", *options, str(config)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<EOF>")
            self._changed.notify_all()

    @property
    def text(self) -> str:
        """Everything logged so far."""
        with self._changed:
            return "\n".join(self.lines)

    def mark(self) -> int:
        """A position in the log: ``wait_for(after=mark)`` looks at later lines only."""
        with self._changed:
            return len(self.lines)

    def wait_for(self, pattern: str, timeout: float = TIMEOUT, after: int = 0) -> str | None:
        """The first log line after ``after`` matching ``pattern``, or None after ``timeout``."""
        regex = re.compile(pattern)

        def found() -> str | None:
            return next((line for line in self.lines[after:] if regex.search(line)), None)

        with self._changed:
            self._changed.wait_for(lambda: found() or "<EOF>" in self.lines, timeout)
            return found()

    def expect(self, pattern: str, after: int = 0, timeout: float = TIMEOUT) -> str:
        """Like :meth:`wait_for`, failing with the log when the line does not come."""
        line = self.wait_for(pattern, timeout, after)
        assert line is not None, f"no log line matching {pattern!r}:\n{self.text[-5000:]}"
        return line

    def stop(self) -> int:
        """SIGTERM, then wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self._reader.join(5)
        return code


class Feeder(Feed):
    """A publisher on a free loopback port, as a producer of files would be."""

    def sync(self, dispatcher: DispatcherProcess) -> None:
        """Wait until the dispatcher is subscribed and receives what is sent."""
        dispatcher.expect("Dispatcher ready")
        mark = dispatcher.mark()
        deadline = time.monotonic() + TIMEOUT
        while dispatcher.wait_for("Ignoring beat message", 0.05, mark) is None:
            assert time.monotonic() < deadline, f"dispatcher not reached:\n{dispatcher.text}"
            self.send({"min_interval": 30}, "beat")


@pytest.fixture
def feeder() -> Iterator[Feeder]:
    """A publisher the dispatcher subscribes to."""
    feeder = Feeder(TOPIC)
    yield feeder
    feeder.close()


@pytest.fixture
def start(feeder: Feeder, tmp_path: Path) -> Iterator[Callable[..., DispatcherProcess]]:
    """``start(targets, *options, env=None)``: write the config, run and sync a dispatcher.

    At teardown every dispatcher gets SIGTERM and must stop cleanly with exit code 0.
    """
    running: list[DispatcherProcess] = []

    def _start(targets: dict[str, Any], *options: str,
               env: dict[str, str] | None = None) -> DispatcherProcess:
        config = write_config(tmp_path / "dispatcher.yaml", feeder, targets)
        process = DispatcherProcess(config, *options, env=env)
        running.append(process)
        feeder.sync(process)
        return process

    yield _start
    for process in running:
        code = process.stop()
        print(process.text)  # shown by pytest when the test failed
        assert code == 0
        assert "Dispatcher stopped" in process.text


def write_config(path: Path, feeder: Feeder, targets: dict[str, Any]) -> Path:
    """Write a dispatcher config atomically (the running dispatcher never sees half a file)."""
    config = {"posttroll_subscriber": {"subscribe_addresses": [feeder.address],
                                       "nameserver": False}, **targets}
    write_atomically(path, yaml.safe_dump(config))
    return path


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by a complete new file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def local_target(directory: Path, **extra: Any) -> dict[str, Any]:
    """A target on this host receiving files of TOPIC."""
    return {"host": "", "directory": str(directory), "dispatch_configs": [{"topics": [TOPIC]}],
            **extra}


def make_source(tmp_path: Path, name: str, content: bytes = b"payload") -> Path:
    """A file to dispatch."""
    path = tmp_path / "src" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    return path


def file_data(path: Path, **extra: Any) -> dict[str, Any]:
    """The data of a ``file`` message announcing ``path``."""
    return {"uri": str(path), "uid": path.name, "platform_name": "NOAA-19", "sensor": "avhrr",
            **extra}


# ------------------------------------------------------------------------------------ tests


def test_dispatch_to_local_sftp_ftp_and_s3(
        start: Callable[..., DispatcherProcess], feeder: Feeder, tmp_path: Path,
        sshd_server: servers.SSHServer, ftp_server: servers.FTPServer,
        s3_server: servers.S3Server, s3_bucket: str) -> None:
    """One message, four targets on four protocols; conditions keep a fifth target out."""
    s3_options = {"endpoint_url": s3_server.endpoint_url, "key": s3_server.access_key,
                  "secret": s3_server.secret_key,
                  "client_kwargs": {"region_name": s3_server.region}}
    conditions = [{"sensor": "avhrr", "except": {"platform_name": "NOAA-15"}}]
    targets = {
        "local": local_target(tmp_path / "local" / "{platform_name}",
                              filepattern="{platform_name}_{uid}"),
        "sftp": {"host": f"sftp://{sshd_server.user}@127.0.0.1:{sshd_server.port}",
                 "connection_parameters": {"ssh_key_filename": sshd_server.key_filename,
                                           "known_hosts": str(sshd_server.known_hosts)},
                 "directory": str(tmp_path / "sftp" / "{sensor}"),
                 "dispatch_configs": [{"topics": [TOPIC], "conditions": conditions}]},
        "ftp": {"host": ftp_server.url("", with_password=True),
                "directory": "/ftp/{platform_name}",
                "aliases": {"platform_name": {"NOAA-19": "n19"}},
                "dispatch_configs": [{"topics": [TOPIC], "conditions": conditions}]},
        "s3": {"host": f"s3://{s3_bucket}/", "connection_parameters": s3_options,
               "directory": "/incoming/{platform_name}",
               "dispatch_configs": [{"topics": ["/e2e"], "conditions": conditions}]},
        "viirs_only": local_target(tmp_path / "viirs", dispatch_configs=[
            {"topics": [TOPIC], "conditions": [{"sensor": ["viirs", "modis"]}]}]),
    }
    dispatcher = start(targets, env={**os.environ, **s3_server.env})
    source = make_source(tmp_path, "avhrr_20261121_1000.tif", os.urandom(5000))
    feeder.send(file_data(source))

    local = tmp_path / "local" / "NOAA-19" / f"NOAA-19_{source.name}"
    sftp = tmp_path / "sftp" / "avhrr" / source.name
    ftp = ftp_server.path(f"ftp/n19/{source.name}")
    wait_for(lambda: local.exists() and sftp.exists() and ftp.exists())
    for path in (local, sftp, ftp):
        assert path.read_bytes() == source.read_bytes()
    s3 = s3_server.client()
    key = f"incoming/NOAA-19/{source.name}"

    def s3_object() -> bytes | None:
        try:
            return s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        except s3.exceptions.NoSuchKey:
            return None

    assert wait_for(s3_object) == source.read_bytes()

    # a viirs file goes to viirs_only; as its queue is ordered, the avhrr file never went there
    marker = make_source(tmp_path, "viirs_marker.h5")
    feeder.send(file_data(marker, sensor="viirs"))
    wait_for((tmp_path / "viirs" / marker.name).exists)
    assert not (tmp_path / "viirs" / source.name).exists()
    dispatcher.expect(r"Dispatched .*avhrr_20261121_1000.tif to target ftp "
                      r"\(ftp://troll:\*\*\*@127\.0\.0\.1")
    assert ftp_server.password not in dispatcher.text


def test_dataset_and_collection_messages(start: Callable[..., DispatcherProcess],
                                         feeder: Feeder, tmp_path: Path) -> None:
    """Every file of a dataset (and of a collection) is dispatched, with the shared metadata."""
    start({"local": local_target(tmp_path / "out" / "{platform_name}",
                                 filepattern="{band}_{uid}")})
    files = [make_source(tmp_path, f"part{index}.h5", f"part {index}".encode())
             for index in range(4)]
    feeder.send({"platform_name": "NOAA-20", "dataset": [
        {"uri": str(files[0]), "uid": files[0].name, "band": "M01"},
        {"uri": f"file://localhost{files[1]}", "uid": files[1].name, "band": "M02"}]},
        "dataset")
    feeder.send({"platform_name": "Metop-C", "collection": [
        {"band": "ch1", "dataset": [{"uri": str(files[2]), "uid": files[2].name}]},
        {"uri": str(files[3]), "uid": files[3].name, "band": "ch2"}]}, "collection")
    out = tmp_path / "out"
    expected = [out / "NOAA-20" / f"M01_{files[0].name}", out / "NOAA-20" / f"M02_{files[1].name}",
                out / "Metop-C" / f"ch1_{files[2].name}", out / "Metop-C" / f"ch2_{files[3].name}"]
    wait_for(lambda: all(path.exists() for path in expected))
    assert [path.read_bytes() for path in expected] == [f"part {i}".encode() for i in range(4)]


def test_non_local_file_is_skipped_with_a_warning(start: Callable[..., DispatcherProcess],
                                                  feeder: Feeder, tmp_path: Path) -> None:
    """A file on another host is not dispatched; the dispatcher goes on with the next one."""
    dispatcher = start({"local": local_target(tmp_path / "out")})
    feeder.send(file_data(Path("/data/remote.h5"), uri="ssh://elsewhere/data/remote.h5"))
    dispatcher.expect(r"WARNING .*Skipping ssh://elsewhere/data/remote.h5: "
                      r"the file is not on this host")
    source = make_source(tmp_path, "local.h5")
    feeder.send(file_data(source))
    wait_for((tmp_path / "out" / source.name).exists)
    assert not (tmp_path / "out" / "remote.h5").exists()


def test_config_edits_while_running(start: Callable[..., DispatcherProcess], feeder: Feeder,
                                    tmp_path: Path) -> None:
    """A broken edit is reported with file and key and the old config goes on; a fix is used."""
    dispatcher = start({"local": local_target(tmp_path / "first")})
    config = dispatcher.config
    broken = yaml.safe_load(config.read_text())
    broken["local"]["dispatch_configs"][0]["topics"] = 5
    mark = dispatcher.mark()
    write_atomically(config, yaml.safe_dump(broken))
    dispatcher.expect(rf"ERROR .*Invalid configuration, keeping the previous one: {config}: "
                      r"\[local\] dispatch_configs\[0\]\.topics: 5 is not of type", mark)
    one = make_source(tmp_path, "one.h5")
    feeder.send(file_data(one))
    wait_for((tmp_path / "first" / one.name).exists)

    mark = dispatcher.mark()
    write_config(config, feeder, {"local": local_target(tmp_path / "second")})
    dispatcher.expect("Configuration reloaded", after=mark)
    two = make_source(tmp_path, "two.h5")
    feeder.send(file_data(two))
    wait_for((tmp_path / "second" / two.name).exists)
    assert not (tmp_path / "first" / two.name).exists()


def test_published_messages(start: Callable[..., DispatcherProcess], feeder: Feeder,
                            tmp_path: Path) -> None:
    """With -p: a file message per dispatched file on publish_topic; none without a topic."""
    port = servers.free_port()
    start({"announced": local_target(tmp_path / "announced",
                                     publish_topic="/dispatched/{platform_name}/{sensor}"),
           "quiet": local_target(tmp_path / "quiet")}, "-p", str(port))
    source = make_source(tmp_path, "announce.h5")
    data = file_data(source, start_time=datetime(2026, 11, 21, 10, 0), orbit_number=12345)
    subscriber = Subscriber([f"tcp://127.0.0.1:{port}"], "")
    received: list[Message] = []
    try:
        deadline = time.monotonic() + TIMEOUT
        while not received:  # resend until our subscriber is connected (slow joiner)
            assert time.monotonic() < deadline, "no message published"
            feeder.send(data)
            for msg in subscriber.recv(timeout=0.2):  # read until a timeout yields None
                if msg is None:
                    break
                received.append(msg)
    finally:
        subscriber.close()
    for msg in received:
        assert (msg.subject, msg.type) == ("/dispatched/NOAA-19/avhrr", "file")
        assert msg.data == {**data, "uri": str(tmp_path / "announced" / source.name)}
    assert (tmp_path / "quiet" / source.name).exists()


def test_failed_target_does_not_stop_the_others(start: Callable[..., DispatcherProcess],
                                                feeder: Feeder, tmp_path: Path,
                                                ftp_server: servers.FTPServer) -> None:
    """A refused login is logged with the target, password redacted; other targets get files."""
    bad_host = f"ftp://{ftp_server.user}:wrong-pw-4711@127.0.0.1:{ftp_server.port}"
    dispatcher = start({"badftp": {"host": bad_host, "directory": "/x",
                                   "dispatch_configs": [{"topics": [TOPIC]}]},
                        "local": local_target(tmp_path / "out")})
    for name in ("first.h5", "second.h5"):
        source = make_source(tmp_path, name)
        feeder.send(file_data(source))
        wait_for((tmp_path / "out" / name).exists)
        dispatcher.expect(rf"ERROR .*Could not dispatch .*{name} to target badftp "
                          rf"\(ftp://troll:\*\*\*@127\.0\.0\.1:{ftp_server.port}/x/{name}\)")
    assert "wrong-pw-4711" not in dispatcher.text


@pytest.mark.parametrize("command", [[DISPATCHER], [TROLLMOVES, "dispatch"]])
def test_bad_config_at_start(tmp_path: Path, command: list[str]) -> None:
    """A config that does not validate stops the start with the file and key named."""
    config = tmp_path / "bad.yaml"
    config.write_text("target1:\n  directory: /x\n  dispatch_configs:\n    - conditions: []\n")
    result = subprocess.run([*command, str(config)], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 1
    assert (f"{config}: [target1] dispatch_configs[0]: 'topics' is a required property"
            in result.stderr)


def test_bad_messages_do_not_stop_the_dispatcher(start: Callable[..., DispatcherProcess],
                                                 feeder: Feeder, tmp_path: Path) -> None:
    """Random bytes, a text that is no posttroll message, JSON nested too deep, an invalid URI,
    a field leading out of the target directory and a message over the size bound are each
    logged; the next good message is dispatched."""
    out = tmp_path / "out"
    dispatcher = start({"local": local_target(out / "{platform_name}")})
    bad = bad_messages(TOPIC)
    for kind in ("random bytes", "not posttroll", "deeply nested"):
        feeder.send_raw(bad[kind])
    feeder.send(file_data(Path("/x/a.h5"), uri="file://[x/a.h5"))
    escaping = make_source(tmp_path, "escaping.h5")
    feeder.send(file_data(escaping, platform_name="../.."))
    feeder.send_raw(bad["oversize"])
    good = make_source(tmp_path, "good.h5")

    def dispatched() -> bool:  # the oversize message costs its connection: resend until in
        feeder.send(file_data(good))
        return (out / "NOAA-19" / good.name).exists()

    wait_for(dispatched, interval=0.2)
    for reason in ("UnicodeDecodeError", "ValueError", "RecursionError"):
        dispatcher.expect(rf"WARNING .*not a posttroll message \({reason}")
    dispatcher.expect(r"WARNING .*Skipping file://\[x/a\.h5: the file is not on this host")
    dispatcher.expect(r"ERROR .*Cannot compose the destination of .*escaping\.h5 for target "
                      r"local: UnsafePathError field platform_name='\.\./\.\.'")
    dispatcher.expect(rf"WARNING .*Lost the connection to {feeder.address} .*over "
                      rf"{MAX_MESSAGE_BYTES} bytes")
    assert not (tmp_path.parent / escaping.name).exists()
    assert dispatcher.proc.poll() is None
