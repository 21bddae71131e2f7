"""GET /metrics: every family the issue lists, with its labels, after real traffic."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Overrides
from proxy.web.server import install_reloader
from tests.admin.util import absolute, settle
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.ports import Ports
from tests.security.misbehaving import Conn, raw_origins, response

CONFIG = "cache: {memory: 40KB, memory_max_object: 2KB, disk: {path: cache, size: 64MB, shards: 2}}\n"


async def scrape(proxy: Proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = await proxy.admin("GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_every_family_is_there_with_its_labels(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(config=CONFIG)
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    up = origin.url
    origin.route("/small", body=b"s" * 100, headers={"Cache-Control": "max-age=60", "Surrogate-Key": "t"})
    origin.route("/big", body=b"b" * 10_000, headers={"Cache-Control": "max-age=60"})
    origin.route("/private", body=b"p", headers={"Cache-Control": "private"})
    origin.route("/slow", body=b"w", headers={"Cache-Control": "max-age=60"}, delay=0.2)
    for path in ("/small", "/small", "/big", "/big", "/private"):
        await proxy.get(path)
    await proxy.request("HEAD", "/small")
    await proxy.request("POST", "/private", data=b"x")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        async def one() -> None:
            async with s.get(proxy.url + "/slow") as r:
                await r.read()

        await asyncio.gather(*(one() for _ in range(4)))  # 1 fetch, 3 coalesced waiters
    for i in range(40):  # 40 x 1 KB into a 40 KB memory tier: some are evicted from memory
        origin.route(f"/fill/{i}", body=b"f" * 1000, headers={"Cache-Control": "max-age=60"})
        await proxy.get(f"/fill/{i}")
    await settle(proxy)
    for spec in ({"urls": [absolute(proxy, "/small")]}, {"prefixes": [absolute(proxy, "/fill/")]},
                 {"tags": ["t"]}, {"all": True, "soft": True}):
        assert (await proxy.admin("POST", "/purge", json=spec)).status == 200
    assert (await proxy.admin("POST", "/reload")).status == 200
    Path(proxy.config_path).write_text("upstreams: nope\n")  # noqa: ASYNC240
    assert (await proxy.admin("POST", "/reload")).status == 400
    origin.route("/after", body=b"a", headers={"Cache-Control": "max-age=60"})
    await proxy.get("/after")  # the purges emptied memory: one entry again
    await settle(proxy)
    await origin.stop(hold_port=True)
    await proxy.get("/down")  # an upstream error

    m = await scrape(proxy)
    assert value(m, "cachegate_requests_total", cache_status="MISS", method="GET") >= 4
    assert value(m, "cachegate_requests_total", cache_status="HIT", method="GET") >= 5
    assert value(m, "cachegate_requests_total", cache_status="HIT", method="HEAD") == 1
    assert value(m, "cachegate_requests_total", cache_status="BYPASS", method="POST") == 1
    for tier in ("memory", "disk", "upstream"):
        assert value(m, "cachegate_response_bytes_total", tier=tier) > 0, tier
    assert value(m, "cachegate_response_bytes_total", tier="disk") == 10_000  # the second /big
    assert value(m, "cachegate_upstream_requests_total", upstream=up, status_class="2xx") >= 45
    assert value(m, "cachegate_upstream_errors_total", upstream=up, kind="connect") >= 1
    assert value(m, "cachegate_upstream_latency_seconds_count", upstream=up) >= 45
    assert value(m, "cachegate_upstream_latency_seconds_bucket", upstream=up, le="+Inf") >= 45
    assert value(m, "cachegate_coalesced_requests_total") == 3
    assert value(m, "cachegate_evictions_total", tier="memory") > 0
    assert ("cachegate_evictions_total", (("tier", "disk"),)) in m
    assert value(m, "cachegate_cache_entries", tier="memory") > 0
    assert value(m, "cachegate_cache_entries", tier="disk") > 0
    assert value(m, "cachegate_cache_bytes", tier="memory") > 0
    assert value(m, "cachegate_cache_bytes", tier="disk") > 0
    # (A 40 KB memory tier filled 1 KB at a time may wrap between two looks of write-behind.)
    assert ("cachegate_write_behind_lost_total", ()) in m
    for kind in ("url", "prefix", "tag", "all", "invalidation"):  # the POST invalidated /private
        assert value(m, "cachegate_purges_total", kind=kind) == 1, kind
    assert value(m, "cachegate_config_reloads_total", result="success") == 1
    assert value(m, "cachegate_config_reloads_total", result="failure") == 1
    assert value(m, "cachegate_not_stored_total", reason="PRIVATE") == 1
    assert value(m, "cachegate_upstream_up", upstream=up) in (0.0, 1.0)


# What aiohttp's parser (llhttp) refuses before cachegate's handler sees the request, and why.
REFUSED = [
    (b"BREW /c/x HTTP/1.1\r\nHost: example.com\r\n\r\n", 501),  # a method llhttp does not know
    (b"GET /c/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: example.com\r\n\r\n", 400),  # the line is too long
    (b"GET /c/x HTTP/1.1\r\nHost: example.com\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 400),  # a field
    (b"GET /a\x1bb HTTP/1.1\r\nHost: example.com\r\n\r\n", 400),  # an ESC in the target
]


async def test_requests_the_parser_refused_are_counted_as_errors_with_a_bounded_method(
    tmp_path: Path, make_proxy: MakeProxy
) -> None:
    """They were in the access log as ERROR, never in cachegate_requests_total (nor the
    console's counts): 100 refused requests read +20, the ones cachegate itself refused."""
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{format: json, path: {log_file}}}\n")
    port = proxy.listeners.proxy_addresses[0][1]
    for raw, status in REFUSED:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        answer = await reader.read(65536)
        writer.close()
        assert int(answer.split(b" ", 2)[1]) == status, answer[:80]
    assert proxy.runtime.access_log is not None
    proxy.runtime.access_log.flush()
    logged = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [(r["cache"], r["method"], r["status"]) for r in logged] == [("ERROR", None, s) for _, s in REFUSED]
    m = await scrape(proxy)
    assert value(m, "cachegate_requests_total", cache_status="ERROR", method="-") == len(REFUSED)
    assert {labels for (name, labels), n in m.items() if name == "cachegate_requests_total" and n} == {
        (("cache_status", "ERROR"), ("method", "-"))}  # BREW is no label: only methods llhttp parsed
    counts = proxy.runtime.metrics.request_counts()  # the console's
    assert {status: n for status, n in counts.items() if n} == {"ERROR": len(REFUSED)}


