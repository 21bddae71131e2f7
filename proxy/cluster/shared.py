"""Redis as a shared L2 tier behind every node's memory and disk, and cluster-wide fill locks.

Layout (``NS`` = ``cluster.namespace``, ``G`` = the generation in ``NS:l2:gen``, a random
integer that purge-all replaces so that every older key becomes unreachable at once and
expires by its TTL; a missing ``NS:l2:gen`` (Redis evicted it, or lost its data) is a new
random generation too, never a default one, or the generation a purge-all left behind
could become current again; ``new_generation`` replaces it when a node finds Redis
lost purges):

- ``NS:l2:G:m:KEY``: a hash, one field per variant (its Vary values) holding the
  body's name (``BODY_ID.TOKEN``: its id and the fencing token of the fill that wrote it),
  the names of the sets below the variant put KEY in, and the entry's
  record (``proxy.storage.entry``: JSON, never pickle). The
  record keeps the response's request/response times and initial age, so Age and
  freshness come out the same on every node (RFC 9111 §4.2.3; the nodes' clocks are
  assumed synchronised, as for any shared cache);
- ``NS:l2:G:b:BODY_ID.TOKEN``: the body (at most ``shared_max_object`` bytes);
- ``NS:l2:G:u:URL``, ``...:t:TAG``, ``...:h:SCHEME://HOST``: sets of keys, for purges
  by URL, tag and prefix, changed only with SADD/SREM inside scripts (never a
  read-modify-write of a string). A purge finds keys only through them, and they
  have TTLs, so Redis may evict one (``volatile-lru``) while the entries it indexed
  stay: a variant is therefore served only while KEY is still in every set it was
  added to, and is deleted otherwise (by the lookup, and by a write of the key,
  before that write adds KEY to new sets). Checking membership covers purges by
  URL, tag and prefix alike, where deleting the keys a URL maps to would cover only
  purges by URL;
- ``NS:l2:lock:KEY``: the fill lock, ``SET NX PX`` with a fencing token from ``INCR`` of
  ``NS:l2:fence`` (started at Redis's clock in microseconds whenever it is missing: ``FENCE``).

Every key has a TTL: the entry's freshness left plus its stale windows
(``stale-while-revalidate``, ``stale-if-error``), so Redis forgets what no node
could serve any more.

Each operation is one Lua script, so it is atomic and one round trip: a lookup
that misses takes the lock in the same step (two nodes cannot both miss and both
fetch), and a write checks that no purge ran since the fill began (``NS:l2:purges``),
or a purge racing a fill could bring the purged response back. That counter starts at
a random 62-bit number whenever it is missing (a Redis that restarted empty): started
at 0 it would count the same purges again, and a fill whose lock was taken before the
restart could match it after a purge made since. The write also checks that no other
fill holds the lock, and that no variant of the key was written by a fill whose lock
was taken later (a higher token): a fill slower than its lock (expired, evicted, or let
go by the newer fill that took it next) found no lock at all, and overwrote the newer
fill with the older response (RFC 9111 §4: the most recent response is the one to
use). A variant written by an earlier build has no token (``BODY_ID`` alone): any fill
may replace it. The scripts touch keys they compute, so they need a single Redis (or
a sentinel-managed one), not Redis Cluster.

Every call is bounded by ``cluster.timeout``; a failure is counted and the caller
goes on as if the shared tier had nothing (the origin is asked). A Redis that answers
nothing (stopped, hung) would cost every miss that timeout for the whole outage, so
lookups are skipped (counted ``skipped``: the origin is asked at once) while this
node's member of the cluster is not connected to Redis (``cut_off``; with
``--workers N`` its supervisor tells each worker), and for ``BACK_OFF`` seconds after
a lookup got no answer (before the member notices, which takes a heartbeat or so).
Otherwise it fails for every request while Redis is down (or holds garbage under our
keys), so each distinct failure is logged once, then how often it happened once a minute,
and "works again" once lookups work for ``SETTLE`` seconds (``RepeatedFailure``; lookups
that hit and miss in turn would log at every turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.cluster.fills import STORED, TOO_LARGE, Contended, Found, Locked, Lookup
from proxy.cluster.redis_io import REDIS_DOWN, DeadSubscription, Names, client, subscribed
from proxy.cluster.settings import ClusterSettings
from proxy.logs import RepeatedFailure
from proxy.policy.fill import shareable_with_followers
from proxy.policy.freshness import may_be_served_stale
from proxy.policy.keys import url_of_key
from proxy.purge import PurgeSpec
from proxy.storage.entry import UNREADABLE_RECORD, Entry, decode_variants, encode_variants

log = logging.getLogger("cachegate.cluster.shared")

# What parsing an answer that is not what our scripts return raises (garbage under our keys).
UNREADABLE = UNREADABLE_RECORD
TTL_MARGIN = 5.0  # seconds a shared entry outlives what any node could serve from it
TTL_MAX = 30 * 86400.0
# What a node does when a call of the shared tier fails (said in the log).
AFTER_FAILURE = {"lookup": "the origin is asked instead", "write": "the fill is not shared",
                 "release": "the lock expires by itself"}
SETTLE = 10.0  # seconds without a failure before the shared tier is logged as working again
BACK_OFF = 1.0  # seconds lookups skip the shared tier after one got no answer from Redis
PURGE_STEP = 2000  # index set members one call of a purge goes through at most (under 10 ms of Redis)

# The variants of a key still indexed (KEY in every set its field names), as pairs of body
# id and record, and how many fields were of another layout (no list of sets between the body
# id and the record: written by a node of a build older than that list); the others are deleted
# (their body expires by its TTL).
INDEXED = """
local function indexed(base, key)
  local m = base .. 'm:' .. key
  local meta = redis.call('HGETALL', m)
  local kept = {}
  local foreign = 0
  for i = 2, #meta, 2 do
    local v = meta[i]
    local a = string.find(v, '\\n', 1, true)
    local b = a and string.find(v, '\\n', a + 1, true)
    local whole = false
    if b then
      local ok, sets = pcall(cjson.decode, string.sub(v, a + 1, b - 1))
      whole = ok and type(sets) == 'table'
      if not whole then foreign = foreign + 1 end
      if whole then
        for _, set in ipairs(sets) do
          if redis.call('SISMEMBER', base .. set, key) == 0 then whole = false break end
        end
      end
    else
      foreign = foreign + 1
    end
    if whole then
      table.insert(kept, {string.sub(v, 1, a - 1), string.sub(v, b + 1)})
    else
      redis.call('HDEL', m, meta[i - 1])
    end
  end
  return kept, foreign
