"""``cachegate warm``: preload the cache after a deploy or a purge, through the proxy itself.

Every URL is requested from the proxy's client listener (never from the origin), so
rules, keys, coalescing and storage decide exactly as they do for clients: warming
cannot store anything a client's request would not. An absolute URL's host becomes
the ``Host`` header (and ``https`` URLs carry ``X-Forwarded-Proto: https``, which
cachegate honours only from ``trusted_proxies``); a path (from a URL file or an
access log: anything that starts with ``/``, ``//other.example/x`` included) is sent as
written to ``--host``, else to the proxy's own address.

Sources, all combined and deduplicated: ``--sitemap URL`` (a ``urlset``, or a
``sitemapindex`` whose sitemaps are fetched in turn, through the proxy too, down to
``MAX_SITEMAP_DEPTH`` nested indexes (deeper ones are counted as errors); gzip
accepted, read up to ``MAX_SITEMAP_BYTES`` compressed and uncompressed; documents with a
DOCTYPE are refused by the parser, in any encoding, so no entity can expand; at most
``MAX_SITEMAP_URLS`` URLs in all; parsed ``PARSE_CHUNK`` at a time, in linear time, the event
loop (and so Ctrl-C) running between slices), ``--urls
FILE`` (one URL or path a line, ``#`` comments; ``-`` is standard input) and
``--from-access-log FILE`` (GET/HEAD request lines of the common, combined or
cachegate format with a status below 400, most requested first, each sent as the client sent
it: ``logged_path``).

Each answer is classified from ``X-Cache-Status`` and cachegate's own member of
``Cache-Status`` (the last one named ``cachegate``; an origin's members come first): stored,
refreshed (a 304 freshened the stored copy), already fresh, stale served (from the store, stale:
stale-while-revalidate or a soft purge started a refresh, or max-stale allowed it; with the
``detail``), not storable (with the ``detail`` reason) or an error (a status of 400 and above, a
stale copy served because the origin failed (stale-if-error), a timeout, a refused connection
...). A fill whose head could not say whether it was stored (a chunked body still arriving, which
may outgrow the store's limit) is asked of the store once its body is read: a ``HEAD`` with
``only-if-cached``, which never reaches the origin, on the connection its ``GET`` went on (each
of the ``--concurrency`` workers has one: with ``--workers N``, the worker process that received
the body answers); a stored response that needs validation first (``no-cache``) is stored.
What the summary prints of reasons and URLs is shown as ``cachegate top`` shows it: controls
and bidi overrides replaced. The summary counts each; the exit status is 1 when errors exceed
``--max-errors`` (0 by default), 130 after Ctrl-C (which stops at once and prints the summary so
far), 2 for bad arguments or nothing to warm.

The parsing and classifying functions are pure; ``Warmer`` does the I/O.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gzip
import io
import json
import re
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import quote, urlsplit
from xml.parsers import expat

from multidict import CIMultiDict

from proxy.policy.fields import is_token

MAX_SITEMAP_BYTES = 50 * 1024 * 1024  # the sitemaps.org limit for one sitemap, uncompressed
READ_CHUNK = 1 << 16  # answers are read this much at a time, never whole
PARSE_CHUNK = 1 << 16  # a sitemap is parsed this much at a time, the event loop running in between
MAX_SITEMAP_URLS = 1_000_000  # URLs taken from all the sitemaps of a run (pages and sitemaps)
MAX_URL_LENGTH = 8192  # characters of one <loc> kept (sitemaps.org: under 2,048)
MAX_SITEMAP_DEPTH = 4  # sitemap index -> sitemap index -> ... -> urlset
MAX_PLACES = 5  # FILE:LINE shown for each kind of error of a URL list's lines (then a count)
USER_AGENT = "cachegate-warm"  # sent unless -H 'User-Agent: ...' replaces it ('User-Agent:': none)
# aiohttp's own defaults, never sent: ``Accept-Encoding: gzip, deflate`` filled a variant no
# browser asks for, and the variant of clients that send none (curl, most bots) could not be
# warmed at all. Warm sends what -H and --variants give; without them, no Accept-Encoding.
SKIPPED_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent")
MAX_CONCURRENCY = 1000  # --concurrency at most (each is a connection to the proxy)
# Served from the store, but stale: cachegate may have started a refresh (UPDATING, and the
# soft-purged), yet what is stored is not what warming is for: counted apart from "fresh".
STALE_SERVED = frozenset({"STALE", "UPDATING"})

EXIT_OK, EXIT_ERRORS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# A --proxy https://... certificate that fails: by a CA not trusted, or (OpenSSL checks the name
# only once the chain is trusted) not issued for the host --proxy names, 127.0.0.1 say.
UNTRUSTED = "TLS certificate not verified (SSL_CERT_FILE names the CA to trust)"
NAME_MISMATCH = "TLS certificate not valid for the --proxy host (give --proxy the name it is for)"
NAME_MISMATCH_CODES = (62, 64)  # OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


class WarmError(Exception):
    """A source that cannot be read (a bad sitemap, an unreadable file), or a URL that cannot be
    sent. ``kind``: what the summary counts it as, from a small fixed set (never the URL or a
    parser's message: 20,000 bad lines made 20,000 kinds on one 700 KB line); ``detail``: what
    is particular to this one, shown with the kind's example."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Target:
    """One request to send: a URL (absolute, or a path for the default host) and its headers."""

    url: str
    headers: tuple[tuple[str, str | None], ...] = ()  # None: sent without that field


# -- sources (pure) -----------------------------------------------------------------------------


_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\U0010ffff]*")  # no controls (RFC 9110 §5.5)


def parse_header(text: str) -> tuple[str, str | None]:
    """``'Name: value'`` -> (name, value); as curl's ``-H``, ``'Name:'`` -> (name, None): sent
    without that field (not even warm's own default), and ``'Name;'`` -> (name, ''): an empty
    value. ValueError for anything that is not a field, or a value with a control character.

    >>> parse_header("Accept-Encoding: gzip, br"), parse_header("Accept-Encoding:"), parse_header("X-Empty;")
    (('Accept-Encoding', 'gzip, br'), ('Accept-Encoding', None), ('X-Empty', ''))
    """
    name, sep, value = text.partition(":")
    empty = not sep and text.endswith(";")
    if empty:
        name = text[:-1]
    name = name.strip()
    if not (sep or empty) or not is_token(name):
        raise ValueError(f"not a header: {text!r} (write 'Name: value'; 'Name:' sends none, "
                         "'Name;' an empty value)")
    value = value.strip(" \t")
    if not _FIELD_VALUE.fullmatch(value):
        raise ValueError(f"a control character in the value of {text!r}")
    if empty:
        return name, ""
    return name, value or None


