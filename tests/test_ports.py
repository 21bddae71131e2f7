"""A held port (tests/ports.py) is no other test's, refuses connections, and is still a server's."""

from __future__ import annotations

import errno
import socket

import pytest

from tests.ports import Ports


def bind_fails(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a plain bind of ``host``:``port`` (another test's server's) is refused as in use."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as other:
        try:
            other.bind((host, port))
        except OSError as exc:
            assert exc.errno == errno.EADDRINUSE, exc
            return True
        return False


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_held_port_refuses_connections_is_no_one_elses_and_a_server_can_still_listen_there() -> None:
    with Ports() as ports:
        port = ports.hold()
        assert bind_fails(port) and refused(port)
        with socket.socket() as server:  # the server a test starts on it (SO_REUSEADDR, as asyncio's)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", port))
            server.listen()
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert bind_fails(port) and refused(port)  # the server stopped: held still, for a restart
        again = ports.hold(port)  # a port of the test's own held again (a server it stopped)
        assert again == port
        ports.release(port)
        assert not bind_fails(port)  # let go
        last = ports.hold()
    assert not bind_fails(last)  # and every port at the end


def test_a_port_held_on_the_ipv6_wildcard_is_held_in_both_families() -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 here")
    with Ports() as ports:
        port = ports.hold(host="::")
        assert bind_fails(port, "0.0.0.0") and bind_fails(port, "::1") and refused(port)
