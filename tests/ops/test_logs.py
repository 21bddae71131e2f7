"""Access log (JSON lines, combined), request ids end to end, the error log's lines."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.config import Overrides
from proxy.logs import (
    CUT_MARK,
    MAX_BATCH,
    MAX_TAILS,
    PIPE_BUF,
    TAIL_KEPT,
    AccessLog,
    AccessLogSettings,
    LineFormatter,
    RequestIds,
    RequestInfo,
    _json_str,
    _quoted,
    _quoted_width,
    key_hash,
    pipe_pieces,
    say,
    setup_logging,
    tell,
)
from proxy.logs import REQUEST as CURRENT_REQUEST
from proxy.metrics import Metrics
from proxy.web.fastpath import ProxyServer
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy, write_config
from tests.ports import Ports
from tests.tmpfs import mounted_tmpfs

RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def fast_answered(proxy: Proxy) -> int:
    server = proxy.listeners.runners[0].server
    assert isinstance(server, ProxyServer) and server.fast is not None
    return server.fast.answered


def records(proxy: Proxy, path: Path) -> list[dict[str, Any]]:
    assert proxy.runtime.access_log is not None
    proxy.runtime.access_log.flush()
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_json_lines_carry_every_field_on_the_general_and_the_fast_path(
    tmp_path: Path, origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.route("/page", body=b"hello", headers={"Cache-Control": "max-age=60"})
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{format: json, path: {log_file}}}\n")
    miss = await proxy.get("/page?q=1", headers={"Host": "Example.TEST"})
    await asyncio.sleep(0.05)
    before = fast_answered(proxy)
    hit = await proxy.get("/page?q=1", headers={"Host": "Example.TEST"})
    assert fast_answered(proxy) == before + 1, "the hit was answered on the fast path"
    first, second = records(proxy, log_file)
    upstream = f"http://127.0.0.1:{origin.port}"
    for record, reply in ((first, miss), (second, hit)):
        assert RFC3339_MS.fullmatch(record["time"])
        assert record["request_id"] == reply.headers["X-Request-Id"]
        assert record["cache_status"] == reply.cache_status
        assert record["cache"] == reply.x_cache
        assert (record["client"], record["method"], record["host"], record["path"]) == (
            "127.0.0.1", "GET", "example.test", "/page?q=1")
        assert (record["status"], record["bytes"], record["worker"]) == (200, 5, "0")
        assert isinstance(record["duration_us"], int) and record["duration_us"] >= 0
    assert first["cache"] == "MISS" and second["cache"] == "HIT"
    assert first["upstream"] == upstream and isinstance(first["upstream_us"], int)
    assert second["upstream"] is None and second["upstream_us"] is None
    key = "http://example.test/page?q=1"
    assert first["key"] == second["key"] == key_hash(key)
    assert second["cache_status"].startswith("cachegate; hit; ttl=")
    assert set(first) == {"time", "request_id", "client", "method", "host", "path", "status", "bytes",
                          "duration_us", "upstream", "upstream_us", "cache", "cache_status", "key", "worker"}


async def test_the_log_has_cachegates_own_cache_status_on_every_path_not_the_origins(
    tmp_path: Path, origin: Origin, make_proxy: MakeProxy
) -> None:
    """An origin's own Cache-Status member comes before cachegate's (RFC 9211 lists the caches
    from the origin's side): the general path logged that first one (6 KB here, which made lines
    over PIPE_BUF on a pipe) on a miss and a hit, where the fast path logged cachegate's own."""
    theirs = 'origin-cdn; fwd=miss; detail="' + "x" * 6000 + '"'
    origin.route("/cs", body=b"hello", headers={"Cache-Control": "max-age=60", "Cache-Status": theirs})
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{format: json, path: {log_file}}}\n")
    miss = await proxy.get("/cs")
    await asyncio.sleep(0.05)
    before = fast_answered(proxy)
    fast = await proxy.get("/cs")
    assert fast_answered(proxy) == before + 1, "the hit was answered on the fast path"
    general = await proxy.get("/cs", headers={"Connection": "close"})  # (never the fast path's)
    assert fast_answered(proxy) == before + 1, "the hit was answered on the general path"
    logged = records(proxy, log_file)
    assert [r["cache"] for r in logged] == ["MISS", "HIT", "HIT"]
    for record, reply in zip(logged, (miss, fast, general), strict=True):
        members = reply.headers.getall("Cache-Status")
        assert members[0] == theirs and len(members) == 2, members  # the origin's is relayed
        assert record["cache_status"] == members[-1]
    assert logged[0]["cache_status"] == "cachegate; fwd=uri-miss; fwd-status=200; stored"
    assert logged[1]["cache_status"].startswith("cachegate; hit; ttl=")
    assert logged[2]["cache_status"] == logged[1]["cache_status"]  # the same hit, the same line


async def test_combined_lines_have_one_pair_of_brackets_and_microseconds(
    tmp_path: Path, origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.route("/page", body=b"hello", headers={"Cache-Control": "max-age=60"})
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{format: combined, path: {log_file}}}\n")
    replies = []
    for _ in range(2):
        replies.append(await proxy.get("/page", headers={"User-Agent": 'probe "1"', "Referer": "http://r/"}))
        await asyncio.sleep(0.05)
    assert proxy.runtime.access_log is not None
    proxy.runtime.access_log.flush()
    lines = log_file.read_text().splitlines()
    pattern = re.compile(
        r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "GET /page HTTP/1\.1" 200 5 '
        r'"http://r/" "probe \\x221\\x22" cache=(MISS|HIT) duration_us=(\d+) request_id=(\S+)')
    found = [pattern.fullmatch(line) for line in lines]
    assert all(found), lines
    assert [m.group(1) for m in found if m] == ["MISS", "HIT"]
    assert [m.group(3) for m in found if m] == [r.headers["X-Request-Id"] for r in replies]
    assert "[[" not in lines[0]


