"""The engine: runs the policy's decisions against storage, the coalescer and the upstream pool.

It knows nothing of aiohttp's server side: it takes a ``ClientRequest`` (a
request head, the peer address and a body stream) and returns a ``Reply``
(status, headers, and a body as bytes, a file or an async iterator) that the web
layer writes out. Every path through ``handle`` is one ``match`` over a policy
decision, closed with ``assert_never``:

- ``Serve``       -> a reply from the stored response (HIT, STALE, UPDATING)
- ``Revalidate``  -> a conditional request in a flight; 304 freshens (REVALIDATED)
- ``Forward``     -> a fill in a flight, body teed to the client and the store (MISS)
- ``OnlyIfCachedMiss`` -> 504
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import IO, Any, assert_never

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cluster.fills import Contended, Found, Locked, SharedCache
from proxy.coalescer import Coalescer, FellBehind, Flight, FlightHead, FlightResult, Reader, TooFarBehind
from proxy.config import Settings
from proxy.control import Channel
from proxy.errors import (
    NoUpstreamAvailable,
    ResponseAborted,
    StorageError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.http_client import InterimHook
from proxy.leases import Busy, Granted, LeaseClient, Waiting
from proxy.logs import note_key, note_upstream
from proxy.metrics import Metrics
from proxy.policy.cache_status import cache_status, serve_detail
from proxy.policy.fill import (
    PASS_DETAILS,
    Exchange,
    Fill,
    FillSettings,
    NoFill,
    decide_fill,
    freshened,
    shareable_with_followers,
)
from proxy.policy.headers import end_to_end
from proxy.policy.invalidation import invalidated_urls
from proxy.policy.keys import cache_key, url_of_key, variant_of
from proxy.policy.messages import HeaderList, RequestHead, StoredResponse
from proxy.policy.partial import (
    ByteRange,
    Combine,
    answerable,
    decide_combine,
    parse_content_range,
    part_range,
)
from proxy.policy.ranges import RangeSpec, if_range_allows, request_range
from proxy.policy.reply import NotModified, Send, Unsatisfiable, reply_head, served_headers
from proxy.policy.request import Forwarder, UpstreamRequest, upstream_request
from proxy.policy.reuse import (
    Forward,
    OnlyIfCachedMiss,
    Revalidate,
    Serve,
    decide_lookup,
    plain_fresh_hit,
    select_variant,
)
from proxy.policy.validation import (
    Freshen,
    Refetch,
    Replace,
    ServeStale,
    ValidationOutcome,
    client_not_modified,
    conditional_headers,
    decide_on_validation,
)
from proxy.rules import HeaderEdits, RequestPlan, RuleSet, StorePlan
from proxy.storage.bodyfiles import SharedFile
from proxy.storage.disk import INLINE_LIMIT
from proxy.storage.entry import Entry
from proxy.storage.failures import WriteFailures
from proxy.storage.memory import Cached
from proxy.storage.tiered import BodySpool, Storage
from proxy.upstream import UpstreamPool, UpstreamResponse

log = logging.getLogger("cachegate.engine")

# Followers of a flight whose body is at most this big get it whole, in one write; so
# does the client that started the flight, for bodies up to WHOLE_FOR_LEADER.
WHOLE_FOR_FOLLOWERS = 256 * 1024
WHOLE_FOR_LEADER = 64 * 1024
# A flight answered from what another worker fetched and stored (proxy.leases).
STORED_ELSEWHERE = "STORED-ELSEWHERE"
STORED_CHUNK = 256 * 1024  # reads of a stored body for a client that fell behind its fill


# Sends an interim (1xx) response to the client, before the final one: (status, reason, fields).
InterimSink = Callable[[int, str, HeaderList], None]


@dataclass(slots=True)
class ClientRequest:
    head: RequestHead  # normalised (proxy.policy.request): all that may reach the origin
    remote: str  # the peer's IP address (X-Forwarded-For)
    body: AsyncIterable[bytes] | None = None  # None when the request has no body
    # Where the origin's interim responses go (RFC 9110 §15.2); None: nowhere (an HTTP/1.0
    # client, or a caller without a client connection).
    interim: InterimSink | None = None
    request_id: str = ""  # X-Request-Id (proxy.logs): sent upstream in place of the client's


Body = bytes | IO[bytes] | AsyncIterator[bytes] | None
# Engine.fresh_hit: (plan, variant, age, ttl, its open body file when the body is on disk)
FreshHit = tuple["RequestPlan", Cached, float, float, SharedFile | None]


@dataclass(slots=True)
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: Body = None
    length: int | None = None  # Content-Length, when known
    x_cache: str = "MISS"
    tier: str = "upstream"  # where the body comes from: memory, disk, upstream, none
    offset: int = 0  # for a file body: where to start
    head_only: bool = False


def _error_reply(status: int, reason: str, text: str, x_cache: str, cs: str) -> Reply:
    body = (text + "\n").encode()
    return Reply(status, reason, [("Content-Type", "text/plain; charset=utf-8"),
                                  ("Cache-Status", cs), ("X-Cache-Status", x_cache)],
                 body, len(body), x_cache, "none")


class Engine:
    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        pool: UpstreamPool,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        invalidate: Callable[[Sequence[str]], Any] | None = None,
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
        self._invalidate_hook = invalidate
        self._via = f"1.1 {settings.via}"
        self._forwarder = Forwarder(self._via, settings.pool.preserve_host)
        self._fill_settings = FillSettings(self._via, tuple(h.lower() for h in settings.cache.tag_headers))
        self._random = random.Random()
        # Disk commits still running, by key: an invalidation waits for them, or the
        # commit would bring back the entry it just deleted.
        self._disk_writes: dict[str, set[asyncio.Future[None]]] = {}
        self._loads: dict[str, asyncio.Future[tuple[Cached, ...]]] = {}  # disk lookups in progress
        self._stores = 0  # fills this process began storing: a lookup that overlapped one proves nothing
        self.write_failures = WriteFailures(lambda op: metrics.storage_errors.labels(op).inc())
        # In a worker of several: cross-worker leases (join_cluster). None: this process alone.
        self.leases: LeaseClient | None = None
        # Cluster mode with shared_cache: the shared tier behind this node's own (proxy.cluster).
        self.shared: SharedCache | None = None

    def reconfigure(self, settings: Settings) -> None:
        """Take a reloaded config's rules (storage, pool and listeners stay as they are)."""
        self.settings = settings
        self.rules = settings.rules
        self._via = f"1.1 {settings.via}"
        self._forwarder = Forwarder(self._via, settings.pool.preserve_host)
        self._fill_settings = FillSettings(self._via, tuple(h.lower() for h in settings.cache.tag_headers))

    async def close(self) -> None:
        await self.coalescer.close(self.settings.shutdown_grace)

    def pending_disk_writes(self) -> int:
        """Stored responses still being written to the disk tier (the write-behind queue)."""
        return sum(len(writes) for writes in self._disk_writes.values())

    def join_cluster(self, channel: Channel, worker_id: int) -> None:
        """In a worker of ``--workers N``: coalesce fetches with the other workers through the
        supervisor's lease broker (``proxy.leases``; without a shared disk tier there is
        nothing to share, and each worker fetches for itself), and show this worker's
        upstream pool to the admin API (``GET /upstreams``)."""
        if self.storage.disk is not None:
            self.leases = LeaseClient(channel)
        pool = self.pool

        async def upstream_states() -> dict[str, Any]:
            return {"worker": worker_id, "upstreams": pool.snapshot()}

        channel.handlers["upstream_states"] = upstream_states

    # -- entry point -----------------------------------------------------------------------

    async def handle(self, req: ClientRequest) -> Reply:
        head = req.head
        plan = self.rules.plan(head)
        if head.method not in ("GET", "HEAD"):
            return await self._pass(req, plan, fwd="method", detail=None)
        if plan.bypass:
            assert plan.rule is not None
            return await self._pass(req, plan, fwd="bypass", detail=f"RULE-BYPASS:{plan.rule.name}")
        key = cache_key(head, plan.key)
        note_key(key)
        variants = self.storage.memory_get(key)
        if variants is None:
            # Known absent (this process looked lately, and has stored nothing since): no disk lookup.
            variants = () if self.coalescer.is_absent(key) else await self._load_shared(
                key, bodies=head.method == "GET")
        now = self.clock()
        decision = decide_lookup(head, [c.entry.response for c in variants], now, plan.options)
        match decision:
            case Serve():
                cached = variants[decision.index]
                if decision.refresh:
                    self._refresh_in_background(req, plan, key, cached)
                reply = await self._serve(req, plan, cached, decision.status, decision.ttl,
                                          decision.age, decision.not_modified, hit=True,
                                          detail=serve_detail(decision.status, cached.entry.response))
                if reply is not None:
                    return reply
                return await self._fetch(req, plan, key, None, "uri-miss", None)
            case Revalidate():
                cached = variants[decision.index]
                stale = cached if decision.stale_if_error else None
                return await self._fetch(req, plan, key, cached, decision.fwd, stale,
                                         stale_prohibited=decision.stale_prohibited)
            case Forward():
                if decision.fwd in ("uri-miss", "vary-miss") and head.method == "GET":
                    spec = request_range(head.headers)
                    if spec is not None and (reply := await self._range_miss(req, plan, key, spec,
                                                                              decision.fwd)) is not None:
                        return reply
                stale = variants[decision.stale_index] if decision.stale_index is not None else None
                return await self._fetch(req, plan, key, None, decision.fwd, stale,
                                         coalesce=decision.fwd != "request",
                                         stale_prohibited=decision.stale_prohibited)
            case OnlyIfCachedMiss():
                return self._finish(plan, _error_reply(
                    504, "Gateway Timeout", "only-if-cached: no stored response", "MISS",
                    cache_status(detail="ONLY-IF-CACHED")))
            case _:
                assert_never(decision)

    def fresh_hit(self, head: RequestHead, max_file: int = 0) -> FreshHit | None:
        """``handle`` up to its decision, for the fast path (``proxy.web.fastpath``): a GET or
        HEAD that ``handle`` would answer with ``_serve`` as a plain fresh HIT, with the body at
        hand (in memory, or a disk-only body of at most ``max_file`` bytes whose file is already
        open; a HEAD needs none), as (plan, variant, age, ttl, open body file: also for a big
        body in memory once its disk file is open, since sendfile is cheaper than writing it).
        None for anything else: the general path then starts over, and no use of the key was
        counted. ``plain_fresh_hit`` is the first step of ``decide_lookup``: the same decision."""
        plan = self.rules.plan(head)
        if plan.bypass:
            return None
        key = cache_key(head, plan.key)
        memory = self.storage.memory
        slot = memory.slot(key)
        if slot is None:
            return None
        variants: tuple[Cached, ...] = slot[0]
        responses = ((variants[0].entry.response,) if len(variants) == 1
                     else tuple(c.entry.response for c in variants))
        plain = plain_fresh_hit(head, responses, self.clock())
        if plain is None:
            return None
        cached = variants[plain[0]]
        shared = None
        if head.method != "HEAD":
            if cached.body is None:
                if cached.entry.body_size > max_file:
                    return None
                shared = self.storage.body_files.get(key, cached.entry.body_id)
                if shared is None:
                    return None
            elif len(cached.body) > INLINE_LIMIT:
                shared = self.storage.sendable_file(cached.entry)
        memory.use(key, slot)
        return plan, cached, plain[1], plain[2], shared

    async def _load_shared(self, key: str, bodies: bool = False) -> tuple[Cached, ...]:
        """A lookup that misses memory: concurrent ones for the same key share one disk read.

        A herd on a cold key would otherwise queue one disk read per client in the
        executor, and the last clients would join the flight (or find its response)
        only after all of them: the waiters would pay for the wait. The first caller
        reads in its own step (no task in between), so the read is under way before the
        rest of the herd is even parsed.
        """
        pending = self._loads.get(key)
        if pending is None:
            shared: asyncio.Future[tuple[Cached, ...]] = asyncio.get_running_loop().create_future()
            self._loads[key] = shared
            stores = self._stores
            try:
                variants = await self._load(key, bodies)
                shared.set_result(variants)
                if not variants and stores == self._stores:  # nothing stored while it read
                    self.coalescer.mark_absent(key)
            finally:
                if self._loads.get(key) is shared:
                    del self._loads[key]
                if not shared.done():
                    shared.cancel()  # this caller was cancelled: the others read for themselves
            return variants
        await asyncio.wait((pending,))
        if pending.cancelled():
            return await self._load(key, bodies)
        # Step aside once: the first caller (woken first) starts the key's flight, whose
        # request then leaves for the origin before the rest of the herd joins it.
        await asyncio.sleep(0)
        return pending.result()

    async def _load(self, key: str, bodies: bool = False) -> tuple[Cached, ...]:
        """The key's variants (``bodies``: a GET, which will send one: read a small body with
        its metadata, in the same trip to the thread pool)."""
        try:
            return await self.storage.get(key, bodies=bodies)
        except Exception:  # storage failures degrade to a miss
            log.exception("storage read failed for %s", key)
            self.metrics.storage_errors.labels("read").inc()
            return ()

    # -- serving from the store ------------------------------------------------------------

    async def _serve(
        self,
        req: ClientRequest,
        plan: RequestPlan,
        cached: Cached,
        x_cache: str,
        ttl: float,
        age: float,
        not_modified: bool,
        *,
        hit: bool,
        fwd: str | None = None,
        fwd_status: int | None = None,
        detail: str | None = None,
        collapsed: bool = False,
        mark_stored: bool = False,
    ) -> Reply | None:
        """A reply from a stored variant; None when its body has gone missing from disk, or the
        variant cannot answer this request (``reply_head``)."""
        entry = cached.entry
        stored = entry.response
        cs = cache_status(hit=hit, fwd=fwd, fwd_status=fwd_status, ttl=ttl, detail=detail,
                          collapsed=collapsed, stored=mark_stored)
        headers = served_headers(stored.headers, str(int(age)), cs, x_cache)
        answer = reply_head(req.head, stored, entry.body_size, headers, not_modified)
        if isinstance(answer, NotModified):
            return self._finish(plan, Reply(304, "Not Modified", answer.headers, None, None, x_cache, "none"))
        head_only = req.head.method == "HEAD"
        tier = "memory" if cached.body is not None and not cached.from_disk else "disk"
        body: Body
        if head_only:
            body = None
        else:
            body = await self._open_body(cached)
            if body is None:
                return None
        match answer:
            case None:
                _close(body)
                return None
            case Unsatisfiable():
                _close(body)
                return self._finish(plan, Reply(416, "Range Not Satisfiable", answer.headers, b"", 0,
                                                x_cache, "none"))
            case Send():
                offset = answer.offset
                if isinstance(body, bytes) and answer.status == 206:  # a range of it
                    body, offset = body[offset:offset + answer.length], 0
                return self._finish(plan, Reply(answer.status, answer.reason, answer.headers, body,
                                                answer.length, x_cache, tier, offset, head_only))
            case _:
                assert_never(answer)

    async def _open_body(self, cached: Cached) -> bytes | IO[bytes] | None:
        if cached.body is not None:
            return cached.body
        try:
            body = await self.storage.open_body(cached)
        except Exception:
            log.exception("storage body read failed for %s", cached.entry.key)
            self.metrics.storage_errors.labels("read").inc()
            body = None
        if body is None:
            # The disk tier culled the body: forget the variant so the next request refetches.
            try:
                await self.storage.delete([cached.entry.key])
            except Exception:
                log.exception("could not drop %s", cached.entry.key)
        return body

    # -- partial content (RFC 9111 §3.3-3.4) ----------------------------------------------

    async def _range_miss(self, req: ClientRequest, plan: RequestPlan, key: str, spec: RangeSpec,
                          fwd: str) -> Reply | None:
        """A single byte range that no complete stored response answers: from a stored part
        that holds it, else from the origin at once (a Range request, its 206 stored as a part,
        combined with the part already held when their strong validators agree). With
        ``range_fill: whole`` the whole object is fetched in the background meanwhile, so the
        next ranges are hits. None: not this way (an If-Range the part does not satisfy)."""
        head = req.head
        pkey = part_key(key)
        parts = self.storage.memory_get(pkey)
        if parts is None:
            parts = await self._load(pkey, bodies=True)
        old: Cached | None = None
        if parts:
            responses = [c.entry.response for c in parts]
            decision = decide_lookup(head, responses, self.clock(), plan.options)
            if isinstance(decision, Serve) and decision.status == "HIT" \
                    and answerable(responses[decision.index], spec) is not None:
                if not if_range_allows(head.headers, responses[decision.index]):
                    return None  # the client wants the whole representation instead
                reply = await self._serve(req, plan, parts[decision.index], "HIT", decision.ttl,
                                          decision.age, False, hit=True)
                if reply is not None:
                    return reply
            index = select_variant(head, responses)
            old = parts[index] if index is not None else None
        if "if-range" in head.headers:
            return None  # a conditional range: the whole fill answers it from the stored response
        return await self._fetch_part(req, plan, key, spec, fwd, old)

    async def _fetch_part(self, req: ClientRequest, plan: RequestPlan, key: str, spec: RangeSpec,
                          fwd: str, old: Cached | None) -> Reply:
        head = req.head
        first, last = spec
        upstream = self._upstream(req, plan)
        wanted = f"bytes={'' if first is None else first}-{'' if last is None else last}"
        upstream = replace(upstream, headers=(*upstream.headers, ("Range", wanted)))
        request_time = self.clock()
        try:
            resp = await self._send(upstream, on_interim=_relay(req.interim))
        except UpstreamError as exc:
            return self._upstream_failed(plan, exc, fwd)
        response_time = self.clock()
        if resp.status == 200:
            # An origin that ignores Range sends the whole representation: that is the fill.
            return await self._answer_unshared(req, plan, key, fwd, resp, request_time, response_time)
        if resp.status != 206:  # an error, or a 416 about this range only: passed on, not stored
            return self._direct_reply(plan, resp, "MISS", cache_status(fwd=fwd, fwd_status=resp.status),
                                      False)
        held = parse_content_range(resp.headers.get("Content-Range"))
        if held is None:  # a multipart answer: passed on as it is
            return self._direct_reply(plan, resp, "MISS", cache_status(fwd=fwd, fwd_status=206), False)
        if self.settings.cache.range_fill == "whole" and self.coalescer.get(key) is None:
            # The origin serves ranges: the whole object follows in the background.
            self._start_flight(req, plan, key, None, register=True, background=True)
        detail, entry = self._part_decision(head, plan, key, resp, request_time, response_time)
        if detail:
            self.metrics.not_stored.labels(detail).inc()
        cs = cache_status(fwd=fwd, fwd_status=206, stored=entry is not None, detail=detail or None)
        out = self._response_headers(resp.headers)
        out.append(("Cache-Status", cs))
        out.append(("X-Cache-Status", "MISS"))
        body = self._tee_part(resp, entry, held, old)
        # Framed by the origin's own length: a body that disagrees with its Content-Range reaches
        # the client as sent, and is not stored (the spool expects the range's length).
        return self._finish(plan, Reply(206, resp.reason, out, body, resp.content_length, "MISS",
                                        "upstream"))

    def _part_decision(self, head: RequestHead, plan: RequestPlan, key: str, resp: UpstreamResponse,
                       request_time: float, response_time: float) -> tuple[str, Entry | None]:
        """May this 206 be stored as a part, as what (the same rules as its complete response)?"""
        store_plan = plan.for_response(200, resp.headers.get("Content-Type"))
        return self._filled(part_key(key), store_plan, Exchange(
            head, resp.status, resp.reason, resp.headers, request_time, response_time), part=True)

    async def _tee_part(self, resp: UpstreamResponse, entry: Entry | None, held: ByteRange,
                        old: Cached | None) -> AsyncIterator[bytes]:
        """The part's body to the client as it arrives, and to a spool; stored once complete."""
        spool = self.storage.spool(entry, held.length) if entry is not None else None
        try:
            async for chunk in resp.iter_chunks():
                if spool is not None and not await spool.write(chunk):
                    spool = None
                yield chunk
        except BaseException:
            if spool is not None:
                spool.discard()
            raise
        if spool is not None and entry is not None:
            try:
                await self._store_part(entry, spool, old)
            except Exception:
                log.exception("storing a part of %s failed", entry.key)
                self.metrics.storage_errors.labels("write").inc()

    async def _store_part(self, entry: Entry, spool: BodySpool, old: Cached | None) -> None:
        """Store a received part; combined with the one held for the same variant when RFC 9111
        §3.4 allows it (one strong validator) and both are small enough to hold in memory
        (memory_max_object): a complete result is stored as the 200 it adds up to."""
        combine = decide_combine(old.entry.response, entry.response) if old is not None else None
        if old is None or not isinstance(combine, Combine) \
                or combine.range.length > self.storage.memory.max_object:
            await self.storage.commit(entry, spool)
            return
        new_body = spool.body_bytes()
        old_body = await self._open_body(old)
        if new_body is None or not isinstance(old_body, bytes):
            _close(old_body)
            await self.storage.commit(entry, spool)
            return
        spool.discard()
        bodies = {id(entry.response): new_body, id(old.entry.response): old_body}
        lower, upper = bodies[id(combine.lower)], bodies[id(combine.upper)]
        lower_range, upper_range = part_range(combine.lower), part_range(combine.upper)
        assert lower_range is not None and upper_range is not None
        merged = lower + upper[lower_range.last + 1 - upper_range.first:]
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
        if await self.storage.commit(combined, out) and combine.range.complete:
            self.coalescer.clear_absent(combined.key)

    # -- going upstream --------------------------------------------------------------------

    def _upstream(self, req: ClientRequest, plan: RequestPlan | None,
                  revalidating: Cached | None = None) -> UpstreamRequest:
        """The request the origin receives: computed by the policy from the normalised head
        alone (``plan``: a fill, as keyed; None: passed through)."""
        validators = conditional_headers(revalidating.entry.response) if revalidating is not None else ()
        return upstream_request(req.head, req.remote, self._forwarder, request_id=req.request_id,
                                fill=plan.key if plan is not None else None, validators=validators)

    def _response_headers(self, headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> list[tuple[str, str]]:
        out = list(end_to_end(headers))
        via = headers.get("Via")
        out = [(k, v) for k, v in out if k.lower() not in ("via", "content-length", "server")]
        out.append(("Via", f"{via}, {self._via}" if via else self._via))
        return out

    async def _pass(self, req: ClientRequest, plan: RequestPlan, *, fwd: str, detail: str | None) -> Reply:
        """Forward without lookup or store (other methods, rule bypass); invalidate after unsafe ones."""
        head = req.head
        try:
            resp = await self._send(self._upstream(req, None), req.body, _relay(req.interim))
        except UpstreamError as exc:
            return self._upstream_failed(plan, exc, fwd, x_cache="BYPASS")
        urls = invalidated_urls(head, resp.status, resp.headers)
        if urls:
            await self._invalidate(urls)
        if detail is not None:  # a rule's bypass: the console lists it beside the not-stored reasons
            self.metrics.live.not_stored.add(detail, head.url)
        cs = cache_status(fwd=fwd, fwd_status=resp.status, detail=detail)
        return self._direct_reply(plan, resp, "BYPASS", cs, head.method == "HEAD")

    async def _send(self, request: UpstreamRequest, body: AsyncIterable[bytes] | None = None,
                    on_interim: InterimHook | None = None) -> UpstreamResponse:
        started = time.monotonic()
        # Errors are counted by the pool.
        resp = await self.pool.send(request.method, request.target, list(request.headers), body,
                                    on_interim)
        name = resp.upstream.name
        took = time.monotonic() - started
        self.metrics.upstream_latency.labels(name).observe(took)
        note_upstream(name, took)
        self.metrics.upstream_requests.labels(name, f"{resp.status // 100}xx").inc()
        return resp

    def _upstream_failed(self, plan: RequestPlan, exc: UpstreamError, fwd: str, x_cache: str = "MISS"
                         ) -> Reply:
        status = exc.status_hint
        reason = {502: "Bad Gateway", 503: "Service Unavailable",
                  504: "Gateway Timeout"}.get(status, "Bad Gateway")
        detail = {504: "UPSTREAM-TIMEOUT", 503: "NO-UPSTREAM"}.get(status, "UPSTREAM-UNREACHABLE")
        log.warning("upstream failed: %s", exc)  # the detail (address, timeout) for the operator only
        return self._finish(plan, _error_reply(status, reason, f"{status} {reason}: {exc.public_text()}",
                                               x_cache, cache_status(fwd=fwd, detail=detail)))

    async def _invalidate(self, urls: Sequence[str]) -> None:
        targets = set(urls)
        writes = [f for k, fs in self._disk_writes.items() if url_of_key(k) in targets for f in fs]
        if writes:
            await asyncio.wait(writes, timeout=self.settings.cache.lock_timeout)
        try:
            if self._invalidate_hook is not None:
                await self._invalidate_hook(urls)
            else:
                keys = await self.storage.keys_for(urls=urls)
                await self.storage.delete(keys)
        except Exception:
            log.exception("invalidation of %s failed", urls)
            self.metrics.storage_errors.labels("invalidate").inc()

    # -- fills and revalidations in flights -----------------------------------------------

    async def _fetch(
        self,
        req: ClientRequest,
        plan: RequestPlan,
        key: str,
        revalidating: Cached | None,
        fwd: str,
        stale: Cached | None,
        *,
        coalesce: bool = True,
        stale_prohibited: bool = False,
    ) -> Reply:
        """Join the key's flight, or start one, and answer this client from it."""
        passing = coalesce and self.coalescer.is_pass(key)
        if passing and revalidating is None and stale is None:
            return await self._forward_passing(req, plan, key, fwd)
        flight = self.coalescer.get(key) if coalesce and not passing else None
        if flight is not None and flight.spool is not None and flight.spool.doomed:
            flight = None  # purged while in flight: what it carries must not be served anew
        elif flight is None and coalesce and not passing:
            reply = await self._stored_meanwhile(req, plan, key)
            if reply is not None:
                return reply
        collapsed = False
        if flight is not None:
            reader = flight.body.join()
            if reader is None:
                # Too late to stream this flight from its first byte: wait until it
                # is stored and answer from the store.
                return await self._serve_after_flight(req, plan, key, fwd, None, "HIT", True)
            flight.followers += 1
            collapsed = True
        if flight is None:
            # A hit-for-pass key's fetch is nobody else's to join (nor to hold a lease for).
            flight = self._start_flight(req, plan, key, revalidating, register=coalesce and not passing,
                                        stale=stale)
            reader = flight.body.join()
        assert reader is not None
        if req.interim is not None and not flight.head.done():
            flight.interim.append(req.interim)  # the origin's 1xx, until the head arrives
        return await self._reply_from_flight(req, plan, key, flight, reader, collapsed, revalidating, fwd,
                                             stale, stale_prohibited)

    async def _reply_from_flight(self, req: ClientRequest, plan: RequestPlan, key: str, flight: Flight,
                                 reader: Reader, collapsed: bool, revalidating: Cached | None, fwd: str,
                                 stale: Cached | None, stale_prohibited: bool) -> Reply:
        """Answer a client that joined ``flight`` (as its leader, or ``collapsed`` as a follower)."""
        head = req.head
        try:
            if collapsed:
                fhead = await asyncio.wait_for(asyncio.shield(flight.head),
                                               self.settings.cache.lock_timeout)
            else:
                fhead = await asyncio.shield(flight.head)
        except TimeoutError:
            reader.close()
            return await self._fetch(req, plan, key, revalidating, fwd, stale, coalesce=False,
                                     stale_prohibited=stale_prohibited)
        except UpstreamError as exc:
            reader.close()
            if stale is not None:
                return await self._serve_stale(req, plan, stale, fwd, None, "ORIGIN-UNREACHABLE")
            if stale_prohibited:
                # RFC 9111 §5.2.2.2: a stored response that may not be served stale
                # (must-revalidate, no-cache, ...) and an unreachable origin: 504.
                log.warning("upstream failed, stale response not allowed: %s", exc)
                return self._finish(plan, _error_reply(
                    504, "Gateway Timeout", "504 Gateway Timeout: origin unreachable", "MISS",
                    cache_status(fwd=fwd, detail="STALE-NOT-ALLOWED")))
            return self._upstream_failed(plan, exc, fwd)
        except ConnectionError as exc:
            reader.close()
            if collapsed:
                return await self._fetch(req, plan, key, revalidating, fwd, stale, coalesce=False,
                                         stale_prohibited=stale_prohibited)
            return self._upstream_failed(plan, UpstreamError(str(exc)), fwd)

        if fhead.store_detail == STORED_ELSEWHERE:
            # Another worker fetched and stored it (proxy.leases): answer from the store.
            reader.close()
            self.metrics.coalesced.inc()
            return await self._serve_after_flight(req, plan, key, fwd, fhead.status, "HIT", True)

        if fhead.status >= 500 and stale is not None and fhead.store_detail != "":
            reader.close()
            return await self._serve_stale(req, plan, stale, fwd, fhead.status, "ORIGIN-ERROR")

        if fhead.status == 304 and fhead.store_detail == "FRESHENED":
            # The stored response was revalidated: answer from it.
            reader.close()
            return await self._serve_after_flight(req, plan, key, fwd, 304, "REVALIDATED", collapsed)

        if collapsed:
            if not fhead.shareable or fhead.vary != variant_of(
                tuple(n for n, _ in fhead.vary), head.headers
            ):
                reader.close()
                return await self._fetch(req, plan, key, revalidating, fwd, stale, coalesce=False,
                                         stale_prohibited=stale_prohibited)
            self.metrics.coalesced.inc()

        x_cache = "HIT" if collapsed else ("EXPIRED" if fwd == "stale" else "MISS")
        stored = fhead.store_detail == ""
        prepared = flight.follower_headers.get(fwd) if collapsed else None
        if prepared is not None:
            headers = list(prepared)
        else:
            cs = cache_status(fwd=fwd, fwd_status=fhead.status, stored=stored, collapsed=collapsed,
                              detail=None if stored else fhead.store_detail)
            headers = self._response_headers(fhead.headers)
            if collapsed:  # a Set-Cookie stored under allow_set_cookie was the leader's, not theirs
                headers = [(k, v) for k, v in headers if k.lower() != "set-cookie"]
            headers.append(("Cache-Status", cs))
            headers.append(("X-Cache-Status", x_cache))
            if collapsed:  # the same for every follower: prepared once
                flight.follower_headers[fwd] = list(headers)

        client_headers = head.headers
        if stored and fhead.status == 200 and (
            "if-none-match" in client_headers or "if-modified-since" in client_headers
            or "range" in client_headers
        ):
            # Fill requests drop the client's conditionals and ranges; answer them from the
            # stored response once the flight has stored it.
            reader.close()
            return await self._serve_after_flight(req, plan, key, fwd, fhead.status, x_cache, collapsed,
                                                  stored=not collapsed, flight=flight)

        if head.method == "HEAD" or fhead.status in (204, 304):
            reader.close()
            return self._finish(plan, Reply(fhead.status, fhead.reason, headers, None,
                                            fhead.content_length if head.method == "HEAD" else None,
                                            x_cache, "none", head_only=True))
        length = fhead.content_length
        if length is not None and length <= (WHOLE_FOR_FOLLOWERS if collapsed else WHOLE_FOR_LEADER):
            # A small body: a follower waits for it whole and sends it in one write, which
            # costs less per follower than streaming it chunk by chunk (a herd's fan-out);
            # so does the leader when the body is small enough not to delay its first byte.
            try:
                body = await flight.body.whole()
            except UpstreamError as exc:
                if collapsed:
                    raise
                # The leader's client sees the response break off, as when it is streamed.
                return self._finish(plan, Reply(fhead.status, fhead.reason, headers, _broken(exc),
                                                length, x_cache, "upstream"))
            finally:
                reader.close()
            return self._finish(plan, Reply(fhead.status, fhead.reason, headers, body, len(body),
                                            x_cache, "upstream"))
        return self._finish(plan, Reply(fhead.status, fhead.reason, headers,
                                        self._flight_body(flight, key, reader), length, x_cache,
                                        "upstream"))

    async def _flight_body(self, flight: Flight, key: str, reader: Reader) -> AsyncIterator[bytes]:
        """A flight's body for one client, as it arrives. A client that fell too far behind a
        fill being stored was detached from it (the fetch and the other clients do not wait
        for it: ``proxy.coalescer``) and gets the rest from the stored response once the fill
        is complete; when it was not stored after all, this raises and the client's
        connection is aborted (a truncated body is never ended as if complete)."""
        chunks = reader.__aiter__()
        try:
            async for chunk in chunks:
                yield chunk
            return
        except FellBehind as behind:
            offset = behind.offset
        except TooFarBehind:
            self.metrics.slow_readers.labels("cut_off").inc()
            raise
        finally:
            await chunks.aclose()
        async for chunk in self._stored_rest(flight, key, offset):
            yield chunk

    async def _stored_rest(self, flight: Flight, key: str, offset: int) -> AsyncIterator[bytes]:
        """The body a flight stored, from ``offset`` on (for a client detached from it)."""
        result = await asyncio.shield(flight.result)
        entry = result.entry
        body: bytes | IO[bytes] | None = None
        if entry is not None and entry.body_size >= offset:
            variants = await self._load(key)
            cached = next((c for c in variants if c.entry.body_id == entry.body_id), None)
            if cached is not None:
                body = await self._open_body(cached)
        if body is None:
            self.metrics.slow_readers.labels("cut_off").inc()
            raise ResponseAborted(f"{key}: the client fell behind a fill that was not stored")
        self.metrics.slow_readers.labels("resumed").inc()
        if isinstance(body, bytes):
            if offset < len(body):
                yield body[offset:]
            return
        try:
            await self.storage.run(body.seek, offset)
            while chunk := await self.storage.run(body.read, STORED_CHUNK):
                yield chunk
        finally:
            body.close()

    async def _forward_passing(self, req: ClientRequest, plan: RequestPlan, key: str, fwd: str) -> Reply:
        """A hit-for-pass key: forwarded in the request's own task, without a flight (nobody may
        join it). Should the response turn out storable now, a flight takes it over and stores it
        (and this client is answered from that flight), which ends the hit-for-pass."""
        request_time = self.clock()
        try:
            resp = await self._send(self._upstream(req, plan), on_interim=_relay(req.interim))
        except UpstreamError as exc:
            return self._upstream_failed(plan, exc, fwd)
        response_time = self.clock()
        return await self._answer_unshared(req, plan, key, fwd, resp, request_time, response_time)

    async def _answer_unshared(self, req: ClientRequest, plan: RequestPlan, key: str, fwd: str,
                               resp: UpstreamResponse, request_time: float, response_time: float) -> Reply:
        """Answer one client from a response fetched for it alone; stored (through a flight
        nobody else may join) when it is storable."""
        head = req.head
        store_plan = plan.for_response(resp.status, resp.headers.get("Content-Type"))
        try:
            store_detail, entry = self._store_decision(head, plan, store_plan, key, resp, request_time,
                                                       response_time)
        except BaseException:
            resp.close()
            raise
        if entry is not None:
            async def deliver(flight: Flight) -> None:
                await self._deliver(flight, key, resp, store_detail, entry, response_time)

            flight = self.coalescer.start(f"\x00solo:{id(req)}:{key}", deliver)
            reader = flight.body.join()
            assert reader is not None
            return await self._reply_from_flight(req, plan, key, flight, reader, False, None, fwd, None,
                                                 False)
        if store_detail in PASS_DETAILS:
            self.coalescer.mark_pass(key)
        self.metrics.not_stored_because(store_detail, head.url)
        cs = cache_status(fwd=fwd, fwd_status=resp.status, detail=store_detail)
        return self._direct_reply(plan, resp, "MISS", cs, head.method == "HEAD")

    def _direct_reply(self, plan: RequestPlan, resp: UpstreamResponse, x_cache: str, cs: str,
                      head_only: bool) -> Reply:
        """A reply straight from an upstream response (nothing stored): a small body that has
        already arrived whole goes out as bytes, in one write; any other is streamed."""
        headers = self._response_headers(resp.headers)
        headers.append(("Cache-Status", cs))
        headers.append(("X-Cache-Status", x_cache))
        if head_only or resp.status in (204, 304) or 100 <= resp.status < 200:
            length = resp.content_length if head_only else None
            if resp.complete_body() is None:  # read whole: the connection is reused
                resp.release()
            return self._finish(plan, Reply(resp.status, resp.reason, headers, None, length,
                                            x_cache, "none", head_only=True))
        body = resp.complete_body()
        if body is not None:
            return self._finish(plan, Reply(resp.status, resp.reason, headers, body, len(body),
                                            x_cache, "upstream"))
        return self._finish(plan, Reply(resp.status, resp.reason, headers, resp.iter_chunks(),
                                        resp.content_length, x_cache, "upstream"))

    async def _stored_meanwhile(self, req: ClientRequest, plan: RequestPlan, key: str) -> Reply | None:
        """A reply from the response a flight for ``key`` stored while this request looked on
        disk (in memory now, or being written to disk by this process); None when there is none.

        Without this, a request that missed memory just before a flight ended would find no
        flight after its disk lookup and fetch the key again."""
        writes = self._disk_writes.get(key)
        if writes:
            await asyncio.wait(list(writes), timeout=self.settings.cache.lock_timeout)
            variants: tuple[Cached, ...] | None = await self._load(key)
        else:
            variants = self.storage.memory_get(key)
        if not variants:
            return None
        decision = decide_lookup(req.head, [c.entry.response for c in variants], self.clock(),
                                 plan.options)
        if not isinstance(decision, Serve) or decision.status != "HIT":
            return None
        # A plain hit: it found the response stored, without waiting for anyone's fetch.
        return await self._serve(req, plan, variants[decision.index], "HIT", decision.ttl, decision.age,
                                 decision.not_modified, hit=True)

    async def _serve_after_flight(self, req: ClientRequest, plan: RequestPlan, key: str, fwd: str,
                                  fwd_status: int | None, x_cache: str, collapsed: bool, *,
                                  stored: bool = False, flight: Flight | None = None) -> Reply:
        """Answer from the store once ``flight`` (by default, the key's) has stored its response."""
        flight = flight or self.coalescer.get(key)
        if flight is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(flight.result), self.settings.cache.lock_timeout)
        variants = await self._load(key)
        index = select_variant(req.head, [c.entry.response for c in variants]) if variants else None
        if index is not None:
            cached = variants[index]
            response = cached.entry.response
            now = self.clock()
            reply = await self._serve(
                req, plan, cached, x_cache, response.ttl(now), response.freshness.age(now),
                client_not_modified(req.head.headers, cached.entry.response),
                # RFC 9211: a collapsed request went forward (with the leader's): never "hit".
                hit=x_cache == "HIT" and not collapsed, fwd=fwd, collapsed=collapsed, mark_stored=stored,
                fwd_status=fwd_status if fwd_status is not None else cached.entry.response.status,
            )
            if reply is not None:
                return reply
        return await self._fetch(req, plan, key, None, fwd, None, coalesce=False)

    async def _serve_stale(self, req: ClientRequest, plan: RequestPlan, stale: Cached, fwd: str,
                           fwd_status: int | None, detail: str) -> Reply:
        response = stale.entry.response
        now = self.clock()
        reply = await self._serve(req, plan, stale, "STALE", response.ttl(now), response.freshness.age(now),
                                  client_not_modified(req.head.headers, stale.entry.response),
                                  hit=False, fwd=fwd, fwd_status=fwd_status, detail=detail)
        if reply is None:
            return self._finish(plan, _error_reply(502, "Bad Gateway", "502 Bad Gateway", "MISS",
                                                   cache_status(fwd=fwd, detail=detail)))
        return reply

    def _start_flight(self, req: ClientRequest, plan: RequestPlan, key: str,
                      revalidating: Cached | None, *, register: bool, stale: Cached | None = None,
                      background: bool = False) -> Flight:
        async def run(flight: Flight) -> None:
            if register and self.leases is not None:
                await self._run_leased_flight(flight, req, plan, key, revalidating, stale, background)
            elif register and not background:
                await self._fill(flight, req, plan, key, revalidating, stale)
            else:
                await self._run_flight(flight, req, plan, key, revalidating, stale)

        if register:
            return self.coalescer.start(key, run)
        # An uncoalesced flight (the client asked for the origin, or hit-for-pass):
        # same machinery, not findable by other clients.
        return self.coalescer.start(f"\x00solo:{id(req)}:{key}", run)

    def _refresh_in_background(self, req: ClientRequest, plan: RequestPlan, key: str, cached: Cached) -> None:
        """stale-while-revalidate: one revalidation per key, whoever asks while it runs."""
        if self.coalescer.get(key) is not None:
            return
        flight = self._start_flight(req, plan, key, cached, register=True, background=True)
        del flight  # nobody reads it; it stores or freshens and ends

    async def _run_leased_flight(self, flight: Flight, req: ClientRequest, plan: RequestPlan, key: str,
                                 revalidating: Cached | None, stale: Cached | None,
                                 background: bool) -> None:
        """A flight in a worker of several: fetch under the key's cross-worker lease, or wait for
        the worker that holds it and answer from what it stored (``proxy.leases``)."""
        leases = self.leases
        assert leases is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.cache.lock_timeout
        for _ in range(3):  # a holder that dies hands the lease on: ask again
            lease = await leases.acquire(key, wait=not background)
            match lease:
                case Granted():
                    # Look again first when another worker may have stored it since we looked.
                    if (lease.recent or revalidating is not None) and \
                            await self._answer_from_store(flight, req, plan, key):
                        leases.release(key, lease, "stored")
                        return
                    flight.head.add_done_callback(functools.partial(self._report_head, key, lease))
                    done = False

                    def release(outcome: str, status: int = 0, message: str = "",
                                held: Granted = lease) -> None:
                        nonlocal done
                        if not done:
                            done = True
                            leases.release(key, held, outcome, status, message)

                    # Told the moment the response is on disk, not when the flight ends.
                    flight.on_stored = lambda stored: release("stored" if stored else "failed")
                    try:
                        await self._fill(flight, req, plan, key, revalidating, stale)
                    finally:
                        self._release_lease(flight, release)
                    return
                case Busy():
                    return  # a refresh another worker is already doing
                case Waiting():
                    if background:
                        return
                    try:
                        outcome = await asyncio.wait_for(asyncio.shield(lease.outcome),
                                                         max(0.0, deadline - loop.time()))
                    except TimeoutError:
                        outcome = {"outcome": "timeout"}  # past lock_timeout: fetch on our own
                    finally:
                        leases.forget(key, lease)
                    match outcome["outcome"]:
                        case "stored":
                            if await self._answer_from_store(flight, req, plan, key):
                                return
                        case "error":  # what the holder's own followers get: stale-if-error or the error
                            flight.head.set_exception(_upstream_error(outcome["status"], outcome["message"]))
                            return
                        case "gone" if loop.time() < deadline:
                            continue  # the holder died: one of the waiters takes the lease on
                        case "pass":
                            self.coalescer.mark_pass(key)
                case None:
                    pass  # the broker cannot be asked: fetch for this worker alone
                case _:
                    assert_never(lease)
            break
        await self._fill(flight, req, plan, key, revalidating, stale)

    async def _fill(self, flight: Flight, req: ClientRequest, plan: RequestPlan, key: str,
                    revalidating: Cached | None, stale: Cached | None) -> None:
        """A coalesced flight's fetch. In cluster mode with a shared tier (``proxy.cluster.fills``)
        it asks the other nodes first: what one of them stored is kept here and served; else
        one node in the cluster fetches under the key's fill lock and writes its fill through,
        while the others wait for it (at most ``lock_timeout``, then they fetch here).
        Revalidations stay with each node."""
        shared = self.shared
        if shared is None or revalidating is not None:
            await self._run_flight(flight, req, plan, key, revalidating, stale)
            return
        loop = asyncio.get_running_loop()
        lock_timeout = self.settings.cache.lock_timeout
        deadline = loop.time() + lock_timeout
        lock_only = False
        for _ in range(4):
            epoch = self.storage.epoch
            answer = await shared.lookup(key, max(lock_timeout, 1.0) + 1.0, lock_only)
            match answer:
                case Found():
                    if self.storage.epoch != epoch:
                        continue  # a purge was applied here meanwhile: what was found may be purged
                    if await self._adopt_shared(flight, req, plan, key, answer):
                        return
                    lock_only = True  # stored, but not fresh for this request: fetch under the lock
                case Locked():
                    await self._run_locked_fill(shared, answer, flight, req, plan, key, stale)
                    return
                case Contended():
                    left = deadline - loop.time()
                    outcome = await shared.wait_filled(key, min(left, answer.wait + 0.05)) \
                        if left > 0 else None
                    if outcome not in (None, "stored") or loop.time() >= deadline:
                        break  # not shareable, failed, or waited long enough: fetch here
                case None:
                    break
                case _:
                    assert_never(answer)
        await self._run_flight(flight, req, plan, key, None, stale)

    async def _run_locked_fill(self, shared: SharedCache, lock: Locked, flight: Flight, req: ClientRequest,
                               plan: RequestPlan, key: str, stale: Cached | None) -> None:
        """Fetch under the cluster-wide fill lock; write the fill through, then release the lock
        (which wakes the other nodes' waiters)."""
        writes: list[asyncio.Future[bool]] = []

        def filled(entry: Entry, body: bytes | None) -> None:
            if body is not None and len(body) <= shared.max_object:
                writes.append(asyncio.ensure_future(shared.write(entry, body, lock, self.clock())))

        flight.on_filled = filled
        outcome = "failed"
        try:
            await self._run_flight(flight, req, plan, key, None, stale)
            if writes and await writes[0]:
                outcome = "stored"
        finally:
            await shared.release(key, lock, outcome)

    async def _adopt_shared(self, flight: Flight, req: ClientRequest, plan: RequestPlan, key: str,
                            found: Found) -> bool:
        """End ``flight`` with a variant another node stored in the shared tier, when it is a
        fresh hit for the flight's request: kept in this node's tiers (the same way a fill is),
        then served from them; False when none is."""
        decision = decide_lookup(req.head, [e.response for e, _ in found.variants], self.clock(),
                                 plan.options)
        if not isinstance(decision, Serve) or decision.status != "HIT":
            return False
        entry, body = found.variants[decision.index]
        spool = self.storage.spool(entry, len(body))
        if not await spool.write(body):
            spool.discard()
            return False
        final = self.storage.finalize(entry, spool)
        if final is None:
            return False
        self._stores += 1
        self.coalescer.clear_absent(key)
        in_memory = self.storage.put_memory(final, spool)
        stored = final.response
        flight.head.set_result(FlightHead(stored.status, stored.reason,
                                          CIMultiDictProxy(CIMultiDict(stored.headers)), True,
                                          STORED_ELSEWHERE, final.body_size, stored.vary))
        self.coalescer.retire(flight)
        if flight.on_stored is None and in_memory:
            # In memory now: the flight's clients are answered at once, the disk copy follows.
            flight.body.finish()
            flight.result.set_result(FlightResult(True, STORED_ELSEWHERE))
            await self._put_disk(key, final, spool)
            return True
        # Other workers wait for this key (proxy.leases): they read it from disk, so the flight
        # ends once it is there.
        on_disk = await self._put_disk(key, final, spool)
        flight.body.finish()
        flight.result.set_result(FlightResult(True, STORED_ELSEWHERE if on_disk else "STORE-FAILED"))
        return True

    async def _answer_from_store(self, flight: Flight, req: ClientRequest, plan: RequestPlan,
                                 key: str) -> bool:
        """End ``flight`` with what the shared store now holds for ``key``, when that is fresh
        for the flight's request (another worker stored it); False when it is not."""
        try:
            variants = await self.storage.reread(key)
        except Exception:
            log.exception("storage read failed for %s", key)
            self.metrics.storage_errors.labels("read").inc()
            return False
        decision = decide_lookup(req.head, [c.entry.response for c in variants], self.clock(),
                                 plan.options)
        if not isinstance(decision, Serve) or decision.status != "HIT":
            return False
        cached = variants[decision.index]
        entry = cached.entry
        # Bring a small body into memory once, for every client of the flight.
        if cached.body is None and entry.body_size <= self.storage.memory.max_object \
                and await self._open_body(cached) is None:
            return False
        stored = entry.response
        flight.head.set_result(FlightHead(stored.status, stored.reason,
                                          CIMultiDictProxy(CIMultiDict(stored.headers)), True,
                                          STORED_ELSEWHERE, entry.body_size, stored.vary))
        self.coalescer.retire(flight)
        flight.body.finish()
        flight.result.set_result(FlightResult(True, STORED_ELSEWHERE))
        return True

    def _report_head(self, key: str, lease: Granted, head: asyncio.Future[FlightHead]) -> None:
        """Tell the waiting workers at once when the response turns out not shareable (a
        shareable head changes nothing for them: they wait for the release either way, so it
        costs no message)."""
        if self.leases is None or head.cancelled() or head.exception() is not None:
            return
        h = head.result()
        if not h.shareable:
            self.leases.head(key, lease, h.shareable, h.store_detail in PASS_DETAILS)

    @staticmethod
    def _release_lease(flight: Flight, release: Callable[..., None]) -> None:
        """End a flight's lease with how it went (unless on_stored already did)."""
        error = flight.head.exception() if flight.head.done() and not flight.head.cancelled() else None
        if isinstance(error, UpstreamError):
            release("error", error.status_hint, str(error))
        elif flight.result.done() and not flight.result.cancelled() and flight.result.result().stored:
            release("stored")
        else:
            release("failed")

    async def _run_flight(self, flight: Flight, req: ClientRequest, plan: RequestPlan, key: str,
                          revalidating: Cached | None, stale: Cached | None = None) -> None:
        head = req.head
        request_time = self.clock()

        def interim(status: int, reason: str, fields: CIMultiDictProxy[str]) -> None:
            kept = end_to_end(fields)
            for sink in list(flight.interim):
                sink(status, reason, kept)

        try:
            resp = await self._send(self._upstream(req, plan, revalidating), on_interim=interim)
        except UpstreamError as exc:
            flight.head.set_exception(exc)
            return
        response_time = self.clock()

        # What the answer means for the response held (revalidated, or kept for stale-if-error).
        kept = revalidating or stale
        outcome: ValidationOutcome = Replace() if kept is None else decide_on_validation(
            kept.entry.response, resp.status, resp.headers, response_time,
            conditional=revalidating is not None)
        match outcome:
            case Freshen():
                assert revalidating is not None
                resp.release()
                await self._freshen(revalidating, resp.headers, plan, request_time, response_time, head)
                flight.head.set_result(FlightHead(304, resp.reason, resp.headers, True, "FRESHENED", None))
                self.coalescer.retire(flight)
                flight.body.finish()
                flight.result.set_result(FlightResult(True, "FRESHENED"))
                return
            case Refetch():
                resp.release()
                await self._run_flight(flight, req, plan, key, None, stale)
                return
            case ServeStale():
                # RFC 5861 §4: the stored response stays; the clients decide on stale-if-error.
                store_detail, entry = outcome.detail, None
            case Replace():
                store_plan = plan.for_response(resp.status, resp.headers.get("Content-Type"))
                store_detail, entry = self._store_decision(head, plan, store_plan, key, resp, request_time,
                                                           response_time)
            case _:
                assert_never(outcome)
        await self._deliver(flight, key, resp, store_detail, entry, response_time)

    async def _deliver(self, flight: Flight, key: str, resp: UpstreamResponse, store_detail: str,
                       entry: Entry | None, response_time: float) -> None:
        """A flight's response: its head to the clients, its body to them and to the store."""
        shareable = entry is not None and shareable_with_followers(entry.response, response_time)
        vary = entry.response.vary if entry is not None else ()
        flight.head.set_result(FlightHead(resp.status, resp.reason, resp.headers, shareable,
                                          store_detail, resp.content_length, vary))
        if store_detail in PASS_DETAILS:
            self.coalescer.mark_pass(key)
        if not shareable:
            self.metrics.not_stored_because(store_detail, url_of_key(key))
        spool = None
        if entry is not None:
            self._stores += 1
            self.coalescer.clear_absent(key)
            spool = self.storage.spool(entry, resp.content_length)
        flight.spool = spool
        body = flight.body
        body.storing = spool is not None
        abandoned = ""  # why the store was given up mid-body
        try:
            async for chunk in resp.iter_chunks():
                if spool is not None:
                    abandoned = await self._spool_write(key, spool, chunk)
                    if abandoned:
                        spool = None
                        body.stop_storing()
                if body.readers == 0 and spool is None:
                    resp.close()  # nobody reads it and nothing stores it
                    body.fail(ResponseAborted("no readers"))
                    flight.result.set_result(FlightResult(False, "ABANDONED"))
                    return
                await body.push(chunk)
        except UpstreamError as exc:
            log.warning("upstream body broke off for %s: %s", key, exc)
            if spool is not None:
                spool.discard()
            flight.body.fail(exc)
            flight.result.set_result(FlightResult(False, "UPSTREAM-BROKE-OFF"))
            return
        except BaseException:
            if spool is not None:
                spool.discard()
            resp.close()
            raise
        final = self.storage.finalize(entry, spool) if spool is not None and entry is not None else None
        if final is None or spool is None:
            self.coalescer.retire(flight)
            flight.body.finish()
            flight.result.set_result(FlightResult(False, store_detail or abandoned or "INCOMPLETE"))
            return
        # Visible in memory before the last reader sees the end of the body, so the
        # client's next request is a hit; the disk copy follows.
        self.storage.put_memory(final, spool)
        self.metrics.fills.inc()
        if flight.on_filled is not None:
            flight.on_filled(final, spool.body_bytes())
        self.coalescer.retire(flight)
        if flight.on_stored is not None and spool.body_bytes() is not None:
            # Other workers wait for this key (proxy.leases): a small body goes to disk before
            # this worker's own followers take the CPU, and they hear of it at once; then both
            # workers answer their clients at the same time.
            on_disk = await self._put_disk(key, final, spool)
            flight.on_stored(on_disk)
            flight.body.finish()
        else:
            flight.body.finish()
            on_disk = await self._put_disk(key, final, spool)
            if flight.on_stored is not None:
                flight.on_stored(on_disk)
        if on_disk:
            self.coalescer.clear_pass(key)
        self.coalescer.clear_absent(key)
        flight.result.set_result(FlightResult(on_disk, "" if on_disk else "STORE-FAILED", final))

    async def _spool_write(self, key: str, spool: BodySpool, chunk: bytes) -> str:
        """Spool a chunk of a body being stored; "" while it is kept, else why the store is
        given up (the clients still get the whole body): TOO-LARGE, or STORE-FAILED when the
        write failed (a full disk: counted, logged once per streak, in /stats)."""
        try:
            if await spool.write(chunk):
                return ""
            reason = "TOO-LARGE"
        except Exception as exc:
            spool.discard()
            self.write_failures.failed("spool", key, exc)
            reason = "STORE-FAILED"
        self.metrics.not_stored_because(reason, url_of_key(key))
        return reason

    async def _put_disk(self, key: str, final: Entry, spool: BodySpool) -> bool:
        writing: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._disk_writes.setdefault(key, set()).add(writing)
        try:
            stored = await self.storage.put_disk(final, spool)
        except Exception as exc:
            self.write_failures.failed("write", key, exc)
            return False
        finally:
            writing.set_result(None)
            pending = self._disk_writes.get(key)
            if pending is not None:
                pending.discard(writing)
                if not pending:
                    del self._disk_writes[key]
        if stored:
            self.write_failures.succeeded()
        return stored

    def _store_decision(self, head: RequestHead, plan: RequestPlan, store_plan: StorePlan, key: str,
                        resp: UpstreamResponse, request_time: float, response_time: float
                        ) -> tuple[str, Entry | None]:
        return self._filled(key, store_plan, Exchange(head, resp.status, resp.reason, resp.headers,
                                                      request_time, response_time))

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

    async def _freshen(self, cached: Cached, update: CIMultiDictProxy[str], plan: RequestPlan,
                       request_time: float, response_time: float, head: RequestHead) -> None:
        """RFC 9111 §4.3.4: update the stored headers and freshness from a 304; the body stays."""
        entry = cached.entry
        old = entry.response
        content_type = update.get("Content-Type") or old.header_dict().get("Content-Type")
        store_plan = plan.for_response(old.status, content_type)
        updated = freshened(old, Exchange(head, 304, "", update, request_time, response_time), store_plan,
                            self._fill_settings, jitter=self._random.random())
        try:
            if updated is None:  # the 304 said no-store or private: forget the stored response
                await self.storage.delete([entry.key])
            else:
                await self.storage.update(entry.with_response(updated))
        except Exception as exc:
            self.write_failures.failed("write", entry.key, exc)

    # -- finishing ---------------------------------------------------------------------------

    def _finish(self, plan: RequestPlan, reply: Reply) -> Reply:
        """Apply the rule's response_headers (chosen by the reply's status and type) for the client."""
        edits = response_edits(plan, reply.status, reply.headers)
        if edits:
            reply.headers = edits.apply(reply.headers)
        return reply


