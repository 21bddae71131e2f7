"""``cachegate warm`` against a real origin and proxy: sitemaps (an index with nested sitemaps, a
gzipped one, a broken URL), URL files from stdin, access logs, variants, headers, concurrency,
rate, progress, the summary, --max-errors and Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import doctest
import gzip
import os
import pty
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import proxy.live
import proxy.warm
import proxy.warm as warm_module
from proxy.warm import Outcome, WarmError, classify, parse_sitemap, targets_for
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.rules.util import settle, shift_clock

INDEX = """<?xml version="1.0" encoding="UTF-8"?>
<sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">
  <sitemap><loc>{base}/sitemap-pages.xml</loc></sitemap>
  <sitemap><loc>{base}/sitemap-more.xml.gz</loc></sitemap>
  <sitemap><loc>{base}/sitemap-nested-index.xml</loc></sitemap>
  <sitemap><loc>{base}/sitemap-pages.xml</loc></sitemap>
</sitemapindex>"""
NESTED = """<sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">
  <sitemap><loc>{base}/sitemap-deep.xml</loc></sitemap>
</sitemapindex>"""


def urlset(urls: list[str]) -> str:
    body = "".join(f"<url><loc>{u}</loc><lastmod>2026-11-01</lastmod></url>" for u in urls)
    return f'<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">{body}</urlset>'


def test_docstring_examples_hold() -> None:
    for module in (proxy.warm, proxy.live):
        assert doctest.testmod(module).failed == 0


def test_sitemaps_that_are_not_sitemaps_are_refused_with_the_reason() -> None:
    with pytest.raises(WarmError, match="not XML"):
        parse_sitemap(b"<html><body>oops")
    with pytest.raises(WarmError, match="root element is <html>"):
        parse_sitemap(b"<html></html>")
    bomb = b'<!DOCTYPE lolz [<!ENTITY lol "lol">]><urlset><url><loc>&lol;</loc></url></urlset>'
    with pytest.raises(WarmError, match="DOCTYPE"):
        parse_sitemap(bomb)
    assert parse_sitemap(gzip.compress(urlset(["https://a.example/g"]).encode())) == (["https://a.example/g"], [])


def test_every_url_once_and_once_per_variant() -> None:
    h = [("X-Warm", "1")]
    gz, br = ("Accept-Encoding", "gzip"), ("Accept-Encoding", "br")
    assert targets_for(["/a", "/b", "/a"], h, []) == [proxy.warm.Target("/a", (("X-Warm", "1"),)),
                                                        proxy.warm.Target("/b", (("X-Warm", "1"),))]
    assert [t.headers for t in targets_for(["/a"], h, [gz, br])] == [(("X-Warm", "1"), gz), (("X-Warm", "1"), br)]


def test_outcomes_come_from_the_cache_status_fields() -> None:
    assert classify(200, "REVALIDATED", "cachegate; fwd=stale; fwd-status=304; ttl=300") == Outcome("refreshed")
    assert classify(200, "HIT", "cachegate; fwd=uri-miss; fwd-status=200; stored; collapsed") == Outcome("fresh")
    assert classify(200, "BYPASS", 'cachegate; fwd=bypass; fwd-status=200; detail="RULE-BYPASS:x"') == \
        Outcome("not_storable", "RULE-BYPASS:x")
    assert classify(502, "MISS", "cachegate; fwd=uri-miss; detail=UPSTREAM-UNREACHABLE") == Outcome("error", "HTTP 502")
    # stale-if-error: the origin failed, whatever it was (an answer of 5xx, none, the proxy stopping)
    stale_error = warm_module.ORIGIN_FAILED_STALE_SERVED
    assert classify(200, "STALE", "cachegate; fwd=stale; ttl=-9; detail=ORIGIN-UNREACHABLE") == \
        Outcome("error", stale_error, "ORIGIN-UNREACHABLE")
    assert classify(200, "STALE", "cachegate; fwd=stale; fwd-status=503; ttl=-9; detail=ORIGIN-ERROR") == \
        Outcome("error", stale_error, "fwd-status=503, ORIGIN-ERROR")
    # stale from the store: served, not fresh
    assert classify(200, "STALE", "cachegate; hit; ttl=-9; detail=MAX-STALE") == Outcome("stale", "MAX-STALE")
    assert classify(200, "UPDATING", "cachegate; hit; ttl=-9; detail=SOFT-PURGED") == Outcome("stale", "SOFT-PURGED")


async def warm(*args: str, stdin: bytes | None = None, wait: float = 60.0,
               env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "warm", *args, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(stdin), wait)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def site(origin: Origin, base: str) -> list[str]:
    """A site with a sitemap index (nested, gzipped, a repeat), pages, a private page and a 404."""
    pages = [f"{base}/page/{i}" for i in range(6)]
    origin.route("/sitemap_index.xml", body=INDEX.format(base=base), headers={"Content-Type": "application/xml"})
    origin.route("/sitemap-pages.xml", body=urlset([*pages[:3], f"{base}/account"]))
    origin.route("/sitemap-more.xml.gz", body=gzip.compress(urlset(pages[3:5]).encode()))
    origin.route("/sitemap-nested-index.xml", body=NESTED.format(base=base))
    origin.route("/sitemap-deep.xml", body=urlset([pages[5], f"{base}/broken"]))
    for i in range(6):
        origin.route(f"/page/{i}", body=f"page {i}" * 100, headers={"Cache-Control": "max-age=600"})
    origin.route("/account", body=b"me", headers={"Cache-Control": "private"})
    return pages


@pytest.mark.slow
async def test_a_sitemap_index_with_nested_sitemaps_and_a_broken_url(origin: Origin, proxy: Proxy) -> None:
    pages = site(origin, proxy.url)
    code, out, err = await warm("--proxy", proxy.url, "--sitemap", f"{proxy.url}/sitemap_index.xml",
                                "--concurrency", "3", "--progress", "lines")
    assert code == 1, (out, err)  # one error, more than --max-errors 0
    assert "cachegate warm: 8 of 8 requests in " in out
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert lines["stored"].split()[1] == "6"
    assert "not storable" in out and "(PRIVATE 1)" in out
    assert "errors" in out and "(HTTP 404 1)" in out and f"HTTP 404: e.g. {proxy.url}/broken" in out
    assert "1 errors, more than --max-errors 0" in err
    for page in pages:
        assert (await proxy.get(page.removeprefix(proxy.url))).x_cache == "HIT"
    assert origin.count("/sitemap-pages.xml") == 1  # listed twice, fetched once

    code, out, _ = await warm("--proxy", proxy.url, "--sitemap", f"{proxy.url}/sitemap_index.xml",
                              "--max-errors", "1", "--progress", "none")
    assert code == 0
    assert [line.split()[-1] for line in out.splitlines() if line.strip().startswith("already fresh")] == ["6"]
    assert all(origin.count(p.removeprefix(proxy.url)) == 1 for p in pages)  # nothing fetched twice


@pytest.mark.slow
async def test_urls_from_stdin_and_an_access_log_with_headers_and_variants(
        origin: Origin, proxy: Proxy, tmp_path: Path) -> None:
    seen: list[tuple[str, str, str]] = []

    async def negotiated(request: web.Request) -> web.Response:
        seen.append((request.path, request.headers.get("Accept-Encoding", ""), request.headers.get("X-Warm", "")))
        return web.Response(body=b"x" * 100, headers={"Cache-Control": "max-age=600", "Vary": "Accept-Encoding"})

    for path in ("/a", "/b", "/c"):
        origin.route(path, negotiated)
    log = tmp_path / "access.log"
    host = proxy.url.removeprefix("http://")  # the Host the proxy.get below sends
    log.write_text(f'{{"time":"2026-11-26T13:40:02.000Z","method":"GET","host":"{host}","path":"/c","status":200}}\n'
                   '127.0.0.1 - - [26/Nov/2026:13:40:05 +0000] "POST /a HTTP/1.1" 200 2 "-" "curl"\n')
    code, out, err = await warm("--proxy", proxy.url, "--urls", "-", "--from-access-log", str(log),
                                "-H", "X-Warm: yes", "--variants", "Accept-Encoding: gzip",
                                "--variants", "Accept-Encoding: br", "--progress", "none",
                                stdin=f"# hot pages\n{proxy.url}/a\n/b\n\n".encode())
    assert code == 0, (out, err)
    assert sorted(seen) == sorted((p, ae, "yes") for p in ("/a", "/b", "/c") for ae in ("gzip", "br"))
    for path in ("/a", "/b", "/c"):
        for ae in ("gzip", "br"):
            assert (await proxy.get(path, headers={"Accept-Encoding": ae})).x_cache == "HIT"


@pytest.mark.slow
async def test_concurrency_and_rate_bound_the_requests(origin: Origin, proxy: Proxy) -> None:
    flying, most, starts = [0], [0], []

    async def slow(request: web.Request) -> web.Response:
        starts.append(time.monotonic())
        flying[0] += 1
        most[0] = max(most[0], flying[0])
        await asyncio.sleep(0.2)
        flying[0] -= 1
        return web.Response(body=b"s", headers={"Cache-Control": "max-age=600"})

    for i in range(9):
        origin.route(f"/s/{i}", slow)
    urls = "".join(f"/s/{i}\n" for i in range(6)).encode()
    code, _, err = await warm("--proxy", proxy.url, "--urls", "-", "--concurrency", "2",
                              "--progress-interval", "0.1", stdin=urls)  # not a terminal: lines
    assert code == 0 and most[0] == 2
    progress = err.splitlines()
    assert progress and all(re.fullmatch(r"cachegate warm: \d/6 \(\d+%\), [0-9.]+/s, 0 errors", line)
                            for line in progress), err
    assert "\x1b" not in err and "\r" not in err
    starts.clear()
    urls = "".join(f"/s/{i}\n" for i in range(6, 9)).encode()
    code, _, _ = await warm("--proxy", proxy.url, "--urls", "-", "--rate", "10/s", "--concurrency", "3",
                            "--progress", "none", stdin=urls)
    assert code == 0 and len(starts) == 3  # the spacing itself: Pacer's doctest, on a given clock


@pytest.mark.slow
async def test_ctrl_c_stops_at_once_with_the_summary_so_far(origin: Origin, proxy: Proxy) -> None:
    release = asyncio.Event()  # set once warm has stopped: until then /q/1 and later never answer

    async def slow(request: web.Request) -> web.Response:
        if request.path != "/q/0":
            await release.wait()
        return web.Response(body=b"q", headers={"Cache-Control": "max-age=600"})

    for i in range(6):
        origin.route(f"/q/{i}", slow)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "warm", "--proxy", proxy.url, "--urls", "-", "--concurrency", "1",
        "--progress", "none", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write("".join(f"/q/{i}\n" for i in range(6)).encode())
    proc.stdin.close()
    for _ in range(200):  # until the second request is waiting on the origin
        if origin.count("/q/1"):
            break
        await asyncio.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = await asyncio.wait_for(proc.communicate(), 20)  # it stops without the origin's answer
    release.set()
    assert proc.returncode == 130
    text = out.decode()
    assert "1 of 6 requests" in text and "(interrupted)" in text
    assert [line.split()[-1] for line in text.splitlines() if line.strip().startswith("stored")] == ["1"]


@pytest.mark.slow
async def test_a_terminal_gets_a_progress_bar_with_rate_and_eta(origin: Origin, proxy: Proxy) -> None:
    async def slowish(request: web.Request) -> web.Response:
        await asyncio.sleep(0.15)
        return web.Response(body=b"p", headers={"Cache-Control": "max-age=600"})

    for i in range(8):
        origin.route(f"/p/{i}", slowish)
    master, slave = pty.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "warm", "--proxy", proxy.url, "--urls", "-", "--concurrency", "1",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=slave)
        out, _ = await asyncio.wait_for(proc.communicate("".join(f"/p/{i}\n" for i in range(8)).encode()), 30)
        os.close(slave)
        slave = -1
        screen = b""
        while True:
            try:
                chunk = await asyncio.to_thread(os.read, master, 65536)
            except OSError:
                break
            if not chunk:
                break
            screen += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0
    text = screen.decode()
    assert "\r\x1b[K[" in text and "ETA" in text and "/s" in text
    assert text.rstrip().endswith("8/8 100%  " + text.rstrip().split("100%  ")[-1])  # the bar ends full
    assert "8 of 8 requests" in out.decode()


@pytest.mark.slow
async def test_nothing_to_warm_or_a_bad_header_is_refused() -> None:
    code, _, err = await warm("--proxy", "http://127.0.0.1:9")
    assert code == 2 and "nothing to warm" in err
    code, _, err = await warm("--proxy", "http://127.0.0.1:9", "--urls", "-", "-H", "no colon", stdin=b"/a\n")
    assert code == 2 and "not a header: 'no colon'" in err


@pytest.mark.slow
async def test_an_unreachable_proxy_is_counted_as_errors_by_kind() -> None:
    code, out, _ = await warm("--proxy", "http://127.0.0.1:9", "--urls", "-", "--progress", "none", stdin=b"/a\n/b\n")
    assert code == 1
    assert "(connection refused 2)" in out


@pytest.mark.slow
async def test_a_path_starting_with_two_slashes_is_warmed_as_written(
        origin: Origin, proxy: Proxy, tmp_path: Path) -> None:
    """'//evil.example/x' is a path of its own for the proxy (and purge and explain): warm
    requests that path, from a URL file and from access logs (combined and cachegate's JSON),
    never '/x' (another key)."""
    for path in ("//evil.example/wd", "//evil.example/alx", "//evil.example/js", "//e/abs", "/wd", "/alx", "/js"):
        origin.route(path, body=b"x", headers={"Cache-Control": "max-age=600"})
    log = tmp_path / "access.log"
    log.write_text('127.0.0.1 - - [26/Nov/2026:13:40:05 +0000] "GET //evil.example/alx HTTP/1.1" 200 2 "-" "c"\n'
                   '{"method":"GET","host":"shop.example","path":"//evil.example/js","status":200}\n')
    code, out, err = await warm("--proxy", proxy.url, "--host", "shop.example", "--urls", "-",
                                "--from-access-log", str(log), "--progress", "none",
                                stdin=b"//evil.example/wd\nhttp://shop.example//e/abs\n")
    assert code == 0, (out, err)
    assert [origin.count(p) for p in ("//evil.example/wd", "//evil.example/alx", "//evil.example/js",
                                      "//e/abs")] == [1, 1, 1, 1]
    assert all(origin.count(p) == 0 for p in ("/wd", "/alx", "/js", "/abs"))
    assert "stored                4" in out, out


@pytest.mark.parametrize(("option", "value", "accepts"), [
    ("--concurrency", "0", "a whole number from 1 to 1000"), ("--concurrency", "-1", "a whole number from 1 to 1000"),
    ("--rate", "0", "a number of requests a second above 0"), ("--rate", "nan", "a number of requests a second above 0"),
    ("--rate", "inf/s", "a number of requests a second above 0"), ("--timeout", "0", "a number of seconds above 0"),
    ("--timeout", "nan", "a number of seconds above 0"), ("--max-errors", "-1", "a whole number of 0 or more"),
    ("--progress-interval", "nan", "a number of seconds above 0"),
])
def test_a_bad_option_value_is_a_usage_error_naming_the_option(
        option: str, value: str, accepts: str, capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["warm", "--proxy", "http://127.0.0.1:9", "--sitemap", "http://a.example/s.xml", option, value])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: takes {accepts}" in err and repr(value) in err, err


def test_urls_with_user_info_or_an_open_ipv6_bracket_are_refused_with_the_reason(
        capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli import main

    warmer = warm_module.Warmer(warm_module.WarmOptions(proxy="http://127.0.0.1:9"))
    with pytest.raises(WarmError, match=r"user:password@ is refused"):
        warmer._request_of(warm_module.Target("http://user:pw@shop.example/a"))  # the Host would carry it
    with pytest.raises(WarmError, match=r"the '\[' of an IPv6 address is not closed"):
        warmer._request_of(warm_module.Target("http://[::1/x"))
    assert warmer._request_of(warm_module.Target("http://shop.example/a@b"))[1]["Host"] == "shop.example"
    with pytest.raises(WarmError, match=r"no user:password@"):
        warm_module.Warmer(warm_module.WarmOptions(proxy="http://user:pw@127.0.0.1:9"))
    with pytest.raises(WarmError, match=r"--proxy must be"):
        warm_module.Warmer(warm_module.WarmOptions(proxy="http://[::1"))
    # On the command line: a usage error, before anything is sent (the proxy's password not repeated).
    assert main(["warm", "--proxy", "http://127.0.0.1:9", "--sitemap", "http://user:pw@a.example/s.xml"]) == 2
    assert "user:password@ is refused" in capsys.readouterr().err
    assert main(["warm", "--proxy", "http://user:pw@127.0.0.1:9", "--sitemap", "http://a.example/s.xml"]) == 2
    err = capsys.readouterr().err
    assert "--proxy must be" in err and "pw" not in err, err
    tally = warm_module.Tally(total=1)
    tally.add(Outcome("error", warm_module.USERINFO), "http://user:pw@shop.example/a")
    assert "e.g. http://***@shop.example/a" in "\n".join(warm_module.summary(tally, 1.0, "p", False))


# -- bounded memory ---------------------------------------------------------------------------

# Runs its arguments and reports the peak RSS of that child alone (this process's only child).
PEAK_RSS = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print('peak-rss-kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(rc)")


async def warm_measured(*args: str, stdin: bytes | None = None) -> tuple[int, str, str, float]:
    """``warm`` with the peak RSS of the warm process, in MB."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "proxy", "warm", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 120)
    text = err.decode()
    found = re.search(r"peak-rss-kb (\d+)", text)
    assert found is not None, text
    assert proc.returncode is not None
    return proc.returncode, out.decode(), text, int(found.group(1)) / 1024


@pytest.mark.slow
async def test_an_endless_sitemap_is_cut_off_at_the_limit_in_bounded_memory(origin: Origin, proxy: Proxy) -> None:
    chunk = b"<url><loc>http://a.example/x</loc></url>" * 1000

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/xml", "Cache-Control": "no-store"})
        await response.prepare(request)
        await response.write(b"<urlset>")
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                await response.write(chunk)
        return response

    origin.route("/sitemap.xml", endless)
    code, out, err, peak = await warm_measured("--proxy", proxy.url, "--sitemap", f"{proxy.url}/sitemap.xml",
                                               "--timeout", "30", "--progress", "none")
    assert code == 1, (out, err)
    assert f"sitemap: sitemap larger than {proxy_warm_limit()} bytes" in out, out
    assert peak < 300, f"warm peaked at {peak:.0f} MB"


def proxy_warm_limit() -> int:
    return proxy.warm.MAX_SITEMAP_BYTES


@pytest.mark.slow
async def test_warmed_pages_are_read_in_chunks_not_kept(origin: Origin, proxy: Proxy) -> None:
    block = b"\0" * (1 << 20)

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "video/mp4", "Cache-Control": "no-store"})
        response.content_length = 128 * len(block)
        await response.prepare(request)
        for _ in range(128):
            await response.write(block)
        return response

    for i in range(3):
        origin.route(f"/video{i}.mp4", big)
    urls = "".join(f"{proxy.url}/video{i}.mp4\n" for i in range(3)).encode()
    code, out, err, peak = await warm_measured("--proxy", proxy.url, "--urls", "-", "--concurrency", "3",
                                               "--progress", "none", stdin=urls)
    assert code == 0, (out, err)
    assert "not storable          3  (NO-STORE 3)" in out
    assert peak < 300, f"warm peaked at {peak:.0f} MB for 3 pages of 128 MB"


