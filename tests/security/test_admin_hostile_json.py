"""Hostile JSON on every admin endpoint: nested to exhaust the parser, huge, duplicated, wrong types.

Every one is a 400 (413 when over the 1 MiB body limit) with a message that says what is wrong,
and nothing is purged: never a 500, never a traceback, the listener still answers. The property
tests feed generated documents through the same pure functions the handlers call.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.errors import BadRequest
from proxy.explain import explain_trace
from proxy.policy.keys import cache_key
from proxy.purge import BadPurge, normalise_url, parse_purge
from proxy.rules import RuleSet
from proxy.web.admin import explain_request
from proxy.web.admin_guard import MAX_DEPTH, loads_untrusted
from tests.admin.util import absolute, settle
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy, Reply

DEEP_ARRAYS = b"[" * 100_000 + b"]" * 100_000  # far past the interpreter's recursion limit
DEEP_OBJECTS = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
DEEP_BUT_PARSABLE = b'{"urls": ' + b"[" * 40 + b'"x"' + b"]" * 40 + b"}"  # parsed, then refused
NESTED = f"JSON nested deeper than {MAX_DEPTH} levels"

# (endpoint, body with {page} for the proxy's own URL, words the error must contain)
CASES: list[tuple[str, bytes, str]] = [
    ("/purge", DEEP_ARRAYS, NESTED),
    ("/purge", DEEP_OBJECTS, NESTED),
    ("/purge", DEEP_BUT_PARSABLE, NESTED),
    ("/explain", DEEP_ARRAYS, NESTED),
    ("/explain", DEEP_OBJECTS, NESTED),
    ("/purge", b'{"all": false, "all": true}', "the key 'all' is given twice"),
    ("/explain", b'{"url": "http://a/", "url": "{page}"}', "the key 'url' is given twice"),
    ("/purge", b'{"all": NaN}', "NaN is not a JSON value"),
    ("/purge", b'{"tags": [-Infinity]}', "-Infinity is not a JSON value"),
    ("/purge", b'{"tags": ["\\ud800"]}', "unpaired surrogate (\\ud800)"),
    ("/explain", b'{"url": "{page}", "headers": {"\\udfff": "1"}}', "unpaired surrogate (\\udfff)"),
    ("/purge", b'{"all": 1' + b"0" * 5000 + b"}", "invalid JSON: a number is too long (5001 digits; at most 4300)"),
    ("/purge", b'{"all": -' + b"9" * 4301 + b"}", "invalid JSON: a number is too long (4301 digits; at most 4300)"),
    ("/purge", b"\xff\xfe\x00", "invalid JSON"),
    # Other encodings json.loads would guess from the bytes: the admin API takes UTF-8 only.
    ("/purge", '{"all": true}'.encode("utf-16"), "invalid JSON: not UTF-8 (invalid start byte at byte 0)"),
    ("/purge", '{"all": true}'.encode("utf-16-le"), "invalid JSON: a NUL character at offset 1"),
    ("/purge", '{"all": true}'.encode("utf-16-be"), "invalid JSON: a NUL character at offset 0"),
    ("/purge", '{"all": true}'.encode("utf-32-le"), "(UTF-16 or UTF-32?); send UTF-8"),
    ("/purge", '{"all": true}'.encode("utf-8-sig"), "starts with a byte order mark (U+FEFF)"),
    ("/explain", '{"url": "{page}"}'.encode("utf-8-sig"), "starts with a byte order mark (U+FEFF)"),
    ("/explain", '{"url": "{page}"}'.encode("utf-16-le"), "(UTF-16 or UTF-32?); send UTF-8"),
    ("/purge", b'{"urls": [1e999]}', "'urls' must be a list of non-empty strings"),
    ("/purge", b'{"urls": ["http://a:99999999/"]}', "is not a URL"),
    ("/purge", b'{"urls": [{"http://a/": 1}]}', "'urls' must be a list of non-empty strings"),
    ("/purge", b'{"tags": "t"}', "'tags' must be a list of non-empty strings"),
    ("/purge", b"[" + b"1," * 100_000 + b"1]", "the body must be a JSON object"),
    ("/explain", b'{"url": ["{page}"]}', "give the URL"),
    ("/explain", b'{"url": "{page}", "status": 1e999}', "'status' must be an HTTP status"),
    ("/explain", b'{"url": "{page}", "status": [true]}', "'status' must be an HTTP status"),
    ("/explain", b'{"url": "{page}", "status": 1' + b"0" * 5000 + b"}", "invalid JSON: a number is too long"),
    ("/explain", b'{"url": "{page}", "method": "G\\u0000T"}', "'method' must be a method name"),
    ("/explain", b'{"url": "{page}", "headers": [["Accept", "x"]]}', "'headers' must be a JSON object"),
    ("/explain", b'{"url": "{page}", "headers": {"X": [["a"]]}}', "must map to a string or a list of strings"),
    ("/explain", b'{"url": "{page}", "headers": {"X": "a\\r\\nInjected: 1"}}', "the value of 'X' holds '\\r'"),
    ("/explain", b'{"url": "{page}", "headers": "' + b"[" * 5000 + b'"}', "'headers' must be a JSON object"),
    ("/explain", b'{"url": "{page}", "response_headers": {"Cache-Control": {"max-age": 1}}}',
     "'response_headers'"),
]


async def post(proxy: Proxy, path: str, body: Any) -> Reply:
    return await proxy.admin("POST", path, data=body)


@pytest.fixture
async def cached(origin: Origin, make_proxy: MakeProxy) -> Proxy:
    proxy = await make_proxy()
    origin.route("/page", body=b"cached", headers={"Cache-Control": "max-age=600"})
    await proxy.get("/page")
    await settle(proxy)
    return proxy


@pytest.mark.parametrize("path, body, message", CASES,
                         ids=[f"{p}-{n}-{m[:30]}" for n, (p, _, m) in enumerate(CASES)])
async def test_hostile_json_is_a_precise_400_and_purges_nothing(
        cached: Proxy, path: str, body: bytes, message: str) -> None:
    body = body.replace(b"{page}", absolute(cached, "/page").encode())
    reply = await post(cached, path, body)
    assert reply.status == 400, reply.body[:300]
    assert reply.headers["Content-Type"].startswith("application/json")
    error = json.loads(reply.body)["error"]
    assert message in error
    assert "sys." not in error  # said for an API client, not as advice to a Python programmer
    assert (await cached.get("/page")).x_cache == "HIT"
    assert (await cached.admin("GET", "/healthz")).status == 200


@pytest.mark.parametrize("query, message", [
    # Deeper than the interpreter's recursion limit, within aiohttp's 8 KiB request line.
    ("headers=" + quote("[" * 2500), "'headers' must be a JSON object like"),
    ("headers=" + quote('{"a": 1, "a": 2}'), "given twice"),
    ("status=" + "9" * 5000, "'status' must be an HTTP status"),
    ("method=" + quote("G T"), "'method' must be a method name"),
])
async def test_hostile_query_parameters_of_get_explain_are_a_400(cached: Proxy, query: str, message: str) -> None:
    reply = await cached.admin("GET", f"/explain?url={quote(absolute(cached, '/page'))}&{query}")
    assert reply.status == 400, reply.body[:300]
    assert message in json.loads(reply.body)["error"]


async def chunks(total: int) -> AsyncIterator[bytes]:
    yield b'{"tags": ["'
    for _ in range(total // 65536):
        yield b"x" * 65536
    yield b'"]}'


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_over_1_mib_is_a_413_that_says_so(cached: Proxy, framing: str) -> None:
    data: Any = (io.BytesIO(b'{"tags": ["' + b"x" * (2 << 20) + b'"]}') if framing == "content-length"
                 else chunks(2 << 20))
    reply = await post(cached, "/purge", data)
    assert reply.status == 413
    assert json.loads(reply.body)["error"] == (
        "the request body is over 1048576 bytes (1 MiB), the admin API's limit")
    assert (await cached.get("/page")).x_cache == "HIT"


# -- properties: the pure functions behind the endpoints --------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
AUTHORITIES = ["a.example", "a.example:99999999", "a.example:-1", "a.example:", "[::1]", "[::1", "[zz]",
               "user:pw@a.example", "%zz", "a b", "\u00e9.example", "a..b", "A.Example.:80", ""]
url_like = st.builds(lambda scheme, host, rest: f"{scheme}{host}{rest}",
                     st.sampled_from(["http://", "https://", "ftp://", "", "http:/", "HTTP://"]),
                     st.sampled_from(AUTHORITIES) | st.text(max_size=20),
                     st.sampled_from(["/", "/a?b=1#f", "/%zz", "?x", "/\x00", ""]) | st.text(max_size=20))
documents = st.recursive(scalars | url_like,
                         lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.sampled_from(["urls", "prefixes", "tags", "all", "soft", "url",
                                                            "method", "headers", "status",
                                                            "response_headers", "x"]) | st.text(max_size=8),
                                           inner, max_size=5),
                         max_leaves=20)
RULES = RuleSet()


@settings(max_examples=300, deadline=None)
@given(documents | st.fixed_dictionaries({}, optional={
    "urls": st.lists(url_like, max_size=3), "prefixes": st.lists(url_like, max_size=3),
    "tags": st.lists(st.text(max_size=5), max_size=3), "all": documents, "soft": documents}))
@example(doc={"urls": ["http://[::1]@"]})  # yarl raises IndexError for it
def test_any_purge_document_is_a_spec_or_a_bad_request(doc: Any) -> None:
    with contextlib.suppress(BadRequest):
        parse_purge(doc)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["url", "method", "headers", "status", "response_headers"]),
                       documents | url_like, max_size=5)
       | st.fixed_dictionaries({"url": url_like}, optional={"headers": documents, "status": documents}))
@example(doc={"url": "http://[::1]@"})  # yarl raises IndexError for it
def test_any_explain_document_is_a_trace_or_a_bad_request(doc: dict[str, Any]) -> None:
    try:
        req, head = explain_request(doc)
    except BadRequest:
        return
    plan = RULES.plan(head)
    cache_key(head, plan.key)
    explain_trace(RULES, head, [], 1_700_000_000.0, [(s, req.response_headers) for s in req.statuses])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | documents.map(lambda d: json.dumps(d).encode()))
def test_any_bytes_are_json_or_a_bad_request(raw: bytes) -> None:
    with contextlib.suppress(BadRequest):
        loads_untrusted(raw)


URL_CHARS = st.sampled_from([*"aé/?#%:@[]\\.üß€ \x85\u200b\u3002１", "xn--", "::", "[::1]"])


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(["http://", "https://", "HTTP://"]), st.lists(URL_CHARS, max_size=14).map("".join)
       | st.text(max_size=20))
@example(scheme="http://", rest="é[]/x")  # yarl raised IndexError for the non-ASCII host: a 500
@example(scheme="http://", rest="é[]@/x")
def test_any_url_text_is_normalised_or_a_bad_purge(scheme: str, rest: str) -> None:
    """Whatever the text, a purge, explain or cache URL is a URL or a BadPurge (400), never
    another exception (a 500 with a traceback in the log)."""
    for prefix in (False, True):
        with contextlib.suppress(BadPurge):
            normalise_url(scheme + rest, prefix=prefix)
