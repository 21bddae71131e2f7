"""The client listener's limits on connections: ``send_timeout``, ``max_connections`` and
``max_unsent``.

A client that asks for a large hit and never reads it held what its reply had left to send in
the worker's memory for as long as it kept the connection open (3,000 such connections for a
900 KB hit: +520 MB per worker), on the fast path and the general one alike; and nothing
capped how many connections a worker kept, so connections that only wait for their client
(idle, a head unfinished, a reply unread) ran it out of file descriptors. Now a reply unsent
for ``send_timeout`` seconds has its connection aborted, and one more connection than
``max_connections`` closes the oldest that only waits for its client, else itself. A reply its
client reads, however slowly, is neither timed out nor closed by the cap; one timed out is reset.
Until send_timeout, each such connection still held its reply (about 1 MB for a memory hit):
past ``max_unsent`` per worker, those whose client has read nothing for a second are reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import resource
import socket
import ssl
import threading
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from proxy.config import Overrides, load_config
from proxy.room import OTHER_FILES, SHARD_FILES
from proxy.web.fastpath import ProxyServer, connection_cap
from proxy.web.server import OpenFilesWatch, install_reloader
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy, self_signed

BIG = bytes(range(256)) * (12 * 1024)  # 3 MB: more than the sockets' buffers take


def client_server(proxy: Proxy, listener: int = 0) -> ProxyServer:
    """The server of the client listener ``listener`` (in the order of ``listen``)."""
    servers = [r.server for r in proxy.listeners.runners if isinstance(r.server, ProxyServer)]
    assert len(servers) > listener, "no such client listener"
    return servers[listener]


def client_connections(proxy: Proxy, listener: int = 0) -> int:
    """Connections the client listener holds (gone from the list once their handler ended)."""
    return len(client_server(proxy, listener)._connections)


async def closed_count(proxy: Proxy, reason: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/metrics") as r:
        text = await r.text()
    name = f'cachegate_client_connections_closed_total{{reason="{reason}"}} '
    found = re.search(re.escape(name) + r"([\d.]+)", text)
    return float(found.group(1)) if found else -1.0


def unread(proxy: Proxy, path: str, fields: str = "", mss: int = 0, listener: int = 0) -> socket.socket:
    """A connection asking for ``path`` (with ``fields``, CRLF-ended) whose client reads nothing
    (a tiny receive buffer). ``mss``: the segment size it announces, as over a real network
    (``WAN_MSS``): on loopback the kernel's send queue otherwise takes a 1 MB reply whole."""
    host, port = proxy.listeners.proxy_addresses[listener]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    if mss:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    sock.connect((host, port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: a.test\r\n{fields}\r\n".encode())
    return sock


async def until(check: object, seconds: float) -> bool:
    for _ in range(int(seconds * 50)):
        if check():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.02)
    return False


@pytest.mark.parametrize("where", ["memory", "disk"])
async def test_a_large_hit_the_client_never_reads_is_aborted_after_send_timeout(
        make_proxy: MakeProxy, origin: Origin, where: str) -> None:
    # From memory: the fast path (the body in memory, one transport write); from disk, too big
    # for the fast path's sendfile: aiohttp's handler streaming the file.
    memory = "cache: {memory: 64MB, memory_max_object: 4MB}\n" if where == "memory" else ""
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0'}}\nsend_timeout: 1s\n{memory}")
    origin.route("/big", body=BIG, headers={"Cache-Control": "max-age=600"})
    assert (await proxy.get("/big")).body == BIG  # stored
    assert (await proxy.get("/big")).headers["X-Cache-Status"] == "HIT"
    before = client_connections(proxy)
    sock = unread(proxy, "/big")
    try:
        assert await until(lambda: client_connections(proxy) > before, 5)
        # Gone (file descriptor, buffer and all) once its writes stayed paused send_timeout long.
        assert await until(lambda: client_connections(proxy) <= before, 10), \
            "a connection whose client reads nothing was kept"
        assert await closed_count(proxy, "send_timeout") == 1
        # A client that reads gets the whole answer, however long it takes to ask.
        assert (await proxy.get("/big")).body == BIG
    finally:
        sock.close()


async def test_max_connections_closes_the_oldest_idle_one_to_admit_a_new_one(make_proxy: MakeProxy,
                                                                             origin: Origin) -> None:
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0'}\nmax_connections: 4\n")
    origin.route("/small", body=b"ok", headers={"Cache-Control": "max-age=600"})
    host, port = proxy.listeners.proxy_addresses[0]
    idle = [await asyncio.open_connection(host, port) for _ in range(4)]
    idle[1][1].write(b"GET /small HTTP/1.1\r\nHost: a")  # a head never finished is idle too
    assert await until(lambda: client_connections(proxy) == 4, 5)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /small HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 200 ")
    writer.close()
    assert await asyncio.wait_for(idle[0][0].read(), 5) == b""  # the oldest, closed for it
    idle[0][1].close()
    for r, w in idle[1:]:
        assert not r.at_eof()
        w.close()
    assert await closed_count(proxy, "cap_oldest") == 1


async def test_max_connections_refuses_a_new_one_when_every_other_is_busy(make_proxy: MakeProxy,
                                                                          origin: Origin) -> None:
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0'}\nmax_connections: 3\n")
    origin.route("/slow", body=b"slow", delay=2.0)
    host, port = proxy.listeners.proxy_addresses[0]
    busy = [await asyncio.open_connection(host, port) for _ in range(3)]
    for i, (_, w) in enumerate(busy):  # whole requests being answered, to clients that read
        w.write(f"GET /slow?{i} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n".encode())
    assert await until(lambda: origin.count("/slow") == 3, 5)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /slow?new HTTP/1.1\r\nHost: a.test\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    for r, w in busy:  # their answers are whole
        assert (await asyncio.wait_for(r.read(), 10)).startswith(b"HTTP/1.1 200 ")
        w.close()
    assert await closed_count(proxy, "cap_refused") == 1


async def test_the_open_files_limit_reached_is_logged_once_and_its_end_too(
        caplog: pytest.LogCaptureFixture) -> None:
    # At the limit, uvloop's accept closes each new connection unanswered and says nothing: the
    # listener's watch says it (a real limit, lowered for the test and filled up).
    watch = OpenFilesWatch(asyncio.get_running_loop(), every=3600)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    try:
        with caplog.at_level(logging.WARNING, logger="cachegate.server"):
            assert watch.check()
            highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, hard))
            with contextlib.suppress(OSError):
                for _ in range(100_000):
                    held.append(os.open(os.devnull, os.O_RDONLY))
            assert not watch.check() and not watch.check()
            for fd in held:
                os.close(fd)
            held.clear()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert watch.check()
        lines = [r.getMessage() for r in caplog.records if "open-files limit" in r.getMessage()]
        assert len(lines) == 2, lines
        assert "Too many open files" in lines[0] and "works again" in lines[1]
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        watch.close()


