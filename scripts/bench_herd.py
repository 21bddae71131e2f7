"""The herd benchmark behind scripts/bench-herd (not a test: it prints numbers).

N clients (200 by default) ask for one cold URL at the same moment; the origin
takes ``--delay`` (50 ms) to answer. For each proxy we count the requests the
origin saw for that URL and time every client, from the moment its request was
written to the last byte of its response. Waiters should pay nothing for the
wait: their latency should be the origin's own.

Measured in the same run, interleaved round by round, each round on a fresh cold URL:

- ``origin alone``: one request straight to the origin (its own latency), and the
  same herd straight to the origin (what the herd costs without a cache);
- cachegate with ``--workers 1`` and ``--workers 2``;
- nginx with ``proxy_cache_lock on`` and Varnish (default waiting list), when they
  are installed: they run as the current user on free ports, from temp dirs, and
  are stopped at the end.

Clients connect first (fresh connections, so SO_REUSEPORT spreads them over the
workers), then all requests are written at once (HTTP/1.1 keep-alive, as browsers
and API clients send them); connection set-up is not timed.
The origin is a separate process. Each client's latency runs from just before its
request is written to the kernel's receive timestamp of the last segment of its
response (SO_TIMESTAMPNS): the benchmark's own scheduling on a busy machine does
not count. The CPU column is the CPU time the proxy's processes (all of them)
used per herd.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "herd.test"


# -- the origin (a separate process) ------------------------------------------------------

def origin_main(port_file: str, delay: float, size: int) -> None:
    """An aiohttp origin: every path answers ``size`` bytes after ``delay``; /_count?path=P
    says how many requests P received."""
    from aiohttp import web

    counts: Counter[str] = Counter()
    body = (b"0123456789abcdef" * (size // 16 + 1))[:size]

    async def count(request: web.Request) -> web.Response:
        return web.json_response({"count": counts[request.query["path"]]})

    async def page(request: web.Request) -> web.Response:
        counts[request.path] += 1
        await asyncio.sleep(delay)
        return web.Response(body=body, headers={"Cache-Control": "public, max-age=300",
                                                "Content-Type": "application/octet-stream"})

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/_count", count)
        app.router.add_get("/{tail:.*}", page)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        port = runner.addresses[0][1]
        write_port(port_file, port)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()

    run(main())


def write_port(port_file: str, port: int) -> None:
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.replace(port_file + ".tmp", port_file)


def run(coro: object) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro)  # type: ignore[arg-type]


# -- the clients -----------------------------------------------------------------------

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux: the kernel stamps each received segment


@dataclass
class Answer:
    status: int
    latency: float
    body: bytes
    x_cache: str = ""
    worker: str = ""


def _parse(data: bytes) -> tuple[int, dict[str, str], bytes] | None:
    """(status, fields, body) once ``data`` holds a whole response, else None."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.strip()
    rest = data[end + 4:]
    if "content-length" in fields:
        n = int(fields["content-length"])
        return (int(lines[0].split()[1]), fields, rest[:n]) if len(rest) >= n else None
    if fields.get("transfer-encoding", "").lower() == "chunked":
        parts, pos = [], 0
        while True:
            eol = rest.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(rest[pos:eol].split(b";")[0], 16)
            if size == 0:
                done = rest.find(b"\r\n", eol + 2) >= 0
                return (int(lines[0].split()[1]), fields, b"".join(parts)) if done else None
            if len(rest) < eol + 2 + size + 2:
                return None
            parts.append(rest[eol + 2:eol + 2 + size])
            pos = eol + 2 + size + 2
    return None  # read to EOF


