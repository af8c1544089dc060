"""Run a sectioned INI service: one worker per config section, reloaded section by section.

Server, client and mirror are all "one worker per section of an INI file". This module owns
everything around the workers::

    runner = ServiceRunner("server.ini", "server", make_worker)
    runner.run()          # blocks: SIGHUP / config edits reload, SIGTERM / SIGINT stop

- ``make_worker(name, section)`` builds a :class:`Worker` for one typed, validated section (as
  returned by :func:`trollmoves.config.read_ini_sections`); the runner calls ``start()`` on it.
- Sections are loaded one by one, as trollmoves 0.19 does: a section that does not validate
  (an incomplete one, a bad value, a port another section uses) is logged as an ERROR naming
  file, section and key, and skipped; the valid ones run. A file that cannot be read, or holds
  invalid sections only, is an error (:class:`~trollmoves.config.ConfigError` at start).
- A reload (the config file changed on disk, SIGHUP, or :meth:`ServiceRunner.request_reload`)
  re-reads the file and touches only what changed: workers of removed and changed sections are
  stopped (all of them first, then joined, so a changed section can rebind its port), then new
  and changed sections are started. A section edited into an invalid one keeps running as it
  was; a file that does not read, or holds invalid sections only, changes nothing.
- A worker that stopped working on its own (a thread of it died) is restarted with a growing
  delay (1 s, doubled up to 60 s, back to 1 s once it ran that long), with an ERROR in the log.
  Workers that can die offer ``alive()``; whoever sees one die (its dying thread) calls
  :meth:`ServiceRunner.check_workers`, which wakes the runner.
- SIGTERM / SIGINT (or :meth:`ServiceRunner.request_stop`): every worker is told to ``stop()``
  (stop accepting work), then ``join()`` waits for the work in flight. A second signal during
  shutdown gets the default behaviour (the process ends at once).

The control thread blocks on a pipe (until the next restart is due); signal handlers, dying
workers and the config watcher only write a byte to it, so there is no sleep loop and nothing
unsafe runs inside a signal handler.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from trollmoves.config import ConfigError, file_signature, read_ini_sections
from trollmoves.control import FileWatch, install_signals
from trollmoves.wakeup import WakePipe

LOG = logging.getLogger(__name__)

Sections = dict[str, dict[str, Any]]


class Worker(Protocol):
    """What the runner needs from the worker of one section."""

    def start(self) -> None:
        """Start working; raise to report that the section cannot run."""

    def stop(self) -> None:
        """Stop accepting new work; return promptly."""

    def join(self, timeout: float | None = None) -> None:
        """Wait until the work in flight is finished and every resource is released."""

    # Optional: ``alive() -> bool``, False once the worker stopped working on its own; the
    # runner asks when :meth:`ServiceRunner.check_workers` is called, and restarts it.


#: Seconds before a dead worker is restarted: the first delay, and the longest.
RESTART_BACKOFF = (1.0, 60.0)

WorkerFactory = Callable[[str, dict[str, Any]], Worker]
#: ``validate(path, sections)`` checks the file as a whole; raises :class:`ConfigError`.
Validator = Callable[[str, Sections], None]


@dataclass
class ReloadResult:
    """What a (re)load did."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    #: sections that did not validate: skipped, or kept running as they were
    invalid: list[str] = field(default_factory=list)
    error: ConfigError | None = None

    @property
    def touched(self) -> bool:
        """True when at least one section was started or stopped."""
        return bool(self.added or self.changed or self.removed)


