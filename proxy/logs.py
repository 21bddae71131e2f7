"""Request ids, the access log (JSON lines or combined) and the structured error log.

**Request ids.** Every client request has one: the ``X-Request-Id`` a trusted peer
(``trusted_proxies``) sent, when it is a sane token, else a new one. It is sent upstream
with the request, returned to the client, and written in every log line about the request:
its access log line, and the error log lines logged while it is handled (``REQUEST``, a
context variable, which the flights a request starts inherit). A new id is a per-process
random prefix and a counter (``3f9c2a1b-1a``): 0.13 µs, against 2.5 µs for
``uuid.uuid4()`` (an ``os.urandom`` system call each; ``timeit``, best of 15 × 50,000), on the
fast hit path where a whole request costs about 7 µs of Python. 32 random bits per process
keep two processes (workers, restarts, nodes) from sharing a prefix in practice, and the
counter keeps one process's ids apart.

**Access log.** ``access_log: {format: json|combined, path: stdout|FILE}``. The request
path only records a tuple (``AccessLog.add``); formatting and writing happen in batches:
the records of one event-loop iteration (every request its connections' bytes carried) are
formatted and written together by a ``call_soon`` at the end of it (or at ``MAX_BATCH``
records), with one ``write`` per batch to a file, and writes of at most ``PIPE_BUF`` bytes,
cut at line ends, to a pipe, socket or terminal. Times are kept as ``time.perf_counter()``
readings on the request path and turned into wall-clock time when the batch is written.

**Whole lines on a shared pipe.** Several workers write to the same standard output, and
Linux keeps a write to a pipe whole (never interleaved with another process's) only up to
``PIPE_BUF`` (4096) bytes. A line is longer mostly when a client made it so (a long path,
Host, Referer or User-Agent, longer still once escaped: 7,000 ``"`` are 14,000 bytes of JSON),
but also with a long ``cache_status`` or ``upstream``, so on any sink that is not a regular file
a longer line has its values cut (``_fit``: the client's first), each cut one ending in ``…``,
until the line fits, whatever its values. Why cut rather than lock: a lock between the
workers held for a whole line would hold every worker's writes behind a slow reader, and
could not keep a line whole anyway where the descriptor is non-blocking (a write of more than
``PIPE_BUF`` may then be partial, and the rest may never fit); a write of at most
``PIPE_BUF`` to a pipe is all or nothing in both modes. A regular file keeps its lines whole
(``O_APPEND``: one write is one append) and whole values: nothing is cut there. But a full disk
may cut a write short inside a line: see ``AccessLog._write_file``.

**Error log.** Every line of cachegate's own logging (warnings, errors, tracebacks) is one
line per event, with the worker and the request id; JSON objects when the access log is JSON.
Warnings that come at the rate of requests (an origin that is down) are summarised, one line a
while per kind with a count (``Summarised``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import itertools
import json
import logging
import os
import re
import secrets
import stat
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from proxy.policy.cache_status import cache_status
from proxy.settings import AccessLogSettings

MAX_BATCH = 256  # records: a batch this long is written at once (a flush holds the loop ≈ 0.7 ms)
PIPE_BUF = 4096  # writes up to this size to a pipe are atomic (POSIX)
CUT_MARK = "\u2026"  # "…": the end of a value cut to keep its line within PIPE_BUF
# The access log's writes: the end of a run of failures is logged once none failed this long;
# a writer that has not written this long looks at the file's end first (AccessLog._write_file).
WRITES_SETTLE = 10.0  # seconds
CHECK_AFTER = 0.01  # seconds
# A file's end seen mid-line is looked at again once a write being copied in is over: another
# worker's write shows that way for a moment (the file grows a page at a time: 4 % of looks
# during one, measured), and a line end put before it was a blank line once it was whole (6 in
# 365,000 lines of a two-worker soak). A write of no bytes waits for it (Linux appends under the
# file's lock, which a write of nothing takes too: one blocked 1.15 s behind a 200 MB append on
# ext4); a pause of END_SETTLE more, for a filesystem that does not: a look a millisecond later
# alone still saw a write the scheduler had paused (1 blank line in 400,000 under bursts).
END_SETTLE = 0.001  # seconds
# Warnings that repeat at the request rate (an upstream's failures: ``Summarised``) are one line
# per this while and kind. 5 s: rsyslog's recommended rate-limit interval, 12 lines a minute for
# each upstream and failure (journald drops a service's lines past 10,000 per 30 s),
# and the end of an outage is in the log within 5 s (the metrics, scraped every 15 s or so,
# count every failure).
SUMMARY_WINDOW = 5.0  # seconds
# What differs between failures that are alike (``failure_text``): numbers (ports, byte counts,
# errnos, IPv4 addresses) and IPv6 addresses (hex digits between colons).
_VARYING = re.compile(r"(?:[0-9A-Fa-f]{0,4}:){2,}(?:[0-9A-Fa-f.]*[0-9A-Fa-f]|(?<=::))|\d+")
# And what a message quotes (a Python literal, ``b'...'`` or ``'...'``, to its end or the
# message's): a peer's own bytes, such as the line the response parser failed in.
_QUOTED = re.compile(r"""(?<!\w)(b?)(['"])(?:\\.?|(?!\2)[^\\])*(?:\2|$)""", re.DOTALL)


# -- request ids ---------------------------------------------------------------------------

# What a kept X-Request-Id may be: visible ASCII without quotes or backslashes (it goes
# into log lines and upstream requests as it is), at most 200 characters.
_VALID_ID = re.compile(r"[!#-\[\]-~]{1,200}")


class RequestIds:
    """X-Request-Id values: a trusted peer's, else a per-process prefix and a counter."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix if prefix is not None else secrets.token_hex(4) + "-"
        self._prefix_bytes = self.prefix.encode()
        self._count = itertools.count(1)

    def new(self) -> str:
        return f"{self.prefix}{next(self._count):x}"

    def new_bytes(self) -> bytes:
        """``new()`` as bytes, for a pre-serialised head (the fast path)."""
        return b"%s%x" % (self._prefix_bytes, next(self._count))

    def take(self, headers: Mapping[str, str], trusted: bool) -> str:
        """The id of a request with these fields, from a peer ``trusted`` or not."""
        if trusted:
            given = headers.get("X-Request-Id")
            if given is not None and _VALID_ID.fullmatch(given):
                return given
        return self.new()


class RequestInfo:
    """What one request's log line needs besides its message: filled in as it is handled
    (the engine adds the cache key and the upstream it went to)."""

    __slots__ = ("at_hand", "cache_status", "client_left", "host", "key", "request_id", "sent", "target",
                 "upstream", "upstream_time", "url", "x_cache")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.host: str | None = None  # as the cache sees it (normalised), once the head is read
        self.target: str | None = None
        self.url: str | None = None
        self.key: str | None = None
        self.upstream: str | None = None
        self.upstream_time: float | None = None
        self.x_cache = "ERROR"
        self.cache_status: str | None = None
        self.client_left = False  # the client closed before its answer was complete
        # The tier of an answer whose body is at hand (aiohttp writes it with the head once the
        # handler returns): counted then, with what its line says (the client may be gone).
        self.at_hand: str | None = None
        # Body bytes of a streamed answer handed to the connection so far: what its line says
        # when the answer ends early (the client left, or the stop cut it off).
        self.sent = 0


# The request being handled in this task (and in the flights it started): its id and
# what the engine learns about it. None outside a client request.
REQUEST: contextvars.ContextVar[RequestInfo | None] = contextvars.ContextVar("cachegate_request",
                                                                             default=None)


def note_key(key: str) -> None:
    """The engine found the request's cache key (the access log writes its hash)."""
    info = REQUEST.get()
    if info is not None:
        info.key = key


def note_upstream(name: str, seconds: float) -> None:
    """The request went to upstream ``name``, whose response head took ``seconds``."""
    info = REQUEST.get()
    if info is not None:
        info.upstream = name
        info.upstream_time = seconds


def key_hash(key: str) -> str:
    """What the access log writes for a cache key: 64 bits of BLAKE2b, in hex."""
    return hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


# -- the access log ------------------------------------------------------------------------

# One record, as the request path leaves it (positions, for speed):
#  0 end (time.perf_counter())   1 duration (s)   2 request id (str or bytes)   3 client
#  4 method   5 host   6 target   7 HTTP version (major, minor)   8 status   9 body bytes
# 10 X-Cache-Status   11 Cache-Status (str), or the ttl (float) of a fast-path hit
# 12 cache key or None   13 upstream or None   14 upstream time (s) or None
# 15 request fields (for Referer and User-Agent), or None
Record = tuple[Any, ...]

_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f"\\\x7f-\U0010ffff]').search


# A lone surrogate: how aiohttp keeps a byte of a field that is not UTF-8 (surrogateescape).
_SURROGATE = re.compile("[\ud800-\udfff]")


def _json_str(value: str | None) -> str:
    """``value`` as a JSON string; an ASCII one without quotes or controls as it is (one
    check). A byte that was not UTF-8 becomes U+FFFD: ``json.dumps`` wrote it as a lone
    surrogate (``\\udcff``), which is not Unicode, and strict JSON readers (I-JSON, RFC 7493)
    refuse the line or drop the value."""
    if value is None:
        return "null"
    if _NEEDS_ESCAPE(value) is None:
        return f'"{value}"'
    return json.dumps(_SURROGATE.sub("\ufffd", value))


# A combined-format field's escapes: every byte but printable ASCII, the quote and the backslash.
_QUOTED_ESCAPES = {c: f"\\x{c:02X}" for c in range(256) if not 0x20 <= c <= 0x7E or c in b'"\\'}


def _quoted(value: str | None) -> str:
    """A combined-format field in double quotes ("-" when absent), escaped like nginx: each byte
    of its UTF-8 that is not printable ASCII, and a quote or backslash, as ``\\xHH``. By a table
    (``str.translate``) rather than a generator's step per byte: a client's User-Agent of 8,000
    quotes took 6.5 ms of the event loop that way, 0.46 ms this way (``timeit``, the shared
    machine), on every such request."""
    if not value:
        return '"-"'
    if _NEEDS_ESCAPE(value) is None:
        return f'"{value}"'
    return '"' + value.encode("utf-8", "surrogateescape").decode("latin-1").translate(_QUOTED_ESCAPES) + '"'


class _Clock:
    """perf_counter readings -> wall-clock texts, formatted once per second."""

    def __init__(self) -> None:
        self.anchor()
        self._second = self._ms = -1
        self._iso = self._clf = self._ms_text = ""

    def anchor(self) -> None:
        self.wall, self.perf = time.time(), time.perf_counter()

    def wall_of(self, perf: float) -> float:
        return self.wall - (self.perf - perf)

    def iso(self, wall: float) -> str:
        """RFC 3339, UTC, milliseconds: 2026-12-03T14:24:55.123Z (the lines of a busy batch
        share their milliseconds: the last text is kept)."""
        ms = int(wall * 1000)
        if ms == self._ms:
            return self._ms_text
        second = ms // 1000
        if second != self._second:
            self._set(second)
        self._ms = ms
        self._ms_text = text = f"{self._iso}.{ms % 1000:03d}Z"
        return text

    def clf(self, wall: float) -> str:
        """The common log format's time, UTC: 03/Dec/2026:14:24:55 +0000"""
        second = int(wall)
        if second != self._second:
            self._set(second)
        return self._clf

    def _set(self, second: int) -> None:
        t = time.gmtime(second)
        self._second = second
        self._iso = time.strftime("%Y-%m-%dT%H:%M:%S", t)
        self._clf = time.strftime("%d/%b/%Y:%H:%M:%S +0000", t)


_NO_UPSTREAM = '"upstream":null,"upstream_us":null,'
MAX_TAILS = 4096  # the fixed parts of JSON lines kept (URL and outcome); cleared when full
# Characters of one kept tail and the strings its key holds (path, host, cache key): a longer
# one is formatted anew each time, so the kept tails hold at most MAX_TAILS × TAIL_KEPT
# characters (≈ 4 MiB, about 6 MB with the objects around them) whatever URLs clients send.
TAIL_KEPT = 1024
# Cache-Status of a fast-path hit: this and floor(ttl) (as proxy.web.fastpath writes it).
_HIT_PREFIX = cache_status(hit=True, ttl=0.0)[:-1]


class AccessLog:
    """The access log of one process: records in, lines out in batches (see the module docstring)."""

    def __init__(self, settings: AccessLogSettings, worker: str,
                 dropped: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self.worker = worker
        self._count_dropped = dropped  # the metric: called with a number of lines not written
        self._batch: list[Record] = []
        self._scheduled = False  # a flush is due at the end of this event-loop iteration
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock = _Clock()
        self._fd = -1
        self._own_fd = False
        self._pipe = False
        self._format = self._json if settings.format == "json" else self._combined
        # Whether records carry the request's fields (Referer, User-Agent: combined only); JSON
        # records then hold only strings and numbers, nothing for the garbage collector to
        # follow, and keep no request's fields alive until their batch is written.
        self.wants_fields = settings.format == "combined"
        self._tails: dict[tuple[Any, ...], str] = {}  # the fixed end of JSON lines (see _json)
        # Failed writes (a full disk): see ``_write_file``.
        self._failures = RepeatedFailure(logging.getLogger("cachegate.access"),
                                         "writing the access log (lines dropped meanwhile)",
                                         settle=WRITES_SETTLE, traceback=False)
        self._failed_writes = 0  # in this run of failures (0: none)
        self._dropped = 0  # lines not written in this run of failures
        self._suspect = False  # a write failed since the last one that did not: look at the file's end
        self._last_write = float("-inf")  # perf_counter() at the last write
        self._torn = b""  # the rest of the line a short write cut, to finish it with
        self._torn_end = -1  # where the file ended then (this descriptor's offset after the cut line)
        self._reader = -1  # a descriptor that reads the file (-2: none can), for its last byte
        self.open()

    # -- the sink --------------------------------------------------------------------------

    def open(self) -> None:
        path = self.settings.path
        if path == "stdout":
            self._fd, self._own_fd = sys.stdout.fileno(), False
        else:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._own_fd = True
        self._pipe = not stat.S_ISREG(os.fstat(self._fd).st_mode)

    def reopen(self) -> None:
        """After logrotate moved the file (SIGHUP): write on into a new file at the path."""
        self.flush()
        if self._own_fd:
            old = self._fd
            self._forget_file()
            self.open()
            os.close(old)

    def close(self) -> None:
        self.flush()
        self._forget_file()
        if self._own_fd and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def _forget_file(self) -> None:
        """Before this descriptor's file is left: the rest of a cut line is not written."""
        if self._torn:
            self._torn = b""
            self._drop(1)
        if self._reader >= 0:
            os.close(self._reader)
        self._reader = -1
        self._last_write = float("-inf")  # the next file may end with another writer's cut line

    # -- records ---------------------------------------------------------------------------

    def add(self, record: Record) -> None:
        """Keep a record for the next batch (the request path's only cost)."""
        batch = self._batch
        batch.append(record)
        if not self._scheduled:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            self._scheduled = True
            loop.call_soon(self._flush_soon)
        elif len(batch) >= MAX_BATCH:
            self.flush()

    def _flush_soon(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Format and write every record kept so far (and the rest of a line a full disk cut)."""
        batch, self._batch = self._batch, []
        if (not batch and not self._torn) or self._fd < 0:
            return
        self._clock.anchor()
        fmt = self._format
        lines = [fmt(r) for r in batch]
        try:
            if self._pipe:
                if lines and max(map(len, lines)) > PIPE_BUF:  # (ASCII lines: characters are bytes)
                    lines = [line if len(line) <= PIPE_BUF else self._fit(r)
                             for line, r in zip(lines, batch, strict=True)]
                self._write_pieces(lines)
            else:
                self._write_file("".join(lines).encode("utf-8", "surrogateescape"), len(lines))
        except OSError as exc:
            self._failed_writes += 1
            self._failures.failed(exc, traceback=False)
            return
        if self._failed_writes:
            self._worked()

    def _write_pieces(self, lines: list[str]) -> None:
        """To a pipe (socket, terminal): pieces of at most PIPE_BUF, each written whole or not
        at all (a pipe's), so a failure cuts no line: the lines of the pieces not written are
        dropped."""
        pieces = list(pipe_pieces(lines))
        for i, piece in enumerate(pieces):
            try:
                self._write_all(piece)
            except OSError:
                self._drop(sum(p.count(b"\n") for p in pieces[i:]))
                raise

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def _write_file(self, body: bytes, count: int) -> None:
        """Append ``body``, ``count`` whole lines, to the file in one write.

        **A full disk.** A write the disk has room for only in part writes that part and stops,
        most often inside a line; the lines after it are dropped (counted: ``_drop``), and what
        the file then ends with, half a line, is what the next write would be appended to: the
        next line was glued to it, and neither read as a line (``{"time":"2026-12-05T16:31{"time":
        ...``). The file is not cut back to where it ended before (``ftruncate``): every worker
        appends to it through its own descriptor (``O_APPEND``; ``open``), so what follows the
        half line may already be another worker's line, and a log reader (``tail -F``, a log
        shipper) that has read the half line takes a file that shrinks for one rotated in place
        and reads it all again from its start. The file is only ever appended to, and:

        - the writer that cut the line keeps the rest of it (``_torn``) and, at its next write,
          when the file still ends where its cut line did (nobody appended since: ``_mend``),
          writes that rest first: the line is whole and nothing is lost but the lines after it;
        - a writer that finds the file ending elsewhere, and not with a line end (another
          worker's cut line: still so once a write being copied in is over), starts its
          write with ``\n``: the half line stays a line of its own, unreadable but alone, and
          every other line is whole (the writer that cut it then finds the file ending
          elsewhere: its line's rest is dropped).

        Looking at the file's end costs two system calls (``lseek``, ``pread``: about 0.8 µs,
        where the write takes 1.2), so a writer looks only when it may have missed a cut: after a
        write of its own failed (every worker writing while the disk is full fails too, and then
        looks at each try until one works), and before a write CHECK_AFTER or longer after its
        last one (an idle worker, which did not try while the disk was full: at most 1/CHECK_AFTER
        looks a second, none on a busy worker, whose writes are closer). Left unmended: a worker
        that wrote less than CHECK_AFTER before the disk filled, not while it was full, and right
        after space was freed, before the worker whose line was cut.

        The failures themselves are logged once per run of them (``RepeatedFailure``: the first
        at once, then once a minute with a count, and how many writes failed and lines were
        dropped when writes have worked for WRITES_SETTLE seconds): one line per failed batch
        made 50,704 error lines in 3 s at 29,000 requests a second, on a standard error that is
        often on the full disk too."""
        head, finishing = b"", False
        if self._suspect or self._clock.perf - self._last_write >= CHECK_AFTER:
            head, finishing = self._mend()
        self._last_write = self._clock.perf
        data = head + body if head else body
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, memoryview(data)[written:])
        except OSError:
            self._suspect = True
            self._cut(head, finishing, body, count, written)
            raise
        self._suspect = False

    def _mend(self) -> tuple[bytes, bool]:
        """What this write must start with for the file to go on at a line's start: the rest of
        the line this writer cut when the file still ends with that cut line (and True), a line
        end when it ends with half of another line, else nothing (see ``_write_file``)."""
        torn, self._torn = self._torn, b""
        end = os.lseek(self._fd, 0, os.SEEK_END)
        if torn and end == self._torn_end:
            return torn, True
        if torn:
            self._drop(1)  # the cut line stays half written, on a line of its own
        if end == 0 or self._last_byte(end) in (b"\n", None):
            return b"", False
        os.write(self._fd, b"")  # (rare: waits for a write in progress; see END_SETTLE)
        time.sleep(END_SETTLE)
        if os.lseek(self._fd, 0, os.SEEK_END) != end or self._last_byte(end) in (b"\n", None):
            return b"", False
        return b"\n", False

    def _last_byte(self, end: int) -> bytes | None:
        """The file's byte at ``end - 1``, read through a descriptor of its own (the one written
        to may be write-only: standard output redirected to a file); None when it cannot be read."""
        if self._reader == -1:
            try:
                self._reader = os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._reader = -2
        if self._reader < 0:
            return None
        try:
            return os.pread(self._reader, 1, end - 1)
        except OSError:
            return None

    def _cut(self, head: bytes, finishing: bool, body: bytes, count: int, written: int) -> None:
        """A write of ``head`` (the rest of a cut line when ``finishing``) and ``body`` failed
        after ``written`` bytes: the lines not written are dropped, but the rest of a line cut,
        kept to finish it with."""
        if finishing and written < len(head):  # the cut line still not finished
            if written:
                self._torn, self._torn_end = head[written:], os.lseek(self._fd, 0, os.SEEK_CUR)
            else:
                self._torn = head  # the file ends where it did
            self._drop(count)
            return
        wrote = max(0, written - len(head))
        whole = body.count(b"\n", 0, wrote)
        if wrote and body[wrote - 1] != 0x0A:  # a line cut
            self._torn = body[wrote:body.index(b"\n", wrote) + 1]
            self._torn_end = os.lseek(self._fd, 0, os.SEEK_CUR)
            self._drop(count - whole - 1)
        else:
            self._drop(count - whole)

    def _drop(self, lines: int) -> None:
        if lines > 0:
            self._dropped += lines
            if self._count_dropped is not None:
                self._count_dropped(lines)

    def _worked(self) -> None:
        """A write worked in a run of failures: its end is logged once writes have worked for
        WRITES_SETTLE seconds."""
        if self._failures.succeeded(f", after {self._failed_writes} failed writes; "
                                    f"{self._dropped} lines dropped"):
            self._failed_writes = self._dropped = 0

    # -- formats ---------------------------------------------------------------------------

    def _json(self, r: Record) -> str:
        """One JSON line: what changes per request first, then the fields that repeat for every
        request of one URL and outcome, formatted once and kept (``_tails``): on a busy
        server most lines are hits on few URLs. The request id (a kept one is checked: no
        quotes, backslashes or control characters), the client address, the method (a token,
        by the parser) and the cache status name need no escaping; the rest is escaped when
        it must be. ``timeit`` (best of 15, the shared machine): 0.9–1.3 µs a line, where
        formatting every field each time took about 5 µs."""
        method = r[4]
        if method is None:
            return self._json_refused(r)
        rid = r[2]
        if type(rid) is bytes:
            rid = rid.decode("latin-1")
        cs = r[11]
        cs = f'"{_HIT_PREFIX}{int(cs)}"' if type(cs) is float else _json_str(cs)
        fixed = (method, r[5], r[6], r[8], r[9], r[10], r[12])
        tail = self._tails.get(fixed)
        if tail is None:
            tail = self._tail(fixed)
        clock = self._clock
        line = (f'{{"time":"{clock.iso(clock.wall - (clock.perf - r[0] + r[1]))}","request_id":"{rid}",'
                f'"client":"{r[3]}","duration_us":{int(r[1] * 1e6)},"cache_status":{cs},')
        upstream = r[13]
        if upstream is None:
            return line + _NO_UPSTREAM + tail
        upstream_time = r[14]
        return (line + f'"upstream":{_json_str(upstream)},"upstream_us":'
                f'{"null" if upstream_time is None else int(upstream_time * 1e6)},' + tail)

    def _tail(self, fixed: tuple[Any, ...]) -> str:
        """The end of a line, kept for the next line of the same URL and outcome unless it is
        long (``TAIL_KEPT``): 6,000 distinct 8,000-character URLs kept 4,096 tails of 16 KB
        (escaped) and their 8 KB paths and keys, +130 MB a worker never gave back."""
        method, host, path, status, size, x_cache, key = fixed
        hashed = "null" if key is None else f'"{key_hash(key)}"'
        tail = (f'"method":"{method}","host":{_json_str(host)},"path":{_json_str(path)},"status":{status},'
                f'"bytes":{size},"cache":"{x_cache}","key":{hashed},"worker":"{self.worker}"}}\n')
        if len(tail) + len(path or "") + len(host or "") + len(key or "") <= TAIL_KEPT:
            if len(self._tails) >= MAX_TAILS:
                self._tails.clear()
            self._tails[fixed] = tail
        return tail

    def _json_refused(self, r: Record) -> str:
        """A request the HTTP parser refused: no method or path to tell."""
        clock = self._clock
        return (f'{{"time":"{clock.iso(clock.wall - (clock.perf - r[0] + r[1]))}","request_id":"{r[2]}",'
                f'"client":"{r[3]}","duration_us":{int(r[1] * 1e6)},"cache_status":{_json_str(r[11])},'
                f'{_NO_UPSTREAM}"method":null,"host":{_json_str(r[5])},"path":{_json_str(r[6])},'
                f'"status":{r[8]},"bytes":{r[9]},"cache":"{r[10]}","key":null,"worker":"{self.worker}"}}\n')

    def _combined(self, r: Record) -> str:
        rid = r[2]
        if isinstance(rid, bytes):
            rid = rid.decode("latin-1")
        headers = r[15]
        referer = headers.get("Referer") if headers is not None else None
        agent = headers.get("User-Agent") if headers is not None else None
        version = r[7]
        # A request the parser refused has no request line to tell: "-", as nginx writes it.
        request = None if r[4] is None else f"{r[4]} {r[6]} HTTP/{version[0]}.{version[1]}"
        return (f"{r[3] or '-'} - - [{self._clock.clf(self._clock.wall_of(r[0] - r[1]))}] "
                f"{_quoted(request)} {r[8]} {r[9]} {_quoted(referer)} {_quoted(agent)} "
                f"cache={r[10]} duration_us={int(r[1] * 1e6)} request_id={rid}\n")

    def _fit(self, r: Record, limit: int = PIPE_BUF) -> str:
        """The line of ``r`` within ``limit`` bytes (it was longer), each value cut ending in
        ``CUT_MARK``. First the values a client chose (host, path and query; Referer and
        User-Agent in the combined format), cut to what room the rest of the line leaves, as
        escaped, shared out evenly (a short value keeps all it needs). When the rest alone
        leaves too little room even with the client's values cut to their mark, cachegate's
        other long values are cut too (in JSON ``cache_status``, whose ``detail`` may name a
        long rule, and ``upstream``): then every value shares the room, evenly, a short one
        keeping all it needs. Last, while the line is still too long (a share too small for the
        mark), the widest value is cut by the excess. What is never cut is bounded: the time,
        numbers, the method (llhttp's list), the request id (at most 200 characters), the
        client's address, the cache key's hash, the worker. So every line fits, whatever its
        values.

        Cut rather than written whole under a lock between the workers: see the module
        docstring. Only lines over ``limit`` come here, at the cost of a few escapes of each
        value cut (``_cut``)."""
        as_json = self._format == self._json
        width = _json_width if as_json else _quoted_width
        # Where the values that may be long are (a record's position, or a request field's
        # name), the client's first; the JSON's cache_status is a str but for a fast-path hit.
        slots: tuple[int | str, ...] = (5, 6, 11, 13) if as_json else (6, "Referer", "User-Agent")
        chosen = 2 if as_json else 3
        values = [_value(r, slot) for slot in slots]
        base = len(self._format(_with_values(r, slots, [v and "" for v in values])))
        widths = [width(v) if v else 0 for v in values]
        room = limit - base
        mark = width(CUT_MARK)
        least = sum(min(w, mark) for w in widths[:chosen])  # the client's values cut to their mark
        rest = widths[chosen:]
        if sum(rest) + least <= room:  # the others whole: the client's values share what is left
            shares = _shares(widths[:chosen], room - sum(rest)) + rest
        else:  # every value shares the room (a short host keeps all of it, a 6 KB detail does not)
            shares = _shares(widths, room)
        kept = [v if not v or w <= share else _cut(v, share, width)
                for v, w, share in zip(values, widths, shares, strict=True)]
        line = self._format(_with_values(r, slots, kept))
        while len(line) > limit:  # (the lines are ASCII: characters are bytes)
            kept_widths = [width(v) if v else 0 for v in kept]
            widest = max(range(len(kept)), key=kept_widths.__getitem__)
            value = values[widest]
            if value is None or kept_widths[widest] <= mark:
                break  # nothing left to cut (never: what is not cut is bounded, see above)
            kept[widest] = _cut(value, kept_widths[widest] - (len(line) - limit), width)
            line = self._format(_with_values(r, slots, kept))
        return line


def _json_width(value: str) -> int:
    """Characters ``value`` takes in a JSON line (escaped, without its quotes)."""
    return len(_json_str(value)) - 2


# The bytes a combined-format field keeps as they are; every other byte is written \xHH.
_PLAIN = bytes(c for c in range(256) if c not in _QUOTED_ESCAPES)


def _quoted_width(value: str) -> int:
    """Characters ``value`` takes in a combined-format line (``_quoted``, without its quotes)."""
    data = value.encode("utf-8", "surrogateescape")
    return len(data) + 3 * len(data.translate(None, _PLAIN))


def _cut(value: str, room: int, width: Callable[[str], int]) -> str:
    """The longest start of ``value`` that, with ``CUT_MARK`` after it, takes at most ``room``
    characters once escaped. A guess from the escapes' density, then bisection, the range
    narrowed by what one character takes at least (one): two or three escapes (``width``, at C
    speed) for a value escaped evenly, some twelve at worst."""
    room -= width(CUT_MARK)
    lo, hi = 0, min(len(value), room)
    if hi <= 0:
        return CUT_MARK
    taken = width(value[:hi])
    if taken <= room:
        return value[:hi] + CUT_MARK
    guess = hi * room // taken
    taken = width(value[:guess])
    if taken <= room:
        lo, hi = guess, min(hi, guess + room - taken)
    else:
        hi = guess - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        taken = width(value[:mid])
        if taken <= room:
            lo, hi = mid, min(hi, mid + room - taken)
        else:
            hi = mid - 1
    return value[:lo] + CUT_MARK


def _shares(widths: list[int], room: int) -> list[int]:
    """``room`` shared out among values of these widths: each gets what it needs, up to an
    even share of what the smaller ones left."""
    shares = [0] * len(widths)
    left = len(widths)
    for i in sorted(range(len(widths)), key=widths.__getitem__):
        shares[i] = min(widths[i], max(room, 0) // left)
        room -= shares[i]
        left -= 1
    return shares


def _value(r: Record, slot: int | str) -> str | None:
    """The value at ``slot`` of ``r`` (``AccessLog._fit``): a position, or a request field's name;
    None when there is none or it is not a string (a fast-path hit's ttl)."""
    if isinstance(slot, str):
        headers = r[15]
        value = headers.get(slot) if headers is not None else None
    else:
        value = r[slot]
    return value if isinstance(value, str) else None


def _with_values(r: Record, slots: tuple[int | str, ...], values: list[str | None]) -> Record:
    """``r`` with the values at ``slots`` replaced, but where a value is None (``AccessLog._fit``)."""
    new = list(r)
    fields: dict[str, str | None] | None = None
    if r[15] is not None:
        fields = {"Referer": r[15].get("Referer"), "User-Agent": r[15].get("User-Agent")}
        new[15] = fields
    for slot, value in zip(slots, values, strict=True):
        if value is None:
            continue
        if isinstance(slot, str):
            if fields is not None:
                fields[slot] = value
        else:
            new[slot] = value
    return tuple(new)


def pipe_pieces(lines: list[str], limit: int = PIPE_BUF) -> Iterator[bytes]:
    """``lines`` joined into writes of at most ``limit`` bytes, each ending at a line end (a
    single longer line, which ``AccessLog._fit`` leaves none of, would be a write of its own)."""
    piece: list[bytes] = []
    size = 0
    for line in lines:
        data = line.encode("utf-8", "surrogateescape")
        if size + len(data) > limit and piece:
            yield b"".join(piece)
            piece, size = [], 0
        piece.append(data)
        size += len(data)
    if piece:
        yield b"".join(piece)


# -- the error log -------------------------------------------------------------------------


class LineFormatter(logging.Formatter):
    """cachegate's own log records, one line each, with the worker and the request id:
    JSON objects, or text (``TIME LEVEL LOGGER worker=W request_id=R: message``)."""

    def __init__(self, worker: Callable[[], str], as_json: bool) -> None:
        super().__init__()
        self._worker = worker
        self.as_json = as_json
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        info = REQUEST.get()
        rid = info.request_id if info is not None else None
        message = record.getMessage()
        exc = None
        if record.exc_info and record.exc_info[0] is not None:
            exc = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        when = self._clock.iso(record.created)
        if self.as_json:
            out: dict[str, Any] = {"time": when, "level": record.levelname.lower(), "logger": record.name,
                                   "worker": self._worker(), "request_id": rid, "message": message}
            suppressed = getattr(record, "suppressed", None)  # (``Summarised``)
            if suppressed is not None:
                out["suppressed"] = suppressed
                if getattr(record, "summary", False):
                    out["summary"] = True
            if exc is not None:
                out["exc"] = exc
            return json.dumps(out, ensure_ascii=False)
        line = f"{when} {record.levelname} {record.name} worker={self._worker()} request_id={rid or '-'}: " \
               f"{message}"
        if exc is not None:
            line += " | " + exc
        return line.replace("\r", "\\r").replace("\n", "\\n")


# The worker this process is: "0".."N-1", "supervisor", or "0" when it runs alone; and
# whether its lines for the operator are JSON (when the access log is).
_worker_label = "0"
_json_lines = False


def worker_label() -> str:
    return _worker_label


def setup_logging(level: str | None = None, as_json: bool | None = None, worker: str | None = None) -> None:
    """cachegate's own log on standard error, one line per event. The CLI calls it at start
    with the level, then once the config is read (JSON when the access log is JSON; again at
    each reload); a worker names itself. What is not given stays as it was."""
    global _worker_label, _json_lines
    if worker is not None:
        _worker_label = worker
    if as_json is not None:
        _json_lines = as_json
    root = logging.getLogger()
    if level is not None:
        root.setLevel(getattr(logging, level.upper()))
    handler = next((h for h in root.handlers if getattr(h, "cachegate", False)), None)
    if handler is None and level is None:
        return  # not the command line's process (tests, an embedding app): its logging is its own
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.cachegate = True  # type: ignore[attr-defined]
        handler.setFormatter(LineFormatter(worker_label, False))
        root.addHandler(handler)
    if as_json is not None:
        handler.setFormatter(LineFormatter(worker_label, as_json))


def say(message: str, level: str = "info", **fields: Any) -> None:
    """A line for the operator on standard output (start-up, listeners, workers, stop): the
    text, or a JSON object with ``fields`` beside it when the logs are JSON (``level``
    "warning" when the line carries one)."""
    if _json_lines:
        line = json.dumps({"time": _Clock().iso(time.time()), "level": level, "logger": "cachegate",
                           "worker": _worker_label, "message": message, **fields}, ensure_ascii=False)
    else:
        line = message
    try:
        write_line(sys.stdout, line)
    except OSError as exc:
        # Standard output's reader is gone (a log shipper that died: EPIPE) or its disk is
        # full: the line is lost, never what it announces. Raised, it ended the supervisor's
        # task that restarts a dead worker (the line came first), its watchdog (before the
        # kill), and the stop (exit 1 with a traceback).
        _OUTPUT.failed(exc, traceback=False)
    else:
        _OUTPUT.succeeded()


def tell(message: str) -> None:
    """A line on standard error for the operator (why cachegate cannot start or goes on
    without something), lost rather than raised when standard error cannot be written
    (``say``): what follows the line must still happen."""
    with contextlib.suppress(OSError):  # (nowhere left to say so)
        write_line(sys.stderr, message)


def write_line(stream: Any, line: str) -> None:
    """``line`` and its line end in one write, flushed. ``print`` writes the text and the
    ``\n`` apart, which an unbuffered stream (``PYTHONUNBUFFERED=1``, common in container
    images) passes on as two writes: on the standard output the supervisor and its workers
    share, another process's line landed between them, and two JSON lines were one."""
    stream.write(line + "\n")
    stream.flush()


class RepeatedFailure:
    """Logs a background job's failure with its traceback once, then the same failure once a
    minute with how often it happened meanwhile, and when it works again. At the open-files
    limit the storage upkeep failed every second, and a traceback each time buried the log.

    Each distinct failure is throttled on its own (up to ``KEPT`` of them): a job whose steps
    fail in turn (one round at its index, the next at a shard, as whichever thread runs it has a
    connection open or not) logged a traceback every round when only the last was remembered.

    ``settle``: "works again" only once nothing failed for that many seconds (a job whose tries
    fail and succeed in turn, as writes do on a full disk between the small ones that still fit,
    would log its recovery and its failure again at every turn). ``traceback`` False: the first
    failure's line without its traceback (for every failure of this job; ``failed`` takes it for
    one), at ``level`` (an expected failure: a lock's timeout). ``then``: what happens meanwhile,
    after the failure's line ("retrying": a job that runs again; a request answered otherwise)."""

    KEPT = 16

    def __init__(self, logger: logging.Logger, what: str, every: float = 60.0, *, settle: float = 0.0,
                 traceback: bool = True, level: int = logging.ERROR, then: str = "retrying") -> None:
        self.log = logger
        self.what = what
        self.then = then
        self.every = every
        self.settle = settle
        self.traceback = traceback
        self.level = level
        # failure -> [failures not logged yet, when last logged]; oldest first
        self._failing: dict[tuple[type[Exception], str], list[float]] = {}
        self._failed_at = 0.0

    def failed(self, exc: Exception, *, traceback: bool = True) -> None:
        """``traceback``: false for a failure its message explains (not a bug)."""
        now = time.monotonic()
        # An OSError by its errno (its message names a file, a different one each time), and
        # where it was raised: another step failing the same way is another failure.
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""
        key = (type(exc), (str(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc)) + where)
        self._failed_at = now
        state = self._failing.get(key)
        if state is None:
            if len(self._failing) >= self.KEPT:
                del self._failing[next(iter(self._failing))]
            self._failing[key] = [0, now]
            if traceback and self.traceback:
                self.log.log(self.level, "%s failed; %s", self.what, self.then, exc_info=exc)
            else:
                self.log.log(self.level, "%s failed: %s; %s", self.what, exc, self.then)
            return
        state[0] += 1
        if now - state[1] >= self.every:
            self.log.log(self.level, "%s still failing (%d more times in %.0fs): %s: %s", self.what,
                         state[0], now - state[1], type(exc).__name__, exc)
            state[0], state[1] = 0, now

    def succeeded(self, detail: str = "") -> bool:
        """The job worked: True when that ends a run of failures (logged, ``detail`` after
        "works again")."""
        if self._failing and time.monotonic() - self._failed_at >= self.settle:
            self.log.warning("%s works again%s", self.what, detail)
            self._failing.clear()
            return True
        return False


def failure_text(exc: BaseException) -> str:
    """``exc`` as a kind of failure (a ``Summarised`` key's part): its type and message, its
    numbers, IPv6 addresses and quoted text masked, so that the same failure with another byte
    count, port or address of the upstream's is the same kind, and another failure (refused
    after closed) is not. Quoted text is the peer's: the response parser's error quotes the line
    it failed in, and an origin whose malformed field echoed the request's path made each
    request a kind of its own (7,064 requests, 7,064 lines, no summary).

    >>> failure_text(ConnectionError("http://[2001:db8::5]:8080: received 1000 of 4096 bytes"))
    'ConnectionError: http://[#]:#: received # of # bytes'
    >>> failure_text(OSError("[Errno 111] Connect call failed ('10.0.0.5', 9000)"))
    "OSError: [Errno #] Connect call failed ('#', #)"
    >>> failure_text(ValueError("o: invalid response: Invalid header token: b'X-Bad\\\\x01: /a\\\\'b"))
    "ValueError: o: invalid response: Invalid header token: b'#'"
    """
    text = _QUOTED.sub(r"\1\2#\2", str(exc)[:300])
    return f"{type(exc).__name__}: {_VARYING.sub('#', text)}"


class _Streak:
    """One kind of warning's lines (``Summarised``): when its last line went out, how many like
    it were not logged since, and the last of those (its logger, level, format and arguments)."""

    __slots__ = ("count", "last", "since")

    def __init__(self, since: float) -> None:
        self.since = since
        self.count = 0
        self.last: tuple[logging.Logger, int, str, tuple[Any, ...]] | None = None


class Summarised:
    """Warnings that repeat at the rate of requests, summarised: at most one line per
    ``window`` for each kind (``key``: the caller's, e.g. an upstream and its kind of failure).

    The first warning of a kind is logged at once, as it is (its request id with it); the ones
    of that kind within ``window`` after it are only counted (each at DEBUG, so ``--log-level
    debug`` still shows every one), and once the window is over one line says how many there
    were, with the last one's message: ``... (57 more like it in the last 5.0s, not logged one
    by one)``, ``suppressed`` and ``summary`` in a JSON line. That line opens the next window:
    while the failures go on, a kind writes one line per window. A warning that comes after a
    window with none counted is logged at once again; one that finds a count not yet said
    (the timer late) says it: ``... (and 57 more like it in the last 5.2s)``. Why: an origin
    down under load logged one line per failed request (4,368 for an outage of a second at 20
    connections), and a long outage's millions of identical lines ran into journald's rate limit
    (10,000 lines per 30 s by default), which then dropped the lines that mattered.

    The count is said by one timer for all kinds, armed for the first window with a count to
    end: armed again only by a count in a window that ends sooner (one kind's count waited for
    another's timer, up to a window late), no timer per warning, and nothing at all on the way
    of a request that does not warn. At most ``KEPT`` kinds are held (a kind with nothing counted
    is dropped when its window is over); past that the oldest is said and forgotten."""

    KEPT = 1024

    def __init__(self, window: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = SUMMARY_WINDOW if window is None else window
        self._clock = clock
        self._kinds: dict[Any, _Streak] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0  # when ``_timer`` runs (``clock``'s time)

    def warning(self, logger: logging.Logger, key: Any, msg: str, *args: Any, stacklevel: int = 2) -> None:
        """``logger.warning(msg, *args)``, or counted when a line of ``key`` went out less than
        ``window`` ago; ``stacklevel`` as ``logging``'s (the line's place: the caller's)."""
        self.log(logging.WARNING, logger, key, msg, *args, stacklevel=stacklevel + 1)

    def log(self, level: int, logger: logging.Logger, key: Any, msg: str, *args: Any, stacklevel: int = 2
            ) -> None:
        """``warning`` at ``level`` (the connection cap's closings of lingering connections are
        INFO: nothing failed)."""
        now = self._clock()
        streak = self._kinds.get(key)
        if streak is not None and now - streak.since < self.window:
            streak.count += 1
            streak.last = (logger, level, msg, args)
            logger.debug(msg, *args, stacklevel=stacklevel)
            due = streak.since + self.window
            if self._timer is None or due < self._due:
                self._arm(due, now)
            return
        if streak is None:
            if len(self._kinds) >= self.KEPT:
                self._forget(now)
            streak = self._kinds[key] = _Streak(now)
        more, span = streak.count, now - streak.since
        streak.since, streak.count, streak.last = now, 0, None
        if more:
            logger.log(level, f"{msg} (and %d more like it in the last %.1fs)", *args, more, span,
                       extra={"suppressed": more}, stacklevel=stacklevel)
        else:
            logger.log(level, msg, *args, stacklevel=stacklevel)

    def flush(self, final: bool = False) -> None:
        """Say the counts of the windows that are over (every count, when ``final``)."""
        self._timer = None
        now = self._clock()
        due: float | None = None
        for key, streak in list(self._kinds.items()):
            over = now - streak.since >= self.window
            if streak.count and (over or final):
                self._say(streak, now)
            elif over:
                del self._kinds[key]  # nothing counted: the next one is logged at once anyway
                continue
            if streak.count:
                at = streak.since + self.window
                due = at if due is None else min(due, at)
        if due is not None and not final:
            self._arm(due, now)

    def close(self) -> None:
        """Say what is still counted, and stop the timer (at a stop)."""
        if self._timer is not None:
            self._timer.cancel()
        self.flush(final=True)

    def _say(self, streak: _Streak, now: float) -> None:
        assert streak.last is not None
        logger, level, msg, args = streak.last
        more, span = streak.count, now - streak.since
        streak.since, streak.count, streak.last = now, 0, None
        logger.log(level, f"{msg} (%d more like it in the last %.1fs, not logged one by one)", *args, more,
                   span, extra={"suppressed": more, "summary": True})

    def _forget(self, now: float) -> None:
        key = next(iter(self._kinds))
        streak = self._kinds.pop(key)
        if streak.count:
            self._say(streak, now)

    def _arm(self, due: float, now: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test's own call): said at the next line or the close
            return
        if self._timer is not None:
            self._timer.cancel()
        # In a context of its own: the one at hand is a request's, and the line is about none.
        self._timer = loop.call_later(max(due - now, 0.0), self.flush, context=contextvars.Context())
        self._due = due


# ``say``'s failed writes: logged once (standard error may still be read), then once a minute.
_OUTPUT = RepeatedFailure(logging.getLogger("cachegate"),
                          "writing to standard output (lines dropped meanwhile)", settle=WRITES_SETTLE,
                          traceback=False)