def herd(port: int | list[int], path: str, n: int, timeout: float = 30.0, agent: str = "bench-herd",
         host: str = HOST) -> list[Answer]:
    """Open ``n`` fresh connections (over several ports: client i to ``port[i % len]``), then
    write the same request on all of them at once.

    A client's latency runs from just before its request is written to the kernel's
    receive timestamp of the last segment of its response (SO_TIMESTAMPNS), so the
    client's own scheduling on a busy machine does not count."""
    ports = port if isinstance(port, list) else [port]
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", ports[i % len(ports)]))
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
    time.sleep(0.3)  # let the servers accept every connection before the clock starts
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {agent}\r\n\r\n".encode()
    sel = selectors.DefaultSelector()
    sent: dict[socket.socket, float] = {}
    for s in socks:
        sent[s] = time.time()
        s.sendall(request)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    data: dict[socket.socket, bytes] = dict.fromkeys(socks, b"")
    stamp: dict[socket.socket, float] = {}
    out: dict[socket.socket, Answer] = {}
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                chunk, anc, _, _ = s.recvmsg(1 << 20, 256)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                chunk, anc = b"", []
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", raw[:16])
                    stamp[s] = sec + nsec / 1e9
            data[s] += chunk
            parsed = _parse(data[s])
            if parsed is None and chunk:
                continue
            sel.unregister(s)
            if parsed is None:
                out[s] = Answer(0, float("nan"), b"")
                continue
            status, fields, body = parsed
            out[s] = Answer(status, stamp.get(s, time.time()) - sent[s], body,
                            fields.get("x-cache-status", ""), fields.get("x-cachegate-worker", ""))
    sel.close()
    for s in socks:
        s.close()
    return [out.get(s, Answer(0, float("nan"), b"")) for s in socks]


def origin_count(origin_port: int, path: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{origin_port}/_count?path={path}", timeout=10) as r:
        return int(json.loads(r.read())["count"])


# -- the proxies -------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """CPU time used so far by ``pid``, its threads and all its descendants (Linux schedstat, ns)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, ()))
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{p}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
    return total / 1e9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} in time")


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    answers: list[list[Answer]] = field(default_factory=list)
    origin_requests: list[int] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # seconds of CPU the proxy's processes used per herd
    note: str = ""


