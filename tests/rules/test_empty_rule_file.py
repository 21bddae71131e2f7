"""An empty rule file (cut short by a write still in progress) is a warning, not silence.

A rules file truncated mid-write was accepted without a word: the reload answered
``{"reloaded": true, "rules": 0, "warnings": []}`` and every bypass rule was gone. It is still
valid (an operator may empty a file on purpose, and ``rules: []`` says so without a warning),
but the reload's answer, its log and ``cachegate check`` now warn.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from proxy.config import Overrides
from proxy.web.server import install_reloader
from tests.harness import Origin, Proxy, write_config

MakeProxy = Callable[..., Awaitable[Proxy]]
ROOT = Path(__file__).resolve().parents[2]
RULES = "rules:\n  - {name: private, match: {path: /private}, bypass: true}\n"
WARNING = "rules.yaml:1: warning: the rule file is empty: no defaults and no rules apply from it"
NO_RULES = "warning: the rule file has no rules (no list under 'rules:')"
# The shipped default.yaml's start: a file cut short after its defaults keeps them, and no rule.
DEFAULTS = "defaults:\n  ttl: {200: 5m, 404: 1m}\n  stale_if_error: 1h\n"


@pytest.mark.parametrize(("text", "warning"), [
    ("", WARNING), ("rules:\n", WARNING), ("# a comment\n", WARNING), ("defaults:\n", WARNING),
    (DEFAULTS + "rules:\n", "rules.yaml:4: " + NO_RULES), (DEFAULTS, "rules.yaml:1: " + NO_RULES),
])
async def test_a_reload_of_an_empty_rule_file_warns_in_its_answer_and_its_log(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        text: str, warning: str) -> None:
    proxy = await make_proxy(rules=RULES)
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    (tmp_path / "rules.yaml").write_text(text)
    with caplog.at_level(logging.WARNING):
        reply = await proxy.admin("POST", "/reload")
    assert reply.status == 200, reply.body
    body = json.loads(reply.body)
    assert body["rules"] == 0
    assert any(warning in w for w in body["warnings"]), body
    assert any(warning in r.getMessage() for r in caplog.records)


async def test_rules_written_as_an_empty_list_are_no_warning(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    proxy = await make_proxy(rules=RULES)
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    (tmp_path / "rules.yaml").write_text("rules: []\n")
    reply = await proxy.admin("POST", "/reload")
    assert reply.status == 200, reply.body
    assert json.loads(reply.body)["warnings"] == []


@pytest.mark.parametrize(("text", "warning"), [("", WARNING), (DEFAULTS + "rules:\n", NO_RULES)])
def test_check_warns_of_an_empty_rule_file(tmp_path: Path, text: str, warning: str) -> None:
    config = write_config(str(tmp_path), "http://127.0.0.1:9", rules=text)
    done = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", config], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done
    assert warning in done.stdout + done.stderr, done
    strict = subprocess.run([sys.executable, "-m", "proxy", "check", "--strict", "--config", config],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert strict.returncode == 2, strict
