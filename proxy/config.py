"""The config file -> frozen ``Settings``; every problem reported as ``FILE:LINE: message``.

``load_config`` reads the file (its keys are declared in ``proxy.settings``), applies
command-line overrides, checks what involves several keys, compiles the rule files it
references, and either returns ``Settings`` or raises ``ConfigError`` with every problem
found (not just the first). Nothing here binds a port or touches the cache directory:
``cachegate check`` and ``cachegate run`` share it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from proxy.cluster.settings import ClusterSettings
from proxy.cpus import cgroup_memory_limit
from proxy.errors import ConfigError, UnsetTokenVariable
from proxy.policy.messages import CacheOptions
from proxy.room import (
    MIN_CONNECTIONS,
    OTHER_FILES,
    SHARD_FILES,
    human_size,
    machine_memory,
    most_shards,
    open_files_limit,
    space,
    store_files,
)
from proxy.rules import load_rules
from proxy.schema import Context, parse_hostport, read_section, reference
from proxy.settings import (
    MB,
    MIN_TOKEN_LENGTH,
    AccessLogSettings,
    AdminSettings,
    Balance,
    CacheSettings,
    DiskSettings,
    HealthSettings,
    HostPort,
    Listener,
    ListenerTLS,
    Network,
    PassiveHealth,
    PoolSettings,
    RangeFill,
    Settings,
    Timeouts,
    TLSSettings,
    UpstreamSettings,
    bound_addresses,
    listed_twice,
    parse_workers,
    read_settings,
    rule_file_shown,
    shared_address,
    storable_limit,
    upstream_twice,
    upstream_url,
)
from proxy.yamlsrc import Problems, Sources, Src, load_snapshot, load_yaml

# The settings types live in proxy.settings; these names stay importable from here.
__all__ = [
    "MIN_TOKEN_LENGTH",
    "AccessLogSettings",
    "AdminSettings",
    "Balance",
    "CacheSettings",
    "ClusterSettings",
    "DiskSettings",
    "HealthSettings",
    "HostPort",
    "Listener",
    "ListenerTLS",
    "Network",
    "Overrides",
    "PassiveHealth",
    "PoolSettings",
    "RangeFill",
    "Settings",
    "TLSSettings",
    "Timeouts",
    "UpstreamSettings",
    "base_cache_options",
    "listens_on_loopback",
    "load_admin_access",
    "load_client_listeners",
    "load_config",
    "parse_workers",
    "read_settings",
]


@dataclass(frozen=True)
class Overrides:
    listen: tuple[str, ...] = ()  # --listen, repeatable: plain listeners instead of the config's
    upstreams: tuple[str, ...] = ()
    admin_listen: str | None = None
    workers: str | None = None
    cache_path: str | None = None


def _apply_overrides(s: Settings, o: Overrides, problems: Problems) -> Settings:
    at = ("<command line>", 0)
    if o.listen:
        try:
            given = [Listener(*parse_hostport(t)) for t in o.listen]
        except ValueError as exc:
            problems.add(at, f"--listen: {exc}")
        else:
            for n, listener in enumerate(given):
                twice = listed_twice(given[:n], listener)
                if twice is not None:
                    problems.add(at, f"--listen: {twice}")
            s = replace(s, listeners=tuple(given))
    if o.upstreams:
        ups = []
        seen: dict[str, str] = {}
        for text in o.upstreams:
            try:
                url = upstream_url(text)
            except ValueError as exc:
                problems.add(at, str(exc))
                continue
            twice = upstream_twice(seen, url, text)
            if twice is not None:
                problems.add(at, f"--upstream: {twice}")
                continue
            ups.append(UpstreamSettings(url))
        s = replace(s, upstreams=tuple(ups))
    if o.admin_listen is not None:
        try:
            admin_listen = None if o.admin_listen in ("", "off") else parse_hostport(o.admin_listen)
            s = replace(s, admin=replace(s.admin, listen=admin_listen))
        except ValueError as exc:
            problems.add(at, f"--admin-listen: {exc}")
    if o.workers is not None:
        try:
            s = replace(s, workers=parse_workers(o.workers))
        except ValueError as exc:
            problems.add(at, f"--workers: {exc}")
    if o.cache_path is not None and s.cache.disk is not None:
        s = replace(s, cache=replace(s.cache, disk=replace(s.cache.disk, path=o.cache_path)))
    return s


def listens_on_loopback(host: str) -> bool:
    """Whether a listener bound to ``host`` is reachable from this machine only.

    >>> [listens_on_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "::", "10.0.0.1")]
    [True, True, True, False, False, False]
    """
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _line(root: Src, *path: str) -> tuple[str, int]:
    """Where ``root[path[0]][path[1]]...`` was written (the deepest key found), for FILE:LINE."""
    node, at = root, (root.file, 1)
    for key in path:
        if not isinstance(node.value, dict) or key not in node.value:
            break
        at = (node.file, node.key_lines.get(key, node.line))
        node = node.value[key]
    return at


def _key_written(root: Src, *path: str) -> bool:
    """Whether the key ``root[path[0]][path[1]]...`` is in the file, whatever its value (an
    unset ``${VAR}`` reads as null)."""
    node = root
    for key in path:
        if not isinstance(node.value, dict) or key not in node.value:
            return False
        node = node.value[key]
    return True


def _refused_under(root: Src, *path: str) -> list[str]:
    """The problems of the values within ``root[path...]`` that ``load_yaml`` read as null (an
    unset ``${VAR}``: a listener left out, which the caller would take for the default or none).
    By value, not by line: in flow style (``admin: {listen: ..., token: ...}``) one line holds both."""
    node: Src | None = root
    for key in path:
        if node is None or not isinstance(node.value, dict) or key not in node.value:
            return []
        node = node.value[key]
    found: list[str] = []
    stack = [node] if node is not None else []
    while stack:
        n = stack.pop()
        found.extend(n.refused)
        if isinstance(n.value, dict):
            stack.extend(v for v in n.value.values() if isinstance(v, Src))
        elif isinstance(n.value, list):
            stack.extend(v for v in n.value if isinstance(v, Src))
    return found


# Whether a load checks the config against this machine (``cache.memory`` against its memory,
# ``cache.disk.size`` against its filesystem): "start" where the shared memory and the cache
# directory are made (``cachegate check``, the start of a supervisor or a single process);
# "reload" there on a reload, which changes neither (what would refuse a start only warns);
# "no" in a worker, which maps what its supervisor made (its start and its reloads), and in
# commands that only read the config: a machine that reports less memory since must not stop
# a running instance's workers from starting again.
MachineCheck = Literal["start", "reload", "no"]


def _check(s: Settings, problems: Problems, root: Src, o: Overrides,
           running_admin: HostPort | None = None, machine: MachineCheck = "start",
           names: bool = False) -> None:
    """Problems that involve several fields, each reported at the line of the field concerned
    (or the command line, when an override set it); with ``names``, upstream names that do
    not resolve here too (``_check_upstream_names``)."""
    if names:
        _check_upstream_names(problems, root, o)
    configured = root.value.get("upstreams") if isinstance(root.value, dict) else None
    entries = configured.value if configured is not None and isinstance(configured.value, list) else []
    # Upstreams that were given but invalid are reported where they are, once.
    if not s.upstreams and not o.upstreams and not entries:
        problems.add(_line(root, "upstreams"),
                     "no upstreams: add upstreams: [{url: http://HOST:PORT}] or --upstream URL")
    if machine != "no":
        _check_disk_room(s, problems, root)
        _check_memory(s, problems, root, machine)
        _check_open_files(s, problems, root, machine)
    _check_stores_something(s, problems, root)
    _check_max_object(s, problems, root)
    _check_addresses(s, problems, root, o)
    _check_running_admin(s, problems, root, running_admin)
    admin = s.admin
    if admin.listen is None or listens_on_loopback(admin.listen[0]):
        return
    where = f"admin.listen {_fmt_hostport(admin.listen)}"  # [::]:8081, not :::8081
    token_at = _line(root, "admin", "token")
    if admin.token is None and _key_written(root, "admin", "token") and problems.reported_at(token_at):
        pass  # written but refused (an unset ${VAR}, a newline at its end): said at its line, once
    elif admin.token is None:
        at = ("<command line>", 0) if o.admin_listen is not None else _line(root, "admin", "listen")
        problems.add(at, f"{where} is not loopback and admin.token is not set: the admin API would be open "
                         "to anyone who can reach it; set admin.token or listen on 127.0.0.1")
    elif len(admin.token) < MIN_TOKEN_LENGTH:
        problems.add(token_at,
                     f"admin.token is {len(admin.token)} characters long; on a listener others can reach "
                     f"({where}) it must have at least {MIN_TOKEN_LENGTH} (e.g. the output of "
                     "`openssl rand -hex 24`)")


def _check_disk_room(s: Settings, problems: Problems, root: Src) -> None:
    """A disk budget bigger than the whole filesystem under the cache directory (when it can be
    seen: the directory, or its nearest existing parent): cachegate would fill the filesystem
    itself, its writes would fail, and a restart on the full filesystem would fail too."""
    disk = s.cache.disk
    room = space(disk.path) if disk is not None else None
    if disk is None or room is None or not room[1] or disk.size <= room[1]:
        return
    problems.warn(_line(root, "cache", "disk", "size"),
                  f"cache.disk.size {human_size(disk.size)} is more than the whole filesystem of "
                  f"{disk.path} ({human_size(room[1])}): cachegate would fill it, then fail its writes "
                  "(and a start on the full filesystem); set it below what that filesystem can spare")


def _check_open_files(s: Settings, problems: Problems, root: Src, machine: MachineCheck = "start",
                      limit: int | None = None) -> None:
    """The disk shards' open files (``SHARD_FILES`` each, in every process) against the
    open-files limit this machine gives a start (``open_files_limit``: the soft limit raised to
    the hard one, as the start does): when they leave fewer than MIN_CONNECTIONS, a start
    announced it listened, then closed every connection unanswered (EMFILE at the accept) and
    its storage upkeep failed each round. A problem (on a reload, which opens no shard, a
    warning for the next start). ``limit``: the limit to check against (tests)."""
    disk = s.cache.disk
    if limit is None:
        limit = open_files_limit()
    if disk is None or limit is None:
        return
    need = store_files(disk.shards) + MIN_CONNECTIONS
    if need <= limit:
        return
    most = most_shards(limit)
    fix = (f"set cache.disk.shards to at most {most}" if most else "run memory-only (cache.disk: null)")
    said = (f"cache.disk.shards {disk.shards}: its shards keep up to {disk.shards * SHARD_FILES} files "
            f"open in every process ({SHARD_FILES} each), and with {OTHER_FILES} more for logs, "
            f"listeners and bodies being read and {MIN_CONNECTIONS} for connections that is {need}, "
            f"over this machine's open-files limit, {limit} (RLIMIT_NOFILE: the hard limit, which a "
            f"start raises to): {fix}, or raise the hard limit (LimitNOFILE= of the unit, ulimit -Hn)")
    at = _line(root, "cache", "disk", "shards")
    if machine == "reload":
        problems.warn(at, said.replace(": set", ": a restart would be refused; set", 1)
                      .replace(": run", ": a restart would be refused; run", 1))
    else:
        problems.add(at, said)


# What each process of an instance needs besides the shared memory tier, under load: measured at
# 64-71 MB (the supervisor) and 75-88 MB (each worker) of private memory with 64 to 128 clients
# reading bodies of up to 900 KB (docs/deploy.md, "Memory").
PROCESS_MEMORY = 100 * MB


def memory_processes(workers: int) -> int:
    """The processes an instance of ``workers`` workers runs: the workers and their supervisor,
    or one process alone."""
    return workers + 1 if workers > 1 else 1


def memory_needed(memory: int, workers: int) -> int:
    """The memory limit an instance needs: ``cache.memory`` (shared, counted once) and
    ``PROCESS_MEMORY`` for each of its processes.

    >>> memory_needed(256 * MB, 2) // MB, memory_needed(256 * MB, 1) // MB
    (556, 356)
    """
    return memory + memory_processes(workers) * PROCESS_MEMORY


def memory_needed_text(memory: int, workers: int) -> str:
    """How ``memory_needed`` adds up, for a warning or a log line.

    >>> memory_needed_text(256 * MB, 2)
    'cache.memory 256 MB + 3 processes (2 workers and the supervisor) x 100 MB = 556 MB'
    """
    n = memory_processes(workers)
    which = f"{workers} workers and the supervisor" if n > 1 else "workers: 1, no supervisor"
    return (f"cache.memory {human_size(memory)} + {n} process{'es' if n > 1 else ''} ({which}) x "
            f"{human_size(PROCESS_MEMORY)} = {human_size(memory_needed(memory, workers))}")


def _check_memory(s: Settings, problems: Problems, root: Src, machine: MachineCheck = "start") -> None:
    """``cache.memory`` is one shared mapping, made at start: more than the machine's memory and
    swap together cannot be mapped (a problem; on a reload, which does not map it again, a
    warning for the next start); more than its memory alone maps, but the kernel pages it out
    to swap (every hit a page fault) or ends the process once it fills (a warning); so it does
    when it is more than the limit of the process's cgroup (a container's: a warning too), and
    the kernel's OOM killer ends a process (a worker, restarted: ``proxy.oom``) under load when
    the limit leaves less than ``PROCESS_MEMORY`` for each process besides (``memory_needed``:
    a warning, with the figure)."""
    memory = machine_memory()
    budget = s.cache.memory
    at = _line(root, "cache", "memory")
    if memory is None or budget <= memory[0]:
        limit = cgroup_memory_limit()
        if limit is not None and budget > limit:
            problems.warn(at, f"cache.memory {human_size(budget)} is more than the memory limit of this "
                              f"process's cgroup ({human_size(limit)}: a container's, a unit's MemoryMax=): "
                              "the kernel would end cachegate once the memory tier fills; set it lower")
        elif limit is not None and (need := memory_needed(budget, s.workers)) > limit:
            problems.warn(at, f"the memory limit of this process's cgroup ({human_size(limit)}: a "
                              f"container's, a unit's MemoryMax=) is less than cachegate needs: "
                              f"{memory_needed_text(budget, s.workers)}; under load the kernel's OOM "
                              f"killer would end a worker: raise the limit to {human_size(need)} or more, "
                              "or set cache.memory or workers lower (what clients that stop reading hold, "
                              "up to max_unsent x 2 a worker, and open TLS connections, up to about 650 KB "
                              "each, come on top: a bound under attack, not counted here)")
        return
    ram, swap = memory
    has = f"this machine has {human_size(ram)} of memory and {human_size(swap)} of swap"
    if budget > ram + swap and machine == "reload":
        problems.warn(at, f"cache.memory {human_size(budget)} is more than {has}: its shared memory "
                          "could not be mapped at the next start; set it lower")
    elif budget > ram + swap:
        problems.add(at, f"cache.memory {human_size(budget)} is more than {has}: its shared memory "
                         "cannot be mapped; set it lower")
    else:
        problems.warn(at, f"cache.memory {human_size(budget)} is more than {has}: the memory tier "
                          "would live in swap, or be ended when it fills; set it lower")


def _check_stores_something(s: Settings, problems: Problems, root: Src) -> None:
    """Sizes that leave room for no body at all (``storable_limit`` 0): every response would be
    passed through unstored, with nothing said. A cache that stores nothing is refused, as nginx
    refuses a zone of size 0; one meant to is written as a rule (``bypass: true``)."""
    c = s.cache
    disk = (c.disk.size, c.disk.shards) if c.disk is not None else None
    if storable_limit(c.max_object, disk, c.memory_max_object, c.memory, s.workers) > 0:
        return
    no_disk = "with no disk tier (cache.disk: null)"
    at: tuple[str, ...]
    if c.max_object == 0:
        at, what = ("cache", "max_object"), "cache.max_object 0 B"
    elif c.disk is not None:
        at = ("cache", "disk", "size")
        what = f"cache.disk.size {human_size(c.disk.size)} (half a shard is the biggest body it keeps)"
    elif c.memory_max_object == 0:
        at, what = ("cache", "memory_max_object"), f"cache.memory_max_object 0 B {no_disk}"
    else:
        at, what = ("cache", "memory"), f"cache.memory {human_size(c.memory)} {no_disk}"
    hint = "give it a size, or a disk tier" if c.disk is None and c.max_object else "give it a size"
    problems.add(_line(root, *at), f"{what} stores nothing: every response would be passed through "
                                   f"unstored; {hint} (to cache nothing on purpose, say so with a rule: "
                                   "bypass: true)")


def _written(root: Src, *path: str) -> bool:
    node = root
    for key in path:
        if not isinstance(node.value, dict) or key not in node.value:
            return False
        node = node.value[key]
    return node.value is not None


def _check_max_object(s: Settings, problems: Problems, root: Src) -> None:
    """``cache.max_object`` over what the store can keep (half a disk shard; without a disk
    tier, memory_max_object or what a record of the shared memory holds): bigger responses are
    passed through. A
    warning at the line of the size that limits it; the start used to log it, once a process,
    without FILE:LINE, and ``check --strict`` missed it. Memory-only with max_object left at
    its default says nothing: there memory_max_object is the limit, as documented."""
    c = s.cache
    disk = (c.disk.size, c.disk.shards) if c.disk is not None else None
    limit = storable_limit(c.max_object, disk, c.memory_max_object, c.memory, s.workers)
    if not 0 < limit < c.max_object or (c.disk is None and not _written(root, "cache", "max_object")):
        return
    if c.disk is not None:
        at = ("cache", "disk", "size") if _written(root, "cache", "disk", "size") else ("cache", "max_object")
        why = (f"half a disk shard: cache.disk.size {human_size(c.disk.size)} in {c.disk.shards} "
               f"shard(s), less a tenth kept for the index")
        fix = "lower cache.max_object, or give cache.disk.size more room (or fewer shards)"
    else:
        at = ("cache", "max_object")
        why = ("without a disk tier: cache.memory_max_object, half of cache.memory, and what one "
               "record of the shared memory holds")
        fix = "lower cache.max_object, or give cache.memory_max_object (or cache.memory) more room"
    problems.warn(_line(root, *at), f"cache.max_object {human_size(c.max_object)} is more than the store can "
                                    f"keep ({why}): responses over {human_size(limit)} ({limit} bytes) "
                                    f"are passed through unstored; {fix}")


NAME_LOOKUP_TIMEOUT = 2.0  # seconds for every upstream name together (looked up at once)


def _check_upstream_names(problems: Problems, root: Src, o: Overrides) -> None:
    """An upstream whose name does not resolve here: a warning at its line (``cachegate check``).

    nginx refuses such a config ("host not found in upstream"); cachegate starts, each
    connection to that upstream fails (health checks take it out, and bring it back once the
    name resolves), and a mistyped name passed check unsaid. A warning, not a problem: DNS may be out
    of reach where check runs (a CI builder, a container build), and ``--strict`` refuses it.
    The names are looked up at once, NAME_LOOKUP_TIMEOUT for all of them together: a resolver
    that never answers (glibc waits 5 s a try, and tries again) must not hold check up."""
    written: list[tuple[str, Src | tuple[str, int]]] = []
    if o.upstreams:
        written = [(text, ("<command line>", 0)) for text in o.upstreams]
    else:
        configured = root.value.get("upstreams") if isinstance(root.value, dict) else None
        entries = configured.value if configured is not None and isinstance(configured.value, list) else []
        for entry in entries:
            url = entry.value.get("url") if isinstance(entry.value, dict) else entry
            if url is not None and isinstance(url.value, str):
                written.append((url.value, url))
    named: list[tuple[str, str, int, Src | tuple[str, int]]] = []
    for text, at in written:
        try:
            url = upstream_url(text)
        except ValueError:
            continue  # refused at its line already
        host = url.raw_host or ""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            named.append((text, host, url.port or 0, at))
    if not named:
        return
    failed = lookup_names([(host, port) for _, host, port, _ in named], NAME_LOOKUP_TIMEOUT)
    for text, host, port, at in named:
        exc = failed[(host, port)]
        if isinstance(exc, TimeoutError):
            problems.warn(at, f"upstream {text!r}: looking up its name {host} had no answer within "
                              f"{NAME_LOOKUP_TIMEOUT:g}s (the resolver here is slow or out of reach): "
                              "whether it resolves is not known; check the resolver (/etc/resolv.conf)")
        elif exc is not None:
            why = exc.strerror if isinstance(exc, socket.gaierror) and exc.strerror else str(exc)
            problems.warn(at, f"upstream {text!r}: its name {host} does not resolve here ({why}): "
                              "cachegate would start, and each connection to this upstream fail "
                              "until it does; check the name, or the resolver here (/etc/hosts, "
                              "/etc/resolv.conf)")


def lookup_names(names: Iterable[tuple[str, int]], timeout: float
                 ) -> dict[tuple[str, int], Exception | None]:
    """Why each ``(name, port)`` does not resolve here (None: it does; TimeoutError: no answer
    in time), looked up as the pool does (``getaddrinfo``, TCP); each name in a thread of its
    own, all of them within ``timeout``. The threads are daemons: a lookup that outlives
    ``timeout`` is left to finish (the C resolver cannot be cancelled) without keeping the
    process from exiting."""
    found: dict[tuple[str, int], Exception | None] = {}

    def look(key: tuple[str, int]) -> None:
        try:
            socket.getaddrinfo(key[0], key[1], type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            found[key] = exc
        else:
            found[key] = None

    threads = {key: threading.Thread(target=look, args=(key,), name=f"lookup {key[0]}", daemon=True)
               for key in dict.fromkeys(names)}
    for thread in threads.values():
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads.values():
        thread.join(max(0.0, deadline - time.monotonic()))
    return {key: found[key] if key in found else TimeoutError() for key in threads}


def _check_addresses(s: Settings, problems: Problems, root: Src, o: Overrides) -> None:
    """admin.listen on the address of a client listener: the second one cannot bind, and the
    start fails ("address already in use") after the config passed."""
    admin = s.admin.listen
    if admin is None or not admin[1]:
        return
    mine: frozenset[str] | None = None
    for listener in s.listeners:
        if listener.port != admin[1]:
            continue
        # Names resolved as the listeners bind them: localhost:8080 beside 127.0.0.1:8080 passed,
        # and the start blamed "another process" for cachegate's own client listener.
        mine = bound_addresses(*admin) if mine is None else mine
        both = shared_address(bound_addresses(*listener.address), mine)
        if both is not None:
            at = ("<command line>", 0) if o.admin_listen is not None else _line(root, "admin", "listen")
            also = "" if both in (admin[0], listener.host) else f", both {both}"
            problems.add(at, f"admin.listen {_fmt_hostport(admin)} is the address of a client listener "
                             f"(listen {_fmt_hostport(listener.address)}{also}): give the admin API a "
                             "port of its own")
            return


def _check_running_admin(s: Settings, problems: Problems, root: Src, running: HostPort | None) -> None:
    """On a reload, the new token guards the listener that is running, not the new admin.listen.

    admin.listen changes only at a restart while admin.token applies at once, so a config that
    moves the admin API to loopback and drops the token in the same edit would, reloaded, leave
    the running network listener without a lock until the restart. The new address is checked
    as at start-up; this checks the running one, at the line of admin.token (or admin)."""
    if running is None or running == s.admin.listen or listens_on_loopback(running[0]):
        return
    where = (f"the running admin listener {_fmt_hostport(running)} (admin.listen changes only at a "
             "restart)")
    token = s.admin.token
    if token is None:
        problems.add(_line(root, "admin", "token"),
                     f"admin.token is not set, but {where} is not loopback: the admin API would be "
                     "open to anyone who can reach it; keep admin.token until a restart has moved "
                     "the listener to loopback")
    elif len(token) < MIN_TOKEN_LENGTH:
        problems.add(_line(root, "admin", "token"),
                     f"admin.token is {len(token)} characters long; {where} is not loopback and "
                     f"needs at least {MIN_TOKEN_LENGTH} until a restart has moved it to loopback")


def _fmt_hostport(hp: HostPort) -> str:
    host, port = hp
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def base_cache_options(s: Settings) -> CacheOptions:
    # What the store can really keep (half a disk shard at most; memory-only, what a record of
    # the shared memory holds for the configured workers), so that a response over it
    # is refused up front with Cache-Status detail=TOO-LARGE, not after streaming.
    c = s.cache
    disk = (c.disk.size, c.disk.shards) if c.disk is not None else None
    return CacheOptions(max_object=storable_limit(c.max_object, disk, c.memory_max_object, c.memory,
                                                  s.workers),
                        apparent_age=c.apparent_age)


def load_config(path: str | None, overrides: Overrides | None = None, *,
                running_admin: HostPort | None = None, display: str | None = None,
                machine: MachineCheck = "start", names: bool = False) -> Settings:
    """Load and validate; raise ConfigError with every ``FILE:LINE: message`` found.

    ``running_admin`` is the admin listener of a process that reloads: it keeps listening there
    until a restart, so the new token is checked against it too. ``display``: the config file
    that ``path`` holds a snapshot of (``proxy.yamlsrc.dump_snapshot``: a supervisor's workers
    load the config and rule files as it last loaded them good, ``ConfigCopy``): it is loaded
    from the snapshot's bytes alone, messages name it, and relative paths in it are relative to
    its directory. ``machine``: whether the config is checked against this machine
    (``MachineCheck``). ``names``: whether the upstreams' names are looked up, an unresolved
    one a warning (``cachegate check``; the pool resolves them as it connects). The settings
    keep the bytes of every file read (``Settings.sources``)."""
    problems = Problems()
    overrides = overrides or Overrides()
    sources = Sources()
    if path is None:
        root = Src({}, "<defaults>", 1)
        base_dir = os.getcwd()
    else:
        if display is not None:
            try:
                sources = load_snapshot(path)
            except (OSError, ValueError) as exc:
                problems.add((display, 0), f"cannot read the supervisor's copy of it ({path}): {exc}")
                raise ConfigError(problems.items, problems.warnings) from None
            path = display
        loaded = load_yaml(path, problems, sources=sources)
        if loaded is None:
            raise ConfigError(problems.items, problems.warnings)
        root = loaded
        base_dir = os.path.dirname(os.path.abspath(path))
    settings = read_settings(root, Context(problems, base_dir, sources=sources))
    settings = _apply_overrides(settings, overrides, problems)
    _check(settings, problems, root, overrides, running_admin, machine, names)
    files = [(f, rule_file_shown(f, path)) for f in settings.rule_files if sources.why_not(f) is None]
    rules = load_rules(files, base_cache_options(settings), problems, sources)
    if problems:
        raise ConfigError(problems.ordered(), problems.ordered_warnings())
    return replace(settings, rules=rules, warnings=tuple(problems.ordered_warnings()),
                   sources=tuple(sources.read.items()))


def load_admin_access(path: str, *, token: bool = False) -> AdminSettings:
    """Only ``admin.listen`` and ``admin.token`` of a config file: what ``cachegate health``,
    ``purge`` and ``top`` need to reach the running instance. Nothing else is read (no rule
    file, no other key, not this machine): a file saved with a mistake elsewhere, which a reload
    refused while the instance serves on, must not fail its health check. ConfigError with
    ``FILE:LINE`` when the file cannot be parsed or these two keys are wrong; with ``token``
    (the caller sends it), also when ``admin.token`` names an unset ``${VAR}``: sending no
    token only earned a 401 "admin token required", with no word of the variable."""
    loaded = Problems()
    root = load_yaml(path, loaded)
    if root is None:
        raise ConfigError(loaded.items)
    unset = _refused_under(root, "admin", "token")
    if token and unset:
        raise UnsetTokenVariable(unset)
    unset_listen = _refused_under(root, "admin", "listen")
    if unset_listen:  # not "no admin listener": it is written, with a variable not set here
        raise ConfigError(unset_listen)
    problems = Problems()  # an unset ${VAR} elsewhere in the file is no concern of ours
    written = root.value.get("admin") if isinstance(root.value, dict) else None
    if written is None or written.value is None:
        return AdminSettings()
    ctx = Context(problems, os.path.dirname(os.path.abspath(path)), name="admin",
                  where=(written.file, written.line))
    if isinstance(written.value, dict):
        keys = ("listen", "token")
        written = replace(written, value={k: v for k, v in written.value.items() if k in keys},
                          key_lines={k: v for k, v in written.key_lines.items() if k in keys})
    admin = read_section(AdminSettings, written, ctx)
    if problems:
        raise ConfigError(problems.ordered())
    return admin


def load_client_listeners(path: str) -> tuple[tuple[HostPort, bool], ...]:
    """Only ``listen`` of a config file: each client listener's address and whether it serves
    TLS, what ``cachegate warm --config`` needs to reach the proxy. Nothing else is read: not
    ``admin.token``'s ``${VAR}`` (on a systemd host it is set in a file only systemd reads),
    not a TLS listener's certificate and key (often readable by the service alone), no rule
    file. ConfigError with ``FILE:LINE`` when the file cannot be parsed or ``listen`` is wrong."""
    problems = Problems()
    root = load_yaml(path, problems)
    if root is None:
        raise ConfigError(problems.items)
    unset = _refused_under(root, "listen")
    if unset:  # not the default listener: one is written, with a variable not set here
        raise ConfigError(unset)
    problems = Problems()  # an unset ${VAR} elsewhere in the file is no concern of ours
    written = root.value.get("listen") if isinstance(root.value, dict) else None
    only = Src({}, root.file, root.line)
    tls: list[bool] = []
    if written is not None and written.value is not None:
        entries = written.value if isinstance(written.value, list) else [written]
        for e in entries:
            served = e.value.get("tls") if isinstance(e.value, dict) else None
            tls.append(served is not None and served.value is not None)
        plain = [replace(e, value={k: v for k, v in e.value.items() if k != "tls"})
                 if isinstance(e.value, dict) else e for e in entries]
        written = replace(written, value=plain) if isinstance(written.value, list) else plain[0]
        line = root.key_lines.get("listen", root.line)
        only = Src({"listen": written}, root.file, root.line, {"listen": line})
    settings = read_section(Settings, only, Context(problems, os.path.dirname(os.path.abspath(path))),
                            source=root.file)
    if problems:
        raise ConfigError(problems.ordered())
    tls += [False] * (len(settings.listeners) - len(tls))  # the default listener
    return tuple((li.address, served) for li, served in zip(settings.listeners, tls, strict=True))


REFERENCE_INTRO = """\
# Configuration reference

