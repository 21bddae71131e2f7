"""A password in ``cluster.redis`` is never shown: not in the userinfo, not in the query string
(redis-py's way for a unix socket: ``unix:///run/redis.sock?password=...``), wherever the URL is
shown (``/healthz``, which needs no token, ``GET /cluster``, the log, the exit message)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from proxy.cluster.settings import redacted
from tests.cluster.nodes import Nodes, admin_json, cluster_view, wait_until
from tests.harness import Origin
from tests.storage.procs import ProxyProcess

pytestmark = pytest.mark.slow

SECRET = "S3CRETpw"


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:pw@h:1/2", "redis://:***@h:1/2"),
    ("redis://user:pw@h:1/2", "redis://user:***@h:1/2"),
    ("redis://pw@h:1/2", "redis://***@h:1/2"),  # a password without its ':' (redis-py: a username)
    ("unix:///run/r.sock?db=0&password=pw", "unix:///run/r.sock?db=0&password=***"),
    ("redis://h:1/0?password=pw&db=1", "redis://h:1/0?password=***&db=1"),
    ("redis://h:1/0?pass%77ord=pw", "redis://h:1/0?pass%77ord=***"),  # redis-py decodes the name
    ("redis://h:1/0?ssl_password=pw&api_token=t&x=y", "redis://h:1/0?ssl_password=***&api_token=***&x=***"),
    ("redis://h:1/0?socket_timeout=2&client_name=a", "redis://h:1/0?socket_timeout=2&client_name=a"),
    ("redis://h:1/0#pw", "redis://h:1/0#***"),
    ("redis://[::1:6379/0?password=pw", "(a URL that cannot be read: not shown, it may hold a password)"),
    ("redis://h:1/0", "redis://h:1/0"),
    # '/', '?', '#' in the password (not percent-encoded): urllib's netloc ends before the '@'
    ("redis://:Zm9v/YmFy@h:1/0", "redis://:***@h:1/0"),
    ("redis://default:p?ss@h:1/0", "redis://default:***@h:1/0"),
    ("redis://default:AB#CD@h:1/0", "redis://default:***@h:1/0"),
    ("redis://a/b?c#d@h:1/0", "redis://***@h:1/0"),
    ("redis://u:p@ss@h:1/0?password=x", "redis://u:***@h:1/0?password=***"),
])
def test_every_place_a_password_can_be_written_is_masked(url: str, shown: str) -> None:
    assert redacted(url) == shown


async def test_a_password_in_the_query_string_is_shown_nowhere(origin: Origin, tmp_path: Path) -> None:
    socket_path = tmp_path / "nosock.sock"  # no Redis there: every message names the URL
    url = f"unix://{socket_path}?db=0&password={SECRET}"
    nodes = Nodes(str(tmp_path), origin.url, url, timeout="0.3s", heartbeat="0.2s")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", nodes.config("a"), cwd=str(tmp_path / "a"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ))
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert f"cannot reach Redis at unix://{socket_path}?db=0&password=***" in err.decode(), err
    assert SECRET not in (out + err).decode()

    b = ProxyProcess(str(tmp_path / "b"), nodes.config("b", required=False))
    nodes.procs["b"] = b
    try:
        await b.start(with_log=True)  # the log (standard error) among its lines
        await b.wait_for(lambda: bool(b.admin_url))
        status, health = await admin_json(b, "GET", "/healthz")
        assert status == 200 and health["cluster"] == "disconnected"
        assert "password=***" in health["reason"] and SECRET not in str(health)
        view = await cluster_view(b)
        assert view["redis"] == f"unix://{socket_path}?db=0&password=***"
        assert SECRET not in str(view)
        await wait_until(lambda: _logged(b, "password=***"))
        assert not [line for line in b.lines if SECRET in line]
    finally:
        await nodes.stop_all()


async def _logged(proc: ProxyProcess, text: str) -> bool:
    return any(text in line for line in proc.lines)
