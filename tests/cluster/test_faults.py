"""Redis down at start, slow, killed and restarted empty: nodes keep serving from their own tiers,
purges answer 503 with nothing applied anywhere, and the nodes reconnect and catch up by themselves."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.cluster.nodes import Nodes, admin_json, cluster_view, metrics, purge, wait_until
from tests.cluster.redis_server import RedisServer
from tests.cluster.relay import Relay
from tests.cluster.test_bus import versioned
from tests.harness import Origin
from tests.storage.procs import HOST, ProxyProcess

pytestmark = pytest.mark.slow


async def ready(proc: ProxyProcess) -> bool:
    view = await cluster_view(proc)
    return bool(view["connected"] and view["state"] == "ready")


async def post(proc: ProxyProcess, path: str) -> int:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s, \
            s.post(proc.url + path, data=b"x", headers={"Host": HOST}) as r:
        await r.read()
        return r.status


async def test_nodes_serve_locally_through_a_slow_dead_and_emptied_redis_and_catch_up_when_it_is_back(
        origin: Origin, tmp_path: Path, own_redis: RedisServer) -> None:
    versioned(origin, "/p")
    versioned(origin, "/keep")
    nodes = Nodes(str(tmp_path), origin.url, own_redis.url, timeout="0.5s")
    try:
        a, b = await asyncio.gather(nodes.start("a"), nodes.start("b"))
        for proc in (a, b):
            for path in ("/p", "/keep"):
                await proc.get(path)
                await wait_until(lambda p=proc, q=path: _hit(p, q))
        old = {(n, path): (await proc.get(path)).body for n, proc in (("a", a), ("b", b))
               for path in ("/p", "/keep")}

        # Slow: Redis answers nothing for 2.5 s. Purges fail fast, hits go on.
        assert own_redis.command("CLIENT", "PAUSE", "2500", "ALL").startswith(b"+OK")
        status, answer = await purge(a, urls=[f"http://{HOST}/p"])
        assert status == 503, answer
        assert f"Redis at {own_redis.url} is not reachable" in answer["error"]
        assert "nothing was purged on any node" in answer["error"]
        for n, proc in (("a", a), ("b", b)):  # nothing half-applied: a still serves what it had
            r = await proc.get("/p")
            assert (r.x_cache, r.body) == ("HIT", old[(n, "/p")])
        await wait_until(lambda: ready(a), wait=20)
        await wait_until(lambda: ready(b), wait=20)  # both caught up when it dies (one still
        # catching up then: test_stream's table of caught_up_when_lost)

        # Dead: the same, and /cluster, /healthz and the metrics say so.
        own_redis.kill()
        status, answer = await purge(a, tags=["x"])
        assert status == 503, answer
        view = await cluster_view(a)
        assert view["connected"] is False and view["state"] == "disconnected"
        assert own_redis.url in view["reason"]
        status, health = await admin_json(a, "GET", "/healthz")
        assert status == 200 and health["cluster"] == "disconnected" and "unreachable" in health["reason"]
        assert (await metrics(a))[("cachegate_cluster_connected", ())] == 0
        # An unsafe method on b meanwhile: b drops /p at once, a hears of it when Redis is back.
        assert await post(b, "/p") == 200
        assert (await b.get("/p")).body != old[("b", "/p")]
        r = await a.get("/p")
        assert (r.x_cache, r.body) == ("HIT", old[("a", "/p")])

        # Back, with its data gone: both reconnect by themselves; nothing to flush (both were
        # caught up when it went), and b's invalidation reaches a.
        own_redis.start()
        await wait_until(lambda: ready(a), wait=20)
        await wait_until(lambda: ready(b), wait=20)
        await wait_until(lambda: _body_changed(a, "/p", old[("a", "/p")]))
        assert (await a.get("/keep")).body == old[("a", "/keep")]
        assert (await b.get("/keep")).body == old[("b", "/keep")]
        await wait_until(lambda: _live_count(a, 2))
        status, answer = await purge(a, urls=[f"http://{HOST}/keep"])
        assert status == 200 and set(answer["nodes"]) == {"a", "b"}, answer
        assert (await b.get("/keep")).body != old[("b", "/keep")]
        m = await metrics(a)
        assert m[("cachegate_cluster_connected", ())] == 1
        assert m[("cachegate_cluster_bus_total", (("event", "unavailable"),))] == 2
        assert m[("cachegate_cluster_full_purges_total", (("reason", "redis-lost-data"),))] == 0
    finally:
        await nodes.stop_all()


async def test_redis_down_at_start_is_a_clear_error_unless_the_cluster_is_not_required(
        origin: Origin, tmp_path: Path, own_redis: RedisServer) -> None:
    versioned(origin, "/p")
    own_redis.stop()
    nodes = Nodes(str(tmp_path), origin.url, own_redis.url, timeout="0.3s")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", nodes.config("a"), cwd=str(tmp_path / "a"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ))
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert f"cannot reach Redis at {own_redis.url}" in err.decode()
    assert "cluster.required: false" in err.decode()

    try:
        b = await nodes.start("b", required=False)
        assert (await b.get("/p")).status == 200
        assert (await b.get("/p")).x_cache == "HIT"
        status, health = await admin_json(b, "GET", "/healthz")
        assert status == 200 and health["cluster"] == "disconnected"
        assert (await purge(b, urls=[f"http://{HOST}/p"]))[0] == 503
        own_redis.start()
        await wait_until(lambda: ready(b), wait=20)
        status, answer = await purge(b, urls=[f"http://{HOST}/p"])
        assert status == 200 and answer["nodes"] == {"b": {"purged": 1}}, answer
    finally:
        await nodes.stop_all()


async def _hit(proc: ProxyProcess, path: str) -> bool:
    return (await proc.get(path)).x_cache == "HIT"


async def _body_changed(proc: ProxyProcess, path: str, old: bytes) -> bool:
    return (await proc.get(path)).body != old


async def _live_count(proc: ProxyProcess, n: int) -> bool:
    return sum(1 for x in (await cluster_view(proc))["nodes"] if x["live"]) == n


async def test_an_invalidation_made_while_redis_is_away_leaves_the_shared_tier_when_it_is_back(
        origin: Origin, tmp_path: Path, own_redis: RedisServer) -> None:
    versioned(origin, "/p")
    nodes = Nodes(str(tmp_path), origin.url, own_redis.url, shared_cache=True, timeout="0.5s")
    try:
        a, b = await asyncio.gather(nodes.start("a"), nodes.start("b"))
        r = await a.get("/p")
        assert (r.body, r.x_cache) == (b"v1", "MISS")

        async def written() -> bool:
            return (await metrics(a))[("cachegate_cluster_shared_total", (("event", "written"),))] == 1

        await wait_until(written)  # /p v1 is in the shared tier

        # Redis stops answering: a's POST /p is applied on a at once and kept for later.
        assert own_redis.command("CLIENT", "PAUSE", "3000", "ALL").startswith(b"+OK")
        await asyncio.sleep(0.2)
        assert await post(a, "/p") == 200
        await wait_until(lambda: ready(a), wait=20)
        await wait_until(lambda: ready(b), wait=20)

        async def applied_by_b() -> bool:
            return any(n["node"] == "b" and n["applied_seq"] >= 1 for n in (await cluster_view(b))["nodes"])

        await wait_until(applied_by_b)  # b has read a's invalidation from the stream
        for name in ("b", "a"):  # neither takes v1 back from the shared tier
            r = await nodes[name].get("/p")
            assert r.body != b"v1", (name, r.x_cache)
    finally:
        await nodes.stop_all()



async def test_an_invalidation_redis_refuses_while_connected_is_sent_later_and_not_undone_meanwhile(
        origin: Origin, tmp_path: Path, own_redis: RedisServer) -> None:
    """Redis refuses the invalidation's writes while it answers everything else (here its shared
    purge counter is damaged; a full Redis with noeviction does the same, less predictably). The
    node that made it does not take the shared tier's old copy back meanwhile (one process, and
    each worker of one with --workers 2), and it is sent while the connection stays up."""
    versioned(origin, "/p")
    versioned(origin, "/q")
    nodes = Nodes(str(tmp_path), origin.url, own_redis.url, shared_cache=True, timeout="0.5s")
    try:
        a, c = await asyncio.gather(nodes.start("a"), nodes.start("c", "--workers", "2"))
        for path in ("/p", "/q"):
            r = await a.get(path)
            assert (r.body, r.x_cache) == (b"v1", "MISS")

        async def written() -> bool:
            return (await metrics(a))[("cachegate_cluster_shared_total", (("event", "written"),))] == 2

        await wait_until(written)  # /p and /q v1 are in the shared tier
        counter = f"{nodes.namespace}:l2:purges"
        good = own_redis.command("GET", counter).split(b"\r\n")[1].decode()
        assert own_redis.command("SET", counter, "damaged").startswith(b"+OK")  # shared purges fail

        assert await post(a, "/p") == 200  # applied on a, kept for later
        r = await a.get("/p")
        assert r.body != b"v1", "a took back from the shared tier what its own invalidation removed"
        assert await post(c, "/q") == 200
        for _ in range(4):  # each of c's workers, told of the outbox in their supervisor
            r = await c.get("/q")
            assert r.body != b"v1", f"a worker of c took back what c's invalidation removed ({r.x_cache})"
        assert (await cluster_view(a))["state"] == "ready"

        assert own_redis.command("XLEN", f"{nodes.namespace}:purges").startswith(b":0")
        assert own_redis.command("SET", counter, good).startswith(b"+OK")  # mended: sent by itself

        async def sent() -> bool:
            return own_redis.command("XLEN", f"{nodes.namespace}:purges").startswith(b":2")

        await wait_until(sent, wait=5)
        await wait_until(lambda: _applied(a, 2), wait=5)
        await wait_until(lambda: _applied(c, 2), wait=5)
        for name, path in (("a", "/p"), ("c", "/q"), ("a", "/q"), ("c", "/p")):
            for _ in range(3):  # each of c's workers
                r = await nodes[name].get(path)
                assert r.body != b"v1", (name, path, r.x_cache)
        assert (await metrics(a))[("cachegate_cluster_bus_total", (("event", "reconnects"),))] == 0
    finally:
        await nodes.stop_all()


async def _applied(proc: ProxyProcess, seq: int) -> bool:
    view = await cluster_view(proc)
    return any(n["node"] == view["node"] and n["applied_seq"] >= seq for n in view["nodes"])


async def test_a_redis_that_wants_a_password_the_node_lacks_is_said_so_in_its_log_and_answers(
        origin: Origin, tmp_path: Path, own_redis: RedisServer) -> None:
    """Redis restarted with a password the node does not know: its log said only "unreachable:
    Connection closed by server" once, as Redis went, and /healthz and purges called it
    unreachable. A reason that comes up while it is cut off is logged (once: not at each attempt),
    and every answer names the password; a node given a wrong one does not start, and says so."""
    versioned(origin, "/p")
    nodes = Nodes(str(tmp_path), origin.url, own_redis.url, timeout="0.5s")
    try:
        a = await nodes.start("a", with_log=True)
        await wait_until(lambda: ready(a))
        await a.get("/p")
        own_redis.kill()
        own_redis.args = ["--requirepass", "s3cret-pw"]
        own_redis.start()
        needs = f"Redis at {own_redis.url} needs a password, and cluster.redis gives none"
        await a.wait_for(lambda: any(needs in line for line in a.lines), wait=15)
        await asyncio.sleep(2.5)  # two attempts more, at least
        assert [line for line in a.lines if needs in line and "ERROR" in line and "still cut off" in line] \
            == [line for line in a.lines if needs in line], a.lines
        assert sum(needs in line for line in a.lines) == 1, a.lines
        status, health = await admin_json(a, "GET", "/healthz")
        assert status == 200 and needs in health["reason"], health
        assert needs in (await cluster_view(a))["reason"]
        status, answer = await purge(a, urls=[f"http://{HOST}/p"])
        assert status == 503 and needs in answer["error"], answer

        err = await nodes.refused("b", redis=own_redis.url.replace("redis://", "redis://:nope-pw@"))
        assert "refused the password (or user) in cluster.redis" in err, err
        assert "nope-pw" not in err
    finally:
        await nodes.stop_all()


async def test_a_redis_restored_from_an_older_snapshot_does_not_bring_purged_objects_back(
        origin: Origin, tmp_path: Path, own_redis: RedisServer) -> None:
    """The snapshot holds the shared tier from before a purge that answered 200: the node sees
    that Redis lost purges, and neither its local cache nor the shared tier's old content is
    served again."""
    versioned(origin, "/p")
    nodes = Nodes(str(tmp_path), origin.url, own_redis.url, shared_cache=True, timeout="0.5s")
    try:
        a = await nodes.start("a")
        assert (await a.get("/p")).body == b"v1"

        async def written() -> bool:
            return (await metrics(a))[("cachegate_cluster_shared_total", (("event", "written"),))] == 1

        await wait_until(written)
        assert own_redis.command("SAVE").startswith(b"+OK")  # /p v1 in the snapshot, no purge yet
        status, answer = await purge(a, urls=[f"http://{HOST}/p"])
        assert status == 200, answer
        own_redis.kill()
        own_redis.start()  # from the snapshot

        async def flushed() -> bool:
            m = await metrics(a)
            return m[("cachegate_cluster_full_purges_total", (("reason", "redis-lost-data"),))] == 1

        await wait_until(flushed, wait=10)
        await wait_until(lambda: ready(a), wait=10)
        r = await a.get("/p")
        assert r.body != b"v1", f"the purged v1 came back ({r.x_cache})"
    finally:
        await nodes.stop_all()


async def test_a_node_stopped_past_its_heartbeat_then_redis_restarted_empty_purges_its_cache(
        origin: Origin, tmp_path: Path, own_redis: RedisServer) -> None:
    """b is stopped (SIGSTOP) past its heartbeat's TTL, a purge answers 200 without it, Redis
    restarts empty: b cannot know what it missed, so it purges its whole local cache."""
    versioned(origin, "/p")
    nodes = Nodes(str(tmp_path), origin.url, own_redis.url, timeout="0.5s")
    try:
        a, b = await asyncio.gather(nodes.start("a"), nodes.start("b"))
        await a.get("/p")
        assert (await b.get("/p")).body == b"v2"
        await wait_until(lambda: _hit(b, "/p"))
        b.send(signal.SIGSTOP)
        try:
            await wait_until(lambda: _live_count(a, 1), wait=5)
            status, answer = await purge(a, urls=[f"http://{HOST}/p"])
            assert status == 200 and answer["nodes"] == {"a": {"purged": 1}}, answer
            own_redis.kill()
            own_redis.start()
        finally:
            b.send(signal.SIGCONT)

        async def reconnected() -> bool:
            m = await metrics(b)
            return m[("cachegate_cluster_bus_total", (("event", "reconnects"),))] >= 1 and await ready(b)

        await wait_until(reconnected, wait=10)
        r = await b.get("/p")
        assert r.body != b"v2", f"b serves what a purge that answered 200 without it removed ({r.x_cache})"
        m = await metrics(b)
        assert m[("cachegate_cluster_full_purges_total", (("reason", "redis-lost-data"),))] == 1
    finally:
        await nodes.stop_all()


async def test_a_node_stopped_past_its_heartbeat_serves_nothing_purged_meanwhile_once_resumed(
        origin: Origin, tmp_path: Path, own_redis: RedisServer) -> None:
    """b is stopped (SIGSTOP) past its heartbeat's TTL and a purge answers 200 without it. Once
    resumed, b answers neither the requests that queued up meanwhile nor later ones from what was
    purged: it notices its heartbeat lapsed and catches up from the stream first (no full purge)."""
    versioned(origin, "/p")
    versioned(origin, "/keep")
    nodes = Nodes(str(tmp_path), origin.url, own_redis.url, timeout="0.5s")
    try:
        a, b = await asyncio.gather(nodes.start("a"), nodes.start("b"))
        await a.get("/keep")
        for path in ("/p", "/keep"):
            await b.get(path)
            await wait_until(lambda p=path: _hit(b, p))
        old = (await b.get("/p")).body
        b.send(signal.SIGSTOP)
        try:
            await wait_until(lambda: _live_count(a, 1), wait=5)
            status, answer = await purge(a, urls=[f"http://{HOST}/p"])
            assert status == 200 and set(answer["nodes"]) == {"a"}, answer
            queued = [asyncio.ensure_future(b.get("/p")) for _ in range(3)]
            await asyncio.sleep(0.2)
        finally:
            b.send(signal.SIGCONT)
        for r in [*await asyncio.gather(*queued), await b.get("/p")]:
            assert r.body != old, f"b served what a purge that answered 200 without it removed ({r.x_cache})"
        assert (await b.get("/keep")).x_cache == "HIT"  # caught up, not purged everything
        await wait_until(lambda: ready(b))
        m = await metrics(b)
        assert sum(v for (name, _), v in m.items() if name == "cachegate_cluster_full_purges_total") == 0
    finally:
        await nodes.stop_all()


async def test_a_node_stopped_while_cut_off_from_redis_serves_nothing_purged_meanwhile_once_resumed(
        origin: Origin, tmp_path: Path, own_redis: RedisServer) -> None:
    """Redis dies and b notices (it serves from its tiers); b is then stopped (SIGSTOP) past its
    heartbeat's TTL, Redis comes back empty, and a purge answers 200 without b (no longer vouched
    for). Once resumed, b answers neither the requests that queued up meanwhile nor later ones from
    what was purged: it notices the stall, reconnects at once and catches up first (it served them
    as hits before). Redis restarted empty while it was not counted live: it cannot know whether
    it restarted more than once, so it purges its whole local cache."""
    versioned(origin, "/p")
    nodes = Nodes(str(tmp_path), origin.url, own_redis.url, timeout="0.5s")
    try:
        a, b = await asyncio.gather(nodes.start("a"), nodes.start("b"))
        await a.get("/p")
        old = (await b.get("/p")).body
        await wait_until(lambda: _hit(b, "/p"))
        own_redis.kill()
        await wait_until(lambda: _cut_off(b), wait=10)
        b.send(signal.SIGSTOP)
        try:
            own_redis.start()
            await wait_until(lambda: ready(a), wait=20)
            await asyncio.sleep(2.5)  # b, which Redis forgot, is vouched for a heartbeat TTL (2 s)

            async def purged_without_b() -> bool:
                status, answer = await purge(a, urls=[f"http://{HOST}/p"])
                return status == 200 and set(answer["nodes"]) == {"a"}

            await wait_until(purged_without_b, wait=15)
            queued = [asyncio.ensure_future(b.get("/p")) for _ in range(3)]
            await asyncio.sleep(0.2)
        finally:
            b.send(signal.SIGCONT)
        for r in [*await asyncio.gather(*queued), await b.get("/p")]:
            assert r.body != old, f"b served what a purge that answered 200 without it removed ({r.x_cache})"
        await wait_until(lambda: ready(b))
        m = await metrics(b)
        assert m[("cachegate_cluster_full_purges_total", (("reason", "redis-lost-data"),))] == 1
    finally:
        await nodes.stop_all()


async def test_the_workers_of_a_node_whose_supervisor_is_stopped_while_cut_off_from_redis_wait_for_it(
        origin: Origin, tmp_path: Path, own_redis: RedisServer) -> None:
    """As above with --workers 2 and the supervisor stopped alone: its workers, told when its last
    tick expires, hold hits once it has until it runs again and has caught up."""
    versioned(origin, "/p")
    nodes = Nodes(str(tmp_path), origin.url, own_redis.url, timeout="0.5s")
    try:
        a, c = await asyncio.gather(nodes.start("a"), nodes.start("c", "--workers", "2"))
        await a.get("/p")
        old = (await c.get("/p")).body
        await wait_until(lambda: _hit(c, "/p"))
        own_redis.kill()
        await wait_until(lambda: _cut_off(c), wait=10)
        c.send(signal.SIGSTOP)  # the supervisor alone
        try:
            own_redis.start()
            await wait_until(lambda: ready(a), wait=20)
            await asyncio.sleep(2.5)  # c, which Redis forgot, is vouched for a heartbeat TTL (2 s)

            async def purged_without_c() -> bool:
                status, answer = await purge(a, urls=[f"http://{HOST}/p"])
                return status == 200 and set(answer["nodes"]) == {"a"}

            await wait_until(purged_without_c, wait=15)
            waiting = [asyncio.ensure_future(c.get("/p")) for _ in range(2)]
            await asyncio.sleep(0.3)
            # Held, or answered by the origin (a miss, as in a worker whose lookup found nothing
            # or on a loaded machine): never the purged copy, nor an error.
            early = [w.result() for w in waiting if w.done()]
            assert all(r.status == 200 and r.body != old for r in early), [(r.status, r.x_cache) for r in early]
        finally:
            c.send(signal.SIGCONT)
        for r in [*await asyncio.gather(*waiting), await c.get("/p")]:
            assert r.body != old, f"c served what a purge that answered 200 without it removed ({r.x_cache})"
    finally:
        await nodes.stop_all()


async def test_the_workers_of_a_node_whose_supervisor_is_stopped_past_its_heartbeat_wait_for_it(
        origin: Origin, tmp_path: Path, own_redis: RedisServer) -> None:
    """With --workers 2 the node's member is the supervisor: stopped past its heartbeat's TTL, a
    purge answers 200 without the node, and its workers, which go on running, hold hits until it
    runs again and has caught up."""
    versioned(origin, "/p")
    # c's heartbeat is long, so that its workers start and serve before its supervisor's first
    # heartbeat after it joined, and it is stopped before that heartbeat: the workers know when
    # its last one expires from the moment they start (it tells them as their channel opens).
    # A heartbeat's TTL is the longest of three heartbeats, 2 s, and a heartbeat plus two
    # cluster.timeouts: 6 s for c, 4.3 s for a (whose slower heartbeats on a loaded machine
    # then stay far inside it).
    nodes = Nodes(str(tmp_path), origin.url, own_redis.url, timeout="2s")
    try:
        a, c = await asyncio.gather(nodes.start("a"), nodes.start("c", "--workers", "2", heartbeat="2s"))
        await a.get("/p")
        old = (await c.get("/p")).body
        await wait_until(lambda: _hit(c, "/p"))
        c.send(signal.SIGSTOP)  # the supervisor alone
        try:
            await wait_until(lambda: _live_count(a, 1), wait=10)
            status, answer = await purge(a, urls=[f"http://{HOST}/p"])
            assert status == 200 and set(answer["nodes"]) == {"a"}, answer
            waiting = [asyncio.ensure_future(c.get("/p")) for _ in range(2)]
            await asyncio.sleep(0.3)
            # Held, or answered by the origin (a miss, as in a worker whose lookup found nothing
            # or on a loaded machine): never the purged copy, nor an error.
            early = [w.result() for w in waiting if w.done()]
            assert all(r.status == 200 and r.body != old for r in early), [(r.status, r.x_cache) for r in early]
        finally:
            c.send(signal.SIGCONT)
        for r in [*await asyncio.gather(*waiting), await c.get("/p")]:
            assert r.body != old, f"c served what a purge that answered 200 without it removed ({r.x_cache})"
    finally:
        await nodes.stop_all()


class Link(Relay):
    """A TCP proxy in front of Redis that can be held closed (connections refused, and those up
    cut), as a node's slow way back after Redis restarted."""

    def __init__(self, redis: RedisServer) -> None:
        super().__init__(redis.port)
        self.closed = False
        self.writers: set[asyncio.StreamWriter] = set()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if self.closed:
            cw.close()
            return
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            cw.close()
            return
        self.writers.update((cw, sw))
        await asyncio.gather(self._forward(cr, sw), self._forward(sr, cw))
        self.writers.difference_update((cw, sw))

    def close_all(self) -> None:
        self.closed = True
        for w in list(self.writers):
            w.close()

    async def stop(self) -> None:
        self.close_all()
        await self.close()


