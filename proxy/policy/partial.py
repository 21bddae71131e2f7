"""Partial content: stored 206 responses, the ranges they answer, combining them (RFC 9111 §3.3-3.4).

A cache may store an incomplete response and use it for a range request that lies
wholly within it (§3.3). Parts of one representation may be combined into one, and a
part that covers the whole representation becomes a complete response, but only when
they all carry the same strong validator (§3.4): two parts whose ETags differ, or
where either has none or a weak one, come from representations that may differ, and
are never put together.

>>> r = parse_content_range("bytes 4-9/10")
>>> r, r.length, parse_content_range("bytes 4-9/*"), parse_content_range("bytes 9-4/10")
(ByteRange(first=4, last=9, total=10), 6, None, None)
>>> widen((3_000_000, 3_100_000), 1 << 20), widen((None, 500), 1 << 20)
((2097152, 3145727), (None, 500))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from proxy.policy.fields import digits
from proxy.policy.messages import HeaderList, Headers, StoredResponse
from proxy.policy.ranges import RangeSpec, resolve_range


@dataclass(frozen=True, slots=True)
class ByteRange:
    """An inclusive byte range of a representation of ``total`` bytes."""

    first: int
    last: int
    total: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    @property
    def complete(self) -> bool:
        return self.first == 0 and self.last == self.total - 1


def representation_status(status: int) -> int:
    """The status whose rules a response follows: a 206 is part of a 200 (RFC 9110 §15.3.7), so
    it is stored and edited as that 200 is, whether the origin sent it, a stored part answers
    it or a stored 200 does; any other status is its own.

    >>> representation_status(206), representation_status(200), representation_status(404)
    (200, 200, 404)
    """
    return 200 if status == 206 else status


def parse_content_range(value: str | None) -> ByteRange | None:
    """``bytes first-last/total`` (RFC 9110 §14.4) with a known total; None otherwise (an
    unknown length ``/*`` or ``*/total`` cannot be placed in a representation)."""
    if value is None:
        return None
    unit, _, rest = value.strip(" \t").partition(" ")
    if unit.lower() != "bytes":
        return None
    span, slash, total_text = rest.strip(" \t").partition("/")
    first_text, dash, last_text = span.partition("-")
    if not slash or not dash:
        return None
    first, last, total = digits(first_text), digits(last_text), digits(total_text)
    if first is None or last is None or total is None or not first <= last < total:
        return None
    return ByteRange(first, last, total)


def part_range(stored: StoredResponse) -> ByteRange | None:
    """The range a stored 206 holds (from its Content-Range)."""
    if stored.status != 206:
        return None
    value = next((v for k, v in stored.headers if k.lower() == "content-range"), None)
    return parse_content_range(value)


def strong_etag(stored: StoredResponse) -> str | None:
    etag = stored.etag.strip() if stored.etag is not None else None
    return etag if etag is not None and etag.startswith('"') else None


def other_representation(served: StoredResponse, found: StoredResponse) -> bool:
    """Whether ``found`` is not shown by its validators to be the representation ``served`` (a
    part a client just got) is: the same only when both carry one strong ETag (RFC 9110
    §13.1.5: ranges are compared strongly). A cache that gave a client v1's bytes then answers
    its next range from v0 hands it a version older than one it already has, and a client
    without If-Range splices the two. A weak ETag (another encoding of it may have other
    bytes), a Last-Modified (one-second grain: two versions in one second share it) or none
    cannot show it: such a copy is taken for another (one more origin fetch in a race, never
    a splice; the Last-Modified and weak comparisons let one through, measured)."""
    mine, theirs = served.etag, found.etag
    if mine is None or theirs is None:
        return True
    mine, theirs = mine.strip(), theirs.strip()
    return mine.startswith("W/") or mine != theirs


def answerable(stored: StoredResponse, spec: RangeSpec) -> ByteRange | None:
    """The range of the representation a stored 206 answers for ``spec``: only when it lies
    wholly within the stored part (RFC 9111 §3.3); None otherwise."""
    held = part_range(stored)
    if held is None:
        return None
    wanted = resolve_range(spec, held.total)
    if wanted == "unsatisfiable" or wanted is None:
        return None
    first, last = wanted
    if first < held.first or last > held.last:
        return None
    return ByteRange(first, last, held.total)


@dataclass(frozen=True, slots=True)
class Combine:
    """Put the two parts together: the ``lower`` one's bytes first, then what the other adds."""

    range: ByteRange
    lower: StoredResponse
    upper: StoredResponse


@dataclass(frozen=True, slots=True)
class Refuse:
    detail: str  # VALIDATOR-MISMATCH, NO-STRONG-VALIDATOR, OTHER-LENGTH, NOT-CONTIGUOUS


def decide_combine(stored: StoredResponse, new: StoredResponse) -> Combine | Refuse:
    """May these two parts of a representation be combined (RFC 9111 §3.4), and into what?"""
    a, b = part_range(stored), part_range(new)
    if a is None or b is None:
        return Refuse("NOT-A-PART")
    tag_a, tag_b = strong_etag(stored), strong_etag(new)
    if tag_a is None or tag_b is None:
        return Refuse("NO-STRONG-VALIDATOR")
    if tag_a != tag_b:
        return Refuse("VALIDATOR-MISMATCH")
    if a.total != b.total:
        return Refuse("OTHER-LENGTH")
    lower, upper = (stored, new) if (a.first, a.last) <= (b.first, b.last) else (new, stored)
    lo, hi = (a, b) if lower is stored else (b, a)
    if hi.first > lo.last + 1:
        return Refuse("NOT-CONTIGUOUS")
    return Combine(ByteRange(lo.first, max(lo.last, hi.last), a.total), lower, upper)


