"""What the admin listener refuses before any handler runs: DNS rebinding, CSRF, hostile JSON.

Without ``admin.token`` the admin API's only lock is that it listens on loopback, and
a browser on the same machine stands inside that lock. Two ways a web page borrows it:

- **DNS rebinding.** A page on ``evil.example`` re-resolves its own name to 127.0.0.1;
  its scripts then read and write ``http://evil.example:8081/`` as their own origin.
  Every such request still says ``Host: evil.example:8081``. So the ``Host`` must be a
  loopback address, ``localhost``, or a name in ``admin.server_names``.
- **Cross-site request forgery.** Any page can make the browser send a POST to
  ``http://127.0.0.1:8081/purge`` (a form, or ``fetch`` in no-cors mode). It cannot
  read the answer, but the purge happens. Such a request says where it comes from
  (``Origin``, and ``Sec-Fetch-Site`` in current browsers), and can only carry a
  CORS-safelisted ``Content-Type`` (``application/x-www-form-urlencoded``,
  ``multipart/form-data``, ``text/plain``) or none: ``application/json`` needs a CORS
  preflight, which cachegate never grants. So a state-changing request (any method but
  GET and HEAD) must not come from another origin, and must say ``application/json``.

With a token, the token is the lock: a browser never adds a bearer token by itself, so
neither attack can use it. The operator's console (``proxy.web.console``) gives a browser a
session cookie instead, which it does add by itself: that cookie is ``SameSite=Strict`` (no
cross-site request carries it) and every state-changing call with it also needs the
session's CSRF token in a header that only the console's own page can read and set.
The ``Origin``/``Sec-Fetch-Site`` check still applies (it
costs scripts nothing, they send neither), and the ``Content-Type`` is not checked, so scripts
that send the token with ``curl -d`` keep working. The ``Host`` check applies to every request
that is not authenticated by the right ``Authorization: Bearer`` token (the login call, cookie
sessions, the console's page and files, a wrong or missing token), when ``admin.server_names``
is listed, and to browsers (``Sec-Fetch-Site`` or ``Sec-Fetch-Mode``). A page rebound to the
listener is its own origin there, so it may read what it asks: without the ``Host`` check it
could post token guesses to the login call (a loopback listener's token may be short) at the
speed of its scripts. Browsers send Fetch Metadata only to potentially trustworthy origins
(https, localhost), so a page rebound to ``http://evil.example:8081`` sends none: only the
``Host`` tells it. Requests with the right bearer token (``cachegate`` commands, Prometheus)
may name any host. Token guesses that remain possible (a wrong bearer token from any host, a
wrong login from an allowed one) are slowed by ``GuessLimiter``. ``/healthz`` is never
checked (it tells nothing, and load balancers name hosts of their own).

A state-changing request whose body has a ``Content-Encoding`` (but ``identity``) is refused
415 whatever the token: the listener reads a body as sent, and the admin API takes plain JSON.

Refusals are 403 (Host, Origin) or 415 (Content-Type, Content-Encoding) with ``{"error": "..."}`` saying
why, counted in ``cachegate_admin_refused_total{reason}``. ``decide`` is pure (the
request's method, path and headers in, a ``Refused`` or None out) and
``guard_middleware`` applies it to every route of the admin app, including routes
other modules add.

``loads_untrusted`` is the one JSON reader for admin input: nesting deeper than
``MAX_DEPTH``, duplicate keys, ``NaN``/``Infinity`` and unpaired surrogates are a
``BadRequest`` with a precise message, never a 500 later.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from multidict import MultiMapping

from proxy.errors import BadRequest
from proxy.policy.keys import literal_in
from proxy.purge import host_matches

log = logging.getLogger("cachegate.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RefusalReason = Literal["host", "origin", "content_type", "content_encoding", "rate"]
SAFE_METHODS = frozenset({"GET", "HEAD"})
UNCHECKED_PATHS = frozenset({"/healthz"})
JSON_TYPE = "application/json"
MAX_INT_DIGITS = 4300  # the interpreter's own default limit; no admin field needs a tenth of it
MAX_DEPTH = 32  # admin documents are at most 3 deep: {"headers": {"Name": ["value"]}}


@dataclass(frozen=True, slots=True)
class GuardSettings:
    """What ``decide`` needs of the running config (read per request: a reload applies at once)."""

    token_set: bool
    server_names: tuple[str, ...] = ()
    bearer_ok: bool = False  # the request carries the right ``Authorization: Bearer`` token


ACCEPT_IDENTITY = (("Accept-Encoding", "identity"),)


@dataclass(frozen=True, slots=True)
class Refused:
    status: int  # 403 or 415
    reason: RefusalReason  # the metric's label
    message: str
    # Fields the answer carries: a 415 for a Content-Encoding says which one the API takes
    # (``Accept-Encoding: identity``, RFC 9110 §12.5.3).
    headers: tuple[tuple[str, str], ...] = ()


_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?")  # a DNS name or IPv4 address, lower-cased
_PORT = re.compile(r"[0-9]{1,5}")


def _split_host(value: str) -> tuple[str, str] | None:
    """``name[:port]`` or ``[v6][:port]`` -> (name without brackets, lower-cased, no trailing dot;
    port), or None when ``value`` is not that: the port must be 1-65535 in ASCII digits, brackets
    hold an IPv6 address and nothing follows them but ``:port``, a name is letters, digits, ``-``,
    ``_`` and dots (``127.0.0.1:80@evil.com``, ``[::1]evil.com``, ``localhost:evil`` are None).

    >>> [_split_host(h) for h in ("LocalHost.:8081", "[::1]", "127.0.0.1:80@evil.com", "[::1]evil.com")]
    [('localhost', '8081'), ('::1', ''), None, None]
    """
    value = value.strip().lower()
    if value.startswith("["):
        name, closed, rest = value[1:].partition("]")
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
        if "%" in name:  # a zone (scope) id: for the host it names, not for a Host field
            return None
        if not closed or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
        return (name, port) if not rest or _port_ok(port) else None
    name, colon, port = value.partition(":")
    if not _NAME.fullmatch(name) or (colon and not _port_ok(port)):
        return None
    return name.rstrip("."), port


def _port_ok(port: str) -> bool:
    return bool(_PORT.fullmatch(port)) and 1 <= int(port) <= 65535


def host_is_loopback(name: str) -> bool:
    """``localhost`` or a loopback address (``127.0.0.0/8``, ``::1``, ``::ffff:127.x.y.z``).

    >>> [host_is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "localhost", "0.0.0.0", "a.example")]
    [True, True, True, True, False, False]
    """
    if name == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _host_allowed(host: str, server_names: Iterable[str]) -> bool:
    split = _split_host(host)
    if split is None:
        return False
    name, port = split
    if host_is_loopback(name):
        return True
    if ":" in name:  # an IPv6 address: bracketed and spelt as server_names keeps it (literal_in)
        name = literal_in(f"[{name}]")
    return host_matches(server_names, f"{name}:{port}" if port else name)


def _authority(origin: str) -> str | None:
    """``http://Host:8081`` -> ``host:8081`` (default port dropped); None when not a tuple origin."""
    scheme, sep, rest = origin.strip().lower().partition("://")
    if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
        return None
    split = _split_host(rest)
    if split is None:
        return None
    name, port = split
    if port == {"http": "80", "https": "443"}[scheme]:
        port = ""
    return f"{name}:{port}" if port else name


