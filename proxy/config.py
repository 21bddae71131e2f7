"""The YAML config file -> frozen ``Settings``; every problem reported as ``FILE:LINE: message``.

``load_config`` reads the file, applies command-line overrides, compiles the rule
files it references, and either returns ``Settings`` or raises ``ConfigError``
with every problem found (not just the first). Nothing here binds a port or
touches the cache directory: ``cachegate check`` and ``cachegate run`` share it.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
from dataclasses import dataclass, field, replace
from typing import Literal, cast

from yarl import URL

from proxy.cluster.settings import ClusterSettings, read_cluster
from proxy.cpus import available_cpus
from proxy.errors import ConfigError
from proxy.logs import AccessLogSettings, LogFormat
from proxy.policy.messages import CacheOptions
from proxy.policy.request import DEFAULT_MAX_HEAD
from proxy.policy.request import Listener as RequestListener
from proxy.rules import RuleSet, load_rules
from proxy.schema import Section, parse_hostport
from proxy.storage.disk import DiskEviction, storable_limit
from proxy.storage.memory import MemoryPolicy
from proxy.tls import load_problem
from proxy.yamlsrc import Problems, Src, load_yaml

HostPort = tuple[str, int]
Balance = Literal["round_robin", "least_conn"]
RangeFill = Literal["whole", "none"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MB = 1 << 20


@dataclass(frozen=True)
class UpstreamSettings:
    url: URL
    weight: int = 1


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    read: float = 60.0  # between bytes
    total: float | None = None


@dataclass(frozen=True)
class HealthSettings:
    """Active health checks: GET ``path`` every ``interval``; 2xx/3xx within ``timeout`` is a success."""

    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 1.0
    healthy: int = 2  # consecutive successes that bring a down upstream back
    unhealthy: int = 3  # consecutive failures that take an upstream out


@dataclass(frozen=True)
class PassiveHealth:
    """Passive checks: consecutive connection failures or 5xx take an upstream out for a cool-down."""

    failures: int = 3  # 0 turns passive checks off
    cooldown: float = 10.0
    # False when the config has no passive: section. Then, like nginx's max_fails, a pool
    # of one upstream is never taken out: with nowhere else to send requests, a cool-down
    # would only turn three failed requests into 10 s of 503s for everyone.
    configured: bool = False


@dataclass(frozen=True)
class TLSSettings:
    verify: bool = True
    ca_file: str | None = None


@dataclass(frozen=True)
class PoolSettings:
    balance: Balance = "round_robin"
    timeouts: Timeouts = field(default_factory=Timeouts)
    pool_size: int = 256  # keep-alive connections per upstream
    preserve_host: bool = True  # send the client's Host upstream (nginx: proxy_set_header Host $host)
    retries: int = 1  # extra attempts on another upstream when the connection failed
    retry_non_idempotent: bool = False  # POST/PATCH are never retried unless this says so
    health: HealthSettings | None = None
    passive: PassiveHealth = field(default_factory=PassiveHealth)
    tls: TLSSettings = field(default_factory=TLSSettings)


@dataclass(frozen=True)
class DiskSettings:
    path: str
    size: int = 10 * 1024 * MB
    shards: int = 8
    eviction: DiskEviction = "least-recently-stored"


@dataclass(frozen=True)
class CacheSettings:
    memory: int = 256 * MB
    memory_max_object: int = 1 * MB
    memory_policy: MemoryPolicy = "lru"
    max_object: int = 100 * MB
    lock_timeout: float = 5.0
    hit_for_pass: float = 5.0  # how long a key whose response was not shareable skips coalescing
    disk: DiskSettings | None = None
    tag_headers: tuple[str, ...] = ("Surrogate-Key", "Cache-Tag")
    # A range request that misses: "whole" also fetches the whole object in the background
    # (stored, it answers every later range); "none" fetches only the ranges asked for.
    range_fill: RangeFill = "whole"


MIN_TOKEN_LENGTH = 16  # on a listener others can reach: guessing it must be out of the question


@dataclass(frozen=True)
class AdminSettings:
    listen: HostPort | None = ("127.0.0.1", 8081)
    token: str | None = None
    # Peers that may send PURGE to the client listener. Empty (the default): PURGE is off.
    # Not loopback by default: behind a TLS terminator or sidecar on the same host, every
    # client arrives from 127.0.0.1.
    purge_from: tuple[Network, ...] = ()
    # Hosts the admin API accepts URLs for (patterns as match.host); empty: the hosts clients
    # asked for since start and the hosts in the store.
    hosts: tuple[str, ...] = ()
    # Names the admin listener answers to (its requests' Host), besides loopback addresses and
    # localhost: a DNS rebinding guard (proxy.web.admin_guard). Checked without a token, or
    # with one when listed.
    server_names: tuple[str, ...] = ()


# -- deploy and operate: listeners and TLS -----------------------------------------------


@dataclass(frozen=True)
class ListenerTLS:
    """A TLS listener's certificate chain and key (PEM files), read again on SIGHUP."""

    cert: str
    key: str


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


