"""Starting, checking and stopping the systems under test, each on a free loopback port.

Every system runs as the current user, from a temporary directory, in its own process
group (``start_new_session``), so ``Fleet.stop`` can end exactly the processes it
started and nothing is left running afterwards.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
APPS = HERE / "bench_apps.py"

MB = 1 << 20
CACHEGATE_MEMORY = 256 * MB  # the memory tier budget the RSS target is measured against


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


@dataclass
class System:
    """One thing wrk can drive: its processes, its port, and how it marks a cache hit."""

    name: str
    kind: str  # origin, ceiling, passthrough, cachegate, nginx, varnish
    workers: int
    port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    note: str = ""
    admin_port: int | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def alive(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs)

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for log in self.logs:
            with contextlib.suppress(OSError):
                text = log.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    def all_pids(self) -> list[int]:
        """Every process of this system (workers, supervisors, Varnish's child, nginx's master)."""
        tree: list[int] = []
        for p in self.procs:
            tree.extend(process_tree(p.pid))
        return tree

    def worker_pids(self) -> list[int]:
        """The processes that accept connections on this system's port (the serving workers)."""
        tree: list[int] = []
        for p in self.procs:
            tree.extend(process_tree(p.pid))
        listening = listening_pids(self.port, tree)
        return listening or [p.pid for p in self.procs]


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def listening_pids(port: int, pids: list[int]) -> list[int]:
    """Which of ``pids`` hold a socket listening on 127.0.0.1:``port``."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                    inodes.add(cols[9])
    holders = []
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        holders.append(pid)
                        break
    # A supervisor that bound the socket before forking holds it too: count workers only.
    if len(holders) > 1:
        parents = {int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) for p in holders
                   if Path(f"/proc/{p}/stat").exists()}
        holders = [p for p in holders if p not in parents] or holders
    return holders


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time consumed so far by these processes (all their threads)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLOCK_TICKS


def pss_bytes(pid: int) -> int:
    """Proportional set size of a process (/proc/PID/smaps_rollup): pages shared by several
    processes count a share in each, so the sum over processes is what they take together."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of a process from /proc/PID/status: VmRSS (all), RssAnon or RssFile."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def wait_ready(system: System, timeout: float = 20.0) -> bool:
    """True once the system answers an HTTP request (any status); False if it died or timed out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not system.alive():
            return False
        try:
            with urllib.request.urlopen(system.url("/obj/1"), timeout=2) as resp:
                resp.read()
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            time.sleep(0.1)
    return False


class Fleet:
    """Every system of one benchmark run, and the temporary directory they live in."""

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python
        self.dir = Path(tempfile.mkdtemp(prefix="cachegate-bench-"))
        self.records = self.dir / "records"  # the origin's X-Bench records (zipf.lua)
        self.records.mkdir()
        self.systems: dict[str, System] = {}
        self.notes: list[str] = []
        self.env: dict[str, str] = {}  # more environment for every process started (bench_calls)
        self.path: list[str] = []  # folders put first on every process's PYTHONPATH (bench_calls)

    # -- lifecycle ---------------------------------------------------------------------------

    def _spawn(self, system: System, argv: list[str], log_name: str, cwd: Path | None = None,
               pythonpath: Path | None = None) -> None:
        log = self.dir / log_name
        out = open(log, "wb")  # noqa: SIM115  (closed when the fleet stops; the child keeps its copy)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        if pythonpath is not None:  # another checkout's code (``cachegate-before``)
            env["PYTHONPATH"] = str(pythonpath)
        if self.path:
            env["PYTHONPATH"] = os.pathsep.join([*self.path, *filter(None, [env.get("PYTHONPATH")])])
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=cwd or self.dir, env=env, start_new_session=True)
        out.close()
        system.procs.append(proc)
        system.logs.append(log)

    def add(self, system: System) -> System:
        if not wait_ready(system):
            tail = system.log_tail()
            self._stop_system(system)
            raise RuntimeError(f"{system.name} did not start on port {system.port}\n{tail}")
        self.systems[system.name] = system
        return system

    def stop(self) -> None:
        for system in list(self.systems.values()):
            self._stop_system(system)
        self.systems.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def discard(self, system: System, *folders: Path) -> None:
        """Stop one system and remove what it kept on disk (a fresh workload's round is over)."""
        self._stop_system(system)
        self.systems = {n: s for n, s in self.systems.items() if s is not system}
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _stop_system(system: System) -> None:
        for p in system.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in system.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        # Children that outlived their group leader (nginx workers, varnish's child) go too.
        for p in system.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)

    # -- the systems ---------------------------------------------------------------------------

    def start_app(self, name: str, app: str, procs: int, *, upstream: str = "",
                  port: int | None = None, record: str = "") -> System:
        """``procs`` processes of one bench_apps app on one port (SO_REUSEPORT when > 1)."""
        system = System(name, app, procs, port or free_port())
        for i in range(procs):
            argv = [self.python, str(APPS), app, "--port", str(system.port)]
            if procs > 1:
                argv.append("--reuse-port")
            if upstream:
                argv += ["--upstream", upstream]
            if record:
                argv += ["--record", record]
            self._spawn(system, argv, f"{name}-{i}.log")
        return self.add(system)

    def access_log_path(self, name: str) -> Path:
        return self.dir / f"{name}-access.log"

    def cachegate_config(self, name: str, origin: System, port: int, admin_port: int,
                         memory_max_object: str = "1MB", access_log: bool = False) -> Path:
        disk = self.dir / f"{name}-cache"
        config = self.dir / f"{name}.yaml"
        rules = ROOT / "rules" / "default.yaml"
        config.write_text(
            f"# generated by scripts/bench for {name}\n"
            f"listen: 127.0.0.1:{port}\n"
            f"upstreams:\n  - url: http://127.0.0.1:{origin.port}\n"
            f"cache:\n"
            f"  memory: {CACHEGATE_MEMORY}\n"
            f"  memory_max_object: {memory_max_object}\n"
            f"  disk:\n    path: {disk}\n    size: 4GB\n"
            f"admin:\n  listen: 127.0.0.1:{admin_port}\n"
            f"rules:\n  - {rules}\n"
            + (f"access_log: {{format: json, path: {self.access_log_path(name)}}}\n" if access_log else "")
        )
        return config

    def start_cachegate(self, name: str, origin: System, workers: int,
                        memory_max_object: str = "1MB", uvloop: bool = True, root: Path | None = None,
                        access_log: bool = False) -> System:
        """``cachegate run`` as a subprocess (from the checkout at ``root``: this one by default);
        falls back to 1 worker when --workers N is refused."""
        port, admin_port = free_port(), free_port()
        config = self.cachegate_config(name, origin, port, admin_port, memory_max_object, access_log)
        while True:
            system = System(name, "cachegate", workers, port, admin_port=admin_port)
            argv = [self.python, "-m", "proxy", "run", "--config", str(config), "--workers", str(workers),
                    "--log-level", "warning"]
            if not uvloop:
                argv.append("--no-uvloop")
            self._spawn(system, argv, f"{name}-w{workers}.log", cwd=root or ROOT, pythonpath=root)
            if wait_ready(system):
                self.systems[name] = system
                return system
            tail = system.log_tail()
            self._stop_system(system)
            if workers > 1:
                reason = tail.strip().splitlines()[-1] if tail.strip() else "exited"
                note = (f"{name}: `cachegate run --workers {workers}` did not start ({reason}); "
                        f"measured with 1 worker")
                self.notes.append(note)
                print(f"note: {note}", flush=True)
                workers = 1
                continue
            raise RuntimeError(f"{name} did not start\n{tail}")

    def start_nginx(self, name: str, origin: System, workers: int) -> System:
        nginx = shutil.which("nginx")
        assert nginx is not None
        port = free_port()
        d = self.dir / name
        (d / "cache").mkdir(parents=True)
        user = ""
        if os.geteuid() == 0:  # the master would hand the workers to "nobody"; keep the current user
            user = (f"user {pwd.getpwuid(os.getuid()).pw_name} "
                    f"{grp.getgrgid(os.getgid()).gr_name};")
        conf = render(HERE / "nginx.conf.in", USER=user, WORKERS=str(workers), DIR=str(d),
                      ORIGIN_PORT=str(origin.port), PORT=str(port))
        (d / "nginx.conf").write_text(conf)
        system = System(name, "nginx", workers, port)
        self._spawn(system, [nginx, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")],
                    f"{name}.log")
        system.logs.append(d / "error.log")
        return self.add(system)

    def start_varnish(self, name: str, origin: System, storage: str = "malloc,1g") -> System:
        varnishd = shutil.which("varnishd")
        assert varnishd is not None
        port = free_port()
        d = self.dir / name
        d.mkdir(parents=True)
        (d / "default.vcl").write_text(render(HERE / "varnish.vcl.in", ORIGIN_PORT=str(origin.port)))
        system = System(name, "varnish", 1, port)
        argv = [varnishd, "-F", "-a", f"127.0.0.1:{port}", "-f", str(d / "default.vcl"),
                "-n", str(d / "work"), "-s", storage, "-T", "127.0.0.1:0"]
        if os.geteuid() == 0:
            argv += ["-j", "none"]  # stay the current user instead of varnish/vcache
        self._spawn(system, argv, f"{name}.log")
        return self.add(system)


def render(template: Path, **values: str) -> str:
    """The template with each ``@KEY@`` replaced; an unfilled one outside comments is an error."""
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    leftover = _PLACEHOLDER.findall(code)
    if leftover:
        raise ValueError(f"{template.name}: unfilled placeholders {leftover}")
    return text


_PLACEHOLDER = re.compile(r"@[A-Z_]+@")
