"""The primary cache key and Vary variant selection (RFC 9111 §2, §4.1).

The primary key is the request's absolute URI as the client addressed it:
scheme, the client's Host (lower-cased, default port dropped) and the raw request
target. GET and HEAD share it (a HEAD is answered from the stored GET); other
methods are never looked up. Rules may reshape the key (query filtering, extra
headers or cookies) with a ``KeySpec``.

Variants: a stored response's ``Vary`` names request fields; the values those
fields had are stored normalised, and a later request selects a variant only
when every value matches (an absent field matches only an absent field).

Normalised only where the meaning is known to be the same (RFC 9111 §4.1), which
``normalise_selecting`` decides for the variant and for a rule's ``key.headers``
alike: a field defined as a list, sent on one line with no empty member. Anything
else is compared as written, field lines kept apart: origins read repeated lines and
empty members differently (Express, Django and Go's ``Header.Get`` take the first
line; Node and WSGI join them; an exact allow-list sees ``https://a.example,``
as another value), so an attacker's ``Origin: ,`` line beside the real one, or an
empty ``Accept-Language`` line before ``en``, must never select the variant of the
value without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from ipaddress import IPv6Address
from urllib.parse import parse_qsl, quote, urlencode

from proxy.policy.fields import cookies, is_token, latin1_unless_utf8, split_list
from proxy.policy.messages import HeaderList, Headers, RequestHead

ABSENT = "\n"  # a value no header can have: marks a Vary field the request lacked


def shown_vary(vary: HeaderList) -> dict[str, str | None]:
    """A variant's Vary fields for the admin API's JSON: a field the request lacked is null,
    never ABSENT's newline (which /explain and /cache showed as ``"\\n"``)."""
    return {name: None if value == ABSENT else value for name, value in vary}


@dataclass(frozen=True, slots=True)
class KeySpec:
    """How a rule reshapes the key; the default keeps the URI as it is."""

    query_include: tuple[str, ...] | None = None
    query_exclude: tuple[str, ...] = ()
    query_sort: bool = False
    query_ignore: bool = False
    headers: tuple[str, ...] = ()
    cookies: tuple[str, ...] = ()
    lowercase_path: bool = False
    # A keyed name holds ``_``: a request without one in its names may spell it otherwise too
    # (``proxy.rules.plan.RuleSet._keyed_once``). Derived, at load.
    underscores: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "underscores", any("_" in name for name in self.headers))

    @property
    def is_default(self) -> bool:
        return self == DEFAULT_KEY


DEFAULT_KEY = KeySpec()


def split_host(host: str) -> tuple[str, str]:
    """(name, port) of a host[:port] value; the port is "" when absent.

    >>> split_host("a.example:8080"), split_host("[::1]:443"), split_host("[::1]")
    (('a.example', '8080'), ('[::1]', '443'), ('[::1]', ''))
    """
    if host.startswith("["):
        end = host.find("]") + 1
        if end and host[end:end + 1] == ":":
            return host[:end], host[end + 1:]
        return host, ""
    name, _, port = host.partition(":")
    return name, port


def ip_literal(name: str) -> str | None:
    """The RFC 5952 text form of an IPv6 literal ``[...]`` (compressed, lower case; an
    IPv4-mapped address as ``::ffff:a.b.c.d``, RFC 5952 §5, spelt here so that the key does not
    change with the Python version: 3.13 writes it so, earlier ones as ``::ffff:7f00:1``); None
    when the brackets hold no IPv6 address. ``[0:0::1]``, ``[::0001]`` and ``[::1]`` are one
    host, so they must be one key, and a purge of one must reach the others.

    >>> ip_literal("[0:0:0:0:0:0:0:1]"), ip_literal("[::FFFF:7F00:1]"), ip_literal("[1:2:3]")
    ('[::1]', '[::ffff:127.0.0.1]', None)
    """
    if "%" in name:  # a zone (RFC 6874): for the sender's own interfaces, never in a Host
        return None
    try:
        address = IPv6Address(name[1:-1])
    except ValueError:
        return None
    if address.ipv4_mapped is not None:
        return f"[::ffff:{address.ipv4_mapped}]"
    return f"[{address.compressed}]"