@pytest.mark.parametrize(("config", "nofile", "cap"), [
    ("", 65536, 10_000),  # the default, well below the limit
    # What the store keeps open (8 shards x SHARD_FILES, and OTHER_FILES) is always taken off;
    # the pools (2 x 256) at most, never below a quarter of what the store leaves.
    ("", 1024, (1024 - 8 * SHARD_FILES - OTHER_FILES) // 4),
    ("", 4096, 4096 - 8 * SHARD_FILES - OTHER_FILES - 2 * 256),
    ("max_connections: 50\n", 1024, 50),  # as set
])
def test_the_default_cap_stays_below_the_open_files_limit(tmp_path: Path, config: str, nofile: int,
                                                          cap: int) -> None:
    path = tmp_path / "cachegate.yaml"
    path.write_text("upstreams: [{url: 'http://127.0.0.1:1'}, {url: 'http://127.0.0.1:2'}]\n"
                    f"cache: {{disk: {{path: '{tmp_path}/cache'}}}}\n{config}")
    assert connection_cap(load_config(str(path)), nofile) == cap


def _open_files_soft(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no open-files limit for {pid}")


def _raised_start(config: str) -> tuple[int, list[int], int, str]:
    from tests.harness import spawn_cachegate

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    proc = spawn_cachegate(["run", "--config", config, "--workers", "2", "--log-level", "info"],
                           preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)))
    try:
        pid = proc.proc.pid
        workers = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        return _open_files_soft(pid), [_open_files_soft(w) for w in workers], hard, proc.text
    finally:
        proc.stop()


async def test_a_start_raises_the_soft_open_files_limit_to_the_hard_one(origin: Origin, tmp_path: Path) -> None:
    # The soft limit is 1,024 in a shell and under systemd's own default (1024:524288): the
    # connection cap's default stayed below it, 256 client connections a worker where the hard
    # limit allowed 10,000. The supervisor raises it before its workers start; they inherit it.
    from tests.harness import write_config

    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] <= 1024:
        pytest.skip("the hard open-files limit here is 1,024 or less: nothing to raise to")
    config = write_config(str(tmp_path), origin.url)
    supervisor, workers, hard, text = await asyncio.to_thread(_raised_start, config)
    wanted = min(hard, 1 << 20)
    assert supervisor == wanted, text[-2000:]
    assert workers and all(w == wanted for w in workers), (workers, text[-2000:])
    assert f"open-files limit raised from 1024 to {wanted}" in text, text[-2000:]


def slow_read(host: str, port: int, path: str, chunk: int, every: float, stop_after: int = 0,
              stop_for: float = 0.0, hurry: threading.Event | None = None, mss: int = 0, tls: bool = False
              ) -> tuple[int, int, str]:
    """A client that reads ``chunk`` bytes of the answer to ``path`` every ``every`` seconds
    (once it has ``stop_after`` bytes, if set, reads nothing for ``stop_for`` seconds, then all
    it can; once ``hurry`` is set, all it can; ``mss`` as ``unread``'s; ``tls``: over TLS): the
    length announced, the body bytes it got, and how it ended: ``whole``, ``eof`` or ``reset``."""
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.socket())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        if mss:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        sock.connect((host, port))
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            sock = stack.enter_context(ctx.wrap_socket(sock))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n".encode())
        got, length, head = b"", -1, 0
        while True:
            if hurry is not None and hurry.is_set():
                every = 0.0
            time.sleep(every)
            try:
                data = sock.recv(chunk)
            except ConnectionResetError:
                return length, len(got) - head, "reset"
            if not data:
                return length, len(got) - head, "eof"
            got += data
            if length < 0 and b"\r\n\r\n" in got:
                head = got.index(b"\r\n\r\n") + 4
                found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", got[:head])
                assert found, got[:head]
                length = int(found.group(1))
            if length >= 0 and len(got) - head >= length:
                return length, len(got) - head, "whole"
            if stop_after and len(got) >= stop_after:
                stop_after, every = 0, 0.0
                time.sleep(stop_for)  # its window full, nothing moves


LARGE = bytes(range(256)) * (24 * 1024)  # 6 MB


async def test_a_client_that_reads_slowly_keeps_its_connection_past_send_timeout(
        make_proxy: MakeProxy, origin: Origin) -> None:
    # send_timeout bounds the time between two steps of progress, not the whole reply: the
    # kernel tells the writer to go on only once a third of its large send buffer is free,
    # seconds apart under a slow reader (here at most 640 KB/s: up to 4 MB sent, a third of it
    # is 2 s), and the reply was aborted at send_timeout. The first 3 MB are read slowly (at
    # least 4.8 s: the writer waited over a second for the kernel at least once), the rest at
    # once.
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0'}\nsend_timeout: 1s\n")
    origin.route("/large", body=LARGE, headers={"Cache-Control": "max-age=600"})
    assert (await proxy.get("/large")).body == LARGE
    host, port = proxy.listeners.proxy_addresses[0]
    length, got, how = await asyncio.to_thread(slow_read, host, port, "/large", 32768, 0.05, 3 << 20)
    assert (length, got, how) == (len(LARGE), len(LARGE), "whole")
    assert await closed_count(proxy, "send_timeout") <= 0
    # One that stops reading is reset a send_timeout later: it sees a reset, never an end that
    # looks like the end of a shorter body, and the kernel keeps none of what was unsent.
    length, got, how = await asyncio.to_thread(slow_read, host, port, "/large", 32768, 0.05, 1 << 20, 4.0)
    assert how == "reset" and got < length
    assert await closed_count(proxy, "send_timeout") == 1


