"""What a client of a flight does once the flight has its head (``proxy.flight.after_head``):
a pure function, so a table."""

from __future__ import annotations

from dataclasses import replace

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.coalescer import FlightHead
from proxy.errors import (
    NoUpstreamAvailable,
    ProxyStopping,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from proxy.flight import (
    STORED_ELSEWHERE,
    FromHead,
    FromStore,
    NextStep,
    OnItsOwn,
    Relay,
    StaleInstead,
    after_head,
    fetches_again,
)
from proxy.http_client import UpstreamBodyError
from proxy.policy.fill import arrived
from proxy.policy.messages import Freshness, RequestHead, StoredResponse

STORED = StoredResponse(200, "OK", (), 0, 0, Freshness(60, "max-age", 0, 0), etag='"e"')


def head(status: int = 200, detail: str = "", shareable: bool = True, length: int | None = 10,
         vary: tuple[tuple[str, str], ...] = ()) -> FlightHead:
    """A flight's head; being stored (``detail`` "") it carries the response as stored, not
    stored the response as it arrived (``arrived``), read from the store (another worker's,
    a 304's) none."""
    fields = CIMultiDictProxy(CIMultiDict())
    response = None if detail in (STORED_ELSEWHERE, "FRESHENED") else (
        replace(STORED, status=status) if detail == "" else arrived(status, "", fields, 0))
    return FlightHead(status, "", fields, shareable, detail, length, vary, response)


def request(method: str = "GET", **fields: str) -> RequestHead:
    headers = CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in fields.items()}))
    return RequestHead(method, "http", "site.test", "/a", headers)


CASES: list[tuple[str, FlightHead, RequestHead, str, bool, bool, NextStep]] = [
    ("the leader of a small stored response gets it whole", head(), request(), "uri-miss", False, False,
     Relay("MISS", "whole")),
    ("a follower of a small shareable response gets it whole, coalesced", head(), request(), "uri-miss",
     True, False, Relay("HIT", "whole", coalesced=True)),
    ("the leader of a big response streams it", head(length=100_000), request(), "uri-miss", False, False,
     Relay("MISS", "stream")),
    ("a follower gets up to 256 KiB whole", head(length=200_000), request(), "uri-miss", True, False,
     Relay("HIT", "whole", coalesced=True)),
    ("a response of unknown length is streamed", head(length=None), request(), "uri-miss", False, False,
     Relay("MISS", "stream")),
    ("a refetched stale response is EXPIRED", head(), request(), "stale", False, False,
     Relay("EXPIRED", "whole")),
    ("a HEAD gets the head only", head(), request("HEAD"), "uri-miss", False, False, Relay("MISS", "none")),
    ("a 204 has no body to send", head(204), request(), "uri-miss", False, False, Relay("MISS", "none")),
    ("a follower of a private response fetches its own", head(shareable=False, detail="PRIVATE"), request(),
     "uri-miss", True, False, OnItsOwn()),
    ("the leader of a private response gets it", head(shareable=False, detail="PRIVATE"), request(),
     "uri-miss", False, False, Relay("MISS", "whole")),
    ("a follower with another Vary value fetches its own", head(vary=(("accept-language", "en"),)),
     request(Accept_Language="de"), "uri-miss", True, False, OnItsOwn()),
    ("a follower with the same Vary value is served", head(vary=(("accept-language", "en"),)),
     request(Accept_Language="en"), "uri-miss", True, False, Relay("HIT", "whole", coalesced=True)),
    ("a conditional leader is answered from the flight's head, not the store", head(),
     request(If_None_Match='"x"'), "uri-miss", False, False, FromHead(Relay("MISS", "whole"))),
    ("a range follower is answered from the flight's head, not the store", head(), request(Range="bytes=0-1"),
     "uri-miss", True, False, FromHead(Relay("HIT", "whole", coalesced=True))),
    ("a big body's If-Range leader: from the head, else streamed", head(length=10_000_000),
     request(Range="bytes=0-1", If_Range='"e"'), "uri-miss", False, False, FromHead(Relay("MISS", "stream"))),
    ("a precondition on a refetched stale response: from the head", head(length=None),
     request(If_Match='"e"'), "stale", False, False, FromHead(Relay("EXPIRED", "stream"))),
    ("If-Modified-Since on a HEAD: from the head, else the head only", head(),
     request("HEAD", If_Modified_Since="Mon, 01 Jan 2024 00:00:00 GMT"), "uri-miss", False, False,
     FromHead(Relay("MISS", "none"))),
    ("a conditional request of a stored error status gets the response", head(404, length=3),
     request(If_None_Match='"x"'), "uri-miss", False, False, Relay("MISS", "whole")),
    ("a conditional request of an unstored response: from the head all the same", head(detail="NO-STORE"),
     request(If_None_Match='"x"'), "uri-miss", False, False, FromHead(Relay("MISS", "whole"))),
    ("a range leader of a private response: from the head",
     head(shareable=False, detail="PRIVATE", length=100_000), request(Range="bytes=0-"), "uri-miss", False,
     False, FromHead(Relay("MISS", "stream"))),
    ("a precondition on a response too large to store: from the head", head(detail="TOO-LARGE", length=None),
     request(If_Match='"old"'), "uri-miss", False, False, FromHead(Relay("MISS", "stream"))),
    ("a range follower of a private response fetches its own (answered from its own head)",
     head(shareable=False, detail="PRIVATE"), request(Range="bytes=0-1"), "uri-miss", True, False, OnItsOwn()),
    ("a conditional request of an unstored error status gets the response", head(404, "UNCACHEABLE-STATUS"),
     request(If_None_Match='"x"'), "uri-miss", False, False, Relay("MISS", "whole")),
    ("what another worker stored is answered from the store", head(detail=STORED_ELSEWHERE), request(),
     "uri-miss", False, False, FromStore("HIT", collapsed=True, coalesced=True, stored=True)),
    ("what another worker freshened with its origin's 304 is answered as revalidated",
     head(304, STORED_ELSEWHERE), request(), "stale", False, False,
     FromStore("REVALIDATED", collapsed=True, coalesced=True)),
    ("a freshened response is answered from the store, its followers coalesced", head(304, "FRESHENED"),
     request(), "stale", True, False, FromStore("REVALIDATED", collapsed=True, coalesced=True)),
    ("the revalidation's leader is not collapsed, and the 304's Set-Cookie is its own", head(304, "FRESHENED"),
     request(), "stale", False, False, FromStore("REVALIDATED", collapsed=False, cookies=True)),
    ("an origin 5xx with a stale response to fall back on serves it", head(503, "UNCACHEABLE-STATUS"),
     request(), "stale", False, True, StaleInstead("ORIGIN-ERROR")),
    ("an origin 5xx that is stored is served as it is", head(503), request(), "stale", False, True,
     Relay("EXPIRED", "whole")),
    ("an origin 5xx without a stale response is passed on", head(503, "UNCACHEABLE-STATUS"), request(),
     "uri-miss", False, False, Relay("MISS", "whole")),
    ("an origin 501 is passed on even with a stale response (RFC 5861 §4 names 500, 502-504)",
     head(501, "UNCACHEABLE-STATUS"), request(), "stale", False, True, Relay("EXPIRED", "whole")),
    ("so is a 505", head(505, "UNCACHEABLE-STATUS"), request(), "stale", False, True, Relay("EXPIRED", "whole")),
]


