"""The test Redis keeps its port while stopped, so a restart in a parallel run gets it back."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest

from tests.cluster.redis_server import RedisServer


def test_a_stopped_redis_keeps_its_port_refuses_connections_and_restarts_on_it(tmp_path: Path) -> None:
    server = RedisServer(str(tmp_path / "redis"))
    server.start()
    try:
        port = server.port
        server.kill()
        with socket.socket() as other, pytest.raises(OSError) as taken:
            other.bind(("127.0.0.1", port))  # what another test's server would be refused
        assert taken.value.errno == errno.EADDRINUSE
        assert not server.ping()  # down, as a stopped server is: connections are refused
        server.start()
        assert server.port == port and server.ping()
    finally:
        server.close()
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))  # close gives the port back
