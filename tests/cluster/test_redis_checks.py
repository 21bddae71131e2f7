"""What a node checks of its Redis when it connects (and every few heartbeats while connected):
an eviction policy that may evict the cluster's own keys, an ACL user that lacks a command
cachegate uses, a read-only replica. Each is said in words that name the setting or command,
refused at start with ``cluster.required: true``, and otherwise the node's reason, as a password
Redis refuses is (real redis-server; in-process nodes, and ``cachegate run`` for what the admin
API and the log show)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from proxy.cluster import ClusterUnavailable
from proxy.cluster.node import ClusterNode
from proxy.cluster.settings import ClusterSettings
from proxy.purge import PurgeSpec, PurgeUnavailable
from tests.cluster.nodes import Nodes, admin_json, cluster_view, purge, wait_until
from tests.cluster.redis_server import RedisServer
from tests.cluster.test_bus import versioned
from tests.harness import Origin
from tests.storage.procs import HOST, ProxyProcess


async def nothing(spec: PurgeSpec) -> int:
    return 0


async def answer(value: bool) -> bool:
    return value


def settings(url: str, ns: str, **kw: object) -> ClusterSettings:
    return ClusterSettings(redis=url, node="a", namespace=ns, heartbeat=0.2, timeout=0.5, **kw)  # type: ignore[arg-type]


def ok(reply: bytes) -> None:
    assert reply.startswith(b"+OK"), reply


def user_url(redis: RedisServer, user: str) -> str:
    return redis.url.replace("redis://", f"redis://{user}:pw-{user}@")


def add_user(redis: RedisServer, user: str, *rules: str) -> None:
    ok(redis.command("ACL", "SETUSER", user, "on", f">pw-{user}", "~*", "&*", "+@all", *rules))


async def test_an_allkeys_eviction_policy_is_refused_at_start_and_is_the_nodes_reason_otherwise(
        own_redis: RedisServer) -> None:
    """allkeys-lru (what operators pick for a cache Redis) evicts the purge stream, the epoch and
    the shared tier's generation: purges answered 200 while a node served purged objects, and
    nothing said why. Now the start is refused, naming the setting and what to set; with
    ``required: false`` the node serves from its tiers, says why, and answers purges 503 until
    the policy is fixed."""
    ok(own_redis.command("CONFIG", "SET", "maxmemory", "64mb"))
    ok(own_redis.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"))
    ns = f"t{uuid.uuid4().hex[:8]}"
    node = ClusterNode(settings(own_redis.url, ns, shared_cache=True), nothing, None)
    with pytest.raises(ClusterUnavailable) as info:
        await node.start()
    said = str(info.value)
    assert f"Redis at {own_redis.url} has maxmemory-policy allkeys-lru (maxmemory 64.00M)" in said, said
    assert "set maxmemory-policy to volatile-lru" in said and "noeviction" in said, said
    assert "cannot reach" not in said, said

    node = ClusterNode(settings(own_redis.url, ns, required=False), nothing, None)
    await node.start()
    try:
        assert not node.connected and node.state == "disconnected"
        assert "maxmemory-policy allkeys-lru" in node.reason, node.reason
        assert "maxmemory-policy allkeys-lru" in (await node.view())["reason"]
        with pytest.raises(PurgeUnavailable) as refused:
            await node.purge(PurgeSpec(urls=("http://x/p",)))
        assert "maxmemory-policy allkeys-lru" in str(refused.value)
        ok(own_redis.command("CONFIG", "SET", "maxmemory-policy", "volatile-lru"))
        await wait_until(lambda: answer(node.connected and node.state == "ready"))
    finally:
        await node.close()

    # Without a maxmemory nothing is evicted: an allkeys-* policy is harmless, and accepted.
    ok(own_redis.command("CONFIG", "SET", "maxmemory", "0"))
    ok(own_redis.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"))
    node = ClusterNode(settings(own_redis.url, ns), nothing, None)
    await node.start()
    await node.close()


async def test_an_acl_user_lacking_a_command_is_refused_at_start_naming_it(shared_redis: RedisServer) -> None:
    """Lacking XADD (called inside the append script) the node started ready and every purge
    answered 503 with Redis's words, which name no command; lacking SUBSCRIBE it started ready
    and went disconnected. Now the check at connection names the command, with its key or
    channel, refused at start with ``required: true`` and the node's reason without."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex[:6]
    add_user(shared_redis, f"noxadd{tag}", "-xadd")
    add_user(shared_redis, f"nosub{tag}", "-subscribe")
    add_user(shared_redis, f"noeval{tag}", "-eval")
    ok(shared_redis.command("ACL", "SETUSER", f"other{tag}", "on", f">pw-other{tag}", "~other:*", "&other:*",
                            "+@all"))
    for user, named in ((f"noxadd{tag}", f"XADD {ns}:purges"), (f"noeval{tag}", "EVAL"),
                        (f"other{tag}", f"XRANGE {ns}:purges")):
        node = ClusterNode(settings(user_url(shared_redis, user), ns, shared_cache=True), nothing, None)
        with pytest.raises(ClusterUnavailable) as info:
            await node.start()
        said = str(info.value)
        assert f"does not let the ACL user '{user}' of cluster.redis run" in said, said
        assert named in said and f"ACL SETUSER {user} +" in said, said
        assert f"pw-{user}" not in said and "cannot reach" not in said, said
    # (limited to other keys: every command is denied on ours, the first few named)
    assert "more): cachegate needs every command it uses, on its keys" in said, said

    node = ClusterNode(settings(user_url(shared_redis, f"nosub{tag}"), ns, required=False), nothing, None)
    await node.start()
    try:
        assert not node.connected and node.state == "disconnected"
        assert f"run SUBSCRIBE {ns}:acks:" in node.reason, node.reason
        assert f"pw-nosub{tag}" not in node.reason
    finally:
        await node.close()


