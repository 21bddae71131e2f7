"""One running cachegate per cache directory and per listening port: a second refuses to start."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

from proxy.config import Overrides, load_config
from proxy.runtime import CacheDirectoryInUse, Runtime
from tests.harness import Origin
from tests.ports import Ports
from tests.storage.procs import ProxyProcess, write_config

pytestmark = pytest.mark.slow


async def run_to_exit(config: str, *args: str, wait: float = 30.0) -> tuple[int | None, str]:
    """``cachegate run`` that is expected to refuse: its exit code and output (None: it kept
    running, and was killed)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", config, "--log-level", "warning", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=os.path.dirname(config))
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), wait)
        return proc.returncode, out.decode(errors="replace")
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        return None, out.decode(errors="replace")


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["single", "workers"])
async def test_a_second_owner_of_a_cache_directory_refuses_to_start_naming_it_and_the_holder(
        origin: Origin, tmp_path: Path, workers: list[str]) -> None:
    shared = tmp_path / "shared-cache"
    cache = f"cache: {{memory: 16MB, disk: {{path: '{shared}', size: 64MB, shards: 2}}}}\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = ProxyProcess(str(tmp_path / "a"), write_config(str(tmp_path / "a"), origin.url, cache))
    await first.start(*workers)
    try:
        assert first.process is not None
        code, out = await run_to_exit(write_config(str(tmp_path / "b"), origin.url, cache), *workers)
        assert code == 1, out
        assert f"the cache directory {shared} (cache.disk.path) is in use" in out
        assert f"pid {first.process.pid}" in out
        assert (await first.get("/")).status in (200, 404)  # the first one serves on
    finally:
        assert await first.stop() == 0
    # Stopped, it gave the directory up: the next owner starts.
    second = ProxyProcess(str(tmp_path / "b"), os.path.join(tmp_path / "b", "cachegate.yaml"))
    await second.start(*workers)
    assert await second.stop() == 0


async def test_only_the_owner_takes_the_cache_directory(origin: Origin, tmp_path: Path) -> None:
    settings = load_config(write_config(str(tmp_path), origin.url,
                                        "cache: {memory: 4MB, disk: {path: cache, size: 64MB}}\n"),
                           Overrides())
    owner = await Runtime.open(settings)
    try:
        with pytest.raises(CacheDirectoryInUse, match=r"cache\.disk\.path\) is in use .*pid "):
            await Runtime.open(settings)
        worker = await Runtime.open(settings, owner=False)  # a worker shares its owner's directory
        await worker.close()
    finally:
        await owner.close()
    again = await Runtime.open(settings)  # released at close
    await again.close()


async def test_a_second_supervisor_on_the_same_port_refuses_to_start(origin: Origin, tmp_path: Path) -> None:
    """SO_REUSEPORT would let it bind, and the kernel split the traffic between the two."""
    cache = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = ProxyProcess(str(tmp_path / "a"), write_config(str(tmp_path / "a"), origin.url, cache))
    await first.start("--workers", "2")
    try:
        address = first.url.split("//", 1)[1]
        for workers in (["--workers", "2"], []):  # a single process: its plain bind fails
            code, out = await run_to_exit(write_config(str(tmp_path / "b"), origin.url, cache),
                                          "--listen", address, *workers)
            assert code == 1, out
            assert f"cachegate: cannot listen: {address}" in out or "address already in use" in out, out
    finally:
        assert await first.stop() == 0


async def test_a_second_supervisor_on_the_wildcard_address_of_a_running_ones_port_refuses_to_start(
        origin: Origin, tmp_path: Path, ports: Ports) -> None:
    """An instance on 127.0.0.2:P (SO_REUSEPORT) and a second on 0.0.0.0:P: the connect probe tried
    127.0.0.1 alone, nothing answered there, and the second started; the kernel then split the
    connections by their destination address. (The other order was refused.) Its own workers,
    restarted, still bind beside their supervisor's reservation."""
    cache = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    port = ports.hold(host="127.0.0.2")
    first = ProxyProcess(str(tmp_path / "a"), write_config(str(tmp_path / "a"), origin.url, cache))
    await first.start("--workers", "2", "--listen", f"127.0.0.2:{port}")
    try:
        code, out = await run_to_exit(write_config(str(tmp_path / "b"), origin.url, cache),
                                      "--listen", f"0.0.0.0:{port}", "--workers", "2", wait=20)
        assert code == 1, out
        assert f"cachegate: cannot listen: 0.0.0.0:{port}: another process" in out, out
        assert (await first.get("/")).status in (200, 404)  # the first one serves on
    finally:
        assert await first.stop() == 0


