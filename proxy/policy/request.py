"""One view of the client's request, computed once, first; and the request sent upstream from it.

Why one view: the cache key, the rules, the Vary variant, storability and the request
sent to the origin used to be computed from different readings of the client's message
(the raw Host here, the absolute-form authority there, the fields ``Connection`` names
removed on the way out but not before the key). Where two readings disagree, an
attacker chooses what the origin sees while the cache files the answer under what an
innocent client will ask for (web cache poisoning). So ``normalise_request`` turns the
parsed message into the ``RequestHead`` cachegate will send upstream, before anything
else looks at it, and ``upstream_request`` builds the origin's request from that head
alone (plus the peer's address for ``X-Forwarded-For``). Rules, key, variant,
storability, ``explain`` and the fast hit path all read the same head.

What normalisation does, in order (each refusal is a ``Refusal`` with its status):

- the whole head is capped: request line plus fields over ``Listener.max_head`` is 431
  (aiohttp's parser caps each line and the number of fields, not their total);
- ``Transfer-Encoding`` must be exactly ``chunked`` (nginx's rule, RFC 9112 §6.1): any
  other coding is 501, a list (``gzip, chunked``) or a repeated field 400, and any
  ``Transfer-Encoding`` in an HTTP/1.0 request 400 (that version has no such field, so
  two parsers would frame the body differently);
- ``Connection`` (RFC 9110 §7.6.1): the fields it names and the hop-by-hop fields are
  removed; naming ``Host``, ``Content-Length`` or ``Transfer-Encoding`` is 400, since
  removing those would change which host or which body the request means;
- ``Expect`` in an HTTP/1.0 request is removed: that version has no such field, and a
  100-continue expectation in it must be ignored (RFC 9110 §10.1.1), which the origin, on an
  HTTP/1.1 connection from cachegate, could not know to do;
- forwarding fields are dropped unless the peer is in ``trusted_proxies``: every
  ``X-Forwarded*`` by prefix and every name in ``FORWARDING_FIELDS`` (client-IP, scheme,
  host, URL and method-override families, ``Forwarded``, ``Via``,
  ``Surrogate-Capability``): cachegate sets its own ``X-Forwarded-For/-Proto/-Host``
  and ``Via``; a trusted peer's scheme fields (``SCHEME_FIELDS``) set the scheme, and
  ``upstream_request`` sends only scheme fields that agree with it;
- the target: a ``#fragment`` is dropped (it is never sent, RFC 9110 §4.2.5);
  absolute-form (RFC 9112 §3.2.2) gives the authority, which replaces ``Host``
  (RFC 9110 §7.2); userinfo in it is 400 (§4.2.4); ``OPTIONS *`` is the only other
  form;
- ``Host``: an HTTP/1.1 request needs exactly one valid ``Host`` (RFC 9112 §3.2: 400
  otherwise, also beside an absolute-form target); an HTTP/1.0 request without one
  gets the listen address. The host is normalised (case, trailing dot, default port,
  leading zeros of the port, an IPv6 literal's spelling) and written back into the head in that form, so the
  origin receives exactly the host the key names.

Cost: a plain origin-form GET with one normalised Host and no field to remove returns
the parsed fields object as it is (a copy is made only when a field must go). Whether a
list of field names needs any work is decided once per distinct list (browsers send the
same names in the same order on every request) and remembered in a bounded table, as is
what each Connection line names; per request that leaves joining the names, a dictionary
lookup, the size sum and the Host lookup. Measured with ``python -m timeit -p`` against
the view this replaced (docs/requests.md): 1.13 -> 1.37 µs for a benchmark client's GET,
1.13 -> 1.62 µs for a browser's 12 fields; a field to remove means a copy (2.7 µs with a
browser's ``Connection: keep-alive``, 3.5 µs with forwarding fields and a Host to rewrite).

>>> from multidict import CIMultiDict
>>> msg = Message("GET", "http://Shop.Example:80/a#top", (1, 1),
...               CIMultiDict({"Host": "evil.example", "X-Forwarded-Host": "evil.example"}))
>>> head = normalise_request(msg, secure=False, trusted=False, listener=Listener("127.0.0.1:8080"))
>>> head.host, head.target, list(head.headers.items())
('shop.example', '/a', [('Host', 'shop.example')])
>>> normalise_request(Message("GET", "/", (1, 1), CIMultiDict({"Host": "a", "Connection": "host"})),
...                   secure=False, trusted=False, listener=Listener("127.0.0.1:8080"))
Refusal(status=400, reason='Connection names Host: removing it would change what the request means')
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.policy.cache_control import SURROGATE_CAPABILITY
from proxy.policy.fields import digits
from proxy.policy.headers import HOP_BY_HOP
from proxy.policy.keys import KeySpec, cache_key, ip_literal, normalise_host, split_host, url_of_key
from proxy.policy.messages import HeaderList, Headers, RequestHead
from proxy.policy.ranges import request_range

# Client-IP, scheme/TLS, host, URL-rewrite and method-override fields that proxies, CDNs
# and frameworks read, besides every X-Forwarded* (dropped by prefix). An origin that
# trusts one of them can be made to answer differently by a field the key never sees.
FORWARDING_PREFIX = "x-forwarded"
FORWARDING_FIELDS = frozenset({
    # the standard ones
    "forwarded", "via",
    # client IP
    "x-real-ip", "true-client-ip", "cf-connecting-ip", "cf-connecting-ipv6", "fastly-client-ip",
    "x-client-ip", "x-cluster-client-ip", "client-ip", "x-originating-ip", "x-remote-ip",
    "x-remote-addr", "x-proxyuser-ip", "x-azure-clientip", "x-azure-socketip", "x-arr-clientip",
    "x-envoy-external-address", "akamai-client-ip", "x-appengine-user-ip",
    # ingress-nginx's (and others') copy of the X-Forwarded-For it replaced: an origin behind
    # it reads the client IP there
    "x-original-forwarded-for",
    # scheme and TLS
    "front-end-https", "x-url-scheme", "x-scheme", "x-arr-ssl", "cf-visitor", "x-https",
    # host
    "x-original-host", "x-host", "x-http-host-override",
    # URL rewriting
    "x-original-url", "x-rewrite-url", "x-original-uri", "x-envoy-original-path",
    # method override
    "x-http-method-override", "x-http-method", "x-method-override", "x-original-method",
    # Edge Architecture: the devices an origin may target with Surrogate-Control
    "surrogate-capability",
})  # fmt: skip
# A Connection that names one of these would change which host or which body is meant.
CONNECTION_MAY_NOT_NAME = {"host": "Host", "content-length": "Content-Length",
                           "transfer-encoding": "Transfer-Encoding"}
# The client's preconditions (RFC 9110 §13.1): a request forwarded without being stored
# (hit-for-pass) carries them, so the origin evaluates them (§13.2.1); a fill never does.
PRECONDITIONS = frozenset({"if-none-match", "if-modified-since", "if-match", "if-unmodified-since"})
# Never forwarded, on any request: Request-Range, the pre-standard Range (Netscape's, RFC 9110
# defines only Range) that Apache httpd's byterange filter still honours. cachegate reads only
# Range (as nginx and Varnish do), so the 206 such an origin answers is to a request without
# Range for cachegate: an invalid response (``proxy.upstream``), a 502 for the client and a
# passive failure of an upstream every client shares. Dropped, the request gets the whole 200.
NEVER_FORWARDED = frozenset({"request-range"})
# A fill asks for the full representation; the client's conditionals and ranges are
# answered from the stored response afterwards. It sends no body: no Expect. A name with ``_``
# is dropped when it reads as one of these with ``_`` as ``-`` (``If_None_Match``: a CGI, WSGI
# or Rack origin reads it as HTTP_IF_NONE_MATCH, ``proxy.policy.spellings``). Either would get
# a fill a 304 or 206 it cannot store, an invalid answer for every client of the fetch.
FILL_DROPS = PRECONDITIONS | NEVER_FORWARDED | {"if-range", "range", "expect"}
# A hit-for-pass key's request keeps the preconditions and the range too (``PASSING``): the origin
# answers them (a 304, a 412, a 206, a 416: relayed, never stored); only a full 200 may still end
# the pass and be stored. Without its Range such a request (a resume with If-Range, a
# conditional range) cost the origin the whole body each time, as a plain range of a passing key
# never did (it goes with its Range: ``proxy.policy.partial.decide_range_fetch``).
PASSING = PRECONDITIONS | {"range", "if-range"}
PASSING_DROPS = FILL_DROPS - PASSING
# ... but only one range the proxy itself would answer (``ranges.request_range``): 50 overlapping
# ranges went on verbatim when the request also carried a conditional (RangeAmp's overlapping
# ranges; without one, they were dropped as a plain range of a passing key's are). Several
# ranges get the whole 200, as from a stored response.
PASSING_ONE_RANGE_DROPS = FILL_DROPS - PRECONDITIONS
# What ``upstream_request`` never copies from the head: hop-by-hop fields, those it sets itself
# (Host, X-Request-Id) and ``NEVER_FORWARDED``; one set lookup per field.
_NOT_COPIED = HOP_BY_HOP | NEVER_FORWARDED | {"host", "x-request-id"}
# HTTP/1.0 has no Expect, and a server ignores a 100-continue in an HTTP/1.0 request (RFC 9110
# §10.1.1): cachegate forwards over HTTP/1.1, where the origin would honour it (a 100, or a wait
# for the body), so the field does not go on.
EXPECT = frozenset({"expect"})
DEFAULT_MAX_HEAD = 32 * 1024

_HOST = re.compile(r"(?:[a-z0-9._~!$&'()*+,;=-]+|\[[0-9a-f:.]+\])(?::[0-9]{0,5})?")
_MULTI_SLASH = re.compile(r"//+")


class RequestMessage(Protocol):
    """A parsed request message: aiohttp's ``RawRequestMessage`` is one."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...  # the request target as received
    @property
    def version(self) -> tuple[int, int]: ...
    @property
    def headers(self) -> Headers: ...


