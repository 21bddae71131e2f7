"""``cachegate explain`` and ``GET /explain``: which rule a URL matches, its key, what happens now.

The way to debug "why was this not cached": it runs the same compiled rules and
the same policy functions the proxy runs (``RuleSet.plan``, ``cache_key``, and
``decide_fill``, the proxy's one fill decision), on a request described on the
command line and a response of the given status and headers, and prints every step
with the rule that decided it (``FILE:LINE``). Pure: ``now`` is a parameter.

``explain_trace`` is the same for the admin API's ``GET /explain``, as JSON, with
the variants the running store holds under the request's key: it adds what the
proxy would do with the request right now (``decide_lookup``) and, for each
stored variant, which directive decided its freshness and whether it would be
stored again under the current rules.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, assert_never

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.policy.cache_control import CacheControl, parse_cache_control
from proxy.policy.cache_status import cache_status, forwarded_x_cache, serve_detail
from proxy.policy.fields import body_length, content_length, is_token
from proxy.policy.fill import Exchange, Fill, FillSettings, NoFill, decide_fill, freshened
from proxy.policy.freshness import (
    heuristic_withheld,
    may_be_served_stale,
    origin_freshness_only,
    rule_stale_windows_apply,
)
from proxy.policy.headers import reply_edits
from proxy.policy.httpdate import format_http_date
from proxy.policy.keys import ABSENT, KeySpec, cache_key, shown_vary, variant_of, vary_matches
from proxy.policy.messages import Freshness, RequestHead, StoredResponse
from proxy.policy.partial import (
    FetchRange,
    JoinFill,
    decide_range_fetch,
    part_range,
    representation_status,
)
from proxy.policy.ranges import RangeSpec, request_range
from proxy.policy.reply import (
    NotModified,
    PreconditionFailed,
    Send,
    Unsatisfiable,
    reply_head,
    served_headers,
)
from proxy.policy.request import (
    DEFAULT_MAX_HEAD,
    REQUEST_BODY,
    Listener,
    LookUp,
    Message,
    PassThrough,
    Refusal,
    RequestRoute,
    carries_body,
    decide_request,
    framing_refusal,
    head_refusal,
    normalise_request,
    parse_url,
)
from proxy.policy.reuse import (
    CLIENT_NO_CACHE,
    NO_VALIDATOR,
    FetchPart,
    FetchWhole,
    Forward,
    FromPart,
    OnlyIfCachedMiss,
    Revalidate,
    Serve,
    decide_lookup,
    decide_part_lookup,
    select_variant,
)
from proxy.policy.spellings import spelled_otherwise
from proxy.policy.storability import response_cache_control, too_large
from proxy.rules import CACHED_METHODS, HeaderEdits, RequestPlan, Rule, RuleSet, StorePlan, lowered_path

# What each "not stored" detail means, and what to change.
WHY_NOT = {
    # ({field}: the field the directives came from, ``response_cache_control``)
    "PRIVATE": "the origin sent {field}: private (never stored by a shared cache)",
    "NO-STORE": "the origin sent {field}: no-store",
    "REQUEST-NO-STORE": "the request sent Cache-Control: no-store",
    "AUTHORIZATION": "the request has Authorization and the response is not public/s-maxage/"
                     "must-revalidate",
    "SET-COOKIE": "the response sets a cookie; a rule with allow_set_cookie: true would store it "
                  "(without the Set-Cookie)",
    "VARY-STAR": "the response has Vary: *",
    "VARY-INVALID": "the response's Vary has a member that is not a field name (such as \"Cookie\", "
                    "Cookie;x=1 or Coo kie): no request can be matched on it, as for Vary: *",
    "VARY-PER-CLIENT": "the response varies on X-Forwarded-For or X-Request-Id, which cachegate sets "
                       "per client",
    "TOO-LARGE": "the response is larger than the store keeps (cache.max_object, half a disk shard's "
                 "budget in force, lower while the URL index takes more than its share of "
                 "cache.disk.size, or without a disk tier what one record of the shared memory holds)",
    # (with ":<name>", the Vary member the request also carried spelled otherwise)
    "AMBIGUOUS-HEADER": "the response varies on a field the request also carried spelled with '_' "
                        "for '-' (CGI, WSGI and Rack origins read both as one field, the later line "
                        "winning): the origin may have answered for another value than the variant "
                        "would record",
    "TLS-CLOSE-DELIMITED": "the response came from an https upstream with a body delimited only by the "
                           "connection's end (no Content-Length, not chunked), whose end cannot be told "
                           "from a truncation; send a Content-Length or chunked",
    "UNCACHEABLE-STATUS": "the status is not cacheable by default and neither the origin nor a rule "
                          "gives it a freshness lifetime (a ttl default never covers an error status "
                          "other than 404, 405, 410, 414 and 501); name the status in a rule's ttl",
    "COOKIE-NO-FRESHNESS": "the request has a Cookie and the response is not public and has no lifetime "
                           "above 0 ({given}): stored, it would be reused only after asking the "
                           "origin with this response's validators, and an origin that compares only "
                           "the validator answers the next client (another cookie, or none) with a 304 "
                           "for this one's page; have the origin send a lifetime (max-age, Expires) or "
                           "public when the page is the same for everyone, private when it is not, or "
                           "give a rule a ttl for this status (with override_origin: true over the "
                           "origin's own max-age=0 or no-cache)",
    "NO-FRESHNESS": "the origin gave no freshness (max-age, s-maxage, Expires), no validator "
                    "(ETag, Last-Modified) and no rule ttl applies; add a ttl for this status in a rule",
    "METHOD": "only GET and HEAD are cached",
    "DECEPTION-GUARD": "the deception guard refused it: the Content-Type does not agree with the "
                       "path's extension (decoded as the rules read it); under a rule's ttl only a "
                       "known extension of the response's type counts, so a path without one needs "
                       "deception_guard: false on its rule",
}


EXPIRED_AT_ONCE = ("{given}: it is expired at once, and with no validator (ETag, Last-Modified) "
                   "nothing makes it reusable; have the origin send a validator{stale}, or {fix}")
# (a stored error's stale windows are never used: ``proxy.policy.freshness.may_be_served_stale``)
EXPIRED_STALE = {True: " (or its own stale-if-error=)",
                 False: " (its stale-if-error= or stale-while-revalidate= does nothing for an error: "
                        "a stored error is never served stale)"}


def why_not(detail: str, cc_field: str, headers: CIMultiDictProxy[str], expired_by: str = "",
            status: int = 200) -> str:
    """What a "not stored" detail means, naming the field whose directive decided (spelled as
    the response spelled it): a targeted field (CDN-Cache-Control: no-store) overrides
    Cache-Control, and blaming Cache-Control sent the reader to a field that said max-age=500.

    NO-FRESHNESS with a lifetime of 0 that was given (``expired_by``: max-age=0, Expires: -1, a
    rule's ttl of 0s) is not "no freshness": adding a rule ttl, the fix for that, does nothing
    against the origin's own lifetime without override_origin."""
    field = next((k for k in headers if k.lower() == cc_field.lower()), "Cache-Control")
    if detail == "COOKIE-NO-FRESHNESS":
        given = {
            "": "no max-age, s-maxage or Expires, and no heuristic for a request with a Cookie",
            "rule": "the rule's ttl for this status is 0s",
            "expires": "the origin's Expires is not after its Date, or invalid",
            "no-cache": f"the origin's {field}: no-cache has every use revalidated",
        }.get(expired_by, f"the origin's {field}: {expired_by}=0")
        return WHY_NOT[detail].replace("{given}", given)
    if detail == "NO-FRESHNESS" and expired_by:
        if expired_by == "rule":
            given, fix = "the rule's ttl for this status is 0s", "give the rule a ttl above 0s"
        elif expired_by == "expires":
            given = ("the origin's Expires (a date not after its Date, or invalid: 0, -1) gives it "
                     "a lifetime of 0")
            fix = "give a rule a ttl for this status with override_origin: true"
        else:
            given = f"the origin's {field}: {expired_by}=0 gives it a lifetime of 0"
            fix = "give a rule a ttl for this status with override_origin: true"
        return EXPIRED_AT_ONCE.format(given=given, fix=fix, stale=EXPIRED_STALE[status < 500])
    return WHY_NOT.get(detail.partition(":")[0], "").replace("{field}", field)


NO_HEURISTIC = ("no heuristic freshness: the request carries Authorization and the response is not "
                "public, so it is revalidated before every use")


NO_RULE_STALE = ("the rules' stale_while_revalidate / stale_if_error apply only to a response with a "
                 "lifetime: this one is stored only to be revalidated (it may be one user's page), "
                 "so it is never served stale unless the origin sends stale-while-revalidate= or "
                 "stale-if-error=")


AUTHORIZATION_ORIGIN_ONLY = ("the request has Authorization and only must-revalidate lets a shared cache "
                             "keep the response (RFC 9111 3.5): the origin's freshness alone, the rule's ttl "
                             "and override_origin do not apply")


# The details of a response not stored for having no lifetime above 0, which a rule's ttl that
# ``origin_freshness_only`` dropped would have given it one.
NO_LIFETIME = frozenset({"NO-FRESHNESS", "COOKIE-NO-FRESHNESS"})


def authorization_origin_only(head: RequestHead, status: int, cc: CacheControl, sp: StorePlan) -> bool:
    """Would a rule ttl apply to this response, but for ``origin_freshness_only``? (For explain.)"""
    authorization = "authorization" in head.headers
    return (sp.options.rule_ttl(status) is not None
            and origin_freshness_only(sp.options, cc, authorization=authorization) is not sp.options)


LOWERED = ("{rule} keys the lower-cased path and asks the origin for it, so the rules are read on "
           "that path")


def _lowered_differ(rules: RuleSet, head: RequestHead) -> str:
    """Why a request whose rule lower-cases the path is bypassed (``RuleSet.plan``)."""
    other = rules.plan(lowered_path(head)).rule
    return ("the rule's key lower-cases the path, and on the lower-cased path (the one the origin "
            f"would be asked for) {_rule_label(other)} decides instead, without lower-casing it")


def ruled_head(head: RequestHead, plan: RequestPlan) -> RequestHead:
    """The request as the rules read it for ``plan``: with the lower-cased path when a key that
    lower-cases it had them read that (``RuleSet.plan``)."""
    return lowered_path(head) if plan.lowered_by is not None else head


def _cc_of(headers: CIMultiDictProxy[str], sp: StorePlan) -> CacheControl:
    """The directives this cache obeys in ``headers`` under the store plan's options."""
    return response_cache_control(headers, sp.options)[0]


@dataclass(frozen=True)
class ExplainRequest:
    url: str
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    statuses: tuple[int, ...] = (200,)
    response_headers: tuple[tuple[str, str], ...] = ()  # what the origin would send
    max_head: int = DEFAULT_MAX_HEAD  # the proxy's ``max_request_head``


def fmt_duration(seconds: float) -> str:
    """``90`` -> ``1m30s``; ``0`` -> ``0s``.

    >>> fmt_duration(90), fmt_duration(86400 * 7), fmt_duration(0.5), fmt_duration(-0.0)
    ('1m30s', '7d', '0.5s', '0s')
    """
    seconds += 0.0  # (-0.0, as -min(ttl, 0.0) gives, reads 0s, not -0s)
    if seconds < 1:
        return f"{seconds:g}s"
    rest = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts)


