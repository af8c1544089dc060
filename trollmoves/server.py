"""Trollmoves Server: announce the files arriving in watched directories and serve requests.

``move_it_server.py [-p PORT] [--disable-backlog] [-w] [-v] [-l LOGFILE] [-c LOG_CONFIG] CONFIG``

One publisher (``move_it_server`` on ``-p``, 9010 by default, heartbeats every 30 s) is shared
by every section of the INI file. Each section is a :class:`Section` worker:

- ``origin`` sections watch a trollsift pattern (:mod:`trollmoves.watch`); ``listen`` sections
  relay posttroll messages about local files. Files go through a queue to one announcer thread
  which optionally unpacks them (``compression``) and publishes the announcement; once the
  files found at start are announced, files that need no unpacking are announced on the
  watcher's thread itself (no hand-off per file).
- With ``request_port``, a :class:`~trollmoves.request_server.RequestServer` answers ``push``
  (copy through the engine to the requested destination), ``ack``, ``ping``, ``info``; anything
  else gets ``unknown`` and malformed input gets ``err`` (or, past a hard size limit, is dropped
  by ZeroMQ). A push is served only for a file this section announced, or one matching its full
  ``origin`` once ``..`` and links are resolved (:mod:`trollmoves.served`).
- Without ``request_port`` (stand-alone) no request socket is opened: announcements carry the
  fsspec filesystem (``filesystem__*`` keys; default SSH to this host) that consumers read the
  file through, and with ``unpack = tar``/``zip`` an archive is announced as a ``dataset`` of its
  members, each reachable through a chained filesystem (``tar://member::ssh://host/archive``).
- Files are removed (:mod:`trollmoves.removal`) ``remove_delay`` seconds after a push or ack
  when ``delete`` is set (and unpacked copies always); unpacked copies nobody asks for go after
  ``unpacked_retention``.

The sections run under :class:`trollmoves.service.ServiceRunner`: config edits and SIGHUP
reload only the changed sections, SIGTERM finishes the transfers in flight and stops.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import posixpath
import queue
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import zmq
from posttroll.message import Message
from posttroll.publisher import Publisher
from posttroll.subscriber import create_subscriber_from_dict_config

from trollmoves import announce, unpack, wire
from trollmoves.config import ConfigError
from trollmoves.errors import TransferError
from trollmoves.logs import add_logging_arguments, setup_logging
from trollmoves.messages import iter_files, local_path
from trollmoves.removal import DelayedRemover, remove_file
from trollmoves.request_server import RequestServer
from trollmoves.served import RequestRefused, ServedFiles
from trollmoves.service import ServiceRunner
from trollmoves.transfer import RetryPolicy, interrupt_retries, transfer
from trollmoves.urls import LOCAL_SCHEMES
from trollmoves.watch import DEFAULT_POLL_INTERVAL, OriginPattern, OriginWatcher

LOG = logging.getLogger(__name__)

NAME = "move_it_server"
DEFAULT_PORT = 9010
HEARTBEAT_INTERVAL = 30.0
#: Seconds subscribers get to (re)connect to a freshly started publisher before the backlog.
PUBLISHER_GRACE = 1.0
DEFAULT_REMOVE_DELAY = 30.0
#: Seconds a requester waits for a push reply (``transfer_req_timeout``, as clients default).
DEFAULT_TRANSFER_REQ_TIMEOUT = 10.0
#: Share of ``transfer_req_timeout`` the copy engine may spend retrying a failing push, so
#: the reply (``err``) still reaches the requester before it gives up.
RETRY_SHARE = 0.5
#: Seconds an unpacked copy nobody requested is kept (``unpacked_retention``).
DEFAULT_UNPACKED_RETENTION = 600.0
#: ``topic/uid`` entries kept for ``info`` replies (as trollmoves 0.19).
FILE_CACHE_SIZE = 61000
#: Largest ``max_count`` an ``info`` reply honours.
MAX_INFO_COUNT = 2256
#: Keys trollmoves 0.19 still accepts outside ``connection_parameters``.
LEGACY_CONNECTION_KEYS = ("connection_uptime", "ssh_key_filename", "ssh_connection_timeout",
                          "ssh_private_key_file")
#: Seconds the request loop of a listen section waits before checking for a stop.
LISTEN_TIMEOUT = 0.5


# -- shared by all sections ----------------------------------------------------------------

class ServerContext:
    """What the sections of one server share: publisher, file cache, command-line options,
    and ``on_death``, called when a section stops working on its own (the runner restarts it).
    """

    def __init__(self, publisher: Any, *, backlog: bool = True, polling: bool = False,
                 grace: float = PUBLISHER_GRACE,
                 on_death: Callable[[], None] = lambda: None) -> None:
        self.publisher = publisher
        self.backlog = backlog
        self.polling = polling
        self.on_death = on_death
        self.started = dt.datetime.now(dt.UTC)
        self._ready_at = time.monotonic() + grace
        self._cache: deque[str] = deque(maxlen=FILE_CACHE_SIZE)
        self._cache_lock = threading.Lock()

    def publish(self, message: Message) -> None:
        """Send a message on the shared publisher (thread-safe)."""
        self.publisher.send(wire.encode(message))

    def wait_for_subscribers(self, stop: threading.Event) -> None:
        """Give subscribers time to (re)connect after the publisher started.

        A bounded wait on the ``stop`` event (a stop ends it at once), not an event-driven one
        on purpose: a PUB socket cannot know how many subscribers will come back, and a
        subscriber receives only what is sent after its SUBSCRIBE arrived, some time after the
        connection was accepted. Ending the wait at the first EVENT_ACCEPTED would hand the
        backlog to at most that one subscriber and drop it for the others.
        """
        remaining = self._ready_at - time.monotonic()
        if remaining > 0:
            stop.wait(remaining)

    def remember(self, topic: str, uids: Iterable[str]) -> None:
        """Record announced files for ``info`` replies."""
        with self._cache_lock:
            self._cache.extendleft(f"{topic}/{uid}" for uid in uids)

    def cached(self, subject: str, max_count: int) -> list[str]:
        """The most recent ``topic/uid`` entries starting with ``subject``."""
        files = []
        with self._cache_lock:
            for entry in self._cache:
                if entry.startswith(subject):
                    files.append(entry)
                    if len(files) >= max_count:
                        break
        return files

    @property
    def uptime(self) -> dt.timedelta:
        """Time since the server started."""
        return dt.datetime.now(dt.UTC) - self.started


class Heartbeat(threading.Thread):
    """Publish ``beat`` messages on ``/heartbeat/<name>`` every ``interval`` seconds.

    The first beat comes ``first_after`` seconds after the start, once subscribers that were
    waiting for the publisher have had time to connect: they learn at once that it is back.
    """

    def __init__(self, publish: Callable[[Message], None], name: str,
                 interval: float = HEARTBEAT_INTERVAL, first_after: float = 0.0) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.publish = publish
        self.subject = f"/heartbeat/{name}"
        self.interval = interval
        self.first_after = first_after
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Beat every interval until stopped."""
        if self._stop_event.wait(self.first_after):
            return
        while True:
            try:
                self.publish(Message(self.subject, "beat", {"min_interval": int(self.interval)}))
            except zmq.ZMQError as err:
                LOG.warning("Heartbeat not sent: %s", err)
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> None:
        """Stop beating."""
        self._stop_event.set()


