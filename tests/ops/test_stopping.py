"""While the process stops, every reply says ``Connection: close``: the connection ends after it."""

from __future__ import annotations

from tests.conftest import MakeProxy
from tests.harness import Origin


async def test_a_hit_while_stopping_takes_the_general_path_and_closes(origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/h", body=b"hit", headers={"Cache-Control": "max-age=300"})
    proxy = await make_proxy()
    fast = proxy.listeners.runners[0].server.fast  # type: ignore[union-attr]
    assert fast is not None
    await proxy.get("/h")
    before = fast.answered
    r = await proxy.get("/h")
    assert r.headers["X-Cache-Status"] == "HIT" and fast.answered == before + 1
    assert r.headers.get("Connection") is None  # keep-alive, as HTTP/1.1 goes by default

    proxy.runtime.state = "stopping"  # as serve() says before it stops the listeners
    r = await proxy.get("/h")
    assert (r.status, r.body, r.headers["X-Cache-Status"]) == (200, b"hit", "HIT")
    assert r.headers["Connection"] == "close"
    assert fast.answered == before + 1  # the fast path's heads are keep-alive ones: it declined
    # A miss too (the general path's head).
    origin.route("/m", body=b"miss")
    r = await proxy.get("/m")
    assert (r.status, r.headers["Connection"]) == (200, "close")