@dataclass(frozen=True, slots=True)
class Message:
    """A ``RequestMessage`` built by hand (the general path's aiohttp request, ``explain``)."""

    method: str
    path: str
    version: tuple[int, int]
    headers: Headers


@dataclass(frozen=True, slots=True)
class Listener:
    """What normalisation knows of the listener the request came in on (one per config)."""

    default_host: str  # the Host of an HTTP/1.0 request that sent none: the listen address
    max_head: int = DEFAULT_MAX_HEAD  # request line and fields, in bytes


@dataclass(frozen=True, slots=True)
class Refusal:
    """The request is refused before anything else sees it: ``status`` and a text for the client."""

    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class Forwarder:
    """How cachegate forwards (one per config)."""

    via: str = "1.1 cachegate"  # this hop's Via entry
    preserve_host: bool = True  # send the head's Host; False: the upstream's own address


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """The request line and fields cachegate sends to the origin (the pool adds framing)."""

    method: str
    target: str
    headers: HeaderList


@dataclass(frozen=True, slots=True)
class _Shape:
    """What a list of field names says about the work a request needs (remembered per list)."""

    names: int  # how many names the list holds (multidict 7's keys() lists each name once)
    present: frozenset[str]  # the names, lower-cased
    hop: frozenset[str]  # the hop-by-hop fields present (Connection, TE, Keep-Alive, ...)
    expect: bool  # Expect is present (removed from an HTTP/1.0 request: ``EXPECT``)
    forwarding: frozenset[str]  # the forwarding fields present
    untrusted_drop: frozenset[str]  # both: what goes from an untrusted peer's request
    host: bool  # Host is present
    cookie: bool  # Cookie is present (it may carry the console's session: ``CONSOLE_COOKIE``)
    underscores: bool  # a name holds ``_`` (``RequestHead.underscores``)
    scheme: tuple[str, ...]  # the scheme fields present (``SCHEME_FIELDS``), in the order they decide


def is_forwarding(name: str) -> bool:
    """Is this (lower-cased) field name one of the forwarding families? Spelled with ``_`` for
    ``-`` too: CGI, WSGI and many frameworks read ``X_Real_IP`` as ``X-Real-IP`` (both become
    ``HTTP_X_REAL_IP``), as nginx knows by dropping every field with an underscore by default."""
    if "_" in name:
        name = name.replace("_", "-")
    return name.startswith(FORWARDING_PREFIX) or name in FORWARDING_FIELDS


# The fields a trusted front proxy states the client's scheme in, in the order they decide it
# when several are present. X-Forwarded-Proto first: it is the one nginx, HAProxy, Envoy,
# Traefik and the cloud load balancers set (replacing the client's), so a field they pass
# through untouched (a client's Forwarded, say) cannot outvote it. Then RFC 7239's Forwarded,
# then the single-value spellings frameworks read (Rack, Django, IIS, Cloudflare, ingress-nginx).
SCHEME_FIELDS = ("x-forwarded-proto", "forwarded", "x-forwarded-scheme", "x-url-scheme", "x-scheme",
                 "x-forwarded-ssl", "front-end-https", "x-https", "cf-visitor", "x-arr-ssl")