# -- document type declarations and the cap on URLs ------------------------------------------------


def encoded(doc: str, encoding: str) -> bytes:
    """``doc`` in ``encoding``: with an XML declaration naming it, except for UTF-16 without a
    byte order mark, which expat recognises from the first bytes (``\\0<\\0?``)."""
    if encoding in ("utf-16-be", "utf-16-le"):
        return ('<?xml version="1.0"?>\n' + doc).encode(encoding)
    return (f'<?xml version="1.0" encoding="{encoding.upper()}"?>\n' + doc).encode(encoding)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-16-be", "utf-16-le", "latin-1"])
def test_a_dtd_is_refused_in_any_encoding(encoding: str) -> None:
    small = '<!DOCTYPE urlset [<!ENTITY h "https://victim.example/">]><urlset><url><loc>&h;x</loc></url></urlset>'
    lol = ['<!ENTITY a0 "lollollollollollollollollollol">']
    lol += [f'<!ENTITY a{i} "' + f"&a{i - 1};" * 10 + '">' for i in range(1, 10)]
    bomb = '<!DOCTYPE urlset [' + "".join(lol) + "]><urlset><url><loc>&a9;</loc></url></urlset>"
    for doc in (small, bomb, "<!DOCTYPE urlset><urlset/>"):
        body = encoded(doc, encoding)
        with pytest.raises(WarmError, match="DOCTYPE"):
            parse_sitemap(body)
        with pytest.raises(WarmError, match="DOCTYPE"):
            parse_sitemap(gzip.compress(body))
    assert parse_sitemap(encoded(urlset(["https://a.example/u"]), encoding)) == (["https://a.example/u"], [])


