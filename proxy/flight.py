"""The miss path: a request the store cannot answer, fetched once in a flight that ends one way.

The engine hands a miss or a revalidation here as one frozen ``Attempt`` (the client's
request, its rule plan, the key, why it went forward, the stored responses it may fall back
on). ``MissPath.fetch`` then takes one of three ways:

- the key is hit-for-pass: the request goes to the origin in its own task, no flight;
- a flight for the key is under way: the client joins it as a *follower*;
- else the client starts one and is its *leader* (a stale-while-revalidate refresh starts one
  with no client at all; a range miss that asks the origin for its range first *holds* one,
  which fetches the whole object once that range's 206 turns out storable: ``hold``).

A flight's task goes through at most four states, each a method below:

    lease (workers)  ->  shared tier (cluster)  ->  origin  ->  deliver
    _leased              _fill / _adopt_shared     _origin     _deliver

and ends with exactly one ``FlightOutcome`` (the classes below, named after what happened):
``Filled``, ``Freshened``, ``Passed``, ``BrokeOff``, ``Abandoned``, ``Unreachable``,
``Adopted``, ``StoredElsewhere``, ``Dispersed``, ``Skipped``, ``Stopped`` or ``Aborted``.
``MissPath._end`` is the one place a flight ends: it matches the outcome (closed with
``assert_never``) and, once per flight, releases the cross-worker lease with how it went, ends
the broadcast (clients get the end of the body or its error), sets the flight's result (what
detached readers finish from), and counts the outcome (``cachegate_flights_total``). The task
is wrapped so that a flight that raises or is cancelled ends there too, as ``Aborted``: no exit
path can forget the lease, the readers or the count.

Each client is then answered from its flight by ``MissPath.answer`` (the leader and each
follower alike). What it does once the flight has its head is a pure function of that head
and its request, ``after_head``: answer from the store when the flight's response is there
whole already (``FromStore``: another worker stored it, or a 304 freshened it),
stale-if-error (``StaleInstead``), fetch for itself (``OnItsOwn``), the flight's response,
head only, whole or streamed (``Relay``), or, for a client with conditionals or a range the
fill did not send, the answer to them from the flight's head (``FromHead``: a 304, a 412, a
416, a 206 sliced from the body as it arrives; else the ``Relay``). A flight that gets no head
is another pure function's, ``fetches_again``: a follower fetches once more (the leader's
request may be what the origin failed on), or takes the error. A client never waits for
the store while its own flight is still delivering, and never fetches the object again
because that took long. What followers may be given,
and what slow readers get, is the coalescer's contract (``proxy.coalescer``'s module
docstring): it is carried out here.

What is decided stays in ``proxy.policy`` (``decide_fill``, ``decide_on_validation``,
``decide_lookup``, ``reply_head``, ``upstream_request``); this module only carries those
decisions out against the coalescer (``proxy.coalescer``), the leases (``proxy.leases``),
the shared tier (``proxy.cluster.fills``) and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import IO, TYPE_CHECKING, ClassVar, Literal, assert_never

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cluster.fills import (
    NOT_SHARED,
    STORED,
    TOO_LARGE,
    Contended,
    Found,
    Locked,
    SharedCache,
    WriteThrough,
)
from proxy.coalescer import (
    BodyView,
    Coalescer,
    FellBehind,
    Flight,
    FlightHead,
    FlightResult,
    SpoolFollower,
    TooFarBehind,
    cut_off,
)
from proxy.errors import (
    NoUpstreamAvailable,
    OutOfResources,
    ProxyStopping,
    ResponseAborted,
    UnaskedPartial,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    first_report,
)
from proxy.http_client import UpstreamBodyError
from proxy.leases import Busy, Granted, Waiting
from proxy.policy.cache_status import cache_status, forwarded_ttl, forwarded_x_cache, settled
from proxy.policy.fields import ends_at_head
from proxy.policy.fill import arrived, hit_for_pass, shareable_with_followers, stored_for_waiters
from proxy.policy.freshness import carries_credentials
from proxy.policy.headers import dated, end_to_end, shared_interim
from proxy.policy.keys import url_of_key, variant_of
from proxy.policy.messages import HeaderList, RequestHead, StoredResponse
from proxy.policy.partial import other_representation
from proxy.policy.ranges import RangeSpec
from proxy.policy.reply import (
    AsArrives,
    NotModified,
    PreconditionFailed,
    Send,
    Unsatisfiable,
    reply_on_arrival,
)
from proxy.policy.reuse import Serve, decide_lookup, refresh_retry_at, select_variant
from proxy.policy.validation import (
    Freshen,
    Refetch,
    Replace,
    ServeStale,
    UnstoredAnswer,
    ValidationOutcome,
    asks_validation,
    client_not_modified,
    decide_on_validation,
    origin_error,
    supersedes_stored,
)
from proxy.replies import Body, ClientRequest, Reply, error_reply, relay, upstream_detail
from proxy.storage.entry import Entry
from proxy.storage.memory import Cached
from proxy.storage.tiered import BodySpool
from proxy.upstream import UpstreamResponse

if TYPE_CHECKING:
    from proxy.engine import Engine
    from proxy.metrics import CounterChild
    from proxy.rules import RequestPlan

log = logging.getLogger("cachegate.engine")

# Followers of a flight whose body is at most this big get it whole, in one write; so
# does the client that started the flight, for bodies up to WHOLE_FOR_LEADER.
WHOLE_FOR_FOLLOWERS = 256 * 1024
WHOLE_FOR_LEADER = 64 * 1024
# A flight answered from what another worker (proxy.leases) or node (proxy.cluster) stored.
STORED_ELSEWHERE = "STORED-ELSEWHERE"
STORED_CHUNK = 256 * 1024  # reads of a stored body for a client that fell behind its fill
# Seconds a 206 sliced from a response that is not stored (``MissPath._unstored_from_head``,
# ``_slice`` of a flight not storing its body) holds its head back for the range's first
# bytes; then the head goes out and the skip to the range's offset reads on with beats
# (``_sliced``). Only a write tells a client that closed its socket from one that half-closed
# it and waits (its FIN is the same): the head is that write, answered by a reset, and the
# writer stops the download at the next beat. Without it, a far range of a big unstored body
# (2.5 MB at 100 KB/s: 25 s) was downloaded for nobody up to its offset after the client had
# gone. One second keeps the clean 502 of an origin that fails at once.
SLICE_HEAD_WAIT = 1.0


@dataclass(frozen=True, slots=True)
class Attempt:
    """One client's miss (or revalidation), as the engine's lookup left it."""

    req: ClientRequest
    plan: RequestPlan
    key: str
    fwd: str  # why it went forward: the Cache-Status ``fwd`` (uri-miss, stale, request, ...)
    revalidating: Cached | None = None  # the stored response a conditional request revalidates
    stale: Cached | None = None  # the stored response stale-if-error may serve instead of an error
    coalesce: bool = True  # False: fetch for this client alone (it asked for the origin, or gave up waiting)
    stale_prohibited: bool = False  # a stored response that may not be served stale (RFC 9111 §5.2.2.2)
    # The lookup found the key nowhere (memory, the disk's directory, this process's disk
    # writes) in the same step: there is nothing stored meanwhile to look for (``fetch``).
    nowhere: bool = False
    # Fetched alone after a flight left nothing for it (``MissPath._serve_after_flight``): at most once.
    refetched: bool = False
    # Fetched again, in a flight of its own or one it joined, after the fetch of the flight it
    # had joined failed (``fetches_again``): at most once; that flight's failure is its own.
    again: bool = False
    # A range miss that joined the key's whole fill (``proxy.policy.partial.JoinFill``): should
    # it have to fetch on its own after all, it asks for this range, not the whole object.
    part: RangeSpec | None = None

    def alone(self) -> Attempt:
        """The same request fetched for this client alone, without joining anyone's flight
        (after waiting for one: what its lookup found is no longer what is stored)."""
        return replace(self, coalesce=False, nowhere=False)


# -- how a flight ends ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Filled:
    """The response is stored: in memory as its body ended, on disk (``on_disk``) behind it."""

    label: ClassVar[str] = "filled"

    entry: Entry
    on_disk: bool


@dataclass(frozen=True, slots=True)
class Freshened:
    """The origin answered the revalidation 304: the stored response's headers were updated."""

    label: ClassVar[str] = "freshened"

    entry: Entry  # the variant revalidated (its body stays: the freshened copy has its body id)


@dataclass(frozen=True, slots=True)
class Passed:
    """The clients got the whole response; it was not stored (``detail``: why, as Cache-Status says)."""

    label: ClassVar[str] = "passed"

    detail: str


@dataclass(frozen=True, slots=True)
class BrokeOff:
    """The origin's body broke off: the clients' bodies fail (never ended as if complete), nothing
    stored. Also when it broke off in the same read as its head (the head never reached the
    clients), or in the fetch of the worker holding the key's lease: the clients without a head
    get the error, or stale-if-error, as for ``Unreachable`` (``failed_fetch``)."""

    label: ClassVar[str] = "broke_off"

    error: UpstreamError


@dataclass(frozen=True, slots=True)
class Abandoned:
    """Every client went away and nothing stored the body: the fetch stopped."""

    label: ClassVar[str] = "abandoned"


@dataclass(frozen=True, slots=True)
class Unreachable:
    """No response head: the origin failed (or so did the fetch of the worker holding the lease)."""

    label: ClassVar[str] = "unreachable"

    error: UpstreamError


@dataclass(frozen=True, slots=True)
class Adopted:
    """A variant another node stored in the cluster's shared tier, kept here and served: a
    fresh one, or the one its fill stored while this flight waited for it (``stored_for_waiters``)."""

    label: ClassVar[str] = "adopted"

    entry: Entry | None = None  # what is kept here (its clients are answered from it)
    on_disk: bool = True  # False: the disk write failed (known only when other workers waited for it)


@dataclass(frozen=True, slots=True)
class StoredElsewhere:
    """Another worker fetched and stored it (its lease): the clients are answered from the store."""

    label: ClassVar[str] = "stored_elsewhere"

    entry: Entry | None = None  # what they are answered from (``stored_for_waiters`` chose it)


@dataclass(frozen=True, slots=True)
class Dispersed:
    """The worker holding the key's lease got a response head that may not be shared (its
    word, ``pass`` or ``unshareable``): every client of the flight goes upstream on its own at
    once, as that worker's own followers do. Fetching here first only had them wait for one
    more head that said the same. ``status``: that head's, when its response was not stored
    (else 0): an origin error has the clients with a stale response serve it instead, as that
    worker's own followers do (``when_dispersed``)."""

    status: int = 0
    label: ClassVar[str] = "dispersed"


class GoAlone(ConnectionError):
    """A flight's clients are to fetch each on its own, or serve stale-if-error (``Dispersed``,
    ``when_dispersed``). A ConnectionError: what waits for the flight otherwise takes it as a
    flight that ended without a head."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Skipped:
    """Nothing fetched here: a background refresh that another worker is already doing, or a
    fill held for a range whose answer said not to fetch the whole object (``MissPath.hold``)."""

    label: ClassVar[str] = "skipped"


@dataclass(frozen=True, slots=True)
class Stopped:
    """The proxy is stopping: its stop's deadline cut the flight off (``Coalescer.close``), or
    the worker holding the key's lease was cut off so. Its clients are answered as for a fetch
    that failed before its head, with ``error`` (503) or stale-if-error: the origin did nothing
    wrong, so no origin error is logged or counted."""

    label: ClassVar[str] = "stopped"

    error: ProxyStopping


@dataclass(frozen=True, slots=True)
class Aborted:
    """The flight's task raised or was cancelled (a shutdown, a bug): its clients' bodies fail."""

    label: ClassVar[str] = "aborted"


FlightOutcome = (Filled | Freshened | Passed | BrokeOff | Abandoned | Unreachable | Adopted
                 | StoredElsewhere | Dispersed | Skipped | Stopped | Aborted)


def failed_fetch(error: UpstreamError) -> BrokeOff | Unreachable:
    """How a flight whose fetch failed without a head for its clients ends: ``BrokeOff`` when
    the origin's body failed (``UpstreamError.in_body``: it broke off in the read that brought
    its head, or broke off or fell silent in the fetch of the worker holding the lease, whose
    error this worker was told), else ``Unreachable``. One origin fetch whose body failed was
    ``broke_off`` in the holder and ``unreachable`` in each worker waiting for it."""
    return BrokeOff(error) if error.in_body else Unreachable(error)


@dataclass(slots=True)
class _Run:
    """One flight's task: what it fetches, and what must happen once, when it ends."""

    attempt: Attempt
    flight: Flight
    background: bool = False  # nobody waits for it (a stale-while-revalidate refresh)
    register: bool = True  # findable by the key's other clients (``MissPath.start``)
    lease: Granted | None = None  # the cross-worker lease it holds (proxy.leases)
    # Cluster mode: the fill under the cluster's fill lock (``_locked_fill``): told of the head,
    # of a body past what is shared, and of the stored entry and its body (when in memory) as
    # soon as the fill is complete, to write it through to the shared tier.
    through: WriteThrough | None = None
    # A held fill's: the part its range just got from the origin (``Whole``). What is stored
    # elsewhere of another representation is not taken for it (``_adopt_shared``).
    after: StoredResponse | None = None
    outcome: FlightOutcome | None = field(default=None)  # set once, by ``_end``
    retry_after: str | None = None  # the origin's Retry-After, for a refresh that failed


