"""Coalescing across worker processes: one origin fetch per key per machine.

Within a process the coalescer already makes one fetch per key. With
``--workers N`` every worker would still make its own, so the workers take
*leases* in a table in the machine's shared memory (``proxy.storage.arena``):

- A worker about to fetch key K for its local flight takes K's lease: the first
  to ask is granted it and fetches; the others are told who holds it, note
  themselves as waiters in the lease, and wait (at most ``cache.lock_timeout``,
  counted from the start of their flight, as nginx's ``proxy_cache_lock_timeout``;
  in cluster mode, while the holder waits for another node's fill, from when the
  holder's own fetch begins: ``LeaseTable.fetch_from``).
- When the holder has the response head and it is not shareable (private,
  Set-Cookie, ...), it marks the lease so: the waiters are sent upstream at once,
  with hit-for-pass when the reason calls for it; later askers are told the same.
- When its fetch is over the holder releases the lease with the outcome:
  ``stored`` (in the shared memory: the waiters answer their clients from it; with
  status 304 when it was a revalidation the origin answered so, which their clients say),
  ``error`` (the origin failed: the waiters answer as the holder's own followers
  do, with stale-if-error or the error), or ``failed`` (not stored: the waiters
  fetch for themselves).
- A holder that dies loses its leases: the supervisor sees it die, clears them,
  and tells the waiters ``gone``: they ask again, so one of them takes the lease on.
- A waiter that is not told also looks at the lease in the table every
  ``LEASE_POLL`` seconds (``LeaseClient.wait``): a lease released (or taken over)
  with no word for ``LEASE_WORD_WAIT`` seconds after a look found it so ends the
  wait as ``ended``: it asks again, and finds what the holder stored. Why: the word
  is a message through the supervisor, and a message can be lost (a worker whose
  control channel closed before its fill ended, as a stop once did: the waiters sat
  until ``lock_timeout``, then each fetched the object again); a lost word then
  costs under a second, not ``lock_timeout``. Why wait for the word at all once the
  table says the lease is over: it normally follows the release within a
  millisecond (a busy machine may hold it up for a while), and it says how the
  fetch went (an error, a pass), which the table does not keep.

Waiters are told through the supervisor: the holder sends it one message with
the waiters to tell, which it relays over their control channels. A lease
nobody waits for costs no message at all.

Why a table in shared memory rather than the supervisor brokering every lease
over the control channel: the broker cost two round trips per miss (acquire and
release: four JSON messages and a task on each side), measured ≈ 200 µs of CPU
per fill across the processes, more than the rest of the fill's storage work.
Taking a lease is now a record lock on the shared memory (two system calls) and
a look at one bucket; a message is sent only when another worker waits, which
is what a herd needs and nothing else does. Why not a lock file (flock) per key:
a worker that finds it taken would have to block a thread or poll, could not
give up after ``lock_timeout``, and would learn nothing before the lock is
released (not that the response turned out private); the table keeps the
broker's protocol, and the supervisor still knows at once when a holder dies.

The waiters' clients are served from the shared memory once the body is
complete, not streamed as it arrives (a body in another process's flight cannot
be joined): the holder puts it there before it answers its own followers.

A stale-while-revalidate refresh asks without waiting (``wait=False``): when
another worker is already refreshing the key, it simply does not.

Waiting is safe against every interleaving because the lease is taken and
released under the lease table's lock, a holder stores before it releases, and
a holder looks in the store once it has the lease: a worker that missed the
store just before another stored the key and released the lease is granted the
next lease and finds the entry. (The table has a lock of its own, apart from the
one the records are written under: a lease taken or released never waits for
another worker's record write.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from proxy.control import Channel
from proxy.logs import Summarised
from proxy.storage.arena import Arena

log = logging.getLogger("cachegate.leases")

LEASE_MAX_AGE = 600.0  # a lease never released (a bug, a wedged worker) is taken over after this
LEASE_POLL = 0.25  # seconds between a waiter's looks at its lease in the table (see the docstring)
LEASE_WORD_WAIT = 0.5  # how long a waiter that found its lease over still waits for the word
MAX_WORKERS = 64  # waiters are a bit mask

# The table: a header (counters, the next token), then buckets of slots (``_SLOT``): the key's
# fingerprint, the lease's token, when it started (moved on to when the holder's own fetch begins,
# after a wait for another node's fill: ``fetch_from``), the waiting workers, the holder, flags,
# and the status of a head not shareable because not stored (``head``: an origin error there has
# the waiters serve stale-if-error, as the holder's own followers do).
_SLOT = struct.Struct("<QQdQHHH2x")
SLOTS = 8
_FPS = struct.Struct("<" + "Q32x" * SLOTS)  # the fingerprints of a bucket's slots, read at once
assert _FPS.size == SLOTS * _SLOT.size
EVENTS = ("granted", "waited", "busy", "pass", "stored", "error", "failed", "holder_gone")
_HEAD = 8 * (len(EVENTS) + 2)  # the counters, the next token, the leases held
# Where each of those is in the header, worked out once: a fill's lease (taken, released)
# looked them up with len() and tuple.index() five times (``scripts/bench-calls``).
_COUNTER_AT = {e: 8 * i for i, e in enumerate(EVENTS)}
_TOKEN_AT = 8 * len(EVENTS)
_HELD_AT = 8 * (len(EVENTS) + 1)
_BUCKET_BYTES = SLOTS * _SLOT.size
F_HEAD, F_SHAREABLE, F_PASS = 1, 2, 4
F_WAITED = 8  # the holder waited for another node's fill: its start is its fetch's (``fetch_from``)

Notify = Callable[[int, dict[str, Any]], None]  # (worker id, event) -> None, fire and forget
Told = list[tuple[int, dict[str, Any]]]  # (worker to tell, event)


class LeaseTable:
    """The machine's leases, in the shared memory's lease region (every process maps it).

    Bookkeeping only: each operation returns the waiters to tell and what, and the caller
    delivers (a worker through the supervisor; the supervisor itself)."""

    def __init__(self, arena: Arena, clock: Callable[[], float] = time.monotonic) -> None:
        self._arena = arena
        self._mm = arena.mm
        # The header's words, read by the supervisor's metrics without the table's lock: each
        # written in one store (``struct.pack_into`` zeroes its target first: a scrape in
        # between read a counter as 0, a reset to Prometheus).
        self._words = arena.words
        self._locked = arena.lease_locked()  # the table's lock (one object for the arena's life)
        self._at, size = arena.lease_region
        self._buckets = (size - _HEAD) // (SLOTS * _SLOT.size)
        self._clock = clock

    # -- the slots ---------------------------------------------------------------------------

    def _find(self, fp: int) -> tuple[int, tuple[Any, ...]] | None:
        at = self._at + _HEAD + (fp % self._buckets) * _BUCKET_BYTES  # the key's bucket
        fps = _FPS.unpack_from(self._mm, at)
        if fp not in fps:
            return None
        at += fps.index(fp) * _SLOT.size
        return at, _SLOT.unpack_from(self._mm, at)

    def _free(self, fp: int) -> int | None:
        at = self._at + _HEAD + (fp % self._buckets) * _BUCKET_BYTES
        fps = _FPS.unpack_from(self._mm, at)
        return at + fps.index(0) * _SLOT.size if 0 in fps else None

    def _clear(self, at: int) -> None:
        self._mm[at:at + _SLOT.size] = bytes(_SLOT.size)
        self._held(-1)

    def _held(self, delta: int) -> None:
        at = (self._at + _HELD_AT) >> 3
        held = self._words[at] + delta
        self._words[at] = held if held > 0 else 0

    def _count(self, event: str) -> None:
        at = (self._at + _COUNTER_AT[event]) >> 3
        self._words[at] += 1

    def _next_token(self) -> int:
        at = (self._at + _TOKEN_AT) >> 3
        token: int = self._words[at] + 1
        self._words[at] = token
        return token

    @staticmethod
    def _tell(waiters: int, event: dict[str, Any]) -> Told:
        if not waiters:
            return []  # a lease nobody waits for (nearly all of them)
        return [(w, event) for w in range(MAX_WORKERS) if waiters >> w & 1]

    # -- operations --------------------------------------------------------------------------

    def acquire(self, worker: int, key: str, block: bool = True) -> tuple[dict[str, Any] | None, Told]:
        """The lease on ``key`` for ``worker``: ``{"granted": True, "token": t}``, or who holds it
        (``{"granted": False, "token": t, "holder": w}``, with ``"head"`` when the holder's
        response is not shareable); None when the table has no room (fetch without a lease)."""
        fp = self._arena.fingerprint(key)
        told: Told = []
        with self._locked:
            now = self._clock()
            found = self._find(fp)
            if found is not None:
                at, (_, token, started, waiters, holder, flags, status) = found
                if now - started > LEASE_MAX_AGE:
                    log.error("lease on %s held by worker %d for %.0fs: taken over", key, holder,
                              now - started)
                    told = self._tell(waiters, {"key": key, "token": token, "outcome": "gone"})
                    self._clear(at)
                    found = None
            if found is None:
                at_free = self._free(fp)
                if at_free is None:
                    return None, told
                token = self._next_token()
                _SLOT.pack_into(self._mm, at_free, fp, token, now, 0, worker, 0, 0)
                self._held(1)
                self._count("granted")
                return {"granted": True, "token": token}, told
            answer: dict[str, Any] = {"granted": False, "token": token, "holder": holder}
            if flags & F_HEAD and not flags & F_SHAREABLE:
                answer["head"] = {"shareable": False, "pass": bool(flags & F_PASS),
                                  **({"status": status} if status else {})}
                self._count("pass")
            elif block:
                _SLOT.pack_into(self._mm, at, fp, token, started, waiters | 1 << worker, holder, flags,
                                status)
                self._count("waited")
            else:
                self._count("busy")
            return answer, told

    def head(self, key: str, token: int, shareable: bool, pass_: bool, status: int = 0) -> Told:
        """The holder has its response head: a not shareable one sends the waiters upstream now
        (``status``: the origin's, when the response is not stored: an origin error has them serve
        stale-if-error instead, as the holder's own followers do; 0 otherwise)."""
        fp = self._arena.fingerprint(key)
        with self._locked:
            found = self._find(fp)
            if found is None or found[1][1] != token:
                return []
            at, (_, _, started, waiters, holder, flags, _) = found
            flags |= F_HEAD | (F_SHAREABLE if shareable else 0) | (F_PASS if pass_ else 0)
            if shareable:
                _SLOT.pack_into(self._mm, at, fp, token, started, waiters, holder, flags, 0)
                return []
            _SLOT.pack_into(self._mm, at, fp, token, started, 0, holder, flags, status)
            return self._tell(waiters, {"key": key, "token": token, **_head_word(flags, status)})

    def release(self, key: str, token: int, outcome: str, status: int = 0, message: str = "",
                detail: str = "", public: str = "", in_body: bool = False) -> Told:
        """The holder's fetch is over: the lease ends, and its waiters hear how it went (an error:
        its status, message, Cache-Status ``detail``, the text its clients were given, and
        whether it came in the body, after the origin's head: ``UpstreamError.in_body``)."""
        fp = self._arena.fingerprint(key)
        with self._locked:
            found = self._find(fp)
            if found is None or found[1][1] != token:
                return []
            at, (_, _, _, waiters, _, _, _) = found
            self._count(outcome if outcome in _COUNTER_AT else "failed")
            self._clear(at)
        if not waiters:
            return []  # nobody waits (nearly every lease): no word to build (``_tell``)
        event = {"key": key, "token": token, "outcome": outcome, "status": status, "message": message}
        if detail:
            event["detail"] = detail
        if public:
            event["public"] = public
        if in_body:
            event["in_body"] = True
        return self._tell(waiters, event)

    def ended(self, key: str, token: int) -> dict[str, Any] | None:
        """What a waiter on lease ``token`` on ``key`` that was not told can read in the table:
        None while the lease is held; ``"pass"`` or ``"unshareable"`` (with the head's status)
        once the holder's head said so (as that word would have); ``"ended"`` once it is released
        or cleared (how the fetch went is not kept: ask again), or older than ``LEASE_MAX_AGE``
        (asking again takes it over)."""
        fp = self._arena.fingerprint(key)
        with self._locked:
            found = self._find(fp)
            if found is None or found[1][1] != token:
                return {"outcome": "ended"}
            _, (_, _, started, _, _, flags, status) = found
            if self._clock() - started > LEASE_MAX_AGE:
                return {"outcome": "ended"}
        if flags & F_HEAD and not flags & F_SHAREABLE:
            return _head_word(flags, status)
        return None

    def fetch_from(self, key: str, token: int, delay: float) -> None:
        """The holder of lease ``token`` fetches from the origin ``delay`` seconds from now (at
        the latest; 0: now). Its waiters count their ``lock_timeout`` from then (``fetch_left``):
        the time it spent waiting for another node's fill (``proxy.cluster``) is not theirs to
        lose. Why: the holder gives up that wait at its own ``lock_timeout`` and fetches, the
        node's one origin request; its waiters, timed out at the same moment, each fetched too."""
        fp = self._arena.fingerprint(key)
        with self._arena.lease_locked():
            found = self._find(fp)
            if found is None or found[1][1] != token:
                return
            at, (_, _, _, waiters, holder, flags, status) = found
            _SLOT.pack_into(self._mm, at, fp, token, self._clock() + max(delay, 0.0), waiters, holder,
                            flags | F_WAITED, status)

    def fetch_left(self, key: str, token: int, wait: float) -> float | None:
        """Seconds left of ``wait`` counted from when lease ``token``'s holder began (or begins)
        its fetch after a wait for another node's fill (``fetch_from``); None once the lease is
        over, or when its holder did not wait so (a waiter's deadline is then its own)."""
        fp = self._arena.fingerprint(key)
        with self._arena.lease_locked():
            found = self._find(fp)
            if found is None or found[1][1] != token or not found[1][5] & F_WAITED:
                return None
            started = float(found[1][2])
        return started + wait - self._clock()

    def fetching_elsewhere(self, worker: int, key: str) -> bool:
        """Whether a worker other than ``worker`` holds the lease on ``key`` (it is fetching the
        object) and its response is not known to be unshareable: a look, nothing taken (a range
        miss deciding whether to wait for that fetch: ``decide_range_fetch``)."""
        fp = self._arena.fingerprint(key)
        with self._locked:
            found = self._find(fp)
            if found is None:
                return False
            _, (_, _, started, _, holder, flags, _) = found
            if holder == worker or self._clock() - started > LEASE_MAX_AGE:
                return False
        return not (flags & F_HEAD and not flags & F_SHAREABLE)

    def worker_gone(self, worker: int) -> Told:
        """A worker died (the supervisor saw it): its leases end (their waiters are told), and it
        waits for nothing any more."""
        told: Told = []
        mm = self._mm
        with self._locked:
            for b in range(self._buckets):
                base = self._at + _HEAD + b * SLOTS * _SLOT.size
                for i in range(SLOTS):
                    at = base + i * _SLOT.size
                    fp, token, started, waiters, holder, flags, status = _SLOT.unpack_from(mm, at)
                    if not fp:
                        continue
                    waiters &= ~(1 << worker)
                    if holder == worker:
                        self._count("holder_gone")
                        told += self._tell(waiters, {"token": token, "outcome": "gone"})
                        self._clear(at)
                    else:
                        _SLOT.pack_into(mm, at, fp, token, started, waiters, holder, flags, status)
        return told

    # The counters, for the supervisor's metrics: none once the arena is closed (a scrape racing
    # the stop; the shared memory's words are let go then), as the other readers of a closed
    # arena (the console's samples, the lock watchdog) read nothing.

    @property
    def held(self) -> int:
        return 0 if self._arena.closed else int(self._words[(self._at + _HELD_AT) >> 3])

    def counts(self) -> dict[str, int]:
        if self._arena.closed:
            return {}
        return {e: int(self._words[(self._at >> 3) + i]) for i, e in enumerate(EVENTS)}


def _head_word(flags: int, status: int) -> dict[str, Any]:
    """What the holder's not shareable head says to a worker that waits for it (or that finds it
    in the table): ``pass`` (hit-for-pass) or ``unshareable``, with the status of a response not
    stored (``head``)."""
    word: dict[str, Any] = {"outcome": "pass" if flags & F_PASS else "unshareable"}
    if status:
        word["status"] = status
    return word


class LeaseRelay:
    """The supervisor's side: tells waiters what their holder's worker asked it to, clears a dead
    worker's leases, and reports the table's counters."""

    def __init__(self, table: LeaseTable | None, notify: Notify) -> None:
        self.table = table
        self._notify = notify

    def calls(self) -> dict[str, Callable[..., Awaitable[Any]]]:
        """The named calls workers make (the supervisor adds ``worker_id``)."""
        async def lease_notify(worker_id: int, told: list[list[Any]]) -> None:
            self.deliver([(int(w), dict(e)) for w, e in told])

        return {"lease_notify": lease_notify}

    def deliver(self, told: Told) -> None:
        for worker, event in told:
            self._notify(worker, event)

    async def worker_gone(self, worker_id: int) -> None:
        """In a thread: the lease table's lock may be held by a worker that is stopped or hung,
        and the supervisor's loop (its watchdog, which kills that worker; the admin API;
        SIGTERM) must never wait for it."""
        if self.table is not None:
            told = await asyncio.get_running_loop().run_in_executor(None, self.table.worker_gone, worker_id)
            self.deliver(told)

    def collect(self) -> Iterator[Metric]:
        c = CounterMetricFamily("cachegate_cross_worker_leases",
                                "Cross-worker coalescing: lease grants, waits and how fetches ended",
                                labels=["event"])
        counts = self.table.counts() if self.table is not None else dict.fromkeys(EVENTS, 0)
        for event, n in counts.items():
            c.add_metric([event], n)
        yield c
        g = GaugeMetricFamily("cachegate_cross_worker_leases_held", "Keys being fetched under a lease now")
        g.add_metric([], self.table.held if self.table is not None else 0)
        yield g


@dataclass(frozen=True, slots=True)
class Granted:
    """This worker fetches."""

    token: int


@dataclass(frozen=True, slots=True)
class Busy:
    """Another worker is fetching (a refresh that does not wait gets this)."""


@dataclass(slots=True)
class Waiting:
    """Another worker is fetching; ``outcome`` resolves with how it went (see ``LeaseTable``)."""

    token: int
    outcome: asyncio.Future[dict[str, Any]]


class LeaseClient:
    """A worker's side: take leases in the shared table, report heads and outcomes, hear (through
    the supervisor) about the fetches it waits for."""

    def __init__(self, table: LeaseTable, worker_id: int, channel: Channel) -> None:
        self._table = table
        self._worker = worker_id
        self._channel = channel
        self._waits: dict[str, Waiting] = {}
        self._by_token: dict[int, tuple[str, Waiting]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # A word late past LEASE_WORD_WAIT: the supervisor's relay was slow (a reload's or a
        # burst's messages ahead of it: 1.2-2.4 s in a soak), not a fault; the fallback (ask
        # again) answers right. At INFO, one line per window: at WARNING, 8 lines a burst had
        # operators chase a failure that was not one.
        self._late_words = Summarised()
        channel.handlers["lease_event"] = self._event

    async def acquire(self, key: str, wait: bool = True) -> Granted | Waiting | Busy | None:
        """The lease on ``key``; None when the table has no room (fetch without one)."""
        existing = self._waits.get(key)
        if existing is not None and wait:
            return existing  # this worker already waits on that holder
        if self._worker >= MAX_WORKERS:
            return None
        answer, told = self._table.acquire(self._worker, key, wait)
        self._tell(told)
        if answer is None:
            return None
        if answer["granted"]:
            return Granted(int(answer["token"]))
        head = answer.get("head")
        if head is not None:  # the holder's response is not shareable
            fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            fut.set_result({"outcome": "pass" if head.get("pass") else "unshareable",
                            **({"status": head["status"]} if head.get("status") else {})})
            return Waiting(int(answer["token"]), fut)
        if not wait:
            return Busy()
        token = int(answer["token"])
        waiting = self._waits.get(key)
        if waiting is None or waiting.token != token:
            waiting = Waiting(token, asyncio.get_running_loop().create_future())
            self._waits[key] = waiting
            self._by_token[token] = (key, waiting)
        return waiting

    async def wait(self, key: str, waiting: Waiting, deadline: float,
                   fetch_wait: float | None = None) -> dict[str, Any]:
        """How the holder's fetch went: its word through the supervisor, or what the table shows
        when no word comes (looked at every ``LEASE_POLL`` seconds: see the module docstring);
        ``{"outcome": "timeout"}`` at ``deadline`` (the loop's time), or, with ``fetch_wait``,
        once the holder has fetched for that long too (``LeaseTable.fetch_from``), if later."""
        loop = asyncio.get_running_loop()
        ended_at: float | None = None  # when a look first found the lease over, with no word
        while True:
            left = deadline - loop.time()
            if left <= 0 and fetch_wait is not None:
                fetching = self._table.fetch_left(key, waiting.token, fetch_wait)
                if fetching is not None and fetching > 0:
                    deadline = loop.time() + fetching
                    left = fetching
            if left <= 0:
                return {"outcome": "timeout"}
            await asyncio.wait((waiting.outcome,), timeout=min(left, LEASE_POLL))
            if waiting.outcome.done():
                return waiting.outcome.result()
            seen = self._table.ended(key, waiting.token)
            if seen is None:
                continue
            if seen["outcome"] != "ended":
                return seen  # the head's word, as the message would have said it
            if ended_at is None:
                ended_at = loop.time()  # the word may be on its way
            if loop.time() - ended_at < LEASE_WORD_WAIT:
                continue
            self._late_words.log(logging.INFO, log, "late word",
                                 "lease on %s ended without word to worker %d (%.2fs ago): asking again",
                                 key, self._worker, loop.time() - ended_at)
            return {"outcome": "ended"}

    def fetching_elsewhere(self, key: str) -> bool:
        """Whether another worker is fetching ``key`` under its lease (``LeaseTable.fetching_elsewhere``)."""
        return self._worker < MAX_WORKERS and self._table.fetching_elsewhere(self._worker, key)

    async def await_fetch(self, key: str, deadline: float) -> bool:
        """Wait for another worker's fetch of ``key`` without taking its lease (a range miss: it
        never fetches the object in its stead); whether the store may have it now (stored, or
        the lease ended meanwhile). False when it was not shareable, failed, or not over by
        ``deadline`` (the loop's time)."""
        lease = await self.acquire(key)
        match lease:
            case Granted():  # the holder was done before we asked: hand the lease straight back
                self.release(key, lease, "ended")  # (anyone who asked since asks again)
                return True
            case Waiting():
                try:
                    told = await self.wait(key, lease, deadline)
                finally:
                    self.forget(key, lease)
                return told["outcome"] in ("stored", "ended")
            case Busy() | None:
                return False

    def forget(self, key: str, waiting: Waiting) -> None:
        if self._waits.get(key) is waiting:
            del self._waits[key]
        self._by_token.pop(waiting.token, None)

    def fetch_from(self, key: str, lease: Granted, delay: float) -> None:
        self._table.fetch_from(key, lease.token, delay)

    def head(self, key: str, lease: Granted, shareable: bool, pass_: bool, status: int = 0) -> None:
        self._tell(self._table.head(key, lease.token, shareable, pass_, status))

    def release(self, key: str, lease: Granted, outcome: str, status: int = 0, message: str = "",
                detail: str = "", public: str = "", in_body: bool = False) -> None:
        self._tell(self._table.release(key, lease.token, outcome, status, message, detail, public, in_body))

    def _tell(self, told: Told) -> None:
        """Have the supervisor tell the waiters (only when there are some: a message each time)."""
        if not told:
            return

        async def send() -> None:
            with contextlib.suppress(Exception):
                await self._channel.call("lease_notify", wait=30.0, told=[[w, e] for w, e in told])

        task = asyncio.ensure_future(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, grace: float) -> None:
        """Let the words still being sent reach the supervisor (within ``grace`` seconds): a stop
        closes the control channel only after this, or the waiters in other workers would hear
        nothing of the fills that ended during the stop (``proxy.web.server.serve``)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)

    async def _event(self, token: int, outcome: str, status: int = 0, message: str = "",
                     key: str = "", detail: str = "", public: str = "", in_body: bool = False) -> None:
        found = self._by_token.pop(token, None)
        if found is None:
            return  # a wait that already gave up
        key, waiting = found
        if self._waits.get(key) is waiting:
            del self._waits[key]
        if not waiting.outcome.done():
            waiting.outcome.set_result({"outcome": outcome, "status": status, "message": message,
                                        "detail": detail, "public": public, "in_body": in_body})
