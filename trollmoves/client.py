"""The trollmoves client: request announced files from servers and announce them delivered.

``move_it_client.py [-v] [-l LOGFILE] [-c LOG_CONFIG] CONFIG`` (also ``trollmoves client``).
Each section of the INI file runs one :class:`ClientSection`:

    SUB on all providers -> duplicate / hot-spare tracking -> publish push -> push request
    (REQ) -> reply -> (unpack) -> publish ack and the final file message, back to back

The ``ack`` goes out with the final message, after unpacking: a client that dies before it
announced a file leaves it to its hot spare.

One thread per section reads the subscriptions, runs the hot-spare timers and keeps up to
``workers`` push requests in flight at once, so different files move concurrently and the same
file never twice; more files queue in the :class:`~trollmoves.hotspare.Tracker` (at most
:data:`MAX_QUEUED`; beyond that a file is dropped with a warning, see there). A file that cannot
be delivered is logged and not announced; bad input (an undecodable message, a ``uid`` or a
destination field that would leave the destination directory, an unusable
``request_address``) is logged and the section keeps serving.

A push without a reply within ``transfer_req_timeout`` is not given up at once: its socket
waits as long again for a late reply while a ``ping`` asks whether the server is alive. Only a
server that answers neither (or answers ``err``) makes the client ask the next announcer; a
live server that never answers leaves the file undelivered, never pushed twice.

Config edits and SIGHUP restart only the changed sections; SIGTERM lets the transfers in flight
finish (see :mod:`trollmoves.service`).
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import zmq
from posttroll.message import Message
from posttroll.publisher import NoisyPublisher, Publisher

from trollmoves import unpack, wire
from trollmoves.config import ConfigError, load_schema
from trollmoves.delivery import (
    DeliveryError,
    Destination,
    ack_request,
    check_file_names,
    compose_destination,
    final_data,
    message_type,
    push_request,
    unpack_files,
)
from trollmoves.hotspare import DEFAULT_MAX_QUEUED, Action, FileKey, Tracker, file_key
from trollmoves.logs import add_logging_arguments, setup_logging
from trollmoves.messages import FILE_TYPES
from trollmoves.requester import (
    PendingRequest,
    RequesterPool,
    RequestError,
    RequestMultiplexer,
    RequestTimeout,
)
from trollmoves.service import ServiceRunner
from trollmoves.subscription import (
    HEARTBEAT_TOPIC,
    Provider,
    SubscriptionSet,
    Waker,
    parse_providers,
)
from trollmoves.zmqutil import ReleaseWatch

LOG = logging.getLogger(__name__)

DEFAULT_REQ_TIMEOUT = 1.0
DEFAULT_TRANSFER_REQ_TIMEOUT = 10.0
DEFAULT_WORKERS = 8
HEARTBEAT_INTERVAL = 30.0
#: Messages queued per subscriber of a section's publisher before it drops.
PUBLISH_QUEUE = 100_000
#: Destination directories remembered as existing (not checked again for every file).
KNOWN_DIRECTORIES = 256
#: Files waiting for a free transfer slot at most (see :class:`~trollmoves.hotspare.Tracker`).
MAX_QUEUED = DEFAULT_MAX_QUEUED


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
    max_queued: int = MAX_QUEUED  #: not a config key: files waiting for a free slot at most

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
        publisher = Publisher(f"tcp://*:{port}", name=name).start()
    else:
        servers = list(nameservers) if nameservers else None
        publisher = NoisyPublisher(name, port=port, nameservers=servers).start()
    sock = publish_socket(publisher)
    if sock is None:
        LOG.debug("Could not reach the publisher's socket; its send queue keeps its size")
    else:
        # subscribers may lag behind a burst by this much before messages are dropped
        # (posttroll leaves ZeroMQ's default of 1000)
        sock.setsockopt(zmq.SNDHWM, PUBLISH_QUEUE)
    return publisher


def publish_socket(publisher: Any) -> zmq.Socket | None:
    """The ZeroMQ socket of a posttroll publisher (NoisyPublisher -> Publisher ->
    ZMQPublisher), or None when posttroll hides it."""
    inner = publisher
    for _ in range(3):
        sock = getattr(inner, "publish_socket", None)
        if sock is not None:
            return sock
        inner = getattr(inner, "_publisher", None)
    return None


class ClientSection:
    """The worker of one client section (a :class:`trollmoves.service.Worker`).

    One thread polls the subscriptions, the replies of the requests in flight and a waker,
    and runs the hot-spare timers: no thread hand-off per file. At most ``workers`` pushes
    are in flight; more files wait their turn in the tracker. Unpacking, which may take long,
    runs on a pool of ``workers`` threads.
    """

    def __init__(self, settings: ClientSettings, requesters: RequesterPool | None = None,
                 on_death: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.on_death = on_death  #: called when the section stops working on its own
        self.requesters = requesters or RequesterPool()
        self._own_requesters = requesters is None
        # a push may take transfer_req_timeout and as long again for a late reply
        self.tracker: Tracker[Message] = Tracker(
            processing_delay=settings.processing_delay,
            takeover_timeout=2 * settings.transfer_req_timeout + settings.processing_delay,
            max_queued=settings.max_queued)
        self.publisher: Any = None
        self._unpackers = (ThreadPoolExecutor(max_workers=max(1, settings.workers),
                                              thread_name_prefix=f"unpack-{settings.name}")
                           if settings.compression else None)
        self._thread: threading.Thread | None = None
        self._waker: Waker | None = None
        self._requests: RequestMultiplexer | None = None
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._active = 0  # pushes in flight
        self._unpacking = 0  # files handed to the unpackers
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._died = False
        self._directories: OrderedDict[str, None] = OrderedDict()

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
        """Stop reading announcements; the transfers in flight go on until :meth:`join`."""
        self._stopping.set()
        self._wake()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the transfers in flight, then release every socket."""
        if self._thread is not None:
            self._thread.join(timeout)
        if self._unpackers is not None:
            self._unpackers.shutdown(wait=True, cancel_futures=True)
        self._close_publisher()
        if self._own_requesters:
            self.requesters.close()

    def alive(self) -> bool:
        """False once the section's thread died: it no longer does its job."""
        return not self._died

    def _close_publisher(self) -> None:
        """Stop the publisher; return once its port is free again (a reloaded section binds
        it at once)."""
        if self.publisher is None:
            return
        sock = publish_socket(self.publisher)
        released = ReleaseWatch(sock) if sock is not None and self.settings.publish_port else None
        self.publisher.stop()
        self.publisher = None
        if released is not None:
            released.wait()

    def _wake(self) -> None:
        waker = self._waker
        if waker is not None:
            waker.wake()

    # -- the section's thread -------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        try:
            subscriptions = SubscriptionSet(self.settings.subscriptions(), poller,
                                            self.settings.heartbeat_alarm_scale)
        except Exception as err:  # noqa: BLE001 - reported to start()
            self._error = err
            self._ready.set()
            return
        self._waker = Waker(poller)
        self._requests = RequestMultiplexer(self.requesters, poller)
        self._ready.set()
        try:
            self._loop(poller, subscriptions, self._requests)
        except Exception:
            LOG.exception("Section %s stopped working", self.settings.name)
            self._died = True
            self.on_death()
        finally:
            subscriptions.close()
            self._requests.close()
            self._waker.close()

    def _loop(self, poller: zmq.Poller, subscriptions: SubscriptionSet,
              requests: RequestMultiplexer) -> None:
        next_beat = time.monotonic() + HEARTBEAT_INTERVAL
        reading = True
        while reading or len(requests) or self._unpacking:
            if reading and self._stopping.is_set():
                reading = False  # stop: no new files, finish the ones in flight
                subscriptions.close()
                if self.tracker.queued:
                    LOG.info("Section %s stops with %d file(s) not requested yet",
                             self.settings.name, self.tracker.queued)
            deadlines = [next_beat, requests.next_deadline()]
            if reading:
                deadlines += [self.tracker.next_deadline(), subscriptions.next_check()]
            timeout = max(0.0, min(d for d in deadlines if d is not None) - time.monotonic())
            ready = dict(poller.poll(int(timeout * 1000 + 0.999)))
            assert self._waker is not None
            self._waker.clear(ready)
            if reading:
                for provider, message in subscriptions.read(ready):
                    self._on_message(provider, message)
            requests.handle(ready)
            requests.expire()
            while not self._calls.empty():
                self._calls.get()()
            if reading:
                self.tracker.due()
                self._start_waiting()
                subscriptions.resubscribe_silent()
            if time.monotonic() >= next_beat:
                self.publisher.heartbeat(HEARTBEAT_INTERVAL)
                next_beat = time.monotonic() + HEARTBEAT_INTERVAL

    def _on_message(self, provider: Provider, message: Message) -> None:
        """Dispatch one received message (announcement, or another client's news)."""
        try:
            if message.type not in FILE_TYPES and message.type not in {"push", "ack"}:
                return
            key = file_key(message.data)
            if key is None:
                return
            if message.type == "push":
                self.tracker.peer_push(key)
                LOG.debug("Another client is transferring %s", key[0])
            elif message.type == "ack" or "request_address" not in message.data:
                self.tracker.peer_done(key)
                LOG.debug("Another client delivered %s", key[0])
            else:
                self._on_announcement(key, message)
        except Exception:  # one odd message must not stop the section
            LOG.exception("Cannot handle a %s message from %s", message.type, provider.address)

    def _on_announcement(self, key: FileKey, message: Message) -> None:
        action = self.tracker.announce(key, message)
        LOG.debug("Announcement of %s from %s: %s", key[0], message.data["request_address"],
                  action.value)
        if action is Action.ACK:
            self._ack(message)

    # -- transfers (the section's thread) ----------------------------------------------------------
    def _start_waiting(self) -> None:
        """Start queued transfers while fewer than ``workers`` pushes are in flight."""
        while self._active < self.settings.workers and (key := self.tracker.start_next()):
            self._active += 1
            self._request_next(key)

    def _request_next(self, key: FileKey) -> None:
        """Push-request ``key`` from its next announcer; end the transfer when none is left."""
        while (announcement := self.tracker.next_source(key)) is not None:
            try:
                self._push(key, announcement)
                return
            except DeliveryError as err:
                LOG.error("Cannot request %s: %s", key[0], err)
                break  # the same settings fail for every announcer
            except ValueError as err:
                LOG.error("Cannot request %s from %r: %s", key[0],
                          announcement.data.get("request_address"), err)
            except Exception:  # one odd announcement must not stop the section
                LOG.exception("Cannot request %s", key[0])
        self._finish(key, delivered=False)

    def _push(self, key: FileKey, announcement: Message) -> None:
        s = self.settings
        check_file_names(announcement.data)
        destination = Destination.parse(compose_destination(s.destination, announcement.data),
                                        s.ftp_root)
        local_dir = destination.local_directory()
        if s.create_target_directory and local_dir:
            self._ensure_directory(local_dir)
        request, public = push_request(announcement, destination, s.login, list(s.backup_targets))
        server = announcement.data["request_address"]
        assert self._requests is not None
        published = wire.encode(public)
        self._send(published)
        transfer = _Transfer(key, announcement, destination, local_dir, server,
                             time.monotonic())
        transfer.request = self._requests.send(
            server, published if request is public else request, s.transfer_req_timeout,
            lambda reply, error: self._on_push_reply(transfer, reply, error),
            grace=s.transfer_req_timeout, on_late=lambda: self._check_alive(transfer))

    def _check_alive(self, transfer: _Transfer) -> None:
        """A push got no reply in time: ping its server (its own socket) while waiting on."""
        s = self.settings
        LOG.warning("%s has not answered the push of %s within %g s; waiting up to %g s more "
                    "if it answers a ping", transfer.server, transfer.key[0],
                    s.transfer_req_timeout, s.transfer_req_timeout)
        ping = Message(transfer.announcement.subject, "ping", {})
        self._requests.send(transfer.server, ping, s.req_timeout,
                            lambda reply, error: self._on_ping(transfer, reply, error))

    def _on_ping(self, transfer: _Transfer, reply: Message | None,
                 error: RequestError | None) -> None:
        if reply is not None:
            transfer.server_alive = True
            LOG.info("%s is alive; still waiting for its reply to the push of %s",
                     transfer.server, transfer.key[0])
        elif transfer.request is not None and self._requests is not None and \
                self._requests.cancel(transfer.request):
            LOG.error("No transfer of %s from %s: no reply to the push nor to a ping (%s)",
                      transfer.key[0], transfer.server, error)
            self._request_next(transfer.key)

    def _on_push_reply(self, transfer: _Transfer, reply: Message | None,
                       error: RequestError | None) -> None:
        if reply is None and isinstance(error, RequestTimeout) and transfer.server_alive:
            # the server is alive and may still deliver it: asking another would deliver twice
            LOG.error("No transfer of %s: %s answers pings but not the push (%s); not asking "
                      "another server", transfer.key[0], transfer.server, error)
            self._finish(transfer.key, delivered=False)
            return
        if reply is None or reply.type not in FILE_TYPES:
            detail = error if reply is None else f"{reply.type} {reply.data}"
            LOG.error("No transfer of %s from %s: %s", transfer.key[0], transfer.server, detail)
            self._request_next(transfer.key)
            return
        if self._announced_by_peer(transfer):
            self._finish(transfer.key, delivered=True)
            return
        handed_over = delivered = False
        try:
            data = final_data(transfer.announcement, transfer.destination,
                              login=self.settings.login, reply=reply,
                              rewrites=self.settings.rewrites)
            if self._unpackers is not None:
                self._unpackers.submit(self._unpack_and_announce, transfer, data)
                handed_over = True
            else:
                self._announce(transfer, data)
                delivered = True
        except Exception:
            LOG.exception("%s was delivered by %s but cannot be announced", transfer.key[0],
                          transfer.server)
        finally:
            if handed_over:
                # the slot is free for the next push; the file stays in progress (never
                # requested again, another client's file message noticed) until announced
                self._active -= 1
                self._unpacking += 1
            else:
                self._finish(transfer.key, delivered)

    def _announced_by_peer(self, transfer: _Transfer) -> bool:
        """True (and only the ``ack`` sent) when another client announced the file meanwhile:
        both transferred it (a slow transfer the other took over); one announcement is enough."""
        if not self.tracker.peer_delivered(transfer.key):
            return False
        LOG.warning("%s was delivered and announced by another client meanwhile; not "
                    "announcing it again", transfer.key[0])
        self._send(wire.encode(ack_request(transfer.announcement)))
        return True

    def _finish(self, key: FileKey, delivered: bool) -> None:
        """End the transfer of ``key``: free the slot, ``ack`` the other announcers."""
        self._active -= 1
        self._settle(key, delivered)

    def _settle(self, key: FileKey, delivered: bool) -> None:
        """``key`` is no longer in progress: ``ack`` the other announcers if delivered."""
        for other in self.tracker.finish(key, delivered):
            self._ack(other)

    def _announce(self, transfer: _Transfer, data: dict[str, Any]) -> None:
        """Publish the ``ack`` and the final message of a delivered file (any thread).

        Both are built first and sent back to back: a client dying between them would leave a
        hot spare believing the file announced.
        """
        ack = wire.encode(ack_request(transfer.announcement))
        final = wire.encode(wire.message(transfer.announcement.subject, message_type(data), data))
        self._send(ack)
        self._send(final)
        LOG.info("Delivered %s from %s to %s in %.1f ms", transfer.key[0], transfer.server,
                 transfer.destination.public_url(), (time.monotonic() - transfer.started) * 1000)

    def _unpack_and_announce(self, transfer: _Transfer, data: dict[str, Any]) -> None:
        """Unpack a delivered file and announce what came out (an unpacker thread).

        The ``ack`` waits for the announcement, so that a hot spare takes over a client that
        dies while unpacking. A file that cannot be unpacked is acknowledged all the same (it
        was delivered; another client would fail alike) but not announced.
        """
        s = self.settings
        try:
            assert s.compression is not None
            data = unpack_files(data, s.compression, transfer.local_dir, transfer.destination,
                                login=s.login, delete=s.delete, prog=s.xritdecompressor)
        except (OSError, unpack.UnpackError) as err:
            LOG.error("Delivered %s but could not unpack it: %s", transfer.key[0], err)
            self._send(wire.encode(ack_request(transfer.announcement)))
        except Exception:
            LOG.exception("Delivered %s but could not unpack it", transfer.key[0])
            self._send(wire.encode(ack_request(transfer.announcement)))
        else:
            if not self._announced_by_peer(transfer):
                self._announce(transfer, data)
        finally:
            self._calls.put(lambda: self._unpacked(transfer.key))
            self._wake()

    def _unpacked(self, key: FileKey) -> None:
        self._unpacking -= 1
        self._settle(key, delivered=True)

    def _ensure_directory(self, path: str) -> None:
        """Create ``path`` unless it was seen recently; :class:`DeliveryError` when it cannot."""
        if path in self._directories:
            self._directories.move_to_end(path)
            return
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as err:
            raise DeliveryError(f"cannot create {path}: {err.strerror or err}") from None
        self._directories[path] = None
        if len(self._directories) > KNOWN_DIRECTORIES:
            self._directories.popitem(last=False)

    def _ack(self, announcement: Message) -> None:
        """Tell a server that this client has its file already."""
        server = announcement.data.get("request_address")
        uid = announcement.data.get("uid") or file_key(announcement.data)

        def done(reply: Message | None, error: RequestError | None) -> None:
            if reply is None:
                LOG.warning("No answer to ack of %s from %s: %s", uid, server, error)
            elif reply.type != "ack":
                LOG.warning("Server %s answered %s to ack of %s", server, reply.type, uid)
            else:
                LOG.debug("Sent ack for %s to %s", uid, server)

        assert self._requests is not None
        try:
            self._requests.send(str(server), ack_request(announcement), self.settings.req_timeout,
                                done)
        except ValueError as err:
            LOG.warning("Cannot ack %s to %r: %s", uid, server, err)

    def _publish(self, message: Message) -> None:
        self._send(wire.encode(message))

    def _send(self, text: str) -> None:
        publisher = self.publisher
        if publisher is not None:
            publisher.send(text)


@dataclass(eq=False)
class _Transfer:
    """One push request in flight."""

    key: FileKey
    announcement: Message
    destination: Destination
    local_dir: str | None
    server: str
    started: float
    request: PendingRequest | None = None  #: None once the request ended at once
    server_alive: bool = False  #: the server answered a ping while the push was late


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
        return ClientSection(ClientSettings.from_section(name, section), requesters,
                             on_death=runner.check_workers)

    runner = ServiceRunner(args.config_file, "client", make_section)
    try:
        runner.run()
    except ConfigError as err:
        LOG.error("%s", err)
        return 1
    finally:
        requesters.close()
    return 0