def bracket_problem(host: str) -> str | None:
    """Why a configured host (``admin.hosts``, a rule's ``match.host``) holding ``[`` or ``]``
    is refused, or None: a Host whose brackets hold no IPv6 address is answered 400 before any
    rule or admin check sees it, so such a pattern was kept and never held (an admin name
    silently refused, a rule that never applied).

    >>> [bracket_problem(h) for h in ("[::1]:8080", "a.example", "[0:0::FFFF:7F00:1]")]
    [None, None, None]
    >>> bracket_problem("[1:2:3]")
    'the brackets hold no IPv6 address: no Host field can name it (one that does is answered 400)'
    >>> bracket_problem("[::1]:")
    "no port after the ':': drop it or add the port"
    """
    if "[" not in host and "]" not in host:
        return None
    if host.startswith("*."):
        return "an IPv6 address has no names under it: write it without *."
    end = host.find("]")
    if not host.startswith("[") or end < 0 or "[" in host[1:] or "]" in host[end + 1:]:
        return "brackets enclose one whole IPv6 address: [2001:db8::1] or [2001:db8::1]:8080"
    name, rest = host[:end + 1], host[end + 1:]
    if "%" in name:
        return "a zone (%...) names one of the sender's own interfaces: no Host field carries one"
    if ip_literal(name) is None:
        return "the brackets hold no IPv6 address: no Host field can name it (one that does is answered 400)"
    if rest == ":":
        return "no port after the ':': drop it or add the port"
    if rest and not re.fullmatch(r":[0-9]+", rest):
        return "only a :PORT may follow the ']'"
    return None


def literal_in(host: str) -> str:
    """``host`` (a ``[v6][:port]`` or any pattern) with its IPv6 literal in the ``ip_literal``
    form: a configured host (a rule's ``match.host``, ``admin.hosts``) must be written as the
    requests it is compared with are, or ``[0:0::1]`` would never match one.

    >>> literal_in("[0:0::1]:8080"), literal_in("[::A]"), literal_in("*.a.example")
    ('[::1]:8080', '[::a]', '*.a.example')
    """
    if not host.startswith("["):
        return host
    name, port = split_host(host.lower())
    name = ip_literal(name) or name
    return f"{name}:{port}" if port else name


def normalise_host(host: str, scheme: str) -> str:
    """Lower-case a Host value, drop a trailing dot, leading zeros of the port and the
    scheme's default port, write an IPv6 literal in its one form (``ip_literal``): every
    spelling of one host gives one key.

    An IPv4 address written otherwise than in dotted decimal (``127.0.0.01``, ``2130706433``,
    ``0x7f.1``) is kept as written: RFC 3986 §3.2.2 reads it as a registered name, and origins
    disagree on its meaning (``inet_aton`` reads ``010`` as octal 8, others as 10); the origin
    receives the spelling the key holds.

    >>> normalise_host("Example.COM:80", "http"), normalise_host("a.b:8443", "https")
    ('example.com', 'a.b:8443')
    >>> normalise_host("example.com.:0080", "http"), normalise_host("[::1]:443", "https")
    ('example.com', '[::1]')
    >>> normalise_host("[0:0::0001]:8080", "http"), normalise_host("127.0.0.01", "http")
    ('[::1]:8080', '127.0.0.01')
    """
    name, port = split_host(host.strip(" \t").lower())
    if not name.startswith("["):
        name = name.rstrip(".")
    elif name.endswith("]"):
        name = ip_literal(name) or name
    if port.isascii() and port.isdigit():
        port = str(int(port))
    if port in ("", "80" if scheme == "http" else "443"):
        return name
    return f"{name}:{port}"


def _filter_query(query: str, spec: KeySpec) -> str:
    if spec.query_ignore or not query:
        return ""
    pairs = parse_qsl(query, keep_blank_values=True)
    if spec.query_include is not None:
        wanted = set(spec.query_include)
        pairs = [(k, v) for k, v in pairs if k in wanted]
    if spec.query_exclude:
        unwanted = set(spec.query_exclude)
        pairs = [(k, v) for k, v in pairs if k not in unwanted]
    if spec.query_sort:
        pairs.sort()
    return urlencode(pairs, quote_via=quote)


_ESCAPED_LETTER = re.compile(r"%(?:4[1-9A-Fa-f]|5[0-9Aa]|6[1-9A-Fa-f]|7[0-9Aa])")


