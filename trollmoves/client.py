"""The trollmoves client: request announced files from servers and announce them delivered.

``move_it_client.py [-v] [-l LOGFILE] [-c LOG_CONFIG] CONFIG`` (also ``trollmoves client``).
Each section of the INI file runs one :class:`ClientSection`:

    SUB on all providers -> duplicate / hot-spare tracking -> push request (REQ) -> reply
    -> (unpack) -> publish push, ack and the final file message

One thread per section reads the subscriptions and the hot-spare timers; transfers run on a
bounded pool of worker threads, so different files move concurrently and the same file never
twice. A file that cannot be delivered is logged and not announced; the section keeps serving.
Config edits and SIGHUP restart only the changed sections; SIGTERM lets the transfers in flight
finish (see :mod:`trollmoves.service`).
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from posttroll.message import Message
from posttroll.publisher import NoisyPublisher, Publisher

from trollmoves import unpack
from trollmoves.config import ConfigError, load_schema
from trollmoves.delivery import (
    DeliveryError,
    Destination,
    ack_request,
    compose_destination,
    final_data,
    message_type,
    push_request,
    unpack_files,
)
from trollmoves.hotspare import Action, FileKey, Tracker, file_key
from trollmoves.logs import add_logging_arguments, setup_logging
from trollmoves.messages import FILE_TYPES
from trollmoves.requester import RequesterPool, RequestError
from trollmoves.service import ServiceRunner
from trollmoves.subscription import HEARTBEAT_TOPIC, Provider, SubscriptionSet, parse_providers

LOG = logging.getLogger(__name__)

DEFAULT_REQ_TIMEOUT = 1.0
DEFAULT_TRANSFER_REQ_TIMEOUT = 10.0
DEFAULT_WORKERS = 8
HEARTBEAT_INTERVAL = 30.0


def _client_keys() -> frozenset[str]:
    return frozenset(load_schema("client").get("properties", {}))


@dataclass(frozen=True)
class ClientSettings:
    """The settings of one client section, with trollmoves 0.19's defaults."""

    name: str
    providers: tuple[str, ...]
    destination: str
    topic: str
    login: str | None = None
    publish_port: int = 0
    nameservers: tuple[str, ...] | bool | None = None
    heartbeat: bool = True
    heartbeat_alarm_scale: float = 0.0
    processing_delay: float = 0.0
    compression: str | None = None
    xritdecompressor: str | None = None
    delete: bool = False
    create_target_directory: bool = True
    backup_targets: tuple[str, ...] = ()
    req_timeout: float = DEFAULT_REQ_TIMEOUT
    transfer_req_timeout: float = DEFAULT_TRANSFER_REQ_TIMEOUT
    ftp_root: str | None = None
    workers: int = DEFAULT_WORKERS
    rewrites: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_section(cls, name: str, section: Mapping[str, Any]) -> ClientSettings:
        """Build from a section as :func:`trollmoves.config.read_ini` returns it."""
        known = _client_keys()
        nameservers = section.get("nameservers")
        if isinstance(nameservers, list):
            nameservers = tuple(nameservers)
        compression = section.get("compression") or None
        if compression in {"false", ""}:
            compression = None
        return cls(
            name=name,
            providers=tuple(section["providers"]),
            destination=section["destination"],
            topic=section["topic"],
            login=section.get("login") or None,
            publish_port=int(section.get("publish_port", 0)),
            nameservers=nameservers,
            heartbeat=bool(section.get("heartbeat", True)),
            heartbeat_alarm_scale=float(section.get("heartbeat_alarm_scale", 0.0)),
            processing_delay=float(section.get("processing_delay", 0.0)),
            compression=compression,
            xritdecompressor=section.get("xritdecompressor"),
            delete=bool(section.get("delete", False)),
            create_target_directory=bool(section.get("create_target_directory", True)),
            backup_targets=tuple(section.get("backup_targets") or ()),
            req_timeout=float(section.get("req_timeout", DEFAULT_REQ_TIMEOUT)),
            transfer_req_timeout=float(section.get("transfer_req_timeout",
                                                   DEFAULT_TRANSFER_REQ_TIMEOUT)),
            ftp_root=section.get("ftp_root") or None,
            workers=int(section.get("workers", DEFAULT_WORKERS)),
            rewrites={key: value for key, value in section.items()
                      if key not in known and isinstance(value, str)},
        )

    @property
    def publisher_name(self) -> str:
        """The posttroll name of the section's publisher."""
        return f"move_it_{self.name}"

    def subscriptions(self) -> list[Provider]:
        """The providers with the topics to subscribe to."""
        topics = [self.topic]
        if self.heartbeat:
            topics.append(HEARTBEAT_TOPIC)
        return parse_providers(self.providers, topics)