def _host_authority(host: str) -> str | None:
    split = _split_host(host)
    if split is None:
        return None
    name, port = split
    if port == "80":
        port = ""
    return f"{name}:{port}" if port else name


def decide(method: str, path: str, headers: MultiMapping[str], settings: GuardSettings) -> Refused | None:
    """None when the request may go on to the token check and its handler; else why not."""
    if path in UNCHECKED_PATHS:
        return None
    hosts = headers.getall("Host", ())
    browser = "Sec-Fetch-Site" in headers or "Sec-Fetch-Mode" in headers
    # Only the right bearer token, from something that is not a browser, may name any host: a
    # page rebound to the listener sends no Sec-Fetch-* (browsers send them only to https and
    # localhost), so whatever else it sends (a login, a session cookie) is told by its Host.
    if not settings.token_set or settings.server_names or browser or not settings.bearer_ok:
        if len(hosts) != 1:
            return Refused(403, "host", "the admin API needs exactly one Host header naming a loopback "
                                        "address or one of admin.server_names")
        if _split_host(hosts[0]) is None:
            return Refused(403, "host", f"Host {hosts[0]!r} is not a host name or address with an "
                                        "optional :port (1-65535): refused")
        if not _host_allowed(hosts[0], settings.server_names):
            names = ", ".join(settings.server_names) or "none listed"
            return Refused(403, "host", f"Host {hosts[0]!r} is not a loopback address or one of "
                                        f"admin.server_names ({names}): refused, as a DNS rebinding "
                                        "attack would send it; add the name to admin.server_names if "
                                        "you reach the admin API by it")
    if method in SAFE_METHODS:
        return None
    site = headers.get("Sec-Fetch-Site", "").strip().lower()
    if site and site not in ("same-origin", "none"):
        return Refused(403, "origin", f"Sec-Fetch-Site: {site}: the browser says this request comes from "
                                      "another site; the admin API takes state-changing requests only "
                                      "from its own origin (cross-site request forgery)")
    origins = headers.getall("Origin", ())
    if len(origins) > 1:  # a browser sends one: which one would another reader check?
        return Refused(403, "origin", f"{len(origins)} Origin fields: a request has at most one "
                                      "(RFC 6454 §7.3); refused, as forged")
    origin = origins[0] if origins else None
    if origin is not None:
        authority = _authority(origin)
        own = _host_authority(hosts[0]) if len(hosts) == 1 else None
        if authority is None or authority != own:
            return Refused(403, "origin", f"Origin {origin!r} is not this admin listener's own origin: "
                                          "state-changing requests from other pages are refused "
                                          "(cross-site request forgery)")
    encoded = body_coding(headers)
    if encoded is not None:
        return Refused(415, "content_encoding", f"the admin API takes no Content-Encoding: {encoded}: send "
                                                "the body as it is (JSON, no Content-Encoding field)",
                       ACCEPT_IDENTITY)
    if not settings.token_set:
        ctype = headers.get("Content-Type", "")
        media = ctype.split(";", 1)[0].strip().lower()
        if media != JSON_TYPE:
            shown = f"Content-Type {ctype!r}" if ctype else "no Content-Type"
            return Refused(415, "content_type", f"{shown}: without admin.token, state-changing admin "
                                                f"requests must say Content-Type: {JSON_TYPE} (a browser "
                                                "form cannot, so a page elsewhere cannot forge them); "
                                                f"curl: -H 'Content-Type: {JSON_TYPE}'")
    return None