async def test_max_connections_never_closes_a_reply_its_client_is_reading(make_proxy: MakeProxy,
                                                                          origin: Origin) -> None:
    # A reply to a client reading it slowly has its writes paused most of the time: it looked
    # like one waiting for its client, and a flood of idle connections closed it first (the
    # oldest), its client seeing its body cut short. Idle ones make room; a reply read, never.
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0'}\nmax_connections: 6\n")
    origin.route("/large", body=LARGE, headers={"Cache-Control": "max-age=600"})
    assert (await proxy.get("/large")).body == LARGE
    host, port = proxy.listeners.proxy_addresses[0]
    hurry = threading.Event()  # the flood is over: the rest of the reply is read at once
    reading = asyncio.ensure_future(asyncio.to_thread(slow_read, host, port, "/large", 32768, 0.05, hurry=hurry))
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        assert await until(lambda: any(getattr(c, "writing_paused", False) for r in proxy.listeners.runners
                                       if isinstance(r.server, ProxyServer) for c in r.server._connections), 10)
        for _ in range(20):  # idle keep-alive connections past the cap, the last ones kept
            idle.append(await asyncio.open_connection(host, port))
            await asyncio.sleep(0.1)
        assert not reading.done(), reading.result()  # read slowly all through the flood, never cut
        hurry.set()
        assert await reading == (len(LARGE), len(LARGE), "whole")
        assert await closed_count(proxy, "cap_oldest") >= 15
        assert await asyncio.wait_for(idle[0][0].read(), 5) == b""
        assert not idle[-1][0].at_eof()
    finally:
        reading.cancel()
        for _, w in idle:
            w.close()


def held_sockets(port: int) -> int:
    """Connections to ``port`` the process still holds a descriptor for (an orphan, its
    descriptor closed, shows inode 0; the listening socket is left out)."""
    held = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] != "0A" and fields[9] != "0":
                    held += 1
    return held


async def test_a_tls_listener_counts_handshakes_and_frees_what_the_cap_closes(
        make_proxy: MakeProxy, origin: Origin, tmp_path: Path) -> None:
    # The cap counted only handshaken connections (raw ones that never begin a handshake held a
    # descriptor each for client_header_timeout), and one it closed kept its descriptor up to
    # 60 s waiting for the client's close_notify. Now both stay within max_connections.
    key, cert = self_signed(tmp_path, "cap", "a.test", "IP:127.0.0.1")
    proxy = await make_proxy(config=f"listen: {{address: '127.0.0.1:0', tls: {{cert: '{cert}', key: '{key}'}}}}\n"
                                    "admin: {listen: '127.0.0.1:0'}\nmax_connections: 5\n")
    host, port = proxy.listeners.proxy_addresses[0]
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    tls: list[ssl.SSLSocket] = []
    raw: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(20):  # handshaken, then idle, reading nothing (no close_notify back)
            tls.append(await asyncio.to_thread(
                lambda: ctx.wrap_socket(socket.create_connection((host, port)))))
        assert await until(lambda: held_sockets(port) <= 6, 5), held_sockets(port)
        for _ in range(20):  # never a handshake
            raw.append(await asyncio.open_connection(host, port))
        assert await until(lambda: held_sockets(port) <= 6, 5), held_sockets(port)
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx)  # served as ever
        origin.route("/t", body=b"t", headers={"Cache-Control": "max-age=60"})
        writer.write(b"GET /t HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 200 ")
        writer.close()
        assert await closed_count(proxy, "cap_oldest") >= 30
    finally:
        for _, w in raw:
            w.close()
        for sock in tls:
            sock.close()


MID = bytes(range(256)) * 1024  # 256 KB: the kernel's send queue takes it whole, writes never pause


def _tls_client(port: int, rcvbuf: int = 0, mss: int = 0) -> ssl.SSLSocket:
    """A TLS connection to ``port``, its handshake done (``rcvbuf``: a receive buffer that small;
    ``mss``: the segment size it announces, as ``unread``'s)."""
    raw = socket.socket()
    if rcvbuf:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if mss:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    raw.connect(("127.0.0.1", port))
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx.wrap_socket(raw)


def _tls_get(sock: ssl.SSLSocket, path: str, close: bool = False) -> bytes:
    """Ask ``path`` on ``sock`` and read its reply (a one-byte body; or to the end, ``close``)."""
    sock.settimeout(10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: a.test\r\n{'Connection: close' if close else ''}\r\n\r\n"
                 .encode())
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        if not close and b"\r\n\r\n" in data and len(data.partition(b"\r\n\r\n")[2]) >= 1:
            break
    return data


