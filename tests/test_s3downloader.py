"""s3downloader end to end: the console script against moto S3, fed and read over posttroll.

The downloader runs as a subprocess (``s3downloader.py -c CONFIG -l LOG``). Messages shaped like
pytroll-collectors' s3stalker ones (or any bytes) come from a publisher socket on 127.0.0.1;
what it publishes is read by a posttroll Subscriber. Readiness: the "Ready" log line gives the
publish port, the feed (an XPUB socket) sees the downloader's subscription, then canary objects
are announced (a new one each try) until a download is announced back, which proves the second
PUB/SUB link is up. The "endpoint down" cases put a TCP gate between the downloader and moto
that the test opens, closes or cuts.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from posttroll.message import Message
from posttroll.subscriber import Subscriber

from tests import servers
from tests.servers import S3Server
from tests.test_receiver import Feed, bad_messages
from trollmoves import s3downloader
from trollmoves.config import ConfigError
from trollmoves.subscription import MAX_MESSAGE_BYTES

TOPIC = "/test/s3/new"
PUBLISH_TOPIC = "/test/s3/downloaded"
DEADLINE = 15.0
S3FS_JSON = {"cls": "s3fs.core.S3FileSystem", "protocol": "s3", "args": [], "anon": False}


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = DEADLINE,
               proc: subprocess.Popen | None = None) -> Any:
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        if proc is None:
            threading.Event().wait(0.02)
        else:
            try:
                proc.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                continue
            raise AssertionError(f"s3downloader exited ({proc.returncode}) waiting for {what}")


def stalker_file(bucket: str, key: str) -> dict[str, Any]:
    """One file as s3stalker describes it: fsspec filesystem, uri and uid, parsed metadata."""
    return {"filesystem": dict(S3FS_JSON), "uri": f"s3://{bucket}/{key}",
            "uid": f"s3://{bucket}/{key}", "platform_name": "S3A", "sensor": "olci",
            "start_time": dt.datetime(2026, 11, 21, 7, 59, 33)}


class Collector:
    """A posttroll Subscriber collecting everything a publisher sends, in a thread."""

    def __init__(self, address: str) -> None:
        self.messages: list[Message] = []
        self._sub = Subscriber([address], "")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._running = True
        self._thread.start()

    def _run(self) -> None:
        for msg in self._sub.recv(timeout=0.1):
            if not self._running:
                break
            if msg is not None:
                self.messages.append(msg)

    def files(self, uid: str) -> list[Message]:
        """The ``file`` messages announcing ``uid``."""
        return [m for m in list(self.messages) if m.type == "file" and m.data.get("uid") == uid]

    def close(self) -> None:
        """Stop collecting."""
        self._running = False
        self._thread.join(timeout=5)
        self._sub.close()


class Downloader:
    """One s3downloader.py process with its config, log, feed publisher and collector."""

    _canaries = itertools.count()

    def __init__(self, tmp: Path, s3: S3Server, bucket: str, endpoint_url: str,
                 **extra: Any) -> None:
        self.s3, self.bucket = s3, bucket
        self.dest = tmp / "downloads"
        self.log = tmp / "s3downloader.log"
        self.feed = Feed(TOPIC)
        config = {
            "subscribe-topic": [TOPIC], "publish-topic": PUBLISH_TOPIC,
            "nameserver": False,
            "subscriber_addresses": [self.feed.address],
            "nameservers": False, "publish_port": 0,
            "download_destination": str(self.dest),
            "s3_kwargs": {"anon": False, "client_kwargs": {"endpoint_url": endpoint_url},
                          "config_kwargs": {"retries": {"total_max_attempts": 1}}},
            "logging": {"logging_mode": "DEBUG"},
            **extra,
        }
        self.config = tmp / "s3downloader.yaml"
        self.config.write_text(yaml.safe_dump(config))
        script = shutil.which("s3downloader.py")
        command = [script] if script else [sys.executable, "-m", "trollmoves.s3downloader"]
        env = dict(os.environ, **servers.aws_test_env())
        for name in servers.AWS_UNSET_VARS:
            env.pop(name, None)
        with open(tmp / "stderr.txt", "wb") as stderr:
            self.proc = subprocess.Popen([*command, "-c", str(self.config), "-l", str(self.log)],
                                         env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        ready = self.wait_log(r"Ready: .* on port (\d+)")
        self.collector = Collector(f"tcp://127.0.0.1:{ready.group(1)}")
        self.feed.wait_subscribed()  # from now on the downloader receives what is sent

    def log_text(self) -> str:
        """Everything logged so far."""
        return self.log.read_text() if self.log.exists() else ""

    def wait_log(self, pattern: str, timeout: float = DEADLINE) -> re.Match[str]:
        """Wait for a log line matching ``pattern``."""
        return wait_until(lambda: re.search(pattern, self.log_text()), f"log /{pattern}/",
                          timeout, self.proc)

    def put(self, key: str, body: bytes) -> None:
        """Store an object in the bucket."""
        self.s3.client().put_object(Bucket=self.bucket, Key=key, Body=body)

    def send(self, mtype: str, data: dict[str, Any]) -> None:
        """Publish one announcement to the downloader."""
        self.feed.send(data, mtype)

    def wait_announced(self, uid: str, count: int = 1) -> list[Message]:
        """Wait until ``count`` file messages for ``uid`` were published."""
        return wait_until(lambda: len(self.collector.files(uid)) >= count and
                          self.collector.files(uid), f"announcement of {uid}", proc=self.proc)

    def sync(self) -> None:
        """Announce new canary objects until one comes back: the collector receives what is
        published. The downloader is subscribed (see :meth:`Feed.wait_subscribed`), so it
        downloads every canary: wait for them all, none is left running (a ``.part`` file)."""
        sent: list[str] = []

        def round_trip() -> bool:
            name = f"canary-{next(self._canaries)}.txt"
            self.put(f"canary/{name}", b"tweet")
            self.send("file", stalker_file(self.bucket, f"canary/{name}"))
            sent.append(name)
            try:  # any canary back will do: on a loaded machine a round trip may take long
                wait_until(lambda: any(self.collector.files(n) for n in sent), name,
                           timeout=0.3, proc=self.proc)
            except AssertionError:
                return False
            return True

        wait_until(round_trip, "both posttroll links", proc=self.proc)
        for name in sent:
            self.wait_log(rf"Downloaded s3://\S+/canary/{re.escape(name)} to ")

    def partial_files(self) -> list[str]:
        """Temporary files left in the download directory."""
        return [n for n in os.listdir(self.dest) if n.endswith(".part")] if self.dest.exists() \
            else []

    def stop(self) -> int:
        """SIGTERM the process and return its exit code."""
        self.collector.close()
        self.feed.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _shutdown(sock: socket.socket) -> None:
    """Break a connection (or wake a listener's accept) whatever its state."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class TcpGate:
    """A TCP forwarder to ``upstream`` the test can open, close (refusing) or cut mid-stream."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = servers.free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.cut_after: int | None = None
        self.cuts = 0  #: how often a connection was cut

    def open(self, cut_after: int | None = None) -> None:
        """Accept connections; with ``cut_after``, break everything after that many bytes
        came back from upstream, and stay closed."""
        self.cut_after = cut_after
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((servers.HOST, self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        """Stop listening (connections are refused) and break every open connection."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        for sock in ([listener] if listener else []) + conns:
            _shutdown(sock)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        sent = [0]
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, sent),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, sent: list[int] | None) -> None:
        try:
            while data := src.recv(65536):
                if sent is not None and self.cut_after is not None:
                    room = self.cut_after - sent[0]
                    if room <= 0:
                        break
                    data = data[:room]
                    sent[0] += len(data)
                dst.sendall(data)
        except OSError:
            pass
        if sent is not None and self.cut_after is not None and sent[0] >= self.cut_after:
            self.cuts += 1
            self.close()
            return
        for sock in (src, dst):
            _shutdown(sock)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> Iterator[str]:
    """A bucket for this module's downloader."""
    name = s3_server.create_bucket()
    yield name
    s3_server.delete_bucket(name)


