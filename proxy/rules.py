"""YAML rule files: compiled once at load, matched per request without I/O.

A rule file has ``defaults`` (applied before any rule) and ``rules`` (the first
matching rule wins; its fields override the defaults). Matching happens at two
moments, with one meaning of "first match":

- at request time, before the lookup, the first rule whose request conditions
  hold *and that has no response conditions* decides ``bypass``, the cache
  ``key`` and ``client_cache_control``;
- at store time (and when a reply is written, for ``response_headers``), the
  first rule whose request *and* response conditions (``status``,
  ``content_type``) hold decides ``ttl``, ``no_store``, ``tags`` and the rest.
  A rule with no response conditions holds for every response, so the two
  moments agree unless a rule with response conditions comes first.

Rules that can never do what they say (``bypass`` with a ``status`` condition,
which is only known after the lookup; cache actions on a POST-only rule; rules
after a catch-all) are rejected at load with ``FILE:LINE``, like every other
mistake.

Speed: everything is compiled at load. Per request, the path is normalised once,
its first segment picks the (precomputed, ordered) list of rules that can match
it, and the scan stops at the first request-time rule. When no rule with
response conditions is involved, the plan for that rule was built at load too,
so a hit allocates nothing here but a small view of the request.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal, TypeVar
from urllib.parse import parse_qsl

from proxy.policy.keys import DEFAULT_KEY, KeySpec
from proxy.policy.messages import CacheOptions, ClientCacheControl, RequestHead
from proxy.policy.request import normalise_path
from proxy.policy.statuses import HEURISTICALLY_CACHEABLE, default_ttl_covers
from proxy.schema import Section, type_name
from proxy.units import parse_duration
from proxy.yamlsrc import Problems, Src, load_yaml

T = TypeVar("T")
CondKind = Literal["present", "absent", "equals", "regex"]

MATCH_KEYS = ("host", "path", "method", "query", "header", "cookie", "status", "content_type")
RULE_KEYS = (
    "name", "match", "ttl", "override_origin", "bypass", "no_store", "key",
    "stale_while_revalidate", "stale_if_error", "tags", "response_headers",
    "client_cache_control", "deception_guard", "ttl_jitter", "allow_set_cookie",
)  # fmt: skip
DEFAULT_KEYS = (
    "ttl", "stale_while_revalidate", "stale_if_error", "client_cache_control",
    "ttl_jitter", "allow_set_cookie", "response_headers",
)  # fmt: skip
# Fields that only matter for a response that is looked up or stored.
CACHE_ACTIONS = (
    "ttl", "override_origin", "no_store", "key", "stale_while_revalidate", "stale_if_error",
    "tags", "client_cache_control", "deception_guard", "ttl_jitter", "allow_set_cookie",
)  # fmt: skip
REQUEST_TIME_ACTIONS = ("bypass", "key", "client_cache_control")
CACHED_METHODS = frozenset({"GET", "HEAD"})
# response_headers may not touch the message framing or the connection.
FRAMING_FIELDS = frozenset({
    "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "trailer",
    "te", "proxy-connection", "content-encoding", "content-range",
})  # fmt: skip
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


# -- matching -------------------------------------------------------------------------------


Predicate = Callable[["RequestView"], bool]


def _always(v: RequestView) -> bool:
    return True


def _all(checks: list[Predicate]) -> Predicate:
    """One predicate for all of ``checks`` (unrolled for the common short cases)."""
    if not checks:
        return _always
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        a, b = checks
        return lambda v: a(v) and b(v)
    if len(checks) == 3:
        a, b, c = checks
        return lambda v: a(v) and b(v) and c(v)
    every = tuple(checks)

    def all_hold(v: RequestView) -> bool:
        for check in every:  # noqa: SIM110 (a loop is faster than all() over a generator)
            if not check(v):
                return False
        return True

    return all_hold


_REGEX_SEGMENT = re.compile(r"\^/([A-Za-z0-9_~!&',;=@-]+)/")


def _regex_first_segment(pattern: str) -> str | None:
    """The literal first segment of an anchored regex like ``^/assets/...``, else None.

    >>> _regex_first_segment(r"^/assets/.+\\.css$"), _regex_first_segment(r"^/a/x|/b")
    ('assets', None)
    """
    if "|" in pattern:  # a top-level alternative could match anywhere
        return None
    m = _REGEX_SEGMENT.match(pattern)
    return m.group(1) if m else None


def _first_segment(path: str) -> str:
    end = path.find("/", 1)
    return path[1:] if end < 0 else path[1:end]


@dataclass(frozen=True, slots=True)
class Condition:
    """One query parameter, header or cookie condition."""

    name: str
    kind: CondKind
    value: str | None = None
    pattern: re.Pattern[str] | None = None

    def holds(self, actual: str | None) -> bool:
        if self.kind == "present":
            return actual is not None
        if self.kind == "absent":
            return actual is None
        if actual is None:
            return False
        if self.kind == "equals":
            return actual == self.value
        assert self.pattern is not None
        return self.pattern.search(actual) is not None

    def predicate(self, source: Literal["query", "header", "cookie"]) -> Predicate:
        """A check of this condition on a request, with as few calls as possible (the hot path)."""
        name, kind, value, pattern = self.name, self.kind, self.value, self.pattern
        get: Callable[[RequestView], str | None]
        if source == "header":
            if kind == "present":
                return lambda v: name in v.head.headers
            if kind == "absent":
                return lambda v: name not in v.head.headers
            get = lambda v: v.header(name)  # noqa: E731
        elif source == "cookie":
            if kind == "present":
                return lambda v: name in (v._cookies if v._cookies is not None else v.cookies())
            if kind == "absent":
                return lambda v: name not in (v._cookies if v._cookies is not None else v.cookies())
            get = lambda v: (v._cookies if v._cookies is not None else v.cookies()).get(name)  # noqa: E731
        else:
            if kind == "present":
                return lambda v: name in (v._params if v._params is not None else v.params())
            if kind == "absent":
                return lambda v: name not in (v._params if v._params is not None else v.params())
            get = lambda v: (v._params if v._params is not None else v.params()).get(name)  # noqa: E731
        if kind == "equals":
            return lambda v: get(v) == value
        assert pattern is not None
        search = pattern.search

        def matches(v: RequestView) -> bool:
            actual = get(v)
            return actual is not None and search(actual) is not None

        return matches

    def describe(self) -> str:
        if self.kind in ("present", "absent"):
            return f"{self.name} {self.kind}"
        if self.kind == "equals":
            return f"{self.name} = {self.value!r}"
        assert self.pattern is not None
        return f"{self.name} ~ /{self.pattern.pattern}/"


class RequestView:
    """A request as rules see it; query parameters and cookies are parsed on first use."""

    __slots__ = ("_cookies", "_params", "head", "host", "path", "query")

    def __init__(self, head: RequestHead) -> None:
        raw_path, _, self.query = head.target.partition("?")
        self.head = head
        self.path = normalise_path(raw_path)
        host = head.host
        self.host = host.rsplit(":", 1)[0] if ":" in host and not host.endswith("]") else host
        self._params: dict[str, str] | None = None
        self._cookies: dict[str, str] | None = None

    def params(self) -> dict[str, str]:
        """Query parameters, decoded; the first value of a repeated one."""
        if self._params is None:
            params: dict[str, str] = {}
            if "%" in self.query or "+" in self.query:
                pairs: list[tuple[str, str]] = parse_qsl(self.query, keep_blank_values=True)
            else:  # nothing to decode: skip parse_qsl's unquoting
                pairs = [(k, v) for k, _, v in (p.partition("=") for p in self.query.split("&")) if k]
            for k, v in pairs:
                params.setdefault(k, v)
            self._params = params
        return self._params

    def cookies(self) -> dict[str, str]:
        if self._cookies is None:
            self._cookies = {}
            for line in self.head.headers.getall("Cookie", ()):
                for part in line.split(";"):
                    k, eq, v = part.strip().partition("=")
                    if eq and k:
                        self._cookies.setdefault(k, v)
        return self._cookies

    def header(self, name: str) -> str | None:
        values = self.head.headers.getall(name, ())
        if len(values) == 1:
            return values[0]
        return ", ".join(values) if values else None


@dataclass(frozen=True, slots=True)
class HostPattern:
    pattern: re.Pattern[str]
    with_port: bool  # the pattern names a port: compare with the Host's port
    text: str


@dataclass(frozen=True, slots=True)
class Match:
    hosts: tuple[HostPattern, ...] = ()
    path: re.Pattern[str] | None = None
    path_is_regex: bool = False  # regex: searched; glob: the whole path
    path_text: str = ""
    methods: frozenset[str] | None = None
    query: tuple[Condition, ...] = ()
    headers: tuple[Condition, ...] = ()
    cookies: tuple[Condition, ...] = ()
    status: frozenset[int] | None = None
    content_types: tuple[str, ...] = ()

    @property
    def needs_response(self) -> bool:
        return self.status is not None or bool(self.content_types)

    def first_segment(self) -> str | None:
        """The literal first path segment every matching path has, if the glob fixes one."""
        if self.path is None:
            return None
        if self.path_is_regex:
            return _regex_first_segment(self.path.pattern)
        seg = _first_segment(self.path_text)
        if not seg or "*" in seg or "?" in seg:
            return None
        return seg

    def request_holds(self, v: RequestView) -> bool:
        return self.predicate()(v)

    def predicate(self) -> Predicate:
        """A closure checking only the conditions this match has, cheapest first (the hot path).

        Built once at load; per request it costs one call per condition instead of
        walking every field of the match.
        """
        checks: list[Predicate] = []
        if self.methods is not None:
            methods = self.methods
            checks.append(lambda v: v.head.method in methods)
        if self.hosts:
            hosts = tuple((h.pattern.fullmatch, h.with_port) for h in self.hosts)

            def host_ok(v: RequestView) -> bool:
                for fullmatch, with_port in hosts:
                    if fullmatch(v.head.host if with_port else v.host) is not None:
                        return True
                return False

            checks.append(host_ok)
        if self.path is not None:
            path_match = self.path.search if self.path_is_regex else self.path.fullmatch
            checks.append(lambda v: path_match(v.path) is not None)
        checks.extend(c.predicate("query") for c in self.query)
        checks.extend(c.predicate("header") for c in self.headers)
        checks.extend(c.predicate("cookie") for c in self.cookies)
        return _all(checks)

    def request_mismatch(self, v: RequestView) -> str | None:
        """None when every request condition holds, else the first that does not (for explain)."""
        if self.methods is not None and v.head.method not in self.methods:
            return f"method {v.head.method} not in {sorted(self.methods)}"
        if self.hosts and not any(
            h.pattern.fullmatch(v.head.host if h.with_port else v.host) for h in self.hosts
        ):
            return f"host {v.head.host} not in {[h.text for h in self.hosts]}"
        if self.path is not None:
            m = self.path.search(v.path) if self.path_is_regex else self.path.fullmatch(v.path)
            if m is None:
                return f"path {v.path} does not match {self.path_text!r}"
        params = v.params()
        for c in self.query:
            if not c.holds(params.get(c.name)):
                return f"query: not {c.describe()}"
        for c in self.headers:
            if not c.holds(v.header(c.name)):
                return f"header: not {c.describe()}"
        jar = v.cookies()
        for c in self.cookies:
            if not c.holds(jar.get(c.name)):
                return f"cookie: not {c.describe()}"
        return None

    def response_holds(self, status: int, content_type: str | None) -> bool:
        return self.response_mismatch(status, content_type) is None

    def response_mismatch(self, status: int, content_type: str | None) -> str | None:
        if self.status is not None and status not in self.status:
            return f"status {status} not in {sorted(self.status)}"
        if self.content_types:
            ct = (content_type or "").split(";", 1)[0].strip().lower()
            if not any(fnmatch.fnmatchcase(ct, pattern) for pattern in self.content_types):
                return f"content type {ct or '(none)'!r} not in {list(self.content_types)}"
        return None


# -- what rules do ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    add: tuple[tuple[str, str], ...] = ()  # set (replacing any origin value) on the way to the client
    remove: tuple[str, ...] = ()
    drop: frozenset[str] = frozenset()  # lower-cased names of both, precomputed

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)

    def apply(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        out = [(k, v) for k, v in headers if k.lower() not in self.drop]
        out.extend(self.add)
        return out


def header_edits(add: tuple[tuple[str, str], ...], remove: tuple[str, ...]) -> HeaderEdits:
    drop = frozenset(n.lower() for n in remove) | frozenset(n.lower() for n, _ in add)
    return HeaderEdits(add, remove, drop)


@dataclass(frozen=True, slots=True)
class Actions:
    """What a rule (or the defaults) sets; None means "not set here"."""

    ttl: Mapping[int, float] | None = None
    ttl_default: float | None = None
    override_origin: bool | None = None
    bypass: bool = False
    no_store: bool = False
    key: KeySpec | None = None
    stale_while_revalidate: float | None = None
    stale_if_error: float | None = None
    tags: tuple[str, ...] = ()
    response_headers: HeaderEdits | None = None
    client_cache_control: ClientCacheControl | None = None
    deception_guard: bool | None = None
    ttl_jitter: float | None = None  # a fraction: 0.1 shortens lifetimes by 0-10%
    allow_set_cookie: bool | None = None


@dataclass(frozen=True, slots=True)
class StorePlan:
    """The store-time outcome of the rules for one response."""

    rule: Rule | None
    options: CacheOptions
    no_store: bool
    tags: tuple[str, ...]
    deception_guard: bool
    ttl_jitter: float
    response_headers: HeaderEdits | None  # the rule's, else the defaults'


@dataclass(eq=False, slots=True)
class Rule:
    name: str
    file: str
    line: int
    match: Match
    actions: Actions
    set_fields: tuple[str, ...] = ()  # the action keys written in the file, for explain
    catch_all: bool = False  # written without match conditions: it wins for every request
    store: StorePlan = field(init=False)  # built by RuleSet, which knows the defaults
    holds: Predicate = field(init=False)  # the request conditions, compiled
    needs_response: bool = field(init=False)
    plan: RequestPlan = field(init=False)  # the request plan when this rule decides alone

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """The request-time outcome of the rules for one request."""

    rule: Rule | None  # decides bypass, key and client_cache_control
    bypass: bool
    key: KeySpec
    options: CacheOptions
    store: StorePlan  # the store-time plan when no rule with response conditions applies
    # Rules with response conditions whose request conditions held, before ``rule``.
    response_rules: tuple[Rule, ...] = ()

    @property
    def response_headers(self) -> HeaderEdits | None:
        """The edits when they do not depend on the response (see ``response_headers_for``)."""
        return self.store.response_headers

    def for_response(self, status: int, content_type: str | None) -> StorePlan:
        for r in self.response_rules:
            if r.match.response_holds(status, content_type):
                return r.store
        return self.store

    def response_headers_for(self, status: int, content_type: str | None) -> HeaderEdits | None:
        if not self.response_rules:
            return self.store.response_headers
        return self.for_response(status, content_type).response_headers


def _first(*values: T | None) -> T | None:
    for v in values:
        if v is not None:
            return v
    return None


class RuleSet:
    """Compiled rules of every file, in order, with the merged defaults."""

    def __init__(self, defaults: Actions | None = None, rules: tuple[Rule, ...] = (),
                 base: CacheOptions | None = None, files: tuple[str, ...] = ()) -> None:
        self.defaults = defaults or Actions()
        self.rules = rules
        self.base = base or CacheOptions()
        self.files = files
        self.default_store = self._store_plan(None)
        self.default_plan = RequestPlan(None, False, DEFAULT_KEY, self.default_store.options,
                                        self.default_store)
        for r in rules:
            r.holds = r.match.predicate()
            r.needs_response = r.match.needs_response
            r.store = self._store_plan(r)
            a = r.actions
            r.plan = RequestPlan(r, a.bypass, a.key or DEFAULT_KEY, r.store.options, r.store)
        self._plans: dict[tuple[Rule | None, ...], RequestPlan] = {}
        # Index by the first path segment: the rules a path with segment S can match, in order.
        segs = {r.match.first_segment() for r in rules} - {None}
        self._other = tuple(r for r in rules if r.match.first_segment() is None)
        self._by_segment = {
            s: tuple(r for r in rules if r.match.first_segment() in (None, s)) for s in segs
        }

    def rebased(self, base: CacheOptions) -> RuleSet:
        return RuleSet(self.defaults, tuple(replace(r) for r in self.rules), base, self.files)

    def plan(self, request: RequestHead) -> RequestPlan:
        view = RequestView(request)
        response_rules: list[Rule] | None = None
        for r in self._by_segment.get(_first_segment(view.path), self._other):
            if not r.holds(view):
                continue
            if r.needs_response:
                if response_rules is None:
                    response_rules = []
                response_rules.append(r)
                continue
            if response_rules is None:
                return r.plan
            return self._composed(r.plan, response_rules)
        if response_rules is None:
            return self.default_plan
        return self._composed(self.default_plan, response_rules)

    def _composed(self, plan: RequestPlan, response_rules: list[Rule]) -> RequestPlan:
        """``plan`` with response-dependent rules before it; the few combinations are memoised."""
        key = (plan.rule, *response_rules)
        composed = self._plans.get(key)
        if composed is None:
            composed = replace(plan, response_rules=tuple(response_rules))
            if len(self._plans) < 4096:
                self._plans[key] = composed
        return composed

    def trace(self, request: RequestHead) -> list[tuple[Rule, str | None]]:
        """Every rule with the first request condition that fails (None: it holds). For explain."""
        view = RequestView(request)
        return [(r, r.match.request_mismatch(view)) for r in self.rules]

    def _store_plan(self, rule: Rule | None) -> StorePlan:
        a = rule.actions if rule is not None else None
        d = self.defaults
        ttl = a.ttl if a is not None and a.ttl is not None else d.ttl
        ttl_default = a.ttl_default if a is not None and a.ttl is not None else d.ttl_default
        override = bool(a and a.override_origin)
        options = replace(
            self.base,
            ttl_by_status=ttl if ttl is not None else self.base.ttl_by_status,
            ttl_default=ttl_default,
            override_origin=override,
            stale_while_revalidate=_first(a.stale_while_revalidate if a else None,
                                          d.stale_while_revalidate) or 0.0,
            stale_if_error=_first(a.stale_if_error if a else None, d.stale_if_error) or 0.0,
            client_cache_control=_first(a.client_cache_control if a else None,
                                        d.client_cache_control) or "honor",
            allow_set_cookie=bool(_first(a.allow_set_cookie if a else None, d.allow_set_cookie)),
        )
        guard = a.deception_guard if a is not None and a.deception_guard is not None else override
        return StorePlan(
            rule=rule,
            options=options,
            no_store=bool(a and a.no_store),
            tags=a.tags if a else (),
            deception_guard=guard,
            ttl_jitter=_first(a.ttl_jitter if a else None, d.ttl_jitter) or 0.0,
            response_headers=_first(a.response_headers if a else None, d.response_headers),
        )


# -- compiling ----------------------------------------------------------------------------


def glob_to_regex(glob: str) -> str:
    """``*`` and ``?`` match within one path segment, ``**`` across segments.

    >>> re.fullmatch(glob_to_regex("/static/**"), "/static/a/b.css") is not None
    True
    >>> re.fullmatch(glob_to_regex("/img/*.png"), "/img/a/b.png") is None
    True
    """
    out: list[str] = []
    i = 0
    while i < len(glob):
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return "".join(out)


def _compile_regex(text: str, at: Src, problems: Problems, what: str) -> re.Pattern[str] | None:
    if not text:
        problems.add(at, f"{what}: empty regex (it would match everything)")
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        problems.add(at, f"{what}: bad regex {text!r}: {exc}")
        return None


def _path_pattern(src: Src, problems: Problems) -> tuple[re.Pattern[str] | None, bool, str]:
    if not isinstance(src.value, str) or not src.value:
        problems.add(src, f"match.path: expected a glob like /static/** or regex:..., "
                          f"got {type_name(src.value)}")
        return None, False, ""
    text = src.value
    if text.startswith("regex:"):
        return _compile_regex(text[6:].strip(), src, problems, "match.path"), True, text
    if not text.startswith("/"):
        problems.add(src, f"match.path: a path glob starts with '/', got {text!r} "
                          "(use regex:... for a regular expression)")
        return None, False, text
    if "?" in text[1:] and "=" in text:
        problems.add(src, f"match.path: {text!r} looks like it has a query; match it with query:")
    return re.compile(glob_to_regex(text)), False, text


def _host_pattern(text: str, at: Src, problems: Problems) -> HostPattern | None:
    host = text.strip().lower().rstrip(".")
    with_port = bool(re.search(r":\d+$", host))
    bare = host.rsplit(":", 1)[0] if with_port else host
    if not bare or not re.fullmatch(r"(\*\.)?[a-z0-9_.\[\]:-]+", bare):
        problems.add(at, f"match.host: {text!r} is not a host name or *.domain")
        return None
    pattern = r"(?:[^.]+\.)+" + re.escape(host[2:]) if host.startswith("*.") else re.escape(host)
    return HostPattern(re.compile(pattern), with_port, text)


def _str_items(src: Src, problems: Problems, what: str) -> list[tuple[str, Src]]:
    """A string or a list of strings, each with where it came from; an empty list is an error."""
    if isinstance(src.value, str | int) and not isinstance(src.value, bool):
        return [(str(src.value), src)]
    if not isinstance(src.value, list):
        problems.add(src, f"{what}: expected a string or a list of strings, got {type_name(src.value)}")
        return []
    if not src.value:
        problems.add(src, f"{what}: an empty list never matches; remove the condition instead")
        return []
    out: list[tuple[str, Src]] = []
    for item in src.value:
        if isinstance(item.value, str | int) and not isinstance(item.value, bool):
            out.append((str(item.value), item))
        else:
            problems.add(item, f"{what}: expected strings in the list, got {type_name(item.value)}")
    return out


def _conditions(src: Src, problems: Problems, what: str) -> tuple[Condition, ...]:
    if not isinstance(src.value, dict) or not src.value:
        problems.add(src, f"match.{what}: expected a mapping of name to condition "
                          f"(present, absent, a value, {{equals: ...}} or {{regex: ...}}), "
                          f"got {type_name(src.value) if src.value != {} else 'an empty mapping'}")
        return ()
    out: list[Condition] = []
    for raw_name, cond in src.value.items():
        name = str(raw_name)
        where = f"match.{what}.{name}"
        if what != "query" and not _TOKEN.fullmatch(name):
            problems.add(cond, f"match.{what}: {name!r} is not a valid {what} name")
            continue
        v = cond.value
        if v in ("present", "absent"):
            out.append(Condition(name, v))
        elif isinstance(v, dict):
            sec = Section(cond, problems, where, ("equals", "regex"))
            if sec.has("regex") and sec.has("equals"):
                problems.add(cond, f"{where}: give equals: or regex:, not both")
            elif sec.has("regex"):
                pattern = _compile_regex(sec.str("regex", ""), sec.raw("regex") or cond, problems, where)
                if pattern is not None:
                    out.append(Condition(name, "regex", pattern=pattern))
            elif sec.has("equals"):
                out.append(Condition(name, "equals", value=sec.str("equals", "")))
            else:
                problems.add(cond, f"{where}: give equals: or regex:")
        elif isinstance(v, str | int | float) and not isinstance(v, bool):
            out.append(Condition(name, "equals", value=str(v)))
        else:
            problems.add(cond, f"{where}: expected present, absent, a value, "
                               f"{{equals: ...}} or {{regex: ...}}, got {type_name(v)}")
    return tuple(out)


def _compile_match(src: Src | None, problems: Problems) -> Match:
    if src is None:
        return Match()
    if not isinstance(src.value, dict):
        problems.add(src, f"match: expected a mapping, got {type_name(src.value)}")
        return Match()
    sec = Section(src, problems, "match", MATCH_KEYS)
    raw = sec.values
    hosts = tuple(h for text, at in (_str_items(raw["host"], problems, "match.host")
                                     if "host" in raw else [])
                  if (h := _host_pattern(text, at, problems)) is not None)
    path, path_is_regex, path_text = (_path_pattern(raw["path"], problems) if "path" in raw
                                      else (None, False, ""))
    methods: frozenset[str] | None = None
    if "method" in raw:
        names: set[str] = set()
        for m, at in _str_items(raw["method"], problems, "match.method"):
            if _TOKEN.fullmatch(m):
                names.add(m.upper())
            else:
                problems.add(at, f"match.method: {m!r} is not an HTTP method")
        if "GET" in names:
            names.add("HEAD")  # a HEAD is answered from the stored GET: same rule, same key
        methods = frozenset(names)
    status: frozenset[int] | None = None
    if "status" in raw:
        codes: set[int] = set()
        items = raw["status"]
        if isinstance(items.value, list) and not items.value:
            problems.add(items, "match.status: an empty list never matches")
        for item in (items.value if isinstance(items.value, list) else [items]):
            if isinstance(item.value, int) and not isinstance(item.value, bool) and 100 <= item.value <= 599:
                codes.add(item.value)
            else:
                problems.add(item, f"match.status: expected HTTP status codes (100-599), got {item.value!r}")
        status = frozenset(codes)
    content_types = tuple(t.strip().lower() for t, _ in _str_items(raw["content_type"], problems,
                                                                   "match.content_type")
                          ) if "content_type" in raw else ()
    return Match(
        hosts=hosts,
        path=path,
        path_is_regex=path_is_regex,
        path_text=path_text,
        methods=methods,
        query=_conditions(raw["query"], problems, "query") if "query" in raw else (),
        headers=_conditions(raw["header"], problems, "header") if "header" in raw else (),
        cookies=_conditions(raw["cookie"], problems, "cookie") if "cookie" in raw else (),
        status=status,
        content_types=content_types,
    )


def _ttl_table(src: Src, problems: Problems, what: str) -> tuple[Mapping[int, float], float | None]:
    if not isinstance(src.value, dict):
        try:
            return MappingProxyType({}), parse_duration(src.value)
        except ValueError:
            problems.add(src, f"{what}: expected a duration or a mapping of status to duration "
                              f"(e.g. {{200: 5m, 404: 1m, default: 1m}}), got {src.value!r}")
            return MappingProxyType({}), None
    table: dict[int, float] = {}
    default: float | None = None
    for status, value in src.value.items():
        line = src.key_lines.get(status, value.line)
        if status == "default":
            pass
        elif not (isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599):
            problems.add((src.file, line), f"{what}: {status!r} is not a status code (100-599) or 'default'")
            continue
        try:
            seconds = parse_duration(value.value)
        except ValueError as exc:
            problems.add(value, f"{what}.{status}: {exc}")
            continue
        if status == "default":
            default = seconds
        else:
            table[status] = seconds
    return MappingProxyType(table), default


_COVERED_ERRORS = " and ".join(", ".join(str(s) for s in sorted(HEURISTICALLY_CACHEABLE) if s >= 400)
                               .rsplit(", ", 1))  # "404, 405, 410, 414 and 501"
CPDOS = "cache-poisoned denial of service"


def _warn_error_ttls(src: Src, statuses: frozenset[int] | None, label: str, problems: Problems) -> None:
    """Warnings (not errors) where a ``ttl`` meets error statuses (``policy.statuses``).

    A status named in the table is stored for everyone, whoever caused it; a default
    (``default:`` or a lone duration) no longer covers error statuses, which a config
    written before may have counted on. ``statuses`` is the rule's ``match.status``.
    """
    named: set[int] = set()
    if isinstance(src.value, dict):
        for status, value in src.value.items():
            if isinstance(status, int) and not isinstance(status, bool):
                named.add(status)
                if 400 <= status <= 599 and not default_ttl_covers(status):
                    problems.warn((src.file, src.key_lines.get(status, value.line)),
                                  f"{label}: ttl {status}: {value.value} stores the origin's {status} for "
                                  "every client: one request the origin rejects or fails on (an oversized "
                                  "or malformed header) then denies the page to everyone for that long "
                                  f"({CPDOS}); name an error status only where that is meant")
        if "default" not in src.value:
            return
        at: Src | tuple[str, int] = (src.file, src.key_lines.get("default", src.line))
        what = f"ttl default: {src.value['default'].value}"
    else:
        at, what = src, f"ttl: {src.value} (a default for every status)"
    if statuses is None:
        problems.warn(at, f"{label}: {what} does not apply to error statuses other than "
                          f"{_COVERED_ERRORS}: a 400, 403, 429, 500 or 503 is stored only when the ttl "
                          "table names it, since an error one client caused would be served to "
                          f"everyone ({CPDOS})")
        return
    uncovered = sorted(s for s in statuses if not default_ttl_covers(s) and s not in named)
    if uncovered:
        problems.warn(at, f"{label}: {what} never applies to {', '.join(map(str, uncovered))} "
                          "(in match.status): error statuses are stored only when the ttl table names "
                          f"them ({CPDOS})")


def _names(src: Src | None, problems: Problems, what: str) -> tuple[str, ...]:
    if src is None or src.value is None:
        return ()
    out: list[str] = []
    for name, at in _str_items(src, problems, what):
        if not _TOKEN.fullmatch(name):
            problems.add(at, f"{what}: {name!r} is not a valid name")
        else:
            out.append(name)
    return tuple(out)


def _key_spec(src: Src, problems: Problems) -> KeySpec | None:
    if not isinstance(src.value, dict):
        problems.add(src, f"key: expected a mapping (query:, headers:, cookies:, lowercase_path:), "
                          f"got {type_name(src.value)}")
        return None
    sec = Section(src, problems, "key", ("query", "headers", "cookies", "lowercase_path"))
    spec = KeySpec(
        headers=tuple(h.lower() for h in _names(sec.raw("headers"), problems, "key.headers")),
        cookies=_names(sec.raw("cookies"), problems, "key.cookies"),
        lowercase_path=sec.bool("lowercase_path", False),
    )
    q = sec.raw("query")
    if q is not None:
        if q.value in ("ignore", "ignore-all") or q.value is False:
            spec = replace(spec, query_ignore=True)
        elif q.value == "sort":
            spec = replace(spec, query_sort=True)
        elif isinstance(q.value, dict):
            qs = Section(q, problems, "key.query", ("include", "exclude", "sort", "ignore"))
            include = (tuple(n for n, _ in _str_items(qs.values["include"], problems, "key.query.include"))
                       if qs.has("include") else None)
            exclude = (tuple(n for n, _ in _str_items(qs.values["exclude"], problems, "key.query.exclude"))
                       if qs.has("exclude") else ())
            ignore = qs.bool("ignore", False)
            if ignore and (include is not None or exclude):
                problems.add(q, "key.query: ignore: true drops the whole query; include/exclude "
                                "would never apply")
            if include is not None and exclude:
                problems.add(q, "key.query: give include: or exclude:, not both "
                                "(include already drops every other parameter)")
            spec = replace(spec, query_include=include, query_exclude=exclude,
                           query_sort=qs.bool("sort", False), query_ignore=ignore)
        else:
            problems.add(q, "key.query: expected ignore, sort or a mapping "
                            "{include: [...] | exclude: [...], sort: true}")
    return spec


def _header_edits(src: Src, problems: Problems) -> HeaderEdits | None:
    if not isinstance(src.value, dict):
        problems.add(src, "response_headers: expected a mapping with add:/remove:, "
                          f"got {type_name(src.value)}")
        return None
    sec = Section(src, problems, "response_headers", ("add", "remove"))
    add: list[tuple[str, str]] = []

    def check_name(name: str, at: Src | tuple[str, int]) -> bool:
        if not _TOKEN.fullmatch(name):
            problems.add(at, f"response_headers: {name!r} is not a valid header name")
            return False
        if name.lower() in FRAMING_FIELDS:
            problems.add(at, f"response_headers: {name} describes the message framing or "
                             "connection; cachegate sets it")
            return False
        return True

    adds = sec.raw("add")
    if adds is not None:
        if isinstance(adds.value, dict):
            for name, value in adds.value.items():
                at = (adds.file, adds.key_lines.get(name, value.line))
                if not check_name(str(name), at):
                    continue
                v = value.value
                if not isinstance(v, str | int) or isinstance(v, bool):
                    problems.add(value, f"response_headers.add.{name}: expected a string, got {type_name(v)}")
                elif any(c in str(v) for c in "\r\n\x00"):
                    problems.add(value, f"response_headers.add.{name}: a header value cannot contain "
                                        "line breaks")
                else:
                    add.append((str(name), str(v)))
        else:
            problems.add(adds, "response_headers.add: expected a mapping of header to value")
    remove = [n for n, at in (_str_items(sec.values["remove"], problems, "response_headers.remove")
                              if sec.has("remove") else []) if check_name(n, at)]
    return header_edits(tuple(add), tuple(remove))


def _jitter(sec: Section) -> float | None:
    item = sec.raw("ttl_jitter")
    if item is None or item.value is None:
        return None
    text = str(item.value).strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = -1.0
    if isinstance(item.value, bool) or not 0 <= value < 1:
        sec.problems.add(item, f"ttl_jitter: expected a percentage below 100% like 10%, got {item.value!r}")
        return None
    return value


def _optional_bool(sec: Section, key: str) -> bool | None:
    return sec.bool(key, False) if sec.has(key) else None


def _actions(sec: Section, problems: Problems) -> Actions:
    ttl: Mapping[int, float] | None = None
    ttl_default: float | None = None
    if sec.has("ttl"):
        ttl, ttl_default = _ttl_table(sec.values["ttl"], problems, "ttl")
    mode: ClientCacheControl | None = None
    if sec.has("client_cache_control"):
        choice = sec.choice("client_cache_control", "honor", ("honor", "revalidate", "ignore"))
        mode = "revalidate" if choice == "revalidate" else "ignore" if choice == "ignore" else "honor"
    return Actions(
        ttl=ttl,
        ttl_default=ttl_default,
        override_origin=_optional_bool(sec, "override_origin"),
        bypass=sec.bool("bypass", False),
        no_store=sec.bool("no_store", False),
        key=_key_spec(sec.values["key"], problems) if sec.has("key") else None,
        stale_while_revalidate=sec.optional_duration("stale_while_revalidate"),
        stale_if_error=sec.optional_duration("stale_if_error"),
        tags=_names(sec.raw("tags"), problems, "tags"),
        response_headers=(_header_edits(sec.values["response_headers"], problems)
                          if sec.has("response_headers") else None),
        client_cache_control=mode,
        deception_guard=_optional_bool(sec, "deception_guard"),
        ttl_jitter=_jitter(sec),
        allow_set_cookie=_optional_bool(sec, "allow_set_cookie"),
    )


def _compile_rule(src: Src, index: int, problems: Problems) -> Rule | None:
    if not isinstance(src.value, dict):
        problems.add(src, f"rules[{index}]: expected a mapping (name:, match:, and actions), "
                          f"got {type_name(src.value)}")
        return None
    sec = Section(src, problems, f"rules[{index}]", RULE_KEYS)
    name = sec.str("name", f"#{index + 1} ({os.path.basename(src.file)}:{src.line})")
    match = _compile_match(sec.raw("match"), problems)
    actions = _actions(sec, problems)
    written = tuple(k for k in RULE_KEYS if sec.has(k) and k not in ("name", "match"))
    label = f"rule {name!r}"
    if match.needs_response:
        for key in REQUEST_TIME_ACTIONS:
            if sec.has(key):
                problems.add(sec.line_of(key),
                             f"{label}: {key} is decided before the response exists, so it can "
                             "never apply to a rule with a status/content_type condition; "
                             "put it in a rule without one")
    if actions.bypass:
        for key in CACHE_ACTIONS:
            if sec.has(key):
                problems.add(sec.line_of(key),
                             f"{label}: {key} never applies: bypass: true means the request is "
                             "neither looked up nor stored")
    if match.methods and not (match.methods & CACHED_METHODS):
        for key in CACHE_ACTIONS:
            if sec.has(key):
                problems.add(sec.line_of(key),
                             f"{label}: {key} never applies: only GET and HEAD are cached, and this "
                             f"rule matches only {', '.join(sorted(match.methods))}")
    if sec.has("ttl") and not actions.no_store and not actions.bypass:
        _warn_error_ttls(sec.values["ttl"], match.status, label, problems)
    if not written and all(k in RULE_KEYS for k in sec.values):
        problems.add(src, f"{label}: the rule has no action (ttl, bypass, key, ...), so it only "
                          "hides the rules after it; remove it or give it an action")
    raw_match = sec.raw("match")
    catch_all = raw_match is None or raw_match.value in ({}, None)
    return Rule(name=name, file=src.file, line=src.line, match=match, actions=actions,
                set_fields=written, catch_all=catch_all)


def compile_rule_file(root: Src, problems: Problems) -> tuple[Actions | None, list[Rule]]:
    if not isinstance(root.value, dict):
        problems.add(root, f"a rule file is a mapping with defaults: and rules:, got {type_name(root.value)}")
        return None, []
    sec = Section(root, problems, "", ("defaults", "rules"))
    defaults: Actions | None = None
    d = sec.section("defaults", DEFAULT_KEYS)
    if d is not None:
        defaults = _actions(d, problems)
        if d.has("ttl"):
            _warn_error_ttls(d.values["ttl"], None, "defaults", problems)
    rules = [r for i, s in enumerate(sec.list("rules")) if (r := _compile_rule(s, i, problems))]
    return defaults, rules


def _merge_defaults(a: Actions, b: Actions) -> Actions:
    """Later files' defaults override earlier ones field by field."""
    return Actions(
        ttl=b.ttl if b.ttl is not None else a.ttl,
        ttl_default=b.ttl_default if b.ttl is not None else a.ttl_default,
        stale_while_revalidate=_first(b.stale_while_revalidate, a.stale_while_revalidate),
        stale_if_error=_first(b.stale_if_error, a.stale_if_error),
        client_cache_control=_first(b.client_cache_control, a.client_cache_control),
        ttl_jitter=_first(b.ttl_jitter, a.ttl_jitter),
        allow_set_cookie=_first(b.allow_set_cookie, a.allow_set_cookie),
        response_headers=_first(b.response_headers, a.response_headers),
    )


