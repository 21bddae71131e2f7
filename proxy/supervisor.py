"""Multi-worker mode: N processes accepting on one port (SO_REUSEPORT), sharing the disk tier.

The supervisor (the process ``cachegate run --workers N`` starts) does not serve
clients. It

- reserves the port: it binds a SO_REUSEPORT socket without listening on it, so
  ``listen: 127.0.0.1:0`` resolves to one port that every worker then binds (a
  socket that does not listen takes no connections). SO_REUSEPORT lets any process
  of the same user bind the port too, and the kernel would split the traffic between
  two instances with different configs: so it first refuses a port something already
  accepts on (on any address that overlaps its own: a plain bind, ``_bind_alone``), and
  holds a lock named by the address for as long as it runs
  (``proxy.lockfile``; a second supervisor finds it taken even before the first one's
  workers listen);
- starts the workers as fresh interpreters (``python -m proxy.supervisor worker``),
  each with one end of a ``socketpair`` as its control channel
  (``proxy.control``), and restarts one that dies (with backoff when it keeps dying)
  or that leaves its pings unanswered for ``worker_timeout`` (killed first: ``_watchdog``);
  one silent because it waits for a lock of the shared memory that another worker holds is
  spared, and that holder killed instead (``_unresponsive``, ``proxy.storage.lockwait``).
  A worker reads a copy of the config file, its rule files and its listeners' TLS
  certificates and keys as the supervisor last loaded them good (``ConfigCopy``), not the
  files as they are now: a file edited but not reloaded yet, or broken, would give a
  restarted worker another config (or certificate) than its siblings, or make it exit at
  every restart (a key that does not match its certificate: every listener of that worker
  down); and GET /healthz says degraded when no worker serves or one keeps exiting
  (``workers_health``);
- owns the cache directory's upkeep and runs the admin API;
- purges for everyone: the shared half once on the disk tier (deletes and bans),
  then ``purge_local`` in every worker, and answers only when every worker whose
  listeners may accept has acknowledged. A worker that cannot acknowledge in time is
  killed (SIGKILL) and restarted with an empty memory tier, so no worker can serve a
  purged object after the purge answered. A worker still starting is sent the purge
  but not waited for: its ``listen`` call, just before its listeners open, is answered
  only once it has acknowledged every purge sent to it before (``_purge_starting``).
  A PURGE or an invalidation that arises in a worker is forwarded here (the worker's
  ``Runtime.purge`` calls ``purge``) and done the same way;
- on SIGTERM/SIGINT stops the workers with SIGTERM (each drains within
  ``shutdown_grace``), then exits 0, or 1 when a worker died during the drain (killed, or
  it crashed: its requests in flight were cut off); on SIGHUP re-reads the config and has
  every worker do the same.

Why processes that share a port rather than one accept socket handed down: with
SO_REUSEPORT the kernel spreads connections across workers evenly, and a worker
that dies takes only its own queue with it. Why a supervisor in the middle of
purges rather than workers telling each other: one place knows which workers are
alive, and a purge needs exactly that.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    # A worker first makes sure that its code is its supervisor's (``proxy.codeid``), before
    # anything else of this version is imported or reads what the supervisor passed: cachegate
    # upgraded in place under a running supervisor must not crash-loop here. Keep it first.
    from proxy.codeid import exit_if_changed

    exit_if_changed(sys.argv[2:])

import argparse
import asyncio
import contextlib
import ctypes
import functools
import json
import logging
import os
import pickle
import re
import shutil
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from proxy import earlysignals, gctuning
from proxy.cluster import BEAT_CALL, OUTBOX_CALL, ClusterUnavailable
from proxy.cluster import join as join_cluster
from proxy.codeid import ARG as CODE_ID_ARG
from proxy.codeid import CHANGED as CODE_CHANGED
from proxy.codeid import EXIT_CODE_CHANGED, identity
from proxy.config import Overrides, Settings, memory_needed_text
from proxy.control import Channel, ChannelClosed, RemoteError
from proxy.cpus import cgroup_memory_limit, cgroup_oom_kills
from proxy.inspection import Inspector
from proxy.leases import LeaseRelay, LeaseTable
from proxy.lockfile import HeldLock, LockTaken, bind_refused, port_in_use, runtime_dir
from proxy.logs import say, setup_logging, tell
from proxy.metrics import WORKER_END_REASONS
from proxy.oom import lower_supervisor_score, oom_death, raise_worker_score, signal_name
from proxy.purge import PurgeOutcome, PurgeSpec, match_to_json
from proxy.room import human_size
from proxy.runtime import ReloadResult, ReplacedWorker, Runtime
from proxy.sdnotify import Notifier
from proxy.startup import (
    EXIT_CACHE_DIR,
    EXIT_CONFIG,
    EXIT_FAILURE,
    load_settings,
    log_as_configured,
    run_async,
    start_logging,
)
from proxy.storage.arena import LOCK_NAMES
from proxy.storage.lockwait import Locks, read_locks
from proxy.tls import ExpiryWatch, served_after_reload
from proxy.web.server import (
    Listeners,
    Reloader,
    WorkerLink,
    _bound,
    _fmt,
    check_c_parser,
    count_reload,
    ignore_while_stopping,
    install_reloader,
    open_runtime,
    reload_in_background,
    restart_only,
    say_started,
    serve,
    start_admin_listener,
    with_restart_only,
)
from proxy.yamlsrc import dump_snapshot

log = logging.getLogger("cachegate.supervisor")

PURGE_ACK_TIMEOUT = 10.0  # seconds a worker has to drop purged keys before it is killed
LOCK_WAIT_CONFIRM = 0.1  # seconds between two looks at a silent worker's wait for a lock
PING_INTERVAL = 5.0  # seconds between two liveness pings of a worker (at most worker_timeout / 2)
READY_TIMEOUT = 60.0  # seconds a worker has from its start to say it is ready (any start)
# Seconds a worker has to apply a reload (at least: ``worker_reload_bound``); past them it drops
# the reload and keeps its config, so that the supervisor's answer that it does is true.
WORKER_RELOAD_WAIT = 30.0
WORKER_RELOAD_SLOWER = 3.0  # ... or this many times the supervisor's own load of the same files
RELOAD_ANSWER_MARGIN = 5.0  # seconds past that bound the supervisor waits for the worker's answer
MAX_BACKOFF = 30.0
# Why a worker is not restarted when cachegate was installed over the running supervisor.
INSTALLED_CHANGED = ("the installed cachegate changed under the running supervisor (its files are not "
                     "the code this supervisor runs)")
REAP_WAIT = 5.0  # seconds a reload waits for a worker whose channel closed to be reaped
STOP_DEADLINE_MARGIN = 5.0  # seconds past shutdown_grace before a stopping worker is killed


@dataclass
class Worker:
    worker_id: int
    process: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = 0.0
    backoff: float = 0.5
    restarts: int = 0
    # Why it is not restarted (its code is not this supervisor's: ``_code_changed``), or None.
    given_up: str | None = None
    quick_exits: int = 0  # exits in a row soon after a start (``looping``)
    last_exit: int | None = None  # its last exit status
    last_was_ready: bool = False  # whether its last process to exit had become ready
    last_oom: bool = False  # whether its last process's death was put down to the OOM killer (``oom_death``)
    # Its cgroup's count of OOM kills when its process was last seen alive (read before its
    # start, and before each ping it answered): a kill counted since may be its own (``oom_death``).
    oom_seen: int | None = None
    # The last of its processes this supervisor killed: (pid, cause, why), for a reload that
    # waited for it (``ReplacedWorker``): the watchdog, a purge not acknowledged, not ready.
    killed: tuple[int, str, str] | None = None
    # The signal a process of it said stops it, one the supervisor did not send (``kill -TERM``
    # by an operator or a tool): (pid, signal name), for what its exit is said as (``_exited``).
    stopped_by: tuple[int, str] | None = None
    # Whether its process may accept connections: set by its ``listen`` call, just before its
    # listeners open; a purge waits for its acknowledgement from then on. Before, the purges
    # sent to it are not waited for (``starting_purges``: ``Supervisor._purge_starting``).
    listening: bool = False
    starting_purges: set[asyncio.Task[int]] = field(default_factory=set)

    def health(self) -> WorkerHealth:
        process = self.process
        serving = process is not None and process.returncode is None and self.ready.is_set()
        return WorkerHealth(self.worker_id, serving, self.quick_exits, self.last_exit,
                            self.given_up is not None, self.last_was_ready, self.last_oom)


@dataclass(frozen=True)
class WorkerHealth:
    """What /healthz needs to know of one worker (``workers_health``)."""

    worker_id: int
    serving: bool  # running and ready: its listeners accept
    quick_exits: int
    last_exit: int | None
    given_up: bool  # not restarted any more (``Runtime.degraded`` says why)
    last_was_ready: bool = False  # its last process to exit had become ready
    last_oom: bool = False  # its last process's death was put down to the kernel's OOM killer

    @property
    def looping(self) -> bool:
        """Exiting soon after its starts: twice in a row, or once before it became ready. One
        death soon after it became ready (a kill, an OOM) is a crash, not a start-up loop."""
        return self.quick_exits >= 2 or (self.quick_exits == 1 and not self.last_was_ready)


def workers_health(workers: Sequence[WorkerHealth]) -> str | None:
    """Why the workers do not all serve, for /healthz (503 "degraded"), or None. A worker
    restarted at once after a crash (after it became ready, the first time that it died young
    too) does not count while its siblings serve; one that keeps exiting soon after its starts,
    or exits before it is ready (in backoff), does; and when no worker serves, nothing accepts
    on the client listeners, whatever the reason.

    >>> workers_health([WorkerHealth(0, True, 0, None, False), WorkerHealth(1, False, 0, -9, False)])
    >>> workers_health([WorkerHealth(0, False, 3, 2, False)])
    'no worker serves (1 configured): worker 0 keeps exiting (status 2, 3 times in a row)'
    >>> workers_health([WorkerHealth(0, True, 0, None, False), WorkerHealth(1, False, 1, 2, False)])
    '1 of 2 workers serve: worker 1 exited before it became ready (status 2)'
    >>> oom = WorkerHealth(1, False, 2, -9, False, last_was_ready=True, last_oom=True)
    >>> print(workers_health([WorkerHealth(0, True, 0, None, False), oom]))
    1 of 2 workers serve: worker 1 keeps exiting (status -9, likely the kernel's OOM killer, 2 times in a row)
    """
    serving = sum(1 for w in workers if w.serving)
    looping = [w for w in workers if not w.serving and not w.given_up and w.looping]

    def status(w: WorkerHealth) -> str:
        return f"status {w.last_exit}" + (", likely the kernel's OOM killer" if w.last_oom else "")

    why = "; ".join(f"worker {w.worker_id} keeps exiting ({status(w)}, {w.quick_exits} times in a row)"
                    if w.quick_exits > 1 else
                    f"worker {w.worker_id} exited before it became ready ({status(w)})"
                    for w in looping)
    if serving == 0:
        return f"no worker serves ({len(workers)} configured)" + (f": {why}" if why else "")
    if looping:
        return f"{serving} of {len(workers)} workers serve: {why}"
    return None


class ConfigCopy:
    """The config file, its rule files, the TLS listeners' certificate and key files and
    ``upstream.tls.ca_file`` as the supervisor last loaded them good, for its workers: one snapshot file
    (``proxy.yamlsrc.dump_snapshot``: each file's bytes by path) in a private temporary
    directory (``path``). It holds the bytes that load read and validated
    (``Settings.sources``), never the files read again: a worker loads it with
    ``display=original`` (``load_config``), from the snapshot alone, so a restarted worker runs
    exactly its siblings' config, rule files and certificates included, whatever happened to
    the files since (edited and not reloaded yet, broken, removed). Messages name the original,
    and its relative paths (rule files, the cache directory) resolve as before. A reload writes
    the new snapshot to ``staged``, then moves it in place (``commit``).

    The directory is this process's own, mode 0700 (``_private_directory``), the file 0600: the
    snapshot holds the admin token, TLS private keys and whatever the rule files say, and a
    worker must never load one another user put there."""

    def __init__(self, original: str, files: Mapping[str, bytes]) -> None:
        self.original = original
        remove_stale_copies()
        # Named by this process, so that a later supervisor finds it left behind (``close``
        # does not run when this one is killed) and removes it.
        self.directory = tempfile.mkdtemp(prefix=f"{COPY_PREFIX}{os.getpid()}-")
        self.path = os.path.join(self.directory, "config.snapshot")
        self.staged = os.path.join(self.directory, "config.snapshot.next")
        self._text = dump_snapshot(files)  # kept: see ``current``
        try:
            self._write(self.path, self._text)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _write(path: str, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def _private_directory(self) -> None:
        """Make sure the copy's directory is still this process's own (mode 0700, this user's,
        not a link); else take a new one. Why not re-create the same path: its name is visible
        in the temporary directory, and once a cleaner removed it another user could make a
        directory of that name first, then read the config (an admin token) and put theirs
        in its place for the next worker."""
        try:
            st = os.lstat(self.directory)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
                return
        except OSError:
            st = None
        old = self.directory
        self.directory = tempfile.mkdtemp(prefix=f"{COPY_PREFIX}{os.getpid()}-")
        self.path = os.path.join(self.directory, "config.snapshot")
        self.staged = os.path.join(self.directory, "config.snapshot.next")
        # One copy per supervisor: what is left of the old one goes (this user's directory
        # only; another's, in a sticky temporary directory, could not be removed anyway).
        if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            shutil.rmtree(old, ignore_errors=True)

    def commit(self, files: Mapping[str, bytes]) -> None:
        """The files a reload loaded good become what workers load (before they reload)."""
        self._private_directory()  # removed by a cleaner: see ``current``
        text = dump_snapshot(files)
        self._write(self.staged, text)
        os.replace(self.staged, self.path)  # atomic: a worker starting now reads one or the other
        self._text = text

    def current(self) -> str:
        """The copy's path for a worker starting now, written again from memory when something
        removed it: a supervisor runs for months, and temporary-file cleaners (systemd-tmpfiles:
        10 days unused) delete files in the temporary directory."""
        self._private_directory()
        if not os.path.isfile(self.path):
            self._write(self.path, self._text)
        return self.path

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


COPY_PREFIX = "cachegate-config-"


def remove_stale_copies() -> None:
    """Remove the config copies (``ConfigCopy``) of supervisors that are gone (killed: theirs
    stayed in the temporary directory), this user's only."""
    where = tempfile.gettempdir()
    try:
        names = os.listdir(where)
    except OSError:
        return
    for name in names:
        m = re.fullmatch(re.escape(COPY_PREFIX) + r"(\d+)-\w+", name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _running(pid):
            continue
        path = os.path.join(where, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not reaped yet) is gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def supervise(settings: Settings, config_path: str | None, overrides: Overrides,
              use_uvloop: bool = True) -> int:
    return run_async(earlysignals.held_at_end(Supervisor(settings, config_path, overrides, use_uvloop).run()),
                     use_uvloop)


def worker_environment(path: Sequence[str] | None = None, cwd: str | None = None,
                       environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """The environment the workers start with (None: this process's own), so that ``python -P``
    imports the ``proxy`` package this process runs.

    ``-P`` leaves the current directory off the workers' ``sys.path`` (a ``proxy/`` planted
    there must not run). A supervisor started as ``python -m proxy`` from a checkout that is
    not installed imported its ``proxy`` from there only because it was the current directory:
    its workers could not import it at all ("No module named 'proxy'"), restarted for ever. Then
    that one directory, absolute, goes first on their ``PYTHONPATH``; nothing else is added."""
    path = sys.path if path is None else path
    cwd = os.getcwd() if cwd is None else cwd
    environ = os.environ if environ is None else environ
    home = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds proxy/
    as_cwd = {"", cwd, os.curdir}
    if not any(entry in as_cwd or os.path.abspath(entry) == cwd for entry in path[:1]) \
            or home != os.path.abspath(cwd):
        return None  # not imported from the current directory
    if any(entry and os.path.abspath(entry) == home for entry in path[1:]):
        return None  # on the path anyway: the workers find it there
    before = environ.get("PYTHONPATH", "")
    return {**environ, "PYTHONPATH": home + (os.pathsep + before if before else "")}



def _stopped_by(w: Worker, pid: int, code: int | None) -> str | None:
    """The signal a worker's process ``pid`` said it was stopped by, sent to it alone (``kill
    -TERM`` by an operator or a tool), when it then exited cleanly; else None."""
    told = w.stopped_by
    return told[1] if code == 0 and told is not None and told[0] == pid else None

class Supervisor:
    def __init__(self, settings: Settings, config_path: str | None, overrides: Overrides,
                 use_uvloop: bool = True) -> None:
        self.settings = settings
        self.config_path = config_path
        self.overrides = overrides
        self.use_uvloop = use_uvloop
        # The code this process runs, as its workers must run it (``proxy.codeid``): hashed now,
        # before anything could be installed over it.
        self.code_id = identity()
        self._worker_env = worker_environment()
        self.workers = [Worker(i) for i in range(settings.workers)]
        self.stopping = False
        self.runtime: Runtime | None = None
        self._ports: tuple[int, ...] = tuple(li.port for li in settings.listeners)  # as reserved
        # The addresses reserved, as the workers' listeners name them (``cachegate_tls_*``'s
        # ``listener``: ``localhost`` bound as ``127.0.0.1``): the configured hosts until then.
        self._hosts: tuple[str, ...] = tuple(li.host for li in settings.listeners)
        self._port_locks: list[HeldLock] = []  # one per reserved address, held while running
        self._config: ConfigCopy | None = None  # what workers read (None: the file itself)
        # Per listener, the TLS certificate and key the workers serve (``served_after_reload``):
        # what a restarted worker starts with (``with_restart_only``).
        self._served_tls = tuple(settings.pem(li.tls) if li.tls is not None else None
                                 for li in settings.listeners)
        # Their certificates' dates, warned of while it runs (this process warns at a start and
        # at reloads; the workers stay silent): ``_run`` starts it when a listener is TLS.
        self._expiry = ExpiryWatch(self._tls_served)
        self._uncommitted: str | None = None  # why the last reload's copy could not be written
        self._tasks: set[asyncio.Task[Any]] = set()
        # Calls the workers may make to the supervisor, by name (features add their own);
        # each gets the calling worker's id as ``worker_id`` besides the call's arguments.
        self.worker_calls: dict[str, Callable[..., Awaitable[Any]]] = {}
        # Cross-worker coalescing: one origin fetch per key for all the workers (the lease table
        # is in the shared memory; the supervisor tells waiters and clears a dead worker's leases).
        self.leases = LeaseRelay(None, self._notify_worker)
        self.worker_calls.update(self.leases.calls())
        # systemd's Type=notify (taken out of the environment: the workers must not notify).
        self.notifier = Notifier.take()
        self._serving: str | None = None  # the STATUS= line once every worker was ready
        self._reloading = 0  # reloads announced (RELOADING=1) and not over: READY=1 when none is
        self._reload_turn = asyncio.Lock()  # ``_reload_here``: one at a time, in order
        self._loaded_in = 0.0  # seconds the last reload here took to load (``worker_reload_bound``)
        # The watchdog's bookkeeping (``_unresponsive``): workers it killed that are not reaped
        # yet, and workers that waited for a lock of a process it killed (pid -> when).
        self._killed: set[int] = set()
        self._freed: dict[int, float] = {}
        # Set by ``_run``: stopping it; and whether a failure stopped it (exit status 1): a worker's
        # start-up failure, or no worker left that can run the installed code (``_code_changed``).
        self._stop: asyncio.Event | None = None
        self._failed = False
        # The OOM kills of this process's cgroup accounted for: those counted at the start, and
        # each one a worker's death was put down to (``proxy.oom.oom_death``).
        self._oom_accounted = cgroup_oom_kills()

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> int:
        check_c_parser()
        try:
            reserved = self._reserve_ports()
        except OSError as exc:
            tell(f"cachegate: cannot listen: {exc}")
            return 1
        setup_logging(worker="supervisor")
        # A worker, not the supervisor, is the one the kernel's OOM killer ends (``proxy.oom``):
        # the workers raise theirs, started from this one.
        lower_supervisor_score()
        if self.config_path is not None:
            try:
                self._config = ConfigCopy(self.config_path, dict(self.settings.sources))
            except OSError as exc:  # no private temporary directory: workers read the file
                log.warning("cannot keep a copy of the config for the workers (%s); a restarted "
                            "worker reads %s as it is then", exc, self.config_path)
        try:
            return await self._run(reserved)
        finally:
            if self._config is not None:
                self._config.close()

    async def _run(self, reserved: list[socket.socket]) -> int:
        opened = await open_runtime(self.settings, owner=True, processes=self.settings.workers)
        if opened is None:
            self._release(reserved)
            return 1
        runtime = self.runtime = opened
        runtime.workers_health = lambda: workers_health([w.health() for w in self.workers])
        runtime.metrics.process_label = "supervisor"
        for w in self.workers:  # at 0 from the start (``proxy.metrics.KNOWN_LABELS`` says why)
            for reason in WORKER_END_REASONS:
                runtime.metrics.worker_restarts.labels(str(w.worker_id), reason)
        self.leases.table = LeaseTable(runtime.storage.memory.arena)
        runtime.metrics.add_collector(self.leases.collect)
        runtime.purge_fn = self.purge
        reloader = install_reloader(runtime, self.config_path, self.overrides, counted=False)  # (``reload``)
        runtime.reload_config = lambda: self.reload(reloader)
        listeners = Listeners()
        try:
            # (purges: ``runtime.purge``, which calls ``self.purge`` and counts those that fail)
            admin = await start_admin_listener(runtime, self.settings, None,
                                               Inspector(runtime, self.call_each))
        except OSError as exc:
            tell(f"cachegate: cannot listen: {exc}")
            await runtime.close()
            self._release(reserved)
            return 1
        if admin is not None:
            listeners.runners.append(admin)
            listeners.admin_addresses = _bound(admin)
        if self.settings.cluster is not None:
            # The node's member of the cluster: caught up before any worker serves.
            try:
                await join_cluster(runtime, self.purge_here, workers=len(self.workers),
                                   call_workers=self.call_all, port=self._ports[0])
            except ClusterUnavailable as exc:
                tell(f"cachegate: {exc}")
                await listeners.stop(0)
                await runtime.close()
                self._release(reserved)
                return 1
        loop = asyncio.get_running_loop()
        stop = self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload_in_background, runtime)
        self._track(self.notifier.keep_watchdog())  # until the process exits, the drain included
        if any(self._served_tls):
            self._track(self._expiry.run())
        # What came during the start-up (``proxy.earlysignals``): done now.
        if any([earlysignals.take(signal.SIGTERM), earlysignals.take(signal.SIGINT)]):
            stop.set()
        elif earlysignals.take(signal.SIGHUP):
            await runtime.reload_config()  # before any worker starts: they read what it loads
        for w in self.workers:
            self._spawn_soon(w, 0)
        status = 0
        try:
            waits = [asyncio.ensure_future(w.ready.wait()) for w in self.workers]
            stopped = asyncio.ensure_future(stop.wait())
            deadline = time.monotonic() + ready_timeout()
            while not stop.is_set() and not all(w.ready.is_set() for w in self.workers):
                await asyncio.wait([*waits, stopped], timeout=max(0.0, deadline - time.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)
                if time.monotonic() >= deadline:
                    break
            for t in (*waits, stopped):
                t.cancel()
            if not stop.is_set():
                if not all(w.ready.is_set() for w in self.workers):
                    tell("cachegate: workers did not start in time")
                    status = 1
                    stop.set()
                else:
                    proxy_urls = [f"{li.scheme}://{_fmt(li.host)}:{port}"
                                  for li, port in zip(self.settings.listeners, self._ports, strict=True)]
                    for url in proxy_urls:
                        say(f"cachegate: proxy listening on {url} ({len(self.workers)} workers)")
                    admin_urls = [f"http://{_fmt(h)}:{p}" for h, p in listeners.admin_addresses]
                    for url in admin_urls:
                        say(f"cachegate: admin listening on {url}")
                    say_started(self.settings, proxy_urls, admin_urls, len(self.workers))
                    gctuning.settle()
                    runtime.state = "ready"
                    self._serving = f"serving {', '.join(proxy_urls)} with {len(self.workers)} workers"
                    self.notifier.ready(self._serving)
            await stop.wait()
        finally:
            self.stopping = True
            runtime.state = "stopping"
            self.notifier.stopping()
            ignore_while_stopping(loop, (signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
            log.info("shutting down: stopping the workers (grace %gs)", self._grace())
            deadline = loop.time() + self._grace()
            if not await self._stop_workers():
                status = EXIT_FAILURE
            await listeners.stop(max(0.0, deadline - loop.time()))  # the admin API's requests
            for t in list(self._tasks):
                t.cancel()
            await runtime.close(max(0.0, deadline - loop.time()))  # (the last commit to disk: what is left)
            self._release(reserved)
        say("cachegate: stopped", event="stopped")
        return 1 if self._failed else status

    def _grace(self) -> float:
        """shutdown_grace of the config running now (a reload applies it at once)."""
        runtime = self.runtime
        return (runtime.settings if runtime is not None else self.settings).shutdown_grace

    def _reserve_ports(self) -> list[socket.socket]:
        """One bound, not listening, SO_REUSEPORT socket per client listener (see the module
        docstring); each listener's port 0 resolves here, once for every worker."""
        reserved: list[socket.socket] = []
        try:
            for listener in self.settings.listeners:
                host, port = listener.address
                try:
                    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
                except OSError as exc:  # ("[Errno -2] Name or service not known" named no address)
                    raise OSError(f"listen {_fmt(host)}:{port}: {exc.strerror or exc}") from None
                family, _, _, _, addr = infos[0]
                if port and _accepting(family, addr):
                    raise OSError(port_in_use(f"{_fmt(host)}:{port}", port, "this listener"))
                sock = socket.socket(family, socket.SOCK_STREAM)
                reserved.append(sock)
                try:
                    if port:
                        _bind_alone(family, addr)
                    _reusing(sock, family, reuse_port=True)
                    sock.bind(addr)
                except OSError as exc:  # a connection's local end, a low port: "[Errno 98]" alone
                    why = bind_refused(f"{_fmt(host)}:{port}", port, "this listener", exc)
                    raise OSError(why or f"listen {_fmt(host)}:{port}: {exc.strerror or exc}") from None
                self._lock_address(family, sock.getsockname())
        except OSError:
            self._release(reserved)
            raise
        self._ports = tuple(sock.getsockname()[1] for sock in reserved)
        self._hosts = tuple(sock.getsockname()[0] for sock in reserved)
        return reserved

    def _lock_address(self, family: int, bound: Any) -> None:
        """The lock of one reserved address (its port resolved), or OSError naming the holder."""
        where = runtime_dir()
        if where is None:  # no private directory for locks: the connect probe has to do
            log.warning("no private runtime directory for port locks; relying on a connect probe")
            return
        host, port = str(bound[0]), int(bound[1])
        name = f"port-{'6' if family == socket.AF_INET6 else '4'}-{host.replace(':', '_')}-{port}.lock"
        try:
            self._port_locks.append(HeldLock(os.path.join(where, name), unlink=True))
        except LockTaken as exc:
            if any(lock.path == exc.path for lock in self._port_locks):  # two listeners, one address
                raise OSError(f"{_fmt(host)}:{port} is taken by two of this cachegate's listeners "
                              "(listen: one address written twice, or two ways)") from None
            raise OSError(f"{_fmt(host)}:{port} is in use by another cachegate ({exc.holder})") from None

    def _release(self, reserved: list[socket.socket]) -> None:
        """Close the reserved sockets and give their addresses' locks up."""
        for sock in reserved:
            sock.close()
        for lock in self._port_locks:
            lock.release()
        self._port_locks.clear()

    def _track(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn_soon(self, w: Worker, delay: float, after: int | None = None) -> None:
        """Start ``w`` in ``delay`` seconds; ``after``: the pid of its process that exited (a
        restart), which is not made when the installed code is no longer this supervisor's."""
        async def later() -> None:
            if delay:
                await asyncio.sleep(delay)
                if after is not None and not self.stopping and await self._installed_differs():
                    self._code_changed(w, after, w.last_exit)  # (installed during the backoff)
                    return
            if not self.stopping:
                await self._spawn(w)

        self._track(later())

    async def _spawn(self, w: Worker) -> None:
        parent_end, child_end = socket.socketpair()
        overrides = replace(self.overrides, workers="1", admin_listen="off")
        assert self.runtime is not None
        arena_fd = self.runtime.storage.memory.arena.fd  # the machine's shared memory
        # What only a restart changes, as this supervisor runs it (``with_restart_only``): in a
        # memfd, not on the command line, which every user can read (a Redis password).
        running_fd = os.memfd_create("cachegate-running", os.MFD_CLOEXEC)
        try:
            os.write(running_fd, pickle.dumps({**restart_only(self.settings, self._ports),
                                               "served_tls": self._served_tls}))
        except BaseException:
            os.close(running_fd)
            raise
        # -P: not the current directory first on sys.path (as -m puts it), where a ``proxy/``
        # package (planted in /tmp, another version's checkout) would run in every worker.
        args = [sys.executable, "-P", "-m", "proxy.supervisor", "worker", CODE_ID_ARG, self.code_id,
                "--supervisor-pid", str(os.getpid()),
                "--worker-id", str(w.worker_id), "--control-fd", str(child_end.fileno()),
                "--arena-fd", str(arena_fd), "--running-fd", str(running_fd),
                "--overrides", json.dumps(asdict(overrides))]
        if self._config is not None:
            args += ["--config", self._config.current(), "--config-as", self._config.original]
        elif self.config_path is not None:
            args += ["--config", self.config_path]
        if not self.use_uvloop:
            args.append("--no-uvloop")
        args += ["--log-level", logging.getLevelName(logging.getLogger().level).lower()]
        w.ready.clear()
        w.listening = False
        w.starting_purges = set()
        w.oom_seen = cgroup_oom_kills()  # (before it runs: no kill counted yet can be its own)
        try:
            w.process = await asyncio.create_subprocess_exec(
                *args, pass_fds=(child_end.fileno(), arena_fd, running_fd), env=self._worker_env)
        except OSError as exc:
            parent_end.close()
            child_end.close()
            runtime = self.runtime
            if runtime is not None and runtime.state == "starting" and self._stop is not None:
                # Not even exec'd: an interpreter this user cannot run (a virtualenv of pyenv's
                # Python in /root, under ProtectHome=). Nor would a retry be, for ever: the start
                # fails, once, and the service manager says so (not after TimeoutStartSec).
                if not self._failed:
                    log.error("cannot start worker %d: %s: %s; stopping (make the virtualenv with the "
                              "system's Python, which the service's user can run)", w.worker_id,
                              sys.executable, exc.strerror or exc)
                self._failed = True
                self._stop.set()
                return
            log.error("cannot start worker %d: %s", w.worker_id, exc)
            self._spawn_soon(w, self._next_backoff(w))
            return
        finally:
            child_end.close()
            os.close(running_fd)
        raise_worker_score(w.process.pid, "self")  # at once: the worker does too, later (``proxy.oom``)
        w.started_at = time.monotonic()
        w.channel = await Channel.open(parent_end, self._handlers(w), name=f"worker {w.worker_id}")
        self._tell_node(w.channel)
        say(f"cachegate: worker {w.worker_id} started (pid {w.process.pid})", event="worker_started",
            worker_id=w.worker_id, pid=w.process.pid)
        self._track(self._watch(w, w.process, w.channel))
        self._track(self._ready_deadline(w, w.process))

    async def _ready_deadline(self, w: Worker, process: asyncio.subprocess.Process) -> None:
        """Kill a worker that is not ready within ``ready_timeout`` of its start (``_watch``
        restarts it, with backoff): hung before its ready call (a stuck import, a cache directory
        on a dead NFS mount, a stopped process), it would never be pinged (``_watchdog`` starts
        at ready) and would hold its share of the port's connections with its listener up."""
        timeout = ready_timeout()
        ready = asyncio.ensure_future(w.ready.wait())
        exited = asyncio.ensure_future(process.wait())
        try:
            await asyncio.wait([ready, exited], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            exited.cancel()
        if self.stopping or w.process is not process or process.returncode is not None or w.ready.is_set():
            return
        log.error("worker %d (pid %d) was not ready within %gs; killing it", w.worker_id, process.pid,
                  timeout)
        say(f"cachegate: worker {w.worker_id} (pid {process.pid}) not ready after {timeout:g}s; killing it",
            event="worker_not_ready", worker_id=w.worker_id, pid=process.pid)
        w.killed = (process.pid, "not_ready", f"was killed (not ready {timeout:g} s after its start)")
        with contextlib.suppress(ProcessLookupError):
            process.kill()

    def _handlers(self, w: Worker) -> dict[str, Any]:
        async def ready(worker_id: int, pid: int) -> None:
            w.ready.set()
            process, channel = w.process, w.channel
            if process is not None and channel is not None:
                self._track(self._watchdog(w, process, channel))
            say(f"cachegate: worker {worker_id} ready (pid {pid})", event="worker_ready",
                worker_id=worker_id, pid=pid)

        async def listen(worker_id: int, pid: int) -> None:
            # Its listeners open once this is answered: from now on a purge waits for it, and
            # the purges sent while it started are applied first (``_purge_starting``).
            w.listening = True
            await asyncio.gather(*w.starting_purges, return_exceptions=True)

        async def purge(spec: dict[str, Any]) -> dict[str, Any]:
            return (await self.purge(PurgeSpec.from_json(spec))).to_json()

        async def stopped_by(pid: int, signal: str) -> None:
            w.stopped_by = (pid, signal)

        calls: dict[str, Any] = {
            name: functools.partial(fn, worker_id=w.worker_id) for name, fn in self.worker_calls.items()}
        calls.update({"ready": ready, "listen": listen, "purge": purge, "stopped_by": stopped_by})
        return calls

    def _tell_node(self, channel: Channel) -> None:
        """Tell a worker just spawned what the node's member (this supervisor) last told the
        others: when its heartbeat expires and whether hits wait, whether it is cut off from Redis,
        whether invalidations wait for it. Said as its channel opens, so that the worker has it
        before it serves (a supervisor stopped before its next heartbeat would leave it serving
        without a deadline); every later word goes to every open channel (``call_all``), in order."""
        node = self.runtime.cluster if self.runtime is not None else None
        if node is None:
            return
        if node.invalidations_pending:
            self._track(_tell_quietly(channel, OUTBOX_CALL, pending=True))
        n, deadline, held, away = node.beat_word()
        self._track(_tell_quietly(channel, BEAT_CALL, n=n, deadline=deadline, held=held, away=away))

    def _next_backoff(self, w: Worker) -> float:
        delay = w.backoff
        w.backoff = min(w.backoff * 2, MAX_BACKOFF)
        return delay

    async def _watch(self, w: Worker, process: asyncio.subprocess.Process, channel: Channel) -> None:
        try:
            code = await process.wait()
            self._killed.discard(process.pid)
            self._freed.pop(process.pid, None)
            await self.leases.worker_gone(w.worker_id)
        finally:
            # (also when the stop cancels this watch while it waits: the channel's transport was
            # left open, and the loop's close warned of it: ResourceWarning at every stop)
            await channel.close()
        if w.process is process:
            w.channel = None
        if self.stopping:
            return  # (the next start sweeps what a stop leaves)
        self._track(self._sweep_spools_of(process.pid))
        if code == EXIT_CACHE_DIR and self.runtime is not None and self.runtime.state == "starting" \
                and self._stop is not None:
            # It could not open the cache directory (its line says why: a full filesystem, say):
            # nor would its restarts, so the start fails, once, instead of looping.
            if not self._failed:  # (its siblings, that met the same, are not restarted either)
                log.error("worker %d (pid %d) cannot open the cache directory; stopping", w.worker_id,
                          process.pid)
            self._ended(w, process.pid, code, None)
            self._failed = True
            self._stop.set()
            return
        if code == EXIT_CODE_CHANGED or await self._installed_differs():
            # (the second: an older release installed over this one, a rollback, has no check of
            # its own: its worker refused this supervisor's arguments, exit 2, restarted for ever)
            if not self.stopping:
                self._ended(w, process.pid, code, None)
                self._code_changed(w, process.pid, code)
            return
        w.restarts += 1
        w.last_exit = code
        w.last_was_ready = w.ready.is_set()
        died = self._death_cause(w, process.pid, code)
        self._ended(w, process.pid, code, died)
        # A worker that lived a while is restarted at once, and so is one that died once soon
        # after it became ready (a kill, an OOM: a crash, not a loop); one that keeps dying, or
        # that never became ready, with backoff (and /healthz says so: ``workers_health``).
        if w.ready.is_set() and time.monotonic() - w.started_at > 10:
            w.backoff = 0.5
            w.quick_exits = 0
            delay = 0.0
        else:
            w.quick_exits += 1
            first_crash = w.quick_exits == 1 and w.last_was_ready
            delay = 0.0 if first_crash else self._next_backoff(w)
        w.last_oom = died is not None and died[1]
        self._exited(w, process.pid, code, died, delay)
        self._spawn_soon(w, delay, after=process.pid)

    def _ended(self, w: Worker, pid: int, code: int, died: tuple[str, bool, str] | None) -> None:
        """Count a worker's process that ended without the supervisor stopping it, restarted or
        not (``cachegate_worker_restarts_total``: the supervisor's, so a scrape after the new
        process started still has it), by why (``WORKER_END_REASONS``): ``hung`` when the
        supervisor killed it itself (the watchdog, not ready in time, a purge not acknowledged:
        ``Worker.killed``), ``oom`` for a death put down to the OOM killer (``died``), ``signal``
        for any other signal, and for a SIGTERM sent to it alone, after which it stops cleanly
        (status 0, ``stopped_by``: the log says so, and an operator's ``exit`` would look for a
        crash), ``exit`` for an exit status (0 too: it was not asked)."""
        if w.killed is not None and w.killed[0] == pid:
            reason = "hung"
        elif died is not None and died[1]:
            reason = "oom"
        else:
            reason = "signal" if code < 0 or _stopped_by(w, pid, code) is not None else "exit"
        runtime = self.runtime
        if runtime is not None:
            runtime.metrics.worker_restarts.labels(str(w.worker_id), reason).inc()

    def _exited(self, w: Worker, pid: int, code: int | None, died: tuple[str, bool, str] | None,
                delay: float) -> None:
        """Say that a worker's process exited, which the supervisor did not ask: a crash, a kill
        (ERROR); or a clean exit (status 0: WARNING, unexpected but no crash): a stop by a
        signal sent to it alone, which it told (``stopped_by``: ``kill -TERM`` by an operator or
        a tool), or on its own. It was said as a crash: "exited with 0", at ERROR."""
        by = _stopped_by(w, pid, code)
        if code == 0:
            how = (f"was stopped by a {by} sent to it (not by the supervisor)" if by is not None
                   else "exited on its own (status 0), without the supervisor asking")
            log.warning("worker %d (pid %d) %s; restarting in %.1fs", w.worker_id, pid, how, delay)
            say(f"cachegate: worker {w.worker_id} (pid {pid}) {how}; restarting", level="warning",
                event="worker_exited", worker_id=w.worker_id, pid=pid, code=code, signal=None,
                stopped_by=by, oom_killed=False)
            return
        how = f" ({died[2]})" if died is not None else ""
        log.error("worker %d (pid %d) exited with %s%s; restarting in %.1fs", w.worker_id, pid, code, how,
                  delay)
        say(f"cachegate: worker {w.worker_id} (pid {pid}) exited with {code}{how}; restarting",
            event="worker_exited", worker_id=w.worker_id, pid=pid, code=code,
            signal=died[0] if died is not None else None, oom_killed=w.last_oom)

    def _death_cause(self, w: Worker, pid: int, code: int | None) -> tuple[str, bool, str] | None:
        """How a worker's process (``pid``) that exited with ``code`` died, when a signal ended
        it: (the signal's name, whether it is put down to the kernel's OOM killer, a phrase for
        the log); None when it exited by itself. A SIGKILL is put down to the OOM killer when
        its cgroup's count of OOM kills rose since the worker was last seen alive by a kill no
        other death took (``proxy.oom.oom_death``), never when the supervisor sent it itself
        (the watchdog, a purge not acknowledged, not ready in time)."""
        name = signal_name(code)
        if name is None:
            return None
        oom = False
        if code == -signal.SIGKILL and not (w.killed is not None and w.killed[0] == pid):
            oom, self._oom_accounted = oom_death(cgroup_oom_kills(), w.oom_seen, self._oom_accounted)
        if not oom:
            return name, False, f"killed by {name}"
        limit = cgroup_memory_limit()
        settings = self.runtime.settings if self.runtime is not None else self.settings
        needs = memory_needed_text(settings.cache.memory, len(self.workers))
        where = (f"the memory limit of its cgroup: {human_size(limit)}; it needs {needs}" if limit is not None
                 else f"the machine's memory ran out; cachegate needs {needs}")
        return name, True, (f"{name}: likely the kernel's OOM killer, its cgroup's count of OOM kills rose "
                            f"while it ran ({where})")

    async def _installed_differs(self) -> bool:
        """Whether the installed code is no longer the code this supervisor runs (and passes its
        workers): asked when a worker exited, before it is restarted. A worker of this release or
        a later one tells by itself (``EXIT_CODE_CHANGED``), but an older release installed over
        this one (a rollback) has no such check. Hashing the package takes a few ms (7 on a busy
        2-core machine): in a thread, and only when a worker exits."""
        return await asyncio.to_thread(identity) != self.code_id

    def _code_changed(self, w: Worker, pid: int, code: int | None) -> None:
        """A worker (its last process: ``pid``) exited, and cachegate was installed over the
        running one: the worker said so (``proxy.codeid``; ``code`` is ``EXIT_CODE_CHANGED``), or
        the installed files no longer hash as this supervisor's code (``_installed_differs``).
        Every restart would run the new code and exit the same (or refuse this supervisor's
        arguments), so it is not restarted: the instance runs a worker short until the service is
        restarted, and ``/healthz`` says so (503, degraded). When no worker runs any more, and
        during the start-up, the supervisor stops instead, with exit status 1: the service
        manager (``Restart=on-failure``) starts the new version."""
        w.given_up = CODE_CHANGED
        w.last_exit = code
        exited = "exited" if code == EXIT_CODE_CHANGED else f"exited with {code}"
        runtime = self.runtime
        running = sum(1 for o in self.workers if o.given_up is None)
        if self._stop is not None and (running == 0 or (runtime is not None and runtime.state == "starting")):
            if not self._failed:
                log.error("worker %d (pid %d) %s: %s. %s: stopping (exit status 1), so that the service "
                          "manager starts the new version", w.worker_id, pid, exited, INSTALLED_CHANGED,
                          "No worker runs any more" if running == 0 else "The start fails")
            self._failed = True
            self._stop.set()
            return
        log.error("worker %d (pid %d) %s: %s. Not restarting it: %d of %d workers run until the "
                  "service is restarted", w.worker_id, pid, exited, INSTALLED_CHANGED, running,
                  len(self.workers))
        say(f"cachegate: worker {w.worker_id} (pid {pid}) {exited}: the installed cachegate changed; "
            "not restarting it", event="worker_code_changed", worker_id=w.worker_id, pid=pid, code=code)
        if runtime is not None:
            gone = [str(o.worker_id) for o in self.workers if o.given_up is not None]
            which = f"worker{'s' if len(gone) > 1 else ''} {', '.join(gone)}"
            runtime.degraded = (f"{running} of {len(self.workers)} workers run: {which} cannot start "
                                "because the installed cachegate changed under the running supervisor; "
                                "restart the service to run the new version")

    async def _sweep_spools_of(self, pid: int) -> None:
        """A dead worker's spool files (the bodies it was receiving) count against the disk budget
        and nobody's spool room: removed at once, not at the next hourly sweep (12 workers killed
        mid-fill left 15 MB of a 32 MB budget behind)."""
        if self.runtime is None:
            return
        try:
            removed = await self.runtime.storage.sweep_dead_spools()
        except Exception:
            log.exception("removing the spool files of worker pid %d failed", pid)
            return
        if removed:
            log.info("removed %d spool folder(s) and orphaned bodies of worker pid %d", removed, pid)

    async def _watchdog(self, w: Worker, process: asyncio.subprocess.Process, channel: Channel) -> None:
        """Ping a ready worker every few seconds; kill it (``_watch`` restarts it) when it does
        not answer within ``worker_timeout``: its event loop is stuck, and the connections the
        kernel keeps handing it would wait forever. The ping is answered by the worker's loop
        (``proxy.web.server``), so it tests exactly what clients need. A worker silent because
        it waits for a lock of the shared memory that another process holds is not the one
        killed: ``_unresponsive``."""
        while True:
            timeout = self._worker_timeout()
            await asyncio.sleep(min(PING_INTERVAL, timeout / 2))
            if self.stopping or process.returncode is not None or channel.closed.is_set():
                return
            sent = time.monotonic()
            seen = cgroup_oom_kills()  # (read before: a kill it counts came before the answer)
            try:
                await channel.call("ping", wait=timeout)
                if seen is not None:
                    w.oom_seen = seen  # alive after those kills: none of them is its own
            except TimeoutError:
                if self.stopping or process.returncode is not None:
                    return
                if await self._unresponsive(w, process, silent_for=timeout, sent=sent):
                    return
            except ChannelClosed:
                return  # it died: ``_watch`` restarts it
            except RemoteError as exc:
                log.error("worker %d: ping failed: %s", w.worker_id, exc)

    async def _unresponsive(self, w: Worker, process: asyncio.subprocess.Process, *, silent_for: float,
                            sent: float) -> bool:
        """A worker left the ping sent at ``sent`` unanswered for ``silent_for`` seconds: kill it
        (True), unless its loop waits for one of the shared memory's locks (the ring, the lease
        table, the directory: ``proxy.storage.lockwait``) that another process holds. A worker
        stopped or hung holding one freezes every worker that asks for it, and all of them
        leave their pings unanswered; the holder is the one killed then (the kernel drops its
        locks, and the waiters go on at once), and the waiter gets a fresh ping (False).
        Which of their timeouts comes first does not matter: a worker whose holder this
        supervisor killed after its ping went out gets a fresh ping too. Held by the supervisor
        itself (its write-behind thread): nobody is killed, as a restarted worker would wait
        just the same, and the error is logged at every ping it leaves unanswered."""
        pid = process.pid
        if pid in self._killed:
            return True  # killed already (as a lock's holder): ``_watch`` restarts it
        arena = self.runtime.storage.memory.arena if self.runtime is not None else None
        locks = read_locks(arena.fd) if arena is not None and not arena.closed else None
        blocker = locks.blocker(pid) if locks is not None else None
        if blocker is not None:
            # Confirmed a moment later: a lock taken in passing (microseconds) is not a wait.
            await asyncio.sleep(LOCK_WAIT_CONFIRM)
            if self.stopping or process.returncode is not None:
                return True
            assert arena is not None
            locks = read_locks(arena.fd) if not arena.closed else None
            again = locks.blocker(pid) if locks is not None else None
            blocker = blocker if again == blocker else None
        if blocker is not None:
            holder_pid, byte = blocker
            name = LOCK_NAMES.get(byte, f"byte {byte}")
            holder = next((o for o in self.workers if o.process is not None and o.process.pid == holder_pid
                           and o.process.returncode is None), None)
            if holder is not None and holder.process is not None:
                if holder_pid not in self._killed:
                    log.error("worker %d (pid %d) did not answer a ping for %gs: it waits for the %s lock "
                              "of the shared memory, which worker %d (pid %d) holds; killing worker %d, "
                              "the holder", w.worker_id, pid, silent_for, name, holder.worker_id, holder_pid,
                              holder.worker_id)
                    say(f"cachegate: worker {holder.worker_id} (pid {holder_pid}) holds the {name} lock "
                        f"worker {w.worker_id} waits for; killing it", event="worker_lock_holder",
                        worker_id=holder.worker_id, pid=holder_pid, waiter=w.worker_id, lock=name)
                    self._kill(holder, holder.process, locks,
                               f"was killed by the watchdog (it held the {name} lock of the shared "
                               f"memory that worker {w.worker_id} waited for)")
                return False
            if holder_pid == os.getpid():
                log.error("worker %d (pid %d) did not answer a ping for %gs: it waits for the %s lock of "
                          "the shared memory, which the supervisor itself (pid %d) holds; not killing the "
                          "worker (a new one would wait the same)", w.worker_id, pid, silent_for, name,
                          holder_pid)
                return False
        elif self._freed.pop(pid, 0.0) > sent:
            log.warning("worker %d (pid %d) did not answer a ping for %gs while it waited for a lock of "
                        "the shared memory whose holder was killed since; pinging it again",
                        w.worker_id, pid, silent_for)
            return False
        log.error("worker %d (pid %d) did not answer a ping for %gs (its event loop is stuck); "
                  "killing it", w.worker_id, pid, silent_for)
        say(f"cachegate: worker {w.worker_id} (pid {pid}) unresponsive for {silent_for:g}s; "
            "killing it", event="worker_unresponsive", worker_id=w.worker_id, pid=pid)
        self._kill(w, process, locks, f"was killed by the watchdog (no answer to the supervisor's "
                                      f"pings for {silent_for:g} s)")
        return True

    def _kill(self, w: Worker, process: asyncio.subprocess.Process, locks: Locks | None, why: str) -> None:
        """SIGKILL a worker the watchdog gave up on (``why``: for a reload that waits for it); the
        processes waiting for the locks it holds (``locks``, as read just before) are noted as
        freed now (``_unresponsive``)."""
        now = time.monotonic()
        self._killed.add(process.pid)
        w.killed = (process.pid, "watchdog", why)
        if locks is not None:
            for waiter in locks.waiters_for(process.pid):
                self._freed[waiter] = now
        with contextlib.suppress(ProcessLookupError):
            process.kill()

    def _worker_timeout(self) -> float:
        """worker_timeout of the config running now (a reload applies it at once)."""
        runtime = self.runtime
        return (runtime.settings if runtime is not None else self.settings).worker_timeout

    async def _stop_workers(self) -> bool:
        """SIGTERM every worker and wait for them; whether every one stopped cleanly
        (``stop_was_clean``), each that did not logged."""
        running = [(w, w.process) for w in self.workers
                   if w.process is not None and w.process.returncode is None]
        for _, p in running:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        cut_off = await self._await_stopped([p for _, p in running])
        clean = True
        for w, p in running:
            assert p.returncode is not None
            if p.pid in cut_off or stop_was_clean(p.returncode, w.ready.is_set()):
                continue
            clean = False
            log.error("worker %d (pid %d) exited with %s while stopping: the requests it had in flight "
                      "were cut off; the stop exits %d", w.worker_id, p.pid, p.returncode, EXIT_FAILURE)
            say(f"cachegate: worker {w.worker_id} (pid {p.pid}) exited with {p.returncode} while stopping",
                level="warning", event="worker_exited", worker_id=w.worker_id, pid=p.pid, code=p.returncode)
        return clean

    async def _await_stopped(self, procs: list[asyncio.subprocess.Process]) -> set[int]:
        """Wait for the stopping workers ``procs``; the pids of those killed at the deadline."""
        # A worker stops within shutdown_grace + STOP_MARGIN (``proxy.web.server.serve``) and
        # then closes its store: it is killed only well past that.
        # All are awaited together, and only those still running at the deadline are killed:
        # one by one, a worker that had exited while a hung one was waited for was taken for
        # hung too (a wait given no time left fails even on an exited process).
        if not procs:
            return set()
        waits = {asyncio.ensure_future(p.wait()): p for p in procs}
        _, pending = await asyncio.wait(waits, timeout=self._grace() + STOP_DEADLINE_MARGIN)
        for task in pending:
            p = waits[task]
            log.error("worker pid %d did not stop in time; killing it", p.pid)
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        if pending:
            await asyncio.wait(pending)
        return {waits[task].pid for task in pending}

    # -- calls into every worker -----------------------------------------------------------

    async def purge(self, spec: PurgeSpec) -> PurgeOutcome:
        """A purge from the admin API or a worker: through the cluster's bus in cluster mode
        (which calls ``purge_here`` on every node), else ``purge_here``."""
        runtime = self.runtime
        assert runtime is not None
        if runtime.settings.cluster is not None:  # (once joined: ``Runtime.joined_cluster``)
            outcome: PurgeOutcome = await (await runtime.joined_cluster()).purge(spec)
            return outcome
        return PurgeOutcome(await self.purge_here(spec))

    async def purge_here(self, spec: PurgeSpec) -> int:
        """Purge the shared disk tier once, then every worker's memory; answer when every worker
        whose listeners may accept acked (one still starting applies it before they do)."""
        runtime = self.runtime
        assert runtime is not None
        # Write-behind waits for the whole purge: what a worker finds covered in the shared
        # memory before it answers is never committed to disk afterwards.
        async with runtime.storage.purging():
            count, bans, match = await runtime.purger.purge_shared(spec)
            await runtime.storage.purge_local(match, bans)
            args = {"match": match_to_json(match), "bans": [b.to_json() for b in bans]}
            live = [w for w in self.workers if w.channel is not None and w.process is not None
                    and w.process.returncode is None]
            for w in live:
                if not w.listening:
                    self._purge_starting(w, args)
            results = await asyncio.gather(
                *(self._purge_worker(w, args) for w in live if w.listening), return_exceptions=True)
        # Each object counts once: the disk tier and the shared memory may each hold it, and
        # a worker's half counts what reached memory after the shared half's pass over it.
        local = max((r for r in results if isinstance(r, int)), default=0)
        total = max(count, local)
        runtime.count_purge(spec, total)
        return total

    def _purge_starting(self, w: Worker, args: dict[str, Any]) -> None:
        """A purge sent to a worker still starting (restarted after a crash, say), not waited for:
        its listeners do not accept yet, and open only once its ``listen`` call is answered,
        which waits for this acknowledgement (``_handlers``). Until then it holds nothing the
        purge covers but its ban list, read from the index as it opened its store, maybe before
        the purge's bans: the bans come with the purge. No time limit either: it serves nobody
        meanwhile, and one that never gets ready is killed at ``ready_timeout``.

        Why: the purge waited for its start (0.7-2.4 s measured; up to the 10 s limit, then it was
        killed), and in cluster mode past ``cluster.ack_timeout``: one worker's crash anywhere
        made every purge of the cluster answer 202 for seconds."""
        task = asyncio.ensure_future(self._purge_worker(w, args, wait=None))
        w.starting_purges.add(task)
        task.add_done_callback(w.starting_purges.discard)
        self._tasks.add(task)  # (cancelled by the stop)
        task.add_done_callback(self._tasks.discard)

    async def _purge_worker(self, w: Worker, args: dict[str, Any],
                            wait: float | None = PURGE_ACK_TIMEOUT) -> int:
        channel, process = w.channel, w.process
        assert channel is not None and process is not None
        try:
            return int(await channel.call("purge_local", wait=wait, **args))
        except ChannelClosed:
            return 0  # it died: it comes back with an empty memory tier
        except Exception as exc:
            # It may still hold purged objects in memory: it must not serve again. (A timeout's
            # text is empty: say what it means.)
            why = (f"no answer within {PURGE_ACK_TIMEOUT:g} s" if isinstance(exc, TimeoutError)
                   else str(exc) or type(exc).__name__)
            log.error("worker %d did not acknowledge a purge (%s); killing it", w.worker_id, why)
            w.killed = (process.pid, "purge", f"was killed for not acknowledging a purge ({why})")
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            return 0

    async def reload(self, reloader: Reloader) -> ReloadResult:
        """Re-read the config here (validating it), then in every worker (SIGHUP, POST /reload).

        Each worker loads the copy of the config and rule files this reload validated and
        committed (``ConfigCopy``), named in the call (the copy's directory may have moved since
        the worker started: ``ConfigCopy.current``). The answer comes once every worker has
        answered: a worker that did not apply the new config (it rejected it, failed or ended
        meanwhile) makes it a failed reload whose problems name that worker, since it keeps
        serving the config it ran; the supervisor and the workers that applied it run the new
        one."""
        # The service manager hears of a reload only once the start-up said READY (a SIGHUP
        # held during the start-up is replayed before it): RELOADING=1, then READY=1 when
        # every worker answered its reload.
        serving = self._serving if not self.stopping else None
        if serving is not None:
            self._reloading += 1
            self.notifier.reloading()
        problems = ["the reload failed"]
        try:
            result = await self._reload_here(reloader)
            if result.ok:
                workers = await self._reload_workers(result.problems)
                restart = result.restart_required
                restart = [*restart, *(u for u in workers.unapplied if u not in restart)]
                result = replace(result, problems=workers.problems, partial=bool(workers.problems),
                                 restart_required=restart, replaced=workers.replaced)
            problems = result.problems
        finally:
            if self.runtime is not None:  # counted as answered: failed when a worker did not apply it
                count_reload(self.runtime, not problems)
            if serving is not None:
                self._reloaded(serving, problems)
        return result

    def _reloaded(self, serving: str, problems: list[str]) -> None:
        """READY=1 once the last of the reloads in flight is over (overlapping ones: the
        last's outcome), not after the first while later ones still run in the workers."""
        self._reloading -= 1
        if self._reloading == 0 and not self.stopping:
            self.notifier.reloaded(serving, problems)

    async def _reload_here(self, reloader: Reloader) -> ReloadResult:
        """Load (compiled in a thread: the loop keeps pinging the workers) and commit what was
        loaded to the copy, one reload at a time, so that the copy is always the config that
        runs here. A copy that cannot be written fails the workers' half (``_reload_workers``):
        they would load the copy as it was."""
        async with self._reload_turn:
            began = time.monotonic()
            result = await reloader.reload()
            self._loaded_in = time.monotonic() - began
            copy, runtime = self._config, self.runtime
            if copy is not None and runtime is not None and result.ok:
                try:
                    copy.commit(dict(runtime.settings.sources))  # before the workers reload: they read it
                except OSError as exc:
                    why = exc.strerror or str(exc)
                    log.error("cannot update the workers' copy of the config (%s); the workers keep "
                              "the config loaded before this reload", why)
                    self._uncommitted = f"cannot write the workers' copy of the config: {why}"
                else:
                    self._uncommitted = None
                    self._serve_tls(runtime.settings)
            if result.ok:
                self._expiry.said()  # (the reload has just logged their problems)
            return result

    def _serve_tls(self, loaded: Settings) -> None:
        """What the workers serve once they applied ``loaded`` (``served_after_reload``)."""
        if len(loaded.listeners) == len(self._served_tls):
            self._served_tls = tuple(
                served_after_reload(served, loaded.pem(li.tls) if li.tls is not None else None)
                for served, li in zip(self._served_tls, loaded.listeners, strict=True))

    def _tls_served(self) -> list[tuple[str, str, bytes]]:
        """(address, cert file, certificate) of each TLS listener, as the workers serve it (the
        address bound, as their ``cachegate_tls_certificate_expiry_seconds`` names it)."""
        settings = self.runtime.settings if self.runtime is not None else self.settings
        listeners = zip(settings.listeners, self._hosts, self._ports, self._served_tls, strict=False)
        return [(f"{_fmt(host)}:{port}", li.tls.cert, served[0])
                for li, host, port, served in listeners if li.tls is not None and served is not None]

    async def _reload_workers(self, problems: list[str]) -> WorkersReloaded:
        """Every worker's reload, all at once, from the copy as it is now: ``problems`` plus one
        for each worker that did not apply it (it keeps the config it ran), what workers
        applied it without and needs a restart (a TLS key of another type: the listeners are
        the workers'), each name once, and the workers that ended meanwhile (``ReplacedWorker``:
        restarted, they load the copy). At once, not in turn: a hung worker held the reload of
        every worker after it for the call's 30 s."""
        problems = list(problems)
        path: str | None = self.config_path
        if self._config is not None:
            try:
                path = self._config.current()  # written again if a cleaner removed it
            except OSError as exc:
                self._uncommitted = f"cannot write the workers' copy of the config: {exc.strerror or exc}"

        unapplied: list[str] = []
        replaced: list[ReplacedWorker] = []
        # A worker compiles what this process just did, as fast: it has a multiple of that (a
        # big rule set takes a worker longer than a fixed 30 s), and drops the reload past it
        # (``Reloader.reload``'s ``within``): a worker the answer says keeps its config does,
        # where one that went on compiling applied it later, unlogged, after a 400 said otherwise.
        within = worker_reload_bound(self._loaded_in)

        stopped = "did not apply the reload: the instance is stopping (it keeps the config it ran)"

        async def one(w: Worker) -> list[str]:
            channel, process = w.channel, w.process
            if self.stopping:  # draining or gone, never restarted: the reload is not its
                log.warning("worker %d %s", w.worker_id, stopped)
                return [f"worker {w.worker_id} {stopped}"]
            if channel is None:
                return []  # not running: it loads the copy when it starts
            if self._uncommitted is not None:
                return [f"worker {w.worker_id} did not reload: {self._uncommitted}"]
            wait = within + RELOAD_ANSWER_MARGIN
            # The bound counts from now, on the clock every process of the machine reads
            # (CLOCK_MONOTONIC): a worker stalled before it reads the call (stopped, swapped
            # out) must not start counting when it runs again and apply the reload after the
            # answer said it keeps its config.
            deadline = time.monotonic() + within
            try:
                answer = await channel.call("reload", wait=wait, config=path, within=within,
                                            deadline=deadline)
            except TimeoutError:
                why = (f"did not answer within {wait:g} s (a worker drops a reload it has not "
                       f"applied within {within:g} s and keeps its config)")
                log.error("worker %d: reload failed: %s", w.worker_id, why)
                return [f"worker {w.worker_id} {why}"]
            except ChannelClosed:  # it died (kill -9, OOM, the watchdog): restarted, it loads the copy
                gone = await self._replaced(w, process)
                if gone is not None:
                    replaced.append(gone)
                    log.warning("%s", gone.detail())
                elif self.stopping:  # stopped before it answered: no replacement loads the copy
                    log.warning("worker %d %s", w.worker_id, stopped)
                    return [f"worker {w.worker_id} {stopped}"]
                return []
            except Exception as exc:
                why = str(exc) or repr(exc)
                log.error("worker %d: reload failed: %s", w.worker_id, why)
                return [f"worker {w.worker_id} did not reload: {why}"]
            if answer.get("stopping"):  # it stops (SIGTERM to it alone, or the drain): not a rejection
                gone = await self._replaced(w, process)
                if gone is not None:
                    replaced.append(gone)
                    log.warning("%s", gone.detail())
                    return []
                log.warning("worker %d %s", w.worker_id, stopped)
                return [f"worker {w.worker_id} {stopped}"]
            for p in answer.get("problems", ()):
                log.error("worker %d: reload rejected: %s", w.worker_id, p)
            unapplied.extend(u for u in answer.get("unapplied", ()) if u not in unapplied)
            return [f"worker {w.worker_id} rejected the reload and keeps its config: {p}"
                    for p in answer.get("problems", ())]

        for found in await asyncio.gather(*(one(w) for w in self.workers)):
            problems += found
        return WorkersReloaded(problems, unapplied, tuple(sorted(replaced, key=lambda r: r.worker)))

    async def _replaced(self, w: Worker, process: asyncio.subprocess.Process | None) -> ReplacedWorker | None:
        """What ended a worker whose channel closed while a reload waited for its answer, or None
        when no replacement follows (the supervisor stops; its code changed: not restarted,
        ``_code_changed``), which leaves it out of the answer as a worker not running is."""
        if process is None or self.stopping:
            return None
        try:  # the channel closes as the process ends: reaped at once
            code: int | None = await asyncio.wait_for(process.wait(), REAP_WAIT)
        except TimeoutError:
            code = None
        if code == EXIT_CODE_CHANGED or self.stopping:
            return None
        killed = w.killed
        if killed is not None and killed[0] == process.pid:
            return ReplacedWorker(w.worker_id, process.pid, killed[1], code, killed[2])
        if code is None:
            why = "closed its control channel"
        elif code < 0:
            why = f"was killed by {_signal_name(-code)}"
        else:
            why = f"exited with status {code}"
        return ReplacedWorker(w.worker_id, process.pid, "exited", code, why)

    def _notify_worker(self, worker_id: int, event: dict[str, Any]) -> None:
        """Tell a worker how another worker's fetch of a key it waits for went (no answer needed)."""
        w = self.workers[worker_id] if 0 <= worker_id < len(self.workers) else None
        channel = w.channel if w is not None else None
        if channel is None:
            return

        async def send() -> None:
            with contextlib.suppress(Exception):
                await channel.call("lease_event", wait=10.0, **event)

        self._track(send())

    async def call_all(self, name: str, wait: float = 10.0, **args: Any) -> list[Any]:
        """Call ``name`` in every live worker (for stats aggregation and the like); a worker
        that fails or does not answer within ``wait`` seconds gives its exception."""
        live = [w.channel for w in self.workers if w.channel is not None]
        return list(await asyncio.gather(*(c.call(name, wait=wait, **args) for c in live),
                                         return_exceptions=True))

    async def call_each(self, name: str, wait: float = 10.0, **args: Any) -> dict[int, Any]:
        """``call_all`` by worker id, so that the admin API can say which worker did not answer.
        Every worker slot is in the answer: one not running (dead, waiting out its restart
        backoff, not restarted, stopped) gives WorkerNotRunning, so it is named as not answering
        instead of dropping out of the count unseen."""
        live = [(w.worker_id, w.channel) for w in self.workers if w.channel is not None]
        results = await asyncio.gather(*(c.call(name, wait=wait, **args) for _, c in live),
                                       return_exceptions=True)
        out: dict[int, Any] = {w.worker_id: WorkerNotRunning(w.worker_id) for w in self.workers}
        out.update({worker_id: r for (worker_id, _), r in zip(live, results, strict=True)})
        return out


@dataclass(frozen=True)
class WorkersReloaded:
    """The workers' half of a reload (``Supervisor._reload_workers``)."""

    problems: list[str]  # the supervisor's, then one per worker that keeps its config
    unapplied: list[str]  # what workers applied it without (needs a restart), each once
    replaced: tuple[ReplacedWorker, ...]  # ended meanwhile; restarted with the new config


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class WorkerNotRunning(Exception):
    """``call_each``'s answer for a worker slot with no process to ask."""

    def __init__(self, worker_id: int) -> None:
        super().__init__(f"worker {worker_id} is not running")


async def _tell_quietly(channel: Channel, name: str, **args: Any) -> None:
    with contextlib.suppress(Exception):
        await channel.call(name, wait=10.0, **args)


def worker_reload_bound(loaded_in: float) -> float:
    """Seconds a worker has to apply a reload the supervisor loaded in ``loaded_in`` seconds:
    WORKER_RELOAD_WAIT, or WORKER_RELOAD_SLOWER times ``loaded_in`` when that is longer.
    CACHEGATE_WORKER_RELOAD_WAIT (seconds) sets another minimum for tests."""
    try:
        least = float(os.environ.get("CACHEGATE_WORKER_RELOAD_WAIT") or WORKER_RELOAD_WAIT)
    except ValueError:
        least = WORKER_RELOAD_WAIT
    return max(least, WORKER_RELOAD_SLOWER * loaded_in)


def stop_was_clean(code: int, was_ready: bool) -> bool:
    """Whether a worker's exit ``code``, after the stop's SIGTERM, ends a clean stop: 0 (it
    drained), or that SIGTERM's default action on a worker still starting (``was_ready`` False:
    it came before the worker could hold it, and the worker had served nobody). Anything else,
    a SIGKILL or a crash during the drain, cut off the requests it had in flight: the stop is
    not clean (a worker the stop kills at its deadline is not asked: that cut-off is the stop's)."""
    return code == 0 or (code == -signal.SIGTERM and not was_ready)


def ready_timeout() -> float:
    """READY_TIMEOUT; CACHEGATE_READY_TIMEOUT (seconds) sets another for tests, as
    CACHEGATE_PERSIST_INTERVAL does (no config key: nobody should need to tune it)."""
    try:
        return float(os.environ.get("CACHEGATE_READY_TIMEOUT") or READY_TIMEOUT)
    except ValueError:
        return READY_TIMEOUT


def _reusing(sock: socket.socket, family: int, *, reuse_port: bool) -> None:
    """The options of a reserved socket (``reuse_port``), or of its probe (``_bind_alone``)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        # IPv6 alone, as the workers' listeners (asyncio sets it on each): the system's
        # dual-stack default held the port's IPv4 half too, which nothing here serves, and
        # kept another server from listening there.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


def _bind_alone(family: int, addr: Any) -> None:
    """Bind ``addr`` without SO_REUSEPORT, and let go: OSError (EADDRINUSE) when anything listens
    on an address that overlaps it (the kernel's own test, as for a single process). The
    connect probe (``_accepting``) tries one address: a wildcard (``0.0.0.0:P``, ``[::]:P``)
    was let in beside an instance on a specific address of that port (``127.0.0.2:P``), and the
    kernel split the connections between the two by their destination."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        _reusing(probe, family, reuse_port=False)
        probe.bind(addr)


def _accepting(family: int, addr: Any) -> bool:
    """Whether something accepts connections at ``addr`` (a wildcard address: on loopback)."""
    host = addr[0]
    if host in ("0.0.0.0", "::"):
        addr = ("127.0.0.1" if family == socket.AF_INET else "::1", *addr[1:])
    probe = socket.socket(family, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(addr)
    except OSError:
        return False
    finally:
        probe.close()
    return True


PR_SET_PDEATHSIG = 1


def _die_with_supervisor(supervisor: int) -> bool:
    """Have the kernel SIGKILL this worker when its supervisor ends (Linux): a backstop to the
    graceful stop on a closed control channel, which a stuck or stopped worker never sees (it
    would keep its share of the port, and answer none of it). False when the supervisor is
    already gone (it died before this ran)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the control channel alone
        pass
    return os.getppid() == supervisor


def _worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cachegate-worker")
    parser.add_argument(CODE_ID_ARG)  # checked before this parser (``proxy.codeid.exit_if_changed``)
    parser.add_argument("--supervisor-pid", type=int)
    parser.add_argument("--worker-id", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--arena-fd", type=int)
    parser.add_argument("--running-fd", type=int)  # the supervisor's ``restart_only`` settings
    parser.add_argument("--config")
    parser.add_argument("--config-as")  # the file --config is a copy of (``ConfigCopy``)
    parser.add_argument("--overrides", required=True)
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.supervisor_pid is not None and not _die_with_supervisor(args.supervisor_pid):
        tell(f"cachegate: worker {args.worker_id}: the supervisor is gone; not starting")
        return 0
    # At the memory limit, the OOM killer ends this worker (restarted), not the supervisor,
    # whose death would take every worker with it (``_die_with_supervisor``): ``proxy.oom``.
    raise_worker_score("self", args.supervisor_pid)
    # Ctrl-C reaches the whole process group; the supervisor stops the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    earlysignals.hold()  # a SIGHUP or SIGTERM before the loop's handlers: remembered, not fatal
    level = args.log_level if args.log_level in ("debug", "info", "warning", "error") else "info"
    start_logging(level, worker=str(args.worker_id))
    raw = json.loads(args.overrides)
    for name in ("upstreams", "listen"):  # JSON lists back to tuples
        raw[name] = tuple(raw.get(name) or ())
    overrides = Overrides(**raw)
    # Not checked against the machine again: the supervisor did at its start, and made the
    # shared memory this worker maps (a machine that reports less memory since, after a
    # swapoff, say, would have the worker exit at every restart).
    settings = load_settings(args.config, overrides, display=args.config_as, machine="no")
    if settings is None:
        return EXIT_CONFIG
    if args.running_fd is not None:
        with os.fdopen(args.running_fd, "rb") as f:
            f.seek(0)
            settings = with_restart_only(settings, pickle.load(f))  # written by its supervisor
    log_as_configured(settings)
    link = WorkerLink(args.worker_id, args.control_fd, args.arena_fd, args.config_as)
    try:
        return run_async(earlysignals.held_at_end(serve(settings, args.config, overrides, link)),
                         not args.no_uvloop)
    finally:
        earlysignals.ignore_at_exit()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        raise SystemExit(_worker_main(sys.argv[2:]))
    raise SystemExit("usage: python -m proxy.supervisor worker ... (started by cachegate run --workers N)")
