"""YAML rule files: compiled once at load, matched per request without I/O.

A rule file has ``defaults`` (applied before any rule) and ``rules`` (the first
matching rule wins; its fields override the defaults). Matching happens twice:

- at request time, the first rule whose request conditions hold and that has no
  response conditions decides ``bypass``, the cache ``key`` and
  ``client_cache_control``;
- at store time, the first rule whose request *and* response conditions
  (``status``, ``content_type``) hold decides ``ttl``, ``no_store``, ``tags`` and
  the rest.

Rules that can never do what they say (``bypass`` or ``key`` with a ``status``
condition, which is only known after the lookup) are rejected at load with
``FILE:LINE``, like every other mistake.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

from proxy.policy.keys import DEFAULT_KEY, KeySpec
from proxy.policy.messages import CacheOptions, ClientCacheControl, RequestHead
from proxy.schema import Section, type_name
from proxy.units import parse_duration
from proxy.yamlsrc import Problems, Src, load_yaml

CondKind = Literal["present", "absent", "equals", "regex"]

_MATCH_KEYS = ("host", "path", "method", "query", "header", "cookie", "status", "content_type")
_RULE_KEYS = (
    "name", "match", "ttl", "override_origin", "bypass", "no_store", "key",
    "stale_while_revalidate", "stale_if_error", "tags", "response_headers",
    "client_cache_control", "deception_guard", "ttl_jitter", "allow_set_cookie",
)  # fmt: skip
_DEFAULT_KEYS = (
    "ttl", "stale_while_revalidate", "stale_if_error", "client_cache_control",
    "ttl_jitter", "allow_set_cookie", "response_headers",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Condition:
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


@dataclass(frozen=True, slots=True)
class Match:
    hosts: tuple[re.Pattern[str], ...] = ()
    path: re.Pattern[str] | None = None
    methods: frozenset[str] | None = None
    query: tuple[Condition, ...] = ()
    headers: tuple[Condition, ...] = ()
    cookies: tuple[Condition, ...] = ()
    status: frozenset[int] | None = None
    content_types: tuple[str, ...] = ()

    @property
    def needs_response(self) -> bool:
        return self.status is not None or bool(self.content_types)

    def request_holds(self, request: RequestHead, path: str, query: str) -> bool:
        if self.methods is not None and request.method not in self.methods:
            return False
        if self.hosts:
            host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
            if not any(h.fullmatch(host) for h in self.hosts):
                return False
        if self.path is not None and not self.path.fullmatch(path):
            return False
        if self.query:
            params = _query_params(query)
            if not all(c.holds(params.get(c.name)) for c in self.query):
                return False
        if self.headers:
            for c in self.headers:
                values = request.headers.getall(c.name, ())
                if not c.holds(", ".join(values) if values else None):
                    return False
        if self.cookies:
            jar = _cookies(request)
            if not all(c.holds(jar.get(c.name)) for c in self.cookies):
                return False
        return True

    def response_holds(self, status: int, content_type: str | None) -> bool:
        if self.status is not None and status not in self.status:
            return False
        if self.content_types:
            ct = (content_type or "").split(";", 1)[0].strip().lower()
            if not any(fnmatch.fnmatchcase(ct, pattern) for pattern in self.content_types):
                return False
        return True


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    add: tuple[tuple[str, str], ...] = ()  # set (replacing) these on the way to the client
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)


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
    ttl_jitter: float | None = None  # a fraction: 0.1 spreads expiries over ±10%
    allow_set_cookie: bool | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    file: str
    line: int
    match: Match
    actions: Actions


@dataclass(frozen=True, slots=True)
class StorePlan:
    """The store-time outcome of the rules for one response."""

    rule: Rule | None
    options: CacheOptions
    no_store: bool
    tags: tuple[str, ...]
    deception_guard: bool
    ttl_jitter: float


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """The request-time outcome of the rules for one request."""

    rule: Rule | None  # decides bypass, key and client_cache_control
    candidates: tuple[Rule, ...]  # rules whose request conditions hold, in order
    bypass: bool
    key: KeySpec
    options: CacheOptions
    response_headers: HeaderEdits | None
    ruleset: RuleSet

    def for_response(self, status: int, content_type: str | None) -> StorePlan:
        return self.ruleset.store_plan(self, status, content_type)


@dataclass(frozen=True)
class RuleSet:
    defaults: Actions = field(default_factory=Actions)
    rules: tuple[Rule, ...] = ()
    base: CacheOptions = field(default_factory=CacheOptions)
    files: tuple[str, ...] = ()

    def plan(self, request: RequestHead) -> RequestPlan:
        path, _, query = request.target.partition("?")
        candidates = tuple(r for r in self.rules if r.match.request_holds(request, path, query))
        rule = next((r for r in candidates if not r.match.needs_response), None)
        actions = rule.actions if rule is not None else None
        options = self._options(actions)
        return RequestPlan(
            rule=rule,
            candidates=candidates,
            bypass=bool(actions and actions.bypass),
            key=(actions.key if actions and actions.key else DEFAULT_KEY),
            options=options,
            response_headers=(actions.response_headers if actions and actions.response_headers
                              else self.defaults.response_headers),
            ruleset=self,
        )

    def store_plan(self, plan: RequestPlan, status: int, content_type: str | None) -> StorePlan:
        rule = next((r for r in plan.candidates if r.match.response_holds(status, content_type)), None)
        actions = rule.actions if rule is not None else None
        options = self._options(actions)
        if plan.rule is not None and plan.rule is not rule:
            # client_cache_control was decided at request time; keep it consistent.
            options = replace(options, client_cache_control=plan.options.client_cache_control)
        deception = (actions.deception_guard if actions and actions.deception_guard is not None
                     else bool(actions and actions.override_origin))
        jitter = _first(actions.ttl_jitter if actions else None, self.defaults.ttl_jitter, 0.0)
        return StorePlan(
            rule=rule,
            options=options,
            no_store=bool(actions and actions.no_store),
            tags=(actions.tags if actions else ()) + self.defaults.tags,
            deception_guard=deception,
            ttl_jitter=jitter,
        )

    def _options(self, a: Actions | None) -> CacheOptions:
        d = self.defaults
        ttl = a.ttl if a is not None and a.ttl is not None else d.ttl
        ttl_default = a.ttl_default if a is not None and a.ttl is not None else d.ttl_default
        return replace(
            self.base,
            ttl_by_status=ttl if ttl is not None else self.base.ttl_by_status,
            ttl_default=ttl_default,
            override_origin=bool(a.override_origin) if a is not None else False,
            stale_while_revalidate=_first(a.stale_while_revalidate if a else None,
                                          d.stale_while_revalidate, 0.0),
            stale_if_error=_first(a.stale_if_error if a else None, d.stale_if_error, 0.0),
            client_cache_control=_first(a.client_cache_control if a else None,
                                        d.client_cache_control, "honor"),
            allow_set_cookie=_first(a.allow_set_cookie if a else None, d.allow_set_cookie, False),
        )


def _first(*values):  # type: ignore[no-untyped-def]
    for v in values:
        if v is not None:
            return v
    return None


def _query_params(query: str) -> dict[str, str]:
    from urllib.parse import parse_qsl

    params: dict[str, str] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        params.setdefault(k, v)
    return params


def _cookies(request: RequestHead) -> dict[str, str]:
    jar: dict[str, str] = {}
    for line in request.headers.getall("Cookie", ()):
        for part in line.split(";"):
            k, eq, v = part.strip().partition("=")
            if eq and k:
                jar.setdefault(k, v)
    return jar


# -- compiling ----------------------------------------------------------------------------


def glob_to_regex(glob: str) -> str:
    """``*`` matches within one path segment, ``**`` across segments.

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
    try:
        return re.compile(text)
    except re.error as exc:
        problems.add(at, f"{what}: bad regex {text!r}: {exc}")
        return None