class MissPath:
    """The miss path of one engine: its flights, and the clients' answers from them."""

    def __init__(self, engine: Engine) -> None:
        # The engine, not copies of its parts: tests swap its clock, and a worker sets its
        # leases and shared tier after start. The coalescer is the one part kept here: the
        # engine makes it before this and never replaces it, and a property asked seven times
        # per fill was seven Python-level calls (``scripts/bench-calls``).
        self.engine = engine
        self.coalescer: Coalescer = engine.coalescer
        # cachegate_flights' child per outcome label, looked up once (``_end``).
        self._flight_counts: dict[str, CounterChild] = {}

    # -- a client's way in ---------------------------------------------------------------------

    async def fetch(self, attempt: Attempt) -> Reply:
        """Join the key's flight, or start one, and answer this client from it."""
        key = attempt.key
        coalesce = attempt.coalesce
        passing = coalesce and self.coalescer.is_pass(key)
        if passing and attempt.revalidating is None and attempt.stale is None:
            return await self.forward_passing(attempt)
        flight = self.coalescer.get(key) if coalesce and not passing else None
        joined: int | None = None  # the store's purge epoch, when purges came since its request
        if flight is not None:
            # Purged while in flight: what it carries must not be served anew to a client that
            # came after the purge (its own clients, those who came before, still get it).
            spool, sent = flight.spool, flight.epoch
            if spool is not None:
                if spool.doomed:  # (its head has come: its tags were known to the purges)
                    flight = None
            elif sent is not None:
                joined = self.engine.storage.joining(sent, key)
                if joined is None:  # a purge since names the key: decided without its tags
                    flight = None
                elif joined == sent:
                    joined = None  # no purge since: nothing to ask at the head
        elif coalesce and not passing and not attempt.nowhere:
            reply = await self._stored_meanwhile(attempt)
            if reply is not None:
                return reply
        collapsed = False
        if flight is not None:
            reader = flight.body.join()
            if reader is None:
                # Too late to stream this flight from its first byte in memory: read it from
                # the flight's spool file as it is written, or else wait until it is stored.
                late = self._follower(flight)
                if late is None:
                    return await self._serve_after_flight(attempt, None, "HIT", True, flight, own=False)
                flight.followers += 1
                return await self.answer(attempt, flight, late, True)
            flight.followers += 1
            if attempt.part is None:
                flight.whole_followers += 1
            collapsed = True
        if flight is None:
            # A hit-for-pass key's fetch is nobody else's to join (nor to hold a lease for).
            flight = self.start(attempt, register=coalesce and not passing)
            flight.led()
            reader = flight.body.join()
        assert reader is not None
        interim = attempt.req.interim
        if interim is not None and not flight.head.done():
            flight.interim.append(interim)  # the origin's 1xx, until the head arrives
        return await self.answer(attempt, flight, reader, collapsed, joined)

    def _follower(self, flight: Flight) -> SpoolFollower | None:
        """A late client's reader of the flight's spool file, while the flight stores its body
        in one and has its head (``SpoolFollower``); else None."""
        spool = flight.spool
        if spool is None or not flight.body.storing or not flight.head.done() or flight.body.ended:
            return None
        if spool.expected_length is None or spool.reserved < spool.expected_length:
            # A body whose length is not known, or whose room is not held for all of it, may
            # give the store up mid-body (too large, no room): a client reading the spool would
            # then be cut off, where waiting lets it fetch for itself (a reviewer's chunked 12 MB
            # over a 4 MB max_object). Only a write that fails (a full disk) can still do that.
            return None
        fd = spool.follow()
        if fd is None:
            return None
        run = self.engine.storage.run
        return SpoolFollower(flight.body, fd, lambda f, n, at: run(os.pread, f, n, at))

    def start(self, attempt: Attempt, *, register: bool, background: bool = False) -> Flight:
        """Start a flight for ``attempt``: findable by the key's other clients when ``register``
        (else the same machinery that nobody can join: the client asked for the origin, or
        hit-for-pass)."""

        return self._launch(attempt, register, background, self._fly)

    def _fly(self, run: _Run) -> Awaitable[None]:
        """A flight's fetch: under the key's lease (workers), through the shared tier (a
        coalesced fill in cluster mode), or straight from the origin. (The state's coroutine,
        awaited by the flight's task: a coroutine of its own here was resumed, a Python-level
        call, at every step the flight waits, ``scripts/bench-calls``; so is ``_fill``.)"""
        register = run.register
        if register and self.engine.leases is not None:
            return self._leased(run)
        if register and not run.background:
            return self._fill(run)
        return self._origin(run, run.attempt.revalidating)

    def hold(self, attempt: Attempt, lease: Granted | None = None) -> HeldFill:
        """The key's fill, registered now for a range miss that asks the origin for its range
        first (``proxy.policy.partial.FetchRange(lead=True)``), and held until that answer
        says what it does (``HeldFill.say``). Meanwhile the key's other misses wait for it
        (their range sliced from its body) rather than each going to the origin: one range and
        one whole fetch for a herd of them; their ``lock_timeout`` for its head begins once it
        is told (``Flight.held``, ``answer``). ``lease``: the key's cross-worker lease, taken
        for it before the range went out (``Engine._range_miss``), held until the fill ends:
        the other workers' misses of the key wait for it as for any fill."""
        word: asyncio.Future[HeldWord] = asyncio.get_running_loop().create_future()

        async def fly(run: _Run) -> None:
            run.lease = lease  # released by ``_end``, however the fill ends
            said = await word
            match said:
                case Whole() | "drop" if isinstance(said, Whole) or run.flight.whole_followers:
                    if isinstance(said, Whole):
                        run.after = said.part
                    # ``Whole``: the object follows the range; "drop" with misses for the whole
                    # object behind it (the range's answer, a 416 or a part not to store, says
                    # nothing of the object): their one whole fetch, not one each (ranges alone
                    # ask each for its own: ``range_alone``). It waits for another worker's
                    # lease as theirs would: as a background fill it skipped it, and each of them
                    # then fetched the whole object alone. Holding the lease already, it
                    # looks in the store first, as a holder does (``_leased``), then fetches.
                    if run.lease is not None:
                        if not await self._answer_from_store(run):
                            await self._fill(run)
                    else:
                        await self._fly(run)
                    self._whole_failed(run)
                case Delivery():
                    await self._deliver(run, said.resp, said.store_detail, said.entry, said.response_time,
                                        said.epoch)
                case UpstreamError():
                    self._end(run, failed_fetch(said))
                case "drop":
                    self._end(run, Skipped())
                case _:
                    assert_never(said)

        flight = self._launch(attempt, True, False, fly)
        flight.held = word  # its followers' wait for the head begins once it is told (``answer``)
        return HeldFill(flight, word)

    async def shared_holds(self, attempt: Attempt) -> bool:
        """Whether the cluster's shared tier holds a variant fresh for ``attempt``'s request,
        looked up without taking the key's fill lock: a range miss is then answered through
        the key's fill, which adopts it (kept here, the range sliced from it), rather than
        from the origin (what one node fetched the others serve, ranges too)."""
        engine = self.engine
        shared, cluster = engine.shared, engine.cluster
        if shared is None or (cluster is not None and cluster.invalidations_pending):
            return False
        found = await shared.lookup(attempt.key, 0.0)
        if not isinstance(found, Found):
            return False
        decision = decide_lookup(attempt.req.head, [e.response for e, _ in found.variants], engine.clock(),
                                 attempt.plan.options)
        return isinstance(decision, Serve) and decision.status == "HIT"

    def _whole_failed(self, run: _Run) -> None:
        """A held fill's whole fetch that the origin answered with a 206 (``UnaskedPartial``: it
        sends one to every request of the URL, one without Range too). Said once per failed
        fetch (``first_report``: nobody else may; a fetch behind a range often has no client
        of its own) and the key marked hit-for-pass (``cache.hit_for_pass``): its next range
        misses ask the origin for their range alone (``decide_range_fetch``), where each one
        sent a whole fetch after its range that failed as this one did, silently. Hit-for-pass
        rather than a mark of its own: it is what the code already says of a key whose whole
        response cannot be cached, and its plain requests, which such an origin fails all the
        same, go straight through until it expires or a storable answer ends it."""
        outcome = run.outcome
        if not isinstance(outcome, Unreachable) or not isinstance(outcome.error, UnaskedPartial):
            return
        key = run.attempt.key
        self.coalescer.mark_pass(key)
        if first_report(outcome.error):
            passing = self.engine.settings.cache.hit_for_pass
            then = f"; hit-for-pass for {passing:g}s: its ranges go to the origin alone" if passing else ""
            self.engine.warn_upstream(log, outcome.error, "upstream failed: %s (the whole fetch of %s "
                                      "behind a range%s)", outcome.error, key, then)

    async def answer_held(self, held: HeldFill, attempt: Attempt, resp: UpstreamResponse,
                          request_time: float, response_time: float, epoch: int) -> Reply:
        """Answer the client holding ``held`` from the whole 200 its range got (the origin
        ignored Range): delivered through the held fill, so the key's clients waiting for it get
        it too, and stored when it may be (as ``answer_unshared`` does for a client alone)."""
        if not held.waiting:  # the fill is gone (a stop cancelled it): answered alone
            return await self.answer_unshared(attempt, resp, request_time, response_time, epoch)
        try:
            store_detail, entry = self.engine.fill_decision(attempt, resp, request_time, response_time)
        except BaseException:
            resp.close()
            raise
        flight = held.flight
        reader = flight.body.join()
        assert reader is not None
        flight.led()
        held.say(Delivery(resp, store_detail, entry, response_time, epoch))
        # Answered as its leader: no stale to fall back on.
        return await self.answer(Attempt(attempt.req, attempt.plan, attempt.key, attempt.fwd), flight, reader,
                                 False)

    async def _fetch_alone(self, attempt: Attempt) -> Reply:
        """Fetch for this client alone, after waiting for a flight that was not its to share (or
        went away): its range when it came to the flight as a range miss, else the object."""
        if attempt.part is not None:
            return await self.engine.range_alone(attempt)
        return await self.fetch(attempt.alone())

    def refresh(self, attempt: Attempt) -> None:
        """stale-while-revalidate: one revalidation per key, whoever asks while it runs, and
        none for a while after one failed (``_refresh_failed``): a failing origin is not asked
        again at every request the stale response answers."""
        key, coalescer = attempt.key, self.coalescer
        if coalescer.get(key) is None and (attempt.revalidating is None or self.refresh_held_back(
                key, attempt.revalidating.entry.tags) is None):
            self.start(attempt, register=True, background=True)  # nobody reads it: it ends alone

    def refresh_held_back(self, key: str, tags: Collection[str]) -> float | None:
        """For how many seconds more a stale-while-revalidate refresh under ``key`` (of a
        response with ``tags``) waits after one failed (``_refresh_failed``); None: it may start.
        A purge since the failure that covers it (an operator's soft purge once the origin is
        mended, one by its tag) lifts the wait: the purge log says, as it does for fills
        (``Storage.purged_since``).
        Asked by ``GET /explain`` too, so it says what the next request would do."""
        held = self.coalescer.refresh_held_back(key)
        if held is None:
            return None
        left, since = held
        if self.engine.storage.purged_since(since, key, tags):
            self.coalescer.refresh_ok(key)
            return None
        return left

    def soft_refresh_failed(self, key: str, tag_sets: Iterable[Collection[str]]) -> bool:
        """Whether a background refresh of the soft-purged response under ``key`` failed in this
        worker since the purge (``proxy.policy.reuse.decide_lookup``'s input of that name): it is
        then served stale only within its own windows. ``tag_sets``: the tags of the responses
        stored under the key; a purge since the failure that covers one of them lifts it (the
        operator's soft purge once the origin is mended: its first request is served the old
        copy at once again while one refreshes it), as it lifts the refresh's wait
        (``refresh_held_back``). Asked by ``GET /explain`` too."""
        since = self.coalescer.soft_failed_at(key)
        if since is None:
            return False
        storage = self.engine.storage
        if any(storage.purged_since(since, key, tags) for tags in tag_sets):
            self.coalescer.refresh_ok(key)
            return False
        return True

    def _refresh_failed(self, run: _Run) -> None:
        """A background refresh ended with the stale response still as it was (no answer, an
        error, a 304 it did not ask for, an answer not stored): the key's next refresh waits
        (``proxy.policy.reuse.refresh_retry_at``). Per worker: with N workers, at most N
        refreshes a while. A soft-purged response is served stale only within its own windows
        from then on (``soft_refresh_failed``): per worker too, so each worker serves it at once
        until its own refresh of it has failed."""
        stale = run.attempt.revalidating or run.attempt.stale
        if stale is None:
            return
        now = self.engine.clock()
        # (The wait is decided on the engine's clock, as the response's windows are, and kept
        # by the coalescer as a while of monotonic time: ``Coalescer.refresh_failed``.)
        wait = refresh_retry_at(stale.entry.response, now, run.retry_after) - now
        # (The epoch when its request went out: a purge during the refresh lifts the wait too.)
        epoch = run.flight.epoch
        self.coalescer.refresh_failed(run.attempt.key, wait,
                                      self.engine.storage.epoch if epoch is None else epoch,
                                      soft=stale.entry.response.invalidated)

    def _launch(self, attempt: Attempt, register: bool, background: bool,
                fly: Callable[[_Run], Awaitable[None]]) -> Flight:
        async def task(flight: Flight) -> None:
            run = _Run(attempt, flight, background, register)
            flight.again = attempt.again
            try:
                await fly(run)
            finally:
                # Not ended by its states (it raised, or was cancelled): cut off by the stop, the
                # stop's own error. (Asked here, not by ``_end``'s own test: a fill's outcome and
                # the call were built for nothing, ``scripts/bench-calls``.)
                if run.outcome is None:
                    self._end(run, Stopped(cut_off()) if self.coalescer.closing else Aborted())

        name = attempt.key if register else f"\x00solo:{id(attempt.req)}:{attempt.key}"
        return self.coalescer.start(name, task)

    # -- the one place a flight ends -------------------------------------------------------------

    def _end(self, run: _Run, outcome: FlightOutcome) -> None:
        """End ``run``'s flight with ``outcome``; only the first call counts.

        In this order: the lease is released (other workers read the fill from the store: they
        hear of it before this worker's own readers take the CPU), the broadcast ends, the
        flight's result is set, the outcome is counted."""
        if run.outcome is not None:
            return
        run.outcome = outcome
        flight = run.flight
        coalescer = self.coalescer
        self._release(run, outcome)
        result: FlightResult
        # Whatever is stored under the key now (this outcome's result.stored, or a fill however
        # its disk write went) has the key's requests look again: ``forget_unlooked`` (the
        # attempt's key: a flight nobody may join has a name of its own).
        match outcome:
            case Filled(entry=entry, on_disk=on_disk):
                self.engine.metrics.fills.inc()
                flight.body.finish()
                if on_disk:
                    coalescer.clear_pass(run.attempt.key)  # (forgets the unlooked mark too)
                else:
                    coalescer.forget_unlooked(run.attempt.key)
                result = FlightResult(on_disk, "" if on_disk else "STORE-FAILED", entry)
            case Freshened(entry=entry):
                coalescer.retire(flight)
                flight.body.finish()
                coalescer.forget_unlooked(run.attempt.key)
                result = FlightResult(True, "FRESHENED", entry)
            case Passed(detail=detail):
                coalescer.retire(flight)
                flight.body.finish()
                result = FlightResult(False, detail)
            case BrokeOff(error=error):
                flight.fail_head(error)  # (nothing when its head came: ``failed_fetch``)
                flight.body.fail(error)
                result = FlightResult(False, "UPSTREAM-BROKE-OFF")
            case Abandoned():
                flight.body.fail(ResponseAborted("no readers"))
                result = FlightResult(False, "ABANDONED")
            case Unreachable(error=error):
                flight.fail_head(error)
                flight.body.fail(ResponseAborted("the fetch ended before its body did"))
                result = FlightResult(False, "UNREACHABLE")
            case Adopted(entry=entry, on_disk=on_disk):
                coalescer.retire(flight)
                flight.body.finish()
                coalescer.forget_unlooked(run.attempt.key)
                # (its entry: the flight's clients are answered from it, fresh or not:
                # ``_serve_after_flight``)
                result = FlightResult(True, STORED_ELSEWHERE if on_disk else "STORE-FAILED", entry)
            case StoredElsewhere(entry=entry):
                coalescer.retire(flight)
                flight.body.finish()
                coalescer.forget_unlooked(run.attempt.key)
                result = FlightResult(True, STORED_ELSEWHERE, entry)
            case Stopped(error=error):
                flight.fail_head(error)
                flight.body.fail(ResponseAborted("the fetch was cut off by the stop before its body ended"))
                result = FlightResult(False, "ABORTED")
            case Dispersed(status=status):
                flight.fail_head(GoAlone("another worker's response may not be shared", status))
                flight.body.fail(ResponseAborted("the fetch ended before its body did"))
                result = FlightResult(False, "NOT-SHAREABLE")
            case Skipped() | Aborted():
                flight.fail_head(ConnectionError("flight ended without a response"))
                flight.body.fail(ResponseAborted("the fetch ended before its body did"))
                result = FlightResult(False, "ABORTED")
            case _:
                assert_never(outcome)
        if not flight.result.done():
            flight.result.set_result(result)
        if result.stored:
            coalescer.refresh_ok(run.attempt.key)  # (any fill: a new response, its own window)
        elif run.background:
            match outcome:
                case Passed() | BrokeOff() | Abandoned() | Unreachable() | Dispersed():
                    self._refresh_failed(run)
                case Filled() | Freshened() | Adopted() | StoredElsewhere():
                    pass  # stored after all (in memory: the disk write failed)
                case Skipped() | Stopped() | Aborted():
                    pass  # nothing asked of the origin here, or the proxy's own doing
                case _:
                    assert_never(outcome)
        counted = self._flight_counts.get(outcome.label)
        if counted is None:
            counted = self._flight_counts[outcome.label] = self.engine.metrics.flights.labels(outcome.label)
        counted.value += 1

    def _release(self, run: _Run, outcome: FlightOutcome) -> None:
        """Tell the workers waiting on the flight's lease how it went (``proxy.leases``)."""
        lease, leases = run.lease, self.engine.leases
        if lease is None or leases is None:
            return
        run.lease = None
        key = run.attempt.key
        match outcome:
            case Unreachable(error=error) | BrokeOff(error=error):
                # They answer as this worker's followers do: stale-if-error or the error, or
                # fetch once more when it came before the head (``shares_failure``).
                leases.release(key, lease, "error", error.status_hint, str(error), upstream_detail(error),
                               error.public_text(), error.in_body)
            case Freshened():
                # They answer from the store, saying what the origin answered: its 304 (their
                # Cache-Status ``fwd-status``, as this worker's own followers': ``_answer_from_store``).
                leases.release(key, lease, "stored", 304)
            case Filled(on_disk=True) | Adopted(on_disk=True) | StoredElsewhere():
                leases.release(key, lease, "stored")  # they answer from the store
            case Stopped(error=error):
                # Cut off by a stop's deadline: "failed" had each waiter of the other stopping
                # workers fetch for itself, be cut off a moment later and pass "failed" on (a
                # reviewer: 11-30 origin fetches for 4 keys at one SIGTERM, 4 before). They
                # answer as this worker's own clients do: stale-if-error, or the 503 (its detail
                # tells them it is the stop's: ``_leased``).
                leases.release(key, lease, "error", error.status_hint, "the worker fetching it was stopping",
                               upstream_detail(error))
            case Filled() | Adopted() | Passed() | Abandoned() | Dispersed() | Skipped() | Aborted():
                leases.release(key, lease, "failed")  # they fetch for themselves (nothing stored)
            case _:
                assert_never(outcome)

    # -- a flight's states ------------------------------------------------------------------------

    async def _leased(self, run: _Run) -> None:
        """A flight in a worker of several: fetch under the key's cross-worker lease, or wait for
        the worker that holds it and answer from what it stored (``proxy.leases``)."""
        leases = self.engine.leases
        assert leases is not None
        key, background = run.attempt.key, run.background
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.engine.settings.cache.lock_timeout
        again = run.attempt.again  # fetched once more after the holder's failure (``fetches_again``)
        began = self.engine.clock()  # what the holder stores from now on is what this waits for
        waited: float | None = None  # ``began``, once it waited for a holder (``stored_for_waiters``)
        for _ in range(3):  # a holder that dies hands the lease on: ask again
            lease = await leases.acquire(key, wait=not background)
            match lease:
                case Granted():
                    run.lease = lease
                    # Look again first: another worker may have stored it since we looked (the
                    # shared memory holds it then: no disk read), or the holder it waited for
                    # (its word lost, or it died once it had stored it).
                    if await self._answer_from_store(run, None, waited):
                        return
                    await self._fill(run, deadline)
                    return
                case Busy():
                    self._end(run, Skipped())  # a refresh another worker is already doing
                    return
                case Waiting():
                    if background:
                        self._end(run, Skipped())
                        return
                    try:
                        # ("timeout": past lock_timeout: fetch on our own)
                        # (the holder's wait for another node's fill is not counted: ``_fill``)
                        told = await leases.wait(key, lease, deadline,
                                                 self.engine.settings.cache.lock_timeout)
                    finally:
                        leases.forget(key, lease)
                    waited = began
                    match told["outcome"]:
                        case "stored":
                            if await self._answer_from_store(run, told.get("status") or None, waited):
                                return
                        case "error" if told.get("detail") == ProxyStopping.cache_detail:
                            run.flight.elsewhere = True
                            self._end(run, Stopped(ProxyStopping(told["message"])))  # not the origin's
                            return
                        case "error":
                            error = _upstream_error(told["status"], told["message"], told.get("detail", ""),
                                                    told.get("public", ""), in_body=bool(told.get("in_body")))
                            if not again and run.attempt.stale is None and loop.time() < deadline \
                                    and not shares_failure(error):
                                # The holder's request failed, not ours: as the holder's own
                                # followers (``fetches_again``), once more under the lease,
                                # which one of the waiting workers takes.
                                again = run.flight.again = True
                                continue
                            # what the holder's own followers get: stale-if-error or the error
                            run.flight.elsewhere = True
                            self._end(run, failed_fetch(error))
                            return
                        case "gone" | "ended" if loop.time() < deadline:
                            # The holder died: one of the waiters takes the lease on. Or the lease
                            # ended and no word came: asked again, it finds what the holder stored.
                            continue
                        case "pass" | "unshareable" as word:
                            # Not shareable (at the holder's head, before its body): every client
                            # of this flight goes upstream on its own now, as the holder's own
                            # followers do (with hit-for-pass when that is why), or serves
                            # stale-if-error when the head was an origin error (its status).
                            if word == "pass":
                                self.coalescer.mark_pass(key)
                            self._end(run, Dispersed(int(told.get("status") or 0)))
                            return
                case None:
                    pass  # the broker cannot be asked: fetch for this worker alone
                case _:
                    assert_never(lease)
            break
        await self._fill(run, deadline)

    async def _answer_from_store(self, run: _Run, fetched: int | None = None, since: float | None = None
                                 ) -> bool:
        """End the flight with what the shared store now holds for the key, when that is fresh
        for the flight's request (another worker stored it, its fetch answered ``fetched``: a
        304 that freshened it, else the stored response's own status), or is what the fetch
        it waited for since ``since`` stored or freshened, as this worker's own followers of
        that fetch would take it (``stored_for_waiters``: a 304's whatever its freshness);
        False when it is neither."""
        engine, attempt, flight = self.engine, run.attempt, run.flight
        key = attempt.key
        try:
            variants = await engine.storage.reread(key)
        except Exception as exc:
            engine.read_failed(exc)
            return False
        if not variants:
            return False  # (the common case: nobody stored it meanwhile)
        index = stored_for_waiters(attempt.req.head, [c.entry.response for c in variants], engine.clock(),
                                   attempt.plan.options, since, validated=fetched == 304)
        if index is None:
            return False
        cached = variants[index]
        entry = cached.entry
        if run.after is not None and other_representation(run.after, entry.response):
            return False  # not what this held fill's range just got: fetched anew
        # Bring a small body into memory once, for every client of the flight.
        if cached.body is None and entry.body_size <= engine.storage.memory.max_object \
                and await engine.open_body(cached) is None:
            return False
        flight.set_head(_stored_head(entry.response, entry.body_size, fetched))
        self._end(run, StoredElsewhere(entry))
        return True

    def _fill(self, run: _Run, deadline: float | None = None) -> Awaitable[None]:
        """A coalesced flight's fetch. In cluster mode with a shared tier (``proxy.cluster.fills``)
        it asks the other nodes first: what one of them stored is kept here and served; else
        one node in the cluster fetches under the key's fill lock and writes its fill through,
        while the others wait for it (until ``deadline``, by default ``lock_timeout`` from
        now, then they fetch here: a flight that already waited for another worker's lease
        passes the deadline it had then, so that its clients do not wait for the shared tier all
        over again). A lease holder's wait here is not its waiters' (``LeaseTable.fetch_from``):
        they wait for it, then for its fetch. Revalidations stay with each node."""
        shared = self.engine.shared
        revalidating = run.attempt.revalidating
        if shared is None or revalidating is not None:
            return self._origin(run, revalidating)
        return self._shared_fill(run, shared, deadline)

    async def _shared_fill(self, run: _Run, shared: SharedCache, deadline: float | None) -> None:
        """``_fill`` in cluster mode with a shared tier (its docstring)."""
        engine = self.engine
        cluster = engine.cluster
        key = run.attempt.key
        loop = asyncio.get_running_loop()
        lock_timeout = engine.settings.cache.lock_timeout
        if deadline is None:
            deadline = loop.time() + lock_timeout
        lock_only = False
        leases, lease = engine.leases, run.lease
        waited = False  # for another node's fill, holding this node's lease (``fetch_from``)
        began = engine.clock()
        since: float | None = None  # once it waited for another node's fill: what that one stores
        for _ in range(4):
            if cluster is not None and cluster.invalidations_pending:
                break  # invalidations made here wait for Redis: the shared tier may hold what they cover
            epoch = engine.storage.epoch
            answer = await shared.lookup(key, max(lock_timeout, 1.0) + 1.0, lock_only)
            match answer:
                case Found():
                    if engine.storage.epoch != epoch:
                        continue  # a purge was applied here meanwhile: what was found may be purged
                    if await self._adopt_shared(run, answer, since):
                        return
                    lock_only = True  # stored, but not fresh for this request: fetch under the lock
                case Locked():
                    if waited and leases is not None and lease is not None:
                        leases.fetch_from(key, lease, 0.0)
                    await self._locked_fill(run, shared, answer)
                    return
                case Contended():
                    left = deadline - loop.time()
                    if leases is not None and lease is not None and left > 0:
                        # The workers waiting on this node's lease wait for this wait, then for
                        # the fetch after it (one origin request for the node, not one each).
                        leases.fetch_from(key, lease, left)
                        waited = True
                    since = began
                    told = await shared.wait_filled(key, min(left, answer.wait + 0.05), answer.holder) \
                        if left > 0 else None
                    if told not in (None, STORED) or loop.time() >= deadline:
                        break  # not shareable, failed, or waited long enough: fetch here
                case None:
                    break
                case _:
                    assert_never(answer)
        if waited and leases is not None and lease is not None:
            leases.fetch_from(key, lease, 0.0)  # (now, if it stopped waiting early)
        await self._origin(run, None)

    async def _locked_fill(self, run: _Run, shared: SharedCache, lock: Locked) -> None:
        """Fetch under the cluster-wide fill lock; write the fill through, then release the lock
        (which wakes the other nodes' waiters). A fill that will not be written through lets
        the lock go as soon as that is known (``WriteThrough``), not when its body ends."""
        engine = self.engine
        run.through = WriteThrough(shared, run.attempt.key, lock,
                                   min(shared.max_object, engine.storage.spool_in_memory), engine.clock)
        try:
            await self._origin(run, None)
        finally:
            await run.through.release()

    async def _adopt_shared(self, run: _Run, found: Found, since: float | None = None) -> bool:
        """End the flight with a variant another node stored in the shared tier, when it is a
        fresh hit for the flight's request, or what that node's fill stored while this flight
        waited for it since ``since`` (``stored_for_waiters``): kept in this node's tiers (the
        same way a fill is), then served from them; False when none is."""
        engine, attempt, flight = self.engine, run.attempt, run.flight
        storage = engine.storage
        index = stored_for_waiters(attempt.req.head, [e.response for e, _ in found.variants], engine.clock(),
                                   attempt.plan.options, since)
        if index is None:
            return False
        entry, body = found.variants[index]
        if run.after is not None and other_representation(run.after, entry.response):
            # Another node stored another version (an older one, say) than the part this held
            # fill's range just got from the origin: its client's next range would be served
            # from it. Fetched from the origin under the lock, as when nothing is stored.
            return False
        spool = storage.spool(entry, len(body))
        if not await spool.write(body):
            spool.discard()
            return False
        final = storage.finalize(entry, spool)
        if final is None:
            return False
        in_memory = storage.put_memory(final, spool)
        await engine.drop_other_parts(attempt.key, final.response)
        flight.set_head(_stored_head(final.response, final.body_size))
        self.coalescer.retire(flight)
        if run.lease is None and in_memory:
            # In memory now: the flight's clients are answered at once, the disk copy follows.
            self._end(run, Adopted(final))
            await self._put_disk(attempt.key, final, spool)
            return True
        # Other workers wait for this key (proxy.leases): they read it from disk, so the flight
        # ends once it is there.
        self._end(run, Adopted(final, await self._put_disk(attempt.key, final, spool)))
        return True

    async def _origin(self, run: _Run, revalidating: Cached | None) -> None:
        """Ask the origin (conditionally, when ``revalidating``), and carry out what its answer
        means for the response held (``decide_on_validation``)."""
        engine, attempt, flight = self.engine, run.attempt, run.flight
        head, plan = attempt.req.head, attempt.plan
        sent = engine.sending()

        def interim(status: int, reason: str, fields: CIMultiDictProxy[str]) -> None:
            # The client whose request went upstream gets the interim as the origin sent it;
            # the clients coalesced on its fetch only what of it is not that request's own.
            kept = end_to_end(fields)
            own = attempt.req.interim
            shared: HeaderList | None = None
            for sink in list(flight.interim):
                if sink is own:
                    sink(status, reason, kept)
                    continue
                if shared is None:
                    shared = shared_interim(status, kept)
                if shared:
                    sink(status, reason, shared)

        epoch = flight.epoch = engine.storage.epoch
        if flight.sent is None:
            flight.sent = asyncio.get_running_loop().time()  # its followers' wait counts from here
        upstream = engine.upstream(attempt.req, plan, revalidating)
        try:
            resp = await engine.send(upstream, on_interim=interim)
        except UpstreamError as exc:
            self._end(run, failed_fetch(exc))
            return
        request_time, response_time = engine.answered(sent)
        if run.background:
            run.retry_after = resp.headers.get("Retry-After")
        # Whether a 304 answers a conditional request: from the fields sent (a stored response
        # without validators is refreshed unconditionally), for both uses below. (Looked at for a
        # 304 only: the scan of every field cost a pass-through 17 calls.)
        conditional = resp.status == 304 and asks_validation(upstream.headers)
        unasked = unasked_304(resp, conditional)
        if unasked is not None:
            self._end(run, Unreachable(unasked))
            return

        # What the answer means for the response held (revalidated, or kept for stale-if-error).
        kept = revalidating or attempt.stale
        outcome: ValidationOutcome = Replace() if kept is None else decide_on_validation(
            kept.entry.response, resp.status, resp.headers, response_time, conditional=conditional)
        match outcome:
            case Freshen():
                assert revalidating is not None  # (a fill drops the client's validators)
                resp.release()
                while engine.storage.epoch != epoch:  # (again if one came during the look)
                    epoch = engine.storage.epoch
                    if await self._purged_meanwhile(attempt.key, revalidating):
                        # The 304 vouches for the response stored before a purge of it came (a
                        # soft purge's mark would be undone): fetched anew instead.
                        engine.metrics.unusable_304s.labels("purged").inc()
                        await self._origin(run, None)
                        return
                await engine.freshen(revalidating, resp.headers, plan, request_time, response_time, head,
                                     upstream=resp.upstream.name)
                # Its followers take the freshened response as another worker's waiters do
                # (``stored_for_waiters``): by the one rule for a fetch's followers.
                shareable = shareable_with_followers(revalidating.entry.response, response_time,
                                                     validated=True)
                flight.set_head(FlightHead(304, resp.reason, resp.headers, shareable, "FRESHENED", None))
                self._end(run, Freshened(revalidating.entry))
                return
            case Refetch():
                resp.release()
                engine.metrics.unusable_304s.labels("validator").inc()
                await self._origin(run, None)
                return
            case ServeStale():
                # RFC 5861 §4: the stored response stays; the clients decide on stale-if-error.
                store_detail, entry = outcome.detail, None
            case Replace():
                store_detail, entry = engine.fill_decision(attempt, resp, request_time, response_time)
                # The stored response this fetch was made for (revalidated, refetched after a 304
                # about another, or kept for stale-if-error), when nothing stored replaces it:
                # dropped before the clients get the answer, so no request after it is served the
                # old one (stale-while-revalidate served it, and refreshed it, at every request).
                # Only when nothing of this client's request can have caused the answer.
                held = kept or attempt.revalidating
                if entry is None and held is not None and supersedes_stored(UnstoredAnswer(
                        resp.status, store_detail, carries_credentials(head.headers),
                        bool(held.entry.response.vary), attempt.fwd == "request")):
                    await engine.drop_superseded(held)
            case _:
                assert_never(outcome)
        await self._deliver(run, resp, store_detail, entry, response_time, epoch)

    async def _purged_meanwhile(self, key: str, revalidated: Cached) -> bool:
        """Whether the variant a revalidation was sent for is no longer as it was: purged, or
        marked stale by a soft purge. Asked only when some purge came during the revalidation
        (the storage's epoch moved: any key's, an unsafe method's invalidation too)."""
        stored = next((c for c in await self.engine.load(key)
                       if c.entry.body_id == revalidated.entry.body_id), None)
        return stored is None or stored.entry.response.invalidated != revalidated.entry.response.invalidated

    async def _deliver(self, run: _Run, resp: UpstreamResponse, store_detail: str,
                       entry: Entry | None, response_time: float, epoch: int) -> None:
        """A flight's response: its head to the clients, its body to them and to the store
        (not when a purge since ``epoch``, the store's when the request went out, covers it)."""
        engine, flight, key = self.engine, run.flight, run.attempt.key
        storage = engine.storage
        shareable = entry is not None and shareable_with_followers(entry.response, response_time)
        vary = entry.response.vary if entry is not None else ()
        fields = resp.headers
        if "date" not in fields:  # forwarded with the Date it is stored with (policy.headers.dated)
            fields = CIMultiDictProxy(CIMultiDict(dated(tuple(fields.items()), response_time)))
        spool = None
        # The body that follows the head: none after a 204/304's, whatever its Content-Length
        # says (the spool holds a body complete only at that length); one the head does not
        # give is known when all of it came with the head (``arrived_length``).
        length = resp.body_length
        if length is None:
            length = resp.arrived_length
        if entry is not None:
            spool = storage.spool(entry, length, epoch)
            if spool.no_room:  # (its room is taken before the head, which says so: ``spool``)
                spool = None
                store_detail = "SPOOLS-FULL"
                if shareable:  # (else counted below, with any other reason)
                    engine.metrics.not_stored_because(store_detail, url_of_key(key))
        through = run.through
        if through is not None:  # (the other nodes waiting on the fill lock fetch now if in vain)
            through.head(spool is not None, length, spool is not None and spool.too_large)
        if entry is not None:
            flight.tags = entry.tags  # (before its head: its followers ask purges with them)
        # (not stored: the head as it arrived answers its clients' conditionals and range all
        # the same, ``after_head``)
        flight.set_head(FlightHead(resp.status, resp.reason, fields, shareable,
                                   store_detail, resp.content_length, vary,
                                   entry.response if entry is not None else
                                   arrived(resp.status, resp.reason, fields, response_time),
                                   length is not None))
        # ("": stored, the common case: no call)
        passing = bool(store_detail) and hit_for_pass(store_detail, resp.status, run.attempt.req.head.headers)
        if passing:
            self.coalescer.mark_pass(key, found_nothing=self._found_nothing(run.attempt))
        if not shareable:
            if store_detail:  # ("": stored, though stale on arrival: not for followers, but stored)
                engine.metrics.not_stored_because(store_detail, url_of_key(key))
            if run.lease is not None and engine.leases is not None:
                # The workers waiting on this key's lease go upstream now (with hit-for-pass
                # when that is why), rather than when the body is over (the only head of a
                # flight that can be not shareable is this one: a stored one always is). A
                # failure here must not cost this flight its answer: they hear at the release.
                # (With the status of a response not stored: an origin error has them serve
                # stale-if-error, as this flight's own followers do, rather than each ask the
                # failing origin again: ``when_dispersed``.)
                try:
                    engine.leases.head(key, run.lease, False, passing, resp.status if store_detail else 0)
                except Exception:
                    log.exception("telling the workers waiting on %s failed", key)
        flight.spool = spool
        body = flight.body
        body.storing = spool is not None
        abandoned = ""  # why the store was given up mid-body
        whole = resp.complete_body()  # a small body arrives with its head: no async generator
        try:
            async for chunk in (resp.iter_chunks() if whole is None else _Once(whole)):
                if spool is not None:
                    abandoned = await self._spool_write(key, spool, chunk)
                    if abandoned:
                        spool = None
                        body.stop_storing()
                        if through is not None:
                            through.let_go(TOO_LARGE if abandoned == "TOO-LARGE" else NOT_SHARED)
                    elif through is not None and spool.size > through.limit:
                        through.let_go(TOO_LARGE)  # (a length the head did not say)
                if body.readers == 0 and spool is None:
                    resp.close()  # nobody reads it and nothing stores it
                    self._end(run, Abandoned())
                    return
                await body.push(chunk)
        except UpstreamError as exc:
            if first_report(exc):  # the one line for every client it cut (``first_report``)
                # Clients joined to the body, whether or not a byte of it reached them yet (some
                # may still be waiting for their head, and get a 502 with no body): "waiting on".
                readers = body.readers
                engine.warn_upstream(log, exc, "upstream body broke off for %s (%d client%s waiting on it): "
                                     "%s", key, readers, "" if readers == 1 else "s", exc, body=True)
            if spool is not None:
                spool.discard()
            self._end(run, BrokeOff(exc))
            return
        except BaseException:
            if spool is not None:
                spool.discard()
            resp.close()
            raise
        final = storage.finalize(entry, spool) if spool is not None and entry is not None else None
        if final is None or spool is None:
            doomed = spool is not None and spool.doomed  # a purge or an invalidation covered it
            refused = spool.refused if spool is not None and not doomed else ""
            if refused:
                # Over the room in force at its end (the shards' budget was lowered while it
                # streamed: ``Writer.finalize``): not stored, counted as a body that grows past
                # the limit is (its head had said stored).
                engine.metrics.not_stored_because(refused, url_of_key(key))
            why = store_detail or abandoned or refused or ("PURGED" if doomed else "INCOMPLETE")
            if why == "PURGED":  # (as every other reason a response is not stored: counted)
                engine.metrics.not_stored_because(why, url_of_key(key))
            self._end(run, Passed(why))
            return
        # Visible in memory before the last reader sees the end of the body, so the
        # client's next request is a hit; the disk copy follows.
        if not storage.put_memory(final, spool) and spool.refused and storage.memory_only:
            # Refused by the shared memory, and nothing else keeps it: not stored, as Cache-Status
            # and the count say of a response refused up front (the workers waiting on the lease
            # fetch for themselves). Said stored, it was a miss again at the next request.
            spool.discard()
            engine.metrics.not_stored_because(spool.refused, url_of_key(key))
            self._end(run, Passed(spool.refused))
            return
        if through is not None:
            through.filled(final, spool.body_bytes())
        self.coalescer.retire(flight)
        # Stored: the key's hit-for-pass mark ends before this worker's clients have their answer
        # (``_end`` clears it only once the disk has it, after them: a client's next request for
        # a body kept on disk alone was still passed then, a MISS, as a herd's late ones were).
        self.coalescer.clear_pass(key)
        if run.lease is None or spool.body_bytes() is None:
            # This worker's readers first; then the disk.
            flight.body.finish()
        # else other workers wait for this key (proxy.leases): a small body goes to disk before
        # this worker's own followers take the CPU, and they hear of it at once (``_end``); then
        # both workers answer their clients at the same time.
        self._end(run, Filled(final, await self._put_disk(key, final, spool)))

    async def _spool_write(self, key: str, spool: BodySpool, chunk: bytes) -> str:
        """Spool a chunk of a body being stored; "" while it is kept, else why the store is
        given up (the clients still get the whole body): TOO-LARGE, SPOOLS-FULL (the bodies this
        process is receiving hold their share of the disk), or STORE-FAILED when the write
        failed (a full disk: counted, logged once per streak, in /stats)."""
        engine = self.engine
        try:
            if await spool.write(chunk):
                return ""
            reason = "SPOOLS-FULL" if spool.no_room else "TOO-LARGE"
        except Exception as exc:
            spool.discard()
            engine.write_failures.failed("spool", key, exc)
            reason = "STORE-FAILED"
        engine.metrics.not_stored_because(reason, url_of_key(key))
        return reason

    async def _put_disk(self, key: str, final: Entry, spool: BodySpool) -> bool:
        """The disk's part of storing a fill (nothing now for a body in the shared memory)."""
        engine = self.engine
        try:
            stored = await engine.storage.put_disk(final, spool)
        except Exception as exc:
            engine.write_failures.failed("write", key, exc)
            return False
        if stored:
            engine.write_failures.succeeded()
        return stored

    # -- a client's answer from its flight ----------------------------------------------------

    async def answer(self, attempt: Attempt, flight: Flight, reader: BodyView, collapsed: bool,
                     joined: int | None = None) -> Reply:
        """Answer a client that joined ``flight`` (as its leader, or ``collapsed`` as a follower;
        ``joined``: the store's purge epoch when it joined, when purges had come since the
        flight's request went out)."""
        engine = self.engine
        head, plan, fwd, stale = attempt.req.head, attempt.plan, attempt.fwd, attempt.stale
        try:
            try:
                if collapsed:
                    lock_timeout = engine.settings.cache.lock_timeout
                    held = flight.held
                    if held is not None and not held.done():
                        # A fill held for a range's answer: at most lock_timeout for that answer
                        # (or its head: a 200 delivered, an error), then lock_timeout for the
                        # head of the fetch it starts. Counted from here, the range's round trip
                        # (another request's) had every follower of it fetch the object alone
                        # whenever the origin took more than half of lock_timeout.
                        await asyncio.wait((held, flight.head), timeout=lock_timeout)
                        if not held.done() and not flight.head.done():
                            raise TimeoutError
                    fhead = await _followed_head(flight, lock_timeout)
                else:
                    fhead = await (flight.lead or asyncio.shield(flight.head))
            finally:
                # This client no longer waits for the flight's head: its 1xx are not this
                # client's any more (one that gave up and fetched for itself was sent them
                # in the middle of its own response's body).
                sink = attempt.req.interim
                if sink is not None and sink in flight.interim:
                    flight.interim.remove(sink)
        except GoAlone as exc:
            reader.close()
            alone = when_dispersed(exc.status, stale=stale is not None)
            match alone:
                case StaleInstead():
                    assert stale is not None
                    reply = await self._stale_reply(attempt, stale, exc.status, alone.detail)
                    # (purged since it was looked up: asked for as without it)
                    return reply if reply is not None else await self._fetch_alone(attempt)
                case OnItsOwn():
                    return await self._fetch_alone(attempt)
                case _:
                    assert_never(alone)
        except TimeoutError:
            reader.close()
            return await self._fetch_alone(attempt)
        except UpstreamError as exc:
            reader.close()
            if isinstance(exc, UnaskedPartial) and attempt.part is not None:
                # A range that joined a held fill whose whole fetch the origin answered with a
                # 206 (``_whole_failed``): the object cannot be fetched whole, its ranges can.
                # Its own range, not the whole fetch's 502 (one for each range that joined it).
                return await self._fetch_alone(attempt)
            if fetches_again(exc, collapsed=collapsed, again=attempt.again or flight.again,
                             stale=stale is not None, part=attempt.part is not None):
                return await self._again(attempt, flight)
            # A client that waited for another's fetch went forward with it, whatever came of it.
            waited = collapsed or flight.elsewhere
            if waited:
                engine.metrics.coalesced.inc()
            return await self._origin_failed(attempt, exc, waited)
        except ConnectionError as exc:
            reader.close()
            if collapsed:
                return await self._fetch_alone(attempt)
            return engine.upstream_failed(plan, UpstreamError(str(exc)), fwd)

        step = after_head(fhead, head, fwd, collapsed=collapsed, stale=stale is not None)
        if isinstance(step, StaleInstead):
            assert stale is not None
            reply = await self._stale_reply(attempt, stale, fhead.status, step.detail)
            if reply is not None:
                reader.close()
                return reply
            # Purged (or its body gone) since it was looked up: the origin's own answer, as a
            # cache without it answers (it was a 502 that was neither).
            step = after_head(fhead, head, fwd, collapsed=collapsed, stale=False)
        if joined is not None and isinstance(step, Relay | FromHead) and flight.epoch is not None \
                and engine.storage.purged_since(flight.epoch, attempt.key, flight.tags, joined):
            # A purge that came after the flight's request went out and before this client
            # joined it covers its answer (its tags known now): not this client's. Fetched
            # anew, as one new flight with the others who came after it (the old one takes
            # no newcomer now); purges that do not cover it (other tags) never get here.
            reader.close()
            return await self._anew(attempt, flight)
        if step.coalesced:
            engine.metrics.coalesced.inc()
        from_head = False
        match step:
            case FromStore():
                reader.close()
                # Its leader and its followers alike: their requests came before the origin's
                # answer, so what it stored or validated (the variant each selects) is theirs.
                cookies = _cookies(list(fhead.headers.items())) if step.cookies else []
                return await self._serve_after_flight(attempt, fhead.status, step.x_cache, step.collapsed,
                                                      flight, own=True, stored=step.stored, cookies=cookies)
            case StaleInstead():  # (answered above)
                raise AssertionError("stale-if-error without a stored response")
            case OnItsOwn():
                reader.close()
                return await self._fetch_alone(attempt)
            case FromHead():
                from_head, step = True, step.otherwise
            case Relay():
                pass
            case _:
                assert_never(step)

        x_cache = step.x_cache
        prepared = flight.follower_headers.get(fwd) if collapsed else None
        if prepared is not None:
            headers = list(prepared)
        else:
            storing = fhead.store_detail == ""
            # ``stored`` only when nothing left to arrive can undo it: a body of unknown length
            # may outgrow max_object after its head has gone out (RFC 9211 §2.8: "a true value
            # indicates that it did"; the parameter is optional). The access log says what
            # became of it (``settle``).
            cs = cache_status(fwd=fwd, fwd_status=fhead.status, stored=storing and fhead.length_known,
                              collapsed=collapsed, detail=None if storing else fhead.store_detail)
            headers = engine.response_headers(fhead.headers)
            if collapsed:  # a Set-Cookie stored under allow_set_cookie was the leader's, not theirs
                headers = [(k, v) for k, v in headers if k.lower() != "set-cookie"]
            headers.append(("Cache-Status", cs))
            headers.append(("X-Cache-Status", x_cache))
            if collapsed:  # the same for every follower: prepared once
                flight.follower_headers[fwd] = list(headers)

        length = fhead.content_length
        if from_head:
            assert fhead.response is not None
            early = await self._from_head(attempt, flight, reader, fhead, fhead.response, headers, step)
            if early is not None:
                return early
        match step.body:
            case "none":
                reader.close()
                return engine.finish(plan, Reply(fhead.status, fhead.reason, headers, None,
                                                  length if head.method == "HEAD" else None,
                                                  x_cache, "none", head_only=True))
            case "whole":
                try:
                    body = await flight.body.whole()
                except UpstreamError as exc:
                    # Nothing of the response has gone to this client (its head goes out with
                    # the whole body): answered as when the origin fails before its head
                    # (a follower counted at its head: ``step.coalesced``).
                    return await self._origin_failed(attempt, exc, collapsed)
                finally:
                    reader.close()
                if fhead.store_detail == "" and (detail := _not_stored(flight)):
                    # The head said it was being stored; the body ended and it was not (its
                    # Content-Range said more, a purge came): the Cache-Status says so.
                    cs = cache_status(fwd=fwd, fwd_status=fhead.status, collapsed=collapsed, detail=detail)
                    # cachegate's own member is the last; any before it are the origin's
                    own = max(i for i, (k, _) in enumerate(headers) if k == "Cache-Status")
                    headers = [*headers[:own], ("Cache-Status", cs), *headers[own + 1:]]
                return engine.finish(plan, Reply(fhead.status, fhead.reason, headers, body, len(body),
                                                  x_cache, "upstream"))
            case "stream":
                return engine.finish(plan, Reply(fhead.status, fhead.reason, headers,
                                                  self._flight_body(flight, attempt.key, reader), length,
                                                  x_cache, "upstream",
                                                  settle=partial(_settle, flight) if fhead.store_detail == ""
                                                  else None))
            case _:
                assert_never(step.body)

    async def _from_head(self, attempt: Attempt, flight: Flight, reader: BodyView, fhead: FlightHead,
                         response: StoredResponse, headers: list[tuple[str, str]], otherwise: Relay
                         ) -> Reply | None:
        """The reply to the client's conditionals or range from the flight's head
        (``reply_on_arrival``); None when it is the response itself (``otherwise``, as any client's).

        As ``Engine.serve`` does, the rule's response_headers are those of the response (its
        200's, for a 304 or a 206) before the decision picks fields from them; a 412 also gets
        its own. The 206 is sliced from the body as it arrives, its head sent with its first
        bytes (``_slice``); a small body's slice is sent in one write, as the relay would."""
        engine, plan = self.engine, attempt.plan
        edited = engine.edited(plan, fhead.status, list(headers))
        answer = reply_on_arrival(attempt.req.head, response, fhead.content_length, edited)
        match answer:
            case AsArrives():
                return None
            case Send():
                return await self._slice(attempt, flight, reader, answer, otherwise)
            case PreconditionFailed() | NotModified() | Unsatisfiable():
                reader.close()
                # The response was fetched for this client (the leader: a follower's fields have
                # no Set-Cookie, and it gets none here either): its cookies are its own, the
                # rules' edits applied (a rule's removal of Set-Cookie holds on the 304 too).
                own = None if otherwise.coalesced else _cookies(edited)
                return self._early(plan, answer, otherwise.x_cache, own)
            case _:
                assert_never(answer)

    def _early(self, plan: RequestPlan, answer: PreconditionFailed | NotModified | Unsatisfiable,
               x_cache: str, own: list[tuple[str, str]] | None = None) -> Reply:
        """The 412, 304 or 416 a response's head answers a client's conditionals or range with
        (``reply_on_arrival``), before any of its body: a flight's, or a client's own. ``own``:
        the Set-Cookie fields of the response fetched for this client (a flight's leader, or a
        client's own response; never a follower), which its 304 or 412 carries: the 304's
        fields are those a stored response may give anyone, and a client revalidating a private
        page lost the cookie the origin set (a session's refresh, a logout's), every time the
        key passed."""
        match answer:
            case PreconditionFailed():
                text = b"412 Precondition Failed\n"
                fields = [("Content-Type", "text/plain; charset=utf-8"), *answer.headers, *(own or ())]
                return self.engine.finish(plan, Reply(412, "Precondition Failed", fields, text, len(text),
                                                      x_cache, "none"))
            case NotModified():
                fields = [*answer.headers, *(own or ())]
                return Reply(304, "Not Modified", fields, None, None, x_cache, "none")
            case Unsatisfiable():
                return Reply(416, "Range Not Satisfiable", answer.headers, b"", 0, x_cache, "none")
            case _:
                assert_never(answer)

    async def _slice(self, attempt: Attempt, flight: Flight, reader: BodyView, answer: Send,
                     otherwise: Relay) -> Reply:
        """A 206 of the flight's body: ``answer.length`` bytes from ``answer.offset``.

        Its head goes out only with bytes of it: once the slice's first bytes have arrived (or,
        for a small body, ``otherwise`` "whole", the whole slice: one write), never before. A
        fill that fails before then has sent this client nothing, so it is answered as when
        the origin fails before its head (``_origin_failed``: 502, or stale-if-error), not
        with a 206 that ends at once; a slice whose bytes had all arrived is answered whatever
        becomes of the rest of the body. Once some of it has gone out, a failure aborts the
        connection, as for any streamed response. A flight that is not storing its body waits
        for them ``SLICE_HEAD_WAIT`` at most (``_lead``): its download is this client's alone."""
        # A client reading the spool file reads it from the range's first byte on.
        start = reader.start_at(answer.offset) if isinstance(reader, SpoolFollower) else 0
        pieces = _sliced(self._flight_body(flight, attempt.key, reader), answer.offset - start,
                         answer.offset + answer.length - start, beats=True)
        body: Body
        try:
            if otherwise.body == "whole":
                body = b"".join([piece async for piece in pieces])
                arrived = len(body) == answer.length
            else:
                # (the head waits for the bytes while the body goes to the store in any case)
                lead = await _lead(pieces, lambda: flight.body.storing)
                arrived = True  # (a body that ends before them raises: ``_sliced``)
                body = _Led(lead, pieces)
        except UpstreamError as exc:
            return await self._origin_failed(attempt, exc)
        if not arrived:  # (an origin's body that ended short of its Content-Length without an error)
            await pieces.aclose()
            return await self._origin_failed(attempt, UpstreamProtocolError(
                "the response's body ended before the range asked for"))
        return Reply(answer.status, answer.reason, answer.headers, body, answer.length, otherwise.x_cache,
                     "upstream")

    async def _again(self, attempt: Attempt, flight: Flight) -> Reply:
        """A follower's own fetch after the fetch of the flight it joined failed (``fetches_again``):
        through ``fetch`` again, so the key's followers fetch as one new flight that the first of
        them leads and the others join (an origin that is down costs one more request, not one
        a follower), never the failed flight, which takes no newcomer from now on."""
        self.coalescer.retire(flight)
        return await self.fetch(replace(attempt, again=True, nowhere=False))

    async def _anew(self, attempt: Attempt, flight: Flight) -> Reply:
        """A follower's own fetch when a purge before it joined covers its flight's answer:
        through ``fetch``, as ``_again`` does, so the key's late clients share one new flight."""
        self.coalescer.retire(flight)
        return await self.fetch(replace(attempt, nowhere=False))

    async def _origin_failed(self, attempt: Attempt, exc: UpstreamError, collapsed: bool = False) -> Reply:
        """A client of a flight whose fetch failed before anything of its response was sent to
        this client (no head, or a head whose body broke off before it was sent whole): the
        stale response (stale-if-error), a 504 when the stored one may not be served stale, or
        the error; ``collapsed`` when that fetch was another's it waited for.

        cachegate's own failures (its stop, ``ProxyStopping``; no descriptor or socket memory
        left, ``OutOfResources``) are never told as the origin's: a stale response says the
        error's own detail (``STOPPING``, ``PROXY-ERROR``), not ``ORIGIN-UNREACHABLE``; one that
        may not be served stale is answered as a miss would be (503), not 504 "origin
        unreachable"; and no warning per request (the stop says so once, the pool warns once
        per streak of ``OutOfResources``), where each stale answer logged its own."""
        engine, plan, fwd = self.engine, attempt.plan, attempt.fwd
        own = isinstance(exc, (ProxyStopping, OutOfResources))
        if attempt.stale is not None:
            # The client is served, but the origin failed all the same: the one warning of a
            # failed fetch (not one per client of a herd: ``first_report``), as without a stale
            # response (a body that broke off was logged where it broke).
            if isinstance(exc, OutOfResources):
                log.debug("stale response served (stale-if-error): %s", exc)
            elif not own and first_report(exc):
                engine.warn_upstream(log, exc, "upstream failed, stale response served (stale-if-error): %s",
                                     exc)
            return await self._serve_stale(attempt, attempt.stale, None,
                                           exc.cache_detail if own else "ORIGIN-UNREACHABLE", collapsed)
        if attempt.stale_prohibited and not own:  # (own: the 503 says why, not the origin)
            # RFC 9111 §5.2.2.2: a stored response that may not be served stale
            # (must-revalidate, no-cache, ...) and an unreachable origin: 504.
            if first_report(exc):
                engine.warn_upstream(log, exc, "upstream failed, stale response not allowed: %s", exc)
            return engine.finish(plan, error_reply(
                504, "Gateway Timeout", "504 Gateway Timeout: origin unreachable", forwarded_x_cache(fwd),
                cache_status(fwd=fwd, collapsed=collapsed, detail="STALE-NOT-ALLOWED")))
        return engine.upstream_failed(plan, exc, fwd, collapsed=collapsed)

    async def _flight_body(self, flight: Flight, key: str, reader: BodyView) -> AsyncIterator[bytes]:
        """A flight's body for one client, as it arrives; a reader detached from a fill it fell
        behind (``proxy.coalescer``) gets the rest from the store (``_stored_rest``)."""
        chunks = reader.__aiter__()
        try:
            async for chunk in chunks:
                yield chunk
            return
        except FellBehind as behind:
            offset = behind.offset
        except TooFarBehind:
            self.engine.metrics.slow_readers.labels("cut_off").inc()
            raise
        finally:
            await chunks.aclose()
        async for chunk in self._stored_rest(flight, key, offset):
            yield chunk

    async def _stored_rest(self, flight: Flight, key: str, offset: int) -> AsyncIterator[bytes]:
        """The body a flight stored, from ``offset`` on (for a client detached from it); raises
        when nothing was stored after all, so the client's connection is aborted (a truncated
        body is never ended as if complete)."""
        engine = self.engine
        result = await asyncio.shield(flight.result)
        entry = result.entry
        body: bytes | IO[bytes] | None = None
        if entry is not None and entry.body_size >= offset:
            variants = await engine.load(key)
            cached = next((c for c in variants if c.entry.body_id == entry.body_id), None)
            if cached is not None:
                body = await engine.open_body(cached)
        if body is None:
            engine.metrics.slow_readers.labels("cut_off").inc()
            raise ResponseAborted(f"{key}: the client fell behind a fill that was not stored")
        engine.metrics.slow_readers.labels("resumed").inc()
        if isinstance(body, bytes):
            if offset < len(body):
                yield body[offset:]
            return
        try:
            await engine.storage.run(body.seek, offset)
            while chunk := await engine.storage.run(body.read, STORED_CHUNK):
                yield chunk
        finally:
            body.close()

    async def forward_passing(self, attempt: Attempt) -> Reply:
        """A hit-for-pass key: forwarded in the request's own task, without a flight (nobody may
        join it). Should the response turn out storable now, a flight takes it over and stores it
        (and this client is answered from that flight), which ends the hit-for-pass.

        The client's preconditions go with it (RFC 9110 §13.2.1: a cache that does not evaluate
        them forwards them): a private page's If-None-Match gets its 304; so do its Range and
        If-Range (a resume of a private download cost the origin the whole body each time). Its
        answer to them (a 304, a 412, a 206, a 416) is relayed and never stored; only a full
        response may end the pass (and one that ignored them is answered from its head:
        ``answer_unshared``).

        A HEAD goes as a HEAD, as Varnish passes one: nothing of its answer can be stored, and
        sent as the GET a fill is, it had the origin start sending the body (megabytes of a big
        object) for nothing, at every HEAD."""
        engine = self.engine
        head = attempt.req.head
        sent = engine.sending()
        epoch = engine.storage.epoch
        upstream = engine.upstream(attempt.req, attempt.plan, preconditions=True)
        head_only = head.method == "HEAD"
        if head_only:
            upstream = replace(upstream, method="HEAD")
        try:
            resp = await engine.send(upstream, on_interim=relay(attempt.req.interim))
        except UpstreamError as exc:
            return engine.upstream_failed(attempt.plan, exc, attempt.fwd)
        fields = head.headers
        if (resp.status == 304 and ("If-None-Match" in fields or "If-Modified-Since" in fields)) \
                or (resp.status == 412 and ("If-Match" in fields or "If-Unmodified-Since" in fields)) \
                or (resp.status in (206, 416) and "Range" in fields and not head_only):
            cs = cache_status(fwd=attempt.fwd, fwd_status=resp.status)
            return engine.direct_reply(attempt.plan, resp, forwarded_x_cache(attempt.fwd), cs,
                                       head.method == "HEAD")
        unasked = unasked_304(resp, resp.status == 304 and asks_validation(upstream.headers))
        if unasked is not None:
            return engine.upstream_failed(attempt.plan, unasked, attempt.fwd)
        request_time, response_time = engine.answered(sent)
        return await self.answer_unshared(attempt, resp, request_time, response_time, epoch,
                                          head_only=head_only)

    async def answer_unshared(self, attempt: Attempt, resp: UpstreamResponse, request_time: float,
                              response_time: float, epoch: int, *, head_only: bool = False) -> Reply:
        """Answer one client from a response fetched for it alone; stored (through a flight
        nobody else may join) when it is storable and no purge since ``epoch`` (the store's
        when the request went out) covers it. ``head_only``: the answer to a HEAD sent as one
        (a hit-for-pass key's), relayed and never stored (it has no body); what its head says
        of the GET's response keeps the key's mark, or ends it (storable now: the next GET
        fills), as a passed GET's would."""
        engine = self.engine
        head = attempt.req.head
        try:
            store_detail, entry = engine.fill_decision(attempt, resp, request_time, response_time)
        except BaseException:
            resp.close()
            raise
        if entry is not None and head_only:
            self.coalescer.clear_pass(attempt.key)
            cs = cache_status(fwd=attempt.fwd, fwd_status=resp.status)
            return engine.direct_reply(attempt.plan, resp, forwarded_x_cache(attempt.fwd), cs, True)
        if entry is not None:
            async def deliver(run: _Run) -> None:
                await self._deliver(run, resp, store_detail, entry, response_time, epoch)

            # Answered as a leader of a flight of its own: no stale to fall back on.
            solo = Attempt(attempt.req, attempt.plan, attempt.key, attempt.fwd)
            flight = self._launch(solo, False, False, deliver)
            flight.led()
            reader = flight.body.join()
            assert reader is not None
            return await self.answer(solo, flight, reader, False)
        if hit_for_pass(store_detail, resp.status, head.headers):
            # (``engine.coalescer``, not the property, and ``nowhere`` read before the call: a
            # hit-for-pass key's request, forwarded without a lookup, never found the key
            # nowhere. Two calls fewer on every pass-through, measured.)
            engine.coalescer.mark_pass(attempt.key,
                                       found_nothing=attempt.nowhere and self._found_nothing(attempt))
        engine.metrics.not_stored_because(store_detail, head.url)
        cs = cache_status(fwd=attempt.fwd, fwd_status=resp.status, detail=store_detail)
        if not head_only and asks_of_head(resp.status, head):
            # The origin was sent no Range (nor, but for a hit-for-pass key's, conditionals):
            # they are answered from the head, as a flight's clients' are (``after_head``).
            reply = await self._unstored_from_head(attempt, resp, response_time, cs)
            if reply is not None:
                return reply
        return engine.direct_reply(attempt.plan, resp, forwarded_x_cache(attempt.fwd), cs,
                                   head_only or head.method == "HEAD")

    async def _unstored_from_head(self, attempt: Attempt, resp: UpstreamResponse, response_time: float,
                                  cs: str) -> Reply | None:
        """The reply to a client's conditionals or range from its own response that is not
        stored (``reply_on_arrival``, as ``_from_head`` for a flight's): a 412, a 304, a 416, or
        a 206 of the body sliced as it arrives (never read whole first), its head sent with the
        slice's first bytes, or after ``SLICE_HEAD_WAIT`` without them (the writer then sees
        the skip's beats, and stops reading the origin for a client gone); None when it is
        the response itself."""
        engine, plan = self.engine, attempt.plan
        headers = engine.response_headers(resp.headers)
        headers.append(("Cache-Status", cs))
        headers.append(("X-Cache-Status", forwarded_x_cache(attempt.fwd)))
        edited = engine.edited(plan, resp.status, headers)
        response = arrived(resp.status, resp.reason, resp.headers, response_time)
        answer = reply_on_arrival(attempt.req.head, response, resp.content_length, edited)
        match answer:
            case AsArrives():
                return None
            case PreconditionFailed() | NotModified() | Unsatisfiable():
                resp.release()
                return self._early(plan, answer, forwarded_x_cache(attempt.fwd), _cookies(edited))
            case Send():
                end = answer.offset + answer.length
                whole = resp.complete_body()
                if whole is not None:
                    piece = whole[answer.offset:end]
                    if len(piece) == answer.length:
                        return Reply(answer.status, answer.reason, answer.headers, piece, answer.length,
                                     forwarded_x_cache(attempt.fwd), "upstream")
                    return engine.upstream_failed(plan, UpstreamProtocolError(
                        "the response's body ended before the range asked for"), attempt.fwd)
                pieces = _sliced(resp.iter_chunks(), answer.offset, end, beats=True)
                try:
                    lead = await _lead(pieces)
                except UpstreamError as exc:
                    return engine.upstream_failed(plan, exc, attempt.fwd)
                return Reply(answer.status, answer.reason, answer.headers, _Led(lead, pieces), answer.length,
                             forwarded_x_cache(attempt.fwd), "upstream")
            case _:
                assert_never(answer)

    def _found_nothing(self, attempt: Attempt) -> bool:
        """Whether a hit-for-pass mark made now may let the key's plain requests pass without a
        lookup (``Coalescer.passes_unlooked``): the attempt's lookup found the key nowhere, and
        it is still nowhere (its flight may have waited for another worker, or a fill of
        another variant may have ended meanwhile). A check per mark, not per request."""
        if not attempt.nowhere:
            return False
        storage, key = self.engine.storage, attempt.key
        return storage.memory_get(key) is None and storage.absent(key)

    async def _stored_meanwhile(self, attempt: Attempt) -> Reply | None:
        """A reply from the response a flight for the key stored while this request looked on
        disk (in memory now, or being written to disk by this process); None when there is none.

        Without this, a request that missed memory just before a flight ended would find no
        flight after its disk lookup and fetch the key again."""
        engine, key = self.engine, attempt.key
        writes = engine.storage.writing(key)
        if writes:
            await asyncio.wait(writes, timeout=engine.settings.cache.lock_timeout)
            variants: tuple[Cached, ...] | None = await engine.load(key)
        else:
            variants = engine.storage.memory_get(key)
        if not variants:
            return None
        decision = decide_lookup(attempt.req.head, [c.entry.response for c in variants], engine.clock(),
                                 attempt.plan.options)
        if not isinstance(decision, Serve) or decision.status != "HIT":
            return None
        # A plain hit: it found the response stored, without waiting for anyone's fetch.
        return await engine.serve(attempt.req, attempt.plan, variants[decision.index], "HIT", decision.ttl,
                                  decision.age, decision.not_modified, hit=True)

    async def _serve_after_flight(self, attempt: Attempt, fwd_status: int | None, x_cache: str,
                                  collapsed: bool, flight: Flight | None, *, own: bool,
                                  stored: bool = False, cookies: list[tuple[str, str]] | None = None
                                  ) -> Reply:
        """Answer from the store once ``flight`` has ended.

        A client of the flight (``own``: its leader or a follower that joined it, whose request
        came before the origin's answer) comes here only once the flight's response is in the
        store whole (``FromStore``: stored by another worker or node, or freshened by a 304),
        and waits for the flight's end without a bound: it ends as soon as it has said so. It
        gets the variant the flight stored or freshened, fresh or not (a ``no-cache`` response
        validated once for all of them): the origin has just answered for it.

        A client too late to read the flight's body from its first byte (its history is no
        longer kept: ``fetch``) waits for as long as the flight is storing the body (bounded by
        the flight's own upstream timeouts), since the store is where it reads it from: a wait
        cut at ``lock_timeout`` made every late client download the object again. A flight that
        gives the store up (too large, no room) or was not storing is waited for
        ``lock_timeout`` at most. Such a client gets what the store holds only when that is a
        fresh hit for its own request (``decide_lookup``): the flight may have stored nothing
        (an error, a store given up), or freshened another variant than this client's.

        Else the request is fetched for this client alone, once: that fetch never comes back
        here (its flight answers from its own head: ``after_head``), and ``refetched`` makes
        sure of it. ``cookies``: the Set-Cookie fields of the 304 the flight's origin gave this
        client's own request (``FromStore.cookies``), which its reply from the store carries."""
        engine, req, key = self.engine, attempt.req, attempt.key
        if flight is not None:
            if own:
                await asyncio.shield(flight.result)
            else:
                await self._outwait(flight)
        mine = flight.result.result() if own and flight is not None and flight.result.done() \
            and not flight.result.cancelled() else None
        ours = mine.entry if mine is not None else None
        variants = await engine.load(key)
        index = None
        if variants:
            responses = [c.entry.response for c in variants]
            index = select_variant(req.head, responses)
            if index is not None and (ours is None or variants[index].entry.body_id != ours.body_id):
                decision = decide_lookup(req.head, responses, engine.clock(), attempt.plan.options)
                index = decision.index if isinstance(decision, Serve) and decision.status == "HIT" else None
        if index is not None:
            cached = variants[index]
            response = cached.entry.response
            now = engine.clock()
            # RFC 9211: a collapsed request went forward (with the leader's): never "hit".
            hit = x_cache == "HIT" and not collapsed
            ttl = response.ttl(now)
            reply = await engine.serve(
                req, attempt.plan, cached, x_cache, ttl if hit else forwarded_ttl(x_cache, ttl),
                response.freshness.age(now), client_not_modified(req.head.headers, cached.entry.response),
                hit=hit, fwd=attempt.fwd, collapsed=collapsed, mark_stored=stored,
                fwd_status=fwd_status if fwd_status is not None else cached.entry.response.status,
                cookies=cookies or (),
            )
            if reply is not None:
                return reply
        if attempt.refetched:
            # Unreachable by construction (see above); were it reached, a third exchange for one
            # request, or a loop of them, would be worse than an error.
            log.error("%s: a refetch for one client came back to the store; not fetched again", key)
            return engine.upstream_failed(attempt.plan, UpstreamProtocolError("refetched already"),
                                          attempt.fwd)
        if attempt.part is not None:
            return await engine.range_alone(attempt)  # (its range alone: never back here)
        return await self.fetch(Attempt(req, attempt.plan, key, attempt.fwd, coalesce=False, refetched=True))

    async def _outwait(self, flight: Flight) -> None:
        """Wait for the end of a flight a client joined too late to read from its first byte:
        while it stores the body (looked at every ``lock_timeout``), or ``lock_timeout`` at most."""
        timeout = self.engine.settings.cache.lock_timeout
        while not flight.result.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(flight.result), timeout)
            if not flight.body.storing:
                return

    async def _serve_stale(self, attempt: Attempt, stale: Cached, fwd_status: int | None,
                           detail: str, collapsed: bool = False) -> Reply:
        """stale-if-error (RFC 5861 §4): the stored response instead of the origin's error; a
        502 when it is gone meanwhile (the origin gave no response to relay instead)."""
        reply = await self._stale_reply(attempt, stale, fwd_status, detail, collapsed)
        if reply is None:
            return self.engine.finish(attempt.plan, error_reply(
                502, "Bad Gateway", "502 Bad Gateway", forwarded_x_cache(attempt.fwd),
                cache_status(fwd=attempt.fwd, collapsed=collapsed, detail=detail)))
        return reply

    async def _stale_reply(self, attempt: Attempt, stale: Cached, fwd_status: int | None,
                           detail: str, collapsed: bool = False) -> Reply | None:
        """The stored response served stale instead of the origin's error; None when it is gone
        (purged, its body culled) since it was looked up. Looked up again first: a HEAD or a 304
        opens no body, and served a response purged meanwhile (a 304 told the client its copy
        of purged content was still good)."""
        engine, req = self.engine, attempt.req
        if not any(c.entry.body_id == stale.entry.body_id for c in await engine.load(stale.entry.key)):
            return None
        response = stale.entry.response
        now = engine.clock()
        return await engine.serve(req, attempt.plan, stale, "STALE", response.ttl(now),
                                  response.freshness.age(now),
                                  client_not_modified(req.head.headers, stale.entry.response),
                                  hit=False, fwd=attempt.fwd, fwd_status=fwd_status, collapsed=collapsed,
                                  detail=detail)


