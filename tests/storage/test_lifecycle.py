"""A cachegate process tree through its life: signals during the start-up, restarts after a
reload, stuck and orphaned workers, the stop's deadline, what is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
import tomllib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest
from aiohttp import web

from proxy.codeid import identity
from proxy.config import Overrides
from tests.harness import Origin
from tests.storage.procs import ProxyProcess, Response, alive, write_config

ROOT = Path(__file__).resolve().parent.parent.parent

pytestmark = pytest.mark.slow

CACHE = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n"
# Shared libraries the process loads only once ``proxy.cli`` is being imported: after
# ``python -m proxy run`` has had the chance to hold its signals (``proxy.earlysignals``).
IMPORTED = re.compile(r"_yaml|multidict|_http_parser|uvloop|yarl")


def _caught(pid: int, sig: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def _importing(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return bool(IMPORTED.search(f.read()))


async def _until(predicate: Callable[[], object], step: float = 0.002, wait: float = 30.0) -> None:
    """Poll ``predicate`` (a process's /proc files: nothing to await) until it holds."""
    for _ in range(int(wait / step)):
        if predicate():
            return
        await asyncio.sleep(step)
    raise AssertionError("timed out")


async def _spawned(proxy: ProxyProcess) -> int:
    await _until(lambda: proxy.process is not None, 0.001)
    assert proxy.process is not None
    return proxy.process.pid


def _console_script(directory: Path) -> tuple[str, ...]:
    """The ``cachegate`` program pip installs from pyproject.toml's [project.scripts] (its
    wrapper: import the entry function, call it), which the Dockerfile, the systemd unit and
    Kubernetes run: it must hold its signals as early as ``python -m proxy`` does."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        module, function = tomllib.load(f)["project"]["scripts"]["cachegate"].split(":")
    script = directory / "cachegate"
    script.write_text(f"import re\nimport sys\nfrom {module} import {function}\n"
                      "if __name__ == '__main__':\n"
                      "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
                      f"    sys.exit({function}())\n")
    return (sys.executable, str(script))


ENTRIES = pytest.mark.parametrize("console_script", [False, True], ids=["python-m", "console-script"])


@ENTRIES
@pytest.mark.parametrize("workers", [("--workers", "2"), ()], ids=["workers", "single"])
async def test_sighup_during_the_start_up_neither_kills_the_process_nor_is_lost(
        origin: Origin, tmp_path: Path, workers: tuple[str, ...], console_script: bool) -> None:
    """SIGHUP (``systemctl reload``, logrotate) from the moment the program's imports begin until
    it listens: it keeps starting, then serves (systemd would not restart it: killed by SIGHUP
    is a clean exit for Restart=on-failure). Both ``python -m proxy run`` and the installed
    ``cachegate run``."""
    origin.route("/s", body=b"s", headers={"Cache-Control": "max-age=300"})
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE),
                         program=_console_script(tmp_path) if console_script else ())
    sent = 0

    async def hup() -> None:
        nonlocal sent
        pid = await _spawned(proxy)
        await _until(lambda: _caught(pid, signal.SIGHUP) or _importing(pid))
        assert proxy.process is not None
        while not proxy.url and proxy.process.returncode is None:
            os.kill(pid, signal.SIGHUP)
            sent += 1
            await asyncio.sleep(0.02)

    sender = asyncio.ensure_future(hup())
    try:
        await proxy.start(*workers)
        await sender
        assert sent >= 5
        assert (await proxy.get("/s")).body == b"s"
    finally:
        sender.cancel()
        code = await proxy.stop()
    assert code == 0, "\n".join(proxy.lines)


@ENTRIES
async def test_sigterm_during_the_start_up_stops_the_process_once_started(
        origin: Origin, tmp_path: Path, console_script: bool) -> None:
    """A SIGTERM before the loop's handlers is remembered: the process stops cleanly (exit 0),
    its workers with it, instead of dying where it was."""
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE),
                         program=_console_script(tmp_path) if console_script else ())
    start = asyncio.ensure_future(proxy.start("--workers", "2"))
    pid = await _spawned(proxy)
    await _until(lambda: _caught(pid, signal.SIGTERM) or _importing(pid))
    os.kill(pid, signal.SIGTERM)
    with pytest.raises(AssertionError):  # it exits without ever listening
        await start
    assert await proxy.stop() == 0
    assert "cachegate: stopped" in proxy.lines


def _open_files(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


async def _until_each_worker(proxy: ProxyProcess, path: str, check: Callable[[Response], bool]) -> None:
    seen: set[str] = set()
    for _ in range(400):
        r = await proxy.get(path)
        if check(r):
            seen.add(r.worker)
        if seen == {"0", "1"}:
            return
    raise AssertionError(f"only workers {sorted(seen)} answered as wanted")


async def _kill_worker(proxy: ProxyProcess, worker: int) -> None:
    old = proxy.workers[worker]
    os.kill(old, signal.SIGKILL)
    await proxy.wait_for(lambda: proxy.workers[worker] != old, wait=60)


def _edit(config: str, change: Callable[[str], str]) -> None:
    """Rewrite the config file (small and local: read and written at once)."""
    with open(config) as f:
        text = f.read()
    with open(config, "w") as f:
        f.write(change(text))


async def test_a_reload_that_adds_a_listener_reaches_the_workers_and_a_restarted_worker_serves(
        origin: Origin, tmp_path: Path) -> None:
    """The new listener waits for a restart; the reload's other changes reach every worker
    (they rejected the whole reload: "1 port(s) for 2 listener(s)"), and a worker restarted
    afterwards serves on the running listener (it exited 2 at every restart)."""
    origin.route("/h", body=b"h", headers={"Cache-Control": "no-store"})
    config = write_config(str(tmp_path), origin.url, CACHE)
    proxy = ProxyProcess(str(tmp_path), config)
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        _edit(config, lambda text: text.replace("listen: 127.0.0.1:0", "listen: ['127.0.0.1:0', '127.0.0.1:0']")
              + "server_header: renamed\n")
        reply = await proxy.admin("POST", "/reload")
        assert reply.status == 200, reply.body
        assert b'"listen"' in reply.body  # restart_required
        await _until_each_worker(proxy, "/h", lambda r: r.headers.get("Server") == "renamed")
        await _kill_worker(proxy, 0)
        await _until_each_worker(proxy, "/h", lambda r: r.headers.get("Server") == "renamed")
        assert not any("port(s) for" in line for line in proxy.lines)
    finally:
        assert await proxy.stop() == 0


async def test_a_worker_restarted_after_a_reload_that_moves_the_listener_and_cache_keeps_them(
        origin: Origin, tmp_path: Path) -> None:
    """A reload that changes the listen host and cache.disk.path (both wait for a restart),
    then a worker dies: its replacement listens where its sibling does and opens the same
    cache directory (it listened on the new host and opened the new directory, without its
    owner)."""
    origin.route("/h", body=b"h", headers={"Cache-Control": "no-store"})
    config = write_config(str(tmp_path), origin.url, CACHE)
    proxy = ProxyProcess(str(tmp_path), config)
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        _edit(config, lambda text: text.replace("listen: 127.0.0.1:0", "listen: 127.0.0.2:0")
              .replace("path: cache,", "path: cache2,") + "server_header: renamed\n")
        reply = await proxy.admin("POST", "/reload")
        assert reply.status == 200, reply.body
        await _until_each_worker(proxy, "/h", lambda r: r.headers.get("Server") == "renamed")
        await _kill_worker(proxy, 0)
        await _until_each_worker(proxy, "/h", lambda r: r.headers.get("Server") == "renamed")
        assert not (tmp_path / "cache2").exists()
        cache = str(tmp_path / "cache")
        for pid in proxy.workers.values():
            opened = _open_files(pid)
            assert any(path.startswith(cache + os.sep) for path in opened), pid
            assert not any(path.startswith(cache + "2") for path in opened), pid
        host = proxy.url.split("//")[1].rsplit(":", 1)[0]
        assert host == "127.0.0.1"
    finally:
        assert await proxy.stop() == 0


STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


async def test_a_worker_that_hangs_before_it_is_ready_is_killed_and_restarted(
        origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replacement worker stopped right after its start (SIGSTOP: as one stuck before its
    ready call) is killed once the ready timeout passes and replaced; it was never pinged (the
    watchdog starts at ready) and kept its listener's share of the connections forever."""
    # (8 s: the first workers' start-up is held to it too, and took over 5 s on a loaded machine)
    monkeypatch.setenv("CACHEGATE_READY_TIMEOUT", "8")
    origin.route("/s", body=b"s", headers={"Cache-Control": "max-age=300"})
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        for _ in range(5):  # until the stop comes before the replacement's ready call
            old = proxy.workers[0]
            os.kill(old, signal.SIGKILL)

            def started(old: int = old) -> list[int]:
                return [int(m.group(2)) for line in proxy.lines
                        if (m := STARTED.search(line)) and m.group(1) == "0" and int(m.group(2)) != old]

            await proxy.wait_for(lambda: bool(started()), wait=60)
            stuck = started()[0]
            os.kill(stuck, signal.SIGSTOP)
            await asyncio.sleep(0.5)  # a ready call sent just before the stop is logged by now
            if proxy.workers[0] != stuck:
                break
            os.kill(stuck, signal.SIGCONT)  # too late (a loaded machine): ready already; again
        else:
            raise AssertionError("each replacement was ready before it could be stopped")
        await proxy.wait_for(lambda: proxy.workers[0] not in (old, stuck), wait=90)
        assert any(f"pid {stuck}) not ready after 8s" in line for line in proxy.lines)
        await _until_each_worker(proxy, "/s", lambda r: r.body == b"s")
    finally:
        assert await proxy.stop() == 0


async def test_a_stopped_worker_does_not_outlive_its_killed_supervisor(origin: Origin, tmp_path: Path) -> None:
    """SIGKILL of the supervisor: a worker that cannot notice its control channel closing (stopped,
    or its loop stuck) is killed by the kernel (it kept the port, answering nobody)."""
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        pids = list(proxy.workers.values())
        os.kill(pids[0], signal.SIGSTOP)
        assert proxy.process is not None
        proxy.process.kill()  # (its wait() would wait for the stopped worker: it has the pipe too)
        await _until(lambda: not any(alive(p) for p in (proxy.process.pid, *pids)), 0.05)
    finally:
        await proxy.kill()


async def test_a_port_another_process_accepts_on_is_refused_naming_it(origin: Origin, tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        port = listener.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "run", "--config",
            write_config(str(tmp_path), origin.url, CACHE), "--listen", f"127.0.0.1:{port}", "--workers", "2",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=str(tmp_path))
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        listener.close()
    assert proc.returncode == 1
    assert (f"127.0.0.1:{port}: another process (pid {os.getpid()}) already accepts connections"
            in out.decode()), out


@pytest.mark.parametrize("workers", [("--workers", "2"), ()], ids=["workers", "single"])
async def test_a_stop_takes_one_grace_period_not_one_per_step(
        origin: Origin, tmp_path: Path, workers: tuple[str, ...]) -> None:
    """SIGTERM with a cacheable download in flight (the origin still sending): the requests in
    flight, their cancellation and the background fill shared one grace period; each step
    took a whole one (three in all), and the supervisor killed workers still within theirs."""
    grace = 4.0

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=300"})
        resp.content_length = 4000 * 1024
        await resp.prepare(request)
        with contextlib.suppress(Exception):
            for _ in range(4000):
                await resp.write(b"x" * 1024)
                await asyncio.sleep(0.01)
        return resp

    origin.route("/slow", slow)
    config = write_config(str(tmp_path), origin.url, CACHE)
    with open(config) as f:  # noqa: ASYNC230 (a small local file)
        text = f.read()
    with open(config, "w") as f:  # noqa: ASYNC230
        f.write(text.replace("shutdown_grace: 2s", f"shutdown_grace: {grace:g}s"))
    proxy = ProxyProcess(str(tmp_path), config)
    await proxy.start(*workers, with_log=True)
    reader, writer = await asyncio.open_connection(*proxy.url.split("//")[1].rsplit(":", 1))
    try:
        writer.write(b"GET /slow HTTP/1.1\r\nHost: cachegate.test\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        await reader.read(65536)  # the body is on its way
        loop = asyncio.get_running_loop()
        began = loop.time()
        code = await proxy.stop(wait=60)
        took = loop.time() - began
    finally:
        writer.close()
    assert code == 0
    assert took < 2 * grace + 3, took
    assert not any("did not stop in time" in line for line in proxy.lines)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The processes' temporary directory (and so their runtime directory: no XDG_RUNTIME_DIR)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return tmp


async def test_a_stopped_supervisor_leaves_no_port_lock_file(
        origin: Origin, tmp_path: Path, private_tmp: Path) -> None:
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE))
    await proxy.start("--workers", "2")
    locks = private_tmp / f"cachegate-{os.getuid()}"
    try:
        port = proxy.url.rsplit(":", 1)[1]
        assert [p.name for p in locks.iterdir()] == [f"port-4-127.0.0.1-{port}.lock"]
    finally:
        assert await proxy.stop() == 0
    assert list(locks.iterdir()) == []