def _path_pattern(src: Src, problems: Problems) -> re.Pattern[str] | None:
    if not isinstance(src.value, str) or not src.value:
        problems.add(src, f"match.path: expected a glob or regex: string, got {type_name(src.value)}")
        return None
    text = src.value
    if text.startswith("regex:"):
        return _compile_regex(text[6:].strip(), src, problems, "match.path")
    if not text.startswith("/"):
        problems.add(src, f"match.path: a path glob starts with '/', got {text!r}")
        return None
    return re.compile(glob_to_regex(text))


def _host_pattern(text: str) -> re.Pattern[str]:
    text = text.lower()
    if text.startswith("*."):
        return re.compile(r"(?:[^.]+\.)+" + re.escape(text[2:]))
    return re.compile(re.escape(text))


def _conditions(src: Src, problems: Problems, what: str, lower_names: bool) -> tuple[Condition, ...]:
    if not isinstance(src.value, dict):
        problems.add(src, f"match.{what}: expected a mapping of name to condition, "
                          f"got {type_name(src.value)}")
        return ()
    out: list[Condition] = []
    for name, cond in src.value.items():
        key = str(name).lower() if lower_names else str(name)
        v = cond.value
        if v in ("present", "absent"):
            out.append(Condition(key, v))
        elif isinstance(v, dict):
            sec = Section(cond, problems, f"match.{what}.{name}", ("equals", "regex"))
            if sec.has("regex"):
                pattern = _compile_regex(sec.str("regex", ""), cond, problems, f"match.{what}.{name}")
                if pattern is not None:
                    out.append(Condition(key, "regex", pattern=pattern))
            elif sec.has("equals"):
                out.append(Condition(key, "equals", value=sec.str("equals", "")))
            else:
                problems.add(cond, f"match.{what}.{name}: give equals: or regex:")
        elif isinstance(v, str | int | float) and not isinstance(v, bool):
            out.append(Condition(key, "equals", value=str(v)))
        else:
            problems.add(cond, f"match.{what}.{name}: expected present, absent, a value, "
                               f"{{equals: ...}} or {{regex: ...}}, got {type_name(v)}")
    return tuple(out)


