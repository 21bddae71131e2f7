"""``upstream.tls.ca_file`` that holds no CA certificate (garbage, an empty file, a private key,
a directory): refused at its FILE:LINE by ``check``, by ``run`` and by a reload, in words that
say so. It used to pass ``check``; ``run`` then exited blaming the cache directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import Overrides, load_config
from proxy.web.server import install_reloader, open_runtime
from tests.conftest import MakeProxy
from tests.harness import self_signed


def bad_ca(tmp_path: Path, kind: str) -> Path:
    if kind == "directory":
        (tmp_path / "cas").mkdir()
        return tmp_path / "cas"
    path = tmp_path / f"{kind}.pem"
    if kind == "garbage":
        path.write_text("garbage\n")
    elif kind == "empty":
        path.write_text("")
    else:  # a private key where the CA certificate should be
        key, _ = self_signed(tmp_path, "k", "k.test", "DNS:k.test")
        path.write_bytes(key.read_bytes())
    return path


def config_with(tmp_path: Path, ca: Path) -> Path:
    config = tmp_path / "c.yaml"
    config.write_text("listen: 127.0.0.1:0\nupstreams: [https://127.0.0.1:9]\nupstream:\n"
                      f"  tls: {{ca_file: '{ca}'}}\n"
                      f"cache: {{memory: 16MB, disk: {{path: '{tmp_path / 'cache'}', size: 64MB, shards: 1}}}}\n"
                      "admin: {listen: off}\n")
    return config


def cachegate(*args: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("kind", ["garbage", "empty", "key", "directory"])
def test_check_and_run_refuse_a_ca_file_without_a_certificate_at_its_line(tmp_path: Path, kind: str) -> None:
    ca = bad_ca(tmp_path, kind)
    config = config_with(tmp_path, ca)
    expected = f"{config}:4: upstream.tls.ca_file: no CA certificate in {ca}"
    for command in ("check", "run"):
        code, out = cachegate(command, "-c", str(config))
        assert expected in out, (command, out)
        assert "cache directory" not in out and code == 2, (command, code, out)
    assert not (tmp_path / "cache").exists()  # run stopped at the config


async def test_a_reload_to_a_ca_file_without_a_certificate_is_refused(
        tmp_path: Path, make_proxy: MakeProxy) -> None:
    _, cert = self_signed(tmp_path, "ca", "ca.test", "DNS:ca.test")
    proxy = await make_proxy(config=f"upstream: {{tls: {{ca_file: '{cert}'}}}}\n", directory=tmp_path / "p")
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    config = Path(proxy.config_path)
    garbage = bad_ca(tmp_path, "garbage")
    config.write_text(config.read_text().replace(str(cert), str(garbage)))  # noqa: ASYNC240
    reply = await proxy.admin("POST", "/reload")
    assert reply.status == 400
    assert f"upstream.tls.ca_file: no CA certificate in {garbage}" in reply.body.decode()
    assert proxy.runtime.settings.pool.tls.ca_file == str(cert)  # the running config stays


async def test_a_ca_file_spoilt_after_the_check_is_named_not_the_cache_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, cert = self_signed(tmp_path, "ca", "ca.test", "DNS:ca.test")
    settings = load_config(str(config_with(tmp_path, cert)), Overrides())
    cert.write_text("garbage\n")  # between the check and the start
    assert await open_runtime(settings, owner=True) is None
    err = capsys.readouterr().err
    assert f"cachegate: upstream.tls.ca_file: no CA certificate in {cert}" in err, err
    assert "cache directory" not in err
    assert not (tmp_path / "cache").exists()  # nothing was opened before the pool's context
