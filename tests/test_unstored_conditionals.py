"""A response that is not stored answers the client's conditionals and range all the same.

A fill sends the origin neither the client's conditionals nor its Range (it must get the
whole response to store it): they are answered from the response's head as it arrives. That
answer was given only when the response was being stored, so a private, ``no-store``,
Set-Cookie or too large response, and any response to a request with Authorization, got its
client the whole 200: an If-None-Match that matched, an If-Match that failed, a video
player's ``Range: bytes=0-``, a download's resume (``Range`` + ``If-Range``) of an object
over ``max_object`` (20 MB from the origin and to the client, for 10 bytes).

The origin here (aiohttp's plain ``web.Response``) evaluates neither conditionals nor Range:
whatever the proxy forwards, the answer checked is the proxy's own. Each request is sent
twice: the second comes in a hit-for-pass window where the first marked one.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin

BODY = bytes(i % 251 for i in range(1000))
BIG = bytes(i % 251 for i in range(256 * 1024))  # over max_object below
LM = "Mon, 01 Jan 2024 00:00:00 GMT"
CONFIG = "cache: {{max_object: 64KB, range_fill: {range_fill}}}\n"

ROUTES: dict[str, tuple[dict[str, str], bytes]] = {
    "/priv": ({"Cache-Control": "private, max-age=300", "ETag": '"pv"', "Last-Modified": LM}, BODY),
    "/nostore": ({"Cache-Control": "no-store", "ETag": '"ns"'}, BODY),
    "/cookie": ({"Cache-Control": "max-age=300", "ETag": '"ck"', "Set-Cookie": "s=1"}, BODY),
    "/full": ({"Cache-Control": "max-age=300", "ETag": '"v1"', "Last-Modified": LM}, BODY),
    "/big": ({"Cache-Control": "max-age=300", "ETag": '"big"'}, BIG),
}
AUTH = {"Authorization": "Bearer abc"}

# (case, path, request fields, status, body expected (None: none checked), Content-Range)
CASES: list[tuple[str, str, dict[str, str], int, bytes | None, str | None]] = [
    ("private, a failed If-Match with a Range: 412", "/priv", {"If-Match": '"old"', "Range": "bytes=0-9"},
     412, None, None),
    ("private, If-Unmodified-Since before its Last-Modified: 412", "/priv",
     {"If-Unmodified-Since": "Sat, 01 Jan 2000 00:00:00 GMT"}, 412, None, None),
    ("private, a matching If-None-Match: 304", "/priv", {"If-None-Match": '"pv"'}, 304, b"", None),
    ("private, If-Modified-Since its Last-Modified: 304", "/priv", {"If-Modified-Since": LM}, 304, b"", None),
    ("private, a resume (Range + a matching If-Range): 206", "/priv",
     {"Range": "bytes=990-", "If-Range": '"pv"'}, 206, BODY[990:], "bytes 990-999/1000"),
    ("private, a video element's bytes=0-: 206", "/priv", {"Range": "bytes=0-"}, 206, BODY,
     "bytes 0-999/1000"),
    ("private, a range beyond its end: 416", "/priv", {"Range": "bytes=5000-"}, 416, None, "bytes */1000"),
    ("private, an If-Range that does not match: the whole 200", "/priv",
     {"Range": "bytes=0-9", "If-Range": '"old"'}, 200, BODY, None),
    ("private, an If-None-Match that does not match: the whole 200", "/priv", {"If-None-Match": '"x"'},
     200, BODY, None),
    ("no-store, a matching If-None-Match: 304", "/nostore", {"If-None-Match": '"ns"'}, 304, b"", None),
    ("Set-Cookie, a Range: 206", "/cookie", {"Range": "bytes=0-9"}, 206, BODY[:10], "bytes 0-9/1000"),
    ("Authorization, a matching If-None-Match: 304", "/full", {**AUTH, "If-None-Match": '"v1"'}, 304, b"",
     None),
    ("Authorization, a failed If-Match: 412", "/full", {**AUTH, "If-Match": '"v0"'}, 412, None, None),
    ("Authorization, Range + a matching If-Range: 206", "/full",
     {**AUTH, "Range": "bytes=0-9", "If-Range": '"v1"'}, 206, BODY[:10], "bytes 0-9/1000"),
    ("a request's no-store, a Range: 206", "/full", {"Cache-Control": "no-store", "Range": "bytes=10-19"},
     206, BODY[10:20], "bytes 10-19/1000"),
    ("over max_object, a resume near its end: 206", "/big", {"Range": "bytes=262134-", "If-Range": '"big"'},
     206, BIG[262134:], "bytes 262134-262143/262144"),
    ("over max_object, bytes=0-: 206", "/big", {"Range": "bytes=0-"}, 206, BIG, "bytes 0-262143/262144"),
    ("over max_object, a matching If-None-Match: 304", "/big", {"If-None-Match": '"big"'}, 304, b"", None),
]


@pytest.mark.parametrize("range_fill", ["whole", "none"])
@pytest.mark.parametrize(("case", "path", "fields", "status", "body", "content_range"), CASES,
                         ids=[c[0] for c in CASES])
async def test_a_response_not_stored_answers_conditionals_and_ranges(
        origin: Origin, make_proxy: MakeProxy, range_fill: str, case: str, path: str, fields: dict[str, str],
        status: int, body: bytes | None, content_range: str | None) -> None:
    headers, data = ROUTES[path]
    origin.route(path, body=data, headers=headers)
    proxy = await make_proxy(config=CONFIG.format(range_fill=range_fill))
    for attempt in (1, 2):  # the second one in the hit-for-pass window the first may have marked
        reply = await proxy.get(path, headers=fields)
        assert reply.status == status, (attempt, reply.headers)
        if body is not None:
            assert reply.body == body, attempt
        assert reply.headers.get("Content-Range") == content_range, attempt
        if status in (304, 206):
            assert reply.headers.get("ETag") == headers["ETag"]
        assert origin.count(path) == attempt  # one request each, as before: nothing stored


async def test_a_herd_of_ranges_on_a_private_response_each_get_their_own(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """Followers of a flight whose response is private each fetch their own (it is not theirs
    to share): each answered its own range from its own response's head."""
    headers, data = ROUTES["/priv"]
    origin.route("/priv", body=data, headers=headers, delay=0.3)
    proxy = await make_proxy(config=CONFIG.format(range_fill="none"))
    ranges = [(0, 9), (10, 99), (500, 999), (990, 999), (0, 0)]
    replies = await asyncio.gather(*(proxy.get("/priv", headers={"Range": f"bytes={a}-{b}"})
                                     for a, b in ranges))
    for (a, b), reply in zip(ranges, replies, strict=True):
        assert reply.status == 206, (a, b, reply.headers)
        assert reply.body == BODY[a:b + 1]
        assert reply.headers["Content-Range"] == f"bytes {a}-{b}/1000"
    assert origin.count("/priv") <= len(ranges)