async def test_tls_connections_closed_by_a_timeout_or_still_closing_stay_within_max_connections(
        origin: Origin, tmp_path: Path) -> None:
    # A TLS connection closed by client_header_timeout or keepalive_timeout waited up to
    # send_timeout (60 s) for its silent client's close_notify, no longer counted by the cap:
    # clients that handshake then say nothing (or stay idle after a reply) piled up past
    # max_connections to the open-files limit (cap 50: 539 held, then EMFILE on every accept).
    # Now a timed-out connection with nothing left to send is aborted (nginx: no close_notify
    # on a timed-out connection), and one whose close is still under way (a reply going out
    # behind a head timed out) counts against the cap, which closes it to admit new ones.
    # `cachegate run` (uvloop's TLS, as in production).
    from tests.harness import spawn_cachegate, write_config

    key, cert = self_signed(tmp_path, "cap", "a.test", "IP:127.0.0.1")
    origin.route("/t", body=b"t", headers={"Cache-Control": "max-age=600"})
    origin.route("/mid", body=MID, headers={"Cache-Control": "max-age=600"})
    cap = 10
    config = write_config(str(tmp_path), origin.url,
                          f"listen: {{address: '127.0.0.1:0', tls: {{cert: '{cert}', key: '{key}'}}}}\n"
                          f"max_connections: {cap}\nclient_header_timeout: 1s\nkeepalive_timeout: 1s\n"
                          "send_timeout: 60s\n")
    proc = await asyncio.to_thread(spawn_cachegate, ["run", "--config", config])
    port = int(proc.proxy_url.rsplit(":", 1)[1])
    clients: list[ssl.SSLSocket] = []
    try:
        for _ in range(cap // 2):  # handshaken, then silent: closed by client_header_timeout
            clients.append(await asyncio.to_thread(_tls_client, port))
        for _ in range(cap // 2):  # one reply read, then idle: closed by keepalive_timeout
            clients.append(await asyncio.to_thread(_tls_client, port))
            assert (await asyncio.to_thread(_tls_get, clients[-1], "/t")).startswith(b"HTTP/1.1 200 ")
        # Every one of them closed, its descriptor freed, although no client said close_notify.
        assert await until(lambda: held_sockets(port) == 0, 5), held_sockets(port)

        def behind_a_head(n: int) -> None:  # a reply left unread, a head begun behind it
            for _ in range(n):
                clients.append(_tls_client(port, rcvbuf=4096))
                clients[-1].sendall(b"GET /mid HTTP/1.1\r\nHost: a.test\r\n\r\nGET /t HT")

        for _ in range(3):  # closed by client_header_timeout, gracefully (the reply goes out)
            await asyncio.to_thread(behind_a_head, cap)
            await asyncio.sleep(1.8)
            assert held_sockets(port) <= cap, held_sockets(port)
        served = await asyncio.to_thread(_tls_client, port)  # a new client is served as ever
        assert (await asyncio.to_thread(_tls_get, served, "/t", True)).startswith(b"HTTP/1.1 200 ")
        served.close()
    finally:
        for sock in clients:
            sock.close()
        await asyncio.to_thread(proc.stop)




def fin_wait_1(port: int, clients: list[socket.socket] | None = None) -> int:
    """Sockets of ``port`` in FIN-WAIT-1: closed with bytes still unsent (an orphan, once its
    descriptor is gone, that holds them in the host's TCP memory until the client reads or goes).
    Only those to ``clients``, if given (another's FIN may be in flight for a moment)."""
    peers = None if clients is None else {f"{s.getsockname()[1]:04X}" for s in clients}
    found = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "04" and (
                        peers is None or fields[2].rsplit(":", 1)[1] in peers):
                    found += 1
    return found


def how_it_ends(sock: socket.socket, seconds: float) -> str:
    """Read what is left: ``reset``, ``eof`` (a graceful close, all of it sent) or ``open``."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "open"
    return "eof"


async def test_the_cap_resets_an_unread_reply_that_fits_the_kernel_queue_and_closes_idle_ones_first(
        make_proxy: MakeProxy, origin: Origin) -> None:
    # A reply the kernel's send queue takes whole never pauses the writes: unread, it looked idle
    # (the worker holds nothing of it), so the cap closed it before a truly idle one, gracefully:
    # its FIN waited behind the unsent bytes, an orphan in FIN-WAIT-1 holding them for as long
    # as the client kept its end. Now it has a reply in progress: an idle one goes first, and it
    # is closed only once its client read nothing for a second, with a reset.
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0'}\nmax_connections: 4\n"
                                    "cache: {memory: 64MB, memory_max_object: 4MB}\n")
    origin.route("/mid", body=MID, headers={"Cache-Control": "max-age=600"})
    origin.route("/slow", body=b"slow", delay=3.0)
    assert (await proxy.raw("GET", "/mid", "a.test")).body == MID  # stored (no connection kept)
    host, port = proxy.listeners.proxy_addresses[0]
    before = client_connections(proxy)
    unread_one = unread(proxy, "/mid")
    busy: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        assert await until(lambda: client_connections(proxy) > before, 5)
        await asyncio.sleep(0.3)  # its reply written (to the kernel) and the loop back waiting
        idle = await asyncio.open_connection(host, port)
        for i in range(2):  # whole requests being answered
            busy.append(await asyncio.open_connection(host, port))
            busy[-1][1].write(f"GET /slow?{i} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n".encode())
        assert await until(lambda: origin.count("/slow") == 2, 5)
        busy.append(await asyncio.open_connection(host, port))  # one more: the idle one goes, not the older unread one
        busy[-1][1].write(b"GET /slow?2 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        assert await asyncio.wait_for(idle[0].read(), 5) == b""
        idle[1].close()
        assert await until(lambda: origin.count("/slow") == 3, 5)
        assert fin_wait_1(port) == 0
        await asyncio.sleep(1.2)  # its client read nothing for CAP_STALLED
        late = await asyncio.open_connection(host, port)  # now the unread reply is the one closed
        assert await asyncio.to_thread(how_it_ends, unread_one, 3.0) == "reset"
        assert fin_wait_1(port) == 0, "an unread reply closed gracefully: an orphan holds it"
        assert await closed_count(proxy, "cap_oldest") == 2
        late[1].close()
        for r, w in busy:  # their answers are whole
            assert (await asyncio.wait_for(r.read(), 10)).startswith(b"HTTP/1.1 200 ")
            w.close()
    finally:
        unread_one.close()
        for _, w in busy:
            w.close()


async def test_send_timeout_resets_an_unread_reply_that_fits_the_kernel_queue(make_proxy: MakeProxy,
                                                                              origin: Origin) -> None:
    # The writes never paused, so send_timeout never started: the connection stayed open (and
    # its reply unsent) until the keep-alive timeout, then closed gracefully into an orphan.
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0'}\nsend_timeout: 1s\n"
                                    "cache: {memory: 64MB, memory_max_object: 4MB}\n")
    origin.route("/mid", body=MID, headers={"Cache-Control": "max-age=600"})
    assert (await proxy.raw("GET", "/mid", "a.test")).body == MID
    _, port = proxy.listeners.proxy_addresses[0]
    before = client_connections(proxy)
    sock = unread(proxy, "/mid")
    try:
        assert await until(lambda: client_connections(proxy) > before, 5)
        assert await until(lambda: client_connections(proxy) <= before, 4), \
            "an unread reply in the kernel's queue was kept past send_timeout"
        assert await asyncio.to_thread(how_it_ends, sock, 3.0) == "reset"
        assert fin_wait_1(port) == 0
        assert await closed_count(proxy, "send_timeout") == 1
    finally:
        sock.close()


async def test_a_slow_steady_reader_of_a_reply_in_the_kernel_queue_keeps_its_connection(
        make_proxy: MakeProxy, origin: Origin) -> None:
    # Its reply sits in the kernel's queue, read a couple of KB at a time: it is being answered.
    # Neither send_timeout nor the cap closes it (the cap refuses new connections instead, all
    # others busy), and it asks again on the same connection once its reply ends.
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0'}\nsend_timeout: 1s\nmax_connections: 2\n"
                                    "cache: {memory: 64MB, memory_max_object: 4MB}\n")
    body = MID[:64 * 1024]  # (read over about 3 s)
    origin.route("/m", body=body, headers={"Cache-Control": "max-age=600"})
    origin.route("/slow", body=b"slow", delay=3.5)
    assert (await proxy.raw("GET", "/m", "a.test")).body == body
    host, port = proxy.listeners.proxy_addresses[0]

    def steady() -> tuple[int, bytes]:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, port))
            sock.sendall(b"GET /m HTTP/1.1\r\nHost: a.test\r\n\r\n")
            got = b""
            while b"\r\n\r\n" not in got or len(got) - got.index(b"\r\n\r\n") - 4 < len(body):
                time.sleep(0.1)
                data = sock.recv(2048)
                assert data, "closed before its reply ended"
                got += data
            sock.sendall(b"GET /m HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
            sock.settimeout(5)
            again = b""
            while data := sock.recv(65536):
                again += data
            return len(got) - got.index(b"\r\n\r\n") - 4, again

    reading = asyncio.ensure_future(asyncio.to_thread(steady))
    busy = await asyncio.open_connection(host, port)
    busy[1].write(b"GET /slow HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    try:
        assert await until(lambda: origin.count("/slow") == 1, 5)
        # New connections while it reads: refused, it is not idle (the first a second late: the
        # cap had only just found its reply, which might have stalled).
        for _ in range(6):
            await asyncio.sleep(0.2)
            r, w = await asyncio.open_connection(host, port)
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
        got, again = await reading
        assert got == len(body)
        assert again.startswith(b"HTTP/1.1 200 ") and again.endswith(body)
        assert await closed_count(proxy, "send_timeout") <= 0
        assert await closed_count(proxy, "cap_oldest") <= 0
        assert await closed_count(proxy, "cap_refused") == 6
    finally:
        reading.cancel()
        busy[1].close()


async def test_the_keepalive_timeout_resets_an_idle_connection_whose_reply_is_unread() -> None:
    # At the keep-alive timeout aiohttp closes an idle connection gracefully: with its reply
    # unread in the kernel's queue, an orphan in FIN-WAIT-1 kept it. Now it is reset when its
    # queue did not move over the last sample; a client still reading gets the graceful close,
    # and all of its reply. (A server of the listeners' handlers, with a 1 s keep-alive timeout
    # and no send_timeout: the client listener's keepalive_timeout is 75 s by default.)
    from aiohttp import web

    from proxy.web.headtimeout import CappedServer

    body = MID[:48 * 1024]

    async def answer(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=MID if request.path == "/mid" else body)

    server = CappedServer(answer, head_timeout=lambda: 60.0, max_connections=100, server_header=lambda: "t",
                          keepalive_timeout=1.0)
    listening = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]

    def steady() -> tuple[int, str]:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /m HTTP/1.1\r\nHost: a.test\r\n\r\n")
            got = b""
            try:
                while data := sock.recv(2048):
                    got += data
                    time.sleep(0.1)
            except ConnectionResetError:
                return len(got), "reset"
            return len(got) - got.index(b"\r\n\r\n") - 4, "eof"

    sock = socket.socket()
    try:
        reading = asyncio.ensure_future(asyncio.to_thread(steady))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /mid HTTP/1.1\r\nHost: a.test\r\n\r\n")
        assert await until(lambda: len(server.connections) == 2, 2)
        assert await until(lambda: not server.connections, 4), "an idle connection kept past its keep-alive timeout"
        # (the steady reader's own graceful close waits behind its last bytes for a moment)
        assert fin_wait_1(port, [sock]) == 0, "closed gracefully with its reply unread: an orphan holds it"
        assert await asyncio.to_thread(how_it_ends, sock, 3.0) == "reset"
        assert await reading == (len(body), "eof")
    finally:
        sock.close()
        await server.shutdown(1.0)
        listening.close()


async def slow_request(proxy: Proxy, origin: Origin, tag: str, count: int
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A new connection whose whole request is being answered (the origin has ``count`` of them)."""
    host, port = proxy.listeners.proxy_addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET /slow?{tag} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n".encode())
    await until(lambda: origin.count("/slow") >= count or reader.at_eof(), 2)
    return reader, writer


async def refused(reader: asyncio.StreamReader) -> bool:
    """Closed with nothing answered."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


async def every_slot_unread(make_proxy: MakeProxy, origin: Origin, cap: int
                            ) -> tuple[Proxy, list[socket.socket]]:
    """A proxy whose ``cap`` connections are all held by clients that read none of a reply the
    kernel's queue took whole (``/mid``), their replies written and the loop back waiting."""
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0'}}\nmax_connections: {cap}\n"
                                    "cache: {memory: 64MB, memory_max_object: 4MB}\n")
    origin.route("/mid", body=MID, headers={"Cache-Control": "max-age=600"})
    assert (await proxy.raw("GET", "/mid", "a.test")).body == MID
    before = client_connections(proxy)
    stopped = [unread(proxy, "/mid") for _ in range(cap)]
    try:
        assert await until(lambda: client_connections(proxy) == before + cap, 5)
    except BaseException:
        for sock in stopped:
            sock.close()
        raise
    await asyncio.sleep(0.3)
    return proxy, stopped


async def test_the_cap_holds_new_connections_while_replies_just_found_unread_show_they_stalled(
        make_proxy: MakeProxy, origin: Origin) -> None:
    # Every slot held by a client that read none of a reply the kernel's queue took whole: the
    # cap's walk only then found those replies, as if just moved, and refused the new clients
    # for a second. Now each new one is held, and a second later an unread reply makes room.
    proxy, stopped = await every_slot_unread(make_proxy, origin, 3)
    origin.route("/slow", body=b"slow", delay=1.6)
    _, port = proxy.listeners.proxy_addresses[0]
    new: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for i in range(3):
            new.append(await slow_request(proxy, origin, str(i), i + 1))
        assert origin.count("/slow") == 3, "a new connection was refused"
        for reader, _ in new:  # each gets its answer
            assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200 ")
        for sock in stopped:  # each unread reply made room, reset
            assert await asyncio.to_thread(how_it_ends, sock, 2.0) == "reset"
        assert fin_wait_1(port, stopped) == 0
        assert await closed_count(proxy, "cap_oldest") == 3
        assert await closed_count(proxy, "cap_refused") <= 0
    finally:
        for sock in stopped:
            sock.close()
        for _, w in new:
            w.close()


async def test_the_cap_refuses_held_connections_when_the_replies_just_found_are_being_read(
        make_proxy: MakeProxy, origin: Origin) -> None:
    # Slow steady readers of replies in the kernel's queue, just found by the cap: the new
    # connections are held a second, then refused, and no reader is closed.
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0'}\nmax_connections: 2\n"
                                    "cache: {memory: 64MB, memory_max_object: 4MB}\n")
    body = MID[:64 * 1024]
    origin.route("/m", body=body, headers={"Cache-Control": "max-age=600"})
    origin.route("/slow", body=b"slow", delay=2.0)
    assert (await proxy.raw("GET", "/m", "a.test")).body == body
    host, port = proxy.listeners.proxy_addresses[0]

    def steady() -> int:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, port))
            sock.sendall(b"GET /m HTTP/1.1\r\nHost: a.test\r\n\r\n")
            got = b""
            while b"\r\n\r\n" not in got or len(got) - got.index(b"\r\n\r\n") - 4 < len(body):
                time.sleep(0.1)
                data = sock.recv(2048)
                assert data, "closed before its reply ended"
                got += data
            return len(got) - got.index(b"\r\n\r\n") - 4

    before = client_connections(proxy)
    readers = [asyncio.ensure_future(asyncio.to_thread(steady)) for _ in range(2)]
    new: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        assert await until(lambda: client_connections(proxy) == before + 2, 5)
        await asyncio.sleep(0.3)
        for i in range(2):
            new.append(await slow_request(proxy, origin, str(i), i + 1))
        assert origin.count("/slow") == 2
        assert await closed_count(proxy, "cap_refused") <= 0  # held, not refused at once
        for reader, _ in new:  # refused a second later: the readers' queues moved
            assert await refused(reader)
        assert await asyncio.gather(*readers) == [len(body), len(body)]
        assert await closed_count(proxy, "cap_refused") == 2
        assert await closed_count(proxy, "cap_oldest") <= 0
    finally:
        for task in readers:
            task.cancel()
        for _, w in new:
            w.close()


