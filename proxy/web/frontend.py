"""The front end both request paths share: what the web layer decides about a client request
and adds to its reply, computed once per config and called by the fast hit path
(``proxy.web.fastpath``) and the general path (``proxy.web.proxy_handler``) alike.

- the trusted-proxy verdict of a peer (``trusted_proxies``: may it send ``X-Forwarded-*``
  and its own ``X-Request-Id``), remembered per address;
- the request's one normalised view (``proxy.policy.request``) with this config's listener
  (the default Host of an HTTP/1.0 request without one, the head cap);
- the hosts-seen accounting (what the admin API takes as "hosts cachegate serves");
- the request, response-class and response-byte counters, their children bound once
  (``proxy.metrics``);
- the fields the web layer adds to every reply: the debug fields of the tier that served it,
  X-Request-Id, and the operator's Server name (``own_fields``).

The bytes of every reply head come from ``proxy.web.heads`` (one writer, framing once).

A ``FrontEnd`` is immutable for its config: a reload makes a new ``Settings``, and ``Front``
(one per runtime, handed to both paths of every client listener) builds the next
``FrontEnd`` on the first request that sees the new settings, an identity check per request.
The fast path's pre-built heads remember the ``Extras`` they were built with, so a head of
an older config is told apart by identity alone.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

from proxy.logs import AccessLog, RequestIds
from proxy.metrics import CounterChild
from proxy.policy.messages import RequestHead
from proxy.policy.request import Refusal, normalise_request
from proxy.runtime import MAX_HOSTS_SEEN, Runtime

if TYPE_CHECKING:
    from proxy.web.headtimeout import UnsentBudget

TRUST_MEMORY = 4096  # peers whose verdict is remembered (then forgotten all at once)
TIERS = ("memory", "disk", "upstream", "none")  # where a reply's body comes from (``Reply.tier``)


class Extras:
    """What the web layer adds to every reply head of one tier under one config: the debug
    fields (``CACHEGATE_DEBUG_HEADERS``) and the Server name. One object per config and
    tier, so a pre-built head (``proxy.web.fastpath.Head``) is matched by identity."""

    __slots__ = ("debug", "server")

    def __init__(self, debug: tuple[tuple[str, str], ...], server: str) -> None:
        self.debug = debug
        self.server = server


class FrontEnd:
    """One config's front end (see the module docstring)."""

    __slots__ = ("_debug", "_trust_nets", "_trusted", "_worker", "access_log", "bytes_sent", "extras",
                 "hit_counters", "hosts", "ids", "listener", "metrics", "responses", "server", "settings")

    def __init__(self, runtime: Runtime) -> None:
        settings = self.settings = runtime.settings
        metrics = self.metrics = runtime.metrics
        self.listener = settings.bound_listener(runtime.bound_listen)
        self.server = settings.server_header
        self._trust_nets = tuple(settings.trusted_proxies or ())
        self._trusted: dict[str, bool] = {}
        self.hosts = runtime.hosts_seen
        self.ids: RequestIds = runtime.request_ids
        self.access_log: AccessLog | None = runtime.access_log
        # Children bound once: the fast path adds to ``.value`` (``proxy.metrics.LeanCounter``).
        self.hit_counters: dict[str, CounterChild] = {m: metrics.requests.labels("HIT", m)
                                                      for m in ("GET", "HEAD")}
        # Answers by status class: ``responses[status // 100] += 1`` (``StatusClassCounter``).
        self.responses: list[int] = metrics.responses.counts
        # The fast path's tiers; the others' children are made on their first reply (``sent``).
        self.bytes_sent: dict[str, CounterChild] = {t: metrics.response_bytes.labels(t)
                                                    for t in ("memory", "disk")}
        self._debug = runtime.debug_headers
        self._worker = runtime.worker_id
        self.extras: dict[str | None, Extras] = {None: Extras((), self.server)}
        for tier in TIERS:
            self.extras_of(tier)

    def extras_of(self, tier: str | None) -> Extras:
        """What the web layer adds to a reply whose body came from ``tier`` (None: a reply of
        the web layer's own, a refusal or an error: no debug fields)."""
        extras = self.extras.get(tier)
        if extras is None:
            debug: tuple[tuple[str, str], ...] = ()
            if self._debug:
                worker = () if self._worker is None else (("X-Cachegate-Worker", str(self._worker)),)
                debug = (("X-Cachegate-Tier", str(tier)), *worker)
            extras = self.extras[tier] = Extras(debug, self.server)
        return extras

    def trusted(self, remote: str) -> bool:
        """Whether the peer at ``remote`` (an IP address) is one of ``trusted_proxies``."""
        if not self._trust_nets or not remote:
            return False
        known = self._trusted.get(remote)
        if known is None:
            try:
                ip = ipaddress.ip_address(remote)
            except ValueError:
                known = False
            else:
                known = any(ip in n for n in self._trust_nets)
            if len(self._trusted) >= TRUST_MEMORY:
                self._trusted.clear()
            self._trusted[remote] = known
        return known

    def head(self, message: Any, secure: bool, trusted: bool) -> RequestHead | Refusal:
        """The one normalised view of a request (``proxy.policy.request``), or its refusal;
        ``message`` is aiohttp's parsed message or a ``proxy.policy.request.Message``."""
        return normalise_request(message, secure=secure, trusted=trusted, listener=self.listener)

    def saw_host(self, host: str) -> None:
        """Note a host a client asked for (up to MAX_HOSTS_SEEN of them)."""
        hosts = self.hosts
        if len(hosts) < MAX_HOSTS_SEEN:
            hosts.add(host)

    def requests(self, x_cache: str, method: str) -> CounterChild:
        """The request counter of this X-Cache-Status and method."""
        return self.metrics.requests.labels(x_cache, method)

    def sent(self, tier: str) -> CounterChild:
        """The counter of body bytes sent from ``tier``."""
        child = self.bytes_sent.get(tier)
        if child is None:
            child = self.bytes_sent[tier] = self.metrics.response_bytes.labels(tier)
        return child

    def own_fields(self, headers: CIMultiDict[str], tier: str | None, request_id: str) -> None:
        """What the web layer adds to every reply: the tier's debug fields, the request's id,
        and the operator's name for this proxy unless a rule set one (the origin's was dropped;
        aiohttp's default would name Python's and aiohttp's versions)."""
        add_own_fields(headers, self.extras_of(tier), request_id)


