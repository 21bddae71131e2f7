"""An upstream, and a cluster's Redis, on a real IPv6 link-local address with a zone
(``[fe80::...%25IF]``), reached by ``cachegate run`` under its default event loop (uvloop).

The address is a veth pair's, made here (root: CI runs the tests as root); the test skips,
saying why, where the pair cannot be made. ``[::1%25lo]`` (test_upstream_names) does not
tell: the kernel ignores the scope of a loopback address, so a connect that lost it still
went through, where one to a link-local address without its scope fails (EINVAL).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.redis_server import redis_binary
from tests.harness import spawn_cachegate
from tests.ports import Ports
from tests.test_upstream_names import Tagged


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


@pytest.fixture(scope="module")
def link_local() -> Iterator[tuple[str, str]]:
    """A link-local address of this machine and its interface: (address, interface name)."""
    if shutil.which("ip") is None:
        pytest.skip("no 'ip' command (iproute2) to make a veth pair with a link-local address")
    name = f"cgz{os.getpid() % 100000}"
    made = _ip("link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b")
    if made.returncode != 0:
        pytest.skip(f"cannot make a veth pair (needs root, as in CI): {made.stderr.strip()}")
    try:
        for end in ("a", "b"):
            _ip("link", "set", f"{name}{end}", "up")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # the address is usable once its DAD is done
            shown = _ip("-6", "-o", "addr", "show", "dev", f"{name}a", "scope", "link").stdout
            if "inet6" in shown and "tentative" not in shown:
                yield shown.split("inet6 ", 1)[1].split("/", 1)[0], f"{name}a"
                return
            time.sleep(0.1)
        pytest.skip(f"{name}a got no usable link-local address within 15 s")
    finally:
        _ip("link", "del", f"{name}a")


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.status, reply.read()


async def test_an_upstream_on_a_link_local_address_with_a_zone_is_reached_under_uvloop(
        link_local: tuple[str, str], tmp_path: Path) -> None:
    """uvloop's ``sock_connect`` read the address text again and dropped the scope: every
    connect failed (EINVAL), the upstream went down, every request was a 502."""
    address, interface = link_local
    origin = Tagged("link-local")
    listening = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listening.bind((address, 0, 0, socket.if_nametoindex(interface)))
    origin.server = await asyncio.start_server(origin.handle, sock=listening)
    port = listening.getsockname()[1]
    config = tmp_path / "cachegate.yaml"
    config.write_text(f"listen: 127.0.0.1:0\nadmin: {{listen: '127.0.0.1:0'}}\n"
                      f"upstreams: ['http://[{address}%25{interface}]:{port}']\n"
                      f"upstream: {{retries: 0, timeouts: {{connect: 2s}}}}\ncache: {{memory: 16MB}}\n")
    proc = await asyncio.to_thread(spawn_cachegate, ["run", "-c", str(config)])
    try:
        assert await asyncio.to_thread(_get, f"{proc.proxy_url}/zone") == (200, b"link-local"), proc.text
        assert origin.paths() == ["/zone"]
    finally:
        proc.stop()
        await origin.stop()


def test_a_cluster_redis_on_a_link_local_address_with_a_zone_is_reached_under_uvloop(
        link_local: tuple[str, str], tmp_path: Path, ports: Ports) -> None:
    """redis-py handed the host text to ``open_connection``, whose lookup under uvloop dropped
    the zone: the node did not start ("no answer within the timeout")."""
    address, interface = link_local
    port = ports.hold(host="::")  # every address's: redis-server binds one of them later
    redis = subprocess.Popen(
        [redis_binary(), "--port", str(port), "--bind", f"{address}%{interface}", "--dir", str(tmp_path),
         "--save", "", "--appendonly", "no", "--protected-mode", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        config = tmp_path / "cachegate.yaml"
        config.write_text(f"listen: 127.0.0.1:0\nadmin: {{listen: '127.0.0.1:0'}}\n"
                          f"upstreams: ['http://127.0.0.1:9']\ncache: {{memory: 16MB}}\n"
                          f"cluster: {{redis: 'redis://[{address}%25{interface}]:{port}/0', node: zoned,"
                          f" timeout: 2s}}\n")
        deadline = time.monotonic() + 10
        while True:  # redis-server is up once it accepts
            try:
                socket.create_connection((f"{address}%{interface}", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or redis.poll() is not None:
                    raise
                time.sleep(0.05)
        proc = spawn_cachegate(["run", "-c", str(config)])
        try:
            status, body = _get(f"{proc.admin_url}/cluster")
            assert status == 200 and b"zoned" in body, body
        finally:
            proc.stop()
    finally:
        redis.terminate()
        redis.wait(10)


def test_a_listener_on_a_link_local_address_with_its_zone_serves(link_local: tuple[str, str],
                                                                   tmp_path: Path) -> None:
    """``listen: "[fe80::...%IF]:0"`` binds (check keeps accepting it; without the zone, or
    with it percent-encoded, check refuses it: run could not bind either)."""
    address, interface = link_local
    config = tmp_path / "cachegate.yaml"
    config.write_text(f"listen: '[{address}%{interface}]:0'\nadmin: {{listen: '127.0.0.1:0'}}\n"
                      f"upstreams: ['http://127.0.0.1:9']\ncache: {{memory: 16MB}}\n")
    proc = spawn_cachegate(["run", "-c", str(config)])
    try:
        port = int(proc.proxy_url.rsplit(":", 1)[1])
        with socket.create_connection((f"{address}%{interface}", port), timeout=5) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert conn.recv(100).startswith(b"HTTP/1.1 "), proc.text
    finally:
        proc.stop()