def lower_path(path: str) -> str:
    """A path lower-cased for ``key.lowercase_path``, a percent-escaped letter decoded first
    (RFC 3986 §6.2.2.2: ``%41`` is ``A``): the origin decodes ``/%41ccount`` to ``/Account``,
    so the rules and the key must read it as ``/account`` too.

    >>> lower_path("/%41ccount/Profile%2F%7a")
    '/account/profile%2fz'
    """
    if "%" in path:
        path = _ESCAPED_LETTER.sub(lambda m: chr(int(m.group()[1:], 16)), path)
    return path.lower()


def cache_key(request: RequestHead, spec: KeySpec = DEFAULT_KEY) -> str:
    """The primary key for ``request`` under ``spec``.

    >>> from multidict import CIMultiDict
    >>> head = RequestHead("GET", "https", "example.com", "/a?b=2&a=1", CIMultiDict())
    >>> cache_key(head)
    'https://example.com/a?b=2&a=1'
    >>> cache_key(head, KeySpec(query_include=("a", "b"), query_sort=True))
    'https://example.com/a?a=1&b=2'

    A keyed field's value is a ``h:`` part; one whose bytes are not UTF-8 (a Latin-1
    ``d\\xe9``, which the parser hands over as a lone surrogate) is an ``H:`` part with the
    bytes read as Latin-1: a key any index can hold, never equal to the key of another byte
    sequence (the UTF-8 ``dé`` is an ``h:`` part).

    >>> lang = KeySpec(headers=("Accept-Language",))
    >>> [cache_key(head._replace(headers=CIMultiDict({"Accept-Language": v})), lang).split("\\x1f")[1]
    ...  for v in ("d\\udce9", "dé")]
    ['H:accept-language=dé', 'h:accept-language=dé']
    """
    if spec is DEFAULT_KEY:
        return f"{request.scheme}://{request.host}{request.target}"
    path, _, query = request.target.partition("?")
    if spec.lowercase_path:
        path = lower_path(path)
    query = _filter_query(query, spec)
    key = f"{request.scheme}://{request.host}{path}"
    if query:
        key += "?" + query
    for name in spec.headers:
        selecting = normalise_selecting(name, request.headers.getall(name, ()))
        octets = latin1_unless_utf8(selecting)
        if octets is None:
            key += f"\x1fh:{name.lower()}={selecting}"
        else:  # bytes that are not UTF-8: their own part kind, so no UTF-8 text can equal them
            key += f"\x1fH:{name.lower()}={octets}"
    if spec.cookies:
        jar = cookies(request.headers.getall("Cookie", ()))
        for name in spec.cookies:
            value = jar.get(name)
            # (an absent cookie and an empty one are told apart: an origin may answer them differently;
            # an AMBIGUOUS one never gets here: RuleSet.plan bypasses such a request)
            key += f"\x1fc:{name}" if value is None else f"\x1fc:{name}={value}"
    return key


def url_of_key(key: str) -> str:
    """The URL part of a key (the key minus the extra header and cookie parts)."""
    return key.split("\x1f", 1)[0]


def normalise_field(values: list[str] | tuple[str, ...]) -> str:
    """Combine field lines and normalise list whitespace (RFC 9110 §5.6.1). Only for a list
    field's one line without empty members: ``normalise_selecting`` decides.

    >>> normalise_field(["1,2"]) == normalise_field([" 1 ,  2 "]) == normalise_field(["1", "2"])
    True
    >>> normalise_field(["text/html ; q=0.5"])
    'text/html;q=0.5'
    """
    if not values:
        return ABSENT
    items = split_list(values)
    return ", ".join(";".join(" ".join(p.split()) for p in item.split(";")) for item in items)


_OWS = " \t"


