"""Upstreams given by a host name (proxy.resolver, proxy.http_client.HostPool._connect): Happy
Eyeballs over a name's addresses, connections that follow the name when it moves, the last good
addresses kept through a resolver outage, one lookup per name, addresses taken in turn, and an
IPv6 zone kept out of Host.

Real parts on loopback: the proxy runs in this process, its origins are raw HTTP servers bound to
127.0.0.x addresses (a black-holed address is a listener whose backlog is full: its SYNs are
dropped), and the name's lookup is answered by a resolver stub set as this event loop's
``getaddrinfo``, running in a pool of 4 threads as uvloop's does: the connect code under test
(its lookups, Happy Eyeballs, the pool) is the real one, and nothing edits /etc/hosts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from yarl import URL

from proxy import resolver
from proxy.http_client import HostPool
from tests.conftest import MakeProxy

Answer = list[str] | socket.gaierror | None  # addresses, a failure, or None: no answer (yet)


@dataclass
class Resolver:
    """Answers lookups of the names in ``answers`` (others go to the system's): a list of
    addresses, a ``gaierror``, or None for a DNS server that does not answer (the lookup holds
    its thread until the test ends, then fails as glibc's does)."""

    answers: dict[str, Answer] = field(default_factory=dict)
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    released: threading.Event = field(default_factory=threading.Event)

    def lookup(self, host: str, port: int) -> list[Any]:
        answer = self.answers[host]
        if answer is None:
            self.released.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if isinstance(answer, socket.gaierror):
            raise answer
        return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, port, 0, 0)) if ":" in a
                else (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, port))
                for a in answer]


@pytest.fixture
async def names(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Resolver]:
    loop = asyncio.get_running_loop()
    system = loop.getaddrinfo
    threads = ThreadPoolExecutor(4)  # libuv's pool, where uvloop runs getaddrinfo
    stub = Resolver()

    async def getaddrinfo(host: Any, port: Any, *, family: int = 0, type: int = 0, proto: int = 0,
                          flags: int = 0) -> list[Any]:
        if host not in stub.answers:
            return await system(host, port, family=family, type=type, proto=proto, flags=flags)
        stub.calls[host] += 1
        return await loop.run_in_executor(threads, stub.lookup, host, int(port))

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    yield stub
    stub.released.set()
    threads.shutdown(wait=True)


def no_such_name() -> socket.gaierror:
    return socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def temporary_failure() -> socket.gaierror:
    return socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")


@dataclass
class Tagged:
    """A keep-alive HTTP/1.1 origin bound to one address that answers every request with its tag
    (``/slow`` once ``go`` is set); it records each request's path and Host."""

    tag: str
    seen: list[tuple[str, str]] = field(default_factory=list)
    go: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: asyncio.Event = field(default_factory=asyncio.Event)  # a /slow request came
    strict: bool = False  # a Host with a '%' (an IPv6 zone) is answered 400, as cachegate does
    close: bool = False  # each response closes its connection: every request a new connection
    server: asyncio.Server | None = None
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    def paths(self) -> list[str]:
        return [p for p, _ in self.seen if p != "/healthz"]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                path = head[0].split(" ")[1]
                host = next((line[6:] for line in head if line.lower().startswith("host: ")), "")
                self.seen.append((path, host))
                if path.startswith("/slow"):
                    self.waiting.set()
                    await self.go.wait()
                status, body = ("400 Bad Request", b"invalid Host") if self.strict and "%" in host \
                    else ("200 OK", self.tag.encode())
                writer.write(b"HTTP/1.1 %s\r\nContent-Length: %d\r\nCache-Control: no-store\r\n%s\r\n%s"
                             % (status.encode(), len(body), b"Connection: close\r\n" if self.close else b"",
                                body))
                if self.close:
                    break
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.close()


