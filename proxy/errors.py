"""The one exception hierarchy of cachegate.

Every error carries a ``status_hint``: the HTTP status a client should see when
the error escapes to the proxy boundary (as h11's ``error_status_hint``), and a
``public`` text: what the client is told. The message itself (upstream addresses,
timeouts, parser detail) goes to the log with the request id, never to the client.
"""

from __future__ import annotations


class CachegateError(Exception):
    status_hint: int = 500
    public: str = "internal error"

    def public_text(self) -> str:
        """What the client may read about this error."""
        return self.public


class ConfigError(CachegateError):
    """One or more configuration problems, each already formatted ``FILE:LINE: message``."""

    def __init__(self, problems: list[str], warnings: list[str] | None = None) -> None:
        self.problems = problems
        self.warnings = warnings or []  # FILE:LINE: warning: ..., found beside the problems
        super().__init__("\n".join(problems))


class UnsetTokenVariable(ConfigError):
    """``admin.token`` names a ``${VAR}`` not set where a client command runs (``cachegate purge
    --config``): its own message says where the variable may be set instead."""


class UpstreamError(CachegateError):
    status_hint = 502
    public = "the origin server failed to answer"
    # The Cache-Status ``detail`` of the error reply a client gets for it (docs/admin-api.md).
    cache_detail = "UPSTREAM-UNREACHABLE"
    # Logged already (``first_report``): every client of a coalesced fetch gets this one error.
    reported = False
    # The upstream the failed request went to (the last one tried), for the access log's
    # ``upstream``; None when none was (all down, the stop).
    upstream: str | None = None
    # It came in the response's body, after the origin's head (it broke off, fell silent past
    # ``read``, ran past ``total``): the origin answered the request. Set where the body is
    # read (``UpstreamResponse.iter_chunks``); every client of the fetch shares it
    # (``proxy.flight.shares_failure``).
    in_body = False

    def __init__(self, message: str = "", *, detail: str | None = None) -> None:
        super().__init__(message)
        # What may be told to the client beside ``public``: the fault, never an address.
        self.detail = detail

    def public_text(self) -> str:
        return f"{self.public} ({self.detail})" if self.detail else self.public


class UpstreamConnectError(UpstreamError):
    """The connection could not be made, or broke before any response byte arrived."""

    public = "the origin server could not be reached"


class UpstreamTimeout(UpstreamError):
    status_hint = 504
    public = "the origin server did not answer in time"
    cache_detail = "UPSTREAM-TIMEOUT"


class UpstreamProtocolError(UpstreamError):
    """The upstream answered something that is not valid HTTP/1.1."""

    public = "the origin server sent an invalid response"
    cache_detail = "UPSTREAM-INVALID"


class UnaskedPartial(UpstreamProtocolError):
    """A 206 to a request that sent no Range (RFC 9110 §15.3.7): an origin that answers so does
    it for every request of the URL, so a whole fill of it cannot succeed (the range path stops
    asking for one for a while: ``MissPath.hold``)."""


class NoUpstreamAvailable(UpstreamError):
    """Every upstream of the pool is marked down."""

    status_hint = 503
    public = "no origin server is available"
    cache_detail = "NO-UPSTREAM"


class OutOfResources(UpstreamError):
    """cachegate could not open a connection to the upstream because the process (or the
    machine) ran out of file descriptors or socket memory: ``EMFILE``, ``ENFILE``, ``ENOBUFS``
    or ``ENOMEM`` from ``socket()`` or ``connect()`` (``proxy.http_client.exhausted``).
    cachegate's own failure, not the upstream's: never a passive or active health failure (a
    flood of idle client connections at the open-files limit took every healthy upstream out,
    and clients got 503 "no origin server is available" for the cool-down after it), not an
    upstream error kind (``cachegate_out_of_resources_total`` counts it), and not retried on
    another upstream (it would fail there too). 503 (RFC 9110 §15.6.4: a temporary condition of
    this server), ``detail=PROXY-ERROR``."""

    status_hint = 503
    cache_detail = "PROXY-ERROR"

    def __init__(self, message: str = "", *, detail: str | None = None, descriptors: bool = True) -> None:
        super().__init__(message, detail=detail)
        self.public = ("cachegate ran out of file descriptors" if descriptors
                       else "cachegate ran out of memory for sockets")


class ProxyStopping(UpstreamError):
    """The fetch was cut off because cachegate is stopping (its stop's deadline cancelled it,
    here or in the worker holding the key's lease), before its response head came. Not the
    origin's fault: no upstream warning or metric. It is an ``UpstreamError`` because its
    clients are answered as for a fetch that failed before its head: stale-if-error when
    allowed, else this error (503, RFC 9110 §15.6.4: a temporary condition)."""

    status_hint = 503
    public = "cachegate is stopping (restarting or shutting down); try again"
    cache_detail = "STOPPING"