# -- what a client of a flight does once the flight has its head (pure) -----------------------

@dataclass(frozen=True, slots=True)
class FromStore:
    """Answer from the store: the flight's response is already there whole (another worker or
    node stored it; or the origin's 304 freshened the stored one), and the flight ends as soon
    as it has said so."""

    x_cache: str
    collapsed: bool  # Cache-Status: it went forward with another request (never "hit")
    coalesced: bool = False  # served from another's fetch (cachegate_coalesced_requests_total)
    # Cache-Status ``stored``: the fetch it went forward with stored the response (another
    # worker's or node's fill: its own followers say so too).
    stored: bool = False
    # The origin's 304 answered this client's own request (the leader of this worker's
    # revalidation): its Set-Cookie fields are this client's, never stored nor anyone else's
    # (a session's refresh or a logout sent on a 304 was lost).
    cookies: bool = False


@dataclass(frozen=True, slots=True)
class StaleInstead:
    """stale-if-error (RFC 5861 §4): the stored response instead of the origin's error."""

    detail: str
    coalesced: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class OnItsOwn:
    """Fetch for itself: the flight's response is not this client's (private, Set-Cookie,
    another Vary variant: ``proxy.coalescer``)."""

    coalesced: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class Relay:
    """The flight's own response: its head only ("none"), its body sent whole in one write
    (small: a herd's fan-out costs less so), or streamed as it arrives."""

    x_cache: str
    body: Literal["none", "whole", "stream"]
    coalesced: bool = False