async def test_a_purge_right_after_redis_restarted_empty_waits_for_a_node_not_back_yet(
        origin: Origin, tmp_path: Path, own_redis: RedisServer) -> None:
    """Redis restarts empty and b's way back to it is slower than a's: a no longer finds b in Redis,
    but saw it live before. A purge on a meanwhile answers 202 naming b (which still serves the
    object: it has not read the purge), never 200; b applies it once it is back."""
    versioned(origin, "/p")
    link = Link(own_redis)
    late_url = await link.start()
    # heartbeat 1 s, timeout 0.5 s: a heartbeat's TTL is 3 s, longer than b's way back (2 s)
    nodes = Nodes(str(tmp_path), origin.url, own_redis.url, timeout="0.5s", heartbeat="1s", ack_timeout="1s")
    try:
        a, b = await asyncio.gather(nodes.start("a"), nodes.start("b", redis=late_url))
        await a.get("/p")
        old = (await b.get("/p")).body
        await wait_until(lambda: _hit(b, "/p"))
        await wait_until(lambda: _live_count(a, 2))
        await asyncio.sleep(1.5)  # a has read who is live since b's start

        own_redis.kill()
        link.close_all()
        for proc in (a, b):
            await wait_until(lambda p=proc: _disconnected(p), wait=10)
        own_redis.start()
        await wait_until(lambda: ready(a), wait=10)
        status, answer = await purge(a, urls=[f"http://{HOST}/p"])
        assert status == 202 and answer["missing"] == ["b"] and set(answer["nodes"]) == {"a"}, answer
        r = await b.get("/p")
        assert (r.x_cache, r.body) == ("HIT", old)  # why the purge could not answer 200

        link.closed = False
        await wait_until(lambda: ready(b), wait=10)
        r = await b.get("/p")
        assert r.body != old, f"b serves what the purge removed ({r.x_cache})"
        await wait_until(lambda: _live_count(a, 2))
        status, answer = await purge(a, urls=[f"http://{HOST}/p"])
        assert status == 200 and set(answer["nodes"]) == {"a", "b"}, answer
    finally:
        await nodes.stop_all()
        await link.stop()


