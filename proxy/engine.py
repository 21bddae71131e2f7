"""The engine: runs the policy's decisions against storage, the coalescer and the upstream pool.

It knows nothing of aiohttp's server side: it takes a ``ClientRequest`` (a
request head, the peer address and a body stream) and returns a ``Reply``
(status, headers, and a body as bytes, a file or an async iterator) that the web
layer writes out. Every path through ``handle`` is one ``match`` over a policy
decision, closed with ``assert_never``:

- ``Serve``       -> a reply from the stored response (HIT, STALE, UPDATING)
- ``Revalidate``  -> a conditional request in a flight; 304 freshens (REVALIDATED)
- ``Forward``     -> a fill in a flight, body teed to the client and the store (MISS)
- ``OnlyIfCachedMiss`` -> 504 (unless a stored part holds the range)

Revalidations and misses go to the miss path (``proxy.flight``) as one ``Attempt``; the
flights, their outcomes and the answers from them live there. What stays here: lookups,
replies from the store, pass-through, partial content, and the helpers both halves use
(the request sent upstream, reply heads, the fill decision as an entry).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import IO, Any, Protocol, TypeVar, assert_never

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cluster.fills import NodeGate, SharedCache
from proxy.coalescer import Coalescer
from proxy.config import Settings
from proxy.control import Channel
from proxy.errors import (
    CachegateError,
    OutOfResources,
    ProxyStopping,
    StorageError,
    UpstreamError,
    first_report,
)
from proxy.flight import Attempt, HeldFill, MissPath, Whole, fill_response, unasked_304
from proxy.http_client import InterimHook, body_error_kind, error_kind
from proxy.leases import Busy, Granted, LeaseClient, LeaseTable, Waiting
from proxy.logs import RepeatedFailure, Summarised, failure_text, note_key, note_upstream
from proxy.metrics import CounterChild, HistogramChild, Metrics
from proxy.policy.cache_status import cache_status, forwarded_x_cache, serve_detail
from proxy.policy.fields import body_length, ends_at_head, split_list
from proxy.policy.fill import (
    Exchange,
    Fill,
    FillSettings,
    NoFill,
    decide_fill,
    freshened,
    worth_freshening_others,
)
from proxy.policy.freshness import DATE_BEHIND_SLACK, origin_date_behind
from proxy.policy.headers import end_to_end
from proxy.policy.invalidation import invalidated_urls
from proxy.policy.keys import cache_key, part_key, whole_key
from proxy.policy.messages import RequestHead, StoredResponse
from proxy.policy.partial import (
    ByteRange,
    Combine,
    FetchRange,
    JoinFill,
    RangeFetch,
    decide_combine,
    decide_range_fetch,
    other_representation,
    parse_content_range,
    part_fetch_fields,
    part_range,
    representation_status,
    whole_follows,
)
from proxy.policy.ranges import RangeSpec, request_range
from proxy.policy.reply import (
    NotModified,
    PreconditionFailed,
    Send,
    Unsatisfiable,
    reply_head,
    served_headers,
)
from proxy.policy.request import (
    Forwarder,
    LookUp,
    OwnAnswer,
    PassThrough,
    UpstreamRequest,
    decide_request,
    upstream_request,
)
from proxy.policy.reuse import (
    FetchPart,
    FetchWhole,
    Forward,
    FromPart,
    OnlyIfCachedMiss,
    PartLookup,
    Revalidate,
    Serve,
    decide_lookup,
    decide_part_lookup,
    plain_fresh_hit,
)
from proxy.policy.storability import too_large
from proxy.policy.validation import (
    asks_validation,
    conditional_headers,
)
from proxy.replies import Body, ClientRequest, Reply, close_body, error_reply, relay, upstream_detail
from proxy.rules import HeaderEdits, RequestPlan, RuleSet, StorePlan
from proxy.storage.arena import Arena
from proxy.storage.bodyfiles import SharedFile
from proxy.storage.entry import Entry
from proxy.storage.failures import WriteFailures
from proxy.storage.memory import Cached, Slot
from proxy.storage.reads import note_clock_back
from proxy.storage.tiered import BodySpool
from proxy.upstream import UpstreamResponse

log = logging.getLogger("cachegate.engine")
upstream_log = logging.getLogger("cachegate.upstream")  # what an upstream sent that it should not have
# An origin's Date behind this clock is said once per upstream per this many seconds (a count
# of the others with it): it stays so until someone sets that clock.
DATE_BEHIND_WINDOW = 600.0
# How close the skews of two upstreams' Dates must be for ``Engine._date_words`` to take them for
# one skew of this machine's clock: whole seconds in a Date, plus the responses' delays.
SAME_SKEW = 5.0

# A relayed response's fields this proxy writes itself (its Via member appended to the origin's,
# the framing and Server of its own server), left out with the hop-by-hop ones (``end_to_end``).
_RELAY_OWN = frozenset({"via", "content-length", "server"})

T = TypeVar("T")

# What a stop gives the lease words still being sent once its grace period is over (within the
# supervisor's margin past it: proxy.supervisor.STOP_DEADLINE_MARGIN).
NOTICE_GRACE = 0.5

# Seconds without a failed read before reads of the store are logged as working again (one
# shard failing among working ones would otherwise say "works again" between its failures).
READS_SETTLE = 60.0


class MemoryLimits(Protocol):
    """What the engine reads of the memory tier."""

    @property
    def max_object(self) -> int: ...  # bigger bodies are not brought into memory
    @property
    def arena(self) -> Arena: ...  # the machine's shared memory, where the worker leases live


class Store(Protocol):
    """What the engine and its miss path use of the store: the narrow seam between them.

    ``proxy.storage.tiered.Storage`` is the store (its methods' docstrings hold the contracts,
    said once there); ``tests/engine`` drives the engine with an in-memory fake of this."""

    memory_get: Callable[[str], tuple[Cached, ...] | None]
    # ``memory_get`` with the bodies copied at once (bytes no later write changes)
    memory_copied: Callable[[str], tuple[Cached, ...] | None]
    fresh_view: Callable[[str], Slot | None]
    alive: Callable[[Cached], bool]  # whether a variant's record in the shared memory still stands

    @property
    def memory(self) -> MemoryLimits: ...
    @property
    def epoch(self) -> int: ...
    def joining(self, since: int, key: str) -> int | None: ...
    def purged_since(self, since: int, key: str, tags: Collection[str], until: int | None = None) -> bool: ...
    @property
    def memory_only(self) -> bool: ...
    @property
    def spool_in_memory(self) -> int: ...
    def room(self, entry: Entry) -> int: ...
    def serve_from(self, key: str, slot: Slot, cached: Cached, max_file: int | None
                   ) -> tuple[bool, SharedFile | None]: ...
    def absent(self, key: str) -> bool: ...
    async def get(self, key: str, *, bodies: bool = False) -> tuple[Cached, ...]: ...
    async def reread(self, key: str) -> tuple[Cached, ...]: ...
    async def open_body(self, cached: Cached) -> bytes | IO[bytes] | None: ...
    def drop_body_file(self, entry: Entry) -> None: ...
    def writing(self, key: str) -> list[Any]: ...
    def writing_urls(self, urls: Iterable[str]) -> list[Any]: ...
    def spool(self, entry: Entry, expected_length: int | None, since: int | None = None) -> BodySpool: ...
    def finalize(self, entry: Entry, spool: BodySpool) -> Entry | None: ...
    def put_memory(self, entry: Entry, spool: BodySpool) -> bool: ...
    async def put_disk(self, entry: Entry, spool: BodySpool) -> bool: ...
    async def commit(self, entry: Entry, spool: BodySpool) -> bool: ...
    async def update_many(self, entries: Sequence[Entry]) -> None: ...
    async def delete(self, keys: Iterable[str], soft: bool = False) -> int: ...
    async def forget_gone(self, key: str) -> None: ...
    async def run(self, fn: Callable[..., T], *args: Any) -> T: ...


class Upstreams(Protocol):
    """What the engine uses of the upstream pool (``proxy.upstream.UpstreamPool``)."""

    async def send(self, method: str, target: str, headers: list[tuple[str, str]],
                   body: AsyncIterable[bytes] | bytes | None = None,
                   on_interim: InterimHook | None = None) -> UpstreamResponse: ...
    def snapshot(self) -> list[dict[str, Any]]: ...


# Engine.fresh_hit: (plan, key, variant, age, ttl, its open body file when the body is on disk,
# whether the client's If-None-Match / If-Modified-Since matched: a 304, no body)
FreshHit = tuple["RequestPlan", str, Cached, float, float, SharedFile | None, bool]


@dataclass(frozen=True, slots=True)
class Sent:
    """When a request went upstream, on both clocks (``Engine.answered``)."""

    wall: float  # the engine's clock
    monotonic: float  # time.monotonic(): no step of the system clock moves it


# Upstream errors of a request sent that waited for its head in vain: in the latency histogram at
# the time they waited (a lower bound of the origin's time to answer). Left out, an origin that
# hangs past timeouts.read showed no latency at all; a refused or failed connection sent nothing
# to wait for, and at its few milliseconds would draw a failing origin as a fast one.
TIMED_OUT_WAITING = frozenset({"read_timeout", "total_timeout"})


class Engine:
    def __init__(
        self,
        settings: Settings,
        storage: Store,
        pool: Upstreams,
        metrics: Metrics,
        *,
        invalidate: Callable[[Sequence[str]], Awaitable[Any]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.rules: RuleSet = settings.rules
        self.storage = storage
        self.pool = pool
        self.metrics = metrics
        self.clock = clock
        self.coalescer = Coalescer(
            history_limit=max(settings.cache.memory_max_object, 1 << 20),
            hit_for_pass=settings.cache.hit_for_pass,
        )
        # An unsafe method's invalidation (RFC 9111 §4.4): the runtime's purge (``Runtime.purge``:
        # every worker, every node), which finds the URLs' keys as every purge does.
        self._invalidate_hook = invalidate
        self._via = f"1.1 {settings.via}"
        self._forwarder = Forwarder(self._via, settings.pool.preserve_host)
        self._fill_settings = FillSettings(self._via, tuple(h.lower() for h in settings.cache.tag_headers))
        self._random = random.Random()
        self.write_failures = WriteFailures(lambda op: metrics.storage_errors.labels(op).inc())
        # Reads that fail (the error is no shard's damage, so they go on failing): logged with
        # the traceback once, then once a minute with a count. Why: a shard whose reads kept
        # failing (its write-ahead log removed while running) logged a traceback per request.
        self.read_failures = RepeatedFailure(log, "reading the cache's storage", settle=READS_SETTLE,
                                             then="the request is answered as a miss (from the origin)")
        # An origin's failures: one line per upstream, kind and message a while (``warn_upstream``).
        self.upstream_warnings = Summarised()
        # An origin whose Date is behind this clock: one line per upstream a while (``_date_behind``).
        self.date_warnings = Summarised(DATE_BEHIND_WINDOW)
        # How far behind each upstream's Date was last (and when, monotonic): several origins all
        # behind by the same amount say this machine's clock is the one ahead (``_date_words``).
        self._date_skews: dict[str, tuple[float, float]] = {}
        self._forgetting: set[asyncio.Future[None]] = set()  # see body_file_cut_short
        # ``send``'s metric children by (upstream, status class), looked up once each: two
        # ``labels()`` and an ``inc()`` were five Python-level calls on every upstream request.
        self._upstream_children: dict[tuple[str, int], tuple[HistogramChild, CounterChild]] = {}
        # In a worker of several: cross-worker leases (join_cluster). None: this process alone.
        self.leases: LeaseClient | None = None
        # Cluster mode with shared_cache: the shared tier behind this node's own (proxy.cluster).
        self.shared: SharedCache | None = None
        # Cluster mode, in the process that is the node's member: hits wait while its heartbeat
        # has lapsed (purges may have answered without it) until it has caught up.
        self.cluster: NodeGate | None = None
        self.miss = MissPath(self)  # misses and revalidations: flights (proxy.flight)

    def reconfigure(self, settings: Settings) -> None:
        """Take a reloaded config's rules (storage, pool and listeners stay as they are)."""
        self.settings = settings
        self.rules = settings.rules
        self._via = f"1.1 {settings.via}"
        self._forwarder = Forwarder(self._via, settings.pool.preserve_host)
        self._fill_settings = FillSettings(self._via, tuple(h.lower() for h in settings.cache.tag_headers))

    async def close(self, grace: float | None = None) -> None:
        """Let background fills finish within ``grace`` (default: shutdown_grace), then cancel them;
        then let the words their leases' releases send to other workers go out (in what is left
        of ``grace``, at least ``NOTICE_GRACE``: a fill cancelled at the deadline still ends its
        lease, and that word is what the waiters in other workers answer by)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.settings.shutdown_grace if grace is None else grace)
        await self.coalescer.close(max(0.0, deadline - loop.time()))
        if self.leases is not None:
            await self.leases.close(max(NOTICE_GRACE, deadline - loop.time()))
        self.upstream_warnings.close()  # what was counted and not said yet
        self.date_warnings.close()

    def join_cluster(self, channel: Channel, worker_id: int) -> None:
        """In a worker of ``--workers N``: coalesce fetches with the other workers through the
        lease table in the machine's shared memory (``proxy.leases``), and show this worker's
        upstream pool to the admin API (``GET /upstreams``)."""
        self.leases = LeaseClient(LeaseTable(self.storage.memory.arena), worker_id, channel)
        pool = self.pool

        async def upstream_states() -> dict[str, Any]:
            # pid: the console keeps a killed worker's counts by process (``proxy.live.Kept``).
            return {"worker": worker_id, "pid": os.getpid(), "upstreams": pool.snapshot()}

        channel.handlers["upstream_states"] = upstream_states

    # -- entry point -----------------------------------------------------------------------

    async def handle(self, req: ClientRequest, *, looked_again: bool = False) -> Reply:
        head = req.head
        planned = req.planned
        if planned is not None and planned.rules is self.rules and req.body is None:
            # ``planned``'s, for a GET or HEAD not bypassed (the fast path plans none with a body)
            plan, key = planned.plan, planned.key
        else:
            plan = self.rules.plan(head)
            route = decide_request(head, body=req.body is not None,
                                   bypass=plan.bypass_detail if plan.bypass else None)
            match route:
                case LookUp():
                    key = cache_key(head, plan.key)
                case PassThrough():
                    return await self._pass(req, plan, fwd=route.fwd, detail=route.detail)
                case OwnAnswer():  # Max-Forwards: 0 (RFC 9110 §7.6.2)
                    return self.finish(plan, Reply(route.status, route.reason, [
                        *route.fields, ("Cache-Status", cache_status(detail="MAX-FORWARDS")),
                        ("X-Cache-Status", "BYPASS")], b"", 0, "BYPASS", "none"))
                case _:
                    assert_never(route)
        # Only a lookup waits for a node whose heartbeat lapsed (what its tiers hold may have been
        # purged meanwhile); a pass-through or an unsafe method goes to the origin as it is.
        cluster = self.cluster
        if cluster is not None and cluster.hits_held():
            await cluster.caught_up()
        note_key(key)
        variants = self.storage.memory_copied(key) if looked_again else self.storage.memory_get(key)
        nowhere = False  # the key is nowhere, as of this step (no await since)
        if variants is None:
            fields = head.headers
            if self.coalescer.passes_unlooked(key) and "Cache-Control" not in fields \
                    and "Pragma" not in fields and "Range" not in fields:
                # Hit-for-pass, marked by a request that found nothing stored, and nothing in
                # the machine's memory now: what the lookup would decide with nothing stored
                # (a plain uri-miss, passed), without the directory lookup and the decision.
                # The memory is looked at first since it can gain the key without this
                # process's flights (another worker's fill, two parts combined), and the fast
                # path serves what it holds: both paths answer alike.
                return await self.miss.forward_passing(Attempt(req, plan, key, "uri-miss"))
            # A key the directory of the disk's keys does not list costs no disk read (nor a
            # coroutine); concurrent lookups of one key share one read (proxy.storage.reads).
            nowhere = self.storage.absent(key)
            variants = () if nowhere else await self.load(key, bodies=head.method == "GET")
        now = self.clock()
        decision = decide_lookup(head, [c.entry.response for c in variants], now, plan.options,
                                 self.miss.soft_refresh_failed(key, (c.entry.tags for c in variants)))
        match decision:
            case Serve():
                cached = variants[decision.index]
                if decision.refresh:
                    self.miss.refresh(Attempt(req, plan, key, "stale", revalidating=cached))
                reply = await self.serve(req, plan, cached, decision.status, decision.ttl,
                                          decision.age, decision.not_modified, hit=True,
                                          detail=serve_detail(decision.status, cached.entry.response))
                if reply is not None:
                    return reply
                if not looked_again and not self.storage.alive(cached):
                    # Its record in the shared memory was replaced while its body was read (a
                    # refresh or fill, maybe another worker's): the key is stored anew, not gone.
                    # Looked up again once, where a full miss used to go to the origin, with the
                    # bodies copied at once: a view of the new record could be replaced in its
                    # turn (a worker preempted in that instant, under load), a miss again.
                    return await self.handle(req, looked_again=True)
                return await self.miss.fetch(Attempt(req, plan, key, "uri-miss"))
            case Revalidate():
                cached = variants[decision.index]
                # Stale maybe only because it was stored while the clock was ahead (set back
                # since): said once, as a disk read of such an entry says it (not on a hit).
                note_clock_back((cached.entry,), now)
                stale = cached if decision.stale_if_error else None
                return await self.miss.fetch(Attempt(req, plan, key, decision.fwd, cached, stale,
                                                     stale_prohibited=decision.stale_prohibited))
            case Forward():
                stale = None
                if decision.stale_index is not None:
                    stale = variants[decision.stale_index]
                    note_clock_back((stale.entry,), now)  # (as Revalidate's)
                attempt = Attempt(req, plan, key, decision.fwd, None, stale,
                                  coalesce=decision.fwd != "request", nowhere=nowhere,
                                  stale_prohibited=decision.stale_prohibited)
                if decision.fwd in ("uri-miss", "vary-miss") and head.method == "GET":
                    spec = request_range(head.headers)
                    if spec is not None:
                        return await self._range_miss(attempt, spec)
                return await self.miss.fetch(attempt)
            case OnlyIfCachedMiss(unmatched=unmatched):
                # A single range no complete response answers may be held by a stored part, as
                # without only-if-cached (``_range_miss``): a HIT from it, else the 504.
                spec = request_range(head.headers) if unmatched and head.method == "GET" else None
                if spec is not None:
                    reply, _, _ = await self._from_part(req, plan, key, spec)
                    if reply is not None:
                        return reply
                return self.finish(plan, error_reply(
                    504, "Gateway Timeout", "only-if-cached: no stored response" if unmatched else
                    "only-if-cached: the stored response needs validation", "MISS",
                    cache_status(detail=decision.detail)))
            case _:
                assert_never(decision)

    def fresh_hit(self, head: RequestHead, max_file: int = 0) -> FreshHit | None:
        """``handle`` up to its decision, for the fast path (``proxy.web.fastpath``): a GET or
        HEAD that ``handle`` would answer with ``_serve`` as a plain fresh HIT, with the body at
        hand (in memory, or a disk-only body of at most ``max_file`` bytes whose file is already
        open; a HEAD or a 304 needs none), as (plan, variant, age, ttl, open body file: also for
        a big body in memory once its disk file is open, since sendfile is cheaper than writing
        it, and whether the client's own conditional made it a 304).
        None for anything else: the general path then starts over, and no use of the key was
        counted. ``plain_fresh_hit`` is the first step of ``decide_lookup``: the same decision."""
        planned = self.planned(head)
        if planned is None:
            return None
        return self.fresh_hit_of(head, planned[0], planned[1], max_file)

    def planned(self, head: RequestHead) -> tuple[RequestPlan, str] | None:
        """The rules' plan for ``head`` and its cache key, as ``handle`` computes them; None for
        a bypass. A pure function of the head and the rules (the fast path remembers it for a
        request's exact bytes: ``proxy.web.fastpath.Known``)."""
        plan = self.rules.plan(head)
        if plan.bypass:
            return None
        return plan, cache_key(head, plan.key)

    def fresh_hit_of(self, head: RequestHead, plan: RequestPlan, key: str, max_file: int = 0
                     ) -> FreshHit | None:
        """``fresh_hit`` once the plan and key are known (``planned``)."""
        cluster = self.cluster
        if cluster is not None and cluster.hits_held():
            return None  # the general path waits for the node to catch up
        storage = self.storage
        slot = storage.fresh_view(key)
        if slot is None:
            return None
        variants = slot.variants
        responses = ((variants[0].entry.response,) if len(variants) == 1
                     else tuple(c.entry.response for c in variants))
        plain = plain_fresh_hit(head, responses, self.clock())
        if plain is None:
            return None
        cached = variants[plain[0]]
        not_modified = plain[3]
        ok, shared = storage.serve_from(key, slot, cached,
                                        None if not_modified or head.method == "HEAD" else max_file)
        if not ok:
            return None
        return plan, key, cached, plain[1], plain[2], shared, not_modified

    async def load(self, key: str, bodies: bool = False) -> tuple[Cached, ...]:
        """The key's variants (``bodies``: a GET, which will send one: read a small body with
        its metadata, in the same read)."""
        try:
            found = await self.storage.get(key, bodies=bodies)
        except Exception as exc:  # storage failures degrade to a miss
            self.read_failed(exc)
            return ()
        self.read_failures.succeeded()
        return found

    def read_failed(self, exc: Exception) -> None:
        """A read of the store failed: counted, and logged at most once a minute
        (``read_failures``)."""
        self.metrics.storage_errors.labels("read").inc()
        self.read_failures.failed(exc)

    # -- serving from the store ------------------------------------------------------------

    async def serve(
        self,
        req: ClientRequest,
        plan: RequestPlan,
        cached: Cached,
        x_cache: str,
        ttl: float | None,
        age: float,
        not_modified: bool,
        *,
        hit: bool,
        fwd: str | None = None,
        fwd_status: int | None = None,
        detail: str | None = None,
        collapsed: bool = False,
        mark_stored: bool = False,
        cookies: Sequence[tuple[str, str]] = (),
    ) -> Reply | None:
        """A reply from a stored variant; None when its body has gone missing from disk, or the
        variant cannot answer this request (``reply_head``).

        ``cookies``: the Set-Cookie fields of the origin's 304 to this client's own
        revalidation (never stored: ``freshen``), on whatever reply it gets (a 304 or 412 to
        its conditionals too), edited by the rule's response_headers as the reply is (a rule
        that removes Set-Cookie removes them), as a fill's client gets its 200's.

        The rule's response_headers are those of the stored response (its status and type:
        what its 200 gets, on the fast path too; a stored part's, as every 206 is, those of
        its 200: ``representation_status``), applied before ``reply_head`` picks the
        fields of a 304, a 206 or a 416 from it: a 304 carries the Cache-Control and Expires
        the 200 would (RFC 9110 §15.4.5), which a choice by the 304's own status and missing
        Content-Type did not give it."""
        entry = cached.entry
        stored = entry.response
        cs = cache_status(hit=hit, fwd=fwd, fwd_status=fwd_status, ttl=ttl, detail=detail,
                          collapsed=collapsed, stored=mark_stored)
        headers = served_headers(stored.headers, str(int(age)), cs, x_cache)
        # Before the edits: a rule removing Set-Cookie removes these too, and one's caching
        # fields are withheld from a reply that sets a cookie (``reply_edits``).
        headers.extend(cookies)
        edits = response_edits(plan, stored.status, stored.headers)
        if edits:
            headers = edits.apply(headers)
        answer = reply_head(req.head, stored, entry.body_size, headers, not_modified)
        if isinstance(answer, PreconditionFailed | NotModified) and cookies:
            # (a 304's and a 412's fields are picked from the 200's: no Set-Cookie among them)
            answer = replace(answer, headers=[*answer.headers,
                                              *((k, v) for k, v in headers if k.lower() == "set-cookie")])
        if isinstance(answer, PreconditionFailed):
            text = b"412 Precondition Failed\n"
            return self.finish(plan, Reply(412, "Precondition Failed",
                                           [("Content-Type", "text/plain; charset=utf-8"), *answer.headers],
                                           text, len(text), x_cache, "none"))
        if isinstance(answer, NotModified):
            return Reply(304, "Not Modified", answer.headers, None, None, x_cache, "none")
        head_only = req.head.method == "HEAD"
        tier = "memory" if cached.body is not None and not cached.from_disk else "disk"
        body: Body
        if head_only:
            body = None
        else:
            body = await self.open_body(cached)
            if body is None:
                return None
        match answer:
            case None:
                close_body(body)
                return None
            case Unsatisfiable():
                close_body(body)
                return Reply(416, "Range Not Satisfiable", answer.headers, b"", 0, x_cache, "none")
            case Send():
                offset = answer.offset
                if isinstance(body, bytes) and answer.status == 206:  # a range of it
                    body, offset = body[offset:offset + answer.length], 0
                return Reply(answer.status, answer.reason, answer.headers, body, answer.length, x_cache,
                             tier, offset, head_only)
            case _:
                assert_never(answer)

    async def open_body(self, cached: Cached) -> bytes | IO[bytes] | None:
        if isinstance(cached.body, bytes):
            return cached.body
        try:
            body = await self.storage.open_body(cached)
        except Exception as exc:
            self.read_failed(exc)
            body = None
        else:
            self.read_failures.succeeded()
        if body is None and self.storage.alive(cached):
            # The disk tier culled the body: forget the variant so the next request refetches.
            # (Not when its record in the shared memory died meanwhile: replaced by a refresh or
            # a fill, or purged; forgetting the key then dropped the new copy as well.)
            await self._forget(cached.entry.key)
        return body

    def body_file_cut_short(self, entry: Entry) -> None:
        """A big body's open file held fewer bytes than ``entry`` says while a response was
        sent from it (cut on disk after it was opened): the web layer aborted that response.
        Its file is dropped at once, so no other hit is sent from it, and the variant is
        forgotten as a body the disk tier no longer has is (``open_body``): the next request
        refetches. Called from the web layer's synchronous paths, hence the task."""
        log.warning("stored body of %s is cut short on disk (expected %d bytes): dropped",
                    entry.key, entry.body_size)
        self.metrics.storage_errors.labels("read").inc()
        self.storage.drop_body_file(entry)
        task = asyncio.ensure_future(self._forget(entry.key))
        self._forgetting.add(task)
        task.add_done_callback(self._forgetting.discard)

    async def _forget(self, key: str) -> None:
        """Forget a variant whose disk body is gone (``Storage.forget_gone``). Its disk part
        fails on a full filesystem, at every request for such a variant: counted
        (``operation="forget"``) and logged once per streak of storage write failures, never
        as a purge that could not be written (there was none) nor with a traceback each time."""
        try:
            await self.storage.forget_gone(key)
        except Exception as exc:
            self.write_failures.failed("forget", key, exc)
        else:
            self.write_failures.succeeded()

    # -- partial content (RFC 9111 §3.3-3.4) ----------------------------------------------

    def _range_fetch(self, attempt: Attempt, spec: RangeSpec, fill_received: int | None, elsewhere: bool
                     ) -> RangeFetch:
        """``decide_range_fetch`` for this request's range, with the running proxy's settings."""
        return decide_range_fetch(spec, fill_whole=self.settings.cache.range_fill == "whole",
                                  fill_received=fill_received, passing=self.coalescer.is_pass(attempt.key),
                                  authorization="Authorization" in attempt.req.head.headers,
                                  filling_elsewhere=elsewhere)

    async def _range_miss(self, attempt: Attempt, spec: RangeSpec, *, alone: bool = False) -> Reply:
        """A single byte range that no complete stored response answers: from a stored part
        that holds it, else as ``decide_range_fetch`` says: from the key's whole fill (joined
        when one is in flight and has, or will soon have, the range's first byte; started for
        ``bytes=0-``), or from the origin at once (a Range request, its 206 stored as a part,
        combined with the part already held when their strong validators agree; with
        ``range_fill: whole`` the whole object is fetched after it when that 206 may be
        stored, so the next ranges are hits). An If-Range goes with the range for the origin to
        evaluate; a conditional range, or an If-Range that the part holding the range or the
        fill's head does not satisfy (``FetchWhole``), is answered by the whole fill. ``alone``:
        for this client alone, joining no fill (``range_alone``)."""
        attempt = replace(attempt, nowhere=False)  # the range path awaits: things may be stored meanwhile
        req, plan, key = attempt.req, attempt.plan, attempt.key
        filling = None if alone else fill_response(self.coalescer.get(key), req.head)
        reply, decision, parts = await self._from_part(req, plan, key, spec, filling)
        if reply is not None:
            return reply
        match decision:
            case FetchWhole():
                return await self.miss.fetch(replace(attempt.alone() if alone else attempt, part=None))
            case FetchPart(held=held):
                old = parts[held] if held is not None else None
                how: RangeFetch = FetchRange(lead=False)
                if not alone:
                    flight = self.coalescer.get(key)
                    # Another worker's fill is not in this worker's coalescer: the lease table
                    # says whether one is in flight (a plain miss would wait for it).
                    leases = self.leases
                    elsewhere = flight is None and leases is not None and leases.fetching_elsewhere(key)
                    how = self._range_fetch(attempt, spec, flight.body.size if flight is not None else None,
                                            elsewhere)
                if isinstance(how, FetchRange) and not alone and self.shared is not None \
                        and not self.coalescer.is_pass(key) and await self.miss.shared_holds(attempt):
                    # Another node stored the object: the key's fill adopts it (its range sliced
                    # from it, the next ranges hits), where the origin was asked for the range.
                    how = JoinFill("whole")
                match how:
                    case JoinFill(reason="elsewhere"):
                        return await self._range_after_elsewhere(attempt, spec)
                    case JoinFill():
                        return await self.miss.fetch(replace(attempt, part=spec))
                    case FetchRange(lead=True) if self.leases is not None:
                        # Leading, it holds the key's fill: under the key's lease, as a plain
                        # miss's fill is, or a miss of the key in another worker did not wait
                        # for it and fetched the object too (an origin that ignores Range: two
                        # whole downloads). Taken by another worker since the look: decided as
                        # if seen then (a range near the start waits for that fetch; a seek far
                        # on is asked of the origin at once, never made to wait for the whole
                        # download).
                        lease = await self.leases.acquire(key, wait=False)
                        if isinstance(lease, Busy | Waiting):
                            if isinstance(self._range_fetch(attempt, spec, None, True), JoinFill):
                                return await self._range_after_elsewhere(attempt, spec)
                            return await self._fetch_part(attempt, spec, old, lead=False)
                        return await self._fetch_part(attempt, spec, old, lead=True, lease=lease)
                    case FetchRange(lead=lead):
                        return await self._fetch_part(attempt, spec, old, lead=lead)
                    case _:
                        assert_never(how)
            case _:
                assert_never(decision)

    async def _from_part(self, req: ClientRequest, plan: RequestPlan, key: str, spec: RangeSpec,
                         filling: StoredResponse | None = None
                         ) -> tuple[Reply | None, FetchPart | FetchWhole, tuple[Cached, ...]]:
        """The key's stored parts against a single range (``decide_part_lookup``; ``filling``:
        the response of the key's fill in flight, ``fill_response``): the reply from a fresh
        part that holds it, or None; what to fetch otherwise; the parts."""
        pkey = part_key(key)
        parts = self.storage.memory_get(pkey)
        if parts is None:
            parts = await self.load(pkey, bodies=True)
        decision: PartLookup = decide_part_lookup(req.head, spec, [c.entry.response for c in parts],
                                                  self.clock(), plan.options, filling)
        if isinstance(decision, FromPart):
            found = decision.serve
            reply = await self.serve(req, plan, parts[found.index], "HIT", found.ttl, found.age,
                                     found.not_modified, hit=True)
            return reply, decision.otherwise, parts  # (None: its body has gone from disk)
        return None, decision, parts

    async def _range_after_elsewhere(self, attempt: Attempt, spec: RangeSpec) -> Reply:
        """A range miss while another worker fetches the object under its lease: wait for that
        fetch (``lock_timeout`` at most, as a plain miss does) and answer from what it stored;
        when it stored nothing this request may have (not shareable, failed, too late), as a
        range does after a fill here it could not share (``range_alone``): from a part stored
        meanwhile (that worker's range, when its whole fetch failed: each waiter asked the
        origin for the range it had), else its range alone."""
        leases = self.leases
        assert leases is not None
        req, plan, key = attempt.req, attempt.plan, attempt.key
        deadline = asyncio.get_running_loop().time() + self.settings.cache.lock_timeout
        if await leases.await_fetch(key, deadline):
            variants = await self.load(key, bodies=True)
            decision = decide_lookup(req.head, [c.entry.response for c in variants], self.clock(),
                                     plan.options)
            if isinstance(decision, Serve) and decision.status == "HIT":
                # It waited for that fetch, as a range waiting in the fetching worker does: said
                # as it is (no ``hit``, no ``ttl``: ``forwarded_ttl``), a collapsed answer that
                # fetch stored, not a hit.
                cached = variants[decision.index]
                reply = await self.serve(req, plan, cached, "HIT", None, decision.age, decision.not_modified,
                                         hit=False, fwd=attempt.fwd, collapsed=True, mark_stored=True,
                                         fwd_status=cached.entry.response.status)
                if reply is not None:
                    self.metrics.coalesced.inc()
                    return reply
        return await self._range_miss(replace(attempt, part=spec), spec, alone=True)

    async def range_alone(self, attempt: Attempt) -> Reply:
        """A range miss that waited for the key's fill and must fetch on its own after all (the
        fill's response was not its to share, or never came): its range, not the object."""
        assert attempt.part is not None
        return await self._range_miss(attempt, attempt.part, alone=True)

    async def _fetch_part(self, attempt: Attempt, spec: RangeSpec, old: Cached | None, *, lead: bool,
                          lease: Granted | None = None) -> Reply:
        """The range from the origin. ``lead``: the key's fill is held meanwhile (``MissPath.hold``)
        and told what the answer means for it: the whole object when the 206 may be stored and
        the object too (never for one that may not: a private object's every range cost a whole
        fetch of it, and one over ``max_object``'s a whole fetch dropped at its head:
        ``whole_follows``), the 200 itself when the origin ignored Range (or its If-Range did
        not hold), the error; whatever happens, the fill is never left waiting."""
        fill = self.miss.hold(attempt, lease) if lead else None
        try:
            return await self._ask_part(attempt, spec, old, fill)
        finally:
            if fill is not None:
                fill.say("drop")  # (nothing when told already)

    async def _ask_part(self, attempt: Attempt, spec: RangeSpec, old: Cached | None, fill: HeldFill | None
                        ) -> Reply:
        req, plan, key, fwd = attempt.req, attempt.plan, attempt.key, attempt.fwd
        head = req.head
        upstream = self.upstream(req, plan)
        upstream = replace(upstream, headers=(*upstream.headers, *part_fetch_fields(spec, head.headers)))
        sent = self.sending()
        epoch = self.storage.epoch
        if fill is not None:
            fill.flight.epoch = epoch  # its answer may be the 200 to this request (``answer_held``)
        try:
            resp = await self.send(upstream, on_interim=relay(req.interim))
        except UpstreamError as exc:
            if fill is not None:
                fill.say(exc)  # its waiting clients get the error too, as a fill's followers do
            return self.upstream_failed(plan, exc, fwd)
        request_time, response_time = self.answered(sent)
        if resp.status == 200:
            # An origin that ignores Range sends the whole representation: that is the fill.
            if fill is not None:
                return await self.miss.answer_held(fill, attempt, resp, request_time, response_time, epoch)
            return await self.miss.answer_unshared(attempt, resp, request_time, response_time, epoch)
        if resp.status != 206:  # an error, or a 416 about this range only: passed on, not stored
            # ... but a 304 to this Range request, which carried no validators (a conditional
            # range is the whole fill's), is the origin's fault, as it is to a fill: a 502, never
            # relayed to a client that asked no condition (the range's waiting fill gets it too).
            unasked = unasked_304(resp, resp.status == 304 and asks_validation(upstream.headers))
            if unasked is not None:
                if fill is not None:
                    fill.say(unasked)
                return self.upstream_failed(plan, unasked, fwd)
            return self.direct_reply(plan, resp, forwarded_x_cache(fwd),
                                     cache_status(fwd=fwd, fwd_status=resp.status), False)
        held = parse_content_range(resp.headers.get("Content-Range"))
        if held is None:
            # A multipart answer, or none that says its range: passed on as it is, and why it
            # is not stored said as for any other part (its Cache-Status had no detail).
            detail, _ = self._part_decision(head, plan, key, resp, None, request_time, response_time)
            self.metrics.not_stored.labels(detail).inc()
            return self.direct_reply(plan, resp, forwarded_x_cache(fwd),
                                     cache_status(fwd=fwd, fwd_status=206, detail=detail), False)
        detail, entry = self._part_decision(head, plan, key, resp, held.length, request_time, response_time)
        if entry is not None and resp.content_length not in (None, held.length):
            # Its length disagrees with its Content-Range: relayed as framed, never stored
            # (``_store_part``), and known now, before the head says "stored".
            detail, entry = "LENGTH-MISMATCH", None
        if fill is not None and entry is not None \
                and whole_follows(held, min(plan.options.max_object, self.storage.room(entry))):
            # The origin serves ranges, storable ones, of an object the store may keep: the
            # whole object follows, of this version.
            fill.say(Whole(entry.response))
        if detail:
            self.metrics.not_stored.labels(detail).inc()
        cs = cache_status(fwd=fwd, fwd_status=206, stored=entry is not None, detail=detail or None)
        out = self.response_headers(resp.headers)
        out.append(("Cache-Status", cs))
        out.append(("X-Cache-Status", forwarded_x_cache(fwd)))
        body = self._tee_part(resp, entry, held, old, epoch)
        # Framed by the origin's own length: a body that disagrees with its Content-Range reaches
        # the client as sent, and is not stored (the spool expects the range's length).
        return self.finish(plan, Reply(206, resp.reason, out, body, resp.content_length,
                                        forwarded_x_cache(fwd), "upstream"))

    def _part_decision(self, head: RequestHead, plan: RequestPlan, key: str, resp: UpstreamResponse,
                       length: int | None, request_time: float, response_time: float
                       ) -> tuple[str, Entry | None]:
        """May this 206 be stored as a part, as what (the same rules as its complete response,
        and the same room: ``_decided``)? ``length``: its Content-Range's, what the spool takes
        (None: it has none, and the decision says so)."""
        store_plan = plan.for_response(representation_status(resp.status), resp.headers.get("Content-Type"))
        return self._decided(part_key(key), store_plan, Exchange(
            head, resp.status, resp.reason, resp.headers, request_time, response_time,
            resp.close_delimited_tls), length, part=True)

    async def _tee_part(self, resp: UpstreamResponse, entry: Entry | None, held: ByteRange,
                        old: Cached | None, epoch: int) -> AsyncIterator[bytes]:
        """The part's body to the client as it arrives, and to a spool; stored once complete.
        A spool write that fails (a full disk) gives up the store, never the client's answer:
        counted and logged as a fill's is (``Flights._spool_write``)."""
        spool = self.storage.spool(entry, held.length, epoch) if entry is not None else None
        try:
            async for chunk in resp.iter_chunks():
                if spool is not None:
                    try:
                        kept = await spool.write(chunk)
                    except Exception as exc:
                        spool.discard()
                        self.write_failures.failed("spool", spool.entry.key, exc)
                        self.metrics.not_stored_because("STORE-FAILED", spool.entry.url)
                        kept = False
                    else:
                        if not kept:  # past its Content-Range's length (chunked), or no room
                            self._part_not_kept(spool, "LENGTH-MISMATCH" if spool.size > held.length
                                                else "SPOOLS-FULL" if spool.no_room else "TOO-LARGE")
                    if not kept:
                        spool = None
                yield chunk
        except BaseException:
            if spool is not None:
                spool.discard()
            raise
        if spool is not None and entry is not None:
            try:
                if await self._store_part(entry, spool, old):
                    self.metrics.fills.inc()  # a response stored, as a flight's ``Filled`` counts
            except Exception:
                log.exception("storing a part of %s failed", entry.key)
                self.metrics.storage_errors.labels("write").inc()

    def _part_not_kept(self, spool: BodySpool, reason: str) -> None:
        """A part given up once its head (which said "stored") had gone out: counted, and said
        in the debug log with its lengths (the access log keeps what the head said)."""
        self.metrics.not_stored_because(reason, spool.entry.url)
        log.debug("part of %s not stored (%s): %d bytes of body received, its Content-Range says %s",
                  spool.entry.url, reason, spool.size, spool.expected_length)

    async def _store_part(self, entry: Entry, spool: BodySpool, old: Cached | None) -> bool:
        """Store a received part; combined with the one held for the same variant when RFC 9111
        §3.4 allows it (one strong validator) and both are small enough to hold in memory
        (memory_max_object): a complete result is stored as the 200 it adds up to. A part whose
        body disagrees with its Content-Range (the origin's own framing lets it through to the
        client) or that a purge covered meanwhile is stored neither alone nor combined: a short
        body spliced in would shift every byte after it in a "complete" 200. Whether it was
        stored (alone or combined)."""
        own = part_range(entry.response)
        if spool.doomed:
            spool.discard()
            return False
        if not spool.complete or own is None or spool.size != own.length:
            # A chunked part (no Content-Length) whose body disagrees with its Content-Range: its
            # head said "stored" before its length was known (docs/caching.md).
            spool.discard()
            self._part_not_kept(spool, "LENGTH-MISMATCH")
            return False
        if spool.size > self.storage.room(entry):
            # The disk shards' budget was lowered while it streamed (``Writer.finalize``).
            spool.discard()
            self.metrics.not_stored_because("TOO-LARGE", entry.url)
            return False
        combine = decide_combine(old.entry.response, entry.response) if old is not None else None
        if old is None or not isinstance(combine, Combine) \
                or combine.range.length > self.storage.memory.max_object:
            return await self.storage.commit(entry, spool)
        new_body = spool.body_bytes()
        old_body = await self.open_body(old)
        old_range = part_range(old.entry.response)
        if new_body is None or not isinstance(old_body, bytes) or old_range is None \
                or len(old_body) != old_range.length:
            close_body(old_body)
            return await self.storage.commit(entry, spool)
        spool.discard()
        bodies = {id(entry.response): new_body, id(old.entry.response): old_body}
        lower, upper = bodies[id(combine.lower)], bodies[id(combine.upper)]
        lower_range, upper_range = part_range(combine.lower), part_range(combine.upper)
        assert lower_range is not None and upper_range is not None
        merged = lower + upper[lower_range.last + 1 - upper_range.first:]
        assert len(merged) == combine.range.length, (len(merged), combine.range)
        new = entry.response
        if combine.range.complete:
            # §3.4: the combined response takes the new response's header fields.
            fields = tuple((k, v) for k, v in new.headers
                           if k.lower() not in ("content-range", "content-length"))
            combined = Entry(key=whole_key(entry.key), url=entry.url,
                             response=replace(new, status=200, reason="OK", headers=fields),
                             body_id="", body_size=0, tags=entry.tags, stored_at=entry.stored_at)
        else:
            r = combine.range
            fields = tuple((k, v) for k, v in new.headers if k.lower() != "content-range")
            combined = replace(entry, response=replace(
                new, headers=(*fields, ("Content-Range", f"bytes {r.first}-{r.last}/{r.total}"))))
        out = self.storage.spool(combined, len(merged))
        await out.write(merged)
        stored = await self.storage.commit(combined, out)
        if combine.range.complete:
            # Something is stored under the key now, without a flight (whose end clears the
            # mark otherwise): its plain requests look again. Whatever the commit said, as a
            # fill's end does: the memory may hold it though the disk write failed.
            self.coalescer.forget_unlooked(combined.key)
        return stored

    # -- going upstream --------------------------------------------------------------------

    def upstream(self, req: ClientRequest, plan: RequestPlan | None,
                  revalidating: Cached | None = None, *, preconditions: bool = False) -> UpstreamRequest:
        """The request the origin receives: computed by the policy from the normalised head
        alone (``plan``: a fill, as keyed; None: passed through; ``preconditions``: a fill
        that keeps the client's, for a hit-for-pass key)."""
        validators = conditional_headers(revalidating.entry.response) if revalidating is not None else ()
        return upstream_request(req.head, req.remote, self._forwarder, request_id=req.request_id,
                                fill=plan.key if plan is not None else None, validators=validators,
                                preconditions=preconditions)

    def response_headers(self, headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> list[tuple[str, str]]:
        out = list(end_to_end(headers, _RELAY_OWN))
        # Every Via line of the origin's, in order (a second line was lost), then this proxy's.
        # (As members: an empty line adds none.)
        vias = headers.getall("Via", ())
        out.append(("Via", ", ".join((*split_list(vias), self._via)) if vias else self._via))
        return out

    async def _pass(self, req: ClientRequest, plan: RequestPlan, *, fwd: str, detail: str | None) -> Reply:
        """Forward without lookup or store (other methods, rule bypass, a GET or HEAD with a body:
        ``decide_request``), the body as it came; invalidate after unsafe ones."""
        head = req.head
        try:
            resp = await self.send(self.upstream(req, None), req.body, relay(req.interim))
        except UpstreamError as exc:
            return self.upstream_failed(plan, exc, fwd, x_cache="BYPASS")
        urls = invalidated_urls(head, resp.status, resp.headers)
        if urls:
            await self._invalidate(urls)
        if detail is not None:  # a rule's bypass: the console lists it beside the not-stored reasons
            self.metrics.live.not_stored.add(detail, head.url)
        cs = cache_status(fwd=fwd, fwd_status=resp.status, detail=detail)
        return self.direct_reply(plan, resp, "BYPASS", cs, head.method == "HEAD")

    def sending(self) -> Sent:
        """When a request goes upstream: the engine's clock, and the monotonic one with it."""
        return Sent(self.clock(), time.monotonic())

    def answered(self, sent: Sent) -> tuple[float, float]:
        """``(request_time, response_time)`` of the exchange started at ``sent`` (RFC 9111 §4.2.3).

        The response's delay is the wall clock's, unless that clock was stepped meanwhile (an
        NTP step, a VM resumed): then the monotonic time elapsed. Why: a step of a day forward
        during a fetch read as a day's delay, so the response arrived stale (its Age a day): the
        clients waiting on the fill went to the origin one by one, and it was stored stale.
        A clock that does not move (a test's) keeps its delay of 0.
        """
        response_time = self.clock()
        delay = response_time - sent.wall
        elapsed = max(0.0, time.monotonic() - sent.monotonic)
        if not 0.0 <= delay <= elapsed:
            delay = elapsed
        return response_time - delay, response_time

    async def send(self, request: UpstreamRequest, body: AsyncIterable[bytes] | bytes | None = None,
                    on_interim: InterimHook | None = None) -> UpstreamResponse:
        started = time.monotonic()
        # Errors are counted by the pool.
        try:
            resp = await self.pool.send(request.method, request.target, list(request.headers), body,
                                        on_interim)
        except UpstreamError as exc:
            if exc.upstream is not None:  # the access log names the upstream that failed
                took = time.monotonic() - started
                note_upstream(exc.upstream, took)
                if error_kind(exc) in TIMED_OUT_WAITING:
                    self.metrics.upstream_latency.labels(exc.upstream).observe(took)
            raise
        name = resp.upstream.name
        took = time.monotonic() - started
        if resp.stray:
            self.warn_stray(request.method, resp)
        klass = resp.status // 100
        children = self._upstream_children.get((name, klass))
        if children is None:
            metrics = self.metrics
            children = self._upstream_children[(name, klass)] = (
                metrics.upstream_latency.labels(name), metrics.upstream_requests.labels(name, f"{klass}xx"))
        children[0].observe(took)
        note_upstream(name, took)
        children[1].value += 1
        return resp

    def warn_upstream(self, logger: logging.Logger, exc: UpstreamError, msg: str, *args: Any,
                      body: bool = False) -> None:
        """The warning of a failed origin fetch (``first_report`` said it is this one's to
        give), summarised by its upstream, its kind (``cachegate_upstream_errors_total``'s:
        ``body_error_kind`` for a ``body`` that broke off), ``msg`` and the failure itself
        (``failure_text``: its numbers aside): the first at once, then a count per while
        (``proxy.logs.Summarised``). An origin down under load logged a line per failed
        request; the metrics count every one. Keyed on ``msg`` alone (a format), every failure
        of an upstream and kind was one: "Connection refused" after "closed the connection"
        was only counted under the other's line."""
        kind = body_error_kind(exc) if body else error_kind(exc)
        self.upstream_warnings.warning(logger, (exc.upstream, kind, msg, failure_text(exc)), msg, *args,
                                       stacklevel=3)

    def warn_stray(self, method: str, resp: UpstreamResponse) -> None:
        """The warning of bytes an upstream wrote after a response had ended (``resp.stray``:
        dropped, the response answered, the connection closed), summarised as the failures are
        (``warn_upstream``), by upstream, kind, status and method. Logged once per request, an
        origin that wrote 10 bytes after each answer to a POST was 8,578 lines (3.3 MB) in 10 s."""
        name, status = resp.upstream.name, resp.status
        if ends_at_head(status):  # (a 204, a 304: the bytes came after its head)
            self.upstream_warnings.warning(
                upstream_log, (name, "stray_body", status, method),
                "upstream %s: %d or more bytes of body after a %d response, which has none (RFC 9112 §6.3): "
                "dropped, the %d answered, the connection closed", name, resp.stray, status, status)
        else:  # after the whole answer to a request that is not idempotent (``http_client._overrun``)
            self.upstream_warnings.warning(
                upstream_log, (name, "stray_after", status, method),
                "upstream %s: %d or more bytes after the end of the %d response to %s (RFC 9112 §6.3): "
                "dropped, the %d answered (the %s may have been acted on: not refused, which the client "
                "might repeat), the connection closed", name, resp.stray, status, method, status, method)

    def upstream_failed(self, plan: RequestPlan, exc: UpstreamError, fwd: str, x_cache: str | None = None,
                        collapsed: bool = False) -> Reply:
        """The error answer when the origin failed; ``x_cache`` as ``fwd`` says (``EXPIRED``
        for a stale stored response that could not be refreshed) unless given; ``collapsed``
        when the failed fetch was another request's this one waited for."""
        status = exc.status_hint
        reason = {502: "Bad Gateway", 503: "Service Unavailable",
                  504: "Gateway Timeout"}.get(status, "Bad Gateway")
        detail = upstream_detail(exc)
        if isinstance(exc, ProxyStopping):  # cut off by the stop: no origin error to warn of
            log.info("answered %d: %s", status, exc)
        elif isinstance(exc, OutOfResources):  # cachegate's own: the pool warns once per streak
            log.debug("answered %d: %s", status, exc)
        elif first_report(exc):  # once per failed fetch, not once per client coalesced on it
            # The detail (address, timeout) for the operator only; one line a while (warn_upstream).
            self.warn_upstream(log, exc, "upstream failed: %s", exc)
        else:
            log.debug("answered %d: %s", status, exc)
        return self.finish(plan, error_reply(status, reason, f"{status} {reason}: {exc.public_text()}",
                                               x_cache or forwarded_x_cache(fwd),
                                               cache_status(fwd=fwd, collapsed=collapsed, detail=detail)))

    async def _invalidate(self, urls: Sequence[str]) -> None:
        writes = self.storage.writing_urls(urls)
        if writes:
            await asyncio.wait(writes, timeout=self.settings.cache.lock_timeout)
        try:
            await self._invalidate_now(urls)
        except Exception as exc:
            if len(urls) == 1:
                self._invalidation_failed(urls[0], exc)
                return
            # One URL the store refuses must not keep the others (the target first) stored.
            for url in urls:
                try:
                    await self._invalidate_now((url,))
                except Exception as one:
                    self._invalidation_failed(url, one)

    def _invalidation_failed(self, url: str, exc: Exception) -> None:
        """An unsafe method's invalidation of a URL failed: a storage error, and a purge of kind
        ``invalidation`` that failed (as the admin API's and PURGE's failures are counted).
        Logged as one line when the error names its cause (a full filesystem's
        ``PurgeUnavailable``: a traceback for each unsafe request while the disk was full),
        with its traceback otherwise (a bug)."""
        if isinstance(exc, CachegateError):
            log.warning("invalidation of %s failed: %s", url, exc)
        else:
            log.error("invalidation of %s failed", url, exc_info=exc)
        self.metrics.storage_errors.labels("invalidate").inc()
        self.metrics.purge_failures.labels("invalidation").inc()

    async def _invalidate_now(self, urls: Sequence[str]) -> None:
        await self._invalidate_hook(urls)

    def direct_reply(self, plan: RequestPlan, resp: UpstreamResponse, x_cache: str, cs: str,
                      head_only: bool) -> Reply:
        """A reply straight from an upstream response (nothing stored): a small body that has
        already arrived whole goes out as bytes, in one write; any other is streamed."""
        headers = self.response_headers(resp.headers)
        headers.append(("Cache-Status", cs))
        headers.append(("X-Cache-Status", x_cache))
        if head_only or ends_at_head(resp.status):
            length = resp.content_length if head_only else None
            if resp.complete_body() is None:  # read whole: the connection is reused
                resp.release()
            return self.finish(plan, Reply(resp.status, resp.reason, headers, None, length,
                                            x_cache, "none", head_only=True))
        body = resp.complete_body()
        if body is not None:
            return self.finish(plan, Reply(resp.status, resp.reason, headers, body, len(body),
                                            x_cache, "upstream"))
        return self.finish(plan, Reply(resp.status, resp.reason, headers, resp.iter_chunks(),
                                        resp.content_length, x_cache, "upstream"))

    def fill_decision(self, attempt: Attempt, resp: UpstreamResponse, request_time: float,
                      response_time: float) -> tuple[str, Entry | None]:
        """May this response to ``attempt`` be stored, as what (``decide_fill``, under the rules'
        plan for its status and type)?"""
        store_plan = attempt.plan.for_response(resp.status, resp.headers.get("Content-Type"))
        # The GET's body: a HEAD's Content-Length describes it, a 204's describes nothing; one
        # its head does not give is held against the limit now when all of it came with the head.
        length = body_length(resp.status, resp.content_length)
        detail, entry = self._decided(attempt.key, store_plan, Exchange(
            attempt.req.head, resp.status, resp.reason, resp.headers, request_time, response_time,
            resp.close_delimited_tls), resp.arrived_length if length is None else length)
        if entry is not None:
            self.date_behind(resp.upstream.name, entry.response)
        return detail, entry

    def date_behind(self, upstream: str, stored: StoredResponse) -> None:
        """Count and say (one line per upstream a while) a response from ``upstream`` that arrived
        stale only because its Date is behind this clock (``origin_date_behind``): nothing it
        sends of that lifetime is ever reused, and nothing else would say why."""
        behind = origin_date_behind(stored)
        if not behind:
            return
        self.metrics.origin_date_behind.labels(upstream).inc()
        self.date_warnings.warning(log, upstream, "%s; its responses arrive stale and are not reused: %s, "
                                   "or cache.apparent_age: false", *self._date_words(upstream, behind))

    def _date_words(self, upstream: str, behind: float) -> tuple[str, str]:
        """What ``date_behind`` says of ``upstream``'s Date ``behind`` this clock, and what to do:
        a Date behind says only that one of the two clocks is wrong. This machine's compared with
        Redis's (``cluster.clock_offset``, measured at each heartbeat) says which one; without
        it, other upstreams whose Dates were behind by about as much lately (``SAME_SKEW``) say
        it is most likely this machine's that is ahead (their origins would not all be off alike)."""
        now = time.monotonic()
        skews = self._date_skews
        skews[upstream] = (behind, now)
        offset = None if self.cluster is None else self.cluster.clock_offset
        if offset is not None and offset > DATE_BEHIND_SLACK:
            return (f"origin {upstream}: its Date is {behind:.0f} s behind this clock, which is "
                    f"{offset:.0f} s ahead of Redis's", "set this machine's clock (NTP)")
        if offset is not None:
            return (f"origin {upstream}: its Date is {behind:.0f} s behind this clock (which agrees with "
                    "Redis's)", "set the origin's clock (NTP)")
        alike = sorted(name for name, (b, at) in skews.items()
                       if name != upstream and abs(b - behind) <= SAME_SKEW and now - at < DATE_BEHIND_WINDOW)
        if alike:
            return (f"origins {', '.join([upstream, *alike])}: their Dates are all about {behind:.0f} s "
                    f"behind this clock, which is most likely {behind:.0f} s ahead",
                    "set this machine's clock (NTP)")
        return (f"origin {upstream}: its Date is {behind:.0f} s behind this clock: one of the two clocks is "
                "wrong", "set the wrong one (NTP: this machine's, or the origin's)")

    def _decided(self, key: str, store_plan: StorePlan, exchange: Exchange, length: int | None, *,
                 part: bool = False) -> tuple[str, Entry | None]:
        """The one fill decision of whole responses and parts alike: the rules' (``_filled``),
        then a body of ``length`` held against what the store has room for now (``Storage.room``:
        less than the rules' ``max_object`` while the disk shards' budget is lowered). Why one:
        parts were held against the rules' alone, and a 206 between the two limits was said
        ``stored`` while the spool refused it, uncounted."""
        detail, entry = self._filled(key, store_plan, exchange, part=part)
        if entry is not None and too_large(length, self.storage.room(entry)):
            return "TOO-LARGE", None  # the same rule as max_object's, against this store's room
        return detail, entry

    def _filled(self, key: str, store_plan: StorePlan, exchange: Exchange, *, part: bool = False
                ) -> tuple[str, Entry | None]:
        """The fill decision (``decide_fill``) as the flight carries it: a detail, or the entry."""
        decision = decide_fill(exchange, store_plan, self._fill_settings, jitter=self._random.random(),
                               part=part)
        match decision:
            case NoFill():
                return decision.detail, None
            case Fill():
                return "", Entry(key=key, url=exchange.request.url, response=decision.response, body_id="",
                                 body_size=0, tags=decision.tags, stored_at=exchange.response_time)
            case _:
                assert_never(decision)

    # -- what a flight stores (proxy.flight carries it out) ---------------------------------

    async def freshen(self, cached: Cached, update: CIMultiDictProxy[str], plan: RequestPlan,
                       request_time: float, response_time: float, head: RequestHead, *,
                       upstream: str = "") -> None:
        """RFC 9111 §4.3.4: update the stored headers and freshness from a 304; the body stays.
        The variants freshened with it (``_freshen_siblings``) are written with it, at once.
        ``upstream``: the name of the one that sent the 304 (``date_behind``)."""
        entry = cached.entry
        old = entry.response
        content_type = update.get("Content-Type") or old.header_dict().get("Content-Type")
        store_plan = plan.for_response(old.status, content_type)
        updated = freshened(old, Exchange(head, 304, "", update, request_time, response_time), store_plan,
                            self._fill_settings, jitter=self._random.random())
        if updated is not None and upstream:
            self.date_behind(upstream, updated)
        try:
            if updated is None:  # the 304 said no-store, private or another Vary: forget the key's responses
                await self.storage.delete([entry.key])
            else:
                entries = [entry.with_response(updated)]
                etag = update.get("ETag")
                if old.vary and etag is not None and not etag.lstrip().startswith("W/") \
                        and worth_freshening_others(updated):
                    entries += await self._freshen_siblings(cached, etag.strip(), update, store_plan,
                                                            request_time, response_time, head)
                await self.storage.update_many(entries)
        except Exception as exc:
            self.write_failures.failed("write", entry.key, exc)

    async def drop_other_parts(self, key: str, whole: StoredResponse) -> None:
        """Forget the key's parts when one of them is of another representation than ``whole``,
        just stored from the shared tier (``MissPath._adopt_shared``): once the whole is gone
        (evicted), a range would be answered from that part, a version its clients were no
        longer served. The store removes keys, not single variants: all its parts go."""
        pkey = part_key(key)
        parts = self.storage.memory_get(pkey)
        if parts is None and self.storage.absent(pkey):
            return
        try:
            if parts is None:
                parts = await self.load(pkey)
            if any(other_representation(c.entry.response, whole) for c in parts):
                await self.storage.delete([pkey])
        except Exception as exc:
            self.write_failures.failed("write", pkey, exc)

    async def drop_superseded(self, cached: Cached) -> None:
        """Forget the key's stored responses while ``cached`` is still among them: the origin's
        full answer to a fetch made for it is not stored and supersedes it (``supersedes_stored``).
        The whole key goes, as after a 304 that says no-store (``freshen``): the store removes
        keys, not single variants. Not when a fill or a purge replaced it meanwhile (the new
        copy is not this answer's to drop)."""
        key = cached.entry.key
        try:
            if any(c.entry.body_id == cached.entry.body_id for c in await self.load(key)):
                await self.storage.delete([key])
        except Exception as exc:
            self.write_failures.failed("write", key, exc)

    async def _freshen_siblings(self, cached: Cached, etag: str, update: CIMultiDictProxy[str],
                                store_plan: StorePlan, request_time: float, response_time: float,
                                head: RequestHead) -> list[Entry]:
        """RFC 9111 §4.3.4: "All the stored responses with the same strong validator are
        identified for update": the key's other Vary variants holding the 304's strong ETag (the
        same representation, selected by other request fields; compared exactly: the weak
        comparison is for the revalidated variant alone, ``validates_stored``), freshened too rather than each
        revalidated in turn. Asked only for a key whose responses vary, and only when that saves
        a request to the origin (``worth_freshening_others``: never for ``no-cache``). Returned
        to be written with the revalidated variant: written one by one, each rewrote the key's
        record in memory, every variant's body with it."""
        out: list[Entry] = []
        for other in await self.load(cached.entry.key):
            stored = other.entry.response
            if other.entry.body_id == cached.entry.body_id or stored.etag is None \
                    or stored.etag.strip() != etag:
                continue
            updated = freshened(stored, Exchange(head, 304, "", update, request_time, response_time),
                                store_plan, self._fill_settings, jitter=self._random.random())
            if updated is not None:
                out.append(other.entry.with_response(updated))
        return out

    # -- finishing ---------------------------------------------------------------------------

    def edited(self, plan: RequestPlan, status: int, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``headers`` with the rule's response_headers for a reply of ``status`` applied."""
        edits = response_edits(plan, status, headers)
        return edits.apply(headers) if edits else headers

    def finish(self, plan: RequestPlan, reply: Reply) -> Reply:
        """Apply the rule's response_headers (chosen by the reply's status and type) for the client."""
        edits = response_edits(plan, reply.status, reply.headers)
        if edits:
            reply.headers = edits.apply(reply.headers)
        return reply


def response_edits(plan: RequestPlan, status: int, headers: Sequence[tuple[str, str]]
                   ) -> HeaderEdits | None:
    """The rule's response_headers for a reply with this status and these fields (a 206's are
    its 200's, whatever its source: ``RequestPlan.response_headers_for``; a HEAD's own rules
    may edit its reply by its status too: ``RequestPlan.head_rules``)."""
    if plan.response_rules or plan.head_rules:
        ctype = next((v for k, v in headers if k.lower() == "content-type"), None)
        return plan.response_headers_for(status, ctype)
    return plan.response_headers


__all__ = ["ClientRequest", "Engine", "Reply", "StorageError", "StoredResponse", "response_edits",
           "served_headers"]