async def test_urls_taken_from_all_sitemaps_are_capped(
        origin: Origin, proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    import aiohttp

    monkeypatch.setattr(warm_module, "MAX_SITEMAP_URLS", 10)
    base = proxy.url
    origin.route("/index.xml", body=INDEX.format(base=base).replace("sitemap-more.xml.gz", "s2.xml")
                 .replace("sitemap-nested-index.xml", "s3.xml"))
    origin.route("/sitemap-pages.xml", body=urlset([f"{base}/a{i}" for i in range(4)]))
    origin.route("/s2.xml", body=urlset([f"{base}/b{i}" for i in range(4)]))
    origin.route("/s3.xml", body=urlset([f"{base}/c{i}" for i in range(4)]))
    warmer = warm_module.Warmer(warm_module.WarmOptions(proxy=proxy.url, progress="none"))
    tally = warm_module.Tally(total=0)
    async with aiohttp.ClientSession() as session:
        urls = await warmer.sitemap_urls(session, [f"{base}/index.xml"], tally)
    # The index's 4 entries (one a repeat), then 4 + 2 pages: 10 URLs in all, the rest skipped and said so.
    assert urls == [f"{base}/a{i}" for i in range(4)] + [f"{base}/b{i}" for i in range(2)]
    assert tally.errors == {"sitemap: more than 10 URLs in all (the rest skipped)": 1}
    assert parse_sitemap(urlset([f"/{i}" for i in range(100)]).encode(), 3) == (["/0", "/1", "/2", "/3"], [])



# -- a sitemap's parse: linear, and in slices the event loop (and Ctrl-C) gets between ---------


class _Served(warm_module.Warmer):
    """A Warmer whose fetch answers from a dict, so the parse alone is what runs."""

    def __init__(self, bodies: dict[str, bytes]) -> None:
        super().__init__(warm_module.WarmOptions(proxy="http://127.0.0.1:9", progress="none"))
        self.bodies = bodies

    async def fetch(self, session: object, target: warm_module.Target,
                    keep: int | None = None) -> tuple[int, object, bytes]:
        return 200, {}, self.bodies[target.url]


async def test_a_big_sitemap_is_parsed_in_slices_the_loop_runs_between() -> None:
    """The loop turns many times during one big sitemap's parse (once per PARSE_CHUNK at
    least), and cancelling it stops the parse before the end."""
    body = urlset([f"http://a.example/p{i}" for i in range(40_000)]).encode()
    slices = len(body) // warm_module.PARSE_CHUNK
    assert slices >= 20
    warmer = _Served({"/big.xml": body, "/big.xml.gz": gzip.compress(body)})

    async def ticker(parsed: asyncio.Event) -> int:
        turns = 0
        while not parsed.is_set():
            turns += 1
            await asyncio.sleep(0)
        return turns

    for name in ("/big.xml", "/big.xml.gz"):
        parsed = asyncio.Event()
        tick = asyncio.ensure_future(ticker(parsed))
        tally = warm_module.Tally(total=0)
        urls = await warmer.sitemap_urls(None, [name], tally)
        parsed.set()
        turns = await tick
        assert len(urls) == 40_000 and tally.done == 0
        assert turns >= slices - 1, (name, turns, slices)

    # Cancelled after a few turns of the loop: the parse ends there, it does not run to the end.
    seen: list[int] = []
    real = warm_module._SitemapReader.feed

    def counted(reader: warm_module._SitemapReader, data: bytes, final: bool = False) -> None:
        seen.append(len(data))
        real(reader, data, final)

    warm_module._SitemapReader.feed = counted  # type: ignore[method-assign]
    try:
        task = asyncio.ensure_future(warmer.sitemap_urls(None, ["/big.xml"], warm_module.Tally(total=0)))
        for _ in range(5):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        warm_module._SitemapReader.feed = real  # type: ignore[method-assign]
    assert 0 < len(seen) < slices // 2


@pytest.mark.slow
async def test_a_sitemap_of_many_pieces_is_parsed_in_linear_time_and_ctrl_c_stops_warm(
        origin: Origin, proxy: Proxy) -> None:
    """One <loc> of 200,000 character references (a 1 MB sitemap; 50 MB are allowed) reaches
    the parser as 200,000 pieces of text. Its parse is linear in them: warm gets to the page
    listed after it at once (a parse that re-measured the text so far on every piece was still
    at it minutes later), and Ctrl-C then stops warm at once."""
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(body=b"h", headers={"Cache-Control": "max-age=600"})

    origin.route("/hang", hang)
    body = (b"<urlset><url><loc>http://a.example/" + b"&#97;" * 200_000 + b"</loc></url>"
            + f"<url><loc>{proxy.url}/hang</loc></url></urlset>".encode())
    origin.route("/refs.xml", body=body, headers={"Cache-Control": "no-store"})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "warm", "--proxy", proxy.url, "--sitemap", f"{proxy.url}/refs.xml",
        "--concurrency", "1", "--progress", "none", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        for _ in range(600):  # generous: the parse takes about 0.1 s
            if origin.count("/hang"):
                break
            await asyncio.sleep(0.05)
        assert origin.count("/hang") == 1, "the sitemap's parse did not end within 30 s"
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        release.set()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130, (out, err)
    assert b"1 of 2 requests" in out and b"(interrupted)" in out  # the long URL, then /hang cut short



# -- what an origin says about caching --------------------------------------------------------------


@pytest.mark.slow
async def test_warm_reads_cachegates_own_cache_status_and_prints_no_controls(make_proxy: MakeProxy) -> None:
    """An origin's Cache-Status members come first (RFC 9211) and its X-Cache-Status is dropped:
    warm classifies by cachegate's own member, and what it prints of reasons and URLs has its
    terminal controls and bidi overrides replaced."""
    hostile = "\u202eKO-ERA-SLLA\u009b2J"
    answers = {
        b"/c": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nCache-Control: no-store\r\n"
                b"Cache-Status: origin; detail=" + hostile.encode() + b"\r\n\r\nok"),
        b"/b": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nCache-Control: no-store\r\n"
                b"X-Cache-Status: HIT\r\nCache-Status: origin; hit\r\n\r\nok"),
        b"/s": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nCache-Control: max-age=600\r\n"
                b"X-Cache-Status: MISS\r\nCache-Status: cachegate; detail=FAKE\r\n\r\nok"),
    }

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ")[1]
                writer.write(answers.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        proxy = await make_proxy(upstreams=[f"http://127.0.0.1:{port}"])
        urls = "/b\n/c\n/s\n/\u202egpj.exe\n".encode()
        code, out, err = await warm("--proxy", proxy.url, "--urls", "-", "--progress", "none",
                                    "--max-errors", "5", stdin=urls)
        assert code == 0, (out, err)
        lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
        assert lines["stored"].split()[1] == "1"  # /s: cachegate stored it, whatever the origin says
        assert "(NO-STORE 2)" in lines["not"], out  # /b and /c: cachegate's own detail
        assert lines["already"].split()[-1] == "0"
        assert all(c.isprintable() for c in out.replace("\n", "")), repr(out)
        assert "\u202e" not in out and "\u009b" not in out
        assert "\ufffdgpj.exe" in out  # the URL of the 404, shown with the override replaced
    finally:
        server.close()
        await server.wait_closed()


async def test_a_stale_copy_served_for_a_failing_origin_is_an_error_and_a_stale_one_is_not_fresh(
        origin: Origin, proxy: Proxy) -> None:
    """With the origin answering 503, stale-if-error serves the stored copies (STALE,
    fwd-status=503, ORIGIN-ERROR): warm counted them "already fresh" and exited 0 while nothing
    was warmed. Now each is an error of its kind, with the origin's status, and the exit status
    is 1 as for other errors; a copy served stale while a refresh starts (UPDATING) is "stale
    served", neither fresh nor an error."""
    paths = ["/sie/1", "/sie/2", "/sie/3"]
    for path in paths:
        origin.route(path, body=b"x", headers={"Cache-Control": "max-age=1, stale-if-error=300"})
    origin.route("/swr", body=b"x", headers={"Cache-Control": "max-age=1, stale-while-revalidate=300"})
    code, out, err = await warm("--proxy", proxy.url, "--urls", "-", "--progress", "none",
                                stdin="\n".join([*paths, "/swr"]).encode())
    assert code == 0 and "stored                4" in out, (out, err)
    await settle(proxy)
    for path in paths:
        origin.route(path, status=503, body=b"down")
    shift_clock(proxy, 10)
    code, out, err = await warm("--proxy", proxy.url, "--urls", "-", "--progress", "none",
                                stdin="\n".join([*paths, "/swr"]).encode())
    assert code == 1, (out, err)
    assert "already fresh         0" in out, out
    assert "stale served          1  (STALE-WHILE-REVALIDATE 1)" in out, out
    assert "errors                3  (origin error, stale copy served 3)" in out, out
    assert re.search(r"origin error, stale copy served: e\.g\. /sie/\d \(fwd-status=503, ORIGIN-ERROR\)", out), out
    assert "3 errors, more than --max-errors 0" in err
    code, out, err = await warm("--proxy", proxy.url, "--urls", "-", "--progress", "none", "--max-errors", "3",
                                stdin="\n".join(paths).encode())
    assert code == 0, (out, err)  # within --max-errors, as any other error


# -- what warm sends ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_warm_sends_no_accept_encoding_of_its_own_and_can_warm_the_absent_variant(
        origin: Origin, proxy: Proxy) -> None:
    """aiohttp's default ``Accept-Encoding: gzip, deflate`` (and ``Accept: */*``) went with every
    request: warm filled a variant no browser asks for, while a client sending none (curl, bots)
    still missed. Now warm sends only what -H and --variants say; ``'Name:'`` sends the request
    without that field (as curl's -H), so the absent variant can be listed beside others."""
    seen: list[tuple[str, str | None, str | None, str | None]] = []

    async def negotiated(request: web.Request) -> web.Response:
        h = request.headers
        seen.append((request.path, h.get("Accept-Encoding"), h.get("Accept"), h.get("User-Agent")))
        return web.Response(body=b"x" * 100, headers={"Cache-Control": "max-age=600", "Vary": "Accept-Encoding"})

    for path in ("/plain", "/both"):
        origin.route(path, negotiated)
    code, out, err = await warm("--proxy", proxy.url, "--urls", "-", "--progress", "none", stdin=b"/plain\n")
    assert code == 0 and "stored                1" in out, (out, err)
    assert seen == [("/plain", None, None, "cachegate-warm")]
    assert (await proxy.raw("GET", "/plain")).x_cache == "HIT"  # a client that sends no Accept-Encoding

    seen.clear()
    code, out, err = await warm("--proxy", proxy.url, "--urls", "-", "--progress", "none",
                                "--variants", "Accept-Encoding:", "--variants", "Accept-Encoding: gzip, br",
                                "-H", "User-Agent:", stdin=b"/both\n")
    assert code == 0 and "stored                2" in out, (out, err)
    assert sorted(seen, key=str) == sorted([("/both", None, None, None), ("/both", "gzip, br", None, None)], key=str)
    assert (await proxy.raw("GET", "/both")).x_cache == "HIT"
    assert (await proxy.get("/both", headers={"Accept-Encoding": "br, gzip"})).x_cache == "HIT"