async def test_the_cap_holds_no_more_new_connections_than_replies_just_found(
        make_proxy: MakeProxy, origin: Origin) -> None:
    # Two unread replies just found: two new connections are held, the ones after are refused
    # at once (the excess over the cap stays bounded by what may make room).
    proxy, stopped = await every_slot_unread(make_proxy, origin, 2)
    origin.route("/slow", body=b"slow", delay=1.6)
    _, port = proxy.listeners.proxy_addresses[0]
    new: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for i in range(4):
            new.append(await slow_request(proxy, origin, str(i), min(i + 1, 2)))
        for reader, _ in new[2:]:  # refused at once, before the held ones' second look
            assert await refused(reader)
        assert await closed_count(proxy, "cap_refused") == 2
        assert await closed_count(proxy, "cap_oldest") <= 0
        assert origin.count("/slow") == 2
        for reader, _ in new[:2]:
            assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200 ")
        for sock in stopped:
            assert await asyncio.to_thread(how_it_ends, sock, 2.0) == "reset"
        assert fin_wait_1(port, stopped) == 0
        assert await closed_count(proxy, "cap_oldest") == 2
    finally:
        for sock in stopped:
            sock.close()
        for _, w in new:
            w.close()


async def test_connections_held_over_the_cap_stay_bounded_when_each_is_served_then_idle(
        make_proxy: MakeProxy, origin: Origin) -> None:
    # A held connection, served and then idle, was the oldest waiting for the next one's walk:
    # closed, its hold went with it and the newcomer came in on top, one more for good each
    # time (a cap of 10 kept 135 open under 200 new connections a second). The newcomer now
    # takes the closed one's place among those held.
    proxy, stopped = await every_slot_unread(make_proxy, origin, 2)
    origin.route("/small", body=b"small", headers={"Cache-Control": "max-age=600"})
    host, port = proxy.listeners.proxy_addresses[0]
    before = client_connections(proxy) - 2
    new: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    most = 0
    try:
        for i in range(24):  # in turn: one more that reads nothing, one served and then idle
            if i % 2 == 0:
                stopped.append(unread(proxy, "/mid"))
            else:
                reader, writer = await asyncio.open_connection(host, port)
                new.append((reader, writer))
                writer.write(b"GET /small HTTP/1.1\r\nHost: a.test\r\n\r\n")
                with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                    await asyncio.wait_for(reader.readuntil(b"small"), 2)
            await asyncio.sleep(0.03)
            most = max(most, client_connections(proxy) - before)
        assert most <= 2 * 2 + 1, most  # the cap and as many held, and the one arriving
    finally:
        for sock in stopped:
            sock.close()
        for _, w in new:
            w.close()


