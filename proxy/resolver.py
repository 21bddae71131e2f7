"""An upstream's addresses: its host name looked up, kept, refreshed, and taken in turn.

An upstream given by an IP literal has that one address (an IPv6 zone, ``[fe80::1%25eth0]``,
becomes the address's scope). An upstream given by a name has the addresses its lookup
(``getaddrinfo``: /etc/hosts, then DNS) gave, kept in ``Addresses``:

- **One lookup in flight per name.** Every connect that needs the name waits for the same
  lookup: 40 concurrent requests on a cold pool made 40 lookups. It matters beyond the
  resolver's load: uvloop runs ``getaddrinfo`` in libuv's pool of 4 threads, and the
  lookups of a name whose DNS server does not answer (each holding a thread for the
  resolver's own timeout, 10 s by default) took every thread, so a healthy upstream's
  lookups waited behind them and its requests timed out. A caller that gives up (its
  connect timeout) does not cancel the lookup: the thread could not be freed anyway.
- **Refreshed in the background, served while stale.** The addresses are looked up again
  every ``DNS_TTL`` (60 s; ``getaddrinfo`` tells no record's TTL) by a timer, whether
  requests come or not (as nginx's ``resolve``), never by a request: a connect uses the
  addresses known, however old, while the refresh runs.
- **Kept through an outage.** A refresh that fails without an answer about the name (no
  answer in time, SERVFAIL, ``EAI_AGAIN``: the resolver's trouble) keeps the last good
  addresses, and the name is looked up again every ``DNS_RETRY`` (5 s) until it resolves.
  Only a definite answer that the name has no address (NXDOMAIN, NODATA: ``EAI_NONAME``,
  ``EAI_NODATA``) drops them, as nginx's ``resolve`` does. Before, every connect after
  ``DNS_TTL`` asked the resolver again, and a resolver outage longer than a minute took out
  an upstream whose address was known and whose origin was up.
- **Failures remembered briefly.** With no address known, a failed lookup (or one that kept
  a caller past its deadline) is remembered for ``DNS_RETRY``: connects fail at once
  meanwhile instead of each asking (or waiting for) a resolver that is down.
- **Said once.** One WARNING when lookups of a name start failing (naming the failure, and
  whether the last known addresses are still used), one when it resolves again; an address
  change is logged at INFO. Not one line per request.
- **Taken in turn, a failed address last.** Each new connection starts at the next address
  (round robin), so a name with several live addresses spreads its connections over them, as
  nginx makes one peer of each address; Happy Eyeballs (``proxy.http_client``) then tries the
  others, 0.25 s apart at most, when the first does not answer. An address that failed to
  connect (refused, timed out, or passed by a later address while it had not answered: the
  pool tells ``tried``) goes behind the others, in ``getaddrinfo``'s order (RFC 6724), for
  ``ADDRESS_RETRY`` (10 s: nginx's defaults for each peer of a name, ``max_fails=1`` and
  ``fail_timeout=10s``) or until a connection to it succeeds; the turn goes round the others. Taken
  in turn regardless, a black-holed address was first for one new connection in N, each paying
  the stagger delay (and a ``504`` under a connect timeout shorter than it). After 10 s one
  connection tries it first again, at the cost of one stagger delay if it is still down.

What a change means for pooled connections is the pool's (``on_change`` is told the
addresses now listed: ``HostPool`` closes idle connections to any other and does not pool
busy ones again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

log = logging.getLogger("cachegate.upstream")

# How often a name's addresses are looked up again (``getaddrinfo`` gives no TTL).
DNS_TTL = 60.0
# How long a failed lookup is remembered, and how often a failing name is looked up again.
DNS_RETRY = 5.0
# How long an address that failed to connect is tried after the others (``Addresses.tried``).
ADDRESS_RETRY = 10.0

# What ``getaddrinfo`` says when the name definitely has no address (NXDOMAIN, or no A/AAAA
# record): the addresses known are dropped. Any other failure is the resolver's (no answer,
# SERVFAIL: EAI_AGAIN; EAI_FAIL) and keeps them.
NO_SUCH_NAME = frozenset(
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None)

# (family, type, proto, canonname, sockaddr), as ``getaddrinfo`` gives them.
AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]
# An address as a connection's peer is compared to the listed ones: (IP without zone, port).
Peer = tuple[str, int]


def peer_of(sockaddr: tuple[Any, ...]) -> Peer:
    """The (address, port) of a socket address, IPv6 scope left out."""
    return str(sockaddr[0]).split("%", 1)[0], int(sockaddr[1])


def literal(host: str, port: int) -> list[AddrInfo] | None:
    """The one address of an IP literal host (yarl's ``raw_host``: an IPv6 zone percent-encoded,
    ``fe80::1%25eth0``), or None for a name.

    >>> literal("127.0.0.1", 80)[0][4], literal("::1", 8080)[0][4], literal("example.com", 80)
    (('127.0.0.1', 80), ('::1', 8080, 0, 0), None)
    """
    with contextlib.suppress(OSError):
        socket.inet_pton(socket.AF_INET, host)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    sockaddr = scoped(unquote(host), port)
    if sockaddr is None:
        return None
    return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)]


def scoped(host: str, port: int) -> tuple[str, int, int, int] | None:
    """The socket address of an IPv6 address with an optional zone (``fe80::1%eth0``, decoded),
    or None when it is none (or names no interface here: left to getaddrinfo, whose failure says
    so). The zone is in the address text too, as its number: uvloop (0.23) parses the text of a
    socket address again and drops the fourth element, so ``(fe80::1, P, 0, 3)`` connected
    without a scope (EINVAL: the upstream was never reached); ``fe80::1%3`` keeps it in both.

    >>> scoped("::1", 80), scoped("::1%1", 80), scoped("127.0.0.1", 80)
    (('::1', 80, 0, 0), ('::1%1', 80, 0, 1), None)
    """
    address, _, zone = host.partition("%")
    try:
        socket.inet_pton(socket.AF_INET6, address)
    except OSError:
        return None
    if not zone:
        return address, port, 0, 0
    try:
        scope = int(zone) if zone.isdigit() else socket.if_nametoindex(zone)
    except OSError:
        return None
    return f"{address}%{scope}", port, 0, scope


class LookupFailed(Exception):
    """No address of the name is known: its lookup failed (``timeout`` False) or did not answer
    in time (True). The message says which, and names the host. ``definite``: the resolver
    answered that the name has no address (``NO_SUCH_NAME``), not the resolver's own trouble."""

    def __init__(self, message: str, timeout: bool, definite: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.definite = definite


def _shown(infos: list[AddrInfo]) -> str:
    return ", ".join(dict.fromkeys(peer_of(i[4])[0] for i in infos))


def _why(exc: BaseException) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


class Addresses:
    """The addresses of one upstream host (module docstring). ``get`` is what a connect awaits."""

    def __init__(self, name: str, host: str, port: int, on_change: Callable[[frozenset[Peer]], None],
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name  # the upstream, for the log
        self.host = host
        self.port = port
        self._on_change = on_change
        self._clock = clock
        self.fixed = literal(host, port)  # an IP literal: never looked up
        self.known: list[AddrInfo] | None = self.fixed
        self.resolved_at = 0.0
        # The last failure while nothing is known, remembered for DNS_RETRY: (when, why, timeout,
        # definite).
        self._failure: tuple[float, str, bool, bool] | None = None
        self._lookup: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._next = 0  # where the next connection starts in the list
        self._failing: dict[Peer, float] = {}  # address -> when it last failed to connect
        self._warned: str | None = None  # the failure warned of (once per streak)
        self._closed = False

    @property
    def waiting(self) -> bool:
        """A lookup is in flight and no address is known: a connect now waits for it."""
        return self._lookup is not None and self.known is None

    async def get(self) -> list[AddrInfo]:
        """The addresses to try for a new connection, starting at the next one in turn; raises
        ``LookupFailed`` when none is known. Waits only when none is known yet."""
        known = self.known
        if known is None:
            known = await self._first()
        if len(known) == 1:
            return known
        failed: list[AddrInfo] = []
        if self._failing:
            since = self._clock() - ADDRESS_RETRY
            for peer, when in list(self._failing.items()):
                if when <= since:
                    del self._failing[peer]
            failed = [i for i in known if peer_of(i[4]) in self._failing]
            if failed and len(failed) < len(known):
                known = [i for i in known if peer_of(i[4]) not in self._failing]
            else:
                failed = []  # every address failed (or none still counts): all in turn
        count = len(known)
        start = self._next % count
        self._next = start + 1
        return known[start:] + known[:start] + failed

    def tried(self, attempted: list[Peer], winner: Peer | None) -> None:
        """A connect tried the ``attempted`` addresses, in order, and ``winner`` connected (None:
        none did). Each address tried before the winner failed, or had not answered when a later
        one did: it goes behind the others for ADDRESS_RETRY (``get``); the winner is back in
        turn. One started after the winner is not marked: it was only slower to answer (a live
        address a short connect timeout's stagger started was marked, and the name's traffic
        went to its first address alone, two connects each)."""
        now = self._clock()
        before = attempted[:attempted.index(winner)] if winner in attempted else attempted
        for peer in before:
            self._failing[peer] = now
        if winner is not None:
            self._failing.pop(winner, None)

    async def _first(self) -> list[AddrInfo]:
        failure = self._failure
        if failure is not None and self._clock() - failure[0] < DNS_RETRY:
            raise LookupFailed(failure[1], failure[2], failure[3])
        task = self._lookup or self._start()
        await asyncio.wait((task,))  # (cancelling this wait leaves the lookup to the others)
        if self._closed:
            raise LookupFailed(f"DNS lookup of {self.host}: the pool is closed", False)
        known = self.known
        if known is None:
            failure = self._failure
            if failure is None:
                raise LookupFailed(f"DNS lookup of {self.host} failed", False)
            raise LookupFailed(failure[1], failure[2], failure[3])
        return known

    def timed_out(self, seconds: float, setting: str) -> LookupFailed:
        """A caller waited ``seconds`` (its ``setting``) for a lookup in vain: remembered as a
        failure (the next callers fail at once for DNS_RETRY rather than wait as long), warned
        of once; the lookup goes on."""
        why = f"DNS lookup of {self.host}: no answer within {seconds:g}s ({setting})"
        if self.known is None:
            self._failure = (self._clock(), why, True, False)
            self._warn(why, "requests to it fail until it resolves")
        return LookupFailed(why, True)

    def _start(self) -> asyncio.Task[None]:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._lookup = asyncio.get_running_loop().create_task(self._run())
        return task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        again = DNS_RETRY
        try:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # gaierror, or any other (a name IDNA refuses: UnicodeError)
            self._failed(exc)
        else:
            if self._resolved(infos):
                again = DNS_TTL
        finally:
            self._lookup = None
        if not self._closed:
            self._timer = loop.call_later(again, self._due)

    def _due(self) -> None:
        self._timer = None
        if not self._closed and self._lookup is None:
            self._start()

    def _resolved(self, infos: list[Any]) -> bool:
        found: dict[Peer, AddrInfo] = {}
        for info in infos:
            if info[1] == socket.SOCK_STREAM and info[0] in (socket.AF_INET, socket.AF_INET6):
                found.setdefault(peer_of(info[4]), (int(info[0]), int(info[1]), int(info[2]), str(info[3]),
                                                    tuple(info[4])))
        if not found:
            self._failed(socket.gaierror(socket.EAI_NONAME, "no IPv4 or IPv6 address"))
            return False
        new = list(found.values())
        before, self.known = self.known, new
        self.resolved_at = self._clock()
        self._failure = None
        if self._warned is not None:
            self._warned = None
            log.warning("upstream %s: %s resolves again (%s)", self.name, self.host, _shown(new))
        listed = frozenset(found)
        if before is not None and frozenset(peer_of(i[4]) for i in before) != listed:
            log.info("upstream %s: %s now resolves to %s (was %s): connections to an address no "
                     "longer listed are closed once their exchange ends", self.name, self.host,
                     _shown(new), _shown(before))
            self._on_change(listed)
        return True

    def _failed(self, exc: BaseException) -> None:
        why = f"DNS lookup of {self.host} failed: {_why(exc)}"
        known = self.known
        definite = isinstance(exc, socket.gaierror) and exc.errno in NO_SUCH_NAME
        if known is not None and not definite:  # the resolver's trouble: the addresses are kept
            age = self._clock() - self.resolved_at
            self._warn(why, f"its last known addresses ({_shown(known)}, resolved {age:.0f}s ago) are "
                            "still used")
            return
        self.known = None
        self._failure = (self._clock(), why, False, definite)
        then = "requests to it fail until it resolves"
        if known is not None:  # the name has no address now: the ones known are dropped
            self._on_change(frozenset())
            then = f"its addresses ({_shown(known)}) are dropped, its pooled connections closed; {then}"
        self._warn(why, then)

    def _warn(self, why: str, then: str) -> None:
        if why != self._warned:
            self._warned = why
            log.warning("upstream %s: %s; %s (looked up again every %gs)", self.name, why, then, DNS_RETRY)

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lookup is not None:
            self._lookup.cancel()


__all__ = ["ADDRESS_RETRY", "DNS_RETRY", "DNS_TTL", "AddrInfo", "Addresses", "LookupFailed", "Peer",
           "literal", "peer_of", "scoped"]