def _compile_match(src: Src | None, problems: Problems) -> Match:
    if src is None:
        return Match()
    if not isinstance(src.value, dict):
        problems.add(src, f"match: expected a mapping, got {type_name(src.value)}")
        return Match()
    sec = Section(src, problems, "match", _MATCH_KEYS)
    hosts = tuple(_host_pattern(h) for h in sec.str_list("host"))
    path = _path_pattern(sec.values["path"], problems) if sec.has("path") else None
    methods = frozenset(m.upper() for m in sec.str_list("method")) if sec.has("method") else None
    status: frozenset[int] | None = None
    if sec.has("status"):
        codes: set[int] = set()
        items = sec.values["status"]
        for item in (items.value if isinstance(items.value, list) else [items]):
            if isinstance(item.value, int) and not isinstance(item.value, bool) and 100 <= item.value <= 599:
                codes.add(item.value)
            else:
                problems.add(item, f"match.status: expected HTTP status codes, got {item.value!r}")
        status = frozenset(codes)
    return Match(
        hosts=hosts,
        path=path,
        methods=methods,
        query=_conditions(sec.values["query"], problems, "query", False) if sec.has("query") else (),
        headers=_conditions(sec.values["header"], problems, "header", True) if sec.has("header") else (),
        cookies=_conditions(sec.values["cookie"], problems, "cookie", False) if sec.has("cookie") else (),
        status=status,
        content_types=tuple(c.lower() for c in sec.str_list("content_type")),
    )


def _ttl_table(src: Src, problems: Problems, what: str) -> tuple[Mapping[int, float], float | None]:
    if not isinstance(src.value, dict):
        try:
            return MappingProxyType({}), parse_duration(src.value)
        except ValueError:
            problems.add(src, f"{what}: expected a mapping of status to duration "
                              f"(e.g. {{200: 5m, default: 1m}}), got {src.value!r}")
            return MappingProxyType({}), None
    table: dict[int, float] = {}
    default: float | None = None
    for status, value in src.value.items():
        try:
            seconds = parse_duration(value.value)
        except ValueError as exc:
            problems.add(value, f"{what}.{status}: {exc}")
            continue
        if status == "default":
            default = seconds
        elif isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599:
            table[status] = seconds
        else:
            line = src.key_lines.get(status, src.line)
            problems.add((src.file, line), f"{what}: {status!r} is not a status code or 'default'")
    return MappingProxyType(table), default


def _key_spec(src: Src, problems: Problems) -> KeySpec | None:
    if not isinstance(src.value, dict):
        problems.add(src, f"key: expected a mapping, got {type_name(src.value)}")
        return None
    sec = Section(src, problems, "key", ("query", "headers", "cookies", "lowercase_path"))
    spec = KeySpec(
        headers=tuple(h.lower() for h in sec.str_list("headers")),
        cookies=tuple(sec.str_list("cookies")),
        lowercase_path=sec.bool("lowercase_path", False),
    )
    q = sec.raw("query")
    if q is not None:
        if q.value in ("ignore", "ignore-all", False):
            spec = replace(spec, query_ignore=True)
        elif q.value == "sort":
            spec = replace(spec, query_sort=True)
        elif isinstance(q.value, dict):
            qs = Section(q, problems, "key.query", ("include", "exclude", "sort", "ignore"))
            include = qs.str_list("include") if qs.has("include") else None
            spec = replace(
                spec,
                query_include=tuple(include) if include is not None else None,
                query_exclude=tuple(qs.str_list("exclude")),
                query_sort=qs.bool("sort", False),
                query_ignore=qs.bool("ignore", False),
            )
        else:
            problems.add(q, "key.query: expected ignore, sort or {include: [...], exclude: [...], sort: true}")
    return spec