def field_problem(name: str, value: str) -> str | None:
    """Why no client could send the field ``name: value`` to the proxy (its parser would
    refuse it), or None: the one check of a field to explain, ``cachegate explain -H/-R`` and
    the admin API's ``/explain`` alike, so that neither explains a request nobody can send."""
    if not is_token(name):
        return (f"{name!r} is not a field name: a name is a token of ASCII letters, digits and "
                "!#$%&'*+-.^_`|~ (RFC 9110 §5.1), as the proxy's parser takes them")
    bad = next((c for c in value if c in "\r\n\x00"), None)
    if bad is not None:
        return f"the value of {name!r} holds {bad!r}, which no field value may (RFC 9110 §5.5)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a byte that is not UTF-8, as argv and aiohttp read one (\udcXX)
        return f"the value of {name!r} is not UTF-8: give the field's text as UTF-8"
    return None


def parse_header(text: str, option: str = "-H") -> tuple[str, str]:
    """``'Name: value'`` (``option``'s argument) -> ``('Name', 'value')``; ValueError with
    ``field_problem``'s reason otherwise. Only spaces and tabs around the value are dropped
    (its OWS, as the parser drops them): ``str.strip`` also took a CR or LF at its end."""
    name, sep, value = text.partition(":")
    if not sep or not name:
        raise ValueError(f"{option} {text!r}: expected 'Name: value'")
    value = value.strip(" \t")
    problem = field_problem(name, value)
    if problem is not None:
        raise ValueError(f"{option} {text!r}: {problem}")
    return name, value


