"""The primary cache key and Vary variant selection (RFC 9111 §2, §4.1).

The primary key is the request's absolute URI as the client addressed it:
scheme, the client's Host (lower-cased, default port dropped) and the raw request
target. GET and HEAD share it (a HEAD is answered from the stored GET); other
methods are never looked up. Rules may reshape the key (query filtering, extra
headers or cookies) with a ``KeySpec``.

Variants: a stored response's ``Vary`` names request fields; the values those
fields had are stored normalised, and a later request selects a variant only
when every value matches (an absent field matches only an absent field).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlencode

from proxy.policy.cache_control import split_directives
from proxy.policy.messages import HeaderList, Headers, RequestHead

ABSENT = "\n"  # a value no header can have: marks a Vary field the request lacked


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


def normalise_host(host: str, scheme: str) -> str:
    """Lower-case a Host value, drop a trailing dot, leading zeros of the port and the
    scheme's default port: every spelling of one host gives one key.

    >>> normalise_host("Example.COM:80", "http"), normalise_host("a.b:8443", "https")
    ('example.com', 'a.b:8443')
    >>> normalise_host("example.com.:0080", "http"), normalise_host("[::1]:443", "https")
    ('example.com', '[::1]')
    """
    name, port = split_host(host.strip(" \t").lower())
    if not name.startswith("["):
        name = name.rstrip(".")
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


def _cookie_value(headers: Headers, name: str) -> str | None:
    for line in headers.getall("Cookie", ()):
        for part in line.split(";"):
            k, eq, v = part.strip().partition("=")
            if eq and k == name:
                return v
    return None


def cache_key(request: RequestHead, spec: KeySpec = DEFAULT_KEY) -> str:
    """The primary key for ``request`` under ``spec``.

    >>> from multidict import CIMultiDict
    >>> head = RequestHead("GET", "https", "example.com", "/a?b=2&a=1", CIMultiDict())
    >>> cache_key(head)
    'https://example.com/a?b=2&a=1'
    >>> cache_key(head, KeySpec(query_include=("a", "b"), query_sort=True))
    'https://example.com/a?a=1&b=2'
    """
    if spec is DEFAULT_KEY:
        return f"{request.scheme}://{request.host}{request.target}"
    path, _, query = request.target.partition("?")
    if spec.lowercase_path:
        path = path.lower()
    query = _filter_query(query, spec)
    key = f"{request.scheme}://{request.host}{path}"
    if query:
        key += "?" + query
    for name in spec.headers:
        values = request.headers.getall(name, ())
        key += f"\x1fh:{name.lower()}={normalise_field(values)}"
    for name in spec.cookies:
        value = _cookie_value(request.headers, name)
        key += f"\x1fc:{name}={'' if value is None else value}"
    return key


def url_of_key(key: str) -> str:
    """The URL part of a key (the key minus the extra header and cookie parts)."""
    return key.split("\x1f", 1)[0]


def normalise_field(values: list[str] | tuple[str, ...]) -> str:
    """Combine field lines and normalise list whitespace (RFC 9111 §4.1).

    >>> normalise_field(["1,2"]) == normalise_field([" 1 ,  2 "]) == normalise_field(["1", "2"])
    True
    >>> normalise_field(["text/html ; q=0.5"])
    'text/html;q=0.5'
    """
    if not values:
        return ABSENT
    items = split_directives(", ".join(values))
    return ", ".join(";".join(" ".join(p.split()) for p in item.split(";")) for item in items)


# Selecting fields whose values are case-insensitive tokens (language tags, content
# codings), so that RFC 9111 §4.1's case normalisation can be applied to them.
CASE_INSENSITIVE_FIELDS = frozenset({"accept-language", "accept-encoding"})


def normalise_selecting(name: str, values: list[str] | tuple[str, ...]) -> str:
    """A Vary selecting field's value, normalised as RFC 9111 §4.1 allows.

    >>> normalise_selecting("accept-language", ["eN, De"])
    'en, de'
    >>> normalise_selecting("foo", ["eN, De"])
    'eN, De'
    """
    value = normalise_field(values)
    return value.lower() if name.lower() in CASE_INSENSITIVE_FIELDS else value


def vary_names(headers: Headers) -> tuple[str, ...] | None:
    """The field names a response varies on, lower-cased and sorted; None for ``Vary: *``."""
    names: set[str] = set()
    for line in headers.getall("Vary", ()):
        for name in line.split(","):
            name = name.strip().lower()
            if name == "*":
                return None
            if name:
                names.add(name)
    return tuple(sorted(names))


def variant_of(names: tuple[str, ...], request_headers: Headers) -> HeaderList:
    """The normalised values of the selecting fields, as stored beside a response."""
    return tuple((name, normalise_selecting(name, request_headers.getall(name, ()))) for name in names)


def vary_matches(stored_vary: HeaderList, request_headers: Headers) -> bool:
    """Do the request's selecting fields match the stored ones (RFC 9111 §4.1)?"""
    return all(
        normalise_selecting(name, request_headers.getall(name, ())) == value
        for name, value in stored_vary
    )
