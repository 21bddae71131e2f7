"""Matching: a request (and a response's status and type) against a rule's ``match:``.

Each condition is compiled once, at load, into a ``Check``: the predicate the hot
path calls (one closure call per condition, cheapest first) and, beside it, the
sentence explain prints when that predicate fails. A rule's request predicate and
its first failing condition (``Match.request_mismatch``) walk the same list of
checks, so what ``cachegate explain`` says cannot drift from what matches.

Requests are seen through a ``RequestView``: the path normalised once (decoded,
dot-segments removed: what the origin will read), query parameters and cookies
parsed on first use.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, unquote_plus
from urllib.parse import unquote as percent_decode

import re2

from proxy.policy.fields import cookies as read_cookies
from proxy.policy.fields import decoded_readings
from proxy.policy.keys import split_host
from proxy.policy.messages import RequestHead
from proxy.policy.php_names import php_name
from proxy.policy.request import normalise_path
from proxy.policy.spellings import NO_SPELLING, aliases, underscored

CondKind = Literal["present", "absent", "equals", "regex"]
Source = Literal["query", "header", "cookie"]
Predicate = Callable[["RequestView"], bool]
# How a view reads a query parameter sent more than once: its first value (aiohttp, Go, Flask),
# its last (Rails, Django), or its last counting the names PHP reads as it (``php_name``); and,
# for a query with a ``;``, split at ``;`` too, with the first value (Go before 1.17) or the last
# (Rack 2, Python's parse_qsl before 3.9.2; arrays counted under their name: ``rack_params``).
QueryReading = Literal["first", "last", "php", "split_first", "split_last"]
# Rack 2's separator: ``&`` or ``;``, and the spaces after it (``Rack::Utils::DEFAULT_SEP``).
_RACK_SEPARATOR = re.compile(r"[&;] *")
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is reported at its line, not on stderr
_RE2_OPTIONS.never_capture = True  # only whether it matches is asked: the DFA alone answers
_UNANCHORED = re2._Anchor.UNANCHORED
_HUGE_COUNT = re.compile(r"(?<!\\)\{[0-9]{5,}(?:,[0-9]*)?\}|(?<!\\)\{[0-9]*,[0-9]{5,}\}")


# What RE2 reads otherwise than Python's re did, silently (both compile it): refused, so a rule
# written for re (a bypass, a no_store) never quietly matches less than it did.
_ASCII_CLASSES = {
    "d": "write [0-9] (0-9 inside a class), or \\p{Nd} for every Unicode digit as re's \\d",
    "D": "write [^0-9], or \\P{Nd} for anything but a Unicode digit as re's \\D",
    "w": "write [0-9A-Za-z_] (0-9A-Za-z_ inside a class), or [\\p{L}\\p{N}_] for every Unicode "
         "letter and digit as re's \\w",
    "W": "write [^0-9A-Za-z_], or [^\\p{L}\\p{N}_] as re's \\W",
    "s": "write the spaces you mean, such as [ \\t] (re's \\s also matched \\v, \\x1c-\\x1f, \\x85, "
         "\\xa0 and the other Unicode spaces; RE2's is [\\t\\n\\f\\r ])",
    "S": "write the complement you mean, such as [^ \\t] (re's \\S also excluded \\v, \\x1c-\\x1f, "
         "\\x85, \\xa0 and the other Unicode spaces; RE2's excludes only [\\t\\n\\f\\r ])",
    "b": "write the boundary out, such as (?:^|/) or (?:/|$) (RE2 has no Unicode word boundary)",
    "B": "write what must be on either side instead (RE2 has no Unicode word boundary)",
}
_EMPTY_MIN = re.compile(r"\{,([0-9]*)\}")


def _read_otherwise(pattern: str) -> str | None:
    """Why ``pattern`` means something else on RE2 than on ``re``, or None.

    Walks the pattern as RE2 parses it (escapes, ``\\Q...\\E``, classes and their ``[:alpha:]``)
    for the two silent differences: a count with no minimum, ``x{,n}`` (``re``: 0 to n
    repeats; RE2: the literal text ``{,n}``), and the classes ``\\d \\w \\s \\b`` and their
    negations (``re``: Unicode; RE2: ASCII). A lone surrogate is refused here too: it cannot be
    encoded for RE2, and no text holds it as a character a literal could match.
    """
    for at, ch in enumerate(pattern):
        if "\ud800" <= ch <= "\udfff":
            return (f"a lone surrogate U+{ord(ch):04X} at character {at + 1}: not a character, so "
                    "RE2 cannot read the pattern; remove it (a field byte that is not UTF-8 is "
                    "matched by . or [^\\x00-\\x7f])")
    i, n, in_class = 0, len(pattern), False
    while i < n:
        ch = pattern[i]
        if ch == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            if nxt == "Q":  # RE2's quoted literal text, up to \\E
                end = pattern.find("\\E", i + 2)
                i = n if end < 0 else end + 2
                continue
            if nxt in "uUN":
                return (f"\\{nxt} is not an escape in RE2: write the character itself, or its code "
                        "point as \\x{00e9}")
            if nxt in _ASCII_CLASSES:
                return (f"\\{nxt} is ASCII-only in RE2, where Python's re read it over all of Unicode "
                        f"(a rule written for re would silently match other text): {_ASCII_CLASSES[nxt]}")
            i += 2
            continue
        if in_class:
            if ch == "[" and pattern.startswith("[:", i):
                end = pattern.find(":]", i + 2)
                i = i + 1 if end < 0 else end + 2
                continue
            if ch == "]":
                in_class = False
            i += 1
            continue
        if ch == "[":
            in_class = True
            i += 1
            if i < n and pattern[i] == "^":
                i += 1
            if i < n and pattern[i] == "]":  # a leading ] is a literal
                i += 1
            continue
        if ch == "{":
            m = _EMPTY_MIN.match(pattern, i)
            if m is not None:
                most = m.group(1)
                fix = f"{{0,{most}}}" if most else "* (or {0,})"
                read = f"0 to {most} repeats" if most else "any number of repeats"
                return (f"{m.group()} is the literal text {m.group()!r} in RE2, where Python's re read "
                        f"it as {read}: write {fix}")
        i += 1
    return None


class RegexRefused(ValueError):
    """A ``regex:`` that RE2 cannot run (a backreference, lookaround, ``\\Z``...), with why."""


class Regex:
    """A rule's ``regex:``, searched with RE2: time linear in the text, whatever the text.

    Python's ``re`` backtracks: ``^/r/(a+)+$`` against ``/r/aaa...a!`` (34 a's) took a worker
    30 s, until the watchdog killed it with every request it held. RE2 (google-re2) runs an
    automaton instead, as Go's regexp does; what it cannot express (backreferences,
    lookaround) is refused at load. ``search`` calls RE2's match directly
    (``_Regexp._regexp.Match``: 1-2 us a call, against 4-10 us through the module's
    ``search``, which builds a match object with Python-level offsets nobody reads here;
    google-re2 is pinned to 1.1.x for it). Text is encoded with ``surrogatepass``: a header
    byte that was not UTF-8 (aiohttp keeps it as a lone surrogate) reads as one character
    that no literal matches, as ``re`` read it.
    """

    __slots__ = ("_match", "pattern")

    def __init__(self, pattern: str) -> None:
        why = _read_otherwise(pattern)
        if why is not None:
            raise RegexRefused(why)
        huge = _HUGE_COUNT.search(pattern)
        if huge is not None:  # RE2 reads a count it cannot parse as the literal text "{...}"
            raise RegexRefused(f"invalid repetition size: {huge.group()}")
        try:
            compiled = re2.compile(pattern, _RE2_OPTIONS)
        except re2.error as exc:
            why = exc.args[0] if exc.args else exc
            text = why.decode("utf-8", "replace") if isinstance(why, bytes) else str(why)
            raise RegexRefused(text) from None
        self.pattern = pattern
        self._match: Callable[[object, bytes, int, int], list[tuple[int, int]]] = compiled._regexp.Match

    def search(self, text: str) -> bool | None:
        """True when the pattern matches somewhere in ``text``, else None (as ``re`` answers)."""
        data = text.encode("utf-8", "surrogatepass")
        return True if self._match(_UNANCHORED, data, 0, len(data))[0][0] >= 0 else None

    def __repr__(self) -> str:
        return f"Regex({self.pattern!r})"


_UNSET = object()
_NO_LINES: dict[str, tuple[str, ...]] = {}  # shared, never written


def php_params(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Each name's last value, the values of the names PHP reads as it (``php_name``) counted
    as more values of it, in the order they came: ``edit.mode=1`` is a value of ``edit_mode``,
    and so is ``edit_mode[]=1`` (an array to PHP: ``isset($_GET['edit_mode'])`` holds)."""
    params: dict[str, str] = {}
    for k, v in pairs:
        params[k] = v
        other = php_name(k)
        if other is not None and other != k:
            params[other] = v
    return params


