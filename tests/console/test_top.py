"""``cachegate top``: its screen from the live JSON (pure), and the real thing in a pseudo-terminal
against a running proxy, read back after traffic; ``q`` quits and the terminal is restored."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import re
import struct
import sys
import termios
from pathlib import Path
from typing import Any

import pytest

from proxy.top import ENTER, HOME, LEAVE, plain, render
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.storage.procs import HOST, ProxyProcess, write_config

TOKEN = "top-t0ken-of-some-length"

LIVE: dict[str, Any] = {
    "seq": 3, "uptime_seconds": 125.0, "workers": 2,
    "last_minute": {"hit_ratio": 0.9, "request_offload": 0.9, "byte_offload": 0.95, "fills": 6,
                    "evictions": 2, "seconds": 3.0, "requests": {}, "bytes": {}},
    "since_start": {"hit_ratio": 0.8, "requests": {"HIT": 90, "MISS": 10}},
    "latency": {"HIT": {"count": 90, "p50": 0.05, "p90": 0.08, "p99": 0.2},
                "MISS": {"count": 10, "p50": 12.0, "p90": 30.0, "p99": 55.5}},
    "storage": {"memory": {"entries": 12, "bytes": 3 << 20, "budget": 64 << 20},
                "disk": {"entries": 40, "bytes": 10 << 20, "budget": 1 << 30}},
    "upstreams": [{"url": "http://127.0.0.1:9000", "available": True, "in_flight": 1, "requests": 10,
                   "failures": 0, "workers": 2, "workers_available": 2}],
    "top_urls": [{"url": "https://shop.example/" + "x" * 200 + "/end", "requests": 1234, "hits": 1200,
                  "hit_ratio": 0.9724}],
    "not_stored": [{"reason": "PRIVATE", "count": 7, "example": "https://shop.example/account"}],
}
POINTS = [{"seq": i, "t": float(i), "dt": 1.0, "requests": {"HIT": 30, "MISS": 3}, "bytes": {}, "origin": 3,
           "fills": 2, "evictions": 0, "p50": 0.1, "p99": 1.0} for i in range(1, 4)]


def test_what_clients_and_origins_sent_cannot_drive_the_operators_terminal() -> None:
    live = {**LIVE, "top_urls": [{"url": "https://shop.example/\x1b[2J\x9b31m\u202eevil", "requests": 1,
                                  "hits": 1, "hit_ratio": 1.0}],
            "not_stored": [{"reason": "PRIVATE\x07", "count": 1, "example": "https://a.example/\x1b]0;x\x07"}]}
    text = "".join(render(live, POINTS, "http://127.0.0.1:8081", 120, 60))
    assert not any(c in text for c in "\x1b\x9b\x07\u202e")
    assert "https://shop.example/\ufffd[2J\ufffd31m\ufffdevil" in text


def test_text_that_cannot_drive_a_terminal_is_shown_as_it_is_and_the_columns_stay() -> None:
    # A no-break space, a zero-width joiner in an emoji, a Persian zero-width non-joiner, a soft
    # hyphen, an ideographic space, a left-to-right mark, an emoji newer than Python's database.
    url = "https://a.example/10\u00a0€/👨\u200d👩/می\u200cخواهم/Sil\u00adben/東\u3000京/שלום\u200e/\U0001fae8"
    rows = [{"url": url, "requests": 1, "hits": 1, "hit_ratio": 1.0},
            {"url": url.replace("/10", "/\x1b[2J"), "requests": 1, "hits": 1, "hit_ratio": 1.0}]
    lines = render({**LIVE, "top_urls": rows}, POINTS, "http://127.0.0.1:8081", 200, 60)
    kept = [line for line in lines if url in line]
    assert len(kept) == 1
    replaced = [line for line in lines if url.replace("/10", "/\ufffd[2J") in line]  # one for one
    assert len(replaced) == 1 and replaced[0].index(" 1 ") == kept[0].index(" 1 ")  # the columns stay


def test_the_screen_shows_rates_latency_storage_upstreams_and_top_lists_within_its_size() -> None:
    lines = render(LIVE, POINTS, "http://127.0.0.1:8081", 100, 40, clock="12:00:00")
    text = "\n".join(lines)
    assert all(len(line) <= 100 for line in lines) and len(lines) <= 40
    assert lines[0].startswith("cachegate top — http://127.0.0.1:8081 — up 2.1 min, 2 workers")
    assert lines[0].endswith("12:00:00")
    assert "requests/s 33.0   hit ratio 90.0% last minute, 80.0% since start" in text
    hit = next(line for line in lines if line.startswith("HIT "))
    assert hit.split() == ["HIT", "30.0", "90.9%", "0.050", "0.080", "0.200"]
    assert "fills/s 2.0" in text and "memory 3.0 MB / 64.0 MB (4.7%), 12 entries" in text
    assert "up 2/2 wk" in text
    top = next(line for line in lines if "shop.example" in line and "1,234" in line)
    assert "…" in top and top.rstrip().endswith("97.2%") and "/end" in top  # shortened in the middle
    assert "PRIVATE" in text and "https://shop.example/account" in text
    assert lines[-1] == "q quit"
    cluster = {"node": "a", "nodes": [{"node": "a", "state": "ready", "lag": 0, "live": True},
                                      {"node": "b", "state": "catching-up", "lag": 12, "live": True},
                                      {"node": "c", "state": "gone", "lag": None, "live": False}]}
    lines = render(LIVE, POINTS, "http://127.0.0.1:8081", 100, 60, cluster)
    nodes = [line.split() for line in lines if line.split()[:1] in (["a"], ["b"], ["c"])]
    assert nodes == [["a", "(this", "node)", "ready", "0"], ["b", "catching-up", "12"], ["c", "gone", "–"]]
    short = render(LIVE, POINTS, "http://x", 60, 8)
    assert len(short) == 8 and short[-1] == "q quit" and all(len(line) <= 60 for line in short)


@pytest.fixture
async def locked(origin: Origin, make_proxy: MakeProxy) -> Proxy:
    origin.route("/page", body=b"p" * 500, headers={"Cache-Control": "max-age=600"})
    origin.route("/other", body=b"o" * 500, headers={"Cache-Control": "max-age=600"})
    return await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")


def last_screen(raw: bytes) -> list[str]:
    """What the terminal shows now: the text after the last cursor-home, without ANSI sequences."""
    frame = raw.decode(errors="replace").rsplit(HOME, 1)[-1]
    return [line.rstrip() for line in plain(frame).replace("\r\n", "\n").split("\n")]


class Terminal:
    """``cachegate top`` in a pseudo-terminal of 50x130, its output gathered as it comes."""

    def __init__(self) -> None:
        self.raw = bytearray()
        self.got = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None
        self.master = -1

    async def start(self, admin_url: str, token: str) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 130, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        env["CACHEGATE_ADMIN_TOKEN"] = token
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "top", "--admin", admin_url, "--interval", "0.3",
            stdin=slave, stdout=slave, stderr=slave, env=env)
        os.close(slave)
        asyncio.get_running_loop().add_reader(self.master, self._readable)

    def _readable(self) -> None:
        try:
            chunk = os.read(self.master, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            asyncio.get_running_loop().remove_reader(self.master)
        self.raw.extend(chunk)
        self.got.set()

    @property
    def text(self) -> str:
        return self.raw.decode(errors="replace")

    async def screen_where(self, predicate: Any, wait: float = 20.0) -> list[str]:
        async def until() -> list[str]:
            while True:
                lines = last_screen(bytes(self.raw))
                if predicate(lines):
                    return lines
                self.got.clear()
                await self.got.wait()

        try:
            return await asyncio.wait_for(until(), wait)
        except TimeoutError:
            raise AssertionError("the screen never showed it:\n" + "\n".join(last_screen(bytes(self.raw)))) from None

    async def quit(self) -> int:
        assert self.proc is not None
        os.write(self.master, b"q")
        code = await asyncio.wait_for(self.proc.wait(), 10)
        await asyncio.sleep(0.1)
        return code

    async def close(self) -> None:
        if self.master < 0:
            return
        asyncio.get_running_loop().remove_reader(self.master)
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        os.close(self.master)


def counts_url(url: str, low: int, high: int) -> Any:
    """The top list counts ``url`` between ``low`` and ``high`` (a window of minutes)."""
    def check(lines: list[str]) -> bool:
        top = [line for line in lines if line.startswith(url)]
        return bool(top) and low <= int(top[0].split()[1].replace(",", "")) <= high
    return check


def shows_hits(lines: list[str]) -> bool:
    """The per-second table shows hits now (a window of seconds)."""
    hit = [line for line in lines if line.startswith("HIT ")]
    return bool(hit) and float(hit[0].split()[1].replace(",", "")) > 0


async def screen_under_traffic(term: Terminal, get: Any, path: str) -> list[str]:
    """The screen once it shows hits per second, while ``path`` is asked for all along: the
    rates cover the last seconds only, and a loaded machine may draw the next frame late."""
    async def traffic() -> None:
        while True:
            await get(path)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(traffic())
    try:
        return await term.screen_where(shows_hits)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.slow
async def test_top_in_a_terminal_shows_traffic_and_quits_on_q(origin: Origin, locked: Proxy) -> None:
    term = Terminal()
    await term.start(locked.admin_url, TOKEN)
    try:
        await term.screen_where(lambda lines: any(line.startswith("cachegate top") for line in lines))
        assert ENTER in term.text
        for _ in range(40):
            await locked.get("/page")
        # 1 miss and 39 hits, of which the fast path records one in 16 (16 times): about 40.
        await term.screen_where(counts_url(locked.url + "/page", 24, 56))
        lines = await screen_under_traffic(term, locked.get, "/other")
        assert any(line.startswith("MISS ") for line in lines)
        assert any(line.startswith(origin.url) and line.split()[1] == "up" for line in lines)
        assert lines[-1] == "q quit"
        assert await term.quit() == 0
        assert term.text.rstrip().endswith(LEAVE)  # the terminal is given back
    finally:
        await term.close()


@pytest.mark.slow
async def test_once_prints_a_plain_frame_and_a_wrong_token_is_an_error(locked: Proxy) -> None:
    await locked.get("/page")
    env = {**os.environ, "CACHEGATE_ADMIN_TOKEN": TOKEN}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "top", "--admin", locked.admin_url, "--once",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err
    text = out.decode()
    assert "\x1b" not in text and text.startswith("cachegate top — ") and "TOP URLS" in text
    env["CACHEGATE_ADMIN_TOKEN"] = "wrong"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "top", "--admin", locked.admin_url, "--once",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1 and "401" in err.decode() and "admin token required" in err.decode()


@pytest.mark.slow
async def test_warm_and_top_against_two_workers(origin: Origin, tmp_path: Path) -> None:
    for i in range(5):
        origin.route(f"/w/{i}", body=b"w" * 300, headers={"Cache-Control": "max-age=600"})
    config = write_config(str(tmp_path), origin.url, "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n")
    text = await asyncio.to_thread(Path(config).read_text)
    await asyncio.to_thread(Path(config).write_text, text.replace(
        "admin: {listen: '127.0.0.1:0'}", f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}"))
    proxy = ProxyProcess(str(tmp_path), config)
    await proxy.start("--workers", "2")
    term = Terminal()
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        warm = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "warm", "--proxy", proxy.url, "--host", HOST, "--urls", "-",
            "--progress", "none", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(warm.communicate("".join(f"/w/{i}\n" for i in range(5)).encode()), 30)
        assert warm.returncode == 0, out
        assert re.search(r"^  stored +5$", out.decode(), re.M), out
        for i in range(5):  # stored once, for both workers (the disk tier is shared)
            assert (await proxy.get(f"/w/{i}")).x_cache == "HIT"
        await term.start(proxy.admin_url, TOKEN)
        for _ in range(30):
            await proxy.get("/w/0")  # a new connection each: both workers answer some
        await term.screen_where(counts_url(f"http://{HOST}/w/0", 16, 64))
        lines = await screen_under_traffic(term, proxy.get, "/w/1")
        assert "2 workers" in lines[0]
        # One memory tier for the machine, shared by both workers: its budget is cache.memory.
        memory = next(line for line in lines if line.startswith("memory "))
        assert " / 16.0 MB (" in memory, memory
        upstream = next(line for line in lines if line.startswith(origin.url))
        assert "up 2/2 wk" in upstream
        assert int(upstream.split()[-2].replace(",", "")) >= 5  # the workers' requests, not the supervisor's 0
        assert await term.quit() == 0
    finally:
        try:
            await term.close()
        finally:
            await proxy.stop()


# -- an admin API that answers badly ---------------------------------------------------------------


HOSTILE = "\x1b]0;PWNED\x07\x1b[2J\x1b[31mRED\x9b1m\u202eevil"
HOSTILE_SHOWN = "\\x1b]0;PWNED\\x07\\x1b[2J\\x1b[31mRED\\x9b1m\\u202eevil"  # each control escaped
RAW = ("\x1b]", "\x07", "\x1b[2J", "\x1b[31m", "\x9b", "\u202e")  # what must never reach the terminal
LOOKALIKE = "real \x1b[2J, typed \\x1b[2J"
LOOKALIKE_SHOWN = "real \\x1b[2J, typed \\\\x1b[2J"  # a backslash sent as such is written \\
JSON_200 = '{"purged": 0, "soft": false, "note": "C:\\\\temp \\u001b \\"quoted\\""}'


class BadAdmin:
    """An HTTP server standing in for the admin API: each request to /console/api/live (and
    /purge) gets the next answer of ``answers`` (the last one repeats)."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.seen = 0

    async def handle(self, request: Any) -> Any:
        from aiohttp import web

        kind = self.answers[min(self.seen, len(self.answers) - 1)]
        self.seen += 1
        if kind == "garbage":
            return web.Response(text="<html>not the admin API</html>", content_type="text/html")
        if kind in ("escapes", "escapes 401"):  # a window title, a cleared screen, red
            return web.json_response({"error": "bad " + HOSTILE}, status=400 if kind == "escapes" else 401)
        if kind == "escapes 200":
            return web.Response(text='{"purged": 0, "soft": false, "note": "' + HOSTILE + '"}', content_type="application/json")
        if kind == "lookalike":  # a real ESC, and the four characters \x1b as the server wrote them
            return web.json_response({"error": LOOKALIKE}, status=400)
        if kind == "json 200":
            return web.Response(text=JSON_200, content_type="application/json")
        if kind == "partial":
            return web.json_response({"seq": 1, "points": []})
        if kind == "wrong types":
            return web.json_response({**LIVE, "seq": "3", "points": "many"})
        if kind == "drip":  # a byte a second: each read is quick, the answer never ends
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = 100_000
            await response.prepare(request)
            with contextlib.suppress(ConnectionError, RuntimeError):
                for _ in range(100_000):
                    await response.write(b" ")
                    await asyncio.sleep(1.0)
            return response
        return web.json_response({**LIVE, "points": POINTS})

    @contextlib.asynccontextmanager
    async def serving(self) -> Any:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/console/api/live", self.handle)
        app.router.add_post("/purge", self.handle)
        async with serving(app) as url:
            yield url


