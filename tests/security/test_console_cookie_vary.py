"""The console's session cookie rides along with a browser's requests to the proxy's port
(cookies are per host, not per port). It is nobody's but cachegate's: the origin never sees it,
and neither does the cache. A ``Vary: Cookie`` response was stored under the Cookie as received,
session id included: the id was written to the disk tier and shown by ``GET /cache``, and a
browser sending the same other cookies (what the origin answered for) missed."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from tests.admin.util import absolute, js, settle
from tests.conftest import MakeProxy
from tests.harness import Origin

TOKEN = "vary-cookie-t0ken-of-some-length"
SESSION = "OPERATORSESSIONID"


async def test_a_vary_cookie_variant_never_holds_the_consoles_session(
        origin: Origin, make_proxy: MakeProxy) -> None:
    async def by_cookie(request: web.Request) -> web.Response:
        cookie = request.headers.get("Cookie", "")
        return web.Response(text=f"for cookie {cookie!r}",
                            headers={"Cache-Control": "max-age=600", "Vary": "Cookie"})

    origin.route("/v", by_cookie)
    origin.route("/only", by_cookie)
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    bearer = {"Authorization": f"Bearer {TOKEN}"}

    first = await proxy.get("/v", headers={"Cookie": f"a=1; cachegate_session={SESSION}"})
    assert first.status == 200 and first.body == b"for cookie 'a=1'", first.body
    await settle(proxy)
    again = await proxy.get("/v", headers={"Cookie": "a=1"})  # what the origin answered for
    assert again.x_cache == "HIT" and again.body == b"for cookie 'a=1'", (again.x_cache, again.body)

    # A request whose only cookie is the session is, to the cache, a request without cookies.
    alone = await proxy.get("/only", headers={"Cookie": f"cachegate_session={SESSION}"})
    assert alone.body == b"for cookie ''", alone.body
    await settle(proxy)
    bare = await proxy.get("/only")
    assert bare.x_cache == "HIT" and bare.body == b"for cookie ''", (bare.x_cache, bare.body)

    for path in ("/v", "/only"):
        reply = await proxy.admin("GET", f"/cache?url={absolute(proxy, path)}", headers=bearer)
        assert reply.status == 200, reply.body
        assert SESSION not in reply.body.decode(), js(reply)
    stored = [s.headers.get("Cookie", "") for s in origin.seen]
    assert stored == ["a=1", ""], stored
    files = Path(proxy.cache_dir).rglob("*")  # noqa: ASYNC240 (a small local cache)
    held = b"".join(p.read_bytes() for p in files if p.is_file())
    assert SESSION.encode() not in held