<!-- Written by scripts/config-reference from the declarations in proxy/settings.py (and
proxy/cluster/settings.py): change those, then run it; tests/config fails while this page
differs from what they say. -->

Every key of the config file, with its type, its default and what it does. `cachegate check
--config FILE` checks a file against the same declarations and reports each problem as
`FILE:LINE: message` (an unknown key with the closest known one, a value of the wrong type,
a value out of range), every problem of the file at once. The README shows a whole file;
rule files have their own reference, [rules.md](rules.md).

- Durations: a number of seconds (`30`, `1.5`), or numbers with units `ms`, `s`, `m`, `h`, `d`,
  `w` (`500ms`, `30s`, `5m`, `1h`, `1d`, `1w`), combined (`1h30m`, `1h 30m`), with or
  without a space before the unit (`10s`, `10 s`), in any case; never
  negative, at most 2147483648 seconds (2^31, about 68 years, as HTTP caps its delta-seconds),
  never `.inf` or `.nan`.
- Sizes: a number of bytes (`1048576`), or a number (decimals too: `1.5MB`, rounded down to a
  byte) with a unit `B`, `KB`, `MB`, `GB`, `TB` (binary multiples: `1KB` is 1024 bytes; `K`,
  `M`, `G`, `T` and `KiB`, `MiB`, `GiB`, `TiB` are the same), with or without a space before the
  unit (`10GB`, `10 GB`), in any case (`10gb`); never negative, at most `1024TB`.