@contextlib.asynccontextmanager
async def origins(*where: tuple[str, str]) -> AsyncIterator[tuple[int, list[Tagged]]]:
    """Origins tagged and bound as ``where`` says ((address, tag) pairs), all on one port; a tag
    of "blackhole" is a listener whose backlog is full (SYNs to it are dropped)."""
    for _ in range(20):
        servers: list[Tagged] = []
        holes: list[socket.socket] = []
        port = 0
        try:
            for address, tag in where:
                if tag == "blackhole":
                    family = socket.AF_INET6 if ":" in address else socket.AF_INET
                    hole = socket.socket(family)
                    holes.append(hole)
                    hole.bind((address, port))
                    hole.listen(0)
                    holes.append(socket.create_connection((address, hole.getsockname()[1]), timeout=5))
                    port = hole.getsockname()[1]
                    continue
                origin = Tagged(tag)
                servers.append(origin)
                origin.server = await asyncio.start_server(origin.handle, address, port)
                port = origin.server.sockets[0].getsockname()[1]
        except OSError as exc:
            for origin in servers:
                await origin.stop()
            for hole in holes:
                hole.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        try:
            yield port, servers
        finally:
            for origin in servers:
                origin.go.set()
                await origin.stop()
            for hole in holes:
                hole.close()
        return
    raise RuntimeError("no port free on every address")


def dns_lines(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and name in r.getMessage()]