end
"""
# The current generation (KEYS[1] of every script): a new random one (``fresh``) when the key
# is missing.
GENERATION = """
local function generation(key, fresh)
  local g = redis.call('GET', key)
  if not g then
    g = fresh
    redis.call('SET', key, g)
  end
  return g
end
"""
# A fill lock's fencing token: INCR, except that a fence that was missing (a Redis new, emptied
# or restarted empty) starts at Redis's clock in microseconds: above every token handed out
# before (unless locks were taken faster than a million a second), so that a fence lost while
# variants stayed (an allkeys-* eviction) does not make every later fill of theirs look older
# (about 2^51: within Lua's exact integers). Tokens are compared as numbers (``FENCED``).
FENCE = """
local function fence_token(key)
  local token = redis.call('INCR', key)
  if token == 1 then
    local t = redis.call('TIME')
    local now = t[1] .. string.format('%06d', tonumber(t[2]))
    redis.call('SET', key, now)
    token = tonumber(now)
  end
  return token
end
"""
# The fencing token a variant's body name carries (``BODY_ID.TOKEN``), 0 for a body id alone (a
# variant an earlier build wrote: body ids hold no '.').
FENCED = """
local function fenced(name)
  local t = string.match(name, '%.(%d+)$')
  return t and tonumber(t) or 0
end
"""
# KEYS: gen, purges, fence. ARGV: l2 prefix, key, try lock (0/1), lock ms, lock only (0/1),
# the purge counter's start if it is missing, a new generation if there is none. The answer:
# its kind, the count of fields of another layout it deleted (``INDEXED``), then what the kind
# carries.
LOOKUP = INDEXED + GENERATION + FENCE + """
local g = generation(KEYS[1], ARGV[7])
local base = ARGV[1] .. ':' .. g .. ':'
local foreign = 0
local out = {'found', 0}
if ARGV[5] ~= '1' then
  local kept
  kept, foreign = indexed(base, ARGV[2])
  out[2] = foreign
  for _, v in ipairs(kept) do
    local body = redis.call('GET', base .. 'b:' .. v[1])
    if body then
      table.insert(out, v[2])
      table.insert(out, body)
    end
  end