- A bare number is a YAML number, so `1_000_000` and `0x100000` are numbers too; but for a
  duration, a size, a count (`workers`, `pool_size`, ...) or a status code, `1:30` (YAML reads
  base 60: 90) and `010` (octal: 8) are refused: write `1m30s`, `10`. Where a string is
  expected (a header value or name, a rule's `equals`), a bare number is taken as written:
  `010` is the text `010`, `1.50` the text `1.50`.
- Config and rule files are UTF-8 YAML without anchors, aliases and merge keys (`&name`,
  `*name`, `<<:`): write each value out. Messages show values in YAML's words (`null`, `true`,
  `!!binary aGk=`, `2024-01-01`). Each is a regular file (or a link to one): a FIFO, a
  socket, a device or a directory is refused at start, on reload and by `check`, in the same
  words for the config as for a rule file (`FILE:0: cannot read file: is not a regular file (a
  FIFO)`, `... is a directory`), never waited on; `/dev/null` reads as an empty file.
- Relative paths are relative to the config file. A path holding a character the file system
  encoding cannot write (`règles.yaml` under an ASCII locale, `LC_ALL=POSIX` without
  `PYTHONUTF8=1`) is refused at its line, saying so: run with a UTF-8 locale or rename it. So is
  the socket path of a `cluster.redis: unix://...` URL.
