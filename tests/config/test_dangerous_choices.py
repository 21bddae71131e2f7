"""The weakening choices of SECURITY.md's table that a config can make by mistake are warned of
at their line by ``cachegate check``, and logged at start and reload (``Settings.warnings``):
a trusted_proxies or admin.purge_from wider than a /8 (IPv4) or /32 (IPv6), and
upstream.tls.verify: false. They passed without a word, while SECURITY.md said check "warns
about dangerous choices"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.config import load_config
from tests.harness import spawn_cachegate

HEAD = "listen: 127.0.0.1:0\nupstreams: [https://127.0.0.1:9]\ncache: {memory: 64MB, disk: null}\n"


def warnings(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "c.yaml"
    path.write_text(HEAD + text)
    return [w.removeprefix(f"{path}:") for w in load_config(str(path)).warnings]


@pytest.mark.parametrize(("text", "said"), [
    ("trusted_proxies: [0.0.0.0/0, '::/0']\n",
     ["4: warning: trusted_proxies: 0.0.0.0/0 is wider than a /8: every client may set X-Forwarded-For",
      "4: warning: trusted_proxies: ::/0 is wider than a /32: every client may set X-Forwarded-For"]),
    ("trusted_proxies:\n  - 10.0.0.0/8\n  - 0.0.0.0/1\n  - 2000::/3\n",
     ["6: warning: trusted_proxies: 0.0.0.0/1 is wider than a /8: every address in it may set",
      "7: warning: trusted_proxies: 2000::/3 is wider than a /32: every address in it may set"]),
    ("admin: {purge_from: [0.0.0.0/0]}\n",
     ["4: warning: admin.purge_from: 0.0.0.0/0 is wider than a /8: every client may PURGE any URL"]),
    ("admin:\n  purge_from:\n    - '::/0'\n",
     ["6: warning: admin.purge_from: ::/0 is wider than a /32: every client may PURGE any URL"]),
    ("upstream: {tls: {verify: false}}\n",
     ["4: warning: upstream.tls.verify is false: upstream certificates and names are not checked"]),
    ("upstream:\n  tls:\n    verify: false\n",
     ["6: warning: upstream.tls.verify is false: upstream certificates and names are not checked"]),
])
def test_a_dangerous_choice_is_warned_of_at_its_line(tmp_path: Path, text: str, said: list[str]) -> None:
    found = warnings(tmp_path, text)
    assert len(found) == len(said) and all(w.startswith(s) for w, s in zip(found, said, strict=True)), found


@pytest.mark.parametrize("text", [
    "trusted_proxies: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 127.0.0.1, 'fc00::/7', 'fe80::/10', "
    "'2001:db8::/32', '::1']\n",
    "admin: {purge_from: [10.0.4.0/24, 127.0.0.1]}\n",
    "upstream: {tls: {verify: true}}\n",
])
def test_the_documented_narrow_choices_are_not_warned_of(tmp_path: Path, text: str) -> None:
    assert warnings(tmp_path, text) == []


def test_check_prints_the_warnings_and_strict_refuses_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(HEAD + "trusted_proxies: [0.0.0.0/0]\nadmin: {purge_from: ['::/0']}\n"
                      "upstream: {tls: {verify: false}}\n")
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr()
    assert [line.split(": warning: ")[0] for line in out.err.splitlines() if ": warning: " in line] == [
        f"{config}:4", f"{config}:5", f"{config}:6"], out
    assert "3 warning(s)" in out.out, out
    assert main(["check", "--strict", "--config", str(config)]) == 2


def test_the_start_logs_them(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(HEAD + "admin: {listen: '127.0.0.1:0'}\ntrusted_proxies: [0.0.0.0/0]\naccess_log: true\n")
    proc = spawn_cachegate(["run", "--config", str(config)], timeout=60)
    try:
        assert proc.stop() == 0
    finally:
        proc.wait()
    lines = [json.loads(line) for line in proc.output if line.startswith("{")]
    warned = [line["message"] for line in lines if line["logger"] == "cachegate.config"]
    assert len(warned) == 1 and "trusted_proxies: 0.0.0.0/0 is wider than a /8" in warned[0], proc.text