def _normalise_accept(values: list[str] | tuple[str, ...], codings: bool = False) -> str | None:
    """An Accept-* value (one field line) with the whitespace the grammar allows around its
    members and their ``;`` (RFC 9110 §5.6.1, §5.6.6, §12.4.2) taken out; None when a member
    holds a quoted string (then it is compared as written).

    Nothing else: origins do not read the rest alike. The order is kept, equal weights or not
    (PHP's ``substr($_SERVER['HTTP_ACCEPT_LANGUAGE'], 0, 2)``, and any reader of the first
    member, answers ``en;q=0.5, de`` in English and ``de, en;q=0.5`` in German); so is case
    (language tags match case-insensitively, RFC 4647 §2, but a PHP or JavaScript string
    comparison does not); so are weights as written (``q=1.0``, ``q=0.500``: a reader of the
    raw value sees other text), members listed twice, ``x-gzip`` beside ``gzip``, and any
    whitespace around ``=``, which the grammar does not allow and parsers read differently.
    """
    members: list[str] = []
    for member in split_list(values):
        if '"' in member:
            return None
        members.append(";".join(part.strip(_OWS) for part in member.split(";")))
    if codings and len({m.split(";", 1)[0].lower() for m in members}) == len(members):
        # Accept-Encoding (``codings``) is a set: whichever coding an origin takes from it, every
        # client that sent the same members accepts it, and a coding's weight is no taste of a
        # reader's (gzip or br decode alike). A coding listed twice is kept in order: a reader of
        # the first and one of the last disagree on whether it is refused (``gzip, gzip;q=0``).
        members.sort()
    return ", ".join(members)


ACCEPT_FIELDS = frozenset({"accept", "accept-encoding", "accept-language", "accept-charset"})
# Request fields RFC 9110 and RFC 9111 define as lists (``#element``: members and their
# parameters may have whitespace around them, field lines are one list). Any other field
# (``Origin``, ``Cookie``, ``User-Agent``, ``Authorization``, an application's own) may give
# a comma or a space a meaning of its own: it is compared as written.
LIST_FIELDS = ACCEPT_FIELDS | frozenset({"cache-control", "pragma", "if-match", "if-none-match", "expect",
                                         "content-encoding", "content-language"})
_EMPTY_MEMBER = re.compile(r"(?:^|,)[ \t]*(?:,|$)")  # "", ",a", "a,,b", "a, ": a member with nothing in it
_NORMALISED: dict[tuple[str, tuple[str, ...]], str] = {}  # a few browsers' values, over and over
_NORMALISED_MAX = 4096
MEMO_VALUE_MAX = 256  # bytes of a value the memo keeps: browsers' Accept-* values are shorter
SELECTING_VALUE_MAX = 4096  # bytes of a selecting value normalised member by member


def raw_selecting(values: list[str] | tuple[str, ...]) -> str:
    """A selecting value as written: one field line as received; several lines each ended
    by LF (no field value holds one), so ``a, b`` on one line, ``a`` and ``b`` on two, and
    ``a,`` and ``b`` stay three values, and two empty lines are not ABSENT.

    Comparing as written is correct (RFC 9111 §4.1 allows normalisation, it does not
    require it): equal text is an equal value, and the worst a different spelling of the
    same value costs is a miss. It cannot wrongly equal a normalised value either: a
    normalised value is one line without empty members, and if the two texts were equal
    the raw one would be one of that value's own spellings.

    >>> raw_selecting(["a, b"]), raw_selecting(["a", "b"]), raw_selecting(["", ""]) != ABSENT
    ('a, b', 'a\\nb\\n', True)
    """
    if len(values) == 1:
        return values[0]
    return "".join(f"{value}\n" for value in values)


def selecting_size(values: list[str] | tuple[str, ...]) -> int:
    """The bytes a selecting value's normalisation would walk (a line counts one more)."""
    return sum(map(len, values)) + len(values)


