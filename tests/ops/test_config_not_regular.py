"""A config file that is not a regular file (a FIFO) is refused, never read.

Opening and reading a FIFO waits for a writer forever: with the config path a FIFO (a symlink
swapped to one), ``POST /reload`` never answered and queued every later reload behind it, a
SIGTERM printed "stopped" while a thread stayed blocked in ``open`` and the process never
exited, and ``cachegate check`` hung. Rule files were already refused so; the config file itself
now is too, at start, on reload and in ``check``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.harness import Origin, spawn_cachegate, write_config

pytestmark = pytest.mark.slow


def _post(url: str) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, method="POST", data=b"{}", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_config_path_that_became_a_fifo_is_refused_on_reload_and_the_process_still_stops(
        origin: Origin, tmp_path: Path) -> None:
    config = Path(write_config(str(tmp_path), origin.url))
    good = tmp_path / "good.yaml"
    good.write_bytes(config.read_bytes())
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = spawn_cachegate(["run", "--config", str(config), "--workers", "2"])
    try:
        assert proc.admin_url is not None
        config.unlink()
        config.symlink_to(fifo)
        status, body = _post(proc.admin_url + "/reload")
        assert status == 400, body
        assert "not a regular file (a FIFO)" in json.dumps(body), body
        config.unlink()
        config.write_bytes(good.read_bytes())
        status, body = _post(proc.admin_url + "/reload")  # not queued behind a blocked one
        assert status == 200, body
    finally:
        code = proc.stop(timeout=20)
    assert code == 0, proc.text


def test_check_and_run_refuse_a_config_that_is_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "cachegate.yaml"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for command in ("check", "run"):
        done = subprocess.run([sys.executable, "-m", "proxy", command, "--config", str(fifo)],
                              capture_output=True, text=True, timeout=20, env=env, cwd=tmp_path)
        assert done.returncode != 0, done
        assert f"{fifo}:0: cannot read file: is not a regular file (a FIFO)" in done.stdout + done.stderr, done


def test_a_config_that_is_a_directory_or_a_socket_is_named_as_a_rule_file_would_be(tmp_path: Path) -> None:
    """'is a directory' and '(a socket)', as for a rule file: they were 'not a regular file (not
    a file)' and 'No such device or address' (a socket cannot be opened)."""
    folder = tmp_path / "conf.d"
    folder.mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    try:
        for path, said in ((folder, "is a directory"), (tmp_path / "s", "is not a regular file (a socket)")):
            done = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(path)],
                                  capture_output=True, text=True, timeout=20, env=env, cwd=tmp_path)
            assert done.returncode != 0, done
            assert f"{path}:0: cannot read file: {said}\n" in done.stdout + done.stderr, done
    finally:
        sock.close()


def test_dev_null_is_an_empty_config_and_other_devices_are_refused(tmp_path: Path) -> None:
    """``--config /dev/null`` (the shell's empty file: every setting from the command line) is
    read as empty; /dev/zero, which would be read forever, is refused as a device."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    argv = [sys.executable, "-m", "proxy", "check", "--config"]
    done = subprocess.run([*argv, "/dev/null"], capture_output=True, text=True, timeout=20, env=env, cwd=tmp_path)
    assert "/dev/null:0: cannot read file" not in done.stdout + done.stderr, done  # (read: what it lacks)
    done = subprocess.run([*argv, "/dev/zero"], capture_output=True, text=True, timeout=20, env=env, cwd=tmp_path)
    assert done.returncode != 0, done
    assert "/dev/zero:0: cannot read file: is not a regular file (a device)" in done.stdout + done.stderr, done