_SCHEME_RANK = {name: i for i, name in enumerate(SCHEME_FIELDS)}
_ON_OFF = {"on": "https", "off": "http"}
_CF_SCHEME = re.compile(r'"scheme"\s*:\s*"([a-z]+)"')


def _scheme_field(name: str) -> bool:
    return (name.replace("_", "-") if "_" in name else name) in _SCHEME_RANK


def _scheme_rank(name: str) -> tuple[int, bool]:
    """Precedence, the ``-`` spelling before an ``_`` one of the same field."""
    return _SCHEME_RANK[name.replace("_", "-")], "_" in name


def stated_scheme(name: str, value: str) -> str | None:
    """The scheme one line of a scheme field states (``http``/``https``), None when it states none
    cachegate can read. A list (X-Forwarded-Proto, Forwarded) is read at its first element: what
    the first proxy saw from the client (RFC 7239 §4 orders elements from the client on).

    >>> [stated_scheme(n, v) for n, v in (("x-forwarded-proto", "HTTPS, http"), ("forwarded",
    ...  'for="[2001:db8::1]:4711";proto=https, proto=http'), ("x-forwarded-ssl", "on"),
    ...  ("cf-visitor", '{"scheme":"http"}'), ("forwarded", "for=1.2.3.4"), ("x-scheme", "ftp"))]
    ['https', 'https', 'https', 'http', None, None]
    """
    name = name.replace("_", "-") if "_" in name else name
    if name == "forwarded":
        elements = forwarded_elements(value)
        text = _proto_of(elements[0]) if elements else None
    elif name == "x-forwarded-proto":
        text = value.split(",", 1)[0]
    elif name in ("x-forwarded-ssl", "front-end-https", "x-https"):
        text = _ON_OFF.get(value.strip(" \t").lower())
    elif name == "cf-visitor":
        found = _CF_SCHEME.search(value.lower())
        text = found.group(1) if found else None
    elif name == "x-arr-ssl":  # IIS ARR sets it (to the client certificate's details) over TLS only
        text = "https" if value.strip(" \t") else None
    elif name in _SCHEME_RANK:
        text = value
    else:
        return None  # not a scheme field
    if text is None:
        return None
    text = text.strip(" \t").lower()
    return text if text in ("http", "https") else None


def trusted_scheme(headers: Headers, present: tuple[str, ...], default: str) -> str:
    """The scheme a trusted peer states for the client's request: the first of ``present`` (the
    scheme fields it sent, by precedence, ``SCHEME_FIELDS``) whose first line states one; else
    ``default`` (the connection's). ``upstream_request`` then sends only fields that agree."""
    for name in present:
        scheme = stated_scheme(name, headers.get(name, ""))
        if scheme is not None:
            return scheme
    return default


def forwarded_elements(value: str) -> list[list[str]]:
    """The elements of a ``Forwarded`` value (RFC 7239 §4), each as its raw ``name=value`` pairs;
    a ``,`` or ``;`` inside a quoted-string (an IPv6 ``for``) does not split.

    >>> forwarded_elements('for="[2001:db8::1]:80";proto=https, for=10.0.0.2')
    [['for="[2001:db8::1]:80"', 'proto=https'], ['for=10.0.0.2']]
    >>> forwarded_elements("for=1.2.3.4;proto=http,, proto=https")
    [['for=1.2.3.4', 'proto=http'], ['proto=https']]
    """
    if '"' not in value:  # no quoted-string: split (the hit path reads a trusted peer's on every request)
        split = ([p.strip(" \t") for p in e.split(";")] for e in value.split(","))
        return [pairs for pairs in ([p for p in e if p] for e in split) if pairs]
    elements: list[list[str]] = [[]]
    start, quoted, escaped = 0, False, False
    for i, ch in enumerate(value):
        if quoted:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch in ",;":
            elements[-1].append(value[start:i].strip(" \t"))
            if ch == ",":
                elements.append([])
            start = i + 1
    elements[-1].append(value[start:].strip(" \t"))
    return [pairs for pairs in ([p for p in e if p] for e in elements) if pairs]


def _proto_of(pairs: list[str]) -> str | None:
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name.strip(" \t").lower() == "proto":
            value = value.strip(" \t")
            return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
    return None


def _protos(pairs: list[str]) -> list[str]:
    """Every ``proto`` of one element (RFC 7239 §4 allows one; a sender may repeat it)."""
    found = []
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name.strip(" \t").lower() == "proto":
            value = value.strip(" \t")
            found.append(value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value)
    return found


def _unterminated(value: str) -> bool:
    r"""Does a quoted-string in this ``Forwarded`` value never end (RFC 9110 §5.6.4 escapes)?

    >>> [_unterminated(v) for v in ('for="x;proto=https', r'for="a\";proto=https', 'for="[::1]"')]
    [True, True, False]
    """
    if '"' not in value:
        return False
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
    return quoted


def _agreeing(name: str, value: str, scheme: str) -> str | None:
    """A trusted peer's scheme field as sent upstream for a request keyed under ``scheme``:
    as it came when it agrees; ``Forwarded`` with every ``proto=`` rewritten to ``scheme`` (a
    repeated one too: an origin may read the last), dropped when a quoted-string in it never
    ends; None (dropped) when it states another scheme or none cachegate can read, and always for
    X-Forwarded-Proto, which cachegate writes itself. So every scheme field the origin reads
    says the scheme the answer is stored under."""
    name = name.replace("_", "-") if "_" in name else name
    if name == "x-forwarded-proto":
        return None
    if name == "forwarded":
        if _unterminated(value):
            return None  # what a lenient parser reads in it cannot be told: it does not go on
        elements = forwarded_elements(value)
        if all(p == scheme for pairs in elements for p in _protos(pairs)):
            return value
        return ", ".join(";".join(f"proto={scheme}" if p.partition("=")[0].strip(" \t").lower() == "proto"
                                  else p for p in pairs) for pairs in elements) or None
    return value if stated_scheme(name, value) == scheme else None


def _shape(names: str) -> _Shape:
    lowered = names.lower().split("\n") if names else []
    hop = frozenset(n for n in lowered if n in HOP_BY_HOP)
    forwarding = frozenset(n for n in lowered if is_forwarding(n))
    return _Shape(
        names=len(lowered),
        present=frozenset(lowered),
        hop=hop,
        expect="expect" in lowered,
        forwarding=forwarding,
        untrusted_drop=hop | forwarding,
        host="host" in lowered,
        cookie="cookie" in lowered,
        underscores="_" in names,
        scheme=tuple(sorted((n for n in forwarding if _scheme_field(n)), key=_scheme_rank)),
    )