def response_edits(plan: RequestPlan, status: int, headers: Sequence[tuple[str, str]]
                   ) -> HeaderEdits | None:
    """The rule's response_headers for a reply with this status and these fields."""
    if plan.response_rules:
        ctype = next((v for k, v in headers if k.lower() == "content-type"), None)
        return plan.response_headers_for(status, ctype)
    return plan.response_headers


PART_SUFFIX = "\x1fpart"


def part_key(key: str) -> str:
    """Where the parts (206 responses) of a key's representations are stored: an entry of
    its own beside the key's, so the hit path and storage never meet a part by accident."""
    return key + PART_SUFFIX


def whole_key(key: str) -> str:
    return key.removesuffix(PART_SUFFIX)


def _relay(sink: InterimSink | None) -> InterimHook | None:
    """The upstream client's hook for one client's interim responses: their end-to-end fields
    only (RFC 9110 §15.2: a proxy forwards 1xx responses, hop-by-hop fields aside)."""
    if sink is None:
        return None

    def relay(status: int, reason: str, fields: CIMultiDictProxy[str]) -> None:
        sink(status, reason, end_to_end(fields))

    return relay


def _upstream_error(status: int, message: str) -> UpstreamError:
    """The error another worker's fetch of the same key met, as this worker's own."""
    cls = {503: NoUpstreamAvailable, 504: UpstreamTimeout}.get(status, UpstreamConnectError)
    return cls(f"{message} (fetched by another worker)")


async def _broken(exc: BaseException) -> AsyncIterator[bytes]:
    """A body that fails at once (the web layer then aborts the client's connection)."""
    raise exc
    yield b""  # pragma: no cover  (makes this an async generator)


def _close(body: Body) -> None:
    if body is not None and not isinstance(body, bytes) and hasattr(body, "close"):
        body.close()


__all__ = ["ClientRequest", "Engine", "Reply", "StorageError", "StoredResponse", "response_edits",
           "served_headers"]