async def test_a_repeated_header_sends_every_field_as_curl_does(origin: Origin, proxy: Proxy) -> None:
    """-H 'X-A: 1' -H 'X-A: 2' sent X-A: 2 alone (curl sends both); a --variants field still
    replaces an -H of its name, and the first -H of a name still replaces warm's own default."""
    seen: list[tuple[str, list[str], list[str], list[str]]] = []

    async def record(request: web.Request) -> web.Response:
        h = request.headers
        seen.append((request.path, h.getall("X-A", []), h.getall("Accept-Encoding", []), h.getall("User-Agent", [])))
        return web.Response(body=b"x", headers={"Cache-Control": "max-age=600", "Vary": "Accept-Encoding"})

    origin.route("/rh", record)
    code, out, err = await warm("--proxy", proxy.url, "--urls", "-", "--progress", "none",
                                "-H", "X-A: 1", "-H", "X-A: 2", "-H", "User-Agent: me",
                                "-H", "Accept-Encoding: br", "--variants", "Accept-Encoding: gzip", stdin=b"/rh\n")
    assert code == 0, (out, err)
    assert seen == [("/rh", ["1", "2"], ["gzip"], ["me"])]


@pytest.mark.parametrize(("args", "message"), [
    (["--proxy", "http://127.0.0.1:99999"], "--proxy must be a URL like http://127.0.0.1:8080: the port is above 65535"),
    (["--proxy", "http://127.0.0.1:8x"], "--proxy must be a URL like http://127.0.0.1:8080: not a host[:port]"),
    (["--proxy", "http://127.0.0.1:9/prefix/"], "--proxy is the listener's address alone, like "
                                                 "http://127.0.0.1:8080: '/prefix/' would not be sent"),
    (["--proxy", "http://127.0.0.1:9/?y"], "'/?y' would not be sent"),
    (["--proxy", "http://127.0.0.1:9#f"], "'#f' would not be sent"),
    (["--host", "x\r\nY: 1"], "--host 'x\\r\\nY: 1': not a host[:port]"),
    (["-H", "X-A: a\x01b"], "a control character in the value of 'X-A: a\\x01b'"),
    (["--variants", "Bad Name: 1"], "not a header: 'Bad Name: 1'"),
    (["--concurrency", "3000000"], "argument --concurrency: takes a whole number from 1 to 1000, not '3000000'"),
])
def test_a_bad_proxy_host_header_or_concurrency_is_a_usage_error_before_anything_is_sent(
        args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each used to fail every URL as a bare ``ValueError`` (exit 1), or, for a huge
    --concurrency, to start that many workers for one URL."""
    from proxy.cli import main

    argv = ["warm", "--proxy", "http://127.0.0.1:9", "--sitemap", "http://a.example/s.xml", "--progress", "none",
            *args]
    try:
        code = main(argv)
    except SystemExit as stopped:  # argparse's own usage errors
        code = stopped.code  # type: ignore[assignment]
    assert code == 2
    err = capsys.readouterr().err
    assert message in err, err


async def test_no_more_workers_than_requests(origin: Origin, proxy: Proxy) -> None:
    """--concurrency 1000 for one URL started 1000 workers (3,000,000: 48 s and 3.5 GB)."""
    origin.route("/one", body=b"x", headers={"Cache-Control": "max-age=600"})
    loop = asyncio.get_running_loop()
    made: list[str] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        made.append(getattr(coro, "__qualname__", ""))
        return asyncio.Task(coro, loop=loop, **kwargs)

    warmer = warm_module.Warmer(warm_module.WarmOptions(proxy=proxy.url, concurrency=1000, progress="none"))
    loop.set_task_factory(factory)
    try:
        tally, _, _ = await warmer.run(lambda found: targets_for(["/one"], [], []))
    finally:
        loop.set_task_factory(None)
    assert tally.counts["stored"] == 1
    assert sum(1 for name in made if name.endswith("_warm.<locals>.worker")) == 1


# -- sources and error kinds ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["combined", "json"])
async def test_an_access_logs_escapes_are_decoded_and_a_control_character_is_refused(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, fmt: str) -> None:
    """cachegate's combined log writes a quote or a backslash in a path as \\x22, \\x5C: warm
    sent the escape itself (``/q%5Cx22x``), another key, and reported it stored. Now it warms
    the key the client's request had; a path with a control character (no request line can
    carry it as logged) is an error of its own kind, once."""
    for path in ('/al/q"x', "/al/b\\c", "/al/plain"):
        origin.route(path, body=b"x", headers={"Cache-Control": "max-age=600"})
    log = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{format: {fmt}, path: '{log}'}}\n")
    for path in ('/al/q"x', "/al/b\\c", "/al/plain"):
        assert (await proxy.raw("GET", path)).status == 200
    for _ in range(100):  # the log is written behind the requests
        if len(log.read_text().splitlines()) >= 3:
            break
        await asyncio.sleep(0.05)
    with log.open("a") as f:  # what a proxy in front logged, or nginx: a control byte
        f.write('{"method":"GET","path":"/al/c\\u0001x","status":200}\n' if fmt == "json" else
                '127.0.0.1 - - [05/Dec/2026:19:08:46 +0000] "GET /al/c\\x01x HTTP/1.1" 200 2 "-" "-"\n'
                '127.0.0.1 - - [05/Dec/2026:19:08:47 +0000] "GET /al/c\\x01x HTTP/1.1" 200 2 "-" "-"\n')
    code, out, err = await warm("--proxy", proxy.url, "--from-access-log", str(log), "--progress", "none",
                                "--max-errors", "1")
    assert code == 0, (out, err)
    assert "already fresh         3" in out, out  # the three keys the clients' requests stored
    assert "errors                1  (a logged path with a space or control character" in out, out
    assert [origin.count(p) for p in ('/al/q"x', "/al/b\\c", "/al/plain")] == [1, 1, 1]


async def test_a_json_log_line_is_warmed_with_the_host_it_records(
        origin: Origin, proxy: Proxy, tmp_path: Path) -> None:
    """cachegate's JSON log records each request's Host: warm sent every path with the proxy's
    own address, and stored keys of a site no client asks for. Now each path goes with the Host
    the line records (the same path on two sites is two requests); a line without one (combined)
    with the proxy's; --host still overrides every one."""
    hosts: list[tuple[str, str]] = []

    async def page(request: web.Request) -> web.Response:
        hosts.append((request.path_qs, request.headers.get("Host", "")))
        return web.Response(body=b"x", headers={"Cache-Control": "max-age=600"})

    for path in ("/cart", "/post/1", "/plain", "/over"):
        origin.route(path, page)
    log = tmp_path / "access.log"
    log.write_text(
        '{"method":"GET","host":"shop.example","path":"/cart?x=1","status":200}\n'
        '{"method":"GET","host":"blog.example","path":"/post/1","status":200}\n'
        '{"method":"GET","host":"shop.example","path":"/post/1","status":200}\n'
        '127.0.0.1 - - [05/Dec/2026:10:00:00 +0000] "GET /plain HTTP/1.1" 200 5 "-" "curl/8"\n')
    code, out, err = await warm("--proxy", proxy.url, "--from-access-log", str(log), "--progress", "none")
    assert code == 0, (out, err)
    assert "stored                4" in out, out
    for path, host in (("/cart?x=1", "shop.example"), ("/post/1", "blog.example"), ("/post/1", "shop.example")):
        assert (await proxy.get(path, headers={"Host": host})).x_cache == "HIT", (path, host)
    assert (await proxy.get("/plain")).x_cache == "HIT"
    log.write_text('{"method":"GET","host":"shop.example","path":"/over","status":200}\n')
    code, out, err = await warm("--proxy", proxy.url, "--host", "www.example", "--from-access-log", str(log),
                                "--progress", "none")
    assert code == 0, (out, err)
    assert (await proxy.get("/over", headers={"Host": "www.example"})).x_cache == "HIT"
    assert (await proxy.get("/over", headers={"Host": "shop.example"})).x_cache == "MISS"