# -- one section -------------------------------------------------------------------------------

class Section:
    """The worker of one server section: announce files, serve requests, remove files."""

    def __init__(self, name: str, config: Mapping[str, Any], context: ServerContext) -> None:
        self.name = name
        self.config = dict(config)
        self.ctx = context
        self.topic: str = self.config["topic"]
        self.connection = connection_parameters(self.config)
        self.compression = _compression(self.config)
        self.working_directory = self.config.get("working_directory") or tempfile.gettempdir()
        self.delete = bool(self.config.get("delete", False))
        self.remove_delay = float(self.config.get("remove_delay", DEFAULT_REMOVE_DELAY))
        self.retention = float(self.config.get("unpacked_retention", DEFAULT_UNPACKED_RETENTION))
        self.transfer_req_timeout = float(self.config.get("transfer_req_timeout",
                                                          DEFAULT_TRANSFER_REQ_TIMEOUT))
        self.retry = RetryPolicy(budget=self.transfer_req_timeout * RETRY_SHARE)
        self.station = self.config.get("station")
        self.pattern: OriginPattern | None = None
        if "origin" in self.config:
            skip = self.config.get("origin_inotify_base_dir_skip_levels")
            self.pattern = OriginPattern(self.config["origin"], skip)
        self.served = ServedFiles(name, self.pattern)
        self._queue: queue.SimpleQueue[tuple[str, dict[str, Any]] | None] = queue.SimpleQueue()
        self._direct = False  # files are announced on the watcher's thread (see _enqueue)
        self._handoff = threading.Lock()
        self._stopping = threading.Event()
        self._failure: str | None = None  # what stopped working on its own
        self._threads: list[threading.Thread] = []
        self.remover = DelayedRemover(name)
        self.watcher: OriginWatcher | None = None
        self.requests: RequestServer | None = None
        #: stand-alone ``unpack``: archives are announced member by member, not extracted
        self.archive_kind: str | None = None
        if self.config.get("request_port") is not None:
            self.requests = RequestServer(name, int(self.config["request_port"]), self.handle,
                                          lambda message: message.type == "push",
                                          expire_after=self.transfer_req_timeout,
                                          on_death=lambda: self._died("request loop"))
        else:
            self.archive_kind = self.config.get("unpack") or None

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Bind the request port, then start announcing; on failure nothing is left running."""
        try:
            self._start()
        except BaseException:
            self.stop()
            self.join()
            raise

    def _start(self) -> None:
        if self.requests is not None:
            self.requests.start()
        if self.compression:
            os.makedirs(self.working_directory, exist_ok=True)
        self.remover.start()
        self._spawn(self._announce_loop, "announcer")
        if self.pattern is not None:
            self.watcher = OriginWatcher(
                self.config["origin"], self._enqueue, polling=self.ctx.polling,
                backlog=self.ctx.backlog, name=self.name,
                poll_interval=float(self.config.get("watchdog_timeout", DEFAULT_POLL_INTERVAL)),
                skip_levels=self.config.get("origin_inotify_base_dir_skip_levels"))
            self.watcher.start()
        else:
            self._spawn(self._listen, "listener")

    def stop(self) -> None:
        """Stop watching and reading requests; queued files are still announced."""
        self._stopping.set()
        if self.watcher is not None:
            self.watcher.stop()
        self._queue.put(None)
        if self.requests is not None:
            self.requests.stop()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the announcements and transfers in flight, then stop removing files."""
        if self.watcher is not None:
            self.watcher.join(timeout)
        for thread in self._threads:
            thread.join(timeout)
        if self.requests is not None:
            self.requests.join(timeout)
        self.remover.stop()
        self.remover.join(timeout)

    def alive(self) -> bool:
        """False once a thread of the section died: it no longer does its job."""
        return self._failure is None

    def _died(self, what: str) -> None:
        """A thread ended while the section was not stopping: say so, and tell the runner."""
        if self._stopping.is_set():
            return
        self._failure = what
        LOG.error("%s: the %s stopped; the section no longer works", self.name, what)
        self.ctx.on_death()

    def _spawn(self, target: Callable[[], None], what: str) -> None:
        """Run ``target`` on a thread of its own; its end before a stop is a death."""
        def run() -> None:
            try:
                target()
            except Exception:  # reported as the section's death below
                LOG.exception("%s: the %s failed", self.name, what)
            finally:
                self._died(what)

        thread = threading.Thread(target=run, name=f"{what}-{self.name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- announcing -------------------------------------------------------------------------
    def _enqueue(self, path: str, fields: dict[str, Any]) -> None:
        """The watcher's sink. Once the announcer has handed over (see :meth:`_announce_loop`)
        the file is announced at once on the watcher's thread, without a thread hand-off;
        until then it is queued for the announcer."""
        with self._handoff:
            if not self._direct:
                self._queue.put((path, fields))
                return
        self._announce_safely(path, fields)

    def _announce_loop(self) -> None:
        """Announce the queued files once subscribers had time to connect. When announcing is
        quick (no unpacking, no archive to list), hand over to the watcher's thread as soon as
        the queue is empty: the files queued so far are announced first, in order."""
        self.ctx.wait_for_subscribers(self._stopping)
        quick = not self.compression and not self.archive_kind
        while True:
            if quick and not self._direct:
                with self._handoff:
                    self._direct = self._queue.empty()
            item = self._queue.get()
            if item is None:
                return
            self._announce_safely(*item)

    def _announce_safely(self, path: str, fields: dict[str, Any]) -> None:
        try:
            self.announce(path, fields)
        except Exception:  # one file must not stop the others
            LOG.exception("%s: cannot announce %s", self.name, path)

    def announce(self, path: str, fields: Mapping[str, Any]) -> None:
        """Unpack ``path`` if configured, then announce what is to be served."""
        served, created = self._unpacked(path)
        for target in served:
            if self.archive_kind and self._announce_members(target, fields):
                continue
            info = announce.announcement_info(self.config, target, fields)
            self.served.add(target, created=created)
            self.ctx.remember(self.topic, [info["uid"]])
            self.ctx.publish(wire.message(self.topic, "file", info))
            LOG.debug("%s: announced %s", self.name, target)

    def _announce_members(self, path: str, fields: Mapping[str, Any]) -> bool:
        """Announce the members of an archive as a ``dataset``; False: announce it as a file."""
        assert self.archive_kind is not None
        try:
            members = announce.archive_members(self.archive_kind, path)
        except unpack.UnsafeArchiveError as err:
            LOG.error("%s: %s; not announced", self.name, err)
            return True
        except unpack.UnpackError as err:
            LOG.error("%s: %s; announcing it as it is", self.name, err)
            return False
        if not members:
            LOG.warning("%s: %s holds no file; not announced", self.name, path)
            return True
        info = announce.dataset_info(self.config, path, members, fields)
        self.ctx.remember(self.topic, [item["uid"] for item in info["dataset"]])
        self.ctx.publish(wire.message(self.topic, "dataset", info))
        LOG.debug("%s: announced the %d member(s) of %s", self.name, len(members), path)
        return True

    def _unpacked(self, path: str) -> tuple[list[str], bool]:
        """The files to announce for ``path``, and whether this server created them."""
        if not self.compression:
            return [path], False
        try:
            outputs = unpack.unpack(self.compression, path, self.working_directory,
                                    prog=self.config.get("prog"))
        except unpack.UnsafeArchiveError as err:
            LOG.error("%s: %s; not announced", self.name, err)
            return [], False
        except unpack.UnpackError as err:
            LOG.error("%s: %s; announcing it as it is", self.name, err)
            return [path], False
        if outputs == [path]:  # not a file of that compression
            return outputs, False
        if self.delete:
            remove_file(path, self.name)
        for output in outputs:
            self.remover.schedule(output, self.retention)
        return outputs, True

    def _listen(self) -> None:
        settings = {"topics": [self.config["listen"]], "addresses": self.config.get("addresses"),
                    "services": self.config.get("services", ""), "addr_listener": True,
                    "nameserver": self.config.get("nameserver")}
        try:
            subscriber = create_subscriber_from_dict_config(settings)
        except Exception:  # the section stays up, saying why
            LOG.exception("%s: cannot subscribe to %s", self.name, self.config["listen"])
            return
        LOG.info("%s: relaying %s", self.name, self.config["listen"])
        try:
            for message in subscriber.recv(timeout=LISTEN_TIMEOUT):
                if self._stopping.is_set():
                    break
                if message is not None:
                    self.relay(message)
        finally:
            subscriber.stop()

    def relay(self, message: Message) -> None:
        """Announce again, under this section's topic, a message about local files."""
        paths = [local_path(item) for item in iter_files(message.data)]
        if not paths or None in paths:
            LOG.debug("%s: not relaying %s: not about local files", self.name, message.subject)
            return
        info = announce.relay_info(self.config, message.data)
        for path in paths:
            self.served.add(str(path))
        self.ctx.remember(self.topic, [i["uid"] for i in iter_files(info) if "uid" in i])
        self.ctx.publish(wire.message(self.topic, message.type, info))

    # -- requests ---------------------------------------------------------------------------
    def handle(self, message: Message) -> Message:
        """Answer one request."""
        handler = {"push": self.push, "ack": self.ack, "ping": self.ping,
                   "info": self.info}.get(message.type, announce.unknown_reply)
        try:
            return handler(message)
        except RequestRefused as err:
            LOG.warning("%s: refused %s request: %s", self.name, message.type, err)
            return announce.error_reply(message.subject, str(err))

    def ping(self, message: Message) -> Message:
        """``pong`` with the station name."""
        return announce.pong(message, self.station)

    def info(self, message: Message) -> Message:
        """The files announced recently under the request's subject."""
        max_count = MAX_INFO_COUNT
        data = message.data
        if isinstance(data, Mapping) and isinstance(data.get("max_count"), int):
            max_count = max(0, min(data["max_count"], MAX_INFO_COUNT))
        files = self.ctx.cached(message.subject, max_count)
        return announce.info_reply(message, files, max_count, self.ctx.uptime)

    def push(self, message: Message) -> Message:
        """Copy the requested file(s) to the destination, then reply."""
        data = message.data
        if not isinstance(data, Mapping):
            raise RequestRefused("a push needs the announcement data and a destination")
        destination = data.get("destination")
        if not isinstance(destination, str) or not destination:
            raise RequestRefused("a push needs a destination")
        items = [(self.served.check(item.get("uri")), item.get("path"))
                 for item in self._files(data)]
        backup_hosts = data.get("backup_targets")
        if isinstance(backup_hosts, str):
            backup_hosts = backup_hosts.split()
        for path, rel_path in items:
            target = destination_for(destination, rel_path)
            try:
                result = transfer(path, target, backup_hosts=backup_hosts, retry=self.retry,
                                  **self.connection)
            except TransferError as err:
                LOG.error("%s: push of %s failed: %s", self.name, path, err)
                return announce.error_reply(message.subject, str(err))
            LOG.info("%s: sent %s to %s", self.name, path, result.dst)
        self._after_delivery(path for path, _ in items)
        return announce.push_reply(message)

    def ack(self, message: Message) -> Message:
        """The requester has the file(s) already: they may now be removed."""
        data = message.data if isinstance(message.data, Mapping) else {}
        paths = [self.served.check(item.get("uri")) for item in self._files(data)]
        self._after_delivery(paths)
        return announce.ack_reply(message)

    def _files(self, data: Mapping[str, Any]) -> list[dict[str, Any]]:
        items = [item for item in iter_files(data) if item.get("uri")]
        if not items:
            raise RequestRefused("no file (uri) in the request")
        return items

    def _after_delivery(self, paths: Iterable[str]) -> None:
        """Remove delivered files after ``remove_delay`` (with none, at once on this thread):
        with ``delete`` all of them, else only the copies this server unpacked (originals it
        did not unpack stay)."""
        for path in paths:
            created = self.served.created(path)
            if created or self.delete:
                if self.remove_delay <= 0 and not created:  # at once, without a thread hand-off
                    remove_file(path, self.name)
                else:  # an unpacked copy's removal is scheduled already: it may come earlier
                    self.remover.schedule(path, self.remove_delay)


def _compression(config: Mapping[str, Any]) -> str | None:
    value = config.get("compression")
    if value in (None, False, "", "false", "False"):
        return None
    return str(value)


def connection_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """The copy engine's options of a section (legacy top-level keys folded in)."""
    params = dict(config.get("connection_parameters") or {})
    for key in LEGACY_CONNECTION_KEYS:
        if key in config:
            params.setdefault(key, config[key])
    return params


def destination_for(destination: str, rel_path: Any = None) -> str:
    """The URL a file is copied to: ``destination``, plus the request's relative ``path``.

    A local destination naming an existing directory gets a trailing ``/`` (the file keeps its
    name), as trollmoves 0.19 did.
    """
    parts = urlsplit(destination)
    path = parts.path
    if isinstance(rel_path, str) and rel_path:
        path = posixpath.join(path, rel_path)
    local = parts.scheme.lower() in LOCAL_SCHEMES
    if local and not path.endswith("/") and os.path.isdir(path):
        path += "/"
    if not parts.scheme:
        return path
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


def validate_sections(path: str, sections: Mapping[str, Mapping[str, Any]]) -> None:
    """Whole-file checks: valid patterns, one section per request port, known unpackers, no
    secret among the public filesystem options of stand-alone sections."""
    ports: dict[int, str] = {}
    for name, section in sections.items():
        secrets = announce.secret_options(section.get("filesystem"))
        if secrets:
            raise ConfigError(path, name, f"filesystem__{secrets[0]}",
                              "passwords, secret keys and key contents are never announced; "
                              "give the consumers theirs in their own configuration")
        if "origin" in section:
            try:
                OriginPattern(section["origin"])
            except ValueError as err:
                raise ConfigError(path, name, "origin", f"invalid pattern: {err}") from None
        port = section.get("request_port")
        if port is not None:
            if port in ports:
                raise ConfigError(path, name, "request_port",
                                  f"port {port} is already used by section {ports[port]}")
            ports[port] = name
        compression = _compression(section)
        if compression:
            try:
                unpack.get(compression)
            except unpack.UnpackError as err:
                raise ConfigError(path, name, "compression", str(err)) from None
            if unpack.get(compression).name == "xrit" and not section.get("prog"):
                raise ConfigError(path, name, "prog",
                                  "compression = xrit needs prog (the xRITDecompress program)")


# -- the program ---------------------------------------------------------------------------

class Server:
    """The whole server: publisher, heartbeat and the section runner.

    Subclasses (the mirror) change the publisher ``name``, the config ``kind``, the whole-file
    ``validate`` check and :meth:`_make_section`.
    """

    name = NAME
    kind = "server"
    validate = staticmethod(validate_sections)

    def __init__(self, config_path: str, *, port: int = DEFAULT_PORT, backlog: bool = True,
                 polling: bool = False, grace: float = PUBLISHER_GRACE) -> None:
        self.config_path = config_path
        self.port = port
        self.backlog = backlog
        self.polling = polling
        self.grace = grace
        self.context: ServerContext | None = None
        self.runner = ServiceRunner(config_path, self.kind, self._make_section,
                                    validate=self.validate, on_stop=interrupt_retries)

    def _make_section(self, name: str, config: dict[str, Any]) -> Section:
        assert self.context is not None
        return Section(name, config, self.context)

    def run(self) -> None:
        """Publish, start the sections and serve until SIGTERM/SIGINT."""
        publisher = Publisher(f"tcp://*:{self.port}", name=self.name)
        publisher.start()
        self.context = ServerContext(publisher, backlog=self.backlog, polling=self.polling,
                                     grace=self.grace, on_death=self.runner.check_workers)
        heartbeat = Heartbeat(self.context.publish, self.name, first_after=self.grace)
        heartbeat.start()
        try:
            self.runner.start()
            LOG.info("%s ready: %d section(s), publishing on port %d", self.name,
                     len(self.runner.workers), publisher.port_number)
            self.runner.run()
        finally:
            heartbeat.stop()
            heartbeat.join()
            publisher.stop()
            LOG.info("%s stopped", self.name)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The trollmoves 0.19 command line of ``move_it_server.py``."""
    parser = argparse.ArgumentParser(prog="move_it_server.py", description=(
        "Announce the files arriving in watched directories and serve transfer requests."))
    parser.add_argument("config_file", metavar="CONFIG", help="the INI configuration file")
    parser.add_argument("-p", "--port", type=int, default=DEFAULT_PORT,
                        help=f"port to publish on (default {DEFAULT_PORT}; 0: any free port)")
    parser.add_argument("--disable-backlog", action="store_true",
                        help="do not announce the files already there at start")
    parser.add_argument("-w", "--watchdog", action="store_true",
                        help="poll the directories instead of using inotify")
    add_logging_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server; exit status 1 when the configuration cannot be used."""
    args = parse_args(argv)
    setup_logging(args)
    logging.getLogger("watchdog").setLevel(logging.INFO)  # a debug line per inotify event
    server = Server(args.config_file, port=args.port, backlog=not args.disable_backlog,
                    polling=args.watchdog)
    return run_service(server, args, "move_it_server.py")


def run_service(service: Server, args: argparse.Namespace, prog: str) -> int:
    """Run ``service`` until stopped; exit status 1 when its configuration or its publish port
    cannot be used (said in the log, and on stderr too when the log goes elsewhere)."""
    try:
        service.run()
    except (ConfigError, zmq.ZMQError) as err:
        problem = str(err) if isinstance(err, ConfigError) else (
            f"cannot publish on port {args.port}: {err}")
        LOG.error("%s", problem)
        if args.log or args.log_config:  # the log is elsewhere: say it here too
            print(f"{prog}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
