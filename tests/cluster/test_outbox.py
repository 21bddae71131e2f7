"""The outbox across a node's restart: the invalidations it made while Redis was away, which no one
can retry, are kept in its cache directory, read at start and sent after the catch-up (to whatever
Redis it then points at); a node without a disk cache says at stop which it lost."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from pathlib import Path

import pytest

from proxy.cluster import outbox
from proxy.cluster.node import ClusterNode
from proxy.cluster.outbox import OUTBOX_FILE, OutboxFile, Queued
from proxy.cluster.redis_io import Names
from proxy.cluster.settings import ClusterSettings
from proxy.purge import PurgeSpec
from tests.cluster.nodes import Nodes, cluster_view, metrics, wait_until
from tests.cluster.redis_server import RedisServer
from tests.cluster.test_bus import versioned
from tests.cluster.test_faults import post, ready
from tests.harness import Origin
from tests.storage.procs import HOST, ProxyProcess

pytestmark = pytest.mark.slow

BUS = "cachegate_cluster_bus_total"


async def _cut_off(proc: ProxyProcess) -> bool:
    return (await cluster_view(proc))["connected"] is False


async def _outbox(proc: ProxyProcess) -> float:
    return (await metrics(proc))[("cachegate_cluster_outbox", ())]


def _said(proc: ProxyProcess, *words: str) -> list[str]:
    return [line for line in proc.lines if all(w in line for w in words)]


async def test_an_invalidation_queued_while_redis_is_away_reaches_the_others_after_the_node_restarts(
        origin: Origin, tmp_path: Path, own_redis: RedisServer) -> None:
    """Redis down; POST /p on b (applied on b, queued in its outbox); b stopped (SIGTERM) and
    started again, Redis back: a no longer serves the copy b's invalidation covered. Before, the
    outbox lived in memory alone: a served the old copy as a hit until it expired, and nothing
    was logged or counted. b's workers, told at their start that invalidations wait, are told
    once they are sent: they use the shared tier again."""
    versioned(origin, "/p")
    versioned(origin, "/keep")
    q = versioned(origin, "/q")
    nodes = Nodes(str(tmp_path), origin.url, own_redis.url, timeout="0.5s", shared_cache=True)
    b_args = ("--workers", "2")
    try:
        a, b = await asyncio.gather(nodes.start("a"), nodes.start("b", *b_args, with_log=True, required=False))
        for proc in (a, b):
            for path in ("/p", "/keep"):
                await proc.get(path)
        old = {(proc.url, path): (await proc.get(path)).body for proc in (a, b) for path in ("/p", "/keep")}

        own_redis.kill()
        await wait_until(lambda: _cut_off(a), wait=20)
        await wait_until(lambda: _cut_off(b), wait=20)
        assert await post(b, "/p") == 200
        assert (await b.get("/p")).body != old[(b.url, "/p")]
        r = await a.get("/p")
        assert (r.x_cache, r.body) == ("HIT", old[(a.url, "/p")])
        assert await _outbox(b) == 1
        kept = tmp_path / "b" / "cache" / OUTBOX_FILE
        await wait_until(lambda: asyncio.sleep(0, kept.exists()))  # written as it was queued

        b.lines.clear()
        assert await b.stop() == 0
        assert _said(b, "WARNING", "1 invalidation(s) made here were not sent", "kept in", OUTBOX_FILE)
        assert kept.exists()

        b = await nodes.start("b", *b_args, with_log=True, required=False)  # Redis still away
        assert _said(b, "1 invalidation(s) made here before this node stopped were not sent")
        assert await _outbox(b) == 1
        own_redis.start()  # empty: a, caught up when it went, keeps its cache (and its old /p)
        await wait_until(lambda: ready(b), wait=20)

        async def fresh_on_a() -> bool:
            return (await a.get("/p")).body != old[(a.url, "/p")]

        await wait_until(fresh_on_a)
        assert (await a.get("/keep")).body == old[(a.url, "/keep")]  # nothing else was purged
        await wait_until(lambda: asyncio.sleep(0, not kept.exists()))  # (removed once empty)
        assert await _outbox(b) == 0
        m = await metrics(b)
        assert m[(BUS, (("event", "sent"),))] == 1 and m[(BUS, (("event", "outbox_dropped"),))] == 0

        written_key = ("cachegate_cluster_shared_total", (("event", "written"),))
        before = (await metrics(a))[written_key]
        assert (await a.get("/q")).body == b"v1"

        async def written() -> bool:
            return (await metrics(a))[written_key] > before

        await wait_until(written)
        for _ in range(4):  # each of b's workers takes a's fill from the shared tier
            assert (await b.get("/q")).body == b"v1"
        assert q == [1]
    finally:
        await nodes.stop_all()


async def test_an_outbox_outlives_a_kill_and_goes_to_the_redis_the_node_is_repointed_to(
        origin: Origin, tmp_path: Path, own_redis: RedisServer) -> None:
    """A failover: b's Redis dies with an invalidation queued, b is killed (-9) and started again
    pointing at another Redis and namespace; what its file held reaches the new stream, in order,
    and an entry of the file that cannot be read is counted and said, not sent."""
    versioned(origin, "/p")
    versioned(origin, "/q")
    nodes = Nodes(str(tmp_path), origin.url, own_redis.url, timeout="0.5s")
    other = RedisServer(str(tmp_path / "redis2"))
    other.start()
    try:
        b = await nodes.start("b", required=False)
        await wait_until(lambda: ready(b), wait=20)
        own_redis.kill()
        await wait_until(lambda: _cut_off(b), wait=20)
        assert await post(b, "/p") == 200
        assert await post(b, "/q") == 200
        kept = tmp_path / "b" / "cache" / OUTBOX_FILE

        async def both_kept() -> bool:
            try:
                return len(json.loads(kept.read_text())["invalidations"]) == 2
            except (OSError, ValueError):
                return False

        await wait_until(both_kept)
        await b.stop(signal.SIGKILL)
        data = json.loads(kept.read_text())
        data["invalidations"].append({"at": "yesterday", "spec": {"urls": [f"http://{HOST}/x"]}})
        kept.write_text(json.dumps(data))

        namespace = "repointed"
        b = await nodes.start("b", with_log=True, required=False, redis=other.url, namespace=namespace)
        await wait_until(lambda: ready(b), wait=20)

        def stream() -> bytes:
            return other.command("XRANGE", f"{namespace}:purges", "-", "+")

        await wait_until(lambda: asyncio.sleep(0, stream().count(b"http://") == 2))
        sent = stream()
        assert sent.index(f"http://{HOST}/p".encode()) < sent.index(f"http://{HOST}/q".encode())
        assert b"/x" not in sent
        m = await metrics(b)
        assert m[(BUS, (("event", "outbox_dropped"),))] == 1
        assert _said(b, "ERROR", "1 invalidation(s) of", "dropped (1 unreadable")
        await wait_until(lambda: asyncio.sleep(0, not kept.exists()))
        assert await _outbox(b) == 0
    finally:
        await nodes.stop_all()
        other.close()


async def test_a_node_without_a_disk_says_at_stop_which_invalidations_it_could_not_send(
        origin: Origin, tmp_path: Path, own_redis: RedisServer) -> None:
    versioned(origin, "/p")
    nodes = Nodes(str(tmp_path), origin.url, own_redis.url, cache="cache: {memory: 16MB, disk: null}\n",
                  timeout="0.5s")
    try:
        b = await nodes.start("b", with_log=True, required=False)
        own_redis.kill()
        await wait_until(lambda: _cut_off(b), wait=20)
        assert await post(b, "/p") == 200
        assert await _outbox(b) == 1
        assert await b.stop() == 0
        lost = _said(b, "ERROR", "1 invalidation(s) made here were not sent", "are lost",
                     "no disk cache", f"http://{HOST}/p")
        assert len(lost) == 1, b.lines
        assert not list((tmp_path / "b").rglob(OUTBOX_FILE))
    finally:
        await nodes.stop_all()


async def test_the_outbox_file_is_written_a_few_times_for_a_burst_and_removed_once_empty(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of invalidations costs a few writes, not one each; the last state is written at
    close; an empty queue is no file."""
    writes: list[int] = []
    real = outbox.write_whole

    def counted(path: str, text: str) -> None:
        writes.append(len(json.loads(text)["invalidations"]))
        real(path, text)

    monkeypatch.setattr(outbox, "write_whole", counted)
    queue: list[Queued] = []
    path = str(tmp_path / OUTBOX_FILE)
    kept = OutboxFile(path, "a", lambda: queue)
    for i in range(1000):
        queue.append(Queued(PurgeSpec(urls=(f"http://{HOST}/{i}",), invalidation=True), float(i)))
        kept.changed()
        await asyncio.sleep(0)
    assert await kept.close()
    assert writes[-1] == 1000 and len(writes) < 20, writes
    entries, bad = OutboxFile(path, "a", list).read()
    assert bad == 0 and [q.spec.urls[0] for q in entries] == [f"http://{HOST}/{i}" for i in range(1000)]

    queue.clear()
    again = OutboxFile(path, "a", lambda: queue)
    again.changed()
    assert await again.close()
    assert not (tmp_path / OUTBOX_FILE).exists()


