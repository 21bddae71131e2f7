"""``cachegate warm --urls/--from-access-log`` take a regular file, a FIFO or pipe, or ``-``,
read as a stream.

``--urls /dev/zero`` was read whole, as one line, until memory ran out (4 GB in 6 s);
``--urls /etc`` printed a bare "[Errno 21] Is a directory". Now a device or a directory is
refused as the config's files are (``yamlsrc.open_regular``), exit 2 with a clear message, and
a line over ``MAX_SOURCE_LINE`` ends the command the same way, whatever the source.
The CLI runs as a real process, its address space capped: without the change, /dev/zero ends in
a MemoryError, not a machine out of memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import Origin

MAX_SOURCE_LINE = 1 << 20  # (proxy.cli's: a line of a URL list or access log)

ADDRESS_SPACE = 2 << 30  # far above what the command needs, far below what /dev/zero took


def _capped() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


async def _warm(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "warm", "--progress", "none", *args,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_capped)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"cachegate warm {' '.join(args)} did not end") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


URLS = "give a list of URLs, one a line"
LOG = "give an access log, one request a line"


@pytest.mark.parametrize(("option", "what"), [("--urls", URLS), ("--from-access-log", LOG)],
                         ids=["urls", "access-log"])
async def test_a_device_or_a_directory_is_refused_with_exit_2(tmp_path: Path, option: str, what: str) -> None:
    for path, why in [("/dev/zero", "is not a regular file (a device)"), (str(tmp_path), "is a directory")]:
        status, out, err = await _warm("--proxy", "http://127.0.0.1:9", option, path)
        assert (status, out, err) == (2, "", f"cachegate warm: {path} {why}: {what}\n")
    status, _, err = await _warm("--proxy", "http://127.0.0.1:9", option, str(tmp_path / "none"))
    assert (status, err) == (2, f"cachegate warm: {tmp_path / 'none'} does not exist\n")


async def test_a_line_over_the_bound_ends_the_command_whatever_the_source(tmp_path: Path) -> None:
    """Read as a stream: a file without line ends is not held whole (nor is standard input)."""
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"/a\n" + b"\x00" * (MAX_SOURCE_LINE + 1))
    status, out, err = await _warm("--proxy", "http://127.0.0.1:9", "--urls", str(blob))
    assert (status, out, err) == (2, "", f"cachegate warm: {blob}:2: a line of over 1 MiB (no URL or log "
                                         f"line is that long): {URLS}\n")
    status, _, err = await _warm("--proxy", "http://127.0.0.1:9", "--urls", "-",
                                 stdin=b"x" * (3 * MAX_SOURCE_LINE))
    assert (status, err) == (2, "cachegate warm: <stdin>:1: a line of over 1 MiB (no URL or log line is "
                                f"that long): {URLS}\n")


async def test_lines_are_still_read_across_reads_and_every_line_end(tmp_path: Path, origin: Origin) -> None:
    """CR LF split between two reads of the stream is one line end, not an empty line."""
    for path in ("/a", "/b", "/c"):
        origin.route(path, body=b"x", headers={"Cache-Control": "max-age=60"})
    head = b"#" + b"c" * ((1 << 16) - 2) + b"\r"  # the CR is the last byte of the first read
    listing = tmp_path / "urls.txt"
    listing.write_bytes(head + b"\n/a\r/b\r\n/c")
    status, out, err = await _warm("--proxy", origin.url, "--urls", str(listing))
    assert status == 0, err
    assert out.startswith("cachegate warm: 3 of 3 requests in "), out
    assert "  errors                0\n" in out, out


async def test_a_fifo_is_still_read_once_its_writer_comes(tmp_path: Path, origin: Origin) -> None:
    """(``--urls <(grep ...)``: a pipe, as the docs say; the open waits for the writer.)"""
    origin.route("/a", body=b"x")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    warm = asyncio.ensure_future(_warm("--proxy", origin.url, "--urls", str(fifo)))
    await asyncio.sleep(0.5)  # warm opens the FIFO first (or the writer's open below waits for it)

    def write() -> None:
        with open(fifo, "wb") as f:
            f.write(b"/a\n/a?x=1\n")

    await asyncio.to_thread(write)
    status, out, err = await warm
    assert status == 0, err
    assert out.startswith("cachegate warm: 2 of 2 requests in "), out


def test_what_a_fifos_writer_wrote_at_once_is_read() -> None:
    """A writer already waiting on the FIFO writes as soon as a reader opens it. The FIFO was
    opened without blocking (to look at what it is), closed, and opened again: what the writer
    wrote in between was dropped with the last reader gone, and the reader then waited for
    another writer for ever (11 of 50 here). A FIFO taken is now opened once."""
    import tempfile
    import threading

    from proxy.yamlsrc import open_regular

    lost = 0
    for _ in range(30):
        path = os.path.join(tempfile.mkdtemp(), "fifo")
        os.mkfifo(path)

        def write(path: str = path) -> None:
            with contextlib.suppress(BrokenPipeError), open(path, "wb") as f:
                f.write(b"/a\n")

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        time.sleep(0.01)  # the writer waits in its open for a reader
        read: dict[str, bytes] = {}

        def reader(path: str = path, read: dict[str, bytes] = read) -> None:
            with open_regular(path, fifo=True) as f:
                read["lines"] = f.read()

        r = threading.Thread(target=reader, daemon=True)
        r.start()
        r.join(2)
        if read.get("lines") != b"/a\n":
            lost += 1
            with contextlib.suppress(OSError):  # (a writer for the reader left waiting)
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        writer.join(2)
    assert lost == 0, f"{lost} of 30 FIFOs' lines lost"


def _blocked_reading(pid: int, waits: tuple[str, ...], within: float = 30.0) -> None:
    """Until the process waits in the kernel for a FIFO's writer or a pipe's data (its wchan)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            wchan = Path(f"/proc/{pid}/wchan").read_text()
        except OSError:  # not shown here: time enough to be in the read
            time.sleep(3)
            return
        if wchan in waits:
            return
        time.sleep(0.05)  # ("0": running)
    raise AssertionError(f"warm did not wait on its source within {within} s")


@pytest.mark.parametrize("source", ["fifo without a writer", "fifo whose writer stalls", "stdin"])
def test_ctrl_c_while_a_source_is_read_ends_with_130_and_the_summary(
        tmp_path: Path, origin: Origin, source: str) -> None:
    """Ctrl-C before any request (a FIFO or pipe waits for lines): it was a KeyboardInterrupt
    traceback and "killed by SIGINT" (the handler that makes it 130 came after the sources)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    name = "-" if source == "stdin" else str(fifo)
    # Ctrl-C's SIGINT as a terminal gives it: an ignored SIGINT is inherited, and the test
    # process may have one ignored (a full run's earlier test left it so: warm then never ended).
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "warm", "--progress", "none", "--proxy", origin.url,
                             "--urls", name], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    writer = -1
    try:
        if source == "fifo whose writer stalls":
            writer = os.open(fifo, os.O_WRONLY)  # (returns once warm has opened it to read)
            os.write(writer, b"/a\n")
        _blocked_reading(proc.pid, ("wait_for_partner",) if source == "fifo without a writer"
                         else ("pipe_read", "anon_pipe_read", "pipe_wait", "fifo_pipe_read"))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if writer >= 0:
            os.close(writer)
        if proc.returncode is None:
            proc.kill()
            proc.communicate()  # (its pipes closed, not left to the next test's collector)
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err
    assert out.startswith(b"cachegate warm: 0 of 0 requests in "), out
    assert b"(interrupted)" in out.splitlines()[0], out