@pytest.fixture(scope="module")
def downloader(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server,
               bucket: str) -> Iterator[Downloader]:
    """A running s3downloader.py talking to moto directly, links synchronised."""
    proc = Downloader(tmp_path_factory.mktemp("s3downloader"), s3_server, bucket,
                      s3_server.endpoint_url)
    try:
        proc.sync()
        yield proc
    finally:
        assert proc.stop() == 0, proc.log_text()[-3000:]


# -------------------------------------------------------------------------- end to end: happy


def test_file_message_is_downloaded_and_announced(downloader: Downloader) -> None:
    """An s3stalker file message: the object lands on disk, then one file message says so."""
    body = os.urandom(300_000)
    downloader.put("2026/11/21/S3A_OL_2_WFR_0759.zip", body)
    downloader.send("file", stalker_file(downloader.bucket, "2026/11/21/S3A_OL_2_WFR_0759.zip"))
    (msg,) = downloader.wait_announced("S3A_OL_2_WFR_0759.zip")
    local = downloader.dest / "S3A_OL_2_WFR_0759.zip"
    assert local.read_bytes() == body
    assert msg.subject == PUBLISH_TOPIC
    assert msg.data["uri"] == str(local)
    assert msg.data["platform_name"] == "S3A"
    assert msg.data["start_time"] == dt.datetime(2026, 11, 21, 7, 59, 33)
    assert "filesystem" not in msg.data
    assert downloader.partial_files() == []


