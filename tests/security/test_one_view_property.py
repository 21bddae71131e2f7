"""The property behind every poisoning fix: what the origin receives is determined by the
cache key and the stored variant's request fields.

Hypothesis draws what a client means (a host, a path, a few ordinary fields) and several
ways of sending it: origin- or absolute-form, with the Host spelt in any case, with a
trailing dot, the default or a zero-padded port, or missing (HTTP/1.0); ``Connection``
naming fields (ordinary, forwarding or made up) that are then present; forwarding fields
of every family; hop-by-hop fields and conditionals; from trusted and untrusted peers.
Every two requests whose key and Vary values agree must give the origin the same request
(``upstream_request``, as a fill), apart from X-Forwarded-For, which is the peer; for a
trusted peer, apart from the forwarding fields that peer vouches for as well.

The ordinary fields are all treated as the response's Vary fields: a field a response does
not vary on reaches the origin as the client sent it (an origin that answers differently
without saying Vary is outside what a cache can fix).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.policy.keys import KeySpec, cache_key, variant_of
from proxy.policy.messages import HeaderList, RequestHead
from proxy.policy.request import (
    FORWARDING_FIELDS,
    Forwarder,
    Listener,
    Message,
    is_forwarding,
    normalise_request,
    stated_scheme,
    upstream_request,
)

LISTENER = Listener("127.0.0.1:8080")
FORWARDER = Forwarder("1.1 cachegate")
HOSTS = ["shop.example", "other.example", "[2001:db8::7]"]
PATHS = ["/", "/a", "/s?q=1", "/s?q=1&utm=x", "/s?utm=y&q=1", "/%61?b=2"]
ORDINARY = {"Accept-Language": ["de", "en", "de, en"], "Accept-Encoding": ["gzip", "br"],
            "Cookie": ["a=1", "b=2"], "X-Tenant": ["acme", "zeta"], "Authorization": ["Bearer x"]}
VARY = tuple(sorted(name.lower() for name in ORDINARY))
SPECS = [KeySpec(), KeySpec(query_include=("q",), headers=("X-Tenant",)), KeySpec(query_ignore=True)]
FORWARDING = sorted(FORWARDING_FIELDS | {"x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
                                         "x-forwarded-prefix", "x-forwarded-ssl", "x-forwarded"})
NOISE = ["If-None-Match", "If-Modified-Since", "Range", "TE", "Keep-Alive", "Proxy-Authorization",
         "Proxy-Connection", "Upgrade", "Trailer"]
TOKENS = ["X-Made-Up", "X-Other", "Keep-Alive", "close", *ORDINARY, *FORWARDING[:6]]


@dataclass(frozen=True)
class Intent:
    host: str
    port: str
    path: str
    fields: tuple[tuple[str, str], ...]
    secure: bool


@dataclass(frozen=True)
class Sent:
    """One way of sending an intent."""

    absolute: bool
    host_spelling: tuple[bool, bool, bool, bool]  # upper-case, trailing dot, explicit default port, zero-pad
    host_field: str  # "same", "other", "none"
    version: tuple[int, int]
    connection: tuple[str, ...]
    forwarding: tuple[tuple[str, str], ...]
    noise: tuple[tuple[str, str], ...]
    trusted: bool
    peer: str
    shuffle: int


intents = st.builds(
    Intent,
    st.sampled_from(HOSTS),
    st.sampled_from(["", "8080"]),
    st.sampled_from(PATHS),
    st.lists(st.sampled_from(sorted(ORDINARY)), unique=True, max_size=4).flatmap(
        lambda names: st.tuples(*(st.sampled_from(ORDINARY[n]).map(lambda v, n=n: (n, v)) for n in names))),
    st.booleans(),
)
values = st.sampled_from(["evil.example", "6.6.6.6", "https", "/admin", "DELETE", "on", 'x="1"'])
sents = st.builds(
    Sent,
    st.booleans(),
    st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    st.sampled_from(["same", "other", "none"]),
    st.sampled_from([(1, 1), (1, 0)]),
    st.lists(st.sampled_from(TOKENS), max_size=3),
    st.lists(st.tuples(st.sampled_from(FORWARDING), values), max_size=4),
    st.lists(st.tuples(st.sampled_from(NOISE), st.sampled_from(["1", '"v"', "bytes=0-1", "h2c"])), max_size=3),
    st.booleans(),
    st.sampled_from(["10.0.0.1", "10.0.0.2", "2001:db8::1"]),
    st.integers(0, 5),
)


def spelt(intent: Intent, how: tuple[bool, bool, bool, bool]) -> str:
    upper, dot, default_port, zero_pad = how
    name = intent.host.upper() if upper else intent.host
    if dot and not name.startswith("["):
        name += "."
    port = intent.port or ("443" if intent.secure else "80") if (intent.port or default_port) else ""
    if port and zero_pad:
        port = "0" + port
    return f"{name}:{port}" if port else name


def render(intent: Intent, sent: Sent) -> Message:
    host = spelt(intent, sent.host_spelling)
    scheme = "https" if intent.secure else "http"
    target = f"{scheme}://{host}{intent.path}" if sent.absolute else intent.path
    fields: list[tuple[str, str]] = []
    if sent.host_field == "same" or (sent.host_field == "none" and sent.version >= (1, 1)):
        fields.append(("Host", host))
    elif sent.host_field == "other":
        fields.append(("Host", "attacker.example" if sent.absolute else host))
    fields.extend(intent.fields)
    if sent.connection:
        fields.append(("Connection", ", ".join(sent.connection)))
        fields.extend((name, "named") for name in sent.connection if name not in ("close", "keep-alive"))
    fields.extend(sent.forwarding)
    fields.extend(sent.noise)
    # the order of fields is the client's: shuffle all but Host
    rest = fields[1:] if fields and fields[0][0] == "Host" else fields
    head = fields[:len(fields) - len(rest)]
    rest = rest[sent.shuffle % (len(rest) or 1):] + rest[:sent.shuffle % (len(rest) or 1)]
    return Message("GET", target, sent.version, CIMultiDictProxy(CIMultiDict(head + rest)))


def comparable(fields: HeaderList, trusted: bool) -> list[tuple[str, str]]:
    """The fields of an upstream request, without those the peer decides."""
    out = []
    for k, v in fields:
        lk = k.lower()
        if lk == "x-forwarded-for" or (trusted and is_forwarding(lk)):
            continue
        out.append((lk, v))
    return sorted(out)


def cases(intent: Intent, sent_list: list[Sent]) -> list[tuple[RequestHead, Sent]]:
    out = []
    for sent in sent_list:
        head = normalise_request(render(intent, sent), secure=intent.secure, trusted=sent.trusted,
                                 listener=LISTENER)
        if isinstance(head, RequestHead):
            out.append((head, sent))
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(intents, min_size=1, max_size=2), st.lists(sents, min_size=2, max_size=5))
def test_the_origin_receives_what_the_key_and_the_variant_determine(intent_list: list[Intent],
                                                                     sent_list: list[Sent]) -> None:
    heads = [c for intent in intent_list for c in cases(intent, sent_list)]
    for spec in SPECS:
        for (a, sa), (b, sb) in itertools.combinations(heads, 2):
            if cache_key(a, spec) != cache_key(b, spec) or variant_of(VARY, a.headers) != variant_of(VARY, b.headers):
                continue
            ua = upstream_request(a, sa.peer, FORWARDER, fill=spec)
            ub = upstream_request(b, sb.peer, FORWARDER, fill=spec)
            trusted = a.trusted or b.trusted
            assert (ua.method, ua.target) == (ub.method, ub.target)
            assert comparable(ua.headers, trusted) == comparable(ub.headers, trusted), (a, b)


@settings(max_examples=150, deadline=None)
@given(intents, sents)
def test_an_untrusted_client_never_reaches_the_origin_with_a_field_outside_the_view(intent: Intent,
                                                                                  sent: Sent) -> None:
    for head, s in cases(intent, [sent]):
        fields = upstream_request(head, s.peer, FORWARDER, fill=KeySpec()).headers
        names = [k.lower() for k, _ in fields]
        assert names.count("host") == 1 and dict(fields)["Host"] == head.host
        assert not set(names) & {"connection", "te", "keep-alive", "proxy-authorization", "upgrade",
                                 "transfer-encoding", "trailer", "proxy-connection"}
        own = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via", "surrogate-capability"}
        assert not set(names) & ({n.lower() for n in s.connection} - own)
        if s.trusted:  # every scheme field sent says the key's scheme (X-Forwarded-Proto: cachegate's)
            assert [v for k, v in fields if k.lower() == "x-forwarded-proto"] == [head.scheme]
            assert {stated_scheme(k.lower(), v) for k, v in fields} <= {None, head.scheme}
        if not s.trusted:
            sent_forwarding = [(k, v) for k, v in fields if is_forwarding(k.lower())]
            assert sent_forwarding == [("X-Forwarded-For", s.peer), ("X-Forwarded-Proto", head.scheme),
                                       ("X-Forwarded-Host", head.host), ("Via", "1.1 cachegate"),
                                       ("Surrogate-Capability", 'cachegate="Surrogate/1.0"')]