async def test_a_command_taken_from_the_user_of_a_running_node_disconnects_it_with_the_reason(
        shared_redis: RedisServer) -> None:
    """Checked again every few heartbeats: a running node whose user loses XADD stayed connected
    and ready, with no reason, while every purge made on it answered 503."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    user = f"later{uuid.uuid4().hex[:6]}"
    add_user(shared_redis, user)
    node = ClusterNode(settings(user_url(shared_redis, user), ns), nothing, None)
    await node.start()
    try:
        assert node.state == "ready"
        ok(shared_redis.command("ACL", "SETUSER", user, "-xadd"))
        await wait_until(lambda: answer(node.state == "disconnected"), wait=10)
        assert f"run XADD {ns}:purges" in node.reason, node.reason
        assert node.ready  # (it serves from its tiers, as with any Redis trouble)
        ok(shared_redis.command("ACL", "SETUSER", user, "+xadd"))
        await wait_until(lambda: answer(node.connected and node.state == "ready"), wait=10)
    finally:
        await node.close()


async def test_a_node_started_against_a_read_only_replica_says_so_not_that_it_cannot_reach_it(
        own_redis: RedisServer, tmp_path: Path) -> None:
    """It said "cannot reach Redis at ...: You can't write against a read only replica"."""
    replica = RedisServer(str(tmp_path / "replica"))
    replica.args = ["--replicaof", "127.0.0.1", str(own_redis.port)]
    replica.start()
    try:
        node = ClusterNode(settings(replica.url, f"t{uuid.uuid4().hex[:8]}"), nothing, None)
        with pytest.raises(ClusterUnavailable) as info:
            await node.start()
        said = str(info.value)
        assert f"cluster: Redis at {replica.url} is a read-only replica" in said, said
        assert "cluster.redis must name the primary" in said and "cannot reach" not in said, said
    finally:
        replica.close()


@pytest.mark.slow
async def test_a_policy_turned_to_allkeys_under_running_nodes_is_logged_once_and_shown_until_fixed(
        origin: Origin, tmp_path: Path, own_redis: RedisServer) -> None:
    """``cachegate run``: the policy changed under a running node ends its session, as an unhealthy
    Redis does: one ERROR line (one more when the policy changes again, not one per attempt),
    the reason in GET /cluster, /healthz (200: it serves from its tiers) and the purges' 503;
    fixed, the node is connected and ready again. A node started meanwhile does not start."""
    versioned(origin, "/p")
    ok(own_redis.command("CONFIG", "SET", "maxmemory", "64mb"))
    ok(own_redis.command("CONFIG", "SET", "maxmemory-policy", "volatile-lru"))
    nodes = Nodes(str(tmp_path), origin.url, own_redis.url, timeout="0.5s")
    try:
        a = await nodes.start("a", with_log=True)
        await wait_until(lambda: _ready(a))
        await a.get("/p")

        ok(own_redis.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"))
        said = "has maxmemory-policy allkeys-lru (maxmemory 64.00M)"
        await wait_until(lambda: _reason_has(a, said), wait=15)
        status, health = await admin_json(a, "GET", "/healthz")
        assert status == 200 and health["cluster"] == "disconnected" and said in health["reason"], health
        status, refused = await purge(a, urls=[f"http://{HOST}/p"])
        assert status == 503 and said in refused["error"], refused
        assert (await a.get("/p")).x_cache == "HIT"  # it serves from its tiers meanwhile
        await asyncio.sleep(2.5)  # several attempts more
        errors = [line for line in a.lines if said in line and "ERROR" in line]
        assert len(errors) == 1, a.lines

        ok(own_redis.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lfu"))  # another: said once
        await wait_until(lambda: _reason_has(a, "maxmemory-policy allkeys-lfu"), wait=15)
        await asyncio.sleep(1.5)
        assert sum("allkeys-lfu" in line and "ERROR" in line for line in a.lines) == 1, a.lines

        err = await nodes.refused("b")
        assert f"cachegate: cluster: Redis at {own_redis.url} has maxmemory-policy allkeys-lfu" in err, err
        assert "set maxmemory-policy to volatile-lru" in err, err

        ok(own_redis.command("CONFIG", "SET", "maxmemory-policy", "volatile-lru"))
        await wait_until(lambda: _ready(a), wait=15)
        status, done = await purge(a, urls=[f"http://{HOST}/p"])
        assert status == 200, done
    finally:
        await nodes.stop_all()


async def _ready(proc: ProxyProcess) -> bool:
    view = await cluster_view(proc)
    return bool(view["connected"] and view["state"] == "ready")


async def _reason_has(proc: ProxyProcess, text: str) -> bool:
    view = await cluster_view(proc)
    return not view["connected"] and text in view["reason"]


async def test_a_redis_without_info_is_used_unchecked_and_one_without_eval_is_refused_naming_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``rename-command INFO ""`` (a common hardening): the check of the eviction policy answered
    "unknown command 'INFO'" and the node never connected (purges 503 for ever, a refused start
    with ``required: true``), where nothing else needs INFO. Now the policy goes unchecked, said
    in one WARNING, as for an ACL user without INFO. Without EVAL nothing can work (every step
    is a script): the start is refused naming EVAL, not with the first script's text."""
    servers = []
    try:
        for command in ("INFO", "EVAL"):
            server = RedisServer(str(tmp_path / command))
            server.args = ["--rename-command", command, ""]
            server.start()
            servers.append(server)
        no_info, no_eval = servers
        ns = f"t{uuid.uuid4().hex[:8]}"
        caplog.set_level("WARNING", logger="cachegate.cluster")
        node = ClusterNode(settings(no_info.url, ns, shared_cache=True, required=True), nothing, None)
        await node.start()
        try:
            assert node.connected and node.state == "ready", node.reason
            outcome = await node.purge(PurgeSpec(urls=("http://x/p",)))
            assert outcome.nodes == {"a": 0}
            await node._check.run(node._redis)  # (every 10 heartbeats: said once all the same)
        finally:
            await node.close()
        said = [(r.levelname, r.getMessage()) for r in caplog.records
                if "maxmemory-policy is not checked" in r.getMessage()]
        assert len(said) == 1 and said[0][0] == "WARNING", said
        assert "Redis answered INFO with an error" in said[0][1], said
        assert "renamed away with rename-command?" in said[0][1] and "not allkeys-*" in said[0][1], said

        node = ClusterNode(settings(no_eval.url, ns, required=True), nothing, None)
        with pytest.raises(ClusterUnavailable) as info:
            await node.start()
        said_eval = str(info.value)
        assert f"Redis at {no_eval.url} has no EVAL command (renamed away with rename-command?)" in said_eval
        assert "give EVAL back its name" in said_eval and "args beginning" not in said_eval, said_eval
    finally:
        for server in servers:
            server.close()


