"""The client's preconditions (RFC 9110 §13.1.1 If-Match, §13.1.4 If-Unmodified-Since): evaluated
against a stored response (412 when false), forwarded when the request is passed on unstored."""

from __future__ import annotations

from aiohttp import web

from tests.harness import Origin, Proxy
from tests.rules.util import settle

LM = "Mon, 01 Jan 2024 00:00:00 GMT"
BEFORE = "Sun, 01 Jan 2023 00:00:00 GMT"
AFTER = "Tue, 01 Jan 2030 00:00:00 GMT"


def conditional(cache_control: str) -> web.RequestHandler:  # type: ignore[type-arg]
    """An origin that evaluates the preconditions itself."""

    async def handler(request: web.Request) -> web.Response:
        fields = {"ETag": '"v1"', "Last-Modified": LM, "Cache-Control": cache_control}
        if_match = request.headers.get("If-Match")
        if if_match is not None and if_match not in ('"v1"', "*"):
            return web.Response(status=412)
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers=fields)
        return web.Response(body=b"representation", headers=fields)

    return handler


async def test_a_stored_response_answers_a_false_precondition_with_412(origin: Origin, proxy: Proxy) -> None:
    origin.route("/c", conditional("max-age=300"))
    fast = proxy.listeners.runners[0].server.fast  # type: ignore[attr-defined]
    # A miss: the fill asks for the full response (no If-Match), then the stored one answers it.
    first = await proxy.get("/c", headers={"If-Match": '"other"'})
    assert (first.status, first.x_cache) == (412, "MISS")
    assert "If-Match" not in origin.seen[-1].headers
    await settle(proxy)
    answered = fast.answered
    for method, fields in (("GET", {"If-Match": '"other"'}), ("HEAD", {"If-Match": '"other"'}),
                           ("GET", {"If-Match": 'W/"v1"'}), ("GET", {"If-Unmodified-Since": BEFORE}),
                           ("GET", {"If-Match": '"other"', "If-None-Match": '"v1"'}),
                           ("GET", {"If-Match": '"other"', "Range": "bytes=0-1"})):
        reply = await proxy.request(method, "/c", headers=fields)
        assert (reply.status, reply.x_cache) == (412, "HIT"), (method, fields)
        assert "ETag" not in reply.headers and "Cache-Control" not in reply.headers
        assert reply.body == (b"412 Precondition Failed\n" if method == "GET" else b"")
    assert fast.answered == answered  # the fast path left them all to the general path
    for fields, status in (({"If-Match": '"v1"'}, 200), ({"If-Match": '"a", "v1"'}, 200),
                           ({"If-Match": "*"}, 200), ({"If-Unmodified-Since": LM}, 200),
                           ({"If-Unmodified-Since": AFTER}, 200),
                           ({"If-Match": '"v1"', "If-None-Match": '"v1"'}, 304),
                           ({"If-Match": '"v1"', "Range": "bytes=0-1"}, 206)):
        reply = await proxy.get("/c", headers=fields)
        assert (reply.status, reply.x_cache) == (status, "HIT"), fields
    assert origin.count("/c") == 1


async def test_a_stored_error_ignores_preconditions(origin: Origin, proxy: Proxy) -> None:
    origin.route("/gone", status=404, body=b"gone", headers={"Cache-Control": "max-age=300", "ETag": '"g"'})
    await proxy.get("/gone")
    await settle(proxy)
    reply = await proxy.get("/gone", headers={"If-Match": '"other"'})
    assert (reply.status, reply.x_cache, reply.body) == (404, "HIT", b"gone")  # RFC 9110 §13.2.1


async def test_a_hit_for_pass_request_forwards_every_precondition(origin: Origin, proxy: Proxy) -> None:
    origin.route("/pr", conditional("private"))
    origin.route("/ns", conditional("no-store"))
    for path in ("/pr", "/ns"):
        first = await proxy.get(path, headers={"If-None-Match": '"v1"'})
        # The first request is a fill (the response could have been storable): unconditional,
        # and its If-None-Match answered from the response's head, stored or not.
        assert (first.status, first.x_cache) == (304, "MISS")
        assert "If-None-Match" not in origin.seen[-1].headers
        again = await proxy.get(path, headers={"If-None-Match": '"v1"', "If-Modified-Since": LM})
        assert (again.status, again.x_cache) == (304, "MISS")
        assert origin.seen[-1].headers["If-None-Match"] == '"v1"'
        assert origin.seen[-1].headers["If-Modified-Since"] == LM
        failed = await proxy.get(path, headers={"If-Match": '"other"', "If-Unmodified-Since": BEFORE})
        assert (failed.status, failed.x_cache) == (412, "MISS")
        assert origin.seen[-1].headers["If-Match"] == '"other"'
        assert origin.seen[-1].headers["If-Unmodified-Since"] == BEFORE
        whole = await proxy.get(path, headers={"If-Match": '"v1"'})
        assert (whole.status, whole.body) == (200, b"representation")
        assert origin.count(path) == 4