async def test_apaches_backslash_escapes_are_decoded_as_nginxs_are(
        origin: Origin, proxy: Proxy, tmp_path: Path) -> None:
    """Apache's combined log writes a quote and a backslash in a request line as \\" and \\\\
    (nginx and cachegate as \\x22 and \\x5C): warm sent the backslashes too, warming keys no client
    asked for. Now both forms give the path the client sent; Apache's \\\\x41 (a client's
    literal \\x41) stays \\x41, and its \\t (a tab) is refused as a control character."""
    paths = ['/ap/q"x', "/ap/b\\s", "/ap/l\\x41", '/ng/q"x']
    for path in paths:
        origin.route(path, body=b"x", headers={"Cache-Control": "max-age=600"})
    log = tmp_path / "apache.log"
    log.write_text(
        '10.0.0.1 - - [05/Dec/2026:10:00:00 +0000] "GET /ap/q\\"x HTTP/1.1" 200 5 "-" "curl/8"\n'
        '10.0.0.1 - - [05/Dec/2026:10:00:00 +0000] "GET /ap/b\\\\s HTTP/1.1" 200 5 "-" "curl/8"\n'
        '10.0.0.1 - - [05/Dec/2026:10:00:00 +0000] "GET /ap/l\\\\x41 HTTP/1.1" 200 5 "-" "curl/8"\n'
        '10.0.0.1 - - [05/Dec/2026:10:00:00 +0000] "GET /ap/t\\tx HTTP/1.1" 200 5 "-" "curl/8"\n'
        '10.0.0.1 - - [05/Dec/2026:10:00:00 +0000] "GET /ng/q\\x22x HTTP/1.1" 200 5 "-" "curl/8"\n')
    code, out, err = await warm("--proxy", proxy.url, "--from-access-log", str(log), "--progress", "none",
                                "--max-errors", "1")
    assert code == 0, (out, err)
    assert "stored                4" in out, out
    assert "errors                1  (a logged path with a space or control character" in out, out
    assert [origin.count(p) for p in paths] == [1, 1, 1, 1], [s.path for s in origin.seen]
    for path in paths:
        assert (await proxy.raw("GET", path)).x_cache == "HIT"


