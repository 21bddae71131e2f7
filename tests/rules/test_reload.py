"""Hot reload: POST /reload in-process, SIGHUP on a real `cachegate run` process.

A good new config applies without dropping a connection or losing the cache; a
bad one is rejected with the same FILE:LINE messages and the old one keeps running.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from proxy.config import Overrides
from proxy.web.server import install_reloader
from tests.harness import Origin, Proxy, spawn_cachegate, write_config

MakeProxy = Callable[..., Awaitable[Proxy]]
ROOT = Path(__file__).resolve().parents[2]

RULES_V1 = """
    rules:
      - {name: old, match: {path: /old}, bypass: true}
"""
RULES_V2 = """
    rules:
      - {name: new, match: {path: /new}, bypass: true}
"""
RULES_BAD = """
    rules:
      - name: new
        match: {path: /new, status: 500}
        bypass: true
"""


def rewrite(directory: str | Path, rules: str) -> None:
    Path(directory, "rules.yaml").write_text(textwrap.dedent(rules))


async def test_post_reload_applies_new_rules_and_keeps_the_cache(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    proxy = await make_proxy(rules=RULES_V1)
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    for path in ("/kept", "/old", "/new"):
        origin.route(path, body=path.encode(), headers={"Cache-Control": "max-age=60"})
    assert (await proxy.get("/kept")).x_cache == "MISS"
    assert (await proxy.get("/old")).x_cache == "BYPASS"

    rewrite(tmp_path, RULES_V2)
    reply = await proxy.admin("POST", "/reload")
    assert reply.status == 200, reply.body
    assert b'"reloaded": true' in reply.body and b'"rules": 1' in reply.body
    assert (await proxy.get("/kept")).x_cache == "HIT"  # the cache survived
    assert (await proxy.get("/old")).x_cache == "MISS"
    assert (await proxy.get("/new")).x_cache == "BYPASS"

    rewrite(tmp_path, RULES_BAD)
    reply = await proxy.admin("POST", "/reload")
    assert reply.status == 400
    body = await_json(reply.body)
    assert body["error"] == "config rejected; the running config stays"
    assert any(re.search(r"rules\.yaml:5: rule 'new': bypass is decided before", p) for p in body["problems"])
    assert (await proxy.get("/new")).x_cache == "BYPASS"  # the old rules still run
    assert (await proxy.get("/kept")).x_cache == "HIT"
    metrics = (await proxy.admin("GET", "/metrics")).body.decode()
    assert 'cachegate_config_reloads_total{result="success"} 1.0' in metrics
    assert 'cachegate_config_reloads_total{result="failure"} 1.0' in metrics


def await_json(body: bytes) -> dict[str, object]:
    import json

    return json.loads(body)  # type: ignore[no-any-return]


async def test_reload_applies_a_new_admin_token_and_reports_what_needs_a_restart(
        origin: Origin, make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELOAD_TEST_TOKEN", "s3cret")
    proxy = await make_proxy(rules=RULES_V1)
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    config = Path(proxy.config_path)
    text = config.read_text()  # noqa: ASYNC240 (a small local file)
    assert "admin: {listen: '127.0.0.1:0'}\n" in text and "listen: 127.0.0.1:0\n" in text
    text = text.replace("admin: {listen: '127.0.0.1:0'}\n",
                        "admin: {listen: '127.0.0.1:0', token: '${RELOAD_TEST_TOKEN}'}\n")
    text = text.replace("listen: 127.0.0.1:0\n", "listen: 127.0.0.1:1\n", 1) + "via: edge-1\n"
    config.write_text(text)  # noqa: ASYNC240
    reply = await proxy.admin("POST", "/reload")
    assert reply.status == 200
    assert await_json(reply.body)["restart_required"] == ["listen"]
    assert (await proxy.admin("POST", "/reload")).status == 401  # the new token is in force
    reply = await proxy.admin("POST", "/reload", headers={"Authorization": "Bearer s3cret"})
    assert reply.status == 200
    origin.route("/v", body=b"v")
    assert "1.1 edge-1" in (await proxy.get("/v")).headers["Via"]  # applied at once
    assert proxy.runtime.settings.listen == ("127.0.0.1", 0)  # kept until a restart


async def held_reload(hold: Path, pid: int, wait: float = 20.0) -> Path:
    """The marker of a reload of process ``pid`` held while it compiles (CACHEGATE_RELOAD_HOLD)."""
    marker = hold / f"{pid}.held"
    for _ in range(int(wait / 0.01)):
        if marker.exists():
            return marker
        await asyncio.sleep(0.01)
    raise AssertionError(f"no reload of pid {pid} began compiling")


async def test_the_proxy_answers_while_a_reload_compiles(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Thousands of rules take seconds to compile: meanwhile the old config serves (the compile
    runs in a thread), and the new one applies all at once when it is done. The reload is held
    mid-compile by the test hook, not made slow with a big file: ordering, not timing."""
    hold = tmp_path / "hold"
    hold.mkdir()
    monkeypatch.setenv("CACHEGATE_RELOAD_HOLD", str(hold))
    proxy = await make_proxy(rules=RULES_V1)
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    for path in ("/kept", "/old", "/new"):
        origin.route(path, body=path.encode(), headers={"Cache-Control": "max-age=60"})
    assert (await proxy.get("/kept")).x_cache == "MISS"
    rewrite(tmp_path, RULES_V2)
    reload = asyncio.ensure_future(proxy.admin("POST", "/reload"))
    marker = await held_reload(hold, os.getpid())
    # Compiling: answered meanwhile, by the old rules.
    assert (await proxy.get("/kept")).x_cache == "HIT"
    assert (await proxy.get("/old")).x_cache == "BYPASS"
    assert (await proxy.get("/new")).x_cache == "MISS"
    assert not reload.done()
    marker.unlink()
    reply = await reload
    assert reply.status == 200, reply.body
    assert (await proxy.get("/new")).x_cache == "BYPASS"
    assert (await proxy.get("/old")).x_cache == "MISS"


