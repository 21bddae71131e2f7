"""The demo (`scripts/run` with no arguments) does what the curl lines it prints say.

The printed lines are parsed and carried out as written (the URL, the method, the JSON), so
the README's first impression is tested, not a copy of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import aiohttp
import pytest

from proxy.cli import build_parser
from tests.harness import spawn_cachegate
from tests.ports import Ports

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["held", "0"])
def origin_listen(request: pytest.FixtureRequest, ports: Ports) -> list[str]:
    """``--origin-listen`` on a held port (tests/ports.py), or port 0: the origin's port is known
    only once it is bound, after the demo wrote its config (which named port 0 as the upstream's,
    and every request was a 502)."""
    return ["--origin-listen", f"127.0.0.1:{ports.hold() if request.param == 'held' else 0}"]


def demo_steps(text: str) -> list[tuple[float, list[str], str]]:
    """The first five curl lines: (seconds to sleep first, curl's argv, the comment's first word)."""
    steps = []
    for line in text.splitlines():
        m = re.match(r"\s*(?:sleep (\d+); )?(curl [^|#]*?)\s*(?:\|[^#]*)?#\s*(\S+)", line)
        if m:
            steps.append((float(m.group(1) or 0), shlex.split(m.group(2)), m.group(3)))
    return steps[:5]


async def carry_out(session: aiohttp.ClientSession, argv: list[str]) -> tuple[str | None, str]:
    """Run one printed curl command: (its X-Cache-Status, its body)."""
    method, data, url = "GET", None, argv[-1]
    if "-X" in argv:
        method = argv[argv.index("-X") + 1]
    if "-d" in argv:
        data = argv[argv.index("-d") + 1]
        url = next(a for a in argv if a.startswith("http"))
    # curl -d sends a form's Content-Type unless -H says otherwise (the admin guard refuses a form).
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if data is not None else {}
    for i, arg in enumerate(argv[:-1]):
        if arg == "-H":
            name, _, value = argv[i + 1].partition(":")
            headers[name.strip()] = value.strip()
    async with session.request(method, url, data=data, headers=headers) as r:
        return r.headers.get("X-Cache-Status"), await r.text()


async def test_demo_shows_miss_hit_revalidated_purge_miss(tmp_path: Path, origin_listen: list[str]) -> None:
    demo = await asyncio.to_thread(spawn_cachegate, [
        "demo", *origin_listen, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
        "--cache-dir", str(tmp_path / "cache"), "--rules", str(ROOT / "rules" / "default.yaml")])
    try:
        steps = demo_steps(demo.text)
        assert [word for _, _, word in steps] == ["MISS:", "HIT:", "REVALIDATED:", '{"purged":', "MISS"]
        origin = re.search(r"origin on (http://127\.0\.0\.1:(\d+)),", demo.text)
        assert origin is not None and int(origin[2]) != 0, demo.text
        if not origin_listen[1].endswith(":0"):
            assert origin[1] == f"http://{origin_listen[1]}", demo.text
        async with aiohttp.ClientSession() as session:
            for wait, argv, word in steps:
                await asyncio.sleep(wait)
                status, body = await carry_out(session, argv)
                if word.startswith("{"):
                    assert json.loads(body)["purged"] == 1, body
                else:
                    assert status == word.rstrip(":"), (argv, status, body)
    finally:
        assert await asyncio.to_thread(demo.stop) == 0, demo.text


def run_demo(*args: str, timeout: float = 30.0, cwd: Path | None = None) -> tuple[int, str]:
    """``scripts/run`` with ``args`` (the demo, unless there is a --config), run in ``cwd``,
    stopped once it printed its curl lines or its listener (or exited): (exit status, output)."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([str(ROOT / "scripts" / "run"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=cwd)
    assert proc.stdout is not None
    out: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
            if "proxy listening on" in line:
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        out.append(proc.stdout.read())
        proc.stdout.close()
    return code, "".join(out)


@pytest.mark.slow
def test_scripts_run_passes_its_flags_to_the_demo_and_starts_with_an_empty_cache(ports: Ports) -> None:
    origin, listen, admin = ports.hold(), ports.hold(), ports.hold()  # held across both runs
    flags = ["--origin-listen", f"127.0.0.1:{origin}", "--listen", f"127.0.0.1:{listen}",
             "--admin-listen", f"127.0.0.1:{admin}"]
    for _ in range(2):  # a second run is not served from the first one's cache
        code, text = run_demo(*flags)
        assert code == 0, text
        assert f"curl -si http://127.0.0.1:{listen}/hello" in text, text
        assert f"http://127.0.0.1:{admin}/purge" in text, text
        assert "empty cache" in text, text