def normalise_selecting(name: str, values: list[str] | tuple[str, ...]) -> str:
    """A request field's value as a Vary variant and a rule's ``key.headers`` compare it:
    normalised only where RFC 9111 §4.1 allows, that is where the meaning is known to be the
    same. A list field (``LIST_FIELDS``) sent on one line without an empty member: whitespace
    around members and parameters, never their case, nor their order but Accept-Encoding's (a
    set: see ``_normalise_accept``).
    Anything else is compared as written (``raw_selecting``): several lines, an empty member,
    a field not known to be a list, or a value longer than 4 KB (its cost stays that of
    reading it once).

    Every hit on a response that varies runs this for the request's value, so the
    Accept-* results are remembered (a handful of distinct browser values make up nearly
    all traffic; only values of up to 256 bytes are kept, and the memo is cleared when it
    reaches 4096 entries: ~2 MB at most, however long the values sent).

    >>> normalise_selecting("accept-language", ["de , en ;q=0.5"])
    'de, en;q=0.5'
    >>> normalise_selecting("accept-language", ["en;q=0.5, De"])
    'en;q=0.5, De'
    >>> normalise_selecting("accept-encoding", ["gzip, br;q=0.9 , zstd"])
    'br;q=0.9, gzip, zstd'
    >>> normalise_selecting("cache-control", ["no-cache ,max-age=0"])
    'no-cache, max-age=0'
    >>> normalise_selecting("origin", ["https://a.example,"])
    'https://a.example,'
    >>> normalise_selecting("accept-language", ["", "en"])
    '\\nen\\n'
    >>> normalise_selecting("accept-language", ["u\u212a"]) == normalise_selecting("accept-language", ["uk"])
    False
    """
    if not values:
        return ABSENT
    lname = name.lower()
    if lname not in ACCEPT_FIELDS:
        if (lname not in LIST_FIELDS or len(values) != 1 or len(values[0]) >= SELECTING_VALUE_MAX
                or not values[0].isascii() or _EMPTY_MEMBER.search(values[0]) is not None):
            return raw_selecting(values)
        return normalise_field(values)
    memo_key = (lname, tuple(values))
    known = _NORMALISED.get(memo_key)
    if known is not None:
        return known
    size = selecting_size(values)
    if size > SELECTING_VALUE_MAX:
        return raw_selecting(values)
    value = None
    # Past ASCII, as written: an origin's ASCII grammar may read such a value in ways of its own.
    if len(values) == 1 and values[0].isascii() and _EMPTY_MEMBER.search(values[0]) is None:
        value = _normalise_accept(values, lname == "accept-encoding")
    if value is None:
        value = raw_selecting(values)
    if size <= MEMO_VALUE_MAX:
        if len(_NORMALISED) >= _NORMALISED_MAX:
            _NORMALISED.clear()
        _NORMALISED[memo_key] = value
    return value


def vary_names(headers: Headers) -> tuple[str, ...] | None:
    """The field names a response varies on, lower-cased and sorted; None when no request can
    be matched on them (RFC 9111 §4.1): ``Vary: *``, or a member that is not a field name
    (RFC 9110 §5.1: a token), such as ``"Cookie"``, ``Cookie;x=1`` or ``Coo kie``. Taken as
    written, such a member names a field no request carries, so every client would match the
    variant stored for the first (the origin meant ``Cookie``); Varnish makes such a response
    a pass too. ``vary_refusal`` says which of the two it was.

    >>> from multidict import CIMultiDict
    >>> vary_names(CIMultiDict(Vary="Cookie, accept-encoding")), vary_names(CIMultiDict(Vary='"Cookie"'))
    (('accept-encoding', 'cookie'), None)
    """
    names: set[str] = set()
    for member in split_list(headers.getall("Vary", ())):
        if member == "*" or not is_token(member):
            return None
        names.add(member.lower())
    return tuple(sorted(names))


def vary_refusal(headers: Headers) -> str:
    """Why ``vary_names`` found no fields to match on, as a Cache-Status detail: ``VARY-STAR``,
    or ``VARY-INVALID`` for a member that is not a field name (and no ``*``)."""
    members = split_list(headers.getall("Vary", ()))
    return "VARY-STAR" if "*" in members else "VARY-INVALID"


def variant_of(names: tuple[str, ...], request_headers: Headers) -> HeaderList:
    """The normalised values of the selecting fields, as stored beside a response."""
    return tuple((name, normalise_selecting(name, request_headers.getall(name, ()))) for name in names)


def vary_matches(stored_vary: HeaderList, request_headers: Headers,
                 mine: dict[str, str] | None = None) -> bool:
    """Do the request's selecting fields match the stored ones (RFC 9111 §4.1)?

    ``mine`` remembers the request's normalised values between calls: pass one dict for
    all the candidates of a lookup, and each selecting field is normalised once, not once
    per stored variant.
    """
    for name, value in stored_vary:
        if mine is None:
            own = normalise_selecting(name, request_headers.getall(name, ()))
        else:
            known = mine.get(name)
            if known is None:
                known = mine[name] = normalise_selecting(name, request_headers.getall(name, ()))
            own = known
        if own != value:
            return False
    return True


PART_SUFFIX = "\x1fpart"


def part_key(key: str) -> str:
    """Where the parts (206 responses) of a key's representations are stored: an entry of
    its own beside the key's, so the hit path and storage never meet a part by accident."""
    return key + PART_SUFFIX


def whole_key(key: str) -> str:
    return key.removesuffix(PART_SUFFIX)