async def test_bad_lines_are_errors_once_each_named_by_file_and_line_and_not_utf8_is_one(
        origin: Origin, proxy: Proxy, tmp_path: Path) -> None:
    """A Latin-1 line (``/caf\\xe9``) was read with its byte replaced, sent as /caf%EF%BF%BD and
    reported stored; bad lines were reported with an example URL only, and counted once per
    --variants variant (4 bad lines, 2 variants: 8 errors, and "94 of 94 requests" for 86 sent).
    Now each bad line is one error, named FILE:LINE, and the request count is what was sent."""
    for path in ("/ok", "/caf\u00e9"):
        origin.route(path, body=b"x", headers={"Cache-Control": "max-age=600"})
    urls = tmp_path / "urls.txt"
    urls.write_bytes(b"/ok\n# caf\xe9, a comment\n/caf\xe9\nexample.com/x\nftp://h/x\n/caf\xc3\xa9\nexample.org/y\n")
    code, out, err = await warm("--proxy", proxy.url, "--urls", str(urls), "--progress", "none",
                                "--variants", "Accept-Encoding: gzip", "--variants", "Accept-Encoding:")
    assert code == 1, (out, err)
    assert "cachegate warm: 4 of 4 requests in " in out and ", 4 URLs not sent (errors)" in out, out
    assert "stored                2" in out and "already fresh         2" in out, out  # one entry, two variants
    assert ("errors                4  (not a URL or path 2, a line that is not UTF-8 (no client's key is known "
            "for its bytes) 1, not an http(s) URL 1)") in out, out
    assert f"a line that is not UTF-8 (no client's key is known for its bytes): e.g. /caf\\xe9\n    at {urls}:3\n" in out
    assert f"not a URL or path: e.g. example.com/x\n    at {urls}:4, {urls}:7\n" in out, out
    assert f"not an http(s) URL: e.g. ftp://h/x\n    at {urls}:5\n" in out, out
    assert "4 errors, more than --max-errors 0" in err
    assert origin.count("/ok") == 1 and origin.count("/caf\u00e9") == 1  # /caf%C3%A9: the UTF-8 line
    assert len(origin.seen) == 2, [r.path for r in origin.seen]  # nothing under a replaced byte
    # From standard input, and past the first few lines of a kind: a count of the rest.
    code, out, err = await warm("--proxy", proxy.url, "--urls", "-", "--progress", "none",
                                stdin=b"".join(b"bad%d\n" % i for i in range(8)))
    assert code == 1 and "cachegate warm: 0 of 0 requests" in out, (out, err)
    assert "    at <stdin>:1, <stdin>:2, <stdin>:3, <stdin>:4, <stdin>:5 and 3 more\n" in out, out