ONE_MB = bytes(range(256)) * 4096  # cache.memory_max_object's default: the largest memory hit
# An Ethernet path's segment size, announced by a client (``unread``): the kernel's send queue then
# takes ~100 KB of a reply, as over a real network, and the rest waits in the worker's memory.
WAN_MSS = 1460
MEMORY_ONLY = "cache: {memory: 64MB, disk: null}\n"  # (a hit's body copied out of the shared memory)
A_TEST = {"Host": "a.test"}


async def stored_big(proxy: Proxy, origin: Origin) -> None:
    """/big on a.test (``unread``'s host), ONE_MB, stored: a hit from now on."""
    origin.route("/big", body=ONE_MB, headers={"Cache-Control": "max-age=600"})
    assert (await proxy.get("/big", headers=A_TEST)).body == ONE_MB
    for _ in range(100):  # (the fill's reply went out before it was stored)
        reply = await proxy.get("/big", headers=A_TEST)
        if reply.headers["X-Cache-Status"] == "HIT":
            assert reply.body == ONE_MB
            return
        await asyncio.sleep(0.02)
    raise AssertionError("/big was not stored")


def held_by_replies(proxy: Proxy) -> int:
    """What the client listeners' connections hold in the worker's buffers, measured now."""
    return sum(c.transport.get_write_buffer_size() for r in proxy.listeners.runners if isinstance(r.server, ProxyServer)
               for c in r.server._connections if c.transport is not None)


def budget_resets(proxy: Proxy) -> float:
    return proxy.runtime.metrics.client_closed.labels("max_unsent").value


