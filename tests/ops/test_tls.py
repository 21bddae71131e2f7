"""TLS on the client side: several listeners, the fast path and sendfile under TLS, certificate
rotation on reload with a live connection, bad certificates refused with FILE:LINE."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import main
from proxy.config import Overrides
from proxy.tls import ServerTLS
from proxy.web.fastpath import ProxyServer
from proxy.web.server import install_reloader
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy, self_signed

CC = {"Cache-Control": "max-age=300"}


class Certs:
    """Two throwaway certificates (CN a and b) and the files a TLS listener reads (``live``)."""

    def __init__(self, directory: Path) -> None:
        self.a = self_signed(directory, "a", "a.test", "IP:127.0.0.1")
        self.b = self_signed(directory, "b", "b.test", "IP:127.0.0.1")
        self.key, self.cert = directory / "live.key", directory / "live.pem"
        self.use(self.a)

    def use(self, pair: tuple[Path, Path]) -> None:
        key, cert = pair
        shutil.copy(key, self.key)
        shutil.copy(cert, self.cert)

    @staticmethod
    def der(pair: tuple[Path, Path]) -> bytes:
        return ssl.PEM_cert_to_DER_cert(pair[1].read_text())


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the tests compare the certificate served, byte for byte
    return ctx


class Conn:
    """One keep-alive HTTP/1.1 connection over TLS (or not), speaking raw bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Conn:
        scheme, rest = url.split("://")
        host, port = rest.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(
            host, int(port), ssl=client_context() if scheme == "https" else None)
        return cls(reader, writer)

    def peer_cert(self) -> bytes:
        obj = self.writer.get_extra_info("ssl_object")
        assert obj is not None
        return bytes(obj.getpeercert(binary_form=True))

    async def get(self, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        self.writer.write(f"{method} {path} HTTP/1.1\r\nHost: example.test\r\n\r\n".encode())
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines[1:] if line)
        length = int(fields.get("Content-Length", "0"))
        body = await self.reader.readexactly(length) if method != "HEAD" else b""
        return int(lines[0].split()[1]), fields, body

    def close(self) -> None:
        self.writer.close()


def tls_config(certs: Certs, cache: str = "") -> str:
    return ("listen:\n  - 127.0.0.1:0\n"
            f"  - {{address: '127.0.0.1:0', tls: {{cert: '{certs.cert}', key: '{certs.key}'}}}}\n" + cache)


def fast_of(proxy: Proxy, index: int) -> int:
    server = proxy.listeners.runners[index].server
    assert isinstance(server, ProxyServer) and server.fast is not None
    return server.fast.answered


async def test_a_plain_and_a_tls_listener_serve_side_by_side(
    origin: Origin, make_proxy: MakeProxy, certs: Certs
) -> None:
    origin.route("/a", body=b"a" * 2000, headers=CC)
    proxy = await make_proxy(config=tls_config(certs))
    plain_url, tls_url = proxy.listeners.proxy_urls
    assert plain_url.startswith("http://") and tls_url.startswith("https://")
    conn = await Conn.open(tls_url)
    try:
        assert conn.peer_cert() == Certs.der(certs.a)
        assert conn.writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        status, fields, body = await conn.get("/a")
        assert (status, fields["X-Cache-Status"], body) == (200, "MISS", b"a" * 2000)
        await asyncio.sleep(0.05)
        before = fast_of(proxy, 1)
        for method in ("GET", "HEAD"):
            status, fields, body = await conn.get("/a", method)
            assert fields["X-Cache-Status"] == "HIT" and body == (b"a" * 2000 if method == "GET" else b"")
        assert fast_of(proxy, 1) == before + 2, "hits over TLS take the fast path"
    finally:
        conn.close()
    plain = await Conn.open(plain_url)
    try:
        status, fields, _ = await plain.get("/a")
        assert fields["X-Cache-Status"] == "MISS"  # http://... is another key than https://...
    finally:
        plain.close()


async def test_a_tls_handshake_that_stalls_is_cut_at_client_header_timeout(
    origin: Origin, make_proxy: MakeProxy, certs: Certs
) -> None:
    """A client that connects to a TLS listener and sends nothing (or half a ClientHello) was
    held for the event loop's 60 s handshake timeout, whatever client_header_timeout said (the
    plain listener closed it in time); now the handshake has client_header_timeout too."""
    proxy = await make_proxy(config=tls_config(certs) + "client_header_timeout: 1s\n")
    _, tls_url = proxy.listeners.proxy_urls
    host, port = tls_url.removeprefix("https://").rsplit(":", 1)
    for first in (b"", b"\x16\x03\x01\x02\x00\x01"):  # nothing; the start of a ClientHello
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(first)
            # closed by the server well before 60 s (20 s only bounds a failing test)
            assert await asyncio.wait_for(reader.read(), 20) == b""
        finally:
            writer.close()
    conn = await Conn.open(tls_url)  # a handshake that goes on is served as before
    try:
        origin.route("/t", body=b"t", headers=CC)
        assert (await conn.get("/t"))[0] == 200
    finally:
        conn.close()


async def test_sendfile_bodies_over_tls_are_encrypted_not_sent_around_it(
    origin: Origin, make_proxy: MakeProxy, certs: Certs
) -> None:
    """A body on disk is sent with os.sendfile on plain connections; on a TLS connection that
    would put plaintext into the TLS stream: both paths must write it through TLS instead."""
    big = bytes(range(256)) * 200  # 51,200 bytes: on disk, as a file of its own
    origin.route("/big", body=big, headers=CC)
    proxy = await make_proxy(config=tls_config(certs, "cache: {memory: 64MB, memory_max_object: 16KB, "
                                                      "disk: {path: cache, size: 512MB, shards: 2}}\n"))
    tls_url = proxy.listeners.proxy_urls[1]
    conn = await Conn.open(tls_url)
    try:
        assert (await conn.get("/big"))[2] == big  # the fill
        await proxy.runtime.storage.flush()  # the disk commit (write-behind)
        proxy.runtime.storage.memory.clear()
        for _ in range(2):  # read from disk: it enters memory on its second read in a while
            status, fields, body = await conn.get("/big")  # the general path opens the body file
            assert (status, fields["X-Cache-Status"], body) == (200, "HIT", big)
        assert len(proxy.runtime.storage.body_files) == 1
        before = fast_of(proxy, 1)
        for _ in range(3):
            status, fields, body = await conn.get("/big")
            assert (status, body) == (200, big)
        assert fast_of(proxy, 1) == before + 3  # the fast path's file bodies, through TLS
    finally:
        conn.close()


