"""``upstream.tls.ca_file`` that holds no CA certificate (garbage, an empty file, a private key,
a directory): refused at its FILE:LINE by ``check``, by ``run`` and by a reload, in words that
say so. It used to pass ``check``; ``run`` then exited blaming the cache directory."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.config import Overrides, load_config
from proxy.web.server import install_reloader, open_runtime
from tests.conftest import MakeProxy
from tests.harness import Origin, ProxyProcess, post_reload, self_signed, spawn_cachegate, write_config


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


async def test_a_ca_file_spoilt_after_the_check_does_not_matter(tmp_path: Path) -> None:
    """The pool trusts the bytes the load checked (``TLSSettings.ca_data``), not the file read again."""
    _, cert = self_signed(tmp_path, "ca", "ca.test", "DNS:ca.test")
    settings = load_config(str(config_with(tmp_path, cert)), Overrides())
    cert.write_text("garbage\n")  # between the check and the start
    runtime = await open_runtime(settings, owner=True)
    assert runtime is not None
    await runtime.close()


async def test_a_ca_file_not_loaded_by_a_config_load_is_named_not_the_cache_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, cert = self_signed(tmp_path, "ca", "ca.test", "DNS:ca.test")
    settings = load_config(str(config_with(tmp_path, cert)), Overrides())
    # Settings made otherwise (no bytes kept): the pool reads the file, and says it does not load.
    settings = replace(settings, pool=replace(settings.pool, tls=replace(settings.pool.tls, ca_data=None)))
    cert.write_text("garbage\n")
    assert await open_runtime(settings, owner=True) is None
    err = capsys.readouterr().err
    assert f"cachegate: upstream.tls.ca_file: no CA certificate in {cert}" in err, err
    assert "cache directory" not in err
    assert not (tmp_path / "cache").exists()  # nothing was opened before the pool's context


def _get(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)




async def _restart_workers(proc: ProxyProcess) -> None:
    """Kill every worker as it runs now (kill -9) and wait until the supervisor restarted them."""
    ready = [m for line in list(proc.output) if (m := re.search(r"worker \d ready \(pid (\d+)\)", line))]
    for m in ready[-2:]:
        os.kill(int(m.group(1)), signal.SIGKILL)
    for _ in range(300):
        if sum(" ready (pid" in line for line in proc.output) == len(ready) + 2:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the workers were not restarted:\n{proc.text}")


@pytest.mark.slow
async def test_restarted_workers_trust_the_running_ca_not_the_file_now(tmp_path: Path) -> None:
    """A restarted worker (a crash, an OOM kill) read ca_file again: a file a reload had refused
    (garbage) made it exit at every restart, and a new CA, which a reload had accepted saying
    nothing (``restart_required: []``) while its siblings kept the old one, made it refuse the
    upstream its siblings trusted. It now trusts the bytes its supervisor runs, and the reload
    names ``upstream.tls.ca_file`` in ``restart_required``."""
    key, cert = self_signed(tmp_path, "", "127.0.0.1", "IP:127.0.0.1")
    _, other = self_signed(tmp_path, "other", "other.test", "DNS:other.test")
    ca = tmp_path / "ca.pem"
    ca.write_bytes(cert.read_bytes())
    secure = Origin()
    secure.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    secure.ssl_context.load_cert_chain(cert, key)
    secure.route("/t", body=b"over tls", headers={"Cache-Control": "no-store"})
    await secure.start()
    config = write_config(str(tmp_path), secure.url, f"upstream: {{tls: {{ca_file: '{ca}'}}}}\n")
    proc = await asyncio.to_thread(spawn_cachegate, ["run", "--config", config, "--workers", "2"])
    try:
        assert proc.admin_url is not None
        assert [await asyncio.to_thread(_get, f"{proc.proxy_url}/t") for _ in range(4)] == [200] * 4
        ca.write_text("garbage\n")
        status, _ = await asyncio.to_thread(post_reload, proc.admin_url)
        assert status == 400
        await _restart_workers(proc)  # they used to exit 2, again and again
        assert [await asyncio.to_thread(_get, f"{proc.proxy_url}/t") for _ in range(6)] == [200] * 6
        ca.write_bytes(other.read_bytes())  # a CA that does not sign the origin's certificate
        status, answer = await asyncio.to_thread(post_reload, proc.admin_url)
        assert status == 200, answer
        await _restart_workers(proc)  # only restarted workers run now
        assert [await asyncio.to_thread(_get, f"{proc.proxy_url}/t") for _ in range(6)] == [200] * 6
        assert answer["restart_required"] == ["upstream.tls.ca_file"], answer
    finally:
        assert await asyncio.to_thread(proc.stop) == 0, proc.text
        await secure.stop()


def test_a_ca_file_of_openssl_trusted_certificate_blocks_is_read_as_nginx_and_curl_read_it(tmp_path: Path) -> None:
    """``openssl x509 -addtrust`` writes 'BEGIN TRUSTED CERTIFICATE' blocks (so do bundles such
    as RHEL's ca-bundle.trust.crt). Read as ``cadata`` they were skipped without a word: a file of
    them alone was refused at check, and a bundle mixing both kinds trusted only its plain
    certificates (every upstream signed by the others: 502, "unable to get local issuer")."""
    from proxy.tls import ca_file_problem, client_context

    _, plain = self_signed(tmp_path, "plain", "plain-ca", "DNS:plain.test")
    _, other = self_signed(tmp_path, "other", "other-ca", "DNS:other.test")
    trusted = subprocess.run(["openssl", "x509", "-in", str(other), "-addtrust", "serverAuth"],
                             check=True, capture_output=True).stdout
    assert b"BEGIN TRUSTED CERTIFICATE" in trusted
    assert ca_file_problem("trusted.pem", trusted) is None
    assert [c["subject"] for c in client_context(trusted).get_ca_certs()] == [((("commonName", "other-ca"),),)]
    mixed = plain.read_bytes() + trusted
    assert sorted(c["subject"][0][0][1] for c in client_context(mixed).get_ca_certs()) == ["other-ca", "plain-ca"]


@pytest.mark.parametrize(("verify", "warned"), [("false", True), ("true", False)])
def test_a_ca_file_beside_verify_false_is_said_to_be_ignored(
        tmp_path: Path, verify: str, warned: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """verify: false checks nothing: a ca_file beside it read as if certificates were checked."""
    from proxy.cli import main

    _, ca = self_signed(tmp_path, "ca", "ca.test", "DNS:ca.test")
    config = tmp_path / "c.yaml"
    config.write_text(f"upstreams: [https://127.0.0.1:9]\nupstream:\n  tls: {{verify: {verify}, ca_file: '{ca}'}}\n")
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr()
    said = (f"{config}:3: warning: upstream.tls.ca_file is ignored: verify is false, so upstream "
            "certificates are not checked at all") in out.err + out.out
    assert said == warned, out
    # once: verify: false has its own warning, which would say the same thing again
    assert (out.err + out.out).count(": warning: ") == int(warned), out