_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::(\d{1,5}))?")


def host_problem(host: str) -> str | None:
    """Why ``host`` cannot be a Host field (``--host``, a URL's host), or None.

    >>> host_problem("shop.example:8080"), host_problem("[::1]:80")
    (None, None)
    >>> host_problem("x\\r\\nY: 1"), host_problem("a:99999")
    ('not a host[:port]', 'the port is above 65535')
    """
    m = _HOST.fullmatch(host)
    if m is None:
        return "not a host[:port]"
    if m.group(2) is not None and int(m.group(2)) > 65535:
        return "the port is above 65535"
    return None


class Placed(str):
    """A URL or path as a URL list's line gave it, with ``where``: ``FILE:LINE``, so the
    summary can say which line to mend. Only refused lines are kept so (the rest are plain)."""

    where: str = ""


def placed(text: str, where: str) -> Placed:
    url = Placed(text)
    url.where = where
    return url


NOT_UTF8 = "a line that is not UTF-8 (no client's key is known for its bytes)"


def url_lines(lines: Iterable[bytes], name: str, check: Callable[[str], object],
              refused: list[tuple[Outcome, str]]) -> Iterator[str]:
    r"""The URLs and paths of a URL list's ``lines`` (bytes, one URL or path a line; blank lines
    and ``#`` comments skipped) that ``check`` (``Warmer.check``) lets through. Each line that
    cannot be sent is added to ``refused`` once, as (its error, its text placed at ``name:LINE``):
    a line that is not UTF-8 too. Read with its bytes replaced, ``/caf\xe9`` was sent as
    ``/caf%EF%BF%BD`` and reported stored: a key no client asks for.

    >>> refused, lines = [], [b"\xef\xbb\xbf/a\r\n", b"# caf\xe9\n", b"/caf\xe9\n", b"  \n", b"/b"]
    >>> list(url_lines(lines, "u.txt", str, refused))
    ['/a', '/b']
    >>> [(o.reason, url, url.where) for o, url in refused]
    [("a line that is not UTF-8 (no client's key is known for its bytes)", '/caf\\xe9', 'u.txt:3')]
    """
    for number, raw in enumerate(lines, 1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a byte order mark, as editors on Windows write
            raw = raw[3:]
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            text = raw.strip()
            if text and not text.startswith(b"#"):
                refused.append((Outcome("error", NOT_UTF8), placed(text.decode("utf-8", "backslashreplace"),
                                                                    f"{name}:{number}")))
            continue
        if not line or line.startswith("#"):
            continue
        try:
            check(line)
        except WarmError as exc:
            refused.append((Outcome("error", exc.kind, exc.detail), placed(line, f"{name}:{number}")))
            continue
        yield line


_REQUEST_LINE = re.compile(r'"(GET|HEAD) (\S+) HTTP/[0-9.]+"(?:\s+(\d{3}))?')
# nginx's and cachegate's \xHH; Apache's \" and \\ too, and its \b \n \r \t \v (controls). One
# reading fits both: nginx writes a backslash itself as \x5C, so none of Apache's short forms
# can occur in an nginx line; left to right, Apache's \\x41 (a client's \x41) stays \x41.
_LOG_ESCAPE = re.compile(r'\\(?:x([0-9A-Fa-f]{2})|(["\\bnrtv]))')
_SHORT_ESCAPES = {'"': 0x22, "\\": 0x5C, "b": 0x08, "n": 0x0A, "r": 0x0D, "t": 0x09, "v": 0x0B}
NOT_SENDABLE_AS_LOGGED = "a logged path with a space or control character (not sendable as logged)"


class LoggedPath(str):
    """A request target as a client sent it (from an access log): sent as it is, not through
    ``sendable`` (which writes ``"`` as ``%22``, another key than the client's raw ``"``).
    ``host``: the Host field it was sent with, when the log recorded it (cachegate's JSON lines):
    without it, a log of several sites warmed every path under the proxy's own address, keys no
    client asks for. ``--host`` overrides it, as it does for every path."""

    host: str | None = None


def logged_path(text: str, escaped: bool, host: str | None = None) -> LoggedPath:
    r"""A request target as an access log wrote it, as it was sent: with ``escaped`` (the common,
    combined and cachegate formats: nginx and cachegate write each byte that is not printable
    ASCII, a quote and a backslash as ``\xHH``; Apache writes a quote and a backslash as ``\"``
    and ``\\``, a few controls as ``\n`` and the like, other bytes as ``\xHH``) those decoded;
    bytes beyond ASCII percent-encoded (as ``sendable`` does; the rest is sent as logged:
    ``LoggedPath``). WarmError when it holds a space or a control character: no request line
    carries one, and percent-encoded it would be another key than the one logged.

    >>> logged_path(r"/q\x22x/b\x5Cc/caf\xC3\xA9", escaped=True), logged_path("/caf\u00e9", escaped=False)
    ('/q"x/b\\c/caf%C3%A9', '/caf%C3%A9')
    >>> logged_path(r'/q\"x/b\\s/b\\x41', escaped=True)  # Apache's
    '/q"x/b\\s/b\\x41'
    """
    data = bytearray()
    at = 0
    for m in (_LOG_ESCAPE.finditer(text) if escaped else ()):
        data += text[at:m.start()].encode("utf-8", "surrogateescape")
        data.append(int(m.group(1), 16) if m.group(1) else _SHORT_ESCAPES[m.group(2)])
        at = m.end()
    data += text[at:].encode("utf-8", "surrogateescape")
    if any(b <= 0x20 or b == 0x7F for b in data):
        raise WarmError(NOT_SENDABLE_AS_LOGGED)
    path = LoggedPath("".join(chr(b) if b < 0x80 else f"%{b:02X}" for b in data))
    path.host = host
    return path


def parse_access_log(lines: Iterable[str], refused: list[tuple[Outcome, str]] | None = None) -> list[str]:
    """The paths of GET/HEAD requests answered below 400 (or with no status), most requested first:
    from combined or common lines, or cachegate's JSON lines (``access_log: {format: json}``), as
    they were sent (``logged_path``, with the Host the JSON line records: the same path on two
    sites is two paths); each distinct one that cannot be is added to ``refused`` as (its error,
    the path as logged).

    >>> parse_access_log(['{"method":"GET","path":"/j?x=1","status":200}', '{"method":null,"path":null}'])
    ['/j?x=1']
    >>> [(p, p.host) for p in parse_access_log(['{"method":"GET","host":"a.example","path":"/j"}',
    ...                                         '{"method":"GET","host":"b.example","path":"/j"}'])]
    [('/j', 'a.example'), ('/j', 'b.example')]

    >>> parse_access_log([
    ...     '127.0.0.1 - - [26/Nov/2026:13:40:02 +0000] "GET /a HTTP/1.1" 200 288 "-" "curl"',
    ...     '127.0.0.1 [26/Nov/2026:13:40:03 +0000] "GET /b HTTP/1.1" 200 288 HIT 0.0004 "-" "curl"',
    ...     '127.0.0.1 [26/Nov/2026:13:40:04 +0000] "GET /b HTTP/1.1" 200 288 HIT 0.0004 "-" "curl"',
    ...     '127.0.0.1 - - [26/Nov/2026:13:40:05 +0000] "POST /c HTTP/1.1" 200 2 "-" "curl"',
    ...     '127.0.0.1 - - [26/Nov/2026:13:40:06 +0000] "GET /gone HTTP/1.1" 404 2 "-" "curl"'])
    ['/b', '/a']
    """
    counts: collections.Counter[tuple[str, bool, str | None]] = collections.Counter()
    for line in lines:
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            path, status, host = record.get("path"), record.get("status"), record.get("host")
            if (record.get("method") in ("GET", "HEAD") and isinstance(path, str)
                    and not (isinstance(status, int) and status >= 400)):
                # JSON's own escapes: json.loads decoded them
                counts[path, False, host if isinstance(host, str) and host else None] += 1
            continue
        m = _REQUEST_LINE.search(line)
        if m is None or (m.group(3) is not None and int(m.group(3)) >= 400):
            continue
        counts[m.group(2), True, None] += 1
    out: dict[tuple[str, str | None], LoggedPath] = {}
    for (path, escaped, host), _ in counts.most_common():
        try:
            logged = logged_path(path, escaped, host)
        except WarmError as exc:
            if refused is not None:
                refused.append((Outcome("error", exc.kind, exc.detail), path))
            continue
        out.setdefault((logged, host), logged)
    return list(out.values())


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


class _Stop(Exception):
    """Enough URLs: the parse ends early."""


class _SitemapReader:
    """An incremental sitemap parse: ``feed`` it the document a piece at a time, then ``result``.

    Read with expat directly, in whatever encoding the document declares (UTF-16 too); any
    document type declaration is refused by the parser itself, so no entity can be declared,
    let alone expand. The work is linear in the document: a ``<loc>`` split into many pieces
    (lines, character references) keeps a running length, never re-measures what it has."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.parser = expat.ParserCreate(namespace_separator="}")
        self.kind: str | None = None
        self.depth = 0
        self.in_entry = self.in_loc = False
        self.text: list[str] = []
        self.text_length = 0  # characters in ``text``
        self.locs: list[str] = []
        self.done = False  # enough URLs: the rest of the document is not read
        parser = self.parser
        parser.StartDoctypeDeclHandler = self._doctype
        parser.EntityDeclHandler = self._doctype
        parser.StartElementHandler = self._start
        parser.EndElementHandler = self._end
        parser.CharacterDataHandler = self._chars

    @staticmethod
    def _doctype(*_: Any) -> None:
        raise WarmError("sitemap has a DOCTYPE (refused: entities could expand without bound)")

    def _start(self, name: str, _attrs: Any) -> None:
        self.depth += 1
        local = _local(name)
        if self.depth == 1:
            self.kind = local
        elif self.depth == 2:
            self.in_entry = (self.kind, local) in (("urlset", "url"), ("sitemapindex", "sitemap"))
        elif self.depth == 3 and self.in_entry and local == "loc":
            self.in_loc = True
            self.text.clear()
            self.text_length = 0

    def _end(self, _name: str) -> None:
        if self.depth == 3 and self.in_loc:
            self.in_loc = False
            loc = "".join(self.text).strip()
            if loc:
                self.locs.append(loc)
                if len(self.locs) > self.room:
                    raise _Stop
        elif self.depth == 2:
            self.in_entry = False
        self.depth -= 1

    def _chars(self, data: str) -> None:
        if self.in_loc and self.text_length <= MAX_URL_LENGTH:  # a longer one is kept cut, never grown
            self.text.append(data)
            self.text_length += len(data)

    def feed(self, data: bytes, final: bool = False) -> None:
        if self.done:
            return
        try:
            self.parser.Parse(data, final)
        except _Stop:
            self.done = True
        except (expat.ExpatError, ValueError) as exc:  # ValueError: an encoding expat cannot read
            raise WarmError("not XML", str(exc)) from None

    def result(self) -> tuple[list[str], list[str]]:
        if self.kind not in ("urlset", "sitemapindex"):
            raise WarmError("not a sitemap (the root element is not <urlset> or <sitemapindex>)",
                            f"the root element is <{self.kind}>")
        return (self.locs, []) if self.kind == "urlset" else ([], self.locs)


def _pieces(body: bytes) -> Iterator[bytes]:
    """``body`` in ``PARSE_CHUNK`` pieces, gunzipped as it goes when it is gzip; WarmError past
    ``MAX_SITEMAP_BYTES`` uncompressed (nothing beyond is decompressed)."""
    if body[:2] != b"\x1f\x8b":
        if len(body) > MAX_SITEMAP_BYTES:
            raise WarmError(f"sitemap larger than {MAX_SITEMAP_BYTES} bytes")
        for at in range(0, len(body), PARSE_CHUNK):
            yield body[at:at + PARSE_CHUNK]
        return
    total = 0
    with gzip.GzipFile(fileobj=io.BytesIO(body)) as f:
        while True:
            try:
                piece = f.read(PARSE_CHUNK)
            except (OSError, EOFError) as exc:
                raise WarmError("bad gzip", str(exc)) from None
            if not piece:
                return
            total += len(piece)
            if total > MAX_SITEMAP_BYTES:
                raise WarmError(f"sitemap larger than {MAX_SITEMAP_BYTES} bytes")
            yield piece


def parse_sitemap(body: bytes, room: int = MAX_SITEMAP_URLS) -> tuple[list[str], list[str]]:
    """A sitemap's (page URLs, nested sitemap URLs), at most ``room + 1`` of them (the caller
    tells more than ``room`` from that); WarmError when it is not one. ``read_sitemap`` is the
    same parse in slices that let the event loop run (and Ctrl-C stop it) in between.

    >>> parse_sitemap(b'<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">'
    ...               b'<url><loc> https://a.example/x </loc></url></urlset>')
    (['https://a.example/x'], [])
    >>> parse_sitemap(b'<sitemapindex><sitemap><loc>https://a.example/s2.xml</loc></sitemap></sitemapindex>')
    ([], ['https://a.example/s2.xml'])
    >>> try:
    ...     parse_sitemap('<!DOCTYPE x [<!ENTITY h "y">]><urlset/>'.encode("utf-16"))
    ... except WarmError as exc:
    ...     print(exc)
    sitemap has a DOCTYPE (refused: entities could expand without bound)
    """
    reader = _SitemapReader(room)
    for piece in _pieces(body):
        reader.feed(piece)
        if reader.done:
            break
    reader.feed(b"", final=True)
    return reader.result()


async def read_sitemap(body: bytes, room: int = MAX_SITEMAP_URLS) -> tuple[list[str], list[str]]:
    """``parse_sitemap``, yielding to the event loop after every ``PARSE_CHUNK`` of the document
    (decompressed), so a 50 MB sitemap neither holds the loop nor outlasts a Ctrl-C."""
    reader = _SitemapReader(room)
    for piece in _pieces(body):
        reader.feed(piece)
        if reader.done:
            break
        await asyncio.sleep(0)
    reader.feed(b"", final=True)
    return reader.result()


def targets_for(urls: Iterable[str], headers: Sequence[tuple[str, str | None]],
                variants: Sequence[tuple[str, str | None]]) -> list[Target]:
    """Each URL once (first seen wins), once per variant when variants are given: a variant's
    field replaces any ``-H`` of that name (it names the variant).

    >>> [t.headers for t in targets_for(["/a"], [("X-A", "1"), ("Accept", "x")], [("accept", "y")])]
    [(('X-A', '1'), ('accept', 'y'))]
    """
    seen: set[tuple[str, str | None]] = set()
    out: list[Target] = []
    for url in urls:
        key = (url, url.host if isinstance(url, LoggedPath) else None)  # a path of each site once
        if key in seen:
            continue
        seen.add(key)
        if variants:
            out.extend(Target(url, (*(h for h in headers if h[0].lower() != v[0].lower()), v))
                       for v in variants)
        else:
            out.append(Target(url, tuple(headers)))
    return out


# -- outcomes (pure) ----------------------------------------------------------------------------

_DETAIL = re.compile(r';\s*detail=("(?:[^"\\]|\\.)*"|[^;,\s]+)')


EMPTY_QUERY = "an empty query ('?') cannot be sent"
USERINFO = "a URL with user:password@ is refused (it would be sent in the Host header)"
OPEN_BRACKET = "not a valid URL: the '[' of an IPv6 address is not closed by ']'"
NOT_A_URL = "not a URL or path"
NOT_HTTP = "not an http(s) URL"
BAD_HOST = "not a valid URL: its host is not a host[:port]"
BAD_LOGGED_HOST = "the host the access log records is not a host[:port]"
ORIGIN_FAILED_STALE_SERVED = "origin error, stale copy served"


def sendable(target: str) -> str:
    """A request target as the proxy keys it and ``cachegate purge`` and ``explain`` name it:
    as written (percent-encodings and dot segments kept), with what cannot go on a request
    line percent-encoded in UTF-8, as browsers do (non-ASCII, spaces, controls, quotes, angle
    brackets). An empty query cannot be sent at all (``EMPTY_QUERY``).

    >>> sendable('/caf\u00e9 menu?q="x"&e=%2F'), sendable("/a/../b"), sendable("/%7Eu;v=1")
    ('/caf%C3%A9%20menu?q=%22x%22&e=%2F', '/a/../b', '/%7Eu;v=1')
    """
    return quote(target, safe="!$%&'()*+,/:;=?@[]")


def cache_status_detail(value: str) -> str | None:
    """The ``detail`` parameter of a Cache-Status field, unquoted.

    >>> cache_status_detail('cachegate; fwd=uri-miss; fwd-status=200; detail=PRIVATE')
    'PRIVATE'
    >>> cache_status_detail('cachegate; fwd=bypass; fwd-status=200; detail="RULE-BYPASS:logged in"')
    'RULE-BYPASS:logged in'
    """
    m = _DETAIL.search(value)
    if m is None:
        return None
    detail = m.group(1)
    if detail.startswith('"'):
        detail = re.sub(r"\\(.)", r"\1", detail[1:-1])
    return detail


def _members(value: str) -> list[str]:
    """A Cache-Status list's members (RFC 9211: comma-separated; a comma inside a quoted
    ``detail`` is not a separator).

    >>> _members('origin; detail="a, b", cachegate; hit; ttl=4')
    ['origin; detail="a, b"', 'cachegate; hit; ttl=4']
    """
    out, start, quoted, escaped = [], 0, False, False
    for i, c in enumerate(value):
        if escaped:
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == "," and not quoted:
            out.append(value[start:i].strip())
            start = i + 1
    out.append(value[start:].strip())
    return [m for m in out if m]


def own_cache_status(values: Sequence[str]) -> str:
    """cachegate's own member of the Cache-Status fields ``values`` (the last one named
    ``CACHE_NAME``: RFC 9211 lists caches from the origin's side, and caches between the origin
    and cachegate may add members of their own); "" when there is none.

    >>> own_cache_status(['origin; detail=HIT; hit', 'cachegate; fwd=uri-miss; fwd-status=200; stored'])
    'cachegate; fwd=uri-miss; fwd-status=200; stored'
    >>> own_cache_status(['cachegate; detail=FAKE, other; hit'])
    'cachegate; detail=FAKE'
    >>> own_cache_status(['origin; hit'])
    ''
    """
    from proxy.policy.cache_status import CACHE_NAME

    own = [m for v in values for m in _members(v) if m.split(";", 1)[0].strip() == CACHE_NAME]
    return own[-1] if own else ""


@dataclass(frozen=True)
class Outcome:
    kind: str  # "stored", "refreshed", "fresh", "stale", "not_storable", "error"
    reason: str = ""  # the not-stored or stale-served detail, or the error's kind
    detail: str = field(default="", repr=False)  # an error's particulars (shown with its example)


def classify(status: int, x_cache: str, cache_status: str) -> Outcome:
    """What a warming request achieved, from the proxy's answer. A stale copy served in place of
    the origin's error or silence (stale-if-error: ``STALE`` with ``fwd=`` and no ``hit``) is an
    error: the origin failed and nothing was warmed. One served stale from the store (``hit``:
    stale-while-revalidate, a soft purge, max-stale) is "stale", not "fresh": a refresh may have
    started, but what is stored is not fresh.

    >>> classify(200, "MISS", "cachegate; fwd=uri-miss; fwd-status=200; stored")
    Outcome(kind='stored', reason='')
    >>> classify(200, "HIT", "cachegate; hit; ttl=41")
    Outcome(kind='fresh', reason='')
    >>> classify(200, "MISS", "cachegate; fwd=uri-miss; fwd-status=200; detail=NO-FRESHNESS")
    Outcome(kind='not_storable', reason='NO-FRESHNESS')
    >>> classify(404, "MISS", "cachegate; fwd=uri-miss; fwd-status=404; stored")
    Outcome(kind='error', reason='HTTP 404')
    >>> classify(200, "STALE", "cachegate; fwd=stale; fwd-status=503; ttl=-2; detail=ORIGIN-ERROR")
    Outcome(kind='error', reason='origin error, stale copy served')
    >>> classify(200, "UPDATING", "cachegate; hit; ttl=-3; detail=STALE-WHILE-REVALIDATE")
    Outcome(kind='stale', reason='STALE-WHILE-REVALIDATE')

    A fill whose head could not say (a body of unknown length, which may outgrow the store's
    limit after its head): "undecided", for ``Warmer.stored_after`` to ask the store.

    >>> classify(200, "MISS", "cachegate; fwd=uri-miss; fwd-status=200")
    Outcome(kind='undecided', reason='')
    """
    if status >= 400:
        return Outcome("error", f"HTTP {status}")
    params = [p.strip() for p in cache_status.split(";")]
    if x_cache in STALE_SERVED:
        if "hit" not in params and any(p.startswith("fwd=") for p in params):
            # The fetch failed (the origin's 5xx, no answer, the proxy stopping): the stale copy
            # stays as it was, and the next request fails the same way once it is too old.
            said = [p for p in params if p.startswith("fwd-status=")]
            detail = cache_status_detail(cache_status)
            return Outcome("error", ORIGIN_FAILED_STALE_SERVED,
                           ", ".join([*said, *([detail] if detail else [])]))
        return Outcome("stale", cache_status_detail(cache_status) or x_cache)
    if x_cache == "HIT" and "hit" in params:
        return Outcome("fresh")
    if "stored" in params:
        return Outcome("fresh" if "collapsed" in params else "stored")
    if x_cache == "REVALIDATED":
        return Outcome("refreshed")
    if x_cache == "HIT":
        return Outcome("fresh")
    if x_cache in ("MISS", "EXPIRED") and any(p.startswith("fwd=") for p in params) \
            and cache_status_detail(cache_status) is None:
        return Outcome("undecided")
    return Outcome("not_storable", cache_status_detail(cache_status) or x_cache or "NOT-STORED")


@dataclass
class Tally:
    """The run so far: counts by outcome, not-storable reasons and error kinds."""

    total: int
    done: int = 0
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    stale_reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    # error kind -> a URL that had it, and that one's particulars (one example a kind)
    examples: dict[str, tuple[str, str]] = field(default_factory=dict)
    refused: int = 0  # errors that were never requests (a bad line, a sitemap not fetched)
    # error kind -> the first few FILE:LINE of URL lists' lines that had it, and how many did
    places: dict[str, list[str]] = field(default_factory=dict)
    placed: collections.Counter[str] = field(default_factory=collections.Counter)

    def add(self, outcome: Outcome, url: str) -> None:
        """A request's outcome."""
        self.done += 1
        self._count(outcome, url)

    def refuse(self, outcome: Outcome, url: str) -> None:
        """An error without a request: counted once, whatever the variants, and not in ``total``
        (the summary's requests are what was sent)."""
        self.refused += 1
        self._count(outcome, url)

    def _count(self, outcome: Outcome, url: str) -> None:
        self.counts[outcome.kind] += 1
        if outcome.kind == "not_storable":
            self.reasons[outcome.reason] += 1
        elif outcome.kind == "stale":
            self.stale_reasons[outcome.reason] += 1
        elif outcome.kind == "error":
            self.errors[outcome.reason] += 1
            self.examples.setdefault(outcome.reason, (url, outcome.detail))
            where = getattr(url, "where", "")
            if where:
                self.placed[outcome.reason] += 1
                places = self.places.setdefault(outcome.reason, [])
                if len(places) < MAX_PLACES:
                    places.append(where)

    @property
    def error_count(self) -> int:
        return self.counts["error"]


