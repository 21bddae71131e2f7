"""The command line: check reports FILE:LINE, run stops gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp
import pytest

from proxy.cli import main
from tests.harness import Origin, spawn_cachegate, write_config
from tests.ports import Ports


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_check_accepts_a_valid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = write(tmp_path / "r.yaml", "defaults: {ttl: {200: 5m}}\nrules: []\n")
    config = write(tmp_path / "c.yaml", f"upstreams: [{{url: 'http://127.0.0.1:9'}}]\nrules: [{rules}]\n")
    assert main(["check", "--config", config]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_reports_every_problem_by_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = write(tmp_path / "r.yaml", "rules:\n  - name: x\n    ttl: {200: soon}\n")
    config = write(tmp_path / "c.yaml", (
        "listen: 127.0.0.1:99999\n"
        "upstreams:\n"
        "  - url: ftp://nope\n"
        "cache:\n"
        "  memry: 1GB\n"
        "  disk: {size: 10XB}\n"
        f"rules: [{rules}, missing.yaml]\n"
    ))
    assert main(["check", "--config", config]) == 2
    err = capsys.readouterr().err.splitlines()
    assert f"{config}:1: listen: '127.0.0.1:99999': port 99999 is out of range (a port is 0 to 65535; 0: one " \
           "the system chooses)" in err
    assert f"{config}:3: upstream url 'ftp://nope': expected http://HOST[:PORT] or https://..." in err
    assert f"{config}:5: unknown key 'cache.memry' (did you mean 'memory'?)" in err
    assert any(line.startswith(f"{config}:6: cache.disk.size: bad size '10XB'") for line in err)
    assert any(line.startswith(f"{config}:7: rules: rule file") and "missing.yaml" in line for line in err)
    assert any(":3: rules[0].ttl.200: bad duration 'soon'" in line for line in err)


def test_check_refuses_credentials_in_an_upstream_url_without_printing_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """user:password@ in an upstream URL was accepted, never sent to the origin, and printed in
    every warning, /metrics label and /upstreams: refused at its line, the password not shown."""
    config = write(tmp_path / "c.yaml", (
        "upstreams:\n"
        "  - url: http://127.0.0.1:8\n"
        "  - url: 'http://user:secretpw@127.0.0.1:9'\n"
        "  - {url: 'https://@127.0.0.1:10', weight: 2}\n"
    ))
    assert main(["check", "--config", config]) == 2
    out, err = capsys.readouterr()
    why = "credentials in the URL are not sent to the origin (and would be shown in logs and metrics); remove them"
    assert f"{config}:3: upstream url 'http://***@127.0.0.1:9': {why}" in err.splitlines()
    assert f"{config}:4: upstream url 'https://***@127.0.0.1:10': {why}" in err.splitlines()
    assert "secretpw" not in out + err


def test_check_refuses_a_zero_duration_where_zero_breaks_the_pool(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 0 that passed check and broke things at run time: health.interval 0s checked every
    upstream thousands of times a second; timeouts.connect or health.timeout 0s took every
    upstream out (every request a 503); timeouts.read 0s turned the read timeout off unsaid."""
    config = write(tmp_path / "c.yaml", (
        "upstreams: [{url: 'http://127.0.0.1:9'}]\n"
        "upstream:\n"
        "  timeouts: {connect: 0s, read: 0, total: 0s}\n"
        "  health: {path: /healthz, interval: 0s,\n"
        "           timeout: 0ms}\n"
        "  passive: {cooldown: 0s}\n"
        "cache: {memory: 64MB, disk: null, lock_timeout: 0s, hit_for_pass: 0s}\n"
        "shutdown_grace: 0s\n"
    ))
    assert main(["check", "--config", config]) == 2
    err = capsys.readouterr().err.splitlines()
    assert sorted(line for line in err if "must be more than 0" in line) == sorted(
        f"{config}:{line}: {key}: must be more than 0" for line, key in [
            (3, "upstream.timeouts.connect"), (3, "upstream.timeouts.read"), (3, "upstream.timeouts.total"),
            (5, "upstream.health.timeout"), (7, "cache.lock_timeout")])
    assert [line for line in err if "health.interval" in line] == [
        f"{config}:4: upstream.health.interval: must be at least 0.1s (every worker checks every upstream "
        "that often: less is a load of its own on the upstreams, not a quicker verdict), got 0s"]
    # Where 0 has a meaning (documented), it is taken: no key remembered as hit-for-pass; a stop
    # that cuts requests off at once; passive checks off (as failures: 0, which configs wrote
    # with cooldown: 0 and which always loaded).
    assert not [line for line in err if "hit_for_pass" in line or "shutdown_grace" in line
                or "cooldown" in line]


