"""Field values as RFC 9110 §5.6 defines them: lists, singletons, numbers, quoted strings, parameters.

Every field value the policy reads goes through these readers, so a malformed value is
read the same way wherever it is used. Nothing here raises: a value that does not follow
its grammar reads as ``None``, and the caller applies the rule its RFC gives for an
invalid field (an invalid ``Age`` is ignored, an invalid ``Expires`` means stale, ...).

- Lists (§5.6.1): the field lines of a field are one list, as if joined with commas;
  commas inside quoted strings do not split; empty members are dropped; whitespace
  around members is not part of them.
- Singletons received as several values (§5.5; RFC 9111 §5.1 for ``Age``): the first
  member counts, where a member can be told apart (a date contains commas: for those,
  the first field line).
- Numbers: ASCII digits only (``str.isdigit`` accepts ``²`` and ``٣``, which ``int``
  refuses or reads as 3); delta-seconds above 2**31 read as 2**31 (RFC 9111 §1.2.2),
  and long digit strings are never converted whole (no quadratic ``int``).
- Parameters (§5.6.6) and weights (§12.4.2): ``;``-separated, names case-insensitive,
  values tokens or quoted strings; ``q`` is 0 to 1 with at most three decimals.

>>> split_list(['a, "b, c"', "", " d ,,e"])
['a', '"b, c"', 'd', 'e']
>>> first_member(["0, 7200"]), first_member(["7200", "0"]), first_member([" , "])
('0', '7200', None)
>>> delta_seconds("0060"), delta_seconds("²"), delta_seconds("99999999999999999999")
(60, None, 2147483648)
>>> digits("٣"), digits("7" * 5000) == BIG
(None, True)
>>> parameters('gzip ; Q=0.5;level="1;2"')
('gzip', (('q', '0.5'), ('level', '1;2')))
>>> weight("0.5"), weight("1.000"), weight("1.5"), weight(".5")
(0.5, 1.0, None, None)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import unquote as percent_decode

from proxy.policy.php_names import php_name

DELTA_SECONDS_MAX = 2**31


def split_list(values: Iterable[str]) -> list[str]:
    """The members of a list-based field, over all its field lines (RFC 9110 §5.6.1)."""
    return [m for value in values for part in split_outside_quotes(value, ",") if (m := part.strip(" \t"))]


def first_member(values: Sequence[str]) -> str | None:
    """A singleton field received as a list or as several lines: its first member."""
    if not values:
        return None
    members = split_list(values[:1]) or split_list(values[1:])
    return members[0] if members else None


BIG = 10**30  # what a longer number reads as: bigger than any size, never a slow or refused int()


def digits(text: str) -> int | None:
    """A non-negative decimal integer of ASCII digits (at most BIG), or None."""
    if not text or not text.isascii() or not text.isdigit():
        return None
    significant = text.lstrip("0") or "0"
    return BIG if len(significant) > 30 else int(significant)


def delta_seconds(text: str) -> int | None:
    """RFC 9111 §1.2.2 delta-seconds, capped at 2**31; None when ``text`` is not one."""
    if not text or not text.isascii() or not text.isdigit():
        return None
    significant = text.lstrip("0") or "0"
    if len(significant) > 10:  # never convert a huge literal: it would only be capped
        return DELTA_SECONDS_MAX
    return min(int(significant), DELTA_SECONDS_MAX)


def unquote(text: str) -> str:
    """The content of a quoted-string (RFC 9110 §5.6.4), escapes resolved; other text as is."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    out: list[str] = []
    escaped = False
    for ch in text[1:-1]:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        else:
            out.append(ch)
    return "".join(out)