def _breakdown(c: collections.Counter[str]) -> str:
    return ", ".join(f"{_shown(k)} {n}" for k, n in c.most_common())


def _shown(text: str) -> str:
    """What ``cachegate top`` shows of text from origins and sitemaps: controls and bidi
    overrides replaced (``proxy.shown.same_width``), so nothing printed can move the cursor or
    recolour the terminal."""
    from proxy.shown import same_width

    return same_width(text)


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def _hide_userinfo(url: str) -> str:
    """``url`` with its ``user:password@`` (refused, never sent) masked, not printed.

    >>> _hide_userinfo("http://u:pw@shop.example/a"), _hide_userinfo("/a@b")
    ('http://***@shop.example/a', '/a@b')
    """
    return _USERINFO.sub(r"\g<1>***@", url)


def summary(t: Tally, seconds: float, proxy: str, interrupted: bool) -> list[str]:
    rate = t.done / seconds if seconds > 0 else 0.0
    head = f"cachegate warm: {t.done} of {t.total} requests in {seconds:.1f} s ({rate:.1f}/s) through {proxy}"
    if t.refused:
        head += f", {t.refused} URL{'s' if t.refused != 1 else ''} not sent (errors)"
    if interrupted:
        head += " (interrupted)"
    lines = [head]
    for kind, label in (("stored", "stored"), ("refreshed", "refreshed (304)"), ("fresh", "already fresh"),
                        ("stale", "stale served"), ("not_storable", "not storable"), ("error", "errors")):
        extra = ""
        if kind == "not_storable" and t.reasons:
            extra = f"  ({_breakdown(t.reasons)})"
        elif kind == "stale" and t.stale_reasons:
            extra = f"  ({_breakdown(t.stale_reasons)})"
        elif kind == "error" and t.errors:
            extra = f"  ({_breakdown(t.errors)})"
        lines.append(f"  {label:<16}{t.counts[kind]:>7}{extra}")
    for kind, (url, detail) in sorted(t.examples.items()):
        particulars = f" ({_shown(detail)})" if detail else ""
        lines.append(f"  {_shown(kind)}: e.g. {_shown(_hide_userinfo(url))}{particulars}")
        places = t.places.get(kind)
        if places:
            more = t.placed[kind] - len(places)
            tail = f" and {more} more" if more else ""
            lines.append(f"    at {', '.join(_shown(p) for p in places)}{tail}")
    return lines