def test_a_reserved_port_is_locked_before_any_worker_listens(tmp_path: Path, ports: Ports) -> None:
    """The connect probe cannot see a supervisor whose workers do not listen yet: the lock does."""
    from proxy.supervisor import Supervisor

    def supervisor(listen: str) -> Supervisor:
        config = write_config(str(tmp_path), "http://127.0.0.1:9", "cache: {memory: 4MB}\n")
        return Supervisor(load_config(config, Overrides(listen=(listen,))), config, Overrides())

    first = supervisor("127.0.0.1:0")
    reserved = first._reserve_ports()
    try:
        ports.hold(first._ports[0])  # from the release to ``again``'s reservation (tests/ports.py)
        second = supervisor(f"127.0.0.1:{first._ports[0]}")
        with pytest.raises(OSError, match=rf"127\.0\.0\.1:{first._ports[0]} is in use by another "
                                          rf"cachegate \(pid {os.getpid()}\)"):
            second._reserve_ports()
    finally:
        first._release(reserved)
    again = supervisor(f"127.0.0.1:{first._ports[0]}")  # released
    again._release(again._reserve_ports())


def test_two_listeners_of_one_supervisor_on_one_address_do_not_blame_another_cachegate(
        tmp_path: Path, ports: Ports) -> None:
    """The config refuses one address listed twice; should two listeners still meet (a name
    that resolves differently at the start), the supervisor named "another cachegate" with its
    own pid."""
    from dataclasses import replace

    from proxy.config import Listener
    from proxy.supervisor import Supervisor

    port = ports.hold()
    config = write_config(str(tmp_path), "http://127.0.0.1:9", "cache: {memory: 4MB}\n")
    settings = load_config(config, Overrides(listen=(f"127.0.0.1:{port}",)))
    settings = replace(settings, listeners=(*settings.listeners, Listener("127.0.0.1", port)))
    supervisor = Supervisor(settings, config, Overrides())
    with pytest.raises(OSError, match=rf"127\.0\.0\.1:{port} is taken by two of this cachegate's listeners"):
        supervisor._reserve_ports()


def test_an_admin_port_in_use_names_admin_listen_and_the_holder(tmp_path: Path) -> None:
    """The admin listener's port taken by another process: the start said only "[Errno 98]
    address already in use", naming neither admin.listen nor who holds it (as the client
    listeners' refusal does)."""
    import subprocess

    holder = subprocess.Popen([sys.executable, "-c", "import socket, sys, time\n"
                               "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
                               "print(s.getsockname()[1], flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        port = int(holder.stdout.readline())
        config = write_config(str(tmp_path), "http://127.0.0.1:9", "cache: {memory: 4MB, disk: null}\n",
                              admin=f"{{listen: '127.0.0.1:{port}'}}")
        for workers in ("1", "2"):
            done = subprocess.run([sys.executable, "-m", "proxy", "run", "--config", config, "--workers", workers],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 1, done.stderr
            assert (f"cachegate: cannot listen: admin.listen 127.0.0.1:{port}: another process "
                    f"(pid {holder.pid}) already accepts connections on this port") in done.stderr, done.stderr
            assert "Errno" not in done.stderr and "Traceback" not in done.stderr
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("which", ["admin", "client"])
def test_a_port_held_by_a_connection_not_a_listener_is_not_blamed_on_a_listening_process(
        tmp_path: Path, which: str, workers: str) -> None:
    """A port that is only the local end of a connection (an outgoing connection's port from the
    ephemeral range): the admin listener said "another process already accepts connections on
    this port ... stop that process", of a process that does not exist, and the client listener
    "[Errno 98] ... address already in use". Both say a connection holds it and suggest a port
    below net.ipv4.ip_local_port_range."""
    import subprocess

    from proxy.lockfile import local_port_range

    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client.connect(server.getsockname())  # its local port: one the kernel picked
        accepted, _ = server.accept()
        with accepted:
            port = client.getsockname()[1]
            listen = ["--listen", f"127.0.0.1:{port}"] if which == "client" else []
            admin = f"{{listen: '127.0.0.1:{port}'}}" if which == "admin" else "{listen: '127.0.0.1:0'}"
            config = write_config(str(tmp_path), "http://127.0.0.1:9", "cache: {memory: 4MB, disk: null}\n",
                                  admin=admin)
            done = subprocess.run([sys.executable, "-m", "proxy", "run", "--config", config, "--workers", workers,
                                   *listen], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    where = f"admin.listen 127.0.0.1:{port}" if which == "admin" else f"127.0.0.1:{port}"
    whose = "the admin API" if which == "admin" else "this listener"
    assert (f"cachegate: cannot listen: {where}: no process listens on this port, but a connection holds it"
            in done.stderr), done.stderr
    span = local_port_range()
    assert span is not None and span[0] <= port <= span[1]
    assert (f"give {whose} a free port below {span[0]} (the kernel takes the local ports of outgoing "
            f"connections from net.ipv4.ip_local_port_range, {span[0]}-{span[1]})") in done.stderr, done.stderr
    assert "already accepts" not in done.stderr and "Errno" not in done.stderr and "Traceback" not in done.stderr
