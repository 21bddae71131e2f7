"""This node's member of the cluster: the purge bus, its heartbeat, catch-up and acknowledgements.

One ``ClusterNode`` per node: in the only process, or with ``--workers N`` in the
supervisor (whose ``purge_here`` already reaches every worker). It never sits on
the hit path beyond one cheap check (``hits_held``: has this node's heartbeat
lapsed?): hits read only the local tiers.

A purge (admin API, ``PURGE``, or an unsafe method's invalidation arising here):

1. the live nodes are read (each node's heartbeat key has a TTL; a node seen live
   before that Redis forgot, restarted empty, counts for a TTL more: ``_live_nodes``);
2. with ``shared_cache`` the shared tier is purged (``proxy.cluster.shared``);
3. a script appends the purge to the stream: ``INCR`` of a gap-free sequence
   number and ``XADD ... MAXLEN ~ stream_max`` in one step;
4. only then is it applied here (``purge_here``): if Redis failed before, the
   purge answers 503 and nothing was applied anywhere (an append sent whose answer
   did not come may have been made: the 503 says so, and every node applies it);
5. every other node reads the entry (``XREAD BLOCK``), applies it, and publishes
   its acknowledgement with its count; the purge answers once every live node
   has acknowledged, or after ``ack_timeout`` with the others in ``missing`` (202).

An acknowledgement therefore means: that node has removed (or marked stale) the
entries in its memory tier of every worker and on its disk, and a fill that was
in flight there will not be stored.

Where a node resumes is kept in its cache directory (``cluster-state.json``:
epoch, sequence number, stream id), so a restarted node catches up on what it
missed before it serves (``proxy.cluster.stream.plan_resume``; a backlog is
merged into two local purges) and purges its whole local cache when it cannot
know what it missed (trimmed entries, a Redis that lost its data). Each read of the
stream also checks its epoch: a Redis emptied under a connected node (``FLUSHALL``) is
noticed at the first purge after it, not at the next reconnection. A node that
loses Redis keeps serving from its tiers, answers purges 503, retries every
second, and catches up the same way when Redis is back (stopped or stalled meanwhile past its
heartbeat's TTL, it holds hits until its next attempt has caught up or failed: the others no
longer counted it live: ``_away_ticks``); invalidations made
meanwhile (or refused by a Redis that answers but takes no writes) are applied
locally at once and kept in an outbox, retried every heartbeat: each is then
removed from the shared tier, appended to the stream and applied here again. The outbox
is kept in the cache directory too (``proxy.cluster.outbox``), read at start and sent once the
node has caught up, behind it (the node serves meanwhile), ``OUTBOX_BATCH`` at a time: a restart
meanwhile (to repoint ``cluster.redis`` after a failover) lost it.
While the outbox holds anything, the node does not consult the shared tier (with
``--workers N`` the supervisor tells its workers: ``outbox_changed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from redis.exceptions import AuthenticationError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.cluster import HOLD_MAX, ClusterUnavailable, stream
from proxy.cluster.outbox import OUTBOX_FILE, OutboxFile, Queued
from proxy.cluster.redis_checks import CHECK_EVERY, RedisCheck, RedisUnfit
from proxy.cluster.redis_io import (
    REDIS_DOWN,
    DeadSubscription,
    Names,
    RedisDataError,
    client,
    raise_if_cancelled,
    stored_int,
    subscribed,
)
from proxy.cluster.settings import ClusterSettings
from proxy.cluster.shared import PurgeCut
from proxy.cluster.stream import Flush, Resume, Saved, StreamEntry, Tip
from proxy.logs import RepeatedFailure
from proxy.policy.messages import CLOCK_SLACK
from proxy.purge import PurgeOutcome, PurgeSpec, PurgeUnavailable

log = logging.getLogger("cachegate.cluster")
_monotonic = time.monotonic  # (bound once: hits_held is on the hit path)

STATE_FILE = "cluster-state.json"
READ_BATCH = 1000  # stream entries read (and, when many, merged) at once
FIRST_READ = 16  # entries read to find where a backlog begins (past any that no node appended)
BLOCK_MS = 1000  # XREAD BLOCK: how long a read waits for new entries
OUTBOX_MAX = 10_000  # invalidations kept while Redis is unreachable
OUTBOX_BATCH = 500  # invalidations of the outbox sent at once (one pipeline of appends)
LOST_SHOWN = 100  # URLs a stop that loses the outbox names in its log line
EARLY_ACKS_MAX = 10_000  # acks kept while appends are in flight (the oldest go first)
RECONNECT_DELAY = (0.2, 0.5, 1.0)  # then every second

LocalPurge = Callable[[PurgeSpec], Awaitable[int]]

# KEYS: stream, seq, epoch. ARGV: maxlen, node, spec json, a new epoch if there is none.
APPEND = """
if redis.call('EXISTS', KEYS[3]) == 0 then redis.call('SET', KEYS[3], ARGV[4]) end
local seq = redis.call('INCR', KEYS[2])
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
                      'seq', seq, 'node', ARGV[2], 'spec', ARGV[3])
return {id, seq, redis.call('GET', KEYS[3])}
"""
# KEYS: stream, seq, epoch. ARGV: a new epoch if there is none. -> {epoch, seq, last id}
TIP = """
if redis.call('EXISTS', KEYS[3]) == 0 then redis.call('SET', KEYS[3], ARGV[1]) end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local id = '0-0'
if last[1] then id = last[1][1] end
return {redis.call('GET', KEYS[3]), redis.call('GET', KEYS[2]) or '0', id}
"""
# KEYS: members, this node's heartbeat, seq. ARGV: name, heartbeat, ttl ms, instance, take (0/1).
# -> {1 if written, the heartbeat another instance left there ('' if none), its PTTL, seq}, and
# when written Redis's TIME (seconds, microseconds): this node's clock is compared with it.
# A value that is no node's heartbeat is overwritten; another instance's only with take.
# Liveness is also kept in members..':alive' (ALIVE_SUFFIX), a ZSET of expiry times by Redis's
# clock: it has no TTL, so a volatile-* maxmemory policy never evicts it, as it may the heartbeat.
BEAT = """
local old = redis.call('GET', KEYS[2])
local other = ''
if old then
  local ok, beat = pcall(cjson.decode, old)
  if ok and type(beat) == 'table' and beat.instance ~= ARGV[4] then other = old end
end
if other ~= '' and ARGV[5] ~= '1' then
  return {0, other, redis.call('PTTL', KEYS[2]), redis.call('GET', KEYS[3]) or '0'}
end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1] .. ':alive', t[1] * 1000 + math.floor(t[2] / 1000) + ARGV[3], ARGV[1])
return {1, other, 0, redis.call('GET', KEYS[3]) or '0', t[1], t[2]}
"""
# KEYS: this node's heartbeat, the alive ZSET. ARGV: instance, name. Only if it is this instance's
# (or its heartbeat was evicted: a twin that beats puts itself back).
LEAVE = """
local old = redis.call('GET', KEYS[1])
local ok, beat = pcall(cjson.decode, old or '')
local ours = ok and type(beat) == 'table' and beat.instance == ARGV[1]
if ours then redis.call('DEL', KEYS[1]) end
if ours or not old then redis.call('ZREM', KEYS[2], ARGV[2]) end
return 1
"""
ALIVE_SUFFIX = ":alive"  # after the members key: NS:nodes:alive
# KEYS: members, the alive ZSET. ARGV: the heartbeat keys' prefix. -> {members, the live ones}: a
# heartbeat key (nodes of the release before write only that), or an expiry time still to come.
LIVE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local names = redis.call('SMEMBERS', KEYS[1])
local live = {}
for _, n in ipairs(names) do
  if tonumber(redis.call('ZSCORE', KEYS[2], n) or '0') > now or redis.call('EXISTS', ARGV[1] .. n) == 1 then
    live[#live + 1] = n
  end
end
return {names, live}
"""


class NameTaken(Exception):
    """Another live process runs as this node (its heartbeat is renewed under our name)."""


class NotAppliedHere(Exception):
    """A purge read from the stream that this node cannot apply now (its store failed for a
    reason of the moment): the session ends before its position is saved, and the next applies it."""

    def __init__(self, entry_id: str, exc: BaseException) -> None:
        super().__init__(f"purge stream entry {entry_id} could not be applied here "
                         f"({type(exc).__name__}: {exc}); it is applied again when the session restarts")


class HeartbeatLapsed(Exception):
    """This node's heartbeat key expired while it believed itself connected (the process was
    stopped, or stalled, for longer than the key's TTL): purges may have answered 200 without it."""


LOST: tuple[type[BaseException], ...] = (*REDIS_DOWN, HeartbeatLapsed)  # a session's end


