"""A TLS listener's certificate as clients will judge it, with certificates openssl makes here:
one that expired, is not valid yet or expires soon is warned of (check, start, reload) and its
end exported as a metric; files that do not load say why in the operator's terms (a chain in
the wrong order, DER instead of PEM, a symbolic link to nothing)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.cli import main
from proxy.config import Overrides
from proxy.metrics import ClusterMetrics
from proxy.tls import EXPIRES_SOON, RECHECK, ExpiryWatch, ServerTLS, validity_problem
from proxy.web.server import install_reloader
from tests.conftest import MakeProxy
from tests.harness import Origin, self_signed

EXPIRED_END = 1580515200.0  # 2020-02-01 00:00:00 UTC


def openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (scripts/test installs it with apt-get where it can)")
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def dated(directory: Path, name: str, start: str, end: str) -> tuple[Path, Path]:
    """A key and a self-signed certificate valid from ``start`` to ``end`` (YYYYMMDDHHMMSSZ):
    ``openssl ca`` sets both dates, where ``req -x509 -days`` only counts from now."""
    ca = directory / f"ca-{name}"
    ca.mkdir()
    (ca / "index.txt").write_text("")
    (ca / "serial").write_text("01\n")
    (ca / "ca.cnf").write_text(
        f"[ca]\ndefault_ca = c\n[c]\ndatabase = {ca}/index.txt\nnew_certs_dir = {ca}\nserial = {ca}/serial\n"
        "default_md = sha256\npolicy = p\ncopy_extensions = copy\nunique_subject = no\n"
        "[p]\ncommonName = supplied\n")
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(ca / "csr"),
            "-subj", f"/CN={name}.test", "-addext", "subjectAltName=IP:127.0.0.1")
    openssl("ca", "-batch", "-selfsign", "-notext", "-config", str(ca / "ca.cnf"), "-keyfile", str(key),
            "-in", str(ca / "csr"), "-out", str(cert), "-startdate", start, "-enddate", end)
    return key, cert


def expired(directory: Path) -> tuple[Path, Path]:
    return dated(directory, "expired", "20200101000000Z", "20200201000000Z")


def not_yet_valid(directory: Path) -> tuple[Path, Path]:
    start = time.strftime("%Y%m%d%H%M%SZ", time.gmtime(time.time() + 30 * 86400))
    return dated(directory, "later", start, "20991231000000Z")


def expiring(directory: Path) -> tuple[Path, Path]:
    key, cert = directory / "soon.key", directory / "soon.pem"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
            "-days", "5", "-subj", "/CN=soon.test", "-addext", "subjectAltName=IP:127.0.0.1")
    return key, cert


def not_after(cert: Path) -> float:
    return ssl.cert_time_to_seconds(ssl._ssl._test_decode_cert(str(cert))["notAfter"])  # type: ignore[attr-defined]


class Live:
    """The files a TLS listener names (``live.key``, ``live.pem``), a pair copied in."""

    def __init__(self, directory: Path, pair: tuple[Path, Path]) -> None:
        self.key, self.cert = directory / "live.key", directory / "live.pem"
        self.use(pair)

    def use(self, pair: tuple[Path, Path]) -> None:
        shutil.copy(pair[0], self.key)
        shutil.copy(pair[1], self.cert)


def listen(live: Live) -> str:
    """Block style: the ``cert`` key on a line of its own (line 7 of the config)."""
    return ("upstreams: [http://127.0.0.1:9]\n"
            "listen:\n"
            "  - 127.0.0.1:0\n"
            "  - address: 127.0.0.1:0\n"
            "    tls:\n"
            f"      key: {live.key}\n"
            f"      cert: {live.cert}\n")


@pytest.mark.parametrize(("make", "says"), [
    (expired, r"the certificate in {cert} expired on 2020-02-01 00:00:00 UTC \(\d+ days ago\): clients "
              r"refuse it, every handshake fails; put the renewed certificate in place"),
    (not_yet_valid, r"the certificate in {cert} is not valid before \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC "
                    r"\(in (29|30) days\): clients refuse it until then \(is this machine's clock right\?\)"),
    (expiring, r"the certificate in {cert} expires on \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC, in [45] days: "
               r"renew it before then"),
])
def test_check_warns_at_the_cert_line_of_a_certificate_clients_refuse_and_strict_refuses_it(
        tmp_path: Path, make: object, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An expired certificate loaded without a word: check said OK, and every handshake then
    failed. Now a warning at the cert's line, which ``--strict`` refuses."""
    assert callable(make)
    live = Live(tmp_path, make(tmp_path))
    config = tmp_path / "c.yaml"
    config.write_text(listen(live))
    assert main(["check", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("1 warning(s))\n"), out
    pattern = rf"^{re.escape(str(config))}:7: warning: listen\[1\]\.tls\.cert: " + says.format(
        cert=re.escape(str(live.cert)))
    assert re.search(pattern, err, re.M), err
    assert main(["check", "--strict", "--config", str(config)]) == 2
    assert "1 warning(s), refused by --strict" in capsys.readouterr().err
    live.use(self_signed(tmp_path, "fresh", "fresh.test", "IP:127.0.0.1"))  # 90 days: nothing to say
    assert main(["check", "--strict", "--config", str(config)]) == 0
    assert "warning" not in capsys.readouterr().err


def _expiry(metrics: str) -> dict[str, float]:
    return {s.labels["listener"]: s.value for f in text_string_to_metric_families(metrics)
            if f.name == "cachegate_tls_certificate_expiry_seconds" for s in f.samples}


async def test_a_reload_to_an_expired_certificate_warns_in_its_answer_and_the_metric_says_when(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    """A renewal hook that copied the old (expired) file got ``{"reloaded": true,
    "restart_required": []}`` and nothing else. The answer's ``warnings`` now say so, and
    cachegate_tls_certificate_expiry_seconds{listener} follows the certificate served."""
    fresh = self_signed(tmp_path, "fresh", "fresh.test", "IP:127.0.0.1")
    live = Live(tmp_path, fresh)
    proxy = await make_proxy(config=f"listen:\n  - 127.0.0.1:0\n  - {{address: '127.0.0.1:0', tls: "
                                    f"{{cert: '{live.cert}', key: '{live.key}'}}}}\n")
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    https = proxy.listeners.proxy_urls[1].removeprefix("https://")
    seen = _expiry((await proxy.admin("GET", "/metrics")).body.decode())
    assert seen == {https: not_after(fresh[1])}, seen
    assert seen[https] > time.time() + 80 * 86400
    old = expired(tmp_path)
    live.use(old)
    reply = await proxy.admin("POST", "/reload")
    assert reply.status == 200, reply.body
    answer = json.loads(reply.body)
    assert answer["reloaded"] is True and answer["restart_required"] == [], answer
    assert len(answer["warnings"]) == 1, answer
    assert re.fullmatch(rf"{re.escape(proxy.config_path)}:\d+: warning: listen\[1\]\.tls\.cert: the certificate "
                        rf"in {re.escape(str(live.cert))} expired on 2020-02-01 00:00:00 UTC .*",
                        answer["warnings"][0]), answer
    assert _expiry((await proxy.admin("GET", "/metrics")).body.decode()) == {https: EXPIRED_END}
    live.use(fresh)
    answer = json.loads((await proxy.admin("POST", "/reload")).body)
    assert answer["warnings"] == [], answer
    assert _expiry((await proxy.admin("GET", "/metrics")).body.decode()) == {https: not_after(fresh[1])}


@pytest.mark.slow
async def test_a_start_with_an_expired_certificate_says_so_and_every_worker_exports_its_end(
        origin: Origin, tmp_path: Path) -> None:
    """`cachegate run --workers 2` with an expired certificate: the start's output warns, and
    the supervisor's /metrics gives its notAfter once (the earliest over workers, not a sum)."""
    from tests.harness import spawn_cachegate, write_config

    live = Live(tmp_path, expired(tmp_path))
    config = write_config(str(tmp_path), origin.url,
                          f"listen:\n  - 127.0.0.1:0\n  - {{address: '127.0.0.1:0', tls: "
                          f"{{cert: '{live.cert}', key: '{live.key}'}}}}\n")
    proc = await asyncio.to_thread(spawn_cachegate, ["run", "--config", config, "--workers", "2"])
    try:
        assert proc.admin_url is not None
        warned = f"warning: listen[1].tls.cert: the certificate in {live.cert} expired on 2020-02-01"
        assert any(warned in line for line in proc.output), proc.text
        https = next(line.split("proxy listening on https://", 1)[1].split()[0] for line in proc.output
                     if "proxy listening on https://" in line)

        def scrape() -> str:
            assert proc.admin_url is not None
            with urllib.request.urlopen(proc.admin_url + "/metrics", timeout=15) as reply:
                return str(reply.read().decode())

        assert _expiry(await asyncio.to_thread(scrape)) == {https: EXPIRED_END}
    finally:
        assert await asyncio.to_thread(proc.stop) == 0, proc.text


def _stamp(when: float) -> str:
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(when))


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "left", "says"), [
    # a lone process, its certificate 14 days and a few seconds from its end: nothing at the start
    (1, EXPIRES_SOON + 12, r"expires on \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, in 13 days: renew it before then"),
    # a supervisor, its certificate seconds from its end: "expires" at the start, then "expired"
    (2, 12, r"expired on \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(0 minutes ago\): clients refuse it"),
])
async def test_a_running_process_warns_when_its_certificate_comes_within_14_days_or_expires(
        origin: Origin, tmp_path: Path, workers: int, left: float, says: str) -> None:
    """The dates were read at a start and a reload only: an instance that ran for weeks logged
    nothing as its certificate passed the 14-day mark or expired. Now the process that warns at
    a start (the supervisor with workers, not each worker) warns at those moments too, with no
    reload, and at most once a day after (``proxy.tls.ExpiryWatch``)."""
    from tests.harness import spawn_cachegate, write_config

    live = Live(tmp_path, dated(tmp_path, "short", _stamp(time.time() - 86400), _stamp(time.time() + left)))
    # (with workers, a name: the supervisor's line names the address bound, as the workers'
    # cachegate_tls_certificate_expiry_seconds does, not "localhost")
    address = "localhost:0" if workers > 1 else "127.0.0.1:0"
    config = write_config(str(tmp_path), origin.url,
                          f"listen:\n  - 127.0.0.1:0\n  - {{address: '{address}', tls: "
                          f"{{cert: '{live.cert}', key: '{live.key}'}}}}\n")
    proc = await asyncio.to_thread(spawn_cachegate, ["run", "--config", config, "--workers", str(workers)])
    try:
        https = next(line.split("proxy listening on https://", 1)[1].split()[0] for line in proc.output
                     if "proxy listening on https://" in line)
        started = sum("warning: listen[1].tls.cert" in line for line in proc.output)
        assert started == (0 if workers == 1 else 1), proc.text
        # (the address bound: "localhost" is named as its cachegate_tls_* series name it)
        named = re.escape(https) if workers == 1 else rf"(127\.0\.0\.1|\[::1\]):{https.rsplit(':', 1)[1]}"
        pattern = re.compile(rf"WARNING .*TLS listener {named}: the certificate in "
                             rf"{re.escape(str(live.cert))} {says}")
        for _ in range(int(left % 86400 + 30) * 5):  # the mark passes within ``left`` seconds
            if any(pattern.search(line) for line in proc.output):
                break
            await asyncio.sleep(0.2)
        assert any(pattern.search(line) for line in proc.output), proc.text
        await asyncio.sleep(1.5)  # (a second line, from a worker or a second check, would be here by now)
        assert sum("TLS listener" in line for line in proc.output) == 1, proc.text
    finally:
        assert await asyncio.to_thread(proc.stop) == 0, proc.text