def test_cross_field_problems_point_at_the_field_involved_and_a_bad_url_is_reported_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path / "c.yaml", (
        "# comment\n"
        "listen: 127.0.0.1:8080\n"
        "upstreams:\n"
        "  - url: ftp://nope\n"
        "admin:\n"
        "  token: null\n"
        "  listen: 0.0.0.0:8081\n"
    ))
    assert main(["check", "--config", config]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"{config}:4: upstream url 'ftp://nope': expected http://HOST[:PORT] or https://...",
        f"{config}:7: admin.listen 0.0.0.0:8081 is not loopback and admin.token is not set: the admin API "
        "would be open to anyone who can reach it; set admin.token or listen on 127.0.0.1",
    ]
    # No upstream at all: the problem is where upstreams: is, or would be.
    config = write(tmp_path / "d.yaml", "listen: 127.0.0.1:8080\nupstreams: []\n")
    assert main(["check", "--config", config]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{config}:2: no upstreams: add upstreams: [{{url: http://HOST:PORT}}] or --upstream URL"]
    # A bad --upstream: once, on the command line.
    config = write(tmp_path / "e.yaml", "upstreams: [{url: 'http://127.0.0.1:9'}]\n")
    assert main(["run", "--config", config, "--upstream", "gopher://x"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "<command line>:0: upstream url 'gopher://x': expected http://HOST[:PORT] or https://..."]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_unusable_cache_directory_is_a_one_line_error_not_a_traceback(tmp_path: Path, workers: str) -> None:
    """/proc takes no new directory: the start failed with one line and no line of the config
    (exit 1); it is foreseen now, and refused at its line as ``check`` refuses it (exit 2). A
    directory made unusable after the check is the storage tests' (NotWritable)."""
    import subprocess
    import sys

    config = write(tmp_path / "c.yaml", "listen: 127.0.0.1:0\nupstreams: [{url: 'http://127.0.0.1:9'}]\n"
                   "admin: {listen: '127.0.0.1:0'}\ncache: {disk: {path: '/proc/self/cachegate-test/cache'}}\n")
    done = subprocess.run([sys.executable, "-m", "proxy", "run", "--config", config, "--workers", workers],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr.splitlines()) == (2, [
        f"{config}:4: cache.disk.path: /proc/self/cachegate-test/cache cannot be made: No such file or directory "
        "(making /proc/self/cachegate-test); give a directory the user cachegate runs as can make and write (or "
        "make this one so)"])


def test_check_reports_yaml_syntax_errors_with_their_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path / "c.yaml", "listen: 127.0.0.1:8080\nupstreams: [\n  {url: x\n")
    assert main(["check", "--config", config]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{config}:") and "YAML syntax error" in line


def test_run_refuses_a_bad_config_before_binding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path / "c.yaml", "upstreams: [{url: 'http://127.0.0.1:9'}]\nworkers: lots\n")
    assert main(["run", "--config", config]) == 2
    assert f"{config}:2: workers: expected a positive number or auto" in capsys.readouterr().err


async def test_sigterm_finishes_in_flight_requests_and_exits_0(tmp_path: Path, origin: Origin) -> None:
    origin.route("/slow", body=b"done", delay=1.5)
    config = write(tmp_path / "c.yaml", "cache: {disk: {path: cache, size: 64MB, shards: 2}}\n")
    proc = await asyncio.to_thread(spawn_cachegate, [
        "run", "--config", config, "--upstream", origin.url, "--listen", "127.0.0.1:0",
        "--admin-listen", "127.0.0.1:0", "--no-uvloop"])
    async with aiohttp.ClientSession() as session:
        pending = asyncio.ensure_future(session.get(proc.proxy_url + "/slow"))
        await asyncio.sleep(0.5)
        proc.proc.send_signal(signal.SIGTERM)
        resp = await pending
        assert (resp.status, await resp.read()) == (200, b"done")
        # The connection closes after it: the head says so, or the client would reuse it.
        assert resp.headers.get("Connection") == "close"
        code = await asyncio.to_thread(proc.wait, 20)
    assert code == 0, proc.text
    assert "cachegate: stopped" in proc.text


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["single", "workers"])
async def test_sighup_and_a_second_sigterm_during_the_drain_are_ignored(
        tmp_path: Path, origin: Origin, workers: list[str]) -> None:
    """logrotate's SIGHUP or an impatient second SIGTERM while draining: the in-flight request
    still completes and the exit is 0 (the default action of either signal would kill)."""
    origin.route("/slow", body=b"done", delay=2.0)
    config = write(tmp_path / "c.yaml", "shutdown_grace: 10s\n"
                                        "cache: {disk: {path: cache, size: 64MB, shards: 2}}\n")
    proc = await asyncio.to_thread(spawn_cachegate, [
        "run", "--config", config, "--upstream", origin.url, "--listen", "127.0.0.1:0",
        "--admin-listen", "127.0.0.1:0", *workers])
    try:
        async with aiohttp.ClientSession() as session:
            pending = asyncio.ensure_future(session.get(proc.proxy_url + "/slow"))
            await asyncio.sleep(0.5)
            proc.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            proc.proc.send_signal(signal.SIGHUP)
            proc.proc.send_signal(signal.SIGTERM)
            resp = await pending
            assert (resp.status, await resp.read()) == (200, b"done")
            code = await asyncio.to_thread(proc.wait, 30)
    finally:
        proc.stop(signal.SIGKILL)
    assert code == 0, proc.text
    assert "SIGHUP ignored while stopping" in proc.text
    assert "cachegate: stopped" in proc.text


async def test_access_log_writes_a_json_line_per_request_with_its_cache_status(
        tmp_path: Path, origin: Origin) -> None:
    """access_log: true in a real `cachegate run`: JSON lines on stdout, the hit on the fast path
    logged too, the start-up line and the listener lines as JSON objects beside them."""
    origin.route("/page", body=b"hello", headers={"Cache-Control": "max-age=60"})
    config = write_config(str(tmp_path), origin.url, "access_log: true\n")
    proxy = await asyncio.to_thread(spawn_cachegate, ["run", "--config", config])
    ids = []
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                async with session.get(proxy.proxy_url + "/page",
                                       headers={"User-Agent": "probe/1"}) as r:
                    assert await r.read() == b"hello"
                    ids.append(r.headers["X-Request-Id"])
                await asyncio.sleep(0.05)
        for _ in range(100):
            if sum('"path":"/page"' in line for line in proxy.output) >= 2:
                break
            await asyncio.sleep(0.05)
    finally:
        assert await asyncio.to_thread(proxy.stop) == 0
    records = [json.loads(line) for line in proxy.output if line.startswith("{")]
    requests = [r for r in records if r.get("path") == "/page"]
    assert [(r["status"], r["cache"], r["bytes"], r["request_id"]) for r in requests] == [
        (200, "MISS", 5, ids[0]), (200, "HIT", 5, ids[1])]
    assert ids[0] != ids[1]
    started = next(r for r in records if r.get("event") == "started")
    assert started["config"] == config and started["workers"] == 1
    assert any("proxy listening on" in r.get("message", "") for r in records)
    assert all(line.startswith("{") for line in proxy.output if line.strip()), proxy.text


def test_the_readme_cli_synopsis_names_every_flag_of_every_command() -> None:
    """README's CLI section lists each command with all its flags (a flag added to the parser
    and to no synopsis is a flag nobody finds)."""
    import argparse
    import re

    from proxy.cli import build_parser

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("## CLI", 1)[1].split("```", 2)[1]
    synopsis: dict[str, str] = {}
    command = ""
    for line in block.splitlines():
        if m := re.match(r"cachegate ([a-z-]+)", line):
            command = m.group(1)
        if command:
            synopsis[command] = synopsis.get(command, "") + line.split("#", 1)[0] + "\n"
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(synopsis) == set(sub.choices)
    missing = [f"{name} {action.option_strings[-1]}" for name, parser in sub.choices.items()
               for action in parser._actions if action.option_strings and action.dest != "help"
               and not any(re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", synopsis[name])
                           for o in action.option_strings)]
    assert not missing, missing


@pytest.mark.parametrize("workers", ["1", "2"])
def test_one_address_written_two_ways_in_listen_is_refused_before_binding(
        tmp_path: Path, workers: str, ports: Ports) -> None:
    """``listen: [127.0.0.1:P, localhost:P]`` passed check; then a single process failed with a
    bare "address already in use", and with workers the supervisor blamed "another cachegate"
    with its own pid. The names are resolved at check time: FILE:LINE, exit 2, nothing bound.
    ``--listen X --listen X`` the same, at the command line."""
    import subprocess
    import sys

    port = ports.hold()
    config = write(tmp_path / "c.yaml", f"listen: ['127.0.0.1:{port}', 'localhost:{port}']\n"
                   "upstreams: [{url: 'http://127.0.0.1:9'}]\nadmin: {listen: '127.0.0.1:0'}\n"
                   f"cache: {{disk: {{path: '{tmp_path}/cache'}}}}\n")
    for args in (["check"], ["run", "--workers", workers]):
        done = subprocess.run([sys.executable, "-m", "proxy", *args, "--config", config],
                              capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stderr.splitlines()) == (2, [
            f"{config}:1: listen[1]: localhost:{port} is listed twice: it and 127.0.0.1:{port} both take "
            f"127.0.0.1:{port}"]), args
    config = write(tmp_path / "c.yaml", f"listen: ['127.0.0.1:{port}', '127.0.0.2:{port}', 'localhost:0']\n"
                   "upstreams: [{url: 'http://127.0.0.1:9'}]\nadmin: {listen: '127.0.0.1:0'}\n"
                   f"cache: {{disk: {{path: '{tmp_path}/cache'}}}}\n")
    assert main(["check", "--config", config]) == 0  # not the same address; port 0 twice neither
    done = subprocess.run([sys.executable, "-m", "proxy", "run", "--config", config, "--workers", workers,
                           "--listen", f"127.0.0.1:{port}", "--listen", f"127.0.0.1:{port}"],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr.splitlines()) == (2, [
        f"<command line>:0: --listen: 127.0.0.1:{port} is listed twice"])


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_cache_path_that_is_a_file_is_refused_at_its_line(tmp_path: Path, command: str) -> None:
    """cache.disk.path naming a regular file passed check; the start then failed with "cannot
    open the cache directory ...: File exists"."""
    import subprocess
    import sys

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = write(tmp_path / "c.yaml", "listen: 127.0.0.1:0\nupstreams: [{url: 'http://127.0.0.1:9'}]\n"
                   f"admin: {{listen: '127.0.0.1:0'}}\ncache:\n  disk:\n    path: '{blocker}'\n")
    done = subprocess.run([sys.executable, "-m", "proxy", command, "--config", config],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr.splitlines()) == (2, [
        f"{config}:6: cache.disk.path: {blocker} is a file: give a directory (made if it does not exist)"])


@pytest.mark.parametrize("where", ["command line", "config"])
def test_the_supervisors_config_warnings_name_the_supervisor_not_worker_0(tmp_path: Path, where: str) -> None:
    """docs/logs.md: the supervisor's lines say "supervisor". Its config warnings were logged
    before it named itself, as "worker": "0", a worker's name."""
    workers = "workers: 2\n" if where == "config" else ""
    config = write(tmp_path / "c.yaml", "listen: 127.0.0.1:0\nupstreams: [{url: 'http://127.0.0.1:9'}]\n"
                   f"admin: {{listen: '127.0.0.1:0'}}\n{workers}"
                   f"cache: {{memory: 16MB, max_object: 100MB, disk: {{path: '{tmp_path}/cache', size: 1GB}}}}\n"
                   "access_log: true\n")
    args = ["run", "--config", config] + (["--workers", "2"] if where == "command line" else [])
    proc = spawn_cachegate(args, timeout=60)
    try:
        assert proc.stop() == 0
    finally:
        proc.wait()
    lines = [json.loads(line) for line in proc.output if line.startswith("{")]
    warned = [line for line in lines if line["logger"] == "cachegate.config"]
    assert [line["level"] for line in warned] == ["warning"], proc.text
    assert "cache.max_object 100 MB is more than the store can keep" in warned[0]["message"]
    assert warned[0]["worker"] == "supervisor", proc.text
    started = [line for line in lines if "proxy listening on" in line["message"]]
    assert [line["worker"] for line in started] == ["supervisor"], proc.text


@pytest.mark.parametrize("command", [["health"], ["top", "--once"], ["purge", "--all"], ["warm", "--urls", "-"]])
def test_a_listener_written_with_an_unset_variable_is_named_not_taken_for_none_or_the_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        command: list[str]) -> None:
    """``admin.listen: ${VAR}`` with VAR unset read as no admin listener ("has no admin listener
    (admin.listen)"), and ``listen: ${VAR}`` as the default 127.0.0.1:8080 (warm then printed
    connection refused): the variable is named at its line, exit 2. A token's unset variable is
    not blamed for it."""
    monkeypatch.delenv("CACHEGATE_TEST_UNSET_LISTEN", raising=False)
    monkeypatch.setenv("CACHEGATE_ADMIN_TOKEN", "a-token-of-24-characters")
    config = write(tmp_path / "c.yaml", "upstreams: [{url: 'http://127.0.0.1:9'}]\n"
                   "listen: ${CACHEGATE_TEST_UNSET_LISTEN}\n"
                   "admin:\n  listen: ${CACHEGATE_TEST_UNSET_LISTEN}\n")
    assert main([command[0], "--config", config, *command[1:]]) == 2
    err = capsys.readouterr().err
    line = 2 if command[0] == "warm" else 4
    assert err.splitlines()[0] == f"{config}:{line}: environment variable CACHEGATE_TEST_UNSET_LISTEN is not set", err
    assert "admin.token" not in err and "no admin listener" not in err, err


def test_a_flow_style_admin_line_with_an_unset_token_variable_still_names_its_listener(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``admin: {listen: ..., token: ${VAR}}`` holds both on one line: the token's unset variable is
    not the listener's (health needs no token; purge takes it from CACHEGATE_ADMIN_TOKEN), and an
    unset listener beside a set token is named as the listener's, not blamed on the token."""
    monkeypatch.delenv("CACHEGATE_TEST_UNSET_TOKEN", raising=False)
    monkeypatch.delenv("CACHEGATE_TEST_UNSET_LISTEN", raising=False)
    monkeypatch.delenv("CACHEGATE_ADMIN_TOKEN", raising=False)
    config = write(tmp_path / "c.yaml", "upstreams: [{url: 'http://127.0.0.1:9'}]\n"
                   "admin: {listen: '127.0.0.1:1', token: '${CACHEGATE_TEST_UNSET_TOKEN}'}\n")
    assert main(["health", "--config", config]) == 1  # it reached for 127.0.0.1:1: nothing listens
    assert "cannot reach the admin API at http://127.0.0.1:1" in capsys.readouterr().err
    monkeypatch.setenv("CACHEGATE_TEST_UNSET_TOKEN", "a-token-of-24-characters")
    write(tmp_path / "c.yaml", "upstreams: [{url: 'http://127.0.0.1:9'}]\n"
          "admin: {listen: '${CACHEGATE_TEST_UNSET_LISTEN}', token: '${CACHEGATE_TEST_UNSET_TOKEN}'}\n")
    assert main(["purge", "--config", config, "--all"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"{config}:2: environment variable CACHEGATE_TEST_UNSET_LISTEN is not set"], err


@pytest.mark.parametrize("command", ["explain", "warm"])
async def test_a_reader_that_leaves_early_ends_the_command_quietly_with_141(
        tmp_path: Path, origin: Origin, command: str) -> None:
    """``cachegate explain ... | head -1`` printed a BrokenPipeError traceback and exited 1 (warm
    too, with a long summary). A reader that is gone now ends the command at once, with nothing
    on standard error and the status a shell gives a command killed by SIGPIPE (141)."""
    import os
    import subprocess
    import sys

    origin.route("/a", body=b"a", headers={"Cache-Control": "max-age=60"})
    config = write(tmp_path / "c.yaml", f"upstreams: [{{url: '{origin.url}'}}]\nrules: []\n")
    urls = write(tmp_path / "urls.txt", "/a\n")
    if command == "explain":
        args = ["explain", "--config", config, "http://shop.example/a"]
    else:  # through the origin itself: its answers are what warm counts, and it prints a summary
        args = ["warm", "--proxy", origin.url, "--urls", urls, "--progress", "none"]
    read, write_end = os.pipe()
    os.close(read)  # the reader left before a byte was written (head -1 after its line)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", *args, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (proc.returncode, err.decode()) == (141, "")