# Shapes of the field-name lists seen, by the names joined with "\n" (short lists only,
# so that the table stays small whatever clients send).
_SHAPES: dict[str, _Shape] = {}
_SHAPES_MAX = 512
_SHAPE_NAMES_MAX = 1024
# Valid Host values seen, normalised (None: invalid); a site has few.
_HOSTS: dict[tuple[str, str], str | None] = {}
_HOSTS_MAX = 1024
# What each Connection line seen names (or its refusal): browsers send "keep-alive".
_CONNECTIONS: dict[str, frozenset[str] | Refusal] = {}
_UNKNOWN = ""  # not a possible normalised host (those are never empty)


def normal_host(value: str, scheme: str) -> str | None:
    """A Host (or absolute-form authority) value normalised for the key and the origin;
    None when it is not a valid host[:port] (RFC 3986 §3.2.2: a reg-name or an IP literal).

    >>> normal_host("Example.COM.:080", "http"), normal_host("[::1]:443", "https"), normal_host("a b", "http")
    ('example.com', '[::1]', None)
    """
    key = (value, scheme)
    known = _HOSTS.get(key, _UNKNOWN)
    if known != _UNKNOWN:
        return known
    host: str | None = None
    stripped = value.strip(" \t")
    text = stripped.lower()
    if len(text) <= 300 and _HOST.fullmatch(text):
        name, port = split_host(text)
        if (name.rstrip(".") and (not port or int(port) <= 65535) and _decodable(name)
                and (stripped == text or _decodable(split_host(stripped)[0]))):
            host = normalise_host(text, scheme)
    if len(value) <= 300:  # what a valid host can be: longer values are not remembered
        if len(_HOSTS) >= _HOSTS_MAX:
            _HOSTS.clear()
        _HOSTS[key] = host
    return host


def _decodable(name: str) -> bool:
    """Can yarl decode this host name (IDNA, as ``URL.host`` does)? ``xn--``, ``xn--a`` and
    ``a.xn--`` match the reg-name grammar, but their punycode labels do not decode: aiohttp
    building a request from such an absolute-form target raised UnicodeError where nothing
    caught it, and the connection was left open, answering nothing. They are invalid hosts
    here, in the Host field as in the target, on both paths (400)."""
    if name.startswith("["):
        return ip_literal(name) is not None  # never IDNA-decoded; ``[1:2:3]`` is no address
    try:
        URL.build(scheme="http", host=name, encoded=True).host  # noqa: B018 (decoded lazily)
    except (ValueError, IndexError):  # UnicodeError is a ValueError
        return False
    return True


def normalise_request(msg: RequestMessage, *, secure: bool, trusted: bool,
                      listener: Listener) -> RequestHead | Refusal:
    """The request as cachegate will send it upstream, or why it is refused (module docstring)."""
    headers = msg.headers
    target = msg.path
    names = "\n".join(headers.keys())
    shape = _SHAPES.get(names)
    if shape is None:
        shape = _shape(names)
        if len(names) <= _SHAPE_NAMES_MAX:
            if len(_SHAPES) >= _SHAPES_MAX:
                _SHAPES.clear()
            _SHAPES[names] = shape
    lines = len(headers)
    # Field lines beyond the distinct names: repeated fields, which the joined names list once.
    repeated = lines != shape.names
    names_size = len(names) if not repeated else sum(len(k) + 1 for k, _ in headers.items())
    # request line, fields, separators: what the client sent, give or take whitespace
    size = len(msg.method) + len(target) + 14 + names_size + len("".join(headers.values())) + 3 * lines
    if size > listener.max_head:
        return Refusal(431, f"the request head is {size} bytes, over the {listener.max_head} this "
                            "proxy accepts")
    scheme = "https" if secure else "http"
    if trusted and shape.scheme:
        scheme = trusted_scheme(headers, shape.scheme, scheme)
    drop: frozenset[str] | None = None
    if shape.hop or (shape.forwarding and not trusted) or (shape.expect and msg.version < (1, 1)):
        found = _to_drop(msg, shape, trusted, repeated)
        if isinstance(found, Refusal):
            return found
        drop = found
    if shape.cookie and (CONSOLE_COOKIE in headers["Cookie"] if not repeated
                         else any(CONSOLE_COOKIE in v for v in headers.getall("Cookie"))):
        return _normalise(msg, scheme, drop or frozenset(), trusted, listener, shape.underscores,
                          console=True)
    if shape.host and not repeated and target[:1] == "/" and "#" not in target:
        value = headers["Host"]
        if _HOSTS.get((value, scheme)) == value or normal_host(value, scheme) == value:
            if not drop:  # nothing to change: nothing copied
                return RequestHead(msg.method, scheme, value, target, headers, trusted, shape.underscores)
            return RequestHead(msg.method, scheme, value, target, _without(headers, drop), trusted,
                               shape.underscores)
    return _normalise(msg, scheme, drop or frozenset(), trusted, listener, shape.underscores)


def _to_drop(msg: RequestMessage, shape: _Shape, trusted: bool,
             repeated: bool) -> frozenset[str] | Refusal:
    """The fields present that must go (hop-by-hop, what Connection names, forwarding unless
    trusted, an HTTP/1.0 request's Expect), or a refusal for a Connection or Transfer-Encoding
    that cannot be honoured."""
    headers = msg.headers
    drop = shape.hop if trusted else shape.untrusted_drop
    if shape.expect and msg.version < (1, 1):
        drop |= EXPECT
    if "connection" in drop:
        lines = headers.getall("Connection") if repeated else (headers["Connection"],)
        for line in lines:
            named = _CONNECTIONS.get(line)
            if named is None:
                named = _connection_names(line)
                if len(line) <= 200:
                    if len(_CONNECTIONS) >= _HOSTS_MAX:
                        _CONNECTIONS.clear()
                    _CONNECTIONS[line] = named
            if isinstance(named, Refusal):
                return named
            drop |= named
    if "transfer-encoding" in drop:
        refused = _transfer_coding_refusal(headers.getall("Transfer-Encoding", ()), msg.version)
        if refused is not None:
            return refused
    return drop & shape.present


def _connection_names(line: str) -> frozenset[str] | Refusal:
    """The field names one Connection line lists (RFC 9110 §7.6.1), or why it is refused."""
    names = set()
    for token in line.split(","):
        name = token.strip(" \t").lower()
        if name in CONNECTION_MAY_NOT_NAME:
            return Refusal(400, f"Connection names {CONNECTION_MAY_NOT_NAME[name]}: removing it "
                                "would change what the request means")
        if name:
            names.add(name)
    return frozenset(names)