@pytest.mark.parametrize("path", ["fast", "general"])
async def test_past_max_unsent_replies_nobody_reads_are_reset_and_a_reader_is_served(
        make_proxy: MakeProxy, origin: Origin, caplog: pytest.LogCaptureFixture, path: str) -> None:
    # A memory hit is handed to its connection whole: each client that asked for 1 MB and read
    # nothing held ~1 MB of the worker's memory until send_timeout (a minute), 40 of them ~35 MB
    # here. Past max_unsent, those whose client read none of it for a second are reset, the
    # longest unread first, down to the budget. The general path (a range) holds its reply too.
    caplog.set_level(logging.WARNING, "cachegate.proxy")
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0'}\nmax_unsent: 8MB\n" + MEMORY_ONLY)
    await stored_big(proxy, origin)
    fast = client_server(proxy).fast
    assert fast is not None
    answered, before = fast.answered, client_connections(proxy)
    socks = [unread(proxy, "/big", "Range: bytes=0-\r\n" if path == "general" else "", WAN_MSS)
             for _ in range(40)]
    try:
        assert await until(lambda: budget_resets(proxy) > 0, 5), held_by_replies(proxy)
        # A client that reads gets the whole body meanwhile.
        reply = await proxy.get("/big", headers=A_TEST)
        assert (reply.body, reply.headers["X-Cache-Status"]) == (ONE_MB, "HIT")
        assert await until(lambda: held_by_replies(proxy) <= 8 << 20, 5), held_by_replies(proxy)
        assert fast.answered - answered == (41 if path == "fast" else 1)  # (the path meant)
        reset = budget_resets(proxy)
        assert 40 - 14 <= reset <= 40 - 6, reset  # all but the ~8 that fit (~0.9 MB each)
        # (a reset's connection leaves the server's list a loop turn after it: a round of
        # resets may have run in the turn that ended the wait above)
        assert await until(lambda: client_connections(proxy) == before + 40 - reset, 5), \
            (client_connections(proxy), reset)
        assert held_by_replies(proxy) > 4 << 20  # (not all of them: only down to the budget)
        # The oldest (the longest unread) was reset: its client sees a reset, never an end.
        assert await asyncio.to_thread(how_it_ends, socks[0], 5) == "reset"
        assert await closed_count(proxy, "max_unsent") == reset
        assert await closed_count(proxy, "send_timeout") == 0
        lines = [(r.levelname, r.getMessage()) for r in caplog.records if "max_unsent" in r.getMessage()]
        assert len(lines) == 1 and lines[0][0] == "WARNING", lines  # one line, not one per connection
        assert re.fullmatch(r"max_unsent \(8 MB\) exceeded in this worker: replies waiting for their "
                            r"client held [\d.]+ MB; \d+ connection\(s\) whose client had read nothing "
                            r"for 1s reset, [\d.]+ MB left", lines[0][1]), lines
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("tls", [False, True], ids=["http", "tls"])
async def test_past_max_unsent_a_client_reading_slowly_is_never_reset(make_proxy: MakeProxy, origin: Origin,
                                                                      tmp_path: Path, tls: bool) -> None:
    # A reply its client reads, however slowly (~200 KB/s here, its writes paused most of the
    # time), keeps its connection while clients that read nothing keep the budget exceeded.
    # Over TLS too, where those clients' replies count once handed over (``tls_written``).
    proxy = await make_proxy(config=(tls_listeners(tmp_path) if tls else "") + "admin: {listen: '127.0.0.1:0'}\n"
                                    "max_unsent: 2MB\n" + MEMORY_ONLY)
    await stored_big(proxy, origin)
    host, port = proxy.listeners.proxy_addresses[1 if tls else 0]
    reading = asyncio.ensure_future(asyncio.to_thread(slow_read, host, port, "/big", 16384, 0.08, mss=WAN_MSS,
                                                      tls=tls))
    socks: list[socket.socket] = []
    try:
        while not reading.done():  # clients that read nothing keep coming: over the budget all along
            socks.append(await asyncio.to_thread(unread_tls, port, "/big") if tls else unread(proxy, "/big", mss=WAN_MSS))
            await asyncio.sleep(0.25)
        assert await reading == (len(ONE_MB), len(ONE_MB), "whole")
        assert len(socks) >= 12  # (read over 3 s at least)
        assert budget_resets(proxy) >= len(socks) - 6, (budget_resets(proxy), len(socks))
    finally:
        for sock in socks:
            sock.close()


async def test_max_unsent_null_is_no_budget_and_a_reload_applies_a_new_one_at_once(
        make_proxy: MakeProxy, origin: Origin) -> None:
    # As max_connections: read from the live settings, the reload's applies from the next reply
    # whose writes pause (no restart, and to the connections already open).
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0'}\nmax_unsent: null\n" + MEMORY_ONLY)
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    await stored_big(proxy, origin)
    before = client_connections(proxy)
    socks = [unread(proxy, "/big", mss=WAN_MSS) for _ in range(12)]
    try:
        assert await until(lambda: held_by_replies(proxy) > 8 << 20, 5), held_by_replies(proxy)
        await asyncio.sleep(1.5)  # stalled a second and more: nothing reset, no budget
        assert budget_resets(proxy) == 0 and client_connections(proxy) == before + 12
        config = Path(proxy.config_path)
        config.write_text(config.read_text().replace("max_unsent: null", "max_unsent: 4MB"))  # noqa: ASYNC240
        assert (await proxy.admin("POST", "/reload")).status == 200
        assert proxy.runtime.settings.max_unsent == 4 << 20
        socks.append(unread(proxy, "/big", mss=WAN_MSS))  # its pause finds the budget exceeded
        assert await until(lambda: held_by_replies(proxy) <= 4 << 20, 5), held_by_replies(proxy)
        assert 12 - 8 <= budget_resets(proxy) <= 12 - 2, budget_resets(proxy)
        assert socks[-1].recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""  # the new one kept
    finally:
        for sock in socks:
            sock.close()


