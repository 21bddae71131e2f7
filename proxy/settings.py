"""Every key of the config file, declared once: frozen dataclasses whose fields carry their parsers.

A section of the file is a dataclass; each of its fields is one key, declared with
``setting(default, doc, parser)`` (``proxy.schema``): the field's name is the YAML key, its
default is the default, the parser reads and checks the value (inferred from the type for
bool, int, str, Literal, lists of strings and nested sections), and ``doc`` is its line in
docs/configuration.md. ``proxy.config`` reads a file with these declarations, ``cachegate
check`` reports what they refuse as ``FILE:LINE: message``, and ``scripts/config-reference``
writes the reference page from them. Adding a setting is one line here, and the code that
uses it.

Keys whose value has a shape of its own (``listen``: ``HOST:PORT``, a mapping or a list of
either; ``upstreams``: URLs or mappings; ``access_log``: a boolean or a mapping; ``workers``:
a number or ``auto``) have a parser written here for them, and declare the sections they
read so that the reference documents those too.

This module sits low in the import graph: the storage tiers, the upstream pool and the
engine take their setting types from here, and it imports none of them (nor the loader,
``proxy.config``).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import re
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from yarl import URL

from proxy.cluster.settings import ClusterSettings
from proxy.cpus import available_cpus
from proxy.policy.fields import unsendable
from proxy.policy.keys import bracket_problem, literal_in, normalise_host
from proxy.policy.request import DEFAULT_MAX_HEAD, parse_url
from proxy.policy.request import Listener as RequestListener
from proxy.room import SHARD_FILES
from proxy.rules import RuleSet
from proxy.schema import (
    Context,
    Invalid,
    Parser,
    Reported,
    byte_size,
    duration,
    elements,
    file_path,
    hostport,
    integer,
    internal,
    networks,
    parse_hostport,
    read_section,
    section,
    setting,
    show_hostport,
    show_path,
    strings,
    text,
    type_name,
    url_bracket_problem,
)
from proxy.tls import (
    ENCRYPTED_KEY,
    ca_file_problem,
    certificate_dates,
    load_problem,
    pem_file_problem,
    pem_is_encrypted,
    validity_problem,
)
from proxy.units import shown, yaml_number
from proxy.yamlsrc import Src

HostPort = tuple[str, int]
Balance = Literal["round_robin", "least_conn"]
RangeFill = Literal["whole", "none"]
MemoryPolicy = Literal["lru", "lfu"]
DiskEviction = Literal["least-recently-stored", "least-recently-used"]
LogFormat = Literal["json", "combined"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Networks that cannot reach cachegate from the internet however wide they are: IPv6
# unique-local (fc00::/7, the counterpart of 10.0.0.0/8) and link-local addresses.
_LOCAL_V6 = (ipaddress.IPv6Network("fc00::/7"), ipaddress.IPv6Network("fe80::/10"))

MB = 1 << 20
GB = 1 << 30
MIN_TOKEN_LENGTH = 16  # on a listener others can reach: guessing it must be out of the question
# Floors of the timers that a tiny value (5ms for 5s) turns into an outage, not a tuning.
# The supervisor's ping is answered by a worker's event loop, which a burst of requests, a
# rule compile or a garbage collection holds for milliseconds: 5ms had the watchdog kill
# every worker in a loop, and nothing was served.
MIN_WORKER_TIMEOUT = 1.0
WORKER_TIMEOUT_FLOOR = (" (a worker busy for a moment answers the supervisor's ping late; less has "
                        "the watchdog kill sound workers in a loop, and nothing is served)")
# A head (and a TLS handshake) or a body's next read takes a client's round trip and more:
# 5ms closed nearly every connection before its request.
MIN_CLIENT_TIMEOUT = 1.0
CLIENT_TIMEOUT_FLOOR = (" (a client's round trip, and its TLS handshake, take longer than a tiny "
                        "limit: connections are closed before their requests)")
# A request that waits for this node to be consistent (a hit, for a lapsed cluster node to catch up;
# an unsafe method's answer, for the supervisor's invalidation) and got tired of it in a few
# milliseconds would not wait at all: the supervisor's answer takes a moment under load.
MIN_CONSISTENCY_WAIT = 1.0
CONSISTENCY_WAIT_FLOOR = (" (the supervisor answers an invalidation in a moment, later under load; "
                          "less has workers make the supervisor's invalidations themselves)")
# An idle timeout under a second closes connections between the requests of one page: a request
# sent as it lapses meets the close (the race keep-alive timeouts are tuned to avoid).
KEEPALIVE_FLOOR = (" (a client's next request often comes later than that: one sent as the "
                   "connection closes fails)")
# Every worker checks every upstream: 1ms was 1,000 checks a second per worker, a load on the
# upstream of its own; nginx's health_check interval is counted in seconds, HAProxy's is 2s.
MIN_HEALTH_INTERVAL = 0.1
HEALTH_INTERVAL_FLOOR = (" (every worker checks every upstream that often: less is a load of its own on "
                         "the upstreams, not a quicker verdict)")
BODY_TIMEOUT_FLOOR = (" (a client's next part of a body takes its round trip and more: a tiny limit "
                      "answers uploads 408)")


# -- what the configured sizes give --------------------------------------------------------

RESERVE = 0.10  # of cache.disk.size, kept for the index and SQLite's journal files


def shard_budget(size: int, shards: int) -> int:
    """diskcache's budget per shard: its share of ``size`` less the RESERVE."""
    return max(int(size * (1 - RESERVE)) // shards, 1)


# The most disk shards. A shard is a lock that writers take in turn: more of them than ~4 a
# worker (64 workers at most) lets no more writes run at once, while each costs SHARD_FILES
# open files in every process and ~25 ms at each start (2,000 shards: 55 s, and 8,000 open
# files in every process, before serving). nginx's and Varnish's stores are one file.
MAX_SHARDS = 256
SHARDS_CEILING = (f" (each shard keeps up to {SHARD_FILES} files open in every process and is opened "
                  "at each start; more than a few a worker lets no more writes run at once)")

SHARD_FLOOR = 256 * 1024  # the least the index's bytes lower a shard's budget to (``shard_budget_beside``)

# When the shards, the URL index and their journals together pass cache.disk.size by more than
# this share of it, new entries stay off the disk (kept in memory only) until culls bring them
# back within the size (``DiskTier.weigh``); what write-behind commits in one part, before it
# weighs again, is at most as much (``proxy.storage.persist.BATCH_BYTES``). Why: an origin's
# responses whose metadata and index rows outweighed what culls took in their time (1,000 tags
# each) grew a 100 MB directory to 3.8 GB, where nginx's max_size and Varnish's storage size
# are hard limits.
SIZE_SLACK = 1 / 32


def shard_budget_beside(size: int, shards: int, outside: int) -> int:
    """A shard's budget with what diskcache does not count counted (``outside``: the URL index
    beside the shards, and the journals of both). Past the RESERVE less SIZE_SLACK it comes off
    the shards' budget, so long keys and many tags evict sooner instead of growing the directory
    past ``size``, which then holds them with SIZE_SLACK to spare for a write-behind part before
    its culls; never below SHARD_FLOOR (or the usual budget when it is smaller): an empty
    shard's database takes about 36 KB, and a small budget beside a large index (2 MB over 8
    shards: 29 KB) is under it, so every write's cull emptied the shard of the entries it had
    just answered stored. (No floor above it: at an eighth of the usual budget, an index of
    entries with many tags grew without bound beside shards that could not be culled further;
    the index shrinks with the shards, whose culls drop its rows. The journals were left to
    half the RESERVE: a small cache's took a tenth of it.)"""
    usual = shard_budget(size, shards)
    over = max(0, outside - index_allowance(size))
    return max(usual - over // shards, min(usual, SHARD_FLOOR), 1)


def index_allowance(size: int) -> int:
    """What the URL index and the journals may take of ``size`` before they lower the shards'
    budget (``shard_budget_beside``): the RESERVE, less SIZE_SLACK."""
    return int(size * (RESERVE - SIZE_SLACK))


def decoded_budget(budget: int) -> int:
    """Each process's cache of decoded entries: 1/32 of the memory budget, 16 KiB to 32 MB
    (and at most a quarter of a tiny budget)."""
    return min(max(budget // 32, 16 * 1024), 32 << 20, budget // 4)


def arena_capacity(budget: int, processes: int = 1) -> int:
    """The part of a memory budget the shared memory's ring gets: what is left once each
    process's decoded cache (``decoded_budget``) and the arena's index have theirs."""
    ring = budget - processes * decoded_budget(budget)
    return max(ring - ring // 32, 8 * 1024)  # the index: 16 bytes per 512 of ring


RECORD_HEADER = 40  # an arena record's header (``proxy.storage.arena.HEADER``; a test keeps them equal)


def ring_body_limit(capacity: int) -> int:
    """The most body bytes one record of a ring of ``capacity`` bytes holds: a record takes at
    most half the ring (rounded to 8 bytes, as the arena does), less its header; the record's
    key and metadata come off this too (``proxy.storage.writes.Writer.room``)."""
    return max((((capacity + 7) & ~7) // 2 & ~7) - RECORD_HEADER, 0)


def storable_limit(max_object: int, disk: tuple[int, int] | None, memory_max_object: int,
                   memory: int, processes: int = 1) -> int:
    """The biggest body the store can keep: ``max_object``, but at most half a disk shard
    (``disk`` = (size, shards)), or without a disk tier what the memory tier takes: at most
    ``memory_max_object``, and at most what one record of the shared memory's ring holds (the
    ring of ``memory`` shared by ``processes`` serving processes: ``ring_body_limit``). Why the
    ring's own figure: half of ``cache.memory`` let responses in that the ring then refused, a
    MISS said ``stored`` and the next request missed again."""
    if disk is not None:
        return min(max_object, shard_budget(*disk) // 2)
    return min(max_object, memory_max_object, memory // 2, ring_body_limit(arena_capacity(memory, processes)))


# -- upstreams -----------------------------------------------------------------------------


def upstream_url(value: str) -> URL:
    """An upstream's URL, without a path; ValueError saying why not."""
    scheme, sep, rest = value.partition("://")
    authority = re.split(r"[/?#]", rest if sep else value, maxsplit=1)[0]
    if "@" in authority:
        # The pool never sends them, and the URL is shown in logs, /metrics and /upstreams (RFC
        # 9110 §4.2.4 deprecates userinfo in http(s) URIs): refused first, so that no other
        # message about the URL shows them.
        shown = f"{scheme}://***@" if sep else "***@"
        shown += authority.rpartition("@")[2]
        raise ValueError(f"upstream url {shown!r}: credentials in the URL are not sent to the origin "
                         "(and would be shown in logs and metrics); remove them")
    if any(c <= " " or c == "\x7f" for c in value):  # yarl drops a CR or LF, the host goes in Host
        raise ValueError(f"upstream url {value!r}: must not contain spaces or control characters")
    problem = url_bracket_problem(authority)
    if problem is not None:
        raise ValueError(f"upstream url {value!r}: {problem}")
    try:
        url = parse_url(value)
    except ValueError as exc:
        raise ValueError(f"upstream url {value!r}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"upstream url {value!r}: expected http://HOST[:PORT] or https://...")
    if url.path not in ("", "/") or url.query_string:
        raise ValueError(f"upstream url {value!r}: must not have a path or query")
    return url.with_path("")


def _read_url(item: Src, ctx: Context) -> URL:
    if not isinstance(item.value, str):
        raise Invalid(f"expected a string, got {type_name(item.value)}")
    try:
        return upstream_url(item.value)
    except ValueError as exc:
        ctx.problems.add(item, str(exc))  # the message names the URL, not the key
        raise Reported from None


@dataclass(frozen=True)
class UpstreamSettings:
    """One entry of ``upstreams``: a URL, or a mapping with its weight."""

    url: URL = setting(doc="http://HOST[:PORT] or https://HOST[:PORT], without a path or "
                           "user:password@ (never sent: refused)",
                       parse=Parser("URL", _read_url))
    weight: int = setting(1, "its share of requests against the other upstreams' weights", integer(minimum=1))


def upstream_identity(url: URL) -> str:
    """What two upstream URLs must differ in to be two upstreams: the scheme and the host as the
    key normalises a Host (case, trailing dot, default port, the port's zeros, an IPv6 literal's
    spelling), an IPv4 address in any form the resolver reads as one (``127.0.0.01``,
    ``2130706433``, ``0x7f.1``: the pool connects to ``127.0.0.1``) as that address. A name is
    not resolved: ``localhost`` and ``127.0.0.1`` may be two virtual hosts of one server.

    >>> upstream_identity(URL("http://[0:0::1]:052877")), upstream_identity(URL("http://0x7f.1:80"))
    ('http://[::1]:52877', 'http://127.0.0.1')
    """
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    elif re.fullmatch(r"[0-9a-fA-FxX.]+", host):
        with contextlib.suppress(OSError):
            host = socket.inet_ntoa(socket.inet_aton(host))
    return f"{url.scheme}://{normalise_host(f'{host}:{url.port}', url.scheme)}"


def upstream_twice(earlier: dict[str, str], url: URL, written: str) -> str | None:
    """Why ``url`` (``written`` so) cannot be one more upstream beside the ``earlier`` ones (their
    ``upstream_identity`` -> as written), or None, and then it is noted among them. Listed
    twice, one upstream was two in /upstreams, each with its own health and share of requests,
    and /metrics merged them."""
    identity = upstream_identity(url)
    same = earlier.get(identity)
    if same is None:
        earlier[identity] = written
        return None
    also = "" if same == written else f": it and {same!r} are one upstream"
    return f"upstream {written!r} is listed twice{also}; list it once (a weight: gives it a bigger share)"


def _upstreams(item: Src, ctx: Context) -> tuple[UpstreamSettings, ...]:
    if not isinstance(item.value, list):
        raise Invalid(f"expected a list, got {type_name(item.value)}")
    out = []
    seen: dict[str, str] = {}
    for entry in item.value:
        try:
            if isinstance(entry.value, str):
                upstream, written = UpstreamSettings(_read_url(entry, ctx)), entry.value
            elif isinstance(entry.value, dict):
                upstream = read_section(UpstreamSettings, entry, ctx.entry("upstreams[]", entry))
                given = entry.value.get("url")
                written = given.value if given is not None and isinstance(given.value, str) else ""
                written = written or str(upstream.url)
            else:
                ctx.problem(entry, "each entry is a URL or {url: ..., weight: ...}")
                continue
        except Reported:
            continue
        twice = upstream_twice(seen, upstream.url, written)
        if twice is not None:
            ctx.problem(entry, twice)
            continue
        out.append(upstream)
    return tuple(out)


@dataclass(frozen=True)
class Timeouts:
    """How long the pool waits on an upstream."""

    # Each > 0 (total may be null): a 0 made every connect time out (every upstream taken out, every request a
    # 503), every total deadline pass at once, and switched the read timeout off unsaid.
    connect: float = setting(5.0, "to connect to an upstream", duration(positive=True))
    read: float = setting(60.0, "the longest silence between bytes of a response", duration(positive=True))
    total: float | None = setting(None, "a whole exchange, first byte to last (null, the default: no limit)",
                                  duration(positive=True))


def _absolute_path(value: str) -> str:
    if not value.startswith("/"):
        raise Invalid(f"must start with '/', got {value!r}")
    if not all("!" <= c <= "~" for c in value):  # it goes on the request line
        raise Invalid(f"a path is printable ASCII without spaces (percent-encode the rest), got {value!r}")
    return value


@dataclass(frozen=True)
class HealthSettings:
    """Active health checks: GET ``path`` every ``interval``; 2xx/3xx within ``timeout`` is a success."""

    path: str = setting("/healthz", "the path each upstream is asked for", text(check=_absolute_path))
    # A 0 interval checked each upstream thousands of times a second; a 0 timeout failed
    # every check, and took every upstream out.
    interval: float = setting(5.0, "time between two checks of an upstream (by every worker: at least "
                                   "100ms, less is a load on the upstreams of its own)", duration(
        minimum=MIN_HEALTH_INTERVAL, why=HEALTH_INTERVAL_FLOOR))
    timeout: float = setting(1.0, "a check that takes longer failed", duration(positive=True))
    healthy: int = setting(2, "consecutive successes that bring a down upstream back", integer(minimum=1))
    unhealthy: int = setting(3, "consecutive failures that take an upstream out", integer(minimum=1))


@dataclass(frozen=True)
class PassiveHealth:
    """Passive checks: consecutive failures take an upstream out for a cool-down. Failures to connect
    have no cap; a hang, an invalid answer, a connection dropped before any answer or a 502/503/504
    take out at most half the upstreams (see docs/upstreams.md). A lone upstream is taken out only
    when the config has a `passive:` section (the defaults below apply to a pool of two or more)."""

    failures: int = setting(3, "consecutive failures that take an upstream out (0: off)",
                            integer(minimum=0))
    # 0 loads, as it always did: no upstream is ever out, as with failures: 0 (refusing it broke
    # configs that had turned the checks off with both).
    cooldown: float = setting(10.0, "how long it stays out (0, or failures: 0, turns passive checks "
                                    "off)", duration())
    # False when the config has no passive: section. Then, like nginx's max_fails, a pool
    # of one upstream is never taken out: with nowhere else to send requests, a cool-down
    # would only turn three failed requests into 10 s of 503s for everyone.
    configured: bool = internal(False)


def _ca_file() -> Parser[str]:
    """``file_path``, holding a CA certificate: the pool would fail to start on one that does not
    load, and a reload (which cannot apply it) would be accepted. Read through the load's
    sources, as the TLS listeners' files are: the bytes checked are the bytes the pool trusts
    (``TLSSettings.ca_data``), and a restarted worker loads its supervisor's copy of them,
    whatever the file holds by then."""
    path = file_path(must_exist=False, strict=True)

    def read(item: Src, ctx: Context) -> str:
        resolved = path.read(item, ctx)
        try:
            data: bytes | OSError = ctx.sources.data(resolved)
        except OSError as exc:
            data = exc
        problem = ca_file_problem(resolved, data)
        if problem is not None:
            raise Invalid(problem)
        return resolved

    return replace(path, read=read)


@dataclass(frozen=True)
class TLSSettings:
    """How the pool checks the certificates of https:// upstreams."""

    verify: bool = setting(True, "check the upstream's certificate and name")
    ca_file: str | None = setting(None, "CA certificates (PEM) to check against instead of the system's "
                                        "(with verify: false, none are: a warning says so)",
                                  _ca_file())
    # The bytes of ca_file as the load read and checked them (None: no ca_file, or settings not
    # made by a load). Part of the pool's settings: a reload that changes them is named in
    # ``restart_required`` (proxy.web.server.live_settings), and a worker restarted after it
    # gets its supervisor's running bytes with the rest of the pool (``restart_only``).
    ca_data: bytes | None = internal(None)


def _with_ca_data(tls: TLSSettings, ctx: Context) -> TLSSettings:
    if tls.ca_file is None:
        return tls
    if not tls.verify and ctx.where is not None:
        # Nothing is checked at all: a ca_file beside verify: false reads as if certificates
        # were checked against it (a test setting left in, or one half of an edit).
        ctx.problems.warn(ctx.where, f"{ctx.name}.ca_file is ignored: verify is false, so upstream "
                                     "certificates are not checked at all; remove ca_file, or set "
                                     "verify: true to check them against it")
    return replace(tls, ca_data=ctx.sources.read.get(os.path.abspath(tls.ca_file)))


def _tls_section() -> Parser[TLSSettings]:
    """``upstream.tls``; ``verify: false`` (without a ca_file: that has its own warning) is
    warned of at its line: a test setting left in, or a shortcut past a private CA, that
    lets anyone on the path answer as the origin for every client."""
    base = section(TLSSettings, check=_with_ca_data)

    def read(item: Src, ctx: Context) -> TLSSettings:
        tls = base.read(item, ctx)
        if not tls.verify and tls.ca_file is None:
            ctx.problems.warn(item.value.get("verify", item),
                              f"{ctx.name}.verify is false: upstream certificates and names are not "
                              "checked, so anyone on the path to an https:// upstream can answer as it "
                              "and have the answer cached for every client; give the upstream's CA (or "
                              "its self-signed certificate) in ca_file instead")
        return tls

    return replace(base, read=read)


@dataclass(frozen=True)
class PoolSettings:
    """How the pool talks to upstreams (docs/upstreams.md)."""

    balance: Balance = setting("round_robin", "how requests are spread over the upstreams")
    timeouts: Timeouts = setting(factory=Timeouts, doc="connect, read and total timeouts")
    pool_size: int = setting(256, "the most connections to each upstream, per worker: a hard cap on its "
                                  "requests in flight (kept alive between them); one beyond it waits "
                                  "for a connection to come free, up to timeouts.connect, then gets 504",
                             integer(minimum=1))
    preserve_host: bool = setting(True, "send the request's Host upstream (normalised, as the key names it)")
    retries: int = setting(1, "extra attempts on another upstream when the connection failed",
                           integer(minimum=0))
    retry_non_idempotent: bool = setting(False, "retry POST and PATCH too")
    health: HealthSettings | None = setting(None, "active health checks (none: off)")
    passive: PassiveHealth = setting(
        factory=PassiveHealth, doc="passive health checks",
        parse=section(PassiveHealth, check=lambda v, ctx: replace(v, configured=True)))
    tls: TLSSettings = setting(factory=TLSSettings, doc="certificate checks of https:// upstreams",
                               parse=_tls_section())


# -- the cache -----------------------------------------------------------------------------


_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.1: a token


def field_names() -> Parser[tuple[str, ...]]:
    """A list of header field names (one name: a list of one); an empty name, one with a space
    in it, or one repeated (in any case: field names are case-insensitive) is refused at its line."""
    base = strings()

    def read(item: Src, ctx: Context) -> tuple[str, ...]:
        out: list[str] = []
        seen: dict[str, str] = {}
        for element in elements(item):
            if not isinstance(element.value, str | int | float) or isinstance(element.value, bool):
                ctx.problem(element, f"expected strings in the list, got {type_name(element.value)}")
                continue
            name = element.as_text()
            if not _FIELD_NAME.fullmatch(name):
                ctx.problem(element, f"{name!r} is not a header field name (a token: letters, digits and "
                                     "!#$%&'*+-.^_`|~, without spaces)")
            elif name.lower() in seen:
                also = "" if seen[name.lower()] == name else f" (as {seen[name.lower()]}: field names are " \
                                                            "case-insensitive)"
                ctx.problem(element, f"{name} is listed twice{also}; list it once")
            else:
                seen[name.lower()] = name
                out.append(name)
        return tuple(out)

    return replace(base, kind="list of header field names", read=read)


@dataclass(frozen=True)
class DiskSettings:
    """The disk tier (docs/storage.md), shared by every worker; ``disk: null`` runs memory-only."""

    path: str = setting("var/cache", "the cache folder (relative paths: to the config file)",
                        file_path(folder=True))
    size: int = setting(10 * 1024 * MB, "the disk tier's byte budget", byte_size())
    shards: int = setting(8, "SQLite databases the budget is split into (a body takes half of one at "
                          "most); a new count applies at the next start, which moves each entry whose "
                          "shard changed into its new shard before serving (about 0.3 ms per entry "
                          "moved) and removes the folders past the count (docs/storage.md). At most "
                          f"{MAX_SHARDS}: each shard keeps up to {SHARD_FILES} files open in every "
                          "process, and is opened at each start; a start (and `check`) refuses more "
                          "than the open-files limit leaves room for, beside connections",
                          integer(minimum=1, maximum=MAX_SHARDS, why=SHARDS_CEILING))
    eviction: DiskEviction = setting("least-recently-stored", "what goes first when the budget is full "
                                     "(least-recently-used makes every disk read a write too)")


@dataclass(frozen=True)
class CacheSettings:
    """What is stored, where, and how much (docs/storage.md)."""

    memory: int = setting(256 * MB, "the memory tier's byte budget (the whole machine: workers share it)",
                          byte_size())
    memory_max_object: int = setting(1 * MB, "bigger bodies stay on disk only (and none bigger than one "
                                     "record of the shared memory holds: a little under half its ring)",
                                     byte_size())
    memory_policy: MemoryPolicy = setting("lru", "what the memory tier drops first")
    max_object: int = setting(100 * MB, "bigger responses are streamed through, not stored", byte_size())
    # (0 made every request of a herd fetch for itself: the herd coalescing exists to stop.)
    lock_timeout: float = setting(5.0, "the longest a request waits for another's fetch of the same key",
                                  duration(positive=True))
    hit_for_pass: float = setting(5.0, "a key whose response was not shareable skips waiting for this long "
                                  "(and the disk lookup, when nothing is stored under it: see upstreams.md; "
                                  "0: no key is remembered)",
                                  duration())
    disk: DiskSettings | None = setting(DiskSettings(), "the disk tier (null: memory only)")
    # RFC 9111 §4.2.3 allows either age: the full formula, or the Age field plus the delay alone.
    apparent_age: bool = setting(True, "count a response's age from its Date too (RFC 9111 §4.2.3's "
                                 "full formula): an origin whose clock is behind this one (or this "
                                 "machine's clock ahead) by more than a lifetime has every response "
                                 "arrive stale, never reused "
                                 "(logged, cachegate_origin_date_behind_total). false: from its Age "
                                 "field and the response delay alone, as Varnish and nginx count it; "
                                 "behind a cache that sends no Age (nginx), a response already aged "
                                 "there is then kept fresh for its whole lifetime again "
                                 "(docs/caching.md). A reload applies it to new fills")
    tag_headers: tuple[str, ...] = setting(("Surrogate-Key", "Cache-Tag"),
                                           "response fields whose values tag an entry, for purges by tag",
                                           field_names())
    # A range request that misses: "whole" also fetches the whole object in the background when
    # the range's 206 may be stored (stored, it answers every later range); "none" fetches only
    # the ranges asked for. Either way a range joins the key's fill in flight (docs/caching.md).
    range_fill: RangeFill = setting("whole", "a range miss: answered at once and, when its 206 may be "
                                             "stored, the whole object fetched behind it (whole), or only "
                                             "the ranges asked for (none)")


# -- the admin API -------------------------------------------------------------------------


def too_wide(network: Network) -> bool:
    """Whether a network granted trust (``trusted_proxies``, ``admin.purge_from``) is wider than
    any one site's proxies or purgers are: wider than a /8 (IPv4; 10.0.0.0/8 is the widest
    private network) or a /32 (IPv6: a whole provider's allocation), unless it is IPv6
    unique-local or link-local. ``0.0.0.0/0`` and ``::/0`` read as "everyone".

    >>> [too_wide(ipaddress.ip_network(n)) for n in ("0.0.0.0/0", "::/0", "0.0.0.0/1", "2000::/3",
    ...                                             "10.0.0.0/8", "2001:db8::/32", "fc00::/7", "::1")]
    [True, True, True, True, False, False, False, False]
    """
    if isinstance(network, ipaddress.IPv4Network):
        return network.prefixlen < 8
    return network.prefixlen < 32 and not any(network.subnet_of(local) for local in _LOCAL_V6)


def _wider_than_a_site(risk: str) -> Callable[[Network], str | None]:
    def why(network: Network) -> str | None:
        if not too_wide(network):
            return None
        who = "every client" if network.prefixlen == 0 else "every address in it"
        return f"is wider than a /{8 if network.version == 4 else 32}: {who} {risk}"
    return why


_HOST_PATTERN = r"(\*\.)?[a-z0-9_.-]+(:\d{1,5})?|\[[0-9a-f:.]+\](:\d{1,5})?"


def _host_patterns(item: Src, ctx: Context, refuse: Callable[[str], str | None] | None = None
                   ) -> tuple[str, ...]:
    """Host patterns: ``name``, ``name:port``, ``*.domain``, ``[v6]``; a list, or one. ``refuse``
    says why a well-formed pattern is refused anyway (None: kept)."""
    hosts = []
    for element in elements(item):
        host = str(element.value).strip().lower().rstrip(".")
        brackets = bracket_problem(host) if isinstance(element.value, str) else None
        if brackets is not None:  # never held (a Host spelt so is answered 400)
            ctx.problem(element, f"{shown(element.value)}: {brackets}")
            continue
        if not isinstance(element.value, str) or not re.fullmatch(_HOST_PATTERN, host):
            ctx.problem(element, f"{shown(element.value)} is not a host name, host:port or *.domain")
            continue
        port = host.rpartition("]")[2].rpartition(":")[2] if ":" in host.rpartition("]")[2] else ""
        if port and not 1 <= int(port) <= 65535:  # never matched: no Host can carry it
            ctx.problem(element, f"{shown(element.value)} has port {int(port)}, which no Host field can "
                                 "carry (a port is 1 to 65535)")
            continue
        why = refuse(host) if refuse is not None else None
        if why is not None:
            ctx.problem(element, f"{shown(element.value)} {why}")
            continue
        hosts.append(literal_in(host))
    return tuple(hosts)


HOSTS = Parser("list of host names (name, name:port, *.domain)", _host_patterns, show=lambda v: "[]")


def wildcard_too_wide(pattern: str) -> str | None:
    """Why a server name pattern is too wide for the DNS rebinding guard, or None: a wildcard of
    one label (``*.com``) lets every page under that suffix through. ``*.co.uk`` cannot be told
    from ``*.ops.example`` without the public suffix list, which cachegate does not ship (the
    docs say so); ``*.localhost`` is kept: browsers resolve every name under it to loopback.

    >>> [wildcard_too_wide(p) is None for p in ("*.com:8081", "*.uk.", "*.ops.example", "*.localhost", "com")]
    [False, False, True, True, True]
    """
    labels = [label for label in pattern.partition(":")[0].removeprefix("*.").split(".") if label]
    if not pattern.startswith("*.") or len(labels) != 1 or labels == ["localhost"]:
        return None
    return (f"matches every name under .{labels[0]}: any web page there could pass the DNS rebinding "
            "guard; list your own domain (*.ops.example) or the names themselves")


SERVER_NAMES = Parser("list of host names (name, name:port, *.domain)",
                      lambda item, ctx: _host_patterns(item, ctx, wildcard_too_wide), show=lambda v: "[]")


def _admin_token(value: str) -> str | None:
    """A token some client can send in ``Authorization: Bearer``; else Invalid, saying which
    character (never the token). Accepted, a trailing newline (a secret file written with
    ``echo``) made every bearer request a 401, and ``cachegate purge`` blame the URL."""
    problem = unsendable(value)
    if problem is not None:
        echo = (" (a secret file written with echo ends with one: write it with printf '%s', or "
                "strip it)") if value.endswith("\n") else ""
        raise Invalid(f"{problem}, which no client can send in an Authorization field (HTTP strips "
                      "whitespace around a field value and refuses control characters): every "
                      f"request with this token would be refused; remove it{echo}")
    return value or None


@dataclass(frozen=True)
class AdminSettings:
    """The admin API's listener and who may use it (docs/admin-api.md)."""

    listen: HostPort | None = setting(("127.0.0.1", 8081), "the admin API's listener (null or false: none)",
                                      hostport(off=True))
    token: str | None = setting(None, "the bearer token the admin API asks for (required on a listener "
                                      f"others can reach, {MIN_TOKEN_LENGTH} characters or more)",
                                text(strict=True, check=lambda v: _admin_token(v)))
    # Not loopback by default: behind a TLS terminator or sidecar on the same host, every
    # client arrives from 127.0.0.1.
    purge_from: tuple[Network, ...] = setting((), "peers (IPs, CIDRs) that may send PURGE to the client "
                                                  "listener; empty: PURGE is off",
                                            networks(_wider_than_a_site(
                                                "may PURGE any URL, emptying the cache of what it likes "
                                                "(each purge a miss that reaches the origin); list the "
                                                "hosts that purge (your CMS, deploy hosts)")))
    hosts: tuple[str, ...] = setting((), "hosts admin URLs may name (empty: the hosts asked for since start "
                                         "and the hosts in the store)", HOSTS)
    # Checked without a token, or with one when listed (proxy.web.admin_guard).
    server_names: tuple[str, ...] = setting((), "names the admin listener answers to besides loopback "
                                                "addresses and localhost (a DNS rebinding guard)",
                                            SERVER_NAMES)


# -- deploy and operate: listeners and TLS -------------------------------------------------


def _pem_path(field: str) -> Parser[str]:
    """``file_path``, read here through the load's sources (a worker checks the supervisor's
    copy, not the file now): one that cannot be read is refused at its line, naming it and why
    (missing, a directory, a FIFO, no permission), and OpenSSL never opens the path (a FIFO
    there blocked ``check``, a start, and a reload for good). A key that needs a passphrase is
    refused too: cachegate never asks for one."""
    path = file_path(strict=True)

    def read(item: Src, ctx: Context) -> str:
        resolved = path.read(item, ctx)
        try:
            data = ctx.sources.data(resolved)
        except OSError as exc:
            raise Invalid(pem_file_problem(resolved, exc)) from None
        if field == "key" and pem_is_encrypted(data):
            raise Invalid(ENCRYPTED_KEY)
        return resolved

    return replace(path, read=read)


@dataclass(frozen=True)
class ListenerTLS:
    """A TLS listener's certificate chain and key (PEM files), read again on SIGHUP."""

    cert: str = setting(doc="the certificate chain (PEM): the server's certificate first, then the "
                            "intermediates", parse=_pem_path("cert"), missing=" (a PEM file)")
    key: str = setting(doc="its private key (PEM, unencrypted)", parse=_pem_path("key"),
                       missing=" (a PEM file)")


def _loads(tls: ListenerTLS, ctx: Context) -> ListenerTLS:
    """The pair loads (the server would fail the same way: say so now), from the bytes the
    fields' parsers read through the load's ``Sources``: the bytes checked are the bytes served
    (``Settings.pem``), and the supervisor's copy for its workers holds them
    (``proxy.supervisor.ConfigCopy``)."""
    read = ctx.sources.read
    pem = (read[os.path.abspath(tls.cert)], read[os.path.abspath(tls.key)])
    problem = load_problem(tls.cert, tls.key, pem)
    if problem is not None:
        raise Invalid(problem)
    return tls


def _tls_null(ctx: Context) -> None:
    raise Invalid("expected {cert: FILE, key: FILE}, got nothing (null)")


def _listener_tls() -> Parser[ListenerTLS]:
    """``listen[].tls``; a certificate that loads but that clients refuse (expired, not valid
    yet) or soon will (``proxy.tls.EXPIRES_SOON``) is warned of at the ``cert`` line, by
    ``check`` (``--strict`` refuses it), a start and a reload (its answer's ``warnings``): a
    renewal hook that copied an old file looked like a success, and every handshake failed."""
    base = section(ListenerTLS, check=_loads, expected="{cert: FILE, key: FILE}", null=_tls_null)

    def read(item: Src, ctx: Context) -> ListenerTLS:
        tls = base.read(item, ctx)
        dates = certificate_dates(ctx.sources.read[os.path.abspath(tls.cert)])
        why = validity_problem(tls.cert, dates, time.time()) if dates is not None else None
        if why is not None:
            ctx.problems.warn(item.value.get("cert", item), f"{ctx.name}.cert: {why}")
        return tls

    return replace(base, read=read)


@dataclass(frozen=True)
class ListenEntry:
    """A client listener written as a mapping: ``listen: {address: HOST:PORT, tls: {cert, key}}``,
    or one entry of a list of listeners."""

    address: HostPort = setting(doc="the address to listen on", parse=hostport(), missing=" (HOST:PORT)")
    tls: ListenerTLS | None = setting(None, "a TLS listener's certificate and key (none: plain HTTP)",
                                      _listener_tls())


@dataclass(frozen=True)
class Listener:
    """One client listener: ``listen: HOST:PORT`` or ``{address: HOST:PORT, tls: {cert, key}}``."""

    host: str
    port: int
    tls: ListenerTLS | None = None

    @property
    def address(self) -> HostPort:
        return (self.host, self.port)

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"


_LISTEN_FORMS = "expected HOST:PORT or {address: HOST:PORT, tls: {cert: FILE, key: FILE}}"


def _listener(item: Src, ctx: Context) -> tuple[Listener, Src]:
    """One listener, and where its address was written."""
    if isinstance(item.value, dict):
        entry = read_section(ListenEntry, item, ctx)
        return Listener(*entry.address, entry.tls), item.value.get("address", item)
    if isinstance(item.value, str | int) and not isinstance(item.value, bool):
        try:
            return Listener(*parse_hostport(item.as_text())), item
        except ValueError as exc:
            raise Invalid(str(exc)) from None
    raise Invalid(_LISTEN_FORMS)


def _listen(item: Src, ctx: Context) -> tuple[Listener, ...]:
    """``HOST:PORT``, a mapping ``{address: HOST:PORT, tls: {cert: FILE, key: FILE}}``, or a list
    of either (e.g. ``[":80", {address: ":443", tls: {...}}]``)."""
    several = isinstance(item.value, list)
    entries: list[Src] = item.value if several else [item]
    if not entries:
        raise Invalid("give at least one HOST:PORT")
    out: list[Listener] = []
    for n, entry in enumerate(entries):
        sub = ctx.entry(f"listen[{n}]" if several else "listen", entry)
        try:
            listener, at = _listener(entry, sub)
        except Invalid as exc:
            sub.problem(entry, str(exc))
            continue
        except Reported:
            continue
        twice = listed_twice(out, listener)
        if twice is not None:
            sub.problem(at, twice)
            continue
        out.append(listener)
    if not out:
        raise Reported
    return tuple(out)


def bound_addresses(host: str, port: int) -> frozenset[str]:
    """The IP addresses a listener on ``host`` takes: an IP as written, a name as it resolves
    (``localhost``: 127.0.0.1, and ::1 where /etc/hosts says so), the name itself when it does
    not resolve (binding it will say why)."""
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return frozenset({host})
    return frozenset(str(info[4][0]) for info in infos)


def shared_address(a: frozenset[str], b: frozenset[str]) -> str | None:
    """An address that two listeners on one port would both take, or None: the same address,
    or a wildcard (0.0.0.0, ::) and an address of its family. The second socket cannot bind.

    >>> shared_address(frozenset({"127.0.0.1", "::1"}), frozenset({"127.0.0.1"}))
    '127.0.0.1'
    >>> shared_address(frozenset({"0.0.0.0"}), frozenset({"10.0.0.1"})), shared_address(
    ...     frozenset({"::"}), frozenset({"10.0.0.1"}))
    ('10.0.0.1', None)
    """
    for x in sorted(a):
        for y in sorted(b):
            if x == y or ((":" in x) == (":" in y) and (x in ("0.0.0.0", "::") or y in ("0.0.0.0", "::"))):
                return y if x in ("0.0.0.0", "::") else x
    return None


def listed_twice(earlier: list[Listener], listener: Listener) -> str | None:
    """Why ``listener`` cannot be bound beside the ``earlier`` ones (the same address written
    twice, or two ways: ``localhost`` and ``127.0.0.1``), or None. Names are resolved only when
    there are several listeners: the start would fail later with a bare "address in use", or
    with several workers blame "another cachegate" (its own pid)."""
    if not listener.port or not earlier:
        return None
    mine: frozenset[str] | None = None
    for other in earlier:
        if other.port != listener.port:
            continue
        if other.host == listener.host:
            return f"{show_hostport(listener.address)} is listed twice"
        mine = mine if mine is not None else bound_addresses(*listener.address)
        both = shared_address(bound_addresses(*other.address), mine)
        if both is not None:
            return (f"{show_hostport(listener.address)} is listed twice: it and "
                    f"{show_hostport(other.address)} both take {show_hostport((both, listener.port))}")
    return None


LISTEN = Parser("HOST:PORT, a listener mapping, or a list of them", _listen,
                show=lambda v: ", ".join(show_hostport(li.address) for li in v), sections=(ListenEntry,))


# -- logs ----------------------------------------------------------------------------------


def _log_path(item: Src, ctx: Context) -> str:
    value: str = text().read(item, ctx)
    if value == "stdout":
        return value
    resolved = ctx.path(value)
    parent = os.path.dirname(resolved)
    if not os.path.isdir(parent):
        raise Invalid(f"directory {parent} does not exist")
    why = _unappendable(resolved)
    if why is not None:
        raise Invalid(why)
    return resolved


def _unappendable(path: str) -> str | None:
    """Why the access log cannot open ``path`` for appending (None: it can), tried as it opens
    it: a file that cannot be created (a read-only directory, /proc) passed the check and the
    reload, then every process logged no requests, the log that worked dropped. A new file is
    created and removed again; a FIFO or a device is not opened (a FIFO would wait for a reader)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            return f"cannot create {path}: {exc.strerror or exc}"
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None
    except OSError as exc:
        return f"cannot open {path}: {exc.strerror or exc}"
    if stat.S_ISDIR(st.st_mode):
        return f"{path} is a directory"
    if not stat.S_ISREG(st.st_mode):
        return None if os.access(path, os.W_OK) else f"cannot write to {path}"
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))
    except OSError as exc:
        return f"cannot open {path} for appending: {exc.strerror or exc}"
    return None


@dataclass(frozen=True)
class AccessLogSettings:
    """The access log (docs/logs.md): ``access_log: true`` is JSON lines on standard output."""

    format: LogFormat = setting("json", "json: one JSON object a line; combined: nginx's and Apache's format")
    path: str = setting("stdout", "stdout, or a file appended to and reopened on SIGHUP (relative paths: to "
                                  "the config file)",
                        Parser("stdout or path", _log_path))


def _access_log(item: Src, ctx: Context) -> AccessLogSettings | None:
    if item.value is False:
        return None
    if item.value is True:
        return AccessLogSettings()
    if not isinstance(item.value, dict):
        raise Invalid("expected true, false or {format: json|combined, path: stdout|FILE}, "
                      f"got {type_name(item.value)}")
    return read_section(AccessLogSettings, item, ctx)


# -- the file ------------------------------------------------------------------------------


# The most workers one instance runs: the lease table (``proxy.leases.MAX_WORKERS``, a test
# keeps them equal) notes a key's waiting workers as bits of a 64-bit word, and worker 64 and
# up fetched every miss for itself, unsaid (one fetch per machine no more).
MAX_WORKERS = 64


def parse_workers(text: str) -> int:
    """``workers``: a number, 1 to MAX_WORKERS, or auto (at most MAX_WORKERS)."""
    if text == "auto":
        # The affinity mask and cgroup quota, not the host's CPUs; on a bigger host, MAX_WORKERS.
        return min(available_cpus(), MAX_WORKERS)
    if not (text.isascii() and text.isdigit()) or int(text) < 1:  # not '²', which int() refuses
        raise ValueError(f"expected a positive number or auto, got {text!r}")  # (callers name the key)
    if int(text) > MAX_WORKERS:
        raise ValueError(f"at most {MAX_WORKERS}, got {text}: {MAX_WORKERS} workers at most wait for "
                         "each other's fetch of a key (one origin request per machine); more would "
                         "each fetch every miss for itself")
    return int(text)


def _workers(item: Src, ctx: Context) -> int:
    if isinstance(item.value, list | dict):  # (its text would be the reader's records)
        ctx.problems.add(item, f"workers: expected a positive number or auto, got {type_name(item.value)}")
        raise Reported from None
    try:
        yaml_number(item.value, item.raw, str(item.value))
    except ValueError as exc:
        ctx.problems.add(item, f"workers: {exc}")
        raise Reported from None
    try:
        return parse_workers(str(item.value))
    except ValueError as exc:
        ctx.problems.add(item, f"workers: {exc}")
        raise Reported from None


def rule_file_shown(resolved: str, config: str | None) -> str:
    """A rule file's name in problems, ``check``, /reload and explain: shown as the config's own
    path is. Absolute when the config was named by an absolute path (a service's, whose working
    directory is / : "etc/cachegate/rules/site.yaml" read as a path relative to nothing);
    relative to the current directory, as the config's, when it was named by a relative one."""
    if config is None or os.path.isabs(config):
        return resolved
    shown = os.path.relpath(resolved)
    return resolved if shown.startswith("..") else shown


def _rule_files(item: Src, ctx: Context) -> tuple[str, ...]:
    """Rule file paths (a list, or one), each a regular file, each listed once."""
    files = []
    seen: dict[str, str] = {}  # the real path -> the entry as written first
    for element in elements(item):
        try:
            written = text().read(element, ctx)
        except Invalid as exc:
            ctx.problem(element, str(exc))
            continue
        try:
            resolved = ctx.path(written)
        except Invalid as exc:
            ctx.problem(element, str(exc))
            continue
        real = ctx.sources.identity(resolved)
        if real in seen:
            also = "" if seen[real] == written else f" (as {show_path(seen[real])} before)"
            ctx.problem(element, f"rule file {show_path(written)} is listed twice{also}; list it once")
            continue
        seen[real] = written
        why = ctx.sources.why_not(resolved)
        if why is not None:
            # (Named as the files loaded are: from the config's own name, as written.)
            ctx.problem(element, f"rule file {show_path(rule_file_shown(resolved, element.file))} {why}")
        files.append(resolved)
    return tuple(files)


def _printable(value: str) -> str:
    value = value.strip()
    if not value or not all(" " <= c <= "~" for c in value):
        raise Invalid(f"expected printable ASCII text, got {value!r}")
    return value


_VIA_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(:[0-9]{1,5})?")


def _via_name(value: str) -> str:
    """A Via ``received-by``: a token (a pseudonym or host name) and maybe ``:PORT``."""
    value = value.strip()
    if not _VIA_NAME.fullmatch(value):
        raise Invalid(f"expected a name like cachegate or edge-1.example:8080 (letters, digits, "
                      f"- . _ and no spaces), got {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """The top level of the config file."""

    source: str = internal()  # the config file, or "<defaults>"
    # Client listeners, in the order given (``listen`` is the first one's address).
    listeners: tuple[Listener, ...] = setting((Listener("127.0.0.1", 8080),),
                                              "the client listeners, plain or TLS (docs/deploy.md); "
                                              "each serves the family of its address alone: `[::]:8080` "
                                              "IPv6, `0.0.0.0:8080` (or `:8080`) IPv4; for both, list "
                                              "both: `[\"0.0.0.0:8080\", \"[::]:8080\"]`", LISTEN,
                                              key="listen")
    upstreams: tuple[UpstreamSettings, ...] = setting(
        (), "the origin servers: URLs, or {url, weight} mappings; each one once (compared normalised)",
        Parser("list of URLs or mappings", _upstreams, sections=(UpstreamSettings,), entries=True))
    pool: PoolSettings = setting(factory=PoolSettings, doc="how the pool talks to upstreams", key="upstream")
    cache: CacheSettings = setting(factory=CacheSettings, doc="memory and disk tiers, object sizes, waits")
    admin: AdminSettings = setting(factory=AdminSettings, doc="the admin API")
    rule_files: tuple[str, ...] = setting((), "rule files, applied in order (relative paths: to the config "
                                              "file)", Parser("list of paths", _rule_files), key="rules")
    rules: RuleSet = internal(factory=RuleSet)  # compiled from rule_files by proxy.config
    # The bytes of the config file and its rule files as this load read them, (absolute path,
    # bytes) pairs (proxy.yamlsrc.Sources): a supervisor hands them to its workers (ConfigCopy).
    # A tuple: Settings stays hashable.
    sources: tuple[tuple[str, bytes], ...] = internal(())
    trusted_proxies: tuple[Network, ...] = setting((), "peers (IPs, CIDRs) whose forwarding fields "
                                                       "(X-Forwarded-*, X-Real-IP, ...) are kept",
                                                networks(_wider_than_a_site(
                                                    "may set X-Forwarded-For, X-Real-IP, Forwarded and "
                                                    "the scheme (X-Forwarded-Proto): the origin then sees "
                                                    "the client addresses and schemes they claim; list "
                                                    "your own proxies' or load balancers' addresses")))
    workers: int = setting(1, "worker processes, or auto: one per CPU this process may use (affinity and "
                              "cgroup quota), at most 64 (the workers that share a fetch of a key)",
                           Parser("integer 1-64 or auto", _workers))
    shutdown_grace: float = setting(10.0, "how long requests in flight may take to finish on SIGTERM "
                                          "(0: they are cut off at once)",
                                    duration())
    # A worker whose event loop is stuck (a blocking call, a loop that never ends, SIGSTOP) keeps
    # accepting its share of connections (SO_REUSEPORT) and answers none of them: the supervisor
    # pings each worker and kills one that stays silent, as Varnish's manager does with its child
    # (cli_timeout) and gunicorn's arbiter with its workers (timeout, 30 s).
    worker_timeout: float = setting(30.0, "with several workers, a worker that does not answer the "
                                          "supervisor's ping for this long is killed and restarted; "
                                          "one that waits for a lock of the shared memory another "
                                          "worker holds is spared and the holder killed instead "
                                          "(at least 1s: a worker busy for a moment answers late, "
                                          "and less had sound workers killed in a loop, nothing "
                                          "served)",
                                    duration(minimum=MIN_WORKER_TIMEOUT, why=WORKER_TIMEOUT_FLOOR))
    # How long a request waits for this node to be consistent before it goes on without: the
    # client's answer against what may be served stale meanwhile (an operator's trade-off).
    consistency_wait: float = setting(10.0, "the longest a request waits for this node to be "
                                            "consistent, then goes on without: in cluster mode a hit, "
                                            "for a node whose heartbeat lapsed to catch up; with "
                                            "several workers an unsafe method's answer, for the "
                                            "supervisor to make its invalidation (past it the worker "
                                            "makes it in the shared store itself)",
                                      duration(minimum=MIN_CONSISTENCY_WAIT, why=CONSISTENCY_WAIT_FLOOR))
    via: str = setting("cachegate", "the name cachegate gives itself in Via fields (a token: no spaces)",
                       text(check=_via_name))
    cluster: ClusterSettings | None = setting(None, "cluster mode on Redis (none: this node alone)")
    max_request_head: int = setting(DEFAULT_MAX_HEAD, "the request line and fields together; a bigger head "
                                                      "is refused with 431",
                                    byte_size(minimum=1024, why=" (a browser's request head is 0.5-2KB)"))
    # A head sent a few bytes at a time (slowloris), or never finished, holds a connection and its
    # file descriptor: the keep-alive timer alone let it for 75 s, the admin listener's for an hour.
    client_header_timeout: float = setting(60.0, "the longest a request head may take to arrive whole "
                                                 "(from the connection's opening for its first request, "
                                                 "from its first byte for the next); then the "
                                                 "connection is closed, on both listeners (with "
                                                 "nothing sent; on the proxy listener a head begun is "
                                                 "logged `408`: [logs.md](logs.md#the-access-log)) "
                                                 "(on a TLS one, its handshake has as long again, "
                                                 "before)",
                                           duration(minimum=MIN_CLIENT_TIMEOUT, why=CLIENT_TIMEOUT_FLOOR))
    # A client that asks and never reads held its reply in the worker's memory for as long as it
    # kept the connection open (3,000 such connections for a 900 KB hit: +520 MB per worker).
    send_timeout: float = setting(60.0, "the longest a reply may make no progress because the client "
                                        "reads nothing (writes paused, nothing more acknowledged); "
                                        "then the connection is reset (nginx: send_timeout); over TLS, "
                                        "also how long a connection cachegate closes may take to hand "
                                        "the client what its TLS layer still holds",
                                  duration(minimum=MIN_CLIENT_TIMEOUT, why=CLIENT_TIMEOUT_FLOOR))
    # Fixed at aiohttp's 75 s before: a load balancer that keeps its idle connections to the
    # backend longer (AWS ALB's idle timeout goes to 4000 s, Google's needs over 600 s) sent
    # requests into connections cachegate was closing, and answered those 502.
    keepalive_timeout: float = setting(75.0, "how long an idle client connection stays open for its "
                                             "next request (nginx: keepalive_timeout); behind a load "
                                             "balancer, longer than its idle timeout: "
                                             "[deploy.md](deploy.md#keep-alive-behind-a-load-balancer); "
                                             "0: no keep-alive, every reply closes its connection "
                                             "(Connection: close)",
                                       duration(minimum=MIN_CLIENT_TIMEOUT, zero="no keep-alive",
                                                why=KEEPALIVE_FLOOR))
    # Without a cap, connections that only wait for their client (idle, a head or body never
    # finished, a reply never read) ran a worker out of file descriptors, and every connection
    # after them was closed unanswered.
    max_connections: int | None = setting(None, "client connections one worker keeps open at once; one "
                                                "more closes the oldest that only waits for its client "
                                                "(idle, a head or body unfinished, a reply unread), "
                                                "else itself (null, the default: 10,000, or less to "
                                                "stay below the open-files limit: "
                                                "[requests.md](requests.md#limits))",
                                          integer(minimum=1))
    # A memory hit is handed to its connection whole: each client that asked for a 1 MB object
    # and read nothing held ~1 MB of the worker's memory until send_timeout (1,000 of them: +1,000
    # MB; up to max_connections x memory_max_object x 2 per worker).
    max_unsent: int | None = setting(64 * MB, "per worker: the bytes replies hold in the worker's buffers "
                                              "while their writes are paused (their clients read slower "
                                              "than they are sent); past it, connections whose client has "
                                              "read none of its reply for a second are reset, the longest "
                                              "unread first, until it is met (one whose client read some of "
                                              "it within the last second is not; a client reading in bursts "
                                              "further apart can be): [requests.md](requests.md#limits)",
                                     byte_size(minimum=MB, why=" (null: no budget)", null="no budget"))
    # A request body is sent upstream as it arrives, on a pooled connection: without a limit, a
    # client that stalls mid-upload holds that connection for as long as it likes, and
    # pool_size of them stop every other client's misses (nginx: client_body_timeout).
    client_body_timeout: float = setting(60.0, "the longest silence between two reads of a request "
                                               "body; then 408, the connection closed",
                                         duration(minimum=MIN_CLIENT_TIMEOUT, why=BODY_TIMEOUT_FLOOR))
    # A silence limit alone lets a body trickled a byte every few seconds hold its pooled
    # connection for as long as it likes (600 such uploads made every miss a 504): the start of a
    # body is read before a connection is taken (nginx reads the whole body first by default:
    # proxy_request_buffering), and a body must keep a minimum average rate (Apache's
    # mod_reqtimeout: body=20,MinRate=500).
    client_body_buffer: int = setting(64 * 1024, "this much of a request body (all of a smaller one) is "
                                                 "read before an upstream connection is taken for it "
                                                 "(an Expect: 100-continue client is sent cachegate's "
                                                 "own 100 first); a body read whole can be sent again "
                                                 "on a retry; 0: none, and such a client gets the "
                                                 "origin's 100",
                                      byte_size())
    client_body_min_rate: int = setting(500, "bytes per second a request body must average, after the "
                                             "first client_body_timeout; slower: 408, the connection "
                                             "closed (0: no minimum)",
                                        byte_size())
    # A connection closed at once after a reply to a client still sending (a body timed out or
    # refused mid-upload, a head over max_request_head) was reset by the kernel at the client's
    # next bytes, and the reset could discard the reply before the client read it (curl: "Send
    # failure: Connection reset by peer"). nginx: lingering_close on, lingering_time,
    # lingering_timeout (proxy.web.lingering).
    lingering_time: float = setting(30.0, "after a reply that closes the connection while the client "
                                          "may still be sending (a body timed out or refused, bytes "
                                          "after a refused request), the longest cachegate reads and "
                                          "drops what it sends, so that its close is not a reset that "
                                          "loses the reply (nginx: lingering_time; 0: closed at once)",
                                    duration())
    lingering_timeout: float = setting(5.0, "the longest silence in that lingering close; then the "
                                            "connection closes (nginx: lingering_timeout; 0: closed at "
                                            "once)",
                                       duration())
    # FILE:LINE: warning: ... lines: the config runs, but probably not as meant (cachegate
    # check prints them, run and reload log them).
    warnings: tuple[str, ...] = internal(())
    # -- deploy and operate: listeners, TLS, Server field, logs ----------------------------
    access_log: AccessLogSettings | None = setting(
        None, "true: JSON lines on stdout; or {format, path} (none: no access log)",
        Parser("true, false or a mapping", _access_log, sections=(AccessLogSettings,)))
    server_header: str = setting("cachegate", "the Server field of every response (no software versions)",
                                 text(check=_printable))

    def pem(self, tls: ListenerTLS) -> tuple[bytes, bytes] | None:
        """A TLS listener's certificate chain and key as this load read and checked them (None:
        settings not made by a load)."""
        files = dict(self.sources)
        cert, key = files.get(os.path.abspath(tls.cert)), files.get(os.path.abspath(tls.key))
        return None if cert is None or key is None else (cert, key)

    @property
    def listen(self) -> HostPort:
        """The first listener's address (the default Host of an HTTP/1.0 request without one)."""
        return self.listeners[0].address

    @functools.cached_property
    def client_listener(self) -> RequestListener:
        """What request normalisation knows of the client listener (built once per config);
        the first listener's address is every listener's default Host."""
        return RequestListener(host_port(*self.listen), self.max_request_head)

    def bound_listener(self, bound: tuple[str, int] | None) -> RequestListener:
        """``client_listener`` once the first listener is bound at ``bound``: a port 0 in the
        config is the port the system chose (a default Host naming port 0 reaches nothing, and
        went upstream and into the key as it was); the host stays as the config writes it."""
        listener = self.client_listener
        host, port = self.listen
        if bound is None or port != 0:
            return listener
        return replace(listener, default_host=host_port(host, bound[1]))


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 literal in brackets (as a Host field names it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def read_settings(root: Src, ctx: Context) -> Settings:
    """Settings from a parsed config document (problems recorded, defaults kept for bad values)."""
    if not isinstance(root.value, dict):
        ctx.problems.add(root, "the config file must be a mapping (listen:, upstreams:, cache:, ...)")
        root = Src({}, root.file, root.line)
    settings = read_section(Settings, root, ctx, source=root.file)
    raw = root.value.get("cluster")
    if raw is not None and raw.value is None:
        # Every key commented out: YAML reads null, which is no cluster, and a node meant to be
        # one of many ran alone without a word (purges reached no other node).
        ctx.problems.warn((root.file, root.key_lines.get("cluster", root.line)),
                          "cluster: is empty (are its keys commented out?): this node runs alone, "
                          "not in cluster mode; give it redis: (and the rest), or remove the section")
    port = settings.listeners[0].port
    if settings.cluster is not None and port:  # its default node name comes from the listeners
        # (port 0: from the port bound at start, ``proxy.cluster.join``)
        settings = replace(settings, cluster=settings.cluster.with_node_name(port))
    return settings

