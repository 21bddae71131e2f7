"""cachegate installed over a running supervisor (``pip install .`` into the service's virtualenv):
a worker started after that runs code that is not its supervisor's. It exits at once, saying so
(``proxy.codeid``); the supervisor does not even start it when the installed files no longer hash
as its code (an older release has no check of its own), instead of crash-looping; /healthz says
degraded until the service is restarted, and the supervisor stops (exit 1) when no worker is left."""

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
from proxy.supervisor import INSTALLED_CHANGED
from tests.harness import Origin
from tests.storage.procs import ProxyProcess, write_config

ROOT = Path(__file__).resolve().parent.parent.parent

pytestmark = pytest.mark.slow

# What an older release installed over the running one (a rollback) does at the same place: it has
# no code check of its own, and its argument parser refuses what this supervisor passes.
CHECK = "    exit_if_changed(sys.argv[2:])\n"
OLDER = ("    sys.stderr.write('supervisor.py: error: unrecognized arguments: --code-id\\n')\n"
         "    raise SystemExit(2)\n")


async def installed_over(proxy: ProxyProcess, code: Path) -> None:
    """``pip install`` of an older release into the virtualenv the running supervisor runs from."""
    await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
    await proxy.wait_for(lambda: any("started:" in line for line in proxy.lines))
    assert (await proxy.admin("GET", "/healthz")).status == 200
    source = code / "proxy" / "supervisor.py"
    text = source.read_text()
    assert CHECK in text
    source.write_text(text.replace(CHECK, OLDER))


def copy_of_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    code = tmp_path / "site"  # the service's virtualenv: the package the supervisor runs from
    shutil.copytree(ROOT / "proxy", code / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("PYTHONPATH", str(code))
    return code


async def test_a_worker_that_dies_after_an_install_in_place_is_not_restarted(
        origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even an older release (a rollback), whose worker could not say that its code changed: the
    supervisor hashes the installed code before it restarts a worker, and does not start it."""
    origin.route("/k", body=b"k", headers={"Cache-Control": "max-age=300"})
    code = copy_of_the_package(tmp_path, monkeypatch)
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, "cache: {disk: null}\n"))
    await proxy.start("--workers", "2", with_log=True)
    try:
        await installed_over(proxy, code)
        os.kill(proxy.workers[1], signal.SIGKILL)  # a crash, an OOM kill, a watchdog kill
        try:
            await proxy.wait_for(lambda: any("not restarting it" in line for line in proxy.lines), wait=8)
        except TimeoutError:
            raise AssertionError("still restarting it:\n" + "\n".join(proxy.lines)) from None
        await asyncio.sleep(1.5)  # a restart would have come at once, and died again
        log = "\n".join(proxy.lines)
        assert "unrecognized arguments" not in log and "restarting in" not in log, log
        assert log.count("worker 1 started") == 1, log  # the first start only
        errors = [line for line in proxy.lines if " ERROR " in line and INSTALLED_CHANGED in line]
        assert len(errors) == 1, log  # the supervisor's, once
        assert "worker 1 " in errors[0] and "exited with -9" in errors[0], log
        assert "Not restarting it: 1 of 2 workers run" in errors[0], log
        reply = await proxy.admin("GET", "/healthz")
        assert reply.status == 503
        health = json.loads(reply.body)
        assert health["status"] == "degraded"
        assert health["reason"] == ("1 of 2 workers run: worker 1 cannot start because the installed "
                                    "cachegate changed under the running supervisor; restart the service "
                                    "to run the new version")
        assert (await proxy.get("/k")).status == 200  # worker 0 still serves
    finally:
        assert await proxy.stop() == 0


async def test_the_supervisor_stops_when_no_worker_runs_after_an_install_in_place(
        origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every worker died after an install in place: a supervisor that serves nothing stops, with
    exit status 1 and one line, so that the service manager (Restart=on-failure) starts the new
    version; it stayed up for ever, every client's connection refused."""
    code = copy_of_the_package(tmp_path, monkeypatch)
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, "cache: {disk: null}\n"))
    await proxy.start("--workers", "2", with_log=True)
    try:
        await installed_over(proxy, code)
        pids = dict(proxy.workers)
        os.kill(pids[1], signal.SIGKILL)
        await proxy.wait_for(lambda: any("not restarting it" in line for line in proxy.lines), wait=8)
        os.kill(pids[0], signal.SIGKILL)
        assert proxy.process is not None
        assert await asyncio.wait_for(proxy.process.wait(), 10) == 1
    finally:
        await proxy.kill()
    log = "\n".join(proxy.lines)
    errors = [line for line in proxy.lines if " ERROR " in line and INSTALLED_CHANGED in line]
    assert len(errors) == 2, log  # worker 1 not restarted; then worker 0, and the stop
    assert f"worker 0 (pid {pids[0]}) exited with -9: {INSTALLED_CHANGED}. No worker runs any more: " \
           "stopping (exit status 1), so that the service manager starts the new version" in errors[1], log
    assert "restarting in" not in log and log.count(" started (pid") == 2, log
    assert "cachegate: stopped" in log


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
    errors = [line for line in proxy.lines if " ERROR " in line and INSTALLED_CHANGED in line]
    assert len(errors) == 1 and "The start fails: stopping (exit status 1)" in errors[0], log
    assert "restarting" not in log and "did not start in time" not in log, log
