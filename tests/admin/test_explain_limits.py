"""POST /explain of a head the client listener refuses (too big, too many fields, a field too
long) answers what that listener answers, status and why, instead of a decision trace: a trace
of 20,000 fields or a 500 KB Cookie cost 70-130 ms of the worker and described a request no
client could make."""

from __future__ import annotations

import pytest

from proxy.explain import ExplainRequest, request_head
from proxy.policy.request import MAX_HEADERS, MAX_REQUEST_LINE
from tests.admin.util import js
from tests.harness import Origin, Proxy
from tests.security.util import request, send_raw

HEADS = {
    "20,000 fields": [(f"X-F{i}", "v") for i in range(20_000)],
    "a 500 KB Cookie": [("Cookie", "a=" + "x" * 500_000)],
    "one field too many (with the Host)": [(f"X-F{i}", "v") for i in range(MAX_HEADERS)],
    "a field value too long": [("X-A", "v" * (MAX_REQUEST_LINE + 1))],
    "a field name too long": [("X-" + "a" * MAX_REQUEST_LINE, "v")],
}


@pytest.mark.parametrize("case", HEADS)
async def test_explain_answers_a_head_the_client_listener_refuses_as_that_listener_does(
        origin: Origin, proxy: Proxy, case: str) -> None:
    origin.route("/e", body=b"e", headers={"Cache-Control": "max-age=60"})
    fields = HEADS[case]
    host = proxy.url.removeprefix("http://")
    sent = await send_raw(proxy, request("GET", "/e", f"Host: {host}", *(f"{n}: {v}" for n, v in fields)),
                          head_only=True)
    assert sent.status in (400, 431), (case, sent.status)
    headers: dict[str, list[str]] = {}
    for n, v in fields:
        headers.setdefault(n, []).append(v)
    reply = await proxy.admin("POST", "/explain", json={"url": proxy.url + "/e", "headers": headers})
    assert reply.status == 400, (case, reply.body[:200])
    assert js(reply)["error"].startswith(f"the proxy would refuse this request with {sent.status}: "), \
        (case, js(reply)["error"][:200])
    assert origin.count("/e") == 0


async def test_explain_traces_a_head_just_within_the_limits(origin: Origin, proxy: Proxy) -> None:
    """``MAX_HEADERS`` fields with the Host explain adds, one of them as long as a field may be:
    the client listener takes such a head (what the origin then says is its own affair)."""
    origin.route("/e", body=b"e", headers={"Cache-Control": "max-age=60"})
    headers = {f"X-F{i}": "v" for i in range(MAX_HEADERS - 2)} | {"X-Long": "v" * MAX_REQUEST_LINE}
    host = proxy.url.removeprefix("http://")
    sent = await send_raw(proxy, request("GET", "/e", f"Host: {host}", *(f"{n}: {v}" for n, v in headers.items())))
    assert any(k.lower() == "via" for k, _ in sent.fields), sent  # the listener passed it on
    reply = await proxy.admin("POST", "/explain", json={"url": proxy.url + "/e", "headers": headers})
    assert reply.status == 200, reply.body[:300]
    assert js(reply)["request"]["method"] == "GET", js(reply)


def test_the_cli_explain_of_a_head_over_max_request_head_says_the_proxy_would_refuse_it() -> None:
    req = ExplainRequest(url="http://h.example/a", headers=(("Cookie", "a=" + "x" * 3000),), max_head=2048)
    with pytest.raises(ValueError, match=r"would refuse this request with 431: the request head is \d+ bytes, "
                                         r"over the 2048"):
        request_head(req)