# Requests cachegate answers in place of the origin, refused: by its own reading of the request
# (normalisation, the version) or by aiohttp's parser, and the statuses they get.
ANSWERED_ERRORS = [
    (b"GET /c/x HTTP/1.1\r\nHost: example.com\r\nConnection: host\r\n\r\n", 400),
    (b"GET /c/x HTTP/1.1\r\nHost: evil@example.com\r\n\r\n", 400),
    (b"POST /c/x HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n", 400),
    (b"GET ftp://example.com/c/x HTTP/1.1\r\nHost: example.com\r\n\r\n", 400),
    (b"GET /c/x\r\n\r\n", 400),  # HTTP/0.9, with a blank line
    (b"GET /c/x HTTP/2.0\r\nHost: example.com\r\n\r\n", 505),
    (b"BREW /c/x HTTP/1.1\r\nHost: example.com\r\n\r\n", 501),  # (the parser's)
    (b"GET /c/x\r\n", 400),  # HTTP/0.9, the line alone (the parser's)
]


async def test_a_refusal_says_error_in_its_head_as_the_log_and_the_metrics_count_it(
    tmp_path: Path, make_proxy: MakeProxy
) -> None:
    """These said ``X-Cache-Status: MISS`` (a parser's refusal said nothing), while their
    Cache-Status said ``detail=PROXY-ERROR`` and the access log and cachegate_requests_total
    counted them as ERROR: a dashboard on the header counted refusals as cache misses."""
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{format: json, path: {log_file}}}\n")
    port = proxy.listeners.proxy_addresses[0][1]
    for raw, status in ANSWERED_ERRORS:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        answer = await asyncio.wait_for(reader.read(), 10)  # (to the close: each one closes)
        writer.close()
        head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        assert int(head[0].split(" ")[1]) == status, answer[:80]
        assert "X-Cache-Status: ERROR" in head[1:], (raw, head)
        assert "Cache-Status: cachegate; detail=PROXY-ERROR" in head[1:], (raw, head)
    assert proxy.runtime.access_log is not None
    proxy.runtime.access_log.flush()
    logged = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [(r["cache"], r["status"]) for r in logged] == [("ERROR", s) for _, s in ANSWERED_ERRORS]
    m = await scrape(proxy)
    errors = sum(n for (name, labels), n in m.items()
                 if name == "cachegate_requests_total" and ("cache_status", "ERROR") in labels)
    assert errors == len(ANSWERED_ERRORS)


