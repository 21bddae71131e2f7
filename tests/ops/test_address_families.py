"""Each listener serves the family of its address: ``[::]:P`` IPv6 alone (IPv6_V6ONLY, as
nginx's ``listen [::]:80`` by default), ``0.0.0.0:P`` IPv4 alone; both families on one port are
two entries, ``listen: ["0.0.0.0:P", "[::]:P"]`` (docs/deploy.md). With workers, the port the
supervisor reserves for an IPv6 listener is IPv6 alone too: it held the port's IPv4 half,
which nothing served, and kept another server from listening there (with one worker it did not)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.harness import Origin
from tests.ports import Ports
from tests.storage.procs import HOST, ProxyProcess

pytestmark = pytest.mark.slow

WORKERS = pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["single", "workers"])


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="::1 cannot be bound here (no IPv6 loopback)")


def config(tmp_path: Path, origin: Origin, listen: str) -> str:
    path = tmp_path / "cachegate.yaml"
    path.write_text(f"listen: {listen}\nupstreams: ['{origin.url}']\nadmin: {{listen: '127.0.0.1:0'}}\n"
                    "cache: {memory: 16MB, disk: null}\nshutdown_grace: 2s\n")
    return str(path)


async def status(url: str) -> int:
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s, \
            s.get(url, headers={"Host": HOST}, timeout=aiohttp.ClientTimeout(total=10)) as r:
        return r.status


async def refused(host: str, port: int) -> bool:
    with contextlib.suppress(aiohttp.ClientConnectorError):
        await status(f"http://{host}:{port}/page")
        return False
    return True


@contextlib.asynccontextmanager
async def serving(origin: Origin, tmp_path: Path, workers: list[str], listen: str) -> AsyncIterator[int]:
    """cachegate run with ``listen`` (``{port}`` in it: a port held in both families until it
    listens, tests/ports.py); yields that port. While it runs, the IPv4 half of the port is
    held when it does not listen there: refused, and no other test's server is given it."""
    origin.route("/page", body="ok")
    with Ports() as ports:
        port = ports.hold(host="::")
        proxy = ProxyProcess(str(tmp_path), config(tmp_path, origin, listen.format(port=port)))
        await proxy.start(*workers)
        ports.release(port)
        with contextlib.suppress(OSError):  # cachegate listens there
            ports.hold(port, "0.0.0.0")
        try:
            yield port
        finally:
            assert await proxy.stop() == 0


@needs_ipv6
@WORKERS
@pytest.mark.parametrize(("listen", "ipv4"), [
    ('["0.0.0.0:{port}", "[::]:{port}"]', True),  # the documented form for both families
    ('"[::]:{port}"', False),
], ids=["both", "ipv6"])
async def test_each_listener_serves_the_family_of_its_address(
        origin: Origin, tmp_path: Path, workers: list[str], listen: str, ipv4: bool) -> None:
    async with serving(origin, tmp_path, workers, listen) as port:
        assert await status(f"http://[::1]:{port}/page") == 200
        if ipv4:
            assert await status(f"http://127.0.0.1:{port}/page") == 200
        else:
            assert await refused("127.0.0.1", port)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
                other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (beside the held half)
                other.bind(("0.0.0.0", port))  # another server may take the IPv4 half
                other.listen()
