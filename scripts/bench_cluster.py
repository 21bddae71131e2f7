"""The cluster benchmark behind scripts/bench-cluster (not a test: it prints a table).

One Redis (Debian's redis-server, on a free loopback port, nothing persisted),
an origin in its own process and three cachegate nodes on this machine
(``cluster.shared_cache: true``), then three measurements:

1. **Purge by tag over 10,000 entries**: the nodes hold 10,000 entries between
   them (a third each, all with one tag); ``POST /purge {"tags": [...]}`` on one
   node is timed until it answers, that is until every node acknowledged (the
   answer must be 200 with every node in it). Refilled before each round.
2. **Herd**: ``--clients`` (500) clients connect, spread evenly over the three
   nodes, then all ask for one cold URL at once; the origin takes ``--delay``
   (200 ms). Counted: origin requests for the URL; timed: each client from its
   request to the last byte (kernel receive timestamp), against the origin's own
   latency measured in the same run.
3. **Hit path**: wrk on one hot 1 KiB object against a single node with
   ``cluster:`` (``shared_cache: false``) and against one without, alternating
   runs; the ratio of their median requests/second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_herd import free_port, origin_count, pct, stop, write_port
from bench_herd import herd as herd_over

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "cluster.test"
AGENT = "bench-cluster"


# -- the origin (a separate process) ------------------------------------------------------

def origin_main(port_file: str, delay: float) -> None:
    """/t/TAG/N: a small tagged object; /herd/...: answered after ``delay``; /hot: 1 KiB;
    /_count?path=P: how many requests P received."""
    from collections import Counter

    from aiohttp import web

    counts: Counter[str] = Counter()

    async def count(request: web.Request) -> web.Response:
        return web.json_response({"count": counts[request.query["path"]]})

    async def tagged(request: web.Request) -> web.Response:
        return web.Response(body=b"t" * 256, headers={"Cache-Control": "max-age=3600",
                                                      "Surrogate-Key": request.match_info["tag"]})

    async def slow(request: web.Request) -> web.Response:
        counts[request.path] += 1
        await asyncio.sleep(delay)
        return web.Response(body=b"h" * 8192, headers={"Cache-Control": "max-age=300"})

    async def hot(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 1024, headers={"Cache-Control": "max-age=3600"})

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/_count", count)
        app.router.add_get("/t/{tag}/{n}", tagged)
        app.router.add_get("/herd/{tail:.*}", slow)
        app.router.add_get("/hot", hot)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        write_port(port_file, runner.addresses[0][1])
        await asyncio.Event().wait()

    asyncio.run(main())


# -- processes ------------------------------------------------------------------------------

class Node:
    def __init__(self, workdir: str, name: str, origin_port: int, cluster: dict[str, object] | None) -> None:
        self.name = name
        d = os.path.join(workdir, name)
        os.makedirs(d)
        config = os.path.join(d, "cachegate.yaml")
        with open(config, "w") as f:
            f.write(textwrap.dedent(f"""\
                listen: 127.0.0.1:0
                upstreams: [{{url: http://127.0.0.1:{origin_port}}}]
                admin: {{listen: 127.0.0.1:0, hosts: [{HOST}]}}
                cache: {{memory: 128MB, disk: {{path: cache, size: 512MB, shards: 4}}}}
                """) + (f"cluster: {json.dumps(cluster)}\n" if cluster else ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", config, "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=d)
        assert self.proc.stdout is not None
        self.port = self.admin_port = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (self.port and self.admin_port):
            line = self.proc.stdout.readline().decode(errors="replace")
            if not line:
                raise RuntimeError(f"node {name} exited")
            if m := re.search(r"proxy listening on http://[^\s]+:(\d+)", line):
                self.port = int(m.group(1))
            if m := re.search(r"admin listening on http://[^\s]+:(\d+)", line):
                self.admin_port = int(m.group(1))
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()


def start_redis(workdir: str) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench-cluster needs redis-server (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    return proc, port


def start_origin(workdir: str, delay: float) -> tuple[subprocess.Popen[bytes], int]:
    port_file = os.path.join(workdir, "origin.port")
    proc = subprocess.Popen([sys.executable, __file__, "--origin", port_file, str(delay)], cwd=ROOT)
    deadline = time.monotonic() + 20
    while not os.path.exists(port_file):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("origin did not start")
        time.sleep(0.05)
    with open(port_file) as f:
        return proc, int(f.read())


# -- 1. purge by tag ---------------------------------------------------------------------

async def fill(nodes: list[Node], tag: str, entries: int) -> None:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as s:
        async def get(i: int) -> None:
            node = nodes[i % len(nodes)]
            async with s.get(f"http://127.0.0.1:{node.port}/t/{tag}/{i}", headers={"Host": HOST}) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"fill got {r.status}")

        for start in range(0, entries, 500):
            await asyncio.gather(*(get(i) for i in range(start, min(entries, start + 500))))


def purge_tag(node: Node, tag: str) -> tuple[float, dict[str, object]]:
    request = urllib.request.Request(f"http://127.0.0.1:{node.admin_port}/purge", method="POST",
                                     data=json.dumps({"tags": [tag]}).encode(),
                                     headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as r:
        body = json.loads(r.read())
        status = r.status
    elapsed = time.perf_counter() - t0
    if status != 200:
        raise RuntimeError(f"purge answered {status}: {body}")
    return elapsed, body


def bench_purge(nodes: list[Node], entries: int, rounds: int) -> dict[str, object]:
    times, purged = [], []
    for r in range(rounds):
        tag = f"bulk{r}"
        asyncio.run(fill(nodes, tag, entries))
        time.sleep(1.0)  # the disk commits of the fill are done
        elapsed, body = purge_tag(nodes[r % len(nodes)], tag)
        nodes_answered = body["nodes"]
        assert isinstance(nodes_answered, dict) and len(nodes_answered) == len(nodes), body
        times.append(elapsed)
        purged.append(int(body["purged"]))  # type: ignore[call-overload]
        print(f"purge round {r + 1}/{rounds}: {elapsed * 1000:.1f} ms, {body['purged']} entries",
              file=sys.stderr)
    return {"times": times, "purged": purged}


# -- 2. herd ------------------------------------------------------------------------------

def bench_herd(nodes: list[Node], origin_port: int, clients: int, rounds: int, tag: str = "cluster"
               ) -> dict[str, object]:
    single, p50s, p99s, requests, oks = [], [], [], [], []
    ports = [n.port for n in nodes]
    for r in range(rounds):
        for i in range(3):
            alone = herd_over(origin_port, f"/herd/single/{r}/{i}", 1, agent=AGENT, host=HOST)
            single.append(alone[0].latency)
        path = f"/herd/{tag}/{r}"
        answers = herd_over(ports, path, clients, agent=AGENT, host=HOST)
        time.sleep(0.2)
        requests.append(origin_count(origin_port, path))
        lat = [a.latency for a in answers]
        p50s.append(pct(lat, 0.5))
        p99s.append(pct(lat, 0.99))
        oks.append(sum(a.status == 200 for a in answers))
        print(f"herd round {r + 1}/{rounds} ({tag}): {requests[-1]} origin request(s), "
              f"p50 {p50s[-1] * 1000:.1f} ms, {oks[-1]}/{clients} ok", file=sys.stderr)
    return {"single": single, "p50": p50s, "p99": p99s, "requests": requests, "ok": oks}


# -- 3. hit path --------------------------------------------------------------------------

def wrk_rps(port: int, seconds: int, connections: int) -> float:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-H", f"Host: {HOST}",
                          f"http://127.0.0.1:{port}/hot"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m or "Non-2xx" in out:
        raise RuntimeError(f"wrk: {out}")
    return float(m.group(1))


def bench_hits(plain: Node, clustered: Node, rounds: int, seconds: int) -> dict[str, list[float]]:
    for node in (plain, clustered):
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{node.port}/hot",
                                                      headers={"Host": HOST}), timeout=10).read()
        wrk_rps(node.port, 1, 16)  # warm up
    out: dict[str, list[float]] = {"plain": [], "cluster": []}
    for r in range(rounds):
        order = [("plain", plain), ("cluster", clustered)]
        if r % 2:
            order.reverse()
        for name, node in order:
            out[name].append(wrk_rps(node.port, seconds, 32))
        print(f"hit round {r + 1}/{rounds}: no cluster {out['plain'][-1]:.0f} req/s, "
              f"cluster {out['cluster'][-1]:.0f} req/s", file=sys.stderr)
    return out


# -- main -----------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=10_000, help="entries the tag purge covers")
    parser.add_argument("--purge-rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--delay", type=float, default=0.2, help="the origin's latency for the herd")
    parser.add_argument("--herd-rounds", type=int, default=5)
    parser.add_argument("--hit-rounds", type=int, default=6)
    parser.add_argument("--hit-seconds", type=int, default=3)
    parser.add_argument("--only", choices=("purge", "herd", "hits"), action="append",
                        help="run only these measurements (repeatable)")
    parser.add_argument("--origin", nargs=2, metavar=("PORTFILE", "DELAY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.origin:
        origin_main(args.origin[0], float(args.origin[1]))
        return 0
    if shutil.which("wrk") is None:
        raise SystemExit("bench-cluster needs wrk for the hit-path measurement (apt-get install wrk)")

    workdir = tempfile.mkdtemp(prefix="bench-cluster-")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        redis, redis_port = start_redis(workdir)
        procs.append(redis)
        origin, origin_port = start_origin(workdir, args.delay)
        procs.append(origin)
        cluster = {"redis": f"redis://127.0.0.1:{redis_port}/0", "shared_cache": True, "ack_timeout": "5s"}
        nodes = []
        for name in ("a", "b", "c"):
            node = Node(workdir, name, origin_port, {**cluster, "node": name})
            procs.append(node.proc)
            nodes.append(node)
        time.sleep(1.0)
        only = set(args.only or ("purge", "herd", "hits"))
        purge = bench_purge(nodes, args.entries, args.purge_rounds) if "purge" in only else None
        herd = bench_herd(nodes, origin_port, args.clients, args.herd_rounds) if "herd" in only else None
        for n in nodes:
            stop(n.proc)
        plain = Node(workdir, "plain", origin_port, None)
        procs.append(plain.proc)
        if herd is not None:
            # The same herd on one node alone, without a cluster: what answering that many
            # clients costs this machine, apart from anything the cluster adds.
            herd["alone"] = bench_herd([plain], origin_port, args.clients, args.herd_rounds, "alone")
        clustered = Node(workdir, "clustered", origin_port,
                         {"redis": f"redis://127.0.0.1:{redis_port}/0", "node": "solo", "namespace": "hits"})
        procs.append(clustered.proc)
        hits = bench_hits(plain, clustered, args.hit_rounds, args.hit_seconds) if "hits" in only else None
        report(args, purge, herd, hits)
    finally:
        for p in reversed(procs):
            with_signal_stop(p)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def with_signal_stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    stop(p)


def report(args: argparse.Namespace, purge: dict[str, object] | None, herd: dict[str, object] | None,
           hits: dict[str, list[float]] | None) -> None:
    print(f"\n3 nodes and 1 Redis on this machine: {platform.python_implementation()} "
          f"{platform.python_version()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}\n")
    print("| measurement | result | target |")
    print("|---|---|---|")
    if purge is not None:
        report_purge(args, purge)
    if herd is not None:
        report_herd(args, herd)
    if hits is not None:
        report_hits(hits)


def report_purge(args: argparse.Namespace, purge: dict[str, object]) -> None:
    times = purge["times"]
    assert isinstance(times, list)
    print(f"| purge by tag over {args.entries:,} entries on 3 nodes, acknowledged by all "
          f"({len(times)} rounds) | p50 {statistics.median(times) * 1000:.0f} ms, "
          f"p99 {pct(times, 0.99) * 1000:.0f} ms | under 1 s |")


def report_herd(args: argparse.Namespace, herd: dict[str, object]) -> None:
    single = herd["single"]
    assert isinstance(single, list)
    origin_ms = statistics.median(single) * 1000
    p50 = [v * 1000 for v in herd["p50"]]  # type: ignore[attr-defined]
    print(f"| {args.clients}-client herd over 3 nodes, origin {args.delay * 1000:.0f} ms, shared_cache "
          f"({len(p50)} rounds) | origin requests per herd: {sorted(set(herd['requests']))} "  # type: ignore[call-overload]
          f"| exactly 1 |")
    print(f"| the herd's waiters: p50 over the origin's own latency ({origin_ms:.0f} ms) | "
          f"+{statistics.median(p50) - origin_ms:.0f} ms (p50 {statistics.median(p50):.0f} ms, p99 "
          f"{statistics.median(herd['p99']) * 1000:.0f} ms) | |")  # type: ignore[arg-type]
    alone = herd.get("alone")
    if isinstance(alone, dict):
        a50 = statistics.median(alone["p50"]) * 1000
        print(f"| the same herd on one node without a cluster (baseline, same run) | origin requests "
              f"{sorted(set(alone['requests']))}, p50 {a50:.0f} ms: +{a50 - origin_ms:.0f} ms, p99 "
              f"{statistics.median(alone['p99']) * 1000:.0f} ms | |")


def report_hits(hits: dict[str, list[float]]) -> None:
    # Each round runs both back to back (in alternating order): the median of the rounds'
    # ratios cancels most of what the machine's other load does to one round.
    ratios = [c / p for c, p in zip(hits["cluster"], hits["plain"], strict=True)]
    print(f"| hit path, 1 KiB, cluster mode (shared_cache: false) vs no cluster ({len(ratios)} "
          f"paired runs) | median {statistics.median(hits['cluster']):.0f} vs "
          f"{statistics.median(hits['plain']):.0f} req/s; median of paired ratios "
          f"{statistics.median(ratios):.3f}x (range {min(ratios):.2f}-{max(ratios):.2f}) | >= 0.97x |")


if __name__ == "__main__":
    raise SystemExit(main())