- `${VAR}` in a value is the environment variable `VAR`; `${VAR:-default}` gives a default
  (an unset variable without one is a problem). Inside `[...]` or `{...}` braces are YAML's:
  quote it there (`cache: {memory: '${M}'}`); an unquoted one is a YAML syntax error.
- A key written as null takes its default, unless its line says what null means.
- Some values are checked together, and against this machine: `admin.listen` on the address of
  a client listener is a problem, and so are sizes that leave room for no body at all
  (`cache.memory: 0` with `disk: null`, `cache.disk.size: 0`, `cache.max_object: 0`: to cache
  nothing on purpose, write a rule with `bypass: true`) and a `cache.memory` bigger than the
  machine's memory and swap together (`/proc/meminfo`); a `cache.memory` bigger than its
  memory alone or than the memory limit of the process's cgroup (a container's, a unit's
  `MemoryMax=`: `memory.max`, or `memory.limit_in_bytes` with cgroup v1), a cgroup memory
  limit below `cache.memory` + 100 MB for each process (each worker and, with two or more,
  the supervisor: [deploy.md](deploy.md), "Memory"; the warning says the figure), and a
  `cache.disk.size` bigger than the whole filesystem under `cache.disk.path`, are warnings.
  A `cache.disk.shards` whose open files (up to 14 a shard in every process: each of the
  threads that use a shard keeps its own SQLite connection, a database and a log file) leave
  fewer than 128 connections under this machine's open-files limit (the hard `RLIMIT_NOFILE`,
  which a start raises its soft limit to) is a problem (on a reload, a warning), naming the
  most shards that fit: such a start listened, then closed every connection unanswered.
  The checks against this machine are made by `cachegate check` and when `cachegate run`
  starts (the process that makes the shared memory and the cache directory), not by the
  workers it starts nor restarts, which use what it made; a reload only warns (the cache
  tiers change at a restart), so a machine that reports less memory since (a `swapoff`, a
  balloon driver) never keeps a running instance's workers from starting again.