def progress_bar(done: int, total: int, rate: float, errors: int, width: int = 30) -> str:
    """One line for a terminal: bar, count, percentage, rate, ETA, errors.

    >>> progress_bar(50, 200, 25.0, 1)
    '[#######.......................]  50/200  25%  25.0/s  ETA 0:06  1 error'
    """
    share = done / total if total else 1.0
    filled = int(width * share)
    eta = (total - done) / rate if rate > 0 else 0.0
    errs = f"  {errors} error{'s' if errors != 1 else ''}" if errors else ""
    return (f"[{'#' * filled}{'.' * (width - filled)}] {done:>{len(str(total))}}/{total} {share:>4.0%}"
            f"  {rate:.1f}/s  ETA {int(eta) // 60}:{int(eta) % 60:02d}{errs}")


def progress_line(done: int, total: int, rate: float, errors: int) -> str:
    """A plain periodic line when the output is not a terminal."""
    share = done / total if total else 1.0
    return f"cachegate warm: {done}/{total} ({share:.0%}), {rate:.1f}/s, {errors} errors"


class Pacer:
    """``--rate``: request starts spaced 1/rate apart, whichever worker sends them (no burst
    after a pause: a slot never lies in the past).

    >>> p = Pacer(10.0)
    >>> [round(p.wait(t), 3) for t in (0.0, 0.0, 0.0, 0.35, 2.0)]
    [0.0, 0.1, 0.2, 0.0, 0.0]
    >>> Pacer(0).wait(5.0)
    0.0
    """

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_slot: float | None = None

    def wait(self, now: float) -> float:
        """Seconds to wait from ``now`` before the next request may start."""
        if not self.interval:
            return 0.0
        slot = now if self.next_slot is None else max(now, self.next_slot)
        self.next_slot = slot + self.interval
        return slot - now