async def test_rotating_the_certificate_keeps_live_connections_and_new_handshakes_get_it(
    origin: Origin, make_proxy: MakeProxy, certs: Certs
) -> None:
    origin.route("/a", body=b"a", headers=CC)
    proxy = await make_proxy(config=tls_config(certs))
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    tls_url = proxy.listeners.proxy_urls[1]
    live = await Conn.open(tls_url)
    try:
        assert (await live.get("/a"))[0] == 200
        certs.use(certs.b)  # new files at the same paths, as certbot or cert-manager leave them
        reply = await proxy.admin("POST", "/reload")
        assert reply.status == 200, reply.body
        fresh = await Conn.open(tls_url)
        try:
            assert fresh.peer_cert() == Certs.der(certs.b)
            assert (await fresh.get("/a"))[0] == 200
        finally:
            fresh.close()
        assert live.peer_cert() == Certs.der(certs.a)
        status, fields, _ = await live.get("/a")  # the connection from before goes on working
        assert (status, fields["X-Cache-Status"]) == (200, "HIT")
    finally:
        live.close()


async def test_a_certificate_that_does_not_load_is_refused_and_the_old_one_stays(
    origin: Origin, make_proxy: MakeProxy, certs: Certs, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = await make_proxy(config=tls_config(certs))
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    shutil.copy(certs.b[0], certs.key)  # b's key with a's certificate: a mismatch
    assert main(["check", "--config", proxy.config_path]) == 2
    err = capsys.readouterr().err
    text = await asyncio.to_thread(Path(proxy.config_path).read_text)
    line = next(n for n, t in enumerate(text.splitlines(), 1) if "tls:" in t)
    assert f"{proxy.config_path}:{line}: listen[1].tls: cannot load the certificate {certs.cert}" in err
    assert "key values mismatch" in err
    reply = await proxy.admin("POST", "/reload")
    assert reply.status == 400
    conn = await Conn.open(proxy.listeners.proxy_urls[1])
    try:
        assert conn.peer_cert() == Certs.der(certs.a)
    finally:
        conn.close()


@pytest.mark.parametrize(("files", "says"), [
    # OpenSSL's own words were "[SSL] PEM lib (_ssl.c:3905)" and "no certificate assigned"
    (("key", "cert"), "the two are swapped: {key} (tls.cert) holds a private key and {cert} (tls.key) a "
                      "certificate"),
    (("cert", "cert"), "{cert} (tls.key) holds no private key (-----BEGIN PRIVATE KEY-----): it holds a "
                       "certificate"),
    (("key", "key"), "{key} (tls.cert) holds no certificate (-----BEGIN CERTIFICATE-----): it holds a private key"),
    (("eccert", "key"), "the certificate in {eccert} has an EC key but {key} is an RSA key: the key must be the "
                        "certificate's own"),
])
def test_check_says_which_file_lacks_a_certificate_or_a_key_or_that_key_types_differ(
    tmp_path: Path, certs: Certs, files: tuple[str, str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, eccert = ec_pair(tmp_path)
    paths = {"cert": str(certs.cert), "key": str(certs.key), "eccert": str(eccert)}
    cert, key = (paths[f] for f in files)
    config = tmp_path / "c.yaml"
    config.write_text(f"upstreams: [http://127.0.0.1:9]\nlisten:\n  - 127.0.0.1:0\n"
                      f"  - {{address: '127.0.0.1:0', tls: {{cert: '{cert}', key: '{key}'}}}}\n")
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert (f"{config}:4: listen[1].tls: cannot load the certificate {cert} with the key {key}: "
            + says.format(**paths)) in err, err
    assert "PEM lib" not in err and "no certificate assigned" not in err


async def test_a_reload_to_swapped_files_says_so_and_the_old_certificate_stays(
    origin: Origin, make_proxy: MakeProxy, certs: Certs
) -> None:
    proxy = await make_proxy(config=tls_config(certs))
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    key_pem, cert_pem = certs.key.read_bytes(), certs.cert.read_bytes()
    certs.cert.write_bytes(key_pem)
    certs.key.write_bytes(cert_pem)
    reply = await proxy.admin("POST", "/reload")
    assert reply.status == 400
    assert "the two are swapped" in reply.body.decode()
    conn = await Conn.open(proxy.listeners.proxy_urls[1])
    try:
        assert conn.peer_cert() == Certs.der(certs.a)
    finally:
        conn.close()


def test_a_tls_reload_below_the_check_says_which_file_holds_what(certs: Certs) -> None:
    tls = ServerTLS(str(certs.cert), str(certs.key))
    assert tls.reload(str(certs.key), str(certs.cert)) == (
        f"the current certificate stays: {certs.key} did not load (the two are swapped: {certs.key} "
        f"(tls.cert) holds a private key and {certs.cert} (tls.key) a certificate)")


@pytest.mark.parametrize(("listen", "message"), [
    ("listen: [{address: '127.0.0.1:0', tls: {cert: nope.pem, key: nope.key}}]",
     "listen[0].tls.cert: {dir}/nope.pem does not exist"),
    ("listen: [{address: '127.0.0.1:0', tls: {cert: x.pem}}]", "listen[0].tls.key: required (a PEM file)"),
    ("listen: [{tls: {cert: x.pem, key: y}}]", "listen[0].address: required (HOST:PORT)"),
    ("listen: ['127.0.0.1:8080', '127.0.0.1:8080']", "listen[1]: 127.0.0.1:8080 is listed twice"),
    ("listen: [8080x]", "listen[0]: expected HOST:PORT"),
    ("listen: {address: '127.0.0.1:1', tls: 3}", "listen.tls: expected"),
])
def test_listen_mistakes_are_reported_with_their_line(
    tmp_path: Path, listen: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("upstreams: [http://127.0.0.1:9]\n" + listen + "\n")
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}:2: {message.format(dir=tmp_path)}" in err, err


def test_listen_as_one_string_or_one_mapping_still_works(tmp_path: Path) -> None:
    from proxy.config import Listener, load_config

    config = tmp_path / "c.yaml"
    config.write_text("upstreams: [http://127.0.0.1:9]\nlisten: 0.0.0.0:80\n")
    assert load_config(str(config)).listeners == (Listener("0.0.0.0", 80),)
    assert load_config(str(config)).listen == ("0.0.0.0", 80)
    assert load_config(str(config), Overrides(listen=("127.0.0.1:1", "127.0.0.1:2"))).listeners == (
        Listener("127.0.0.1", 1), Listener("127.0.0.1", 2))


@pytest.mark.slow
async def test_sighup_rotates_the_certificate_in_every_worker(origin: Origin, tmp_path: Path, certs: Certs) -> None:
    """A real `cachegate run --workers 2` on uvloop: both listeners in both workers; SIGHUP to
    the supervisor; connections opened after it see the new certificate, whichever worker
    takes them, and a connection from before keeps working."""
    from tests.harness import spawn_cachegate, write_config

    origin.route("/a", body=b"a", headers=CC)
    config = write_config(str(tmp_path), origin.url, tls_config(certs))
    proc = await asyncio.to_thread(spawn_cachegate, ["run", "--config", config, "--workers", "2"])
    try:
        urls = [line.split("proxy listening on ", 1)[1].split()[0] for line in proc.output
                if "proxy listening on" in line]
        assert [u.split("://")[0] for u in urls] == ["http", "https"], proc.text
        live = await Conn.open(urls[1])
        assert (await live.get("/a"))[0] == 200
        assert live.peer_cert() == Certs.der(certs.a)
        certs.use(certs.b)
        proc.proc.send_signal(signal.SIGHUP)
        seen: set[bytes] = set()
        for _ in range(100):
            conn = await Conn.open(urls[1])
            seen = {conn.peer_cert()}
            conn.close()
            if seen == {Certs.der(certs.b)}:
                break
            await asyncio.sleep(0.1)
        assert seen == {Certs.der(certs.b)}
        for _ in range(8):  # new connections spread over both workers: every one has the new one
            conn = await Conn.open(urls[1])
            assert conn.peer_cert() == Certs.der(certs.b)
            assert (await conn.get("/a"))[0] == 200
            conn.close()
        assert (await live.get("/a"))[0] == 200
        live.close()
        plain = await Conn.open(urls[0])
        assert (await plain.get("/a"))[0] == 200
        plain.close()
    finally:
        assert await asyncio.to_thread(proc.stop) == 0, proc.text


def test_uvloop_tls_transports_say_they_are_tls(certs: Certs) -> None:
    """sendfile_now tells TLS connections by the transport's "sslcontext": uvloop's TLS
    transports (what `cachegate run` uses) report it as asyncio's do."""
    uvloop = pytest.importorskip("uvloop")
    from proxy.tls import ServerTLS

    tls = ServerTLS(str(certs.cert), str(certs.key))

    async def run() -> object:
        seen: asyncio.Future[object] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                seen.set_result(transport.get_extra_info("sslcontext"))

        server = await asyncio.get_running_loop().create_server(Probe, "127.0.0.1", 0, ssl=tls.context)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context())
        found = await asyncio.wait_for(seen, 5)
        writer.close()
        server.close()
        return found

    assert uvloop.run(run()) is tls.context


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_tcp_transport_under_a_tls_one_is_found_on_either_loop(certs: Certs, loop: str) -> None:
    """``max_unsent`` counts what a TLS connection's TCP transport holds (``tcp_under``): a reply
    handed over whole waits there, its writes never paused. uvloop's TLS transport (in C)
    hides it; were it not found, the budget would not see TLS replies at all: this says so."""
    from proxy.web.headtimeout import tcp_under

    tls = ServerTLS(str(certs.cert), str(certs.key))

    async def run() -> tuple[str, int, str]:
        seen: asyncio.Queue[asyncio.BaseTransport] = asyncio.Queue()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                seen.put_nowait(transport)

        running = asyncio.get_running_loop()
        secure = await running.create_server(Probe, "127.0.0.1", 0, ssl=tls.context)
        plain = await running.create_server(Probe, "127.0.0.1", 0)
        raw = socket.socket()  # a client that reads nothing: the reply waits in the worker
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
        raw.setblocking(False)
        await running.sock_connect(raw, secure.sockets[0].getsockname())
        _, writer = await asyncio.open_connection(sock=raw, ssl=client_context(), server_hostname="a.test")
        transport: Any = await asyncio.wait_for(seen.get(), 5)  # (uvloop's is no asyncio.Transport)
        try:
            under = tcp_under(transport)
            assert under is not None and under is not transport
            transport.write(b"x" * (1 << 20))  # the TLS layer hands it on whole, its own buffer empty
            held = (transport.get_write_buffer_size(), under.get_write_buffer_size())
            _, other = await asyncio.open_connection(*plain.sockets[0].getsockname())
            served = await asyncio.wait_for(seen.get(), 5)
            nothing = tcp_under(served)
            for t in (served, other.transport):
                t.abort()
        finally:
            for t in (transport, writer.transport):
                t.abort()  # (a close waits for the client that reads nothing)
            for server in (secure, plain):
                server.close()
        return type(under).__name__, held[0], f"{held[1] > 512 << 10} {nothing}"

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        name, own, rest = uvloop.run(run())
    else:
        name, own, rest = asyncio.run(run())
    assert (own, rest) == (0, "True None"), (name, own, rest)


def test_a_reload_takes_new_certificate_paths_but_not_new_addresses() -> None:
    from proxy.config import Listener, ListenerTLS, Settings
    from proxy.web.server import live_settings

    old = Settings(source="a", listeners=(Listener("0.0.0.0", 80), Listener("0.0.0.0", 443, ListenerTLS("a", "k"))))
    new_files = Settings(source="a", listeners=(Listener("0.0.0.0", 80), Listener("0.0.0.0", 443, ListenerTLS("b", "l"))))
    merged, restart = live_settings(old, new_files)
    assert restart == [] and merged.listeners[1].tls == ListenerTLS("b", "l")
    moved = Settings(source="a", listeners=(Listener("0.0.0.0", 81), Listener("0.0.0.0", 443, ListenerTLS("b", "l"))))
    merged, restart = live_settings(old, moved)
    assert restart == ["listen"] and merged.listeners == old.listeners
    plain = Settings(source="a", listeners=(Listener("0.0.0.0", 80), Listener("0.0.0.0", 443)))
    assert live_settings(old, plain)[1] == ["listen"]  # TLS off needs a restart


# -- a key that needs a passphrase ----------------------------------------------------------------


class Terminal:
    """``python -m proxy ...`` (or ``python -c``) on a pseudo-terminal of its own, as a foreground
    cachegate in a shell or ``docker run -it`` is: OpenSSL's default passphrase callback asks on
    that terminal and waits, which is what cachegate must never let it do."""

    def __init__(self, args: list[str]) -> None:
        import pty

        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: exec at once
            os.execve(sys.executable, [sys.executable, *args], env)
        self.output = b""
        self.status: int | None = None

    def read(self, until: Callable[[bytes], bool], limit: float = 60.0) -> bool:
        """Read what the child writes until ``until(output)`` or it ends; False after ``limit``
        seconds without either (a child waiting at a prompt)."""
        import select

        deadline = time.monotonic() + limit
        while not until(self.output) and time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # EIO: the child is gone and the terminal closed
                    chunk = b""
                if not chunk:
                    self.wait()
                    return True
                self.output += chunk
        return until(self.output)

    def wait(self) -> int:
        if self.status is None:
            _, status = os.waitpid(self.pid, 0)
            self.status = os.waitstatus_to_exitcode(status)
        return self.status

    def stop(self) -> None:
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.wait()
        os.close(self.fd)


def encrypted_copy(key: Path, out: Path) -> Path:
    subprocess.run(["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:secret", "-out", str(out)],
                   check=True, capture_output=True)
    assert b"ENCRYPTED" in out.read_bytes()
    return out


def test_check_refuses_an_encrypted_key_without_asking_for_its_passphrase(tmp_path: Path, certs: Certs) -> None:
    encrypted_copy(certs.a[0], certs.key)
    config = tmp_path / "c.yaml"
    config.write_text(f"upstreams: [http://127.0.0.1:9]\n{tls_config(certs)}")
    term = Terminal(["-m", "proxy", "check", "--config", str(config)])
    try:
        ended = term.read(lambda out: False)
        assert ended, f"cachegate check is waiting at the terminal: {term.output!r}"
        text = term.output.decode(errors="replace")
        assert "pass phrase" not in text
        assert f"{config}:4: listen[1].tls.key: the key is encrypted (cachegate needs an unencrypted key" in text
        assert term.wait() == 2
    finally:
        term.stop()


def test_a_reload_to_an_encrypted_key_is_refused_and_the_process_keeps_answering(
        tmp_path: Path, certs: Certs) -> None:
    from tests.harness import write_config

    config = write_config(str(tmp_path), "http://127.0.0.1:9", tls_config(certs))
    term = Terminal(["-m", "proxy", "run", "--config", config])
    try:
        assert term.read(lambda out: re.search(rb"admin listening on (http://[0-9.:]+)", out) is not None
                         and b"proxy listening on https" in out), term.output
        admin = re.search(rb"admin listening on (http://[0-9.:]+)", term.output)
        https = re.search(rb"proxy listening on (https://[0-9.:]+)", term.output)
        assert admin is not None and https is not None
        admin_url, https_url = admin.group(1).decode(), https.group(1).decode()
        encrypted_copy(certs.b[0], certs.key)
        shutil.copy(certs.b[1], certs.cert)
        status, body = _post(admin_url + "/reload")
        assert status == 400, body
        assert "listen[1].tls.key: the key is encrypted (cachegate needs an unencrypted key" in body
        assert _post(admin_url + "/healthz", method="GET")[0] == 200
        assert _peer_cert(https_url) == Certs.der(certs.a)  # the old certificate stays
        term.read(lambda out: b"pass phrase" in out, limit=0.5)
        assert b"pass phrase" not in term.output
    finally:
        term.stop()


def test_server_tls_never_prompts_for_a_passphrase(tmp_path: Path, certs: Certs) -> None:
    """Below the config check: the context itself refuses an encrypted key (a reload whose file
    changed between the check and the load)."""
    enc = encrypted_copy(certs.b[0], tmp_path / "enc.pem")
    code = ("from proxy.tls import ServerTLS, load_problem, read_pem\n"
            f"t = ServerTLS({str(certs.cert)!r}, {str(certs.key)!r})\n"
            f"print('reload', t.reload({str(certs.b[1])!r}, {str(enc)!r}))\n"
            f"print('problem', load_problem({str(certs.b[1])!r}, {str(enc)!r}, "
            f"read_pem({str(certs.b[1])!r}, {str(enc)!r})))\n")
    term = Terminal(["-c", code])
    try:
        assert term.read(lambda out: False), f"waiting at the terminal: {term.output!r}"
        text = term.output.decode(errors="replace")
        assert "reload the current certificate stays: the key is encrypted" in text, text
        assert "pass phrase" not in text
    finally:
        term.stop()


def _post(url: str, method: str = "POST") -> tuple[int, str]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _peer_cert(url: str) -> bytes:
    import socket

    host, port = url.split("://", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock, \
            client_context().wrap_socket(sock) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


@pytest.mark.slow
async def test_a_server_name_that_is_not_ascii_leaves_no_traceback(
        origin: Origin, tmp_path: Path, certs: Certs) -> None:
    """Anyone can send any bytes as the TLS server name: cachegate's stderr (its log) gets no
    "Exception ignored ... UnicodeDecodeError" per handshake, and the listener goes on serving."""
    from tests.harness import spawn_cachegate, write_config

    origin.route("/a", body=b"a", headers=CC)
    config = write_config(str(tmp_path), origin.url, tls_config(certs))
    proc = await asyncio.to_thread(spawn_cachegate, ["run", "--config", config])
    try:
        url = next(line.split("proxy listening on ", 1)[1].split()[0] for line in proc.output
                   if "proxy listening on https" in line)
        port = url.rsplit(":", 1)[1]

        def s_client(name: bytes) -> bytes:
            done = subprocess.run(
                [b"openssl", b"s_client", b"-connect", f"127.0.0.1:{port}".encode(), b"-servername", name,
                 b"-brief", b"-ign_eof"], input=b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                capture_output=True, timeout=30)
            return done.stdout + done.stderr

        for name in (b"\xc3\xa9.example", b"\xff\xfe", b"\x1b[31mred"):
            await asyncio.to_thread(s_client, name)
        served = await asyncio.to_thread(s_client, b"localhost")
        assert b"HTTP/1.1 200 OK" in served, served
        conn = await Conn.open(url)  # and Python's client, for good measure
        assert (await conn.get("/a"))[0] == 200
        conn.close()
        await asyncio.sleep(0.5)  # what the process would print for those handshakes
        assert "Traceback" not in proc.text and "Exception ignored" not in proc.text, proc.text
    finally:
        assert await asyncio.to_thread(proc.stop) == 0, proc.text


def test_a_reload_to_another_key_type_is_refused_and_the_old_certificate_stays(
        tmp_path: Path, certs: Certs) -> None:
    """OpenSSL keeps one certificate per key type: loading an EC pair into a context holding an
    RSA one added it beside the old one, and clients negotiating RSA kept the old certificate
    although the reload said it succeeded."""
    from proxy.tls import ServerTLS, key_kind

    ec_key, ec_cert = ec_pair(tmp_path)
    assert key_kind(ec_key.read_bytes()) == "EC"
    assert key_kind(certs.key.read_bytes()) == "RSA"
    tls = ServerTLS(str(certs.cert), str(certs.key))
    assert tls.reload(str(ec_cert), str(ec_key)) == ("the key is EC, the certificate served has an RSA "
                                                     "key: a restart changes the key type")
    assert tls.files == (str(certs.cert), str(certs.key))
    assert tls.reload(str(certs.b[1]), str(certs.b[0])) is None  # the same key type: rotated

    async def served() -> bytes:
        server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0,
                                                                ssl=tls.context)
        port = server.sockets[0].getsockname()[1]
        ctx = client_context()
        ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256")
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        server.close()
        return bytes(der)

    assert asyncio.run(served()) == Certs.der(certs.b)  # never the EC one


def ec_pair(directory: Path) -> tuple[Path, Path]:
    """A throwaway EC key and its self-signed certificate (another key type than ``Certs``')."""
    key, cert = directory / "eckey.pem", directory / "eccert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "90", "-subj", "/CN=ec.test",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return key, cert


KEY_TYPE_KEPT = ("listen[1].tls (the key is EC, the certificate served has an RSA key: a restart "
                 "changes the key type)")


async def test_a_reload_that_keeps_the_certificate_for_its_key_type_says_a_restart_is_needed(
        origin: Origin, make_proxy: MakeProxy, certs: Certs, tmp_path: Path) -> None:
    """A renewal that switches the key type (new files at the same paths): the reload cannot
    rotate the certificate, and its answer said so only in the log (``restart_required: []``),
    so a renewal hook took the old certificate for the new one. Now it names the listener in
    ``restart_required``, at this reload and the next ones, until a restart."""
    proxy = await make_proxy(config=tls_config(certs))
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    ec_key, ec_cert = ec_pair(tmp_path)
    certs.use((ec_key, ec_cert))
    for _ in range(2):
        reply = await proxy.admin("POST", "/reload")
        assert reply.status == 200, reply.body
        answer = json.loads(reply.body)
        assert answer["reloaded"] is True and answer["restart_required"] == [KEY_TYPE_KEPT], answer
    conn = await Conn.open(proxy.listeners.proxy_urls[1])
    try:
        assert conn.peer_cert() == Certs.der(certs.a)  # what it said: the old one stays
    finally:
        conn.close()
    certs.use(certs.b)  # back to an RSA pair: rotated, nothing left for a restart
    reply = await proxy.admin("POST", "/reload")
    assert json.loads(reply.body)["restart_required"] == [], reply.body


@pytest.mark.slow
async def test_with_workers_the_reload_answer_names_a_key_type_change_once(
        origin: Origin, tmp_path: Path, certs: Certs) -> None:
    """The listeners are the workers': the supervisor's answer carries what its workers could
    not apply (each name once), not only what its own config comparison found."""
    from tests.harness import spawn_cachegate, write_config

    config = write_config(str(tmp_path), origin.url, tls_config(certs))
    proc = await asyncio.to_thread(spawn_cachegate, ["run", "--config", config, "--workers", "2"])
    try:
        assert proc.admin_url is not None
        certs.use(ec_pair(tmp_path))
        status, body = await asyncio.to_thread(_post, proc.admin_url + "/reload")
        assert status == 200, body
        assert json.loads(body)["restart_required"] == [KEY_TYPE_KEPT], body
    finally:
        assert await asyncio.to_thread(proc.stop) == 0, proc.text


def _healthz(admin_url: str) -> tuple[int, dict[str, str]]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{admin_url}/healthz", timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
async def test_a_restarted_worker_serves_the_last_good_certificate_not_the_files_now(
        origin: Origin, tmp_path: Path, certs: Certs) -> None:
    """A key that does not match its certificate put in place: the reload is refused, and the
    workers go on with the old pair. A worker restarted after that (a crash, an OOM kill) read
    the files again, exited 2 at every restart, and once all had died both listeners refused
    connections while /healthz said ok. It now loads the pair from the supervisor's copy, as its
    siblings run it; and /healthz says degraded while no worker serves."""
    from tests.harness import spawn_cachegate, write_config

    origin.route("/a", body=b"a", headers=CC)
    config = write_config(str(tmp_path), origin.url, tls_config(certs))
    proc = await asyncio.to_thread(spawn_cachegate, ["run", "--config", config, "--workers", "2"])
    try:
        urls = [line.split("proxy listening on ", 1)[1].split()[0] for line in proc.output
                if "proxy listening on" in line]
        assert proc.admin_url is not None
        assert await asyncio.to_thread(_healthz, proc.admin_url) == (200, {"status": "ok"})
        shutil.copy(certs.b[0], certs.key)  # b's key, a's certificate: does not load
        proc.proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if any("reload rejected" in line for line in proc.output):
                break
            await asyncio.sleep(0.1)
        assert any("reload rejected" in line for line in proc.output), proc.text
        pids = [int(m.group(1)) for line in list(proc.output)
                if (m := re.search(r"worker \d ready \(pid (\d+)\)", line))]
        assert len(pids) == 2, proc.text
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for _ in range(100):  # both reaped (restarted after a backoff: they lived under 10 s)
            if {int(m.group(1)) for line in list(proc.output)
                    if (m := re.search(r"\(pid (\d+)\) exited with", line))} == set(pids):
                break
            await asyncio.sleep(0.05)
        status, body = await asyncio.to_thread(_healthz, proc.admin_url)
        assert status == 503 and body["status"] == "degraded", body
        assert body["reason"].startswith("no worker serves (2 configured)"), body
        for _ in range(200):
            if sum(" ready (pid" in line for line in proc.output) == 4:
                break
            await asyncio.sleep(0.1)
        assert sum(" ready (pid" in line for line in proc.output) == 4, proc.text
        assert "exited with 2" not in proc.text, proc.text
        for _ in range(6):
            conn = await Conn.open(urls[1])
            assert conn.peer_cert() == Certs.der(certs.a)  # the last good one, in every worker
            assert (await conn.get("/a"))[0] == 200
            conn.close()
        assert await asyncio.to_thread(_healthz, proc.admin_url) == (200, {"status": "ok"})
    finally:
        assert await asyncio.to_thread(proc.stop) == 0, proc.text


async def test_a_reload_that_lowers_client_header_timeout_shortens_the_tls_handshake_limit_too(
        origin: Origin, make_proxy: MakeProxy, certs: Certs) -> None:
    """The handshake's limit was fixed when the listener started: a reload lowering
    client_header_timeout shortened request heads at once but left handshakes (a handshake
    slowloris) at the old value, and said nothing (restart_required: []). It is now read at
    each connection."""
    proxy = await make_proxy(config=tls_config(certs) + "client_header_timeout: 60s\n")
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    config = Path(proxy.config_path)
    text = await asyncio.to_thread(config.read_text)
    await asyncio.to_thread(config.write_text, text.replace("client_header_timeout: 60s",
                                                            "client_header_timeout: 1s"))
    reply = await proxy.admin("POST", "/reload")
    assert reply.status == 200 and json.loads(reply.body)["restart_required"] == [], reply.body
    _, tls_url = proxy.listeners.proxy_urls
    host, port = tls_url.removeprefix("https://").rsplit(":", 1)
    for first in (b"", b"\x16\x03\x01\x02\x00\x01"):  # nothing; the start of a ClientHello
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(first)
            # closed by the server, long before the old 60 s (20 s only bounds a failing test)
            assert await asyncio.wait_for(reader.read(), 20) == b""
        finally:
            writer.close()


async def test_plain_http_sent_to_the_tls_port_gets_a_400_that_says_so_and_a_log_line(
        origin: Origin, make_proxy: MakeProxy, certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    """An http:// URL for the https:// port got an empty reply (curl: "Empty reply from
    server") and nothing was logged; now a plain 400 in nginx's words, then the close, and an
    INFO line. TLS connections on the same port are served as before."""
    origin.route("/a", body=b"a", headers=CC)
    proxy = await make_proxy(config=tls_config(certs))
    _, tls_url = proxy.listeners.proxy_urls
    host, port = tls_url.removeprefix("https://").rsplit(":", 1)
    caplog.set_level(logging.INFO, "cachegate.tls")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"Connection: close" in head, answer
    assert b"\r\nServer: cachegate\r\n" in head, answer
    assert body == b"400 Bad Request: the plain HTTP request was sent to HTTPS port\n"
    assert any(f"plain HTTP from 127.0.0.1 sent to the TLS listener on port {port}" in r.getMessage()
               for r in caplog.records), caplog.text
    conn = await Conn.open(tls_url)
    try:
        assert (await conn.get("/a"))[0] == 200
    finally:
        conn.close()


def test_the_first_bytes_tell_a_plain_http_request_from_a_tls_handshake() -> None:
    from proxy.web.tlsaccept import first_bytes

    for head, kind in ((b"GET / HTTP/1.1\r\n", "http"), (b"POST /", "http"), (b"get", "http"),
                       (b"\x16\x03\x01\x02\x00", "tls"), (b"\x80\x2e\x01", "tls"),  # SSLv2 hello
                       (b"\x00\x00", "tls"), (b" GET", "tls"), ("É".encode(), "tls")):
        assert first_bytes(head) == kind, head


def test_plain_http_on_a_tls_port_is_logged_within_a_budget(caplog: pytest.LogCaptureFixture) -> None:
    from proxy.web.tlsaccept import PlainHTTPLog

    now = [0.0]
    budget = PlainHTTPLog(lines=2, clock=lambda: now[0])
    caplog.set_level(logging.INFO, "cachegate.tls")
    for _ in range(5):
        budget.note("192.0.2.1", 443)
    now[0] = 61.0
    budget.note("192.0.2.1", 443)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[2].endswith("answered 400 (3 more left out of the log)"), lines


def _post_reload(admin_url: str) -> dict[str, object]:
    status, body = _post(f"{admin_url}/reload")
    assert status == 200, body
    answer: dict[str, object] = json.loads(body)
    return answer


@pytest.mark.slow
async def test_a_worker_restarted_after_a_key_type_change_serves_what_its_siblings_serve(
        origin: Origin, tmp_path: Path, certs: Certs) -> None:
    """A reload to a pair of another key type (RSA to EC) is applied but for the certificate,
    which the workers keep until a restart (``restart_required`` says so). A worker restarted
    after it started with the new EC pair from the supervisor's copy, while its siblings served
    the RSA one; it now starts with what they serve, and says the same at the next reload."""
    from tests.harness import spawn_cachegate, write_config

    origin.route("/a", body=b"a", headers=CC)
    config = write_config(str(tmp_path), origin.url, tls_config(certs))
    proc = await asyncio.to_thread(spawn_cachegate, ["run", "--config", config, "--workers", "2"])
    try:
        urls = [line.split("proxy listening on ", 1)[1].split()[0] for line in proc.output
                if "proxy listening on" in line]
        assert proc.admin_url is not None
        certs.use(ec_pair(tmp_path))
        answer = await asyncio.to_thread(_post_reload, proc.admin_url)
        assert answer["restart_required"] == [KEY_TYPE_KEPT], answer
        pids = [int(m.group(1)) for line in list(proc.output)
                if (m := re.search(r"worker \d ready \(pid (\d+)\)", line))]
        assert len(pids) == 2, proc.text
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for _ in range(200):
            if sum(" ready (pid" in line for line in proc.output) == 4:
                break
            await asyncio.sleep(0.1)
        assert sum(" ready (pid" in line for line in proc.output) == 4, proc.text
        for _ in range(6):  # only restarted workers run now
            conn = await Conn.open(urls[1])
            assert conn.peer_cert() == Certs.der(certs.a)
            assert (await conn.get("/a"))[0] == 200
            conn.close()
        answer = await asyncio.to_thread(_post_reload, proc.admin_url)
        assert answer["restart_required"] == [KEY_TYPE_KEPT], answer
    finally:
        assert await asyncio.to_thread(proc.stop) == 0, proc.text


# -- certificate and key files that cannot be read, or are half-copied ----------------------------


def _no_reader_waits(fifo: Path) -> bool:
    """Whether nothing holds ``fifo`` open for reading (a process blocked in its open would)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        return exc.errno == errno.ENXIO
    os.close(fd)  # a reader was waiting: it now reads an empty file and goes on
    return False


@pytest.mark.parametrize("field", ["cert", "key"])
def test_check_refuses_a_fifo_as_the_certificate_or_key_at_its_line(
        tmp_path: Path, certs: Certs, field: str) -> None:
    """A FIFO's open waits for a writer: OpenSSL opening the path hung ``check`` (and a start)
    without a word; the file is refused at its line, as ``upstream.tls.ca_file`` is."""
    fifo = certs.cert if field == "cert" else certs.key
    fifo.unlink()
    os.mkfifo(fifo)
    config = tmp_path / "c.yaml"
    config.write_text(f"upstreams: [http://127.0.0.1:9]\n{tls_config(certs)}")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    try:
        done = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(config)],
                              capture_output=True, text=True, timeout=30, env=env)
    except subprocess.TimeoutExpired:
        _no_reader_waits(fifo)
        pytest.fail("cachegate check hung on a FIFO")
    assert done.returncode == 2, done.stderr
    assert (f"{config}:4: listen[1].tls.{field}: cannot read {fifo}: is not a regular file (a FIFO)"
            in done.stderr), done.stderr


@pytest.mark.parametrize(("make", "says"), [
    (lambda p: p.unlink(), "{path} does not exist"),
    (lambda p: (p.unlink(), p.mkdir()), "{path} is a directory (a PEM file is expected)"),
])
@pytest.mark.parametrize("field", ["cert", "key"])
def test_check_says_which_file_is_missing_or_a_directory(
        tmp_path: Path, certs: Certs, field: str, make: Callable[[Path], object], says: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """OpenSSL's 'No such file or directory' named neither file nor setting."""
    path = certs.cert if field == "cert" else certs.key
    make(path)
    config = tmp_path / "c.yaml"
    config.write_text(f"upstreams: [http://127.0.0.1:9]\n{tls_config(certs)}")
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}:4: listen[1].tls.{field}: {says.format(path=path)}\n" in err, err
    assert "cannot load the certificate" not in err


def test_a_running_proxy_whose_certificate_became_a_fifo_refuses_the_reload_and_keeps_answering(
        tmp_path: Path, certs: Certs) -> None:
    """SIGHUP and POST /reload read the files again: a FIFO there never answered the reload, and
    once something wrote into it the event loop blocked in its open (every listener, /healthz
    too). Now the reload is refused naming the file, and nothing waits on the FIFO."""
    import urllib.error
    import urllib.request

    from tests.harness import spawn_cachegate, write_config

    config = write_config(str(tmp_path), "http://127.0.0.1:9", tls_config(certs))
    proc = spawn_cachegate(["run", "--config", config])
    try:
        assert proc.admin_url is not None
        certs.cert.unlink()
        os.mkfifo(certs.cert)
        proc.proc.send_signal(signal.SIGHUP)
        refused = f"listen[1].tls.cert: cannot read {certs.cert}: is not a regular file (a FIFO)"
        for _ in range(200):
            if any(refused in line for line in proc.output):
                break
            time.sleep(0.05)
        assert any(refused in line for line in proc.output), proc.text
        req = urllib.request.Request(proc.admin_url + "/reload", method="POST", data=b"{}",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                status, body = resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read().decode()
        assert status == 400 and refused in body, body
        assert _no_reader_waits(certs.cert)
        with urllib.request.urlopen(proc.admin_url + "/healthz", timeout=15) as resp:
            assert resp.status == 200
        https = next(line.split("proxy listening on ", 1)[1].split()[0] for line in proc.output
                     if "proxy listening on https" in line)
        assert _peer_cert(https) == Certs.der(certs.a)  # the certificate served stays
    finally:
        _no_reader_waits(certs.cert)  # let a reader blocked in the FIFO's open go
        proc.stop()


def test_a_reload_below_the_check_never_waits_on_a_fifo(tmp_path: Path, certs: Certs) -> None:
    """``ServerTLS.reload`` without the load's bytes reads the files itself: regular files only."""
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo)
    code = ("from proxy.tls import ServerTLS\n"
            f"t = ServerTLS({str(certs.cert)!r}, {str(certs.key)!r})\n"
            f"print(t.reload({str(fifo)!r}, {str(certs.key)!r}))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env)
    except subprocess.TimeoutExpired:
        _no_reader_waits(fifo)
        pytest.fail("ServerTLS.reload waited on a FIFO")
    assert done.stdout.strip() == (f"the current certificate stays: tls.cert: cannot read {fifo}: "
                                   "is not a regular file (a FIFO)"), done


def _cut(data: bytes, at: int) -> bytes:
    return data[:at]


def _garbled(data: bytes) -> bytes:
    lines = data.split(b"\n")
    lines[2] = b"*" + lines[2][1:]
    return b"\n".join(lines)


@pytest.mark.parametrize(("field", "change", "says"), [
    ("cert", lambda d: _cut(d, 600), "{cert} (tls.cert) holds a certificate block that is cut short "
                                     "(no -----END CERTIFICATE-----)"),
    ("key", lambda d: _cut(d, 800), "{key} (tls.key) holds a private key block that is cut short "
                                    "(no -----END PRIVATE KEY-----)"),
    ("cert", _garbled, "{cert} (tls.cert) holds a certificate block whose base64 does not decode"),
    ("key", _garbled, "{key} (tls.key) holds a private key block whose base64 does not decode"),
])
def test_a_half_copied_certificate_or_key_is_named_not_pem_lib(
        tmp_path: Path, certs: Certs, field: str, change: Callable[[bytes], bytes], says: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """OpenSSL says only ``[SSL] PEM lib`` of a file cut short: check, a start and a reload say
    which file, and that its block is cut short."""
    from proxy.tls import what_went_wrong

    path = certs.cert if field == "cert" else certs.key
    path.write_bytes(change(path.read_bytes()))
    expected = says.format(cert=certs.cert, key=certs.key)
    pem = (certs.cert.read_bytes(), certs.key.read_bytes())
    assert (what_went_wrong(str(certs.cert), str(certs.key), pem) or "").startswith(expected)
    config = tmp_path / "c.yaml"
    config.write_text(f"upstreams: [http://127.0.0.1:9]\n{tls_config(certs)}")
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert (f"{config}:4: listen[1].tls: cannot load the certificate {certs.cert} with the key "
            f"{certs.key}: {expected}") in err, err
    assert "PEM lib" not in err
    certs.use(certs.b)  # a running listener's reload says the same
    tls = ServerTLS(str(certs.cert), str(certs.key))
    path.write_bytes(change(path.read_bytes()))
    kept = tls.reload(str(certs.cert), str(certs.key)) or ""
    assert expected in kept, kept



def _read_after_a_pause(url: str, path: str, pause: float) -> bytes:
    """A client with a small receive buffer that reads nothing for ``pause`` seconds (cachegate
    meanwhile writes what the buffers take, and closes once the rest fits), then reads to the end."""
    host, port = url.split("://")[1].rsplit(":", 1)
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    raw.connect((host, int(port)))
    raw.settimeout(60)
    conn = client_context().wrap_socket(raw, server_hostname="a.test")
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n".encode())
    time.sleep(pause)
    data = b""
    with conn:
        while chunk := conn.recv(1 << 16):
            data += chunk
    return data.partition(b"\r\n\r\n")[2]


@pytest.mark.slow
async def test_a_slow_reader_over_tls_gets_the_whole_body_after_cachegate_closes(
        origin: Origin, tmp_path: Path, certs: Certs) -> None:
    """Once cachegate closes a TLS connection (Connection: close), uvloop's TLS gave what its
    own buffers still held 30 s (its default ssl_shutdown_timeout) to reach the client, then
    dropped it: a slow reader's large response arrived cut short, with no error (plain HTTP:
    whole). That bound is now ``send_timeout`` (the same bound on a client that reads nothing,
    before the close or after): clients that read nothing for most of it, then all: each
    whole. (Set short here: 33 s pauses under the 60 s default took 34 s of the suite.)
    Several sizes, as which of them leaves data in the TLS layer's buffers at the close
    (rather than all of it in the kernel's) depends on the kernel's buffer sizes."""
    from tests.harness import spawn_cachegate, write_config

    sizes = [(11 + n) << 18 for n in range(8)]  # 2.75 to 4.5 MiB
    body = bytes(range(256)) * ((sizes[-1] >> 8) + 1)
    for size in sizes:
        origin.route(f"/big{size}", body=body[:size], headers=CC)
    config = write_config(str(tmp_path), origin.url,
                          tls_config(certs, "cache: {max_object: 64MB}\nsend_timeout: 6s\n"))
    proc = await asyncio.to_thread(spawn_cachegate, ["run", "--config", config])
    try:
        https = next(line.split("proxy listening on ", 1)[1].split()[0] for line in proc.output
                     if "proxy listening on https" in line)
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(len(sizes)) as clients:  # all at once
            got = await asyncio.gather(*(loop.run_in_executor(clients, _read_after_a_pause, https,
                                                              f"/big{size}", 4.0) for size in sizes))
        assert [len(g) for g in got] == sizes
        assert all(g == body[:size] for g, size in zip(got, sizes, strict=True))
    finally:
        await asyncio.to_thread(proc.stop)


def _rss(pid: int) -> int:
    """The resident memory of process ``pid``, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.slow
@pytest.mark.parametrize(("scheme", "bound"), [("http", 10 << 20), ("https", 45 << 20)])
async def test_idle_connections_do_not_keep_the_largest_reply_they_were_sent(
        origin: Origin, tmp_path: Path, certs: Certs, scheme: str, bound: int) -> None:
    """50 clients each read a 1 MB memory hit to the end (half on the fast path, half on the
    general one: a Range of all of it) and stay connected, idle: the worker grows by well under
    the bodies' size.

    The general path's reply kept its body after it was sent, for as long as its connection
    stayed idle (aiohttp's loop holds a connection's last reply): +51 MB here, plain or TLS.
    Over TLS, the loop's TLS layer encrypts each write whole into the connection's outgoing
    memory BIO, which grows to the most it held and never shrinks: ~1.3 MB a connection, on
    either path (+67 to +85 MB here). After: plain +2 MB; TLS ~+33 MB: the loop's own 256 KB
    read buffer of each TLS connection, and an outgoing buffer of at most ~330 KB (a reply is
    handed to it 256 KB at a time)."""
    from tests.harness import spawn_cachegate, write_config

    body = os.urandom(1 << 20)
    origin.route("/big", body=body, headers=CC)
    config = write_config(str(tmp_path), origin.url,
                          tls_config(certs, "cache: {memory: 64MB, memory_max_object: 2MB}\n"))
    proc = await asyncio.to_thread(spawn_cachegate, ["run", "--config", config])
    conns: list[Conn] = []
    try:
        url = next(line.split("proxy listening on ", 1)[1].split()[0] for line in proc.output
                   if f"proxy listening on {scheme}:" in line)

        async def read_whole(ranged: bool) -> None:
            conn = await Conn.open(url)
            conns.append(conn)
            extra = "Range: bytes=0-\r\n" if ranged else ""
            conn.writer.write(f"GET /big HTTP/1.1\r\nHost: example.test\r\n{extra}\r\n".encode())
            head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 206" if ranged else b"HTTP/1.1 200"), head
            assert await asyncio.wait_for(conn.reader.readexactly(len(body)), 10) == body

        for ranged in (False, False, True):  # the fill, then a hit on either path
            await read_whole(ranged)
        await asyncio.sleep(0.3)
        before = _rss(proc.proc.pid)
        for n in range(50):
            await read_whole(n % 2 == 1)
        await asyncio.sleep(0.5)
        grown = _rss(proc.proc.pid) - before
        assert grown < bound, f"50 idle {scheme} connections after a 1 MB hit each: +{grown >> 20} MB"
    finally:
        for conn in conns:
            conn.close()
        await asyncio.to_thread(proc.stop)


def _pipelined_slowly(url: str, requests: bytes, pause: float) -> bytes:
    """Send ``requests`` at once on a TLS connection with a small receive buffer, read nothing
    for ``pause`` seconds, then read to the end (the last request closes the connection)."""
    host, port = url.split("://")[1].rsplit(":", 1)
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    raw.connect((host, int(port)))
    raw.settimeout(30)
    with client_context().wrap_socket(raw, server_hostname="a.test") as conn:
        conn.sendall(requests)
        time.sleep(pause)
        data = bytearray()
        while chunk := conn.recv(1 << 16):
            data += chunk
    return bytes(data)


async def test_replies_queued_behind_a_large_one_over_tls_come_whole_and_in_order(
        origin: Origin, make_proxy: MakeProxy, certs: Certs) -> None:
    """A large reply goes to the TLS layer in slices while it takes them; what is written after
    it (here the general path's next replies, behind the fast path's first) waits behind the
    rest, never between, and a close hands the rest over before it."""
    big, small = os.urandom(3 << 20), b"small body"
    origin.route("/big", body=big, headers=CC)
    origin.route("/small", body=small, headers=CC)
    proxy = await make_proxy(config=tls_config(certs, "cache: {memory: 64MB, memory_max_object: 4MB}\n"))
    tls_url = proxy.listeners.proxy_urls[1]
    conn = await Conn.open(tls_url)
    try:
        assert (await conn.get("/big"))[2] == big and (await conn.get("/small"))[2] == small  # the fills
    finally:
        conn.close()
    asks = [("/big", ""), ("/big", "Range: bytes=1-\r\n"), ("/small", ""), ("/big", "Connection: close\r\n")]
    requests = b"".join(f"GET {p} HTTP/1.1\r\nHost: example.test\r\n{extra}\r\n".encode() for p, extra in asks)
    bodies = [big, big[1:], small, big]
    got = await asyncio.to_thread(_pipelined_slowly, tls_url, requests, 1.0)
    for body in bodies:
        head, _, got = got.partition(b"\r\n\r\n")
        length = int(re.search(rb"\r\nContent-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        assert (length, got[:length]) == (len(body), body), head
        got = got[length:]
    assert got == b""
