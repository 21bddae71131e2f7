"""Starting on a full filesystem: a full disk is no damage.

What is stored is sound, only without room: nothing is set aside or emptied for it. Either
cachegate starts and serves, or (when the disk tier cannot be opened at all) every process
stops with one line naming the cache directory and its full filesystem: no traceback, no
worker restarted again and again. Once there is room, every entry is still there.

A real tmpfs of a few MiB: only where the test may mount one (root on Linux).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from proxy.storage.index import UrlTagIndex
from proxy.storage.persist import MAX_ATTEMPTS
from tests.conftest import MakeProxy
from tests.harness import Origin, write_config
from tests.storage.helpers import entry, open_store, store
from tests.storage.test_damaged import HOST, KEYS, filled, x_caches
from tests.tmpfs import mounted_tmpfs

CONFIG = "cache: {memory: 16MB, disk: {path: cache, size: 4MB, shards: 2}}\nshutdown_grace: 1s\n"


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted for the test (root on Linux only), lazily unmounted after."""
    yield from mounted_tmpfs(tmp_path / "small", "8m")


def fill(filesystem: Path, leave: int) -> Path:
    """Fill ``filesystem`` with one file until ``leave`` bytes are left free."""
    filler = filesystem / "filler"
    free = shutil.disk_usage(filesystem).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def run(config: str, workers: int, on_line: Callable[[str], None] = lambda line: None) -> tuple[int | None, str]:
    """``cachegate run`` until it serves or exits: (its exit status, None if it served; its output)."""
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", config, "--workers", str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    out = []
    deadline = time.monotonic() + 20
    with proc.stdout:
        for line in proc.stdout:
            out.append(line)
            on_line(line)
            if "started:" in line or time.monotonic() > deadline:
                proc.terminate()
    code = proc.wait(10)  # (stopped once it started: reaped too)
    return (None if "started:" in "".join(out) else code), "".join(out)


def one_line_says_full(out: str, cache: Path, processes: int = 1) -> None:
    """One line of each process that met it (the workers' are alike) names the directory."""
    said = [line for line in out.splitlines() if line.startswith("cachegate: cannot open the cache directory")]
    assert 1 <= len(said) <= processes, out
    assert all(str(cache) in line and "filesystem is full" in line for line in said), out


@pytest.mark.parametrize(("leave", "workers"), [(0, 1), (64 * 1024, 1), (0, 2)])
async def test_a_full_filesystem_at_start_loses_nothing_and_says_so_in_one_line(
        origin: Origin, make_proxy: MakeProxy, small_tmpfs: Path, leave: int, workers: int) -> None:
    directory = small_tmpfs / "p"
    await filled(origin, make_proxy, directory, CONFIG)
    cache = directory / "cache"
    before = sorted(p.name for p in cache.iterdir())
    filler = fill(small_tmpfs, leave)

    code, out = run(write_config(str(directory), origin.url, CONFIG), workers)
    assert "Traceback" not in out and "restarting" not in out, out
    assert not [p for p in cache.iterdir() if ".corrupt-" in p.name]  # nothing set aside
    assert set(before) <= {p.name for p in cache.iterdir()}
    if code is not None:  # it could not open the cache directory: one line says why
        assert code == 1, out
        one_line_says_full(out, cache)

    filler.unlink()  # room again: every entry is still there
    proxy = await make_proxy(config=CONFIG, directory=directory)
    assert await x_caches(proxy) == ["HIT"] * KEYS


async def test_workers_that_meet_a_full_filesystem_at_start_stop_it_once(
        origin: Origin, make_proxy: MakeProxy, small_tmpfs: Path) -> None:
    """The supervisor opened the cache directory; the filesystem is full before its workers open
    it: they fail alike, and so would their restarts. The start fails once, with one line."""
    directory = small_tmpfs / "p"
    await filled(origin, make_proxy, directory, CONFIG)
    cache = directory / "cache"
    fillers: list[Path] = []

    def fill_once_a_worker_starts(line: str) -> None:
        if "worker 0 started" in line and not fillers:
            fillers.append(fill(small_tmpfs, 0))

    code, out = run(write_config(str(directory), origin.url, CONFIG), 2, fill_once_a_worker_starts)
    assert fillers, out
    assert (code, "Traceback" in out, "restarting" in out) == (1, False, False), out
    one_line_says_full(out, cache, processes=2)
    assert out.count("cannot open the cache directory; stopping") == 1, out
    assert not [p for p in cache.iterdir() if ".corrupt-" in p.name]

    fillers[0].unlink()
    proxy = await make_proxy(config=CONFIG, directory=directory)
    assert await x_caches(proxy) == ["HIT"] * KEYS


