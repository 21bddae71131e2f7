"""How a cachegate process starts: logging, the config (or its problems), the event loop.

``cachegate run`` (``proxy.cli``) and each worker the supervisor starts (``python -m
proxy.supervisor worker``, ``proxy.supervisor``) start the same way: logging at the level
asked for, the config loaded (a bad one printed as ``FILE:LINE: message`` lines on standard
error, exit 2, before any port is bound), the error log switched to JSON lines when the
access log is JSON, then the server on uvloop. Both import this module; the supervisor used
to borrow these steps from the command line, which imports the supervisor: an import circle.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import resource
import stat
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from proxy.config import MachineCheck, Overrides, Settings, load_config
from proxy.errors import ConfigError
from proxy.logs import write_line
from proxy.room import OPEN_FILES_WANTED

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
# A worker that cannot open the cache directory (a full filesystem, say; it printed why): what
# keeps it from starting keeps its restarts from starting too, so during start-up its
# supervisor stops instead of restarting it forever.
EXIT_CACHE_DIR = 3
T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T], use_uvloop: bool = True) -> T:
    """Run on uvloop when it is importable (Linux), else on asyncio's default loop."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(coro)
    return asyncio.run(coro)


def start_logging(level: str, worker: str | None = None) -> None:
    """One line per event on standard error (``proxy.logs``), at ``level``; a worker names itself."""
    from proxy.logs import setup_logging

    append_to_std_files()
    setup_logging(level, worker=worker)


def append_to_std_files() -> None:
    """Standard output and error, when they are files, written at their end (``O_APPEND``).

    A shell's ``>`` and systemd's ``StandardOutput=file:`` open them without it, and
    logrotate's ``copytruncate`` then empties the file under a process that goes on writing
    where it was: the new file began with millions of NUL bytes (2.6 MB of them after one
    rotation under load), that ``less`` and log shippers show as garbage. Setting the flag
    changes nothing else: these are written only at their end anyway."""
    for fd in (1, 2):
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                if not flags & os.O_APPEND:
                    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_APPEND)
        except OSError:  # closed, or a file that refuses the flag: written as it is
            pass


def load_settings(path: str | None, overrides: Overrides, *, warn: bool = False,
                  display: str | None = None, machine: MachineCheck = "start",
                  names: bool = False) -> Settings | None:
    """The settings, or None after printing every problem (and, with ``warn``, every warning);
    ``display``, ``machine`` and ``names`` as for ``load_config``."""
    try:
        settings = load_config(path, overrides, display=display, machine=machine, names=names)
    except ConfigError as exc:
        for line in exc.problems + (exc.warnings if warn else []):
            write_line(sys.stderr, line)
        return None
    if warn:
        for line in settings.warnings:
            write_line(sys.stderr, line)
    return settings


def log_as_configured(settings: Settings) -> None:
    """Once the config is read: the error log is JSON lines when the access log is."""
    from proxy.logs import setup_logging
    from proxy.runtime import error_log_json

    setup_logging(as_json=error_log_json(settings))


def raise_open_files(wanted: int = OPEN_FILES_WANTED) -> tuple[int, int] | None:
    """Raise this process's soft open-files limit to its hard one (at most ``wanted``), as Go's
    runtime and Java do at start; the workers inherit it. ``(before, after)`` when raised.

    Why: the soft limit is 1,024 on most machines outside a unit that sets ``LimitNOFILE``
    (systemd's own default is 1024:524288, a shell's too), and ``max_connections``' default
    stays below the limit: 256 client connections a worker, where the hard limit allows the
    10,000 of the default. Nothing here selects on descriptors (the loop is epoll's)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:  # a sandbox that refuses: the limit stays, said once
        logging.getLogger("cachegate").info("the open-files limit stays %d (raising it to %d failed: %s)",
                                            soft, target, exc)
        return None
    logging.getLogger("cachegate").info("open-files limit raised from %d to %d (the hard limit allows it)",
                                        soft, target)
    return soft, target