# -- the I/O --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WarmOptions:
    proxy: str  # the client listener's URL, e.g. http://127.0.0.1:8080
    host: str | None = None  # the Host for paths; None: the proxy's own address
    concurrency: int = 8
    rate: float = 0.0  # requests per second at most; 0: no limit
    timeout: float = 30.0
    progress: str = "auto"  # "auto" (a bar on a terminal, else lines), "bar", "lines", "none"
    progress_every: float = 5.0  # seconds between plain lines


class Warmer:
    def __init__(self, options: WarmOptions, out: IO[str] = sys.stdout, err: IO[str] = sys.stderr) -> None:
        self.options = options
        self.out = out
        self.err = err
        try:
            split = urlsplit(options.proxy)
        except ValueError:  # an unclosed IPv6 bracket
            split = urlsplit("")
        if split.scheme not in ("http", "https") or not split.netloc or "@" in split.netloc:
            raise WarmError(f"--proxy must be a URL like http://127.0.0.1:8080 (no user:password@), "
                            f"not {_hide_userinfo(options.proxy)!r}")
        why = host_problem(split.netloc)
        if why is not None:
            raise WarmError(f"--proxy must be a URL like http://127.0.0.1:8080: {why} in {options.proxy!r}")
        rest = options.proxy.partition("://")[2][len(split.netloc):]
        if rest not in ("", "/"):  # a path prefix or query would be dropped from every request
            raise WarmError(f"--proxy is the listener's address alone, like http://127.0.0.1:8080: "
                            f"{rest!r} would not be sent (paths go in the URLs, --urls or --sitemap)")
        if options.host is not None and (why := host_problem(options.host)) is not None:
            raise WarmError(f"--host {options.host!r}: {why}")
        if not 1 <= options.concurrency <= MAX_CONCURRENCY:
            raise WarmError(f"--concurrency takes a whole number from 1 to {MAX_CONCURRENCY}, "
                            f"not {options.concurrency}")
        self._base = f"{split.scheme}://{split.netloc}"
        self._default_host = options.host or split.netloc

    def check(self, url: str) -> None:
        """WarmError when ``url`` cannot be requested (what a request for it would count as)."""
        self._request_of(Target(url))

    def sendable(self, urls: Iterable[str], refused: list[tuple[Outcome, str]]) -> list[str]:
        """``urls`` without those that cannot be requested, each of those added to ``refused``:
        an error once (not once per ``--variants`` variant, nor counted as a request)."""
        out = []
        for url in urls:
            try:
                self.check(url)
            except WarmError as exc:
                refused.append((Outcome("error", exc.kind, exc.detail), url))
                continue
            out.append(url)
        return out

    def _request_of(self, target: Target) -> tuple[str, CIMultiDict[str]]:
        """Where to send ``target`` and with which headers (Host from the URL); WarmError when
        it cannot be sent: not a URL or path, an empty query, user info (``user:pw@``, which
        would land in the Host header and the access log)."""
        headers = CIMultiDict({"User-Agent": USER_AGENT})
        if target.url.startswith("/"):
            # A path is sent as written: '//evil.example/x' is a path of its own (the proxy, purge
            # and explain keep it so), not a URL of host evil.example, as urlsplit would read it.
            host = self._default_host
            logged_host = target.url.host if isinstance(target.url, LoggedPath) else None
            if logged_host is not None and self.options.host is None:
                if host_problem(logged_host) is not None:
                    raise WarmError(BAD_LOGGED_HOST)
                host = logged_host
            path = target.url.split("#", 1)[0]
        else:
            try:
                split = urlsplit(target.url)
            except ValueError as exc:
                if "IPv6" in str(exc):  # 'http://[::1/x'
                    raise WarmError(OPEN_BRACKET) from None
                raise WarmError("not a valid URL", str(exc)) from None
            if split.scheme and split.scheme.lower() not in ("http", "https") and (
                    split.netloc or not target.url[len(split.scheme) + 1:][:1].isdigit()):
                # ftp://h/x is not http://h/x; nor are mailto:a@b.example, file:///etc/passwd
                # (no host: checked first, they were "not a URL or path"). A host and port
                # (localhost:8080/x, read as the scheme "localhost") is no URL of another scheme.
                raise WarmError(NOT_HTTP)
            if not (split.scheme and split.netloc):
                raise WarmError(NOT_A_URL)
            if "@" in split.netloc:
                raise WarmError(USERINFO)
            if host_problem(split.netloc) is not None:  # a control character, a port past 65535
                raise WarmError(BAD_HOST)
            host = split.netloc
            if split.scheme.lower() == "https":
                headers["X-Forwarded-Proto"] = "https"
            path = split.path or "/"
            if "?" in target.url.split("#", 1)[0]:
                path += "?" + split.query
        if path.endswith("?") and "?" not in path[:-1]:
            # /search? is a key apart from /search, and aiohttp's client drops an empty query
            raise WarmError(EMPTY_QUERY)
        headers["Host"] = host
        given: set[str] = set()
        for k, v in target.headers:
            # As curl's -H: the first of a name replaces warm's own (User-Agent, Host ...), each
            # further one adds a field ('X-A: 1' and 'X-A: 2' send both); 'Name:' sends none.
            if k.lower() not in given:
                given.add(k.lower())
                headers.popall(k, None)
            if v is not None:
                headers.add(k, v)
        return self._base + (path if isinstance(target.url, LoggedPath) else sendable(path)), headers

    async def fetch(self, session: Any, target: Target, keep: int | None = None) -> tuple[int, Any, bytes]:
        """(status, headers, body). A page's body is read in chunks and thrown away (only the
        fields tell what warming did); ``keep``: keep the body, up to that many bytes (a sitemap:
        WarmError beyond, without reading further)."""
        import aiohttp
        from yarl import URL

        url, headers = self._request_of(target)
        # encoded: sent as ``sendable`` wrote it (yarl would decode %41, upper-case %3f and
        # resolve ``..``: another key than the URL's)
        async with session.get(URL(url, encoded=True), headers=headers, allow_redirects=False,
                               timeout=aiohttp.ClientTimeout(total=self.options.timeout)) as resp:
            body = bytearray()
            async for chunk in resp.content.iter_chunked(READ_CHUNK):
                if keep is None:
                    continue
                body += chunk
                if len(body) > keep:
                    raise WarmError(f"sitemap larger than {keep} bytes")
            return resp.status, resp.headers, bytes(body)

    async def stored_after(self, session: Any, target: Target) -> Outcome:
        """Whether a fill whose head could not say so (``classify``: "undecided") was stored, now
        that its body has been read: asked of the store alone (HEAD with ``only-if-cached``, which
        never goes to the origin): a 504 when nothing is stored, but for one whose ``Cache-Status``
        says ``ONLY-IF-CACHED-NEEDS-VALIDATION``: stored, and to be revalidated before use (a
        ``no-cache`` response, stored as its twin with a ``Content-Length`` says in its head).

        Asked on the connection ``session`` took for the fill (``_warm``'s workers have one
        each). Why that one: a body too big for the shared memory is written to disk by the worker
        process that received it, after its last byte went out, and only that process's reads
        wait for the write; with ``--workers N`` a check that reached the other worker first was
        a 504, and a stored fill counted NOT-STORED (3 runs in 8 of 11 URLs). A retry after a 504
        would guess how long a write takes (a shard's lock held, a body of 100 MB), and hold
        every fill that was not stored that long."""
        import aiohttp
        from yarl import URL

        from proxy.policy.reuse import ONLY_IF_CACHED_NEEDS_VALIDATION

        url, headers = self._request_of(target)
        headers["Cache-Control"] = "only-if-cached"
        async with session.head(URL(url, encoded=True), headers=headers, allow_redirects=False,
                                timeout=aiohttp.ClientTimeout(total=self.options.timeout)) as resp:
            if resp.status < 300 or cache_status_detail(own_cache_status(
                    resp.headers.getall("Cache-Status", []))) == ONLY_IF_CACHED_NEEDS_VALIDATION:
                return Outcome("stored")
            return Outcome("not_storable", "NOT-STORED")

    async def sitemap_urls(self, session: Any, roots: Sequence[str], tally: Tally) -> list[str]:
        """Every page URL of the sitemaps, following sitemap indexes (each sitemap fetched once);
        a sitemap that fails counts as an error of kind ``sitemap: ...``."""
        urls: list[str] = []
        seen: set[str] = set()
        taken = 0  # URLs taken so far, pages and nested sitemaps: MAX_SITEMAP_URLS in all
        level = list(roots)
        for _ in range(MAX_SITEMAP_DEPTH + 1):
            nested: list[str] = []
            for sitemap in level:
                if sitemap in seen:
                    continue
                seen.add(sitemap)
                try:
                    status, fields, body = await self.fetch(session, Target(sitemap), keep=MAX_SITEMAP_BYTES)
                    if not 200 <= status < 300:  # a redirect's body is no sitemap either
                        location = fields.get("Location")
                        raise WarmError(f"HTTP {status}", f"Location: {location}" if location else "")
                    room = MAX_SITEMAP_URLS - taken
                    pages, more = await read_sitemap(body, room)
                except Exception as exc:  # WarmError, or a failed request (aiohttp's errors)
                    kind, detail = _error_kind(exc)
                    tally.total += 1
                    tally.add(Outcome("error", f"sitemap: {kind}", detail), sitemap)
                    continue
                if len(pages) + len(more) > room:
                    tally.refuse(Outcome("error", f"sitemap: more than {MAX_SITEMAP_URLS} URLs in all "
                                               "(the rest skipped)"), sitemap)
                    pages, more = pages[:room], more[:room]
                    urls.extend(pages)
                    return urls
                taken += len(pages) + len(more)
                urls.extend(pages)
                nested.extend(more)
            level = nested
            if not level:
                break
        for sitemap in dict.fromkeys(s for s in level if s not in seen):  # past the limit: said, not dropped
            tally.refuse(Outcome("error", f"sitemap: nested deeper than {MAX_SITEMAP_DEPTH} sitemap indexes "
                                       "(not fetched)"), sitemap)
        return urls

    async def run(self, targets_of: Any, sitemaps: Sequence[str] = (),
                  refused: Sequence[tuple[Outcome, str]] = ()) -> tuple[Tally, float, bool]:
        """Warm everything; (tally, seconds, interrupted). ``targets_of(urls)`` turns the
        sitemap's URLs (first, those that can be sent) and the other sources (checked by the
        caller: ``url_lines``) into targets; ``refused``: (error, URL) the sources could not turn
        into a request, counted as errors once each."""
        tally = Tally(total=0)
        for outcome, url in refused:
            tally.refuse(outcome, url)
        started = time.monotonic()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, stop.set)
        try:
            found: list[str] | None = []
            if sitemaps:
                async with self._session(max(1, self.options.concurrency)) as session:
                    found = await _until(stop, self.sitemap_urls(session, sitemaps, tally))
            unsent: list[tuple[Outcome, str]] = []
            targets: list[Target] = targets_of(self.sendable(found or [], unsent))
            for outcome, url in unsent:
                tally.refuse(outcome, url)
            tally.total += len(targets)
            if not stop.is_set():
                await self._warm(targets, tally, stop, started)
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGINT)
        return tally, time.monotonic() - started, stop.is_set()

    def _session(self, connections: int) -> Any:
        """A client session to the proxy over at most ``connections`` connections at once."""
        import aiohttp

        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections), auto_decompress=False,
                                     trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
                                     skip_auto_headers=SKIPPED_AUTO_HEADERS)

    async def _warm_one(self, session: Any, target: Target) -> Outcome:
        """What requesting ``target`` achieved (its check too, when its head could not say)."""
        try:
            status, headers, _ = await self.fetch(session, target)
            x_cache = headers.getall("X-Cache-Status", [""])[-1]  # cachegate's own is last
            outcome = classify(status, x_cache, own_cache_status(headers.getall("Cache-Status", [])))
            if outcome.kind == "undecided":
                outcome = await self.stored_after(session, target)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcome = Outcome("error", *_error_kind(exc))
        return outcome

    async def _warm(self, targets: list[Target], tally: Tally, stop: asyncio.Event, started: float) -> None:
        queue = collections.deque(targets)
        pacer = Pacer(self.options.rate)

        async def worker() -> None:
            # One connection of its own (kept alive): a fill's check (``stored_after``) reaches
            # the worker process that made the fill, whose reads wait for its own disk write.
            async with self._session(1) as session:
                while queue and not stop.is_set():
                    target = queue.popleft()
                    wait = pacer.wait(time.monotonic())
                    if wait > 0:
                        await asyncio.sleep(wait)
                    tally.add(await self._warm_one(session, target), target.url)

        reporter = asyncio.ensure_future(self._report(tally, started))
        # No more workers than requests: each one is a task and, once it sends, a connection.
        count = max(1, min(self.options.concurrency, len(queue)))
        workers = [asyncio.ensure_future(worker()) for _ in range(count)]
        try:
            await _until(stop, asyncio.gather(*workers))
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            self._finish_progress(tally, started)

    def _mode(self) -> str:
        mode = self.options.progress
        if mode == "auto":
            return "bar" if self.err.isatty() else "lines"
        return mode

    async def _report(self, tally: Tally, started: float) -> None:
        mode = self._mode()
        if mode == "none":
            return
        every = 0.2 if mode == "bar" else self.options.progress_every
        while True:
            await asyncio.sleep(every)
            self._show(tally, started, mode)

    def _show(self, tally: Tally, started: float, mode: str) -> None:
        elapsed = time.monotonic() - started
        rate = tally.done / elapsed if elapsed > 0 else 0.0
        if mode == "bar":
            self.err.write("\r\x1b[K" + progress_bar(tally.done, tally.total, rate, tally.error_count))
        else:
            self.err.write(progress_line(tally.done, tally.total, rate, tally.error_count) + "\n")
        self.err.flush()

    def _finish_progress(self, tally: Tally, started: float) -> None:
        mode = self._mode()
        if mode == "bar":
            self._show(tally, started, mode)
            self.err.write("\n")
            self.err.flush()