class _Served:
    """What a process serves, as ``ExpiryWatch`` asks for it, and a clock the test moves."""

    def __init__(self, cert: Path) -> None:
        self.pem = cert.read_bytes()
        self.cert = str(cert)
        self.now = time.time()

    def __call__(self) -> list[tuple[str, str, bytes]]:
        return [("127.0.0.1:8443", self.cert, self.pem)]


def test_the_watch_warns_at_most_once_a_day_and_at_once_of_a_new_problem_or_certificate(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Checked every 12 hours, a certificate 5 days from its end is warned of once a day (the
    start's own warning counts for its first day); its expiry, and a renewed certificate's
    problem, at once; every check is scheduled no later than just after the next mark."""
    served = _Served(expiring(tmp_path)[1])
    end = not_after(Path(served.cert))
    watch = ExpiryWatch(served, clock=lambda: served.now)
    caplog.set_level(logging.WARNING, "cachegate.tls")

    def warned(at: float) -> list[str]:
        caplog.clear()
        served.now = at
        watch.check()
        return [r.getMessage() for r in caplog.records]

    start = served.now
    watch.said()  # the start's config load warned
    assert warned(start + RECHECK) == []
    day = start + 2 * RECHECK
    assert warned(day) == [f"TLS listener 127.0.0.1:8443: {validity_problem(served.cert, (0, end), day)}"]
    assert warned(start + 3 * RECHECK) == []
    served.now = end - 3600
    assert watch.check() == pytest.approx(3601)  # (the next check: just after the expiry)
    [message] = warned(end + 1)
    assert message == f"TLS listener 127.0.0.1:8443: {validity_problem(served.cert, (0, end), end + 1)}"
    assert " expired on " in message
    assert warned(end + 2) == []
    served.pem = expired(tmp_path)[1].read_bytes()  # another certificate, with its own problem
    assert len(warned(end + 3)) == 1


def test_the_expiry_over_workers_is_the_earliest_not_a_sum() -> None:
    name = "cachegate_tls_certificate_expiry_seconds"

    def snap(when: float) -> list[list[object]]:
        return [[name, "gauge", "doc", [[name, {"listener": "127.0.0.1:443"}, when]]]]

    merged = ClusterMetrics().merge(snap(5.0), [snap(2000.0), snap(1000.0)])  # (the supervisor's: ignored)
    assert [(s.labels, s.value) for f in merged for s in f.samples] == [({"listener": "127.0.0.1:443"}, 1000.0)]


# -- files that do not load, said in the operator's terms ------------------------------------------


def signed_by_a_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a key with its certificate signed by that CA: (key, leaf, ca)."""
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
            "-days", "90", "-subj", "/CN=Test CA", "-addext", "basicConstraints=critical,CA:TRUE")
    key, csr, leaf = directory / "leaf.key", directory / "leaf.csr", directory / "leaf.pem"
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
            "-subj", "/CN=leaf.test")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(leaf), "-days", "90")
    return key, leaf, ca


