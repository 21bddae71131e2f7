"""Who holds the shared memory's locks and who waits (``proxy.storage.lockwait``), and what the
supervisor's watchdog does with a silent worker (``Supervisor._unresponsive``), with real
processes holding and waiting for the arena's POSIX locks.

The supervisor's end-to-end case (a worker stopped holding the ring lock under load) is in
tests/storage/test_workers.py; here each order of two pings timing out is played directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from proxy.config import Overrides, load_config
from proxy.storage.arena import LEASE_LOCK, RING_LOCK, Arena
from proxy.storage.lockwait import parse, read_locks
from proxy.supervisor import Supervisor, Worker
from tests.storage.procs import write_config

PROC_LOCKS = """\
1: POSIX  ADVISORY  WRITE 100 00:01:777 0 0
1: -> POSIX  ADVISORY  WRITE 200 00:01:777 0 0
2: POSIX  ADVISORY  WRITE 200 00:01:777 1 1
2: -> POSIX  ADVISORY  WRITE 300 00:01:777 1 1
3: POSIX  ADVISORY  WRITE 400 00:01:778 0 0
3: -> POSIX  ADVISORY  WRITE 500 00:01:778 0 0
4: OFDLCK ADVISORY  WRITE -1 00:01:777 2 2
5: FLOCK  ADVISORY  WRITE 600 fd:00:777 0 EOF
"""


def test_a_waiter_is_traced_to_the_holder_at_the_end_of_the_chain() -> None:
    locks = parse(PROC_LOCKS, (0, 1), 777)
    assert locks.blocker(200) == (100, 0)  # 200 waits for byte 0, which 100 holds
    assert locks.blocker(300) == (100, 0)  # 300 waits for 200, which waits for 100
    assert locks.blocker(100) is None  # holds, waits for nothing
    assert locks.blocker(500) is None  # another file's lock
    assert locks.held_by(200) == [1]
    assert locks.waiters_for(100) == {200}
    assert locks.waiters_for(200) == {300}


def test_a_lock_to_the_end_of_the_file_and_other_files_lines_are_read_or_skipped() -> None:
    text = "1: POSIX  ADVISORY  WRITE 10 00:01:9 0 EOF\n1: -> POSIX  ADVISORY  WRITE 11 00:01:9 2 2\n" \
           "garbage\n2: POSIX ADVISORY WRITE x 00:01:9 0 0\n"
    locks = parse(text, (0, 1), 9)
    assert locks.blocker(11) == (10, 0)
    assert len(locks.entries) == 2


HOLD = "import fcntl, sys, time; fcntl.lockf(int(sys.argv[1]), fcntl.LOCK_EX, 1, int(sys.argv[2])); " \
       "print('locked', flush=True); time.sleep(120)"


@pytest.fixture
async def arena() -> AsyncIterator[Arena]:
    a = Arena.create(1 << 20)
    yield a
    a.close()


class Children:
    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.procs: list[asyncio.subprocess.Process] = []

    async def locking(self, byte: int = RING_LOCK, wait: bool = True) -> asyncio.subprocess.Process:
        """A process that takes the arena's lock ``byte`` (and then sleeps): once it holds it
        (``wait``), or right away (it waits for the lock)."""
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOLD, str(self.arena.fd), str(byte), pass_fds=(self.arena.fd,),
            stdout=asyncio.subprocess.PIPE)
        self.procs.append(p)
        if wait:
            assert p.stdout is not None
            assert await asyncio.wait_for(p.stdout.readline(), 30) == b"locked\n"
        return p

    async def waiting(self, byte: int = RING_LOCK) -> asyncio.subprocess.Process:
        p = await self.locking(byte, wait=False)
        for _ in range(3000):
            locks = read_locks(self.arena.fd)
            if locks is not None and locks.blocker(p.pid) is not None:
                return p
            await asyncio.sleep(0.01)
        raise AssertionError("never waited for the lock")

    async def got_it(self, p: asyncio.subprocess.Process) -> bool:
        assert p.stdout is not None
        return await asyncio.wait_for(p.stdout.readline(), 10) == b"locked\n"

    async def close(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                    p.kill()
                await p.wait()


@pytest.fixture
async def children(arena: Arena) -> AsyncIterator[Children]:
    c = Children(arena)
    yield c
    await c.close()


def supervisor(tmp_path: Path, arena: Arena, *procs: asyncio.subprocess.Process) -> Supervisor:
    config = write_config(str(tmp_path), "http://127.0.0.1:9", "cache: {memory: 4MB}\n")
    sup = Supervisor(load_config(config, Overrides()), config, Overrides())
    sup.runtime = SimpleNamespace(storage=SimpleNamespace(memory=SimpleNamespace(arena=arena)))  # type: ignore[assignment]
    sup.workers = [Worker(i, process=p) for i, p in enumerate(procs)]
    return sup


async def test_the_real_locks_of_the_arena_name_holder_and_waiter(arena: Arena, children: Children) -> None:
    holder = await children.locking(LEASE_LOCK)
    waiter = await children.waiting(LEASE_LOCK)
    locks = read_locks(arena.fd)
    assert locks is not None
    assert locks.blocker(waiter.pid) == (holder.pid, LEASE_LOCK)
    assert locks.waiters_for(holder.pid) == {waiter.pid}


@pytest.mark.parametrize("holder_exited_meanwhile", [False, True], ids=["same-moment", "holder-gone"])
async def test_when_the_holders_ping_times_out_first_the_waiter_is_pinged_again_not_killed(
        tmp_path: Path, arena: Arena, children: Children, holder_exited_meanwhile: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    """Both pings timed out: the holder's is handled first (it holds the lock, waits for
    nothing: killed); the waiter's next, at the same moment (the holder not dead yet, still
    holding) or once the holder is gone (the waiter no longer waits): either way it waited for
    a lock of a process killed since its ping went out, and is pinged again."""
    holder = await children.locking()
    os.kill(holder.pid, signal.SIGSTOP)
    waiter = await children.waiting()
    sup = supervisor(tmp_path, arena, holder, waiter)
    sent = time.monotonic() - 3
    assert await sup._unresponsive(sup.workers[0], holder, silent_for=3, sent=sent) is True
    if holder_exited_meanwhile:
        await holder.wait()
        assert await children.got_it(waiter)
    assert await sup._unresponsive(sup.workers[1], waiter, silent_for=3, sent=sent) is False
    assert await holder.wait() == -signal.SIGKILL
    assert waiter.returncode is None
    if not holder_exited_meanwhile:
        assert await children.got_it(waiter)
    assert not any(f"pid {waiter.pid}) did not answer a ping for 3s (its event loop" in r.message
                   for r in caplog.records)


async def test_when_the_waiters_ping_times_out_first_the_holder_is_killed_for_it(
        tmp_path: Path, arena: Arena, children: Children, caplog: pytest.LogCaptureFixture) -> None:
    holder = await children.locking()
    os.kill(holder.pid, signal.SIGSTOP)
    waiter = await children.waiting()
    sup = supervisor(tmp_path, arena, holder, waiter)
    sent = time.monotonic() - 3
    assert await sup._unresponsive(sup.workers[1], waiter, silent_for=3, sent=sent) is False
    assert any(f"it waits for the ring lock of the shared memory, which worker 0 (pid {holder.pid}) holds"
               in r.message for r in caplog.records)
    assert await holder.wait() == -signal.SIGKILL
    assert await children.got_it(waiter)
    # The holder's own ping, timing out now: killed already, nothing more done or said.
    caplog.clear()
    assert await sup._unresponsive(sup.workers[0], holder, silent_for=3, sent=sent) is True
    assert caplog.records == []
    assert waiter.returncode is None


async def test_a_waiter_for_a_lock_the_supervisor_itself_holds_is_not_killed(
        tmp_path: Path, arena: Arena, children: Children, caplog: pytest.LogCaptureFixture) -> None:
    """Its write-behind thread holding the ring lock: a worker killed for waiting would wait
    again once restarted. Nobody is killed; the error says who holds the lock."""
    with arena.locked():
        waiter = await children.waiting()
        sup = supervisor(tmp_path, arena, waiter)
        assert await sup._unresponsive(sup.workers[0], waiter, silent_for=3, sent=time.monotonic()) is False
        assert waiter.returncode is None
        assert any(f"which the supervisor itself (pid {os.getpid()}) holds" in r.message for r in caplog.records)
    assert await children.got_it(waiter)


async def test_a_silent_worker_that_waits_for_no_lock_is_killed(
        tmp_path: Path, arena: Arena, children: Children) -> None:
    stuck = await children.locking(RING_LOCK)  # holds it, and waits for nothing
    os.kill(stuck.pid, signal.SIGSTOP)
    sup = supervisor(tmp_path, arena, stuck)
    assert await sup._unresponsive(sup.workers[0], stuck, silent_for=3, sent=time.monotonic() - 3) is True
    assert await stuck.wait() == -signal.SIGKILL
