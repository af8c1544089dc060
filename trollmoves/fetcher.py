"""pytroll-fetcher: download the files that posttroll messages announce, announce the copies.

``pytroll-fetcher [-v] [-l LOGFILE] [-c LOG_CONFIG] CONFIG`` (or ``trollmoves fetch ...``).
The YAML ``CONFIG`` (``schemas/fetcher.schema.json``, ``examples/fetcher-config.yaml``) has
trollmoves 0.19's keys:

- ``destination``: local directory of the copies; trollsift fields of the message allowed
  (``/data/{platform_name}``), as long as their values keep the path under the fixed part
  (``/data``: a ``platform_name`` of ``../..`` is refused);
- ``subscriber_config``: the settings of posttroll's ``create_subscriber_from_dict_config``
  (``addresses``, ``topics``, ``nameserver``, ``services``, ``addr_listener``, ``timeout``),
  read by :class:`trollmoves.receiver.SubscriberSettings` with posttroll's rules;
- ``publisher_config``: passed as it is to posttroll's ``create_publisher_from_dict_config``;
- ``connection_parameters`` (ours, optional): copy-engine options for the hosts it names, and
  only for them, over the few a message may name (host, port, user name, S3 endpoint)::

      connection_parameters:
        connection_uptime: 30              # for every host below
        hosts:                             # host, host:port, or an S3 endpoint's host[:port]
          data.example.com:
            ssh_key_filename: /home/pytroll/.ssh/id_ed25519
          minio.example.com:9000:
            key: ...
            secret: ...

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
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from posttroll.message import Message
from posttroll.publisher import create_publisher_from_dict_config

from trollmoves import unpack
from trollmoves.config import ConfigError, read_yaml
from trollmoves.errors import TransferError
from trollmoves.filesystems import POOL
from trollmoves.logs import add_logging_arguments, setup_logging
from trollmoves.messages import (
    FILE_TYPES,
    Source,
    compose_path,
    download_source,
    iter_files,
    local_file_data,
)
from trollmoves.receiver import Control, Receiver, SubscriberSettings, run_until_stopped
from trollmoves.transfer import interrupt_retries, transfer
from trollmoves.urls import parse

LOG = logging.getLogger(__name__)

SCHEMA = "fetcher"
HEARTBEAT_INTERVAL = 30
#: The host S3 options are matched by when a message names no endpoint.
DEFAULT_S3_HOST = "s3.amazonaws.com"


def local_name(source: Source) -> str:
    """The copy's path under the destination: an archive member's path inside its archive
    (refused if it leads outside), else the file's base name."""
    _, path = source.endpoint()
    if "::" in source.url:
        return unpack.safe_member_path(path)
    name = posixpath.basename(path.rstrip("/"))
    if name in {"", ".", ".."}:
        raise ValueError(f"no file name in {path!r}")
    return name


def source_host(source: Source) -> tuple[str, int | None]:
    """The host (lower case) and port a download connects to: the innermost filesystem's of a
    chained URL; for S3 the endpoint's (:data:`DEFAULT_S3_HOST` when none is named)."""
    loc = parse(source.url.rpartition("::")[2])
    if loc.protocol == "s3":
        client_kwargs = source.options.get("client_kwargs")
        endpoint = source.options.get("endpoint_url") or (
            client_kwargs.get("endpoint_url") if isinstance(client_kwargs, Mapping) else None)
        if not endpoint:
            return DEFAULT_S3_HOST, None
        parts = urlsplit(str(endpoint))
        return (parts.hostname or "").lower(), parts.port
    port = loc.port if loc.port is not None else source.options.get("port")
    return (loc.host or "").lower(), int(port) if port else None


