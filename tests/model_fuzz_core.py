"""A model of the whole cache, for stateful fuzzing (tests/test_model_fuzz.py).

A real cachegate (its runtime and listeners in this process, a disk tier in a temporary folder)
in front of a real loopback origin whose answers each step programs, the engine on a fake clock
the origin dates its answers by. Every answer the proxy gives is checked against what the origin
really sent (each origin response carries a serial in ``X-Body-Serial`` and in its body) and
against RFC 9111 and the project's documents (docs/caching.md, docs/admin-api.md).
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from proxy.policy.httpdate import format_http_date
from tests.harness import Clock, Origin, Proxy, start_proxy

KEYS = ("k0", "k1", "k2", "k3", "k4")
GROUP = {k: f"g{i % 2}" for i, k in enumerate(KEYS)}

# Response Cache-Control values the origin can be set to send.
CACHE_CONTROLS = (
    "max-age=60",
    "max-age=10",
    "s-maxage=30, max-age=5",
    "no-store",
    "private, max-age=60",
    "no-cache",
    "max-age=30, must-revalidate",
    "max-age=5, stale-while-revalidate=30",
    "max-age=5, stale-if-error=60",
    "public, max-age=20",
    "max-age=0",
    "",
    "public",
    "max-age=20, proxy-revalidate",
    "max-age=0, stale-while-revalidate=30",
    "public, no-cache",
    "max-age=60, s-maxage=5",
    "s-maxage=0, max-age=60",
    "no-cache, max-age=60",
)
STATUSES = (200, 200, 200, 301, 404, 500, 503)
EXPIRES = (None, None, "+30", "-1", "past", "garbage")
VARIES = ((), (), ("X-Lang",), ("Accept-Encoding",))
LANGS = (None, "en", "de")
ENCODINGS = (None, "", "gzip", "gzip, br", "br, gzip")
COOKIES = (None, None, "u=alice", "u=bob")
AUTHS = (None, None, None, "Bearer alice")
REQUEST_CCS = (None, None, None, "no-cache", "max-age=0")
RANGES = (None, None, None, "bytes=0-9", "bytes=5-", "bytes=-7", "bytes=5000-6000")
INMS = (None, None, None, "current", "previous", '"nope"', "*", "weak")
# The other conditionals a client may send (R92): values the model turns into fields (Model.conditionals).
IMSS = (None, None, None, "lm", "before", "now", "garbage")
IMS_ = (None, None, None, None, "current", "previous", "*", "weak")  # If-Match
IUSS = (None, None, None, None, "lm", "before", "now")
IF_RANGES = (None, None, "current", "previous", "weak", "lm", "before")
# How the origin answers a revalidation it finds current (R92): a proper 304, one with another
# ETag (an invalid 304), one without any validator, one with a weak copy of the ETag, and one
# (with its 200s) adding Cookie to Vary.
R304S = ("ok", "ok", "ok", "new_etag", "bare", "weak", "strong", "vary")
SKEWS = (0, 0, 0, None, -300, 300)  # the origin's clock against the fake one (None: no Date at all)
ORIGIN_AGES = (None, None, None, 10, 100)
HEURISTIC = (200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501)
ERRORS = (500, 502, 503, 504)
START_VARY = {"k1": ("X-Lang",), "k2": ("Accept-Encoding",)}  # the others start without


@dataclass
class Policy:
    status: int = 200
    cc: str = "max-age=60"
    expires: str | None = None
    etag: bool = True
    lm_age: int | None = 1000  # Last-Modified this many seconds before the version was made
    vary: tuple[str, ...] = ()
    set_cookie: bool = False
    weak: bool = False  # W/"..." ETags
    r304: str = "ok"  # R304S
    skew: int | None = 0  # SKEWS
    age: int | None = None  # an Age the origin sends


@dataclass
class Sent:
    """One response the origin sent."""

    serial: int
    key: str
    version: int
    status: int
    headers: dict[str, str]
    body: bytes
    request: dict[str, str | None]
    step: int
    at: float
    background: bool = False


@dataclass
class Request:
    method: str = "GET"
    key: str = "k0"
    lang: str | None = None
    ae: str | None = None
    cookie: str | None = None
    auth: str | None = None
    cc: str | None = None
    inm: str | None = None  # "current", "previous", or a literal tag
    range: str | None = None
    ims: str | None = None
    im: str | None = None
    ius: str | None = None
    if_range: str | None = None

    def headers(self, inm_value: str | None, more: dict[str, str] | None = None) -> dict[str, str]:
        h: dict[str, str] = {}
        if self.lang is not None:
            h["X-Lang"] = self.lang
        if self.ae is not None:
            h["Accept-Encoding"] = self.ae
        if self.cookie is not None:
            h["Cookie"] = self.cookie
        if self.auth is not None:
            h["Authorization"] = self.auth
        if self.cc is not None:
            h["Cache-Control"] = self.cc
        if inm_value is not None:
            h["If-None-Match"] = inm_value
        if self.range is not None:
            h["Range"] = self.range
        h.update(more or {})
        return h


def parse_cc(value: str | None) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for part in (value or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, _, arg = part.partition("=")
        out.setdefault(name.strip().lower(), arg.strip() or None)
    return out


def http_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return parsed.timestamp()


def ae_set(value: str | None) -> Any:
    if value is None:
        return None
    return frozenset(m.strip() for m in value.split(",") if m.strip())



def tag_list(value: str | None) -> list[str]:
    return [t.strip() for t in (value or "").split(",") if t.strip()]


def strong_match(listed: str | None, etag: str | None) -> bool:
    """If-Match / If-Range (RFC 9110 §8.8.3.2): both strong and the same."""
    if etag is None or etag.startswith("W/"):
        return False
    return any(t == etag for t in tag_list(listed) if not t.startswith("W/"))


def weak_match(listed: str | None, etag: str | None) -> bool:
    if etag is None:
        return False
    return any(t.removeprefix("W/") == etag.removeprefix("W/") for t in tag_list(listed))


def preconditions(req: dict[str, str], status: int, etag: str | None, lm: float | None,
                  date: float | None) -> str | None:
    """RFC 9110 §13.2.2 against one response, as docs/caching.md has a cache evaluate it:
    "412", "304" or None (answer as without them). A 412 only against a 2xx, a 304 only for a 200,
    the Date standing in for a missing Last-Modified for If-Modified-Since (RFC 9111 §4.3.2)."""
    get = {k.lower(): v for k, v in req.items()}
    if 200 <= status < 300:
        im = get.get("if-match")
        if im is not None:
            if not (im.strip() == "*" or strong_match(im, etag)):
                return "412"
        elif get.get("if-unmodified-since") is not None:
            ius = http_time(get["if-unmodified-since"])
            if ius is not None and lm is not None and lm > ius:
                return "412"
    if status != 200:
        return None
    inm = get.get("if-none-match")
    if inm is not None:
        if inm.strip() == "*" or weak_match(inm, etag):
            return "304"
        return None
    ims = http_time(get.get("if-modified-since"))
    validator = lm if lm is not None else date
    if ims is not None and validator is not None and validator <= ims:
        return "304"
    return None


class NoDateResponse(web.Response):
    """A response without Date (aiohttp's server adds one of the wall clock's otherwise)."""

    async def _write_headers(self) -> None:
        self._headers.popall("Date", None)
        await super()._write_headers()


def norm(etag: str | None) -> str | None:
    return None if etag is None else etag.removeprefix("W/")


class Violation(AssertionError):
    pass


@dataclass
class Model:
    clock: Clock
    origin: Origin
    directory: str
    rules: bool = True  # rules/default.yaml's defaults: stale_if_error 1h
    proxy: Proxy | None = None
    # Two keys start with a Vary so that a short sequence asks a fresh stored variant for another
    # value (a planted Vary-blind fresh hit passed 12 x 30 steps when every key started without).
    policies: dict[str, Policy] = field(default_factory=lambda: {k: Policy(vary=START_VARY.get(k, ()))
                                                                 for k in KEYS})
    versions: dict[str, int] = field(default_factory=lambda: {k: 1 for k in KEYS})
    made_at: dict[tuple[str, int], float] = field(default_factory=dict)
    sent: dict[int, Sent] = field(default_factory=dict)
    dates: dict[tuple[str, str | None], set[float]] = field(default_factory=lambda: collections.defaultdict(set))
    # (key, ETag without W/, Date) -> [(the fake clock when sent, its Age)]: the age of a response
    # served with that Date (RFC 9111 §4.2.3, the origin's clock off or an Age of its own).
    date_info: dict[tuple[str, str | None, float], list[tuple[float, int]]] = field(
        default_factory=lambda: collections.defaultdict(list))
    memory: str = "16MB"
    memory_max_object: str | None = None
    serial: int = 0
    step: int = 0
    mode: str = "ok"  # ok, error500, refused, timeout
    arrivals: int = 0
    in_flight: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    purge_floor: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KEYS, 0))
    refused_floor: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KEYS, 0))
    soft_step: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KEYS, 0))
    # The stored responses (by body serial) served UPDATING past their own windows for being
    # soft-purged, since the key's last soft purge or the last restart: each at most once.
    soft_spent: dict[str, set[int]] = field(default_factory=lambda: {k: set() for k in KEYS})
    contact: dict[tuple[str, str | None], int] = field(default_factory=dict)  # last step the origin answered
    contact_before: dict[tuple[str, str | None], int] = field(default_factory=dict)
    stats: collections.Counter[str] = field(default_factory=collections.Counter)
    log: list[str] = field(default_factory=list)
    background: bool = False

    # -- origin ---------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        key = request.path.lstrip("/")
        self.arrivals += 1
        if self.mode == "timeout":
            await self.release.wait()
            return web.Response(status=599, text="late")
        self.in_flight += 1
        try:
            return self._answer(key, request)
        finally:
            self.in_flight -= 1

    def _next(self) -> int:
        self.serial += 1
        return self.serial

    def _record(self, key: str, version: int, status: int, headers: dict[str, str], body: bytes,
                request: web.Request, serial: int, refers_to: str | None = None) -> None:
        req = {name: request.headers.get(name) for name in
               ("X-Lang", "Accept-Encoding", "Cookie", "Authorization", "Range", "If-None-Match",
                "If-Modified-Since", "Cache-Control", "If-Match", "If-Unmodified-Since", "If-Range")}
        req["method"] = request.method
        self.sent[serial] = Sent(serial, key, version, status, dict(headers), body, req, self.step,
                                 self.clock.now)
        tag = norm(headers.get("ETag") or refers_to)
        date = http_time(headers.get("Date")) if "Date" in headers else self.clock.now
        if date is not None:
            self.dates[(key, tag)].add(date)
            age = int(headers["Age"]) if "Age" in headers else 0
            self.date_info[(key, tag, date)].append((self.clock.now, age))
        self.contact[(key, tag)] = self.step

    def _answer(self, key: str, request: web.Request) -> web.StreamResponse:
        now = self.clock.now
        serial = self._next()
        if self.mode == "error500" or key not in self.policies:
            body = f"ERR|{key}|s={serial}|".encode()
            failure = {"Date": format_http_date(now), "X-Body-Serial": str(serial)}
            self._record(key, 0, 500, failure, body, request, serial)
            return web.Response(status=500, body=body, headers=failure)
        pol = self.policies[key]
        version = self.versions[key]
        vals = "&".join(f"{n}={request.headers.get(n)}" for n in pol.vary)
        if "Accept-Encoding" in pol.vary:  # (an origin reading the codings as a set)
            s = ae_set(request.headers.get("Accept-Encoding"))
            vals = "ae=" + ("-" if s is None else "+".join(sorted(s)))
        if "X-Lang" in pol.vary:
            vals = f"lang={request.headers.get('X-Lang')}"
        oc = now + (pol.skew or 0)  # the origin's clock
        headers: dict[str, str] = {}
        if pol.skew is not None:
            headers["Date"] = format_http_date(oc)
        if pol.age is not None:
            headers["Age"] = str(pol.age)
        if pol.cc:
            headers["Cache-Control"] = pol.cc
        made = self.made_at[(key, version)]
        if pol.expires == "+30":
            headers["Expires"] = format_http_date(oc + 30)
        elif pol.expires == "-1":
            headers["Expires"] = "-1"
        elif pol.expires == "past":
            headers["Expires"] = format_http_date(oc - 3600)
        elif pol.expires == "garbage":
            headers["Expires"] = "Thu, 32 Foo 2026 99:99:99 GMT"
        etag = self.etag_of(key, version, vals) if pol.etag else None
        if etag:
            headers["ETag"] = etag
        lm = made + (pol.skew or 0) - pol.lm_age if pol.lm_age is not None else None
        if lm is not None:
            headers["Last-Modified"] = format_http_date(lm)
        vary = pol.vary + (("Cookie",) if pol.r304 == "vary" else ())
        if vary:
            headers["Vary"] = ", ".join(vary)
        headers["Surrogate-Key"] = f"t-{key} {GROUP[key]}"
        # Conditionals, as an origin evaluates them (RFC 9110 §13.2.2), for a 200 only.
        if pol.status == 200 and request.method in ("GET", "HEAD"):
            verdict = preconditions(dict(request.headers), 200, etag, lm, oc)
            if verdict == "412":
                h412 = {k: v for k, v in headers.items() if k in ("Date",)}
                self._record(key, version, 412, h412, b"", request, serial)
                return self._response(pol, 412, b"", h412)
            if verdict == "304":
                h304 = {k: v for k, v in headers.items()}
                if pol.r304 == "new_etag" and etag:
                    h304["ETag"] = etag[:-1] + '-new"'
                elif pol.r304 == "bare":
                    # (proxy/policy/validation.py validates_stored, deliberately: a 304 without
                    # any validator answers the conditional request made about the stored
                    # response, so it freshens it, as nginx's does; RFC 9111 §4.3.4 would
                    # select nothing)
                    h304.pop("ETag", None)
                    h304.pop("Last-Modified", None)
                    self._record(key, version, 304, h304, b"", request, serial, refers_to=etag)
                    return self._response(pol, 304, b"", h304)
                elif pol.r304 == "weak" and etag:
                    h304["ETag"] = "W/" + etag.removeprefix("W/")
                elif pol.r304 == "strong" and etag:  # (nginx's 304 for a gzip copy it sent as W/)
                    h304["ETag"] = etag.removeprefix("W/")
                self._record(key, version, 304, h304, b"", request, serial)
                return self._response(pol, 304, b"", h304)
        cookie, auth = request.headers.get("Cookie"), request.headers.get("Authorization")
        text = f"{key}|v{version}|{vals}|c={cookie}|a={auth}|s={serial}|"
        body = (text + "x" * (180 + (version * 37 + serial) % 90)).encode()
        headers["X-Body-Serial"] = str(serial)
        if pol.set_cookie:
            headers["Set-Cookie"] = f"sid={serial}; Path=/"
        if pol.status == 301:
            headers["Location"] = f"/{key}-moved"
        rng = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if if_range is not None and rng:
            ir_date = http_time(if_range)
            holds = strong_match(if_range, etag) if if_range.strip().startswith(('"', 'W/')) else \
                (ir_date is not None and lm is not None and ir_date == lm and oc - lm >= 1)
            if not holds:
                rng = None
        if pol.status == 200 and rng and rng.startswith("bytes=") and "," not in rng:
            first, _, last = rng[6:].partition("-")
            n = len(body)
            try:
                if first == "":
                    a, b = max(0, n - int(last)), n - 1
                else:
                    a, b = int(first), min(int(last), n - 1) if last else n - 1
            except ValueError:
                a, b = 0, n - 1
            full = dict(headers)
            self._record(key, version, 200, full, body, request, serial)
            if a >= n:
                h416 = {"Date": format_http_date(oc), "Content-Range": f"bytes */{n}"}
                return self._response(pol, 416, b"", h416)
            headers["Content-Range"] = f"bytes {a}-{b}/{n}"
            return self._response(pol, 206, body[a:b + 1], headers)
        self._record(key, version, pol.status, headers, body, request, serial)
        return self._response(pol, pol.status, body, headers)

    def etag_of(self, key: str, version: int, vals: str) -> str:
        tag = f'"{key}.{version}.{vals}"'
        return "W/" + tag if self.policies[key].weak else tag

    def _response(self, pol: Policy, status: int, body: bytes, headers: dict[str, str]) -> web.Response:
        if "Date" not in headers:
            return NoDateResponse(status=status, body=body, headers=headers)
        return web.Response(status=status, body=body, headers=headers)

    # -- proxy ----------------------------------------------------------------------------

    listen: str = ""

    def config(self) -> str:
        return ((f"listen: {self.listen}\n" if self.listen else "") +"upstream: {timeouts: {connect: 1s, read: 300ms}, retries: 0}\n"
                f"cache: {{memory: {self.memory}, disk: {{path: cache, size: 64MB, shards: 1}}"
                + (f", memory_max_object: {self.memory_max_object}" if self.memory_max_object else "")
                + "}\n")

    def rules_text(self) -> str | None:
        if not self.rules:
            return None
        return "defaults:\n  stale_if_error: 1h\n  client_cache_control: honor\nrules: []\n"

    async def start(self) -> None:
        for k in KEYS:
            self.made_at[(k, 1)] = self.clock.now
        for k in KEYS:
            self.origin.route("/" + k, self.handle)
        self.proxy = await start_proxy(self.directory, self.origin.url, self.config(), self.rules_text())
        self.proxy.runtime.engine.clock = self.clock
        host, port = self.proxy.listeners.proxy_addresses[0]
        self.listen = f"{host}:{port}"  # a restart listens there again: the keys name the port

    async def close(self) -> None:
        self.release.set()
        if self.proxy is not None:
            await self.proxy.session.close()
            await self.proxy.close()
            self.proxy = None

    async def restart(self) -> None:
        await self.settle()
        assert self.proxy is not None
        await self.proxy.session.close()
        await self.proxy.close()
        self.proxy = await start_proxy(self.directory, self.origin.url, self.config(), self.rules_text())
        self.proxy.runtime.engine.clock = self.clock
        for spent in self.soft_spent.values():  # (a failed refresh is a process's memory)
            spent.clear()
        self.note("restart")

    async def settle(self) -> None:
        """Until nothing is in flight: no flight or background task in the engine, no request at
        the origin (a sleeping one aside), and the count steady."""
        assert self.proxy is not None
        coalescer = self.proxy.runtime.engine.coalescer
        steady = 0
        last = -1
        for _ in range(400):
            busy = bool(coalescer._flights) or any(not t.done() for t in coalescer._tasks) \
                or self.in_flight > 0
            if not busy and self.arrivals == last:
                steady += 1
                if steady >= 3:
                    return
            else:
                steady = 0
            last = self.arrivals
            await asyncio.sleep(0.003)

    def note(self, text: str) -> None:
        self.log.append(f"[{self.step}] t+{self.clock.now - self.t0:.0f} {text}")

    @property
    def t0(self) -> float:
        return self.made_at[("k0", 1)]

    # -- steps ----------------------------------------------------------------------------

    async def set_policy(self, key: str, pol: Policy, bump: bool) -> None:
        self.step += 1
        if bump:
            self.versions[key] += 1
            self.made_at[(key, self.versions[key])] = self.clock.now
        else:
            old = self.policies[key]
            # without a new version, only what a 304 may change: Cache-Control and Expires
            pol = Policy(old.status, pol.cc, pol.expires, old.etag, old.lm_age, old.vary, old.set_cookie,
                         old.weak, pol.r304, pol.skew, pol.age)
        self.policies[key] = pol
        self.note(f"origin {key} v{self.versions[key]} {pol}")

    async def set_mode(self, mode: str) -> None:
        self.step += 1
        if self.mode == mode:
            return
        if self.mode == "refused":
            await self.origin.start(self.origin.port)
        if self.mode == "timeout":
            self.release.set()
            self.release = asyncio.Event()
        if mode == "refused":
            await self.origin.stop(hold_port=True)
        self.mode = mode
        self.note(f"origin mode {mode}")

    async def advance(self, seconds: int) -> None:
        self.step += 1
        self.clock.advance(seconds)
        self.note(f"advance {seconds}")

    async def purge(self, what: str, name: str, soft: bool = False) -> None:
        self.step += 1
        assert self.proxy is not None
        await self.settle()
        floor = self.serial
        body: dict[str, object]
        if what == "url":
            body = {"urls": [f"{self.proxy.url}/{name}"]}
            covered = [name]
        elif what == "prefix":  # name: "k" (every key) or a key
            body = {"prefixes": [f"{self.proxy.url}/{name}"]}
            covered = [k for k in KEYS if k.startswith(name)]
        else:
            body = {"tags": [name]}
            covered = [k for k in KEYS if name in (f"t-{k}", GROUP[k])]
        if soft:
            body["soft"] = True
        reply = await self.proxy.admin("POST", "/purge", data=json.dumps(body))
        self.note(f"purge {body} -> {reply.status} {reply.body[:80]!r}")
        if reply.status == 400 and b"holds nothing for it" in reply.body:
            for k in covered:  # (admin.hosts: a host never seen nor stored is refused, documented)
                self.refused_floor[k] = floor
            return
        if reply.status != 200:
            raise Violation(f"purge answered {reply.status}: {reply.body[:200]!r}")
        for k in covered:
            self.soft_spent[k].clear()
            if soft:
                self.soft_step[k] = self.step
            else:
                self.purge_floor[k] = floor

    def vary_values(self, r: Request) -> str:
        """The request's values of the fields its key's responses vary on, as the origin's tags name them."""
        pol = self.policies[r.key]
        vals = ""
        if "Accept-Encoding" in pol.vary:
            s = ae_set(r.ae)
            vals = "ae=" + ("-" if s is None else "+".join(sorted(s)))
        if "X-Lang" in pol.vary:
            vals = f"lang={r.lang}"
        return vals

    def tag_for(self, r: Request, back: int) -> str | None:
        """The ETag the origin would send this request's variant (of the version ``back`` before)."""
        return self.etag_of(r.key, max(1, self.versions[r.key] - back), self.vary_values(r))

    def conditionals(self, r: Request) -> dict[str, str]:
        pol = self.policies[r.key]
        skew = pol.skew or 0
        lm = self.made_at[(r.key, self.versions[r.key])] + skew - pol.lm_age if pol.lm_age is not None \
            else self.clock.now + skew - 100
        dates = {"lm": format_http_date(lm), "before": format_http_date(lm - 1),
                 "now": format_http_date(self.clock.now), "garbage": "yesterday"}
        tags = {"current": self.tag_for(r, 0) or '"none"', "previous": self.tag_for(r, 1) or '"none"',
                "*": "*", "weak": "W/" + (self.tag_for(r, 0) or '"none"').removeprefix("W/"),
                "lm": format_http_date(lm), "before": format_http_date(lm - 1)}
        h: dict[str, str] = {}
        if r.ims is not None:
            h["If-Modified-Since"] = dates[r.ims]
        if r.im is not None:
            h["If-Match"] = tags[r.im]
        if r.ius is not None:
            h["If-Unmodified-Since"] = dates[r.ius]
        if r.if_range is not None and r.range is not None:
            h["If-Range"] = tags[r.if_range]
        return h

    async def request(self, r: Request) -> None:
        self.step += 1
        assert self.proxy is not None
        await self.settle()
        inm_value: str | None = None
        if r.inm == "current" or r.inm == "previous":
            v = self.versions[r.key] - (1 if r.inm == "previous" else 0)
            inm_value = f'"{r.key}.{v}.{self.vary_values(r)}"'
        elif r.inm == "weak":
            inm_value = "W/" + (self.tag_for(r, 0) or '"none"').removeprefix("W/")
        elif r.inm is not None:
            inm_value = r.inm
        headers = r.headers(inm_value, self.conditionals(r))
        before_arrivals, before_serial = self.arrivals, self.serial
        self.contact_before = dict(self.contact)
        try:
            async with self.proxy.session.request(r.method, f"{self.proxy.url}/{r.key}", headers=headers,
                                                  allow_redirects=False,
                                                  skip_auto_headers=("Accept-Encoding",),
                                                  timeout=aiohttp.ClientTimeout(total=10)) as resp:
                body = await resp.read()
                status, rh = resp.status, resp.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Violation(f"request {r} failed: {exc!r}") from exc
        await self.settle()
        delta = self.arrivals - before_arrivals
        made = [s for s in range(before_serial + 1, self.serial + 1)]
        x = rh.get("X-Cache-Status", "")
        cs = rh.get("Cache-Status", "")
        self.stats[x] += 1
        self.note(f"{r.method} {r.key} {headers} -> {status} {x} [{cs}] age={rh.get('Age')} "
                  f"serial={rh.get('X-Body-Serial')} origin+{delta} made={made}")
        self.check(r, headers, status, rh, body, delta, made)

    # -- invariants -----------------------------------------------------------------------

    def fail(self, why: str) -> None:
        raise Violation(why + "\n" + "\n".join(self.log[-int(os.environ.get("MODEL_LOG", "25")):]))

    def check(self, r: Request, sent: dict[str, str], status: int, rh: Any, body: bytes, delta: int,
              made: list[int]) -> None:
        now = self.clock.now
        x = rh.get("X-Cache-Status", "")
        cs = rh.get("Cache-Status", "")
        params = [p.strip() for p in cs.split(";")]
        hit = "hit" in params
        detail = next((p[7:] for p in params if p.startswith("detail=")), None)
        if r.method == "HEAD" and body:
            self.fail("HEAD answered with a body")
        if hit and delta != 0 and x != "UPDATING":
            self.fail(f"a {x} with `hit` reached the origin ({delta} requests)")
        if x == "UPDATING" and delta > 1:
            self.fail(f"UPDATING sent {delta} requests upstream")
        if not hit and "fwd=" in cs and delta == 0 and self.mode != "refused":
            self.fail(f"{x} [{cs}] says it went forward, but the origin saw nothing")
        failed = self.mode in ("refused", "timeout") or any(self.sent[s].status in ERRORS for s in made)
        sid = rh.get("X-Body-Serial")
        if sid is None:
            if status in (502, 503, 504) and not failed:
                self.fail(f"the proxy's own {status} with the origin up")
            if status == 304:
                self.check_304(r, sent, rh, hit, delta, made)
            if status == 412:
                self.check_412(r, sent, made)
            return
        rec = self.sent.get(int(sid))
        if rec is None:
            self.fail(f"X-Body-Serial {sid} was never sent by the origin")
        assert rec is not None
        if rec.key != r.key:
            self.fail(f"GET {r.key} answered with {rec.key}'s response (serial {sid})")
        if rec.serial <= self.purge_floor[r.key]:
            self.fail(f"serial {sid} of {r.key} is from before a purge answered 200 "
                      f"(floor {self.purge_floor[r.key]})")
        if rec.serial <= self.refused_floor[r.key] and rec.serial not in made:
            self.fail(f"a purge of {r.key} was refused as 'the cache holds nothing for it', yet "
                      f"stored response {sid} from before it is served")
        if status not in (206, 304, 416) and status != rec.status:
            self.fail(f"status {status} but the origin's response {sid} was {rec.status}")
        if r.method == "GET":
            if status == 206:
                self.check_range(rh, body, rec)
            elif status in (200, rec.status) and body != rec.body:
                self.fail(f"body is not serial {sid}'s: {body[:60]!r} vs {rec.body[:60]!r}")
        else:
            cl = rh.get("Content-Length")
            if cl is not None and status == rec.status and int(cl) != len(rec.body):
                self.fail(f"HEAD's Content-Length {cl} but the GET's body has {len(rec.body)}")
        weakened = rec.headers.get("ETag") is not None and rh.get("ETag") == "W/" + rec.headers["ETag"] \
            and any(s.key == r.key and s.status == 304 and s.headers.get("ETag") == rh.get("ETag")
                    for s in self.sent.values())  # (docs/caching.md: a 304's weak ETag replaces a strong one)
        if rh.get("ETag") != rec.headers.get("ETag") and status != 416 and not weakened:
            self.fail(f"ETag {rh.get('ETag')} beside the body of {sid} ({rec.headers.get('ETag')})")
        if rh.get("Vary") != rec.headers.get("Vary") and status != 416:
            self.fail(f"Vary {rh.get('Vary')} beside the body of {sid} ({rec.headers.get('Vary')})")
        # The client's conditionals against the response it gets (docs/caching.md, Preconditions
        # and Validation: the stored response, or a fill's head as it arrives, answers them).
        if status in (200, 206) and r.method in ("GET", "HEAD"):
            verdict = preconditions(sent, rec.status, rh.get("ETag"), http_time(rh.get("Last-Modified")),
                                    http_time(rh.get("Date")))
            if verdict is not None:
                self.fail(f"{status} {x} with response {sid} (ETag {rh.get('ETag')}, Last-Modified "
                          f"{rh.get('Last-Modified')}, Date {rh.get('Date')}) where its conditionals "
                          f"give {verdict}")
        if status == 206 and sent.get("If-Range") is not None:
            ir = sent["If-Range"]
            lm = http_time(rec.headers.get("Last-Modified"))
            rdate = http_time(rec.headers.get("Date") or rh.get("Date"))
            if ir.startswith(('"', "W/")):
                holds = strong_match(ir, rh.get("ETag"))
            else:
                holds = (lm is not None and http_time(ir) == lm and rdate is not None and rdate - lm >= 1)
            if not holds:
                self.fail(f"206 for If-Range {ir} that does not hold for response {sid} "
                          f"(ETag {rh.get('ETag')}, Last-Modified {rec.headers.get('Last-Modified')})")
        sc = rh.getall("Set-Cookie", [])
        for c in sc:
            n = int(c.split("=", 1)[1].split(";")[0])
            if n not in made:
                self.fail(f"Set-Cookie of response {n} replayed to another request")
        own = rec.serial in made
        # Vary: the stored response's selecting fields must match this request's.
        vary = [v.strip() for v in (rh.get("Vary") or "").split(",") if v.strip()]
        for name in vary:
            mine = sent.get(name)
            theirs = rec.request.get(name)
            if name == "Accept-Encoding":
                if ae_set(mine) != ae_set(theirs):
                    self.fail(f"Vary {name}: served {theirs!r}'s variant to {mine!r}")
            elif (mine or None) != (theirs or None):
                self.fail(f"Vary {name}: served {theirs!r}'s variant to {mine!r}")
        if own:
            if hit:
                self.fail("a `hit` whose body the origin made in this step")
            age = rh.get("Age")
            allowed = {"0", rec.headers.get("Age")}
            rdate = http_time(rec.headers.get("Date"))
            if rdate is not None:  # (a cache may state the age it computes: a Date behind, an Age)
                allowed.add(str(int(max(0, rec.at - rdate, int(rec.headers.get("Age") or 0)))))
            if age is not None and age not in allowed and x not in ("REVALIDATED",):
                self.fail(f"a fresh response from the origin with Age {age} (allowed {allowed})")
            return
        # Served from the store (a response made in an earlier step).
        if x in ("MISS", "BYPASS") and "collapsed" not in params:
            self.fail(f"{x} served a stored response (serial {sid}, step {rec.step})")
        self.check_shareable(rec)
        cc = parse_cc(rh.get("Cache-Control"))
        date = http_time(rh.get("Date"))
        if date is None:
            self.fail("no Date on a stored response")
        assert date is not None
        if date not in self.dates[(r.key, norm(rh.get("ETag")))]:
            self.fail(f"Date {rh.get('Date')} is no time the origin answered {r.key} {rh.get('ETag')}")
        age_field = rh.get("Age")
        # RFC 9111 §4.2.3: max(apparent age, the origin's Age) + resident time (no response delay
        # on the fake clock), for each time the origin sent this Date with this ETag.
        ages = [max(0.0, at - date, float(a)) + (now - at)
                for at, a in self.date_info.get((r.key, norm(rh.get("ETag")), date), [])] or [now - date]
        expected_age = min(ages, key=lambda a: abs(a - int(age_field or 0)))
        if age_field is None or abs(int(age_field) - expected_age) > 1:
            self.fail(f"Age {age_field}, expected {sorted(set(ages))} (fake clock)")
        lifetime = self.lifetime(rec, rh, cc, date)
        stale_forbidden = any(d in cc for d in ("must-revalidate", "proxy-revalidate", "s-maxage", "no-cache"))
        req_cc = parse_cc(sent.get("Cache-Control"))
        if hit and x == "HIT":
            if self.contact_before.get((r.key, rh.get("ETag")), 0) < self.soft_step[r.key]:
                self.fail(f"HIT of a response soft-purged at step {self.soft_step[r.key]}, not "
                          "revalidated since")
            if not lifetime > expected_age:
                self.fail(f"HIT not fresh: age {expected_age:.0f} >= lifetime {lifetime}")
            if "no-cache" in cc:
                self.fail("HIT of a no-cache response")
            if "no-cache" in req_cc or ("max-age" in req_cc and expected_age > int(req_cc["max-age"] or 0)):
                self.fail("HIT for a request's no-cache / max-age=N older than N")
        elif x == "UPDATING":
            swr = int(cc["stale-while-revalidate"] or 0) if "stale-while-revalidate" in cc else 0
            if stale_forbidden:
                self.fail(f"UPDATING of a response that may not be served stale: {cc}")
            if detail == "SOFT-PURGED":
                # docs/admin-api.md: served at once while one request refreshes it; once that
                # refresh failed, only within its own windows (counted from the end of its
                # lifetime). So past them, once per soft purge (a worker's memory: per restart).
                if not (swr > 0 and expected_age <= lifetime + swr):
                    if rec.serial in self.soft_spent[r.key]:
                        self.fail(f"soft-purged response {sid} served UPDATING again past its windows "
                                  f"(age {expected_age}, lifetime {lifetime}, swr {swr}) after its refresh")
                    self.soft_spent[r.key].add(rec.serial)
            elif expected_age > lifetime + swr:
                self.fail(f"UPDATING beyond stale-while-revalidate: age {expected_age}, lifetime "
                          f"{lifetime}, swr {swr}, cc {cc}")
            if "no-cache" in req_cc or ("max-age" in req_cc and expected_age > int(req_cc["max-age"] or 0)):
                self.fail("UPDATING (stale) for a request's no-cache / max-age=N older than N")
        elif x == "STALE":
            if not failed:
                self.fail("STALE without an origin failure")
            sie = int(cc["stale-if-error"] or 0) if "stale-if-error" in cc else 0
            if self.rules and lifetime > 0:
                sie = max(sie, 3600)
            if stale_forbidden:
                self.fail(f"STALE of a response that forbids it: {cc}")
            if expected_age > lifetime + sie:
                self.fail(f"STALE beyond stale-if-error: age {expected_age}, lifetime {lifetime}, sie {sie}")
            if rec.status >= 500:  # docs/caching.md: only a stored non-error response hides one
                self.fail("a stored error served STALE in place of the origin's failure")
        elif x == "REVALIDATED":
            if delta == 0:
                self.fail("REVALIDATED without an origin request")
        elif x == "HIT" and "collapsed" in params:
            pass
        else:
            self.fail(f"{x} [{cs}] served stored response {sid}")

    def lifetime(self, rec: Sent, rh: Any, cc: dict[str, str | None], date: float) -> float:
        def num(v: str | None) -> float:
            try:
                return float(int(v or ""))
            except ValueError:
                return 0.0
        if "s-maxage" in cc:
            return num(cc["s-maxage"])
        if "max-age" in cc:
            return num(cc["max-age"])
        if rh.get("Expires") is not None:
            e = http_time(rh.get("Expires"))
            return 0.0 if e is None else max(0.0, e - date)
        lm = http_time(rh.get("Last-Modified"))
        credentials = rec.request.get("Cookie") or rec.request.get("Authorization")
        # RFC 9111 §4.2.2: heuristically cacheable statuses, and any response marked `public`
        if lm is not None and (rec.status in HEURISTIC or "public" in cc) and (not credentials or "public" in cc):
            return min(0.1 * (date - lm), 86400.0)
        return 0.0

    def check_shareable(self, rec: Sent) -> None:
        cc = parse_cc(rec.headers.get("Cache-Control"))
        why = None
        if "private" in cc:
            why = "private"
        elif "no-store" in cc:
            why = "no-store"
        elif "Set-Cookie" in rec.headers:
            why = "Set-Cookie"
        elif rec.request.get("Authorization") and not any(d in cc for d in ("public", "s-maxage", "must-revalidate")):
            why = "Authorization"
        elif rec.request.get("Cookie") and "public" not in cc:
            lifetime = self.lifetime(rec, rec.headers, cc, http_time(rec.headers.get("Date")) or rec.at)
            if lifetime <= 0 or "no-cache" in cc:
                why = "Cookie without a lifetime (COOKIE-NO-FRESHNESS)"
        if why:
            self.fail(f"response {rec.serial} ({why}) made for step {rec.step}'s request was served "
                      f"to another request")

    def check_range(self, rh: Any, body: bytes, rec: Sent) -> None:
        cr = rh.get("Content-Range", "")
        if not cr.startswith("bytes "):
            self.fail(f"206 without a Content-Range: {cr!r}")
        span, _, total = cr[6:].partition("/")
        a, _, b = span.partition("-")
        if int(total) != len(rec.body):
            self.fail(f"206 total {total} but the body of {rec.serial} has {len(rec.body)}")
        if body != rec.body[int(a):int(b) + 1]:
            self.fail(f"206 {cr} bytes are not those of {rec.serial}")

    def check_304(self, r: Request, sent: dict[str, str], rh: Any, hit: bool, delta: int,
                  made: list[int]) -> None:
        if sent.get("If-None-Match") is None and sent.get("If-Modified-Since") is None:
            self.fail("304 to a request without a validator")
        if not any(self.sent[m].status == 304 for m in made):  # (the origin's own 304, relayed: as it said)
            verdict = preconditions(sent, 200, rh.get("ETag"), http_time(rh.get("Last-Modified")),
                                    http_time(rh.get("Date")))
            if verdict != "304":
                self.fail(f"304 with ETag {rh.get('ETag')}, Last-Modified {rh.get('Last-Modified')}, "
                          f"Date {rh.get('Date')} to {sent}: its conditionals give {verdict}")
            date = http_time(rh.get("Date"))
            if date is None or date not in self.dates[(r.key, norm(rh.get("ETag")))]:
                self.fail(f"304's Date {rh.get('Date')} is no time the origin answered {r.key} {rh.get('ETag')}")
        if hit and delta and rh.get("X-Cache-Status") != "UPDATING":
            self.fail("a 304 `hit` that reached the origin")

    def check_412(self, r: Request, sent: dict[str, str], made: list[int]) -> None:
        if sent.get("If-Match") is None and sent.get("If-Unmodified-Since") is None:
            self.fail("412 to a request without If-Match or If-Unmodified-Since")
        if any(self.sent[m].status == 412 for m in made):
            return
        for rec in self.sent.values():
            if rec.key == r.key and (200 <= rec.status < 300 or rec.status == 304) and preconditions(
                    sent, 200, rec.headers.get("ETag"), http_time(rec.headers.get("Last-Modified")),
                    http_time(rec.headers.get("Date"))) == "412":
                return
        self.fail(f"412 to {sent}, which no response of {r.key} fails")


def new_model(rules: bool = True, memory: str = "16MB", memory_max_object: str | None = None
              ) -> tuple[Model, str]:
    directory = tempfile.mkdtemp(prefix="modelfuzz-")
    return Model(Clock(), Origin(), directory, rules=rules, memory=memory,
                 memory_max_object=memory_max_object), directory


async def open_model(m: Model) -> None:
    await m.origin.start()
    await m.start()


async def close_model(m: Model) -> None:
    await m.close()
    await m.origin.stop()
    shutil.rmtree(m.directory, ignore_errors=True)
