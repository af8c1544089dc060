"""The Dispatcher: push local files to targets chosen by rules, when posttroll messages say so.

``dispatcher.py [-p PUBLISH_PORT] [-n NAMESERVERS...] [-c LOG_CONFIG] [-v] CONFIG``

The YAML config (schema: ``schemas/dispatcher.schema.json``, example:
``examples/dispatcher-config.yaml``) names targets; each has ``dispatch_configs`` saying which
message topics and conditions select a file for it, and where the file goes::

    SUB (trollmoves.receiver) -> files of the message -> rules (topic, conditions)
        -> compose target URL (aliases) -> copy engine, one serial queue per target
        -> publish the new location (``-p``)

Targets are served by a small thread pool, one transfer at a time per target, so a slow or
unreachable target delays only its own files. The queues are bounded (:data:`MAX_QUEUED`): when
they are full the receive loop waits. The copy engine pools connections, so a stream of files
to one SFTP target uses one SSH connection. A composed destination must stay under the fixed
base directory of its template: message fields cannot lead it elsewhere (``../..``).

The config file is watched (and SIGHUP reloads it); a broken edit is reported and the last good
config stays. At SIGTERM the queued deliveries get ``--stop-timeout`` seconds to finish; each
one not done is logged with its file and target.
"""

from __future__ import annotations

import argparse
import logging
import os
import posixpath
import string
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache, partial
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import fsspec
import jsonschema
from posttroll.message import Message
from posttroll.publisher import create_publisher_from_dict_config
from trollsift import compose

from trollmoves import errors
from trollmoves.conditions import conditions_match
from trollmoves.config import ConfigError, file_signature, load_schema, load_yaml
from trollmoves.filesystems import POOL
from trollmoves.jobqueue import JobQueues
from trollmoves.logs import add_logging_arguments, setup_logging
from trollmoves.messages import FILE_TYPES, compose_path, iter_files, local_path
from trollmoves.receiver import Control, Receiver, SubscriberSettings
from trollmoves.transfer import interrupt_retries, transfer
from trollmoves.urls import parse, redact_url

LOG = logging.getLogger(__name__)

SUBSCRIBER_SECTION = "posttroll_subscriber"
PUBLISHER_NAME = "dispatcher"
DEFAULT_WORKERS = 4
#: Deliveries waiting (all targets together) before the receive loop waits for room.
MAX_QUEUED = 10_000
#: Seconds the queued deliveries get to finish at a stop (``--stop-timeout``).
DEFAULT_STOP_TIMEOUT = 30.0
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
class DispatcherConfig:
    """A validated dispatcher configuration."""

    rules: tuple[Rule, ...]
    subscription: SubscriberSettings  #: the ``posttroll_subscriber`` block and the rules' topics


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
    subscription = SubscriberSettings(
        topics, addresses, None if nameserver is False else str(nameserver),
        _as_tuple(subscriber.get("subscribe_services")) or ("",), addr_listener=True)
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


def _literal(text: str) -> str:
    """``text`` as a format string that composes to itself."""
    return text.replace("{", "{{").replace("}", "}}")


def compose_destination(rule: Rule, metadata: Mapping[str, Any], source: str) -> tuple[str, str]:
    """Return (target URL, target path) of ``source`` for ``rule``.

    The path is ``directory/filepattern`` composed from the metadata after aliases (the
    source's file name when there is no ``filepattern``); the URL is the rule's ``host`` with
    that path. Raises KeyError (missing field), ValueError (bad format) or
    :class:`~trollmoves.messages.UnsafePathError` (a field leads out of the template's base
    directory).
    """
    fields = apply_aliases(metadata, rule.aliases)
    name = rule.filepattern or _literal(os.path.basename(source))
    path = compose_path(posixpath.join(rule.directory, name), fields)
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