class HostOptions:
    """The configured ``connection_parameters``: options for the hosts they name, only."""

    def __init__(self, hosts: Mapping[str, Mapping[str, Any]],
                 shared: Mapping[str, Any] | None = None) -> None:
        self.hosts = {str(name).lower(): dict(options or {}) for name, options in hosts.items()}
        self.shared = dict(shared or {})

    @classmethod
    def from_config(cls, parameters: Mapping[str, Any] | None, path: str = "<config>"
                    ) -> HostOptions:
        """Read ``connection_parameters`` (``hosts`` plus options for all of them); raise
        :class:`ConfigError` when options name no host to be used for."""
        parameters = dict(parameters or {})
        hosts = parameters.pop("hosts", None) or {}
        if not isinstance(hosts, Mapping) or not all(
                isinstance(options, Mapping | None) for options in hosts.values()):
            raise ConfigError(path, None, "connection_parameters.hosts",
                              "give a mapping of host (or host:port) to its options")
        if parameters and not hosts:
            raise ConfigError(path, None, "connection_parameters", "say which hosts these "
                              "options are for, under 'hosts' (host or host:port: options); "
                              "they are not used for hosts the messages name otherwise")
        return cls(hosts, parameters)

    def for_source(self, source: Source) -> dict[str, Any]:
        """The configured options for the host ``source`` is on; empty for any other host."""
        host, port = source_host(source)
        for name in ([f"{host}:{port}"] if port is not None else []) + [host]:
            if name in self.hosts:
                return {**self.shared, **self.hosts[name]}
        if self.hosts:
            LOG.debug("No connection parameters configured for %s", host)
        return {}


class Fetcher:
    """Downloads the files of one message at a time and announces each local copy."""

    def __init__(self, destination: str, publish: Callable[[Message], None],
                 options: HostOptions | None = None) -> None:
        self.destination = os.path.expanduser(destination)
        self.publish = publish
        self.options = options or HostOptions({})
        self.stopping = threading.Event()  #: set: the files not started yet are skipped

    def handle(self, message: Message) -> list[str]:
        """Download every file ``message`` announces; return the local paths of the copies."""
        if message.type not in FILE_TYPES:
            LOG.debug("Ignoring %s message on %s", message.type, message.subject)
            return []
        copies = []
        for info in iter_files(message.data):
            what = info.get("uri") or info.get("uid")
            if self.stopping.is_set():
                LOG.error("Not fetched, stopping: %s", what)
                continue
            if "request_address" in info:
                LOG.info("Not fetching %s: it is served on request (%s)", what,
                         info["request_address"])
                continue
            try:
                local = self.fetch(info)
            except (TransferError, ValueError, KeyError, TypeError) as err:
                LOG.error("Could not fetch %s: %s", what, err)
                continue
            self.publish(Message(message.subject, "file", local_file_data(info, local)))
            copies.append(local)
        return copies

    def fetch(self, info: Mapping[str, Any]) -> str:
        """Copy one announced file (an item of ``iter_files``) to the destination."""
        source = download_source(info)
        directory = compose_path(self.destination, info)
        target = os.path.join(os.path.abspath(directory), local_name(source))
        result = transfer(source.url, target, **source.with_options(
            self.options.for_source(source)).options)
        LOG.info("Fetched %s to %s (%d bytes, %.2f s)", result.src, target, result.size,
                 result.seconds)
        return target


def read_config(path: str) -> tuple[dict[str, Any], SubscriberSettings, HostOptions]:
    """The validated config file, its subscription and its connection parameters."""
    config = read_yaml(path, SCHEMA)
    options = HostOptions.from_config(config.get("connection_parameters"), path)
    return config, SubscriberSettings.from_posttroll(config["subscriber_config"]), options


def serve(config: Mapping[str, Any], subscription: SubscriberSettings, options: HostOptions,
          control: Control) -> None:
    """Subscribe, download and publish until ``control`` says stop."""
    publisher = create_publisher_from_dict_config(dict(config["publisher_config"]))
    publisher.start()
    try:
        fetcher = Fetcher(config["destination"], lambda m: publisher.send(m.encode()), options)
        receiver = Receiver(subscription, fetcher.handle,
                            tick=lambda: publisher.heartbeat(HEARTBEAT_INTERVAL),
                            tick_interval=HEARTBEAT_INTERVAL, on_exit=control.request_stop,
                            name="fetcher-receiver")
        receiver.start()
        try:
            LOG.info("pytroll-fetcher ready: listening to %s, fetching to %s, publishing on "
                     "port %s", subscription.describe(), config["destination"],
                     publisher.port_number)
            control.wait()
            LOG.info("Stopping")
        finally:
            fetcher.stopping.set()
            interrupt_retries()
            receiver.stop()
            receiver.join()
        if receiver.error is not None:
            raise RuntimeError("the receive loop stopped on an error") from receiver.error
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
        config, subscription, options = read_config(args.config)
    except ConfigError as err:
        print(f"pytroll-fetcher: {err}", file=sys.stderr)
        return 2
    setup_logging(args)
    return run_until_stopped("pytroll-fetcher",
                             lambda control: serve(config, subscription, options, control))


if __name__ == "__main__":
    sys.exit(main())
