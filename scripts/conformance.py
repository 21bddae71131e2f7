"""Run the public HTTP cache test suite (cache-tests.fyi, npm ``http-cache-tests``) against cachegate.

What it does, in order (everything in one temporary folder, removed at the end):

1. ``npm install http-cache-tests@VERSION`` into the folder (npm's own cache makes
   repeats fast; nothing outside the folder is used);
2. starts the suite's origin server (``npm run server --port=N --pidfile=F``: it
   backgrounds itself and writes its pid to F, which is how we stop it);
3. starts ``cachegate run`` in front of it with a generated config: the shipped
   ``rules/default.yaml``, a disk cache in the folder, free loopback ports
   (``--direct`` skips this and points the client at the origin itself);
4. runs the client (``npm run --silent cli --base=URL``), which prints the results
   JSON; saves it under ``var/conformance/``;
5. classifies every result with the suite's own rules (``lib/display.mjs``
   ``determineTestResult``: a test whose ``depends_on`` did not pass is not passed;
   ``Setup`` failures are not passed; browser-only tests are not run) and prints
   pass counts per kind (required / optional / check) and the failing ids with the
   suite's reasons.

``--summary-json FILE`` also writes the counts and failures as JSON (the CI gate
reads it). Exit status: 0 when the suite ran, 2 when it could not be run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HCT_VERSION = "0.4.5"
ROOT = Path(__file__).resolve().parent.parent
KINDS = ("required", "optimal", "check")
KIND_LABEL = {"required": "required", "optimal": "optional", "check": "check"}
PASSING = frozenset({"pass", "yes"})

# Dumps the suite's test list as the CLI runs it (tests/index.mjs plus the
# surrogate-control suite that cli.mjs appends).
_META_SCRIPT = """
import tests from './tests/index.mjs'
import surrogate from './tests/surrogate-control.mjs'
tests.push(surrogate)
const out = []
for (const s of tests) for (const t of s.tests) {
  out.push({id: t.id, suite: s.id, kind: t.kind || 'required', depends_on: t.depends_on || [],
            browser_only: t.browser_only === true, name: t.name})
}
console.log(JSON.stringify(out))
"""


class SetupFailed(Exception):
    """The suite could not be run (npm missing, a server that would not start, ...)."""


@dataclass
class Summary:
    passed: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)
    failures: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            KIND_LABEL[k]: {"passed": self.passed[k], "total": self.total[k],
                            "failing": self.failures.get(k, [])}
            for k in KINDS
        }


def classify(meta: list[dict[str, Any]], results: dict[str, Any]) -> Summary:
    """Pass counts per kind, by the rules of the suite's ``determineTestResult``."""
    tests = {t["id"]: t for t in meta}

    def result_type(test_id: str, depth: int = 0) -> str:
        test, result = tests[test_id], results.get(test_id)
        if result is None:
            return "untested"
        if depth < 20:
            for dep in test["depends_on"]:
                if result_type(dep, depth + 1) not in PASSING:
                    return "dependency_fail"
        if isinstance(result, list) and result and result[0] == "Setup":
            return "retry" if len(result) > 1 and result[1] == "retry" else "setup_fail"
        kind = test["kind"]
        if kind == "required":
            return "pass" if result is True else "fail"
        if kind == "optimal":
            return "pass" if result is True else "optional_fail"
        return "yes" if result is True else "no"

    summary = Summary()
    for test in meta:
        if test["browser_only"]:
            continue
        kind = test["kind"]
        summary.total[kind] += 1
        outcome = result_type(test["id"])
        if outcome in PASSING:
            summary.passed[kind] += 1
            continue
        result = results.get(test["id"])
        if outcome == "dependency_fail":
            failed = [d for d in test["depends_on"] if result_type(d) not in PASSING]
            reason = f"depends on {', '.join(failed)}"
        elif isinstance(result, list):
            reason = ": ".join(str(x) for x in result)
        else:
            reason = outcome
        summary.failures.setdefault(kind, []).append(
            {"id": test["id"], "outcome": outcome, "reason": reason, "name": test["name"]})
    return summary


_HELD: list[socket.socket] = []  # (``free_port``)