MAX_SHOWN_CODING = 100  # characters of a refused Content-Encoding an answer repeats


def body_coding(headers: MultiMapping[str]) -> str | None:
    """The request's ``Content-Encoding`` (every field, as sent, cut short) when it names a
    coding other than ``identity``; else None. The admin listener does not decode a body
    (``auto_decompress=False``): a body it cannot read as sent is refused, not decoded (a gzip
    that did not decode was a 500 with a traceback), nor read as the JSON it is not."""
    fields = headers.getall("Content-Encoding", ())
    codings = [c.strip().lower() for f in fields for c in f.split(",")]
    if all(c in ("", "identity") for c in codings):
        return None
    text = ", ".join(f.strip() for f in fields)
    return text if len(text) <= MAX_SHOWN_CODING else text[:MAX_SHOWN_CODING] + "..."


def decide_purge_method(headers: MultiMapping[str]) -> Refused | None:
    """None when a ``PURGE`` on the client listener (from an ``admin.purge_from`` peer) may be
    carried out; a 403 when a browser sent it for a page.

    ``purge_from`` trusts a machine, and a browser on that machine stands inside that trust: a
    page anywhere can ``fetch(url, {method: "PURGE"})`` once the origin grants the CORS
    preflight (which cachegate forwards to it like any ``OPTIONS``), and the browser says so
    (``Origin`` always, ``Sec-Fetch-Site`` in current browsers). Stricter than ``decide``: any
    ``Origin`` is refused, its own too, because on the client listener "same origin" is a page
    of the site cachegate serves (its user content, its third-party scripts), not an operator's
    console. Scripts, CMSs and CDNs send neither field; ``Sec-Fetch-Site: none`` (typed by the
    user) cannot come with a PURGE, so it is let through like its absence."""
    site = headers.get("Sec-Fetch-Site", "").strip().lower()
    if site and site != "none":
        return Refused(403, "origin", f"Sec-Fetch-Site: {site}: a browser sent this PURGE for a web "
                                      "page; PURGE is taken only from scripts on admin.purge_from "
                                      "hosts, which send no Sec-Fetch-Site or Origin (cross-site "
                                      "request forgery)")
    origins = headers.getall("Origin", ())
    if origins:
        return Refused(403, "origin", f"Origin {origins[0]!r}: a browser sent this PURGE for a web "
                                      "page; PURGE is taken only from scripts on admin.purge_from "
                                      "hosts, which send no Origin (cross-site request forgery)")
    return None


