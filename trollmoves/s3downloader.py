"""Download the S3 objects that posttroll messages announce, and announce the local copies.

Listens for ``file``, ``dataset`` and ``collection`` messages (for example from pytroll-collectors'
s3stalker, whose files carry ``s3://bucket/key`` URIs and an fsspec ``filesystem`` item), copies
every announced object through the copy engine into ``download_destination`` (under a temporary
name, renamed once complete) and publishes one ``file`` message per new local file, with the
incoming metadata, ``uri`` = the absolute local path and ``uid`` = the file name.

- Objects are fetched concurrently by a small pool of ``workers`` threads, one at a time per
  local file; at most :data:`MAX_QUEUED` wait, beyond that the receive loop waits for room.
- Every announcement is answered by one announcement of the local copy once it is complete and
  current. A local copy carries the object's modification time (``LastModified``) as its own
  and its ETag in the extended attribute ``user.trollmoves.etag`` (where the file system has
  them); a copy with the object's size, time and ETag is not downloaded again, an object
  rewritten since is.
- A download that fails on a connection problem (after the engine's own quick retries) is queued
  for another try ``retry_delay`` seconds later (doubling), at most ``download_retries`` times;
  a missing bucket or object, or refused access, is logged and not retried.
- At SIGTERM the queued downloads get ``--stop-timeout`` seconds; each one not done is logged.

Run as ``s3downloader.py -c CONFIG [-l LOGFILE] [-r SUBSCRIBE_NAMESERVER] [-n NAMESERVER ...]``
or ``trollmoves s3download ...``; ``schemas/s3downloader.schema.json`` describes the YAML keys and
``examples/s3downloader-config.yaml`` shows them.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import itertools
import logging
import os
import posixpath
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from posttroll.message import Message
from posttroll.publisher import create_publisher_from_dict_config

from trollmoves import errors
from trollmoves.config import ConfigError, load_schema, read_yaml
from trollmoves.filesystems import POOL, endpoint
from trollmoves.jobqueue import JobQueues
from trollmoves.logs import add_logging_arguments, setup_logging
from trollmoves.messages import FILE_TYPES, iter_files, local_file_data
from trollmoves.receiver import Control, Receiver, SubscriberSettings, run_until_stopped
from trollmoves.transfer import interrupt_retries, transfer
from trollmoves.urls import parse

LOG = logging.getLogger(__name__)

SERVICE_NAME = "s3downloader"
HEARTBEAT_INTERVAL = 30
#: Downloads accepted from the subscriber but not started yet; beyond this the listener waits.
MAX_QUEUED = 1000
#: Seconds the queued downloads get to finish at a stop (``--stop-timeout``).
DEFAULT_STOP_TIMEOUT = 30.0
#: Extended attribute of a local copy holding the ETag of the object it was downloaded from.
ETAG_XATTR = "user.trollmoves.etag"
_NO_XATTRS = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP})
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
    try:
        parts = urlsplit(uri)
    except ValueError:  # not a valid URI (s3://[x)
        return None
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


class ObjectState(NamedTuple):
    """What identifies the content of an S3 object cheaply."""

    size: int
    mtime: int  #: LastModified, whole seconds since the epoch
    etag: str | None = None


def is_current(path: str, remote: ObjectState) -> bool:
    """Whether the local file ``path`` is a complete copy of the object as it is now: the same
    size and modification time, and the same ETag unless the file system keeps none."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    if (info.st_size, int(info.st_mtime)) != (remote.size, remote.mtime):
        return False
    if not remote.etag:
        return True
    try:
        return os.getxattr(path, ETAG_XATTR).decode(errors="replace") == remote.etag
    except OSError as err:  # no attribute (an interrupted download): not known to be current
        return err.errno in _NO_XATTRS


def record_state(path: str, remote: ObjectState) -> None:
    """Mark the local copy ``path`` with the state of the object it was downloaded from."""
    os.utime(path, (remote.mtime, remote.mtime))
    if remote.etag:
        try:
            os.setxattr(path, ETAG_XATTR, remote.etag.encode())
        except OSError as err:
            LOG.debug("Cannot record the ETag of %s (%s); size and time must do", path, err)


