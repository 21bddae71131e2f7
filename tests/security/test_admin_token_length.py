"""A guessable admin token on a listener others can reach is refused before anything listens.

The token is the only lock on an admin listener that is not loopback (the DNS rebinding and
CSRF guards stand down when one is set), so ``cachegate check`` and ``cachegate run`` refuse one
under 16 characters there, at the line of ``admin.token``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.cli import main

SHORT, LONG = "x" * 15, "x" * 16


def write(tmp_path: Path, listen: str, token: str) -> Path:
    config = tmp_path / "cachegate.yaml"
    config.write_text("listen: 127.0.0.1:0\n"
                      "upstreams: [http://127.0.0.1:9]\n"
                      "cache: {disk: null}\n"
                      "admin:\n"
                      f"  listen: '{listen}'\n"
                      f"  token: {token}\n")
    return config


@pytest.mark.parametrize("listen", ["0.0.0.0:8081", "10.1.2.3:8081", "[::]:8081"])
def test_check_refuses_a_short_token_on_a_reachable_listener_at_its_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], listen: str) -> None:
    config = write(tmp_path, listen, SHORT)
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}:6: admin.token is 15 characters long; on a listener others can reach " in err
    assert "it must have at least 16" in err
    assert main(["check", "--config", str(write(tmp_path, listen, LONG))]) == 0


def test_a_token_from_the_environment_is_measured_after_expansion(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path, "0.0.0.0:8081", "${ADMIN_TOKEN}")
    monkeypatch.setenv("ADMIN_TOKEN", "short")
    assert main(["check", "--config", str(config)]) == 2
    assert "admin.token is 5 characters long" in capsys.readouterr().err
    monkeypatch.setenv("ADMIN_TOKEN", "4f0c1d9be35a7e2268ad90c1")
    assert main(["check", "--config", str(config)]) == 0


@pytest.mark.parametrize("listen", ["127.0.0.1:8081", "[::1]:8081", "localhost:8081"])
def test_on_loopback_a_short_token_is_the_operators_business(tmp_path: Path, listen: str) -> None:
    assert main(["check", "--config", str(write(tmp_path, listen, "abc"))]) == 0


@pytest.mark.slow
def test_run_refuses_it_too_when_the_command_line_opens_the_listener(tmp_path: Path) -> None:
    config = write(tmp_path, "127.0.0.1:0", SHORT)
    proc = subprocess.run([sys.executable, "-m", "proxy", "run", "--config", str(config),
                           "--admin-listen", "0.0.0.0:0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "admin.token is 15 characters long" in proc.stderr
    assert "listening" not in proc.stdout