async def test_odd_paths_and_refused_requests_stay_valid_json_lines(
    tmp_path: Path, make_proxy: MakeProxy
) -> None:
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{path: {log_file}}}\n")
    port = proxy.listeners.proxy_addresses[0][1]
    for raw in (b"GET /a\\b/%E2%82%AC/\"q\" HTTP/1.1\r\nHost: h\r\n\r\n",
                b"GET /x HTTP/1.1\r\nHost: h\r\nContent-Length: nope\r\n\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await reader.read(65536)
        writer.close()
    lines = records(proxy, log_file)
    assert [line["status"] for line in lines] == [404, 400]  # the origin has no route; a bad Content-Length
    assert lines[0]["path"] == '/a\\b/%E2%82%AC/"q"'  # quote and backslash escaped, and read back
    assert lines[1]["cache"] == "ERROR" and lines[1]["request_id"]
    assert (lines[1]["method"], lines[1]["path"]) == (None, None)  # the parser refused it: unknown


async def test_a_refused_request_is_a_dash_in_the_combined_format(tmp_path: Path, make_proxy: MakeProxy) -> None:
    """It was written "None None HTTP/1.1": nginx writes "-" for a request line it could not read."""
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{format: combined, path: {log_file}}}\n")
    port = proxy.listeners.proxy_addresses[0][1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"BREW /x HTTP/1.1\r\nHost: h\r\n\r\n")
    await reader.read(65536)
    writer.close()
    assert proxy.runtime.access_log is not None
    proxy.runtime.access_log.flush()
    (line,) = log_file.read_text().splitlines()
    assert re.fullmatch(r'127\.0\.0\.1 - - \[[^]]+\] "-" 501 \d+ "-" "-" cache=ERROR duration_us=0 request_id=\S+', line), line


