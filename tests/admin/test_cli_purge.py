"""``cachegate purge`` as a real command against a running proxy's admin API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.admin.util import absolute, settle, swept
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.ports import Ports

TOKEN = "cli-token-42-long-enough"


async def cachegate(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``python -m proxy ARGS`` without blocking the loop that serves the origin and proxy."""
    environment = {k: v for k, v in os.environ.items() if k != "CACHEGATE_ADMIN_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**environment, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def cached(origin: Origin, proxy: Proxy, *paths: str, tag: str = "t") -> None:
    for p in paths:
        origin.route(p, body=p.encode(), headers={"Cache-Control": "max-age=300", "Surrogate-Key": tag})
        await proxy.get(p)
    await settle(proxy)


async def test_purging_urls_prints_the_json_answer(origin: Origin, proxy: Proxy) -> None:
    await cached(origin, proxy, "/a", "/b", "/c")
    code, out, err = await cachegate("purge", "--admin", proxy.admin_url, absolute(proxy, "/a"),
                                     absolute(proxy, "/b"))
    assert (code, err) == (0, "")
    assert json.loads(out) == {"purged": 2, "soft": False}
    assert (await proxy.get("/a")).x_cache == "MISS"
    assert (await proxy.get("/c")).x_cache == "HIT"


async def test_tags_prefixes_all_and_soft(origin: Origin, proxy: Proxy) -> None:
    await cached(origin, proxy, "/t/1", "/t/2", tag="red")
    await cached(origin, proxy, "/p/1", "/p/2", "/z", tag="blue")
    code, out, _ = await cachegate("purge", "--admin", proxy.admin_url, "--tag", "red", "--tag", "none")
    assert (code, json.loads(out)) == (0, {"purged": 2, "soft": False})
    code, out, _ = await cachegate("purge", "--admin", proxy.admin_url, "--prefix", absolute(proxy, "/p/"))
    assert (code, json.loads(out)) == (0, {"purged": 2, "soft": False})
    assert (await proxy.get("/z")).x_cache == "HIT"
    await swept(proxy)  # "all" counts the index's entries: let the upkeep drop the purged ones first
    code, out, _ = await cachegate("purge", "--admin", proxy.admin_url, "--all", "--soft")
    assert (code, json.loads(out)) == (0, {"purged": 1, "soft": True})
    assert (await proxy.get("/z")).x_cache == "UPDATING"


async def test_the_token_comes_from_the_environment(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    await cached(origin, proxy, "/a")
    code, out, err = await cachegate("purge", "--admin", proxy.admin_url, absolute(proxy, "/a"))
    assert (code, out) == (1, "")
    assert "401" in err and "admin token required" in err
    code, out, err = await cachegate("purge", "--admin", proxy.admin_url, absolute(proxy, "/a"),
                                     env={"CACHEGATE_ADMIN_TOKEN": "wrong"})
    assert code == 1 and "401" in err
    assert (await proxy.get("/a")).x_cache == "HIT"
    code, out, err = await cachegate("purge", "--admin", proxy.admin_url, absolute(proxy, "/a"),
                                     env={"CACHEGATE_ADMIN_TOKEN": TOKEN})
    assert (code, json.loads(out)) == (0, {"purged": 1, "soft": False})


async def test_the_address_and_token_can_come_from_the_config(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n",
                             directory=tmp_path / "proxy")
    await cached(origin, proxy, "/a")
    port = proxy.admin_url.rsplit(":", 1)[1]
    config = tmp_path / "operator.yaml"
    config.write_text(f"upstreams: [{{url: '{origin.url}'}}]\nadmin:\n  listen: '0.0.0.0:{port}'\n"
                      "  token: ${OPERATOR_TOKEN}\n")
    # No CACHEGATE_ADMIN_TOKEN: the config's admin.token is used; 0.0.0.0 is reached on loopback.
    code, out, err = await cachegate("purge", "--config", str(config), absolute(proxy, "/a"),
                                     env={"OPERATOR_TOKEN": TOKEN})
    assert (code, err) == (0, "")
    assert json.loads(out) == {"purged": 1, "soft": False}
    code, _, err = await cachegate("purge", "--config", str(config), absolute(proxy, "/a"),
                                   env={"OPERATOR_TOKEN": "not-it-but-as-long"})
    assert code == 1 and "401" in err


async def test_a_config_token_naming_an_unset_variable_is_said_not_sent_as_none(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    """``purge --config`` and ``top --config`` whose admin.token is ``${VAR}`` with VAR unset
    (set only in systemd's EnvironmentFile) sent no token and printed 401 "admin token
    required". They say which variable at its line and exit 2; health needs no token."""
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n",
                             directory=tmp_path / "proxy")
    port = proxy.admin_url.rsplit(":", 1)[1]
    config = tmp_path / "operator.yaml"
    config.write_text(f"upstreams: [{{url: '{origin.url}'}}]\nadmin:\n  listen: '127.0.0.1:{port}'\n"
                      "  token: ${OPERATOR_TOKEN}\n")
    for command in (["purge", "--all"], ["top", "--once"]):
        code, out, err = await cachegate(*command, "--config", str(config))
        assert (code, out) == (2, ""), err
        assert err.splitlines() == [
            f"{config}:4: environment variable OPERATOR_TOKEN is not set",
            f"cachegate {command[0]}: admin.token of {config} names an environment variable that is not set here "
            "(on a systemd host, perhaps only in the unit's EnvironmentFile): set it, or give the token in "
            "CACHEGATE_ADMIN_TOKEN"], command
    code, out, err = await cachegate("health", "--config", str(config))
    assert (code, err) == (0, "")
    code, out, err = await cachegate("purge", "--all", "--config", str(config), env={"CACHEGATE_ADMIN_TOKEN": TOKEN})
    assert (code, err) == (0, "")


async def test_the_servers_error_is_printed_and_the_exit_status_is_1(origin: Origin, proxy: Proxy) -> None:
    await cached(origin, proxy, "/a")
    code, out, err = await cachegate("purge", "--admin", proxy.admin_url, "/a")
    assert (code, out) == (1, "")
    assert "400 Bad Request: '/a': give an absolute http:// or https:// URL" in err
    code, out, err = await cachegate("purge", "--admin", proxy.admin_url, "http://elsewhere.example/a")
    assert code == 1 and "does not serve host 'elsewhere.example'" in err
    assert (await proxy.get("/a")).x_cache == "HIT"


async def test_no_target_or_no_admin_api_is_an_error(ports: Ports) -> None:
    code, _, err = await cachegate("purge", "--admin", "http://127.0.0.1:9")
    assert code == 2 and "give URLs, --tag, --prefix or --all" in err
    down = ports.url()  # a port nobody listens on
    code, out, err = await cachegate("purge", "--admin", down, "--all")
    assert (code, out) == (1, "")
    assert f"cannot reach the admin API at {down}" in err


async def test_the_purge_command_has_help(origin: Origin) -> None:
    del origin
    code, out, _ = await cachegate("purge", "--help")
    assert code == 0 and "--tag TAG" in out and "CACHEGATE_ADMIN_TOKEN" in out




async def test_a_cluster_purge_not_acknowledged_by_every_node_prints_its_answer_and_exits_1(
        origin: Origin) -> None:
    # An admin API answering as a node of a cluster does when node b did not acknowledge (202).
    from aiohttp import web

    async def purge(request: web.Request) -> web.Response:
        return web.json_response({"purged": 3, "nodes": {"a": {"purged": 3}}, "missing": ["b"],
                                  "soft": False}, status=202, headers={"Cachegate-Admin": "1"})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, headers={"Cachegate-Admin": "1"})

    app = web.Application()
    app.router.add_post("/purge", purge)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        code, out, err = await cachegate("purge", "--admin", f"http://127.0.0.1:{port}", "--tag", "t")
    finally:
        await runner.cleanup()
    assert code == 1
    assert json.loads(out)["missing"] == ["b"]
    assert "not acknowledged within cluster.ack_timeout by b" in err


async def test_a_redirect_is_not_followed_so_the_token_stays_with_the_admin_listener() -> None:
    # An "admin API" that redirects elsewhere, and the elsewhere, which records what it gets.
    from aiohttp import web

    seen: list[str | None] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"purged": 0, "soft": False})

    target = web.Application()
    target.router.add_route("*", "/{tail:.*}", elsewhere)
    target_runner = web.AppRunner(target)
    await target_runner.setup()
    await web.TCPSite(target_runner, "127.0.0.1", 0).start()
    target_url = "http://{}:{}".format(*target_runner.addresses[0][:2])
    runners = [target_runner]
    try:
        for status in (301, 302, 303, 307, 308):
            async def redirect(request: web.Request, status: int = status) -> web.Response:
                return web.Response(status=status, headers={"Location": target_url + "/purge"})

            async def healthz(request: web.Request) -> web.Response:
                return web.json_response({"status": "ok"}, headers={"Cachegate-Admin": "1"})

            app = web.Application()
            app.router.add_post("/purge", redirect)
            app.router.add_get("/healthz", healthz)
            runner = web.AppRunner(app)
            runners.append(runner)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            admin = "http://{}:{}".format(*runner.addresses[0][:2])
            code, out, err = await cachegate("purge", "--admin", admin, "--all",
                                             env={"CACHEGATE_ADMIN_TOKEN": TOKEN})
            assert (code, out) == (1, ""), err
            assert f"answered {status} " in err and f"a redirect to {target_url}/purge: not followed" in err
        assert seen == []
    finally:
        for r in runners:
            await r.cleanup()