end
if #out > 2 then return out end
if ARGV[3] ~= '1' then return {'miss', foreign} end
local lock = ARGV[1] .. ':lock:' .. ARGV[2]
local token = fence_token(KEYS[3])
if redis.call('SET', lock, token, 'NX', 'PX', ARGV[4]) then
  if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SET', KEYS[2], ARGV[6]) end
  return {'locked', foreign, token, redis.call('GET', KEYS[2])}
end
return {'busy', foreign, redis.call('PTTL', lock), redis.call('GET', lock) or '0'}
"""
# KEYS: gen, purges. ARGV: l2 prefix, key, field, body id, record, body, ttl ms, token,
# purges at lock time, the sets' names (u:..., h:..., t:...) as a JSON list, a new generation
# if there is none. The answer: 1 written; 0 a purge ran since the lock was taken; -1 another
# fill holds the lock; -2 a fill whose lock was taken later wrote the key (FENCED).
WRITE = INDEXED + GENERATION + FENCED + """
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[9] then return 0 end
local lock = ARGV[1] .. ':lock:' .. ARGV[2]
local holder = redis.call('GET', lock)
if holder and holder ~= ARGV[8] then return -1 end
local g = generation(KEYS[1], ARGV[11])
local base = ARGV[1] .. ':' .. g .. ':'
local ttl = tonumber(ARGV[7])
local token = tonumber(ARGV[8])
-- (before KEY goes back into sets that lost it; what it deletes is no newer fill any more)
for _, v in ipairs(indexed(base, ARGV[2])) do
  if fenced(v[1]) > token then return -2 end
end
local body = ARGV[4] .. '.' .. ARGV[8]
redis.call('SET', base .. 'b:' .. body, ARGV[6], 'PX', ttl)
local function keep(name)
  if redis.call('PTTL', name) < ttl then redis.call('PEXPIRE', name, ttl) end
end
local m = base .. 'm:' .. ARGV[2]
redis.call('HSET', m, ARGV[3], body .. '\\n' .. ARGV[10] .. '\\n' .. ARGV[5])
keep(m)
for _, set in ipairs(cjson.decode(ARGV[10])) do
  redis.call('SADD', base .. set, ARGV[2])
  keep(base .. set)
end
return 1
"""
# KEYS: filled channel name is ARGV. ARGV: l2 prefix, key, token, channel, outcome.
RELEASE = """
local lock = ARGV[1] .. ':lock:' .. ARGV[2]
if redis.call('GET', lock) == ARGV[3] then redis.call('DEL', lock) end
redis.call('PUBLISH', ARGV[4], ARGV[2] .. '\\n' .. ARGV[5])
return 1
"""
# KEYS: gen, purges. ARGV: l2 prefix, all (0/1), a JSON document of keys, index sets to empty
# (u:URL, t:TAG) and prefixes ([host, prefix] pairs), the purge counter's start if it is missing,
# a new generation (purge-all: the next one; else used if there is none), then where to go on (0
# and '0' the first time: the keys, then the sets and prefixes in order, each step of a prefix
# from its host set's SSCAN cursor) and how many set members this call may go through. The
# answer: {keys deleted, the step to go on from (0: done), its cursor}. A set is emptied with SPOP
# and a host set gone through with SSCAN, so each call does a bounded share (``PURGE_STEP``):
# with SMEMBERS in one call, 200,000 keys under one host held Redis 0.9-1.4 s, every other client
# waiting, past the caller's cluster.timeout under load. What a call removed is out of its sets,
# which the lookups check, so each call makes its share unreachable at once. Only the first call
# bumps the purge counter: a fill locked after it fetched after the purge began.
PURGE = GENERATION + """
if ARGV[6] == '0' then
  if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SET', KEYS[2], ARGV[4]) end
  redis.call('INCR', KEYS[2])
  if ARGV[2] == '1' then redis.call('SET', KEYS[1], ARGV[5]) return {-1, 0, '0'} end
end
local g = generation(KEYS[1], ARGV[5])
local base = ARGV[1] .. ':' .. g .. ':'
local doc = cjson.decode(ARGV[3])
local step, cursor, left = tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8])
local n = 0
local function drop(k) n = n + redis.call('DEL', base .. 'm:' .. k) end
if step == 0 then
  for _, k in ipairs(doc.keys) do drop(k) end
  step = 1
