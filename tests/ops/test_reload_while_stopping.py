"""Once the instance stops, a reload is not applied (docs/admin-api.md, docs/deploy.md).

SIGHUP is ``ignored while stopping``; ``POST /reload`` answers 503 saying so, alone and with
``--workers``. A ``POST /reload`` that began before the stop and reached the workers after it
names every worker that did not apply it among its problems, instead of ``reloaded: true``
when none did.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import Origin, ProxyProcess, post_reload, spawn_cachegate, write_config

RULES_V1 = "rules: [{name: old, match: {path: /old}, bypass: true}]\n"
RULES_V2 = "rules: [{name: new, match: {path: /new}, bypass: true}]\n"


def new_rules(directory: Path) -> None:
    (directory / "rules.yaml").write_text(RULES_V2)


async def until(seen: Callable[[], bool], what: str, wait: float = 20.0) -> None:
    """Poll ``seen`` every 10 ms until it is true; fail naming ``what`` after ``wait`` s."""
    for _ in range(int(wait * 100)):
        if seen():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not seen within {wait:g} s: {what}")


async def workers_held(hold: Path, proc: ProxyProcess) -> list[int]:
    """The supervisor's compile, held, then let go; once both workers' compiles are held:
    their pids (``CACHEGATE_RELOAD_HOLD``)."""
    supervisor = hold / f"{proc.proc.pid}.held"
    await until(supervisor.exists, proc.text)
    supervisor.unlink()
    await until(lambda: len(held_pids(hold)) == 2, proc.text)
    return held_pids(hold)


def held_pids(hold: Path) -> list[int]:
    return sorted(int(m.stem) for m in hold.glob("*.held"))


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_post_reload_during_the_drain_answers_503_and_applies_nothing(
        origin: Origin, tmp_path: Path, workers: str) -> None:
    origin.route("/slow", body=b"slow", delay=3.0)
    config = write_config(str(tmp_path), origin.url, "shutdown_grace: 20s\n", rules=RULES_V1)
    proc = spawn_cachegate(["run", "--config", config, "--workers", workers, "--log-level", "info"])
    try:
        assert proc.admin_url is not None
        reader, writer = await asyncio.open_connection(*proc.proxy_url.removeprefix("http://").split(":"))
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")  # keeps the drain going
        await writer.drain()
        await asyncio.sleep(0.5)
        proc.proc.send_signal(signal.SIGTERM)
        await until(lambda: "shutting down" in proc.text, "shutting down", 5)
        new_rules(tmp_path)
        status, answer = await asyncio.to_thread(post_reload, proc.admin_url, 20)
        head = await asyncio.wait_for(reader.readline(), 10)  # the drain went on
        writer.close()
    finally:
        code = proc.stop()
    assert (status, answer) == (503, {"error": "the instance is stopping: not reloaded (the drain keeps "
                                               "the running config)"}), proc.text
    assert head.startswith(b"HTTP/1.1 200"), head
    assert "config reloaded" not in proc.text
    assert code == 0, proc.text


@pytest.mark.slow
async def test_a_reload_the_stop_cuts_short_names_the_workers_that_did_not_apply_it(
        origin: Origin, tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    hold.mkdir()
    config = write_config(str(tmp_path), origin.url, "shutdown_grace: 5s\n", rules=RULES_V1)
    proc = spawn_cachegate(["run", "--config", config, "--workers", "2", "--log-level", "info"],
                           env={"CACHEGATE_RELOAD_HOLD": str(hold)})
    try:
        assert proc.admin_url is not None
        new_rules(tmp_path)
        reload = asyncio.ensure_future(asyncio.to_thread(post_reload, proc.admin_url, 30))
        await workers_held(hold, proc)
        proc.proc.send_signal(signal.SIGTERM)  # the workers stop mid-compile: neither applies it
        status, answer = await asyncio.wait_for(reload, 30)
    finally:
        code = proc.stop()
        for marker in hold.glob("*.held"):
            os.remove(marker)
    assert status == 400, (answer, proc.text)
    assert sorted(answer["problems"]) == [
        f"worker {n} did not apply the reload: the instance is stopping (it keeps the config it ran)"
        for n in (0, 1)], answer
    assert code == 0, proc.text


@pytest.mark.slow
@pytest.mark.parametrize("release", [False, True])
async def test_a_post_reload_still_compiling_when_the_stop_comes_answers_at_once_and_applies_nothing(
        origin: Origin, tmp_path: Path, release: bool) -> None:
    """A ``POST /reload`` whose compile was still going when SIGTERM came got no answer: it held
    the drain to its end (grace and a second, then cut off, logged as "the client went away").
    And a compile that ended during the drain was applied all the same. Now the stop answers it
    at once, and nothing is applied (``release``: the compile ends during the drain)."""
    hold = tmp_path / "hold"
    hold.mkdir()
    config = write_config(str(tmp_path), origin.url, "shutdown_grace: 5s\n", rules=RULES_V1)
    proc = spawn_cachegate(["run", "--config", config, "--log-level", "info"],
                           env={"CACHEGATE_RELOAD_HOLD": str(hold)})
    try:
        assert proc.admin_url is not None
        new_rules(tmp_path)
        reload = asyncio.ensure_future(asyncio.to_thread(post_reload, proc.admin_url, 30))
        held = hold / f"{proc.proc.pid}.held"
        await until(held.exists, proc.text)
        proc.proc.send_signal(signal.SIGTERM)
        if release:
            await until(lambda: "shutting down" in proc.text, "shutting down", 5)
            held.unlink()
        status, answer = await asyncio.wait_for(reload, 4)  # (not the grace's 5 s and more)
        code = await asyncio.to_thread(proc.wait, 10)
    finally:
        if proc.proc.poll() is None:
            proc.stop()
    assert status == 400, (status, answer, proc.text)
    assert any("not applied: the instance is stopping" in p for p in answer["problems"]), answer
    assert "config reloaded" not in proc.text
    # The stop's fault, not the config's: no ERROR, no FILE:LINE that points at nothing.
    assert " ERROR " not in proc.text and ":0:" not in proc.text, proc.text
    assert code == 0, proc.text


@pytest.mark.slow
async def test_a_worker_stopped_alone_mid_reload_is_replaced_with_the_new_config_not_a_rejection(
        origin: Origin, tmp_path: Path) -> None:
    """SIGTERM to one worker while its reload compiled: its answer "not applied: the instance is
    stopping" came back while its drain went on, and the supervisor took it for a rejection (400,
    "rejected the reload and keeps its config", logged as an error) though it restarted that
    worker at once with the new config. A stop's answer is told apart: the worker is replaced
    (200, ``replaced_workers``), as one that died during the reload is."""
    origin.route("/slow", body=b"slow", delay=3.0)
    hold = tmp_path / "hold"
    hold.mkdir()
    config = write_config(str(tmp_path), origin.url, "shutdown_grace: 10s\n", rules=RULES_V1)
    proc = spawn_cachegate(["run", "--config", config, "--workers", "2", "--log-level", "info"],
                           env={"CACHEGATE_RELOAD_HOLD": str(hold)})
    slow: list[asyncio.StreamWriter] = []
    try:
        assert proc.admin_url is not None
        new_rules(tmp_path)
        reload = asyncio.ensure_future(asyncio.to_thread(post_reload, proc.admin_url, 30))
        workers = await workers_held(hold, proc)
        for _ in range(8):  # requests in flight: the stopped worker's drain outlasts its answer
            _, writer = await asyncio.open_connection(*proc.proxy_url.removeprefix("http://").split(":"))
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            slow.append(writer)
        await asyncio.sleep(0.3)
        os.kill(workers[0], signal.SIGTERM)
        await asyncio.sleep(0.5)  # (it answers the reload while it drains)
        for marker in hold.glob("*.held"):
            os.remove(marker)
        status, answer = await asyncio.wait_for(reload, 30)
    finally:
        for writer in slow:
            writer.close()
        # In a thread: the origin (this loop) answers the fetches still in flight, so the stop's
        # drain ends with them rather than at its grace period (11 s, the loop blocked).
        code = await asyncio.to_thread(proc.stop)
        for marker in hold.glob("*.held"):
            os.remove(marker)
    assert status == 200, (answer, proc.text)
    assert [r["pid"] for r in answer["replaced_workers"]] == [workers[0]], answer
    assert ": reload rejected:" not in proc.text  # (the supervisor's line for a rejection)
    assert code == 0, proc.text
