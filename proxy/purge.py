"""Purge requests: validation of the admin JSON (pure), surrogate keys, and carrying purges out.

``parse_purge`` turns a JSON document into a ``PurgeSpec`` or raises ``BadPurge``
with a precise message; nothing is purged from an invalid request. The admin API reads a purge
with ``read_purge``, the same parse in slices of ``PURGE_SLICE`` URLs with a turn of the event
loop between them; ``Purger.plan`` reshapes URLs in such slices too, then looks their keys up
(finds them in one pass over the memory tier when a rule keys one on fields or cookies), and
the purge drops them, in slices of the event loop's time
(``proxy.storage.purging.Turns``): a purge of tens of thousands of URLs, in a cachegate of one
process, holds client requests up for a slice at a time (a few milliseconds), not for the whole
of it. A URL given to purge is reshaped by the same rules as a client request for it, so purging
``https://shop.example/search?q=a&utm=x`` finds the entry a rule keyed as
``...?q=a``. ``Purger`` resolves URLs to keys (both tiers, all variants) and
removes them, or marks them stale when ``soft``; tags, prefixes and "all" become
bans on the shared disk tier (see ``proxy.storage.index``) and eager drops in
every process's memory tier.

Tags (surrogate keys) come from the origin's response headers named in
``cache.tag_headers`` (``proxy.policy.fill.tags_from_headers``) plus a rule's ``tags``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.errors import BadRequest
from proxy.errors import PurgeUnavailable as PurgeUnavailable  # raised by cluster mode and storage
from proxy.policy.fill import tags_from_headers as tags_from_headers  # read where fills are decided
from proxy.policy.keys import cache_key, ip_literal, literal_in, normalise_host, split_host, url_of_key
from proxy.policy.messages import RequestHead
from proxy.policy.request import MAX_REQUEST_LINE, parse_url
from proxy.rules import RuleSet
from proxy.storage.bans import PurgeMatch
from proxy.storage.index import Ban
from proxy.storage.tiered import Storage

_FIELDS = {"urls", "prefixes", "tags", "all", "soft"}
PURGE_SLICE = 200  # URLs parsed, or reshaped by the rules, between two turns of the event loop


class BadPurge(BadRequest):
    pass


@dataclass(frozen=True)
class PurgeSpec:
    urls: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    all: bool = False
    soft: bool = False
    keys: tuple[str, ...] = field(default=())  # exact keys (invalidation after unsafe methods)
    # Not an operator's purge: an unsafe method's invalidation (RFC 9111 §4.4), counted apart.
    invalidation: bool = False

    @property
    def hosts(self) -> set[str]:
        """The hosts (``host[:port]``, as keys have them) that the URLs and prefixes name."""
        return {url_host(u) for u in (*self.urls, *self.prefixes)}

    @property
    def kinds(self) -> list[str]:
        if self.invalidation:
            return ["invalidation"]
        return [k for k, v in (("url", self.urls or self.keys), ("prefix", self.prefixes),
                               ("tag", self.tags), ("all", self.all)) if v]

    def describe(self, shown: int = 3, width: int = 100) -> str:
        """A short account of the purge for the admin log: each kind with its count and its
        first ``shown`` names (each cut at ``width`` characters), never a whole long list.

        >>> PurgeSpec(urls=("http://a.example/x",), tags=tuple("abcde"), soft=True).describe()
        "1 URL ('http://a.example/x'), 5 tags ('a', 'b', 'c', ... 2 more), soft"
        """
        parts = []
        for one, many, names in (("URL", "URLs", self.urls or self.keys),
                                 ("prefix", "prefixes", self.prefixes), ("tag", "tags", self.tags)):
            if names:
                listed = [repr(n if len(n) <= width else n[:width] + "...") for n in names[:shown]]
                if len(names) > shown:
                    listed.append(f"... {len(names) - shown} more")
                parts.append(f"{len(names)} {one if len(names) == 1 else many} ({', '.join(listed)})")
        if self.all:
            parts.append("all")
        if self.soft:
            parts.append("soft")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"urls": list(self.urls), "prefixes": list(self.prefixes), "tags": list(self.tags),
                "all": self.all, "soft": self.soft, "keys": list(self.keys),
                "invalidation": self.invalidation}

    @classmethod
    def from_json(cls, d: Any) -> PurgeSpec:
        """A purge as ``to_json`` wrote it (the cluster's stream, a worker's call); BadPurge for
        what it never writes. Typed as strictly as the admin API's body (``strings``, ``flag``):
        ``bool("false")`` is true, and ``tuple("http://x/")`` a purge of each of its letters.
        Fields it does not know are left out (a newer release's, in a rolling upgrade).

        >>> PurgeSpec.from_json({"tags": ["t"], "soft": True}) == PurgeSpec(tags=("t",), soft=True)
        True
        >>> for bad in ({"all": "false"}, {"urls": "http://x/"}, {"tags": [{"a": 1}]}):
        ...     try:
        ...         PurgeSpec.from_json(bad)
        ...     except BadPurge as exc:
        ...         print(exc)
        'all' must be true or false
        'urls' must be a list of non-empty strings
        'tags' must be a list of non-empty strings
        """
        if not isinstance(d, dict):
            raise BadPurge("a purge is a JSON object")
        return cls(strings(d, "urls"), strings(d, "prefixes"), strings(d, "tags"), flag(d, "all"),
                   flag(d, "soft"), strings(d, "keys"), flag(d, "invalidation"))


@dataclass(frozen=True)
class PurgeOutcome:
    """What a purge did: entries purged, and in cluster mode what each node answered.

    ``nodes`` is None for a cachegate alone; in cluster mode it maps every node that
    acknowledged to its count, and ``missing`` names the live nodes that did not
    acknowledge within ``cluster.ack_timeout`` (the admin API then answers 202, not 200)."""

    purged: int
    nodes: dict[str, int] | None = None
    missing: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.missing

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"purged": self.purged}
        if self.nodes is not None:
            body["nodes"] = {n: {"purged": c} for n, c in sorted(self.nodes.items())}
            body["missing"] = list(self.missing)
        return body

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PurgeOutcome:
        nodes = d.get("nodes")
        return cls(int(d["purged"]), None if nodes is None else
                   {str(n): int(v["purged"]) for n, v in nodes.items()}, tuple(d.get("missing", ())))


def normalise_url(text: str, *, prefix: bool = False) -> str:
    """An absolute http(s) URL with the host normalised as keys have it; BadPurge otherwise.

    The path and query are kept as written, as the proxy keys a client's request target: yarl
    drops an empty query, but ``/search?`` is a URL and a key of its own beside ``/search``
    (RFC 3986 §6.2.3 does not make them equivalent), so its ``?`` is put back. For a
    ``prefix`` that matters twice: ``/search?`` (every query of /search) must not become
    ``/search``, which /searchable also starts with. A fragment is refused there for the same
    reason (clients never send one, so no key holds it, and dropping it would widen the
    prefix); a URL's fragment is dropped first, whatever it holds, as a client drops it before
    asking. Surrounding ASCII whitespace (the line end of a URL pasted or read from a file) is
    not part of the URL. A URL longer than any request line the proxy takes, a host longer
    than a DNS name, or userinfo (``user:pw@``, which no request names) is refused."""
    text = text.strip(" \t\r\n\f\v")
    if prefix and "#" in text:
        raise BadPurge(f"{text[:SHOWN]!r}: a prefix cannot hold a fragment ('#'): no stored URL has one")
    text = text.partition("#")[0]
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise BadPurge(f"{text[:SHOWN]!r}: give an absolute http:// or https:// URL")
    if len(text) > MAX_URL:
        raise BadPurge(f"{text[:SHOWN]!r}... is {len(text):,} characters long: no request the proxy "
                       f"takes names a URL over {MAX_URL:,} (its request line is at most "
                       f"{MAX_REQUEST_LINE:,} bytes), so no stored entry has one")
    authority = rest[:_authority_end(rest)]
    if "@" in authority:
        host = authority.rpartition("@")[2]
        raise BadPurge(f"'{scheme}{sep}<userinfo>@{host[:SHOWN]}': the URL holds userinfo "
                       "('user:password@'), which no request names, so no stored entry has it (RFC 9110 "
                       "§4.2.4 deprecates it in http(s) URIs); give the URL without it")
    text = as_sent(text)
    if len(text) > MAX_URL:  # percent-encoding made it longer
        raise BadPurge(f"{text[:SHOWN]!r}... is {len(text):,} characters long as a client sends it: "
                       f"no request the proxy takes names a URL over {MAX_URL:,}")
    try:
        url = parse_url(text, encoded=True)
        scheme, raw_host, authority = url.scheme, url.raw_host, url.raw_authority
    except ValueError as exc:
        raise BadPurge(f"{text!r} is not a URL: {exc}") from None
    if scheme not in ("http", "https") or not raw_host:
        raise BadPurge(f"{text!r}: give an absolute http:// or https:// URL")
    host = normalise_host(authority, scheme)
    if host.startswith("[") and ip_literal(split_host(host)[0]) is None:
        raise BadPurge(f"{text!r}: the brackets hold no IPv6 address, so no request names this host")
    return f"{scheme}://{host}{url_target(url, text)}"


# (A request target is shorter than the client listener's longest request line, so a longer URL
# names nothing the proxy ever stored.)
MAX_HOST = 253  # the longest DNS name (RFC 1035 §2.3.4, without the root's dot)
MAX_URL = len("https://") + MAX_HOST + len(":65535") + MAX_REQUEST_LINE
SHOWN = 200  # characters of a refused URL an error message shows


def _authority_end(rest: str) -> int:
    """Where the authority of ``rest`` (what follows ``scheme://``) ends: at ``/``, ``?`` or ``#``."""
    return min((i for i in (rest.find(c) for c in "/?#") if i != -1), default=len(rest))


# What the proxy's HTTP parser refuses in a request target (400): no stored key holds one.
_NEVER_SENT = re.compile(r"[\x00-\x20\x7f]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


def as_sent(text: str) -> str:
    """``text`` as a client puts it on the wire, so that it names the key such a request has:
    non-ASCII in the path and query percent-encoded as UTF-8 (``/café`` -> ``/caf%C3%A9``, as a
    browser sends it: the proxy refuses raw non-ASCII in a target), a non-ASCII host in its IDNA
    (punycode) form; BadPurge for a space, a control character or DEL, which no request target
    holds (its ``%XX`` form is meant). Everything else is kept as written, as a request's key
    keeps it: ``%c3%a9`` is not ``%C3%A9`` there, nor ``|`` ``%7C`` (the origin may tell them
    apart).

    >>> as_sent("http://Bücher.example/café?a=€#x")
    'http://xn--bcher-kva.example/caf%C3%A9?a=%E2%82%AC#x'
    """
    bad = _NEVER_SENT.search(text)
    if bad is not None:
        char = {" ": "a space", "\t": "a tab", "\r": "a CR", "\n": "a line feed",
                "\x7f": "DEL"}.get(bad.group(), f"the control character {bad.group()!r}")
        raise BadPurge(f"{text!r} holds {char} at offset {bad.start()}, which no request target "
                       f"can hold: write it percent-encoded (%{ord(bad.group()):02X}), as a client "
                       "sends it")
    if text.isascii():
        return text
    scheme, sep, rest = text.partition("://")
    cut = _authority_end(rest)
    authority, tail = rest[:cut], rest[cut:]
    try:
        if not authority.isascii():
            host = authority.rpartition("@")[2]
            if host.startswith("[") and not host.partition("]")[0].isascii():
                # IDNA would mangle it into a name and blame the port (yarl's message).
                raise BadPurge(f"{text!r} is not a URL: its IPv6 address "
                               f"{host.partition(']')[0] + ']'!r} holds a non-ASCII character (an "
                               "IPv6 literal is hex digits, ':' and '.': RFC 3986 §3.2.2)")
            # Before IDNA, whose cost grows with the name: a longer one is no DNS name anyway.
            name = authority.rpartition("@")[2].rsplit(":", 1)[0] if "]" not in authority else ""
            if len(name) > MAX_HOST:
                raise BadPurge(f"{text[:SHOWN]!r}...: its host is {len(name):,} characters long: a "
                               f"DNS name has at most {MAX_HOST} (RFC 1035 §2.3.4)")
            authority = parse_url(f"http://{authority}/").raw_authority
        tail = _NON_ASCII.sub(lambda m: quote(m.group(), safe=""), tail)
    except (ValueError, UnicodeError) as exc:  # (parse_url turns yarl's IndexError into one)
        raise BadPurge(f"{text!r} is not a URL: {exc}") from None
    return f"{scheme}{sep}{authority}{tail}"


def url_target(url: URL, text: str) -> str:
    """The request target a client sends for ``url`` (parsed from ``text``): its path and query
    as written, with the ``?`` of an empty query that yarl's ``raw_path_qs`` drops.

    >>> [url_target(URL(t, encoded=True), t) for t in ("http://a.example/s?#top", "http://a.example?")]
    ['/s?', '/?']
    """
    target = url.raw_path_qs or "/"
    if not url.raw_query_string and "?" in text.split("#", 1)[0]:
        target += "?"
    return target


def url_host(url: str) -> str:
    """``host[:port]`` of a normalised URL (``https://a.example:8443/x`` -> ``a.example:8443``)."""
    return url.split("://", 1)[1].split("/", 1)[0]


def host_matches(patterns: Iterable[str], host: str) -> bool:
    """Whether ``host`` (``name[:port]``) matches one of ``admin.hosts``' patterns.

    A pattern is a name (any port), ``name:port`` (that port only) or ``*.domain``
    (subdomains only), as a rule's ``match.host``.

    >>> host_matches(["shop.example", "*.cdn.example"], "shop.example:8080")
    True
    >>> host_matches(["*.cdn.example"], "cdn.example"), host_matches(["a.example:80"], "a.example:81")
    (False, False)
    """
    name = host.rsplit(":", 1)[0] if re.search(r":\d+$", host) and not host.endswith("]") else host
    for p in patterns:
        p = literal_in(p.strip().lower().rstrip("."))
        with_port = re.search(r":\d+$", p) is not None and not p.endswith("]")
        subject = host if with_port else name
        if p.startswith("*."):
            if subject.endswith(p[1:]) and len(subject) > len(p) - 1:
                return True
        elif subject == p:
            return True
    return False


def parse_purge(doc: Any, host_allowed: Callable[[str], bool] | None = None) -> PurgeSpec:
    """The purge a JSON document asks for; BadPurge (nothing purged) when it is not a valid one.

    >>> spec = parse_purge({"urls": ["HTTP://Shop.Example:80/a?"], "soft": True})
    >>> spec.urls, spec.soft
    (('http://shop.example/a?',), True)
    """
    steps = _parse(doc, host_allowed)
    while (spec := _step(steps)) is None:
        pass
    return spec


async def read_purge(doc: Any, host_allowed: Callable[[str], bool] | None = None) -> PurgeSpec:
    """``parse_purge``, letting the event loop run after every ``PURGE_SLICE`` URLs or prefixes."""
    steps = _parse(doc, host_allowed)
    while True:
        spec = _step(steps)
        if spec is not None:
            return spec
        await asyncio.sleep(0)  # a turn of the loop between slices, not a wait for something


def _step(steps: Generator[None, None, PurgeSpec]) -> PurgeSpec | None:
    """One slice of ``_parse``: None while more is left, the purge once it is read."""
    try:
        next(steps)
    except StopIteration as done:
        spec: PurgeSpec = done.value
        return spec
    return None


def _normalised(texts: tuple[str, ...], prefix: bool) -> Generator[None, None, tuple[str, ...]]:
    out = []
    for text in texts:
        out.append(normalise_url(text, prefix=prefix))
        if len(out) % PURGE_SLICE == 0:
            yield  # a slice done: the caller may let the event loop run
    return tuple(out)


# A lone surrogate: JSON can write one ("\\udcff"), UTF-8 cannot, and neither can the index (SQLite).
_SURROGATE = re.compile("[\ud800-\udfff]")


def strings(doc: dict[str, Any], name: str) -> tuple[str, ...]:
    """``doc[name]``, a list of non-empty strings (none when missing); BadPurge otherwise."""
    value = doc.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v and _SURROGATE.search(v) is None
                                              for v in value):
        raise BadPurge(f"{name!r} must be a list of non-empty strings")
    return tuple(value)


def flag(doc: dict[str, Any], name: str) -> bool:
    """``doc[name]``, a JSON boolean (false when missing); BadPurge otherwise."""
    value = doc.get(name, False)
    if not isinstance(value, bool):
        raise BadPurge(f"{name!r} must be true or false")
    return value


def _parse(doc: Any, host_allowed: Callable[[str], bool] | None) -> Generator[None, None, PurgeSpec]:
    """The parse, pausing (``yield``) after every ``PURGE_SLICE`` URLs; its value is the spec."""
    if not isinstance(doc, dict):
        raise BadPurge("the body must be a JSON object like {\"urls\": [...]}")
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise BadPurge(f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(_FIELDS))}")

    urls = yield from _normalised(strings(doc, "urls"), prefix=False)
    prefixes = yield from _normalised(strings(doc, "prefixes"), prefix=True)
    spec = PurgeSpec(urls, prefixes, strings(doc, "tags"), flag(doc, "all"), flag(doc, "soft"))
    if host_allowed is not None:
        for u in (*urls, *prefixes):
            host = url_host(u)
            if not host_allowed(host):
                raise BadPurge(f"{u!r}: cachegate does not serve host {host!r}")
    if not (spec.urls or spec.prefixes or spec.tags or spec.all):
        raise BadPurge("nothing to purge: give urls, prefixes, tags or all: true")
    return spec


def keys_for_url(url: str, rules: RuleSet) -> str:
    """The key a plain GET of ``url`` has under the rules (without header or cookie parts)."""
    parsed = URL(url, encoded=True)
    head = RequestHead("GET", parsed.scheme, normalise_host(parsed.raw_authority, parsed.scheme),
                       url_target(parsed, url), CIMultiDictProxy(CIMultiDict()))
    return url_of_key(cache_key(head, rules.plan(head).key))


def url_shapes(url: str, rules: RuleSet) -> set[str]:
    """Every URL part (``url_of_key``) the keys of ``url`` may have under the rules, whatever
    fields and cookies its requests carry (``RuleSet.key_shapes``): a purge by URL looks each up,
    so it finds the entries of a rule with a header condition too."""
    return url_key_shapes(url, rules)[0]


def url_key_shapes(url: str, rules: RuleSet) -> tuple[set[str], bool]:
    """``url_shapes``, and whether they are the keys themselves: no key that could hold ``url``
    adds header or cookie parts (then its keys are those and their parts' keys, and a lookup
    needs no pass over the shared memory: ``MemoryTier.find_url_keys``'s ``exact``)."""
    parsed = URL(url, encoded=True)
    head = RequestHead("GET", parsed.scheme, normalise_host(parsed.raw_authority, parsed.scheme),
                       url_target(parsed, url), CIMultiDictProxy(CIMultiDict()))
    specs = rules.key_shapes(head)
    return ({keys_for_url(url, rules), *(url_of_key(cache_key(head, spec)) for spec in specs)},
            not any(spec.headers or spec.cookies for spec in specs))


class Purger:
    """Carries out purges: the shared half once on the disk tier, the local half in a process.

    One process (``purge``) does both; with several workers the supervisor does the
    shared half and asks every worker for its local half (``proxy.supervisor``).
    """

    def __init__(self, storage: Storage, rules: Callable[[], RuleSet]) -> None:
        self.storage = storage
        self._rules = rules

    async def plan(self, spec: PurgeSpec) -> tuple[set[str], PurgeMatch]:
        """The keys of the spec's URLs (every key shape, as the rules reshape them) and the match
        that tells any process what the purge covers.

        A URL whose keys follow from it (no rule that could match it keys it on fields or cookies:
        ``url_key_shapes``) is looked up, its keys only; the shared memory is looked through, in
        slices, only for one that such a rule keys. Why: every unsafe request answered 2xx/3xx
        (RFC 9111 §4.4) is such a purge, and with 250,000 records in a shared memory without a
        disk tier each POST cost the process answering it 1.4 s of its loop's CPU (two passes),
        0.16 s with a disk tier (the records not yet written to disk): any client could keep a
        core busy with a POST loop.

        Where the purge begins (``since`` on the clock, ``arena_from`` in the shared memory) is
        taken first, before anything is looked up: the event loop runs between the slices of the
        lookup, and a fill that completes meanwhile, in any process, after its URL's slice was
        looked up, is found by no lookup; it lies past ``arena_from``, where every process's half
        looks (``Storage.purge_local``), as does one that lands on disk after ``since``."""
        since = time.monotonic()
        arena_from = self.storage.purge_mark()
        rules = self._rules()
        urls: set[str] = set()
        exact = True
        for n, raw in enumerate(spec.urls, 1):
            shapes, plain = url_key_shapes(raw, rules)
            urls.add(raw)
            urls.update(shapes)
            exact = exact and plain
            if n % PURGE_SLICE == 0:
                await asyncio.sleep(0)  # tens of thousands of URLs: let client requests in between
        # All the URLs at once: looked up one by one when no rule keys any of them on fields or
        # cookies (``url_key_shapes``), else one pass over the memory (in slices), not one per
        # slice of URLs.
        keys = await self.storage.keys_for_urls(urls, exact)
        keys.update(spec.keys)
        match = PurgeMatch(keys=frozenset(keys), urls=frozenset(urls), prefixes=spec.prefixes,
                           tags=frozenset(spec.tags), all=spec.all, soft=spec.soft, since=since,
                           arena_from=arena_from)
        return keys, match

    async def purge_shared(self, spec: PurgeSpec) -> tuple[int, list[Ban], PurgeMatch]:
        """The purge's shared half: the disk tier and the machine's shared memory, once; the
        match each process then finishes it with (``Storage.purge_local``)."""
        keys, match = await self.plan(spec)
        count, bans = await self.storage.purge_shared(keys, spec.prefixes, spec.tags, spec.all,
                                                      spec.soft)
        # The shared memory's pass goes up to where the purge began, not where it is now: what
        # was written after that is left to every process's half, which looks from there on.
        in_memory, _ = await self.storage.purge_memory(match, start=match.arena_from)
        return max(count, in_memory), bans, match

    async def purge(self, spec: PurgeSpec) -> int:
        async with self.storage.purging():
            count, bans, match = await self.purge_shared(spec)
            local = await self.storage.purge_local(match, bans)
        return max(count, local)


    async def purge_unheard(self, spec: PurgeSpec, within: float) -> tuple[int, bool]:
        """``purge`` when the process owning the cache directory did not answer (stopped or
        stalled, maybe holding a disk shard's write lock): the disk part takes at most about
        ``within`` seconds (``Storage.purge_unheard``); (entries removed, whether the disk's
        copies are gone too). URL keys only: tags, prefixes and "all" are bans, which only that
        process records."""
        async with self.storage.purging():
            _, match = await self.plan(spec)
            return await self.storage.purge_unheard(match, within)


def match_to_json(m: PurgeMatch) -> dict[str, Any]:
    return {"keys": sorted(m.keys), "urls": sorted(m.urls), "prefixes": list(m.prefixes),
            "tags": sorted(m.tags), "all": m.all, "soft": m.soft, "since": m.since,
            "arena_from": m.arena_from}


def match_from_json(d: dict[str, Any]) -> PurgeMatch:
    return PurgeMatch(keys=frozenset(d["keys"]), urls=frozenset(d["urls"]),
                      prefixes=tuple(d["prefixes"]), tags=frozenset(d["tags"]), all=bool(d["all"]),
                      soft=bool(d["soft"]), since=float(d.get("since", 0.0)),
                      arena_from=int(d.get("arena_from", 0)))
