"""Worker processes filling different variants (``Vary``) of the same keys at once, on one shared
memory: every variant a fill was told was stored stays there (nothing is written behind here,
so a variant dropped from memory would be lost for good).

Each put reads the key's record, merges its variant in and writes the key anew. Running free,
the workers met in that window often enough to lose dozens to hundreds of variants each, every
run, before a put named the record it read. In lockstep each waits, after its first read of a
put, until every worker has read (the parent lets them on together), so they all merge into
the same record and then write: the interleaving that lost variants, forced in every round."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from proxy.storage.arena import Arena
from proxy.storage.memory import MemoryTier

pytestmark = pytest.mark.slow

ROOT = str(Path(__file__).resolve().parents[2])
WORKERS = 3
ROUNDS = 500  # per key: 1,000 fills per worker
VARIANTS = 8  # Vary values per worker and key: 24 variants a key, within MAX_VARIANTS
KEYS = ("http://h.test/a", "http://h.test/b")

CHILD = r"""
import asyncio, json, os, sys
from proxy.storage.arena import Arena
from proxy.storage.memory import MemoryTier
from proxy.storage.tiered import Storage
from tests.storage.helpers import entry

fd, me, rounds, variants, looked, go, lockstep = (int(a) for a in sys.argv[1:8])
keys = json.loads(sys.argv[9])
memory = MemoryTier(16 << 20, 64 * 1024, arena=Arena.attach(fd), doorkeeper=0)
store = Storage(memory, None, None, max_object=64 * 1024, spool_root=sys.argv[8])
real_peek, real_put_variant = memory.peek, store.writes._put_variant
first = []

def peek(key):
    seen = real_peek(key)
    if first and lockstep:  # a put's first read of the key: wait until every worker has read it
        first.clear()
        os.write(looked, b".")
        os.read(go, 1)
    return seen

def put_variant(new):
    first.append(True)
    return real_put_variant(new)

memory.peek = peek
store.writes._put_variant = put_variant

async def main():
    last = {}  # (key, Vary value) -> (body id, body) of its last fill that memory took
    stored = lost = 0
    for r in range(rounds):
        for key in keys:
            value = f"{me}-{r % variants}"
            held = {c.entry.body_id for c in real_peek(key) or () if c.body is not None}
            if (key, value) in last and last[key, value][0] not in held:
                lost += 1  # only this worker writes this variant: another's write dropped it
            e = entry(key, vary=(("x-worker", value),))
            body = f"{me}/{r}/{key}".encode()
            spool = store.spool(e, len(body))
            assert await spool.write(body)
            final = store.finalize(e, spool)
            if store.put_memory(final, spool):
                stored += 1
                last[key, value] = (final.body_id, body.decode())
            await store.put_disk(final, spool)
    print(json.dumps({"stored": stored, "lost": lost,
                      "last": [[k, v, b, body] for (k, v), (b, body) in last.items()]}), flush=True)

asyncio.run(main())
store.close()
"""


def _lockstep(looked: list[int], go: list[int]) -> None:
    """Let every worker go on once each has read (a byte from each): until one of them ends."""
    try:
        while all(os.read(fd, 1) for fd in looked):
            for fd in go:
                os.write(fd, b".")
    finally:
        for fd in go:  # a worker that ended early must not leave the others waiting
            os.close(fd)


@pytest.mark.parametrize("lockstep", [True, False], ids=["lockstep", "free-running"])
def test_workers_filling_different_variants_of_one_key_at_once_lose_none_of_them(
        tmp_path: Path, lockstep: bool) -> None:
    # Room for all the run writes (~15 MB): each variant's body is a record of its own, which
    # ages out of the ring as any record does (a worker done early sees its variants' bodies
    # reach the tail while the others still rewrite the key's record); what is checked here is
    # that merging never drops one (``evictions`` stays 0).
    arena = Arena.create(32 << 20)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH")))))
    children, looked, go = [], [], []
    coordinator = None
    try:
        for me in range(WORKERS):
            looked_r, looked_w = os.pipe()
            go_r, go_w = os.pipe()
            children.append(subprocess.Popen(
                [sys.executable, "-c", CHILD, str(arena.fd), str(me), str(ROUNDS), str(VARIANTS),
                 str(looked_w), str(go_r), str(int(lockstep)), str(tmp_path / "spool"), json.dumps(KEYS)],
                pass_fds=(arena.fd, looked_w, go_r), stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT))
            os.close(looked_w)
            os.close(go_r)
            looked.append(looked_r)
            go.append(go_w)
        coordinator = threading.Thread(target=_lockstep, args=(looked, go), daemon=True)
        coordinator.start()
        reports = []
        for child in children:
            out, _ = child.communicate(timeout=100)
            assert child.returncode == 0, out
            reports.append(json.loads(out))
        coordinator.join(10)
        # No worker saw a variant it had stored dropped since.
        assert [r["lost"] for r in reports] == [0] * WORKERS
        if lockstep:  # every fill went in (some after reading and merging again)
            assert [r["stored"] for r in reports] == [ROUNDS * len(KEYS)] * WORKERS
        else:  # (a fill beaten PUT_TRIES times in a row is not in memory: it would go to disk)
            assert all(r["stored"] > ROUNDS for r in reports)
        # ... nor is any missing now: each one's last fill of each variant, with its body.
        assert arena.evictions == 0
        memory = MemoryTier(16 << 20, 64 * 1024, arena=arena, doorkeeper=0)
        held = {(k, c.entry.body_id): memory.body_bytes(c) for k in KEYS for c in memory.peek(k) or ()}
        assert len(held) == sum(len(r["last"]) for r in reports) == WORKERS * VARIANTS * len(KEYS)
        for report in reports:
            for key, _, body_id, body in report["last"]:
                assert held.get((key, body_id)) == body.encode(), (key, body_id)
        memory.close()
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()
        for fd in looked + (go if coordinator is None else []):
            os.close(fd)
        arena.close()