@dataclass(frozen=True, slots=True)
class FromHead:
    """The client's conditionals or range, which the fill did not send, answered from the
    flight's head as it arrives (``proxy.policy.reply.reply_on_arrival``: a 304, a 412, a 416,
    a 206 sliced from the body as it streams); ``otherwise`` when the head answers nothing
    more than the response itself."""

    otherwise: Relay

    @property
    def coalesced(self) -> bool:
        return self.otherwise.coalesced


NextStep = FromStore | StaleInstead | OnItsOwn | Relay | FromHead


# The Cache-Status details of the failures every client of a fetch shares whenever they came
# (``shares_failure``): none that one request causes (an empty pool, the stop).
SHARED_FAILURES = frozenset({"NO-UPSTREAM", "STOPPING"})


def shares_failure(error: UpstreamError) -> bool:
    """Whether a failed fetch's error is the answer of every client that waited for it (this
    worker's followers, and the other workers' clients waiting on its lease: ``_leased``)
    rather than a reason for them to fetch once more (``fetches_again``).

    Shared: ``SHARED_FAILURES``, and any failure after the origin's head (``in_body``): the
    origin answered the request, then its body broke off, fell silent past ``read`` or ran
    past ``total``. The followers given that head got the failure with it (as Varnish's
    waiting list, streamed from one fetch); a waiter that fetched again waited a second time
    for an origin that had just failed it, and gave it one more request.
    Not shared: a failure before the head (a reset, an invalid response, a timeout, no free
    pooled connection): the request went, and a field of it that is not in the key may be what
    the origin failed on (one client's request must not decide every client's answer), or it
    is one worker's own limit, which another may not meet; so once more, as one fetch.

    >>> from proxy.http_client import UpstreamBodyError, UpstreamReadTimeout
    >>> late = UpstreamReadTimeout("read timed out mid-body")
    >>> late.in_body = True
    >>> shares_failure(late), shares_failure(UpstreamReadTimeout("read timed out"))
    (True, False)
    >>> shares_failure(UpstreamBodyError("short")), shares_failure(NoUpstreamAvailable("all down"))
    (True, True)
    """
    return error.in_body or upstream_detail(error) in SHARED_FAILURES