async def _disconnected(proc: ProxyProcess) -> bool:
    return not (await cluster_view(proc))["connected"]


async def test_misses_do_not_wait_for_a_hung_redis_once_the_node_is_cut_off_from_it(
        origin: Origin, tmp_path: Path, own_redis: RedisServer) -> None:
    """Redis stopped (SIGSTOP): once the node says it is disconnected, its misses go to the origin
    without asking the shared tier (one process, and each worker of one with --workers 2). Each
    one's lookup waited cluster.timeout and failed, for the whole outage."""
    paths = {name: [f"/{name}{i}" for i in range(4)] for name in ("a", "c")}
    for path in paths["a"] + paths["c"]:
        versioned(origin, path)
    nodes = Nodes(str(tmp_path), origin.url, own_redis.url, shared_cache=True, timeout="1s")
    assert own_redis.proc is not None
    try:
        a, c = await asyncio.gather(nodes.start("a"), nodes.start("c", "--workers", "2"))
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        for proc in (a, c):
            await wait_until(lambda p=proc: _cut_off(p), wait=15)  # type: ignore[misc]
        await asyncio.sleep(0.3)  # (c's supervisor tells its workers: a local message, under way)
        skipped, error = ("cachegate_cluster_shared_total", (("event", "skipped"),)), \
            ("cachegate_cluster_shared_total", (("event", "error"),))
        for name, proc in (("a", a), ("c", c)):
            before = await metrics(proc)
            for path in paths[name]:
                r = await proc.get(path)
                assert (r.status, r.body, r.x_cache) == (200, b"v1", "MISS")
            after = await metrics(proc)
            assert after[error] == before[error], "a miss asked the hung Redis (and waited its timeout)"
            assert after[skipped] - before.get(skipped, 0) == len(paths[name])
        assert own_redis.proc.poll() is None  # (still stopped: every answer came without it)
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
        await nodes.stop_all()