def test_dataset_and_collection_files_are_each_announced(downloader: Downloader) -> None:
    """Every file of a dataset (and of a collection of datasets) is downloaded and announced."""
    names = [f"SVM{band:02d}_npp_d20261121.h5" for band in range(1, 6)]
    for name in names:
        downloader.put(f"viirs/{name}", name.encode() * 1000)
    dataset = {"dataset": [stalker_file(downloader.bucket, f"viirs/{n}") for n in names[:3]],
               "platform_name": "npp"}
    collection = {"collection": [
        {"dataset": [stalker_file(downloader.bucket, f"viirs/{n}") for n in names[3:]]}]}
    downloader.send("dataset", dataset)
    downloader.send("collection", collection)
    for name in names:
        (msg,) = downloader.wait_announced(name)
        assert Path(msg.data["uri"]).read_bytes() == name.encode() * 1000
        assert msg.type == "file"
    assert downloader.partial_files() == []


def test_same_object_again_is_announced_and_a_rewrite_downloaded(
        downloader: Downloader) -> None:
    """Every announcement is answered: an unchanged object is not downloaded again but
    announced again (a copy whose announcement was lost is announced at last); an object
    rewritten at the same size (in the same second, too) is downloaded again."""
    file = stalker_file(downloader.bucket, "again/same.nc")
    downloader.put("again/same.nc", b"a" * 1000)
    downloader.send("file", file)
    downloader.wait_announced("same.nc")
    local = downloader.dest / "same.nc"
    head = downloader.s3.client().head_object(Bucket=downloader.bucket, Key="again/same.nc")
    assert int(local.stat().st_mtime) == int(head["LastModified"].timestamp())
    downloader.send("file", file)
    downloader.wait_announced("same.nc", count=2)
    downloader.wait_log(r"s3://\S+/again/same\.nc is already downloaded to \S+ \(same size, "
                        r"time and ETag\); announcing it")
    downloader.put("again/same.nc", b"b" * 1000)
    downloader.send("file", file)
    downloader.wait_announced("same.nc", count=3)
    assert local.read_bytes() == b"b" * 1000
    assert len(re.findall(r"Downloaded s3://\S+/again/same\.nc", downloader.log_text())) == 2