class ResponseAborted(CachegateError):
    """A response body that cannot be completed for one client (it fell too far behind a
    shared fill that is not stored, or the fill ended before its body did): the web layer
    aborts that client's connection, so it never takes a truncated body for a complete one."""

    status_hint = 502


class StorageError(CachegateError):
    """A storage failure; callers degrade to a miss rather than fail the request."""


class BadRequest(CachegateError):
    """The client's own request is at fault: its message is what the client is told."""

    status_hint = 400

    def public_text(self) -> str:
        return str(self) or "bad request"


class ClientBodyError(BadRequest):
    """The client's request body broke off (or did not match its own framing) while it was being
    forwarded upstream. The client's failure, never the upstream's: it is not counted against the
    upstream's health nor in its error metrics (else a client that breaks off a few uploads takes
    every upstream out for everyone), and it ends the exchange: the upstream connection the body
    was going to is dropped, never reused half-sent. Raised from reading the client's body only,
    never from the upstream's socket."""

    public = "the request body broke off"
    cache_detail = "PROXY-ERROR"

    def public_text(self) -> str:
        return self.public  # the message names the upstream: for the log only


class ClientGone(ClientBodyError):
    """The client's connection closed or was reset while its request body was coming: nobody is
    left to answer (the access log's 499), and not an error of cachegate's."""


class BodyTimedOut(ClientBodyError):
    """The client's request body did not come in time: ``client_body_timeout`` of silence, or
    slower than ``client_body_min_rate`` (``proxy.web.bodyreader``). 408 (RFC 9110 §15.5.9, as
    nginx answers), not 400 "broke off": the client is told it was too slow, and the connection
    is closed once the answer is written, without reading the rest of the body."""

    status_hint = 408
    public = "the request body did not arrive in time"


class BodyRefused(ClientBodyError):
    """The parser refused the request body's framing after the body began, in a later read than
    its head (a malformed chunk-size line, a trailer with too many fields): the request is
    refused as a head would be for the same fault (``status``, ``text``: 400 or 431, in the
    parser refusal's fixed words), at once, and the upload to the upstream, if it began, is
    aborted (its connection dropped). Before, the body's reader was never told: it waited
    ``client_body_timeout`` for more body and answered 408, holding the upstream connection
    with half a body meanwhile."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status_hint = status
        self.public = text


class BodyCutOff(ClientBodyError):
    """The client was still sending its request body when cachegate's stop reached the end of
    shutdown_grace (aiohttp's shutdown fails the body's stream). Not the client's fault, but a
    ``ClientBodyError`` all the same: it comes from reading the client's body, so it is never
    counted against the upstream, and it ends the upstream exchange. Answered as a client
    still waiting for its head is at the deadline (``ProxyStopping``): 503, then the connection
    closes without reading the rest (RFC 9112 §9.6 lets a server answer before the body's end)."""

    status_hint = 503
    public = ProxyStopping.public
    cache_detail = ProxyStopping.cache_detail


class PurgeUnavailable(CachegateError):
    """A purge that cannot be carried out now: in cluster mode, Redis unreachable (nothing was
    purged, on this node or any other, unless the message says that it may have been made:
    Redis did not answer its append); the cache directory's filesystem full (the disk tier
    could not record it: not carried out, or only in part). The admin API answers 503 with its
    message; the caller may retry. Defined here, not in ``proxy.purge``, so that the storage
    layer can raise it (``proxy.purge`` imports the storage)."""

    status_hint = 503


def first_report(exc: UpstreamError) -> bool:
    """Whether this is the first report of ``exc`` (and note it): one failed origin fetch is
    one warning in the error log, however many clients coalesced on it got the error."""
    if exc.reported:
        return False
    exc.reported = True
    return True


def drop_traceback(exc: BaseException) -> None:
    """Cut a caught exception from the frames it was raised through. A reset met while waiting
    for the socket to drain is aiohttp's drain waiter's exception, and its traceback holds the
    frame that holds the waiter: a reference cycle through every frame between, the handler's
    (the request, the response, the body file, the chunk in hand) included. Left to the cyclic
    collector, which a serving process runs rarely (``proxy.gctuning``), 20,000 aborted disk
    hits held 200 MB; cut, they are freed when the handler returns.
    A stream's stored exception (a request body's reset) is the same: it holds the frame
    that holds the stream."""
    exc.__traceback__ = None