def _header_edits(src: Src, problems: Problems) -> HeaderEdits | None:
    if not isinstance(src.value, dict):
        problems.add(src, f"response_headers: expected a mapping with add:/remove:, got {type_name(src.value)}")
        return None
    sec = Section(src, problems, "response_headers", ("add", "remove"))
    add: list[tuple[str, str]] = []
    adds = sec.raw("add")
    if adds is not None:
        if isinstance(adds.value, dict):
            for name, value in adds.value.items():
                if isinstance(value.value, str | int) and not isinstance(value.value, bool):
                    add.append((str(name), str(value.value)))
                else:
                    problems.add(value, f"response_headers.add.{name}: expected a string")
        else:
            problems.add(adds, "response_headers.add: expected a mapping of header to value")
    return HeaderEdits(tuple(add), tuple(sec.str_list("remove")))


def _jitter(sec: Section) -> float | None:
    item = sec.raw("ttl_jitter")
    if item is None or item.value is None:
        return None
    text = str(item.value).strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        sec.problems.add(item, f"ttl_jitter: expected a percentage like 10%, got {item.value!r}")
        return None
    return value


def _actions(sec: Section, problems: Problems) -> Actions:
    ttl: Mapping[int, float] | None = None
    ttl_default: float | None = None
    if sec.has("ttl"):
        ttl, ttl_default = _ttl_table(sec.values["ttl"], problems, "ttl")
    mode = sec.choice("client_cache_control", "", ("", "honor", "revalidate", "ignore")) or None
    return Actions(
        ttl=ttl,
        ttl_default=ttl_default,
        override_origin=sec.bool("override_origin", False) if sec.has("override_origin") else None,
        bypass=sec.bool("bypass", False),
        no_store=sec.bool("no_store", False),
        key=_key_spec(sec.values["key"], problems) if sec.has("key") else None,
        stale_while_revalidate=sec.optional_duration("stale_while_revalidate"),
        stale_if_error=sec.optional_duration("stale_if_error"),
        tags=tuple(sec.str_list("tags")),
        response_headers=(_header_edits(sec.values["response_headers"], problems)
                          if sec.has("response_headers") else None),
        client_cache_control=mode,  # type: ignore[arg-type]
        deception_guard=sec.bool("deception_guard", False) if sec.has("deception_guard") else None,
        ttl_jitter=_jitter(sec),
        allow_set_cookie=sec.bool("allow_set_cookie", False) if sec.has("allow_set_cookie") else None,
    )


def _compile_rule(src: Src, index: int, problems: Problems) -> Rule | None:
    if not isinstance(src.value, dict):
        problems.add(src, f"rules[{index}]: expected a mapping, got {type_name(src.value)}")
        return None
    sec = Section(src, problems, f"rules[{index}]", _RULE_KEYS)
    name = sec.str("name", f"rule {index + 1} ({os.path.basename(src.file)}:{src.line})")
    match = _compile_match(sec.raw("match"), problems)
    actions = _actions(sec, problems)
    if match.needs_response:
        for field_name, set_ in (("bypass", actions.bypass), ("key", actions.key is not None),
                                 ("client_cache_control", actions.client_cache_control is not None)):
            if set_:
                problems.add(sec.line_of(field_name),
                             f"rule {name!r}: {field_name} is decided before the response exists, "
                             f"so it can never apply with a status/content_type condition")
    return Rule(name=name, file=src.file, line=src.line, match=match, actions=actions)


def compile_rule_file(root: Src, problems: Problems) -> tuple[Actions | None, list[Rule]]:
    if not isinstance(root.value, dict):
        problems.add(root, f"a rule file is a mapping with defaults: and rules:, got {type_name(root.value)}")
        return None, []
    sec = Section(root, problems, "", ("defaults", "rules"))
    defaults: Actions | None = None
    d = sec.section("defaults", _DEFAULT_KEYS)
    if d is not None:
        defaults = _actions(d, problems)
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
    return RuleSet(defaults=defaults, rules=tuple(rules), base=base,
                   files=tuple(d for _, d in files))
