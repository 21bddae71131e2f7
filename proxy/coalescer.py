"""One in-flight origin fetch per cache key, owned by the coalescer, not by a client.

A ``Flight`` is a task that fetches one response from the origin and fans its
body out (``Broadcast``) to every client that joined while it was in flight, as
the bytes arrive. The flight belongs to the coalescer: a client that goes away
only stops reading; the fetch goes on to fill the cache for the others.

The wait is bounded: a follower that has not seen the response head within
``lock_timeout`` goes upstream on its own. A fill held for another request's answer (a range
asked of the origin first: ``Flight.held``) has not begun its fetch yet: its followers wait
``lock_timeout`` at most for that answer, then ``lock_timeout`` for the head of the fetch it
starts (the range's round trip counted against the fill's wait had every follower of it go
upstream on its own whenever the origin took more than half of ``lock_timeout``). A
response that turns out not to be shareable (private, Set-Cookie, a Vary mismatch, ...) is
not handed to followers; they fetch for themselves, and the key is remembered as
"hit-for-pass" for a short time so the next herd goes straight through (each
request in its own task: the engine starts no flight for such a key). A fetch that fails
before its head (a reset, a timeout, an invalid response) is its leader's failure only: its
request may be what the origin failed on, and the followers' were never sent. They fetch
again, once, as one new flight the first of them leads (``proxy.flight.fetches_again``).

Slow readers: the fetch never waits for one client while others keep up, nor while the
body is being stored. A reader more than ``HIGH_WATER`` bytes behind (``UNSTORED_HIGH_WATER``
when nothing stores the body: then it is all a client that stops reading holds) is

- *detached* when the body is being stored: its unread bytes are dropped and it gets no
  more; at the end of the body it raises ``FellBehind`` with how far it got, and the engine
  sends it the rest from the stored response (or aborts its connection when nothing was
  stored after all);
- *cut off* when the body is not being stored and it is more than ``HIGH_WATER`` behind the
  reader furthest ahead: it raises ``TooFarBehind`` (its client's connection is aborted, never
  ended as if complete);
- waited for when nothing stores the body and the reader furthest ahead is past
  ``UNSTORED_HIGH_WATER`` too (the sole reader left, or all at one pace): then the wait is
  back-pressure on the origin, at the pace of the fastest reader.

Why detach rather than cut off whenever possible: a client on a slow link is legitimate,
and the stored copy lets it finish at its own pace without holding memory (a detached
reader keeps no bytes) or the fetch (which others wait for). Why bound by bytes rather than
time: memory is what a stalled reader costs, and a byte bound does not depend on the
machine's load.

How a flight ends, and what that means for its clients, its lease and the store, is the
engine's (``proxy.flight``: one typed outcome, in one place). Under it, ``Coalescer.start``
is the safety net for any flight: one that ended without ending its broadcast has its body
failed, so no reader is left waiting for bytes that will never come.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDictProxy

from proxy.errors import ProxyStopping, ResponseAborted

if TYPE_CHECKING:
    from proxy.policy.messages import StoredResponse
    from proxy.storage.entry import Entry

log = logging.getLogger("cachegate.coalescer")

# Hit-for-pass marks a worker keeps at most: past either bound the oldest are forgotten first (a
# forgotten mark costs one request a wait for a flight or a lookup, nothing more).
PASS_MARKS_MAX = 100_000
PASS_MARKS_MAX_BYTES = 16 * 1024 * 1024  # of keys: a URL may be 8 KB long


class PassMarks:
    """Keys marked until a time, kept in the order they were (last) marked.

    Every mark lasts the same while (``cache.hit_for_pass``) on a monotonic clock, so that
    order is the order they expire in: setting a mark drops the expired ones from the front,
    and past ``max_entries`` marks or ``max_bytes`` of keys the oldest go first, in O(1)
    amortised per mark (the marks used to be pruned by rebuilding the whole dict, once per
    new mark when more than 100,000 were live).
    """

    __slots__ = ("_bytes", "_until", "max_bytes", "max_entries")

    def __init__(self, max_entries: int = PASS_MARKS_MAX, max_bytes: int = PASS_MARKS_MAX_BYTES) -> None:
        self._until: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._bytes = 0
        self.max_entries = max_entries
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self._until)

    @property
    def key_bytes(self) -> int:
        return self._bytes

    def set(self, key: str, until: float, now: float) -> None:
        marks = self._until
        if marks.pop(key, None) is None:
            self._bytes += len(key)
        marks[key] = until  # (at the end: the latest to expire)
        while marks:
            first = next(iter(marks))
            if (marks[first] > now and len(marks) <= self.max_entries
                    and self._bytes <= self.max_bytes):
                break
            del marks[first]
            self._bytes -= len(first)

    def discard(self, key: str) -> None:
        if self._until.pop(key, None) is not None:
            self._bytes -= len(key)

    def until(self, key: str) -> float:
        """When ``key``'s mark ends (0: it has none)."""
        return self._until.get(key, 0.0)

    def holds(self, key: str, now: float) -> bool:
        """Whether ``key``'s mark still holds (an expired one is dropped)."""
        until = self._until.get(key)
        if until is None:
            return False
        if until <= now:
            self.discard(key)
            return False
        return True