def add_own_fields(headers: CIMultiDict[str], extras: Extras, request_id: str) -> None:
    """``FrontEnd.own_fields`` for ``extras`` (the fast path fills X-Request-Id per request)."""
    for k, v in extras.debug:
        headers[k] = v
    headers["X-Request-Id"] = request_id
    headers.setdefault("Server", extras.server)


class Front:
    """The current ``FrontEnd`` of a runtime: rebuilt when a reload swapped its settings (or a
    test its metrics). One per runtime, shared by every client listener and both paths. The
    runtime's ``debug_headers`` and ``worker_id`` are read when a front end is built: they are
    set before the client listeners start."""

    __slots__ = ("_current", "runtime", "unsent")

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._current: FrontEnd | None = None
        # The worker's max_unsent, shared by its client listeners (made by the first: ``ProxyServer``).
        self.unsent: UnsentBudget | None = None

    def reset(self) -> None:
        """Build the front end anew at the next request (the runtime's ``bound_listen`` is set)."""
        self._current = None

    def current(self) -> FrontEnd:
        front = self._current
        runtime = self.runtime
        if front is None or front.settings is not runtime.settings or front.metrics is not runtime.metrics:
            front = self._current = FrontEnd(runtime)
        return front


__all__ = ["Extras", "Front", "FrontEnd", "add_own_fields"]
