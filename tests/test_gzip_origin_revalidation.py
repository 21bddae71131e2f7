"""Revalidating what an origin compressed: nginx's ``gzip on`` marks the ETag of a gzip response
weak (``W/"x"``) and answers ``If-None-Match: W/"x"`` with a 304 carrying the strong ``"x"`` (its
gzip filter does not run on a 304). The origin compared our tag weakly (RFC 9110 §13.1.2) and
says the copy we hold is current; taken as a 304 about something else, every revalidation of a
gzip copy was a wasted 304 followed by a full 200. The origin below answers as nginx 1.22 does
(its fields copied from one, ``expires 1s``).
"""

from __future__ import annotations

import gzip

from aiohttp import web

from proxy.policy.httpdate import format_http_date
from tests.conftest import MakeProxy, clocked
from tests.harness import Clock, Origin, Proxy

TEXT = b".x{color:red}\n" * 500
GZIPPED = gzip.compress(TEXT, mtime=0)
GZIP = {"Accept-Encoding": "gzip"}
IDENTITY = {"Accept-Encoding": "identity"}


class Nginx:
    """A static file behind nginx with ``gzip on; gzip_vary on; expires 1s``: a gzip client's 200
    is compressed with ``W/"<tag>"``, anyone else's is the file with ``"<tag>"``; a 304 (to
    If-None-Match compared weakly, as nginx does) has the strong tag, no Vary, no
    Content-Encoding. ``tag`` is what the file's tag is now."""

    def __init__(self, clock: Clock, tag: str = "x", answer_304: str | None = None) -> None:
        self.clock, self.tag = clock, tag
        self.answer_304 = answer_304  # the tag its 304s carry when not the file's (a broken origin)
        self.asked: list[str | None] = []  # each request's If-None-Match

    async def handle(self, request: web.Request) -> web.StreamResponse:
        inm = request.headers.get("If-None-Match")
        self.asked.append(inm)
        now = self.clock()
        fields = {"Server": "nginx/1.22.1", "Date": format_http_date(now),
                  "Last-Modified": format_http_date(now - 3600), "Expires": format_http_date(now + 1),
                  "Cache-Control": "max-age=1"}
        strong = f'"{self.tag}"'
        if inm is not None and inm.removeprefix("W/") == strong:
            return web.Response(status=304, headers=fields | {"ETag": f'"{self.answer_304 or self.tag}"'})
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(body=GZIPPED, headers=fields | {
                "Content-Type": "text/css", "Vary": "Accept-Encoding", "ETag": f"W/{strong}",
                "Content-Encoding": "gzip"})
        return web.Response(body=TEXT, headers=fields | {
            "Content-Type": "text/css", "Vary": "Accept-Encoding", "ETag": strong, "Accept-Ranges": "bytes"})


async def nginx_behind(origin: Origin, make_proxy: MakeProxy, clock: Clock, **kwargs: str) -> tuple[Nginx, Proxy]:
    nginx = Nginx(clock, **kwargs)
    origin.route("/a.css", nginx.handle)
    return nginx, await clocked(make_proxy, clock)


def unusable_304s(proxy: Proxy) -> float:
    return proxy.runtime.metrics.unusable_304s.labels("validator").value


async def test_nginx_s_strong_304_to_a_gzip_copy_s_weak_etag_refreshes_it(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    nginx, proxy = await nginx_behind(origin, make_proxy, clock)
    first = await proxy.get("/a.css", headers=GZIP)
    assert (first.x_cache, first.body, first.headers["ETag"]) == ("MISS", GZIPPED, 'W/"x"')
    clock.advance(2)
    again = await proxy.get("/a.css", headers=GZIP)
    assert again.x_cache == "REVALIDATED", again.cache_status
    assert "fwd-status=304" in again.cache_status
    assert nginx.asked == [None, 'W/"x"']  # one conditional request, no second fetch
    assert again.body == GZIPPED and again.headers["Content-Encoding"] == "gzip"
    assert again.headers["ETag"] == 'W/"x"'  # the gzip bytes' tag stays weak: "x" names the file's
    assert (await proxy.get("/a.css", headers=GZIP)).x_cache == "HIT"  # freshened for max-age=1
    clock.advance(2)
    assert (await proxy.get("/a.css", headers=GZIP)).x_cache == "REVALIDATED"
    assert nginx.asked == [None, 'W/"x"', 'W/"x"']  # the next revalidation sends the weak tag again
    assert unusable_304s(proxy) == 0


async def test_a_304_with_another_tag_than_the_one_sent_is_still_not_used(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    nginx, proxy = await nginx_behind(origin, make_proxy, clock, answer_304="y")
    assert (await proxy.get("/a.css", headers=GZIP)).x_cache == "MISS"
    clock.advance(2)
    again = await proxy.get("/a.css", headers=GZIP)
    assert (again.x_cache, again.body) == ("EXPIRED", GZIPPED)
    assert "fwd-status=200" in again.cache_status
    assert nginx.asked == [None, 'W/"x"', None]  # its 304 was about something else: fetched whole
    assert unusable_304s(proxy) == 1


async def test_the_key_s_other_variants_are_freshened_by_the_304_s_strong_tag_only(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    """RFC 9111 §4.3.4: the other stored responses a 304 updates are those with its strong
    validator. The identity copy ("x") revalidated: the gzip copy (W/"x") is not among them, and
    is revalidated on its own. The gzip copy revalidated (the 304 says "x"): the identity copy is."""
    nginx, proxy = await nginx_behind(origin, make_proxy, clock)
    assert (await proxy.get("/a.css", headers=GZIP)).x_cache == "MISS"
    plain = await proxy.get("/a.css", headers=IDENTITY)
    assert (plain.x_cache, plain.body, plain.headers["ETag"]) == ("MISS", TEXT, '"x"')
    clock.advance(2)
    assert (await proxy.get("/a.css", headers=IDENTITY)).x_cache == "REVALIDATED"
    assert (await proxy.get("/a.css", headers=GZIP)).x_cache == "REVALIDATED"  # not freshened by it
    assert nginx.asked == [None, None, '"x"', 'W/"x"']
    clock.advance(2)
    assert (await proxy.get("/a.css", headers=GZIP)).x_cache == "REVALIDATED"
    plain = await proxy.get("/a.css", headers=IDENTITY)
    assert (plain.x_cache, plain.body, plain.headers["ETag"]) == ("HIT", TEXT, '"x"')
    assert nginx.asked == [None, None, '"x"', 'W/"x"', 'W/"x"']