- `cachegate check` looks each upstream's name up (all at once, 2s at most in all) and warns
  at its line of one that does not resolve there, or that the resolver did not answer for in
  time: not an error, as DNS may be out of reach where `check` runs (a CI builder); `--strict`
  refuses it, and `--no-lookup` looks no name up (a CI builder's `check --strict`). The start
  and a reload look nothing up: the pool resolves names as it connects
  ([upstreams.md](upstreams.md#the-upstream-pool)).
- Choices that weaken a safe default
  ([SECURITY.md](../SECURITY.md#safe-defaults-and-what-each-option-does-to-them)) are warnings
  at their line: a `trusted_proxies` or `admin.purge_from` network wider than a
  /8 (IPv4) or a /32 (IPv6; unique-local `fc00::/7` and link-local `fe80::/10` are not), as
  `0.0.0.0/0` or `::/0` (everyone may set forwarding fields, or purge), and
  `upstream.tls.verify: false` (upstream certificates are not checked).
- A TLS listener's certificate that loads but that clients refuse, expired or not valid yet,
  or that expires within 14 days, is a warning at its `cert` line (`check`, a start, a reload:
  its answer's `warnings`), saying the date; `--strict` refuses it. A running instance checks
  the certificates it serves again every 12 hours and as one enters its last 14 days or
  expires, and logs the same warning (at most once a day each) without a reload
  ([deploy.md](deploy.md#listeners-and-tls)).
- A reload (SIGHUP, `POST /reload`) applies most keys at once; `listen` (its addresses),
  `admin.listen`, `upstreams`, `upstream`, `workers`, `cluster` and every `cache` key but
  `cache.tag_headers`, `cache.lock_timeout` and `cache.range_fill` keep their running values
  until a restart, and the reload names each one that changed in `restart_required` (and the
  log): `cache.max_object`, `cache.memory_max_object`, `cache.memory_policy`,
  `cache.hit_for_pass`, `cache.memory`, `cache.disk.size`, ...
  ([rules.md](rules.md#reload-without-a-restart)).
"""


def reference_page() -> str:
    """docs/configuration.md: every key's type, default and meaning, from the declarations."""
    tables = re.sub(r"docs/([\w-]+\.md)", r"[\1](\1)", reference(Settings))  # links from docs/
    return REFERENCE_INTRO + "\n" + tables


if __name__ == "__main__":  # scripts/config-reference
    import sys

    sys.stdout.write(reference_page())
