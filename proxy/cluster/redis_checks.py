"""What a node checks of its Redis at each connection, and every ``CHECK_EVERY`` heartbeats.

Two settings of Redis break the cluster without any command failing at once:

- a ``maxmemory-policy`` of ``allkeys-*`` (with a ``maxmemory``): a full Redis evicts any key,
  the cluster's own bookkeeping too (the purge stream and its sequence number, the epoch, the
  shared tier's generation), which has no TTL. A reviewer saw purges answer 200 while a
  running node kept serving 28 purged objects, the log saying only that the shared tier starts
  a new generation. Read from ``INFO memory`` (``CONFIG GET`` is refused by managed Redis
  services);
- an ACL user that may not run one of the commands cachegate uses (or not on its keys or
  channels): the node started "ready" and went disconnected later (``SUBSCRIBE``, ``XREAD``),
  or stayed ready while every purge answered 503 with Redis's words, which name no command
  (``XADD``, called inside a script). Checked with ``redis.acl_check_cmd`` in one script: it
  needs no permission beyond ``EVAL`` (``ACL DRYRUN`` needs the admin commands, which a user
  of least privilege lacks); Redis before 7 has neither, and is not checked (a debug line).

A Redis without ``EVAL`` (``rename-command EVAL ""``) is unfit too, said as such: every script
fails (the first heartbeat said "unknown command 'EVAL', with args beginning with" the script's
text). A Redis without ``INFO`` (renamed away the same way, or an ACL user without it) is not: the
policy is then not checked (a WARNING once), and nothing else needs ``INFO`` (refused as an error,
it kept such a node from ever connecting: hardening guides rename ``INFO`` away).

Each problem is ``RedisUnfit``, a session's end as when Redis refuses the password: refused at start
with ``cluster.required: true``, otherwise (and when it comes up under a running node) the
node is disconnected with the reason, serves from its tiers, answers purges 503 and retries.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, ResponseError

from proxy.cluster.redis_io import Names

log = logging.getLogger("cachegate.cluster")

CHECK_EVERY = 10  # heartbeats between two checks of a connected node
SHOWN = 6  # commands a message names (of those denied)

# ARGV: a JSON list of commands (each a list: name, then arguments). -> {'unsupported'} on a
# Redis without redis.acl_check_cmd (before 7), else the indexes (1-based) of those denied.
# Flagged no-writes: it runs while writes are paused (CLIENT PAUSE WRITE), at maxmemory, and on
# a replica (where the heartbeat then says what is wrong).
PERMITTED = """#!lua flags=no-writes
if not redis.acl_check_cmd then return {'unsupported'} end
local denied = {}
for i, c in ipairs(cjson.decode(ARGV[1])) do
  local ok, yes = pcall(redis.acl_check_cmd, unpack(c))
  if not (ok and yes) then denied[#denied + 1] = i end
end
return denied
"""


# What a Redis without EVAL is told (``rename-command EVAL ""``, a hardening some guides give).
NO_EVAL = ("has no EVAL command (renamed away with rename-command?), and cachegate cannot work "
           "without it: every step it takes on Redis that must be atomic is a Lua script sent with "
           "EVAL (a purge's append to the stream, each heartbeat, the start of a catch-up, the list "
           "of live nodes, leaving; with shared_cache every lookup, fill and purge of the shared "
           "tier); give EVAL back its name (scripts need nothing else: no EVALSHA, SCRIPT or "
           "FUNCTION)")


def _unknown_command(exc: ResponseError, name: str) -> bool:
    """Whether Redis answered that it has no such command (renamed away, or not in this build).

    >>> _unknown_command(ResponseError("unknown command 'EVAL', with args beginning with: "), "EVAL")
    True
    >>> _unknown_command(ResponseError("ERR unknown command `eval`, with args beginning with:"), "EVAL")
    True
    """
    return re.search(rf"unknown command [`']{name}[`']", str(exc), re.IGNORECASE) is not None


class RedisUnfit(ResponseError):
    """Redis answers, but is set up in a way the cluster cannot work with safely (an ``allkeys-*``
    eviction policy, an ACL user lacking a command): the message says what to change."""


def eviction_problem(memory: Mapping[str, Any]) -> str | None:
    """What is wrong with the eviction policy ``INFO memory`` shows, in words; None when
    nothing is (no ``maxmemory``: nothing is ever evicted).

    >>> full = {"maxmemory": 2097152, "maxmemory_human": "2.00M", "maxmemory_policy": "allkeys-lru"}
    >>> eviction_problem(full)[:51]
    'has maxmemory-policy allkeys-lru (maxmemory 2.00M):'
    >>> eviction_problem({"maxmemory": 0, "maxmemory_policy": "allkeys-lru"}), eviction_problem(
    ...     {"maxmemory": 2097152, "maxmemory_policy": "volatile-lru"})
    (None, None)
    """
    policy = str(memory.get("maxmemory_policy", ""))
    try:
        limit = int(memory.get("maxmemory", 0))
    except (TypeError, ValueError):
        limit = 1  # (unreadable: taken as set)
    if not policy.startswith("allkeys-") or limit == 0:
        return None
    return (f"has maxmemory-policy {policy} (maxmemory {memory.get('maxmemory_human', limit)}): when "
            "full it evicts any key, the cluster's own too (the purge stream and its sequence "
            "number, the epoch, the shared tier's generation), and purges could then answer 200 "
            "while nodes serve what they removed; set maxmemory-policy to volatile-lru (or another "
            "volatile-* policy: they evict only keys with a TTL) or noeviction")


def commands(names: Names, node: str, shared: bool) -> list[tuple[str, ...]]:
    """Every command cachegate sends (or its scripts call), with a key or channel of the kind it
    uses it on (an ACL user may be limited to keys and channels): the bus's, and with
    ``shared`` the shared tier's."""
    ns = names
    out: list[tuple[str, ...]] = [
        ("XRANGE", ns.stream, "-", "+", "COUNT", "1"),
        ("XREAD", "COUNT", "1", "BLOCK", "1000", "STREAMS", ns.stream, "0-0"),
        ("MGET", ns.epoch, ns.seq),
        ("GET", ns.seq),
        ("SMEMBERS", ns.members),
        ("SUBSCRIBE", ns.acks),
        ("PUBLISH", ns.acks, "x"),
        # inside the bus's scripts (APPEND, TIP, BEAT, LEAVE, LIVE)
        ("EXISTS", ns.epoch),
        ("SET", ns.epoch, "x"),
        ("INCR", ns.seq),
        ("XADD", ns.stream, "MAXLEN", "~", "1", "*", "f", "v"),
        ("XREVRANGE", ns.stream, "+", "-", "COUNT", "1"),
        ("PTTL", ns.node(node)),
        ("DEL", ns.node(node)),
        ("SADD", ns.members, "x"),
        ("TIME",),
        ("ZADD", ns.members + ":alive", "0", "x"),
        ("ZREM", ns.members + ":alive", "x"),
        ("ZSCORE", ns.members + ":alive", "x"),
    ]
    if shared:
        base = f"{ns.l2}:0:"
        out += [
            ("SUBSCRIBE", ns.filled),
            ("PUBLISH", ns.filled, "x"),
            ("GET", f"{ns.l2}:lock:x"),
            # inside the shared tier's scripts (LOOKUP, WRITE, RELEASE, PURGE, NEW_GENERATION)
            ("SET", f"{ns.l2}:lock:x", "1", "NX", "PX", "1"),
            ("INCR", ns.fence),
            ("HGETALL", base + "m:x"),
            ("HSET", base + "m:x", "f", "v"),
            ("HDEL", base + "m:x", "f"),
            ("PEXPIRE", base + "m:x", "1"),
            ("SISMEMBER", base + "u:x", "x"),
            ("SREM", base + "h:x", "x"),
            ("SPOP", base + "u:x", "1"),
            ("SSCAN", base + "h:x", "0"),
        ]
    return out


def shown(command: tuple[str, ...]) -> str:
    """A command as a message names it: with its key or channel, when it has one."""
    if command[0] in ("TIME", "XREAD"):
        return command[0] if command[0] == "TIME" else f"XREAD {command[-2]}"
    return " ".join(command[:2])


class RedisCheck:
    """The checks of one node (``ClusterNode``): ``run`` raises ``RedisUnfit`` naming every
    problem found; what cannot be checked is said once per process."""

    def __init__(self, names: Names, node: str, shared: bool, url: str) -> None:
        self.names = names
        self.url = url  # (redacted)
        self.commands = commands(names, node, shared)
        self._said: set[str] = set()

    async def run(self, r: aioredis.Redis) -> None:
        problems = [p for p in (await self._denied(r), await self._eviction(r)) if p]
        if problems:
            raise RedisUnfit(f"Redis at {self.url} " + "; and it ".join(problems))

    async def _denied(self, r: aioredis.Redis) -> str | None:
        user = str(r.connection_pool.connection_kwargs.get("username") or "default")
        try:
            denied: Any = await r.eval(PERMITTED, 0, json.dumps(self.commands))
        except NoPermissionError as exc:
            return self._deny(user, ["EVAL"], exc)
        except ResponseError as exc:
            if _unknown_command(exc, "EVAL"):  # (renamed away: rename-command EVAL "")
                return NO_EVAL
            # (a Redis whose scripts cannot do this one: its other commands are checked by use)
            self._once("acl", logging.DEBUG, "cluster: the ACL permissions of cluster.redis's user are "
                       f"not checked: Redis answered the check with an error ({exc})")
            return None
        if denied and denied[0] == "unsupported":
            # Said where it matters: a named ACL user on Redis 6 may lack a command, found by use.
            self._once("acl", logging.INFO if user != "default" else logging.DEBUG,
                       f"cluster: the ACL permissions of cluster.redis's user {user!r} are not checked: "
                       "this Redis has no redis.acl_check_cmd (Redis 7 and later have); a command it "
                       "denies is reported when it is first used")
            return None
        return self._deny(user, [shown(self.commands[int(i) - 1]) for i in denied]) if denied else None

    def _deny(self, user: str, what: list[str], exc: Exception | None = None) -> str:
        named = ", ".join(what[:SHOWN]) + (f" (and {len(what) - SHOWN} more)" if len(what) > SHOWN else "")
        grant = " ".join(dict.fromkeys(f"+{w.split()[0].lower()}" for w in what[:SHOWN]))
        ns = self.names.ns
        return (f"does not let the ACL user {user!r} of cluster.redis run {named}"
                + (f" ({exc})" if exc is not None else "")
                + f": cachegate needs every command it uses, on its keys {ns}:* and channels {ns}:*; "
                f"grant them (ACL SETUSER {user} {grant}{' ...' if len(what) > SHOWN else ''} "
                f"~{ns}:* &{ns}:*)")

    async def _eviction(self, r: aioredis.Redis) -> str | None:
        try:
            memory: Any = await r.info("memory")
        except ResponseError as exc:
            # Not a reason to stay away from a Redis that works: nothing else needs INFO.
            why = (f"the user of cluster.redis may not run INFO ({exc})" if isinstance(exc, NoPermissionError)
                   else f"Redis answered INFO with an error ({exc}: renamed away with rename-command?)")
            self._once("info", logging.WARNING, f"cluster: Redis's maxmemory-policy is not checked: {why}; "
                       "make sure it is not allkeys-* (docs/cluster.md, shared tier)")
            return None
        return eviction_problem(memory)

    def _once(self, what: str, level: int, message: str) -> None:
        if what not in self._said:
            self._said.add(what)
            log.log(level, message)
