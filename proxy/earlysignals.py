"""The stop and reload signals between a process's first line and its event loop's handlers.

Until ``loop.add_signal_handler`` runs (after the config is read, the cache directory opened,
the ports bound, a cluster joined: up to seconds), SIGHUP and SIGTERM have their default
action, which is to die, and SIGINT raises KeyboardInterrupt wherever the start-up is. A
``systemctl reload`` (``kill -HUP``) or logrotate's postrotate during that time killed the
process, and systemd does not restart a service killed by SIGHUP (``Restart=on-failure``
counts it as a clean signal). ``hold`` installs handlers that only remember the signal, as
early as ``cachegate run`` (and a worker) can; once the loop's own handlers are installed,
``take`` says which came meanwhile, and the process does then what it would have done:
reload once (the config it reads is the newest anyway), or stop.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")

HELD = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
_pending: set[int] = set()


def hold(signals: tuple[signal.Signals, ...] = HELD) -> None:
    """Remember ``signals`` instead of acting on them (a signal ignored stays ignored)."""
    for sig in signals:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _remember)


def _remember(signum: int, frame: FrameType | None) -> None:
    _pending.add(signum)


def take(sig: signal.Signals) -> bool:
    """Whether ``sig`` came while held (and forget it)."""
    if sig in _pending:
        _pending.discard(sig)
        return True
    return False


async def held_at_end(coro: Coroutine[Any, Any, T]) -> T:
    """``coro``, then the loop's signal handlers given up for ``hold``'s when it closes, never
    for the default action. Closing a loop removes its handlers, giving each signal its default
    action (to die) until ``hold`` ran again after the loop was gone: a SIGHUP as a stop ended
    (logrotate, a ``systemctl reload`` racing the stop) killed the stopped process, status 129.
    Blocking the signals in the main thread meanwhile would not do: a thread of libuv's pool,
    which blocks none, takes them then. So the loop's removal is replaced on this loop: each
    signal goes from the loop's handler straight to ``_remember``."""
    try:
        return await coro
    finally:
        loop = asyncio.get_running_loop()
        try:
            loop.remove_signal_handler = _held_instead  # type: ignore[method-assign]
        except AttributeError:  # a loop without instance attributes: its removal, then hold
            for sig in HELD:
                if loop.remove_signal_handler(sig):
                    signal.signal(sig, _remember)


def _held_instead(sig: int) -> bool:
    """A closing loop's ``remove_signal_handler``: ``sig`` held, not given its default action."""
    if signal.getsignal(sig) is not signal.SIG_IGN:
        signal.signal(sig, _remember)
    return True


def ignore_at_exit() -> None:
    """The process is exiting with its status decided: ``HELD`` change nothing any more, so
    ignore them. Not ``hold``: the interpreter's finalization gives every signal with a Python
    handler its default action back (to die) while it tears down, so a SIGHUP there still
    ended the process with status 129; an ignored signal stays ignored."""
    for sig in HELD:
        signal.signal(sig, signal.SIG_IGN)
