"""A real Redis for the cluster tests: Debian's redis-server on a held loopback port in a temp dir.

``scripts/test`` installs the package when it is missing; without it the tests skip
and say why. Nothing is persisted (``save ''``, no AOF): a restart is a Redis that
lost its data, which the fault tests want.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from tests.ports import HeldPort


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.skip("redis-server is not installed (scripts/test installs Debian's redis-server "
                    "package when it runs as root; install it to run the cluster tests)")
    return path


class RedisServer:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.port = 0
        self._held = HeldPort()  # the port, held while redis-server is down
        self._new_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = False
        self.args: list[str] = []  # more arguments of redis-server's, from the next start on

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart, on the same port), on the port held until redis-server listens.
        A first start whose port another process took anyway (bound it explicitly) takes another."""
        for _ in range(5):
            if self._start_once():
                self.started = True
                self._held.release()
                return
            if self.started:
                break  # a restart keeps its port: the nodes were configured with it
            self._new_port()
        raise RuntimeError(f"redis-server exited with {self.proc.returncode if self.proc else None}: "
                           + self._log_tail())

    def _start_once(self) -> bool:
        os.makedirs(self.directory, exist_ok=True)
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.directory,
             "--save", "", "--appendonly", "no", "--logfile", os.path.join(self.directory, "redis.log"),
             *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.ping():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer within 10 s")

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.directory, "redis.log")) as f:
                return "".join(f.readlines()[-5:])
        except OSError:
            return "(no log)"

    def ping(self) -> bool:
        """Whether it answers (one that wants a password answers NOAUTH)."""
        try:
            return self.command("PING").startswith((b"+PONG\r\n", b"-NOAUTH"))
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One command in RESP, its raw first reply line (enough for PING, CLIENT PAUSE, ...)."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(payload.encode())
            return s.recv(65536)

    def _new_port(self) -> None:
        """A port held (tests/ports.py) from now until redis-server listens on it."""
        self._held.release()
        self.port = self._held.keep()

    def _hold_port(self) -> None:
        """Keep the port while redis-server is down, so that a restart gets it back.

        Without this another test's server, binding port 0 in parallel, could be given it
        (CI: an origin's "HTTP/1.1" answered the node, then the restart could not bind).
        The held port refuses connections as a stopped server does, and redis-server (with
        SO_REUSEADDR) still binds and listens on it (tests/ports.py)."""
        self._held.keep(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._hold_port()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self._hold_port()

    def close(self) -> None:
        """Stop for good: the port too."""
        self.stop()
        self._held.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.kill()
            self._held.release()