def test_bad_messages_do_not_stop_the_downloader(downloader: Downloader) -> None:
    """Random bytes, a text that is no posttroll message, JSON nested too deep, an invalid URI
    and a message over the size bound are each logged; the next good message is served."""
    bad = bad_messages(TOPIC)
    for kind in ("random bytes", "not posttroll", "deeply nested"):
        downloader.feed.send_raw(bad[kind])
    downloader.send("file", {"uri": "s3://[x/a.h5", "uid": "a.h5"})
    downloader.feed.send_raw(bad["oversize"])
    downloader.feed.wait_subscribed()  # the oversize message cost its connection; it is back
    downloader.sync()
    for reason in ("UnicodeDecodeError", "ValueError", "RecursionError"):
        downloader.wait_log(rf"WARNING .*not a posttroll message \({reason}")
    downloader.wait_log(r"WARNING .*Not an S3 object, ignored: s3://\[x/a\.h5")
    downloader.wait_log(rf"WARNING .*Lost the connection to {downloader.feed.address} .*over "
                        rf"{MAX_MESSAGE_BYTES} bytes")
    assert downloader.proc.poll() is None


def test_other_messages_are_ignored(downloader: Downloader) -> None:
    """Messages for other file systems are ignored with a log line; the process keeps serving."""
    downloader.send("file", {"uri": "ssh://host/data/file.h5", "uid": "file.h5",
                             "filesystem": {"cls": "sshfs.spec.SSHFileSystem", "protocol": "ssh"}})
    downloader.wait_log(r"Not an S3 object, ignored: ssh://host/data/file\.h5")
    downloader.send("beat", {"min_interval": 30})
    downloader.wait_log(r"Ignoring beat message " + re.escape(TOPIC))


# ------------------------------------------------------------------------- end to end: errors


def test_wrong_bucket_is_reported(downloader: Downloader) -> None:
    """A bucket that does not exist: a clear error line, no file, the service goes on."""
    downloader.send("file", stalker_file("no-such-bucket-1234", "x/wrong-bucket.h5"))
    downloader.wait_log(r"Download of s3://no-such-bucket-1234/x/wrong-bucket\.h5 failed: "
                        r"bucket 'no-such-bucket-1234' does not exist")
    assert not (downloader.dest / "wrong-bucket.h5").exists()
    assert downloader.partial_files() == []
    assert downloader.collector.files("wrong-bucket.h5") == []
    downloader.sync()  # still serving


def test_missing_object_is_reported(downloader: Downloader) -> None:
    """An object that is not there: a clear error line naming key and bucket, no file."""
    downloader.send("file", stalker_file(downloader.bucket, "x/missing.h5"))
    downloader.wait_log(rf"Download of s3://{downloader.bucket}/x/missing\.h5 failed: "
                        rf"object 'x/missing\.h5' not found in bucket '{downloader.bucket}'")
    assert not (downloader.dest / "missing.h5").exists()
    assert downloader.partial_files() == []
    assert downloader.collector.files("missing.h5") == []


def test_endpoint_down_is_retried_until_it_is_back(tmp_path: Path, s3_server: S3Server,
                                                   s3_bucket: str) -> None:
    """Endpoint down: logged, nothing on disk, re-tried from the retry queue once it is back.
    Endpoint dying mid-download: no partial file left, downloaded on a later retry."""
    gate = TcpGate((servers.HOST, s3_server.port))
    gate.open()
    proc = Downloader(tmp_path, s3_server, s3_bucket, f"http://{servers.HOST}:{gate.port}",
                      retry_delay=0.3, download_retries=8)
    try:
        proc.sync()
        gate.close()
        proc.put("down/later.h5", b"x" * 5000)
        proc.send("file", stalker_file(s3_bucket, "down/later.h5"))
        proc.wait_log(r"Download of s3://\S+/down/later\.h5 failed \(attempt 1 of 9\), "
                      r"retrying in 0\.3 s: connection failed")
        assert not (proc.dest / "later.h5").exists()
        assert proc.partial_files() == []
        gate.open()
        (msg,) = proc.wait_announced("later.h5")
        assert Path(msg.data["uri"]).read_bytes() == b"x" * 5000

        big = os.urandom(3_000_000)
        proc.put("down/cut.h5", big)
        gate.close()
        gate.open(cut_after=1_000_000)
        proc.send("file", stalker_file(s3_bucket, "down/cut.h5"))
        proc.wait_log(r"Download of s3://\S+/down/cut\.h5 failed \(attempt 1 of 9\)")
        assert gate.cuts == 1
        assert not (proc.dest / "cut.h5").exists()
        assert proc.partial_files() == []
        gate.open()
        (msg,) = proc.wait_announced("cut.h5")
        assert Path(msg.data["uri"]).read_bytes() == big
    finally:
        gate.close()
        assert proc.stop() == 0, proc.log_text()[-3000:]