def start_cachegate(workdir: str, origin_port: int, workers: int) -> Target:
    d = os.path.join(workdir, f"cachegate-{workers}")
    os.makedirs(d)
    config = os.path.join(d, "cachegate.yaml")
    with open(config, "w") as f:
        f.write(textwrap.dedent(f"""\
            listen: 127.0.0.1:0
            upstreams: [{{url: http://127.0.0.1:{origin_port}}}]
            cache: {{memory: 64MB, disk: {{path: cache, size: 256MB, shards: 4}}}}
            """))
    env = dict(os.environ, CACHEGATE_DEBUG_HEADERS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "--config", config, "--workers", str(workers),
         "--admin-listen", "off", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode(errors="replace")
        if not line:
            raise RuntimeError(f"cachegate --workers {workers} exited")
        m = re.search(r"proxy listening on http://[^\s]+:(\d+)", line)
        if m:
            # Keep reading its output so the pipe never fills.
            threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()  # type: ignore[union-attr]
            return Target(f"cachegate --workers {workers}", int(m.group(1)), proc)
    raise RuntimeError("cachegate did not start")


def find(binary: str) -> str | None:
    return shutil.which(binary) or next(
        (p for p in (f"/usr/sbin/{binary}", f"/usr/local/sbin/{binary}") if os.path.exists(p)), None)


def start_nginx(workdir: str, origin_port: int) -> Target | None:
    nginx = find("nginx")
    if nginx is None:
        return None
    d = os.path.join(workdir, "nginx")
    os.makedirs(os.path.join(d, "cache"))
    port = free_port()
    user = ""
    if os.geteuid() == 0:  # keep the workers as the current user, not nobody
        import pwd

        user = f"user {pwd.getpwuid(os.getuid()).pw_name};"
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(textwrap.dedent(f"""\
            {user}
            worker_processes 2;
            daemon off;
            pid {d}/nginx.pid;
            error_log {d}/error.log warn;
            events {{ worker_connections 4096; }}
            http {{
                access_log off;
                client_body_temp_path {d}/client_temp;
                proxy_temp_path {d}/proxy_temp;
                fastcgi_temp_path {d}/fastcgi_temp;
                uwsgi_temp_path {d}/uwsgi_temp;
                scgi_temp_path {d}/scgi_temp;
                proxy_cache_path {d}/cache keys_zone=herd:10m;
                server {{
                    listen 127.0.0.1:{port} backlog=4096;
                    location / {{
                        proxy_pass http://127.0.0.1:{origin_port};
                        proxy_http_version 1.1;
                        proxy_set_header Connection "";
                        proxy_cache herd;
                        proxy_cache_lock on;
                        proxy_cache_lock_timeout 5s;
                        add_header X-Cache-Status $upstream_cache_status;
                    }}
                }}
            }}
            """))
    proc = subprocess.Popen([nginx, "-p", d, "-e", f"{d}/error.log", "-c", conf],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc, "nginx")
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
    return Target("nginx proxy_cache_lock", port, proc, note=version.replace("nginx version: ", ""))


def start_varnish(workdir: str, origin_port: int) -> Target | None:
    varnishd = find("varnishd")
    if varnishd is None:
        return None
    d = os.path.join(workdir, "varnish")
    os.makedirs(d)
    port = free_port()
    vcl = os.path.join(d, "herd.vcl")
    with open(vcl, "w") as f:
        f.write(textwrap.dedent(f"""\
            vcl 4.1;
            backend origin {{ .host = "127.0.0.1"; .port = "{origin_port}"; }}
            sub vcl_deliver {{
                if (obj.hits > 0) {{ set resp.http.X-Cache-Status = "HIT"; }}
                else {{ set resp.http.X-Cache-Status = "MISS"; }}
            }}
            """))
    proc = subprocess.Popen(
        [varnishd, "-F", "-j", "none", "-n", os.path.join(d, "work"), "-a", f"127.0.0.1:{port}",
         "-f", vcl, "-s", "malloc,64m", "-T", "none", "-p", "listen_depth=4096"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc, "varnishd", timeout=60)
    version = subprocess.run([varnishd, "-V"], capture_output=True, text=True).stderr.splitlines()
    return Target("varnish", port, proc, note=version[0] if version else "")


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- running ---------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    s = sorted(v for v in values if v == v)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, int(q * len(s)))]


def ms(v: float) -> str:
    return f"{v * 1000:.1f}"