@pytest.fixture
def quick_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Names looked up again every 0.2 s, failures remembered 0.2 s (60 s and 5 s in service)."""
    monkeypatch.setattr(resolver, "DNS_TTL", 0.2)
    monkeypatch.setattr(resolver, "DNS_RETRY", 0.2)
    yield


# -- Happy Eyeballs ---------------------------------------------------------------------------

async def test_a_first_address_that_drops_packets_costs_a_quarter_second_not_the_connect_timeout(
        make_proxy: MakeProxy, names: Resolver) -> None:
    """RFC 8305: a name listing a black-holed address first and a live one second. Tried one
    after another inside one connect timeout, every request was a 504 after ``connect`` and the
    live address was never tried; active checks took the upstream out the same way."""
    async with origins(("127.0.0.3", "blackhole"), ("127.0.0.1", "live")) as (port, [live]):
        names.answers["he.cachegate.test"] = ["127.0.0.3", "127.0.0.1"]
        proxy = await make_proxy(
            config="cache: {memory: 16MB}\nupstream: {retries: 0, timeouts: {connect: 3s}, health: "
                   "{path: /healthz, interval: 200ms, timeout: 2s, healthy: 1, unhealthy: 1}}\n",
            upstreams=[f"http://he.cachegate.test:{port}"])
        started = time.monotonic()
        replies = await asyncio.gather(*(proxy.get(f"/he{i}") for i in range(6)))
        took = time.monotonic() - started
        assert [(r.status, r.body) for r in replies] == [(200, b"live")] * 6, replies
        assert took < 2.5, took  # (under the connect timeout: no connect waited it out)
        assert sorted(live.paths()) == [f"/he{i}" for i in range(6)]
        await asyncio.sleep(0.6)  # checks, each on a new connection, some starting at the black hole
        state = proxy.runtime.pool.snapshot()[0]
        assert state["available"] and state["health_check"]["last_error"] is None, state


# -- the name moves ---------------------------------------------------------------------------

async def test_steady_traffic_follows_the_name_to_its_new_address(
        make_proxy: MakeProxy, names: Resolver, quick_dns: None) -> None:
    """The name moves from A to B under steady traffic. The idle pool reused its most recent
    connection whatever its address, and under steady traffic none idled long enough to close:
    A got every request for as long as it ran, while health checks (new connections) checked B.
    Now a connection to an address no longer listed is closed when idle, and one busy at the
    change is not pooled again when its exchange ends."""
    async with origins(("127.0.0.1", "A"), ("127.0.0.4", "B")) as (port, [a, b]):
        names.answers["mv.cachegate.test"] = ["127.0.0.1"]
        proxy = await make_proxy(config="cache: {memory: 16MB}\nupstream: {retries: 0}\n",
                                 upstreams=[f"http://mv.cachegate.test:{port}"])
        assert (await proxy.get("/before")).body == b"A"
        slow = asyncio.ensure_future(proxy.get("/slow"))  # busy on its own connection to A
        await asyncio.wait_for(a.waiting.wait(), 10)
        names.answers["mv.cachegate.test"] = ["127.0.0.4"]
        tags = []
        for i in range(150):  # one request every 20 ms: no pooled connection idles 4 s
            tags.append((await proxy.get(f"/steady{i}")).body)
            if tags[-1] == b"B" and len(tags) > 1 and tags[-2] == b"B":
                break
            await asyncio.sleep(0.02)
        assert tags[-2:] == [b"B", b"B"], tags
        a.go.set()
        assert (await slow).body == b"A"  # answered, then its connection closed, not pooled
        after = [(await proxy.get(f"/after{i}")).body for i in range(5)]
        assert after == [b"B"] * 5, after
        assert not [p for p in a.paths() if p.startswith("/after")]
        assert [p for p in b.paths() if p.startswith("/after")] == [f"/after{i}" for i in range(5)]


# -- a resolver outage ------------------------------------------------------------------------

async def test_a_resolver_outage_keeps_the_last_good_addresses(
        make_proxy: MakeProxy, names: Resolver, quick_dns: None, caplog: pytest.LogCaptureFixture) -> None:
    """A resolver outage longer than the addresses' lifetime, the origin up all along: each new
    connection (every health check) asked the resolver again, failed, and the upstream was taken
    out. Now the last good addresses are kept, the name is looked up again every DNS_RETRY (not
    per connection), and one warning names the failure (another when it resolves again)."""
    caplog.set_level(logging.INFO, logger="cachegate")
    name = "out.cachegate.test"
    async with origins(("127.0.0.1", "up")) as (port, [origin]):
        names.answers[name] = ["127.0.0.1"]
        proxy = await make_proxy(
            config="cache: {memory: 16MB}\nupstream: {health: {path: /healthz, interval: 100ms, "
                   "timeout: 500ms, healthy: 1, unhealthy: 2}}\n",
            upstreams=[f"http://{name}:{port}"])
        assert (await proxy.get("/before")).status == 200
        names.answers[name] = temporary_failure()
        calls, started = names.calls[name], time.monotonic()
        replies = []
        for i in range(12):  # 1.2 s: six lifetimes of the addresses
            replies.append((await proxy.get(f"/during{i}")).status)
            await asyncio.sleep(0.1)
        assert replies == [200] * 12, replies
        # One lookup every DNS_RETRY, not one per new connection (each health check's).
        assert names.calls[name] - calls <= (time.monotonic() - started) / 0.2 + 2, names.calls
        state = proxy.runtime.pool.snapshot()[0]
        assert state["available"] and state["health_check"]["healthy"], state
        assert state["health_check"]["last_error"] is None, state
        lines = dns_lines(caplog, name)
        assert len(lines) == 1, lines
        assert "DNS lookup of out.cachegate.test failed: temporary failure in name resolution" in lines[0]
        assert "last known addresses (127.0.0.1" in lines[0], lines
        names.answers[name] = ["127.0.0.1"]
        for _ in range(50):
            if len(dns_lines(caplog, name)) == 2:
                break
            await asyncio.sleep(0.05)
        assert "resolves again (127.0.0.1)" in dns_lines(caplog, name)[-1]
        assert len(origin.paths()) == 13


async def test_a_name_that_no_longer_exists_drops_its_addresses(
        make_proxy: MakeProxy, names: Resolver, quick_dns: None, caplog: pytest.LogCaptureFixture) -> None:
    """NXDOMAIN is an answer: the addresses are dropped (as nginx's resolve does), the pooled
    connection closed, and requests fail at once (502, "its name did not resolve") until the
    name resolves again; one warning rather than one per request. (A lone upstream without
    ``passive:`` configured is never taken out; with another one, the next test.)"""
    caplog.set_level(logging.INFO, logger="cachegate")
    name = "gone.cachegate.test"
    async with origins(("127.0.0.1", "up")) as (port, [origin]):
        names.answers[name] = ["127.0.0.1"]
        proxy = await make_proxy(config="cache: {memory: 16MB}\n", upstreams=[f"http://{name}:{port}"])
        assert (await proxy.get("/before")).status == 200
        names.answers[name] = no_such_name()
        for _ in range(50):
            if dns_lines(caplog, name):
                break
            await asyncio.sleep(0.05)
        replies = [await proxy.get(f"/gone{i}") for i in range(3)]
        assert [r.status for r in replies] == [502] * 3, replies
        assert b"its name did not resolve" in replies[0].body, replies[0].body
        assert not [p for p in origin.paths() if p.startswith("/gone")]
        state = proxy.runtime.pool.snapshot()[0]
        assert state["available"] and state["passive"]["consecutive_failures"] == 0, state
        lines = dns_lines(caplog, name)
        assert len(lines) == 1 and "name or service not known" in lines[0] and "dropped" in lines[0], lines
        assert not [r for r in caplog.records if r.getMessage().startswith("upstream failed")]
        registry = proxy.runtime.metrics.registry
        assert registry.get_sample_value("cachegate_upstream_errors_total",
                                          {"upstream": state["url"], "kind": "dns"}) == 3
        names.answers[name] = ["127.0.0.1"]
        await asyncio.sleep(0.5)
        assert (await proxy.get("/back")).status == 200


async def test_a_name_that_does_not_exist_is_taken_out_by_passive_health(
        make_proxy: MakeProxy, names: Resolver) -> None:
    """Two upstreams, one given by a name that does not exist (NXDOMAIN), no active checks. Its
    definite answer was held against nothing, like a resolver outage: the upstream stayed up for
    ever and every other POST (not retried) was a 502. It is a connect failure now (the upstream
    cannot be reached): ``passive.failures`` of them take it out and the other one serves."""
    async with origins(("127.0.0.1", "up")) as (port, [origin]):
        names.answers["nx.cachegate.test"] = no_such_name()
        proxy = await make_proxy(
            config="cache: {memory: 16MB}\nupstream: {passive: {failures: 3, cooldown: 30s}}\n",
            upstreams=[f"http://127.0.0.1:{port}", f"http://nx.cachegate.test:{port}"])
        first = [(await proxy.request("POST", f"/first{i}", data=b"x")).status for i in range(8)]
        assert first.count(502) == 3 and first.count(200) == 5, first
        states = {s["url"]: s for s in proxy.runtime.pool.snapshot()}
        gone = states[f"http://nx.cachegate.test:{port}"]
        assert not gone["available"] and gone["passive"]["down_for"] > 0, gone
        after = [(await proxy.request("POST", f"/after{i}", data=b"x")).status for i in range(20)]
        assert after == [200] * 20, after
        assert len([p for p in origin.paths() if p.startswith("/after")]) == 20


async def test_a_lookup_that_does_not_answer_is_told_as_a_lookup_timeout(
        make_proxy: MakeProxy, names: Resolver, caplog: pytest.LogCaptureFixture) -> None:
    """A name whose DNS server does not answer and no address known yet: the health check said
    "no answer within 0.5s (health.timeout)" and requests "connect timed out", as if the origin
    had been asked. Now they name the lookup; the next requests fail at once for a while rather
    than wait on a resolver that is down, and no more lookups are started meanwhile."""
    caplog.set_level(logging.INFO, logger="cachegate")
    name = "silent.cachegate.test"
    names.answers[name] = None
    proxy = await make_proxy(
        config="cache: {memory: 16MB}\nupstream: {timeouts: {connect: 2s}, health: {path: /healthz, "
               "interval: 200ms, timeout: 500ms, healthy: 1, unhealthy: 100}}\n",
        upstreams=[f"http://{name}:8080"])
    first = await proxy.get("/first")
    assert first.status == 504 and b"looking up its name timed out" in first.body, first
    started = time.monotonic()
    second = await proxy.get("/second")
    assert second.status == 504 and time.monotonic() - started < 1.5, second  # (at once)
    assert names.calls[name] == 1, names.calls
    state = proxy.runtime.pool.snapshot()[0]
    assert state["health_check"]["last_error"] == \
        "DNS lookup of silent.cachegate.test: no answer within 0.5s (health.timeout)", state
    assert state["passive"]["consecutive_failures"] == 0, state
    lines = dns_lines(caplog, name)
    assert any("no answer within 2s (timeouts.connect)" in line for line in lines), lines
    assert not [r for r in caplog.records if r.getMessage().startswith("upstream failed")]


# -- one lookup per name ----------------------------------------------------------------------

async def test_a_name_whose_dns_hangs_starves_neither_its_own_resolver_threads_nor_another_upstream(
        make_proxy: MakeProxy, names: Resolver) -> None:
    """Two named upstreams, one whose DNS server never answers. Each connect looked its name
    up: a burst's lookups of the silent name took all 4 resolver threads (uvloop's), the
    healthy name's lookups waited behind them, and its requests timed out too (504, and it was
    marked down). Now one lookup per name is in flight, shared by every connect: the healthy
    upstream answers, and the silent one's failures are not held against it."""
    async with origins(("127.0.0.1", "ok")) as (port, [ok]):
        names.answers["slow.cachegate.test"] = None
        names.answers["ok.cachegate.test"] = ["127.0.0.1"]
        proxy = await make_proxy(
            config="cache: {memory: 16MB}\nupstream: {retries: 1, timeouts: {connect: 1s}}\n",
            upstreams=[f"http://slow.cachegate.test:{port}", f"http://ok.cachegate.test:{port}"])
        for burst in range(2):
            replies = await asyncio.gather(*(proxy.get(f"/b{burst}-{i}") for i in range(20)))
            assert [(r.status, r.body) for r in replies] == [(200, b"ok")] * 20, replies
        assert names.calls == {"slow.cachegate.test": 1, "ok.cachegate.test": 1}, names.calls
        assert len(ok.paths()) == 40
        states = {s["url"]: s for s in proxy.runtime.pool.snapshot()}
        assert all(s["available"] for s in states.values()), states
        assert states[f"http://slow.cachegate.test:{port}"]["passive"]["consecutive_failures"] == 0, states


