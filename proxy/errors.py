"""The one exception hierarchy of cachegate.

Every error carries a ``status_hint``: the HTTP status a client should see when
the error escapes to the proxy boundary (as h11's ``error_status_hint``). The web
layer translates them in exactly one place (``web.middlewares``).
"""

from __future__ import annotations


class CachegateError(Exception):
    status_hint: int = 500


class ConfigError(CachegateError):
    """One or more configuration problems, each already formatted ``FILE:LINE: message``."""

    def __init__(self, problems: list[str], warnings: list[str] | None = None) -> None:
        self.problems = problems
        self.warnings = warnings or []  # FILE:LINE: warning: ..., found beside the problems
        super().__init__("\n".join(problems))


class UpstreamError(CachegateError):
    status_hint = 502


class UpstreamConnectError(UpstreamError):
    """The connection could not be made, or broke before any response byte arrived."""


class UpstreamTimeout(UpstreamError):
    status_hint = 504


class UpstreamProtocolError(UpstreamError):
    """The upstream answered something that is not valid HTTP/1.1."""


class NoUpstreamAvailable(UpstreamError):
    """Every upstream of the pool is marked down."""

    status_hint = 503


class ResponseAborted(CachegateError):
    """A response body that cannot be completed for one client (it fell too far behind a
    shared fill that is not stored, or the fill ended before its body did): the web layer
    aborts that client's connection, so it never takes a truncated body for a complete one."""

    status_hint = 502


class StorageError(CachegateError):
    """A storage failure; callers degrade to a miss rather than fail the request."""


class BadRequest(CachegateError):
    status_hint = 400