@dataclass(frozen=True)
class Settings:
    source: str  # the config file, or "<defaults>"
    # Client listeners, in the order given (``listen`` is the first one's address).
    listeners: tuple[Listener, ...] = (Listener("127.0.0.1", 8080),)
    upstreams: tuple[UpstreamSettings, ...] = ()
    pool: PoolSettings = field(default_factory=PoolSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    rule_files: tuple[str, ...] = ()
    rules: RuleSet = field(default_factory=RuleSet)
    trusted_proxies: tuple[Network, ...] = ()
    workers: int = 1
    shutdown_grace: float = 10.0
    via: str = "cachegate"
    cluster: ClusterSettings | None = None  # cluster mode on Redis (proxy.cluster); None: one node alone
    max_request_head: int = DEFAULT_MAX_HEAD  # request line and fields; more is refused with 431
    # FILE:LINE: warning: ... lines: the config runs, but probably not as meant (cachegate
    # check prints them, run and reload log them).
    warnings: tuple[str, ...] = ()
    # -- deploy and operate: listeners, TLS, Server field, logs ----------------------------
    access_log: AccessLogSettings | None = None  # None: no access log
    server_header: str = "cachegate"  # the Server field of every response (no versions)

    @property
    def listen(self) -> HostPort:
        """The first listener's address (the default Host of an HTTP/1.0 request without one)."""
        return self.listeners[0].address

    @functools.cached_property
    def client_listener(self) -> RequestListener:
        """What request normalisation knows of the client listener (built once per config);
        the first listener's address is every listener's default Host."""
        host, port = self.listen
        default_host = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return RequestListener(default_host, self.max_request_head)


@dataclass(frozen=True)
class Overrides:
    listen: tuple[str, ...] = ()  # --listen, repeatable: plain listeners instead of the config's
    # The port of each listener, in order (the supervisor's workers bind the ports it reserved).
    ports: tuple[int, ...] = ()
    upstreams: tuple[str, ...] = ()
    admin_listen: str | None = None
    workers: str | None = None
    cache_path: str | None = None


_TOP = ("listen", "upstreams", "upstream", "cache", "admin", "rules", "trusted_proxies",
        "workers", "shutdown_grace", "via", "access_log", "cluster", "max_request_head",
        "server_header")  # fmt: skip


def _hostport(sec: Section, key: str, default: HostPort | None) -> HostPort | None:
    item = sec.raw(key)
    if item is None:
        return default
    if item.value is None or item.value is False:
        return None
    try:
        return parse_hostport(str(item.value))
    except ValueError as exc:
        sec.problems.add(item, f"{key}: {exc}")
        return default


def _upstream_url(text: str, at: Src | tuple[str, int], problems: Problems) -> URL | None:
    try:
        url = URL(text)
    except ValueError as exc:
        problems.add(at, f"upstream url {text!r}: {exc}")
        return None
    if url.scheme not in ("http", "https") or not url.host:
        problems.add(at, f"upstream url {text!r}: expected http://HOST[:PORT] or https://...")
        return None
    if url.path not in ("", "/") or url.query_string:
        problems.add(at, f"upstream url {text!r}: must not have a path or query")
        return None
    return url.with_path("")


def _admin_hosts(sec: Section, key: str) -> tuple[str, ...]:
    """Host patterns (``name``, ``name:port``, ``*.domain``, ``[v6]``) of ``admin.<key>``."""
    raw = sec.raw(key)
    if raw is None or raw.value is None:
        return ()
    items = [raw] if isinstance(raw.value, str) else sec.list(key)
    hosts = []
    for item in items:
        host = str(item.value).strip().lower().rstrip(".")
        if not isinstance(item.value, str) or not re.fullmatch(
                r"(\*\.)?[a-z0-9_.-]+(:\d{1,5})?|\[[0-9a-f:.]+\](:\d{1,5})?", host):
            sec.problems.add(item, f"admin.{key}: {item.value!r} is not a host name, host:port or *.domain")
            continue
        hosts.append(host)
    return tuple(hosts)


def _networks(sec: Section, key: str, default: tuple[Network, ...]) -> tuple[Network, ...]:
    if not sec.has(key):
        return default
    nets: list[Network] = []
    raw = sec.raw(key)
    assert raw is not None
    for item in [raw] if isinstance(raw.value, str) else sec.list(key):
        try:
            nets.append(ipaddress.ip_network(str(item.value), strict=False))
        except ValueError:
            sec.problems.add(item, f"{key}: {item.value!r} is not an IP address or CIDR network")
    return tuple(nets)


def _resolve(base_dir: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def parse_workers(text: str) -> int:
    if text == "auto":
        return available_cpus()  # the affinity mask and cgroup quota, not the host's CPUs
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"workers: expected a positive number or auto, got {text!r}")
    return int(text)


def read_settings(root: Src, problems: Problems, base_dir: str) -> Settings:
    """Settings from a parsed config document (problems recorded, defaults used for bad values)."""
    if not isinstance(root.value, dict):
        problems.add(root, "the config file must be a mapping (listen:, upstreams:, cache:, ...)")
        root = Src({}, root.file, root.line)
    top = Section(root, problems, "", _TOP)

    upstreams: list[UpstreamSettings] = []
    for item in top.list("upstreams"):
        if isinstance(item.value, str):
            url = _upstream_url(item.value, item, problems)
            if url is not None:
                upstreams.append(UpstreamSettings(url))
            continue
        if not isinstance(item.value, dict):
            problems.add(item, "upstreams: each entry is a URL or {url: ..., weight: ...}")
            continue
        up = Section(item, problems, "upstreams[]", ("url", "weight"))
        url_text = up.optional_str("url")
        if url_text is None:
            problems.add(item, "upstreams[]: url is required")
            continue
        url = _upstream_url(url_text, up.raw("url") or item, problems)
        if url is not None:
            upstreams.append(UpstreamSettings(url, up.int("weight", 1, minimum=1)))

    pool = PoolSettings()
    ps = top.section("upstream", ("balance", "timeouts", "pool_size", "preserve_host", "retries",
                                  "retry_non_idempotent", "health", "passive", "tls"))
    if ps is not None:
        ts = ps.section("timeouts", ("connect", "read", "total"))
        timeouts = Timeouts()
        if ts is not None:
            timeouts = Timeouts(ts.duration("connect", 5.0), ts.duration("read", 60.0),
                                ts.optional_duration("total"))
        health: HealthSettings | None = None
        hs = ps.section("health", ("path", "interval", "timeout", "healthy", "unhealthy"))
        if hs is not None:
            path = hs.str("path", "/healthz")
            if not path.startswith("/"):
                problems.add(hs.raw("path") or hs.src,
                             f"upstream.health.path: must start with '/', got {path!r}")
            health = HealthSettings(path, hs.duration("interval", 5.0), hs.duration("timeout", 1.0),
                                    hs.int("healthy", 2, minimum=1), hs.int("unhealthy", 3, minimum=1))
        passive = PassiveHealth()
        pv = ps.section("passive", ("failures", "cooldown"))
        if pv is not None:
            passive = PassiveHealth(pv.int("failures", 3, minimum=0), pv.duration("cooldown", 10.0),
                                    configured=True)
        tls = TLSSettings()
        tl = ps.section("tls", ("verify", "ca_file"))
        if tl is not None:
            ca_file = tl.optional_str("ca_file")
            if ca_file is not None:
                ca_file = _resolve(base_dir, ca_file)
                if not os.path.isfile(ca_file):
                    problems.add(tl.raw("ca_file") or tl.src,
                                 f"upstream.tls.ca_file: {ca_file} does not exist")
            tls = TLSSettings(tl.bool("verify", True), ca_file)
        pool = PoolSettings(
            balance=cast(Balance, ps.choice("balance", "round_robin", ("round_robin", "least_conn"))),
            timeouts=timeouts,
            pool_size=ps.int("pool_size", 256, minimum=1),
            preserve_host=ps.bool("preserve_host", True),
            retries=ps.int("retries", 1, minimum=0),
            retry_non_idempotent=ps.bool("retry_non_idempotent", False),
            health=health,
            passive=passive,
            tls=tls,
        )

    cache = CacheSettings(disk=DiskSettings(path=_resolve(base_dir, "var/cache")))
    cs = top.section("cache", ("memory", "memory_max_object", "memory_policy", "max_object",
                               "lock_timeout", "hit_for_pass", "disk", "tag_headers", "range_fill"))
    if cs is not None:
        disk: DiskSettings | None = cache.disk
        if cs.has("disk") and cs.raw("disk").value is None:  # type: ignore[union-attr]
            disk = None  # "disk: null" runs memory-only
        else:
            ds = cs.section("disk", ("path", "size", "shards", "eviction"))
            if ds is not None:
                disk = DiskSettings(
                    path=_resolve(base_dir, ds.str("path", "var/cache")),
                    size=ds.size("size", 10 * 1024 * MB),
                    shards=ds.int("shards", 8, minimum=1),
                    eviction=cast(DiskEviction, ds.choice(
                        "eviction", "least-recently-stored",
                        ("least-recently-stored", "least-recently-used"))),
                )
        cache = CacheSettings(
            memory=cs.size("memory", 256 * MB),
            memory_max_object=cs.size("memory_max_object", 1 * MB),
            memory_policy=cast(MemoryPolicy, cs.choice("memory_policy", "lru", ("lru", "lfu"))),
            max_object=cs.size("max_object", 100 * MB),
            lock_timeout=cs.duration("lock_timeout", 5.0),
            hit_for_pass=cs.duration("hit_for_pass", 5.0),
            disk=disk,
            tag_headers=tuple(cs.str_list("tag_headers")) if cs.has("tag_headers")
            else ("Surrogate-Key", "Cache-Tag"),
            range_fill=cast(RangeFill, cs.choice("range_fill", "whole", ("whole", "none"))),
        )

    admin = AdminSettings()
    ad = top.section("admin", ("listen", "token", "purge_from", "hosts", "server_names"))
    if ad is not None:
        admin = AdminSettings(
            listen=_hostport(ad, "listen", ("127.0.0.1", 8081)),
            token=ad.optional_str("token") or None,
            purge_from=_networks(ad, "purge_from", AdminSettings().purge_from),
            hosts=_admin_hosts(ad, "hosts"),
            server_names=_admin_hosts(ad, "server_names"),
        )

    workers = 1
    if top.has("workers"):
        workers_item = top.raw("workers")
        assert workers_item is not None
        try:
            workers = parse_workers(str(workers_item.value))
        except ValueError as exc:
            problems.add(workers_item, str(exc))

    rule_files = tuple(_resolve(base_dir, f) for f in top.str_list("rules"))
    for item, path in zip(top.list("rules"), rule_files, strict=False):
        if not os.path.isfile(path):
            problems.add(item, f"rules: rule file {path} does not exist")

    listeners = _listeners(top, base_dir)
    return Settings(
        source=root.file,
        listeners=listeners,
        upstreams=tuple(upstreams),
        pool=pool,
        cache=cache,
        admin=admin,
        rule_files=rule_files,
        trusted_proxies=_networks(top, "trusted_proxies", ()),
        workers=workers,
        shutdown_grace=top.duration("shutdown_grace", 10.0),
        via=top.str("via", "cachegate"),
        access_log=_access_log(top, base_dir),
        server_header=_server_header(top),
        cluster=read_cluster(top, listeners[0].port),
        max_request_head=_max_request_head(top),
    )


def _max_request_head(top: Section) -> int:
    size = top.size("max_request_head", DEFAULT_MAX_HEAD)
    if size < 1024:
        item = top.raw("max_request_head")
        assert item is not None
        top.problems.add(item, f"max_request_head: must be at least 1KB (a browser's request head "
                               f"is 0.5-2KB), got {size} bytes")
        return DEFAULT_MAX_HEAD
    return size


# -- deploy and operate: listeners, TLS, Server field, logs --------------------------------


def _listeners(top: Section, base_dir: str) -> tuple[Listener, ...]:
    """``listen``: ``HOST:PORT``, a mapping ``{address: HOST:PORT, tls: {cert: FILE, key: FILE}}``,
    or a list of either (e.g. ``[":80", {address: ":443", tls: {...}}]``)."""
    default = (Listener("127.0.0.1", 8080),)
    raw = top.raw("listen")
    if raw is None or raw.value is None:
        return default
    items = top.list("listen") if isinstance(raw.value, list) else [raw]
    out: list[Listener] = []
    for n, item in enumerate(items):
        name = f"listen[{n}]" if isinstance(raw.value, list) else "listen"
        if isinstance(item.value, dict):
            sec = Section(item, top.problems, name, ("address", "tls"))
            address = sec.optional_str("address")
            if address is None:
                top.problems.add(item, f"{name}: address is required (HOST:PORT)")
                continue
            at: Src = sec.raw("address") or item
            tls = None
            ts = sec.section("tls", ("cert", "key"))
            if ts is not None:
                tls = _listener_tls(ts, f"{name}.tls", base_dir)
            elif sec.has("tls"):
                top.problems.add(sec.raw("tls") or item, f"{name}.tls: expected {{cert: FILE, key: FILE}}")
        elif isinstance(item.value, str | int) and not isinstance(item.value, bool):
            address, at, tls = str(item.value), item, None
        else:
            top.problems.add(item, f"{name}: expected HOST:PORT or "
                                   "{address: HOST:PORT, tls: {cert: FILE, key: FILE}}")
            continue
        try:
            host, port = parse_hostport(address)
        except ValueError as exc:
            top.problems.add(at, f"{name}: {exc}")
            continue
        if port and any(other.address == (host, port) for other in out):
            top.problems.add(at, f"{name}: {host}:{port} is listed twice")
            continue
        out.append(Listener(host, port, tls))
    if not out and not items:
        top.problems.add(raw, "listen: give at least one HOST:PORT")
    return tuple(out) or default


def _listener_tls(ts: Section, name: str, base_dir: str) -> ListenerTLS | None:
    cert, key = ts.optional_str("cert"), ts.optional_str("key")
    if cert is None or key is None:
        ts.problems.add(ts.src, f"{name}: cert and key are both required (PEM files)")
        return None
    cert, key = _resolve(base_dir, cert), _resolve(base_dir, key)
    problem = load_problem(cert, key)  # the server would fail the same way: say so now, with the line
    if problem is not None:
        ts.problems.add(ts.src, f"{name}: {problem}")
        return None
    return ListenerTLS(cert, key)


def _access_log(top: Section, base_dir: str) -> AccessLogSettings | None:
    """``access_log: true`` (JSON lines on stdout), ``false``, or ``{format: json|combined,
    path: stdout|FILE}``."""
    item = top.raw("access_log")
    if item is None or item.value is None or item.value is False:
        return None
    if item.value is True:
        return AccessLogSettings()
    sec = top.section("access_log", ("format", "path"))
    if sec is None:
        problems = top.problems
        problems.add(item, "access_log: expected true, false or {format: json|combined, path: stdout|FILE}")
        return None
    fmt = cast(LogFormat, sec.choice("format", "json", ("json", "combined")))
    path = sec.str("path", "stdout")
    if path != "stdout":
        path = _resolve(base_dir, path)
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            top.problems.add(sec.raw("path") or item, f"access_log.path: directory {parent} does not exist")
    return AccessLogSettings(fmt, path)


def _server_header(top: Section) -> str:
    value = top.str("server_header", "cachegate").strip()
    if not value or not all(" " <= c <= "~" for c in value):
        top.problems.add(top.raw("server_header") or top.src,
                         f"server_header: expected printable ASCII text, got {value!r}")
        return "cachegate"
    return value


def _apply_overrides(s: Settings, o: Overrides, problems: Problems) -> Settings:
    at = ("<command line>", 0)
    if o.listen:
        try:
            s = replace(s, listeners=tuple(Listener(*parse_hostport(t)) for t in o.listen))
        except ValueError as exc:
            problems.add(at, f"--listen: {exc}")
    if o.ports:
        if len(o.ports) != len(s.listeners):
            problems.add(at, f"{len(o.ports)} port(s) for {len(s.listeners)} listener(s)")
        else:
            s = replace(s, listeners=tuple(replace(listener, port=port)
                                           for listener, port in zip(s.listeners, o.ports, strict=True)))
    if o.upstreams:
        ups = [UpstreamSettings(u) for t in o.upstreams if (u := _upstream_url(t, at, problems))]
        s = replace(s, upstreams=tuple(ups))
    if o.admin_listen is not None:
        try:
            admin_listen = None if o.admin_listen in ("", "off") else parse_hostport(o.admin_listen)
            s = replace(s, admin=replace(s.admin, listen=admin_listen))
        except ValueError as exc:
            problems.add(at, f"--admin-listen: {exc}")
    if o.workers is not None:
        try:
            s = replace(s, workers=parse_workers(o.workers))
        except ValueError as exc:
            problems.add(at, f"--workers: {exc}")
    if o.cache_path is not None and s.cache.disk is not None:
        s = replace(s, cache=replace(s.cache, disk=replace(s.cache.disk, path=o.cache_path)))
    return s


def listens_on_loopback(host: str) -> bool:
    """Whether a listener bound to ``host`` is reachable from this machine only.

    >>> [listens_on_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "::", "10.0.0.1")]
    [True, True, True, False, False, False]
    """
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _line(root: Src, *path: str) -> tuple[str, int]:
    """Where ``root[path[0]][path[1]]...`` was written (the deepest key found), for FILE:LINE."""
    node, at = root, (root.file, 1)
    for key in path:
        if not isinstance(node.value, dict) or key not in node.value:
            break
        at = (node.file, node.key_lines.get(key, node.line))
        node = node.value[key]
    return at


def _check(s: Settings, problems: Problems, root: Src, o: Overrides) -> None:
    """Problems that involve several fields, each reported at the line of the field concerned
    (or the command line, when an override set it)."""
    configured = root.value.get("upstreams") if isinstance(root.value, dict) else None
    entries = configured.value if configured is not None and isinstance(configured.value, list) else []
    # Upstreams that were given but invalid are reported where they are, once.
    if not s.upstreams and not o.upstreams and not entries:
        problems.add(_line(root, "upstreams"),
                     "no upstreams: add upstreams: [{url: http://HOST:PORT}] or --upstream URL")
    admin = s.admin
    if admin.listen is None or listens_on_loopback(admin.listen[0]):
        return
    where = f"admin.listen {admin.listen[0]}:{admin.listen[1]}"
    if admin.token is None:
        at = ("<command line>", 0) if o.admin_listen is not None else _line(root, "admin", "listen")
        problems.add(at, f"{where} is not loopback and admin.token is not set: the admin API would be open "
                         "to anyone who can reach it; set admin.token or listen on 127.0.0.1")
    elif len(admin.token) < MIN_TOKEN_LENGTH:
        problems.add(_line(root, "admin", "token"),
                     f"admin.token is {len(admin.token)} characters long; on a listener others can reach "
                     f"({where}) it must have at least {MIN_TOKEN_LENGTH} (e.g. the output of "
                     "`openssl rand -hex 24`)")


def base_cache_options(s: Settings) -> CacheOptions:
    # What the store can really keep (half a disk shard at most), so that a response over it
    # is refused up front with Cache-Status detail=TOO-LARGE, not after streaming.
    c = s.cache
    disk = (c.disk.size, c.disk.shards) if c.disk is not None else None
    return CacheOptions(max_object=storable_limit(c.max_object, disk, c.memory_max_object, c.memory))


def load_config(path: str | None, overrides: Overrides | None = None) -> Settings:
    """Load and validate; raise ConfigError with every ``FILE:LINE: message`` found."""
    problems = Problems()
    overrides = overrides or Overrides()
    if path is None:
        root = Src({}, "<defaults>", 1)
        base_dir = os.getcwd()
    else:
        loaded = load_yaml(path, problems)
        if loaded is None:
            raise ConfigError(problems.items, problems.warnings)
        root = loaded
        base_dir = os.path.dirname(os.path.abspath(path))
    settings = read_settings(root, problems, base_dir)
    settings = _apply_overrides(settings, overrides, problems)
    _check(settings, problems, root, overrides)
    files = [(f, os.path.relpath(f) if not os.path.relpath(f).startswith("..") else f)
             for f in settings.rule_files if os.path.isfile(f)]
    rules = load_rules(files, base_cache_options(settings), problems)
    if problems:
        raise ConfigError(problems.ordered(), problems.ordered_warnings())
    return replace(settings, rules=rules, warnings=tuple(problems.ordered_warnings()))