class Downloader:
    """Downloads announced objects with a thread pool and publishes the complete local files."""

    def __init__(self, settings: Settings, publish: Callable[[str], None]) -> None:
        self.settings = settings
        self._publish = publish
        self.queues = JobQueues(settings.workers, MAX_QUEUED, name="s3download")
        self._stopping = threading.Event()
        self._retries = RetryQueue(self._submit)

    # -- accepting work --------------------------------------------------------------------
    def handle(self, msg: Message) -> int:
        """Queue a download for every S3 object ``msg`` announces (waiting while the queue is
        full); return how many."""
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
        """Queue ``job`` behind the other downloads to the same local file."""
        if self.queues.submit(job.target, job.source, partial(self._run, job)):
            return True
        LOG.error("Not downloaded, stopping: %s", job.source)
        return False

    # -- doing it ---------------------------------------------------------------------------
    def _run(self, job: Job) -> None:
        try:
            self._download(job)
        except Exception:
            LOG.exception("Unexpected error while downloading %s", job.source)

    def _download(self, job: Job) -> None:
        remote = self._remote_state(job.source)
        if remote is not None and is_current(job.target, remote):
            LOG.info("%s is already downloaded to %s (same size, time and ETag); announcing it",
                     job.source, job.target)
        else:
            try:
                result = transfer(job.source, job.target, src_options=self.settings.s3_kwargs)
            except errors.TransferError as err:
                self._failed(job, err)
                return
            if remote is not None:  # taken before the download: a later rewrite shows
                record_state(job.target, remote)
            LOG.info("Downloaded %s to %s (%d bytes, %.2f s)", job.source, job.target,
                     result.size, result.seconds)
        message = Message(self.settings.publish_topic, "file", local_file_data(job.info,
                                                                                job.target))
        self._publish(message.encode())
        LOG.debug("Published %s", message)

    def _remote_state(self, source: str) -> ObjectState | None:
        """Size and modification time of the object; None when they cannot be had (the
        download then reports the problem)."""
        loc = parse(source)
        try:
            with POOL.use(endpoint(loc, self.settings.s3_kwargs)) as fs:
                info = fs.info(loc.fs_path, refresh=True)
            return ObjectState(int(info["size"]), int(info["LastModified"].timestamp()),
                               str(info.get("ETag") or "") or None)
        except Exception as err:  # noqa: BLE001 - the download itself reports the problem
            LOG.debug("Could not read the state of %s: %s", source, errors.describe(err))
            return None

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
            reason = "shutting down" if self._stopping.is_set() else "the retry queue is full"
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
    def close(self, timeout: float | None = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop accepting work and drop the pending retries; give the queued downloads
        ``timeout`` seconds, wait for the running ones; log every download not done."""
        self._stopping.set()
        self.queues.close()
        retries = self._retries.stop()
        dropped = self.queues.drain(timeout)
        interrupt_retries()
        self.queues.join()
        for job in retries:
            LOG.error("Not downloaded, stopped while waiting for a retry: %s", job.source)
        for queued in dropped:
            LOG.error("Not downloaded, stopped before its turn: %s", queued.label)


# ------------------------------------------------------------------------------- posttroll


def create_publisher(settings: Settings) -> Any:
    """Start the posttroll publisher: registered with nameservers, or plain with ``false``."""
    config: dict[str, Any] = {"name": SERVICE_NAME, "port": settings.publish_port,
                              "nameservers": settings.publish_nameservers}
    if settings.publish_nameservers is False:
        config["address"] = f"tcp://*:{settings.publish_port}"
    return create_publisher_from_dict_config(config).start()


def subscriber_settings(settings: Settings) -> SubscriberSettings:
    """Subscribe directly to ``subscriber_addresses`` and/or through the nameserver."""
    nameserver = settings.subscribe_nameserver
    return SubscriberSettings(
        topics=tuple(settings.subscribe_topics), addresses=tuple(settings.subscriber_addresses),
        nameserver=None if nameserver is False else str(nameserver),
        services=tuple(settings.services), addr_listener=True)


def serve(settings: Settings, control: Control,
          stop_timeout: float | None = DEFAULT_STOP_TIMEOUT) -> None:
    """Download what is announced until ``control`` says stop."""
    publisher = create_publisher(settings)
    try:
        downloader = Downloader(settings, publisher.send)
        subscription = subscriber_settings(settings)
        receiver = Receiver(subscription, downloader.handle,
                            tick=lambda: publisher.heartbeat(HEARTBEAT_INTERVAL),
                            tick_interval=HEARTBEAT_INTERVAL, on_exit=control.request_stop,
                            name="s3downloader-receiver")
        try:
            receiver.start()
            LOG.info("Ready: listening to %s, downloading to %s, publishing %s on port %d",
                     subscription.describe(), settings.destination, settings.publish_topic,
                     publisher.port_number)
            control.wait()
            LOG.info("Stopping")
        finally:
            receiver.stop()
            downloader.queues.close()  # a receive loop waiting for room goes on, and stops
            receiver.join()
            downloader.close(stop_timeout)
        if receiver.error is not None:
            raise RuntimeError("the receive loop stopped on an error") from receiver.error
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
    parser.add_argument("--stop-timeout", type=float, default=DEFAULT_STOP_TIMEOUT,
                        metavar="SECONDS",
                        help="at SIGTERM, time the queued downloads get to finish (default "
                             "%(default)s)")
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
    return run_until_stopped("s3downloader",
                             lambda control: serve(settings, control, args.stop_timeout))


if __name__ == "__main__":
    sys.exit(main())
