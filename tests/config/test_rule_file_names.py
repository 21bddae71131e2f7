"""How a rule file is named in problems, ``check`` and /reload's ``rule_files``: as the config's
own path is. A service names its config by an absolute path and runs in / : a rule file named
relative to the current directory read "etc/cachegate/rules/site.yaml:4: ...", a path relative
to nothing the operator sees."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import load_config

BAD = "rules:\n  - name: x\n    match: {path: /a}\n    ttl: {200: banana}\n"
GOOD = "rules:\n  - name: x\n    match: {path: /a}\n    ttl: {200: 1m}\n"


def _site(tmp_path: Path, rules: str) -> Path:
    (tmp_path / "etc" / "rules").mkdir(parents=True)
    (tmp_path / "etc" / "rules" / "site.yaml").write_text(rules)
    config = tmp_path / "etc" / "c.yaml"
    config.write_text("upstreams: [http://127.0.0.1:9]\nrules: [rules/site.yaml]\ncache: {disk: null}\n")
    return config


def _check(config: str, cwd: str) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", config], cwd=cwd,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    return [line for line in (done.stdout + done.stderr).splitlines() if "banana" in line]


@pytest.mark.parametrize("cwd", ["/", "/etc"])
def test_a_config_named_by_an_absolute_path_names_its_rule_files_by_absolute_paths(
        tmp_path: Path, cwd: str) -> None:
    config = _site(tmp_path, BAD)
    lines = _check(str(config), cwd)
    assert lines == [f"{tmp_path}/etc/rules/site.yaml:4: rules[0].ttl.200: bad duration 'banana': "
                     "use seconds or 30s, 5m, 1h, 1d"], lines


def test_a_config_named_by_a_relative_path_names_its_rule_files_from_the_same_directory(
        tmp_path: Path) -> None:
    _site(tmp_path, BAD)
    assert [line.split(":")[0] for line in _check("c.yaml", str(tmp_path / "etc"))] == ["rules/site.yaml"]
    assert [line.split(":")[0] for line in _check("etc/c.yaml", str(tmp_path))] == ["etc/rules/site.yaml"]


def test_the_rule_files_loaded_are_named_as_the_config_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What /reload answers as ``rule_files`` and ``explain`` shows."""
    config = _site(tmp_path, GOOD)
    monkeypatch.chdir("/")
    assert load_config(str(config)).rules.files == (f"{tmp_path}/etc/rules/site.yaml",)
    monkeypatch.chdir(tmp_path)
    assert load_config("etc/c.yaml").rules.files == ("etc/rules/site.yaml",)


@pytest.mark.parametrize(("config", "cwd", "shown"), [
    ("./c.yaml", "etc", "rules/missing.yaml"), ("c.yaml", "etc", "rules/missing.yaml"),
    ("etc/c.yaml", "", "etc/rules/missing.yaml"), ("ABS/etc/c.yaml", "", "ABS/etc/rules/missing.yaml"),
])
def test_a_missing_rule_file_is_named_as_the_existing_ones_are(
        tmp_path: Path, config: str, cwd: str, shown: str) -> None:
    """It was named by its absolute path after a relative config's name
    (``./c.yaml:3: rules: rule file /srv/.../rules/missing.yaml does not exist``)."""
    _site(tmp_path, GOOD)
    (tmp_path / "etc" / "c.yaml").write_text(
        "upstreams: [http://127.0.0.1:9]\nrules: [rules/site.yaml, rules/missing.yaml]\ncache: {disk: null}\n")
    config, shown = config.replace("ABS", str(tmp_path)), shown.replace("ABS", str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", config], cwd=tmp_path / cwd,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{config}:2: rules: rule file {shown} does not exist" in done.stderr, done.stderr