# ------------------------------------------------------------------------- configuration


def test_example_config_is_valid() -> None:
    """The shipped example reads with its defaults."""
    example = Path(__file__).resolve().parent.parent / "examples" / "s3downloader-config.yaml"
    settings = s3downloader.read_settings(str(example))
    assert settings.subscribe_topics == ["/s3/new"]
    assert settings.subscribe_nameserver == "localhost"
    assert settings.publish_nameservers is None
    assert settings.s3_kwargs["client_kwargs"]["endpoint_url"].startswith("https://")


def test_reference_config_keys_and_cli_overrides(tmp_path: Path) -> None:
    """A trollmoves 0.19 config (comma-separated addresses, one topic) reads unchanged."""
    path = tmp_path / "c.yaml"
    path.write_text("subscribe-topic: /yuhu\npublish-topic: /idnt\nbucket: b\n"
                    "subscriber_addresses: tcp://a:1, tcp://b:2\nlogging:\n"
                    "  log_rotation_days: 1\n  log_rotation_backup: 30\n  logging_mode: DEBUG\n"
                    "something_else: 1\n")
    args = s3downloader.parse_args(["-c", str(path), "-r", "ns1", "-n", "ns2", "ns3"])
    settings = s3downloader.read_settings(str(path), args)
    assert settings.subscribe_topics == ["/yuhu"]
    assert settings.subscriber_addresses == ["tcp://a:1", "tcp://b:2"]
    assert settings.subscribe_nameserver == "ns1"
    assert settings.publish_nameservers == ["ns2", "ns3"]
    assert settings.debug and settings.bucket == "b"
    assert settings.unknown_keys == ("something_else",)


@pytest.mark.parametrize(("text", "key"), [
    ("publish-topic: /x\n", "'subscribe-topic' is a required property"),
    ("subscribe-topic: /a\npublish-topic: /x\npublish_port: -1\n", "publish_port"),
    ("subscribe-topic: /a\npublish-topic: /x\nlogging: {logging_mode: LOUD}\n",
     "logging.logging_mode"),
    ("subscribe-topic: /a\npublish-topic: /x\nnameserver: false\n", "nameserver"),
])
def test_invalid_config_names_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    """Schema errors name the file and the key."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        s3downloader.read_settings(str(path))
    assert str(path) in str(err.value) and key in str(err.value)


def test_source_url_rules() -> None:
    """s3:// URIs keep their key; a configured bucket replaces theirs; other URIs are not S3."""
    assert s3downloader.source_url({"uri": "s3://b/k/f.h5"}) == "s3://b/k/f.h5"
    assert s3downloader.source_url({"uri": "s3://b/k/f.h5"}, "c") == "s3://c/k/f.h5"
    assert s3downloader.source_url({"uri": "k/f.h5"}, "c") == "s3://c/k/f.h5"
    assert s3downloader.source_url({"uri": "k/f.h5"}) is None
    assert s3downloader.source_url({"uri": "/data/f.h5", "filesystem": {"protocol": "ssh"}},
                                   "c") is None
    assert s3downloader.source_url({"uri": "zip://m.nc::s3://b/a.zip"}) is None
    assert s3downloader.source_url({"uri": "s3://b/dir/"}) is None
    assert s3downloader.source_url({"uri": "s3://[x/k"}) is None  # not a valid URI