async def test_request_ids_are_generated_returned_and_sent_upstream(origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/a", body=b"a")
    proxy = await make_proxy()
    one = await proxy.get("/a", headers={"X-Request-Id": "client-chosen"})  # not a trusted peer
    two = await proxy.get("/a")
    ids = [one.headers["X-Request-Id"], two.headers["X-Request-Id"]]
    assert "client-chosen" not in ids and ids[0] != ids[1]
    assert [s.headers.getall("X-Request-Id") for s in origin.seen] == [[ids[0]], [ids[1]]]


async def test_a_trusted_peers_request_id_is_kept_and_a_bad_one_replaced(origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/a", body=b"a")
    proxy = await make_proxy(config="trusted_proxies: [127.0.0.1/32]\n")
    kept = await proxy.get("/a", headers={"X-Request-Id": "lb-7f3a"})
    assert kept.headers["X-Request-Id"] == "lb-7f3a"
    assert origin.seen[-1].headers["X-Request-Id"] == "lb-7f3a"
    for bad in ("has space", "x" * 201, 'q"uote'):
        reply = await proxy.get("/a", headers={"X-Request-Id": bad})
        assert reply.headers["X-Request-Id"] != bad
        assert origin.seen[-1].headers["X-Request-Id"] == reply.headers["X-Request-Id"]


async def test_a_stored_response_never_carries_the_filling_requests_id(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """An origin that echoes X-Request-Id: the fill's id is not stored, and each later hit
    (fast path, general path, HEAD, a revalidation's 304 echo) carries its own."""
    async def echo(request: web.Request) -> web.Response:
        rid = request.headers.get("X-Request-Id", "")
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={"ETag": '"v1"', "X-Request-Id": rid,
                                                     "Cache-Control": "max-age=60"})
        return web.Response(body=b"echo", headers={"X-Request-Id": rid, "ETag": '"v1"',
                                                   "Cache-Control": "max-age=60"})

    origin.route("/echo", echo)
    proxy = await make_proxy(config="trusted_proxies: [127.0.0.1/32]\n")
    fill = await proxy.get("/echo", headers={"X-Request-Id": "filler-1"})
    assert fill.headers.getall("X-Request-Id") == ["filler-1"]
    await asyncio.sleep(0.05)
    (cached,) = proxy.runtime.storage.memory_get(proxy.url + "/echo") or ()  # type: ignore[misc]
    assert "x-request-id" not in {k.lower() for k, _ in cached.entry.response.headers}
    for method in ("GET", "HEAD", "GET"):
        reply = await proxy.request(method, "/echo")
        assert reply.x_cache == "HIT"
        assert len(reply.headers.getall("X-Request-Id")) == 1
        assert reply.headers["X-Request-Id"] != "filler-1"
    revalidated = await proxy.get("/echo", headers={"Cache-Control": "max-age=0", "X-Request-Id": "reval-2"})
    assert revalidated.x_cache == "REVALIDATED" and revalidated.headers["X-Request-Id"] == "reval-2"
    await asyncio.sleep(0.05)
    (cached,) = proxy.runtime.storage.memory_get(proxy.url + "/echo") or ()  # type: ignore[misc]
    assert "x-request-id" not in {k.lower() for k, _ in cached.entry.response.headers}
    after = await proxy.get("/echo")
    assert after.headers["X-Request-Id"] not in ("filler-1", "reval-2")


async def test_collapsed_followers_get_their_own_ids(origin: Origin, make_proxy: MakeProxy) -> None:
    async def slow_echo(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.Response(body=b"x", headers={"X-Request-Id": request.headers.get("X-Request-Id", ""),
                                                "Cache-Control": "max-age=60"})

    origin.route("/herd", slow_echo)
    proxy = await make_proxy()
    replies = await asyncio.gather(*(proxy.get("/herd") for _ in range(5)))
    assert origin.count("/herd") == 1
    ids = [r.headers.getall("X-Request-Id") for r in replies]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 5


def test_new_ids_are_a_prefix_and_a_counter() -> None:
    ids = RequestIds("p-")
    assert [ids.new(), ids.new_bytes(), ids.new()] == ["p-1", b"p-2", "p-3"]
    assert RequestIds().prefix != RequestIds().prefix
    assert ids.take({"X-Request-Id": "abc"}, trusted=False) == "p-4"
    assert ids.take({"X-Request-Id": "abc"}, trusted=True) == "abc"


def test_error_log_lines_name_the_worker_and_the_request() -> None:
    record = logging.LogRecord("cachegate.engine", logging.WARNING, __file__, 1, "upstream failed: %s",
                               ("http://10.0.0.5:9000: connection refused",), None)
    token = CURRENT_REQUEST.set(RequestInfo("abc-1"))
    try:
        as_json = json.loads(LineFormatter(lambda: "3", True).format(record))
        text = LineFormatter(lambda: "3", False).format(record)
    finally:
        CURRENT_REQUEST.reset(token)
    assert as_json["request_id"] == "abc-1" and as_json["worker"] == "3"
    assert as_json["level"] == "warning" and as_json["logger"] == "cachegate.engine"
    assert as_json["message"] == "upstream failed: http://10.0.0.5:9000: connection refused"
    assert RFC3339_MS.fullmatch(as_json["time"])
    assert " WARNING cachegate.engine worker=3 request_id=abc-1: upstream failed" in text
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    assert "\n" not in LineFormatter(lambda: "3", False).format(record)
    assert "ValueError: boom" in json.loads(LineFormatter(lambda: "3", True).format(record))["exc"]


def record_for(i: int) -> tuple[Any, ...]:
    return (1.0 + i, 0.0001, f"id-{i}", "127.0.0.1", "GET", "h", f"/{i}", (1, 1), 200, 1, "HIT", 1.0,
            "k", None, None, None)


async def test_records_are_written_in_batches_not_per_request(tmp_path: Path) -> None:
    log_file = tmp_path / "a.log"
    access = AccessLog(AccessLogSettings("json", str(log_file)), "0")
    try:
        for i in range(MAX_BATCH - 1):
            access.add(record_for(i))
        assert log_file.read_bytes() == b""  # nothing written on the request path
        await asyncio.sleep(0)  # the end of this event-loop iteration
        lines = log_file.read_text().splitlines()
        assert [json.loads(line)["path"] for line in lines] == [f"/{i}" for i in range(MAX_BATCH - 1)]
        for i in range(MAX_BATCH):  # a full batch is written at once, within the iteration
            access.add(record_for(i))
        assert len(log_file.read_text().splitlines()) == 2 * MAX_BATCH - 1
    finally:
        access.close()


async def test_writes_to_a_pipe_stay_within_pipe_buf_and_end_at_line_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    monkeypatch.setattr("sys.stdout", os.fdopen(os.dup(write_end), "w"))
    access = AccessLog(AccessLogSettings("json", "stdout"), "0")
    os.close(write_end)
    chunks = []
    try:
        for i in range(200):
            access.add(record_for(i))
        access.flush()
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except BlockingIOError:
                break
            chunks.append(chunk)
    finally:
        access.close()
        import sys

        sys.stdout.close()
        os.close(read_end)
    data = b"".join(chunks)
    assert len(data.splitlines()) == 200
    assert all(json.loads(line) for line in data.splitlines())


# -- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    yield from mounted_tmpfs(tmp_path / "small", "256k")


def fill_but(fs: Path, room: int) -> Path:
    """Fill ``fs`` (a real filesystem: the tmpfs) but ``room`` bytes; the file that fills it."""
    filler = fs / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == 28
    os.truncate(filler, filler.stat().st_size - room)
    return filler


def log_batches(access: AccessLog, start: int, batches: int, size: int = 10) -> None:
    for b in range(batches):
        for i in range(start + b * size, start + (b + 1) * size):
            access._batch.append(record_for(i))
        access.flush()


def access_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cachegate.access"]


def test_a_full_disk_logs_one_error_and_the_cut_line_is_finished_when_space_is_freed(
        small_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    """On a full disk every batch's write failed and logged an error (50,704 lines in 3 s at
    29,000 requests a second); the write that filled the disk wrote half a line, and the next
    line, once space was freed, was glued to it: neither read as JSON. Now: one error line for
    the run, its end with counts, and the cut line finished by the writer that cut it."""
    filler = fill_but(small_fs, 8192)
    log_file = small_fs / "access.log"
    metrics = Metrics()
    access = AccessLog(AccessLogSettings("json", str(log_file)), "0", metrics.access_log_dropped.inc)
    access._failures.settle = 0.0  # (10 s in use)
    try:
        with caplog.at_level(logging.INFO):
            log_batches(access, 0, 10)  # ~2,500 bytes a batch: the fourth or so fills the disk
            assert not log_file.read_bytes().endswith(b"\n")  # the write that filled it cut a line
            log_batches(access, 100, 2000)
            errors = access_errors(caplog)
            assert errors == ["writing the access log (lines dropped meanwhile) failed: "
                              "[Errno 28] No space left on device; retrying"]
            filler.unlink()
            log_batches(access, 100_000, 1)
            errors = access_errors(caplog)
        lines = log_file.read_bytes().splitlines()
        paths = [json.loads(line)["path"] for line in lines]  # every line whole
        assert paths[-10:] == [f"/{i}" for i in range(100_000, 100_010)]
        written = paths[:-10]
        assert written == [f"/{i}" for i in range(len(written))]  # the cut one finished, in its place
        dropped = 10 * 2010 - len(written)
        assert len(errors) == 2 and errors[1] == (
            "writing the access log (lines dropped meanwhile) works again, after "
            f"{2010 - len(written) // 10} failed writes; {dropped} lines dropped")
        assert f"cachegate_access_log_dropped_lines_total {float(dropped)}" in metrics.render().decode()
    finally:
        access.close()


def test_another_writers_cut_line_stays_alone_on_its_line(
        small_fs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers append to one file, each by its own descriptor: a worker that writes first once
    space is freed, and did not see the disk full (it wrote shortly before and not since), ends
    the other's cut line before its own; the one that cut it then leaves it as it is. One line
    does not read, the cut one, and no other is glued to it. The other worker here writes to
    standard output redirected to the file (write-only: the file's end is read another way)."""
    log_file = small_fs / "access.log"
    cutter = AccessLog(AccessLogSettings("json", str(log_file)), "1")
    monkeypatch.setattr("sys.stdout", os.fdopen(os.open(log_file, os.O_WRONLY | os.O_APPEND), "w"))
    other = AccessLog(AccessLogSettings("json", "stdout"), "2")
    try:
        log_batches(other, 50_000, 1)
        filler = fill_but(small_fs, 8192)
        log_batches(cutter, 0, 10)
        assert not log_file.read_bytes().endswith(b"\n")
        filler.unlink()
        time.sleep(0.03)  # longer than CHECK_AFTER since its last write
        log_batches(other, 60_000, 1)
        log_batches(cutter, 70_000, 1)
        lines = log_file.read_bytes().splitlines()
        unread = [i for i, line in enumerate(lines) if not parses(line)]
        assert len(unread) == 1  # the cut line, alone: nothing glued to it
        cut = unread[0]
        assert lines[cut].startswith(b'{"time":') and lines[cut].count(b'{"time":') == 1
        paths = [json.loads(line)["path"] for line in lines[:cut] + lines[cut + 1:]]
        assert paths == [f"/{i}" for i in [*range(50_000, 50_010), *range(cut - 10),
                                           *range(60_000, 60_010), *range(70_000, 70_010)]]
    finally:
        cutter.close()
        other.close()
        sys.stdout.close()


def test_another_workers_write_caught_in_the_middle_is_not_taken_for_a_cut_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle worker looks at the file's end before it writes; another worker's write being
    copied in shows the file ending mid-line for a moment (ext4 grows a file a page at a time),
    and the idle worker put a line end before its own write: a blank line once that write was
    whole (6 in 365,000 lines of a two-worker soak). It looks again a moment later: a write in
    progress has moved on. (The kernel's moment cannot be produced on demand: the other
    worker's write is finished during that wait here.)"""
    log_file = tmp_path / "access.log"
    other_fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    mine = AccessLog(AccessLogSettings("json", str(log_file)), "1")
    line = b'{"time":"2026-12-07T06:00:00.000Z","path":"/other"}\n'
    sleeps: list[float] = []

    def copied_meanwhile(seconds: float) -> None:
        sleeps.append(seconds)
        os.write(other_fd, line[20:])  # the rest of the other worker's line arrives

    try:
        log_batches(mine, 0, 1)
        time.sleep(0.03)  # longer than CHECK_AFTER since its last write: it looks
        os.write(other_fd, line[:20])  # half of the other's line: the file ends mid-line
        monkeypatch.setattr("proxy.logs.time.sleep", copied_meanwhile)
        log_batches(mine, 10, 1)
        lines = log_file.read_bytes().split(b"\n")
        assert lines[-1] == b"" and all(parses(line) for line in lines[:-1]), lines  # no blank line
        assert len(lines) == 22 and sleeps, lines
    finally:
        mine.close()
        os.close(other_fd)


@pytest.fixture
def slow_cpu() -> Iterator[Path]:
    """A cgroup (v1 ``cpu``) holding its processes to 2 % of a CPU: a write they make is paused
    by the scheduler in the middle, as a busy machine pauses one (root on Linux only)."""
    root = Path("/sys/fs/cgroup/cpu")
    if os.geteuid() != 0 or not (root / "cpu.cfs_quota_us").exists():
        pytest.skip("needs root and the cgroup v1 cpu controller at /sys/fs/cgroup/cpu")
    group = root / f"cachegate-test-{os.getpid()}"
    try:
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("2000")
    except OSError as exc:
        pytest.skip(f"cannot make a cpu cgroup here: {exc}")
    try:
        yield group
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            (root / "cgroup.procs").write_text(pid)
        group.rmdir()


def test_another_workers_write_paused_in_the_middle_is_waited_for_not_taken_for_a_cut_line(
        tmp_path: Path, slow_cpu: Path) -> None:
    """A look a moment later still saw another worker's write in progress when the scheduler had
    paused it in the middle (1 blank line in 400,000 under bursts): the idle worker put a line
    end before its own lines, and the other's write then ended with one. Here the other worker
    is a process writing 27 MB in one append, slowed to 2 % of a CPU; each time the idle
    worker writes while that append is paused in the middle (5 times). Without the wait
    for the write in progress, about half of them left a blank line."""
    line, many = b'{"time":"2026-12-07T06:00:00.000Z","path":"/other"}\n', 500_000
    caught = 0
    for attempt in range(30):
        log_file = tmp_path / f"access-{attempt}.log"
        with subprocess.Popen(
                [sys.executable, "-c", "import os, sys\n"
                 f"fd = os.open({str(log_file)!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)\n"
                 f"data = {line!r} * {many}\n"
                 "print(flush=True); sys.stdin.readline(); os.write(fd, data)"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE) as other:
            assert other.stdout is not None and other.stdin is not None
            other.stdout.readline()  # its lines are made (at full speed)
            (slow_cpu / "cgroup.procs").write_text(str(other.pid))
            mine = AccessLog(AccessLogSettings("json", str(log_file)), "1")
            try:
                log_batches(mine, 0, 1)
                written = log_file.stat().st_size
                time.sleep(0.02)  # longer than CHECK_AFTER since its last write: it looks
                other.stdin.write(b"go\n")
                other.stdin.flush()
                full_speed = threading.Timer(0.3, unthrottle, [slow_cpu, other.pid])
                full_speed.start()  # (a round that does not catch it ends soon)
                while not written < paused(log_file) < written + len(line) * many:
                    if other.poll() is not None:  # done before the scheduler paused it
                        break
                else:
                    caught += 1
                    full_speed.cancel()  # a moment after the look instead (which waits for it)
                    full_speed = threading.Timer(0.05, unthrottle, [slow_cpu, other.pid])
                    full_speed.start()
                log_batches(mine, 10, 1)  # while the other's write is paused (when caught)
                assert other.wait(30) == 0
                full_speed.join()
            finally:
                mine.close()
        lines = log_file.read_bytes().split(b"\n")
        assert lines[-1] == b"" and b"" not in lines[:-1], f"attempt {attempt}: a blank line"
        assert len(lines) == 20 + many + 1 and all(map(parses, lines[:10] + lines[-11:-1]))
        if caught == 5:
            break
    assert caught == 5, f"the other's write was seen in progress {caught} times in 30"


def unthrottle(group: Path, pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # (it may have ended)
        (group.parent / "cgroup.procs").write_text(str(pid))


def paused(file: Path) -> int:
    """The file's size when it has not changed for 2 ms (a write to it paused), else -1."""
    size = file.stat().st_size
    time.sleep(0.002)
    return size if file.stat().st_size == size else -1


def parses(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def test_pipe_writes_are_at_most_pipe_buf_and_end_at_line_ends() -> None:
    lines = [f"{i:05d} " + "x" * (i % 300) + "\n" for i in range(500)] + ["y" * 5000 + "\n"]
    pieces = list(pipe_pieces(lines))
    assert b"".join(pieces) == "".join(lines).encode()
    assert all(p.endswith(b"\n") for p in pieces)
    assert all(len(p) <= PIPE_BUF for p in pieces[:-1]) and len(pieces[-1]) == 5001  # a long line alone
    assert len(pieces) < len(lines) / 10  # batched, not a write per line


class _Writes(io.RawIOBase):
    """A raw stream that keeps each write apart, as the descriptor of a pipe sees them."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.writes.append(bytes(b))
        return len(b)


@pytest.mark.parametrize("as_json", [False, True])
def test_the_operators_lines_are_one_write_each_on_an_unbuffered_stream(
        monkeypatch: pytest.MonkeyPatch, as_json: bool) -> None:
    """The supervisor and its workers share one standard output, where a pipe keeps a write
    whole: with ``PYTHONUNBUFFERED=1`` a line and its line end written apart let another
    process's line in between, and two JSON lines became one unreadable line."""
    out, err = _Writes(), _Writes()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, write_through=True))  # what -u makes
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(err, write_through=True))
    setup_logging(as_json=as_json)
    try:
        say("worker 1 started", pid=1)
        tell("cachegate: something to know")
    finally:
        setup_logging(as_json=False)
    assert len(out.writes) == 1 and out.writes[0].endswith(b"\n") and b"worker 1 started" in out.writes[0]
    assert err.writes == [b"cachegate: something to know\n"]


# A worker of its own: the real AccessLog on standard output, a third of its lines made long by
# the client's path (7,000 quotes: 14 KB of JSON, 28 KB of combined) and, in combined, by a
# Referer and a User-Agent, written in batches as a worker does; or (``long`` "others") in JSON
# by what the client did not choose: a 6 KB cache_status (as the origin's member made it) and
# a 3 KB upstream, with a short path.
WRITER = r"""
import asyncio, sys
from proxy.logs import AccessLog
from proxy.settings import AccessLogSettings

async def main(worker, fmt, what):
    access = AccessLog(AccessLogSettings(fmt, "stdout"), worker)
    for i in range(150):
        long = i % 3 == 0
        client = long and what == "client"
        others = long and what == "others"
        headers = {"Referer": "r" * 8000, "User-Agent": "u\x01" * 3000} if client else {"User-Agent": "probe"}
        cs = 'cachegate; fwd=uri-miss; detail="' + "x" * 6000 + '"' if others else "cachegate; fwd=uri-miss"
        access.add((1.0, 0.001, f"{worker}-{i}", "127.0.0.1", "GET", "example.com",
                    f"/{worker}/{i}/" + ('"' * 7000 if client else ""), (1, 1), 200, 100, "MISS",
                    cs, None, "http://" + "u" * 3000 if others else None, 0.001 if others else None,
                    headers if fmt == "combined" else None))
        if i % 10 == 9:
            await asyncio.sleep(0)  # the end of an event-loop iteration: a batch is written
    access.close()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
"""
COMBINED_LINE = re.compile(
    r'127\.0\.0\.1 - - \[[^]]+\] "GET /(\d)/(\d+)/((?:\\x22)*)(\\xE2\\x80\\xA6)? HTTP/1\.1" 200 100 '
    r'"(-|r+(?:\\xE2\\x80\\xA6)?)" "(probe|[u\\x01]+(?:\\xE2\\x80\\xA6)?)" cache=MISS duration_us=1000 '
    r"request_id=(\d)-(\d+)")


def whole_line(fmt: str, line: str) -> tuple[int, int, bool] | None:
    """(worker, request, whether its path was cut) of a line the writer wrote whole, else None."""
    if fmt == "json":
        try:
            record = json.loads(line)
        except ValueError:
            return None
        worker, i = map(int, record["request_id"].split("-"))
        if not (record["path"].startswith(f"/{worker}/{i}/") and record["host"] == "example.com"):
            return None
        return worker, i, any(isinstance(v, str) and v.endswith(CUT_MARK) for v in record.values())
    found = COMBINED_LINE.fullmatch(line)
    if found is None or (found[1], found[2]) != (found[7], found[8]):
        return None
    return int(found[1]), int(found[2]), bool(found[4])


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "what"), [("json", "client"), ("combined", "client"), ("json", "others")])
def test_two_workers_on_one_pipe_write_whole_lines_whatever_the_values(fmt: str, what: str) -> None:
    """Two processes share a pipe as two workers share standard output, and the reader is slow
    (a log shipper): a line over PIPE_BUF was written in a write of its own, which Linux splits
    when the pipe is full, and the other worker's lines came out inside it (792 broken lines
    of 3,608). Every line is whole now: the long values are cut, and say so; the client's,
    and what it did not choose (an origin's 6 KB Cache-Status broke 4 to 60 lines of 300)."""
    read_end, write_end = os.pipe()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(w), fmt, what], stdout=write_end)
               for w in (1, 2)]
    os.close(write_end)
    chunks = []
    try:
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
            time.sleep(0.001)  # a slow reader: the pipe is full, and the writers wait
    finally:
        os.close(read_end)
        for writer in writers:
            assert writer.wait(30) == 0
    lines = b"".join(chunks).decode("ascii").splitlines()
    found = [whole_line(fmt, line) for line in lines]
    broken = [line for line, f in zip(lines, found, strict=True) if f is None]
    assert not broken, f"{len(broken)} of {len(lines)} lines broken, as {broken[0][:200]!r}"
    assert sorted((w, i) for w, i, _ in filter(None, found)) == [(w, i) for w in (1, 2) for i in range(150)]
    assert all(cut == (i % 3 == 0) for _, i, cut in filter(None, found))  # the long ones, and only those
    assert max(map(len, lines)) < PIPE_BUF


def test_a_long_line_is_cut_to_pipe_buf_evenly_and_a_file_keeps_it_whole(tmp_path: Path) -> None:
    def record(path: str, host: str, headers: dict[str, str] | None) -> tuple[Any, ...]:
        return (1.0, 0.001, "id-1", "127.0.0.1", "GET", host, path, (1, 1), 200, 1, "MISS", "cachegate; fwd=uri-miss",
                "k", None, None, headers)

    read_end, write_end = os.pipe()
    try:
        for fmt in ("json", "combined"):
            access = AccessLog(AccessLogSettings(fmt, str(tmp_path / f"{fmt}.log")), "0")
            access._fd, access._pipe = write_end, True  # (a pipe's: what stdout would be)
            access._clock.anchor()
            headers = {"Referer": "http://r/" + "é" * 3000, "User-Agent": "short"} if fmt == "combined" else None
            for path, host in (("/p/" + "\x01\\" * 4000, "example.com"), ("/p/" + "a" * 5000, "h" * 5000),
                               ("/p/" + "😀" * 2000, "example.com")):
                line = access._fit(record(path, host, headers))
                assert line.isascii() and PIPE_BUF - 16 < len(line) <= PIPE_BUF  # the room is used
                if fmt == "json":
                    fields = json.loads(line)
                    assert fields["path"].endswith(CUT_MARK) and path.startswith(fields["path"][:-1])
                    assert fields["host"] == host or (len(fields["host"]) > 1500 and fields["host"].endswith(CUT_MARK))
                else:
                    assert line.count("\\xE2\\x80\\xA6") == 2 and '"short"' in line  # path, Referer
    finally:
        os.close(read_end)
        os.close(write_end)
    long = record("/p/" + '"' * 7000, "example.com", None)
    access = AccessLog(AccessLogSettings("json", str(tmp_path / "file.log")), "0")
    access._batch.append(long)
    access.close()
    (written,) = (tmp_path / "file.log").read_text().splitlines()
    assert json.loads(written)["path"] == long[6]  # a file: whole, nothing cut


def test_a_line_fits_pipe_buf_whatever_its_values_the_clients_cut_first(tmp_path: Path) -> None:
    """Only the client's values were cut, the rest of a line assumed a few hundred bytes: a
    long cache_status (an origin's member, a rule's name in its detail) or upstream made lines
    of any length on a pipe. They are cut too now, after the client's."""
    def record(host: str, path: str, cs: str, upstream: str | None) -> tuple[Any, ...]:
        return (1.0, 0.001, "id-1", "127.0.0.1", "GET", host, path, (1, 1), 200, 1, "MISS", cs, "k",
                upstream, 0.001 if upstream else None, None)

    access = AccessLog(AccessLogSettings("json", str(tmp_path / "a.log")), "0")
    try:
        access._clock.anchor()
        cs = 'cachegate; fwd=uri-miss; detail="' + '"' * 6000 + '"'
        line = access._fit(record("example.com", "/p", cs, "http://origin"))  # only cache_status is long
        fields = json.loads(line)
        assert line.isascii() and PIPE_BUF - 16 < len(line) <= PIPE_BUF
        assert (fields["host"], fields["path"], fields["upstream"]) == ("example.com", "/p", "http://origin")
        assert fields["cache_status"].endswith(CUT_MARK) and cs.startswith(fields["cache_status"][:-1])
        # A long Cache-Status and a long path: the path is cut first, the Cache-Status kept whole
        # while the room allows.
        short_cs = 'cachegate; fwd=uri-miss; detail="' + "x" * 3000 + '"'
        fields = json.loads(access._fit(record("example.com", "/" + "p" * 5000, short_cs, None)))
        assert fields["cache_status"] == short_cs and fields["path"].endswith(CUT_MARK)
        # Everything long: every value shares the room (a short one keeps all of it).
        long = {"host": "h" * 5000, "path": "/" + '"' * 5000, "cache_status": cs, "upstream": "http://" + "u" * 5000}
        for host in (long["host"], "example.com"):
            line = access._fit(record(host, long["path"], cs, long["upstream"]))
            fields = json.loads(line)
            assert line.isascii() and PIPE_BUF - 16 < len(line) <= PIPE_BUF
            assert fields["host"] == host or host == long["host"]  # a short host whole
            for name in ("path", "cache_status", "upstream", "host")[:3 if host != long["host"] else 4]:
                assert fields[name].endswith(CUT_MARK) and long[name].startswith(fields[name][:-1])
                assert len(_json_str(fields[name])) > 500  # the room shared out
        # A fast-path hit (its ttl in place of a cache_status) and a refused request fit too.
        fast = (*record("h" * 5000, "/" + "p" * 5000, cs, None)[:11], 59.2, *record("", "", "", None)[12:])
        for r in (fast, (*fast[:4], None, *fast[5:11], cs, *fast[12:])):
            line = access._fit(r)
            assert line.isascii() and len(line) <= PIPE_BUF and json.loads(line)["path"].endswith(CUT_MARK)
    finally:
        access.close()


def test_kept_line_ends_are_bounded_in_bytes_not_only_in_number(tmp_path: Path) -> None:
    """6,000 distinct 8,000-character URLs (no-store: nothing cached) kept 4,096 line ends of
    16 KB and their paths and keys: +130 MB in the worker, never given back."""
    access = AccessLog(AccessLogSettings("json", str(tmp_path / "a.log")), "0")
    try:
        for i in range(600):
            path = f"/n/{i:06d}/" + '"' * 8000
            access._batch.append((1.0, 0.001, f"id-{i}", "127.0.0.1", "GET", "example.com", path, (1, 1), 200, 1,
                                  "MISS", "cachegate; fwd=uri-miss", "http://example.com" + path, None, None, None))
            access._batch.append((1.0, 0.001, f"id-{i}", "127.0.0.1", "GET", "example.com", f"/s/{i}", (1, 1),
                                  200, 1, "HIT", 1.0, f"http://example.com/s/{i}", None, None, None))
        access.flush()
        held = sum(len(tail) + sum(len(v) for v in fixed if isinstance(v, str)) for fixed, tail in access._tails.items())
        assert held <= MAX_TAILS * TAIL_KEPT // 8  # 600 short URLs' ends: a few hundred characters each
        assert len(access._tails) == 600  # the short ones are kept, as before
        assert len((tmp_path / "a.log").read_text().splitlines()) == 1200
    finally:
        access.close()


async def test_sighup_reopens_the_access_log_after_logrotate(
    tmp_path: Path, origin: Origin, make_proxy: MakeProxy
) -> None:
    log_file = tmp_path / "access.log"
    origin.route("/a", body=b"a")
    proxy = await make_proxy(config=f"access_log: {{path: {log_file}}}\n")
    await proxy.get("/a")
    assert proxy.runtime.access_log is not None
    proxy.runtime.access_log.flush()
    log_file.rename(tmp_path / "access.log.1")  # what logrotate does, then it sends SIGHUP
    proxy.runtime.reconfigure(proxy.runtime.settings)
    await proxy.get("/a")
    proxy.runtime.access_log.flush()
    assert len((tmp_path / "access.log.1").read_text().splitlines()) == 1
    assert len(log_file.read_text().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_standard_files_opened_without_append_survive_copytruncate(tmp_path: Path, workers: str) -> None:
    """Standard output and error redirected with a shell's ``>`` (or systemd's
    ``StandardOutput=file:``): not opened for appending, and logrotate's ``copytruncate`` emptied
    the file under processes that went on writing where they were: the new file began with
    NUL bytes up to the old size (2.6 MB of them after a rotation under load). Each process
    makes them appending: the next line is the file's first."""
    # (no origin: its 502s are logged as well, and this test's loop does not run one)
    config = write_config(str(tmp_path), "http://127.0.0.1:9", "access_log: {format: json, path: stdout}\n")
    out_path, err_path = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with open(out_path, "w") as out, open(err_path, "w") as err, subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", config, "--workers", workers],
            stdout=out, stderr=err) as proc:
        try:
            deadline = time.monotonic() + 30
            while (url := re.search(r'proxy listening on ([^\s"]+)', out_path.read_text())) is None \
                    or "admin listening on" not in out_path.read_text():  # (its announcements)
                assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
                time.sleep(0.05)
            while len(children(proc.pid)) < int(workers) - 1:  # (one worker: the process itself)
                assert time.monotonic() < deadline
                time.sleep(0.05)
            for pid in [proc.pid, *children(proc.pid)]:
                for fd in ("1", "2"):
                    flags = int(re.findall(r"flags:\s+(\d+)", Path(f"/proc/{pid}/fdinfo/{fd}").read_text())[0], 8)
                    assert flags & os.O_APPEND, (pid, fd)
            get(url[1] + "/a")
            while not out_path.read_bytes():
                time.sleep(0.05)
            os.truncate(out_path, 0)
            os.truncate(err_path, 0)  # what copytruncate does after its copy
            proc.send_signal(signal.SIGHUP)  # a line on standard error
            get(url[1] + "/a")  # a line on standard output
            while b"config reloaded" not in err_path.read_bytes() or b'"/a"' not in out_path.read_bytes():
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            proc.terminate()
            proc.wait(20)
    for path in (out_path, err_path):
        data = path.read_bytes()
        assert data and b"\0" not in data, (path.name, data[:80])


def get(url: str) -> None:
    subprocess.run(["curl", "-s", "-o", "/dev/null", url], check=True, timeout=20)


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (its workers)."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
async def test_a_502s_detail_is_in_the_error_log_with_its_request_id(tmp_path: Path, ports: Ports) -> None:
    """A real `cachegate run` with JSON logs: the client's 502 names no address; the error log
    line about it does, with the same request id and the worker."""
    import aiohttp

    from tests.harness import spawn_cachegate

    down = ports.url()
    config = write_config(str(tmp_path), down, "access_log: true\n")
    proc = await asyncio.to_thread(spawn_cachegate, ["run", "--config", config, "--log-level", "warning"])
    try:
        async with aiohttp.ClientSession() as session, session.get(proc.proxy_url + "/x") as r:
            assert r.status == 502
            rid = r.headers["X-Request-Id"]
            assert down.split(":")[-1] not in await r.text()
        for _ in range(100):
            if any(rid in line and '"level": "warning"' in line for line in proc.output):
                break
            await asyncio.sleep(0.05)
    finally:
        assert await asyncio.to_thread(proc.stop) == 0
    errors = [json.loads(line) for line in proc.output if '"level": "warning"' in line]
    about = [e for e in errors if e["request_id"] == rid]
    assert about, proc.text
    assert down in about[0]["message"] and about[0]["worker"] == "0"
    access = [json.loads(line) for line in proc.output if '"path":"/x"' in line]
    assert access and access[0]["request_id"] == rid and access[0]["status"] == 502


def test_access_log_paths_are_relative_to_the_config_and_their_directory_must_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.cli import main
    from proxy.config import load_config

    config = tmp_path / "c.yaml"
    config.write_text("upstreams: [http://127.0.0.1:9]\naccess_log: {format: combined, path: access.log}\n")
    settings = load_config(str(config))
    assert settings.access_log == AccessLogSettings("combined", str(tmp_path / "access.log"))
    config.write_text("upstreams: [http://127.0.0.1:9]\naccess_log:\n  path: nowhere/access.log\n")
    assert main(["check", "--config", str(config)]) == 2
    assert f"{config}:3: access_log.path: directory {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    config.write_text("upstreams: [http://127.0.0.1:9]\naccess_log: {format: xml}\n")
    assert main(["check", "--config", str(config)]) == 2
    assert "access_log.format: must be one of json, combined" in capsys.readouterr().err


async def test_a_reload_can_switch_the_access_log_format(
    tmp_path: Path, origin: Origin, make_proxy: MakeProxy
) -> None:
    from proxy.config import Overrides
    from proxy.web.server import install_reloader

    origin.route("/a", body=b"a")
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{format: json, path: {log_file}}}\n")
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    await proxy.get("/a")
    text = await asyncio.to_thread(Path(proxy.config_path).read_text)
    await asyncio.to_thread(Path(proxy.config_path).write_text, text.replace("format: json", "format: combined"))
    assert (await proxy.admin("POST", "/reload")).status == 200
    await proxy.get("/a")
    assert proxy.runtime.access_log is not None
    proxy.runtime.access_log.flush()
    first, second = log_file.read_text().splitlines()
    assert first.startswith("{") and second.startswith("127.0.0.1 - - [")


def test_upstream_request_sends_the_request_id_in_place_of_the_heads() -> None:
    from multidict import CIMultiDict

    from proxy.policy.keys import KeySpec
    from proxy.policy.messages import RequestHead
    from proxy.policy.request import Forwarder, upstream_request

    head = RequestHead("GET", "http", "a.example", "/x", CIMultiDict({"Host": "a.example",
                       "X-Request-Id": "from-the-client"}))
    for fill in (None, KeySpec()):
        sent = upstream_request(head, "10.0.0.9", Forwarder(), fill=fill, request_id="ours-1").headers
        assert [v for k, v in sent if k.lower() == "x-request-id"] == ["ours-1"]
    assert not [v for k, v in upstream_request(head, "10.0.0.9", Forwarder()).headers
                if k.lower() == "x-request-id"]  # no id given (an embedding caller): none sent


def test_combined_fields_are_escaped_byte_by_byte_and_their_width_known() -> None:
    assert _quoted('a "q" \\ \x01\x7f é\udcff😀 ~') == (
        '"a \\x22q\\x22 \\x5C \\x01\\x7F \\xC3\\xA9\\xFF\\xF0\\x9F\\x98\\x80 ~"')
    assert _quoted("") == _quoted(None) == '"-"' and _quoted("/plain?q=1") == '"/plain?q=1"'
    for value in ('"' * 100, "é" * 7, "\x00\x1f\x20\x7e\x7f", "mixed \"é\" \\ \udcfe 😀"):
        assert _quoted_width(value) == len(_quoted(value)) - 2  # what _fit cuts by


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc, where no file can be created")
async def test_an_access_log_that_cannot_be_created_is_refused_and_the_running_log_kept(
    tmp_path: Path, origin: Origin, make_proxy: MakeProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    """access_log.path in a directory where the file cannot be created (/proc here; a
    read-only directory in production) passed check and reload; then every process logged
    "cannot open the access log ...; logging no requests" and dropped the log that worked.
    Now it is FILE:LINE at check and reload, and the running log goes on."""
    from proxy.cli import main
    from proxy.web.server import install_reloader

    origin.route("/page", body=b"hello", headers={"Cache-Control": "max-age=60"})
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{format: json, path: {log_file}}}\n")
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    config = Path(proxy.config_path)
    text = config.read_text()  # noqa: ASYNC240 (a small local file)
    config.write_text(text.replace(str(log_file), "/proc/cachegate-access.log"))  # noqa: ASYNC240
    line = text.splitlines().index(f"access_log: {{format: json, path: {log_file}}}") + 1
    expected = f"{config}:{line}: access_log.path: cannot create /proc/cachegate-access.log"
    assert await asyncio.to_thread(main, ["check", "--config", str(config)]) == 2
    # (``in``, not ``startswith``: check runs here beside the test's own proxy, whose threads may
    # log while check sets logging up for itself, as no check run of its own process would.)
    assert expected in capsys.readouterr().err
    reply = await proxy.admin("POST", "/reload")
    assert reply.status != 200 and expected in reply.body.decode()
    await proxy.get("/page")
    assert [r["path"] for r in records(proxy, log_file)] == ["/page"]
    # A file that goes between the check and the opening (the check passed): the running log goes on.
    from dataclasses import replace

    settings = proxy.runtime.settings
    assert settings.access_log is not None
    proxy.runtime.reconfigure(replace(settings, access_log=replace(
        settings.access_log, path="/proc/cachegate-access.log", format="combined")))
    await proxy.get("/page")
    assert [r["path"] for r in records(proxy, log_file)] == ["/page", "/page"]


async def read_reply(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    data = await reader.read(65536)
    writer.close()
    return data


async def test_a_parser_refusal_logs_the_cache_status_it_sent(tmp_path: Path, make_proxy: MakeProxy) -> None:
    """docs/logs.md: ``cache_status`` is cachegate's member of the Cache-Status sent. A request
    the parser refused (400, 431, 501) was answered ``cachegate; detail=PROXY-ERROR`` and logged
    ``null``."""
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{path: {log_file}}}\n")
    port = proxy.listeners.proxy_addresses[0][1]
    sent = []
    for raw in (b"GET /x HTTP/1.1\r\nHost: h\r\nContent-Length: nope\r\n\r\n",
                b"GET /x HTTP/1.1\r\nHost: h\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",
                b"BREW /x HTTP/1.1\r\nHost: h\r\n\r\n"):
        head = (await read_reply(port, raw)).split(b"\r\n\r\n")[0].decode("latin-1")
        status = int(head.split()[1])
        (member,) = re.findall(r"(?im)^cache-status: ([^\r\n]*)", head)
        sent.append((status, member))
    assert [s for s, _ in sent] == [400, 431, 501]
    logged = records(proxy, log_file)
    assert [(r["status"], r["cache_status"]) for r in logged] == sent
    assert all(m == "cachegate; detail=PROXY-ERROR" for _, m in sent)


async def test_bytes_that_are_not_utf8_are_valid_unicode_in_a_json_line(tmp_path: Path, make_proxy: MakeProxy) -> None:
    """A Host of bytes that are not UTF-8 was written as lone surrogates (``"\\udcff\\udcfe..."``):
    not Unicode (RFC 8259 §8.2), refused by strict JSON readers. Each such byte is U+FFFD."""
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{path: {log_file}}}\n")
    port = proxy.listeners.proxy_addresses[0][1]
    await read_reply(port, b"GET /x HTTP/1.1\r\nHost: \xff\xfeexample.com\r\nConnection: close\r\n\r\n")
    assert proxy.runtime.access_log is not None
    proxy.runtime.access_log.flush()
    data = log_file.read_bytes()
    assert b"\\ud" not in data.lower(), data  # no surrogate escapes
    (record,) = [json.loads(line) for line in data.decode("utf-8").splitlines()]
    assert record["host"] == "\ufffd\ufffdexample.com"
    record["host"].encode("utf-8")  # strict: no lone surrogate
