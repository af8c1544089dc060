"""Download the S3 objects that posttroll messages announce, and announce the local copies.

Listens for ``file``, ``dataset`` and ``collection`` messages (for example from pytroll-collectors'
s3stalker, whose files carry ``s3://bucket/key`` URIs and an fsspec ``filesystem`` item), copies
every announced object through the copy engine into ``download_destination`` (under a temporary
name, renamed once complete) and publishes one ``file`` message per new local file, with the
incoming metadata, ``uri`` = the absolute local path and ``uid`` = the file name.

- Objects are fetched concurrently by a small pool of ``workers`` threads.
- An object whose local copy already exists with the same size is not downloaded again, and not
  announced again: every announcement stands for one new download.
- A download that fails on a connection problem (after the engine's own quick retries) is queued
  for another try ``retry_delay`` seconds later (doubling), at most ``download_retries`` times;
  a missing bucket or object, or refused access, is logged and not retried.

Run as ``s3downloader.py -c CONFIG [-l LOGFILE] [-r SUBSCRIBE_NAMESERVER] [-n NAMESERVER ...]``
or ``trollmoves s3download ...``; ``schemas/s3downloader.schema.json`` describes the YAML keys and
``examples/s3downloader-config.yaml`` shows them.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import logging
import os
import posixpath
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from posttroll.message import Message
from posttroll.publisher import create_publisher_from_dict_config
from posttroll.subscriber import create_subscriber_from_dict_config

from trollmoves import errors
from trollmoves.config import ConfigError, load_schema, read_yaml
from trollmoves.filesystems import POOL, endpoint
from trollmoves.logs import add_logging_arguments, setup_logging
from trollmoves.messages import FILE_TYPES, iter_files
from trollmoves.transfer import interrupt_retries, transfer
from trollmoves.urls import parse

LOG = logging.getLogger(__name__)

SERVICE_NAME = "s3downloader"
HEARTBEAT_INTERVAL = 30
#: Items of the incoming data that describe the remote object, not the local copy.
REMOTE_ITEMS = ("dataset", "collection", "filename", "compress", "tst", "uri", "uid", "file_list",
                "path", "filesystem")
#: Downloads accepted from the subscriber but not finished yet; beyond this the listener waits.
MAX_QUEUED = 1000
#: Failed downloads waiting for another try; beyond this the failure is final.
MAX_RETRY_PENDING = 1000
_S3_SCHEMES = frozenset({"s3", "s3a"})


# ---------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """The s3downloader configuration after defaults and command-line overrides."""

    subscribe_topics: list[str]
    publish_topic: str
    destination: str
    services: list[str] = field(default_factory=lambda: [""])
    subscribe_nameserver: str | bool = "localhost"
    subscriber_addresses: list[str] = field(default_factory=list)
    publish_nameservers: list[str] | bool | None = None
    publish_port: int = 0
    bucket: str | None = None
    s3_kwargs: dict[str, Any] = field(default_factory=dict)
    workers: int = 4
    download_retries: int = 3
    retry_delay: float = 60.0
    log_rotation_days: int = 1
    log_rotation_backup: int = 30
    debug: bool = False
    unknown_keys: tuple[str, ...] = ()  #: top-level keys the schema does not know (ignored)


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _cli_nameserver(value: str | None) -> str | bool | None:
    if value is None:
        return None
    return False if value.strip().lower() == "false" else value


def _cli_nameservers(values: Sequence[str] | None) -> list[str] | bool | None:
    if values is None:
        return None
    if [v.lower() for v in values] == ["false"]:
        return False
    return list(values) or None


def read_settings(path: str, args: argparse.Namespace | None = None) -> Settings:
    """Read and validate the YAML file ``path``; ``-r``/``-n`` in ``args`` override its keys."""
    config = read_yaml(path, SERVICE_NAME)
    cli_ns = _cli_nameserver(getattr(args, "subscribe_nameserver", None))
    subscribe_ns = cli_ns if cli_ns is not None else config.get("nameserver")
    cli_nss = _cli_nameservers(getattr(args, "nameservers", None))
    publish_nss = cli_nss if cli_nss is not None else config.get("nameservers")
    addresses = config.get("subscriber_addresses") or []
    if isinstance(addresses, str):
        addresses = [a.strip() for a in addresses.split(",") if a.strip()]
    if subscribe_ns is False and not addresses:
        raise ConfigError(path, None, "nameserver", "false needs subscriber_addresses")
    logging_block = config.get("logging") or {}
    mode = str(logging_block.get("logging_mode", "INFO")).upper()
    return Settings(
        subscribe_topics=_as_list(config["subscribe-topic"]),
        publish_topic=config["publish-topic"],
        destination=os.path.abspath(os.path.expanduser(config.get("download_destination", "."))),
        services=_as_list(config.get("services")) or [""],
        subscribe_nameserver="localhost" if subscribe_ns is None else subscribe_ns,
        subscriber_addresses=addresses,
        publish_nameservers=[publish_nss] if isinstance(publish_nss, str) else publish_nss,
        publish_port=config.get("publish_port", 0),
        bucket=config.get("bucket"),
        s3_kwargs=dict(config.get("s3_kwargs") or {}),
        workers=config.get("workers", 4),
        download_retries=config.get("download_retries", 3),
        retry_delay=float(config.get("retry_delay", 60.0)),
        log_rotation_days=logging_block.get("log_rotation_days", 1),
        log_rotation_backup=logging_block.get("log_rotation_backup", 30),
        debug=mode == "DEBUG",
        unknown_keys=tuple(sorted(set(config) - set(load_schema(SERVICE_NAME)["properties"]))),
    )


# ----------------------------------------------------------------------- what to download


def _filesystem_protocols(info: Mapping[str, Any]) -> set[str]:
    filesystem = info.get("filesystem")
    if not isinstance(filesystem, Mapping):
        return set()
    protocol = filesystem.get("protocol")
    return set(_as_list(protocol)) if protocol else set()


def source_url(info: Mapping[str, Any], bucket: str | None = None) -> str | None:
    """The ``s3://bucket/key`` URL of one announced file, or None when it is not an S3 object.

    ``bucket``, when configured, replaces the bucket of the message's URI; with a bucket, a URI
    without scheme is taken as the object key.
    """
    uri = str(info.get("uri") or "")
    if not uri or "::" in uri:  # archive members (zip://...::s3://...) are not whole objects
        return None
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    protocols = _filesystem_protocols(info)
    if scheme in _S3_SCHEMES:
        key, name = parts.path.lstrip("/"), bucket or parts.netloc
    elif not scheme and bucket and (not protocols or protocols & _S3_SCHEMES):
        key, name = uri.lstrip("/"), bucket
    else:
        return None
    if not key or key.endswith("/") or not name:
        return None
    return f"s3://{name}/{key}"


def local_message_data(info: Mapping[str, Any], local_path: str) -> dict[str, Any]:
    """The data of the ``file`` message announcing a local copy of the announced ``info``."""
    data = {key: value for key, value in info.items() if key not in REMOTE_ITEMS}
    data["uri"] = local_path
    data["uid"] = os.path.basename(local_path)
    return data


# ------------------------------------------------------------------------------ retry queue


@dataclass
class Job:
    """One announced file to download, and how often that was tried already."""

    info: dict[str, Any]
    source: str
    target: str
    attempt: int = 1


class RetryQueue:
    """Failed downloads waiting for their next try; a thread hands each back when it is due."""

    def __init__(self, resubmit: Callable[[Job], None], max_pending: int = MAX_RETRY_PENDING
                 ) -> None:
        self._resubmit = resubmit
        self._max_pending = max_pending
        self._heap: list[tuple[float, int, Job]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="s3downloader-retry", daemon=True)
        self._thread.start()

    def put(self, job: Job, delay: float) -> bool:
        """Schedule ``job`` in ``delay`` seconds; False when the queue is full or stopped."""
        with self._cond:
            if self._stopped or len(self._heap) >= self._max_pending:
                return False
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._order), job))
            self._cond.notify()
            return True

    def __len__(self) -> int:
        with self._cond:
            return len(self._heap)

    def stop(self) -> list[Job]:
        """Stop handing out jobs; return those still waiting."""
        with self._cond:
            self._stopped = True
            pending = [job for _, _, job in sorted(self._heap)]
            self._heap.clear()
            self._cond.notify()
        self._thread.join()
        return pending

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap
                                             or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                _, _, job = heapq.heappop(self._heap)
            self._resubmit(job)


# ------------------------------------------------------------------------------- downloader


class Downloader:
    """Downloads announced objects with a thread pool and publishes the complete local files."""

    def __init__(self, settings: Settings, publish: Callable[[str], None]) -> None:
        self.settings = settings
        self._publish = publish
        self._pool = ThreadPoolExecutor(settings.workers, thread_name_prefix="s3download")
        self._slots = threading.BoundedSemaphore(MAX_QUEUED)
        self._stop = threading.Event()
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._retries = RetryQueue(self._submit)

    # -- accepting work --------------------------------------------------------------------
    def handle(self, msg: Message) -> int:
        """Queue a download for every S3 object ``msg`` announces; return how many."""
        if msg.type not in FILE_TYPES:
            LOG.debug("Ignoring %s message %s", msg.type, msg.subject)
            return 0
        count = 0
        for info in iter_files(msg.data):
            source = source_url(info, self.settings.bucket)
            if source is None:
                LOG.warning("Not an S3 object, ignored: %s (in %s message %s)",
                            info.get("uri") or info.get("uid"), msg.type, msg.subject)
                continue
            target = os.path.join(self.settings.destination, posixpath.basename(source))
            if self._submit(Job(info, source, target)):
                count += 1
        return count

    def _submit(self, job: Job) -> bool:
        while not self._stop.is_set():
            if self._slots.acquire(timeout=0.5):  # full: let the socket buffer meanwhile
                self._pool.submit(self._run, job)
                return True
        return False

    # -- doing it ---------------------------------------------------------------------------
    def _run(self, job: Job) -> None:
        try:
            with self._claim(job.target) as claimed:
                if not claimed:
                    LOG.info("%s is already being downloaded to %s", job.source, job.target)
                    return
                self._download(job)
        except Exception:
            LOG.exception("Unexpected error while downloading %s", job.source)
        finally:
            self._slots.release()

    @contextmanager
    def _claim(self, target: str) -> Iterator[bool]:
        with self._lock:
            if target in self._in_flight:
                yield False
                return
            self._in_flight.add(target)
        try:
            yield True
        finally:
            with self._lock:
                self._in_flight.discard(target)

    def _download(self, job: Job) -> None:
        if self._already_downloaded(job):
            LOG.info("Skipping %s: %s already exists with the same size (not announced again)",
                     job.source, job.target)
            return
        try:
            result = transfer(job.source, job.target, src_options=self.settings.s3_kwargs)
        except errors.TransferError as err:
            self._failed(job, err)
            return
        LOG.info("Downloaded %s to %s (%d bytes, %.2f s)", job.source, job.target, result.size,
                 result.seconds)
        message = Message(self.settings.publish_topic, "file",
                          local_message_data(job.info, job.target))
        self._publish(message.encode())
        LOG.debug("Published %s", message)

    def _remote_size(self, source: str) -> int:
        loc = parse(source)
        with POOL.use(endpoint(loc, self.settings.s3_kwargs)) as fs:
            return int(fs.size(loc.fs_path))

    def _already_downloaded(self, job: Job) -> bool:
        try:
            local = os.path.getsize(job.target)
        except OSError:
            return False
        try:
            return self._remote_size(job.source) == local
        except Exception as err:  # noqa: BLE001 - the download itself reports the problem
            LOG.debug("Could not compare sizes of %s: %s", job.source, errors.describe(err))
            return False

    # -- failures ---------------------------------------------------------------------------
    def _failed(self, job: Job, err: errors.TransferError) -> None:
        if isinstance(err, errors.SourceMissingError):
            LOG.error("Download of %s failed: %s", job.source, self._what_is_missing(job.source))
            return
        if not (err.transient or isinstance(err, errors.VerificationError)):
            LOG.error("Download of %s failed: %s", job.source, err)
            return
        if job.attempt > self.settings.download_retries:
            LOG.error("Download of %s failed, giving up after %d attempts: %s", job.source,
                      job.attempt, err)
            return
        delay = self.settings.retry_delay * 2 ** (job.attempt - 1)
        retry = Job(job.info, job.source, job.target, job.attempt + 1)
        if self._retries.put(retry, delay):
            LOG.error("Download of %s failed (attempt %d of %d), retrying in %.1f s: %s",
                      job.source, job.attempt, self.settings.download_retries + 1, delay, err)
        else:
            reason = "shutting down" if self._stop.is_set() else "the retry queue is full"
            LOG.error("Download of %s failed and is not retried (%s): %s", job.source, reason,
                      err)

    def _what_is_missing(self, source: str) -> str:
        loc = parse(source)
        try:
            with POOL.use(endpoint(loc, self.settings.s3_kwargs)) as fs:
                bucket_exists = fs.exists(loc.host)
        except Exception as err:  # noqa: BLE001 - only refines the message
            LOG.debug("Could not check bucket %s: %s", loc.host, errors.describe(err))
            bucket_exists = True
        if not bucket_exists:
            return f"bucket {loc.host!r} does not exist (or is not visible with these credentials)"
        return f"object {loc.path.lstrip('/')!r} not found in bucket {loc.host!r}"

    # -- stopping ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop accepting work, drop pending retries and wait for running downloads."""
        self._stop.set()
        dropped = self._retries.stop()
        if dropped:
            LOG.warning("Dropping %d download(s) waiting for a retry: %s", len(dropped),
                        ", ".join(job.source for job in dropped))
        interrupt_retries()
        self._pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------- posttroll