def split_params(query: str) -> tuple[dict[str, str], dict[str, str]]:
    """The query as origins that split it at ``;`` as well as ``&`` read it: each name's first
    value (Go before 1.17), and its last with the names PHP or Rack read as it counted
    (``php_params``: an array ``a[]`` is Rack's ``a`` too). ``?x=1;edit_mode=1`` holds
    ``edit_mode`` for them, and for nobody else.

    >>> split_params("x=1;edit_mode=1&mode=a; mode=b")
    ({'x': '1', 'edit_mode': '1', 'mode': 'a'}, {'x': '1', 'edit_mode': '1', 'mode': 'b'})
    """
    pairs = [(unquote_plus(k), unquote_plus(v))
             for k, _, v in (p.partition("=") for p in _RACK_SEPARATOR.split(query)) if k]
    first: dict[str, str] = {}
    for k, v in pairs:
        first.setdefault(k, v)
    return first, php_params(pairs)


class RequestView:
    """A request as rules see it; query parameters and cookies are parsed on first use.

    ``overrides`` (lower-cased field name -> value, None: absent) is one other reading of the
    ambiguous fields the rules read, and ``query`` one reading of the query's ambiguous
    parameters (``RuleSet._reread`` tries them all)."""

    __slots__ = ("_cookies", "_odd", "_params", "_spelled", "decoded_otherwise", "head", "host", "lines",
                 "overrides", "path", "query", "reading", "repeated", "repeated_param")

    def __init__(self, head: RequestHead, overrides: dict[str, str | None] | None = None,
                 query: QueryReading = "first") -> None:
        raw_path, _, self.query = head.target.partition("?")
        self.head = head
        self.path = normalise_path(raw_path)
        host = head.host
        self.host = host.rsplit(":", 1)[0] if ":" in host and not host.endswith("]") else host
        self._params: dict[str, str] | None = None
        self.reading = query
        # The names another reading of the query reads otherwise: sent again with another
        # value, or spelled as PHP reads them (``php_params``); None for nearly every request.
        self._odd: set[str] | None = None
        self.repeated_param: str | None = None  # the first such name a condition read
        self._cookies: dict[str, str] | None = None
        # The first cookie a value condition read that holds on some of its decoded readings
        # and not on others (``Condition.check``); None for nearly every request.
        self.decoded_otherwise: str | None = None
        # ``underscored``, on first use; known empty when ``normalise_request`` saw no ``_``.
        self._spelled: dict[str, tuple[str, ...]] | None = None if head.underscores else NO_SPELLING
        self.overrides = overrides
        # The first header a condition read that is ambiguous (``header``, ``has``), and the
        # lines of the repeated ones read, by lower-cased name.
        self.repeated: str | None = None
        self.lines: dict[str, tuple[str, ...]] = _NO_LINES

    def params(self) -> dict[str, str]:
        """Query parameters, decoded, as this view reads them (``reading``). The names another
        reading reads otherwise go to ``_odd``. Names are read as PHP reads them only when one has a
        ``.``, a space, a ``[`` or a NUL: a scan of the query, then of its names if it has one or
        escapes; and split at ``;`` only when the query has one (``split_params``)."""
        if self._params is None:
            query = self.query
            escaped = "%" in query or "+" in query
            if escaped:
                pairs: list[tuple[str, str]] = parse_qsl(query, keep_blank_values=True)
            else:  # nothing to decode: skip parse_qsl's unquoting
                pairs = [(k, v) for k, _, v in (p.partition("=") for p in query.split("&")) if k]
            first: dict[str, str] = {}
            last: dict[str, str] | None = None  # the last value of a name sent with others
            for k, v in pairs:
                if k not in first:
                    first[k] = v
                elif (last is not None and k in last) or v != first[k]:
                    if last is None:
                        last = {}
                    last[k] = v
            php: dict[str, str] | None = None
            names = "".join(first) if escaped or "." in query or "[" in query or " " in query else ""
            if names and ("." in names or " " in names or "[" in names or "\x00" in names):
                php = php_params(pairs)
                self._odd = {n for n, v in php.items() if first.get(n) != v}
                if last is not None:
                    self._odd.update(last)
                self._odd = self._odd or None
            elif last is not None:
                self._odd = set(last)
            reading = self.reading
            if ";" in query:  # (the only cost to a query without one)
                split = split_params(query)
                odd = {n for r in split for n in first.keys() | r.keys() if first.get(n) != r.get(n)}
                if odd:
                    self._odd = odd if self._odd is None else self._odd | odd
                if reading in ("split_first", "split_last"):
                    self._params = split[reading == "split_last"]
                    return self._params
            if reading == "first" or (last is None and php is None):
                self._params = first
            elif reading == "php" and php is not None:
                self._params = php
            else:
                self._params = {**first, **last} if last is not None else first
        return self._params

    def param(self, name: str) -> str | None:
        """A query parameter's value as this view reads it. A name another reading reads
        otherwise (PHP, Rails and Django read a repeated one's last value, PHP ``edit.mode`` as
        ``edit_mode``) is noted in ``repeated_param``: ``RuleSet.plan`` then reads the rules
        those ways too (``_reread``)."""
        params = self._params if self._params is not None else self.params()
        if self._odd is not None and name in self._odd and self.repeated_param is None:
            self.repeated_param = name
        return params.get(name)

    def has_param(self, name: str) -> bool:
        """Is the query parameter present (``present``/``absent``)? Noted as ``param`` notes it
        when only another reading has it: a name present here is present in every reading."""
        if name in (self._params if self._params is not None else self.params()):
            return True
        if self._odd is not None and name in self._odd and self.repeated_param is None:
            self.repeated_param = name
        return False

    def cookies(self) -> dict[str, str]:
        if self._cookies is None:  # as the cache key reads them (``AMBIGUOUS``: see ``RuleSet.plan``)
            self._cookies = read_cookies(self.head.headers.getall("Cookie", ()))
        return self._cookies

    def spelled(self) -> dict[str, tuple[str, ...]]:
        """``underscored``: one scan of the field names per request, on first use."""
        if self._spelled is None:
            self._spelled = underscored(self.head.headers)
        return self._spelled

    def aliased(self, name: str) -> bool:
        """Does the request carry ``name`` spelled otherwise (``_`` for ``-``), as CGI-style
        origins read it? A usual request's names are scanned for ``_`` once; a request with very
        many is asked for each spelling of ``name`` instead (``spellings``). Both routes stay:
        the scan alone cost 14-48 us per reading of a 1,500-field request against 2.7 us for
        the lookups (timeit of ``RequestView.header``, 2026-12-05), and the lookups alone
        cannot see a name of over five parts."""
        spelled = self._spelled
        if spelled is None:
            if len(self.head.headers) > 64:
                return bool(aliases(self.head.headers, name, self.spelled))
            spelled = self.spelled()
        if not spelled and "_" not in name:
            return False
        return bool(aliases(self.head.headers, name, self.spelled))

    def header(self, name: str) -> str | None:
        """The field's lines joined with ``, `` (RFC 9110 §5.3). A field sent as several lines, or
        also spelled with ``_`` for ``-`` (``X_Requested_With``), is noted in ``repeated``: origins
        read it as its first line (aiohttp, Go, Varnish), its last or the joined value, and
        CGI/WSGI/Rack ones read the other spelling as the same field, so ``RuleSet.plan`` reads
        the rules each way (``_reread``)."""
        if self.overrides is not None:
            value = self.overrides.get(name.lower(), _UNSET)
            if value is not _UNSET:
                return value  # type: ignore[return-value]
        values = self.head.headers.getall(name, ())
        if len(values) < 2 and ((self._spelled is NO_SPELLING and "_" not in name)
                                or not self.aliased(name)):
            return values[0] if values else None
        if self.repeated is None:
            self.repeated = name
        if len(values) > 1:
            if self.lines is _NO_LINES:
                self.lines = {}
            self.lines[name.lower()] = tuple(values)
        return ", ".join(values) if values else None

    def has(self, name: str) -> bool:
        """Is the field present (``present``/``absent``)? Noted in ``repeated`` when another
        spelling of it is (``header``)."""
        if self.overrides is not None:
            value = self.overrides.get(name.lower(), _UNSET)
            if value is not _UNSET:
                return value is not None
        if (self._spelled is not NO_SPELLING or "_" in name) and self.aliased(name) \
                and self.repeated is None:
            self.repeated = name
        return name in self.head.headers