async def test_a_bad_admin_url_timeout_or_status_is_a_one_line_usage_error(origin: Origin, proxy: Proxy) -> None:
    """A malformed --admin was a traceback (or urllib's "unknown url type"), a --timeout of
    -1 or nan "bad admin URL ...: Timeout value out of range", --timeout 0 "did not answer
    within 0 s", an ftp:// URL or --status 999 accepted. Each is now argparse's usage error:
    exit 2, the argument named, no traceback; the running admin API is never called."""
    await cached(origin, proxy, "/a")
    admin = proxy.admin_url
    config = proxy.config_path
    for args, named in (
        (["health", "--admin", "notaurl"], "--admin"),
        (["health", "--admin", "http://[::1"], "--admin"),
        (["health", "--admin", "ftp://127.0.0.1:9"], "--admin"),
        (["purge", "--admin", "http://[::1", "--all"], "--admin"),
        (["purge", "--admin", "notaurl", "--all"], "--admin"),
        (["top", "--admin", "notaurl", "--once"], "--admin"),
        (["top", "--admin", admin.removeprefix("http://"), "--once"], "--admin"),
        (["health", "--admin", admin, "--timeout", "-1"], "--timeout"),
        (["health", "--admin", admin, "--timeout", "1e300"], "--timeout"),
        (["purge", "--admin", admin, "--timeout", "nan", "--all"], "--timeout"),
        (["purge", "--admin", admin, "--timeout", "0", "--all"], "--timeout"),
        (["explain", "-c", config, absolute(proxy, "/a"), "--status", "999"], "--status"),
    ):
        code, out, err = await cachegate(*args)
        assert (code, out) == (2, ""), args
        assert f"error: argument {named}: takes " in err and "Traceback" not in err, (args, err)
    assert (await proxy.get("/a")).x_cache == "HIT"  # no purge was sent
    code, _, err = await cachegate("health", "--admin", admin, "--timeout", "5")
    assert (code, err) == (0, "")