def fetches_again(error: UpstreamError, *, collapsed: bool, again: bool, stale: bool, part: bool) -> bool:
    """Whether a follower of a flight whose fetch failed before its response head fetches again
    rather than take the error: its own request was never sent, and a reset, a timeout or an
    invalid response may be what the leader's request caused (a field that makes the origin
    drop the connection); as nginx's ``proxy_cache_lock`` waiters send their own request when
    the holder stored nothing. Once only (``Attempt.again``); never with a stored response
    stale-if-error serves instead, nor for a range miss that joined the whole fill (each would
    fetch its range alone), nor for a failure every client shares (``shares_failure``); the
    leader's error is its own."""
    return collapsed and not again and not stale and not part and not shares_failure(error)


def when_dispersed(status: int, *, stale: bool) -> StaleInstead | OnItsOwn:
    """What a client of a flight told that another worker's head may not be shared
    (``Dispersed``) does: what that worker's own followers do (``after_head``): stale-if-error
    when that head was an origin error (``status``: 0 unless its response was not stored) and
    the client has a ``stale`` response, else fetch on its own. Every client of a herd asking
    the failing origin again cost it one request each for the whole outage.

    >>> when_dispersed(503, stale=True), when_dispersed(503, stale=False)
    (StaleInstead(detail='ORIGIN-ERROR'), OnItsOwn())
    >>> when_dispersed(0, stale=True), when_dispersed(200, stale=True), when_dispersed(404, stale=True)
    (OnItsOwn(), OnItsOwn(), OnItsOwn())
    """
    if stale and origin_error(status):
        return StaleInstead("ORIGIN-ERROR")
    return OnItsOwn()