async def test_a_list_whose_lines_end_with_a_lone_cr_is_one_url_a_line(
        origin: Origin, proxy: Proxy, tmp_path: Path) -> None:
    """A list saved with old Mac line ends (a lone CR) was read by LF alone: its three URLs were
    one, sent as /cr1%0D/cr2%0D/cr3 and reported stored (a key no client asks for)."""
    for path in ("/cr1", "/cr2", "/cr3"):
        origin.route(path, body=b"x", headers={"Cache-Control": "max-age=600"})
    urls = tmp_path / "urls.txt"
    urls.write_bytes(b"/cr1\r/cr2\r\n/cr3\r")
    code, out, err = await warm("--proxy", proxy.url, "--urls", str(urls), "--progress", "none")
    assert code == 0 and "cachegate warm: 3 of 3 requests" in out, (out, err)
    assert sorted(r.path for r in origin.seen) == ["/cr1", "/cr2", "/cr3"]


@pytest.mark.slow
async def test_error_kinds_are_a_fixed_few_with_one_example_each(origin: Origin, proxy: Proxy) -> None:
    """Each line that was not a URL was a kind of its own, URL included ("not a URL or path:
    'x1'" ...): 20,000 of them printed a 700 KB summary line and 20,000 "e.g." lines. Other
    schemes were sent as http (``ftp://h/x`` with Host h): now refused, a kind of their own."""
    lines = [f"nope{i}" for i in range(49)] + ["localhost:8080/x", "ftp://h/x", "mailto://a/b",
                                                "mailto:a@b.example", "file:///etc/passwd", "HTTP://h/upper-case-scheme"]
    origin.route("/upper-case-scheme", body=b"x", headers={"Cache-Control": "max-age=600"})
    code, out, err = await warm("--proxy", proxy.url, "--urls", "-", "--progress", "none",
                                stdin="\n".join(lines).encode())
    assert code == 1, (out, err)
    assert "errors               54  (not a URL or path 50, not an http(s) URL 4)" in out, out
    assert len([line for line in out.splitlines() if "e.g." in line]) == 2, out
    assert "not a URL or path: e.g. nope0" in out and "not an http(s) URL: e.g. ftp://h/x" in out, out
    assert origin.count("/x") == origin.count("/b") == 0
    assert origin.count("/upper-case-scheme") == 1