async def _until(stop: asyncio.Event, work: Any) -> Any:
    """``work``'s result, or None as soon as ``stop`` is set (``work`` is then cancelled)."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return None
    finally:
        stopper.cancel()


def _error_kind(exc: BaseException) -> tuple[str, str]:
    """A short name for a failed request, to count errors by kind (from a fixed set: the
    summary lists each kind), and the particulars of this one."""
    import aiohttp

    if isinstance(exc, WarmError):
        return exc.kind, exc.detail
    if isinstance(exc, asyncio.TimeoutError | TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout", ""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):  # before its base class below
        error = exc.certificate_error
        if getattr(error, "verify_code", None) in NAME_MISMATCH_CODES:  # a trusted CA, another name
            return NAME_MISMATCH, str(getattr(error, "verify_message", "") or error)
        return UNTRUSTED, str(error)
    if isinstance(exc, aiohttp.ClientSSLError):
        return "TLS handshake failed", str(exc)
    if isinstance(exc, aiohttp.ClientConnectorError):
        refused = isinstance(exc.os_error, ConnectionRefusedError)
        return ("connection refused" if refused else "cannot connect"), ("" if refused else str(exc.os_error))
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return "connection closed", ""
    if isinstance(exc, aiohttp.ClientResponseError):
        return "bad response", exc.message
    return type(exc).__name__, str(exc)


__all__ = ["Target", "WarmError", "WarmOptions", "Warmer", "classify", "parse_access_log",
           "parse_sitemap", "read_sitemap", "summary", "targets_for", "url_lines"]
