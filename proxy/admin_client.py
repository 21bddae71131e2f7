"""A small client for the admin API, used by ``cachegate purge``, ``top`` and ``health``
(standard library only).

Before it sends the token it makes sure the address is the admin listener's
(``AdminAPI.check``: an unauthenticated ``GET /healthz`` whose answer must carry
``Cachegate-Admin``, and no field the client listener adds to what it relays); then it speaks
JSON to the admin listener with the token in ``Authorization: Bearer``, refuses any answer that
is not the admin listener's own, and turns every failure (refused connection, timeout, a
3xx/4xx/5xx answer) into one ``AdminClientError`` whose message is what the server said, shown
as ``proxy.shown`` shows text from elsewhere (a terminal control in it is written as an escape,
never sent to the operator's terminal as it is). The timeout bounds the whole
exchange, not each read: an answer dripped slowly still ends at it. A redirect is not followed: the
request carries the token, which must reach the admin listener named and nothing else.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import urllib.error
import urllib.request
from email.message import Message
from typing import IO, Any

from proxy.policy.cache_status import CACHE_NAME
from proxy.policy.fields import split_outside_quotes, unsendable
from proxy.shown import shown

# The field every answer of the admin listener carries (``create_admin_app``), and no answer of
# the client listener's of its own; see ``relayed``.
ADMIN_FIELD = "Cachegate-Admin"


def relayed(fields: Message) -> str | None:
    """Why an answer is not the admin listener's own, or None. The admin listener marks every
    answer with ``ADMIN_FIELD``; an origin could send that field too, and the client listener
    relays it, but the client listener adds ``X-Cache-Status`` and its ``cachegate`` member of
    ``Cache-Status`` to everything it answers, which the admin listener never sends.

    >>> from email.message import Message
    >>> m = Message(); m["Cachegate-Admin"] = "1"; relayed(m) is None
    True
    >>> m["Cache-Status"] = 'edge; hit, "cachegate"; fwd=uri-miss'; relayed(m)
    'a Cache-Status that names cachegate'
    >>> relayed(Message())
    'no Cachegate-Admin field'
    """
    if fields.get(ADMIN_FIELD) is None:
        return f"no {ADMIN_FIELD} field"
    if fields.get("X-Cache-Status") is not None:
        return "X-Cache-Status"
    members = (split_outside_quotes(m, ";", 1)[0].strip(' \t"')
               for line in fields.get_all("Cache-Status", []) for m in split_outside_quotes(str(line), ","))
    if CACHE_NAME in members:
        return "a Cache-Status that names cachegate"
    return None


class AdminClientError(Exception):
    """A failed call; its message, which quotes the server, is safe to print (``shown``, once:
    printed as it is, not shown again). ``keep=""`` writes a newline or a tab in it as an escape
    too (a message that quotes an answer's first characters on one line); ``ours`` is a message
    in cachegate's own words only, kept as it is (a backslash in it is not a server's)."""

    def __init__(self, message: str, keep: str = "\n\t", *, ours: bool = False) -> None:
        super().__init__(message if ours else shown(message, keep))


class NotAdminEndpoint(AdminClientError):
    """Something other than the admin listener answered (``not_admin``): an address mixed up,
    which waiting does not mend (``cachegate top`` exits on it, as on a wrong token)."""


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


class _Deadline:
    """The whole exchange's time limit. urllib's ``timeout`` bounds each socket operation only, so
    an answer dripped a byte a second would never end: at the deadline a timer shuts the
    connection's socket down, which ends a read blocked on it."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _handlers(deadline: _Deadline) -> list[urllib.request.BaseHandler]:
    """urllib's HTTP and HTTPS handlers, with connections whose socket ``deadline`` can end."""

    class Connection(http.client.HTTPConnection):
        def connect(self) -> None:
            super().connect()
            deadline.track(self.sock)

    class TLSConnection(http.client.HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            deadline.track(self.sock)

    class Handler(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(Connection, req)

    class TLSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(TLSConnection, req, context=getattr(self, "_context", None))

    return [Handler(), TLSHandler()]


def not_admin(base: str, method: str, path: str, fields: Message, why: str, unsent: bool = False) -> str:
    """The message for an answer that is not the admin listener's own (``relayed`` says why):
    the address is a mix-up (the client listener's port, another server), so say so rather
    than print what some other server said as if cachegate had said it."""
    older = (f"; a cachegate started before an upgrade to this version sends no {ADMIN_FIELD}: "
             "restart it" if fields.get(ADMIN_FIELD) is None else "")
    asked = f"{method} {path.split('?')[0]}"
    unsent_note = " (the admin token was not sent to it)" if unsent else ""
    return (f"{base.rstrip('/')} is not cachegate's admin endpoint{unsent_note}: its answer to {asked} "
            f"has {why} (the admin listener marks every answer with {ADMIN_FIELD}: 1; the client "
            "listener adds X-Cache-Status and Cache-Status to what it relays): give the address of "
            f"admin.listen, not the client listener's or another server's{older}")


class AdminAPI:
    """The admin API at ``base`` for one command's run (``cachegate purge``, ``top``).

    Before its first request it asks ``GET /healthz`` without the token (never behind it) and
    goes on only if the admin listener answered (``relayed``): an address mixed up with the
    client listener's, or another server's, would otherwise get the token (relayed to an origin,
    which may log it) and answer something that reads as success. Every answer after that must
    be the admin listener's own too. One extra round trip per run; ``top`` keeps one instance."""

    def __init__(self, base: str, token: str | None, timeout: float = 60.0) -> None:
        self.base = base
        self.token = token
        self.timeout = timeout
        self._checked = False

    def check(self) -> None:
        """GET /healthz without the token, whatever its status (503 while starting is still the
        admin listener); AdminClientError, naming the address, unless the admin listener answered."""
        _, _, _, fields = _exchange(self.base, "GET", "/healthz", None, None, self.timeout)
        why = relayed(fields)
        if why is not None:
            raise NotAdminEndpoint(not_admin(self.base, "GET", "/healthz", fields, why, bool(self.token)))
        self._checked = True

    def call(self, method: str, path: str, body: Any) -> str:
        """Send ``body`` as JSON; the answer's text on 2xx (as the server sent it: what prints
        it shows it with ``shown``), else AdminClientError with the error."""
        return self.call_answer(method, path, body)[0]

    def call_answer(self, method: str, path: str, body: Any) -> tuple[str, Message]:
        """``call``, with the answer's header fields too."""
        _sendable(self.token)  # said before any request, as a bad token, not a bad address
        if not self._checked:
            self.check()
        return call_admin_answer(self.base, method, path, body, self.token, self.timeout)


def call_admin(base: str, method: str, path: str, body: Any, token: str | None,
               timeout: float = 60.0) -> str:
    """One call through a fresh ``AdminAPI`` (its /healthz check first)."""
    return AdminAPI(base, token, timeout).call(method, path, body)


def call_admin_answer(base: str, method: str, path: str, body: Any, token: str | None,
                      timeout: float = 60.0, *, own: bool = True) -> tuple[str, Message]:
    """One request, no /healthz check first (``AdminAPI`` makes it): the answer's text and
    header fields on 2xx, else AdminClientError with the error. With ``own``, an answer (2xx
    or not) that is not the admin listener's (``relayed``) is an AdminClientError naming the
    address; ``cachegate health`` passes False and tells such answers apart itself.
    ``timeout`` bounds the whole exchange, from connecting to the answer's last byte."""
    status, reason, text, fields = _exchange(base, method, path, body, token, timeout)
    why = relayed(fields) if own else None
    if why is not None:
        raise NotAdminEndpoint(not_admin(base, method, path, fields, why))
    if 200 <= status < 300:
        return text, fields
    try:
        message = json.loads(text).get("error", text)
    except (ValueError, AttributeError):
        message = text.strip() or reason
    raise AdminClientError(f"{status} {reason}: {message}")


def _sendable(token: str | None) -> None:
    problem = unsendable(token) if token else None
    if problem is not None:  # urllib's ValueError would read as a bad URL
        raise AdminClientError(f"the admin token {problem}, which no client can send in an "
                               "Authorization field; remove it", ours=True)  # (never quotes the token)


def _exchange(base: str, method: str, path: str, body: Any, token: str | None,
              timeout: float) -> tuple[int, str, str, Message]:
    """One request: the answer's status, reason, text and header fields, whatever the status;
    AdminClientError when there is no whole answer (unreachable, a redirect, the deadline)."""
    data = json.dumps(body).encode() if body is not None else None
    try:
        request = urllib.request.Request(base.rstrip("/") + path, data=data, method=method)
    except ValueError as exc:  # not a URL (the command line checks --admin first)
        raise AdminClientError(f"bad admin URL {base!r}: {exc}") from None
    request.add_header("Content-Type", "application/json")
    if token:
        _sendable(token)
        # As UTF-8, as curl sends it and the admin API reads it (http.client writes Latin-1).
        request.add_header("Authorization", f"Bearer {token}".encode().decode("latin-1"))
    deadline = _Deadline(timeout)
    late = AdminClientError(f"the admin API at {base} did not answer within {timeout:g} s")
    try:
        # Straight to the admin listener: an http_proxy in the environment must not intercept it.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect(),
                                             *_handlers(deadline))
        with opener.open(request, timeout=timeout) as resp:
            raw = resp.read()
            fields: Message = resp.headers
            status, reason = int(resp.status), str(resp.reason)
        if deadline.expired:
            raise late
        return status, reason, str(raw.decode(errors="replace")), fields
    except urllib.error.HTTPError as exc:
        if deadline.expired:
            raise late from None
        try:
            text = exc.read().decode(errors="replace")
        except (OSError, http.client.HTTPException):
            text = ""
        if deadline.expired:
            raise late from None
        return exc.code, str(exc.reason), text, exc.headers
    except urllib.error.URLError as exc:
        if deadline.expired:
            raise late from None
        raise AdminClientError(f"cannot reach the admin API at {base}: {exc.reason}") from None
    except TimeoutError:
        raise late from None
    except (OSError, http.client.HTTPException) as exc:  # the connection broke off (or the deadline)
        if deadline.expired:
            raise late from None
        raise AdminClientError(f"the admin API at {base} broke off its answer: {exc!r}") from None
    except ValueError as exc:
        raise AdminClientError(f"bad admin URL {base!r}: {exc}") from None
    finally:
        deadline.cancel()
