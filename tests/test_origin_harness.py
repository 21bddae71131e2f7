"""The test origin stopped to be started again keeps its port (tests run in parallel)."""

from __future__ import annotations

import errno
import socket

import aiohttp
import pytest

from tests.harness import Origin


async def test_an_origin_stopped_with_its_port_held_refuses_connections_and_restarts_on_it() -> None:
    origin = Origin()
    origin.route("/a", body=b"a")
    await origin.start()
    port = origin.port
    try:
        await origin.stop(hold_port=True)
        with socket.socket() as other, pytest.raises(OSError) as taken:
            other.bind(("127.0.0.1", port))  # what another test's server would be refused
        assert taken.value.errno == errno.EADDRINUSE
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientConnectorError):
                await session.get(f"{origin.url}/a")
            await origin.start(port=port)
            async with session.get(f"{origin.url}/a") as r:
                assert (origin.port, await r.read()) == (port, b"a")
    finally:
        await origin.stop()
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))  # a plain stop gives the port back