def bench(args: argparse.Namespace, origin_port: int, origin_pid: int, targets: list[Target]
          ) -> dict[str, object]:
    single: list[float] = []
    direct = Target("origin alone (same herd)", origin_port)
    expected: bytes | None = None
    for r in range(args.rounds):
        for _ in range(3):  # the origin's own latency: one request at a time
            a = herd(origin_port, f"/single/{r}/{len(single)}", 1)
            single.append(a[0].latency)
        for t in [direct, *targets]:
            path = f"/herd/{r}/{t.port}"
            pid = t.proc.pid if t.proc is not None else origin_pid
            cpu0 = cpu_seconds(pid)
            answers = herd(t.port, path, args.clients)
            time.sleep(0.05)  # let the proxy finish its bookkeeping (disk commit)
            t.cpu.append(cpu_seconds(pid) - cpu0)
            bad = [a for a in answers if a.status != 200]
            bodies = {a.body for a in answers if a.status == 200}
            if expected is None and bodies:
                expected = next(iter(bodies))
            if bad or bodies != {expected}:
                print(f"  {t.name} round {r}: {len(bad)} failed, {len(bodies)} distinct bodies",
                      file=sys.stderr)
            t.answers.append(answers)
            t.origin_requests.append(origin_count(origin_port, path))
            time.sleep(0.1)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    return {"single": single, "direct": direct}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.05, help="the origin's latency, seconds")
    parser.add_argument("--size", type=int, default=8192, help="response body bytes")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workers", default="1,2", help="cachegate worker counts to run")
    parser.add_argument("--no-others", action="store_true", help="skip nginx and Varnish")
    parser.add_argument("--origin", nargs=3, metavar=("PORTFILE", "DELAY", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.origin:
        origin_main(args.origin[0], float(args.origin[1]), int(args.origin[2]))
        return 0

    workdir = tempfile.mkdtemp(prefix="bench-herd-")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        port_file = os.path.join(workdir, "origin.port")
        origin = subprocess.Popen([sys.executable, __file__, "--origin", port_file, str(args.delay),
                                   str(args.size)], cwd=ROOT)
        procs.append(origin)
        deadline = time.monotonic() + 20
        while not os.path.exists(port_file):
            if origin.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("origin did not start")
            time.sleep(0.05)
        with open(port_file) as f:
            origin_port = int(f.read())
        targets: list[Target] = []
        for w in (int(x) for x in args.workers.split(",") if x):
            t = start_cachegate(workdir, origin_port, w)
            procs.append(t.proc)  # type: ignore[arg-type]
            targets.append(t)
        if not args.no_others:
            for starter in (start_nginx, start_varnish):
                try:
                    other = starter(workdir, origin_port)
                except Exception as exc:
                    print(f"could not start {starter.__name__[6:]}: {exc}", file=sys.stderr)
                    continue
                if other is not None:
                    procs.append(other.proc)  # type: ignore[arg-type]
                    targets.append(other)
        time.sleep(0.5)
        report(args, bench(args, origin_port, origin.pid, targets), targets)
    finally:
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def report(args: argparse.Namespace, result: dict[str, object], targets: list[Target]) -> None:
    single = result["single"]
    direct = result["direct"]
    assert isinstance(single, list) and isinstance(direct, Target)
    origin_ms = statistics.median(single)
    print(f"\n{args.clients} concurrent clients, one cold URL, origin delay {args.delay * 1000:.0f} ms, "
          f"{args.size} B body; medians of {args.rounds} rounds")
    print(f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"origin's own latency (one request): {ms(origin_ms)} ms\n")
    header = (f"{'proxy':28} {'origin reqs':>11} {'(max)':>5} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'max ms':>8} {'p50 - origin':>13} {'CPU ms':>7} {'ok':>5}")
    print(header)
    print("-" * len(header))
    for t in [direct, *targets]:
        p50 = statistics.median(pct([a.latency for a in rs], 0.5) for rs in t.answers)
        p99 = statistics.median(pct([a.latency for a in rs], 0.99) for rs in t.answers)
        mx = statistics.median(max((a.latency for a in rs if a.latency == a.latency), default=0.0)
                               for rs in t.answers)
        reqs = statistics.median(t.origin_requests)
        ok = statistics.median(sum(a.status == 200 for a in rs) for rs in t.answers)
        cpu = statistics.median(t.cpu)
        print(f"{t.name:28} {reqs:>11g} {max(t.origin_requests):>5} {ms(p50):>8} {ms(p99):>8} "
              f"{ms(mx):>8} {'+' + ms(p50 - origin_ms):>13} {ms(cpu):>7} {ok:>5g}")
    for t in targets:
        if t.note:
            print(f"  {t.name}: {t.note}")
        workers = Counter(a.worker for rs in t.answers for a in rs if a.worker)
        if len(workers) > 1:
            # The worker whose client got the MISS fetched; the other waited on its lease.
            fetching, waiting = [], []
            for rs in t.answers:
                holder = next((a.worker for a in rs if a.x_cache == "MISS"), None)
                fetching.append(pct([a.latency for a in rs if a.worker == holder], 0.5))
                waiting.append(pct([a.latency for a in rs if a.worker != holder], 0.5))
            print(f"  {t.name}: clients per worker over all rounds: "
                  + ", ".join(f"worker {w}: {n}" for w, n in sorted(workers.items()))
                  + f"; p50 on the fetching worker {ms(statistics.median(fetching))} ms, "
                  f"on the waiting worker {ms(statistics.median(waiting))} ms")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