def _without(headers: Headers, drop: frozenset[str]) -> CIMultiDictProxy[str]:
    fields = CIMultiDict(headers)  # copied in C, then the few fields that must go removed
    for name in drop:
        fields.popall(name, None)
    return CIMultiDictProxy(fields)


def _normalise(msg: RequestMessage, scheme: str, drop: frozenset[str], trusted: bool,
               listener: Listener, underscores: bool, console: bool = False) -> RequestHead | Refusal:
    """The rest: another target form, a Host to write back, or one to refuse; ``console``: a
    Cookie line carries the console's session (``CONSOLE_COOKIE``), which goes."""
    headers = msg.headers
    method = msg.method
    target = msg.path.split("#", 1)[0]
    authority: str | None = None
    if target[:1] != "/":
        if method == "OPTIONS" and target == "*":
            pass
        else:
            parsed = _absolute_form(target, method == "OPTIONS")
            if isinstance(parsed, Refusal):
                return parsed
            authority, target = parsed
    if len(headers.getall("Host", ())) > 1:
        return Refusal(400, "more than one Host field")
    host_value = headers.get("Host")
    host: str | None = None
    if host_value is not None:
        host = normal_host(host_value, scheme)
        if host is None:
            return Refusal(400, "invalid Host field")
    elif msg.version >= (1, 1):
        return Refusal(400, "missing Host field (required in HTTP/1.1)")
    if authority is not None:
        host = normal_host(authority, scheme)
        if host is None:
            return Refusal(400, "invalid host in the absolute-form request target")
    if host is None:
        host = normal_host(listener.default_host, scheme) or listener.default_host
    fields = CIMultiDict(_without(headers, drop))
    fields["Host"] = host
    if console:
        cookies = [c for c in (_without_console_cookie(v) for v in fields.popall("Cookie")) if c]
        for value in cookies:
            fields.add("Cookie", value)
    return RequestHead(method, scheme, host, target, CIMultiDictProxy(fields), trusted, underscores)


def _transfer_coding_refusal(lines: list[str] | tuple[str, ...], version: tuple[int, int]) -> Refusal | None:
    """Only a single ``chunked`` is accepted, as nginx does (RFC 9112 §6.1)."""
    if version < (1, 1):
        return Refusal(400, "Transfer-Encoding in an HTTP/1.0 request")
    codings = [c.strip(" \t") for line in lines for c in line.split(",")]
    if len(codings) > 1:
        return Refusal(400, "a list of transfer codings: only a single 'chunked' is accepted")
    if codings[0].lower() != "chunked":
        return Refusal(501, f"transfer coding {codings[0][:40]!r} is not implemented: only a single "
                            "'chunked' is accepted")
    return None


def _absolute_form(target: str, options: bool) -> tuple[str, str] | Refusal:
    """(authority, target to send) of an absolute-form target (RFC 9112 §3.2.2): its origin form,
    or ``*`` for an ``options`` request with an empty path and no query, which the last proxy
    "MUST send" in the asterisk form (RFC 9112 §3.2.4): ``OPTIONS http://a.example`` asks about
    the server, not its ``/``.

    >>> _absolute_form("http://a.example", True), _absolute_form("http://a.example?q", True)
    (('a.example', '*'), ('a.example', '/?q'))
    >>> _absolute_form("http://a.example", False), _absolute_form("http://a.example/", True)
    (('a.example', '/'), ('a.example', '/'))
    """
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return Refusal(400, "malformed request target")
    cut = len(rest)
    for ch in "/?":
        i = rest.find(ch)
        if i != -1:
            cut = min(cut, i)
    authority, path = rest[:cut], rest[cut:]
    if "@" in authority:
        return Refusal(400, "userinfo in the request target")
    if options and not path:
        return authority, "*"
    if not path.startswith("/"):
        path = "/" + path
    return authority, path


def normalise_path(path: str) -> str:
    """The path rules match against: percent-decoded, ``//`` collapsed, dot-segments removed.

    So ``/static/..%2Faccount`` does not match ``/static/**`` and ``/%61dmin`` does
    match ``/admin``: the reading of an origin that decodes first (nginx, Varnish's
    backends behind it). Origins that read a path otherwise are read too (``path_readings``).

    >>> normalise_path("/static/..%2Faccount"), normalise_path("//a/./b/"), normalise_path("/a")
    ('/account', '/a/b/', '/a')
    """
    if "%" in path:
        path = unquote(path, errors="replace")
    if "//" in path:
        path = _MULTI_SLASH.sub("/", path)
    return path if "/." not in path else _without_dot_segments(path)


def _without_dot_segments(path: str) -> str:
    """``path`` without its ``.`` and ``..`` segments (RFC 3986 §5.2.4), read on ``/`` as it stands."""
    if "/." not in path:
        return path
    out: list[str] = []
    parts = path.split("/")
    for part in parts[1:]:
        if part == "..":
            if out:
                out.pop()
        elif part != ".":
            out.append(part)
    trailing = parts[-1] in (".", "..")
    return "/" + "/".join(out) + ("/" if trailing and out else "")


# What makes origins read a raw path otherwise than ``normalise_path`` does, raw or escaped: a
# ``;`` parameter, a backslash, a NUL, an escaped ``/``, and a dot or space ending a segment (dot
# segments among them). A path without one (nearly every path) has no other reading. Searched
# in the whole target too, so a segment also ends where the query starts (``/cart.?a=1`` is
# IIS's ``/cart``: a query turned the readings off).
PATH_READ_OTHERWISE = re.compile(r"[;\\\x00]|%(?:2[Ff]|3[Bb]|5[Cc]|00)|(?:\.|%2[Ee]|%20| )(?=[/?]|$)")
_PARAMS = re.compile(r";[^/]*")
# Escaped reserved characters (RFC 3986 §2.2) an origin that routes on the raw path never reads as
# the character: ``/``, ``;``, ``?``, ``#`` and ``\``.
_KEPT_ESCAPES = re.compile(r"(%(?:2[Ff]|3[Bb]|3[Ff]|23|5[Cc]))")


