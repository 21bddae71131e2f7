"""A TLS connection's replies handed to its TLS layer a slice at a time (``SlicedTLS``).

The loop's TLS layer (asyncio's ``sslproto`` and uvloop's, alike) encrypts each write at once
into the outgoing ``MemoryBIO`` of the connection's ``ssl.SSLObject``, and moves what that
holds to the TCP transport under it (at once, unless that transport paused it). The BIO is an
OpenSSL memory buffer that grows to the most it ever held and never shrinks until the
connection ends. So a 1 MB hit written whole (the fast path's one write, the general path's
``plain_reply``) left ~1.3 MB allocated for as long as its client kept the connection, after
the client had read all of it: 200 idle keep-alive TLS clients that had each read one held
+267 MB of the worker's RSS (plain HTTP: +1 MB; ``malloc_trim`` gives none of it back: the
memory is held, not free). Sliced writes alone do not cure it: once the TCP transport under
pauses the TLS layer (a client reading at network speed), every slice after waits in the BIO
(+1.5 MB a connection measured so), and the TLS layer pauses its protocol only past 512 KB.

So on a TLS connection a write of more than ``SLICE`` bytes is
handed to the TLS layer a slice at a time, and only while it has not paused the writes; the
rest (``_tail``) waits here, as plaintext that is freed as it goes, and is counted in what the
transport holds (``get_write_buffer_size``: ``send_timeout`` and ``max_unsent`` see it).
Everything written after it queues behind it (the order of the bytes is the transport's own).
The TLS layer's write high-water mark is ``HIGH_WATER`` (a plain transport's 64 KB, not its
512 KB): the BIO then holds at most about that plus a slice. The slices that fit go in one
call (``writelines``): the TLS layer writes to the socket once per call. The protocol (``LimitedHandler``)
tells ``held`` from its ``pause_writing``, and feeds the rest from its ``resume_writing``
(``feed``); while some is left, its writes stay paused (the fast path leaves requests to the
general path, whose writes queue here and wait in aiohttp's drain). A close hands over what
is left whole (the connection ends: its buffers go with it), an abort drops it.

Measured (one worker, uvloop, 200 keep-alive TLS clients each reading a 1 MB memory hit to
the end, then idle): +221 to +267 MB of RSS before, +122 MB after, about half of it the loop's
own 256 KB read buffer of each TLS connection (uvloop's ``SSLProtocol``, asyncio's alike),
resident because it lands in heap memory the bodies used before. Slices of 16 KB (one TLS
record) kept +58 MB there, but each was a write system call: 65 per 1 MiB hit against 3.4, and
1.35x the CPU per 1 MiB hit, 1.70x per 100 KiB (every reply over 16 KB sliced); with 256 KB
slices 0.96x and 1.02x (CPU per request beside the code before, 4 alternated rounds of ``wrk
-t1 -c4`` over TLS, one worker each), and 128 KB 1.22x for 1 MiB. Cost: plain connections
none (they are never wrapped); on TLS one method call per write.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

# The most plaintext handed to the TLS layer in one write, and the largest reply written whole:
# what its outgoing buffer grows to at most (a 1 MB reply written whole kept ~1.3 MB per idle
# connection). 16 KB (one TLS record's) made every 100 KiB hit a sliced one: 1.70x its CPU.
SLICE = 256 * 1024

# The TLS layer's write high-water mark on a sliced connection (its protocol paused past it):
# a plain transport's, where the loop's TLS layer pauses only past 512 KB.
HIGH_WATER = 64 * 1024


class SlicedTLS(asyncio.Transport):
    """``inner``, a TLS connection's transport, fed at most ``SLICE`` bytes a write while its
    TLS layer has not paused the writes (``held``, told by the protocol)."""

    __slots__ = ("_inner", "_queued", "_tail", "held")

    def __init__(self, inner: asyncio.Transport) -> None:
        super().__init__()
        self._inner = inner
        self._tail: deque[memoryview] = deque()
        self._queued = 0  # bytes in _tail
        self.held = False  # the TLS layer paused the writes (the protocol's pause_writing)
        inner.set_write_buffer_limits(HIGH_WATER)

    def write(self, data: Any) -> None:
        if not self._tail and len(data) <= SLICE:
            self._inner.write(data)  # (the common case)
            return
        if self._inner.is_closing():
            self._inner.write(data)  # (as before: the TLS layer counts and drops it)
            return
        # Held past this call: a copy of what its writer may change (aiohttp's are bytes).
        piece = memoryview(data if isinstance(data, bytes) else bytes(data)).cast("B")
        self._tail.append(piece)
        self._queued += len(piece)
        self.feed()

    def writelines(self, list_of_data: Any) -> None:
        if not self._tail:
            pieces = list(list_of_data)
            if sum(map(len, pieces)) <= SLICE:
                # One call (a chunk's size line, data and CRLF): the TLS layer flushes once, and
                # once shut down it warns once per call it drops (a half-closing client of a
                # chunked reply logged hundreds of "SSL connection is closed" lines when each
                # piece was a call of its own).
                self._inner.writelines(pieces)
                return
            list_of_data = pieces
        for data in list_of_data:
            self.write(data)

    def feed(self) -> bool:
        """Hand what waits over a slice at a time until the TLS layer pauses the writes (the
        protocol's ``pause_writing``, during a write, sets ``held``) or nothing is left; whether
        some is left."""
        tail, inner = self._tail, self._inner
        while tail and not self.held:
            # The slices that fit under the high-water mark, handed over in one call: the TLS
            # layer flushes to the socket once per call (a write() system call per 16 KB slice
            # made a 1 MiB hit over TLS cost 1.35x the CPU of one write; 100 KiB 1.70x).
            batch: list[memoryview] = []
            room = max(SLICE, HIGH_WATER - int(inner.get_write_buffer_size()))
            while tail and room > 0:
                first = tail[0]
                if len(first) <= SLICE:
                    tail.popleft()
                    piece = first
                else:
                    piece, tail[0] = first[:SLICE], first[SLICE:]
                self._queued -= len(piece)
                room -= len(piece)
                batch.append(piece)
            inner.writelines(batch)
        return bool(tail)

    def _hand_over(self) -> None:
        """Everything left to the TLS layer at once (its connection ends, or changes hands)."""
        tail = self._tail
        while tail:
            self._inner.write(tail.popleft())
        self._queued = 0

    def get_write_buffer_size(self) -> int:
        return int(self._inner.get_write_buffer_size()) + self._queued

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._inner.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner.set_write_buffer_limits(high, low)

    def close(self) -> None:
        self._hand_over()
        self._inner.close()

    def abort(self) -> None:
        self._tail.clear()
        self._queued = 0
        self._inner.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._hand_over()  # (the new protocol is not told of the TLS layer's pauses)
        self._inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner.get_protocol()

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)

    def is_reading(self) -> bool:
        return self._inner.is_reading()

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def write_eof(self) -> None:
        self._inner.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