# Unread bytes a reader may fall behind the fetch (beyond the history it joined with) before
# it is detached or cut off (or, alone on an unstored body, waited for): see the module docstring.
# A body being stored: a reader that far behind is detached to finish from the store, and holds
# nothing more; the fetch never waits for it.
HIGH_WATER = 4 * 1024 * 1024
# A body not stored (pass-through, no-store, too large): what the fetch holds for a reader is all
# that bounds the worker's memory for a client that stops reading (each such miss is a flight of
# its own), so the fetch waits for it (or cuts it off) at this much, as nginx's proxy_buffers
# stop reading the origin at 64 KB (4 MiB here was 4.67 MB of a worker's memory per client
# reading nothing of a no-store download, measured). A fast client's download is not slower
# for it (a 100 MB pass-through, measured).
UNSTORED_HIGH_WATER = 256 * 1024


class FellBehind(Exception):
    """Raised at the end of the body by a reader that was detached: it fell more than
    HIGH_WATER behind a body being stored, and gets the rest, from ``offset``, from the store."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"fell behind the fetch after {offset} bytes")
        self.offset = offset


class TooFarBehind(ResponseAborted):
    """A reader cut off: more than HIGH_WATER behind the reader furthest ahead, and nothing
    stores the body for it to finish from."""


class Reader:
    """One client's view of a broadcast body: ``async for chunk in reader``."""

    __slots__ = ("_broadcast", "_items", "_joined", "_pending", "_waiter", "closed", "delivered",
                 "detached")

    def __init__(self, broadcast: Broadcast) -> None:
        self._broadcast = broadcast
        self._items: collections.deque[bytes | BaseException | None] = collections.deque()
        self._pending = 0
        self._joined = 0  # the history it joined with: unread, but not counted as behind
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.delivered = 0  # bytes it has yielded
        self.detached = False

    def _put(self, item: bytes | BaseException | None) -> None:
        if self.detached and isinstance(item, bytes):
            return
        self._items.append(item)
        if isinstance(item, bytes):
            self._pending += len(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def __aiter__(self) -> AsyncGenerator[bytes, None]:
        try:
            while True:
                while not self._items:
                    self._waiter = asyncio.get_running_loop().create_future()
                    await self._waiter
                    self._waiter = None
                item = self._items.popleft()
                if item is None:
                    if self.detached:
                        raise FellBehind(self.delivered)
                    return
                if isinstance(item, BaseException):
                    raise item
                self._pending -= len(item)
                self.delivered += len(item)
                if self._broadcast._drained is not None:
                    self._broadcast._reader_progressed()
                yield item
        finally:
            self.close()

    @property
    def behind(self) -> bool:
        return self._pending > self._joined + self._broadcast.high_water

    def _drop(self) -> None:
        """Forget the bytes it has not read yet."""
        self._items.clear()
        self._pending = 0

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._drop()
            self._broadcast._remove(self)


class SpoolFollower:
    """A client too late to read a flight's body from its first byte in memory (the flight
    keeps ``history_limit`` of it to replay), while the flight stores it: it reads what the
    flight spooled to its file so far, then each new part as the flight writes it, to the end.

    Before, such a client waited for the whole fill before its first byte (a 2 GB download at
    100 MB/s: 20 s of silence, past many clients' read timeouts), as nginx's cache lock makes
    them wait; Varnish and Traffic Server stream it to them as it arrives, as this does. The
    flight writes each chunk to its spool file (flushed) before it pushes it, so what
    ``Broadcast.size`` counts is in the file; the descriptor, opened when the client joined,
    still reads the file once the flight has moved it into the store or removed it. A store
    given up mid-body (too large, no room, a full disk) cuts the client off (``TooFarBehind``:
    its connection is aborted, never ended as if complete), as a detached reader would be."""

    __slots__ = ("_at", "_body", "_fd", "_read", "closed")

    def __init__(self, body: Broadcast, fd: int,
                 read: Callable[[int, int, int], Coroutine[Any, Any, bytes]]) -> None:
        self._body = body
        self._fd = fd
        self._read = read  # (fd, size, offset) -> bytes, off the event loop
        self._at = 0  # where it starts reading
        self.closed = False

    def start_at(self, offset: int) -> int:
        """Read from byte ``offset`` on (a range's first byte: the bytes before it are never
        read); returns it. Before the first read only."""
        self._at = offset
        return offset

    async def __aiter__(self) -> AsyncGenerator[bytes, None]:
        body, at = self._body, self._at
        try:
            while True:
                if at < body.size:
                    chunk = await self._read(self._fd, min(FOLLOW_CHUNK, body.size - at), at)
                    if not chunk:
                        raise TooFarBehind(f"the spool file ended at {at} of {body.size} bytes")
                    at += len(chunk)
                    yield chunk
                elif body.ended:
                    if body._end_error is not None:
                        raise body._end_error
                    return
                elif not body.storing:
                    raise TooFarBehind("the fill a late client read from its spool stopped storing it")
                else:
                    await body.moved()
        finally:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def __del__(self) -> None:  # a reply whose body was never started (its client went first)
        self.close()


# What a ``SpoolFollower`` reads of the spool file at once.
FOLLOW_CHUNK = 256 * 1024

# A client's view of a flight's body: from memory as it arrives, or from its spool file.
BodyView = Reader | SpoolFollower


class Broadcast:
    """A body read once from upstream and streamed to any number of readers.

    Readers may join late as long as the history (chunks so far) is still kept,
    which it is up to ``history_limit`` bytes. ``storing`` says whether the body is being
    stored (readers that fall behind are then detached, not cut off): set by the engine.
    """

    def __init__(self, history_limit: int) -> None:
        self._history: list[bytes] | None = []
        self._history_size = 0
        self._history_limit = history_limit
        self._readers: list[Reader] = []
        self.storing = False
        self.detached = 0  # readers detached so far (they finish from the store)
        self.cut_off = 0  # readers cut off so far
        self._ended = False
        self._end_error: BaseException | None = None  # what readers get at the end (None: EOF)
        self._drained: asyncio.Event | None = None
        self._done: asyncio.Future[None] | None = None  # for whole(): resolved at the end
        self._whole: bytes | None = None
        self._moved: asyncio.Future[None] | None = None  # for ``moved``: resolved at the next change
        self.size = 0

    @property
    def readers(self) -> int:
        return len(self._readers)

    @property
    def high_water(self) -> int:
        """How far a reader may fall behind the fetch (``HIGH_WATER``, ``UNSTORED_HIGH_WATER``)."""
        return HIGH_WATER if self.storing else UNSTORED_HIGH_WATER

    @property
    def ended(self) -> bool:
        return self._ended

    def join(self) -> Reader | None:
        """A reader from the first byte, or None when the start is no longer kept."""
        if self._history is None:
            return None
        reader = Reader(self)
        for chunk in self._history:
            reader._put(chunk)
        reader._joined = reader._pending  # the history it joins with does not count against it
        if self._ended:
            reader._put(self._end_error)
        else:
            self._readers.append(reader)
        return reader

    async def moved(self) -> None:
        """Until the next chunk, the end, or the store given up (``SpoolFollower``)."""
        moved = self._moved
        if moved is None:
            moved = self._moved = asyncio.get_running_loop().create_future()
        await asyncio.wait((moved,))  # (a waiter cancelled leaves the others theirs)

    def _move(self) -> None:
        moved = self._moved
        if moved is not None:
            self._moved = None
            if not moved.done():
                moved.set_result(None)

    async def push(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._moved is not None:
            self._move()
        for r in self._readers:
            r._put(chunk)
        if self._history is not None:
            self._history.append(chunk)
            self._history_size += len(chunk)
            if self._history_size > self._history_limit:
                self._history = None
        high_water = self.high_water
        for r in self._readers:
            if r._pending > r._joined + high_water:
                await self._make_room()
                return

    async def _make_room(self) -> None:
        """Readers too far behind: detached (the body is being stored), cut off (more than
        HIGH_WATER behind the reader furthest ahead), or waited for (the reader furthest ahead is
        behind too, and nothing stores the body: the origin is read at its pace).

        Behind the reader furthest ahead, not behind the origin: two clients reading at one
        speed, both slower than the origin, crossed the mark a few bytes apart, and the first
        to cross it was cut off (6.5 MB into a 40 MB body, both at 4 MB/s)."""
        while True:
            live = [r for r in self._readers if not r.detached]
            slow = [r for r in live if r.behind]
            if not slow:
                return
            if self.storing:
                for r in slow:
                    r._drop()
                    r.detached = True
                self.detached += len(slow)
                return
            lead = min(r._pending - r._joined for r in live)
            for r in slow:
                # (HIGH_WATER apart, not the lone reader's mark: the kernel's send buffers take
                # the first megabytes of each connection unevenly, and at 256 KB a client at the
                # other's pace was cut off as soon as the head came)
                if r._pending - r._joined - lead > HIGH_WATER:
                    self._cut(r)
            if lead <= self.high_water:
                return
            self._drained = asyncio.Event()
            try:
                await self._drained.wait()
            finally:
                self._drained = None

    def _cut(self, reader: Reader) -> None:
        reader._drop()
        reader._put(TooFarBehind(f"the client fell more than {HIGH_WATER} bytes behind another "
                                 "client of a shared fetch that is not stored"))
        self._readers.remove(reader)
        self.cut_off += 1

    def stop_storing(self) -> None:
        """The body will not be stored after all: readers detached to finish from the store
        are cut off now (rather than at the end of the body), and none is detached any more."""
        self.storing = False
        for r in [r for r in self._readers if r.detached]:
            self._cut(r)
        self._move()

    async def whole(self) -> bytes:
        """The complete body once it has ended, joined once for every caller (a coalesced
        follower of a small response sends it in one write rather than chunk by chunk).

        Only while the history is kept; raises what the body ended with when it broke off."""
        if not self._ended:
            if self._done is None:
                self._done = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._done)
        if self._end_error is not None:
            raise self._end_error
        if self._whole is None:
            if self._history is None:
                raise RuntimeError("the body is no longer kept whole")
            self._whole = b"".join(self._history)
        return self._whole

    def finish(self) -> None:
        self._end(None)

    def fail(self, exc: BaseException) -> None:
        self._end(exc)

    def _end(self, item: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._end_error = item
        if self._moved is not None:  # (a late reader of the spool waits: as ``push`` asks)
            self._move()
        for r in self._readers:
            r._put(item)
        self._readers = []
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _reader_progressed(self) -> None:
        """Wake a waiting fetch once some live reader is no longer behind (or none is left)."""
        drained = self._drained
        if drained is not None and not drained.is_set():
            live = [r for r in self._readers if not r.detached]
            if not live or not all(r.behind for r in live):
                drained.set()

    def _remove(self, reader: Reader) -> None:
        if reader in self._readers:
            self._readers.remove(reader)
        if self._drained is not None:  # (a fetch waits for its readers: as ``Reader`` asks)
            self._reader_progressed()


@dataclass(frozen=True, slots=True)
class FlightHead:
    """The response head a flight received, and whether followers may be given it."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    shareable: bool
    store_detail: str  # "" when it is being stored, else the DontStore detail
    content_length: int | None
    vary: tuple[tuple[str, str], ...] = ()  # selecting values of the leader's request
    # The response as it is being stored, or as it arrived when it is not stored
    # (``proxy.policy.fill.arrived``); None for a head read from the store: its clients'
    # conditionals and ranges are answered from it as the head arrives, stored or not
    # (``proxy.policy.reply.reply_on_arrival``).
    response: StoredResponse | None = None
    # The body's length was known at the head (its Content-Length, no body to follow, or all of
    # it arrived with the head). Unknown (chunked), the head cannot say the response is stored:
    # the body may yet outgrow what the store keeps (cache.max_object), and storing it is then
    # given up while it streams.
    length_known: bool = True


@dataclass(frozen=True, slots=True)
class FlightResult:
    stored: bool
    detail: str = ""
    entry: Entry | None = None  # what the fill stored (readers that fell behind finish from it), or freshened


class Flight:
    def __init__(self, key: str, history_limit: int) -> None:
        loop = asyncio.get_running_loop()
        self.key = key
        self.head: asyncio.Future[FlightHead] = loop.create_future()
        # The leader's own copy of ``head`` (``lead``), set in the same step: awaited directly,
        # where ``shield(head)`` takes two turns of the event loop (the shield's callback, then
        # the task's wake-up) and each turn is a few ms under load; the leader's cancellation
        # cancels only its copy. None when the flight has no leader waiting (a refresh).
        self.lead: asyncio.Future[FlightHead] | None = None
        self.result: asyncio.Future[FlightResult] = loop.create_future()
        self.body = Broadcast(history_limit)
        self.task: asyncio.Task[None] | None = None
        self.followers = 0
        self.whole_followers = 0  # of them, those that asked for the whole object (not a range)
        # A fill held for another request's answer (``proxy.flight.MissPath.hold``): done once
        # it is told whether it fetches. Until then its followers' wait for the head has not
        # begun (the module docstring's bounded wait): None for any other flight.
        self.held: asyncio.Future[Any] | None = None
        # The loop's time when the flight's request went to the origin (``MissPath._origin``);
        # None until then: meanwhile it may wait for another worker's or node's fetch, and its
        # followers with it (``proxy.flight._followed_head``).
        self.sent: float | None = None
        # The store's purge epoch when that request went out (``Storage.epoch``); None until
        # then. A purge after it may cover the answer: a client arriving after that purge does
        # not take it (``MissPath.fetch``: before the head, when the purge names the key; at
        # the head, from its ``tags``, for the clients that joined after the purge).
        self.epoch: int | None = None
        # The tags of the response it stores, once its head has come (none when it stores none).
        self.tags: Collection[str] = ()
        # The flight's fetch is already a second try (its leader fetched again after another
        # fetch failed, or its worker did after the lease holder's did): its failure is every
        # follower's answer, as ``Attempt.again`` makes it the leader's (``fetches_again``).
        self.again = False
        # The flight failed with another worker's fetch's error (the lease holder's, or the
        # stop's word from it): its leader waited for that fetch as its followers did, and says
        # so as they do (Cache-Status ``collapsed``, cachegate_coalesced_requests_total).
        self.elsewhere = False
        # Reply headers prepared once for every follower (by the engine), by their variant.
        self.follower_headers: dict[Any, list[tuple[str, str]]] = {}
        self.spool: Any = None  # the BodySpool storing this flight's body, once there is one
        # The clients waiting for this flight's head, told of each interim (1xx) response the
        # origin sends before it: (status, reason, end-to-end fields).
        self.interim: list[Callable[[int, str, tuple[tuple[str, str], ...]], None]] = []
        # (A failed head must not log "exception never retrieved" when nobody waited: marked
        # retrieved where it fails, ``fail_head``, rather than by a done callback on ``head``
        # and ``result`` that ran on every flight: four Python-level calls a fill, measured
        # with ``scripts/bench-calls``; ``result`` is only ever given a result.)

    def led(self) -> asyncio.Future[FlightHead]:
        """The leader's copy of the head (made now: before anything can set the head)."""
        assert not self.head.done()
        lead = self.lead = asyncio.get_running_loop().create_future()
        return lead

    def set_head(self, head: FlightHead) -> None:
        self.head.set_result(head)
        lead = self.lead
        if lead is not None and not lead.done():
            lead.set_result(head)

    def fail_head(self, exc: BaseException) -> None:
        """The flight ended without a head (nothing when it had one)."""
        head = self.head
        if head.done():
            return
        head.set_exception(exc)
        head.exception()  # retrieved: nobody may wait for it
        lead = self.lead
        if lead is not None and not lead.done():
            lead.set_exception(exc)  # retrieved by the leader, which awaits it


def cut_off() -> ProxyStopping:
    """The error of a flight that the stop's deadline cut off (``Coalescer.close``)."""
    return ProxyStopping("the fetch was cut off at the stop's deadline")


# How many keys whose soft-purged response failed its refresh a worker remembers
# (``Coalescer.soft_failed_at``), and how many characters of key in all: a key may be up to
# 8 KB (``MAX_REQUEST_LINE``), so the count alone would let 65,536 of them hold about 0.5 GB;
# with both, the record holds at most about 16 MB of keys plus ~10 MB of dict and ints.
SOFT_FAILED_KEYS = 65_536
SOFT_FAILED_CHARS = 16 * 1024 * 1024


class Coalescer:
    def __init__(self, history_limit: int, hit_for_pass: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._flights: dict[str, Flight] = {}
        self._pass_until = PassMarks()
        # Hit-for-pass keys marked by a request that found nothing stored under the key: until
        # then, a plain request for them that the memory has nothing for is passed without the
        # directory lookup (``passes_unlooked``).
        self._unlooked_until = PassMarks()
        # Keys whose last stale-while-revalidate refresh failed: no other starts until then
        # (``refresh_failed``), on the monotonic clock as the hit-for-pass marks: a mark on the
        # wall clock held every refresh back for the length of a step of that clock backwards
        # (two days back: the copy served stale, UPDATING, for two days past its windows while
        # the mended origin was never asked). The whiles differ (a Retry-After), so the
        # front-first pruning may keep an expired mark behind a longer one: bounded all the
        # same, and ``holds`` drops an expired one when asked.
        self._refresh_failed_until = PassMarks()
        # The store's purge epoch when each of those marks was set: a purge since that covers
        # the stale response lifts its mark (``MissPath.refresh_held_back``). Pruned to the
        # marks kept whenever it holds twice as many keys.
        self._refresh_failed_at: dict[str, int] = {}
        # Keys whose soft-purged response's background refresh failed, with the store's purge
        # epoch then: that response is served stale only within its own windows from then on
        # (``proxy.policy.reuse.decide_lookup``'s ``soft_refresh_failed``), however long ago,
        # until something is stored under the key or a purge since covers it
        # (``MissPath.soft_refresh_failed``). At most ``SOFT_FAILED_KEYS`` keys of
        # ``SOFT_FAILED_CHARS`` in all (``_soft_failed_chars``), the oldest forgotten first:
        # that key's next request is served the old copy and refreshes it once more.
        self._soft_failed_at: dict[str, int] = {}
        self._soft_failed_chars = 0
        self._history_limit = history_limit
        self._hit_for_pass = hit_for_pass
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        self.closing = False  # ``close`` began: flights cut off now end with ``ProxyStopping``

    def get(self, key: str) -> Flight | None:
        return self._flights.get(key)

    @property
    def in_flight(self) -> int:
        """The flights whose task is still running (registered or not, retired or not)."""
        return len(self._tasks)

    def start(self, key: str, run: Callable[[Flight], Coroutine[Any, Any, None]]) -> Flight:
        """Start the one flight for ``key``; it removes itself when its body is done."""
        flight = Flight(key, self._history_limit)
        self._flights[key] = flight

        def settle() -> None:
            # The safety net under the flight's own end (proxy.flight), however it ended. What
            # that end did already is not built again to be dropped (the errors of a head and a
            # body that have ended: six Python-level calls a fill, ``scripts/bench-calls``).
            if self._flights.get(key) is flight:
                del self._flights[key]
            if not flight.head.done():
                flight.fail_head(self.headless())
            if not flight.body.ended:
                flight.body.fail(ResponseAborted("the fetch ended before its body did"))
            if not flight.result.done():
                flight.result.set_result(FlightResult(False, "ABORTED"))

        async def runner() -> None:
            try:
                await run(flight)
            except Exception:
                log.exception("the fetch for %s failed", key)
            finally:
                settle()

        def ended(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            # Cancelled before its first step, ``runner``'s finally never ran (cancelled later,
            # it did: ``settle`` again changes nothing).
            if task.cancelled():
                settle()

        flight.task = asyncio.get_running_loop().create_task(runner())
        self._tasks.add(flight.task)
        flight.task.add_done_callback(ended)
        return flight

    def retire(self, flight: Flight) -> None:
        """Stop handing ``flight`` to newcomers: its body is complete and the store has it.

        A request that arrives after the response was delivered must look at the
        store (and decide afresh whether the stored response is fresh for it),
        not replay a flight that may have fetched an already stale response.
        """
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    def mark_pass(self, key: str, *, found_nothing: bool = False) -> None:
        """Remember ``key`` as uncacheable for a while (hit-for-pass). ``found_nothing``: the
        request that met the uncacheable response had found nothing stored under the key, so
        for the same while a plain request for it may skip the lookup (``passes_unlooked``);
        a mark without it (a pass that did not look, another worker's word) does not extend
        that, so a key stored meanwhile by another process is passed for at most that while."""
        if self._hit_for_pass > 0:
            now = self._clock()
            until = now + self._hit_for_pass
            self._pass_until.set(key, until, now)
            if found_nothing:
                self._unlooked_until.set(key, until, now)

    def clear_pass(self, key: str) -> None:
        self._pass_until.discard(key)
        self._unlooked_until.discard(key)

    def forget_unlooked(self, key: str) -> None:
        """Something is stored under ``key`` in this process now: its requests look again."""
        self._unlooked_until.discard(key)

    def passes_unlooked(self, key: str) -> bool:
        """Whether a plain request for ``key`` that the memory has nothing for is passed without
        a lookup: hit-for-pass, marked by a request that found nothing stored, within the mark's
        while (Varnish's hit-for-pass object does the same: it shadows the key for its TTL, but
        here what the machine's memory holds is served: the fast path serves it, and another
        worker's fill or two combined parts put it there without this process's flights). Saves
        a pass-through the directory lookup and the lookup decision."""
        return self._unlooked_until.holds(key, self._clock())

    def is_pass(self, key: str) -> bool:
        return self._pass_until.holds(key, self._clock())

    def refresh_failed(self, key: str, wait: float, epoch: int, *, soft: bool = False) -> None:
        """A background refresh of ``key`` failed, the store's purge epoch being ``epoch``: the
        next waits ``wait`` seconds (``proxy.policy.reuse.refresh_retry_at``), of monotonic time
        (a step of the wall clock neither stretches nor shortens it), unless a purge since
        covers the response (``refresh_held_back``). ``soft``: the stale response was
        soft-purged (``soft_failed_at``)."""
        marks, at = self._refresh_failed_until, self._refresh_failed_at
        now = self._clock()
        marks.set(key, now + wait, now)
        at[key] = epoch
        if len(at) > 2 * len(marks) + 16:
            self._refresh_failed_at = {k: e for k, e in at.items() if marks.holds(k, now)}
        if soft:
            soft_at = self._soft_failed_at
            if soft_at.pop(key, None) is not None:  # (to the end: the newest)
                self._soft_failed_chars -= len(key)
            soft_at[key] = epoch
            self._soft_failed_chars += len(key)
            while len(soft_at) > SOFT_FAILED_KEYS or self._soft_failed_chars > SOFT_FAILED_CHARS:
                oldest = next(iter(soft_at))
                del soft_at[oldest]
                self._soft_failed_chars -= len(oldest)

    def soft_failed_at(self, key: str) -> int | None:
        """The store's purge epoch when a background refresh of the soft-purged response under
        ``key`` failed; None: none has since something was stored under it (``refresh_ok``)."""
        return self._soft_failed_at.get(key)

    def refresh_held_back(self, key: str) -> tuple[float, int] | None:
        """When a refresh of ``key`` failed recently enough that none starts now: for how many
        seconds more, and the store's purge epoch at the failure (a purge since may lift it);
        else None."""
        marks, now = self._refresh_failed_until, self._clock()
        if not marks.holds(key, now):
            return None
        return marks.until(key) - now, self._refresh_failed_at.get(key, 0)

    def refresh_ok(self, key: str) -> None:
        """Something is stored under ``key`` anew, or a purge covered it: its next refresh need
        not wait. (Every stored fill asks: nothing to do unless a refresh failed lately, each
        mark having its epoch in ``_refresh_failed_at``: three calls a fill fewer.)"""
        at = self._refresh_failed_at
        if at:
            self._refresh_failed_until.discard(key)
            at.pop(key, None)
        soft = self._soft_failed_at
        if soft and soft.pop(key, None) is not None:
            self._soft_failed_chars -= len(key)

    def headless(self) -> Exception:
        """What the clients of a flight that ended without a response head are told: that the
        proxy is stopping when ``close`` cut it off (a 503, or stale-if-error; not an origin
        error), else that it ended without one."""
        if self.closing:
            return cut_off()
        return ConnectionError("flight ended without a response")

    async def close(self, grace: float = 5.0) -> None:
        self.closing = True
        tasks = list(self._tasks)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