async def test_a_purge_on_a_full_filesystem_is_a_503_naming_it_and_purges_once_there_is_room(
        origin: Origin, make_proxy: MakeProxy, small_tmpfs: Path) -> None:
    """A purge's bans and deletions cannot be committed on a full filesystem: it fails safe
    (never answered as done), and says why (503, the admin API's error format), not a bare 500."""
    directory = small_tmpfs / "p"
    for i in range(KEYS):
        origin.route(f"/k{i}", body=b"x" * 100 + str(i).encode(),
                     headers={"Cache-Control": "max-age=600", "Surrogate-Key": f"t{i % 2}"})
    proxy = await make_proxy(config=CONFIG, directory=directory)
    assert await x_caches(proxy) == ["MISS"] * KEYS
    await proxy.runtime.storage.flush()
    filler = fill(small_tmpfs, 0)

    for spec in ({"tags": ["t1"]}, {"urls": [f"http://{HOST['Host']}/k0"]}, {"all": True}):
        reply = await proxy.admin("POST", "/purge", json=spec)
        assert reply.status == 503, (spec, reply)
        error = json.loads(reply.body)["error"]
        assert "filesystem is full" in error and "(cache.disk.path)" in error and "purge again" in error, error
    assert await x_caches(proxy) == ["HIT"] * KEYS  # nothing answered as purged: nothing was

    filler.unlink()
    reply = await proxy.admin("POST", "/purge", json={"tags": ["t1"]})
    assert reply.status == 200, reply
    assert await x_caches(proxy) == ["MISS" if i % 2 else "HIT" for i in range(KEYS)]


def test_an_index_made_at_this_start_answers_new_threads_on_a_full_filesystem(small_tmpfs: Path) -> None:
    """Each storage thread opens its own connection to the index. One opened after the
    filesystem filled must still read it: the setup that only a new file's first connection
    needs (``PRAGMA auto_vacuum``) wrote even where it changed nothing, so a purge whose lookup
    ran in a thread without a connection yet was a 500 "database or disk is full"."""
    index = UrlTagIndex(str(small_tmpfs / "index"))
    assert index.created
    index.add("http://site.test/a", ("t",))
    fill(small_tmpfs, 0)
    with ThreadPoolExecutor(1) as fresh:
        assert fresh.submit(index.keys_for_url, "http://site.test/a").result() == ["http://site.test/a"]
    index.close()