async def _cut_off(proc: ProxyProcess) -> bool:
    view = await cluster_view(proc)
    return not view["connected"] and view["state"] == "disconnected"


async def test_an_invalidation_through_a_worker_whose_supervisor_is_stopped_answers_and_reaches_every_node(
        origin: Origin, tmp_path: Path, own_redis: RedisServer) -> None:
    """With --workers 2 an unsafe method's invalidation is the supervisor's to make (the node's
    member): stopped, it left the client without its answer for as long as it was stopped. The
    worker now waits ``consistency_wait`` for it, then removes what the invalidation covers from its
    node's disk, shared memory and the shared tier itself and answers. The other nodes keep their
    own copies until the supervisor runs again and makes the invalidation it was sent."""
    versioned(origin, "/p")
    hold = 3.0  # consistency_wait (10 s by default): the POST's wait, then the GET's, below
    nodes = Nodes(str(tmp_path), origin.url, own_redis.url, top=f"consistency_wait: {hold:g}s\n",
                  timeout="0.5s", shared_cache=True)
    try:
        a, c = await asyncio.gather(nodes.start("a"), nodes.start("c", "--workers", "2"))
        old = (await a.get("/p")).body
        assert (await c.get("/p")).body == old  # from the shared tier
        await wait_until(lambda: _hit(c, "/p"))
        c.send(signal.SIGSTOP)  # the supervisor alone
        try:
            posted = asyncio.ensure_future(post(c, "/p"))
            done, _ = await asyncio.wait({posted}, timeout=3 * hold)
            assert posted in done, "the POST was not answered while the supervisor was stopped"
            assert posted.result() == 200
            # Neither c's tiers nor the shared tier hold it: c fetches it anew (after the wait
            # for its lapsed heartbeat, ``hold`` at most); a still serves its own copy.
            assert (await c.get("/p")).body != old
            assert (await a.get("/p")).body == old
        finally:
            c.send(signal.SIGCONT)
        await wait_until(lambda: _body_changed(a, "/p", old), wait=20)
    finally:
        await nodes.stop_all()