HUGE = 20_000_000
CHUNK = 1 << 20


async def test_a_resume_of_an_object_over_max_object_gets_its_ten_bytes(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A download's resume of a 20 MB object over ``max_object``: a 206 of the 10 bytes asked
    for, not the whole 20 MB. (This origin ignores the Range and If-Range it is sent: it still
    sends what precedes them.)"""
    sent = [0]

    async def huge(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=300", "ETag": '"big"'})
        resp.content_length = HUGE
        await resp.prepare(request)
        for at in range(0, HUGE, CHUNK):
            await resp.write(bytes([at // CHUNK % 251]) * min(CHUNK, HUGE - at))
            sent[0] += min(CHUNK, HUGE - at)
        await resp.write_eof()
        return resp

    origin.route("/huge", huge)
    proxy = await make_proxy(config="cache: {max_object: 1MB, range_fill: none}\n")
    reply = await proxy.get("/huge", headers={"Range": "bytes=19999990-", "If-Range": '"big"'})
    assert reply.status == 206
    assert reply.headers["Content-Range"] == f"bytes 19999990-19999999/{HUGE}"
    assert reply.body == bytes([(HUGE - 1) // CHUNK % 251]) * 10
    assert origin.count("/huge") == 1


async def test_a_hit_for_pass_keys_conditional_range_goes_with_its_range(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A request for a hit-for-pass key keeps its Range and If-Range, as its preconditions: the
    origin answers the 206 (relayed, never stored) rather than send the whole body for it to
    be sliced here. So does a cold key's resume: a range's fetch carries its If-Range (the
    origin evaluates it). The plain GET between them is a fill, whose private 200 marks the key."""
    async def ranged(request: web.Request) -> web.StreamResponse:
        headers = {"Cache-Control": "private", "ETag": '"pv"'}
        rng = request.headers.get("Range")
        if rng is not None and request.headers.get("If-Range", '"pv"') == '"pv"':
            first = int(rng.removeprefix("bytes=").split("-")[0])
            headers["Content-Range"] = f"bytes {first}-{len(BODY) - 1}/{len(BODY)}"
            return web.Response(status=206, body=BODY[first:], headers=headers)
        return web.Response(body=BODY, headers=headers)

    origin.route("/resume", ranged)
    proxy = await make_proxy()
    resume = {"Range": "bytes=990-", "If-Range": '"pv"'}
    cold = await proxy.get("/resume", headers=resume)
    plain = await proxy.get("/resume")
    passed = await proxy.get("/resume", headers=resume)
    assert (plain.status, plain.body) == (200, BODY)
    for reply in (cold, passed):
        assert (reply.status, reply.body) == (206, BODY[990:])
        assert reply.headers["Content-Range"] == "bytes 990-999/1000"
    sent = [(s.headers.get("Range"), s.headers.get("If-Range")) for s in origin.seen if s.path == "/resume"]
    assert sent == [("bytes=990-", '"pv"'), (None, None), ("bytes=990-", '"pv"')]


async def test_a_304_or_412_made_from_a_clients_own_response_carries_its_set_cookie(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A 304 or 412 made from a response fetched for this client alone (not stored: it sets a
    cookie) carries that response's Set-Cookie: the 304's fields were only those a stored
    response gives anyone, and a client revalidating the page never got the cookie the origin
    set (a session's refresh, a logout's), on every request while the key passed. A 206 kept it."""
    origin.route("/psc", body=BODY, headers={"Cache-Control": "max-age=60", "ETag": '"u"', "Set-Cookie": "s=A"})
    proxy = await make_proxy()
    for attempt in (1, 2):  # a fill, then a request in the hit-for-pass window
        reply = await proxy.get("/psc", headers={"If-None-Match": '"u"'})
        assert (reply.status, reply.headers.getall("Set-Cookie", [])) == (304, ["s=A"]), attempt
    reply = await proxy.get("/psc", headers={"If-Match": '"other"'})
    assert (reply.status, reply.headers.getall("Set-Cookie", [])) == (412, ["s=A"])
    reply = await proxy.get("/psc", headers={"Range": "bytes=0-9"})
    assert (reply.status, reply.headers.getall("Set-Cookie", [])) == (206, ["s=A"])


COOKIE_RULES = """
rules:
  - name: cookies removed
    match: {path: "/rm/**"}
    response_headers: {remove: [Set-Cookie]}
  - name: landing cookies are harmless
    match: {path: "/asc/**"}
    allow_set_cookie: true
"""


async def test_a_304s_cookie_follows_the_rules_and_goes_to_the_filling_client_only(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """The 304 made from the head takes the rules' edits as the 200 would (a rule removing
    Set-Cookie left it on the 304), and under ``allow_set_cookie`` the client whose request made
    the fill gets its cookie on its 304 too, as on its 200, while a client that joined the fill
    gets none."""
    origin.route("/rm/p", body=BODY, headers={"Cache-Control": "private", "ETag": '"r"', "Set-Cookie": "s=R"})
    origin.route("/asc/p", body=BODY, headers={"Cache-Control": "max-age=60", "ETag": '"a"', "Set-Cookie": "s=A"},
                 delay=0.3)
    proxy = await make_proxy(rules=COOKIE_RULES)
    reply = await proxy.get("/rm/p", headers={"If-None-Match": '"r"'})
    assert (reply.status, reply.headers.getall("Set-Cookie", [])) == (304, [])
    leader = asyncio.ensure_future(proxy.get("/asc/p", headers={"If-None-Match": '"a"'}))
    await asyncio.sleep(0.1)
    follower = await proxy.get("/asc/p", headers={"If-None-Match": '"a"'})
    first = await leader
    assert (first.status, first.headers.getall("Set-Cookie", [])) == (304, ["s=A"])
    assert (follower.status, follower.headers.getall("Set-Cookie", [])) == (304, [])
    assert "collapsed" in follower.cache_status and origin.count("/asc/p") == 1