@dataclass(frozen=True, slots=True)
class Check:
    """One compiled request condition: ``holds`` (the hot path) and ``why_not`` (for explain,
    called only when ``holds`` is false)."""

    holds: Predicate
    why_not: Callable[[RequestView], str]


@dataclass(frozen=True, slots=True)
class ResponseCheck:
    """One compiled response condition, on (status, Content-Type)."""

    holds: Callable[[int, str | None], bool]
    why_not: Callable[[int, str | None], str]


def _always(v: RequestView) -> bool:
    return True


def all_of(checks: list[Predicate]) -> Predicate:
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


# A run of percent-escapes in a condition's own text: it was written against the value as
# browsers send it (``C0004%3A1`` in a OneTrust consent cookie).
_ESCAPES = re.compile(r"(?:%[0-9A-Fa-f]{2})+")


Test = Callable[[str], bool]


def _cookie_tests(kind: CondKind, value: str | None, pattern: Regex | None
                  ) -> tuple[bool, Test, Test | None, Test | None]:
    """A value condition as three tests: on the raw value, on it percent-decoded and on it
    percent-decoded with ``+`` as a space (``decoded_readings``); first, whether its own text
    holds escapes. Such a condition is written against the raw value, so it is decoded alike for
    the other two (``C0004%3A1`` is ``C0004:1`` there); one without holds its text as the
    decoded value must (``"1"`` against ``%31``). None for the other two: a regex whose escapes
    cannot be decoded safely (``_literal_escapes``), under which every reading is ambiguous."""
    if kind == "equals":
        assert value is not None
        escaped = _ESCAPES.search(value) is not None
        readings = (value, *decoded_readings(value)) if escaped else (value, value, value)
        equal = [(lambda text, want=want: text == want) for want in readings]
        return escaped, equal[0], equal[1], equal[2]
    assert pattern is not None
    raw = pattern.search
    escaped = _ESCAPES.search(pattern.pattern) is not None
    if not escaped:
        return (False, lambda text: raw(text) is not None, lambda text: raw(text) is not None,
                lambda text: raw(text) is not None)
    decoded: Callable[[str], object] | None = None
    if _literal_escapes(pattern.pattern):  # each run of escapes as the literal text it stands for
        literal = _ESCAPES.sub(lambda m: re.escape(percent_decode(m[0])), pattern.pattern)
        with contextlib.suppress(RegexRefused):
            decoded = Regex(literal).search
    if decoded is None:
        # Not to be rewritten safely (``\%61`` became ``\a``, BEL, matching nothing, so the
        # readings agreed and a decoded ``adm%69n`` was cached; ``x{%32}`` became ``x{2}``):
        # every value an origin may decode is ambiguous under it, as it was before.
        return True, lambda text: raw(text) is not None, None, None
    found = decoded
    return (True, lambda text: raw(text) is not None, lambda text: found(text) is not None,
            lambda text: found(text) is not None)


