"""pytroll-fetcher: download the files that posttroll messages announce, announce the copies.

``pytroll-fetcher [-v] [-l LOGFILE] [-c LOG_CONFIG] CONFIG`` (or ``trollmoves fetch ...``).
The YAML ``CONFIG`` (``schemas/fetcher.schema.json``, ``examples/fetcher-config.yaml``) has
trollmoves 0.19's keys:

- ``destination``: local directory of the copies; trollsift fields of the message allowed
  (``/data/{platform_name}``);
- ``subscriber_config`` / ``publisher_config``: passed as they are to posttroll's
  ``create_subscriber_from_dict_config`` / ``create_publisher_from_dict_config``;
- ``connection_parameters`` (ours, optional): copy-engine options for every download, over
  those the message names (e.g. ``ssh_key_filename``, ``connection_uptime``).

Every file of a ``file``, ``dataset`` or ``collection`` message is copied through the copy
engine from wherever its ``filesystem`` item (or its ``uri``) says: SSH, S3, FTP, a shared disk,
a member of a remote tar or zip archive, any fsspec protocol. An archive member keeps its path
inside the archive under the destination, other files their name. Each copy is announced by a
``file`` message on the incoming subject: the incoming metadata, ``uri`` = the local path,
``uid`` = the file name. A download that fails is logged and the next one goes on.
Request-mode announcements (with ``request_address``) are left to move_it clients.
"""

from __future__ import annotations

import argparse
import logging
import os
import posixpath
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from posttroll.message import Message
from posttroll.publisher import create_publisher_from_dict_config
from posttroll.subscriber import create_subscriber_from_dict_config
from trollsift import compose

from trollmoves import unpack
from trollmoves.config import ConfigError, read_yaml
from trollmoves.errors import TransferError
from trollmoves.filesystems import POOL
from trollmoves.logs import add_logging_arguments, setup_logging
from trollmoves.messages import FILE_TYPES, Source, download_source, iter_files
from trollmoves.s3downloader import local_message_data
from trollmoves.transfer import interrupt_retries, transfer

LOG = logging.getLogger(__name__)

SCHEMA = "fetcher"
HEARTBEAT_INTERVAL = 30
#: Seconds the receiving loop waits for a message before checking for a stop.
RECEIVE_TIMEOUT = 1


def local_name(source: Source) -> str:
    """The copy's path under the destination: an archive member's path inside its archive
    (refused if it leads outside), else the file's base name."""
    _, path = source.endpoint()
    if "::" in source.url:
        return unpack.safe_member_path(path)
    name = posixpath.basename(path.rstrip("/"))
    if not name:
        raise ValueError(f"no file name in {path!r}")
    return name


class Fetcher:
    """Downloads the files of one message at a time and announces each local copy."""

    def __init__(self, destination: str, publish: Callable[[Message], None],
                 options: Mapping[str, Any] | None = None) -> None:
        self.destination = destination
        self.publish = publish
        self.options = dict(options or {})

    def handle(self, message: Message) -> list[str]:
        """Download every file ``message`` announces; return the local paths of the copies."""
        if message.type not in FILE_TYPES:
            LOG.debug("Ignoring %s message on %s", message.type, message.subject)
            return []
        copies = []
        for info in iter_files(message.data):
            what = info.get("uri") or info.get("uid")
            if "request_address" in info:
                LOG.info("Not fetching %s: it is served on request (%s)", what,
                         info["request_address"])
                continue
            try:
                local = self.fetch(info)
            except (TransferError, ValueError, KeyError, TypeError) as err:
                LOG.error("Could not fetch %s: %s", what, err)
                continue
            self.publish(Message(message.subject, "file", local_message_data(info, local)))
            copies.append(local)
        return copies

    def fetch(self, info: Mapping[str, Any]) -> str:
        """Copy one announced file (an item of ``iter_files``) to the destination."""
        source = download_source(info)
        directory = compose(self.destination, dict(info))
        target = os.path.join(os.path.abspath(os.path.expanduser(directory)), local_name(source))
        result = transfer(source.url, target, **{**source.options, **self.options})
        LOG.info("Fetched %s to %s (%d bytes, %.2f s)", result.src, target, result.size,
                 result.seconds)
        return target


def serve(config: Mapping[str, Any], stop: threading.Event) -> None:
    """Subscribe, download and publish until ``stop`` is set."""
    publisher = create_publisher_from_dict_config(dict(config["publisher_config"]))
    publisher.start()
    try:
        subscriber = create_subscriber_from_dict_config(dict(config["subscriber_config"]))
        try:
            fetcher = Fetcher(config["destination"], lambda m: publisher.send(m.encode()),
                              config.get("connection_parameters"))
            LOG.info("pytroll-fetcher ready: fetching to %s, publishing on port %s",
                     config["destination"], publisher.port_number)
            for message in subscriber.recv(timeout=RECEIVE_TIMEOUT):
                if stop.is_set():
                    break
                publisher.heartbeat(HEARTBEAT_INTERVAL)
                if message is None:
                    continue
                LOG.debug("Received %s", message)
                try:
                    fetcher.handle(message)
                except Exception:  # one bad message must not stop the service
                    LOG.exception("Could not handle %s message on %s", message.type,
                                  message.subject)
        finally:
            subscriber.close()
    finally:
        publisher.stop()
        POOL.close_all()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``pytroll-fetcher``."""
    parser = argparse.ArgumentParser(prog="pytroll-fetcher", description=(
        "Download the files posttroll messages announce and announce the local copies."))
    parser.add_argument("config", metavar="CONFIG", help="the YAML configuration file")
    add_logging_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pytroll-fetcher`` and ``trollmoves fetch``."""
    args = parse_args(argv)
    try:
        config = read_yaml(args.config, SCHEMA)
    except ConfigError as err:
        print(f"pytroll-fetcher: {err}", file=sys.stderr)
        return 2
    setup_logging(args)
    stop = threading.Event()

    def stop_on_signal(*_: Any) -> None:
        stop.set()
        interrupt_retries()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_on_signal)
    try:
        serve(config, stop)
    except Exception:
        LOG.exception("pytroll-fetcher stopped on an error")
        return 1
    LOG.info("pytroll-fetcher stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
