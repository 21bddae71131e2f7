"""``cachegate explain``: which rule a URL matches, its cache key, and what happens to a response.

The way to debug "why was this not cached": it runs the same compiled rules and
the same policy functions the proxy runs (``RuleSet.plan``, ``cache_key``,
``decide_store``, the deception guard), on a request described on the command
line and a response of the given status and headers, and prints every step with
the rule that decided it (``FILE:LINE``). Pure: ``now`` is a parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.policy.deception import content_type_agrees
from proxy.policy.keys import KeySpec, cache_key
from proxy.policy.messages import RequestHead
from proxy.policy.storability import DontStore, decide_store
from proxy.rules import CACHED_METHODS, HeaderEdits, RequestPlan, Rule, RuleSet, StorePlan

# What each "not stored" detail means, and what to change.
WHY_NOT = {
    "PRIVATE": "the origin sent Cache-Control: private (never stored by a shared cache)",
    "NO-STORE": "the origin sent Cache-Control: no-store",
    "REQUEST-NO-STORE": "the request sent Cache-Control: no-store",
    "AUTHORIZATION": "the request has Authorization and the response is not public/s-maxage/"
                     "must-revalidate",
    "SET-COOKIE": "the response sets a cookie; a rule with allow_set_cookie: true would store it "
                  "(without the Set-Cookie)",
    "VARY-STAR": "the response has Vary: *",
    "TOO-LARGE": "the response is larger than cache.max_object",
    "UNCACHEABLE-STATUS": "the status is not cacheable by default and neither the origin nor a rule "
                          "gives it a freshness lifetime; add a ttl for it in a rule",
    "NO-FRESHNESS": "the origin gave no freshness (max-age, s-maxage, Expires), no validator "
                    "(ETag, Last-Modified) and no rule ttl applies; add a ttl for this status in a rule",
    "METHOD": "only GET and HEAD are cached",
    "DECEPTION-GUARD": "the deception guard refused it: the Content-Type does not agree with the "
                       "path's extension",
}


@dataclass(frozen=True)
class ExplainRequest:
    url: str
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    statuses: tuple[int, ...] = (200,)
    response_headers: tuple[tuple[str, str], ...] = ()  # what the origin would send


def fmt_duration(seconds: float) -> str:
    """``90`` -> ``1m30s``; ``0`` -> ``0s``.

    >>> fmt_duration(90), fmt_duration(86400 * 7), fmt_duration(0.5)
    ('1m30s', '7d', '0.5s')
    """
    if seconds < 1:
        return f"{seconds:g}s"
    rest = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts)


def parse_header(text: str) -> tuple[str, str]:
    """``'Name: value'`` -> ``('Name', 'value')``; ValueError otherwise."""
    name, sep, value = text.partition(":")
    if not sep or not name.strip() or " " in name.strip():
        raise ValueError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def request_head(req: ExplainRequest) -> RequestHead:
    from proxy.policy.keys import normalise_host

    try:
        url = URL(req.url, encoded=True)
    except ValueError as exc:
        raise ValueError(f"{req.url!r} is not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise ValueError(f"{req.url!r}: give an absolute http:// or https:// URL")
    headers: CIMultiDict[str] = CIMultiDict(req.headers)
    host = headers.get("Host") or url.raw_authority
    headers.setdefault("Host", host)
    return RequestHead(req.method.upper(), url.scheme, normalise_host(host, url.scheme),
                       url.raw_path_qs or "/", CIMultiDictProxy(headers))


def _rule_label(rule: Rule | None) -> str:
    return f"{rule.name!r} ({rule.where})" if rule is not None else "none (defaults only)"


def _key_text(key: str) -> str:
    url, *extra = key.split("\x1f")
    parts = [url]
    for e in extra:
        kind, _, rest = e.partition(":")
        name, _, value = rest.partition("=")
        shown = "(absent)" if value in ("\n", "") else repr(value)
        parts.append(f"+ {'header' if kind == 'h' else 'cookie'} {name}={shown}")
    return "  ".join(parts)


def _key_changes(spec: KeySpec) -> list[str]:
    out = []
    if spec.query_ignore:
        out.append("query ignored")
    if spec.query_include is not None:
        out.append(f"query only {', '.join(spec.query_include)}")
    if spec.query_exclude:
        out.append(f"query without {', '.join(spec.query_exclude)}")
    if spec.query_sort:
        out.append("query sorted")
    if spec.lowercase_path:
        out.append("path lower-cased")
    return out


def _edits_text(edits: HeaderEdits | None) -> str:
    if not edits:
        return "none"
    parts = [f"set {k}: {v}" for k, v in edits.add] + [f"remove {n}" for n in edits.remove]
    return "; ".join(parts)


def _store_lines(head: RequestHead, plan: RequestPlan, status: int,
                 response_headers: Sequence[tuple[str, str]], now: float) -> list[str]:
    headers: CIMultiDict[str] = CIMultiDict(response_headers)
    ctype = headers.get("Content-Type")
    sp: StorePlan = plan.for_response(status, ctype)
    given = ", ".join(f"{k}: {v}" for k, v in response_headers) or "no headers"
    lines = [f"response {status} ({given})",
             f"  store-time rule     {_rule_label(sp.rule)}"]
    fill = head if head.method != "HEAD" else RequestHead("GET", head.scheme, head.host,
                                                           head.target, head.headers)
    detail = ""
    decision = None
    if sp.no_store:
        assert sp.rule is not None
        detail = f"RULE-NO-STORE:{sp.rule.name}"
        lines.append(f"  decision            not stored: {detail} (the rule says no_store)")
    else:
        decision = decide_store(fill, status, "", CIMultiDictProxy(headers), now, now, sp.options)
        if isinstance(decision, DontStore):
            detail = decision.detail
        elif sp.deception_guard and not content_type_agrees(head.target, ctype):
            detail = "DECEPTION-GUARD"
        if detail:
            lines.append(f"  decision            not stored: {detail} ({WHY_NOT.get(detail, '')})")
    if not detail and decision is not None and not isinstance(decision, DontStore):
        f = decision.response.freshness
        source = {
            "rule": ("rule ttl; overrides the origin (override_origin)" if sp.options.override_origin
                     else "rule ttl; used because the origin gave no freshness"),
            "heuristic": "heuristic: 10% of the time since Last-Modified (RFC 9111 4.2.2)",
            "none": "no freshness: every use is revalidated or refetched",
        }.get(f.source, f"from the origin's {f.source}")
        lines.append(f"  decision            stored, fresh for {fmt_duration(f.lifetime)} ({source})")
        if sp.ttl_jitter:
            shortest = fmt_duration(f.lifetime * (1 - sp.ttl_jitter))
            lines.append(f"  ttl jitter          each entry lives {shortest}..{fmt_duration(f.lifetime)} "
                         f"(-0..{sp.ttl_jitter:.0%})")
        if f.no_cache or f.must_revalidate:
            lines.append("  note                the origin requires revalidation "
                         f"({'no-cache' if f.no_cache else 'must-revalidate/s-maxage'}): never served stale")
        lines.append(f"  stale               while revalidating {fmt_duration(f.stale_while_revalidate)}, "
                     f"if error {fmt_duration(f.stale_if_error)}")
        if sp.tags:
            lines.append(f"  tags                {', '.join(sp.tags)} (besides Surrogate-Key/Cache-Tag)")
    lines.append(f"  deception guard     {'on' if sp.deception_guard else 'off'}")
    lines.append(f"  response headers    {_edits_text(plan.response_headers_for(status, ctype))}")
    return lines


def explain(rules: RuleSet, req: ExplainRequest, now: float, *, show_all: bool = True) -> list[str]:
    """The explanation, one line per string."""
    head = request_head(req)
    plan = rules.plan(head)
    lines = [f"request             {head.method} {head.url}"]
    extra = [f"{k}: {v}" for k, v in head.headers.items() if k.lower() != "host"]
    if extra:
        lines.append(f"request headers     {'; '.join(extra)}")
    lines.append(f"rule files          {', '.join(rules.files) or 'none'} ({len(rules.rules)} rule(s))")
    lines.append("")
    lines.append(f"request-time rule   {_rule_label(plan.rule)}")
    if head.method not in CACHED_METHODS:
        lines.append(f"  decision            passed to the origin: {head.method} is never looked up "
                     "or stored (X-Cache-Status: BYPASS)")
    elif plan.bypass:
        assert plan.rule is not None
        lines.append(f"  decision            BYPASS: neither looked up nor stored "
                     f"(Cache-Status detail RULE-BYPASS:{plan.rule.name})")
    else:
        key = cache_key(head, plan.key)
        changes = _key_changes(plan.key)
        lines.append(f"  cache key           {_key_text(key)}")
        if changes:
            lines.append(f"  key changes         {'; '.join(changes)} (the origin is asked for the "
                         "URL as keyed)")
        mode = plan.options.client_cache_control
        lines.append(f"  client no-cache     {mode}: " + {
            "honor": "a client's no-cache, max-age=0 or Pragma: no-cache goes to the origin",
            "revalidate": "a client's no-cache becomes a conditional revalidation",
            "ignore": "clients cannot bypass the cache with request Cache-Control",
        }[mode])
    if plan.response_rules:
        names = ", ".join(_rule_label(r) for r in plan.response_rules)
        lines.append(f"  response-dependent  {names} (decide store-time actions when their "
                     "status/content_type holds)")
    if head.method in CACHED_METHODS and not plan.bypass:
        for status in req.statuses:
            lines.append("")
            lines.extend(_store_lines(head, plan, status, req.response_headers, now))
    elif plan.response_headers_for(req.statuses[0], None):
        lines.append(f"  response headers    {_edits_text(plan.response_headers)}")
    if show_all:
        lines.append("")
        lines.append("rules in order (first match wins):")
        decided = False
        for rule, why in rules.trace(head):
            if why is None:
                if decided:
                    role = "not reached: an earlier rule won"
                elif rule.match.needs_response:
                    role = "applies when its status/content_type holds"
                else:
                    role, decided = "wins", True
                lines.append(f"  + {rule.name} ({rule.where}): request conditions hold -> {role}")
            else:
                lines.append(f"  - {rule.name} ({rule.where}): {why}")
        if not rules.rules:
            lines.append("  (no rules: RFC 9111 behaviour, nothing added)")
    return lines