@pytest.mark.parametrize(("name", "fhead", "req", "fwd", "collapsed", "stale", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_what_a_client_of_a_flight_does_once_it_has_its_head(
        name: str, fhead: FlightHead, req: RequestHead, fwd: str, collapsed: bool, stale: bool,
        expected: NextStep) -> None:
    assert after_head(fhead, req, fwd, collapsed=collapsed, stale=stale) == expected


# -- a flight without a head (``proxy.flight.fetches_again``) ------------------------------------

RESET = UpstreamConnectError("closed the connection before answering")
BODY_TIMEOUT = UpstreamTimeout("read timed out mid-body")
BODY_TIMEOUT.in_body = True
# (case, error, collapsed, again, stale, part, fetches again)
FAILURES: list[tuple[str, UpstreamError, bool, bool, bool, bool, bool]] = [
    ("a follower of a fetch the origin reset", RESET, True, False, False, False, True),
    ("a follower of one answered with an invalid response", UpstreamProtocolError("206 to no Range"),
     True, False, False, False, True),
    ("a follower of one that timed out", UpstreamTimeout("read"), True, False, False, False, True),
    ("the leader: its own request failed", RESET, False, False, False, False, False),
    ("a follower that fetched again already", RESET, True, True, False, False, False),
    ("a follower with a stale response to serve (stale-if-error)", RESET, True, False, True, False, False),
    ("a range miss that joined the whole fill", RESET, True, False, False, True, False),
    ("an empty pool: no request caused it", NoUpstreamAvailable("all down"), True, False, False, False, False),
    ("the stop", ProxyStopping("cut off"), True, False, False, False, False),
    ("a body that broke off", UpstreamBodyError("short"), True, False, False, False, False),
    ("a body that fell silent after its head (the worker holding the lease's)", BODY_TIMEOUT,
     True, False, False, False, False),
]


@pytest.mark.parametrize(("case", "error", "collapsed", "again", "stale", "part", "want"), FAILURES,
                         ids=[c[0] for c in FAILURES])
def test_who_fetches_again_after_a_fetch_without_a_head(case: str, error: UpstreamError, collapsed: bool,
                                                        again: bool, stale: bool, part: bool, want: bool) -> None:
    assert fetches_again(error, collapsed=collapsed, again=again, stale=stale, part=part) is want