def _literal_escapes(pattern: str) -> bool:
    """Whether every run of percent-escapes in a regex stands where a literal does: not right
    after an odd number of backslashes (``\\%61``: the backslash would escape the decoded
    character) nor inside a ``{...}`` count (``x{%32}``).

    >>> _literal_escapes("C0004%3A1"), _literal_escapes(r"^\\%61dmin$"), _literal_escapes(r"\\\\%61")
    (True, False, True)
    >>> _literal_escapes("x{%32}"), _literal_escapes("a{1}%41")
    (False, True)
    """
    for m in _ESCAPES.finditer(pattern):
        before = pattern[:m.start()]
        if (len(before) - len(before.rstrip("\\"))) % 2 or before.rfind("{") > before.rfind("}"):
            return False
    return True


def _cookie_compared(name: str, kind: CondKind, value: str | None, pattern: Regex | None) -> Predicate:
    """A value condition on cookie ``name``, on the raw value; when the value holds ``%`` or
    ``+`` (or the condition an escape) also on the readings of origins that decode it
    (``_cookie_tests``), and a verdict that differs marks the view (``decoded_otherwise``:
    ``RuleSet`` bypasses it). A verdict all readings share stands: a OneTrust consent cookie
    (its value always holds ``%`` and ``+``) is cached under ``regex: "C0004%3A1"`` as under
    ``regex: "C0004(%3A|:)1"``, while ``preview=%31`` under ``preview: "1"`` is not."""
    escaped, test, test_decoded, test_plus = _cookie_tests(kind, value, pattern)

    def holds(v: RequestView) -> bool:
        actual = (v._cookies if v._cookies is not None else v.cookies()).get(name)
        if actual is None:
            return False
        verdict = test(actual)
        if (escaped or "%" in actual or "+" in actual) and v.decoded_otherwise is None:
            decoded, plus = decoded_readings(actual)
            if test_decoded is None or test_plus is None \
                    or test_decoded(decoded) is not verdict or test_plus(plus) is not verdict:
                v.decoded_otherwise = name
        return verdict

    return holds


