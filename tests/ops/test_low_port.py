"""A privileged port refused (no CAP_NET_BIND_SERVICE): the start fails naming the address and
the capability, for the client listener of one process or of a supervisor and for the admin
listener; it said only "cachegate: cannot listen: [Errno 13] Permission denied"."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def _without_the_capability() -> list[str]:
    """The command prefix that runs a program without CAP_NET_BIND_SERVICE (root: drop it from
    the bounding set), or skip, saying why, where that cannot be shown."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv (util-linux): cannot drop CAP_NET_BIND_SERVICE")
        prefix = [setpriv, "--bounding-set=-net_bind_service"]
    port = unprivileged_port_start() - 1
    if port < 1:
        pytest.skip("net.ipv4.ip_unprivileged_port_start is 0: every user may bind every port here")
    probe = subprocess.run([*prefix, sys.executable, "-c", "import socket, sys; "
                            f"socket.socket().bind(('127.0.0.1', {port}))"], capture_output=True, timeout=30)
    if probe.returncode == 0:
        pytest.skip(f"this user binds port {port} here (it has CAP_NET_BIND_SERVICE)")
    return prefix


@pytest.mark.parametrize(("listen", "admin", "args", "where", "whose"), [
    ("LOW", "null", (), "127.0.0.1:LOW", "this listener"),
    ("LOW", "null", ("--workers", "2"), "127.0.0.1:LOW", "this listener"),
    ("0", "'127.0.0.1:LOW'", (), "admin.listen 127.0.0.1:LOW", "the admin API"),
])
def test_a_privileged_port_refused_names_the_address_and_the_capability(
        tmp_path: Path, listen: str, admin: str, args: tuple[str, ...], where: str, whose: str) -> None:
    prefix = _without_the_capability()
    low = str(unprivileged_port_start() - 1)
    config = tmp_path / "c.yaml"
    config.write_text(f"upstreams: [http://127.0.0.1:9]\nlisten: 127.0.0.1:{listen.replace('LOW', low)}\n"
                      f"admin: {{listen: {admin.replace('LOW', low)}}}\ncache: {{disk: null}}\n")
    done = subprocess.run([*prefix, sys.executable, "-m", "proxy", "run", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert f"cachegate: cannot listen: {where.replace('LOW', low)}: permission denied: a port below " \
           f"{int(low) + 1} needs the CAP_NET_BIND_SERVICE capability" in done.stderr, done.stderr
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in done.stderr and f"give {whose} a port" in done.stderr
    assert "Errno" not in done.stderr, done.stderr