async def test_a_node_serves_while_the_outbox_it_saved_drains_in_batches(
        tmp_path: Path, shared_redis: RedisServer) -> None:
    """An outbox left by the last run was sent before the node said it was ready, one invalidation
    at a time (a shared-tier purge, an append, a local purge each): 2,000 held a start up 17 s at
    1 ms a round trip, beyond the shipped startup probe for a full outbox. Its invalidations were
    applied here when they were made, and the node does not consult the shared tier until they
    are sent, so it is ready at once (here: while its local purges of them cannot finish) and
    sends them behind, a batch at a time: every one its own stream entry, in order, and one
    local purge a batch."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    n = 1200
    urls = [f"http://{HOST}/o/{i}" for i in range(n)]
    (tmp_path / OUTBOX_FILE).write_text(outbox.encode("a", [
        Queued(PurgeSpec(urls=(u,), invalidation=True), 1000.0 + i) for i, u in enumerate(urls)]))
    go = asyncio.Event()
    local: list[PurgeSpec] = []
    told: list[bool] = []

    async def purge_here(spec: PurgeSpec) -> int:
        local.append(spec)
        await go.wait()
        return len(spec.urls)

    async def tell(pending: bool) -> None:
        told.append(pending)

    settings = ClusterSettings(redis=shared_redis.url, node="a", namespace=ns, heartbeat=0.2, timeout=2.0)
    node = ClusterNode(settings, purge_here, str(tmp_path), outbox_changed=tell)
    try:
        await asyncio.wait_for(node.start(), 10)  # (it waited for its local purges before)
        assert node.state == "ready" and node.ready and node.invalidations_pending
        go.set()
        await wait_until(lambda: asyncio.sleep(0, not node.invalidations_pending), wait=20)
        entries = await node._redis.xrange(Names(ns).stream)
        sent = [u for _, fields in entries for u in json.loads(fields["spec"])["urls"]]
        assert sent == urls  # one entry each, in the order they were made
        assert [len(spec.urls) for spec in local] == [500, 500, 200], [len(s.urls) for s in local]
        assert told == [False] and node.counts["sent"] == n
        await wait_until(lambda: asyncio.sleep(0, not (tmp_path / OUTBOX_FILE).exists()))
    finally:
        go.set()
        await node.close()


async def test_an_unreadable_outbox_file_is_counted_and_moved_aside_once_said(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file that could not be read was said lost in one ERROR at every start, counted at none
    (outbox_dropped 0), and left in place. Now it counts one (it held one at least; how many is
    unknown) and is moved to ``.bad``; the next start says nothing. A file with some entries
    unreadable keeps the others (written back at once) and is moved aside the same way."""
    kept = tmp_path / OUTBOX_FILE
    bad = tmp_path / (OUTBOX_FILE + ".bad")
    good = [Queued(PurgeSpec(urls=(f"http://{HOST}/{i}",), invalidation=True), 1.0) for i in range(2)]
    whole = outbox.encode("a", good)
    settings = ClusterSettings(redis="redis://127.0.0.1:1/0", node="a")

    async def nothing(spec: PurgeSpec) -> int:
        return 0

    def errors() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]

    caplog.set_level("ERROR", logger="cachegate.cluster")
    kept.write_text(whole[: len(whole) // 2])
    node = ClusterNode(settings, nothing, str(tmp_path))
    assert node.counts["outbox_dropped"] == 1 and not node.invalidations_pending
    assert len(errors()) == 1 and "is unreadable" in errors()[0], errors()
    assert f"the file is kept as {bad}" in errors()[0] and "how many it held is unknown" in errors()[0]
    assert not kept.exists() and bad.read_text() == whole[: len(whole) // 2]
    caplog.clear()
    node = ClusterNode(settings, nothing, str(tmp_path))
    assert node.counts["outbox_dropped"] == 0 and errors() == []

    data = json.loads(whole)
    data["invalidations"].insert(1, {"at": "yesterday", "spec": {"urls": [f"http://{HOST}/x"]}})
    kept.write_text(json.dumps(data))
    node = ClusterNode(settings, nothing, str(tmp_path))
    assert node.counts["outbox_dropped"] == 1 and len(node._outbox) == 2
    assert len(errors()) == 1 and "(1 unreadable" in errors()[0], errors()
    assert json.loads(bad.read_text()) == data
    entries, unreadable = OutboxFile(str(kept), "a", list).read()
    assert entries == good and unreadable == 0
    caplog.clear()
    node = ClusterNode(settings, nothing, str(tmp_path))
    assert node.counts["outbox_dropped"] == 0 and errors() == [] and len(node._outbox) == 2