def create_publisher(settings: Settings) -> Any:
    """Start the posttroll publisher: registered with nameservers, or plain with ``false``."""
    config: dict[str, Any] = {"name": SERVICE_NAME, "port": settings.publish_port,
                              "nameservers": settings.publish_nameservers}
    if settings.publish_nameservers is False:
        config["address"] = f"tcp://*:{settings.publish_port}"
    return create_publisher_from_dict_config(config).start()


def create_subscriber(settings: Settings) -> Any:
    """Subscribe directly to ``subscriber_addresses``, or through the nameserver."""
    config: dict[str, Any] = {"topics": settings.subscribe_topics,
                              "addresses": settings.subscriber_addresses or None}
    if settings.subscribe_nameserver is False:
        config["nameserver"] = False
    else:
        config.update(nameserver=settings.subscribe_nameserver, services=settings.services,
                      addr_listener=True)
    return create_subscriber_from_dict_config(config)


def serve(settings: Settings, stop: threading.Event) -> None:
    """Download what is announced until ``stop`` is set."""
    publisher = create_publisher(settings)
    try:
        subscriber = create_subscriber(settings)
        downloader = Downloader(settings, publisher.send)
        try:
            source = (", ".join(settings.subscriber_addresses)
                      if settings.subscribe_nameserver is False
                      else f"nameserver {settings.subscribe_nameserver}")
            LOG.info("Ready: listening to %s on %s, downloading to %s, publishing %s on port %d",
                     ", ".join(settings.subscribe_topics), source, settings.destination,
                     settings.publish_topic, publisher.port_number)
            for msg in subscriber.recv(timeout=1):
                if stop.is_set():
                    break
                publisher.heartbeat(HEARTBEAT_INTERVAL)
                if msg is not None:
                    downloader.handle(msg)
        finally:
            subscriber.close()
            downloader.close()
    finally:
        publisher.stop()
        POOL.close_all()


