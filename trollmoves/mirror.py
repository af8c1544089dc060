"""Trollmoves Mirror: relay one network's announcements and transfers to another network.

``move_it_mirror.py [-p PORT] [-v] [-l LOGFILE] [-c LOG_CONFIG] CONFIG`` (also
``trollmoves mirror``). A back-to-back client and server, one :class:`MirrorSection` per INI
section::

    upstream servers --announce--> client half --re-announce (own request_address)--> clients
    clients --push--> server half --push (staging dir)--> upstream --> staging --copy--> client

- Client half (``providers``, optionally ``host:port/topic``; ``client_topic``, default
  ``topic``, default everything): each announced file is re-announced at once on the mirror's
  publisher (``move_it_mirror`` on ``-p``, heartbeats ``/heartbeat/move_it_mirror``) under the
  upstream subject, with the section's ``info`` items and its own ``request_address``. The same
  file announced by several upstream servers is re-announced once; all of them are remembered
  as sources. With ``origin``, only files whose names match its file name pattern are relayed.
- Server half (``request_port``): a ``push`` fetches the file from its upstream sources in turn
  (a ``ping`` within ``req_timeout`` first, then a ``push`` to the staging directory
  ``destination`` within ``transfer_req_timeout``), once per file even when several clients ask
  at the same time, then copies the staged file to the requested destination through the copy
  engine and replies. A failed fetch is an ``err`` reply. The staged copy serves later pushes
  while it exists; with ``delete`` it is removed ``remove_delay`` seconds after a push or an
  ``ack``, and in any case ``staging_retention`` seconds after it was fetched (default 600;
  0 keeps it), so that the staging directory does not fill up. Other sources of a fetched file
  get an ``ack``, as a client sends them. A section's registry and staged copies outlive its
  reload; a section removed from the file takes them along (its staged copies are removed
  unless ``staging_retention`` is 0).

The sections run under :class:`trollmoves.service.ServiceRunner` (config edits and SIGHUP reload
changed sections, SIGTERM stops cleanly); requests are answered by the server's
:class:`~trollmoves.request_server.RequestServer`.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import posixpath
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import zmq
from posttroll.message import Message
from trollsift import globify

from trollmoves import announce, unpack
from trollmoves.client import ClientSettings
from trollmoves.config import ConfigError
from trollmoves.delivery import (
    DeliveryError,
    Destination,
    ack_request,
    compose_destination,
    map_files,
    push_request,
)
from trollmoves.hotspare import DEFAULT_CACHE_AGE, FileKey, file_key
from trollmoves.logs import add_logging_arguments, setup_logging
from trollmoves.messages import FILE_TYPES, iter_files
from trollmoves.requester import RequesterPool, RequestError
from trollmoves.served import SERVED_CAPACITY, RequestRefused
from trollmoves.server import (
    DEFAULT_PORT,
    PUBLISHER_GRACE,
    Section,
    Server,
    ServerContext,
    run_service,
    validate_sections,
)
from trollmoves.subscription import SubscriptionSet, Waker
from trollmoves.urls import redact_url

LOG = logging.getLogger(__name__)

NAME = "move_it_mirror"
#: Subscribed to when a section names neither ``client_topic`` nor ``topic``: everything.
ALL_TOPICS = "/"
#: Seconds a client waiting for another client's fetch waits beyond the fetch's own bound.
FOLLOWER_MARGIN = 1.0
#: Seconds a staged copy is kept after its fetch (``staging_retention``; 0: kept).
DEFAULT_STAGING_RETENTION = 600.0

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class FetchError(Exception):
    """A file that could not be fetched from upstream into staging."""


# -- single flight and staging --------------------------------------------------------------

class SingleFlight(Generic[K, T]):
    """Concurrent calls for one key share a single execution and its outcome.

    The first caller of :meth:`run` for a key runs ``func``; callers arriving while it runs wait
    (up to ``timeout`` seconds, then :class:`TimeoutError`) and get its result or its
    exception. A later call runs ``func`` again.
    """

    def __init__(self) -> None:
        self._flights: dict[K, Future[T]] = {}
        self._lock = threading.Lock()

    def in_flight(self, key: K) -> bool:
        """True while a call for ``key`` runs."""
        with self._lock:
            return key in self._flights

    def run(self, key: K, func: Callable[[], T], timeout: float | None = None) -> T:
        """``func()``, or the outcome of the call for ``key`` already running."""
        with self._lock:
            future = self._flights.get(key)
            leader = future is None
            if future is None:
                future = self._flights[key] = Future()
        if leader:
            try:
                future.set_result(func())
            except Exception as err:  # noqa: BLE001 - handed to every caller
                future.set_exception(err)
            finally:
                with self._lock:
                    del self._flights[key]
        else:
            LOG.debug("Waiting for the call in flight for %s", key)
        return future.result(timeout)


class Staging:
    """Upstream files in the staging directory, by file key: fetched at most once at a time,
    and reused while every staged file of a key still exists."""

    def __init__(self, capacity: int = SERVED_CAPACITY) -> None:
        self._flights: SingleFlight[FileKey, dict[str, str]] = SingleFlight()
        self._files: OrderedDict[FileKey, dict[str, str]] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def staged(self, key: FileKey) -> dict[str, str]:
        """``{upstream uri: staged path}`` of ``key`` when all its files are staged, else ``{}``."""
        with self._lock:
            files = dict(self._files.get(key, {}))
        return files if files and all(map(os.path.exists, files.values())) else {}

    def paths(self) -> list[str]:
        """Every staged path this staging area knows of (existing or not)."""
        with self._lock:
            return [path for files in self._files.values() for path in files.values()]

    def get(self, key: FileKey, fetch: Callable[[], dict[str, str]],
            timeout: float | None = None) -> dict[str, str]:
        """The staged files of ``key``; ``fetch()`` stages them unless they are there already
        or another thread is fetching them (then its outcome is shared, within ``timeout``)."""
        def fetch_once() -> dict[str, str]:
            files = self.staged(key)
            if files:
                return files
            files = fetch()
            with self._lock:
                self._files[key] = files
                self._files.move_to_end(key)
                if len(self._files) > self._capacity:
                    self._files.popitem(last=False)
            return files

        return self._flights.run(key, fetch_once, timeout)


# -- upstream announcements -------------------------------------------------------------------

@dataclass
class _Sources:
    messages: list[Message]
    since: float
    fetched: bool | None = None  #: outcome of the last fetch, None before the first


class Registry:
    """The upstream announcements of each file: whether to relay one, and where to fetch from.

    Holds at most ``capacity`` files, none announced longer than ``max_age`` seconds ago.
    """

    def __init__(self, capacity: int = SERVED_CAPACITY, max_age: float = DEFAULT_CACHE_AGE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.max_age = max_age
        self.clock = clock
        self._files: OrderedDict[FileKey, _Sources] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, key: FileKey, announcement: Message) -> bool:
        """Record an upstream announcement; True when the file is to be (re-)announced: it is
        new, or its last fetch failed. A source announcing again replaces its older message."""
        address = announcement.data.get("request_address")
        now = self.clock()
        with self._lock:
            self._expire(now)
            sources = self._files.get(key)
            if sources is None:
                self._files[key] = _Sources([announcement], now)
                return True
            known = [m.data.get("request_address") for m in sources.messages]
            if address in known:
                sources.messages[known.index(address)] = announcement
            else:
                sources.messages.append(announcement)
            relay = sources.fetched is False
            if relay:
                sources.fetched = None
            return relay

    def sources(self, key: FileKey) -> list[Message]:
        """The announcements of ``key``, first announcer first."""
        with self._lock:
            sources = self._files.get(key)
            return list(sources.messages) if sources is not None else []

    def settle(self, key: FileKey, fetched: bool) -> None:
        """Record the outcome of a fetch; the next announcement of a failed file is relayed."""
        with self._lock:
            sources = self._files.get(key)
            if sources is not None:
                sources.fetched = fetched

    def fetched(self, key: FileKey) -> bool:
        """True when the last fetch of ``key`` succeeded."""
        with self._lock:
            sources = self._files.get(key)
            return sources is not None and sources.fetched is True

    def __len__(self) -> int:
        with self._lock:
            return len(self._files)

    def _expire(self, now: float) -> None:
        while self._files:
            oldest = next(iter(self._files.values()))
            if len(self._files) < self.capacity and now - oldest.since <= self.max_age:
                break
            self._files.popitem(last=False)


# -- one section ------------------------------------------------------------------------------

def subscription_topic(section: Mapping[str, Any]) -> str:
    """What the client half subscribes to: ``client_topic``, else ``topic``, else all."""
    return str(section.get("client_topic") or section.get("topic") or ALL_TOPICS)


def staging_destination(template: str, data: Mapping[str, Any]) -> Destination:
    """The staging directory (``destination`` filled from the announcement) as a directory."""
    destination = Destination.parse(compose_destination(template, data))
    if not destination.path.endswith("/"):
        destination = replace(destination, path=destination.path + "/")
    return destination


def staged_name(item: Mapping[str, Any]) -> str:
    """Where a file lands inside the staging directory: its relative ``path`` when the
    announcement gives one (as servers place it), else the name of its ``uri``."""
    rel_path = item.get("path")
    if isinstance(rel_path, str) and rel_path:
        try:
            return unpack.safe_member_path(rel_path)
        except unpack.UnsafeArchiveError as err:
            raise FetchError(f"refused {item.get('uid')}: path {err}") from None
    return posixpath.basename(urlsplit(str(item.get("uri", ""))).path)


class MirrorSection(Section):
    """The worker of one mirror section: a client half relaying upstream announcements and a
    server half (the server's :class:`~trollmoves.server.Section` request handling) serving
    pushes from the staging directory."""

    def __init__(self, name: str, config: Mapping[str, Any], context: ServerContext,
                 requesters: RequesterPool, registry: Registry | None = None,
                 staging: Staging | None = None) -> None:
        topic = subscription_topic(config)
        super().__init__(name, {**config, "topic": config.get("topic") or topic}, context)
        if self.requests is None:
            raise ValueError(f"mirror section {name} needs request_port")
        self.client = ClientSettings.from_section(name, {**config, "topic": topic})
        self.compression = None  # files are relayed as they are
        self.requesters = requesters
        self.registry = Registry() if registry is None else registry
        self.staging = Staging() if staging is None else staging
        self.staging_retention = float(config.get("staging_retention",
                                                  DEFAULT_STAGING_RETENTION))
        origin = self.config.get("origin")
        self.name_filter = globify(posixpath.basename(origin)) if origin else None
        self._waker: Waker | None = None
        self._acks = ThreadPoolExecutor(1, thread_name_prefix=f"ack-{name}")

    # -- life cycle -------------------------------------------------------------------------
    def _start(self) -> None:
        assert self.requests is not None
        for key in ("compression", "publish_port"):
            if self.config.get(key):
                LOG.warning("%s: %s is not used by a mirror (it publishes on -p and relays "
                            "files as they are)", self.name, key)
        self.requests.start()
        self.remover.start()
        if self.staging_retention > 0:  # copies staged before a reload expire all the same
            for path in self.staging.paths():
                if os.path.exists(path):
                    self.remover.schedule(path, self.staging_retention)
        poller = zmq.Poller()
        subscriptions = SubscriptionSet(self.client.subscriptions(), poller,
                                        self.client.heartbeat_alarm_scale)
        self._waker = Waker(poller)
        self._spawn(lambda: self._relay_loop(poller, subscriptions), "relay")

    def stop(self) -> None:
        """Stop relaying and reading requests (transfers in flight go on until :meth:`join`)."""
        super().stop()
        if self._waker is not None:
            self._waker.wake()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the transfers in flight and the last acks to upstream."""
        super().join(timeout)
        self._acks.shutdown(wait=True)

    # -- client half ------------------------------------------------------------------------
    def _relay_loop(self, poller: zmq.Poller, subscriptions: SubscriptionSet) -> None:
        waker = self._waker
        assert waker is not None
        try:
            self.ctx.wait_for_subscribers(self._stopping)
            while not self._stopping.is_set():
                check = subscriptions.next_check()
                millis = None if check is None else max(
                    0, int((check - time.monotonic()) * 1000 + 0.999))
                ready = dict(poller.poll(millis))
                waker.clear(ready)
                for _provider, message in subscriptions.read(ready):
                    try:
                        self.on_upstream(message)
                    except Exception:  # one odd announcement must not stop the relay
                        LOG.exception("%s: could not relay %s %s", self.name, message.type,
                                      message.subject)
                subscriptions.resubscribe_silent()
        except Exception:
            LOG.exception("%s: stopped relaying announcements", self.name)
        finally:
            subscriptions.close()
            waker.close()

    def on_upstream(self, message: Message) -> None:
        """Re-announce a new upstream file with this mirror's ``request_address``."""
        data = message.data
        if message.type not in FILE_TYPES or not isinstance(data, dict) or not isinstance(
                data.get("request_address"), str):
            return  # heartbeats, other clients' news, stand-alone announcements
        key = file_key(data)
        if key is None:
            return
        if self.name_filter and not all(fnmatch.fnmatch(uid, self.name_filter) for uid in key):
            LOG.debug("%s: not relaying %s: does not match origin", self.name, key[0])
            return
        if not self.registry.add(key, message):
            LOG.debug("%s: %s from %s is announced already", self.name, key[0],
                      data["request_address"])
            if self.registry.fetched(key):  # this mirror has the file: as a client would
                self._acks.submit(self._ack_upstream, message)
            return
        self.ctx.remember(message.subject, key)
        self.ctx.publish(Message(message.subject, message.type,
                                 announce.relay_info(self.config, data)))
        LOG.debug("%s: announced %s from %s", self.name, key[0], data["request_address"])

    # -- server half ------------------------------------------------------------------------
    def push(self, message: Message) -> Message:
        """Stage the requested file(s) from upstream, then copy them to the destination."""
        data = message.data
        key = file_key(data)
        if key is None or not isinstance(data, Mapping):
            raise RequestRefused("a push needs the announcement data (uid) and a destination")
        if not data.get("destination"):
            raise RequestRefused("a push needs a destination")
        try:
            staged = self.stage(key)
        except FetchError as err:
            LOG.error("%s: %s", self.name, err)
            return announce.error_reply(message.subject, redact_url(str(err)))

        def from_staging(item: dict[str, Any]) -> dict[str, Any]:
            if item.get("uri") not in staged:
                raise RequestRefused(f"{item.get('uri')} is not a file this mirror announced")
            return {**item, "uri": staged[item["uri"]]}

        return super().push(Message(message.subject, message.type, map_files(data, from_staging)))

    def ack(self, message: Message) -> Message:
        """A client has the file(s): with ``delete``, the staged copies go after the delay."""
        key = file_key(message.data)
        if key is not None:
            self._after_delivery(self.staging.staged(key).values())
        return announce.ack_reply(message)

    def stage(self, key: FileKey) -> dict[str, str]:
        """``{upstream uri: staged path}`` of ``key``: staged already, or fetched now (once for
        all the clients asking at the same time). Raises :class:`FetchError`, or
        :class:`~trollmoves.served.RequestRefused` for a file this mirror did not announce."""
        sources = self.registry.sources(key)
        if not sources:
            raise RequestRefused(f"{key[0]} was not announced by this mirror")
        s = self.client
        bound = len(sources) * (s.req_timeout + s.transfer_req_timeout) + FOLLOWER_MARGIN
        try:
            staged = self.staging.get(key, lambda: self._fetch(key, sources), bound)
        except TimeoutError:
            raise FetchError(f"the fetch of {key[0]} in flight did not end within {bound:g} s"
                             ) from None
        for path in staged.values():
            self.served.add(path)
        return staged

    def _fetch(self, key: FileKey, sources: list[Message]) -> dict[str, str]:
        problems = []
        for announcement in sources:
            address = announcement.data["request_address"]
            started = time.monotonic()
            try:
                staged = self._fetch_from(announcement)
            except (FetchError, RequestError, DeliveryError, ValueError, OSError) as err:
                LOG.warning("%s: no %s from %s: %s", self.name, key[0], address, err)
                problems.append(f"{address}: {err}")
                continue
            LOG.info("%s: fetched %s from %s into staging in %.1f ms", self.name, key[0],
                     address, (time.monotonic() - started) * 1000)
            if self.staging_retention > 0:
                for path in staged.values():
                    self.remover.schedule(path, self.staging_retention)
            self.registry.settle(key, fetched=True)
            for other in self.registry.sources(key):  # also those announced meanwhile
                if other is not announcement:
                    self._acks.submit(self._ack_upstream, other)
            return staged
        self.registry.settle(key, fetched=False)
        raise FetchError(f"cannot fetch {key[0]} from upstream: {'; '.join(problems)}")

    def _fetch_from(self, announcement: Message) -> dict[str, str]:
        """Ask one upstream server to push its file(s) into staging."""
        s = self.client
        address = announcement.data["request_address"]
        pong = self.requesters.request(address, Message(announcement.subject, "ping"),
                                       s.req_timeout)
        if pong.type != "pong":
            raise FetchError(f"answered {pong.type} to ping")
        destination = staging_destination(s.destination, announcement.data)
        local_dir = destination.local_directory(s.ftp_root)
        if local_dir is None:
            raise FetchError(f"staging {destination.public_url()} is not on this machine")
        staged = {item["uri"]: os.path.join(local_dir, staged_name(item))
                  for item in iter_files(announcement.data) if item.get("uri")}
        os.makedirs(local_dir, exist_ok=True)
        request, _ = push_request(announcement, destination, s.login)
        reply = self.requesters.request(address, request, s.transfer_req_timeout)
        if reply.type not in FILE_TYPES:
            raise FetchError(f"{reply.type}: {reply.data}")
        missing = [path for path in staged.values() if not os.path.exists(path)]
        if missing:
            raise FetchError(f"sent, but {missing[0]} is not in staging")
        return staged

    def _ack_upstream(self, announcement: Message) -> None:
        address = announcement.data["request_address"]
        try:
            reply = self.requesters.request(address, ack_request(announcement),
                                            self.client.req_timeout)
        except (RequestError, ValueError) as err:
            LOG.warning("%s: no answer to ack of %s from %s: %s", self.name,
                        announcement.data.get("uid"), address, err)
            return
        LOG.debug("%s: %s answered %s to ack of %s", self.name, address, reply.type,
                  announcement.data.get("uid"))


def validate_mirror(path: str, sections: Mapping[str, Mapping[str, Any]]) -> None:
    """Whole-file checks: the server's, plus a request port and a staging directory on this
    machine for every section."""
    validate_sections(path, sections)
    for name, section in sections.items():
        if section.get("request_port") is None:
            raise ConfigError(path, name, "request_port",
                              "a mirror section needs the port its clients request files on")
        try:
            staging = Destination.parse(str(section["destination"]))
        except DeliveryError as err:
            raise ConfigError(path, name, "destination", str(err)) from None
        if staging.local_directory(section.get("ftp_root")) is None:
            raise ConfigError(path, name, "destination",
                              "the staging directory must be on this machine")


# -- the program ---------------------------------------------------------------------------

class Mirror(Server):
    """The whole mirror: the server's publisher, heartbeat and section runner, with mirror
    sections sharing one pool of requesters to the upstream servers."""

    name = NAME
    kind = "mirror"
    validate = staticmethod(validate_mirror)

    def __init__(self, config_path: str, *, port: int = DEFAULT_PORT,
                 grace: float = PUBLISHER_GRACE) -> None:
        self.requesters = RequesterPool()
        # what a section knows outlives its reload: files announced before a config edit
        # can still be requested after it
        self._registries: dict[str, Registry] = {}
        self._staging: dict[str, Staging] = {}
        super().__init__(config_path, port=port, backlog=False, grace=grace)
        self.runner.on_removed = self._forget_section

    def _forget_section(self, name: str, config: Mapping[str, Any]) -> None:
        """A section was removed from the file: drop its registry, and its staged copies
        unless it kept them (``staging_retention = 0``); no client can ask for them now."""
        self._registries.pop(name, None)
        staging = self._staging.pop(name, None)
        if staging is None or not float(config.get("staging_retention",
                                                   DEFAULT_STAGING_RETENTION)) > 0:
            return
        removed = 0
        for path in staging.paths():
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as err:
                LOG.warning("%s: cannot remove the staged copy %s: %s", name, path, err)
        LOG.info("%s: section removed; %d staged cop%s removed", name, removed,
                 "y" if removed == 1 else "ies")

    def _make_section(self, name: str, config: dict[str, Any]) -> MirrorSection:
        assert self.context is not None
        return MirrorSection(name, config, self.context, self.requesters,
                             self._registries.setdefault(name, Registry()),
                             self._staging.setdefault(name, Staging()))

    def run(self) -> None:
        """Publish, start the sections and serve until SIGTERM/SIGINT."""
        try:
            super().run()
        finally:
            self.requesters.close()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The trollmoves 0.19 command line of ``move_it_mirror.py``."""
    parser = argparse.ArgumentParser(prog="move_it_mirror.py", description=(
        "Relay announcements and transfers between networks."))
    parser.add_argument("config_file", metavar="CONFIG", help="the INI configuration file")
    parser.add_argument("-p", "--port", type=int, default=DEFAULT_PORT,
                        help=f"port to publish on (default {DEFAULT_PORT}; 0: any free port)")
    add_logging_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the mirror; exit status 1 when the configuration cannot be used."""
    args = parse_args(argv)
    setup_logging(args)
    return run_service(Mirror(args.config_file, port=args.port), args, "move_it_mirror.py")


if __name__ == "__main__":
    sys.exit(main())