async def test_max_unsent_is_one_budget_for_all_the_client_listeners_of_a_worker(make_proxy: MakeProxy,
                                                                                origin: Origin) -> None:
    proxy = await make_proxy(config="listen: ['127.0.0.1:0', '127.0.0.1:0']\nadmin: {listen: '127.0.0.1:0'}\n"
                                    "max_unsent: 4MB\n" + MEMORY_ONLY)
    await stored_big(proxy, origin)
    socks = [unread(proxy, "/big", mss=WAN_MSS, listener=i % 2) for i in range(12)]  # 6 on each, ~5 MB
    try:
        assert await until(lambda: budget_resets(proxy) > 0, 5), held_by_replies(proxy)
        assert await until(lambda: held_by_replies(proxy) <= 4 << 20, 5), held_by_replies(proxy)
        assert held_by_replies(proxy) > 2 << 20
    finally:
        for sock in socks:
            sock.close()


def tls_listeners(tmp_path: Path) -> str:
    """A plain client listener (the first: ``Proxy.get``'s) and a TLS one (the second)."""
    key, cert = self_signed(tmp_path, "budget", "a.test", "IP:127.0.0.1")
    return f"listen: ['127.0.0.1:0', {{address: '127.0.0.1:0', tls: {{cert: '{cert}', key: '{key}'}}}}]\n"


def held_in_worker(proxy: Proxy) -> int:
    """``held_by_replies`` with what TLS connections hold in the TCP transports under them."""
    return sum(c.buffered() for r in proxy.listeners.runners if isinstance(r.server, ProxyServer)
               for c in r.server._connections)


def unread_tls(port: int, path: str, fields: str = "") -> ssl.SSLSocket:
    """``unread`` over TLS: its handshake done, a request for ``path`` sent, nothing read."""
    sock = _tls_client(port, rcvbuf=4096, mss=WAN_MSS)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: a.test\r\n{fields}\r\n".encode())
    return sock


@pytest.mark.parametrize("path", ["fast", "general"])
async def test_past_max_unsent_tls_replies_nobody_reads_are_reset_as_plain_ones_are(
        make_proxy: MakeProxy, origin: Origin, tmp_path: Path, path: str) -> None:
    # The loop's TLS layer hands what it encrypts to the TCP transport under it at once and
    # pauses the writes only for what it holds itself: a 1 MB hit to a TLS client that reads
    # nothing waited whole in that TCP transport's buffer, the writes never paused, and the
    # budget never heard of it (40 such clients past a 1 MB budget: none reset, ~1 MB each
    # held until send_timeout). Now it counts once its reply is handed over, as a paused one.
    proxy = await make_proxy(config=tls_listeners(tmp_path) + "admin: {listen: '127.0.0.1:0'}\n"
                                    "max_unsent: 8MB\n" + MEMORY_ONLY)
    await stored_big(proxy, origin)
    port = proxy.listeners.proxy_addresses[1][1]
    first = await asyncio.to_thread(_tls_client, port)  # (the first hit on a listener is a general one)
    assert (await asyncio.to_thread(_tls_get, first, "/big", True)).endswith(ONE_MB)
    first.close()
    assert await until(lambda: client_connections(proxy, 1) == 0, 5)
    fast = client_server(proxy, 1).fast  # (the TLS listener's)
    assert fast is not None
    answered = fast.answered
    fields = "Range: bytes=0-\r\n" if path == "general" else ""
    socks = [await asyncio.to_thread(unread_tls, port, "/big", fields) for _ in range(40)]
    try:
        assert await until(lambda: budget_resets(proxy) > 0, 5), held_in_worker(proxy)
        assert await until(lambda: held_in_worker(proxy) <= 8 << 20, 5), held_in_worker(proxy)
        assert fast.answered - answered == (40 if path == "fast" else 0)  # (the path meant)
        reset = budget_resets(proxy)
        assert 40 - 14 <= reset <= 40 - 6, reset  # all but the ~8 that fit (~0.9 MB each)
        assert await until(lambda: client_connections(proxy, 1) == 40 - reset, 5)
        assert held_in_worker(proxy) > 4 << 20  # (not all of them: only down to the budget)
        # The oldest (the longest unread) was reset: its client sees a reset, never an end.
        # (its TCP connection read under TLS: Python's TLS reads a reset as an end, ragged EOF)
        with socket.socket(fileno=os.dup(socks[0].fileno())) as tcp:
            assert await asyncio.to_thread(how_it_ends, tcp, 5) == "reset"
        assert await closed_count(proxy, "send_timeout") == 0
    finally:
        for sock in socks:
            sock.close()


async def test_past_max_unsent_tls_replies_nobody_reads_are_reset_under_uvloop(origin: Origin, tmp_path: Path) -> None:
    # `cachegate run` (uvloop's TLS, in C, as in production): its TLS transport hides the TCP
    # transport under it, whose buffer the budget did not count even for paused writes.
    from tests.harness import spawn_cachegate, write_config

    origin.route("/big", body=ONE_MB, headers={"Cache-Control": "max-age=600"})
    config = write_config(str(tmp_path), origin.url, tls_listeners(tmp_path) + "max_unsent: 4MB\n" + MEMORY_ONLY)
    proc = await asyncio.to_thread(spawn_cachegate, ["run", "--config", config])
    assert proc.admin_url is not None
    port = int(next(line for line in proc.output if "proxy listening on https://" in line)
               .split("https://", 1)[1].split()[0].rsplit(":", 1)[1])
    socks: list[ssl.SSLSocket] = []

    def resets() -> float:
        with urllib.request.urlopen(proc.admin_url + "/metrics", timeout=5) as reply:
            found = re.search(r'cachegate_client_connections_closed_total\{reason="max_unsent"\} ([\d.]+)',
                              reply.read().decode())
        return float(found.group(1)) if found else -1.0

    try:
        for _ in range(2):  # stored, then a hit on the TLS listener (its first: the general path)
            first = await asyncio.to_thread(_tls_client, port)
            assert (await asyncio.to_thread(_tls_get, first, "/big", True)).endswith(ONE_MB)
            first.close()
        for _ in range(20):  # ~20 MB unread, past the 4 MB budget
            socks.append(await asyncio.to_thread(unread_tls, port, "/big"))
        for _ in range(50):
            if await asyncio.to_thread(resets) >= 12:
                break
            await asyncio.sleep(0.1)
        assert 12 <= await asyncio.to_thread(resets) <= 20 - 2
        with socket.socket(fileno=os.dup(socks[0].fileno())) as tcp:  # the longest unread: reset
            assert await asyncio.to_thread(how_it_ends, tcp, 5) == "reset"
    finally:
        for sock in socks:
            sock.close()
        await asyncio.to_thread(proc.stop)