def after_head(fhead: FlightHead, request: RequestHead, fwd: str, *, collapsed: bool,
               stale: bool) -> NextStep:
    """What a client of a flight does once the flight has its response head: the leader's
    (``collapsed`` False) or a follower's, with a ``stale`` response to fall back on or not."""
    if fhead.store_detail == STORED_ELSEWHERE:
        # Another worker or node stored it, or freshened it with its origin's 304: from the
        # store, as this worker's own followers of that fetch would be answered.
        if fhead.status == 304:  # a 304 freshened it: said as this worker's own followers say it
            return FromStore("REVALIDATED", collapsed=True, coalesced=True)
        return FromStore("HIT", collapsed=True, coalesced=True, stored=True)
    if origin_error(fhead.status) and stale and fhead.store_detail != "":
        return StaleInstead("ORIGIN-ERROR")
    if fhead.status == 304 and fhead.store_detail == "FRESHENED" and (fhead.shareable or not collapsed):
        return FromStore("REVALIDATED", collapsed=collapsed, coalesced=collapsed, cookies=not collapsed)
    if collapsed and (not fhead.shareable or fhead.vary != variant_of(tuple(n for n, _ in fhead.vary),
                                                                      request.headers)):
        return OnItsOwn()
    x_cache = "HIT" if collapsed else forwarded_x_cache(fwd)
    plain: Relay
    if ends_at_head(fhead.status, request.method == "HEAD"):
        plain = Relay(x_cache, "none", coalesced=collapsed)
    elif (length := fhead.content_length) is not None \
            and length <= (WHOLE_FOR_FOLLOWERS if collapsed else WHOLE_FOR_LEADER):
        # The leader too, when the body is small enough not to delay its first byte.
        plain = Relay(x_cache, "whole", coalesced=collapsed)
    else:
        plain = Relay(x_cache, "stream", coalesced=collapsed)
    if fhead.response is not None and asks_of_head(fhead.status, request):
        # Fill requests drop the client's conditionals and ranges: the response's head answers
        # them, as it arrives (never the store: waiting for it held the client for the whole
        # body, and a wait that ran out fetched the object again), whether or not it is stored
        # (a private or too large response got its clients the whole 200 to each).
        return FromHead(plain)
    return plain