end
local sets = #doc.sets
while step <= sets + #doc.prefixes do
  if left <= 0 then return {n, step, cursor} end
  if step <= sets then
    local set = base .. doc.sets[step]
    local popped = redis.call('SPOP', set, math.min(left, 1000))
    for _, k in ipairs(popped) do drop(k) end
    left = left - #popped
    if redis.call('EXISTS', set) == 0 then step = step + 1 end
  else
    local hp = doc.prefixes[step - sets]
    local set = base .. 'h:' .. hp[1]
    local page = redis.call('SSCAN', set, cursor, 'COUNT', math.min(left, 1000))
    cursor = page[1]
    for _, k in ipairs(page[2]) do
      if string.sub(k, 1, #hp[2]) == hp[2] then
        drop(k)
        redis.call('SREM', set, k)
      end
    end
    left = left - math.max(1, #page[2])
    if cursor == '0' then step = step + 1 end
  end
end
return {n, 0, '0'}
"""

# KEYS: gen, purges. ARGV: a new generation, the purge counter's start if it is missing.
NEW_GENERATION = """
redis.call('SET', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SET', KEYS[2], ARGV[2]) end
redis.call('INCR', KEYS[2])
return 1
"""


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL or key (what prefix purges index keys by).

    >>> origin_of("https://a.example:8443/x/y?z")
    'https://a.example:8443'
    """
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def shared_ttl(entry: Entry, now: float) -> float:
    """Seconds a shared entry is worth keeping: freshness left plus the stale windows, when it
    may be served stale at all (a stored 5xx never is)."""
    f = entry.response.freshness
    stale = may_be_served_stale(entry.response.status, f)
    windows = max(f.stale_while_revalidate, f.stale_if_error) if stale else 0.0
    return min(TTL_MAX, max(0.0, f.ttl(now)) + windows)


def counter_start() -> int:
    """Where the purge counter starts when Redis has none: random, so that a Redis that
    restarted empty never gives a fill's lock-time count back (room left for INCR)."""
    return secrets.randbits(62) + 1


def fresh_generation() -> str:
    """A new generation's name (``NS:l2:gen``): random, so that it is never one whose keys
    are still in Redis (a purge-all's predecessor, or the one before Redis lost the key).
    Every script that finds no generation starts one with it; purge-all replaces it.

    An integer in decimal (room left for INCR), as the generation was before it was random:
    a node of an earlier release in the same cluster (a rolling upgrade) bumps it with INCR
    on purge-all, which fails on anything but an integer."""
    return str(secrets.randbits(62) + 1)


class PurgeCut(RedisError):
    """A purge of the shared tier was sent and did not finish: a call got no answer, or one
    after the first failed. What its calls removed stays removed: the shared tier may be purged
    in part, and nothing else was done (no node was told)."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SharedTierFailure(Exception):
    """A shared-tier call failed, as logged (``SharedTier._failed``)."""


def _no_answer(exc: BaseException) -> bool:
    """Whether a call failed because Redis answered nothing within ``cluster.timeout``."""
    return isinstance(exc, TimeoutError) or "timeout" in type(exc).__name__.lower()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


class SharedTier:
    def __init__(self, settings: ClusterSettings) -> None:
        self.settings = settings
        self.max_object = settings.shared_max_object
        self.names = Names(settings.namespace)
        self._redis = client(settings, decode=False)
        self._waiters: dict[str, list[asyncio.Future[str]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._closing = False
        # Whether this node's member is cut off from Redis (set by proxy.cluster: not connected);
        # lookups are skipped meanwhile, and until _quiet_until (monotonic) after one got no answer.
        self.cut_off: Callable[[], bool] = lambda: False
        self._quiet_until = 0.0
        self.counts: dict[str, int] = dict.fromkeys(
            ("hit", "miss", "locked", "contended", "woken", "wait_timeout", "written", "write_voided",
             "too_large", "error", "skipped", "dead_subscriptions", "released_unheard", "foreign_layout"), 0)
        self._said_foreign = False  # whether ``_foreign_layout`` warned (once per process)
        self._failures = RepeatedFailure(log, "cluster: the shared tier", settle=SETTLE, traceback=False,
                                         level=logging.WARNING)

    async def close(self) -> None:
        self._closing = True
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.wait([self._listener], timeout=self.settings.timeout + 2)
        with contextlib.suppress(Exception):
            await self._redis.aclose()

    # -- lookups and locks ----------------------------------------------------------------

    async def lookup(self, key: str, lock_for: float, lock_only: bool = False) -> Lookup:
        """The key's variants from the shared tier, or its fill lock (``lock_for`` seconds > 0),
        or who holds it; None when Redis cannot be asked. ``lock_only``: what is stored is of
        no use to the caller (stale for it): only take the lock. None at once, without asking,
        while Redis is known not to answer (``cut_off``, ``BACK_OFF``)."""
        if self.cut_off() or time.monotonic() < self._quiet_until:
            self.counts["skipped"] += 1
            return None
        n = self.names
        try:
            answer: Any = await self._redis.eval(LOOKUP, 3, n.generation, n.purges, n.fence, n.l2, key,
                                                 "1" if lock_for > 0 else "0", int(lock_for * 1000),
                                                 "1" if lock_only else "0", counter_start(),
                                                 fresh_generation())
        except REDIS_DOWN as exc:
            if _no_answer(exc):  # (a refused connection, or an error Redis answered, came at once)
                self._quiet_until = time.monotonic() + BACK_OFF
            self._failed("lookup", key, exc)
            return None
        try:
            result = self._lookup_answer(key, answer)
        except UNREADABLE as exc:
            # A value under our keys that we never write (the purge counter not a number, ...):
            # a shared-tier failure like any other, and a lock the script took is let go at once
            # (its waiters would otherwise wait for its expiry).
            self._failed("lookup", key, ValueError(f"unreadable answer from Redis: {exc}"))
            with contextlib.suppress(*UNREADABLE):
                if bytes(answer[0]) == b"locked":
                    await self.release(key, Locked(int(answer[2]), 0), "failed")
            return None
        self._failures.succeeded()
        return result

    def _lookup_answer(self, key: str, answer: Any) -> Lookup:
        kind = answer[0].decode()
        self._foreign_layout(int(answer[1]))
        answer = answer[1:]  # (what the kind carries from answer[1] on, as before the count)
        if kind == "found":
            variants = []
            for record, body in zip(answer[1::2], answer[2::2], strict=True):
                decoded = decode_variants(record)
                if not decoded:
                    # Not what a node writes (another program's, or a value Python's JSON reads
                    # and cachegate does not: Infinity): an error, and the origin answers.
                    raise ValueError("a record under the key that cachegate cannot read")
                if decoded and decoded[0].key == key and decoded[0].body_size == len(body):
                    variants.append((decoded[0], bytes(body)))
            if variants:
                self.counts["hit"] += 1
                return Found(tuple(variants))
            return None
        result: Lookup
        if kind == "locked":
            result, event = Locked(int(answer[1]), int(answer[2])), "locked"
        elif kind == "busy":
            holder = int(answer[2]) if len(answer) > 2 else 0
            result, event = Contended(max(0, int(answer[1])) / 1000, holder), "contended"
        elif kind == "miss":
            result, event = None, ""
        else:
            raise ValueError(f"unknown kind {kind!r}")
        self.counts["miss"] += 1
        if event:
            self.counts[event] += 1
        return result

    def _foreign_layout(self, dropped: int) -> None:
        """Count the records of another layout a lookup deleted (``INDEXED``), and say it once:
        nodes of a build older than the list of index sets in each record share the cluster, and
        this node deletes what they write, where they cannot read what it writes."""
        if dropped <= 0:
            return
        self.counts["foreign_layout"] += dropped
        if not self._said_foreign:
            self._said_foreign = True
            log.warning("cluster: the shared tier holds entries written by a node of an older cachegate (a "
                        "record without its index sets): deleted; that node and this one share nothing "
                        "through the shared tier until it is upgraded (docs/cluster.md, Upgrades); counted "
                        "in cachegate_cluster_shared_total{event=\"foreign_layout\"}, said once")

    async def wait_filled(self, key: str, wait: float, holder: int = 0) -> str | None:
        """Wait until another node releases the key's fill lock: its outcome ("stored",
        "failed", ...), or None after ``wait`` seconds. ``holder``: the lock's token when the
        lookup found it taken (``Contended``; 0 unknown). Once this waiter is registered, the
        lock is asked again: a release published between the lookup's answer and the
        registration was heard by the listener with nobody to wake (the two arrive on two
        connections, in either order), and its waiter slept out the whole lock's time (a
        cluster test's flake); a lock no longer held by ``holder`` is "stored": look again."""
        self._ensure_listener()
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(fut)
        try:
            if holder and await self._released_since(key, holder) and not fut.done():
                fut.set_result(STORED)
                self.counts["released_unheard"] += 1
            outcome = await asyncio.wait_for(fut, wait)
            self.counts["woken"] += 1
            return outcome
        except TimeoutError:
            self.counts["wait_timeout"] += 1
            return None
        finally:
            waiting = self._waiters.get(key)
            if waiting is not None:
                with contextlib.suppress(ValueError):
                    waiting.remove(fut)
                if not waiting:
                    del self._waiters[key]

    async def _released_since(self, key: str, holder: int) -> bool:
        """Whether the key's fill lock is no longer ``holder``'s (False when Redis cannot say:
        the wait then counts on the release's message, as before)."""
        try:
            now: Any = await self._redis.get(f"{self.names.l2}:lock:{key}")
        except REDIS_DOWN as exc:
            log.debug("shared tier: the fill lock of %s not read again: %s", key, exc)
            return False
        try:
            return now is None or int(now) != holder
        except UNREADABLE:
            return False

    def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.ensure_future(self._listen())

    async def _listen(self) -> None:
        """Pub/sub: wake the waiters of a key when its fill lock is released (reconnecting
        when Redis goes away, or when the connection answers no PING: one dropped without a
        reset otherwise left every waiter of this node to wait out its whole wait, for as long
        as the process ran). Each subscription, once Redis confirms it, wakes every waiter to
        look again: a release may have come while no subscription heard it."""
        while not self._closing:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self.names.filled)
                fills = subscribed(pubsub, self.settings, "shared tier's fill", lambda: self._closing)
                async for message in fills:
                    if message.get("type") == "subscribe":
                        self._wake_all()
                        continue
                    if message.get("type") != "message":
                        continue
                    key, _, outcome = bytes(message["data"]).decode(errors="replace").partition("\n")
                    for fut in self._waiters.pop(key, ()):
                        if not fut.done():
                            fut.set_result(outcome)
            except asyncio.CancelledError:
                raise
            except DeadSubscription as exc:
                self.counts["dead_subscriptions"] += 1
                log.warning("cluster: the shared tier's listener reconnects: %s", exc)
            except REDIS_DOWN as exc:
                log.debug("shared tier: pub/sub lost: %s", exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 8.2
            await asyncio.sleep(1.0)

    def _wake_all(self) -> None:
        """Every waiter looks again (told "stored", as by a release: the lookup finds the fill,
        or the lock free to take, or its holder to wait for, now heard)."""
        waiters, self._waiters = self._waiters, {}
        for futs in waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result("stored")

    # -- fills ----------------------------------------------------------------------------

    async def write(self, entry: Entry, body: bytes, lock: Locked, now: float) -> bool:
        """Write a fill through (unless a purge ran since the lock was taken, the lock went to
        another filler, or a fill that took the lock later wrote the key); whether it was
        written."""
        if len(body) > self.max_object:
            self.counts["too_large"] += 1
            return False
        ttl = shared_ttl(entry, now)
        if ttl <= 0 and not shareable_with_followers(entry.response, entry.response.response_time):
            # Stale: of use to nobody. One its fill's followers take (stale on arrival only
            # through its Date: the origin's clock is behind) is written for TTL_MARGIN, for
            # the other nodes waiting on that fill (``stored_for_waiters``): else each fetched it.
            return False
        n = self.names
        field = json.dumps(entry.response.vary, separators=(",", ":"))
        sets = json.dumps(list(dict.fromkeys([f"u:{url_of_key(entry.key)}", f"u:{entry.url}",
                                              f"h:{origin_of(entry.key)}", *(f"t:{t}" for t in entry.tags)])),
                          ensure_ascii=False, separators=(",", ":"))
        try:
            done: Any = await self._redis.eval(
                WRITE, 2, n.generation, n.purges, n.l2, entry.key, field, entry.body_id,
                encode_variants((entry,)), body, int((ttl + TTL_MARGIN) * 1000), lock.token, lock.purges,
                sets, fresh_generation())
        except REDIS_DOWN as exc:
            self._failed("write", entry.key, exc)
            return False
        try:
            written = int(done) == 1
        except UNREADABLE as exc:
            self._failed("write", entry.key, ValueError(f"unreadable answer from Redis: {exc}"))
            return False
        if written:
            self.counts["written"] += 1
            return True
        self.counts["write_voided"] += 1
        return False

    async def release(self, key: str, lock: Locked, outcome: str) -> None:
        """Let go of the key's fill lock, publishing ``outcome`` to the nodes waiting on it
        (``proxy.cluster.fills``: ``too_large`` counts a fill not written for its size, as
        ``write`` counts one it was handed)."""
        if outcome == TOO_LARGE:
            self.counts["too_large"] += 1
        n = self.names
        try:
            await self._redis.eval(RELEASE, 0, n.l2, key, lock.token, n.filled, outcome)
        except REDIS_DOWN as exc:
            self._failed("release", key, exc)  # the lock expires by itself

    # -- purges -----------------------------------------------------------------------------

    async def purge(self, spec: PurgeSpec, keyed_urls: Iterable[str] = ()) -> None:
        """What a purge removes from the shared tier (its URLs also in every key shape the
        rules give them: ``keyed_urls``), ``PURGE_STEP`` set members a call at most. Raises
        when Redis cannot be reached or refuses the first call: the purge is then not made at
        all (``proxy.cluster.node``); ``PurgeCut`` once a call may have been made (it got no
        answer, or one after it failed): the shared tier may then be purged in part. A soft
        purge removes too: nodes keep their own stale copies to revalidate."""
        n = self.names
        doc = json.dumps({"keys": list(spec.keys),
                          "sets": [f"u:{u}" for u in dict.fromkeys([*spec.urls, *keyed_urls])]
                          + [f"t:{t}" for t in spec.tags],
                          "prefixes": [[origin_of(p), p] for p in spec.prefixes]})
        await self._connected()  # (a failure before that: nothing was sent, nothing made)
        step, cursor, calls = 0, "0", 0
        while True:
            try:
                answer: Any = await self._redis.eval(
                    PURGE, 2, n.generation, n.purges, n.l2, "1" if spec.all else "0", doc, counter_start(),
                    fresh_generation(), step, cursor, PURGE_STEP)
                step, cursor = int(answer[1]), _text(answer[2])
            except REDIS_DOWN as exc:
                if calls or not isinstance(exc, ResponseError):
                    raise PurgeCut(_describe(exc) + (f" (after {calls} call(s) that each removed their "
                                                     "share)" if calls else "")) from exc
                raise
            calls += 1
            if step <= 0:
                return

    async def _connected(self) -> None:
        """A connection of the pool set up, within ``cluster.timeout`` (no round trip when one
        is): a purge that fails before its first call is sent is then told from one that may have
        been made (the next call takes the connection this one let go: the pool is a stack)."""
        pool = self._redis.connection_pool
        limit = asyncio.timeout(self.settings.timeout)
        try:
            async with limit:
                connection = await pool.get_connection()  # type: ignore[no-untyped-call, unused-ignore]
        except TimeoutError:
            if not limit.expired():
                raise
            raise RedisTimeoutError(f"Timeout: no reply within {self.settings.timeout:g}s, a new "
                                    "connection's set-up included") from None
        await pool.release(connection)

    async def new_generation(self) -> None:
        """Make everything the shared tier holds unreachable at once: a new random generation
        (its old keys expire by their TTLs), and the purge counter bumped (fills in flight are
        not written through). For a node that found Redis lost purges (restored from an older
        snapshot): what the shared tier holds may be what they removed. Raises when Redis cannot
        be reached."""
        n = self.names
        await self._redis.eval(NEW_GENERATION, 2, n.generation, n.purges, fresh_generation(), counter_start())

    def _failed(self, what: str, key: str, exc: BaseException) -> None:
        """Counted each time; logged once per distinct failure, then once a minute. What is
        logged, and what tells failures apart, is the operation and the error: never the key (a
        URL, a different one each time) or an answer's varying parts (a lock's token)."""
        self.counts["error"] += 1
        log.debug("shared tier: %s of %s failed: %r", what, key, exc)
        self._failures.failed(SharedTierFailure(f"{what}: {_describe(exc)} ({AFTER_FAILURE[what]})"))

    def collect(self) -> Iterator[Metric]:
        c = CounterMetricFamily("cachegate_cluster_shared",
                                "Shared tier (cluster mode): lookups, fill locks and writes",
                                labels=["event"])
        for event, count in self.counts.items():
            c.add_metric([event], count)
        yield c
