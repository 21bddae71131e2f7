"""Paths the file system encoding cannot write: a config line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ASCII_LOCALE = {"LANG": "", "LC_ALL": "POSIX", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
FIX = "run with a UTF-8 locale (LC_ALL=C.UTF-8) or PYTHONUTF8=1, or give the path in ASCII"


def refused_in_ascii_locale(command: str, config: Path) -> str:
    """``cachegate COMMAND --config CONFIG`` under an ASCII locale: its standard error, once it
    exited 2 (a config problem)."""
    env = {**os.environ, **ASCII_LOCALE, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-m", "proxy", command, "--config", str(config)],
                          capture_output=True, env=env, timeout=60)
    err = done.stderr.decode("ascii", "backslashreplace")
    assert done.returncode == 2, err
    return err


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_path_an_ascii_locale_cannot_write_is_named_at_its_line(tmp_path: Path, command: str) -> None:
    """Under ``LC_ALL=POSIX`` (no UTF-8 mode) a rule file ``règles.yaml`` made ``realpath`` raise
    UnicodeEncodeError: ``cachegate check`` ended in a traceback."""
    (tmp_path / "règles.yaml").write_text("rules: []\n")
    config = tmp_path / "c.yaml"
    config.write_text("listen: '127.0.0.1:0'\nupstreams: ['http://127.0.0.1:9']\n"
                      "rules: [règles.yaml]\ncache: {memory: 16MB, disk: {path: cachè}}\n", encoding="utf-8")
    err = refused_in_ascii_locale(command, config)
    assert "Traceback" not in err and "UnicodeEncodeError" not in err
    assert err.splitlines() == [
        f"{config}:3: rules: 'r\\xe8gles.yaml' cannot be a file name here: the file system encoding is ascii "
        f"(from the locale), which cannot write '\\xe8'; {FIX}",
        f"{config}:4: cache.disk.path: 'cach\\xe8' cannot be a file name here: the file system encoding is "
        f"ascii (from the locale), which cannot write '\\xe8'; {FIX}"]
    assert not (tmp_path / "cachè").exists()


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_redis_socket_path_an_ascii_locale_cannot_write_is_named_at_its_line(tmp_path: Path,
                                                                                 command: str) -> None:
    """``cluster.redis: unix:///.../rédis.sock`` passed ``check``; ``run`` stopped with "cannot
    reach Redis at ...: 'ascii' codec can't encode", no FILE:LINE. The socket path is a path
    like the others (percent-decoded, as the Redis client reads it)."""
    config = tmp_path / "c.yaml"
    config.write_text("listen: '127.0.0.1:0'\nupstreams: ['http://127.0.0.1:9']\nadmin: {listen: off}\n"
                      f"cluster: {{redis: 'unix://{tmp_path}/rédis.sock?password=S3CRET', node: n1}}\n"
                      f"cache: {{memory: 16MB, disk: null}}\n", encoding="utf-8")
    err = refused_in_ascii_locale(command, config)
    assert "Traceback" not in err and "S3CRET" not in err
    assert err.splitlines() == [
        f"{config}:4: cluster.redis: 'unix://{tmp_path}/r\\xe9dis.sock?password=***': the socket path "
        f"'{tmp_path}/r\\xe9dis.sock' cannot be a file name here: the file system encoding is ascii (from the "
        f"locale), which cannot write '\\xe9'; {FIX}"]