# -- the documented PromQL, on real counters ----------------------------------------------------

Vector = dict[frozenset[tuple[str, str]], float]
_TOKEN = re.compile(r'\s*(?:(?P<num>\d+[smh]\b|\d+(?:\.\d+)?)|(?P<str>"(?:[^"\\]|\\.)*")|(?P<name>[A-Za-z_:][\w:]*)'
                    r"|(?P<op>=~|!~|!=|[-+*/(){}\[\],=]))")


class PromQL:
    """The part of PromQL the documented ratios use, on one scrape of counters that all began at 0:
    ``rate(x[5m])`` is then the counter itself (every ratio of two rates over one window is the
    ratio of what was counted); ``sum by (...)``; ``+ - * /`` between vectors (matched on equal
    label sets, the others dropped, as Prometheus does) and numbers; selectors with ``=``,
    ``!=``, ``=~``, ``!~``, ``__name__`` included."""

    def __init__(self, samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], text: str) -> None:
        self.samples = samples
        self.tokens = [m.group(m.lastgroup or "") for m in _TOKEN.finditer(text)]
        assert "".join(self.tokens) == re.sub(r"\s", "", text), text  # all of it understood
        self.at = 0

    def run(self) -> Vector | float:
        out = self.expr()
        assert self.at == len(self.tokens), self.tokens[self.at:]
        return out

    def take(self, expected: str | None = None) -> str:
        token = self.tokens[self.at]
        assert expected is None or token == expected, (token, expected)
        self.at += 1
        return token

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def expr(self) -> Vector | float:
        out = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            out = self.binary(op, out, self.term())
        return out

    def term(self) -> Vector | float:
        out = self.factor()
        while self.peek() in ("*", "/"):
            op = self.take()
            out = self.binary(op, out, self.factor())
        return out

    def factor(self) -> Vector | float:
        token = self.take()
        if token == "(":
            out = self.expr()
            self.take(")")
            return out
        if re.fullmatch(r"\d+(?:\.\d+)?", token):
            return float(token)
        if token == "sum":
            by: list[str] = []
            if self.peek() == "by":
                self.take()
                self.take("(")
                while self.peek() != ")":
                    by.append(self.take())
                    if self.peek() == ",":
                        self.take()
                self.take(")")
            self.take("(")
            inner = self.expr()
            self.take(")")
            assert isinstance(inner, dict)
            summed: Vector = {}
            for labels, v in inner.items():
                key = frozenset((k, val) for k, val in labels if k in by)
                summed[key] = summed.get(key, 0.0) + v
            return summed
        if token == "rate":
            self.take("(")
            out = self.selector(self.take())
            self.take("[")
            self.take()  # the window, as 5m: the scrape covers it all
            self.take("]")
            self.take(")")
            return {frozenset((k, v) for k, v in labels if k != "__name__"): n for labels, n in out.items()}
        return self.selector(token)

    def selector(self, first: str) -> Vector:
        matchers: list[tuple[str, str, str]] = []
        if first != "{":
            matchers.append(("__name__", "=", first))
            if self.peek() != "{":
                return self.select(matchers)
            self.take("{")
        while self.peek() != "}":
            label, op, quoted = self.take(), self.take(), self.take()
            matchers.append((label, op, json.loads(quoted)))
            if self.peek() == ",":
                self.take()
        self.take("}")
        return self.select(matchers)

    def select(self, matchers: list[tuple[str, str, str]]) -> Vector:
        out: Vector = {}
        for (name, labels), n in self.samples.items():
            have = {"__name__": name, **dict(labels)}
            if all(self.matches(have.get(label, ""), op, want) for label, op, want in matchers):
                out[frozenset(have.items())] = n
        return out

    @staticmethod
    def matches(value: str, op: str, want: str) -> bool:
        return {"=": value == want, "!=": value != want, "=~": re.fullmatch(want, value) is not None,
                "!~": re.fullmatch(want, value) is None}[op]

    @staticmethod
    def binary(op: str, a: Vector | float, b: Vector | float) -> Vector | float:
        def apply(x: float, y: float) -> float:
            return {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else float("nan")}[op]

        if isinstance(a, dict) and isinstance(b, dict):
            return {k: apply(v, b[k]) for k, v in a.items() if k in b}
        if isinstance(a, dict):
            return {k: apply(v, float(b)) for k, v in a.items()}  # type: ignore[arg-type]
        if isinstance(b, dict):
            return {k: apply(float(a), v) for k, v in b.items()}
        return apply(a, b)