def test_a_lock_taken_on_a_file_its_holder_removed_is_taken_again_on_the_paths_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race an unlinking release opens: B opens the file, A releases (removes it, unlocks),
    B locks the removed file. B must not believe it holds the lock: a third would lock the
    path's new file too."""
    from proxy import lockfile

    path = str(tmp_path / "port.lock")
    first = lockfile.HeldLock(path, unlink=True)
    real_flock = lockfile.fcntl.flock
    raced = []

    def flock(fd: int, op: int) -> None:
        if not raced:  # B has opened the file; A lets go of it now
            raced.append(fd)
            first.release()
        real_flock(fd, op)

    monkeypatch.setattr(lockfile.fcntl, "flock", flock)
    second = lockfile.HeldLock(path, unlink=True)
    monkeypatch.setattr(lockfile.fcntl, "flock", real_flock)
    assert raced
    assert second._fd is not None
    assert os.fstat(second._fd).st_ino == os.stat(path).st_ino
    with pytest.raises(lockfile.LockTaken):
        lockfile.HeldLock(path, unlink=True)
    second.release()
    assert not os.path.exists(path)


async def test_the_config_copy_a_killed_supervisor_left_is_removed_by_the_next_one(
        origin: Origin, tmp_path: Path, private_tmp: Path) -> None:
    def copies() -> list[str]:
        return sorted(p.name for p in private_tmp.iterdir() if p.name.startswith("cachegate-config-"))

    config = write_config(str(tmp_path), origin.url, CACHE)
    first = ProxyProcess(str(tmp_path), config)
    await first.start("--workers", "2")
    try:
        await first.wait_for(lambda: len(first.workers) == 2)
        pids = list(first.workers.values())
        left = copies()
        assert len(left) == 1
        assert first.process is not None
        first.process.kill()
        await _until(lambda: not any(alive(p) for p in (first.process.pid, *pids)), 0.05)  # type: ignore[union-attr]
    finally:
        await first.kill()
    assert copies() == left
    second = ProxyProcess(str(tmp_path), config)
    await second.start("--workers", "2")
    try:
        now = copies()
        assert len(now) == 1 and now != left
    finally:
        assert await second.stop() == 0
    assert copies() == []


async def test_a_worker_whose_supervisor_is_gone_before_it_is_ready_exits_quietly(
        origin: Origin, tmp_path: Path) -> None:
    """Its ready call finds the control channel closed (the supervisor died while it started):
    it stops and exits 0, without a ChannelClosed traceback."""
    config = write_config(str(tmp_path), origin.url, "cache: {memory: 16MB, disk: null}\n")
    ours, theirs = socket.socketpair()
    overrides = asdict(Overrides(workers="1", admin_listen="off"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.supervisor", "worker", "--code-id", identity(), "--worker-id", "0",
        "--control-fd", str(theirs.fileno()), "--overrides", json.dumps(overrides), "--config", config,
        "--log-level", "warning", pass_fds=(theirs.fileno(),),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=str(tmp_path))
    theirs.close()
    ours.close()  # the supervisor is gone
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "Traceback" not in text and "ChannelClosed" not in text, text