def check_says(tmp_path: Path, live: Live, capsys: pytest.CaptureFixture[str]) -> str:
    config = tmp_path / "c.yaml"
    config.write_text(listen(live))
    assert main(["check", "--config", str(config)]) == 2
    return capsys.readouterr().err


def test_a_chain_whose_first_certificate_is_not_the_keys_says_which_one_is(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The intermediate before the server's certificate (or another certificate put first):
    OpenSSL said only "[X509: KEY_VALUES_MISMATCH] key values mismatch"."""
    key, leaf, ca = signed_by_a_ca(tmp_path)
    other = self_signed(tmp_path, "other", "other.test", "IP:127.0.0.1")[1]
    live = Live(tmp_path, (key, leaf))
    for chain, n in (((ca, leaf), 2), ((other, ca, leaf), 3)):
        live.cert.write_bytes(b"".join(p.read_bytes() for p in chain))
        err = check_says(tmp_path, live, capsys)
        assert (f": listen[1].tls: cannot load the certificate {live.cert} with the key {live.key}: the key "
                f"belongs to certificate {n} of {live.cert}, not to the first: the server's certificate must "
                "come first") in err, err
    tls = ServerTLS(str(leaf), str(key))  # the right order loads; a reload says the same of the wrong one
    kept = tls.reload(str(live.cert), str(key)) or ""
    assert f"the key belongs to certificate 3 of {live.cert}" in kept, kept
    live.cert.write_bytes(leaf.read_bytes() + ca.read_bytes())
    config = tmp_path / "c.yaml"
    assert main(["check", "--config", str(config)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize(("field", "tool", "kind"), [("cert", "x509", "certificate"), ("key", "pkey", "private key")])
def test_a_der_certificate_or_key_is_named_with_the_command_that_converts_it(
        tmp_path: Path, field: str, tool: str, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    """DER (``openssl ... -outform DER``, a Windows .cer) was "holds no PEM block cachegate knows"."""
    live = Live(tmp_path, self_signed(tmp_path, "a", "a.test", "IP:127.0.0.1"))
    path = live.cert if field == "cert" else live.key
    der = tmp_path / "der"
    openssl(tool, "-in", str(path), "-outform", "DER", "-out", str(der))
    shutil.copy(der, path)
    err = check_says(tmp_path, live, capsys)
    assert (f"{path} (tls.{field}) is a DER {kind}, not PEM: convert it with `openssl {tool} -inform DER "
            f"-in {path} -out {path}.pem` and name that file") in err, err
    assert "no PEM block" not in err


@pytest.mark.parametrize("field", ["cert", "key"])
def test_a_symbolic_link_to_a_missing_file_names_the_link_and_its_target(
        tmp_path: Path, field: str, capsys: pytest.CaptureFixture[str]) -> None:
    """certbot's live/ links into archive/: a target gone (pruned, not copied along) was
    "live/.../privkey.pem does not exist", of a path ``ls`` shows."""
    live = Live(tmp_path, self_signed(tmp_path, "a", "a.test", "IP:127.0.0.1"))
    path = live.cert if field == "cert" else live.key
    (tmp_path / "archive").mkdir()
    path.unlink()
    path.symlink_to(f"archive/{field}3.pem")
    err = check_says(tmp_path, live, capsys)
    line = 7 if field == "cert" else 6
    assert (f":{line}: listen[1].tls.{field}: {path} is a symbolic link to archive/{field}3.pem "
            f"({tmp_path / 'archive' / f'{field}3.pem'}), which does not exist\n") in err, err