def path_readings(raw: str) -> tuple[str, ...]:
    r"""The other paths origins read the raw path ``raw`` as, each unlike ``normalise_path(raw)``
    (the rules' reading) and unlike each other; ``()`` for a path none reads otherwise.

    - servlet containers (Tomcat, Jetty, Spring): a segment's ``;`` parameters dropped up to the
      next raw ``/``, then decoded (``/account;%2f..%2fstatic%2fx.html`` is their ``/account``);
    - origins that route on the raw path (Go's mux on ``RawPath``, Rails, Express): dot segments
      resolved on the raw ``/`` only, then decoded except the escaped reserved characters
      (RFC 3986 §6.2.2.2): ``..`` never climbs over ``%2F``, nor is read out of ``%2e%2e``;
    - IIS and ASP.NET: ``\`` read as ``/``, a segment's trailing dots and spaces dropped, and C
      code stops at a NUL (also a segment's ``;`` parameters, read after decoding).

    >>> path_readings("/account;%2f%2e%2e%2fstatic%2fpage.html")
    ('/account', '/account;%2F..%2Fstatic%2Fpage.html')
    >>> path_readings("/static/..%2Faccount"), path_readings("/a%5C..%5Caccount./p%20")
    (('/static/..%2Faccount',), ('/a%5C..%5Caccount./p ', '/account/p'))
    >>> path_readings("/plain/path.css"), path_readings("/a/../b")
    ((), ())
    """
    if PATH_READ_OTHERWISE.search(raw) is None:
        return ()
    rules = normalise_path(raw)
    readings: list[str] = []
    for other in (normalise_path(_PARAMS.sub("", raw)), _raw_reading(raw), _iis_reading(rules)):
        if other != rules and other not in readings:
            readings.append(other)
    return tuple(readings)


def _raw_reading(raw: str) -> str:
    """``raw`` as an origin routing on the raw path reads it (``path_readings``)."""
    if "//" in raw:
        raw = _MULTI_SLASH.sub("/", raw)
    return "/".join(_decoded_segment(s) for s in _without_dot_segments(raw).split("/"))


def _decoded_segment(segment: str) -> str:
    """A raw segment decoded but for its escaped reserved characters (upper-cased); left raw when
    it would decode to a dot segment, which such an origin never resolved."""
    if "%" not in segment:
        return segment
    parts = _KEPT_ESCAPES.split(segment)
    decoded = "".join(p.upper() if i % 2 else unquote(p, errors="replace") for i, p in enumerate(parts))
    return segment if decoded in (".", "..") else decoded


def _iis_reading(path: str) -> str:
    """The rules' reading ``path`` as IIS and ASP.NET read it (``path_readings``)."""
    other = normalise_path(path.replace("\\", "/"))
    segments = []
    for part in other.split("/"):
        part = part.split(";", 1)[0].split("\x00", 1)[0]
        segments.append(part if part in (".", "..") else part.rstrip(". "))
    return normalise_path("/".join(segments) or "/")


def fill_target(head: RequestHead, spec: KeySpec) -> str:
    """The target a fill asks the origin for: the URL as keyed.

    When a rule's key drops or reorders query parameters (or lower-cases the path), the
    origin sees exactly what the key sees, so a parameter left out of the key cannot
    change a response stored for everyone (unkeyed-parameter cache poisoning).

    >>> from multidict import CIMultiDict
    >>> head = RequestHead("GET", "http", "a.example", "/s?utm=x&q=1", CIMultiDict())
    >>> fill_target(head, KeySpec(query_include=("q",)))
    '/s?q=1'
    """
    if not (spec.query_include is not None or spec.query_exclude or spec.query_sort
            or spec.query_ignore or spec.lowercase_path):
        return head.target
    url = url_of_key(cache_key(head, spec))
    prefix = f"{head.scheme}://{head.host}"
    if url == head.url or not url.startswith(prefix):
        return head.target
    return url[len(prefix):] or "/"


# The admin console's session cookie (``proxy.web.console``). Browsers send a host's cookies to
# every port of it (RFC 6265 §8.5), so a console session opened on the admin port rides along
# with requests to the proxy's port: ``normalise_request`` removes it, as it is nobody's but
# cachegate's: the origin never sees it (its logs, its code), nor do the rules, the key or a
# ``Vary: Cookie`` variant (stored, and shown by the admin API, it was a session id on disk).
CONSOLE_COOKIE = "cachegate_session"


def _without_console_cookie(value: str) -> str:
    return "; ".join(p.strip() for p in value.split(";")
                     if p.partition("=")[0].strip(" \t") != CONSOLE_COOKIE and p.strip())


# RFC 9110 §7.6.2: Max-Forwards counts down on these two methods only.
MAX_FORWARDS_METHODS = frozenset({"OPTIONS", "TRACE"})
# The methods cachegate forwards, in the Allow of its own answer to an OPTIONS (or a TRACE) that
# Max-Forwards addresses to it. TRACE is not among them: cachegate does not echo a request
# (the echo would hand a page's script the Cookie and Authorization it cannot read: cross-site
# tracing); a TRACE with hops left is forwarded, the origin decides.
ALLOW = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"
# The client listener's longest request line and header field (aiohttp's max_line_size and
# max_field_size there, ``proxy.web.server``); a purge URL longer than any request could name is
# refused (``proxy.purge``).
MAX_REQUEST_LINE = 8190
MAX_HEADERS = 128  # the client listener's most header fields in a head (aiohttp's max_headers there)
# What the client listener says of a head its parser refuses for those limits (``proxy.web.fastpath``,
# ``proxy.web.refusals``).
TOO_MANY_FIELDS = "too many header fields"
FIELD_TOO_LONG = "malformed request: request line or header field too long"


def head_refusal(method: str, target: str, fields: Sequence[tuple[str, str]],
                 max_head: int) -> Refusal | None:
    """What the client listener answers a head that breaks its limits, in the order it applies
    them, for a head described rather than received (``explain``): over ``max_head`` bytes in
    all (431, refused as it arrives, before it is parsed: ``proxy.web.fastpath``), more than
    ``MAX_HEADERS`` fields (431) or a field name or value over ``MAX_REQUEST_LINE`` bytes (400:
    aiohttp's parser). Sizes are counted in characters, each a byte on the wire (latin-1).

    >>> head_refusal("GET", "/", [("X-A", "1")] * 129, 32768).status
    431
    >>> head_refusal("GET", "/", [("Cookie", "a=" + "x" * 9000)], 32768).reason
    'malformed request: request line or header field too long'
    >>> head_refusal("GET", "/", [("Cookie", "a=" + "x" * 40000)], 32768).reason
    'the request head is 40030 bytes, over the 32768 this proxy accepts'
    """
    # request line, fields, separators (as ``normalise_request`` counts them)
    size = len(method) + len(target) + 14 + sum(len(n) + len(v) + 4 for n, v in fields)
    if size > max_head:
        return Refusal(431, f"the request head is {size} bytes, over the {max_head} this proxy accepts")
    if len(fields) > MAX_HEADERS:
        return Refusal(431, TOO_MANY_FIELDS)
    if any(len(n) > MAX_REQUEST_LINE or len(v) > MAX_REQUEST_LINE for n, v in fields):
        return Refusal(400, FIELD_TOO_LONG)
    return None


