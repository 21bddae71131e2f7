"""Compiling rule files: YAML to ``Rule``s and defaults, every mistake as ``FILE:LINE``.

Rules that can never do what they say (``bypass`` with a ``status`` condition,
which is only known after the lookup; cache actions on a POST-only rule; rules
after a catch-all) are rejected here, like every other mistake; choices that work
but are probably not meant (a ``ttl`` that stores error statuses) are warnings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType

from proxy.policy.keys import DEFAULT_KEY, KeySpec, bracket_problem, literal_in
from proxy.policy.messages import CacheOptions, ClientCacheControl
from proxy.policy.statuses import HEURISTICALLY_CACHEABLE, default_ttl_covers
from proxy.rules.match import Condition, Glob, HostPattern, Match, Regex, RegexRefused
from proxy.rules.plan import CACHED_METHODS, Actions, HeaderEdits, Rule, RuleSet, first, header_edits
from proxy.schema import Section, type_name
from proxy.units import parse_duration, shown, yaml_number
from proxy.yamlsrc import Problems, Sources, Src, load_yaml

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
# response_headers may not touch the message framing or the connection.
FRAMING_FIELDS = frozenset({
    "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "trailer",
    "te", "proxy-connection", "content-encoding", "content-range",
})  # fmt: skip
# ... nor set the fields cachegate writes on every reply it makes: a hit's Age (RFC 9111 §5.1)
# and its member of Cache-Status (RFC 9211), which an add replaced (the hit lost its Age, the
# Cache-Status its cachegate member), and Date, which a downstream cache takes the reply's age
# from (a fixed Date makes every reply look as old as it says). Removing them stays allowed.
OWN_FIELDS = frozenset({"age", "cache-status", "date"})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# RE2's words for what Python's re (a backtracking engine) has and it has not.
_RE2_HAS_NO = ("perl operator", "escape sequence", "repetition operator", "repetition size",
               "named capture group")


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
            # Every character, a decoded newline (%0A) too: ``/account/**`` must not miss
            # ``/account/orders%0A`` (the linear matcher never treated newlines apart).
            out.append("(?s:.*)")
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


_INLINE_I = re.compile(r"\(\?[a-zA-Z-]*i")


def regex_literal_capital(pattern: str) -> str | None:
    """The first capital letter a pattern must match as written, or None.

    Conservative, for the lowercase_path warning: a pattern with an ``i`` flag anywhere
    (``(?i)``, ``(?i:``, even ``(?-i)``) has none; escapes (``\\D``, ``\\pL``, ``\\x{..}``),
    classes (``[A-Z]``) and group names are skipped; ``\\Q...\\E`` text is literal.
    """
    if _INLINE_I.search(pattern):
        return None
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            if nxt == "Q":
                end = pattern.find("\\E", i + 2)
                quoted = pattern[i + 2:n if end < 0 else end]
                found = next((c for c in quoted if c != c.lower()), None)
                if found is not None:
                    return found
                i = n if end < 0 else end + 2
            elif nxt in "pPx" and pattern.startswith("{", i + 2):
                end = pattern.find("}", i + 2)
                i = n if end < 0 else end + 1
            else:
                i += {"p": 3, "P": 3, "x": 4}.get(nxt, 2)  # \pL names a class, \xHH a byte
            continue
        if ch == "[":
            i += 1
            if pattern.startswith("^", i):
                i += 1
            if pattern.startswith("]", i):
                i += 1
            while i < n and pattern[i] != "]":
                if pattern[i] == "\\":
                    i += 2
                elif pattern.startswith("[:", i) and pattern.find(":]", i + 2) >= 0:
                    i = pattern.find(":]", i + 2) + 2
                else:
                    i += 1
            i += 1
            continue
        if pattern.startswith("(?P<", i):
            end = pattern.find(">", i)
            i = n if end < 0 else end + 1
            continue
        if ch != ch.lower():
            return ch
        i += 1
    return None


def _compile_regex(text: str, at: Src, problems: Problems, what: str) -> Regex | None:
    if not text:
        problems.add(at, f"{what}: empty regex (it would match everything)")
        return None
    shown = text if len(text) <= 200 else text[:200] + "..."
    try:
        return Regex(text)
    except RegexRefused as exc:
        why = str(exc)
        if any(part in why for part in _RE2_HAS_NO):
            why += (": rules' regexes run on RE2, which matches in time linear in the text whatever a "
                    "client sends and so has no backreferences, lookaround, atomic groups or possessive "
                    "quantifiers (\\Z is \\z, and a count is at most 1000); use a glob, or a pattern "
                    "without them (docs/rules.md, \"Regexes\")")
        problems.add(at, f"{what}: bad regex {shown!r}: {why}")
        return None
    except Exception as exc:  # OverflowError, MemoryError, ...
        problems.add(at, f"{what}: bad regex {shown!r}: {exc}")
        return None


def _path_pattern(src: Src, problems: Problems,
                  where: str) -> tuple[Regex | Glob | None, bool, str]:
    if not isinstance(src.value, str) or not src.value:
        problems.add(src, f"{where}: expected a glob like /static/** or regex:..., "
                          f"got {type_name(src.value)}")
        return None, False, ""
    text = src.value
    if text.startswith("regex:"):
        return _compile_regex(text[6:].strip(), src, problems, where), True, text
    if not text.startswith("/"):
        problems.add(src, f"{where}: a path glob starts with '/', got {text!r} "
                          "(use regex:... for a regular expression)")
        return None, False, text
    if "?" in text[1:] and "=" in text:
        problems.add(src, f"{where}: {text!r} looks like it has a query; match it with query:")
    return Glob(text, glob_to_regex(text)), False, text


def _host_pattern(text: str, at: Src, problems: Problems, where: str) -> HostPattern | None:
    brackets = bracket_problem(text.strip().lower().rstrip("."))
    if brackets is not None:  # never held (a Host spelt so is answered 400)
        problems.add(at, f"{where}: {text!r}: {brackets}")
        return None
    host = literal_in(text.strip().lower().rstrip("."))
    with_port = bool(re.search(r":\d+$", host))
    bare = host.rsplit(":", 1)[0] if with_port else host
    if not bare or not re.fullmatch(r"(\*\.)?[a-z0-9_.\[\]:-]+", bare):
        problems.add(at, f"{where}: {text!r} is not a host name or *.domain")
        return None
    pattern = r"(?:[^.]+\.)+" + re.escape(host[2:]) if host.startswith("*.") else re.escape(host)
    return HostPattern(re.compile(pattern), with_port, text)


NEVER_MATCHES = "an empty list never matches; remove the condition instead"


def _str_items(src: Src, problems: Problems, what: str, empty: str = NEVER_MATCHES) -> list[tuple[str, Src]]:
    """A string or a list of strings, each with where it came from; an empty list is an error
    (``empty`` says why: a match condition never matches, a key's list means something else)."""
    if isinstance(src.value, str | int | float) and not isinstance(src.value, bool):
        return [(src.as_text(), src)]
    if not isinstance(src.value, list):
        problems.add(src, f"{what}: expected a string or a list of strings, got {type_name(src.value)}")
        return []
    if not src.value:
        problems.add(src, f"{what}: {empty}")
        return []
    out: list[tuple[str, Src]] = []
    for item in src.value:
        if isinstance(item.value, str | int | float) and not isinstance(item.value, bool):
            out.append((item.as_text(), item))
        else:
            problems.add(item, f"{what}: expected strings in the list, got {type_name(item.value)}")
    return out


def _conditions(src: Src, problems: Problems, match: str, what: str) -> tuple[Condition, ...]:
    if not isinstance(src.value, dict) or not src.value:
        problems.add(src, f"{match}.{what}: expected a mapping of name to condition "
                          f"(present, absent, a value, {{equals: ...}} or {{regex: ...}}), "
                          f"got {type_name(src.value) if src.value != {} else 'an empty mapping'}")
        return ()
    out: list[Condition] = []
    seen: dict[str, tuple[str, int]] = {}  # header names, lower-cased: as written and where
    for raw_name, cond in src.value.items():
        name = src.key_text(raw_name)
        where = f"{match}.{what}.{name}"
        if what != "query" and not _TOKEN.fullmatch(name):
            problems.add(cond, f"{match}.{what}: {name!r} is not a valid {what} name")
            continue
        if what == "header":
            line = src.key_lines.get(raw_name, cond.line)
            if _duplicate_name(name, (src.file, line), seen, problems, f"{match}.{what}"):
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
            out.append(Condition(name, "equals", value=cond.as_text()))
        else:
            problems.add(cond, f"{where}: expected present, absent, a value, "
                               f"{{equals: ...}} or {{regex: ...}}, got {type_name(v)}")
    return tuple(out)


def _compile_match(src: Src | None, problems: Problems, where: str) -> Match:
    if src is None:
        return Match()
    if not isinstance(src.value, dict):
        problems.add(src, f"{where}: expected a mapping, got {type_name(src.value)}")
        return Match()
    sec = Section(src, problems, where, MATCH_KEYS)
    raw = sec.values
    hosts = tuple(h for text, at in (_str_items(raw["host"], problems, f"{where}.host")
                                     if "host" in raw else [])
                  if (h := _host_pattern(text, at, problems, f"{where}.host")) is not None)
    path, path_is_regex, path_text = (_path_pattern(raw["path"], problems, f"{where}.path") if "path" in raw
                                      else (None, False, ""))
    methods: frozenset[str] | None = None
    if "method" in raw:
        names: set[str] = set()
        for m, at in _str_items(raw["method"], problems, f"{where}.method"):
            if _TOKEN.fullmatch(m):
                names.add(m.upper())
            else:
                problems.add(at, f"{where}.method: {m!r} is not an HTTP method")
        if "GET" in names:
            names.add("HEAD")  # a HEAD is answered from the stored GET: same rule, same key
        methods = frozenset(names)
    status: frozenset[int] | None = None
    if "status" in raw:
        codes: set[int] = set()
        items = raw["status"]
        if isinstance(items.value, list) and not items.value:
            problems.add(items, f"{where}.status: an empty list never matches")
        for item in (items.value if isinstance(items.value, list) else [items]):
            misread = _misread(item.value, item.raw)
            if misread:
                problems.add(item, f"{where}.status: {misread}")
            elif item.value == 206:  # proxy.policy.partial.representation_status
                problems.add(item, f"{where}.status: 206 never matches: a 206 is part of a 200, stored and "
                                   "edited by the rules of status 200; match 200")
            elif type(item.value) is int and 100 <= item.value <= 599:
                codes.add(item.value)
            else:
                problems.add(item, f"{where}.status: expected HTTP status codes (100-599), "
                                   f"got {shown(item.value)}")
        status = frozenset(codes)
    content_types: list[str] = []
    types = (_str_items(raw["content_type"], problems, f"{where}.content_type")
             if "content_type" in raw else [])
    for t, at in types:
        pattern = t.strip().lower()
        if ";" in pattern or any(c.isspace() for c in pattern):
            # match.py compares the media type alone: "text/plain; charset=utf-8" never matched
            problems.add(at, f"{where}.content_type: {t!r} never matches: a response's type is matched "
                             "on its media type alone, without parameters (write "
                             f"{pattern.split(';', 1)[0].strip() or 'text/plain'!r})")
        else:
            content_types.append(pattern)
    return Match(
        hosts=hosts,
        path=path,
        path_is_regex=path_is_regex,
        path_text=path_text,
        methods=methods,
        query=_conditions(raw["query"], problems, where, "query") if "query" in raw else (),
        headers=_conditions(raw["header"], problems, where, "header") if "header" in raw else (),
        cookies=_conditions(raw["cookie"], problems, where, "cookie") if "cookie" in raw else (),
        status=status,
        content_types=tuple(content_types),
    )


def _misread(value: object, written: str | None) -> str:
    """Why a status code YAML read from another form than it shows is refused (``0404`` is
    octal 260, ``4:04`` base 60), or ""."""
    try:
        yaml_number(value, written, str(value))
    except ValueError as exc:
        return str(exc)
    return ""


def _ttl_table(src: Src, problems: Problems, what: str) -> tuple[Mapping[int, float], float | None]:
    if not isinstance(src.value, dict):
        try:
            return MappingProxyType({}), parse_duration(src.value, src.raw)
        except ValueError as exc:
            why = "" if isinstance(src.value, list) else f" ({exc})"
            problems.add(src, f"{what}: expected a duration or a mapping of status to duration "
                              f"(e.g. {{200: 5m, 404: 1m, default: 1m}}), got {shown(src.value)}{why}")
            return MappingProxyType({}), None
    table: dict[int, float] = {}
    default: float | None = None
    for status, value in src.value.items():
        line = src.key_lines.get(status, value.line)
        misread = _misread(status, src.key_texts.get(status))
        if misread:
            problems.add((src.file, line), f"{what}: {misread}")
            continue
        if status == "default":
            pass
        elif not (isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599):
            problems.add((src.file, line), f"{what}: {shown(status)} is not a status code (100-599) or "
                                           "'default'")
            continue
        try:
            seconds = parse_duration(value.value, value.raw)
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


def _scalar(src: Src) -> bool:
    """A duration: a ttl a warning may show. Not a list or a mapping (an error already, whose
    value would show as the reader's records), nor a value refused (``.inf``: its error said so,
    and a warning about what it would store spoke of it as kept)."""
    if isinstance(src.value, list | dict):
        return False
    try:
        parse_duration(src.value, src.raw)
    except ValueError:
        return False
    return True


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
                if 400 <= status <= 599 and not default_ttl_covers(status) and _scalar(value):
                    problems.warn((src.file, src.key_lines.get(status, value.line)),
                                  f"{label}: ttl {status}: {value.value} stores the origin's {status} for "
                                  "every client: one request the origin rejects or fails on (an oversized "
                                  "or malformed header) then denies the page to everyone for that long "
                                  f"({CPDOS}); name an error status only where that is meant")
        if "default" not in src.value or not _scalar(src.value["default"]):
            return
        at: Src | tuple[str, int] = (src.file, src.key_lines.get("default", src.line))
        what = f"ttl default: {src.value['default'].value}"
    elif not _scalar(src):
        return
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


def _names(src: Src | None, problems: Problems, what: str, *, fold: bool = False) -> tuple[str, ...]:
    """Names (``fold``: header names, case-insensitive); one listed twice is refused at its
    line, as a repeated ``header:`` condition is (``[Accept, accept]`` keyed on one field)."""
    if src is None or src.value is None:
        return ()
    out: list[str] = []
    seen: dict[str, str] = {}
    for name, at in _str_items(src, problems, what):
        same = name.lower() if fold else name
        if not _TOKEN.fullmatch(name):
            problems.add(at, f"{what}: {name!r} is not a valid name")
        elif same in seen:
            also = "" if seen[same] == name else f" (as {seen[same]!r}: header names are case-insensitive)"
            problems.add(at, f"{what}: {name!r} is listed twice{also}; list it once")
        else:
            seen[same] = name
            out.append(name)
    return tuple(out)


def _key_spec(src: Src, problems: Problems, where: str) -> KeySpec | None:
    if not isinstance(src.value, dict):
        problems.add(src, f"{where}: expected a mapping (query:, headers:, cookies:, lowercase_path:), "
                          f"got {type_name(src.value)}")
        return None
    sec = Section(src, problems, where, ("query", "headers", "cookies", "lowercase_path"))
    spec = KeySpec(
        headers=tuple(h.lower() for h in _names(sec.raw("headers"), problems, f"{where}.headers", fold=True)),
        cookies=_names(sec.raw("cookies"), problems, f"{where}.cookies"),
        lowercase_path=sec.bool("lowercase_path", False),
    )
    q = sec.raw("query")
    if q is not None:
        if q.value in ("ignore", "ignore-all") or q.value is False:
            spec = replace(spec, query_ignore=True)
        elif q.value == "sort":
            spec = replace(spec, query_sort=True)
        elif isinstance(q.value, dict):
            qs = Section(q, problems, f"{where}.query", ("include", "exclude", "sort", "ignore"))
            include = (tuple(n for n, _ in _str_items(
                qs.values["include"], problems, f"{where}.query.include",
                "an empty list keeps no parameter: to drop the whole query from the key, write "
                "query: ignore; else list the parameters to keep")) if qs.has("include") else None)
            exclude = (tuple(n for n, _ in _str_items(
                qs.values["exclude"], problems, f"{where}.query.exclude",
                "an empty list drops no parameter; list the parameters to drop, or remove exclude:"))
                if qs.has("exclude") else ())
            ignore = qs.bool("ignore", False)
            if ignore and (include is not None or exclude):
                problems.add(q, f"{where}.query: ignore: true drops the whole query; include/exclude "
                                "would never apply")
            if include is not None and exclude:
                problems.add(q, f"{where}.query: give include: or exclude:, not both "
                                "(include already drops every other parameter)")
            spec = replace(spec, query_include=include, query_exclude=exclude,
                           query_sort=qs.bool("sort", False), query_ignore=ignore)
        else:
            problems.add(q, f"{where}.query: expected ignore, sort or a mapping "
                            "{include: [...] | exclude: [...], sort: true}")
    return spec


def _duplicate_name(name: str, at: tuple[str, int], seen: dict[str, tuple[str, int]],
                    problems: Problems, where: str) -> bool:
    """Whether ``name`` repeats a header name of the same mapping in another case (reported at
    its line, as a duplicate YAML key is): ``{X-A: present, x-a: absent}`` never held, and two
    ``add``s of one field left one of them unsaid."""
    first_seen = seen.setdefault(name.lower(), (name, at[1]))
    if first_seen[1] == at[1] and first_seen[0] == name:
        return False
    problems.add(at, f"{where}: duplicate header name {name!r}: header names are case-insensitive, "
                     f"and {first_seen[0]!r} (line {first_seen[1]}) names the same field")
    return True


def _header_edits(src: Src, problems: Problems, where: str) -> HeaderEdits | None:
    if not isinstance(src.value, dict):
        problems.add(src, f"{where}: expected a mapping with add:/remove:, "
                          f"got {type_name(src.value)}")
        return None
    sec = Section(src, problems, where, ("add", "remove"))
    add: list[tuple[str, str]] = []

    def check_name(name: str, at: Src | tuple[str, int], adding: bool = False) -> bool:
        if not _TOKEN.fullmatch(name):
            problems.add(at, f"{where}: {name!r} is not a valid header name")
            return False
        if name.lower() in FRAMING_FIELDS:
            problems.add(at, f"{where}: {name} describes the message framing or "
                             "connection; cachegate sets it")
            return False
        if adding and name.lower() in OWN_FIELDS:
            problems.add(at, f"{where}.add: {name} is cachegate's own on every reply (a hit's age, its "
                             "Cache-Status member, the time a downstream cache counts the age from): "
                             "cachegate sets it; remove: may drop it")
            return False
        return True

    adds = sec.raw("add")
    if adds is not None:
        if isinstance(adds.value, dict):
            seen: dict[str, tuple[str, int]] = {}
            for name, value in adds.value.items():
                at = (adds.file, adds.key_lines.get(name, value.line))
                if not check_name(str(name), at, adding=True) or _duplicate_name(
                        str(name), at, seen, problems, f"{where}.add"):
                    continue
                v = value.value
                if not isinstance(v, str | int | float) or isinstance(v, bool):
                    problems.add(value, f"{where}.add.{name}: expected a string, got {type_name(v)}")
                elif any((c < " " and c != "\t") or c == "\x7f" for c in value.as_text()):
                    problems.add(value, f"{where}.add.{name}: a header value cannot contain "
                                        "line breaks or other control characters")
                elif any("\ud800" <= c <= "\udfff" for c in value.as_text()):
                    # not a character: no encoding can send it (aiohttp sent the field empty)
                    problems.add(value, f"{where}.add.{name}: a header value cannot contain a lone "
                                        "surrogate (U+D800 to U+DFFF, as YAML's \"\\ud800\" writes one): "
                                        "it is no character and cannot be sent")
                else:
                    add.append((str(name), value.as_text()))
        else:
            problems.add(adds, f"{where}.add: expected a mapping of header to value")
    remove = [n for n, at in (_str_items(sec.values["remove"], problems, f"{where}.remove")
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
        sec.problems.add(item, f"{sec.path + '.' if sec.path else ''}ttl_jitter: expected a percentage "
                               f"below 100% like 10%, got {shown(item.value)}")
        return None
    return value


def _optional_bool(sec: Section, key: str) -> bool | None:
    return sec.bool(key, False) if sec.has(key) else None


def _under(sec: Section, key: str) -> str:
    """A key's place in messages (``rules[2].key``, ``defaults.tags``): a file holds many rules."""
    return f"{sec.path}.{key}" if sec.path else key


def _actions(sec: Section, problems: Problems) -> Actions:
    ttl: Mapping[int, float] | None = None
    ttl_default: float | None = None
    if sec.has("ttl"):
        ttl, ttl_default = _ttl_table(sec.values["ttl"], problems, _under(sec, "ttl"))
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
        key=_key_spec(sec.values["key"], problems, _under(sec, "key")) if sec.has("key") else None,
        stale_while_revalidate=sec.optional_duration("stale_while_revalidate"),
        stale_if_error=sec.optional_duration("stale_if_error"),
        tags=_names(sec.raw("tags"), problems, _under(sec, "tags")),
        response_headers=(_header_edits(sec.values["response_headers"], problems,
                                        _under(sec, "response_headers"))
                          if sec.has("response_headers") else None),
        client_cache_control=mode,
        deception_guard=_optional_bool(sec, "deception_guard"),
        ttl_jitter=_jitter(sec),
        allow_set_cookie=_optional_bool(sec, "allow_set_cookie"),
    )


# Actions that let a stored response be shared longer or more widely than the origin said.
WIDENING_ACTIONS = ("ttl", "override_origin", "stale_while_revalidate", "stale_if_error", "allow_set_cookie")


def _warn_unkeyed_conditions(sec: Section, match: Match, key: KeySpec, label: str,
                             problems: Problems) -> None:
    """A warning when what a client sends, outside the cache key, picks a rule that widens
    sharing: one request with ``User-Agent: googlebot`` then sets the lifetime every browser
    gets for that URL. (``absent`` conditions are left alone: the usual anonymous-pages rule.)"""
    widening = [k for k in WIDENING_ACTIONS if sec.has(k)]
    if sec.has("deception_guard") and sec.values["deception_guard"].value is False:
        widening.append("deception_guard: false")
    if not widening:
        return
    keyed_headers = {h.lower() for h in key.headers}
    unkeyed = [f"header {c.name}" for c in match.headers
               if c.kind != "absent" and c.name.lower() not in keyed_headers]
    unkeyed += [f"cookie {c.name}" for c in match.cookies if c.kind != "absent" and c.name not in key.cookies]
    unkeyed += [f"query {c.name}" for c in match.query if c.kind != "absent" and (
        key.query_ignore or c.name in key.query_exclude
        or (key.query_include is not None and c.name not in key.query_include))]
    if unkeyed:
        problems.warn(sec.line_of(widening[0].split(":")[0]),
                      f"{label}: {', '.join(widening)} is chosen by {', '.join(unkeyed)}, which the "
                      "cache key does not hold: one request that has it sets what every client of "
                      "the URL gets; add it to key: (headers:, cookies:, query:) or give this rule "
                      "no_store/bypass")


def _compile_rule(src: Src, index: int, problems: Problems) -> Rule | None:
    if not isinstance(src.value, dict):
        problems.add(src, f"rules[{index}]: expected a mapping (name:, match:, and actions), "
                          f"got {type_name(src.value)}")
        return None
    sec = Section(src, problems, f"rules[{index}]", RULE_KEYS)
    name = sec.str("name", f"#{index + 1} ({os.path.basename(src.file)}:{src.line})")
    if not all(" " <= c <= "~" for c in name):  # it is sent in Cache-Status (RULE-BYPASS:name)
        problems.add(sec.raw("name") or src,
                     f"rules[{index}].name: expected printable ASCII text, got {name!r}")
    match = _compile_match(sec.raw("match"), problems, f"rules[{index}].match")
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
    if match.methods and "HEAD" in match.methods and "GET" not in match.methods:
        # A HEAD that misses fills the GET: such an action would set what every GET gets.
        for key in CACHE_ACTIONS:
            if key != "client_cache_control" and sec.has(key):
                problems.add(sec.line_of(key),
                             f"{label}: {key} would apply to the GET response a HEAD fills and "
                             "every GET is answered from, not to HEAD alone; match method: [GET] "
                             "(a GET rule covers HEAD too)")
    if sec.has("ttl") and not actions.no_store and not actions.bypass:
        _warn_error_ttls(sec.values["ttl"], match.status, label, problems)
    if not actions.no_store and not actions.bypass:
        _warn_unkeyed_conditions(sec, match, actions.key or DEFAULT_KEY, label, problems)
    raw_match = sec.raw("match")
    raw_path = (raw_match.value.get("path") if raw_match is not None and isinstance(raw_match.value, dict)
                else None)
    if (actions.key is not None and actions.key.lowercase_path and not actions.bypass
            and isinstance(match.path, Glob) and match.path_text != match.path_text.lower()
            and raw_path is not None):
        # The rules are read again on the lower-cased path (RuleSet._lowered), which this glob
        # never matches: every request the rule matches is bypassed.
        problems.warn(raw_path, f"{label}: path {match.path_text!r} has capitals, but key.lowercase_path "
                                "reads the rules again on the lower-cased path, which it never matches: "
                                "every request it matches is bypassed, or decided by another rule, and "
                                "this rule never caches; write the glob in lower case")
    elif (actions.key is not None and actions.key.lowercase_path and not actions.bypass
            and isinstance(match.path, Regex) and raw_path is not None):
        capital = regex_literal_capital(match.path.pattern)
        if capital is not None:
            problems.warn(raw_path, f"{label}: path {match.path_text!r} has the capital {capital!r} outside "
                                    "a class and no (?i), but key.lowercase_path reads the rules again on "
                                    "the lower-cased path, where that letter never matches: a request it "
                                    "matches is bypassed, or decided by another rule, and this rule does "
                                    "not cache it; write the letter in lower case or add (?i)")
    if not written and all(k in RULE_KEYS for k in sec.values):
        problems.add(src, f"{label}: the rule has no action (ttl, bypass, key, ...), so it only "
                          "hides the rules after it; remove it or give it an action")
    catch_all = raw_match is None or raw_match.value in ({}, None)
    return Rule(name=name, file=src.file, line=src.line, match=match, actions=actions,
                set_fields=written, catch_all=catch_all)


def compile_rule_file(root: Src, problems: Problems) -> tuple[Actions | None, list[Rule]]:
    if not isinstance(root.value, dict):
        problems.add(root, f"a rule file is a mapping with defaults: and rules:, got {type_name(root.value)}")
        return None, []
    rules_src = root.value.get("rules")
    if rules_src is None or (isinstance(rules_src, Src) and rules_src.value is None):
        # Valid, and no rules: every bypass rule gone without a word, as a file cut short by a
        # write that had not finished when it was read would have it ("", "rules:", or its
        # defaults: block and nothing after). Only "rules: []" says so on purpose.
        bare = all(k == "rules" or (isinstance(v, Src) and v.value is None) for k, v in root.value.items())
        if bare:
            problems.warn(root, "the rule file is empty: no defaults and no rules apply from it "
                                "(write 'rules: []' to say so)")
        else:
            where = rules_src if isinstance(rules_src, Src) else root
            problems.warn(where, "the rule file has no rules (no list under 'rules:'), as a file cut "
                                 "short while it was written would: write 'rules: []' to say so")
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
        stale_while_revalidate=first(b.stale_while_revalidate, a.stale_while_revalidate),
        stale_if_error=first(b.stale_if_error, a.stale_if_error),
        client_cache_control=first(b.client_cache_control, a.client_cache_control),
        ttl_jitter=first(b.ttl_jitter, a.ttl_jitter),
        allow_set_cookie=first(b.allow_set_cookie, a.allow_set_cookie),
        response_headers=first(b.response_headers, a.response_headers),
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


def load_rules(files: list[tuple[str, str]], base: CacheOptions, problems: Problems,
               sources: Sources | None = None) -> RuleSet:
    """Compile rule files (``(path, name to show)`` pairs, read from ``sources``) in order into
    one RuleSet."""
    defaults = Actions()
    rules: list[Rule] = []
    for path, display in files:
        root = load_yaml(path, problems, display, sources)
        if root is None:
            continue
        file_defaults, file_rules = compile_rule_file(root, problems)
        if file_defaults is not None:
            defaults = _merge_defaults(defaults, file_defaults)
        rules.extend(file_rules)
    _check_rule_set(defaults, rules, problems)
    return RuleSet(defaults=defaults, rules=tuple(rules), base=base,
                   files=tuple(d for _, d in files))