@dataclass(frozen=True, slots=True)
class Condition:
    """One query parameter, header or cookie condition."""

    name: str
    kind: CondKind
    value: str | None = None
    pattern: Regex | None = None

    def check(self, source: Source) -> Check:
        """This condition compiled for requests: with as few calls as possible (the hot path)."""
        name, kind, value, pattern = self.name, self.kind, self.value, self.pattern
        why = f"{source}: not {self.describe()}"
        get: Callable[[RequestView], str | None]
        holds: Predicate
        if source == "header":
            if kind == "present":
                return Check(lambda v: v.has(name), lambda v: why)
            if kind == "absent":
                return Check(lambda v: not v.has(name), lambda v: why)
            get = lambda v: v.header(name)  # noqa: E731
        elif source == "cookie":
            if kind == "present":
                holds = lambda v: name in (v._cookies if v._cookies is not None else v.cookies())  # noqa: E731
                return Check(holds, lambda v: why)
            if kind == "absent":
                holds = lambda v: name not in (v._cookies if v._cookies is not None else v.cookies())  # noqa: E731
                return Check(holds, lambda v: why)
            return Check(_cookie_compared(name, kind, value, pattern), lambda v: why)
        else:
            # (inline: a name present in this reading is present in every one, ``has_param``)
            if kind == "present":
                holds = lambda v: (name in (v._params if v._params is not None else v.params())  # noqa: E731
                                   or (v._odd is not None and v.has_param(name)))
                return Check(holds, lambda v: why)
            if kind == "absent":
                holds = lambda v: not (name in (v._params if v._params is not None else v.params())  # noqa: E731
                                       or (v._odd is not None and v.has_param(name)))
                return Check(holds, lambda v: why)
            get = lambda v: v.param(name)  # noqa: E731
        if kind == "equals":
            return Check(lambda v: get(v) == value, lambda v: why)
        assert pattern is not None
        search = pattern.search

        def matches(v: RequestView) -> bool:
            actual = get(v)
            return actual is not None and search(actual) is not None

        return Check(matches, lambda v: why)

    def describe(self) -> str:
        if self.kind in ("present", "absent"):
            return f"{self.name} {self.kind}"
        if self.kind == "equals":
            return f"{self.name} = {self.value!r}"
        assert self.pattern is not None
        return f"{self.name} ~ /{self.pattern.pattern}/"