@dataclass
class _Pending:
    """A purge this node sent, waiting for acknowledgements."""

    acks: dict[str, int] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class ClusterNode:
    def __init__(self, settings: ClusterSettings, local_purge: LocalPurge, state_dir: str | None,
                 *, shared_purge: Callable[[PurgeSpec], Awaitable[None]] | None = None,
                 shared_reset: Callable[[], Awaitable[None]] | None = None,
                 outbox_changed: Callable[[bool], Awaitable[None]] | None = None,
                 beat_changed: Callable[[int, float, bool, bool], None] | None = None,
                 info: Callable[[], dict[str, Any]] | None = None,
                 local_entries: Callable[[], int] | None = None,
                 hold: Callable[[], float] = lambda: HOLD_MAX,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        # This machine's clock, held against Redis's at every heartbeat (``_clock_measured``).
        self._clock = clock
        # How many seconds it is ahead of Redis's (behind: negative), last measured; None before.
        self.clock_offset: float | None = None
        self._clock_warned = False  # its offset beyond CLOCK_SLACK was said (once per episode)
        self._hold = hold  # at most this long a hit waits for this node to catch up (consistency_wait)
        self.name = settings.node
        self.instance = uuid.uuid4().hex  # this process, in its heartbeat: twins are told apart
        self.names = Names(settings.namespace)
        self._alive = self.names.members + ALIVE_SUFFIX  # liveness without a TTL (BEAT)
        # Its eviction policy and the ACL user's permissions, at each connection and every
        # CHECK_EVERY heartbeats (_recheck): RedisUnfit ends the session as a refused password does.
        self._check = RedisCheck(self.names, self.name, settings.shared_cache, settings.redacted_url)
        self._local = local_purge
        self._shared_purge = shared_purge
        self._shared_reset = shared_reset  # the shared tier's new generation (SharedTier.new_generation)
        self._outbox_changed = outbox_changed  # tells the workers whether the outbox holds anything
        # Tells the workers when its heartbeat expires, whether hits wait, and whether it is cut off
        # from Redis (WorkerGate).
        self._beat_changed = beat_changed
        self._beats_told = 0
        self._info = info or dict
        self._local_entries = local_entries  # how many entries the local cache holds (disk)
        self._state_path = os.path.join(state_dir, STATE_FILE) if state_dir else None
        self.saved: Saved | None = self._load_state()
        self.state = "starting"  # starting, catching-up, ready, disconnected, stopped
        self.reason = "connecting to Redis"
        self.connected = False
        self.ever_ready = False
        self.tip_seq = 0
        self.started = time.time()
        self.counts: dict[str, int] = dict.fromkeys(
            ("sent", "applied", "incomplete", "unavailable", "reconnects", "damaged", "outbox_dropped",
             "dead_subscriptions", "malformed_acks"), 0)
        self.full_purges: dict[str, int] = {"trimmed": 0, "redis-lost-data": 0, "no-state": 0}
        self._pending: dict[str, _Pending] = {}
        # The nodes last seen live (kept across sessions), and those Redis forgot since (it restarted
        # empty), each counted live until a heartbeat TTL after that was seen (_live_nodes).
        self._seen_live: set[str] = set()
        self._vouched: dict[str, float] = {}
        self._live_read = 0.0  # when they were last read (monotonic)
        # Acks that came while an append of ours was in flight: one of them may be for it, read by
        # the others before its XADD's answer reached us (_take_ack). Emptied once none is in flight.
        self._early: dict[str, dict[str, int]] = {}
        self._own: dict[str, asyncio.Future[None]] = {}  # own entries, applied by purge()
        self._appending: set[asyncio.Future[None]] = set()  # purge() calls waiting for their XADD
        # The last entry this node appended (epoch, seq): a Redis restored from a snapshot older
        # than it lost it, whether or not the follower had read it back (``stream.lost_own``).
        self._appended_seq: tuple[str, int] | None = None
        self._outbox: deque[Queued] = deque()
        # Kept in the cache directory across restarts (none without a disk: lost at stop, said so).
        self._kept = OutboxFile(os.path.join(state_dir, OUTBOX_FILE), self.name,
                                lambda: self._outbox) if state_dir else None
        self._redis: aioredis.Redis | None = None
        self._reader: aioredis.Redis | None = None
        # The heartbeat's own connection, set up before the first beat: a beat never waits for a
        # connection's set-up (several round trips) behind the time its key's lifetime counts from.
        self._beater: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._first = asyncio.Event()  # the first session caught up, or failed
        self._first_error: BaseException | None = None
        self._ended: BaseException | None = None  # why the last session ended (None: none yet)
        self._caught_up_all_along = False  # applied everything seen when Redis went away
        self._tip_read = False  # this session has read the stream's tip (tip_seq)
        # Its last read of the stream read everything there was (not a full batch): should Redis
        # lose its data now, what it had not read was lost for every node alike (check_epoch).
        self._at_tip = False
        self._closing = False
        self._failures = RepeatedFailure(log, "cluster: session")  # each second: once a minute
        # Why it is cut off from Redis, each reason when last logged and the failed attempts since
        # (_say_away): a reason is logged when it comes up, then once a minute while it lasts.
        self._away_said: dict[str, list[float]] = {}
        self._skipped = _Skipped()  # what Redis handed us that we skip, logged with a budget
        self._named = False  # this instance's heartbeat was written (the name is ours)
        self._twin_logged = False
        # The heartbeat key's TTL: long enough that a Redis answering within cluster.timeout never
        # lets it expire (a beat reaches Redis at most a timeout after it is sent, and the next one
        # is sent at most a timeout plus a heartbeat after that).
        self._ttl = max(3 * settings.heartbeat, 2.0, settings.heartbeat + 2 * settings.timeout)
        # When this session's heartbeat key expires at the latest (monotonic; 0: no heartbeat in
        # this session yet): past it, purges may answer 200 without this node.
        self._beat_deadline = 0.0
        self._lapsed = False  # a lapse was noticed, and this node has not caught up since
        self._lapse_retried = False  # the session that failed after a lapse was retried at once
        self._hits_go = asyncio.Event()  # set unless hits wait for a lapsed node to catch up
        self._hits_go.set()
        self._wake = asyncio.Event()  # the next reconnection attempt comes now (a lapse while cut off)
        self._ticks: asyncio.Task[None] | None = None  # _away_ticks
        self._flushing = asyncio.Lock()  # one sender of the outbox at a time
        self._batch = OUTBOX_BATCH  # invalidations it sends at once (fewer after a batch timed out)
        self._telling = asyncio.Lock()  # one message to the workers about it at a time
        self._told = False  # what the workers were told: invalidations wait in the outbox
        self._outbox_failing = False  # the last attempt to send the outbox failed (logged once)
        self._load_outbox()

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and catch up before this node serves; ``ClusterUnavailable`` when Redis
        cannot be reached and ``cluster.required`` is true (else keep trying in the background)."""
        self._task = asyncio.ensure_future(self._run())
        self._ticks = asyncio.ensure_future(self._away_ticks())
        await self._first.wait()
        if isinstance(self._first_error, NameTaken):
            await self.close()
            raise ClusterUnavailable(str(self._first_error))
        if self._first_error is not None:
            message = (f"cluster: cannot reach Redis at {self.settings.redacted_url}: "
                       f"{_describe(self._first_error)}")
            if _refused(self._first_error):  # (it answered: "cannot reach" was wrong)
                message = f"cluster: {_trouble(self.settings.redacted_url, self._first_error)}"
            elif isinstance(self._first_error, RedisDataError):
                message = (f"cluster: Redis at {self.settings.redacted_url} holds what this node "
                           f"cannot read: {self._first_error}")
            elif isinstance(self._first_error, NotAppliedHere):
                message = f"cluster: catching up: {self._first_error}"
            if self.settings.required:
                await self.close()
                raise ClusterUnavailable(message + " (set cluster.required: false to start anyway "
                                                   "and serve from the local cache)")
            log.warning("%s; serving from the local cache and retrying", message)

    async def close(self) -> None:
        """Leave the cluster at once (the heartbeat key goes: purges stop waiting for us)."""
        self._closing = True
        if self._redis is not None and self.connected:
            with contextlib.suppress(*REDIS_DOWN):  # not a twin's heartbeat: only our own
                await self._redis.eval(LEAVE, 2, self.names.node(self.name), self._alive, self.instance,
                                       self.name)
        self.state = "stopped"
        self._beat_deadline = 0.0
        self._release_hits()
        if self._ticks is not None:
            self._ticks.cancel()
        if self._task is not None:
            self._task.cancel()
            # Bounded: a cancellation that lands in the client's own read timeout can be lost
            # (the loops also stop on _closing).
            await asyncio.wait([self._task], timeout=BLOCK_MS / 1000 + self.settings.timeout + 1)
        await self._disconnect()
        await self._keep_outbox()

    async def _disconnect(self) -> None:
        # Not connected from now on, not once the clients are closed: closing them waits on dead
        # sockets, and meanwhile /metrics said connected 1 beside a "disconnected" state.
        if self.connected:
            self.connected = False
            self._tell_beat()  # the workers' shared tier stops waiting for Redis
        for c in (self._redis, self._reader, self._beater):
            if c is not None:
                with contextlib.suppress(Exception):
                    await c.aclose()
        self._redis = self._reader = self._beater = None

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            at_once = False
            self._wake.clear()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except NameTaken as exc:  # at start only: the node does not start
                self._first_error = exc
                self._set_state("stopped", str(exc))
                await self._disconnect()
                self._first.set()
                return
            except LOST as exc:
                self._ended = exc
                was_ready = self.state == "ready"
                if self._notice_lapse():
                    # Not counted live for a while: purges may have answered 200 without this node,
                    # so only the stream can tell what it missed (a new epoch then means "unknown").
                    self._caught_up_all_along = False
                else:
                    # (Still "disconnected" after reading the tip: a reconnection that stayed ready,
                    # with nothing to catch up on; as far along as one catching up.)
                    state = "catching-up" if self.state == "disconnected" and self._tip_read else self.state
                    self._caught_up_all_along = stream.caught_up_when_lost(
                        state, self._tip_read, self.saved, self.tip_seq, self._caught_up_all_along)
                self._beat_deadline = 0.0
                if self._lapsed and not self._lapse_retried:
                    # Reconnect at once, hits still waiting: a node that was stopped usually finds
                    # Redis there and catches up in a few milliseconds.
                    self._lapse_retried = at_once = True
                    attempt = 0
                    self._set_state("catching-up", self.reason)
                else:
                    self._set_state("disconnected", _trouble(self.settings.redacted_url, exc))
                    self._away()  # cut off from Redis: it serves from its tiers (below)
                    if was_ready:
                        attempt = 0  # a session that worked: the next attempt comes soon
                        log.error("cluster: %s; serving from the local cache, purges answer 503 until it "
                                  "is back", self.reason)
                    # (start() says why the first attempt failed)
                    self._say_away(self.reason, said=was_ready or not self._first.is_set())
                    if not self._first.is_set():
                        self._first_error = exc
            except Exception as exc:  # keep the node serving, say so, and retry
                # Garbage under our keys (RedisDataError) is said in words; anything else is a
                # bug, with its traceback. Either once, then once a minute: it fails each second.
                data = isinstance(exc, RedisDataError | NotAppliedHere)
                self._failures.failed(exc, traceback=not data)
                self._set_state("disconnected", str(exc) if data else f"cluster session failed: {exc!r}")
                self._away()
                if not self._first.is_set():
                    self._first_error = exc
            await self._disconnect()
            if self._first_error is not None:
                self._first.set()  # only now: start() may close this node at once
            self._own.clear()  # entries of ours not read yet are applied again: harmless
            self._early.clear()  # (an append in flight failed with the session)
            for p in self._pending.values():
                p.changed.set()
            if not at_once:
                delay = RECONNECT_DELAY[attempt] if attempt < len(RECONNECT_DELAY) else 1.0
                attempt += 1
                with contextlib.suppress(TimeoutError):  # (woken by a lapse: hits wait for it)
                    await asyncio.wait_for(self._wake.wait(), delay)
            self.counts["reconnects"] += 1

    async def _session(self) -> None:
        """One connection to Redis: catch up, then follow the stream until it fails."""
        s = self.settings
        self._tip_read = False
        self._redis = client(s, decode=True)
        self._reader = client(s, decode=True, blocking=BLOCK_MS / 1000)
        self._beater = client(s, decode=True)
        # Both connections set up at once (each costs a few round trips); the beats' is up before
        # the first beat's clock starts.
        await asyncio.gather(self._redis.ping(), self._beater.ping())
        await self._check.run(self._redis)  # (RedisUnfit: an allkeys-* policy, a command denied)
        # A node that says it is ready (it was, then lost Redis, and serves from its tiers) says
        # so until it knows of purges to catch up on (_catch_up): a Redis that answers PING but
        # holds writes (CLIENT PAUSE WRITE, in a failover) made each attempt say catching-up until
        # its heartbeat timed out, and every node's /healthz 503 at the same moments.
        if not self.ready:
            self._catching_up()
        pubsub = self._redis.pubsub()
        tasks: list[asyncio.Future[None]] = []
        try:
            # (inside the try: a heartbeat that Redis refuses, maxmemory reached, ended the
            # session with the subscribed connection left open, one more at each attempt)
            await pubsub.subscribe(self.names.acks)
            await self._heartbeat()  # live (purges wait for us) while catching up
            self.connected = True  # this session's writes get through
            self._tell_beat()
            tasks += [asyncio.ensure_future(self._listen_acks(pubsub)),
                      asyncio.ensure_future(self._heartbeats()), asyncio.ensure_future(self._recheck())]
            await self._catch_up(self._caught_up_all_along)
            # Ready before the outbox is sent (_send_outbox, at once): what it holds was applied
            # here when it was made, and this node does not consult the shared tier until it is
            # sent; the other nodes serve meanwhile what they served while Redis was away. Sent
            # first, it held a start up (proxy not listening) for about 7 ms an entry at 1 ms a
            # round trip: 70 s for a full outbox.
            self._set_state("ready", "")
            self._release_hits()
            if not self.ever_ready:
                self.ever_ready = True
            self._first.set()
            tasks.append(asyncio.ensure_future(self._follow()))
            tasks.append(asyncio.ensure_future(self._send_outbox()))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=BLOCK_MS / 1000 + self.settings.timeout + 1)
            for t in tasks:
                if t.done() and not t.cancelled():
                    t.exception()  # retrieved: the first one was raised above
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 8.2

    # -- a lapsed heartbeat -----------------------------------------------------------------

    def _notice_lapse(self) -> bool:
        """Whether this node's heartbeat has lapsed since it last caught up (noticed once: the
        state says so, and hits wait until it has caught up). While cut off from Redis, its
        liveness as the others count it lapsed (``_away_ticks``): the next reconnection attempt
        comes at once, and hits wait until it has caught up or failed."""
        if self._lapsed:
            return True
        deadline = self._beat_deadline
        if not deadline:
            return False
        late = time.monotonic() - deadline
        if late <= 0:
            return False
        self._lapsed = True
        # Not counted live for a while: purges may have answered 200 without this node, so only the
        # stream can tell what it missed (a new epoch then means "unknown": a Redis that restarted
        # empty meanwhile may have done so more than once).
        self._caught_up_all_along = False
        self._hits_go.clear()
        self._tell_beat()
        if self.connected:
            why = f"its heartbeat lapsed ({late + self._ttl:.1f}s since the last one"
        else:
            why = (f"it was cut off from Redis and stalled past its heartbeat's TTL ({late + self._ttl:.1f}s "
                   "without a tick")
            self._lapse_retried = True  # the next attempt is the one that catches up (or fails)
            self._wake.set()
        self._set_state("catching-up", f"{why}: the process was stopped or stalled), so purges may have "
                                       "answered without it: catching up before it serves from its cache")
        return True

    def _away(self) -> None:
        """Cut off from Redis: hits go on (it serves from its tiers), and the others count it live
        for a heartbeat's TTL from now at most, renewed by ``_away_ticks`` as a heartbeat would."""
        self._beat_deadline = time.monotonic() + self._ttl
        self._release_hits()

    async def _away_ticks(self) -> None:
        """While cut off from Redis, renew ``_beat_deadline`` every heartbeat, and notice when the
        process was stopped or stalled past it (here, or on the hit path: ``hits_held``): the
        others stopped counting it live (one cut off is vouched for a TTL at most, across a Redis
        restart), so purges may have answered 200 without it. It served them, the requests queued
        up while it was stopped first, until its next attempt reconnected and caught up."""
        while not self._closing:
            await asyncio.sleep(self.settings.heartbeat)
            if self.connected or self._lapsed or not self._beat_deadline:
                continue  # (a session's heartbeats keep it; a lapse waits for the next attempt)
            if not self._notice_lapse():
                self._beat_deadline = time.monotonic() + self._ttl
                self._tell_beat()

    def _say_away(self, reason: str, *, said: bool = False) -> None:
        """Log why this node is still cut off from Redis: a reason when it comes up, then once a
        minute while it lasts (``said``: it was just logged). Only the first reason was logged: a
        Redis back with a password the node lacks said "unreachable: Connection closed by server"
        once, as it went, and nothing after in the log."""
        now = time.monotonic()
        seen = self._away_said.pop(reason, None)
        if said or seen is None:
            if not said:
                log.error("cluster: still cut off: %s; serving from the local cache and retrying", reason)
            seen = [now, 0]
        else:
            seen[1] += 1
            if now - seen[0] >= 60.0:
                log.error("cluster: still cut off (%d more failed attempts in %.0fs): %s", seen[1],
                          now - seen[0], reason)
                seen = [now, 0]
        self._away_said[reason] = seen  # (the latest last)
        while len(self._away_said) > 16:
            del self._away_said[next(iter(self._away_said))]

    def _release_hits(self) -> None:
        """Caught up again (or cut off from Redis, where it serves from its tiers): hits go on."""
        self._lapsed = self._lapse_retried = False
        self._hits_go.set()
        self._tell_beat()

    def _tell_beat(self) -> None:
        """Tell the workers (``--workers N``) when this node's heartbeat expires and whether hits
        wait: they check the clock against it on their hit path as this process does; and whether
        it is cut off from Redis: their shared tier is not asked meanwhile."""
        if self._beat_changed is not None:
            self._beats_told += 1
            self._beat_changed(*self.beat_word())

    def beat_word(self) -> tuple[int, float, bool, bool]:
        """What the workers were last told (``_tell_beat``), for one that starts now."""
        return self._beats_told, self._beat_deadline, self._lapsed, not self.connected

    def hits_held(self) -> bool:
        """Whether hits must wait (``Engine``: on the hit path, so cheap): this node's heartbeat
        lapsed (or, cut off from Redis, its ticks: ``_away_ticks``), and it has not caught up since."""
        return self._lapsed or (_monotonic() > self._beat_deadline > 0.0 and self._notice_lapse())

    async def caught_up(self) -> None:
        """Wait until hits may go on (at most ``consistency_wait`` seconds)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hits_go.wait(), self._hold())

    @property
    def invalidations_pending(self) -> bool:
        """Invalidations made here are waiting for Redis (the outbox): the shared tier may
        still hold what they cover, so this node does not consult it meanwhile."""
        return bool(self._outbox)

    def _set_state(self, state: str, reason: str) -> None:
        if state != self.state:
            log.info("cluster: %s%s", state, f" ({reason})" if reason else "")
        if state == "ready":
            self._failures.succeeded()
            self._away_said.clear()
        self.state, self.reason = state, reason

    def _catching_up(self) -> None:
        if self.state != "catching-up":
            self._set_state("catching-up", "catching up with the cluster's purge stream")

    @property
    def ready(self) -> bool:
        """Whether this node has applied every purge it knows of (``/healthz``). A node that
        lost Redis after it was ready stays ready: it serves from its local cache (and while it
        reconnects, until it finds purges it missed: ``_session``)."""
        return self.state == "ready" or (self.state == "disconnected" and self.ever_ready) \
            or (self.state == "disconnected" and not self.settings.required)

    # -- catching up and following ------------------------------------------------------

    async def _tip(self) -> Tip:
        r = self._redis
        assert r is not None
        epoch, seq, last = await r.eval(TIP, 3, self.names.stream, self.names.seq, self.names.epoch,
                                        uuid.uuid4().hex)
        self.tip_seq = stored_int(seq, self.names.seq)
        self._tip_read = True
        return Tip(str(epoch), self.tip_seq, str(last))

    async def _catch_up(self, keep_unknown: bool, *, following: bool = False) -> None:
        """Read the tip, then resume where ``plan_resume`` says (``keep_unknown``: see there).
        ``following``: the node was ready and following the stream when it saw Redis lost its
        data (``_read_and_apply``): it stays ready unless it purges its whole cache (its state
        is not flipped for the few entries it reads again: every node noticed at once, and every
        /healthz said 503 at the same moment)."""
        r = self._redis
        assert r is not None
        appended = self._appended_seq  # (taken before TIP: an append answered later is after it)
        tip = await self._tip()
        saved = self.saved
        next_seq = None
        if saved is not None and saved.epoch == tip.epoch and tip.seq > saved.seq:
            first: Any = await r.xrange(self.names.stream, f"({saved.id}", "+", count=FIRST_READ)
            # (a damaged entry's number too: it took its number; not one ahead of the counter)
            next_seq = stream.first_trusted((stream.entry_seq(f) for _, f in first or ()), tip.seq)
        holds = saved is None and self._local_entries is not None and self._local_entries() > 0
        plan = stream.plan_resume(saved, tip, next_seq, keep_unknown=keep_unknown, holds_entries=holds)
        lost_own = stream.lost_own(appended, tip)
        if lost_own:  # one of ours, and maybe others' before it, it had not read yet
            plan = Flush(tip.last_id, "redis-lost-data")
        if self._appended_seq == appended:
            self._appended_seq = None  # (what Redis holds now: new appends number from its counter)
        if (lost_own or stream.lost_data(saved, tip)) and self._shared_reset is not None:
            # Redis lost purges (restarted empty, or from an older snapshot): what its shared tier
            # holds may be what they removed. Nothing of it is read again (before the local cache
            # goes, or a miss here would adopt it back).
            if not following:
                self._catching_up()
            log.warning("cluster: Redis lost data: the shared tier starts a new generation")
            await self._shared_reset()
        match plan:
            case Flush():
                self._catching_up()
                await self._flush(plan.reason, tip)
                self._at_tip = True  # (its record is the tip now)
            case Resume():
                if saved is None or saved.epoch != tip.epoch:
                    self._save(Saved(tip.epoch, 0 if plan.after == stream.START else tip.seq, plan.after))
                behind = tip.seq - (self.saved.seq if self.saved else 0)
                if behind > 0:
                    if not following:
                        self._catching_up()
                    log.info("cluster: catching up on %d purge(s) after %s", behind, plan.after)
                self._at_tip = False
                while await self._read_and_apply(block=False):
                    pass
        if following and self.state == "catching-up":
            self._set_state("ready", "")

    async def _flush(self, reason: str, tip: Tip) -> int:
        """Purge the whole local cache: this node cannot know which purges it missed (its count)."""
        self.full_purges[reason] = self.full_purges.get(reason, 0) + 1
        why = {"trimmed": "the purges it missed were trimmed from the stream",
               "redis-lost-data": "Redis lost its data (restarted empty, or from an older snapshot)",
               "no-state": f"it holds entries but no record of the purges it applied ({STATE_FILE} "
                           "missing or unreadable)"}.get(reason, reason)
        log.warning("cluster: purging the whole local cache: %s, so this node cannot know which "
                    "purges it missed", why)
        count = await self._local(PurgeSpec(all=True))
        self._save(Saved(tip.epoch, tip.seq, tip.last_id))
        return count

    async def _follow(self) -> None:
        while self._goes_on():
            await self._read_and_apply(block=True)
            if self._redis is not None and time.monotonic() - self._live_read >= self.settings.heartbeat:
                # Who is live, read each heartbeat and remembered: should Redis forget them
                # (restarted empty), purges go on counting them for a while (_live_nodes).
                with contextlib.suppress(*REDIS_DOWN):  # (the next read says so, if Redis is gone)
                    await self._live_nodes(self._redis)

    async def _read_and_apply(self, *, block: bool) -> bool:
        """Read the next entries and apply them; whether a full batch was read (more may wait)."""
        reader = self._reader if block else self._redis
        assert reader is not None and self.saved is not None
        after = self.saved.id
        raw: list[Any]
        if block:
            got: Any = await reader.xread({self.names.stream: after}, count=READ_BATCH, block=BLOCK_MS)
            raw = got[0][1] if got else []
        else:
            raw = list(await reader.xrange(self.names.stream, f"({after}" if after != stream.START else "-",
                                           "+", count=READ_BATCH) or [])
        if not raw:
            if not self._at_tip:
                # Nothing after a full batch (a catch-up's reads): the old stream's end, or a new
                # stream's empty start (a FLUSHALL mid-catch-up: a purge it had not read yet,
                # answered 200, was lost with it, and the node went on serving its object).
                epoch, _ = await self._stream_now()
                if stream.check_epoch(self.saved, epoch, at_tip=False) is not None:
                    log.warning("cluster: Redis lost its data while this node was catching up (the "
                                "purge stream's epoch changed: FLUSHALL, or a restart)")
                    await self._catch_up(False, following=block)
                    return False
            self._at_tip = True
            return False
        # The stream's epoch, read after the entries: another one means Redis lost its data since
        # this node last read it (FLUSHALL, or a restart under connections that stayed up), and
        # what was read is the new stream's, not the next entries of the one saved.
        epoch, counter = await self._stream_now()
        recatch = stream.check_epoch(self.saved, epoch, at_tip=self._at_tip)
        if recatch is not None:
            log.warning("cluster: Redis lost its data while this node was connected (the purge "
                        "stream's epoch changed: FLUSHALL, or a restart): catching up with the new stream")
            await self._catch_up(recatch.keep_unknown, following=block)
            return False  # (that caught up to the end)
        self._at_tip = len(raw) < READ_BATCH
        entries: list[StreamEntry] = []
        seqs: list[int] = []  # a damaged entry's too, when readable: it took its number
        read = [stream.entry_seq(fields) for _, fields in raw]
        for (entry_id, fields), seq in zip(raw, read, strict=True):
            if not stream.trusted(seq, counter):
                self.counts["damaged"] += 1
                self._skipped.report("cluster: damaged purge stream entry %s skipped: its sequence number "
                                     "%d is ahead of %s (%d), which every append counts: no node appended "
                                     "it: %s", entry_id, seq, self.names.seq, counter, _shown(fields))
                continue
            if seq is not None:
                seqs.append(seq)
            entry = stream.decode_entry(entry_id, fields)
            if entry is None:
                self.counts["damaged"] += 1
                self._skipped.report("cluster: damaged purge stream entry %s skipped: %s", entry_id,
                                     _shown(fields))
                continue
            entries.append(entry)
        last_id = str(raw[-1][0])
        last_seq = max([self.saved.seq, *seqs])
        if seqs and seqs[0] > self.saved.seq + 1:
            # Trimmed while we were away (or slow): what was lost cannot be known. The whole local
            # cache goes, which covers this batch too: its entries are acknowledged with that count
            # (their senders wait for us), and reading goes on after it.
            count = await self._flush("trimmed", Tip((await self._tip()).epoch, last_seq, last_id))
            await self._apply(entries, merge=True, flushed=count)
            return len(raw) == READ_BATCH
        await self._apply(entries, merge=not block)
        self._save(Saved(self.saved.epoch, last_seq, last_id))
        return len(raw) == READ_BATCH

    async def _stream_now(self) -> tuple[str | None, int]:
        """The stream's epoch (None: none yet) and counter (``NS:purges:seq``) as they are now."""
        r = self._redis
        assert r is not None
        epoch, seq = await r.mget([self.names.epoch, self.names.seq])
        self.tip_seq = stored_int(seq, self.names.seq)
        return (None if epoch is None else str(epoch)), self.tip_seq

    async def _apply(self, entries: list[StreamEntry], merge: bool, *, flushed: int | None = None) -> None:
        """Apply entries in order (``merge``: a backlog, as few local purges as possible; their
        acknowledgements then all carry the merged count). ``flushed``: the whole local cache was
        just purged, which covers them: they are only acknowledged, with that count."""
        theirs: list[StreamEntry] = []
        for e in entries:
            if e.node == self.name and e.id not in self._own and self._appending:
                # Our own purge, read before its XADD's answer reached purge(): let it register.
                await asyncio.wait(list(self._appending))
            own = self._own.pop(e.id, None)
            if own is not None:
                await asyncio.shield(own)  # purge() applies its own entry; the position waits for it
            else:
                theirs.append(e)
        if not theirs:
            return
        counts: dict[str, int] = {}
        if flushed is not None:
            counts = dict.fromkeys((e.id for e in theirs), flushed)
        elif not merge and len(theirs) <= 16:
            counts = await self._apply_each(theirs)
        else:
            total = 0
            try:
                for spec in stream.merge_specs(e.spec for e in theirs):
                    total += await self._local(spec)
                counts = {e.id: total for e in theirs}
            except Exception as exc:  # one of them cannot be applied: find which (purges are idempotent)
                if stream.apply_failure(exc) == "retry":
                    raise NotAppliedHere(theirs[0].id, exc) from exc
                counts = await self._apply_each(theirs)
        self.counts["applied"] += len(counts)
        r = self._redis
        if r is not None:
            async with r.pipeline(transaction=False) as pipe:
                for entry_id, n in counts.items():
                    pipe.publish(self.names.acks, json.dumps({"id": entry_id, "node": self.name, "n": n}))
                await pipe.execute()

    async def _apply_each(self, entries: list[StreamEntry]) -> dict[str, int]:
        """Apply each entry here: its count, by id. One that fails here (what the stream's typing
        lets through and the local store refuses) is counted damaged, logged and skipped, and not
        acknowledged (its sender answers 202 naming this node): it ended the session before, and
        every session after it, for good. One that cannot be applied *now* (``apply_failure``:
        a locked index, a full disk) ends the session before its position is saved: retried."""
        counts: dict[str, int] = {}
        for e in entries:
            try:
                counts[e.id] = await self._local(e.spec)
            except Exception as exc:
                if stream.apply_failure(exc) == "retry":
                    raise NotAppliedHere(e.id, exc) from exc
                self.counts["damaged"] += 1
                self._skipped.report("cluster: damaged purge stream entry %s skipped: it cannot be applied "
                                     "here (%s: %s): %s from %s", e.id, type(exc).__name__, exc,
                                     e.spec.describe(), _shown(e.node))
        return counts

    # -- sending purges -------------------------------------------------------------------

    async def purge(self, spec: PurgeSpec) -> PurgeOutcome:
        """Purge on every node (see the module docstring); PurgeUnavailable when Redis is not
        reachable (nothing applied anywhere), except for invalidations, applied here at once
        and sent when Redis is back."""
        if not self.connected or self._redis is None:
            if spec.invalidation:
                return await self._invalidate_offline(spec)
            self.counts["unavailable"] += 1
            raise PurgeUnavailable(self._unavailable_message(self.reason, "disconnected"))
        r = self._redis
        loop = asyncio.get_running_loop()
        appending: asyncio.Future[None] = loop.create_future()
        self._appending.add(appending)
        appended = False  # the append was sent: Redis may have made the entry whatever comes back
        try:
            live = await self._live_nodes(r)
            if self._shared_purge is not None:
                await self._shared_purge(spec)
            appended = True
            entry_id, seq, epoch = await r.eval(
                APPEND, 3, self.names.stream, self.names.seq, self.names.epoch,
                self.settings.stream_max, self.name, json.dumps(spec.to_json(), separators=(",", ":")),
                uuid.uuid4().hex)
            entry_id = str(entry_id)
            self._appended_seq = (str(epoch), stored_int(seq, self.names.seq))
            early = self._early.pop(entry_id, {})  # (before _appended: it may empty them)
            applied: asyncio.Future[None] = loop.create_future()
            self._own[entry_id] = applied
        except REDIS_DOWN as exc:
            if spec.invalidation:
                return await self._invalidate_offline(spec)
            self.counts["unavailable"] += 1
            kind = ("partly" if isinstance(exc, PurgeCut) else "refused" if _refused(exc)
                    else "unknown" if appended else "unreachable")
            why = _describe(exc)
            if not self.connected and _timed_out(self._ended):
                # This node gave its connections up under the purge (a Redis that answers nothing:
                # stopped, hung): "Connection closed by server" blamed Redis for our own close.
                why = (f"no answer within {self.settings.timeout:g}s, so this node closed its "
                       "connections to it")
            raise PurgeUnavailable(self._unavailable_message(why, kind)) from None
        finally:
            self._appended(appending)
        self.counts["sent"] += 1
        pending = self._pending[entry_id] = _Pending(early)
        try:
            pending.acks[self.name] = await self._local(spec)
        finally:
            applied.set_result(None)
        try:
            deadline = time.monotonic() + self.settings.ack_timeout
            while not set(live) <= set(pending.acks) and self.connected:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                pending.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(pending.changed.wait(), left)
        finally:
            del self._pending[entry_id]
        result = stream.outcome(live, pending.acks)
        if result.missing:
            self.counts["incomplete"] += 1
            log.warning("cluster: purge %s not acknowledged by %s within %.1fs", entry_id,
                        ", ".join(result.missing), self.settings.ack_timeout)
        return result

    def _appended(self, appending: asyncio.Future[None]) -> None:
        """An append of ours has its answer (or failed). With none in flight any more, the early
        acks are nobody's: every entry of ours already took its own (kept, they filled the buffer
        with the other nodes' purges, and ours were then dropped: 202 after ack_timeout)."""
        self._appending.discard(appending)
        appending.set_result(None)
        if not self._appending:
            self._early.clear()

    def _unavailable_message(self, why: str, kind: str) -> str:
        """A 503's words, by what went wrong (``kind``): ``unreachable`` (no answer before the
        append was sent), ``refused`` (Redis answered with an error: retrying will not help by
        itself), ``unknown`` (the append was sent, and no answer came: Redis may have made it),
        ``partly`` (the shared tier's purge did not finish: it may be purged in part, and no node
        was told) or ``disconnected`` (this node is not connected; ``why`` is its state's reason)."""
        url = self.settings.redacted_url
        if kind == "partly":
            # (It said "nothing was purged on any node" while the shared tier had been purged.)
            return (f"cluster: the purge may have been partly made: Redis at {url} did not finish "
                    f"removing it from the shared tier ({why}); what it removed there stays removed, "
                    "and no node was told (nothing was purged in any node's own cache); purge again "
                    "(a purge is idempotent) (GET /cluster shows the state)")
        if kind == "unknown":
            return (f"cluster: the purge may or may not have been made: Redis at {url} did not answer "
                    f"its append ({why}); if Redis made it, every node applies it; retry it (a purge "
                    "is idempotent) (GET /cluster shows the state)")
        if kind == "refused":
            return (f"cluster: the purge was not made: Redis at {url} answered with an error ({why}), "
                    "so the other nodes cannot be told; nothing was purged on any node; retrying does "
                    "not help until that is fixed (GET /cluster shows the state)")
        if kind == "disconnected":
            return (f"cluster: the purge was not made: this node is not connected to Redis ({why}), "
                    "so the other nodes cannot be told; nothing was purged on any node; retry once it "
                    "is connected again (GET /cluster shows its state)")
        return (f"cluster: the purge was not made: Redis at {url} is not reachable ({why}), so the "
                "other nodes cannot be told; nothing was purged on any node; retry when it is back "
                "(GET /cluster shows the state)")

    async def _invalidate_offline(self, spec: PurgeSpec) -> PurgeOutcome:
        """An unsafe method's invalidation while Redis is away: applied here now (the client
        already has the origin's answer) and sent to the others when Redis is back."""
        count = await self._local(spec)
        if len(self._outbox) >= OUTBOX_MAX:
            self._outbox.popleft()
            self.counts["outbox_dropped"] += 1
        self._outbox.append(Queued(spec, time.time()))
        if self._kept is not None:
            self._kept.changed()
        await self._tell_outbox()  # before the answer: no later request adopts what it covers
        return PurgeOutcome(count, {self.name: count}, ())

    async def _tell_outbox(self) -> None:
        """Tell the workers whether the outbox holds anything, when that changed (one at a
        time, each the state as of its sending: the last one told is the last state)."""
        if self._outbox_changed is None:
            return
        async with self._telling:
            pending = bool(self._outbox)
            if pending == self._told:
                return
            try:
                await self._outbox_changed(pending)
            except Exception:
                log.exception("cluster: cannot tell the workers of the outbox")
            self._told = pending

    async def _flush_outbox(self) -> None:
        """Send the invalidations Redis could not take, as ``purge()`` does each, ``OUTBOX_BATCH``
        at a time: out of the shared tier first (it may still hold what they cover; the batch as
        one purge), then onto the stream (one entry each, as made, in one pipeline), then applied
        here again (a fill may have stored a covered object here meanwhile; the batch as one
        local purge). One stays in the outbox until it is on the stream. One at a time, each
        entry cost three round trips and a local purge: 10,000 took 6 s on a unix socket, about
        70 s at 2 ms a round trip (a saved outbox delayed the start that long)."""
        async with self._flushing:
            loop = asyncio.get_running_loop()
            while self._outbox:
                r = self._redis
                if r is None:
                    return
                batch = [q.spec for q in itertools.islice(self._outbox, self._batch)]
                if self._shared_purge is not None:
                    for merged in stream.merge_specs(batch):
                        await self._shared_purge(merged)
                appending: asyncio.Future[None] = loop.create_future()
                self._appending.add(appending)
                applied: asyncio.Future[None] = loop.create_future()
                sent = 0
                failed: BaseException | None = None
                try:
                    async with asyncio.timeout(self.settings.timeout), r.pipeline(transaction=False) as pipe:
                        for spec in batch:
                            pipe.eval(APPEND, 3, self.names.stream, self.names.seq, self.names.epoch,
                                      self.settings.stream_max, self.name,
                                      json.dumps(spec.to_json(), separators=(",", ":")), uuid.uuid4().hex)
                        answers = await pipe.execute(raise_on_error=False)
                except (TimeoutError, RedisTimeoutError):
                    # Smaller batches from now on (Redis may have made these: they are sent again,
                    # harmlessly): the same batch would time out again, for ever.
                    self._batch = max(1, len(batch) // 4)
                    raise
                else:
                    for answer in answers:  # (any after a refused one stays: sent again, harmlessly)
                        if isinstance(answer, BaseException):
                            failed = answer
                            break
                        self._own[str(answer[0])] = applied
                        sent += 1
                    if sent == len(batch):
                        self._batch = min(OUTBOX_BATCH, self._batch * 2)
                finally:
                    self._appended(appending)
                    if not sent:
                        applied.set_result(None)
                if sent:
                    for _ in range(sent):
                        self._outbox.popleft()
                    if self._kept is not None:
                        self._kept.changed()
                    self.counts["sent"] += sent
                    try:
                        for merged in stream.merge_specs(batch[:sent]):
                            await self._local(merged)
                    finally:
                        applied.set_result(None)
                if failed is not None:
                    raise failed
                if not self._outbox:
                    await self._tell_outbox()

    def _load_outbox(self) -> None:
        """The invalidations this node's last run could not send (``proxy.cluster.outbox``): sent
        once this start has caught up (behind: the node serves meanwhile), in the order they were
        made. A file that cannot be read, whole or in part, is moved aside (``.bad``) once said:
        left in place it was said, and lost, again at every start, and counted at none."""
        if self._kept is None:
            return
        path = self._kept.path
        try:
            entries, unreadable = self._kept.read()
        except Exception as exc:  # (OSError; ValueError, RecursionError: not an outbox)
            # Counted as one: how many it held cannot be known, and it held one at least (the
            # file exists only while the outbox holds any).
            self.counts["outbox_dropped"] += 1
            log.error("cluster: %s is unreadable (%s): the invalidations this node could not send "
                      "before it stopped are lost (the other nodes may serve what they covered until "
                      "it expires; counted as one in outbox_dropped: how many it held is unknown); %s",
                      path, exc, self._kept.set_aside())
            return
        over = max(0, len(entries) - OUTBOX_MAX)
        entries = entries[over:]
        if unreadable or over:
            self.counts["outbox_dropped"] += unreadable + over
            log.error("cluster: %d invalidation(s) of %s dropped (%d unreadable, %d the oldest past the "
                      "outbox's %d): the other nodes may serve what they covered until it expires; %s",
                      unreadable + over, path, unreadable, over, OUTBOX_MAX, self._kept.set_aside())
            self._kept.store_now(entries)  # (those it keeps, without the dropped ones)
        if entries:
            self._outbox.extend(entries)
            self._told = True  # (a worker is told as it starts: Supervisor._tell_node)
            log.warning("cluster: %d invalidation(s) made here before this node stopped were not sent "
                        "to the other nodes yet (the oldest %.0fs ago): they are sent from %s once it "
                        "has caught up with the cluster", len(entries), max(0.0, time.time() - entries[0].at),
                        path)

    async def _keep_outbox(self) -> None:
        """At stop: the invalidations Redis has not taken are kept for the next start, or lost (no
        disk cache to keep them in, or their file cannot be written): one line says which."""
        kept = self._kept is not None and await self._kept.close()
        n = len(self._outbox)
        if not n:
            return
        if kept:
            assert self._kept is not None
            log.warning("cluster: %d invalidation(s) made here were not sent to the other nodes (Redis "
                        "did not take them): kept in %s for the next start, which sends them", n,
                        self._kept.path)
            return
        urls = list(dict.fromkeys(u for q in self._outbox for u in (q.spec.urls or q.spec.keys)))
        shown = ", ".join(urls[:LOST_SHOWN])
        if len(urls) > LOST_SHOWN:
            shown += f", ... {len(urls) - LOST_SHOWN} more"
        where = (f"they could not be written to {self._kept.path}" if self._kept is not None else
                 "this node has no disk cache to keep them in (cache.disk: null)")
        log.error("cluster: %d invalidation(s) made here were not sent to the other nodes (Redis did not "
                  "take them) and are lost: %s; the other nodes may serve what they covered until it "
                  "expires (purge it there once Redis is back): %d URL(s): %s", n, where, len(urls), shown)

    async def _try_flush_outbox(self) -> None:
        """``_flush_outbox``, retried on every heartbeat while the outbox holds anything: Redis
        may refuse the writes while it answers everything else (``maxmemory`` reached)."""
        if not self._outbox:
            return
        try:
            await self._flush_outbox()
        except REDIS_DOWN as exc:
            if not self._outbox_failing:
                log.error("cluster: %d invalidation(s) made here cannot be sent yet (%s); retrying "
                          "every heartbeat, and not using the shared tier meanwhile", len(self._outbox),
                          _describe(exc))
            self._outbox_failing = True
            return
        if self._outbox_failing:
            log.warning("cluster: the invalidations made here while Redis could not take them are sent")
        self._outbox_failing = False

    async def _live_nodes(self, r: aioredis.Redis) -> list[str]:
        """The nodes a purge waits for: those whose heartbeat key is there, and those this node saw
        live before that Redis no longer knows of at all (the member set only grows: Redis lost its
        data, restarted empty). Those are counted live for a heartbeat TTL from when that was first
        seen here, time enough to reconnect: a purge answers 202 naming them (or waits for their
        acknowledgements), never 200 while they still serve what it covers. A node that left
        (its heartbeat deleted or expired) is still a member: it is not counted."""
        members, alive = await r.eval(LIVE, 2, self.names.members, self._alive, self.names.node(""))
        names = self._member_names(members)
        live = {str(n) for n in alive if not stream.not_utf8(n)} | {self.name}
        now = time.monotonic()
        for n in self._seen_live.difference(names):
            self._vouched.setdefault(n, now + self._ttl)
        self._vouched = {n: t for n, t in self._vouched.items() if t > now and n not in live}
        self._seen_live = live | set(self._vouched)
        self._live_read = now
        return sorted(self._seen_live)

    async def _listen_acks(self, pubsub: Any) -> None:
        """Collect the acknowledgements; DeadSubscription (the session ends, and reconnects) when
        the connection answers no PING: without it, every purge made here waited ``ack_timeout``
        and answered 202 naming every other node, for as long as the process ran."""
        try:
            async for message in subscribed(pubsub, self.settings, "acknowledgements", lambda: self._closing):
                try:
                    self._take_ack(message)
                except Exception as exc:  # (a bug: a message is never the session's end)
                    self.counts["malformed_acks"] += 1
                    self._skipped.report("cluster: acknowledgement %s skipped: %s: %s",
                                         _shown(message.get("data")), type(exc).__name__, exc)
        except DeadSubscription:
            self.counts["dead_subscriptions"] += 1
            raise

    def _member_names(self, members: Any) -> list[str]:
        """The node names of the member set, without what no node writes there (not UTF-8:
        logged with a budget and skipped; it failed the session, or answered GET /cluster 500)."""
        names = []
        for n in members:
            if stream.not_utf8(n):
                self._skipped.report("cluster: %s holds %s, which is not UTF-8 and so no node's name "
                                     "(another program wrote it?): skipped", self.names.members, _shown(n))
            else:
                names.append(str(n))
        return names

    def _take_ack(self, message: dict[str, Any]) -> None:
        if message.get("type") != "message":
            return
        ack = _read_ack(message.get("data"))
        if ack is None:
            # Not what a node publishes (another program's, on our channel): ignored. An
            # ``"n": Infinity`` (OverflowError) ended every node's session with it.
            self.counts["malformed_acks"] += 1
            self._skipped.report("cluster: malformed acknowledgement ignored: %s",
                                 _shown(message.get("data")))
            return
        entry_id, node, n = ack
        pending = self._pending.get(entry_id)
        if pending is not None:
            pending.acks[node] = n
            pending.changed.set()
        elif self._appending:
            # Maybe for an append of ours whose answer has not come yet (a slower link than the
            # others'): kept until it has. Past the cap the oldest go (ours is among the newest).
            self._early.setdefault(entry_id, {})[node] = n
            while len(self._early) > EARLY_ACKS_MAX:
                del self._early[next(iter(self._early))]
        # else: no append of ours is in flight, so it is for a purge made elsewhere (or one of ours
        # that no longer waits)

    # -- membership -----------------------------------------------------------------------

    def node_info(self) -> dict[str, Any]:
        saved = self.saved
        return {"node": self.name, "state": self.state, "reason": self.reason,
                "applied_seq": saved.seq if saved else 0, "applied_id": saved.id if saved else None,
                "epoch": saved.epoch if saved else None, "started": self.started, "pid": os.getpid(),
                "instance": self.instance, "seen": time.time(),
                "clock_offset": None if self.clock_offset is None else round(self.clock_offset, 3),
                **self._info()}

    async def _heartbeat(self) -> None:
        """Say this node is alive. Before it serves, the name must be free: another instance's
        heartbeat that is renewed means another process runs as this node (NameTaken); one
        that expires unrenewed was a process that died (a restart within its TTL waits for it).
        Once the node serves, another instance's heartbeat is logged (once) and overwritten."""
        r = self._beater  # used by the beats alone, one at a time: its one connection is up
        assert r is not None
        ttl_ms = int(self._ttl * 1000)
        take = self._named or self._first.is_set()
        first: str | None = None
        deadline = 0.0
        while True:
            sent = time.monotonic()
            wall = self._clock()
            beat = await r.eval(
                BEAT, 3, self.names.members, self.names.node(self.name), self.names.seq, self.name,
                json.dumps(self.node_info()), ttl_ms, self.instance, "1" if take else "0")
            written, other, pttl, seq = beat[:4]
            self.tip_seq = stored_int(seq, self.names.seq)
            if int(written):
                self._clock_measured(wall, self._clock(), beat[4:])
                break
            now = time.monotonic()
            if first is None:
                first, deadline = other, now + (int(pttl) if int(pttl) > 0 else ttl_ms) / 1000 + 0.1
            elif other != first or now >= deadline:
                raise NameTaken(f"cluster: another process runs as node {self.name!r} in Redis at "
                                f"{self.settings.redacted_url} ({_who(other)}; its heartbeat is alive): "
                                "every node needs a name of its own (cluster.node); stop that process "
                                "or give this node another name")
            await asyncio.sleep(min(0.1, self.settings.heartbeat / 2))
        self._named = True
        self._beat_deadline = sent + self._ttl
        if other and not self._twin_logged:
            self._twin_logged = True
            log.error("cluster: another process also runs as node %r (%s): both go on, but purges may "
                      "count one's acknowledgement as the other's; give each node its own cluster.node",
                      self.name, _who(other))
        self._tell_beat()

    def _clock_measured(self, before: float, after: float, redis_time: list[Any]) -> None:
        """This machine's clock against Redis's TIME, read by a heartbeat sent at ``before`` and
        answered at ``after`` (this clock): nodes whose clocks differ by more than CLOCK_SLACK
        no longer share the shared tier's entries (each finds the others' stored in the future
        or long stale) and date every Age from their own clock, and nothing else says why. Said
        once per episode (beyond CLOCK_SLACK, the round trip allowed for), shown in ``/cluster``
        (``clock_offset``) and as ``cachegate_cluster_clock_offset_seconds``; what
        ``Engine.date_behind`` says of an origin's Date uses it too. Free: the heartbeat's script
        reads Redis's clock anyway (its liveness set is kept by it)."""
        try:
            now = int(redis_time[0]) + int(redis_time[1]) / 1e6
        except (IndexError, TypeError, ValueError):
            return  # (a script of an older build's, or what no Redis answers: not measured)
        offset = self.clock_offset = (before + after) / 2 - now
        if abs(offset) - (after - before) / 2 > CLOCK_SLACK:
            if not self._clock_warned:
                self._clock_warned = True
                log.warning("cluster: this machine's clock is %.0f s %s Redis's at %s: one of the two "
                            "is wrong (check this machine's NTP and Redis's host's); nodes whose clocks "
                            "differ by more than %.0f s do not share the shared tier's entries, and their "
                            "Age values differ", abs(offset), "ahead of" if offset > 0 else "behind",
                            self.settings.redacted_url, CLOCK_SLACK)
        elif self._clock_warned and abs(offset) < CLOCK_SLACK / 2:
            self._clock_warned = False
            log.warning("cluster: this machine's clock agrees with Redis's again (%.1f s apart)", offset)

    def _goes_on(self) -> bool:
        """Whether a loop of this session goes on: not once the node closes, nor once the session
        ended (CancelledError: a cancellation Python 3.11 lost in a command's send left the loop
        of an ended session going on beside the next one's, the heartbeats on its connection
        until that was gone, and the session waited for it its whole 3 s before it reconnected)."""
        raise_if_cancelled()
        return not self._closing

    async def _heartbeats(self) -> None:
        while self._goes_on():
            await asyncio.sleep(self.settings.heartbeat)
            # (Noticed on the hit path, maybe against the deadline before a heartbeat that was
            # under way when the process stopped: this session ends all the same.)
            if (self._lapsed and not self._lapse_retried) \
                    or (self._beat_deadline and time.monotonic() > self._beat_deadline):
                self._notice_lapse()
                raise HeartbeatLapsed(self.reason)
            await self._heartbeat()

    async def _recheck(self) -> None:
        """Check Redis again every ``CHECK_EVERY`` heartbeats (``RedisCheck``; on a connection of
        the pool, not the heartbeats' own: a check never delays a beat): a policy turned to
        ``allkeys-*``, or a command taken from the ACL user, under a running node ends its session
        as Redis refusing its password would (``RedisUnfit``)."""
        while self._goes_on():
            await asyncio.sleep(self.settings.heartbeat * CHECK_EVERY)
            if self._redis is not None:
                await self._check.run(self._redis)

    async def _send_outbox(self) -> None:
        """Send the outbox as the session is ready, then retry it every heartbeat while it holds
        anything (a purge that Redis refused while the connection stayed up lands there too)."""
        while self._goes_on():
            await self._try_flush_outbox()
            await asyncio.sleep(self.settings.heartbeat)

    async def view(self) -> dict[str, Any]:
        """``GET /cluster``: every node this Redis has seen, with its state and lag."""
        me = self.node_info()
        body: dict[str, Any] = {
            "node": self.name, "redis": self.settings.redacted_url, "connected": self.connected,
            "state": self.state, "reason": self.reason, "ready": self.ready,
            "shared_cache": self.settings.shared_cache, "stream_seq": self.tip_seq, "nodes": [],
        }
        nodes: dict[str, dict[str, Any]] = {}
        r = self._redis
        if self.connected and r is not None:
            try:
                names = sorted(self._member_names(await r.smembers(self.names.members)))
                beats = await r.mget([self.names.node(n) for n in names]) if names else []
                with contextlib.suppress(RedisDataError):  # the session says so (reason)
                    self.tip_seq = stored_int(await r.get(self.names.seq), self.names.seq)
                body["stream_seq"] = self.tip_seq
                for n, b in zip(names, beats, strict=True):
                    nodes[n] = _heartbeat_info(n, b)
            except REDIS_DOWN as exc:
                body["connected"] = False
                body["reason"] = _trouble(self.settings.redacted_url, exc)
        nodes[self.name] = me
        for info in nodes.values():
            seq = info.get("applied_seq")
            info["live"] = info.get("state") != "gone"
            info["lag"] = max(0, self.tip_seq - int(seq)) if isinstance(seq, int) else None
        body["nodes"] = [nodes[n] for n in sorted(nodes)]
        return body

    # -- state file -----------------------------------------------------------------------

    def _load_state(self) -> Saved | None:
        if self._state_path is None:
            return None
        try:
            with open(self._state_path) as f:
                return Saved.from_json(json.load(f))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("cluster: %s is unreadable (%s): this node resumes as if it were new "
                        "(its local cache is purged if it holds anything)", self._state_path, exc)
            return None

    def _save(self, saved: Saved) -> None:
        self.saved = saved
        self.tip_seq = max(self.tip_seq, saved.seq)
        if self._state_path is None:
            return
        tmp = f"{self._state_path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(saved.to_json(), f)
            os.replace(tmp, self._state_path)
        except OSError as exc:
            log.error("cluster: cannot save %s: %s", self._state_path, exc)

    # -- metrics --------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("cachegate_cluster_connected", "1 when this node is connected to Redis")
        g.add_metric([], 1.0 if self.connected else 0.0)
        yield g
        # The same test as /healthz and GET /cluster's "ready" (it said 0 while Redis was away,
        # where those say ready: the node serves from its tiers; ..._connected says Redis is away).
        g = GaugeMetricFamily("cachegate_cluster_ready",
                              "1 when this node has applied every purge of the cluster it knows of "
                              "(what /healthz says)")
        g.add_metric([], 1.0 if self.ready else 0.0)
        yield g
        if self.clock_offset is not None:
            g = GaugeMetricFamily("cachegate_cluster_clock_offset_seconds",
                                  "How far this machine's clock is ahead of Redis's (behind: negative), "
                                  "measured at its last heartbeat")
            g.add_metric([], self.clock_offset)
            yield g
        g = GaugeMetricFamily("cachegate_cluster_lag", "Purges of the stream this node has not applied yet")
        g.add_metric([], float(max(0, self.tip_seq - (self.saved.seq if self.saved else 0))))
        yield g
        g = GaugeMetricFamily("cachegate_cluster_outbox",
                              "Invalidations made on this node that Redis has not taken yet (the outbox)")
        g.add_metric([], float(len(self._outbox)))
        yield g
        c = CounterMetricFamily("cachegate_cluster_bus", "Purge bus events on this node", labels=["event"])
        for event, n in self.counts.items():
            c.add_metric([event], n)
        yield c
        c = CounterMetricFamily("cachegate_cluster_full_purges",
                                "Whole local cache purged because this node could not know what it missed",
                                labels=["reason"])
        for reason, n in self.full_purges.items():
            c.add_metric([reason], n)
        yield c


def _heartbeat_info(name: str, beat: str | bytes | None) -> dict[str, Any]:
    """A node's heartbeat as ``GET /cluster`` shows it: ``gone`` without one, ``unreadable``
    for a value no node writes (it is live all the same: purges wait for it)."""
    if not beat:
        return {"node": name, "state": "gone"}
    try:
        info = None if stream.not_utf8(beat) else json.loads(beat)
    except Exception:  # (too deep for the parser, ...)
        info = None
    if not isinstance(info, dict):
        return {"node": name, "state": "unreadable",
                "reason": f"its heartbeat key holds {_shown(beat, 40)}, which no node writes"}
    return info


class _Skipped:
    """What Redis handed this node that it skips (a damaged stream entry, a name that is not
    UTF-8, ...), each counted by its caller: logged up to ``PER_MINUTE`` times a minute, then
    how many were not. Another program's flood must neither end the session nor bury the log."""

    PER_MINUTE = 10

    def __init__(self) -> None:
        self._since = -60.0
        self._logged = self._quiet = 0

    def report(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._since >= 60.0:
            if self._quiet:
                log.error("cluster: %d more such message(s) in the last minute were not logged", self._quiet)
            self._since, self._logged, self._quiet = now, 0, 0
        if self._logged < self.PER_MINUTE:
            self._logged += 1
            log.error(message, *args)
        else:
            self._quiet += 1


def _shown(value: object, width: int = 300) -> str:
    """A value read from Redis, for a message: its repr (bytes that are not UTF-8 as bytes),
    cut at ``width`` characters."""
    if isinstance(value, dict):
        text = "{" + ", ".join(f"{_shown(k, width)}: {_shown(v, width)}" for k, v in value.items()) + "}"
    elif isinstance(value, str) and stream.not_utf8(value):
        text = repr(value.encode("utf-8", "surrogateescape"))
    else:
        text = repr(value)
    return text if len(text) <= width else text[:width] + "..."


def _read_ack(data: Any) -> tuple[str, str, int] | None:
    """An acknowledgement as a node publishes it: entry id, node, count; None for anything else
    (not JSON, too deep for the parser, not UTF-8, a count that is not a whole number).

    >>> _read_ack('{"id":"1-0","node":"b","n":3}'), _read_ack('{"id":"1-0","node":"b","n":Infinity}')
    (('1-0', 'b', 3), None)
    >>> _read_ack('{"id":"1-0","node":"b","n":true}'), _read_ack('{"id":"1-0","node":"b","n":2.5}')
    (None, None)
    """
    try:
        ack = json.loads(data) if isinstance(data, str) and not stream.not_utf8(data) else None
    except Exception:  # (ValueError; RecursionError for JSON nested too deep)
        return None
    if not isinstance(ack, dict):
        return None
    entry_id, node, n = ack.get("id"), ack.get("node"), ack.get("n")
    if type(entry_id) is not str or type(node) is not str or type(n) is not int or n < 0:
        return None
    return entry_id, node, n


def _who(beat: str) -> str:
    """Which process a heartbeat is, for messages."""
    try:
        info = json.loads(beat)
        return f"pid {info.get('pid')}, listening on {info.get('listen', '?')}"
    except Exception:  # (what another program left there: not JSON, too deep, not an object)
        return "unknown process"


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if "timeout" not in type(exc).__name__.lower() else f"no answer within the timeout ({text})"


def _timed_out(exc: BaseException | None) -> bool:
    """Whether a session ended because Redis answered nothing in time (a timeout, a PING of a
    subscribed connection unanswered, this node's heartbeat lapsed)."""
    return exc is not None and (isinstance(exc, (DeadSubscription, HeartbeatLapsed, TimeoutError))
                                or "timeout" in type(exc).__name__.lower())


def _refused(exc: BaseException) -> bool:
    """Redis answered, with an error (a script's, a value of the wrong type, maxmemory reached,
    a read-only replica, a password missing or wrong): not a Redis that cannot be reached."""
    return isinstance(exc, ResponseError | AuthenticationError)


def _trouble(url: str, exc: BaseException) -> str:
    if isinstance(exc, AuthenticationError):  # (a ConnectionError for redis-py: "unreachable")
        text = str(exc)
        if any(w in text.lower() for w in ("noauth", "authentication required", "already authenticated")):
            return (f"Redis at {url} needs a password, and cluster.redis gives none ({text}): set it "
                    "in cluster.redis (redis://:PASSWORD@HOST:PORT/DB, or redis://USER:PASSWORD@... "
                    "for an ACL user)")
        return (f"Redis at {url} refused the password (or user) in cluster.redis ({text}): set the "
                "right one there")
    if isinstance(exc, RedisUnfit):
        return str(exc)
    if isinstance(exc, ReadOnlyError):
        said = str(exc).split(" script: ")[0]  # (not which of our scripts tried to write)
        return (f"Redis at {url} is a read-only replica ({said}): cluster.redis must name the "
                "primary (after a failover, the promoted replica: see Failover in docs/cluster.md)")
    if _refused(exc):
        return f"Redis at {url} answered with an error: {_describe(exc)}"
    return f"Redis at {url} is unreachable: {_describe(exc)}"


__all__ = ["ClusterNode"]
