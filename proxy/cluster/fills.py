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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from proxy.storage.entry import Entry


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


Lookup = Found | Locked | Contended | None


class SharedCache(Protocol):
    """The shared tier as the engine uses it (``proxy.cluster.shared.SharedTier``)."""

    max_object: int

    async def lookup(self, key: str, lock_for: float, lock_only: bool = False) -> Lookup: ...

    async def wait_filled(self, key: str, wait: float) -> str | None: ...

    async def write(self, entry: Entry, body: bytes, lock: Locked, now: float) -> bool: ...

    async def release(self, key: str, lock: Locked, outcome: str) -> None: ...


class NodeGate(Protocol):
    """What the engine asks this process's member of the cluster (``proxy.cluster.node``)."""

    def hits_held(self) -> bool: ...  # its heartbeat lapsed: hits wait until it caught up (cheap)

    async def caught_up(self) -> None: ...  # that wait (bounded)

    @property
    def invalidations_pending(self) -> bool: ...  # the shared tier may hold what they cover