async def test_an_address_that_is_not_the_admin_listener_never_gets_the_token(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """``purge --admin <the client listener>`` (a port mix-up) sent POST /purge with the token:
    the client listener relayed both to the origin, which answered 200, and the command printed
    that and exited 0 with nothing purged; another server's ``<html>ok</html>`` did the same.
    ``purge`` and ``top`` now first ask GET /healthz without the token and go on only when the
    admin listener answered it (``Cachegate-Admin``, nothing the client listener adds)."""
    from aiohttp import web

    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    await cached(origin, proxy, "/a")
    # An origin that answers as cachegate's admin listener would, marker included.
    marked = {"Content-Type": "application/json", "Cachegate-Admin": "1"}
    origin.route("/healthz", body='{"status": "ok"}', headers=marked)
    origin.route("/purge", body='{"purged": 5, "soft": false}', headers=marked)
    origin.route("/console/api/live", body="{}", headers=marked)

    seen: list[str | None] = []

    async def other(request: web.Request) -> web.Response:  # an unrelated server: 200 to anything
        seen.append(request.headers.get("Authorization"))
        return web.Response(text="<html>ok</html>", content_type="text/html")

    async with answering_any_path(other) as elsewhere:
        for address in (proxy.url, elsewhere):
            for command in (["purge", "--all"], ["purge", absolute(proxy, "/a")], ["top", "--once"], ["top"]):
                code, out, err = await cachegate(*command, "--admin", address,
                                                 env={"CACHEGATE_ADMIN_TOKEN": TOKEN})
                assert (code, out) == (1, ""), (command, address, out, err)
                assert (f"{address} is not cachegate's admin endpoint (the admin token was not sent to it): "
                        "its answer to GET /healthz has no Cachegate-Admin field") in err, err
                assert "give the address of admin.listen" in err and "Traceback" not in err, err
        assert seen and seen == [None] * len(seen)
    assert [s for s in origin.seen if "Authorization" in s.headers] == []
    assert not any(s.path == "/purge" for s in origin.seen)
    assert (await proxy.get("/a")).x_cache == "HIT"  # nothing was purged, and nothing said it was
    # The admin listener itself still works, token and all.
    code, out, err = await cachegate("purge", "--admin", proxy.admin_url, absolute(proxy, "/a"),
                                     env={"CACHEGATE_ADMIN_TOKEN": TOKEN})
    assert (code, json.loads(out)) == (0, {"purged": 1, "soft": False}), err


@contextlib.asynccontextmanager
async def answering_any_path(handler: Any) -> AsyncIterator[str]:
    """An HTTP server on a loopback port of its own, ``handler`` answering every method and
    path; its URL."""
    from aiohttp import web

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield "http://{}:{}".format(*runner.addresses[0][:2])
    finally:
        await runner.cleanup()


async def test_a_marked_answer_to_purge_that_is_not_a_purge_result_is_an_error() -> None:
    """An answer that carries the admin listener's mark but is not ``{"purged": N, "soft": ...}``
    does not say anything was purged: exit 1, naming the address and what it answered."""
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        text = '{"status": "ok"}' if request.path == "/healthz" else "<html>ok</html>"
        return web.Response(text=text, headers={"Cachegate-Admin": "1"})

    async with answering_any_path(answer) as admin:
        code, out, err = await cachegate("purge", "--admin", admin, "--all")
    assert (code, out) == (1, "")
    assert (f"cachegate purge: the admin API at {admin} answered POST /purge with something that is "
            "not a purge's result") in err and '"<html>ok</html>"' in err, err