@dataclass(frozen=True, slots=True)
class HostPattern:
    pattern: re.Pattern[str]
    with_port: bool  # the pattern names a port: compare with the Host's port
    text: str


class Glob:
    """A path glob (``*`` and ``?`` within a segment, ``**`` across), matched against a whole path.

    Translated to a regex (``glob_to_regex``) only when no two wildcards can compete for the
    same characters: no ``**`` and at most one ``*`` per segment, or one ``**`` and no ``*``;
    a regex then backtracks at most over one segment (or the path) once. Any other glob, such
    as ``/thumbs/*-*x*.jpg``, runs as a set of positions in the glob advanced one path
    character at a time (a Thompson NFA): at most len(path) * len(glob) steps, where a
    backtracking regex takes len(path) ** (wildcards) on a path made to fail.
    """

    __slots__ = ("_stars", "_start", "_tokens", "fullmatch", "pattern")

    def __init__(self, glob: str, regex: str) -> None:
        self.pattern = regex  # for display; the glob itself is the rule's path_text
        tokens: list[tuple[str, str]] = []  # ("lit", c), ("?", ""), ("*", ""), ("**", "")
        i = 0
        while i < len(glob):
            if glob.startswith("**", i):
                tokens.append(("**", ""))
                i += 2
            elif glob[i] in "*?":
                tokens.append((glob[i], ""))
                i += 1
            else:
                tokens.append(("lit", glob[i]))
                i += 1
        self._tokens = tuple(tokens)
        self._stars = tuple(n for n, (kind, _) in enumerate(tokens) if kind in ("*", "**"))
        self._start = self._closure(1)
        deep = sum(kind == "**" for kind, _ in tokens)
        per_segment = [seg.count("*") for seg in glob.replace("**", "").split("/")]
        if (deep == 0 and max(per_segment) <= 1) or (deep == 1 and sum(per_segment) == 0):
            self.fullmatch: Callable[[str], object] = re.compile(regex).fullmatch
        else:
            self.fullmatch = self._match

    def _closure(self, states: int) -> int:
        """``states`` plus the positions after each wildcard they hold (a wildcard may match nothing)."""
        for n in self._stars:  # ascending, so a run of wildcards is skipped in one pass
            if states >> n & 1:
                states |= 1 << (n + 1)
        return states

    def _match(self, path: str) -> bool | None:
        tokens, end = self._tokens, len(self._tokens)
        states = self._start  # bit n: the glob's first n tokens match the path read so far
        for ch in path:
            advanced, rest = 0, states
            while rest:
                low = rest & -rest
                rest ^= low
                n = low.bit_length() - 1
                if n == end:
                    continue
                kind, c = tokens[n]
                if kind == "lit":
                    if ch == c:
                        advanced |= low << 1
                elif kind == "**":
                    advanced |= low
                elif ch != "/":
                    advanced |= low if kind == "*" else low << 1
            if not advanced:
                return None
            states = self._closure(advanced)
        return True if states >> end & 1 else None