def free_port() -> int:
    """A port on 127.0.0.1 for a child to listen on, held by this process until it exits: a
    socket bound there (SO_REUSEADDR) that does not listen keeps the kernel from giving the
    port to anyone else's server binding port 0 meanwhile (the machine is shared; tests run side
    by side), refuses connections until the child listens, and lets the child bind it (cachegate,
    aiohttp, nginx, varnishd and node all set SO_REUSEADDR)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    _HELD.append(s)
    return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SetupFailed(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise SetupFailed(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def npm() -> str:
    path = shutil.which("npm")
    if path is None:
        raise SetupFailed("npm is not installed (the suite is an npm package); install Node.js and npm")
    return path


def install_suite(work: Path) -> Path:
    """``npm install`` the suite into ``work/npm``; returns the package folder."""
    prefix = work / "npm"
    prefix.mkdir()
    cmd = [npm(), "install", "--no-audit", "--no-fund", "--no-save", "--loglevel=error",
           "--prefix", str(prefix), f"http-cache-tests@{HCT_VERSION}"]
    done = subprocess.run(cmd, cwd=prefix, capture_output=True, text=True, timeout=300)
    package = prefix / "node_modules" / "http-cache-tests"
    if done.returncode != 0 or not (package / "cli.mjs").is_file():
        raise SetupFailed(f"npm install failed ({done.returncode}):\n{done.stderr.strip()}")
    return package


def suite_meta(package: Path) -> list[dict[str, Any]]:
    node = shutil.which("node") or "node"
    done = subprocess.run([node, "--input-type=module", "-e", _META_SCRIPT], cwd=package,
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise SetupFailed(f"could not read the suite's test list:\n{done.stderr.strip()}")
    meta: list[dict[str, Any]] = json.loads(done.stdout)
    return meta


@dataclass
class Origin:
    """The suite's own origin server; it daemonises itself, so we stop it by its pidfile."""

    package: Path
    work: Path
    port: int = 0
    pid: int | None = None

    def start(self) -> None:
        pidfile = self.work / "origin.pid"
        log = (self.work / "origin.log").open("wb")
        for _attempt in range(3):
            self.port = free_port()
            subprocess.run([npm(), "run", "server", f"--port={self.port}", f"--pidfile={pidfile}"],
                           cwd=self.package, stdout=log, stderr=log, timeout=60, check=False)
            try:
                wait_for_port(self.port, 15)
            except SetupFailed:
                self._read_pid(pidfile)
                self.stop()
                continue
            self._read_pid(pidfile)
            return
        raise SetupFailed(f"the suite's origin server did not start; see {self.work / 'origin.log'}")

    def _read_pid(self, pidfile: Path) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                self.pid = int(pidfile.read_text().strip())
                return
            time.sleep(0.05)

    def stop(self) -> None:
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            cmdline = b"server/server.mjs"  # no /proc: trust our own pidfile
        if b"server/server.mjs" not in cmdline:
            return  # the pid is gone, or now belongs to someone else
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def write_cachegate_config(work: Path, origin_port: int, port: int, admin_port: int) -> Path:
    rules = ROOT / "rules" / "default.yaml"
    config = work / "cachegate.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"upstreams: [{{url: 'http://127.0.0.1:{origin_port}'}}]\n"
        f"admin: {{listen: '127.0.0.1:{admin_port}'}}\n"
        f"cache: {{disk: {{path: '{work / 'cache'}', size: 1GB, shards: 2}}}}\n"
        f"rules: ['{rules}']\n"
    )
    return config


def start_cachegate(work: Path, origin_port: int) -> tuple[subprocess.Popen[bytes], int]:
    cachegate = Path(sys.executable).parent / "cachegate"  # the venv running this script
    if not cachegate.exists():
        cachegate = ROOT / ".venv" / "bin" / "cachegate"
    if not cachegate.exists():
        raise SetupFailed(f"{cachegate} is missing: run scripts/test (or scripts/run) once to create .venv")
    log = (work / "cachegate.log").open("wb")
    for _attempt in range(3):
        port, admin_port = free_port(), free_port()
        config = write_cachegate_config(work, origin_port, port, admin_port)
        proc = subprocess.Popen([str(cachegate), "run", "--config", str(config), "--log-level", "warning"],
                                cwd=work, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, 20, proc)
        except SetupFailed:
            stop_process(proc)
            continue
        return proc, port
    raise SetupFailed(f"cachegate did not start; see {work / 'cachegate.log'}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def run_client(package: Path, base: str, test_id: str | None) -> dict[str, Any]:
    cmd = [npm(), "run", "--silent", "cli", f"--base={base}"]
    if test_id:
        cmd.append(f"--id={test_id}")
    done = subprocess.run(cmd, cwd=package, capture_output=True, text=True, timeout=600)
    if test_id:
        print(done.stdout, end="")
        return {}
    try:
        results: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise SetupFailed(f"the suite's client printed no results JSON ({done.returncode}):\n"
                          f"{done.stderr.strip()[-2000:]}") from None
    return results


def report(summary: Summary, target: str, verbose: bool) -> None:
    print(f"http-cache-tests {HCT_VERSION} against {target}")
    for kind in KINDS:
        failing = summary.failures.get(kind, [])
        if kind == "check" and not verbose:
            continue
        if failing:
            print(f"\nnot passed, {KIND_LABEL[kind]}:")
            for f in failing:
                print(f"  {f['id']:<52} {f['outcome']:<16} {f['reason']}")
    print()
    for kind in KINDS:
        print(f"{KIND_LABEL[kind]:<9} {summary.passed[kind]:>4}/{summary.total[kind]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/conformance", description=__doc__.split("\n")[0])
    parser.add_argument("--direct", action="store_true",
                        help="run the suite against its origin with no cache in between (baseline)")
    parser.add_argument("--id", metavar="TEST_ID", help="run one test and print its exchange")
    parser.add_argument("--out", metavar="DIR", default=str(ROOT / "var" / "conformance"),
                        help="where the results JSON is saved (default: var/conformance)")
    parser.add_argument("--summary-json", metavar="FILE", help="also write counts and failures as JSON")
    parser.add_argument("--checks", action="store_true", help="list the informational checks too")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, cache)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="cachegate-conformance-"))
    origin: Origin | None = None
    proxy: subprocess.Popen[bytes] | None = None
    try:
        package = install_suite(work)
        origin = Origin(package, work)
        origin.start()
        if args.direct:
            base, target = f"http://127.0.0.1:{origin.port}", "the origin directly (no cache)"
        else:
            proxy, port = start_cachegate(work, origin.port)
            base, target = f"http://127.0.0.1:{port}", "cachegate (default config, rules/default.yaml)"
        results = run_client(package, base, args.id)
        if args.id:
            return 0
        summary = classify(suite_meta(package), results)
    except (SetupFailed, subprocess.TimeoutExpired) as exc:
        print(f"scripts/conformance: {exc}", file=sys.stderr)
        if args.keep:
            print(f"logs kept in {work}", file=sys.stderr)
        return 2
    finally:
        if proxy is not None:
            stop_process(proxy)
        if origin is not None:
            origin.stop()
        if args.keep:
            print(f"temporary folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "direct" if args.direct else "cachegate"
    results_path = out / f"results-{name}.json"
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    report(summary, target, args.checks)
    print(f"\nresults: {results_path}")
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary.as_json(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
