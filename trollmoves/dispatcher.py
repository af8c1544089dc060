"""The Dispatcher: push local files to targets chosen by rules, when posttroll messages say so.

``dispatcher.py [-p PUBLISH_PORT] [-n NAMESERVERS...] [-c LOG_CONFIG] [-v] CONFIG``

The YAML config (schema: ``schemas/dispatcher.schema.json``, example:
``examples/dispatcher-config.yaml``) names targets; each has ``dispatch_configs`` saying which
message topics and conditions select a file for it, and where the file goes::

    SUB -> files of the message -> rules (topic, conditions) -> compose target URL (aliases)
        -> copy engine, one serial queue per target -> publish the new location (``-p``)

Targets are served by a small thread pool, one transfer at a time per target, so a slow or
unreachable target delays only its own files. The copy engine pools connections, so a stream
of files to one SFTP target uses one SSH connection. The config file is checked on every turn
of the receive loop (and on SIGHUP); a broken edit is reported and the last good config stays.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import string
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache, partial
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import fsspec
import jsonschema
from posttroll.message import Message
from posttroll.publisher import create_publisher_from_dict_config
from posttroll.subscriber import create_subscriber_from_dict_config
from trollsift import compose

from trollmoves import errors
from trollmoves.conditions import conditions_match
from trollmoves.config import ConfigError, file_signature, load_schema, load_yaml
from trollmoves.filesystems import POOL
from trollmoves.logs import add_logging_arguments, setup_logging
from trollmoves.messages import FILE_TYPES, iter_files, local_path
from trollmoves.transfer import interrupt_retries, transfer
from trollmoves.urls import parse, redact_url

LOG = logging.getLogger(__name__)

SUBSCRIBER_SECTION = "posttroll_subscriber"
PUBLISHER_NAME = "dispatcher"
RECV_TIMEOUT = 0.25  #: seconds; also the latency of config checks and of a SIGTERM
DEFAULT_WORKERS = 4
_RULE_KEYS = ("topics", "conditions")


# ------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class Rule:
    """One dispatch config of a target, with the target's settings merged in."""

    target: str
    topics: tuple[str, ...]
    directory: str
    host: str = ""
    filepattern: str | None = None
    conditions: tuple[Mapping[str, Any], ...] | None = None
    connection_parameters: Mapping[str, Any] = field(default_factory=dict)
    aliases: Mapping[str, Any] = field(default_factory=dict)
    publish_topic: str | None = None

    def accepts(self, subject: str, metadata: Mapping[str, Any]) -> bool:
        """Whether a file announced on ``subject`` with ``metadata`` goes to this target."""
        return (any(subject.startswith(topic) for topic in self.topics)
                and conditions_match(self.conditions, metadata))


@dataclass(frozen=True)
class Subscription:
    """Where messages come from (the ``posttroll_subscriber`` block) and which topics."""

    topics: tuple[str, ...]
    addresses: tuple[str, ...] = ()
    nameserver: str | bool = "localhost"
    services: tuple[str, ...] = ()

    def settings(self) -> dict[str, Any]:
        """Arguments for posttroll's ``create_subscriber_from_dict_config``."""
        return {"topics": list(self.topics), "addresses": list(self.addresses) or None,
                "nameserver": self.nameserver, "services": list(self.services) or "",
                "addr_listener": True}

    def describe(self) -> str:
        """A short text for log lines."""
        sources = list(self.addresses)
        if self.nameserver is not False:
            sources.append(f"nameserver {self.nameserver}")
        return f"topics {', '.join(self.topics)} from {', '.join(sources)}"


@dataclass(frozen=True)
class DispatcherConfig:
    """A validated dispatcher configuration."""

    rules: tuple[Rule, ...]
    subscription: Subscription


@cache
def _validator() -> jsonschema.protocols.Validator:
    schema = load_schema("dispatcher")
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _key(parts: Iterable[Any]) -> str | None:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


def _error(source: str, parts: Sequence[Any], problem: str) -> ConfigError:
    """A ConfigError naming the section (target) and the key inside it."""
    return ConfigError(source, str(parts[0]) if parts else None, _key(parts[1:]), problem)