@pytest.mark.slow
async def test_sitemaps_past_the_depth_limit_or_redirected_are_errors_saying_so(
        origin: Origin, proxy: Proxy) -> None:
    """An index nested deeper than MAX_SITEMAP_DEPTH was dropped silently ("0 of 0 requests",
    exit 0); a sitemap answering 301 was read as XML ("not XML: syntax error")."""
    depth = warm_module.MAX_SITEMAP_DEPTH
    for i in range(depth + 1):
        origin.route(f"/idx{i}.xml", body=NESTED.replace("{base}/sitemap-deep.xml", f"{proxy.url}/idx{i + 1}.xml"))
    origin.route(f"/idx{depth + 1}.xml", body=urlset([f"{proxy.url}/deep-page"]))
    origin.route("/moved.xml", status=301, headers={"Location": "https://shop.example/sitemap.xml"})
    code, out, err = await warm("--proxy", proxy.url, "--sitemap", f"{proxy.url}/idx0.xml",
                                "--sitemap", f"{proxy.url}/moved.xml", "--progress", "none")
    assert code == 1, (out, err)
    # the sitemap not fetched is an error, not a request (the requests are what was sent)
    assert "cachegate warm: 1 of 1 requests" in out and ", 1 URL not sent (errors)" in out, out
    assert (f"sitemap: nested deeper than {depth} sitemap indexes (not fetched): e.g. "
            f"{proxy.url}/idx{depth + 1}.xml") in out, out
    assert f"sitemap: HTTP 301: e.g. {proxy.url}/moved.xml (Location: https://shop.example/sitemap.xml)" in out, out
    assert origin.count(f"/idx{depth + 1}.xml") == 0


@pytest.mark.slow
async def test_a_certificate_that_fails_verification_is_named_and_ssl_cert_file_trusts_it(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    """A TLS listener whose certificate warm could not verify counted as "cannot connect"."""
    from tests.harness import self_signed

    key, cert = self_signed(tmp_path, "w", "warm.test", "IP:127.0.0.1")
    origin.route("/t", body=b"x", headers={"Cache-Control": "max-age=600"})
    proxy = await make_proxy(config=f"listen:\n  - {{address: '127.0.0.1:0', tls: {{cert: '{cert}', key: '{key}'}}}}\n")
    https = proxy.listeners.proxy_urls[0]
    assert https.startswith("https://")
    code, out, _ = await warm("--proxy", https, "--urls", "-", "--progress", "none", stdin=b"/t\n",
                              env={"SSL_CERT_FILE": str(cert)})
    assert code == 0 and "stored                1" in out, out
    code, out, _ = await warm("--proxy", https, "--urls", "-", "--progress", "none", stdin=b"/t\n",
                              env={"SSL_CERT_FILE": os.devnull})
    assert code == 1
    assert "(TLS certificate not verified (SSL_CERT_FILE names the CA to trust) 1)" in out, out
    assert "certificate verify failed" in out, out


@pytest.mark.slow
async def test_a_certificate_for_another_name_says_so_and_its_name_in_proxy_verifies(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    """A certificate for localhost (a trusted CA: SSL_CERT_FILE) reached as https://127.0.0.1:...
    fails on its name, not its CA: the error said to set SSL_CERT_FILE, which was set. Now it
    says to give --proxy the certificate's name, and with that name warm verifies it."""
    from tests.harness import self_signed

    key, cert = self_signed(tmp_path, "n", "localhost", "DNS:localhost")
    origin.route("/n", body=b"x", headers={"Cache-Control": "max-age=600"})
    proxy = await make_proxy(config=f"listen:\n  - {{address: '127.0.0.1:0', tls: {{cert: '{cert}', key: '{key}'}}}}\n")
    by_address = proxy.listeners.proxy_urls[0]
    assert by_address.startswith("https://127.0.0.1:")
    env = {"SSL_CERT_FILE": str(cert)}
    code, out, _ = await warm("--proxy", by_address, "--urls", "-", "--progress", "none", stdin=b"/n\n", env=env)
    assert code == 1
    assert "(TLS certificate not valid for the --proxy host (give --proxy the name it is for) 1)" in out, out
    assert "certificate is not valid for '127.0.0.1'" in out, out
    assert "SSL_CERT_FILE" not in out, out
    by_name = by_address.replace("127.0.0.1", "localhost")
    code, out, _ = await warm("--proxy", by_name, "--urls", "-", "--progress", "none", stdin=b"/n\n", env=env)
    assert code == 0 and "stored                1" in out, out


async def test_warm_config_reads_only_listen_not_the_services_token_variable_nor_tls_files(
        origin: Origin, proxy: Proxy, tmp_path: Path) -> None:
    """``warm --config`` loaded the whole config and exited 2 on ``environment variable
    CACHEGATE_ADMIN_TOKEN is not set``: on a systemd host the token's variable lives in a file
    only systemd reads, as docs/deploy.md sets it up. It reaches the proxy through ``listen``
    alone (a TLS listener's key, readable by the service only, is not read either)."""
    origin.route("/w", body=b"w", headers={"Cache-Control": "max-age=600"})
    port = proxy.url.rsplit(":", 1)[1]
    config = tmp_path / "cachegate.yaml"
    config.write_text(f"listen:\n  - {{address: '127.0.0.1:1', tls: {{cert: '{tmp_path}/no.pem', "
                      f"key: '{tmp_path}/no.key'}}}}\n  - '0.0.0.0:{port}'\n"
                      f"upstreams: [{{url: '{origin.url}'}}]\n"
                      "admin:\n  listen: 0.0.0.0:8081\n  token: ${CACHEGATE_TEST_UNSET_TOKEN}\n"
                      "rules: [no-such-rules.yaml]\n")
    environment = {k: v for k, v in os.environ.items() if k != "CACHEGATE_TEST_UNSET_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "warm", "--config", str(config), "--urls", "-", "--progress", "none",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=environment)
    out, err = await asyncio.wait_for(proc.communicate(b"/w\n"), 60)
    assert proc.returncode == 0, err.decode()
    assert f"through http://127.0.0.1:{port}" in out.decode() and "stored                1" in out.decode()
    config.write_text("listen: [{adress: '127.0.0.1:1'}]\n")  # listen itself wrong: FILE:LINE, exit 2
    code, _, text = await warm("--config", str(config), "--urls", "-", stdin=b"/w\n")
    assert (code, text.splitlines()[0]) == (2, f"{config}:1: unknown key 'listen[0].adress' (did you mean "
                                               "'address'?)")