async def test_overlapping_reloads_apply_in_the_order_they_came(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second reload asked while the first compiles waits its turn and reads the files then:
    the edit it was asked for is what runs at the end, never the first's older read."""
    hold = tmp_path / "hold"
    hold.mkdir()
    monkeypatch.setenv("CACHEGATE_RELOAD_HOLD", str(hold))
    proxy = await make_proxy(rules=RULES_V1)
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    origin.route("/new", body=b"new", headers={"Cache-Control": "max-age=60"})
    rewrite(tmp_path, RULES_V2)
    first = asyncio.ensure_future(proxy.admin("POST", "/reload"))
    marker = await held_reload(hold, os.getpid())
    second = asyncio.ensure_future(proxy.admin("POST", "/reload"))
    await asyncio.sleep(0.1)
    rewrite(tmp_path, RULES_V1)  # after the second was asked: it must read this
    marker.unlink()
    marker = await held_reload(hold, os.getpid())  # the second's turn
    assert first.done() and (await first).status == 200
    assert not second.done()
    marker.unlink()
    assert (await second).status == 200
    assert (await proxy.get("/new")).x_cache == "MISS"  # RULES_V1 runs: /new is cached
    assert [r.name for r in proxy.runtime.settings.rules.rules] == ["old"]


async def test_post_reload_without_a_config_file_answers_501(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    assert (await proxy.admin("POST", "/reload")).status == 501


# -- SIGHUP on a real process ------------------------------------------------------------------------


class KeepAlive:
    """One HTTP/1.1 connection, kept open across requests (a raw client: no pool to hide a reconnect)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> KeepAlive:
        return cls(*await asyncio.open_connection(host, port))

    async def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: site.example\r\n\r\n".encode())
        await self.writer.drain()
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        assert headers.get("connection", "").lower() != "close"
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        else:
            assert headers.get("transfer-encoding") == "chunked"
            body = b""
            while True:
                size = int((await self.reader.readline()).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        return status, headers, body

    def close(self) -> None:
        self.writer.close()


async def wait_for_reloads(admin: str, result: str, count: int) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            async with session.get(f"{admin}/metrics") as resp:
                text = await resp.text()
            if f'cachegate_config_reloads_total{{result="{result}"}} {count}.0' in text:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"no {result} reload #{count} seen")


@pytest.mark.slow
async def test_sighup_reloads_a_running_process_without_dropping_connections(
        origin: Origin, tmp_path: Path) -> None:
    for path in ("/kept", "/old", "/new"):
        origin.route(path, body=path.encode(), headers={"Cache-Control": "max-age=60"})
    origin.route("/slow", body=b"slow body", headers={"Cache-Control": "max-age=60"}, delay=0.8)
    config = write_config(str(tmp_path), origin.url, rules=RULES_V1)
    stderr = open(tmp_path / "stderr.log", "wb")  # noqa: SIM115, ASYNC230 (closed below)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", config, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=stderr,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    conn = slow_conn = None
    try:
        assert proc.stdout is not None
        proxy_port = admin_url = None
        while proxy_port is None or admin_url is None:
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            assert line, (tmp_path / "stderr.log").read_text()
            if m := re.search(r"proxy listening on http://127\.0\.0\.1:(\d+)", line):
                proxy_port = int(m.group(1))
            if m := re.search(r"admin listening on (http://127\.0\.0\.1:\d+)", line):
                admin_url = m.group(1)

        conn = await KeepAlive.open("127.0.0.1", proxy_port)
        assert (await conn.get("/kept"))[1]["x-cache-status"] == "MISS"
        assert (await conn.get("/kept"))[1]["x-cache-status"] == "HIT"
        assert (await conn.get("/old"))[1]["x-cache-status"] == "BYPASS"

        # A request in flight while the signal arrives, on a second connection.
        slow_conn = await KeepAlive.open("127.0.0.1", proxy_port)
        slow = asyncio.ensure_future(slow_conn.get("/slow"))
        await asyncio.sleep(0.2)
        rewrite(tmp_path, RULES_V2)
        proc.send_signal(signal.SIGHUP)
        await wait_for_reloads(admin_url, "success", 1)
        status, _, body = await slow
        assert (status, body) == (200, b"slow body")

        status, headers, body = await conn.get("/kept")  # same connection, same cache
        assert (status, headers["x-cache-status"], body) == (200, "HIT", b"/kept")
        assert (await conn.get("/old"))[1]["x-cache-status"] == "MISS"
        assert (await conn.get("/new"))[1]["x-cache-status"] == "BYPASS"

        rewrite(tmp_path, RULES_BAD)
        proc.send_signal(signal.SIGHUP)
        await wait_for_reloads(admin_url, "failure", 1)
        assert (await conn.get("/new"))[1]["x-cache-status"] == "BYPASS"  # old rules still run
        assert (await conn.get("/kept"))[1]["x-cache-status"] == "HIT"
        assert (await slow_conn.get("/slow"))[1]["x-cache-status"] == "HIT"
    finally:
        for c in (conn, slow_conn):
            if c is not None:
                c.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 20)
        stderr.close()
    log = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 0, log
    assert "rules.yaml:5: rule 'new': bypass is decided before the response exists" in log
    assert "reload rejected, the running config stays" in log


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_shutdown_after_a_reload_uses_and_logs_the_new_grace_period(
        origin: Origin, tmp_path: Path, workers: str) -> None:
    """shutdown_grace applies at once on reload (docs/rules.md): the stop that follows says so."""
    config = write_config(str(tmp_path), origin.url, "shutdown_grace: 17s\n")
    proc = spawn_cachegate(["run", "--config", config, "--workers", workers, "--log-level", "info"])
    try:
        Path(config).write_text(Path(config).read_text().replace("shutdown_grace: 17s", "shutdown_grace: 3s"))
        proc.proc.send_signal(signal.SIGHUP)
        # Every process has reloaded (the supervisor first, then each worker: it answers the
        # SIGHUP before they follow, so a stop in between would find a worker on the old config).
        processes = 1 if workers == "1" else int(workers) + 1
        for _ in range(200):
            if proc.text.count("config reloaded from") >= processes:
                break
            time.sleep(0.05)
        assert proc.text.count("config reloaded from") == processes, proc.text
    finally:
        code = proc.stop()
    assert code == 0, proc.text
    assert "grace 3s" in proc.text, proc.text
    assert "grace 17s" not in proc.text, proc.text