def max_forwards(head: RequestHead) -> int | None:
    """The Max-Forwards of an OPTIONS or TRACE (RFC 9110 §7.6.2), None for another method or
    without one usable value (absent, not 1*DIGIT, or sent on several lines: then it is left
    to the next hop as it came).

    >>> from multidict import CIMultiDict
    >>> [max_forwards(RequestHead(m, "http", "a", "/", CIMultiDict({"Max-Forwards": v})))
    ...  for m, v in (("OPTIONS", "0"), ("TRACE", "5"), ("GET", "0"), ("OPTIONS", "-1"))]
    [0, 5, None, None]
    """
    if head.method not in MAX_FORWARDS_METHODS:
        return None
    values = head.headers.getall("Max-Forwards", ())
    return digits(values[0].strip(" \t")) if len(values) == 1 else None


def final_recipient(head: RequestHead) -> tuple[int, str, HeaderList] | None:
    """cachegate's own answer when Max-Forwards makes it the final recipient of an OPTIONS or a
    TRACE (Max-Forwards: 0, RFC 9110 §7.6.2), as (status, reason, fields); None: forward it.
    An OPTIONS gets 200 with the methods it forwards (§9.3.7); a TRACE 405 with the same Allow
    (§15.5.6): it is not echoed (see ``ALLOW``)."""
    if max_forwards(head) != 0:
        return None
    if head.method == "OPTIONS":
        return 200, "OK", (("Allow", ALLOW),)
    return 405, "Method Not Allowed", (("Allow", ALLOW),)


# The methods looked up in the store (and coalesced, and stored): every other one is passed
# through. ``proxy.rules.CACHED_METHODS`` is the same set (tests/policy/test_request_route.py).
LOOKED_UP = frozenset({"GET", "HEAD"})
# The Cache-Status detail of a GET or HEAD passed through because it carries a body.
REQUEST_BODY = "REQUEST-BODY"


@dataclass(frozen=True, slots=True)
class LookUp:
    """A GET or HEAD without a body, not bypassed: looked up, coalesced, stored under its key."""


@dataclass(frozen=True, slots=True)
class PassThrough:
    """Forwarded as it came, its body too; neither looked up, nor coalesced, nor stored.
    ``fwd`` and ``detail`` are its Cache-Status parameters (``method``: never cached;
    ``bypass``: a GET or HEAD the rules bypass, or one that carries a body)."""

    fwd: str
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class OwnAnswer:
    """cachegate answers itself (``final_recipient``: Max-Forwards 0 on an OPTIONS or TRACE)."""

    status: int
    reason: str
    fields: HeaderList


LOOK_UP = LookUp()
PASS_METHOD = PassThrough("method")
PASS_BODY = PassThrough("bypass", REQUEST_BODY)
RequestRoute = LookUp | PassThrough | OwnAnswer


# What aiohttp's parser (llhttp) finds wrong with a request's framing, in the words the
# proxy's 400 says them (``web.fastpath.refusal_reason``: "400 Bad Request: malformed request:
# ..."), so that ``explain`` says what the client is answered.
INVALID_CONTENT_LENGTH = "invalid Content-Length"
LENGTH_AND_CODING = "both Content-Length and Transfer-Encoding"
_LENGTH_MAX = (1 << 64) - 1  # llhttp's uint64 (measured: one more is refused)


def framing_refusal(fields: Headers) -> Refusal | None:
    """The 400 a request with these fields (in the order sent) gets for its framing, as
    aiohttp's parser reads them one by one: a ``Content-Length`` that is not one run of ASCII
    digits (``abc``, ``-1``, ``5, 5``; spaces and tabs around it aside), too large, sent twice,
    or beside a ``Transfer-Encoding`` (llhttp names the second of the two). None when the
    parser frames it; ``normalise_request`` then decides on ``Transfer-Encoding``.

    The proxy never gets such a request: the parser answers it (``parser_refusal``), before
    ``normalise_request``. ``explain`` asks this, so that it explains no request the proxy
    refuses (a GET with ``Content-Length: abc`` was explained as a lookup).

    >>> [framing_refusal(f) for f in ({"Content-Length": " 12 "}, {"Transfer-Encoding": "chunked"})]
    [None, None]
    >>> framing_refusal({"Content-Length": "5, 5"})
    Refusal(status=400, reason='malformed request: invalid Content-Length')
    """
    if "Content-Length" not in fields:
        return None
    length = coding = False
    for name, value in fields.items():
        lowered = name.lower()
        if lowered == "content-length":
            text = value.strip(" \t")
            if length or coding or not (text.isascii() and text.isdigit()) or int(text) > _LENGTH_MAX:
                return Refusal(400, f"malformed request: {INVALID_CONTENT_LENGTH}")
            length = True
        elif lowered == "transfer-encoding":
            if length:
                return Refusal(400, f"malformed request: {LENGTH_AND_CODING}")
            coding = True
    return None


def carries_body(fields: Headers) -> bool:
    """Whether a request with these fields (as received, before ``normalise_request`` drops
    ``Transfer-Encoding``) carries a body, as aiohttp's parser frames it: any
    ``Transfer-Encoding`` (only a single ``chunked`` is accepted), or a ``Content-Length`` over 0.
    The proxy asks the parser (``body_exists``); ``explain`` asks this.

    >>> [carries_body(f) for f in ({"Content-Length": "12"}, {"Content-Length": "0"},
    ...                            {"Transfer-Encoding": "chunked"}, {})]
    [True, False, True, False]
    """
    if "Transfer-Encoding" in fields:
        return True
    length = digits(fields.get("Content-Length", "").strip(" \t"))
    return length is not None and length > 0


def decide_request(head: RequestHead, *, body: bool, bypass: str | None) -> RequestRoute:
    """What the proxy does with a request before any lookup: ``body``, it carries a body
    (``Content-Length`` over 0, or chunked: even an empty chunked one); ``bypass``, the rules'
    bypass detail, None when they do not bypass it.

    Why a GET or HEAD with a body passes: the key is the URL and the Vary fields, never the
    body, and a fill sends none. Looked up, such requests (a search API's ``GET /_search``
    with a JSON query) all got the first one's answer, stored or coalesced, and the origin
    never saw the query. RFC 9110 §9.3.1 gives such a body no defined meaning, so it is
    forwarded as it came, and nothing is shared. ``Content-Length: 0`` is no body.

    >>> from multidict import CIMultiDict
    >>> get = RequestHead("GET", "http", "a", "/_search", CIMultiDict())
    >>> decide_request(get, body=True, bypass=None)
    PassThrough(fwd='bypass', detail='REQUEST-BODY')
    >>> decide_request(get, body=False, bypass=None)
    LookUp()
    """
    if head.method not in LOOKED_UP:
        own = final_recipient(head)
        return PASS_METHOD if own is None else OwnAnswer(*own)
    if bypass is not None:
        return PassThrough("bypass", bypass)
    if body:
        return PASS_BODY
    return LOOK_UP