@contextlib.asynccontextmanager
async def serving(app: Any) -> Any:
    """``app`` on a loopback port of its own, answering as the admin listener does (every answer
    marked ``Cachegate-Admin: 1``, a GET /healthz that says ok, which top and purge ask first);
    its URL."""
    from aiohttp import web

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def mark(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Cachegate-Admin"] = "1"

    app.router.add_get("/healthz", healthz)
    app.on_response_prepare.append(mark)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("answer", "message"), [
    ("garbage", "answered /console/api/live with something that is not JSON: '<html>not the admin API</html>'"),
    ("partial", "answered something that is not cachegate's live feed (KeyError: 'last_minute')"),
    ("wrong types", "answered something that is not cachegate's live feed (TypeError: seq is str"),
    ("drip", "did not answer within 2 s"),
])
async def test_once_against_a_bad_answer_says_what_was_wrong(answer: str, message: str) -> None:
    async with BadAdmin(answer).serving() as url:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "top", "--admin", url, "--once", "--interval", "1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 1, text
    assert "Traceback" not in text and message in text, text


async def test_top_keeps_polling_after_a_bad_answer() -> None:
    admin = BadAdmin("garbage", "partial", "drip", "good")
    async with admin.serving() as url:
        proc = await asyncio.create_subprocess_exec(
            # (--interval 0.25: a poll is still given 2 s, the least top gives one)
            sys.executable, "-m", "proxy", "top", "--admin", url, "--interval", "0.25",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None
            seen = b""
            while b"TOP URLS" not in seen:
                seen += await asyncio.wait_for(proc.stdout.read(4096), 60)
        finally:
            proc.kill()
            _, err = await proc.communicate()
    text = err.decode()
    assert "Traceback" not in text, text
    assert "not JSON" in text and "not cachegate's live feed" in text and "did not answer within 2 s" in text


async def test_purge_gives_up_on_an_answer_that_never_ends() -> None:
    async with BadAdmin("drip").serving() as url:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "purge", "--admin", url, "--all", "--timeout", "2",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode != 0
    assert f"cachegate purge: the admin API at {url} did not answer within 2 s" in err.decode(), err


async def test_an_admin_apis_error_reaches_the_terminal_with_its_controls_escaped() -> None:
    """``purge`` and ``top`` print what an admin API says (its error, its answer): a control
    in it (a window title, a cleared screen, a colour, a bidi override) is printed escaped."""
    for kind, stream in (("escapes", "err"), ("escapes 401", "err"), ("escapes 200", "out")):
        async with BadAdmin(kind).serving() as url:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "purge", "--admin", url, "--all",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        text = (out if stream == "out" else err).decode()
        assert HOSTILE_SHOWN in text and not any(c in out.decode() + err.decode() for c in RAW), (kind, text)
        assert proc.returncode == (0 if kind == "escapes 200" else 1)
    for kind in ("escapes", "escapes 401"):  # --once: the error on standard error
        async with BadAdmin(kind).serving() as url:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "top", "--admin", url, "--once",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 1 and HOSTILE_SHOWN in err.decode(), err
        assert not any(c in out.decode() + err.decode() for c in RAW), err


async def test_top_on_a_terminal_shows_an_admin_apis_error_with_its_controls_escaped() -> None:
    """In a terminal: the ``!`` line of the screen before any data, then the 401 message."""
    admin = BadAdmin("escapes", "escapes", "escapes 401")
    term = Terminal()
    async with admin.serving() as url:
        try:
            await term.start(url, TOKEN)
            assert term.proc is not None
            code = await asyncio.wait_for(term.proc.wait(), 30)
            await asyncio.sleep(0.2)  # the last of its output
        finally:
            await term.close()
    text = term.text
    assert code == 1
    assert f"! 400 Bad Request: bad {HOSTILE_SHOWN}" in text and f"401 Unauthorized: bad {HOSTILE_SHOWN}" in text
    assert not any(c in text for c in RAW), repr(text)


def test_the_frame_before_any_data_shows_an_error_with_its_controls_replaced() -> None:
    from proxy.top import Feed, TopOptions, _frame

    lines = _frame(Feed(TopOptions("http://127.0.0.1:9", None)), "bad " + HOSTILE, os.terminal_size((80, 24)))
    assert not any(c in "".join(lines) for c in RAW) and "PWNED" in lines[1]


@pytest.mark.parametrize(("option", "value", "accepts"), [
    ("--interval", "0", "a number of seconds above 0 and up to 3600"),
    ("--interval", "nan", "a number of seconds above 0 and up to 3600"),
    ("--interval", "1e300", "a number of seconds above 0 and up to 3600"),
    ("--top", "-5", "a whole number from 0 to 200"), ("--top", "201", "a whole number from 0 to 200"),
])
def test_a_bad_interval_or_top_is_a_usage_error_naming_the_option(
        option: str, value: str, accepts: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before any request: a NaN or huge interval ended in a traceback (sleep, socket
    timeout), a --top the live feed refuses failed every poll."""
    from proxy.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["top", "--admin", "http://127.0.0.1:9", "--once", option, value])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: takes {accepts}" in err and repr(value) in err, err


async def test_a_restart_whose_counter_passed_ours_starts_the_points_over() -> None:
    """The admin process restarted while top was away, and its point counter is already past the
    one top holds: its ``instance`` differs, so top forgets the old process's points and asks for
    all of the new one's (it spliced them: the old points, then only the new ones past its seq)."""
    from aiohttp import web

    from proxy.top import Feed, TopOptions

    def points(first: int, last: int, origin: int) -> list[dict[str, Any]]:
        return [{**POINTS[0], "seq": i, "t": float(i), "origin": origin} for i in range(first, last + 1)]

    state = {"instance": "old", "seq": 5, "origin": 1}

    async def live(request: web.Request) -> web.Response:
        since = int(request.query["since"])
        body = {**LIVE, "instance": state["instance"], "seq": state["seq"],
                "points": points(since + 1, int(state["seq"]), int(state["origin"]))}
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/console/api/live", live)
    async with serving(app) as url:
        feed = Feed(TopOptions(url, None))
        await asyncio.to_thread(feed.poll)
        assert [p["seq"] for p in feed.points] == [1, 2, 3, 4, 5]
        state.update(instance="new", seq=8, origin=2)  # restarted, and already 8 points on
        await asyncio.to_thread(feed.poll)
        assert [(p["seq"], p["origin"]) for p in feed.points] == [(i, 2) for i in range(1, 9)]
        assert feed.instance == "new" and feed.seq == 8
        state.update(seq=9)  # the same process goes on: only the new point is added
        await asyncio.to_thread(feed.poll)
        assert [p["seq"] for p in feed.points] == list(range(1, 10))


async def test_an_admin_apis_error_that_reads_as_an_escape_is_not_shown_as_one() -> None:
    """An ESC in an admin API's error was printed as ``\\x1b``, and so were the four characters
    ``\\x1b`` as the server sent them: the two errors read the same. A backslash the server sent is
    printed ``\\\\``, by ``purge`` and by ``top``; ``purge`` prints a JSON answer as it came
    (JSON writes its own backslashes as ``\\\\``)."""
    for command in (["purge", "--all"], ["top", "--once", "--interval", "1"]):
        async with BadAdmin("lookalike").serving() as url:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", *command[:1], "--admin", url, *command[1:],
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
        text = err.decode()
        assert proc.returncode == 1 and f"400 Bad Request: {LOOKALIKE_SHOWN}" in text, (command, text)
        assert "\x1b" not in text, text
    async with BadAdmin("json 200").serving() as url:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "purge", "--admin", url, "--all",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    assert out.decode().strip() == JSON_200 and json.loads(out)["note"] == "C:\\temp \x1b \"quoted\"", out