async def test_a_purge_whose_lookup_meets_a_full_filesystem_is_a_503(
        origin: Origin, make_proxy: MakeProxy, small_tmpfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the index can still fail for want of room (its shared-memory file growing): the
    purge then says so as for its writes, a 503, and nothing is answered as purged."""
    directory = small_tmpfs / "p"
    origin.route("/k", body=b"x", headers={"Cache-Control": "max-age=600"})
    proxy = await make_proxy(config=CONFIG, directory=directory)
    assert (await proxy.get("/k", headers=HOST)).headers["X-Cache-Status"] == "MISS"
    await proxy.runtime.storage.flush()
    fill(small_tmpfs, 0)

    def no_room(url: str) -> list[str]:
        raise OSError(errno.ENOSPC, "No space left on device")

    index = proxy.runtime.storage.index
    assert index is not None
    monkeypatch.setattr(index, "keys_for_url", no_room)
    reply = await proxy.admin("POST", "/purge", json={"urls": [f"http://{HOST['Host']}/k"]})
    assert reply.status == 503, reply
    assert "filesystem is full" in json.loads(reply.body)["error"]
    assert (await proxy.get("/k", headers=HOST)).headers["X-Cache-Status"] == "HIT"


BEHIND = ("cache: {memory: 16MB, memory_max_object: 256KB, disk: {path: cache, size: 64MB, shards: 1}}\n"
          "shutdown_grace: 1s\n")


def unreferenced(cache: Path) -> list[str]:
    """The value files of the shards that no row of their ``Cache`` table refers to: outside the
    disk budget, and on a full filesystem keeping it full."""
    found = []
    for shard in sorted(p for p in cache.iterdir() if (p / "cache.db").exists()):
        db = sqlite3.connect(f"file:{shard / 'cache.db'}?mode=ro", uri=True)
        try:
            referred = {r[0] for r in db.execute("SELECT filename FROM Cache WHERE filename IS NOT NULL")}
        finally:
            db.close()
        found += [str(f.relative_to(shard)) for f in shard.rglob("*.val")
                  if str(f.relative_to(shard)) not in referred]
    return found


async def test_a_write_behind_batch_that_fails_on_a_full_filesystem_leaves_no_file_behind(
        origin: Origin, make_proxy: MakeProxy, small_tmpfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One batch: a body's file written whole, the next one's cut short by ENOSPC. The batch
    rolls back; both files go with it (they were outside the budget and kept the filesystem
    full until a sweep an hour later, and each retry wrote new ones). With room, the retry
    stores both."""
    monkeypatch.setenv("CACHEGATE_PERSIST_INTERVAL", "3600")  # the batch is the test's flush
    bodies = {"/a": os.urandom(100_000), "/b": os.urandom(200_000)}
    for path, body in bodies.items():
        origin.route(path, body=body, headers={"Cache-Control": "max-age=600"})
    proxy = await make_proxy(config=BEHIND, directory=small_tmpfs / "p")
    cache = Path(proxy.cache_dir)
    filler = fill(small_tmpfs, 150 * 1024)

    for path, body in bodies.items():  # answered whole, from memory, not on disk yet
        reply = await proxy.get(path, headers=HOST)
        assert (reply.status, reply.body == body) == (200, True)
    assert await proxy.runtime.storage.flush() == 0
    assert proxy.runtime.storage.disk is not None and proxy.runtime.storage.disk.count() == 0
    assert unreferenced(cache) == []

    filler.unlink()
    assert await proxy.runtime.storage.flush() == 2
    assert unreferenced(cache) == []
    for path, body in bodies.items():
        reply = await proxy.get(path, headers=HOST)
        assert (reply.status, reply.body == body, reply.x_cache) == (200, True, "HIT")


async def test_a_big_body_whose_copy_to_disk_fails_on_a_full_filesystem_leaves_no_file_behind(
        origin: Origin, make_proxy: MakeProxy, small_tmpfs: Path) -> None:
    """A body too big for memory is copied to disk by the process that fetched it: cut short by
    ENOSPC, its truncated file is removed at once, as its spool file is."""
    body = os.urandom(400_000)
    origin.route("/big", body=body, headers={"Cache-Control": "max-age=600"})
    proxy = await make_proxy(config=BEHIND, directory=small_tmpfs / "p")
    cache = Path(proxy.cache_dir)
    filler = fill(small_tmpfs, 600 * 1024)  # room for its spool file, not for a copy beside it

    reply = await proxy.get("/big", headers=HOST)
    assert (reply.status, reply.body == body) == (200, True)
    for _ in range(500):  # until the fill's store is over (it goes on after the answer)
        if not proxy.runtime.storage.work.writes and not list((cache / "tmp").rglob("spool-*")):
            break
        await asyncio.sleep(0.01)
    assert proxy.runtime.storage.disk is not None and proxy.runtime.storage.disk.count() == 0
    assert unreferenced(cache) == []

    filler.unlink()  # room again: stored by the next fill
    assert (await proxy.get("/big", headers=HOST)).x_cache == "MISS"
    reply = await proxy.get("/big", headers=HOST)
    assert (reply.status, reply.body == body, reply.x_cache) == (200, True, "HIT")


async def test_spool_files_of_dead_processes_make_room_before_the_full_filesystem_check(
        origin: Origin, make_proxy: MakeProxy, small_tmpfs: Path) -> None:
    """A process killed mid-fill leaves its spool folder (half-received bodies, up to a quarter
    of the disk budget). On a full filesystem they held the room SQLite needs to open the
    databases, and cachegate refused to start before the sweep that would have removed them:
    the owner now empties them first (keeping the folder's intent log for that sweep)."""
    directory = small_tmpfs / "p"
    await filled(origin, make_proxy, directory, CONFIG)
    cache = directory / "cache"
    dead = cache / "tmp" / "999999-deadbeef"  # no process holds its lock: a dead one's
    dead.mkdir(parents=True, exist_ok=True)
    (dead / ".owner.lock").touch()
    (dead / "spool-half").write_bytes(b"\0" * (1 << 20))
    filler = fill(small_tmpfs, 0)

    code, out = run(write_config(str(directory), origin.url, CONFIG), 1)
    assert code is None and "Traceback" not in out, out  # it started
    assert not dead.exists() or not (dead / "spool-half").exists()

    filler.unlink()
    proxy = await make_proxy(config=CONFIG, directory=directory)
    assert await x_caches(proxy) == ["HIT"] * KEYS


def value_files(cache: Path) -> list[Path]:
    return list(cache.rglob("*.val"))


async def test_a_variant_whose_body_is_gone_is_forgotten_quietly_on_a_full_filesystem(
        origin: Origin, make_proxy: MakeProxy, small_tmpfs: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A reviewer filled the filesystem under a running cachegate: each request for a variant
    whose body file the disk tier had culled logged an ERROR traceback "could not drop" and two
    warnings "the purge could not be written ... purge again", though no purge was asked (179
    tracebacks in 20 s). Forgetting such a variant is internal: it is forgotten (the next
    request refetches), and its disk part's failure is counted and logged once per streak."""
    paths = [f"/g{i}" for i in range(6)]
    bodies = {p: os.urandom(300_000) for p in paths}  # over memory_max_object: held on disk only
    for p, body in bodies.items():
        origin.route(p, body=body, headers={"Cache-Control": "max-age=600"})
    proxy = await make_proxy(config=BEHIND, directory=small_tmpfs / "p")
    cache = Path(proxy.cache_dir)
    storage = proxy.runtime.storage
    for p in paths:
        assert (await proxy.get(p, headers=HOST)).x_cache == "MISS"
    for _ in range(500):  # until the fills' stores are over (they go on after the answers)
        if not storage.work.writes and len(value_files(cache)) >= len(paths):
            break
        await asyncio.sleep(0.01)
    await storage.flush()
    assert len(storage.body_files) == 0  # none kept open (a hit would send from it)
    for f in value_files(cache):  # culled under the disk tier's record
        os.unlink(f)
    fill(small_tmpfs, 0)
    caplog.set_level(logging.INFO, logger="cachegate")
    caplog.clear()

    for _ in range(3):
        for p, body in bodies.items():
            reply = await proxy.get(p, headers=HOST)
            assert (reply.status, reply.body == body) == (200, True)
            assert reply.x_cache != "HIT"  # forgotten: refetched (and not stored: no room)
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    said = [r.getMessage() for r in records]
    assert not [s for s in said if "could not drop" in s or "purge could not be written" in s], said
    assert not [r for r in records if r.exc_info], said
    assert len(said) <= 1, said  # the streak of storage write failures: once
    assert all(origin.count(p) == 4 for p in paths)
    forgets = proxy.runtime.engine.write_failures.counts.get("forget", 0)
    assert forgets >= 1  # its disk part failed for want of room: counted
    metrics = (await proxy.admin("GET", "/metrics")).body.decode()
    assert f'cachegate_storage_errors_total{{operation="forget"}} {float(forgets)}' in metrics


@pytest.mark.parametrize("leave", [0, 1_000_000], ids=["index-and-shard-full", "shard-full"])
async def test_a_stops_flush_on_a_full_filesystem_gives_up_as_write_behind_does(small_tmpfs: Path,
                                                                                 leave: int) -> None:
    """A stop's flush tries a shard whose lock timed out again until its deadline (the lock may be
    let go); a write that fails for want of room fails at once each time, and is tried
    ``persist.MAX_ATTEMPTS`` times as write-behind's are, not until the deadline (a stop on a full
    disk spun there, ``shutdown_grace`` long). Whether the index fails first (no room at all) or
    only the shard's body files (the index still has room: the shard's error was caught inside
    ``commit_many`` and looked like a lock's timeout)."""
    storage = open_store(str(small_tmpfs / "c"), shards=1)
    try:
        for i in range(20):
            assert await store(storage, entry(f"http://site.test/full/{i}"), os.urandom(60_000), flush=False)
        filler = fill(small_tmpfs, leave)
        persister = storage.persister
        assert persister is not None
        # (A deadline far out: the flush must end on its own, after its attempts.)
        assert await asyncio.wait_for(storage.flush(until=time.monotonic() + 600), 60) == 0
        # Each record tried 1 + MAX_ATTEMPTS times at most (the stop's retries past it took
        # hundreds), then given up on as write-behind gives up: what the stop's warning counts.
        assert 0 < persister.stats.failed <= 20 * (1 + MAX_ATTEMPTS), persister.stats
        assert persister.unwritten() == 20
        filler.unlink()
    finally:
        storage.close()
