"""The engine without sockets or disks: an in-memory store (the engine's ``Store`` seam), an
origin that answers from a script and records what it received, and a clock the test moves.

Only what the engine talks to is faked; the policy, the coalescer, the upstream response
wrapper (``proxy.upstream.UpstreamResponse``) and the engine itself are the real ones.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.cluster.fills import Found, Locked
from proxy.config import Overrides, load_config
from proxy.engine import ClientRequest, Engine, Reply
from proxy.errors import UpstreamConnectError, UpstreamError
from proxy.leases import Busy, Granted, Waiting
from proxy.metrics import Metrics
from proxy.policy.messages import RequestHead
from proxy.policy.request import Message, normalise_request
from proxy.storage.entry import Entry
from proxy.storage.memory import Cached
from proxy.storage.persist import merge_variant
from proxy.upstream import Upstream, UpstreamResponse
from tests.harness import Clock

HOST = "site.test"
ORIGIN = "http://origin.test"


# -- the store ----------------------------------------------------------------------------------

class FakeSpool:
    """A body being received, in memory (``proxy.storage.writes.BodySpool``'s contract)."""

    def __init__(self, store: FakeStore, entry: Entry, expected_length: int | None) -> None:
        self.store = store
        self.entry = entry
        self.expected_length = expected_length
        self.doomed = False
        self.chunks: list[bytes] = []
        self.size = 0
        self.too_large = expected_length is not None and expected_length > store.max_object
        self.discarded = False
        self.refused = ""
        self.no_room = False

    async def write(self, chunk: bytes) -> bool:
        if self.store.full:
            raise OSError(28, "No space left on device")
        if self.too_large:
            return False
        self.size += len(chunk)
        if self.size > self.store.max_object:
            self.too_large = True
            self.discard()
            return False
        self.chunks.append(chunk)
        return True

    @property
    def complete(self) -> bool:
        return not self.too_large and (self.expected_length is None or self.expected_length == self.size)

    def body_bytes(self) -> bytes | None:
        return b"".join(self.chunks)

    def discard(self) -> None:
        self.discarded = True
        self.chunks = []


@dataclass
class MemoryLimits:
    max_object: int = 1 << 20
    arena: Any = None


class FakeStore:
    """Each key's variants in a dict; every body in memory. ``full``: spool writes fail (a full disk)."""

    def __init__(self, max_object: int = 1 << 20) -> None:
        self.variants: dict[str, tuple[Cached, ...]] = {}
        self.memory = MemoryLimits()
        self.max_object = max_object
        self.epoch = 0
        self.memory_only = False
        self.spool_in_memory = 1 << 30  # (every body is received in memory here)
        self.full = False
        self.puts: list[Entry] = []  # every entry stored, in order
        self.updates: list[Entry] = []
        self._ids = itertools.count(1)

    # reading
    def memory_get(self, key: str) -> tuple[Cached, ...] | None:
        return self.variants.get(key)

    memory_copied = memory_get  # (bodies are bytes here already)

    def fresh_view(self, key: str) -> None:
        return None  # the fast path is not the engine's: tests/test_fastpath.py

    def alive(self, cached: Cached) -> bool:
        return True  # no shared memory here: a variant's record never dies under a read

    def serve_from(self, key: str, slot: Any, cached: Cached, max_file: int | None) -> tuple[bool, None]:
        return True, None

    def absent(self, key: str) -> bool:
        return key not in self.variants

    async def get(self, key: str, *, bodies: bool = False) -> tuple[Cached, ...]:
        return self.variants.get(key, ())

    async def reread(self, key: str) -> tuple[Cached, ...]:
        return self.variants.get(key, ())

    async def open_body(self, cached: Cached) -> bytes | IO[bytes] | None:
        return bytes(cached.body) if cached.body is not None else None

    def drop_body_file(self, entry: Entry) -> None:
        pass  # no files here

    def writing(self, key: str) -> list[Any]:
        return []

    def writing_urls(self, urls: Iterable[str]) -> list[Any]:
        return []

    # writing
    def room(self, entry: Entry) -> int:
        return self.max_object

    def joining(self, since: int, key: str) -> int | None:
        return since  # no purges here

    def purged_since(self, since: int, key: str, tags: Collection[str], until: int | None = None) -> bool:
        return False

    def spool(self, entry: Entry, expected_length: int | None, since: int | None = None) -> FakeSpool:
        return FakeSpool(self, entry, expected_length)

    def finalize(self, entry: Entry, spool: FakeSpool) -> Entry | None:
        if not spool.complete or spool.doomed:
            spool.discard()
            return None
        return replace(entry, body_id=f"b{next(self._ids)}", body_size=spool.size)

    def put_memory(self, entry: Entry, spool: FakeSpool) -> bool:
        body = spool.body_bytes()
        assert body is not None
        current = self.variants.get(entry.key, ())
        merged, _ = merge_variant(tuple(c.entry for c in current), entry)
        held = {c.entry.body_id: c for c in current}
        self.variants[entry.key] = tuple(Cached(e, body) if e.body_id == entry.body_id else held[e.body_id]
                                         for e in merged)
        self.puts.append(entry)
        return True

    async def put_disk(self, entry: Entry, spool: FakeSpool) -> bool:
        spool.discard()
        return True

    async def commit(self, entry: Entry, spool: FakeSpool) -> bool:
        final = self.finalize(entry, spool)
        return final is not None and self.put_memory(final, spool)

    async def update_many(self, entries: Sequence[Entry]) -> None:
        for entry in entries:
            self.updates.append(entry)
            self.variants[entry.key] = tuple(Cached(entry, c.body) if c.entry.body_id == entry.body_id else c
                                             for c in self.variants.get(entry.key, ()))

    async def invalidate(self, urls: Sequence[str]) -> None:
        """The engine's invalidation (the runtime's purge of these URLs, in a real proxy)."""
        wanted = set(urls)
        await self.delete([k for k, vs in self.variants.items() if any(c.entry.url in wanted for c in vs)])

    async def delete(self, keys: Iterable[str], soft: bool = False) -> int:
        return sum(self.variants.pop(k, None) is not None for k in list(keys))

    async def forget_gone(self, key: str) -> None:
        self.variants.pop(key, None)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    # for the tests
    def bodies(self) -> list[bytes]:
        return [bytes(c.body) for vs in self.variants.values() for c in vs if c.body is not None]


# -- the origin ---------------------------------------------------------------------------------

@dataclass
class Answer:
    """One scripted response: its head, its body in chunks, and how it ends.

    ``gate``: the head is sent only once it is set (so a test can line up several clients);
    ``hold``: each chunk after the first waits for one ``release()`` (a slow origin);
    ``break_after``: the connection breaks after that many chunks; ``error``: no head at all."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    reason: str = "OK"
    gate: asyncio.Event | None = None
    hold: asyncio.Queue[None] | None = None
    break_after: int | None = None
    error: UpstreamError | None = None
    whole: bool = False  # the body arrived with the head (``complete_body``)

    def release(self, n: int = 1) -> None:
        assert self.hold is not None
        for _ in range(n):
            self.hold.put_nowait(None)


def answer(status: int = 200, body: bytes = b"", headers: dict[str, str] | None = None,
           chunk: int = 0, **kwargs: Any) -> Answer:
    """A scripted response with ``body`` (in chunks of ``chunk`` bytes; 0: one chunk) and its length."""
    fields = {"Content-Length": str(len(body)), **(headers or {})}
    size = chunk or max(len(body), 1)
    chunks = [body[i:i + size] for i in range(0, len(body), size)]
    return Answer(status, fields, chunks, **kwargs)


class _Wire:
    """What ``UpstreamResponse`` wraps (``proxy.http_client.Response``), playing an ``Answer``."""

    def __init__(self, a: Answer) -> None:
        self.a = a
        self.status = a.status
        self.reason = a.reason
        self.headers = CIMultiDictProxy(CIMultiDict(a.headers))
        self.close_delimited_tls = False  # a plain-HTTP origin
        self.head_method = False
        self.stray = 0  # nothing after it
        self.sent = 0
        self.discarded = False

    def complete_body(self) -> bytes | None:
        return b"".join(self.a.chunks) if self.a.whole else None

    def arrived_length(self) -> int | None:
        return sum(map(len, self.a.chunks)) if self.a.whole else None

    async def read_chunk(self) -> bytes:
        a = self.a
        if a.break_after is not None and self.sent >= a.break_after:
            raise OSError("connection reset by the origin")
        if self.sent >= len(a.chunks):
            return b""
        if self.sent > 0 and a.hold is not None:
            await a.hold.get()
        chunk = a.chunks[self.sent]
        self.sent += 1
        return chunk

    def discard(self) -> None:
        self.discarded = True


@dataclass
class Sent:
    method: str
    target: str
    headers: CIMultiDictProxy[str]


class FakeOrigin:
    """The upstream pool's ``send``: answers each request with the next scripted ``Answer`` for
    its path (the last one again when the script runs out), and records what it received."""

    def __init__(self) -> None:
        self.script: dict[str, list[Answer]] = {}
        self.sent: list[Sent] = []
        self.upstream = Upstream(URL(ORIGIN))
        self.arrived = asyncio.Event()  # set at each request
        self.body_errors: list[UpstreamError] = []
        self.wires: list[_Wire] = []

    def route(self, path: str, *answers: Answer) -> None:
        self.script[path] = list(answers)

    def count(self, path: str) -> int:
        return sum(1 for s in self.sent if s.target.split("?")[0] == path)

    async def send(self, method: str, target: str, headers: list[tuple[str, str]],
                   body: AsyncIterable[bytes] | bytes | None = None, on_interim: Any = None
                   ) -> UpstreamResponse:
        self.sent.append(Sent(method, target, CIMultiDictProxy(CIMultiDict(headers))))
        self.arrived.set()
        answers = self.script[target.split("?")[0]]
        a = answers.pop(0) if len(answers) > 1 else answers[0]
        if a.gate is not None:
            await a.gate.wait()
        if a.error is not None:
            raise a.error
        wire = _Wire(a)
        self.wires.append(wire)
        return UpstreamResponse(wire, self.upstream, self)

    def _done(self, upstream: Upstream) -> None:
        pass  # the pool's bookkeeping of connections in use

    def _body_error(self, upstream: Upstream, exc: UpstreamError) -> None:
        self.body_errors.append(exc)  # the pool's count of bodies that failed after their head

    def snapshot(self) -> list[dict[str, Any]]:
        return []


# -- leases held by another worker ---------------------------------------------------------

class FakeLeases:
    """``proxy.leases.LeaseClient`` as another worker would make it behave: each ``acquire``
    answers with the next of ``answers``; ``released`` records every release."""

    def __init__(self, *answers: Granted | Waiting | Busy | None) -> None:
        self.answers = list(answers)
        self.released: list[tuple[str, int, str]] = []  # (key, token, outcome)
        self.details: list[str] = []  # the Cache-Status detail of each release ("" but for an error)
        self.in_body: list[bool] = []  # whether each release's error came after the origin's head
        self.heads: list[tuple[str, bool]] = []
        self.fetch_froms: list[tuple[str, float]] = []  # (key, delay): ``LeaseTable.fetch_from``

    async def acquire(self, key: str, wait: bool = True) -> Granted | Waiting | Busy | None:
        return self.answers.pop(0)

    async def await_fetch(self, key: str, deadline: float) -> bool:
        """The other worker's fetch does not end before ``deadline``: nothing stored."""
        await asyncio.sleep(max(0.0, deadline - asyncio.get_running_loop().time()))
        return False

    def fetching_elsewhere(self, key: str) -> bool:
        """No other worker held the key's lease when this one looked (a range miss's look):
        ``acquire``'s answers say what it finds when it asks, a moment later."""
        return False

    async def wait(self, key: str, waiting: Waiting, deadline: float,
                   fetch_wait: float | None = None) -> dict[str, Any]:
        """The word the wait was given, or ``timeout`` at ``deadline`` (no table to look at, nor a
        holder's ``fetch_from`` to wait for)."""
        left = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            return await asyncio.wait_for(asyncio.shield(waiting.outcome), left)
        except TimeoutError:
            return {"outcome": "timeout"}

    def forget(self, key: str, waiting: Waiting) -> None:
        pass

    async def close(self, grace: float) -> None:
        pass

    def head(self, key: str, lease: Granted, shareable: bool, pass_: bool, status: int = 0) -> None:
        self.heads.append((key, shareable))

    def fetch_from(self, key: str, lease: Granted, delay: float) -> None:
        self.fetch_froms.append((key, delay))

    def release(self, key: str, lease: Granted, outcome: str, status: int = 0, message: str = "",
                detail: str = "", public: str = "", in_body: bool = False) -> None:
        self.released.append((key, lease.token, outcome))
        self.details.append(detail)
        self.in_body.append(in_body)


def told(outcome: str, **more: Any) -> Waiting:
    """A wait on another worker's lease that has already ended with ``outcome``."""
    fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    fut.set_result({"outcome": outcome, **more})
    return Waiting(7, fut)


# -- the engine ---------------------------------------------------------------------------------

@dataclass
class Rig:
    engine: Engine
    store: FakeStore
    origin: FakeOrigin
    clock: Clock

    async def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Reply:
        return await self.engine.handle(self.request(path, headers, method))

    def request(self, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> ClientRequest:
        """A client's request as the web layer hands it over: normalised (``proxy.policy.request``)."""
        fields = CIMultiDictProxy(CIMultiDict({"Host": HOST, **(headers or {})}))
        head = normalise_request(Message(method, path, (1, 1), fields), secure=False, trusted=False,
                                 listener=self.engine.settings.client_listener)
        assert isinstance(head, RequestHead), head
        return ClientRequest(head, "192.0.2.1")

    def outcomes(self) -> dict[str, float]:
        """How the engine's flights ended so far: ``cachegate_flights_total`` by outcome (the
        outcomes none ended with left out: every one is exported at 0 from start)."""
        return {s.labels["outcome"]: s.value for m in self.engine.metrics.flights.collect()
                for s in m.samples if s.name.endswith("_total") and s.value}

    def counted(self, metric: str, **labels: str) -> float:
        """A counter of the engine's metrics (``proxy.metrics.Metrics``), by its labels."""
        return sum(s.value for m in getattr(self.engine.metrics, metric).collect() for s in m.samples
                   if s.name.endswith("_total") and s.labels == labels)

    async def settled(self, **expected: int) -> None:
        """Wait until the flights that ended are exactly ``expected`` (by outcome)."""
        for _ in range(200):
            if self.outcomes() == expected:
                return
            await asyncio.sleep(0)
        assert self.outcomes() == expected


def make_rig(tmp_path: Path, config: str = "", rules: str | None = None,
             max_object: int = 1 << 20) -> Rig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    text = config
    if rules is not None:
        (tmp_path / "rules.yaml").write_text(rules)
        text += "\nrules: [rules.yaml]\n"
    path = tmp_path / "cachegate.yaml"
    path.write_text(text or "{}\n")
    settings = load_config(str(path), Overrides(upstreams=(ORIGIN,)))
    store, origin, clock = FakeStore(max_object), FakeOrigin(), Clock()
    engine = Engine(settings, store, origin, Metrics(), invalidate=store.invalidate, clock=clock)
    return Rig(engine, store, origin, clock)


async def read(reply: Reply) -> bytes:
    """The whole body of a reply, however the engine gave it."""
    body = reply.body
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    if hasattr(body, "read"):
        body.seek(reply.offset)
        return body.read()
    return b"".join([c async for c in body])


def upstream_error(text: str = "connection refused") -> UpstreamError:
    return UpstreamConnectError(f"{ORIGIN}: {text}")


# -- the cluster's shared tier ----------------------------------------------------------------

class FakeShared:
    """``proxy.cluster.fills.SharedCache`` in memory: what a node writes through, the next finds;
    ``before_answer`` (a coroutine function, run once) runs while a lookup is "in flight"
    (between Redis executing it and the node reading the answer)."""

    max_object = 1 << 20

    def __init__(self) -> None:
        self.stored: dict[str, tuple[Entry, bytes]] = {}
        self.released: list[tuple[str, str]] = []  # (key, outcome) of each fill lock
        self.before_answer: Any = None

    async def lookup(self, key: str, lock_for: float, lock_only: bool = False) -> Found | Locked:
        found = self.stored.get(key)
        if self.before_answer is not None:
            hook, self.before_answer = self.before_answer, None
            await hook()
        if found is not None and not lock_only:
            return Found((found,))
        return Locked(1, 0)

    async def wait_filled(self, key: str, wait: float, holder: int = 0) -> str | None:
        return None

    async def write(self, entry: Entry, body: bytes, lock: Locked, now: float) -> bool:
        self.stored[entry.key] = (entry, body)
        return True

    async def release(self, key: str, lock: Locked, outcome: str) -> None:
        self.released.append((key, outcome))


async def until(condition: Callable[[], bool]) -> None:
    """Let the event loop run until ``condition`` holds (work a flight does after it ended)."""
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0)
    assert condition()