# A range that starts at most this far past what the key's fill in flight has received waits for
# that fill's body (at most this much of it) and is answered from it; one further on is asked
# of the origin at once: a seek far into a video never waits for the fill to get there.
JOIN_AHEAD = 1 << 20


@dataclass(frozen=True, slots=True)
class JoinFill:
    """Answered from the key's whole fill, as its other clients are (the range sliced from the
    body as it arrives: ``proxy.policy.reply.reply_on_arrival``): joined when one is in flight
    (``in-flight``), else started (``whole``: ``bytes=0-`` asks for the whole representation,
    which is what a browser's video element sends first; ``elsewhere``: another worker is
    fetching the object, and this worker's fill waits for its lease as a plain miss's does,
    then answers from what it stored)."""

    reason: Literal["in-flight", "whole", "elsewhere"]


@dataclass(frozen=True, slots=True)
class FetchRange:
    """Ask the origin for the range alone (``FetchPart``: ``part_fetch_fields``). ``lead``: the
    key's fill is held for it until its 206 arrives: the whole object is fetched after it only
    when that 206 may be stored and the object may be too (``whole_follows``), and the key's
    other range misses meanwhile wait for that fill (a herd of them is one range and one whole
    fetch, not one each)."""

    lead: bool


RangeFetch = JoinFill | FetchRange


def decide_range_fetch(spec: RangeSpec, *, fill_whole: bool, fill_received: int | None, passing: bool,
                       authorization: bool, filling_elsewhere: bool = False) -> RangeFetch:
    """How a single range no stored response answers (``FetchPart``) goes to the origin.

    ``fill_whole``: ``cache.range_fill: whole``; ``fill_received``: the bytes the key's fill in
    flight has received (None: none is); ``filling_elsewhere``: no fill of the key is in flight
    here, but another worker holds its lease (``proxy.leases``: it is fetching the object, and
    its response is not known to be unshareable). A range near the start then waits for that
    fetch as the key's plain misses do (one fetch per machine), as it would join a fill here
    that has received nothing yet; a seek further on, or a suffix, is asked of the origin at
    once (that fill brings the whole object already). ``passing``: the key is hit-for-pass (nothing of it is
    shared or stored: the range alone, never a whole fetch); ``authorization``: the request
    has credentials, which no fetch the client did not ask for may carry (RFC 9111 §3.5: a
    response to it is stored only when it says so; Varnish passes such requests).

    >>> plain = dict(passing=False, authorization=False)
    >>> decide_range_fetch((0, None), fill_whole=False, fill_received=None, **plain)
    JoinFill(reason='whole')
    >>> decide_range_fetch((5 << 20, None), fill_whole=True, fill_received=0, **plain)
    FetchRange(lead=False)
    """
    if passing:
        return FetchRange(lead=False)
    first = spec[0]
    if fill_received is not None:
        if first is not None and first <= fill_received + JOIN_AHEAD:
            return JoinFill("in-flight")
        return FetchRange(lead=False)  # the fill in flight brings the whole object already
    if filling_elsewhere:
        return JoinFill("elsewhere") if first is not None and first <= JOIN_AHEAD else FetchRange(lead=False)
    if spec == (0, None):
        return JoinFill("whole")
    return FetchRange(lead=fill_whole and not authorization)


def part_fetch_fields(spec: RangeSpec, request_headers: Headers) -> HeaderList:
    """What a part's fetch adds to the fill request (which drops the client's Range and
    If-Range: ``proxy.policy.request.FILL_DROPS``): the range ``spec``, and the client's one
    If-Range line, for the origin to evaluate (RFC 9110 §13.1.5): its 206 when the validator
    holds, else the whole 200, which answers the client as a response to its range does
    (``reply_on_arrival``: the whole 200). Several If-Range lines never come here
    (``decide_part_lookup``: the whole response).

    >>> from multidict import CIMultiDict
    >>> part_fetch_fields((5, None), CIMultiDict({"If-Range": '"v1"'}))
    (('Range', 'bytes=5-'), ('If-Range', '"v1"'))
    >>> part_fetch_fields((None, 9), CIMultiDict())
    (('Range', 'bytes=-9'),)
    """
    first, last = spec
    wanted = ("Range", f"bytes={'' if first is None else first}-{'' if last is None else last}")
    if_range = request_headers.getall("If-Range", ())
    return (wanted, ("If-Range", if_range[0])) if len(if_range) == 1 else (wanted,)


def whole_follows(part: ByteRange, room: int) -> bool:
    """``range_fill: whole``: is the whole object fetched after a storable 206 of it? Only when
    the object, ``part.total`` bytes by its Content-Range, fits in ``room`` (the biggest body
    the store keeps: ``max_object``, or less). A larger one is never stored: that fetch was
    refused at its head, after the origin had begun sending it, at every range of a video
    over ``max_object`` (a seek's range, and a whole download started and dropped).

    >>> whole_follows(ByteRange(0, 99, 1000), 1000), whole_follows(ByteRange(0, 99, 1001), 1000)
    (True, False)
    """
    return part.total <= room


def widen(spec: RangeSpec, slice_size: int) -> RangeSpec:
    """``spec`` widened to whole slices of ``slice_size`` bytes (``range_fill: slice``, as
    nginx's slice module aligns its subrequests); a suffix range is left as it is (its
    position is unknown until the length is)."""
    first, last = spec
    if first is None or slice_size <= 0:
        return spec
    start = first // slice_size * slice_size
    if last is None:
        return start, None
    return start, (last // slice_size + 1) * slice_size - 1
