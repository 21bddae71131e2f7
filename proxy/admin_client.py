"""A small client for the admin API, used by ``cachegate purge`` (standard library only).

It speaks JSON to the admin listener with the token in ``Authorization: Bearer``
and turns every failure (refused connection, timeout, a 3xx/4xx/5xx answer) into one
``AdminClientError`` whose message is what the server said. A redirect is not followed: the
request carries the token, which must reach the admin listener named and nothing else.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from email.message import Message
from typing import IO, Any


class AdminClientError(Exception):
    pass


def admin_url_of(listen: tuple[str, int]) -> str:
    """The URL to reach an admin listener (a wildcard address is reached on loopback).

    >>> admin_url_of(("0.0.0.0", 8081)), admin_url_of(("::", 9)), admin_url_of(("::1", 9))
    ('http://127.0.0.1:8081', 'http://[::1]:9', 'http://[::1]:9')
    """
    host, port = listen
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuses every redirect (urllib would follow 301/302/303/307/308 with Authorization)."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: Message, newurl: str) -> None:
        fp.close()
        raise AdminClientError(f"the admin API at {req.full_url} answered {code} {msg}, a redirect "
                               f"to {newurl}: not followed, so that the token is not sent there; "
                               "give the admin listener's own URL")


def call_admin(base: str, method: str, path: str, body: Any, token: str | None,
               timeout: float = 60.0) -> str:
    """Send ``body`` as JSON; the answer's text on 2xx, else AdminClientError with the error."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base.rstrip("/") + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        # Straight to the admin listener: an http_proxy in the environment must not intercept it.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
        with opener.open(request, timeout=timeout) as resp:
            return str(resp.read().decode())
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            message = json.loads(text).get("error", text)
        except (ValueError, AttributeError):
            message = text.strip() or exc.reason
        raise AdminClientError(f"{exc.code} {exc.reason}: {message}") from None
    except urllib.error.URLError as exc:
        raise AdminClientError(f"cannot reach the admin API at {base}: {exc.reason}") from None
    except TimeoutError:
        raise AdminClientError(f"the admin API at {base} did not answer within {timeout:g} s") from None
    except ValueError as exc:
        raise AdminClientError(f"bad admin URL {base!r}: {exc}") from None