def _check_rule_set(defaults: Actions, rules: list[Rule], problems: Problems) -> None:
    """Mistakes visible only across rules and files: duplicate names, shadowed rules."""
    seen: dict[str, Rule] = {}
    catch_all: Rule | None = None
    for r in rules:
        if r.name in seen:
            problems.add((r.file, r.line), f"rule {r.name!r}: the name is already used at "
                                           f"{seen[r.name].where}; names identify rules in "
                                           "Cache-Status and explain, make them unique")
        seen.setdefault(r.name, r)
        if catch_all is not None:
            problems.add((r.file, r.line), f"rule {r.name!r} can never match: rule "
                                           f"{catch_all.name!r} at {catch_all.where} has no match: "
                                           "conditions and wins for every request")
        elif r.catch_all:
            catch_all = r
        if r.actions.override_origin and r.actions.ttl is None and defaults.ttl is None:
            problems.add((r.file, r.line), f"rule {r.name!r}: override_origin: true needs a ttl "
                                           "(in the rule or in defaults) to replace the origin's")


def load_rules(files: list[tuple[str, str]], base: CacheOptions, problems: Problems) -> RuleSet:
    """Compile rule files (``(path, name to show)`` pairs) in order into one RuleSet."""
    defaults = Actions()
    rules: list[Rule] = []
    for path, display in files:
        root = load_yaml(path, problems, display)
        if root is None:
            continue
        file_defaults, file_rules = compile_rule_file(root, problems)
        if file_defaults is not None:
            defaults = _merge_defaults(defaults, file_defaults)
        rules.extend(file_rules)
    _check_rule_set(defaults, rules, problems)
    return RuleSet(defaults=defaults, rules=tuple(rules), base=base,
                   files=tuple(d for _, d in files))