class ServiceRunner:
    """Start, reload and stop the workers of the sections of one INI file.

    ``kind`` names the schema (``"server"``, ``"client"``, ``"mirror"``); ``validate`` can add
    whole-file checks (for example, two sections on one port). ``on_stop`` is called once when
    the final stop begins, before the workers are stopped (e.g. to cut retry pauses short).
    ``on_removed(name, config)`` is called once the worker of a section removed from the file
    has stopped (to forget what outlived its reloads).
    ``stop_timeout`` bounds how long :meth:`stop` waits for each worker's ``join``.
    ``restart_backoff`` is the (first, longest) delay before a dead worker is restarted.
    """

    def __init__(self, config_path: str | os.PathLike[str], kind: str, factory: WorkerFactory,
                 *, validate: Validator | None = None, watch_config: bool = True,
                 on_stop: Callable[[], None] | None = None,
                 on_removed: Callable[[str, Mapping[str, Any]], None] | None = None,
                 stop_timeout: float | None = None,
                 restart_backoff: tuple[float, float] = RESTART_BACKOFF) -> None:
        self.config_path = os.fspath(config_path)
        self.kind = kind
        self.factory = factory
        self.validate = validate
        self.watch_config = watch_config
        self.on_stop = on_stop
        self.on_removed = on_removed
        self.stop_timeout = stop_timeout
        self.restart_backoff = restart_backoff
        self.loaded_signature: tuple[int, int, int] | None = None
        self._sections: Sections = {}
        self._workers: dict[str, Worker] = {}
        self._failed: set[str] = set()
        self._started_at: dict[str, float] = {}  # when each worker started
        self._restart_at: dict[str, float] = {}  # dead sections: when to start them again
        self._delay: dict[str, float] = {}  # dead sections: the delay before that
        self._lock = threading.RLock()
        self._observer: FileWatch | None = None
        self._wakeup = WakePipe()
        self._reload_requested = False
        self._check_requested = False
        self._stop_requested = False
        self._started = False
        self._stopped = False

    # -- state ------------------------------------------------------------------------------
    @property
    def sections(self) -> Mapping[str, dict[str, Any]]:
        """The configuration of every section whose worker is running."""
        with self._lock:
            return {name: self._sections[name] for name in self._workers}

    @property
    def workers(self) -> Mapping[str, Worker]:
        """The running workers by section name."""
        with self._lock:
            return dict(self._workers)

    # -- requests (thread- and signal-safe) ---------------------------------------------------
    def request_reload(self) -> None:
        """Ask :meth:`run` to re-read the config file (safe from any thread or signal handler)."""
        self._reload_requested = True
        self._wakeup.poke()

    def check_workers(self) -> None:
        """Ask :meth:`run` to restart the workers that stopped working (safe anywhere)."""
        self._check_requested = True
        self._wakeup.poke()

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop every worker and return (safe anywhere)."""
        self._stop_requested = True
        self._wakeup.poke()

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> ReloadResult:
        """Load the file and start a worker per section; a bad file raises :class:`ConfigError`."""
        with self._lock:
            sections, errors = self._read()
            self._started = True
            result = self._apply(sections, errors)
            if self.watch_config:
                self._watch()
        LOG.info("Running %d section(s) from %s", len(self._workers), self.config_path)
        return result

    def reload(self) -> ReloadResult:
        """Re-read the file and restart only the sections that changed (failed ones are retried).

        A file that does not read, or holds invalid sections only, changes nothing; its error is
        logged and returned.
        """
        with self._lock:
            if self._stopped:
                return ReloadResult()
            try:
                sections, errors = self._read()
            except ConfigError as err:
                LOG.error("Configuration not reloaded, the running sections are kept: %s", err)
                return ReloadResult(error=err)
            result = self._apply(sections, errors)
        if result.touched or result.failed or result.invalid:
            LOG.info("Reloaded %s: added %s, changed %s, removed %s, failed %s, invalid %s",
                     self.config_path, result.added, result.changed, result.removed,
                     result.failed, result.invalid)
        else:
            LOG.debug("Reloaded %s: no section changed", self.config_path)
        return result

    def run(self, install_signals: bool = True) -> None:
        """Start (unless started), then serve reload and stop requests until asked to stop.

        Signal handlers are installed only when called from the main thread.
        """
        if install_signals and threading.current_thread() is threading.main_thread():
            self._install_signals()
        try:
            if not self._started:
                self.start()
            while not self._stop_requested:
                self._wait_for_request()
                if self._reload_requested and not self._stop_requested:
                    self._reload_requested = False
                    self.reload()
                if self._check_requested and not self._stop_requested:
                    self._check_requested = False
                    self._bury_dead_workers()
                self._restart_due_workers()
        finally:
            self.stop()

    def _wait_for_request(self) -> None:
        """Block until a request arrives or the next restart is due."""
        with self._lock:
            due = min(self._restart_at.values(), default=None)
        self._wakeup.wait(None if due is None else max(0.0, due - time.monotonic()))

    def stop(self) -> None:
        """Stop watching the file, then stop every worker and wait for its work in flight."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._restart_at.clear()
            self._unwatch()
            if self.on_stop is not None:
                self.on_stop()
            names = list(self._workers)
            self._stop_workers(names)
            self._sections.clear()
        self._wakeup.close()
        LOG.info("Stopped %d section(s)", len(names))

    # -- internals --------------------------------------------------------------------------
    def _read(self) -> tuple[Sections, list[ConfigError]]:
        """The valid sections and the errors of the invalid ones; raises :class:`ConfigError`
        when the file cannot be read or holds invalid sections only."""
        signature = file_signature(self.config_path)
        sections, errors = read_ini_sections(self.config_path, self.kind)
        errors += self._validated(sections)
        if errors and not sections:
            for err in errors[1:]:
                LOG.error("%s", err)
            raise errors[0]
        self.loaded_signature = signature
        return sections, errors

    def _validated(self, sections: Sections) -> list[ConfigError]:
        """Run the whole-file checks, dropping each section they find fault with."""
        errors: list[ConfigError] = []
        while self.validate is not None and sections:
            try:
                self.validate(self.config_path, sections)
            except ConfigError as err:
                if err.section not in sections:
                    raise  # a fault of the file as a whole
                errors.append(err)
                del sections[err.section]
            else:
                break
        return errors

    def _apply(self, sections: Sections, errors: list[ConfigError]) -> ReloadResult:
        result = ReloadResult()
        old = self._sections  # running and failed sections
        for err in errors:
            assert err.section is not None
            result.invalid.append(err.section)
            if err.section in old:  # a bad edit: keep the section as it was
                LOG.error("Section %s kept as it was: %s", err.section, err)
                sections[err.section] = old[err.section]
            else:
                LOG.error("Section %s skipped: %s", err.section, err)
        result.removed = [name for name in old if name not in sections]
        for name, section in sections.items():
            if name not in old:
                result.added.append(name)
            elif old[name] != section or name in self._failed:
                result.changed.append(name)
        self._stop_workers([n for n in result.removed + result.changed if n in self._workers])
        self._failed -= set(result.removed)
        for name in result.removed:
            config = old.pop(name)
            for plans in (self._restart_at, self._delay, self._started_at):
                plans.pop(name, None)
            if self.on_removed is not None:
                try:
                    self.on_removed(name, config)
                except Exception:  # the other sections' reload goes on
                    LOG.exception("Could not clean up after the removed section %s", name)
        for name in result.added + result.changed:
            self._sections[name] = sections[name]
            if not self._start_worker(name, sections[name]):
                result.failed.append(name)
        return result

    def _start_worker(self, name: str, section: dict[str, Any]) -> bool:
        try:
            worker = self.factory(name, section)
            worker.start()
        except Exception as err:  # one section must not take the others down
            LOG.error("Section %s could not start: %s", name, err,
                      exc_info=not isinstance(err, ConfigError | OSError))
            self._failed.add(name)
            return False
        self._failed.discard(name)
        self._restart_at.pop(name, None)
        self._workers[name] = worker
        self._started_at[name] = time.monotonic()
        LOG.info("Started section %s", name)
        return True

    def _bury_dead_workers(self) -> None:
        """Stop the workers that stopped working and plan their restart."""
        with self._lock:
            dead = [name for name, worker in self._workers.items()
                    if not getattr(worker, "alive", lambda: True)()]
            self._stop_workers(dead)
            first, longest = self.restart_backoff
            for name in dead:
                if time.monotonic() - self._started_at[name] >= longest:
                    self._delay[name] = first  # it ran a good while: start over
                delay = self._delay.get(name, first)
                LOG.error("Section %s stopped working; restarting it in %g s", name, delay)
                self._plan_restart(name, delay)

    def _plan_restart(self, name: str, delay: float) -> None:
        first, longest = self.restart_backoff
        self._failed.add(name)
        self._restart_at[name] = time.monotonic() + delay
        self._delay[name] = min(max(delay * 2, first), longest)

    def _restart_due_workers(self) -> None:
        with self._lock:
            now = time.monotonic()
            for name in [n for n, when in self._restart_at.items() if when <= now]:
                del self._restart_at[name]
                if not self._start_worker(name, self._sections[name]):
                    LOG.error("Section %s: next attempt in %g s", name, self._delay[name])
                    self._plan_restart(name, self._delay[name])

    def _stop_workers(self, names: list[str]) -> None:
        workers = [(name, self._workers.pop(name)) for name in names]
        for name, worker in workers:
            try:
                worker.stop()
            except Exception:  # keep stopping the others
                LOG.exception("Section %s did not stop cleanly", name)
        for name, worker in workers:
            try:
                worker.join(self.stop_timeout)
            except Exception:  # keep stopping the others
                LOG.exception("Section %s did not stop cleanly", name)
            LOG.info("Stopped section %s", name)

    def _watch(self) -> None:
        self._observer = FileWatch(self.config_path, lambda: self.loaded_signature,
                                   self.request_reload)

    def _unwatch(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer = None

    def _install_signals(self) -> None:
        install_signals(self.request_stop, self.request_reload)