class _Bucket:
    """One bucket of ``GuessLimiter``: its level when last counted, then, and whether its run of
    refusals was logged."""

    __slots__ = ("at", "level", "limited")

    def __init__(self, level: float, at: float) -> None:
        self.level, self.at, self.limited = level, at, False

    def refill(self, size: float, per_second: float, now: float) -> float:
        self.level = min(size, self.level + (now - self.at) * per_second)
        self.at = now
        return self.level


class GuessLimiter:
    """Wrong admin tokens (a failed console login, a wrong bearer token), as nginx's
    ``limit_req`` with two zones: per client network (``key``: an IPv4 /24, an IPv6 /64, all of
    loopback) a bucket of ``burst`` guesses refilled at ``per_second``, and one for every
    network together of ``total_burst`` refilled at ``total_per_second``; a guess needs room in
    both. While either is empty every request of that client that presents a token is answered
    429 before its token is compared, right or wrong: otherwise the answer would still tell a
    right guess from a wrong one at any speed. Per network, so that a client trying tokens on a
    listener open to a network locks out itself, not the operator's scrapes and purges from
    elsewhere (a page in a browser on this machine shares the loopback address with local tools:
    those wait while it guesses). Sessions already open, and requests that present no token, are
    not affected.

    The bucket for every network: networks are cheap (an IPv6 /52 holds 4,096 /64s), and per
    network alone a client had a network's allowance for each of its networks. A network that
    presented the right token (``succeeded``: the operator's scraper, a purge script; the last
    ``TRUSTED`` of them) is not held to it, only to its own: else a client with a handful of
    networks could keep the bucket for all empty, and the operator out, for as long as it liked.
    Others wait while it is empty, the operator's console from a new address too; loopback
    never does (only its own bucket applies): a flood from many networks kept ``cachegate purge``
    on the machine itself out for as long as it went on, and out after a restart, which forgets
    the trusted networks. A client on loopback is on the machine already, and held to its
    own 10 and one a second. The run of refusals of the bucket for all ends once it is full
    again: ending it at each refill, a flood logged its line five times a second.

    Only networks whose bucket is not full are remembered (a full one is what a network not
    remembered gets), none dropped for newcomers while its bucket is still refilling: the last
    4,096 networks were remembered, so a locked-out client that tried once from each of 4,096
    others had its allowance back, every round. The bucket for all bounds how many can be
    refilling at once (``total_burst`` and ``total_per_second`` for the ``burst / per_second``
    seconds a bucket takes to refill, besides the trusted networks), far below
    ``MAX_CLIENTS``: past it (wrong tokens counted without asking ``retry_after``) a newcomer's
    wrong token is not remembered, rather than a locked-out network's."""

    MAX_CLIENTS = 4096  # networks remembered, each with wrong tokens not yet refilled
    LOOPBACK = "loopback"  # every loopback address's network (``key``): never held to the bucket for all
    TRUSTED = 256  # networks that presented the right token, remembered (the last ones)

    def __init__(self, burst: int = 10, per_second: float = 1.0, total_burst: int = 100,
                 total_per_second: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.per_second = per_second
        self.total_burst = total_burst
        self.total_per_second = total_per_second
        self._clock = clock
        # network -> its bucket, in the order of their last wrong token (the longest refilling first)
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._all = _Bucket(float(total_burst), clock())
        self._trusted: OrderedDict[str, None] = OrderedDict()

    @staticmethod
    def key(address: str) -> str:
        """Whose bucket an address counts in: its IPv4 /24 or IPv6 /64 (one host has a whole /64,
        and a handful of addresses are cheap), every loopback address in one."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # (first: ::ffff:127.0.0.1 is loopback only once unwrapped)
        if ip.is_loopback:
            return GuessLimiter.LOOPBACK
        prefix = 24 if ip.version == 4 else 64
        return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))

    def retry_after(self, client: str) -> int:
        """0 when ``client`` may have a token checked now; else the whole seconds until it may."""
        net = self.key(client)
        now = self._clock()
        wait = 0.0
        bucket = self._buckets.get(net)
        if bucket is not None:
            level = bucket.refill(self.burst, self.per_second, now)
            if level >= self.burst:
                del self._buckets[net]  # refilled: as if never seen (its run of refusals over)
            elif level >= 1.0:
                bucket.limited = False
            else:
                wait = (1.0 - level) / self.per_second
        if net not in self._trusted and net != self.LOOPBACK:
            level = self._all.refill(self.total_burst, self.total_per_second, now)
            if level < 1.0:
                wait = max(wait, (1.0 - level) / self.total_per_second)
            elif level >= self.total_burst:
                self._all.limited = False  # (its run ends once it is full: one line a flood)
        return max(1, math.ceil(wait)) if wait else 0

    def refused(self, client: str) -> Literal["network", "all"] | None:
        """After ``retry_after`` refused ``client``: which bucket is empty, its network's or the
        one for all, the first time in that bucket's run of refusals (for one line a run); None
        after."""
        bucket = self._buckets.get(self.key(client))
        if bucket is not None and bucket.level < 1.0:
            if bucket.limited:
                return None
            bucket.limited = True
            return "network"
        if self._all.limited:
            return None
        self._all.limited = True
        return "all"

    def failed(self, client: str) -> None:
        """A wrong token from ``client``: one guess less in its network's bucket and the one for all."""
        net = self.key(client)
        now = self._clock()
        self._all.refill(self.total_burst, self.total_per_second, now)
        self._all.level = max(0.0, self._all.level - 1.0)
        bucket = self._buckets.get(net)
        if bucket is None:
            if len(self._buckets) >= self.MAX_CLIENTS and not self._room(now):
                return  # (never asked ``retry_after``: the bucket for all refuses newcomers)
            bucket = self._buckets[net] = _Bucket(float(self.burst), now)
        else:
            bucket.refill(self.burst, self.per_second, now)
            self._buckets.move_to_end(net)
        bucket.level = max(0.0, bucket.level - 1.0)

    def succeeded(self, client: str) -> None:
        """The right token from ``client``: its network is let past the bucket for all."""
        net = self.key(client)
        trusted = self._trusted
        if net in trusted:
            trusted.move_to_end(net)
            return
        trusted[net] = None
        if len(trusted) > self.TRUSTED:
            trusted.popitem(last=False)

    def _room(self, now: float) -> bool:
        """Forget the networks refilled since their last wrong token, the longest refilling first
        (up to the first that is not): whether there is room for another now."""
        buckets = self._buckets
        while buckets:
            net, bucket = next(iter(buckets.items()))
            if bucket.refill(self.burst, self.per_second, now) < self.burst:
                break
            del buckets[net]
        return len(buckets) < self.MAX_CLIENTS


def guard_middleware(settings_of: Callable[[web.Request], GuardSettings],
                     refused: Callable[[web.Request, RefusalReason], None]) -> Any:
    """The middleware applying ``decide`` (``refused`` counts a refusal)."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        verdict = decide(request.method, request.path, request.headers, settings_of(request))
        if verdict is None:
            return await handler(request)
        refused(request, verdict.reason)
        log.debug("admin %s %s refused (%s) for %s", request.method, request.path, verdict.reason,
                  request.remote)
        return web.json_response({"error": verdict.message}, status=verdict.status,
                                 headers=dict(verdict.headers) if verdict.headers else None)

    return guard


# -- hostile JSON ---------------------------------------------------------------------------------


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BadRequest(f"invalid JSON: the key {key!r} is given twice in one object")
        out[key] = value
    return out


def _int(text: str) -> int:
    """A JSON integer; past ``MAX_INT_DIGITS`` digits a 400 that says so, rather than the
    interpreter's ValueError, whose advice (``sys.set_int_max_str_digits()``) is for Python
    programmers, not for an API client."""
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise BadRequest(f"invalid JSON: a number is too long ({digits} digits; at most {MAX_INT_DIGITS})")
    return int(text)


def _constant(name: str) -> Any:
    raise BadRequest(f"invalid JSON: {name} is not a JSON value")


def _check_tree(doc: Any) -> None:
    """Depth and strings, without recursion (the document may be as deep as the parser allowed).

    Strings are checked where they are met and only containers are stacked: a document of
    1,000 URLs is walked in ~60 us, against ~350 us for a first version that stacked every value.
    """
    if type(doc) is str:
        _check_string(doc)
    stack: list[tuple[Any, int]] = [(doc, 1)] if type(doc) in (dict, list) else []
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BadRequest(f"JSON nested deeper than {MAX_DEPTH} levels")
        if type(value) is dict:
            for key in value:
                _check_string(key)
            items = value.values()
        else:
            items = value
        for item in items:
            kind = type(item)
            if kind is str:
                _check_string(item)
            elif kind is dict or kind is list:
                stack.append((item, depth + 1))


def _check_string(text: str) -> None:
    if text.isascii():  # the common case, far cheaper than encoding
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise BadRequest(f"invalid JSON: a string holds an unpaired surrogate (\\u{ord(bad):04x})") from None


def loads_untrusted(raw: bytes | str) -> Any:
    """``json.loads`` for admin input; every way it can fail is a ``BadRequest`` that says how.

    Bytes are decoded as UTF-8 here, not by ``json.loads``, which guesses UTF-16 and UTF-32 from
    NUL bytes and skips a UTF-8 byte order mark: JSON exchanged between systems is UTF-8 without
    one (RFC 8259 §8.1), and what the admin API accepts should be what every client agrees on."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequest(f"invalid JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if raw.startswith("\ufeff"):
        raise BadRequest("invalid JSON: it starts with a byte order mark (U+FEFF); send UTF-8 without one")
    if "\x00" in raw:  # never in JSON, even in a string: it would be written \u0000
        raise BadRequest(f"invalid JSON: a NUL character at offset {raw.index(chr(0))} "
                         "(UTF-16 or UTF-32?); send UTF-8")
    try:
        doc = json.loads(raw, object_pairs_hook=_object, parse_constant=_constant, parse_int=_int)
    except RecursionError:
        raise BadRequest(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise BadRequest(f"invalid JSON: {exc}") from None
    _check_tree(doc)
    return doc


__all__ = ["GuardSettings", "GuessLimiter", "Refused", "decide", "decide_purge_method", "guard_middleware",
           "host_is_loopback", "loads_untrusted"]