def request_head(req: ExplainRequest) -> RequestHead:
    """The request as the proxy would see it: normalised by the proxy's own
    ``normalise_request`` (from an untrusted client; the URL's authority is the Host).
    ValueError for a request the proxy would refuse."""
    try:
        url = parse_url(req.url, encoded=True)
    except ValueError as exc:
        raise ValueError(f"{req.url!r} is not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise ValueError(f"{req.url!r}: give an absolute http:// or https:// URL")
    refused = limits_refusal(req.method, req.url, req.headers, req.max_head)
    if refused is not None:
        raise ValueError(would_refuse(refused))
    headers: CIMultiDict[str] = CIMultiDict(req.headers)
    refused = framing_refusal(headers)  # (aiohttp's parser answers these before normalise_request)
    if refused is not None:
        raise ValueError(would_refuse(refused))
    if "Host" not in headers:
        headers["Host"] = url.raw_authority
    message = Message(req.method.upper(), req.url, (1, 1), CIMultiDictProxy(headers))
    head = normalise_request(message, secure=url.scheme == "https", trusted=False,
                             listener=Listener(url.raw_authority, max_head=req.max_head))
    if isinstance(head, Refusal):
        raise ValueError(would_refuse(head))
    return head


def limits_refusal(method: str, url: str, headers: Sequence[tuple[str, str]],
                   max_head: int) -> Refusal | None:
    """What the client listener answers the head explain describes for ``url`` (absolute-form,
    with the ``Host`` it adds when ``headers`` have none) when it breaks the listener's limits
    (``head_refusal``: too big, too many fields, a field too long), before anything reads it."""
    if not any(n.lower() == "host" for n, _ in headers):
        try:
            host = parse_url(url, encoded=True).raw_authority
        except ValueError:
            host = ""  # (refused as no URL, by ``request_head``)
        headers = (*headers, ("Host", host))
    return head_refusal(method, url, headers, max_head)


def would_refuse(refusal: Refusal) -> str:
    """Explain's answer to a request the proxy refuses: its status and why, not a trace."""
    return f"the proxy would refuse this request with {refusal.status}: {refusal.reason}"


def request_body(req: ExplainRequest) -> bool:
    """Whether the request described carries a body (its ``Content-Length`` or
    ``Transfer-Encoding``): a GET or HEAD with one is passed through (``decide_request``)."""
    return carries_body(CIMultiDict(req.headers))


def route_of(head: RequestHead, plan: RequestPlan, body: bool) -> RequestRoute:
    """The engine's first decision for this request (``decide_request``), from its plan."""
    return decide_request(head, body=body, bypass=plan.bypass_detail if plan.bypass else None)


BODY_WHY = ("the request carries a body (Content-Length over 0, or chunked), which the key never "
            "reads: it is forwarded with its body, neither looked up, nor coalesced, nor stored")


def _ttl_kind(sp: StorePlan) -> str:
    """A rule ttl in the CLI's words: the matched rule's own, or the defaults' (``ttl_owner``)."""
    own = sp.rule is not None and sp.rule.actions.ttl is not None
    return "rule ttl" if own else "the rules' defaults ttl"


def _rule_label(rule: Rule | None) -> str:
    return f"{rule.name!r} ({rule.where})" if rule is not None else "none (defaults only)"


def _key_text(key: str) -> str:
    url, *extra = key.split("\x1f")
    parts = [url]
    for e in extra:
        kind, _, rest = e.partition(":")
        name, _, value = rest.partition("=")
        shown = "(absent)" if value in ("\n", "") else repr(value)
        what = {"h": "header", "H": "header (bytes not UTF-8, read as Latin-1)"}.get(kind, "cookie")
        parts.append(f"+ {what} {name}={shown}")
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


def _edits_text(edits: HeaderEdits | None, fields: Sequence[tuple[str, str]]) -> str:
    """The rule's ``response_headers`` edits as a reply with ``fields`` (the origin's, and the
    ``Cache-Status`` the proxy adds) gets them: through ``reply_edits``, as ``HeaderEdits.apply``
    runs them, with those withheld from a personal reply said as withheld, and why. Listing
    them all showed a ``Cache-Control: public, max-age=600`` the proxy never sends on a private
    or bypassed reply."""
    if not edits:
        return "none"
    add, drop = reply_edits(fields, edits.add, edits.drop) if edits.caching else (edits.add, edits.drop)
    kept = [f"set {k}: {v}" for k, v in edits.add if (k, v) in add]
    kept += [f"remove {n}" for n in edits.remove if n.lower() in drop]
    withheld = [f"set {k}: {v}" for k, v in edits.add if (k, v) not in add]
    withheld += [f"remove {n}" for n in edits.remove if n.lower() not in drop]
    text = "; ".join(kept) or "none"
    if withheld:
        text += (f"; withheld: {'; '.join(withheld)} ({_personal_why(fields)}: no cache after this "
                 "one may be told to share it)")
    return text


def _personal_why(fields: Sequence[tuple[str, str]]) -> str:
    """Why ``personal_reply`` holds for a reply with ``fields``, in words."""
    for name, value in fields:
        lower = name.lower()
        if lower == "cache-status" and "fwd=bypass" in value:
            return "the request is bypassed, so its reply may be one user's"
        if lower == "set-cookie":
            return "the reply sets a cookie"
        if lower == "cache-control":
            cc = parse_cache_control([value])
            for directive in ("private", "no-store"):
                if directive in cc:
                    return f"the reply's Cache-Control says {directive}"
        if lower == "cache-status" and "detail=AUTHORIZATION" in value:
            return "the reply was not stored for the request's Authorization"
        if lower == "cache-status" and "COOKIE-NO-FRESHNESS" in value:
            return "the reply was not stored: the request's cookie, and no lifetime of its own"
    return "the reply is one no shared cache may keep"


def reply_fields(response_headers: Sequence[tuple[str, str]], cs: str) -> list[tuple[str, str]]:
    """The fields of the proxy's reply that decide its edits: the origin's and its Cache-Status."""
    return [*response_headers, ("Cache-Status", cs)]


def fill_decision(head: RequestHead, plan: RequestPlan, status: int, headers: CIMultiDictProxy[str],
                  now: float, room: int | None = None) -> tuple[StorePlan, Fill | NoFill]:
    """The store-time rules for this response, and the proxy's own fill decision for it
    (``decide_fill``, at the longest lifetime ``ttl_jitter`` allows). A 206's rules are its 200's,
    as the engine stores parts (``representation_status``). ``room``: the biggest body the
    running store keeps now (``Storage.max_object``: less than the rules' while the disk
    shards' budget is lowered), which a Content-Length is held against as the engine does
    (``Engine.fill_decision``); None: the rules' alone (no running store). A 206 answering the
    request's range is decided as a part (``Engine._part_decision``): explain said
    ``UNCACHEABLE-STATUS`` for every 206 the proxy stored."""
    sp = plan.for_response(representation_status(status), headers.get("Content-Type"))
    part = status == 206 and "range" in head.headers
    decision = decide_fill(Exchange(head, status, "", headers, now, now), sp, FillSettings(), part=part)
    length = body_length(status, content_length(headers.getall("Content-Length", ())))
    if room is not None and isinstance(decision, Fill) and too_large(length, room):
        return sp, NoFill("TOO-LARGE")
    return sp, decision


def _store_lines(head: RequestHead, plan: RequestPlan, status: int,
                 response_headers: Sequence[tuple[str, str]], now: float) -> list[str]:
    headers = CIMultiDictProxy(CIMultiDict(response_headers))
    ctype = headers.get("Content-Type")
    sp, decision = fill_decision(head, plan, status, headers, now)
    given = ", ".join(f"{k}: {v}" for k, v in response_headers) or "no headers"
    lines = [f"response {status} ({given})",
             f"  store-time rule     {_rule_label(sp.rule)}"]
    match decision:
        case NoFill(detail=detail, expired_by=expired_by):
            why = "the rule says no_store" if sp.no_store_rule is not None \
                else why_not(detail, response_cache_control(headers, sp.options)[1], headers, expired_by,
                             status)
            lines.append(f"  decision            not stored: {detail} ({why})")
            if detail in NO_LIFETIME and authorization_origin_only(head, status, _cc_of(headers, sp), sp):
                lines.append(f"  note                {AUTHORIZATION_ORIGIN_ONLY}")
        case Fill():
            f = decision.response.freshness
            source = {
                "rule": _ttl_kind(sp) + ("; overrides the origin (override_origin)"
                                         if sp.options.override_origin
                                         else "; used because the origin gave no freshness"),
                "heuristic": "heuristic: 10% of the time since Last-Modified (RFC 9111 4.2.2)",
                "none": "no freshness: every use is revalidated or refetched",
            }.get(f.source, f"from the origin's {f.source}")
            if f.no_cache:
                lines.append("  decision            stored, revalidated with the origin before every use "
                             "(the origin's no-cache)")
            else:
                lines.append(f"  decision            stored, fresh for {fmt_duration(f.lifetime)} ({source})")
            if sp.ttl_jitter:
                shortest = fmt_duration(f.lifetime * (1 - sp.ttl_jitter))
                lines.append(f"  ttl jitter          each entry lives {shortest}..{fmt_duration(f.lifetime)} "
                             f"(-0..{sp.ttl_jitter:.0%})")
            if f.source == "none" and heuristic_withheld(status, headers, _cc_of(headers, sp), head.headers,
                                                         now, sp.options):
                lines.append(f"  note                {NO_HEURISTIC}")
            if authorization_origin_only(head, status, _cc_of(headers, sp), sp):
                lines.append(f"  note                {AUTHORIZATION_ORIGIN_ONLY}")
            lines.extend(_stale_lines(f, _cc_of(headers, sp), sp, decision.response.status))
            if sp.tags:
                lines.append(f"  tags                {', '.join(sp.tags)} (besides Surrogate-Key/Cache-Tag)")
        case _:
            assert_never(decision)
    lines.append(f"  deception guard     {'on' if sp.deception_guard else 'off'}")
    edits = plan.response_headers_for(status, ctype)
    stored = isinstance(decision, Fill)
    # The reply to the request that fetched it (``flight``: the origin's fields, our Cache-Status).
    cs = cache_status(fwd="uri-miss", fwd_status=status, stored=stored,
                      detail=None if isinstance(decision, Fill) else decision.detail)
    text = _edits_text(edits, reply_fields(response_headers, cs))
    lines.append(f"  response headers    {text}")
    if isinstance(decision, Fill):  # hits: the stored fields (without a Set-Cookie allow_set_cookie kept out)
        hit = _edits_text(edits, reply_fields(decision.response.headers, cache_status(hit=True)))
        if hit != text:
            lines.append(f"  ... on hits         {hit}")
    return lines


def _stale_lines(f: Freshness, cc: CacheControl, sp: StorePlan, status: int) -> list[str]:
    """Which stale windows the engine applies to this stored response, and where each comes from:
    none when the origin forbids serving it stale (``Freshness.may_serve_stale``), the rules'
    only for a response with a lifetime (``rule_stale_windows_apply``), and none for a stored
    error (``proxy.policy.freshness.may_be_served_stale``)."""
    if not f.may_serve_stale():
        which = "no-cache" if f.no_cache else "/".join(
            d for d in ("must-revalidate", "proxy-revalidate", "s-maxage") if d in cc)
        return [f"  stale               never served stale: the origin requires revalidation ({which}); "
                "if it cannot be reached, 504"]
    if not may_be_served_stale(status, f):
        return ["  stale               never served stale: a stored error is revalidated first, and the "
                "client gets the origin's answer (its new error, or the proxy's 502/504 if it cannot be "
                "reached)"]

    def window(value: float, directive: str, rule_name: str) -> str:
        if cc.delta(directive) is not None:
            return f"{fmt_duration(value)} (the origin's {directive})"
        return f"{fmt_duration(value)} (the rules' {rule_name})" if value > 0 else fmt_duration(value)

    lines = [f"  stale               while revalidating "
             f"{window(f.stale_while_revalidate, 'stale-while-revalidate', 'stale_while_revalidate')}"
             f", if error {window(f.stale_if_error, 'stale-if-error', 'stale_if_error')}"]
    ruled = sp.options.stale_while_revalidate or sp.options.stale_if_error
    if ruled and not rule_stale_windows_apply(f.lifetime):
        lines.append(f"  note                {NO_RULE_STALE}")
    return lines


def _bypass_why(plan: RequestPlan) -> str:
    """Why a request the rules did not bypass is neither looked up nor stored."""
    if plan.read_as is not None:
        there = ("the rules decide there what is unsafe to share with this path's plan"
                 if plan.detail == "AMBIGUOUS-PATH" else "there the rules do not store it")
        return (f"some origins read this path as {plan.read_as} (servlet containers drop ';' "
                "parameters, Go, Rails and Express route on the raw path and never decode an "
                "escaped '/' or resolve '%2e%2e', IIS reads '\\' as '/' and drops a segment's "
                f"trailing dots and spaces), and {there} ({plan.detail}): neither looked up nor "
                "stored, so that such an origin's answer is never stored under this URL")
    kind, _, name = (plan.detail or "").partition(":")
    if kind == "AMBIGUOUS-QUERY":
        return (f"the rules read query parameter {name!r}, which came more than once with other "
                "values or spelled as PHP reads it (edit.mode, edit+mode and the array edit_mode[] "
                "are all PHP's edit_mode; x=1;edit_mode=1 holds edit_mode where ';' splits the query "
                "too, as in Rack 2), and reading it as PHP, Rails, Django or Rack do, alone or with "
                "a field's other readings, decides something unsafe to share (a bypass, no_store, "
                "another key, other response edits or looser storing; not a ttl alone): neither "
                "looked up nor stored")
    if kind == "AMBIGUOUS-HEADER" and name in plan.key.headers:
        return (f"the rule's key reads field {name!r}, which came spelled with '_' for '-' too (CGI, "
                "WSGI and Rack origins read both as one field, the later line winning), so the "
                "origin may answer for another value than the key holds: neither looked up nor stored")
    if kind == "AMBIGUOUS-HEADER":
        return (f"the rules read field {name!r}, which came as several lines or spelled with '_' "
                "for '-' too (as CGI, WSGI and Rack origins read it), and reading its first line, "
                "its last, all of them or the other spelling decides differently: neither looked "
                "up nor stored")
    return (f"the rules read cookie {name!r}, and this Cookie field is read differently by "
            "different origins (a comma, whitespace or a quote inside it, a name sent twice with "
            "other values or in another case, more than one Cookie line, a name PHP reads as it: "
            "ab.bucket is PHP's ab_bucket, or a value with % or + that origins decoding it, "
            "ASP.NET Core, Express, Rack, PHP, read so that the rule decides otherwise): neither "
            "looked up nor stored")


def unbypassed(rules: RuleSet, head: RequestHead, plan: RequestPlan) -> RequestPlan | None:
    """For a GET or HEAD the rules bypass, the plan it has without the bypass, whose key holds
    what the bypass hides (stored before it came, by a reload or by another request's plan,
    and served again once it goes); None for a request that is not bypassed.

    A bypass the rules did not ask for (a reading origins differ on, a lower-cased path decided
    otherwise: ``RequestPlan.detail``) marks the request's own plan, whose key is the one. A
    rule's ``bypass`` is taken away with every other rule's: the plan of the rules without
    bypass rules is the one that stored under this URL and the one the proxy returns to when the
    bypass goes (the rules' default key alone would miss a winning rule's ``key``, and taking away
    only the first bypass rule may leave another in its place)."""
    if not plan.bypass or head.method not in CACHED_METHODS:
        return None
    if plan.rule is None or not plan.rule.actions.bypass or plan.detail is not None:
        return replace(plan, bypass=False, detail=None, read_as=None)
    kept = tuple(replace(r) for r in rules.rules if not r.actions.bypass)  # (RuleSet sets their plans)
    # (a bypass still, when they bypass it otherwise: ``hidden_why`` says so)
    return RuleSet(rules.defaults, kept, rules.base, rules.files).plan(head)


HIDDEN = ("stored under the key this URL has without the bypass ({rule}): not served while the "
          "bypass holds, served again once it goes")
HIDDEN_STILL = ("stored under the key this URL has without the bypass ({rule}): not served while "
                "the bypass holds, nor once it goes: the request is bypassed without it too ({detail})")


def hidden_why(hidden: RequestPlan) -> str:
    """What ``unbypassed``'s plan means for what is stored under its key: served again once the
    bypass goes, or not even then, when that plan bypasses too (a reading origins differ on, a
    lower-cased path decided otherwise): "served again" sent an operator to remove a bypass
    that changed nothing."""
    if hidden.bypass:
        return HIDDEN_STILL.format(rule=_rule_label(hidden.rule), detail=hidden.bypass_detail)
    return HIDDEN.format(rule=_rule_label(hidden.rule))


def explain(rules: RuleSet, req: ExplainRequest, now: float, *, show_all: bool = True) -> list[str]:
    """The explanation, one line per string."""
    head = request_head(req)
    plan = rules.plan(head)
    route = route_of(head, plan, request_body(req))
    looked_up = isinstance(route, LookUp)
    lines = [f"request             {head.method} {head.url}"]
    extra = [f"{k}: {v}" for k, v in head.headers.items() if k.lower() != "host"]
    if extra:
        lines.append(f"request headers     {'; '.join(extra)}")
    lines.append(f"rule files          {', '.join(rules.files) or 'none'} ({len(rules.rules)} rule(s))")
    lines.append("")
    lines.append(f"request-time rule   {_rule_label(plan.rule)}")
    if plan.lowered_by is not None:
        lines.append(f"  lower-cased path    {LOWERED.format(rule=_rule_label(plan.lowered_by))}: "
                     f"{ruled_head(head, plan).target}")
    if head.method not in CACHED_METHODS:
        lines.append(f"  decision            passed to the origin: {head.method} is never looked up "
                     "or stored (X-Cache-Status: BYPASS)")
    elif not plan.bypass and not looked_up:
        lines.append(f"  decision            BYPASS: {BODY_WHY} (Cache-Status detail {REQUEST_BODY})")
    elif plan.bypass:
        lines.append(f"  decision            BYPASS: neither looked up nor stored "
                     f"(Cache-Status detail {plan.bypass_detail})")
        if plan.detail is not None:
            lines.append(f"  why                 {_bypass_why(plan)}")
        if plan.lowered_by is not None and plan.lowered_by is plan.rule:
            lines.append(f"  note                {_lowered_differ(rules, head)}")
        hidden = unbypassed(rules, head, plan)
        if hidden is not None:
            lines.append(f"  hidden key          {_key_text(cache_key(head, hidden.key))}: what is "
                         + hidden_why(hidden) + " (GET /explain lists it)")
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
    if looked_up:
        for status in req.statuses:
            lines.append("")
            lines.extend(_store_lines(head, plan, status, req.response_headers, now))
    else:
        # Not stored, but edited all the same: by the first rule whose request and response
        # conditions hold, which may be an earlier status rule than the one that bypassed.
        ctype = CIMultiDict(req.response_headers).get("Content-Type")
        for status in req.statuses:
            edits = plan.response_headers_for(status, ctype)
            if edits:
                which = f" (response {status})" if len(req.statuses) > 1 else ""
                cs = (cache_status(fwd=route.fwd, fwd_status=status, detail=route.detail)
                      if isinstance(route, PassThrough) else cache_status())
                text = _edits_text(edits, reply_fields(req.response_headers, cs))
                lines.append(f"  response headers    {text}{which}")
    if show_all:
        lines.append("")
        lines.append("rules in order (first match wins):")
        for rule, why, role in _rule_roles(rules, ruled_head(head, plan)):
            if why is None:
                lines.append(f"  + {rule.name} ({rule.where}): request conditions hold -> {role}")
            else:
                lines.append(f"  - {rule.name} ({rule.where}): {why}")
        if not rules.rules:
            lines.append("  (no rules: RFC 9111 behaviour, nothing added)")
    return lines


def _rule_roles(rules: RuleSet, head: RequestHead) -> list[tuple[Rule, str | None, str]]:
    """Every rule, the first request condition that fails (None: they hold), and for a rule
    whose request conditions hold, its part: the winner, one decided by the response, or one
    an earlier rule shadows (first match wins). A HEAD is cached as a GET of it: a HEAD-only
    rule that does not bypass only edits the HEAD's reply, and the rules after it decide."""
    out = []
    decided = False  # the plan is decided: a rule won (a GET's, or a HEAD-only bypass)
    head_edit = False  # a HEAD-only rule met first edits the HEAD's reply (``RuleSet._head``)
    for rule, why in rules.trace(head):
        role = ""
        if why is None:
            if decided:
                role = "not reached: an earlier rule won"
            elif rule.head_only and head_edit:
                role = "not reached: an earlier HEAD-only rule edits the HEAD's reply"
            elif rule.head_only and not rule.match.needs_response and not rule.actions.bypass:
                role, head_edit = "edits the HEAD's reply only (a HEAD is cached as a GET of it)", True
            elif rule.match.needs_response:
                role = "applies when its status/content_type holds"
            else:
                role, decided = "wins", True
        out.append((rule, why, role))
    return out


# -- the JSON trace behind GET /explain --------------------------------------------------------


# For how many seconds more the running proxy holds back a refresh of the key's stale response
# with these tags after one failed (None: it would start one): ``MissPath.refresh_held_back``.
RefreshHeld = Callable[[str, Collection[str]], float | None]
# Whether a background refresh of the key's soft-purged response failed since the purge, given
# the tags of the responses stored under it: ``MissPath.soft_refresh_failed``.
SoftFailed = Callable[[str, Iterable[Collection[str]]], bool]


@dataclass(frozen=True)
class StoredVariant:
    """A variant the store holds under the request's key, and where (from ``proxy.inspection``)."""

    response: StoredResponse
    tiers: tuple[str, ...]  # "memory", "disk"
    tags: tuple[str, ...] = ()
    size: int = 0
    hits: int = 0


@dataclass(frozen=True, slots=True)
class RangeFill:
    """What the engine's range fetch decision (``decide_range_fetch``) takes from the running
    proxy besides the request: ``whole``, ``cache.range_fill: whole``; ``passing``, the key
    is hit-for-pass. A fill in flight is not looked at: explain says what a range does with
    none (one in flight is joined by a range near its start)."""

    whole: bool = True  # (the setting's default)
    passing: bool = False


def _rule_json(rule: Rule | None) -> dict[str, str] | None:
    return None if rule is None else {"name": rule.name, "where": rule.where}


def _directives(cc: CacheControl) -> str:
    return ", ".join(k if v is None else f"{k}={v}" for k, v in cc.directives.items())


def ttl_owner(sp: StorePlan) -> str:
    """Whose ``ttl`` the store plan's lifetime is: its rule's, when the rule sets one (it then
    replaces the defaults' whole table: ``RuleSet._store_plan``), else the defaults'. Naming the
    matched rule for a ttl it does not set sent the reader to a rule without one."""
    rule = sp.rule
    if rule is not None and rule.actions.ttl is not None:
        return f"rule {rule.name!r} ({rule.where})"
    return "the rules' defaults"


def freshness_decided_by(f: Freshness, cc: CacheControl, cc_field: str, ttl_from: str) -> str:
    """The directive (or rule, or heuristic) that gives a response its lifetime, in words;
    ``ttl_from``: whose ttl a rule ttl is (``ttl_owner``)."""
    if f.source in ("s-maxage", "max-age"):
        return f"{f.source}={cc.delta(f.source)} in {cc_field}"
    if f.source == "expires":
        return "Expires minus Date"
    if f.source == "rule":
        return f"a ttl from {ttl_from}"
    if f.source == "heuristic":
        return "heuristic: 10% of the time since Last-Modified (RFC 9111 §4.2.2)"
    return "no freshness information: every use is revalidated"


def stored_decided_by(f: Freshness, cc: CacheControl, cc_field: str, now: dict[str, Any]) -> str:
    """What gave a stored response its lifetime, in words. The entry keeps only the kind of
    source (``Freshness.source``), not the rule: a rule's ttl is said as the rules' at store time
    (its fill, or the last 304 that refreshed it) beside what the rules give now (``now``: the
    ``_storability`` of the stored response under the current rules). Naming the rule that
    matches now called a 1h entry stored under one rule "a ttl from rule 'short'" (5s) after a
    reload, or named a no_store rule with no ttl at all."""
    if f.source != "rule":  # the stored response's own fields (or the heuristic, or none) decided
        return freshness_decided_by(f, cc, cc_field, "the rules")
    then = f"a ttl from the rules at store time ({_seconds(f.lifetime)} s)"
    if not now["stored"]:
        return f"{then}; the rules now do not store it ({now['detail']})"
    if now["freshness_source"] != "rule":
        return f"{then}; the rules now give no ttl for it ({now['freshness_decided_by']} decides)"
    jitter = now["ttl_jitter"]
    # ttl_jitter: the entry does not keep its draw, so a lifetime under the rules' ttl may be the
    # jitter or a reload; said as both are (57.6 s beside "the rules now give 100 s" read as a
    # reload that never was).
    less = f", less up to {jitter:.0%} by ttl_jitter" if jitter else ""
    return f"{then}; the rules now give {_seconds(now['lifetime'])} s{less} ({now['freshness_decided_by']})"


def _seconds(value: float) -> str:
    """Seconds to 0.1 s, never in exponent form (``:g`` wrote a 30-day ttl ``2.592e+06``)."""
    return f"{value:.1f}".removesuffix(".0")


def _storability(head: RequestHead, plan: RequestPlan, status: int,
                 headers: CIMultiDictProxy[str], now: float, room: int | None = None) -> dict[str, Any]:
    """Whether a response with these headers is stored under the current rules (and the running
    store's ``room``: ``fill_decision``), and what decided."""
    sp, decision = fill_decision(head, plan, status, headers, now, room)
    cc, cc_field = response_cache_control(headers, sp.options)
    out: dict[str, Any] = {"store_rule": _rule_json(sp.rule), "directives_from": cc_field,
                           "directives": _directives(cc)}
    match decision:
        case NoFill(detail=detail, expired_by=expired_by):
            why = f"rule {sp.no_store_rule!r} says no_store" if sp.no_store_rule is not None \
                else why_not(detail, cc_field, headers, expired_by, status)
            if detail in NO_LIFETIME and authorization_origin_only(head, status, cc, sp):
                why += "; " + AUTHORIZATION_ORIGIN_ONLY
            if detail == "TOO-LARGE":
                # The figure in force (the rules' max_object, or the running store's room now).
                limit = sp.options.max_object if room is None else min(room, sp.options.max_object)
                why += f"; bodies over {limit} bytes are not stored now"
            out.update(stored=False, detail=detail, why=why)
            return out
        case Fill():
            f = decision.response.freshness
        case _:
            assert_never(decision)
    stale = may_be_served_stale(status, f)
    reasons = []
    if "authorization" in head.headers:
        allowed = [d for d in ("public", "s-maxage", "must-revalidate") if d in cc]
        reasons.append(f"the request has Authorization; {', '.join(allowed)} in {cc_field} allows storing it")
        if authorization_origin_only(head, status, cc, sp):
            reasons.append(AUTHORIZATION_ORIGIN_ONLY)
    if "set-cookie" in headers:
        reasons.append("it sets a cookie; allow_set_cookie stores it without the Set-Cookie")
    if f.source == "none" and heuristic_withheld(status, headers, cc, head.headers, now, sp.options):
        reasons.append(NO_HEURISTIC)
    out.update(stored=True, detail=None, lifetime=f.lifetime, ttl_jitter=sp.ttl_jitter,
               freshness_source=f.source,
               freshness_decided_by=freshness_decided_by(f, cc, cc_field, ttl_owner(sp)),
               # the windows the engine applies: none when the origin forbids serving it stale,
               # nor for a stored error
               may_serve_stale=stale,
               stale_while_revalidate=f.stale_while_revalidate if stale else 0.0,
               stale_if_error=f.stale_if_error if stale else 0.0,
               tags=list(sp.tags), why="; ".join(reasons) or "storable: " + (
                   f"fresh for {fmt_duration(f.lifetime)}" if f.lifetime > 0 else "to be revalidated"))
    return out


def _variant_json(head: RequestHead, plan: RequestPlan, v: StoredVariant, index: int, selected: int | None,
                  now: float, hidden: bool = False) -> dict[str, Any]:
    """A stored variant for the trace; ``hidden``: the request is bypassed, and the variant is
    one stored under the key it has without the bypass (``unbypassed``), which no client gets."""
    r = v.response
    f = r.freshness
    headers = CIMultiDictProxy(CIMultiDict(r.headers))
    sp = plan.for_response(r.status, headers.get("Content-Type"))
    cc, cc_field = response_cache_control(headers, sp.options)
    ttl = r.ttl(now)
    # The windows that apply: none when the origin forbids serving it stale (as ``_storability``);
    # 3600 beside may_serve_stale: false read as a stale-if-error hour that never comes.
    stale = may_be_served_stale(r.status, f)
    again = _storability(head, plan, r.status, headers, now)
    return {
        "index": index,
        "selected": index == selected,
        "hidden_by_bypass": hidden,
        **({"decision": "forward"} if hidden else {}),
        "vary": shown_vary(r.vary),
        "vary_matches": vary_matches(r.vary, head.headers),
        "status": r.status,
        "tiers": list(v.tiers),
        "tags": list(v.tags),
        "size": v.size,
        "hits": v.hits,
        "age": round(f.age(now), 3),
        "ttl": round(ttl, 3),
        "fresh": ttl > 0 and not r.invalidated and not f.no_cache,
        "soft_purged": r.invalidated,
        "validators": {"etag": r.etag, "last_modified": r.last_modified},
        "freshness": {
            "source": f.source, "lifetime": f.lifetime,
            "decided_by": stored_decided_by(f, cc, cc_field, again),
            "stale_while_revalidate": f.stale_while_revalidate if stale else 0.0,
            "stale_if_error": f.stale_if_error if stale else 0.0,
            "must_revalidate": f.must_revalidate, "no_cache": f.no_cache, "immutable": f.immutable,
            "may_serve_stale": stale,
        },
        "storability": again,
    }


def _vary_mismatch(head: RequestHead, variants: Sequence[StoredVariant]) -> str:
    parts = []
    for v in variants[:3]:
        for name, value in v.response.vary:
            mine = variant_of((name,), head.headers)[0][1]
            if mine != value:
                parts.append(f"{name}: stored {_absent_or(value)}, request {_absent_or(mine)}")
                break
    return "; ".join(parts)


def _absent_or(value: str) -> str:
    return "none" if value == ABSENT else repr(value)


def _content_range(headers: Sequence[tuple[str, str]]) -> str:
    return next((v for k, v in headers if k == "Content-Range"), "a range")


def _ttl_if_not_modified(head: RequestHead, plan: RequestPlan, stored: StoredResponse, now: float
                         ) -> float | None:
    """The ``ttl`` of the proxy's REVALIDATED answer when the origin's 304 (dated now) changes
    no freshness field: ``stored`` freshened by it as the engine freshens (``freshened``).
    None when it would no longer be kept."""
    sp = plan.for_response(stored.status, stored.header_dict().get("Content-Type"))
    update = CIMultiDictProxy(CIMultiDict({"Date": format_http_date(now)}))
    updated = freshened(stored, Exchange(head, 304, "", update, now, now), sp, FillSettings())
    return None if updated is None else updated.ttl(now)


def _reply(head: RequestHead, stored: StoredVariant, x_cache: str, cs: str, age: float, not_modified: bool
           ) -> tuple[int, str] | None:
    """The status of the reply the engine sends from ``stored`` (``Engine.serve``: the same
    ``reply_head`` decides a 412, a 304, a 206 or a 416 for this request), and why in words;
    None when it cannot answer the request."""
    v = stored.response
    answer = reply_head(head, v, stored.size, served_headers(v.headers, str(int(age)), cs, x_cache),
                        not_modified)
    match answer:
        case None:
            return None
        case PreconditionFailed():
            return 412, "; the client's If-Match or If-Unmodified-Since is false for it: 412"
        case NotModified():
            return 304, "; the client's conditional matches: 304"
        case Unsatisfiable():
            return 416, f"; the Range lies outside its {stored.size} bytes: 416"
        case Send():
            if answer.status == 206:
                return 206, f"; {_content_range(answer.headers)} of it: 206"
            return answer.status, ""
        case _:
            assert_never(answer)


def _range_decision(head: RequestHead, plan: RequestPlan, spec: RangeSpec, parts: Sequence[StoredVariant],
                    now: float, range_fill: RangeFill) -> tuple[dict[str, Any] | None, str, str]:
    """A single range no complete stored response answers, decided as the engine decides it
    (``Engine._range_miss``): against the stored parts (``decide_part_lookup``), then how it
    goes to the origin (``decide_range_fetch``, with no fill in flight). A serve decision
    from a part, or None, what the forward does about the range in words, and what the
    origin is asked (``range_fetch``: "whole", "range", or "range, then whole")."""
    lookup = decide_part_lookup(head, spec, [p.response for p in parts], now, plan.options)
    if isinstance(lookup, FromPart):
        found = lookup.serve
        cs = cache_status(hit=True, ttl=found.ttl)
        reply = _reply(head, parts[found.index], "HIT", cs, found.age, found.not_modified)
        if reply is not None:
            return {"action": "serve", "part": found.index, "x_cache_status": "HIT", "status": reply[0],
                    "cache_status": cs,
                    "why": f"no complete response is stored, and a stored part holds the range and is "
                           f"fresh for {fmt_duration(max(found.ttl, 0))} more" + reply[1]}, "", ""
        lookup = lookup.otherwise
    match lookup:
        case FetchWhole(reason="if-range"):
            return None, ("; the client's If-Range does not hold for the stored part that has the range "
                          "(or came on several lines): the whole response is fetched"), "whole"
        case FetchWhole():
            return None, ("; a conditional range: the whole response is fetched, stored, and answers it"), \
                "whole"
        case FetchPart(held=held):
            how = decide_range_fetch(spec, fill_whole=range_fill.whole, fill_received=None,
                                     passing=range_fill.passing,
                                     authorization="Authorization" in head.headers)
            match how:
                case JoinFill():
                    return None, ("; the range asks for the whole representation (bytes=0-): the whole "
                                  "response is fetched (the key's fill, which later ranges join), stored, "
                                  "and the range cut from it as it arrives"), "whole"
                case FetchRange(lead=lead):
                    why = ("; the range alone is asked of the origin, its 206 stored as a part"
                           + (" (combined with the part held when their strong validators agree)"
                              if held is not None else "")
                           + ("; the client's If-Range goes with it: the origin's whole 200 answers when "
                              "it does not hold" if "If-Range" in head.headers else ""))
                    if lead:
                        return None, why + (
                            "; range_fill: whole: when that 206 may be stored, and the object is no "
                            "larger than the store keeps (cache.max_object), the whole response is "
                            "fetched after it, so the next ranges are hits"), "range, then whole"
                    if range_fill.passing:
                        why += "; the key is hit-for-pass: no whole fetch follows"
                    elif range_fill.whole:
                        why += ("; no whole fetch follows: the request carries Authorization, which no "
                                "fetch the client did not ask for may carry")
                    return None, why, "range"
                case _:
                    assert_never(how)
        case _:
            assert_never(lookup)


def _now_decision(rules: RuleSet, head: RequestHead, plan: RequestPlan, key: str | None,
                  variants: Sequence[StoredVariant], now: float,
                  parts: Sequence[StoredVariant] = (), body: bool = False,
                  refresh_held: RefreshHeld | None = None, range_fill: RangeFill = RangeFill(),
                  soft_failed: SoftFailed | None = None) -> dict[str, Any]:
    """What the proxy would do with this request now, as the engine decides it (no origin contact)."""
    route = route_of(head, plan, body)
    if isinstance(route, PassThrough) and route.detail == REQUEST_BODY and not plan.bypass:
        return {"action": "forward", "fwd": route.fwd, "x_cache_status": "BYPASS",
                "cache_status": cache_status(fwd=route.fwd, detail=route.detail), "why": BODY_WHY}
    if head.method not in CACHED_METHODS:
        return {"action": "forward", "fwd": "method", "x_cache_status": "BYPASS",
                "cache_status": cache_status(fwd="method"),
                "why": f"{head.method} is never looked up or stored; a 2xx/3xx answer to it "
                       "invalidates this URL (RFC 9111 §4.4)"}
    if plan.bypass and plan.detail is not None:
        return {"action": "forward", "fwd": "bypass", "x_cache_status": "BYPASS",
                "cache_status": cache_status(fwd="bypass", detail=plan.bypass_detail),
                "why": _bypass_why(plan)}
    if plan.bypass:
        assert plan.rule is not None
        return {"action": "forward", "fwd": "bypass", "x_cache_status": "BYPASS",
                "cache_status": cache_status(fwd="bypass", detail=plan.bypass_detail),
                "why": (_lowered_differ(rules, head)
                        if plan.lowered_by is not None and plan.lowered_by is plan.rule else
                        f"rule {plan.rule.name!r} ({plan.rule.where}) says bypass: neither looked up "
                        "nor stored")}
    failed = soft_failed is not None and key is not None and soft_failed(key, (v.tags for v in variants))
    decision = decide_lookup(head, [v.response for v in variants], now, plan.options, failed)
    out: dict[str, Any]
    match decision:
        case Serve():
            stored = variants[decision.index]
            v = stored.response
            out = {"action": "serve", "variant": decision.index, "x_cache_status": decision.status}
            detail = serve_detail(decision.status, v)  # the engine's own
            held = None
            if decision.refresh and refresh_held is not None and key is not None:
                held = refresh_held(key, stored.tags)
            if held is not None:
                # (The engine's own wait after a failed refresh: ``MissPath.refresh_held_back``.)
                out["refresh_held_back"] = round(held, 3)
                # (a soft-purged response's ttl is at most 0: "stale by 0s" said nothing)
                stale_by = "soft-purged" if v.invalidated else f"stale by {fmt_duration(-decision.ttl)}"
                why = (f"{stale_by}: served at once; no background request "
                       f"revalidates it for {fmt_duration(held)} more (the last refresh failed)")
            elif detail is None:
                why = f"a stored variant is fresh for {fmt_duration(max(decision.ttl, 0))} more"
            elif detail == "SOFT-PURGED":
                why = "soft-purged: " + ("served at once while one background request revalidates it"
                                         if decision.refresh else "served within the client's max-stale")
            elif detail == "MAX-STALE":
                why = f"stale by {fmt_duration(-decision.ttl)}, within the client's max-stale"
            else:
                why = (f"stale by {fmt_duration(-decision.ttl)}, within stale-while-revalidate "
                       f"({fmt_duration(v.freshness.stale_while_revalidate)}): served at once while one "
                       "background request revalidates it")
            cs = cache_status(hit=True, ttl=decision.ttl, detail=detail)
            reply = _reply(head, stored, decision.status, cs, decision.age, decision.not_modified)
            if reply is None:  # a stored response that cannot answer this request: fetched
                return {"action": "forward", "fwd": "uri-miss", "x_cache_status": "MISS",
                        "cache_status": cache_status(fwd="uri-miss"),
                        "why": "the stored response cannot answer this request: the origin is asked"}
            out["status"], more = reply
            out["cache_status"] = cs
            out["why"] = why + more
            return out
        case Revalidate():
            v = variants[decision.index].response
            validators = ", ".join(n for n, x in (("If-None-Match", v.etag),
                                                  ("If-Modified-Since", v.last_modified)) if x)
            if decision.fwd == "request":
                why = "the client asked for a fresh response (Cache-Control no-cache/max-age/min-fresh)"
            elif v.invalidated and failed and may_be_served_stale(v.status, v.freshness):
                why = ("soft-purged, and its background refresh failed: served stale only within its "
                       "stale windows now, as any stale response"
                       + ("" if decision.stale_if_error else " (none applies)"))
            elif v.invalidated:
                why = "soft-purged and not allowed to be served stale"
            else:
                why = f"stale by {fmt_duration(-v.freshness.ttl(now))}" if v.freshness.ttl(now) <= 0 \
                    else "the stored response requires revalidation (no-cache)"
            why += f": a conditional request ({validators or 'no validator'}); a 304 refreshes it"
            if decision.stale_if_error:
                why += "; if the origin fails, the stored response is served (stale-if-error)"
            elif decision.stale_prohibited:
                why += "; if the origin is unreachable: 504 (must-revalidate, no-cache or s-maxage)"
            return {"action": "revalidate", "variant": decision.index, "fwd": decision.fwd,
                    "x_cache_status": "REVALIDATED",
                    "x_cache_status_if_changed": forwarded_x_cache(decision.fwd),
                    "cache_status": cache_status(fwd=decision.fwd, fwd_status=304,
                                                 ttl=_ttl_if_not_modified(head, plan, v, now)),
                    "why": why}
        case Forward():
            if decision.fwd == "uri-miss":
                why = "nothing is stored under this key: the origin is asked"
            elif decision.fwd == "vary-miss":
                why = (f"{len(variants)} variant(s) stored, none matches the request's Vary fields ("
                       f"{_vary_mismatch(head, variants)})")
            else:
                why = _full_fetch_why(head, variants, decision)
            if decision.stale_index is not None:
                why += "; if the origin fails, the stored response is served (stale-if-error)"
            spec = request_range(head.headers) if head.method == "GET" else None
            if spec is not None and decision.fwd in ("uri-miss", "vary-miss"):
                from_part, more, fetch = _range_decision(head, plan, spec, parts, now, range_fill)
                if from_part is not None:
                    return from_part
                why += more
                return {"action": "forward", "fwd": decision.fwd, "range_fetch": fetch,
                        "x_cache_status": forwarded_x_cache(decision.fwd),
                        "cache_status": cache_status(fwd=decision.fwd), "why": why}
            return {"action": "forward", "fwd": decision.fwd,
                    "x_cache_status": forwarded_x_cache(decision.fwd),
                    "cache_status": cache_status(fwd=decision.fwd), "why": why}
        case OnlyIfCachedMiss(unmatched=unmatched):
            spec = request_range(head.headers) if unmatched and head.method == "GET" else None
            if spec is not None:  # a stored part may hold the range (``Engine.handle``)
                from_part, _, _ = _range_decision(head, plan, spec, parts, now, range_fill)
                if from_part is not None:
                    return from_part
            return {"action": "reject", "status": 504, "x_cache_status": "MISS",
                    "cache_status": cache_status(detail=decision.detail),
                    "why": "the client sent only-if-cached and " + (
                        "nothing stored matches" if unmatched else
                        "the stored response may not be served without the origin")}
        case _:
            assert_never(decision)


def _full_fetch_why(head: RequestHead, variants: Sequence[StoredVariant], decision: Forward) -> str:
    """Why a stored response that matches the request is fetched in full, not revalidated
    (``Forward.full_fetch``, the policy's own reason)."""
    if decision.fwd == "request":
        asked = "the client asked for a fresh response (Cache-Control no-cache/max-age/min-fresh)"
    else:
        asked = "the stored response is stale"
    if decision.full_fetch == CLIENT_NO_CACHE:
        return ("the client sent no-cache (Cache-Control, or Pragma without it), and client_cache_control "
                "is honor (the default): a full fetch, whatever validators are stored "
                "(client_cache_control: revalidate sends them: a 304 keeps the stored response)")
    if decision.full_fetch == NO_VALIDATOR:
        return f"{asked} and it has no validator (ETag, Last-Modified): a full fetch"
    index = select_variant(head, [v.response for v in variants])
    assert index is not None  # (a stale or refused variant matched: not a miss)
    named = spelled_otherwise([n for n, _ in variants[index].response.vary], head.headers)
    return (f"{asked}; the request also sends {named} under another spelling, which the origin may "
            "read as another value: its 304 would not vouch for the stored variant, so a full fetch "
            f"(its answer is not stored: AMBIGUOUS-HEADER:{named})")


def _part_json(v: StoredVariant, index: int, now: float) -> dict[str, Any]:
    """A stored part for the trace: the range it holds (first, last, total), how fresh it is."""
    r = v.response
    held = part_range(r)
    ttl = r.ttl(now)
    return {"index": index, "range": None if held is None else [held.first, held.last, held.total],
            "vary": shown_vary(r.vary), "tiers": list(v.tiers), "size": v.size,
            "age": round(r.freshness.age(now), 3), "ttl": round(ttl, 3),
            "fresh": ttl > 0 and not r.invalidated and not r.freshness.no_cache,
            "etag": r.etag}


def explain_trace(rules: RuleSet, head: RequestHead, variants: Sequence[StoredVariant], now: float,
                  responses: Sequence[tuple[int, Sequence[tuple[str, str]]]] = (),
                  parts: Sequence[StoredVariant] = (), body: bool = False,
                  refresh_held: RefreshHeld | None = None, room: int | None = None,
                  range_fill: RangeFill = RangeFill(), soft_failed: SoftFailed | None = None
                  ) -> dict[str, Any]:
    """The whole decision trace for one request, as JSON-ready data (``GET /explain``).

    ``variants`` are what the store holds under the request's key, in every tier, and
    ``parts`` the parts (206 responses) it holds beside them (``part_key``);
    ``responses`` are hypothetical origin answers (status, headers) to decide storing for.
    ``body``: the request carries a body (``request_body``). ``refresh_held``: the running
    proxy's answer to whether a stale response's refresh waits after one failed (how long more;
    ``MissPath.refresh_held_back``), and ``soft_failed`` whether a soft-purged one's refresh
    failed since the purge (``MissPath.soft_refresh_failed``). ``room``: the biggest body the
    running store keeps now (``fill_decision``). ``range_fill``: what a range miss's fetch
    depends on (``RangeFill``).
    Pure: nothing here touches the origin or the store.
    """
    plan = rules.plan(head)
    looked_up = isinstance(route_of(head, plan, body), LookUp)
    key = cache_key(head, plan.key) if looked_up else None
    # A bypassed request: ``variants`` are those stored under the key it has without the bypass,
    # judged under that plan, and hidden from clients (``unbypassed``).
    hidden = unbypassed(rules, head, plan)
    shown = plan if hidden is None else hidden
    selected = select_variant(head, [v.response for v in variants]) if variants else None
    rule_trace = []
    for rule, why, role in _rule_roles(rules, ruled_head(head, plan)):
        if why is None:
            rule_trace.append({"name": rule.name, "where": rule.where, "holds": True, "role": role})
        else:
            rule_trace.append({"name": rule.name, "where": rule.where, "holds": False, "why": why})
    out: dict[str, Any] = {
        "request": {"method": head.method, "url": head.url, "body": body,
                    "headers": [[k, v] for k, v in head.headers.items()]},
        "rule": _rule_json(plan.rule),
        "response_rules": [_rule_json(r) for r in plan.response_rules],
        "lowered_by": _rule_json(plan.lowered_by),
        "read_as": plan.read_as,
        "bypass": plan.bypass,
        "cache_key": key,
        "key_changes": _key_changes(plan.key),
        "client_cache_control": plan.options.client_cache_control,
        "hidden_key": None if hidden is None else cache_key(head, hidden.key),
        "stored": [_variant_json(head, shown, v, i, selected, now, hidden is not None)
                   for i, v in enumerate(variants)],
        "stored_parts": [_part_json(v, i, now) for i, v in enumerate(parts)],
        "decision": _now_decision(rules, head, plan, key, variants, now, parts, body, refresh_held,
                                  range_fill, soft_failed),
        "rules": rule_trace,
    }
    if hidden is not None and (variants or parts):
        out["decision"]["why"] += (f"; {len(variants)} variant(s) and {len(parts)} part(s) are "
                                   + hidden_why(hidden))
    if responses and looked_up:
        out["if_fetched"] = [
            {"status": status, "headers": [list(h) for h in hdrs],
             **_storability(head, plan, status, CIMultiDictProxy(CIMultiDict(hdrs)), now, room)}
            for status, hdrs in responses
        ]
    return out
