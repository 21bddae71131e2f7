"""A stop that comes while a reload compiles finishes within ``shutdown_grace`` (docs/deploy.md).

The reload's compile runs in a thread; a stop makes it moot, so the process exits without it.
It used to run in the loop's default executor, which the loop joins as it closes (no timeout
on Python 3.11): the process said "stopped" and exited only when the compile was done.

The compile is made slow the real way, with thousands of generated rules, and timed here
first: the test only means something when the compile alone takes well past the bound.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from proxy.config import Overrides, load_config
from tests.harness import Origin, spawn_cachegate, write_config

GRACE = 1.0
# shutdown_grace, the documented second after it, and room for the exit itself.
BOUND = GRACE + 1.0 + 2.5
# A process that waited for the compile (signalled 0.5 s into it) would exit past BOUND by a
# second and more.
NEEDED = 1.5 * BOUND


def generated_rules(count: int) -> str:
    """``count`` rules that each compile a path pattern and a header regex (as a large site's)."""
    lines = ["rules:"]
    for i in range(count):
        lines += [f"  - name: r{i}",
                  f'    match: {{path: "/p{i}/**", header: {{X-A{i % 7}: {{regex: "^v{i}[a-z]+$"}}}}}}',
                  f"    ttl: {{200: {i % 50 + 1}m}}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def slow_rules(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, float]:
    """A rule file whose compile alone takes over ``NEEDED`` here, and that time. The count is
    scaled from a small file's compile (each rule costs about the same), so that the slow
    compile is timed once or twice, not grown step by step (that took 23 s of the suite)."""
    directory = tmp_path_factory.mktemp("slow_rules")
    count = 1000
    while True:
        text = generated_rules(count)
        config = write_config(str(directory), "http://127.0.0.1:9", rules=text)
        started = time.monotonic()
        load_config(config, Overrides(), machine="reload")
        took = time.monotonic() - started
        if took > NEEDED or count >= 48000:
            return text, took
        count = min(48000, int(count * max(1.5, 1.25 * NEEDED / took)))


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_stop_during_a_long_reload_exits_within_the_grace_period(
        origin: Origin, tmp_path: Path, slow_rules: tuple[str, float], workers: str) -> None:
    text, compile_takes = slow_rules
    assert compile_takes > NEEDED, f"the compile took only {compile_takes:.1f} s: the test proves nothing"
    config = write_config(str(tmp_path), origin.url, f"shutdown_grace: {GRACE:g}s\n",
                          rules="rules: [{name: small, match: {path: /s}, bypass: true}]\n")
    proc = spawn_cachegate(["run", "--config", config, "--workers", workers, "--log-level", "info"])
    try:
        Path(tmp_path, "rules.yaml").write_text(text)
        proc.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)  # the compile under way
        proc.proc.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        try:
            code = proc.proc.wait(BOUND)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - stopped_at
    finally:
        proc.stop(signal.SIGKILL)
    assert code == 0, f"not exited {took:.1f} s after SIGTERM (compile {compile_takes:.1f} s):\n{proc.text}"
    assert "config reloaded from" not in proc.text  # the reload was abandoned, not finished
