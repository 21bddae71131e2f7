"""What the engine sees of the shared tier: a narrow seam, with no Redis in it.

``Engine.shared`` is None without ``shared_cache``; with it, a flight's leader asks
``lookup`` before the origin and gets one of these decisions, which the engine
``match``es:

- ``Found``: another node stored the key: its variants and bodies (the engine keeps
  one in its own tiers if it is a fresh hit for the request, else it fetches);
- ``Locked``: nobody has it and this node now holds the key's cluster-wide fill
  lock (a fencing token): fetch, write the fill through, then ``release``;
- ``Contended``: another node holds the lock: ``wait_filled`` (woken by pub/sub),
  then look again; a bounded wait falls back to fetching here;
- ``None``: the shared tier cannot be asked (Redis away or slow): fetch here.

A ``Locked`` fill is carried out through a ``WriteThrough``: its release publishes one word to
the waiters, ``stored`` (look again: it is there), else ``failed``, ``too_large`` or
``not_shared``, on which they fetch from the origin at once. The last two are said as soon as
they are known, at the response's head (a Content-Length over what is shared, a response not
stored at all: ``private``, ``Set-Cookie``, ...) or once a body of unknown length grows past it,
not when the body ends: the other nodes waited out a whole download that could never be shared
(a 400 KB body over 2.3 s cost another node 4.3 s), and every fill longer than ``lock_timeout``
cost each of them the whole ``lock_timeout``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from proxy.storage.entry import Entry

# What a fill lock's release tells the nodes waiting on it (``SharedCache.wait_filled``).
STORED = "stored"  # written through: look again
FAILED = "failed"  # not written (the origin failed, a purge voided it, ...): fetch
TOO_LARGE = "too_large"  # its body is bigger than what is shared: fetch at once
NOT_SHARED = "not_shared"  # it is not stored (private, Set-Cookie, no room ...): fetch at once


@dataclass(frozen=True, slots=True)
class Found:
    variants: tuple[tuple[Entry, bytes], ...]  # each stored variant with its body


@dataclass(frozen=True, slots=True)
class Locked:
    token: int  # fencing token: only its holder's fill is written through
    purges: int  # the shared tier's purge counter when the lock was taken (a purge since voids the fill)


@dataclass(frozen=True, slots=True)
class Contended:
    wait: float  # seconds the holder's lock has left
    holder: int = 0  # the lock's fencing token (0: not known)


Lookup = Found | Locked | Contended | None


class SharedCache(Protocol):
    """The shared tier as the engine uses it (``proxy.cluster.shared.SharedTier``)."""

    max_object: int

    async def lookup(self, key: str, lock_for: float, lock_only: bool = False) -> Lookup: ...

    async def wait_filled(self, key: str, wait: float, holder: int = 0) -> str | None: ...

    async def write(self, entry: Entry, body: bytes, lock: Locked, now: float) -> bool: ...

    async def release(self, key: str, lock: Locked, outcome: str) -> None: ...


class NodeGate(Protocol):
    """What the engine asks this process's member of the cluster (``proxy.cluster.node``)."""

    def hits_held(self) -> bool: ...  # its heartbeat lapsed: hits wait until it caught up (cheap)

    async def caught_up(self) -> None: ...  # that wait (bounded)

    @property
    def invalidations_pending(self) -> bool: ...  # the shared tier may hold what they cover

    # How far this machine's clock is ahead of Redis's, last measured (None: not known here:
    # before a heartbeat, or in a worker, whose supervisor measures it).
    clock_offset: float | None


class WriteThrough:
    """One fill under the cluster's fill lock: written through when it ends stored with a body
    of at most ``limit`` bytes at hand in memory, else the lock is let go (and its waiters told)
    as soon as that is known (``let_go``), the body still streaming to this node's clients.
    ``limit`` is the least of ``shared_max_object`` and the biggest body a spool keeps in
    memory (a bigger one is not at hand to write)."""

    def __init__(self, shared: SharedCache, key: str, lock: Locked, limit: int,
                 clock: Callable[[], float]) -> None:
        self.shared = shared
        self.key = key
        self.lock = lock
        self.limit = limit
        self._clock = clock
        self._write: asyncio.Future[bool] | None = None
        self._released: asyncio.Future[None] | None = None  # let go early

    def head(self, storing: bool, length: int | None, too_large: bool = False) -> None:
        """The response's head: let go at once when it will not be stored here (``storing``
        False), or its length says it is too large to share (or to store: ``too_large``)."""
        if not storing:
            self.let_go(NOT_SHARED)
        elif too_large or (length is not None and length > self.limit):
            self.let_go(TOO_LARGE)

    def let_go(self, outcome: str) -> None:
        """Release the lock now, telling the waiters ``outcome`` (once: later calls do nothing)."""
        if self._released is None and self._write is None:
            self._released = asyncio.ensure_future(self.shared.release(self.key, self.lock, outcome))

    def filled(self, entry: Entry, body: bytes | None) -> None:
        """The fill was stored here, its body in memory or not (``body`` None): write it through."""
        if self._released is not None or self._write is not None:
            return
        if body is None or len(body) > self.limit:
            self.let_go(TOO_LARGE)  # (a body whose growth was not seen: counted all the same)
            return
        self._write = asyncio.ensure_future(self.shared.write(entry, body, self.lock, self._clock()))

    async def release(self) -> None:
        """The fill is over: the lock's release (unless it was let go early, then that one)."""
        if self._released is not None:
            await self._released
            return
        written = False
        try:
            written = self._write is not None and await self._write
        finally:
            await self.shared.release(self.key, self.lock, STORED if written else FAILED)