# -- addresses in turn ------------------------------------------------------------------------

async def test_a_names_addresses_take_new_connections_in_turn(make_proxy: MakeProxy, names: Resolver) -> None:
    """A name with three live addresses: every connection went to the first."""
    async with origins(("127.0.0.5", "r5"), ("127.0.0.6", "r6"), ("127.0.0.7", "r7")) as (port, servers):
        names.answers["rr.cachegate.test"] = ["127.0.0.5", "127.0.0.6", "127.0.0.7"]
        proxy = await make_proxy(config="cache: {memory: 16MB}\n", upstreams=[f"http://rr.cachegate.test:{port}"])
        for burst in range(3):
            replies = await asyncio.gather(*(proxy.get(f"/rr{burst}-{i}") for i in range(30)))
            assert {r.status for r in replies} == {200}
        counts = [len(s.paths()) for s in servers]
        assert sum(counts) == 90 and min(counts) >= 15, counts


@contextlib.contextmanager
def connects(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The address of every TCP connect the proxy begins (each SYN it sends), in order."""
    loop = asyncio.get_running_loop()
    real = loop.sock_connect
    begun: list[str] = []

    async def sock_connect(sock: socket.socket, address: Any) -> None:
        begun.append(address[0])
        await real(sock, address)

    monkeypatch.setattr(loop, "sock_connect", sock_connect)
    yield begun


async def test_an_address_that_failed_is_tried_after_the_others_and_every_one_within_the_connect_timeout(
        make_proxy: MakeProxy, names: Resolver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name [black hole, live], ``connect: 200ms``. The next address was tried 0.25 s after the
    first, after the connect timeout: every new connection that started at the black hole (one in
    two, taken in turn) was a 504. And nothing remembered the failure: the black hole stayed first
    for one new connection in two for ever, each paying the stagger delay. Now the stagger fits
    every address into the connect timeout, and an address that failed is tried last."""
    async with origins(("127.0.0.3", "blackhole"), ("127.0.0.1", "live")) as (port, [live]):
        live.close = True  # every request on a new connection
        names.answers["dead.cachegate.test"] = ["127.0.0.3", "127.0.0.1"]
        proxy = await make_proxy(config="cache: {memory: 16MB}\nupstream: {retries: 0, timeouts: {connect: 200ms}}\n",
                                 upstreams=[f"http://dead.cachegate.test:{port}"])
        with connects(monkeypatch) as begun:
            replies = await asyncio.gather(*(proxy.get(f"/burst{i}") for i in range(30)))
            assert [(r.status, r.body) for r in replies] == [(200, b"live")] * 30, replies
            assert "127.0.0.3" in begun, begun  # (some started at the black hole)
            begun.clear()
            for i in range(10):
                reply = await proxy.get(f"/then{i}")
                assert (reply.status, reply.body) == (200, b"live"), reply
            assert begun == ["127.0.0.1"] * 10, begun


async def test_new_connections_go_round_the_live_addresses_past_a_dead_one(
        make_proxy: MakeProxy, names: Resolver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name [black hole, three live]: the turn goes round the live three, the black hole is
    not tried again once it failed."""
    where = (("127.0.0.3", "blackhole"), ("127.0.0.5", "r5"), ("127.0.0.6", "r6"), ("127.0.0.7", "r7"))
    async with origins(*where) as (port, servers):
        for server in servers:
            server.close = True
        names.answers["rd.cachegate.test"] = ["127.0.0.3", "127.0.0.5", "127.0.0.6", "127.0.0.7"]
        proxy = await make_proxy(config="cache: {memory: 16MB}\nupstream: {retries: 0}\n",
                                 upstreams=[f"http://rd.cachegate.test:{port}"])
        assert (await proxy.get("/first")).status == 200  # (the first connection starts at the black hole)
        with connects(monkeypatch) as begun:
            for burst in range(3):
                replies = await asyncio.gather(*(proxy.get(f"/rd{burst}-{i}") for i in range(10)))
                assert {r.status for r in replies} == {200}, replies
                await asyncio.sleep(0)
            sequential = [(await proxy.get(f"/seq{i}")).body for i in range(9)]
        assert sorted(sequential) == sorted([b"r5", b"r6", b"r7"] * 3), sequential
        counts = [len(s.paths()) for s in servers]
        assert sum(counts) == 40 and min(counts) >= 10, counts
        assert "127.0.0.3" not in begun, begun


async def test_a_live_address_only_slower_to_answer_than_the_winner_keeps_its_turn(
        make_proxy: MakeProxy, names: Resolver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two live addresses 60 ms away behind a 100 ms connect timeout: the stagger (50 ms) starts
    the second before the first answers, and the first wins. The second was marked failed for
    having lost, so every new connection started at the first again (20 requests: 20 and 0)."""
    loop = asyncio.get_running_loop()
    real = loop.sock_connect

    async def far(sock: socket.socket, address: Any) -> None:
        await asyncio.sleep(0.06)
        await real(sock, address)

    async with origins(("127.0.0.2", "A"), ("127.0.0.3", "B")) as (port, servers):
        for server in servers:
            server.close = True
        names.answers["far.cachegate.test"] = ["127.0.0.2", "127.0.0.3"]
        proxy = await make_proxy(config="cache: {memory: 16MB}\nupstream: {retries: 0, timeouts: {connect: 100ms}}\n",
                                 upstreams=[f"http://far.cachegate.test:{port}"])
        monkeypatch.setattr(loop, "sock_connect", far)
        served = collections.Counter([(await proxy.get(f"/far{i}")).body for i in range(20)])
        assert served[b"A"] >= 5 and served[b"B"] >= 5, served


# -- an IPv6 zone -----------------------------------------------------------------------------

def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
async def test_an_ipv6_zone_never_goes_out_in_host(make_proxy: MakeProxy) -> None:
    """RFC 6874 §4: ``http://[::1%25lo]:P`` sent ``Host: [::1%25lo]:P`` (health checks always,
    requests with ``preserve_host: false``); a strict origin (cachegate itself) answers 400, and
    its health checks took the upstream out."""
    origin = Tagged("v6", strict=True)
    origin.server = await asyncio.start_server(origin.handle, "::1", 0)
    port = origin.server.sockets[0].getsockname()[1]
    try:
        pool = HostPool(URL(f"http://[::1%25lo]:{port}"), 2, None, 2.0)
        assert pool.host_header == f"[::1]:{port}"
        await pool.close()
        proxy = await make_proxy(
            config="cache: {memory: 16MB}\nupstream: {preserve_host: false, health: {path: /healthz, "
                   "interval: 100ms, timeout: 1s, healthy: 1, unhealthy: 1}}\n",
            upstreams=[f"http://[::1%25lo]:{port}"])
        reply = await proxy.get("/zone")
        assert (reply.status, reply.body) == (200, b"v6"), reply
        await asyncio.sleep(0.3)
        assert proxy.runtime.pool.snapshot()[0]["health_check"]["last_error"] is None
        assert {host for _, host in origin.seen} == {f"[::1]:{port}"}, origin.seen
    finally:
        await origin.stop()