# ------------------------------------------------------------------------------ entry point


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the trollmoves 0.19 command line of ``s3downloader.py``."""
    parser = argparse.ArgumentParser(prog="s3downloader.py", description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config-file", required=True, metavar="CONFIG",
                        help="YAML configuration file")
    parser.add_argument("-r", "--subscribe-nameserver", dest="subscribe_nameserver",
                        metavar="SUBSCRIBE_NAMESERVER",
                        help="nameserver to find publishers on (default: config, else "
                             "localhost); 'false' for subscriber_addresses only")
    parser.add_argument("-n", "--nameservers", dest="nameservers", nargs="*", metavar="NAMESERVER",
                        help="nameservers to register the publisher with (default: config, "
                             "else multicast); 'false' for none")
    add_logging_arguments(parser, log_file=True, log_config=False)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``s3downloader.py`` and ``trollmoves s3download``."""
    args = parse_args(argv)
    try:
        settings = read_settings(args.config_file, args)
    except ConfigError as err:
        print(f"s3downloader.py: {err}", file=sys.stderr)
        return 2
    args.verbose = args.verbose or settings.debug
    args.log_rotation_days = settings.log_rotation_days
    args.log_rotation_backup = settings.log_rotation_backup
    setup_logging(args)
    for key in settings.unknown_keys:
        LOG.warning("%s: unknown key %r is ignored", args.config_file, key)
    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        LOG.info("Received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        serve(settings, stop)
    except Exception:
        LOG.exception("s3downloader stopped on an error")
        return 1
    LOG.info("Stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
