"""What the admin API answers to a wrong method, and what it logs of the requests it is sent."""

from __future__ import annotations

import pytest

from tests.admin.util import js
from tests.harness import Proxy


@pytest.mark.parametrize(("method", "path", "allow", "takes"), [
    ("GET", "/purge", {"POST"}, "POST"),
    ("PUT", "/purge", {"POST"}, "POST"),
    ("DELETE", "/purge", {"POST"}, "POST"),
    ("GET", "/reload", {"POST"}, "POST"),
    ("POST", "/stats", {"GET", "HEAD"}, "GET or HEAD"),
    ("DELETE", "/explain", {"GET", "HEAD", "POST"}, "GET or HEAD or POST"),
])
async def test_a_wrong_method_is_405_with_allow_and_says_which_methods_the_path_takes(
        proxy: Proxy, method: str, path: str, allow: set[str], takes: str) -> None:
    """A 405 must say Allow (RFC 9110 §15.5.6); it was a bare "Method Not Allowed" without it."""
    reply = await proxy.admin(method, path, json={})
    assert reply.status == 405, reply.body
    assert set(reply.headers["Allow"].split(",")) == allow
    assert js(reply) == {"error": f"{method} is not allowed on {path}: it takes {takes}"}
    assert reply.headers["Content-Type"].startswith("application/json")