def create_publisher(name: str, port: int, nameservers: Any) -> Any:
    """A started posttroll publisher: plain when ``nameservers`` is false, else announced to
    the nameservers given (or by multicast when None)."""
    if nameservers is False:
        return Publisher(f"tcp://*:{port}", name=name).start()
    servers = list(nameservers) if nameservers else None
    return NoisyPublisher(name, port=port, nameservers=servers).start()


class ClientSection:
    """The worker of one client section (a :class:`trollmoves.service.Worker`)."""

    def __init__(self, settings: ClientSettings, requesters: RequesterPool | None = None) -> None:
        self.settings = settings
        self.requesters = requesters or RequesterPool()
        self._own_requesters = requesters is None
        self.tracker: Tracker[Message] = Tracker(
            processing_delay=settings.processing_delay,
            takeover_timeout=settings.transfer_req_timeout + settings.processing_delay)
        self.publisher: Any = None
        self._pool = ThreadPoolExecutor(max_workers=max(1, settings.workers),
                                        thread_name_prefix=f"client-{settings.name}")
        self._thread: threading.Thread | None = None
        self._subscriptions: SubscriptionSet | None = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Bind the publisher, subscribe and start serving; raise when that fails."""
        s = self.settings
        self.publisher = create_publisher(s.publisher_name, s.publish_port, s.nameservers)
        self.publisher.heartbeat(HEARTBEAT_INTERVAL)
        self._thread = threading.Thread(target=self._run, name=f"client-{s.name}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._close_publisher()
            raise self._error
        LOG.info("Section %s ready: publishing on port %s as %s", s.name,
                 self.publisher.port_number, s.publisher_name)

    def stop(self) -> None:
        """Stop reading announcements (transfers in flight go on until :meth:`join`)."""
        self._stopping.set()
        if self._subscriptions is not None:
            self._subscriptions.wake()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the transfers in flight, then release every socket."""
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._close_publisher()
        if self._own_requesters:
            self.requesters.close()

    def _close_publisher(self) -> None:
        if self.publisher is not None:
            self.publisher.stop()
            self.publisher = None

    # -- the section's thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            subscriptions = SubscriptionSet(self.settings.subscriptions(),
                                            self.settings.heartbeat_alarm_scale)
        except Exception as err:  # noqa: BLE001 - reported to start()
            self._error = err
            self._ready.set()
            return
        self._subscriptions = subscriptions
        self._ready.set()
        next_beat = time.monotonic() + HEARTBEAT_INTERVAL
        try:
            while not self._stopping.is_set():
                deadlines = [next_beat, self.tracker.next_deadline(),
                             subscriptions.next_check()]
                timeout = max(0.0, min(d for d in deadlines if d is not None) - time.monotonic())
                for _provider, message in subscriptions.poll(timeout):
                    self._on_message(message)
                for key in self.tracker.due():
                    self._pool.submit(self._transfer, key)
                subscriptions.resubscribe_silent()
                if time.monotonic() >= next_beat:
                    self.publisher.heartbeat(HEARTBEAT_INTERVAL)
                    next_beat = time.monotonic() + HEARTBEAT_INTERVAL
        except Exception:
            LOG.exception("Section %s stopped reading messages", self.settings.name)
        finally:
            self._subscriptions = None
            subscriptions.close()

    def _on_message(self, message: Message) -> None:
        """Dispatch one received message (announcement, or another client's news)."""
        if message.type not in FILE_TYPES and message.type not in {"push", "ack"}:
            return
        key = file_key(message.data)
        if key is None:
            return
        if message.type == "push":
            self.tracker.peer_push(key)
        elif message.type == "ack" or "request_address" not in message.data:
            self.tracker.peer_done(key)
        else:
            self._on_announcement(key, message)

    def _on_announcement(self, key: FileKey, message: Message) -> None:
        action = self.tracker.announce(key, message)
        LOG.debug("Announcement of %s from %s: %s", key[0], message.data["request_address"],
                  action.value)
        if action is Action.REQUEST:
            self._pool.submit(self._transfer, key)
        elif action is Action.ACK:
            self._pool.submit(self._ack, message)

    # -- worker threads ----------------------------------------------------------------------------
    def _transfer(self, key: FileKey) -> None:
        """Request ``key`` from its announcers in turn until one delivers it."""
        delivered = False
        try:
            while not delivered and (announcement := self.tracker.next_source(key)) is not None:
                delivered = self._deliver(announcement)
        except DeliveryError as err:
            LOG.error("Cannot request %s: %s", key[0], err)
        except Exception:
            LOG.exception("Transfer of %s failed", key[0])
        finally:
            leftovers = self.tracker.finish(key, delivered)
        for other in leftovers:
            self._ack(other)

    def _deliver(self, announcement: Message) -> bool:
        """Request one announced file; publish push, ack and file; True when delivered."""
        s = self.settings
        destination = Destination.parse(compose_destination(s.destination, announcement.data))
        local_dir = destination.local_directory(s.ftp_root)
        if s.create_target_directory and local_dir:
            try:
                os.makedirs(local_dir, exist_ok=True)
            except OSError as err:
                raise DeliveryError(f"cannot create {local_dir}: {err.strerror or err}") from None
        request, public = push_request(announcement, destination, s.login, list(s.backup_targets))
        server = announcement.data["request_address"]
        started = time.monotonic()
        self._publish(public)
        try:
            reply = self.requesters.request(server, request, s.transfer_req_timeout)
        except (RequestError, ValueError) as err:
            LOG.error("No transfer of %s from %s: %s", public.data.get("uid"), server, err)
            return False
        if reply.type not in FILE_TYPES:
            LOG.error("Server %s did not deliver %s: %s %s", server, public.data.get("uid"),
                      reply.type, reply.data)
            return False
        self._publish(ack_request(announcement))
        data = final_data(announcement, destination, login=s.login, reply=reply,
                          rewrites=s.rewrites)
        if s.compression:
            try:
                data = unpack_files(data, s.compression, local_dir, destination, login=s.login,
                                    delete=s.delete, prog=s.xritdecompressor)
            except (OSError, unpack.UnpackError) as err:
                LOG.error("Delivered %s but could not unpack it: %s", public.data.get("uid"),
                          err)
                return True
        self._publish(Message(announcement.subject, message_type(data), data))
        LOG.info("Delivered %s from %s to %s in %.1f ms", public.data.get("uid"), server,
                 public.data["destination"], (time.monotonic() - started) * 1000)
        return True

    def _ack(self, announcement: Message) -> None:
        """Tell a server that this client has its file already."""
        server = announcement.data.get("request_address")
        try:
            reply = self.requesters.request(server, ack_request(announcement),
                                            self.settings.req_timeout)
        except (RequestError, ValueError) as err:
            LOG.warning("No answer to ack of %s from %s: %s", announcement.data.get("uid"),
                        server, err)
            return
        if reply.type != "ack":
            LOG.warning("Server %s answered %s to ack of %s", server, reply.type,
                        announcement.data.get("uid"))
        else:
            LOG.debug("Sent ack for %s to %s", announcement.data.get("uid"), server)

    def _publish(self, message: Message) -> None:
        publisher = self.publisher
        if publisher is not None:
            publisher.send(message.encode())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``move_it_client.py``."""
    parser = argparse.ArgumentParser(prog="move_it_client.py",
                                     description="Request announced files from trollmoves "
                                                 "servers and announce them delivered.")
    parser.add_argument("config_file", metavar="CONFIG", help="client INI file")
    add_logging_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the client until SIGTERM/SIGINT; return the exit status."""
    args = parse_args(argv)
    setup_logging(args)
    requesters = RequesterPool()

    def make_section(name: str, section: dict[str, Any]) -> ClientSection:
        return ClientSection(ClientSettings.from_section(name, section), requesters)

    runner = ServiceRunner(args.config_file, "client", make_section)
    try:
        runner.run()
    except ConfigError as err:
        LOG.error("%s", err)
        return 1
    finally:
        requesters.close()
    return 0