class _Redis6:
    """Redis 6's answer to the permission script (its Lua has no ``redis.acl_check_cmd``): a
    Redis 6 server is not installable here, so only its one reply is stood in for."""

    def __init__(self, user: str | None) -> None:
        self.connection_pool = type("Pool", (), {"connection_kwargs": {"username": user}})()

    async def eval(self, *args: object) -> list[str]:
        return ["unsupported"]


@pytest.mark.parametrize(("user", "level"), [("cache", "INFO"), (None, "DEBUG")])
async def test_an_acl_user_on_a_redis_that_cannot_check_it_is_said_once_at_info(
        user: str | None, level: str, caplog: pytest.LogCaptureFixture) -> None:
    """A named ACL user on Redis 6 went unchecked with only a debug line: a command it denies was
    found by use, with nothing at start to say it had not been checked. The default user (no
    ACL in use) stays quiet."""
    from proxy.cluster.redis_checks import RedisCheck
    from proxy.cluster.redis_io import Names

    check = RedisCheck(Names("ns"), "a", False, "redis://h:6379/0")
    with caplog.at_level("DEBUG", logger="cachegate.cluster"):
        for _ in range(2):
            assert await check._denied(_Redis6(user)) is None  # type: ignore[arg-type]
    said = [r for r in caplog.records if "not checked" in r.getMessage()]
    assert [r.levelname for r in said] == [level], said
    assert "redis.acl_check_cmd" in said[0].getMessage()
