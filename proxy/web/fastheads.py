"""The fast path's pre-serialised response heads (``proxy.web.fastpath``): one per stored
variant, rule edits, HTTP version and GET/HEAD (or the variant's 304, for a client whose own
If-None-Match / If-Modified-Since matched), with holes for what changes per request (Age,
the ttl of Cache-Status, X-Request-Id, and Date when the stored response has none).

A head is built by the same steps the general path takes (``build_head``: the front end's own
fields, then the one reply-head writer, ``proxy.web.heads``). Building one costs ≈ 6 µs
(``timeit``; a CIMultiDict, the framing, the serialiser, the holes), and with a long tail of
keys nearly every hit is on a variant this process has no head for yet: 13 % of a worker's
samples on 100,000 random keys (py-spy). But what those steps decide depends on the fields'
*names* only (which to drop, which to add, which framing fields are missing), never on their
values, which the serialiser copies through once it has checked them. So ``HeadShapes`` builds
a head once per *shape* (status, reason, field names, rule edits, front-end fields, version,
GET/HEAD, empty body or not, the response or its 304) with a placeholder for each stored
value and for the length, and a variant's head is that template with its values put in: a
join of bytes. A value the serialiser would refuse (a control character, or the placeholder
character) goes through ``build_head`` itself, which refuses it as before.
tests/test_fastheads.py checks that both ways give the same bytes for a table of responses.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from aiohttp import hdrs
from aiohttp.helpers import rfc822_formatted_time
from multidict import CIMultiDict

from proxy.engine import served_headers
from proxy.policy.cache_status import cache_status
from proxy.policy.messages import StoredResponse
from proxy.policy.reply import not_modified_fields
from proxy.rules import HeaderEdits
from proxy.storage.memory import Cached
from proxy.web.frontend import Extras, add_own_fields
from proxy.web.heads import frame, serialise

# Placeholders in a head while it is serialised (U+E000 is a private-use character, which
# no stored field contains: a variant whose fields do is never answered here).
_MARK = "\ue000"
_MARK_BYTES = _MARK.encode()
MARK_AGE, MARK_STATUS, MARK_DATE = f"{_MARK}A{_MARK}", f"{_MARK}C{_MARK}", f"{_MARK}D{_MARK}"
MARK_ID = f"{_MARK}R{_MARK}"
MARK_LENGTH = f"{_MARK}L{_MARK}"  # a template's Content-Length (``HeadShapes``)
_HIT_ZERO = cache_status(hit=True, ttl=0.0)
assert _HIT_ZERO.endswith("=0"), _HIT_ZERO
# Cache-Status of a fresh hit is this prefix and floor(ttl); ttl > 0 for a HIT, so %d's
# truncation is the floor.
_HIT_PREFIX = _HIT_ZERO[:-1].encode().replace(b"%", b"%%")
_FILL = {b"A": b"%d", b"C": _HIT_PREFIX + b"%d", b"D": b"%s", b"R": b"%s"}
# A head's flavor (``Head.flavor``, ``HeadShapes.head``): bits, or'ed with 1 for HTTP/1.0.
HEAD_ONLY, NOT_MODIFIED = 2, 4
NOT_MODIFIED_STATUS = (304, "Not Modified")  # as the engine's reply to a matching conditional


class Head:
    """A pre-serialised response head with its per-request holes, for one variant."""

    __slots__ = ("edits", "extras", "flavor", "fmt", "order")

    def __init__(self, edits: HeaderEdits | None, flavor: int, extras: Extras,
                 fmt: bytes | None, order: bytes) -> None:
        self.edits = edits
        self.flavor = flavor
        self.extras = extras
        self.fmt = fmt  # None: this variant cannot be answered here in this flavor
        self.order = order  # which holes, in order: b"ACR", b"ACRD", b"CR", ...

    @property
    def size(self) -> int:
        """The bytes it holds beside its object (counted in the memory tier's decoded budget)."""
        return len(self.fmt or b"") + len(self.order) + 33

    def render(self, age: float, ttl: float, request_id: bytes) -> bytes:
        fmt = self.fmt
        assert fmt is not None
        order = self.order
        if order == b"ACR":
            return fmt % (age, ttl, request_id)
        values = {65: age, 67: ttl, 68: rfc822_formatted_time().encode(), 82: request_id}
        return fmt % tuple(values[c] for c in order)


def build_head(status: int, reason: str, headers: list[tuple[str, str]],
               debug: tuple[tuple[str, str], ...], length: int, head_only: bool,
               version: tuple[int, int], server: str = "cachegate") -> tuple[bytes, bytes] | None:
    """The head the general path writes for these reply fields (holes marked), as
    (%-format, holes); None when it cannot be pre-built.

    The same steps as the general path's ``write_reply``, from the same functions: the
    front end's own fields (``add_own_fields``: debug fields, X-Request-Id, Server unless a
    rule set one), then the one head writer (``proxy.web.heads``: ``frame`` on a kept-alive
    connection, ``serialise``).
    """
    raw = _raw_head(status, reason, headers, debug, length, head_only, version, server)
    if raw is None:
        return None
    parts = raw.split(_MARK_BYTES)
    literals, holes = parts[0::2], parts[1::2]
    if len(parts) % 2 != 1 or any(hole not in _FILL for hole in holes):
        return None  # a stored field held the placeholder character
    fmt = bytearray(literals[0].replace(b"%", b"%%"))
    for hole, literal in zip(holes, literals[1:], strict=True):
        fmt += _FILL[hole] + literal.replace(b"%", b"%%")
    return bytes(fmt), b"".join(holes)


def _raw_head(status: int, reason: str, headers: list[tuple[str, str]], debug: tuple[tuple[str, str], ...],
              length: int, head_only: bool, version: tuple[int, int], server: str,
              length_hole: bool = False) -> bytes | None:
    """The head's bytes with its holes marked (``length_hole``: Content-Length's value too)."""
    if "\r" in reason or "\n" in reason or _MARK in reason:
        return None
    h: CIMultiDict[str] = CIMultiDict(headers)
    add_own_fields(h, Extras(debug, server), MARK_ID)
    # Kept alive: a request that asks to close takes the general path.
    frame(h, status, hdrs.METH_HEAD if head_only else hdrs.METH_GET, version, length, True, MARK_DATE)
    if length_hole and hdrs.CONTENT_LENGTH in h:
        h[hdrs.CONTENT_LENGTH] = MARK_LENGTH
    try:
        return serialise(version, status, reason, h)
    except (ValueError, TypeError):
        return None


# What aiohttp's serialiser refuses in a field (control characters but tab, DEL), and the
# placeholder character: a value holding one is not put into a template.
_REFUSED = re.compile("[\x00-\x08\x0a-\x1f\x7f\ue000]")
MAX_SHAPES = 1024  # templates a process keeps (then forgets all at once)
_LENGTH = -1  # a template part: the body's length
# A head template: its parts (bytes, a stored value's index, or _LENGTH) and its per-request holes.
Template = tuple[tuple[bytes | int, ...], bytes]


class HeadShapes:
    """A process's head templates by shape (see the module docstring)."""

    def __init__(self) -> None:
        # shape -> (edits, extras, template): the edits and extras are kept to be compared by
        # identity (the shape holds their ids: hashing HeaderEdits costs more than a build).
        self._templates: dict[tuple[Any, ...], tuple[Any, Any, Template | None]] = {}

    def head(self, cached: Cached, edits: HeaderEdits | None, flavor: int, extras: Extras,
             version: tuple[int, int]) -> Head:
        """The head of ``cached`` for this rule ``edits``, ``flavor`` (``HEAD_ONLY``, 1: HTTP/1.0,
        ``NOT_MODIFIED``: the 304 of a stored 200, for GET and HEAD alike) and front-end
        ``extras``; its ``fmt`` is None when the general path must answer.

        A stored 304 is left to the general path, and so is a stored 204 unless its empty body
        is in memory: the answer is then its head alone, whatever the method (``heads.frame``
        gives it no Content-Length, as the general path's reply)."""
        stored = cached.entry.response
        head_only = bool(flavor & HEAD_ONLY)
        built = None
        status = stored.status
        if flavor & NOT_MODIFIED:
            if status == 200:  # (``client_not_modified``: only a stored 200 has a 304)
                built = self._built(stored, edits, extras, False, version, 0, True)
        elif status >= 200 and status != 304 and (status != 204 or (cached.body is not None
                                                                    and not cached.body)):
            length = cached.entry.body_size if head_only or cached.body is None else len(cached.body)
            built = self._built(stored, edits, extras, head_only, version, length)
        return Head(edits, flavor, extras, *(built or (None, b"")))

    def _built(self, stored: StoredResponse, edits: HeaderEdits | None, extras: Extras, head_only: bool,
               version: tuple[int, int], length: int, not_modified: bool = False
               ) -> tuple[bytes, bytes] | None:
        fields = stored.headers
        values = [v for _, v in fields]
        if not _REFUSED.search("".join(values)):
            shape = (stored.status, stored.reason, tuple([k for k, _ in fields]), id(edits), id(extras),
                     head_only, version, length == 0, not_modified)
            found = self._templates.get(shape)
            if found is None or found[0] is not edits or found[1] is not extras:
                if len(self._templates) >= MAX_SHAPES:
                    self._templates.clear()
                found = self._templates[shape] = (edits, extras, _template(stored, edits, extras, head_only,
                                                                            version, length, not_modified))
            template = found[2]
            if template is None:
                return None  # the shape itself is refused (its reason, a field name)
            size = str(length).encode()
            parts, holes = template
            try:  # only the values the head keeps are encoded
                return b"".join([p if isinstance(p, bytes) else size if p == _LENGTH
                                 else values[p].encode().replace(b"%", b"%%") for p in parts]), holes
            except UnicodeEncodeError:
                pass  # (a lone surrogate): build_head decides
        status, reason = NOT_MODIFIED_STATUS if not_modified else (stored.status, stored.reason)
        return build_head(status, reason, _served(fields, edits, not_modified), extras.debug, length,
                          head_only, version, extras.server)


def _served(fields: Sequence[tuple[str, str]], edits: HeaderEdits | None, not_modified: bool = False
            ) -> list[tuple[str, str]]:
    """A stored response's fields as a fresh hit serves them (Age and Cache-Status as holes),
    with the rule's edits; ``not_modified``: those its 304 keeps, as the engine picks them
    (``proxy.policy.reply.not_modified_fields``, after the edits, as ``Engine.serve``)."""
    headers = served_headers(fields, MARK_AGE, MARK_STATUS, "HIT")
    if edits:
        headers = edits.apply(headers)
    return not_modified_fields(headers) if not_modified else headers


def _template(stored: StoredResponse, edits: HeaderEdits | None, extras: Extras, head_only: bool,
              version: tuple[int, int], length: int, not_modified: bool = False) -> Template | None:
    """``build_head`` of a shape: (parts, holes), where a part is bytes (the head, per-request
    holes included, escaped for ``%``), a stored value's index, or ``_LENGTH``."""
    if any(_MARK in k for k, _ in stored.headers):
        return None  # (not a token: the origin's parser refuses it) the general path answers
    placeholders = [(k, f"{_MARK}{i}{_MARK}") for i, (k, _) in enumerate(stored.headers)]
    status, reason = NOT_MODIFIED_STATUS if not_modified else (stored.status, stored.reason)
    raw = _raw_head(status, reason, _served(placeholders, edits, not_modified), extras.debug, length,
                    head_only, version, extras.server, length_hole=True)
    if raw is None:
        return None
    pieces = raw.split(_MARK_BYTES)
    if len(pieces) % 2 != 1:
        return None
    parts: list[bytes | int] = []
    literal = bytearray(pieces[0].replace(b"%", b"%%"))
    holes = bytearray()
    for hole, text in zip(pieces[1::2], pieces[2::2], strict=True):
        if hole in _FILL:
            literal += _FILL[hole]
            holes += hole
        elif hole != b"L" and not hole.isdigit():
            return None  # a rule's or the front end's field held the placeholder character
        else:
            parts.append(bytes(literal))
            parts.append(_LENGTH if hole == b"L" else int(hole))
            literal = bytearray()
        literal += text.replace(b"%", b"%%")
    parts.append(bytes(literal))
    return tuple(parts), bytes(holes)
