"""A reload cannot take the token away from an admin listener others can reach.

admin.listen changes only at a restart while admin.token applies at once, so the token a
reloaded config brings is checked against the listener that keeps running, not only against
the new admin.listen: moving the admin API to loopback and dropping the token in one edit is
refused (FILE:LINE, the running config stays) instead of leaving the network listener open
until the restart. The supervisor (``--workers N``) reloads with the same check.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.harness import spawn_cachegate

TOKEN = "0123456789abcdef0123456789abcdef"


def reachable_address() -> str:
    """This machine's address on its default route (what another host would connect to), or
    loopback when it has none: the token must then still hold there."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the source address
            address: str = s.getsockname()[0]
        except OSError:
            return "127.0.0.1"
    return address if address != "0.0.0.0" else "127.0.0.1"


def write(config: Path, admin: str) -> None:
    config.write_text("listen: 127.0.0.1:0\n"
                      "upstreams: [{url: 'http://127.0.0.1:9'}]\n"
                      "cache: {memory: 16MB, disk: null}\n"
                      "admin:\n" + admin)


def call(host: str, port: int, method: str, path: str, token: str | None = None,
         body: bytes | None = None) -> tuple[int, bytes]:
    # Host: 127.0.0.1, as anyone on the network can send: only the token may stop them.
    headers = {"Host": "127.0.0.1", "Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"http://{host}:{port}{path}", data=body, method=method,
                                     headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=20) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_reload_that_drops_the_token_of_a_reachable_listener_is_refused(
        tmp_path: Path, workers: str) -> None:
    config = tmp_path / "cachegate.yaml"
    write(config, f"  listen: '0.0.0.0:0'\n  token: '{TOKEN}'\n")
    proc = spawn_cachegate(["run", "--config", str(config), "--workers", workers])
    try:
        assert proc.admin_url is not None
        port = int(proc.admin_url.rsplit(":", 1)[1])
        host = reachable_address()
        assert call(host, port, "GET", "/stats")[0] == 401

        # The operator moves the admin API to loopback and drops the token in the same edit.
        write(config, "  listen: '127.0.0.1:8081'\n")
        status, body = call(host, port, "POST", "/reload", TOKEN, b"{}")
        assert status == 400, body
        problems = json.loads(body)["problems"]
        assert len(problems) == 1, problems
        assert problems[0].startswith(f"{config}:4: admin.token is not set, but the running admin "
                                      "listener 0.0.0.0:0 (admin.listen changes only at a restart) "
                                      "is not loopback"), problems
        assert call(host, port, "GET", "/stats")[0] == 401  # the running token still holds
        assert call(host, port, "POST", "/purge", None, b'{"all": true}')[0] == 401
        assert call(host, port, "GET", "/stats", TOKEN)[0] == 200

        # A token too short for a reachable listener is refused the same way, at its line.
        write(config, "  listen: '127.0.0.1:8081'\n  token: 'x-short'\n")
        status, body = call(host, port, "POST", "/reload", TOKEN, b"{}")
        assert status == 400, body
        problems = json.loads(body)["problems"]
        assert problems == [f"{config}:6: admin.token is 7 characters long; the running admin "
                            "listener 0.0.0.0:0 (admin.listen changes only at a restart) is not "
                            "loopback and needs at least 16 until a restart has moved it to "
                            "loopback"], problems
        assert call(host, port, "GET", "/stats", "x-short")[0] == 401

        # Keeping a good token while moving the listener is accepted (the move awaits a restart).
        write(config, f"  listen: '127.0.0.1:8081'\n  token: '{TOKEN[::-1]}'\n")
        status, body = call(host, port, "POST", "/reload", TOKEN, b"{}")
        assert status == 200, body
        assert "admin.listen" in json.loads(body)["restart_required"]
        assert call(host, port, "GET", "/stats")[0] == 401
        assert call(host, port, "GET", "/stats", TOKEN[::-1])[0] == 200
    finally:
        proc.stop()
