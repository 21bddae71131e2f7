"""A TLS listener's certificate and key files that do not load, with certificates openssl
makes here: check and a reload say why in the operator's terms (a chain in the wrong order,
DER instead of PEM, a symbolic link to nothing)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.tls import ServerTLS
from tests.harness import self_signed


def openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (scripts/test installs it with apt-get where it can)")
    subprocess.run(["openssl", *args], check=True, capture_output=True)


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