def fill_response(flight: Flight | None, request: RequestHead) -> StoredResponse | None:
    """The response of the key's fill in flight, once its head has come, when ``request``'s
    client would be answered from it (``after_head`` would not send it to fetch on its own:
    shareable, and of its variant): what a range's If-Range is evaluated against
    (``proxy.policy.reuse.decide_part_lookup``). None otherwise (no flight, no head yet, a
    failed one, or another worker's or node's fetch: nothing known of its representation)."""
    if flight is None:
        return None
    head = flight.head
    if not head.done() or head.cancelled() or head.exception() is not None:
        return None
    fhead = head.result()
    if fhead.response is None or not fhead.shareable \
            or fhead.vary != variant_of(tuple(n for n, _ in fhead.vary), request.headers):
        return None
    return fhead.response


def asks_of_head(status: int, request: RequestHead) -> bool:
    """Whether ``request`` asks what a fill did not send the origin (its conditionals, its
    range) of a response of ``status``, to be answered from that response's head
    (``reply_on_arrival``): by a flight's clients (``after_head``) and by a client's own
    response that is not stored (``MissPath.answer_unshared``) alike."""
    fields = request.headers
    return status == 200 and (
        "if-none-match" in fields or "if-modified-since" in fields or "range" in fields
        or "if-match" in fields or "if-unmodified-since" in fields)


