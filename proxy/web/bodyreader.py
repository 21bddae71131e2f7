"""A client's request body read under time limits, for both listeners (the proxy's request
bodies and the admin API's JSON)."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from proxy.errors import BodyCutOff, BodyTimedOut, ClientGone, drop_traceback

# What aiohttp's ``StreamReader`` raises (a ``RuntimeError``) when a read begins on a connection
# already gone (aiohttp 3.14, ``streams.py``: ``_wait``): matched exactly, so that no other
# ``RuntimeError`` is taken for a client gone.
CONNECTION_CLOSED = ("Connection closed.",)


class BodyReader:
    """Reads a client's request body with two limits: at most ``silence`` seconds
    (``client_body_timeout``) for any one read, and, when ``min_rate`` is set
    (``client_body_min_rate``), an average of ``min_rate`` bytes a second after an allowance of
    ``silence`` seconds: by the body's n-th byte, cachegate must have waited for it at most
    ``silence + n / min_rate`` seconds, as Apache's mod_reqtimeout counts. Only the time spent
    waiting in ``read`` counts: a client is not blamed for the time cachegate took before it
    read (an upstream connection to free up in a busy pool, the origin's 100 Continue that an
    ``Expect`` client waits for, an origin reading slowly). A per-read limit alone let a body
    trickled a byte every few seconds hold an upstream connection for as long as it liked.
    Running out is the client's failure (``BodyTimedOut``: 408)."""

    __slots__ = ("_content", "_min_rate", "_protocol", "_silence", "_waited", "received")

    def __init__(self, request: web.BaseRequest, silence: float, min_rate: int) -> None:
        self._content = request.content
        self._protocol = request.protocol
        self._silence = silence
        self._min_rate = min_rate
        self._waited = 0.0  # seconds spent in ``read`` so far
        self.received = 0

    async def read(self, size: int) -> bytes:
        timeout = self._silence
        slow = False
        if self._min_rate:
            allowed = self._silence + self.received / self._min_rate - self._waited
            if allowed < timeout:
                timeout, slow = allowed, True
            if timeout <= 0:
                raise self._too_slow()
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                chunk = await self._content.read(size)
        except TimeoutError:
            if slow:
                raise self._too_slow() from None
            raise BodyTimedOut(f"no byte of the request body for {self._silence:g}s") from None
        except ConnectionError as exc:
            # The client's connection closed or was reset mid-body (aiohttp: "Connection lost"):
            # its failure, not cachegate's (it went to the catch-all as a 500 with a traceback).
            drop_traceback(exc)  # (the stream keeps it: a cycle through these frames)
            raise ClientGone(f"the client's connection closed {self.received} bytes into the "
                                  f"request body: {exc}") from None
        except RuntimeError as exc:
            if self._protocol.connected or exc.args != CONNECTION_CLOSED:
                raise  # (any other, or one an aiohttp upgrade adds: a fault, not the client's going)
            # The connection closed before the request's handler began (max_connections closes
            # the oldest connection waiting for its client, one whose request body is still
            # coming among them; or the client left then), and aiohttp still hands the request
            # over. Its connection_lost fails the body of the request being handled only
            # (``ConnectionError``, above): a read of this one says "Connection closed." (it
            # went to the handler's catch-all, an ERROR with a traceback per request).
            raise ClientGone(f"the connection closed before the request's handling began, {self.received} "
                             "bytes into its body") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # this task is cancelled
            # The stream failed, not this task: aiohttp's shutdown does that to a body still
            # coming at the end of shutdown_grace. Its client gets 503 then, not a closed connection.
            raise BodyCutOff(f"the request body was cut off at the stop's deadline ({self.received} bytes "
                             "in)") from None
        finally:
            self._waited += time.monotonic() - started
        self.received += len(chunk)
        return chunk

    def at_eof(self) -> bool:
        """Whether the body has ended and all of it was read (no ``read`` needed to learn it)."""
        return self._content.at_eof()

    def _too_slow(self) -> BodyTimedOut:
        return BodyTimedOut(f"the request body came slower than {self._min_rate} bytes/s "
                               f"({self.received} bytes)")