def documented_query(title: str) -> str:
    """The PromQL under the comment starting with ``title`` in docs/admin-api.md (to the blank line)."""
    text = (Path(__file__).resolve().parents[2] / "docs/admin-api.md").read_text()
    block = text.split("```promql\n", 1)[1].split("```", 1)[0]
    lines = block.split(f"# {title}", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    return " ".join(line for line in lines if not line.startswith("#"))


async def test_the_documented_upstream_error_rate_counts_each_failure_once(
    origin: Origin, make_proxy: MakeProxy, ports: Ports
) -> None:
    """A 5xx answer is in cachegate_upstream_requests_total{status_class="5xx"} and in
    cachegate_upstream_errors_total{kind="status_5NN"}: the query added both, and an origin
    failing one request in two read 0.667. An upstream nothing answered (connect failures only:
    no requests series) is there too, at 1."""
    answered = 0

    async def half(request: web.Request) -> web.Response:
        nonlocal answered
        answered += 1
        status = 503 if answered % 2 == 0 else 200
        return web.Response(status=status, body=b"x", headers={"Cache-Control": "no-store"})

    origin.route("/half", half)
    down = ports.url()
    proxy = await make_proxy(upstreams=[origin.url, down])
    for _ in range(20):
        await proxy.get("/half")
    m = await scrape(proxy)
    failed = value(m, "cachegate_upstream_errors_total", upstream=down, kind="connect")
    assert answered >= 10 and failed >= 1
    rate = PromQL(m, documented_query("Upstream error rate, per upstream")).run()
    assert rate == {frozenset({("upstream", origin.url)}): (answered // 2) / answered,
                    frozenset({("upstream", down)}): 1.0}


async def test_the_documented_byte_offload_leaves_cachegate_s_own_error_pages_out(
        make_proxy: MakeProxy) -> None:
    """An error page is neither the store's bytes nor the origin's (tier="none"): counted as
    offload, it read 1 - upstream/all and rose with every 502."""
    async def serve(conn: Conn) -> None:
        while True:
            request = await conn.request()
            if request.target == "/bad":
                return  # closed without an answer: a 502 of cachegate's own
            await conn.send(response("200 OK", {"Cache-Control": "max-age=60"}, b"x" * 1000))

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        assert (await proxy.get("/a")).x_cache == "MISS"
        await asyncio.sleep(0.05)
        for _ in range(3):
            assert (await proxy.get("/a")).x_cache == "HIT"
        for _ in range(3):
            assert (await proxy.get("/bad")).status == 502
        m = await scrape(proxy)
        assert value(m, "cachegate_response_bytes_total", tier="none") > 0
        offload = PromQL(m, documented_query("Origin offload (bytes)")).run()
        assert offload == {frozenset(): 0.75}


async def test_cachegates_own_bodies_are_counted_as_tier_none_and_logged(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    """cachegate_response_bytes_total{tier="none"} promised cachegate's own bodies (error pages,
    refusals, the answers to PURGE) but counted none of a PURGE's answer, the CONNECT 405, a
    parser's 400 or a missing Host's 400 (and the access log said 0 bytes for most). Now each
    body is counted there, and logged, with the bytes that went out."""
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{path: {log_file}}}\n"
                                    "admin: {listen: '127.0.0.1:0', purge_from: [127.0.0.0/8]}\n")
    host, port = proxy.listeners.proxy_addresses[0]

    async def exchange(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(data)
        got = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return got.partition(b"\r\n\r\n")[2]

    cases = [
        b"PURGE /nothing HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n",
    ]
    bodies = []
    for data in cases:
        before = value(await scrape(proxy), "cachegate_response_bytes_total", tier="none")
        body = await exchange(data)
        bodies.append(len(body))
        assert body, data
        counted = value(await scrape(proxy), "cachegate_response_bytes_total", tier="none") - before
        assert counted == len(body), (data, counted, body)
    assert proxy.runtime.access_log is not None
    proxy.runtime.access_log.flush()
    logged = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [r["status"] for r in logged] == [200, 405, 400, 400], logged
    assert [r["bytes"] for r in logged] == bodies, logged