async def _followed_head(flight: Flight, lock_timeout: float) -> FlightHead:
    """A follower's wait for its flight's head: ``lock_timeout`` from when it joined, or from
    when the flight's own request went to the origin, whichever is later. A flight that waited
    for another worker's lease (or node's fill lock) waited ``lock_timeout`` too, and then
    fetches for the worker: its followers follow that one fetch rather than each give up at the
    same instant and fetch alone (with ``--workers 2``, a slow body cost one origin request per
    client of the waiting worker)."""
    try:
        return await asyncio.wait_for(asyncio.shield(flight.head), lock_timeout)
    except TimeoutError:
        sent = flight.sent
        now = asyncio.get_running_loop().time()
        if sent is None:
            sent = now  # still waiting elsewhere, until its own deadline (not after ours): it goes now
        left = sent + lock_timeout - now
        if left <= 0:
            raise
    return await asyncio.wait_for(asyncio.shield(flight.head), left)


async def _sliced(chunks: AsyncIterator[bytes], first: int, end: int, *, beats: bool = False
                  ) -> AsyncGenerator[bytes, None]:
    """Bytes ``first`` to ``end`` (exclusive) of a body arriving as ``chunks``; the rest of it
    is not read (the flight goes on for its other readers and the store). ``beats``: a b"" for
    each chunk skipped before ``first`` (``Body``: the writer checks its client is still there).
    A body that ends before ``end`` raises: the slice's head announced its length."""
    at = 0
    try:
        async for chunk in chunks:
            size = len(chunk)
            if at + size > first:
                piece = chunk[max(0, first - at):end - at]
                if piece:
                    yield piece
            elif beats:
                yield b""
            at += size
            if at >= end:
                return
        raise UpstreamProtocolError("the response's body ended before the range asked for")
    finally:
        if isinstance(chunks, AsyncGenerator):
            await chunks.aclose()


async def _lead(pieces: AsyncGenerator[bytes, None], storing: Callable[[], bool] | None = None) -> bytes:
    """The first bytes of a slice (``_sliced`` with beats), or b"" once ``SLICE_HEAD_WAIT`` has
    passed without them (checked at each beat), when its head goes out without them; never
    while ``storing`` says the body goes to the store (the download is not for this client
    alone: a failure before them stays a clean 502, not a 206 cut short)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SLICE_HEAD_WAIT
    lead = b""
    while not lead and (loop.time() < deadline or (storing is not None and storing())):
        lead = await anext(pieces)
    return lead


class _Led:
    """A body whose first chunk was read before its head went out (``MissPath._slice``; b"", a
    beat, when the head went out without it: ``SLICE_HEAD_WAIT``): that chunk, then the rest of
    ``rest``; ``aclose`` closes ``rest`` (the web layer closes a body it did not read to its
    end, and a generator already started runs its cleanup then)."""

    __slots__ = ("_lead", "_rest")

    def __init__(self, lead: bytes, rest: AsyncGenerator[bytes, None]) -> None:
        self._lead: bytes | None = lead
        self._rest = rest

    def __aiter__(self) -> _Led:
        return self

    async def __anext__(self) -> bytes:
        lead = self._lead
        if lead is not None:
            self._lead = None
            return lead
        return await self._rest.__anext__()

    async def aclose(self) -> None:
        await self._rest.aclose()


@dataclass(frozen=True, slots=True)
class Delivery:
    """The whole response a held fill's client got to its range (the origin ignored Range),
    for the fill to deliver (``MissPath.answer_held``)."""

    resp: UpstreamResponse
    store_detail: str
    entry: Entry | None
    response_time: float
    epoch: int


@dataclass(frozen=True, slots=True)
class Whole:
    """The range's 206 may be stored: the held fill fetches the whole object, and takes no
    stored copy of it (another worker's, the shared tier's) whose validators show another
    representation than this ``part``, which its client just got (``other_representation``)."""

    part: StoredResponse


# What a held fill is told (``MissPath.hold``): fetch the whole object (``Whole``: the range's 206
# may be stored), deliver the 200 the range got, fail as the range's fetch did (its waiting
# clients get that error, as a fill's followers do), or end without fetching ("drop").
HeldWord = Literal["drop"] | Whole | Delivery | UpstreamError


class HeldFill:
    """A key's fill held for a range miss's own fetch (``MissPath.hold``): told once what it
    does; the first word counts (the range's answer says it; its end says "drop" whatever
    happened, so a fill is never left waiting)."""

    __slots__ = ("_word", "flight")

    def __init__(self, flight: Flight, word: asyncio.Future[HeldWord]) -> None:
        self.flight = flight
        self._word = word

    @property
    def waiting(self) -> bool:
        """Whether the fill still waits for its word (not told yet, nor cancelled by a stop)."""
        return not self._word.done()

    def say(self, word: HeldWord) -> None:
        if not self._word.done():
            self._word.set_result(word)


def _cookies(fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in fields if k.lower() == "set-cookie"]


def unasked_304(resp: UpstreamResponse, conditional: bool) -> UpstreamProtocolError | None:
    """A 304 to a request that carried no validators (``asks_validation`` of the fields sent:
    a fill drops the client's, a refresh of a response without validators has none; RFC 9110
    §15.4.5 allows it only for a conditional request) is an origin's fault, not an answer:
    every client of the flight gets a 502, as Varnish refuses one ("304 response but not
    conditional fetch"), and nothing is stored (a background refresh leaves the stale
    response as it is)."""
    if resp.status != 304 or conditional:
        return None
    resp.close()
    return UpstreamProtocolError(f"{resp.upstream.name}: the origin answered 304 Not Modified to a request "
                                 "without conditions")


def _stored_head(stored: StoredResponse, body_size: int, fetched: int | None = None) -> FlightHead:
    """The head of a flight answered from a stored response (its clients read it from the store);
    its status is what the fetch that stored it got (``fetched``: a 304 that freshened it), which
    their Cache-Status ``fwd-status`` says (``after_head``)."""
    return FlightHead(fetched or stored.status, stored.reason, CIMultiDictProxy(CIMultiDict(stored.headers)),
                      True, STORED_ELSEWHERE, body_size, stored.vary)


def _upstream_error(status: int, message: str, detail: str = "", public: str = "",
                    in_body: bool = False) -> UpstreamError:
    """The error another worker's fetch of the same key met, as this worker's own (its
    Cache-Status ``detail`` too: an invalid response is not an unreachable origin; whether it
    came after the origin's head, ``in_body``), with the text that worker's clients were given
    (``public``: "... (read timed out)" was theirs, the class's shorter text this worker's)."""
    invalid = UpstreamBodyError if detail == "UPSTREAM-BROKE-OFF" else (
        UpstreamProtocolError if detail == "UPSTREAM-INVALID" else None)  # (what its client is told)
    cls = {503: NoUpstreamAvailable, 504: UpstreamTimeout}.get(status, invalid or UpstreamConnectError)
    error = cls(f"{message} (fetched by another worker)")
    if detail:
        error.cache_detail = detail
    if public:
        error.public = public  # (public_text: the holder's, with its detail in it already)
    if in_body:
        error.in_body = True
    # That worker logged its failed fetch: one warning for the machine (``first_report``).
    error.reported = True
    return error


class _Once:
    """A body that came whole with its head, as ``_deliver``'s loop takes a body: a class, not an
    async generator, whose creation and end cost asyncio's generator hooks (a WeakSet add and
    discard) and ``iter_chunks``'s two reads (≈ 10 Python-level calls a fill, ``scripts/bench-calls``)."""

    __slots__ = ("_chunk",)

    def __init__(self, chunk: bytes) -> None:
        self._chunk: bytes | None = chunk or None

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        chunk = self._chunk
        if chunk is None:
            raise StopAsyncIteration
        self._chunk = None
        return chunk


def _settle(flight: Flight, member: str | None) -> str | None:
    """What the access log says of a fill's streamed answer once its body has gone out: what
    became of the fill (``settled``), which its head could not always say."""
    return settled(member, _not_stored(flight))


def _not_stored(flight: Flight) -> str:
    """Why a flight whose head said its response was being stored did not store it, once its
    body has ended ("" when it stored it, or is storing it still: its body is in memory and its
    disk copy follows)."""
    result = flight.result
    if not result.done() or result.cancelled():
        return ""
    ended = result.result()
    return "" if ended.entry is not None else ended.detail or "INCOMPLETE"
