"""Ports for tests that run side by side (pytest-xdist): a port is held, not only picked.

A port found by binding port 0 and closing the socket is anyone's again at once: another test's
server binding port 0 in parallel can be given it by the kernel, and then answers where this test
expected a refused connection, or has it when this test's server (or a restart) binds it later
(CI: a stopped test Redis's port went to another test's origin). A socket bound to the port that
does not listen

- keeps the kernel's port-0 autobind off it: no other test's server is given it;
- refuses connections, as a port nothing listens on does;
- still lets a server that sets SO_REUSEADDR bind and listen there: asyncio's and aiohttp's
  servers, redis-server, cachegate's listeners and admin API, its supervisor's reservation and
  exclusive probe (``proxy/supervisor.py`` ``_bind_alone``), and the demo.

``hold`` makes one such socket; ``Ports`` (the ``ports`` fixture of tests/conftest.py) holds
ports for a test and lets them go at its end.
"""

from __future__ import annotations

import socket
from types import TracebackType


def hold(port: int = 0, host: str = "127.0.0.1") -> socket.socket:
    """A socket bound to ``host``:``port`` (0: a port the kernel picks) that does not listen.
    ``::`` holds the port in both families (dual stack). OSError when the port is taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class HeldPort:
    """One server's port, held while the server is down (stopped, to be started again on it):
    the test Redis's and the test origin's (``tests.cluster.redis_server``, ``tests.harness``)."""

    __slots__ = ("_sock",)

    def __init__(self) -> None:
        self._sock: socket.socket | None = None

    def keep(self, port: int = 0) -> int:
        """Hold ``port`` (0: one the kernel picks) unless one is held already; the port held, or
        ``port`` when another process has it already (the server's start will say so)."""
        if self._sock is None:
            try:
                self._sock = hold(port)
            except OSError:
                return port
        return int(self._sock.getsockname()[1])

    def release(self) -> None:
        """Let the port go: the server listens on it now, or is stopped for good."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Ports:
    """Ports held until ``release`` or ``close``: a port nothing listens on (connections to it
    are refused) for as long as the test needs one, or a port for a server that the test starts
    on it later (or starts again on it)."""

    def __init__(self) -> None:
        self._held: list[socket.socket] = []

    def hold(self, port: int = 0, host: str = "127.0.0.1") -> int:
        """A port held (0: one the kernel picks), or OSError when it is taken; ``::``: in both
        families."""
        sock = hold(port, host)
        self._held.append(sock)
        return int(sock.getsockname()[1])

    def url(self) -> str:
        """``http://127.0.0.1:P`` of a port held: an upstream whose connections are refused."""
        return f"http://127.0.0.1:{self.hold()}"

    def release(self, port: int) -> None:
        """Let ``port`` go: a server listens there now, and the test wants the port free once
        that server stops."""
        for sock in [s for s in self._held if s.getsockname()[1] == port]:
            self._held.remove(sock)
            sock.close()

    def close(self) -> None:
        while self._held:
            self._held.pop().close()

    def __enter__(self) -> Ports:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
