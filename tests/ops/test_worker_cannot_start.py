"""A worker that cannot even be exec'd during the start-up (an interpreter the service's user
cannot run: a virtualenv made with pyenv's Python under /root, with ProtectHome=): the start
fails, once, exit 1, naming the interpreter. It retried "cannot start worker 0: Permission
denied" for ever, and systemd waited TimeoutStartSec before it reported anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_a_worker_interpreter_that_cannot_be_run_fails_the_start_once(tmp_path: Path) -> None:
    unrunnable = tmp_path / "python3"  # not executable, by anyone (root included)
    unrunnable.write_bytes(b"")
    unrunnable.chmod(0o644)
    site = tmp_path / "site"  # what the supervisor runs its workers with: that interpreter
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nsys.executable = {str(unrunnable)!r}\n")
    config = tmp_path / "c.yaml"
    config.write_text("upstreams: [http://127.0.0.1:9]\nlisten: 127.0.0.1:0\nadmin: {listen: null}\n"
                      "cache: {disk: null}\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "proxy", "run", "--config", str(config), "--workers", "2"],
                          capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if "cannot start worker" in line]
    assert len(errors) == 1, done.stderr
    assert f"{unrunnable}: Permission denied; stopping" in errors[0], errors
    assert "restarting" not in done.stderr and "did not start in time" not in done.stderr, done.stderr
