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

import signal
from types import FrameType

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