def _as_tuple(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _validate(data: Any, source: str) -> None:
    """Check ``data`` against the schema; unknown keys are only logged as warnings."""
    for error in sorted(_validator().iter_errors(data), key=lambda e: list(map(str, e.path))):
        if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
            known = error.schema.get("properties", {})
            for key in error.instance:
                if key not in known:
                    LOG.warning("%s", _error(source, [*error.path, key], "unknown key, ignored"))
            continue
        best = jsonschema.exceptions.best_match([error])
        raise _error(source, list(best.path), best.message)


def _check_pattern(pattern: str | None, source: str, where: list[Any]) -> None:
    if pattern is None:
        return
    try:
        list(string.Formatter().parse(pattern))
    except ValueError as err:
        raise _error(source, where, f"invalid pattern {pattern!r}: {err}") from None


def _check_host(host: str, source: str, where: list[Any]) -> None:
    if not host:
        return
    try:
        loc = parse(host)
    except ValueError as err:
        raise _error(source, where, str(err)) from None
    if loc.protocol not in fsspec.available_protocols():
        raise _error(source, where, f"unsupported protocol {loc.scheme!r}")
    if "://" in host and urlsplit(host).path not in {"", "/"}:
        LOG.warning("%s", _error(source, where, f"the path of {redact_url(host)} is ignored; "
                                 "the target path comes from 'directory'"))


def _target_rules(name: str, target: Mapping[str, Any], source: str) -> list[Rule]:
    base = {key: value for key, value in target.items() if key != "dispatch_configs"}
    rules = []
    for index, item in enumerate(target["dispatch_configs"]):
        here = [name, "dispatch_configs", index]
        settings = {**base, **{k: v for k, v in item.items() if k not in _RULE_KEYS}}
        if settings.get("directory") is None:
            raise _error(source, here, "'directory' is missing (give it in the target or here)")
        for key in ("directory", "filepattern", "publish_topic", "host"):
            where = [*here, key] if key in item else [name, key]
            if key == "host":
                _check_host(settings.get(key) or "", source, where)
            else:
                _check_pattern(settings.get(key), source, where)
        conditions = item.get("conditions")
        rules.append(Rule(
            target=name, topics=_as_tuple(item["topics"]), directory=settings["directory"],
            host=settings.get("host") or "", filepattern=settings.get("filepattern"),
            conditions=None if conditions is None else tuple(conditions),
            connection_parameters=dict(settings.get("connection_parameters") or {}),
            aliases=dict(settings.get("aliases") or {}),
            publish_topic=settings.get("publish_topic")))
    return rules


def build_config(data: Any, source: str = "<config>") -> DispatcherConfig:
    """Validate a loaded YAML document and turn it into a :class:`DispatcherConfig`."""
    if data is None:
        raise ConfigError(source, None, None, "the file is empty")
    _validate(data, source)
    subscriber = data.get(SUBSCRIBER_SECTION) or {}
    rules = []
    for name, target in data.items():
        if name != SUBSCRIBER_SECTION:
            rules.extend(_target_rules(str(name), target, source))
    if not rules:
        raise ConfigError(source, None, None, "no target is configured")
    addresses = _as_tuple(subscriber.get("subscribe_addresses"))
    nameserver = subscriber.get("nameserver", "localhost")
    if nameserver is None:
        nameserver = "localhost"
    if nameserver is False and not addresses:
        raise ConfigError(source, SUBSCRIBER_SECTION, "nameserver", "false needs "
                          "subscribe_addresses, or there is nothing to listen to")
    topics = tuple(sorted({topic for rule in rules for topic in rule.topics}))
    subscription = Subscription(topics, addresses, nameserver,
                                _as_tuple(subscriber.get("subscribe_services")))
    return DispatcherConfig(tuple(rules), subscription)


def read_config(filename: str | os.PathLike[str]) -> DispatcherConfig:
    """Read and validate a dispatcher YAML file; raise :class:`ConfigError` naming the key."""
    return build_config(load_yaml(filename), os.fspath(filename))


# ----------------------------------------------------------------------------- composition


def apply_aliases(metadata: Mapping[str, Any], aliases: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata with aliases applied (for composing names only, never for conditions).

    ``{field: {value: alias}}`` renames the field's value in place; ``{field: [{...}, ...]}``
    applies each map, writing to its ``_alias_name`` field when it has one (the original field
    is then kept). Values without an alias stay as they are.
    """
    result = dict(metadata)
    for key, spec in aliases.items():
        if key not in metadata:
            continue
        value = metadata[key]
        for mapping in [spec] if isinstance(spec, Mapping) else spec:
            new_key = mapping.get("_alias_name", key)
            try:
                result[new_key] = mapping.get(value, value)
            except TypeError:  # an unhashable value (a list) has no alias
                result[new_key] = value
    return result


def file_metadata(info: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The file's message metadata plus ``file_creation_time`` (its local ctime)."""
    return {**info, "file_creation_time": datetime.fromtimestamp(os.path.getctime(path))}


def compose_destination(rule: Rule, metadata: Mapping[str, Any], source: str) -> tuple[str, str]:
    """Return (target URL, target path) of ``source`` for ``rule``.

    The path is ``directory/filepattern`` composed from the metadata after aliases (the
    source's file name when there is no ``filepattern``); the URL is the rule's ``host`` with
    that path. Raises KeyError (missing field) or ValueError (bad format).
    """
    fields = apply_aliases(metadata, rule.aliases)
    name = compose(rule.filepattern, fields) if rule.filepattern else os.path.basename(source)
    path = os.path.join(compose(rule.directory, fields), name)
    parts = urlsplit(rule.host)
    if not parts.scheme:
        return path, path
    url = urlunsplit((parts.scheme, parts.netloc, quote(path), parts.query, parts.fragment))
    return url, path


@dataclass(frozen=True)
class Job:
    """One file to deliver to one target."""

    target: str
    source: str
    url: str
    path: str
    info: Mapping[str, Any]
    connection_parameters: Mapping[str, Any]
    publish_topic: str | None = None

    @property
    def redacted_url(self) -> str:
        """The target URL without its password."""
        return redact_url(self.url)


def plan(rules: Iterable[Rule], subject: str, info: Mapping[str, Any]) -> list[Job]:
    """The deliveries one announced file needs; non-local and missing files are skipped."""
    selected = [rule for rule in rules if rule.accepts(subject, info)]
    if not selected:
        return []
    source = local_path(info)
    uri = redact_url(str(info.get("uri") or info.get("uid")))
    if source is None:
        LOG.warning("Skipping %s: the file is not on this host", uri)
        return []
    try:
        metadata = file_metadata(info, source)
    except OSError as err:
        LOG.error("Cannot dispatch %s: %s", source, err.strerror or err)
        return []
    jobs: list[Job] = []
    for rule in selected:
        try:
            url, path = compose_destination(rule, metadata, source)
        except (KeyError, ValueError, TypeError) as err:
            LOG.error("Cannot compose the destination of %s for target %s: %s %s", source,
                      rule.target, type(err).__name__, err)
            continue
        if any(job.target == rule.target and job.url == url for job in jobs):
            continue
        jobs.append(Job(rule.target, source, url, path, info, rule.connection_parameters,
                        rule.publish_topic))
    return jobs


# ---------------------------------------------------------------------------------- running


class SerialQueues:
    """Run jobs on a small thread pool: in order and one at a time per key, keys in turn."""

    def __init__(self, workers: int = DEFAULT_WORKERS) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dispatch")
        self._lock = threading.Lock()
        self._queues: dict[str, deque[Callable[[], None]]] = {}
        self._closed = False

    def submit(self, key: str, job: Callable[[], None]) -> None:
        """Queue ``job`` behind the other jobs of ``key``."""
        with self._lock:
            if self._closed:
                return
            queue = self._queues.get(key)
            if queue is not None:  # a runner for this key is scheduled or running
                queue.append(job)
                return
            self._queues[key] = deque([job])
            self._executor.submit(self._run_next, key)

    def _run_next(self, key: str) -> None:
        with self._lock:
            queue = self._queues[key]
            job = None if self._closed else queue.popleft()
        if job is not None:
            try:
                job()
            except Exception:
                LOG.exception("Unexpected error in a %s job", key)
        with self._lock:
            if not queue or self._closed:
                del self._queues[key]
            else:  # to the back of the pool's queue: other keys get their turn
                self._executor.submit(self._run_next, key)

    def shutdown(self) -> int:
        """Finish the running jobs, drop the queued ones; return how many were dropped."""
        with self._lock:
            self._closed = True
            dropped = sum(len(queue) for queue in self._queues.values())
        self._executor.shutdown(wait=True)
        return dropped


def _connection_options(parameters: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    options = dict(parameters)
    backups = options.pop("backup_targets", None) or []
    return options, [backups] if isinstance(backups, str) else list(backups)


class Dispatcher:
    """Receive messages, dispatch their files by the config's rules, publish the results."""

    def __init__(self, config_file: str | os.PathLike[str], publisher: Any = None,
                 workers: int = DEFAULT_WORKERS) -> None:
        self.config_file = os.fspath(config_file)
        self._stamp = file_signature(self.config_file)
        self.config = read_config(self.config_file)
        self.publisher = publisher
        self.queues = SerialQueues(workers)
        self._stopping = threading.Event()
        self._reload_requested = False

    # -- life cycle -------------------------------------------------------------------------
    def run(self) -> None:
        """Receive and dispatch until :meth:`stop`; resubscribe when the subscription changes."""
        previous: DispatcherConfig | None = None
        while not self._stopping.is_set():
            subscriber = self._subscribe(previous)
            subscription = self.config.subscription
            LOG.info("Dispatcher ready: listening to %s", subscription.describe())
            try:
                for msg in subscriber.recv(timeout=RECV_TIMEOUT):
                    if self._stopping.is_set():
                        break
                    previous = self.config
                    if self.check_config() and self.config.subscription != subscription:
                        LOG.info("Subscription changed: resubscribing")
                        break
                    if msg is not None:
                        self.handle(msg)
            finally:
                subscriber.close()

    def _subscribe(self, previous: DispatcherConfig | None) -> Any:
        """Subscribe as the config says; after a reload, fall back to the previous config."""
        try:
            return create_subscriber_from_dict_config(self.config.subscription.settings())
        except Exception as err:
            if previous is None:
                raise
            LOG.error("Cannot subscribe as %s says, keeping the previous configuration: %s",
                      self.config_file, err)
            self.config = previous
            return create_subscriber_from_dict_config(previous.subscription.settings())

    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from a signal handler)."""
        self._stopping.set()

    def request_reload(self) -> None:
        """Re-read the config on the next turn of the receive loop, even if unchanged."""
        self._reload_requested = True

    def close(self) -> None:
        """Finish running transfers, drop queued ones, close connections and the publisher."""
        interrupt_retries()
        dropped = self.queues.shutdown()
        if dropped:
            LOG.warning("Stopped with %d queued deliveries not done", dropped)
        POOL.close_all()
        if self.publisher is not None:
            self.publisher.stop()
        LOG.info("Dispatcher stopped")

    # -- configuration ----------------------------------------------------------------------
    def check_config(self) -> bool:
        """Reload the config file when it changed; return True when a new config is in use."""
        stamp = file_signature(self.config_file)
        if stamp == self._stamp and not self._reload_requested:
            return False
        self._stamp, self._reload_requested = stamp, False
        try:
            config = read_config(self.config_file)
        except ConfigError as err:
            LOG.error("Invalid configuration, keeping the previous one: %s", err)
            return False
        self.config = config
        LOG.info("Configuration reloaded from %s", self.config_file)
        return True

    # -- messages ---------------------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        """Queue the deliveries a message asks for."""
        if msg.type not in FILE_TYPES:
            LOG.debug("Ignoring %s message on %s", msg.type, msg.subject)
            return
        LOG.debug("Received %s message on %s", msg.type, msg.subject)
        for info in iter_files(msg.data):
            for job in plan(self.config.rules, msg.subject, info):
                self.queues.submit(job.target, partial(self.deliver, job))

    def deliver(self, job: Job) -> bool:
        """Copy one file to one target and publish its new location; never raises."""
        options, backups = _connection_options(job.connection_parameters)
        try:
            transfer(job.source, job.url, backup_hosts=backups, **options)
        except Exception as err:  # noqa: BLE001 - a failed target must not stop the others
            detail = str(err) if isinstance(err, errors.TransferError) else errors.describe(err)
            LOG.error("Could not dispatch %s to target %s (%s): %s", job.source, job.target,
                      job.redacted_url, redact_url(detail))
            return False
        LOG.info("Dispatched %s to target %s (%s)", job.source, job.target, job.redacted_url)
        self.publish(job)
        return True

    def publish(self, job: Job) -> None:
        """Announce the delivered file: the incoming data with ``uri`` at the target."""
        if self.publisher is None or not job.publish_topic:
            return
        info = {**job.info, "uri": job.path}
        try:
            topic = compose(job.publish_topic, info)
        except (KeyError, ValueError, TypeError) as err:
            LOG.error("Cannot compose publish_topic %r of target %s: %s %s", job.publish_topic,
                      job.target, type(err).__name__, err)
            return
        msg = Message(topic, "file", info)
        LOG.debug("Publishing %s", msg)
        self.publisher.send(msg.encode())


def create_publisher(port: int | None, nameservers: Sequence[str] | None) -> Any:
    """Start the posttroll publisher for ``-p``/``-n``; None when there is no ``-p``.

    Without ``-n`` it binds ``port`` (0: a random one) and talks to no nameserver; ``-n HOST
    ...`` registers with those nameservers, a bare ``-n`` announces itself by multicast.
    """
    if port is None:
        if nameservers is not None:
            LOG.warning("-n/--publish-nameserver is ignored without -p/--publish-port")
        return None
    if nameservers is None:
        settings: dict[str, Any] = {"name": PUBLISHER_NAME, "address": f"tcp://*:{port}",
                                    "nameservers": False}
    else:
        settings = {"name": PUBLISHER_NAME, "port": port, "nameservers": list(nameservers) or None}
    publisher = create_publisher_from_dict_config(settings).start()
    LOG.info("Publishing dispatched files on port %s", publisher.port_number)
    return publisher


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line of ``dispatcher.py``."""
    parser = argparse.ArgumentParser(
        prog="dispatcher.py", description="Push local files to targets by rules, when "
        "posttroll messages announce them.")
    parser.add_argument("config_file", metavar="CONFIG", help="the YAML configuration file")
    parser.add_argument("-p", "--publish-port", dest="pub_port", type=int, nargs="?", const=0,
                        metavar="PUBLISH_PORT",
                        help="publish a message per dispatched file on this port (bare -p: a "
                             "random port); default: no publishing")
    parser.add_argument("-n", "--publish-nameserver", dest="pub_nameservers", nargs="*",
                        metavar="NAMESERVERS",
                        help="register the publisher with these nameservers")
    add_logging_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dispatcher.py`` and ``trollmoves dispatch``."""
    args = parse_args(argv)
    setup_logging(args)
    try:
        dispatcher = Dispatcher(args.config_file)
    except ConfigError as err:
        LOG.error("Cannot start: %s", err)
        return 1
    try:
        dispatcher.publisher = create_publisher(args.pub_port, args.pub_nameservers)
    except Exception as err:  # noqa: BLE001 - posttroll/zmq report bind failures many ways
        LOG.error("Cannot start the publisher: %s", err)
        dispatcher.close()
        return 1
    signal.signal(signal.SIGTERM, lambda *_: dispatcher.stop())
    signal.signal(signal.SIGINT, lambda *_: dispatcher.stop())
    signal.signal(signal.SIGHUP, lambda *_: dispatcher.request_reload())
    try:
        dispatcher.run()
    finally:
        dispatcher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
