"""cachegate installed over a running supervisor (``pip install .`` into the service's virtualenv):
a worker started after that runs code that is not its supervisor's. It exits at once, saying so
(``proxy.codeid``), the supervisor stops restarting it instead of crash-looping, and /healthz
says degraded until the service is restarted."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.codeid import CHANGED, EXIT_CODE_CHANGED, identity
from tests.harness import Origin
from tests.storage.procs import ProxyProcess, write_config

ROOT = Path(__file__).resolve().parent.parent.parent

pytestmark = pytest.mark.slow

# What the reviewer's new release did under the old supervisor, at the same place.
PARSE = "    overrides = Overrides(**raw)\n"
CRASH = "    raise TypeError(\"Overrides.__init__() got an unexpected keyword argument 'ports'\")\n"


async def test_a_worker_restarted_after_an_upgrade_in_place_exits_once_and_is_not_restarted(
        origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    origin.route("/k", body=b"k", headers={"Cache-Control": "max-age=300"})
    code = tmp_path / "site"  # the service's virtualenv: the package the supervisor runs from
    shutil.copytree(ROOT / "proxy", code / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("PYTHONPATH", str(code))
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, "cache: {disk: null}\n"))
    await proxy.start("--workers", "2", with_log=True)
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        await proxy.wait_for(lambda: any("started:" in line for line in proxy.lines))
        assert (await proxy.admin("GET", "/healthz")).status == 200
        # The new release lands on disk; it cannot run under this supervisor.
        source = code / "proxy" / "supervisor.py"
        text = source.read_text()
        assert PARSE in text
        source.write_text(text.replace(PARSE, CRASH))
        os.kill(proxy.workers[1], signal.SIGKILL)  # a crash, an OOM kill, a watchdog kill
        try:
            await proxy.wait_for(lambda: any("not restarting it" in line for line in proxy.lines), wait=8)
        except TimeoutError:
            raise AssertionError("still restarting it:\n" + "\n".join(proxy.lines)) from None
        await asyncio.sleep(1.5)  # a restart would have come after 0.5 s, and died again
        log = "\n".join(proxy.lines)
        assert "TypeError" not in log, log
        assert log.count("restarting in") == 1, log  # after the kill only
        assert log.count("worker 1 started") == 2, log  # the first start and the one that exited
        assert f"cachegate: worker 1: {CHANGED}" in log  # the worker's one line
        errors = [line for line in proxy.lines if " ERROR " in line and CHANGED in line]
        assert len(errors) == 1 and "Not restarting it" in errors[0], log  # the supervisor's, once
        reply = await proxy.admin("GET", "/healthz")
        assert reply.status == 503
        health = json.loads(reply.body)
        assert health["status"] == "degraded"
        assert "1 of 2 workers run" in health["reason"] and "restart the service" in health["reason"]
        assert (await proxy.get("/k")).status == 200  # worker 0 still serves
    finally:
        assert await proxy.stop() == 0


def test_a_worker_whose_supervisor_runs_other_code_exits_before_it_reads_its_arguments(
        tmp_path: Path) -> None:
    """A supervisor of other code passes another code identity (and arguments this version may
    not parse: an ``Overrides`` field it no longer has, a control fd that is not open): the
    worker exits with EXIT_CODE_CHANGED and one line, before it looks at any of them."""
    args = [sys.executable, "-m", "proxy.supervisor", "worker", "--code-id", "0" * 32, "--worker-id", "1",
            "--control-fd", "999", "--overrides", json.dumps({"ports": [8080]}), "--older-flag"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == EXIT_CODE_CHANGED, done.stderr
    assert done.stderr == f"cachegate: worker 1: {CHANGED}\n"
    assert identity() != "0" * 32


def test_a_worker_of_a_supervisor_older_than_the_check_goes_on(tmp_path: Path) -> None:
    """No code identity at all: a supervisor older than the check, which would restart a worker
    that exits for ever (a reviewer's upgrade in place from the release before: a crash loop
    where the worker used to come back). The worker goes on, and stands or falls by the
    arguments it was given (here it fails on them: the control fd is not open)."""
    args = [sys.executable, "-m", "proxy.supervisor", "worker", "--worker-id", "1", "--control-fd", "999"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode != EXIT_CODE_CHANGED and CHANGED not in done.stderr, done.stderr


async def test_a_worker_whose_code_differs_during_the_start_up_fails_the_start_once(
        origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed over it while it started: the start fails (exit 1, one error), it does not wait
    for ready_timeout or restart the workers; the service manager starts the new version."""
    code = tmp_path / "site"
    shutil.copytree(ROOT / "proxy", code / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    source = code / "proxy" / "supervisor.py"
    text = source.read_text()
    assert "        self.code_id = identity()\n" in text
    source.write_text(text.replace("        self.code_id = identity()\n", "        self.code_id = '0' * 32\n"))
    monkeypatch.setenv("PYTHONPATH", str(code))
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, "cache: {disk: null}\n"))
    with pytest.raises(AssertionError, match="cachegate exited"):
        await proxy.start("--workers", "2", with_log=True, wait=20)
    assert proxy.process is not None
    assert await proxy.stop() == 1
    log = "\n".join(proxy.lines)
    assert len([line for line in proxy.lines if " ERROR " in line and CHANGED in line]) == 1, log
    assert "restarting" not in log and "did not start in time" not in log, log