@pytest.mark.slow
def test_scripts_run_takes_relative_paths_from_the_directory_it_is_called_in(
        tmp_path: Path, origin_listen: list[str]) -> None:
    """scripts/run works in the checkout (the demo's rules/default.yaml), but --config,
    --cache-dir and --rules name files from where it was called; demo.yaml goes inside the
    cache folder given, not into its parent."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf/c.yaml").write_text(
        "listen: 127.0.0.1:0\nupstreams: [{url: 'http://127.0.0.1:9'}]\nadmin: {listen: null}\n"
        "cache: {memory: 16MB, disk: null}\n")
    for config in (["--config", "conf/c.yaml"], ["--config=conf/c.yaml"], ["-cconf/c.yaml"]):
        code, text = run_demo(*config, "--log-level", "info", cwd=tmp_path)
        assert code == 0 and "proxy listening on" in text, (config, text)
    (tmp_path / "r").mkdir()
    (tmp_path / "r/mine.yaml").write_text((ROOT / "rules/default.yaml").read_text())
    code, text = run_demo(*origin_listen, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                          "--cache-dir", "kept", "--rules=r/mine.yaml", cwd=tmp_path)
    assert code == 0, text
    assert f"empty cache in {tmp_path / 'kept'}" in text, text
    assert f"rules: [{tmp_path / 'r/mine.yaml'}]" in (tmp_path / "kept/demo.yaml").read_text()
    assert not (tmp_path / "demo.yaml").exists()


def fake_checkout(tmp_path: Path) -> Path:
    """A checkout holding the real scripts/run (and the _venv.sh it sources) whose .venv counts
    as installed and whose cachegate prints its directory and its arguments, one a line."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    (root / ".venv/bin").mkdir(parents=True)
    for name in ("run", "_venv.sh"):
        shutil.copy2(ROOT / "scripts" / name, root / "scripts" / name)
    (root / "pyproject.toml").write_text("")
    os.utime(root / "pyproject.toml", (0, 0))  # older than the install's stamp: nothing to install
    (root / ".venv/.installed-base").write_text("")
    for name, text in (("python", "#!/bin/sh\n"), ("cachegate", '#!/bin/sh\nprintf "%s\\n" "$PWD" "$@"\n')):
        (root / ".venv/bin" / name).write_text(text)
        (root / ".venv/bin" / name).chmod(0o755)
    return root


# scripts/run's arguments, and what cachegate gets ("@" is the caller's directory).
RUN_ARGS = [
    (["--c", "kept"], ["demo", "--c", "@/kept"]),  # argparse's unique prefix of the demo's --cache-dir
    (["--listen", "1:2", "--ca=kept", "--r", "r.yaml"], ["demo", "--listen", "1:2", "--ca=@/kept", "--r", "@/r.yaml"]),
    (["--rules=/etc/r.yaml", "--cache-dir", "k"], ["demo", "--rules=/etc/r.yaml", "--cache-dir", "@/k"]),
    (["--config", "c.yaml", "--rules", "r.yaml"], ["run", "--config", "@/c.yaml", "--rules", "r.yaml"]),  # not run's
    (["--conf", "c.yaml"], ["run", "--conf", "@/c.yaml"]),  # a prefix only run's --config has
    (["-c", "c.yaml"], ["run", "-c", "@/c.yaml"]),
    (["-cc.yaml"], ["run", "-c@/c.yaml"]),
    (["-c=c.yaml"], ["run", "-c=@/c.yaml"]),  # argparse reads c.yaml
    (["--config=", "--listen", "1:2"], ["run", "--config=", "--listen", "1:2"]),  # empty: argparse's to refuse
    (["--config", "--listen", "1.2.3.4:80"], ["run", "--config", "--listen", "1.2.3.4:80"]),  # no value
    (["--config", ""], ["run", "--config", ""]),
    (["--cache-dir"], ["demo", "--cache-dir"]),
    (["--listen", "1:2", "--", "--config", "c"], ["demo", "--listen", "1:2", "--", "--config", "c"]),
]


def test_scripts_run_resolves_only_the_path_flags_of_the_command_it_runs(tmp_path: Path) -> None:
    """Relative paths are made absolute before scripts/run cd's into the checkout, but the flags
    were read against --config first whatever the command: --c (the demo's --cache-dir, for
    argparse) ran cachegate run, --config= became the caller's directory, and --config's
    missing value became the next flag as a path ("cannot read file", not argparse's "expected
    one argument"). The command is decided first, then only its own path flags are resolved."""
    root = fake_checkout(tmp_path)
    caller = tmp_path / "call dir"
    caller.mkdir()
    wrong = []
    for args, expected in RUN_ARGS:
        out = subprocess.run([str(root / "scripts/run"), *args], cwd=caller, capture_output=True, text=True,
                             check=True, timeout=30).stdout
        cwd, *argv = out.split("\n")[:-1]
        assert cwd == str(root)
        if argv != [a.replace("@", str(caller)) for a in expected]:
            wrong.append((args, argv))
    assert not wrong, wrong


def test_scripts_run_knows_the_flags_of_cachegate_run_and_demo() -> None:
    """scripts/run reads argparse's prefixes from its own lists of the two commands' flags."""
    text = (ROOT / "scripts/run").read_text()
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, name in (("run", "RUN_FLAGS"), ("demo", "DEMO_FLAGS")):
        found = re.search(rf"^{name}=\((.*)\)$", text, re.M)
        assert found is not None, name
        flags = {f for a in sub.choices[command]._actions for f in a.option_strings if f.startswith("--")}
        assert sorted(found[1].split()) == sorted(flags), command


@pytest.mark.slow
def test_the_demo_says_when_it_reuses_a_cache(tmp_path: Path, origin_listen: list[str]) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "something").write_text("x")
    code, text = run_demo(*origin_listen, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                          "--cache-dir", str(cache))
    assert code == 0, text
    assert f"reusing the cache in {cache}" in text, text


@pytest.mark.slow
def test_the_demo_checks_it_can_listen_before_it_prints_the_curl_lines(origin_listen: list[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, text = run_demo(*origin_listen, "--listen", f"127.0.0.1:{port}", "--admin-listen", "127.0.0.1:0")
    assert code == 1, text
    assert "cannot listen" in text, text
    assert "curl" not in text, text
