"""What a request aiohttp's parser refused is said to be, in a reply and in the log: words of
our own, never the request's bytes.

aiohttp's parser (llhttp) words a refusal as its reason, a blank line, then the offending line
quoted (``b'Cookie: session=...\\x01'``) with a caret under the bad byte: a header line's value
(a Cookie, an Authorization) or the whole request line (a token in its query). Replies say only
the reason (``refusal_reason``); the log line (``refusal_logged``) also names the header field,
by its name only, or the request line's method and path, without its query, so that an operator
can tell which client sent what, and no credential a client sent is written to the log.
"""

from __future__ import annotations

import ast
import re

from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidURLError,
    LineTooLong,
)

from proxy.policy.fields import is_token
from proxy.policy.request import FIELD_TOO_LONG, INVALID_CONTENT_LENGTH, LENGTH_AND_CODING
from proxy.shown import shown

# What the parser found wrong, by the first line of its message (llhttp's reason), named in
# words of our own: the rest of its message quotes the request's bytes (a Cookie's value, say),
# which a reply must not echo back (a proxy between could log or cache it).
_REASONS = (
    ("http/0.9 request", "HTTP/0.9 request (a request line without a version)"),
    ("duplicate 'host'", "duplicate Host header"),
    ("missing 'host'", "missing Host header"),
    ("transfer-encoding can't be present with content-length", LENGTH_AND_CODING),  # (as explain says
    ("content-length", INVALID_CONTENT_LENGTH),                                     # them: framing_refusal)
    ("transfer-encoding", "invalid Transfer-Encoding"),
    ("chunk", "invalid chunked body"),
    ("whitespace after header value", "folded header line (obs-fold) or stray whitespace"),
    ("invalid header token", "invalid character in a header field name"),
    ("invalid header value char", "invalid character in a header field value"),
    ("https traffic", "TLS on a plain HTTP port"),
    ("bad status line", "invalid request line"),
    ("invalid method", "invalid request line"),
    ("expected space after method", "invalid request line"),
    ("http version", "invalid request line"),
    ("expected lf", "bad line ending"),
    ("expected cr", "bad line ending"),
    ("data after `connection: close`", "data after a request that closes the connection"),
)


def refusal_reason(exc: HttpProcessingError) -> str:
    """A fixed text naming what is wrong with a request the parser refused (never its bytes)."""
    if isinstance(exc, InvalidURLError):
        return "malformed request target"
    if isinstance(exc, LineTooLong):
        return FIELD_TOO_LONG
    first = str(exc.message).split("\n", 1)[0].lower()
    for marker, reason in _REASONS:
        if marker in first:
            return f"malformed request: {reason}"
    return "malformed request"


# The parser's quote of the line it refused: a bytes literal after the blank line.
_QUOTED = re.compile(r"\n\n  (b(['\"]).*?\2)(?:\n|$)")
_SHOWN_PATH = 200  # a path's characters logged (as the client listener's "refused" lines cut it)


def refusal_logged(exc: HttpProcessingError) -> str:
    r"""What the log says of a request the parser refused: ``refusal_reason``, with the header
    field it was in (its name alone: never a value) or, for a request line, its method and the
    target's path (never its query). A line that shows neither safely adds nothing.

    >>> from aiohttp.http_exceptions import BadHttpMessage
    >>> refusal_logged(BadHttpMessage("Invalid header value char:\n\n  b'Cookie: s=SECRET\\x01'\n  ^"))
    'malformed request: invalid character in a header field value (in the Cookie field)'
    >>> refusal_logged(BadHttpMessage("Invalid method encountered:\n\n  b'G@T /a?t=SECRET HTTP/1.1'\n  ^"))
    'malformed request: invalid request line (G@T /a)'
    >>> refusal_logged(BadHttpMessage("Invalid header token:\n\n  b'Cookie s=SECRET: x'\n  ^"))
    'malformed request: invalid character in a header field name'
    """
    reason = refusal_reason(exc)
    found = _QUOTED.search(str(exc.message))
    if found is None:
        return reason
    try:
        line = ast.literal_eval(found.group(1)).decode("latin-1")
    except (ValueError, SyntaxError, UnicodeDecodeError):
        return reason
    if isinstance(exc, (BadHttpMethod, BadStatusLine, InvalidURLError)) or "request line" in reason:
        method, _, rest = line.partition(" ")
        path = rest.split(" ", 1)[0].split("?", 1)[0]
        path = path if len(path) <= _SHOWN_PATH else path[:_SHOWN_PATH] + "..."
        return f"{reason} ({shown(method[:20], keep='')} {shown(path, keep='')})"
    name, colon, _ = line.partition(":")
    if colon and is_token(name) and "field name" not in reason:
        return f"{reason} (in the {name[:64]} field)"
    return reason