_REGEX_SEGMENT = re.compile(r"\^/([A-Za-z0-9_~!&',;=@-]+)/")


def _regex_first_segment(pattern: str) -> str | None:
    """The literal first segment of an anchored regex like ``^/assets/...``, else None; also
    None when the ``/`` after it is optional (``^/account/?`` matches ``/account.json``).

    >>> _regex_first_segment(r"^/assets/.+\\.css$"), _regex_first_segment(r"^/a/x|/b")
    ('assets', None)
    >>> _regex_first_segment(r"^/account/?"), _regex_first_segment(r"^/a/{0,1}x")
    (None, None)
    """
    if "|" in pattern:  # a top-level alternative could match anywhere
        return None
    m = _REGEX_SEGMENT.match(pattern)
    if m is None or pattern[m.end():m.end() + 1] in ("?", "*", "{"):
        return None
    return m.group(1)


def _with_port(host: str, scheme: str) -> str:
    """``host`` (normalised: its scheme's default port dropped) with its port written out, for
    a host pattern that names one: ``admin.example:80`` matches ``Host: admin.example``.

    >>> _with_port("a.example", "http"), _with_port("[::1]", "https"), _with_port("a:8080", "http")
    ('a.example:80', '[::1]:443', 'a:8080')
    """
    if split_host(host)[1]:
        return host
    return f"{host}:{'443' if scheme == 'https' else '80'}"


def first_segment(path: str) -> str:
    end = path.find("/", 1)
    return path[1:] if end < 0 else path[1:end]