def upstream_request(head: RequestHead, peer: str, forwarder: Forwarder, *,
                     fill: KeySpec | None = None, validators: HeaderList = (),
                     request_id: str = "", preconditions: bool = False) -> UpstreamRequest:
    """What the origin receives for ``head``: a function of the head, ``peer`` (the TCP peer's
    address, for X-Forwarded-For) and the config.

    ``fill``: a cache fill under this key spec: a GET for the URL as keyed, without the
    client's conditionals and ranges; ``validators`` (a revalidation's) are added;
    ``preconditions``: a fill that keeps the client's preconditions and range (``PASSING``: a
    hit-for-pass key's request, which is stored only when its answer is a full response).
    Without ``fill`` the request is passed through (any method, the target as received, all
    its fields: preconditions, Range; never ``NEVER_FORWARDED``'s Request-Range).
    ``request_id``: the request's ``X-Request-Id`` (``proxy.logs``: a trusted peer's, or
    cachegate's own), sent in place of any the head carries. An OPTIONS or TRACE's
    Max-Forwards goes one lower (``max_forwards``).

    Hop-by-hop and (for an untrusted head) forwarding fields are dropped here too, so a head
    built by hand cannot carry them to the origin either.

    >>> from multidict import CIMultiDict
    >>> head = RequestHead("HEAD", "http", "a.example", "/x", CIMultiDict({"Host": "a.example",
    ...                    "If-None-Match": '"v1"', "X-Real-IP": "6.6.6.6", "Accept": "*/*"}))
    >>> req = upstream_request(head, "10.0.0.9", Forwarder(), fill=KeySpec())
    >>> req.method, req.target
    ('GET', '/x')
    >>> for field in req.headers: print(*field, sep=": ")
    Host: a.example
    Accept: */*
    X-Forwarded-For: 10.0.0.9
    X-Forwarded-Proto: http
    X-Forwarded-Host: a.example
    Via: 1.1 cachegate
    Surrogate-Capability: cachegate="Surrogate/1.0"
    """
    trusted = head.trusted
    out: list[tuple[str, str]] = [("Host", head.host)] if forwarder.preserve_host else []
    prior_for: list[str] = []
    prior_via: list[str] = []
    host = False
    drops = FILL_DROPS
    if preconditions:
        several = "range" in head.headers and request_range(head.headers) is None
        drops = PASSING_ONE_RANGE_DROPS if several else PASSING_DROPS
    spelled = fill is not None and head.underscores  # else no name holds ``_``: one look-up a field
    hops = max_forwards(head) if head.method in MAX_FORWARDS_METHODS else None
    for k, v in head.headers.items():
        lk = k.lower()
        if lk in _NOT_COPIED or (fill is not None and lk in drops):
            continue
        if spelled and "_" in lk and lk.replace("_", "-") in drops:
            continue
        if hops is not None and lk == "max-forwards":
            v = str(hops - 1) if hops > 0 else v  # one hop less (§7.6.2; 0 is answered here)
        if is_forwarding(lk):
            if not trusted:
                continue
            if lk == "x-forwarded-for":
                prior_for.append(v)
                continue
            if lk == "via":
                prior_via.append(v)
                continue
            if _scheme_field(lk):
                agreeing = _agreeing(lk, v, head.scheme)
                if agreeing is None:
                    continue
                v = agreeing
            host = host or lk == "x-forwarded-host"
        out.append((k, v))
    out.append(("X-Forwarded-For", ", ".join([*prior_for, peer])))
    out.append(("X-Forwarded-Proto", head.scheme))
    if not host:
        out.append(("X-Forwarded-Host", head.host))
    out.append(("Via", ", ".join([*prior_via, forwarder.via])))
    out.append(("Surrogate-Capability", SURROGATE_CAPABILITY))
    if request_id:
        out.append(("X-Request-Id", request_id))
    out.extend(validators)
    if fill is None:
        return UpstreamRequest(head.method, head.target, tuple(out))
    return UpstreamRequest("GET", fill_target(head, fill), tuple(out))


@dataclass(frozen=True, slots=True)
class LineOpen:
    """The request line has not ended yet: ``kept`` is all of it that ``simple_request`` needs,
    to be given again with what follows (a few bytes, however long the target grows)."""

    kept: bytes


# method SP target, and the line ends: no version (RFC 9112 §2.3, HTTP/0.9's simple request)
_SIMPLE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \r\n]+\r?")
_METHOD_MAX = 64  # a line whose first word is longer is no request line to wait for


def simple_request(start: bytes) -> bool | LineOpen:
    r"""Whether the head that begins with ``start`` (empty lines before it allowed) is an
    HTTP/0.9 simple request, a request line without a version (``GET /page`` CRLF), once its
    first line has ended; ``LineOpen`` until then.

    Why: the parser takes such a line for HTTP/0.9 and waits for fields and a blank line that
    a 0.9 client never sends (it sends that one line and waits): the client got nothing until
    client_header_timeout closed the connection. The answer is due at the line's end (nginx
    answers then). A second space means a version follows: decided at once, without waiting
    for the line to end.

    >>> simple_request(b"GET /page\r\n"), simple_request(b"GET /page HTTP/1.1\r\n")
    (True, False)
    >>> simple_request(b"\r\nGET /pa")
    LineOpen(kept=b'GET /')
    """
    start = start.lstrip(b"\r\n")
    end = start.find(b"\n")
    if end == -1:
        space = start.find(b" ")
        if space == -1:
            return LineOpen(start) if len(start) <= _METHOD_MAX else False
        if start.find(b" ", space + 1) != -1:
            return False  # a version follows
        return LineOpen(start[:space + 2])  # method SP and a byte of the target
    return _SIMPLE.fullmatch(start, 0, end) is not None


def parse_url(text: str, *, encoded: bool = False) -> URL:
    """``URL(text)``, with every way yarl refuses a string as ValueError: it raises IndexError for
    some (``http://[::1]@``, found by the hostile-JSON tests), which an admin request or a config
    value must not turn into a 500 or a traceback."""
    try:
        url = URL(text, encoded=encoded)
        url.raw_host, url.raw_authority  # noqa: B018 (yarl parses these lazily)
    except (ValueError, IndexError, TypeError) as exc:
        raise ValueError(str(exc) if isinstance(exc, ValueError) else "not a valid URL") from None
    return url
