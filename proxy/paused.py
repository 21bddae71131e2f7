"""Timers that fire long after they were due: the process was not running (a VM paused, SIGSTOP).

A loop's timers run before it reads what came on its sockets (uvloop's, as libuv's, at each
pass), so after a pause longer than a timeout the timeout fires with the bytes that would have
met it waiting unread: an upstream's answer that came in 0.3 s failed as a read timeout (504),
a kept-alive connection whose next request came during the pause was closed with it in the
buffer. A timer about to fail or close something first asks ``late``: more than ``PAUSE_LATE``
after it was due, it is armed once more for ``PAUSE_GRACE`` (one pass of the loop's I/O lies
in between), and fails then if still nothing came. Cost: only when such a timer fires and is
about to end something; an on-time one sees one subtraction more (nginx does the same as we
did before: this is hardening, not a fix of a protocol's rule)."""

from __future__ import annotations

# How much later than due a timer must fire to say the process did not run in between: a loop
# busy for a second is already unusual; a pause is usually seconds or more.
PAUSE_LATE = 1.0
# The one more wait such a timer gets: the loop reads its sockets in the meantime.
PAUSE_GRACE = 0.25


def late(due: float, now: float) -> bool:
    """Whether a timer due at ``due`` that fires at ``now`` (the loop's clock) was held up by a
    pause of the process: give it ``PAUSE_GRACE`` more before it fails.

    >>> late(10.0, 10.02), late(10.0, 12.5)
    (False, True)
    """
    return now - due > PAUSE_LATE