@dataclass(frozen=True, slots=True)
class Match:
    """A rule's ``match:`` as written, compiled into its request and response checks."""

    hosts: tuple[HostPattern, ...] = ()
    path: Regex | Glob | None = None
    path_is_regex: bool = False  # regex: searched; glob: the whole path
    path_text: str = ""
    methods: frozenset[str] | None = None
    query: tuple[Condition, ...] = ()
    headers: tuple[Condition, ...] = ()
    cookies: tuple[Condition, ...] = ()
    status: frozenset[int] | None = None
    content_types: tuple[str, ...] = ()
    # Compiled from the fields above, cheapest first; explain and matching both read them.
    checks: tuple[Check, ...] = field(init=False, repr=False, compare=False)
    # The checks of the URL alone (method, host, path, query), for a purge by URL (``url_holds``).
    url_checks: tuple[Check, ...] = field(init=False, repr=False, compare=False)
    response_checks: tuple[ResponseCheck, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "checks", self._request_checks())
        object.__setattr__(self, "url_checks", self._request_checks(url_only=True))
        object.__setattr__(self, "response_checks", self._response_checks())

    @property
    def needs_response(self) -> bool:
        return self.status is not None or bool(self.content_types)

    def first_segment(self) -> str | None:
        """The literal first path segment every matching path has, if the glob fixes one."""
        if self.path is None:
            return None
        if self.path_is_regex:
            return _regex_first_segment(self.path.pattern)
        seg = first_segment(self.path_text)
        if not seg or "*" in seg or "?" in seg:
            return None
        return seg

    def predicate(self) -> Predicate:
        """All request checks in one closure: per request, one call per condition this match has."""
        return all_of([c.holds for c in self.checks])

    def request_holds(self, v: RequestView) -> bool:
        return self.predicate()(v)

    def url_holds(self, v: RequestView) -> bool:
        """Whether the conditions on the URL hold, header and cookie conditions aside: whether
        some request for this URL (with the right fields and cookies) can match."""
        return all(c.holds(v) for c in self.url_checks)

    def request_mismatch(self, v: RequestView) -> str | None:
        """None when every request condition holds, else the first that does not (for explain)."""
        for c in self.checks:
            if not c.holds(v):
                return c.why_not(v)
        return None

    def response_holds(self, status: int, content_type: str | None) -> bool:
        for c in self.response_checks:  # noqa: SIM110 (a loop is faster than all() over a generator)
            if not c.holds(status, content_type):
                return False
        return True

    def response_mismatch(self, status: int, content_type: str | None) -> str | None:
        for c in self.response_checks:
            if not c.holds(status, content_type):
                return c.why_not(status, content_type)
        return None

    def _request_checks(self, url_only: bool = False) -> tuple[Check, ...]:
        checks: list[Check] = []
        if self.methods is not None:
            methods = self.methods
            shown = sorted(methods)
            checks.append(Check(lambda v: v.head.method in methods,
                                lambda v: f"method {v.head.method} not in {shown}"))
        if self.hosts:
            hosts = tuple((h.pattern.fullmatch, h.with_port) for h in self.hosts)
            texts = [h.text for h in self.hosts]

            def host_ok(v: RequestView) -> bool:
                for fullmatch, with_port in hosts:
                    if fullmatch(_with_port(v.head.host, v.head.scheme) if with_port else v.host) is not None:
                        return True
                return False

            checks.append(Check(host_ok, lambda v: f"host {v.head.host} not in {texts}"))
        if self.path is not None:
            path = self.path
            path_match = path.search if isinstance(path, Regex) else path.fullmatch
            path_text = self.path_text
            checks.append(Check(lambda v: path_match(v.path) is not None,
                                lambda v: f"path {v.path} does not match {path_text!r}"))
        checks.extend(c.check("query") for c in self.query)
        if not url_only:
            checks.extend(c.check("header") for c in self.headers)
            checks.extend(c.check("cookie") for c in self.cookies)
        return tuple(checks)

    def _response_checks(self) -> tuple[ResponseCheck, ...]:
        checks: list[ResponseCheck] = []
        if self.status is not None:
            statuses = self.status
            shown = sorted(statuses)
            checks.append(ResponseCheck(lambda status, ct: status in statuses,
                                        lambda status, ct: f"status {status} not in {shown}"))
        if self.content_types:
            patterns = self.content_types

            def bare(content_type: str | None) -> str:
                return (content_type or "").split(";", 1)[0].strip().lower()

            def type_ok(status: int, content_type: str | None) -> bool:
                ct = bare(content_type)
                return any(fnmatch.fnmatchcase(ct, pattern) for pattern in patterns)

            checks.append(ResponseCheck(
                type_ok, lambda status, ct: f"content type {bare(ct) or '(none)'!r} not in {list(patterns)}"))
        return tuple(checks)