def _connection_options(parameters: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    options = dict(parameters)
    backups = options.pop("backup_targets", None) or []
    return options, [backups] if isinstance(backups, str) else list(backups)


class Dispatcher:
    """Receive messages, dispatch their files by the config's rules, publish the results."""

    def __init__(self, config_file: str | os.PathLike[str], publisher: Any = None,
                 workers: int = DEFAULT_WORKERS, stop_timeout: float = DEFAULT_STOP_TIMEOUT,
                 max_queued: int = MAX_QUEUED) -> None:
        self.config_file = os.fspath(config_file)
        self._loaded = file_signature(self.config_file)  # taken first: a later edit shows
        self.config = read_config(self.config_file)
        self.publisher = publisher
        self.stop_timeout = stop_timeout
        self.queues = JobQueues(workers, max_queued, name="dispatch")
        self.receiver: Receiver | None = None

    # -- life cycle -------------------------------------------------------------------------
    def serve(self, control: Control) -> None:
        """Receive and dispatch until ``control`` says stop; reload when it says so.

        Raises when the subscription cannot be set up.
        """
        self.receiver = Receiver(self.config.subscription, self.handle,
                                 on_exit=control.request_stop, name="dispatcher-receiver")
        self.receiver.start()
        LOG.info("Dispatcher ready: listening to %s", self.config.subscription.describe())
        control.watch(self.config_file, self._loaded)
        try:
            while control.wait() == Control.RELOAD:
                self.reload()
        finally:
            LOG.info("Stopping")
            self.receiver.stop()
            self.queues.close()  # a receive loop waiting for room goes on, and stops
            self.receiver.join()

    def close(self) -> None:
        """Give the queued deliveries ``stop_timeout`` seconds, log each one not done, wait
        for the running ones; close connections and the publisher."""
        dropped = self.queues.drain(self.stop_timeout)
        interrupt_retries()
        self.queues.join()
        for job in dropped:
            LOG.error("Not dispatched, stopped before its turn: %s to target %s", job.label,
                      job.key)
        POOL.close_all()
        if self.publisher is not None:
            self.publisher.stop()
        LOG.info("Dispatcher stopped")

    # -- configuration ----------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the config file; a broken one is logged and the current one stays.

        Returns True when the new config is in use; a changed subscription is resubscribed.
        """
        try:
            config = read_config(self.config_file)
        except ConfigError as err:
            LOG.error("Invalid configuration, keeping the previous one: %s", err)
            return False
        previous, self.config = self.config, config
        LOG.info("Configuration reloaded from %s", self.config_file)
        if config.subscription != previous.subscription and self.receiver is not None:
            LOG.info("Subscription changed: resubscribing")
            self.receiver.resubscribe(config.subscription)
        return True

    # -- messages ---------------------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        """Queue the deliveries a message asks for (waiting while the queues are full)."""
        if msg.type not in FILE_TYPES:
            LOG.debug("Ignoring %s message on %s", msg.type, msg.subject)
            return
        LOG.debug("Received %s message on %s", msg.type, msg.subject)
        for info in iter_files(msg.data):
            for job in plan(self.config.rules, msg.subject, info):
                label = str(info.get("uid") or job.source)
                if not self.queues.submit(job.target, label, partial(self.deliver, job)):
                    LOG.error("Not dispatched, stopping: %s to target %s", label, job.target)

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
    parser.add_argument("--stop-timeout", type=float, default=DEFAULT_STOP_TIMEOUT,
                        metavar="SECONDS",
                        help="at SIGTERM, time the queued deliveries get to finish (default "
                             "%(default)s)")
    add_logging_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dispatcher.py`` and ``trollmoves dispatch``."""
    args = parse_args(argv)
    setup_logging(args)
    try:
        dispatcher = Dispatcher(args.config_file, stop_timeout=args.stop_timeout)
    except ConfigError as err:
        LOG.error("Cannot start: %s", err)
        return 1
    control = Control()
    try:
        dispatcher.publisher = create_publisher(args.pub_port, args.pub_nameservers)
        control.install_signals(reload=True)
        dispatcher.serve(control)
    except Exception as err:  # noqa: BLE001 - posttroll/zmq report bind/connect failures many ways
        LOG.error("Cannot run: %s", err)
        return 1
    finally:
        dispatcher.close()
        control.close()
    failed = dispatcher.receiver is not None and dispatcher.receiver.error is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