def split_outside_quotes(text: str, sep: str, maxsplit: int = -1) -> list[str]:
    """``text.split(sep, maxsplit)``, but a ``sep`` inside a quoted-string (RFC 9110 §5.6.4,
    backslash escapes included) does not split: the one quote-aware scanner of the policy."""
    if '"' not in text:
        return text.split(sep, maxsplit)
    parts: list[str] = []
    start = 0
    in_quotes = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif in_quotes and ch == "\\":
            escaped = True
        elif ch == '"':
            in_quotes = not in_quotes
        elif ch == sep and not in_quotes and maxsplit != len(parts):
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parameters(member: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A list member's value and its parameters (RFC 9110 §5.6.6): names lower-cased,
    values unquoted; whitespace around ``;`` and ``=`` removed; empty parameters dropped."""
    first, *rest = split_outside_quotes(member, ";")
    params: list[tuple[str, str]] = []
    for param in rest:
        name, _, value = param.partition("=")
        name = name.strip(" \t").lower()
        if name:
            params.append((name, unquote(value.strip(" \t"))))
    return first.strip(" \t"), tuple(params)


_WEIGHT = re.compile(r"0(?:\.\d{0,3})?|1(?:\.0{0,3})?")


def weight(text: str) -> float | None:
    """A ``q`` parameter's value (RFC 9110 §12.4.2), or None when it is not one."""
    return float(text) if _WEIGHT.fullmatch(text) else None


def content_length(values: Sequence[str]) -> int | None:
    """Content-Length (RFC 9110 §8.6): a list of identical values counts as one; anything
    else that is not a non-negative integer is None (the framing layer refuses those).

    One line of digits alone, nearly every response's, is read without the list parse (what
    that parse gives it: the line itself); asked twice per fill, the parse was ~14
    Python-level calls each time (``scripts/bench-calls``).

    >>> content_length(["1024"]), content_length(["7, 7"]), content_length(["7", "8"]), content_length(["٣"])
    (1024, 7, None, None)
    """
    if len(values) == 1 and values[0].isdigit():
        return digits(values[0])
    members = split_list(values)
    if not members or any(m != members[0] for m in members):
        return None
    return digits(members[0])


def ends_at_head(status: int, head_method: bool = False) -> bool:
    """Whether a response has no body whatever its fields say (RFC 9112 §6.3): the answer to
    HEAD, an interim 1xx, a 204 or a 304 ends with its head. Every reader of an upstream
    response's length asks this one question (``body_length``), so the parser, the spool that
    checks a body arrived whole, and the storability decision agree."""
    return head_method or status < 200 or status == 204 or status == 304


def body_length(status: int, length: int | None, head_method: bool = False) -> int | None:
    """How many bytes of body follow a response head: 0 when it ends at its head
    (``ends_at_head``: a 204's ``Content-Length: 5`` announces no body), else its parsed
    ``Content-Length`` (None: unknown, chunked or to the connection's end).

    >>> body_length(200, 5), body_length(204, 5), body_length(304, 5), body_length(200, 5, True)
    (5, 0, 0, 0)
    """
    return 0 if ends_at_head(status, head_method) else length


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2 tchar, ASCII only


def is_token(text: str) -> bool:
    """``1*tchar`` (RFC 9110 §5.6.2): a field name (§5.1), a directive or coding name.

    >>> [is_token(t) for t in ("Accept-Encoding", '"Cookie"', "Cookie;x=1", "Coo kie", "K\u212a")]
    [True, False, False, False, False]
    """
    return _TOKEN.fullmatch(text) is not None


# What a cookie reads as when origins disagree about it (a string no field value holds: NUL).
AMBIGUOUS = "\x00ambiguous"
# Anything but printable ASCII around ``=``, and ``;``, ``,`` or anything but printable ASCII
# between pairs: Unicode whitespace (aiohttp and Django strip a no-break space around a name),
# and the lone surrogate a byte that is not UTF-8 arrives as (aiohttp reads a raw 0xA0 as
# ``\udca0``, which no ``\s`` matches, while a WSGI origin reads it as Latin-1's U+00A0, which
# Django strips), controls and characters some origin case-folds or drops. Each run of them is
# made one space first: ``X*=X*`` over a long run with no ``=`` is quadratic (a 24 KB Cookie of
# such bytes held a worker 2 s), one pass of ``X+`` then `` ?= ?`` is linear.
_NOT_PRINTABLE = re.compile(r"[^\x21-\x7e]+")
_AROUND_EQUALS = re.compile(r" ?= ?")
_ANY_SEPARATOR = re.compile(r"[ ;,]+")
_WHITESPACE_SEPARATOR = re.compile(r"[;,\s]+")


def _names_any_parser_may_see(text: str) -> list[str]:
    """Every name some origin's parser may read in ``text``: it is split wherever any of them
    splits (``;``, ``,``, whitespace, any character past printable ASCII, quotes ignored), with
    those around ``=`` dropped, and also at whitespace alone (a name with a letter past ASCII,
    ``ſession``, stays one for ``ambiguous_cookie``'s case-folding); and the names PHP reads
    its ``;``-separated pairs under (``logged in=x`` is its ``logged_in``)."""
    tokens = _ANY_SEPARATOR.split(_AROUND_EQUALS.sub("=", _NOT_PRINTABLE.sub(" ", text)))
    names = [name for token in tokens if (name := token.partition("=")[0])]
    if not text.isascii():
        names.extend(name for token in _WHITESPACE_SEPARATOR.split(text) if (name := token.partition("=")[0]))
    for part in text.split(";"):
        names.extend(_php_names(part.partition("=")[0].lstrip()))
    return names


def _php_names(name: str) -> list[str]:
    """The other names PHP may read cookie ``name`` under: its own rewriting (``php_name``:
    ``ab.bucket`` is ``$_COOKIE['ab_bucket']``), of the name as sent (PHP 8) and percent-decoded
    (PHP 7 and before decoded cookie names)."""
    out = []
    for spelling in (name, percent_decode(name)) if "%" in name else (name,):
        php = php_name(spelling)
        if php is not None and php != name and php not in out:
            out.append(php)
    return out


def cookies(lines: Sequence[str]) -> dict[str, str]:
    """The cookies of a request's ``Cookie`` field lines, read once for the cache key and the
    rules alike. A name whose value origins may read differently reads as ``AMBIGUOUS``
    (the rules then neither look the request up nor store its response).

    Origins agree only on what RFC 6265 §4.2.1 lets a client send: one line of ``;``-separated
    ``name=value`` pairs with no comma, quote, backslash or whitespace inside a pair. Past that
    they part: Rack 2 also ends a cookie at ``,``; Python's ``http.cookies`` and aiohttp at
    whitespace, and they read a quoted value as one (``a="x; session=y"`` holds no
    ``session``); Go drops ``session =x`` (a name with a space), Django and aiohttp read it as
    ``session``; aiohttp reads only the first of two ``Cookie`` lines, WSGI servers join them;
    a name sent twice is the first value to some frameworks, the last to others; a pair without
    ``=`` is a name to Go and aiohttp, a nameless value to Django. So:

    - a plain pair is that cookie (whitespace around the pair is not part of it);
    - every name any of those parsers may see in a pair that is not plain (a comma, whitespace,
      no ``=``), or anywhere in a line with a quote or a backslash, or in more than one line,
      is ``AMBIGUOUS``; and so is a name sent twice with different values;
    - PHP reads a name with ``.``, `` `` or ``[`` as another (``ab.bucket`` is its
      ``$_COOKIE['ab_bucket']``, and for cookies its first value wins): that other name is
      ``AMBIGUOUS`` (the name as sent stays what it is).

    >>> cookies(["a=1; b=2;c=3; a=1"])
    {'a': '1', 'b': '2', 'c': '3'}
    >>> cookies(["theme=dark, session=x; lang=de"])["lang"], cookies(["theme=dark, session=x"])["session"]
    ('de', '\\x00ambiguous')
    >>> cookies(["ab.bucket=B; ab_bucket=A"]) == {"ab.bucket": "B", "ab_bucket": AMBIGUOUS}
    True
    >>> cookies(["a=1; a=2"]) == {"a": AMBIGUOUS}, cookies(['p="x; session=y"; lang=de'])["lang"] == AMBIGUOUS
    (True, True)
    """
    if len(lines) != 1:
        return dict.fromkeys(_names_any_parser_may_see(";".join(lines)), AMBIGUOUS) if lines else {}
    line = lines[0]
    if '"' in line or "\\" in line or not line.isascii():
        # A quote or backslash (read whole by some), a character past ASCII (``;\xa0session=x``:
        # a no-break space aiohttp and Django strip around a name; a raw 0xA0 or 0x85 byte,
        # ``\udca0`` here, U+00A0 to a WSGI origin): every name any parser may see is ambiguous.
        return dict.fromkeys(_names_any_parser_may_see(line), AMBIGUOUS)
    out: dict[str, str] = {}
    # What browsers send: spaces only after ";", no comma, no tab.
    plain_line = "," not in line and "\t" not in line and line.count(" ") == line.count("; ")
    for part in line.split(";"):
        if not plain_line:
            part = part.strip(" \t")
            if "," in part or " " in part or "\t" in part:
                for seen in _names_any_parser_may_see(part):
                    out[seen] = AMBIGUOUS
                continue
        name, eq, value = part.partition("=")
        if not eq:
            if name := name.lstrip(" "):
                out[name] = AMBIGUOUS  # a name to Go and aiohttp, a nameless value to Django
                for php in _php_names(name):
                    out[php] = AMBIGUOUS
            continue
        name = name.lstrip(" ")
        if not name:
            continue
        if "%" in name:  # Rack decodes names: ``sess%69on`` is its ``session``
            out[percent_decode(name)] = out[name] = AMBIGUOUS
            for php in _php_names(name):
                out[php] = AMBIGUOUS
            continue
        if "." in name or "[" in name:  # PHP's ``ab.bucket`` is its ``ab_bucket`` (``_php_names``)
            for php in _php_names(name):
                out[php] = AMBIGUOUS
        if out.get(name, value) != value:
            value = AMBIGUOUS  # sent twice, with another value: the origin may take either
        out[name] = value
    return out


def ambiguous_cookie(jar: Mapping[str, str], names: Iterable[str]) -> str | None:
    """The first of ``names`` (the cookies rules read) that origins may read otherwise than
    ``jar`` does; None when there is none.

    A request whose rules read such a cookie is neither looked up nor stored: which rule holds,
    or which key it has, depends on a reading of its ``Cookie`` that the origin may not share,
    and neither answer is safe for every rule (present-means-bypass and absent-means-cache
    rules fail in opposite directions). Past ``AMBIGUOUS`` (``cookies``):

    - a name the request also carries spelled in another case (``SESSION=x`` for ``session``):
      ASP.NET Core and classic ASP.NET look cookies up ignoring case (the last pair wins), and
      so does nginx's ``$cookie_session``; ``jar`` has no ``session`` (names are compared
      case-folded, wider than ASCII's case: past it, more ambiguous, never less).

    A value origins may decode (``preview=%31``) is the rules' own concern
    (``decoded_readings``): only a condition comparing it can tell.

    >>> ambiguous_cookie(cookies(["theme=dark, session=x"]), ("session",))
    'session'
    >>> ambiguous_cookie(cookies(["theme=dark, x=1; session=y"]), ("session", "lang")) is None
    True
    >>> ambiguous_cookie(cookies(["SESSION=x"]), ("session",)), ambiguous_cookie(cookies(["b=1; B=2"]), "b")
    ('session', 'b')
    """
    if not jar:
        return None
    folded = ""
    for name in names:
        if not folded:
            # Every name case-folded between NULs, each its own: a few calls whatever the number
            # of cookies (a name holding the NUL the parser refuses only adds occurrences).
            folded = "\x00" + "\x00\x00".join(jar).casefold() + "\x00"
        spelled = f"\x00{name.casefold()}\x00"
        if name not in jar:
            if spelled in folded:
                return name  # only other spellings of it (``SESSION``)
        elif jar[name] is AMBIGUOUS or folded.count(spelled) > 1:
            return name  # (or beside another spelling: ``bucket=A; Bucket=EVIL``)
    return None


def decoded_readings(value: str) -> tuple[str, str]:
    """The other readings of a cookie value with ``%`` or ``+`` in it: percent-decoded
    (ASP.NET Core, Express, Rack) and percent-decoded with ``+`` as a space (PHP).

    A condition comparing the value (equals, regex) that holds on some of these and on the raw
    value and not on others decides otherwise for some origin: ``preview=%31`` is ``1`` to
    them, not to an ``equals: "1"`` bypass rule, and the draft was stored for everyone. One that
    agrees on all of them (``C0004(%3A|:)1`` on a OneTrust consent cookie) is safe to trust.

    >>> decoded_readings("C0004%3A1+x")
    ('C0004:1+x', 'C0004:1 x')
    """
    return percent_decode(value), percent_decode(value.replace("+", " "))


_CHARACTER_NAMES = {"\n": "a newline (\\n)", "\r": "a carriage return (\\r)", "\t": "a tab (\\t)",
                    " ": "a space", "\x00": "a NUL (\\x00)"}


def _character(c: str) -> str:
    return _CHARACTER_NAMES.get(c) or f"the character U+{ord(c):04X}"


def unsendable(value: str) -> str | None:
    """Why no client can send ``value`` as the last word of a field value (a bearer token), or
    None when one can: whitespace at either end (parsers strip it: RFC 9110 §5.5, and the admin
    API strips whatever ``str.strip`` does), or a control character anywhere (CR and LF end the
    field; the others are refused by parsers and client libraries). Never quotes ``value``,
    which may be a secret.

    >>> unsendable("s3cret-token"), unsendable("s3cret token")
    (None, None)
    >>> unsendable("s3cret\\n"), unsendable(" s3cret")
    ('ends with a newline (\\\\n)', 'starts with a space')
    >>> unsendable("s3\\x07cret")
    'holds the character U+0007 (a control character) at offset 2'
    """
    if value and value[-1] != value[-1].strip():
        return f"ends with {_character(value[-1])}"
    if value and value[0] != value[0].strip():
        return f"starts with {_character(value[0])}"
    for i, c in enumerate(value):
        if c < " " or c == "\x7f":
            return f"holds {_character(c)} (a control character) at offset {i}"
    return None


def latin1_unless_utf8(value: str) -> str | None:
    """A field value whose bytes are not UTF-8, read as Latin-1 (each byte one character, as
    RFC 9110 §5.5's obs-text was historically); None when the value is text as it is (ASCII,
    or valid UTF-8: the common case, one flag read for ASCII).

    The parsers decode a field's bytes as UTF-8 with ``surrogateescape``, so a byte that is not
    part of UTF-8 arrives as a lone surrogate, which no index (SQLite), JSON answer or purge
    request can hold. Read as Latin-1 the value is text again, and still tells every byte
    sequence apart (Latin-1 is one character per byte).

    >>> latin1_unless_utf8("caf\\udce9"), latin1_unless_utf8("café"), latin1_unless_utf8("cafe")
    ('café', None, None)
    """
    if value.isascii():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        try:
            raw = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate no byte decodes to (not from a parser): as SQLite would
            raw = value.encode("utf-8", "surrogatepass")
        return raw.decode("latin-1")
    return None
