"""The engine's first decision on a request (``decide_request``), table by table: which
requests are looked up, which pass through (a GET or HEAD with a body among them), and
which cachegate answers itself; and ``explain`` saying the same of a request with a body."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.explain import ExplainRequest, explain, explain_trace, request_body, request_head
from proxy.policy.messages import RequestHead
from proxy.policy.request import (
    LOOK_UP,
    LOOKED_UP,
    REQUEST_BODY,
    OwnAnswer,
    PassThrough,
    RequestRoute,
    carries_body,
    decide_request,
)
from proxy.rules import CACHED_METHODS, RuleSet
from tests.rules.test_compile import compile_text


def head(method: str, *fields: tuple[str, str]) -> RequestHead:
    return RequestHead(method, "http", "a.example", "/_search", CIMultiDictProxy(CIMultiDict(fields)))


BODY = PassThrough("bypass", REQUEST_BODY)

# (method, fields, body, rules' bypass detail, route)
ROUTES: list[tuple[str, tuple[tuple[str, str], ...], bool, str | None, RequestRoute]] = [
    ("GET", (), False, None, LOOK_UP),
    ("HEAD", (), False, None, LOOK_UP),
    ("GET", (), True, None, BODY),
    ("HEAD", (), True, None, BODY),
    ("GET", (), False, "RULE-BYPASS:api", PassThrough("bypass", "RULE-BYPASS:api")),
    # a rule's bypass says why first: the request passes either way
    ("GET", (), True, "RULE-BYPASS:api", PassThrough("bypass", "RULE-BYPASS:api")),
    ("POST", (), True, None, PassThrough("method")),
    ("POST", (), False, None, PassThrough("method")),
    ("DELETE", (), True, None, PassThrough("method")),
    ("OPTIONS", (), True, None, PassThrough("method")),
    ("PROPFIND", (), True, "RULE-BYPASS:api", PassThrough("method")),
    ("OPTIONS", (("Max-Forwards", "0"),), True, None,
     OwnAnswer(200, "OK", (("Allow", "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"),))),
    ("OPTIONS", (("Max-Forwards", "3"),), False, None, PassThrough("method")),
    ("GET", (("Max-Forwards", "0"),), False, None, LOOK_UP),  # counts on OPTIONS and TRACE only
]


@pytest.mark.parametrize(("method", "fields", "body", "bypass", "route"), ROUTES)
def test_decide_request(method: str, fields: tuple[tuple[str, str], ...], body: bool, bypass: str | None,
                        route: RequestRoute) -> None:
    assert decide_request(head(method, *fields), body=body, bypass=bypass) == route


def test_the_methods_looked_up_are_the_rules_cached_methods() -> None:
    assert LOOKED_UP == CACHED_METHODS


@pytest.mark.parametrize(("fields", "body"), [
    ((), False),
    ((("Content-Length", "0"),), False),
    ((("Content-Length", "000"),), False),
    ((("Content-Length", "1"),), True),
    ((("content-length", " 12 "),), True),
    ((("Transfer-Encoding", "chunked"),), True),  # even an empty chunked body is a body
    ((("Content-Length", "x"),), False),  # the parser refuses it before anything asks
])
def test_carries_body(fields: tuple[tuple[str, str], ...], body: bool) -> None:
    assert carries_body(CIMultiDictProxy(CIMultiDict(fields))) is body


RULES: RuleSet = compile_text("""
rules:
  - name: api
    match: {path: "/api/**"}
    bypass: true
""")


@pytest.mark.parametrize(("url", "fields", "detail"), [
    ("http://a.example/_search", (("Content-Length", "14"),), REQUEST_BODY),
    ("http://a.example/_search", (("Transfer-Encoding", "chunked"),), REQUEST_BODY),
    ("http://a.example/api/x", (("Content-Length", "14"),), "RULE-BYPASS:api"),
])
def test_explain_says_a_get_with_a_body_is_passed_through(url: str, fields: tuple[tuple[str, str], ...],
                                                          detail: str) -> None:
    req = ExplainRequest(url, "GET", fields)
    assert request_body(req)
    trace = explain_trace(RULES, request_head(req), [], 0.0, [(200, (("Cache-Control", "max-age=60"),))],
                          body=True)
    assert trace["cache_key"] is None and "if_fetched" not in trace
    assert (trace["decision"]["fwd"], trace["decision"]["x_cache_status"]) == ("bypass", "BYPASS")
    assert trace["decision"]["cache_status"].endswith(f"detail={detail}")
    [decision] = [line for line in explain(RULES, req, 0.0) if line.startswith("  decision ")]
    assert "BYPASS" in decision and detail in decision


def test_explain_looks_up_a_get_with_content_length_0() -> None:
    req = ExplainRequest("http://a.example/_search", "GET", (("Content-Length", "0"),))
    assert not request_body(req)
    trace = explain_trace(RULES, request_head(req), [], 0.0, body=request_body(req))
    assert trace["cache_key"] is not None and trace["decision"]["fwd"] == "uri-miss"
