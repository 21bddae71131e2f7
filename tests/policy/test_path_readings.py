"""The paths origins read a raw path as (``policy.request.path_readings``), and the deception
guard's verdict on every one of them (``policy.deception.guard_allows``).

RFC 3986 §2.2 and §6.2.2.2: an escaped reserved character (``%2F``) is not that character, and
only unreserved ones may be decoded when normalising. Origins differ on it: nginx decodes
first (the rules' reading, ``normalise_path``); servlet containers drop a segment's ``;``
parameters up to the next raw ``/`` first; Go, Rails and Express route on the raw path, where
``..`` never climbs over ``%2F``. ``/account;%2f%2e%2e%2fstatic%2fpage.html`` is the rules'
``/static/page.html`` and a servlet's ``/account`` (the victim's page, stored for 7 days by a
static rule before these readings were taken).
"""

from __future__ import annotations

import pytest

from proxy.policy.deception import guard_allows
from proxy.policy.request import normalise_path, path_readings

# (case, raw path, the rules' reading, the other readings)
READINGS: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("a usual path has no other reading", "/static/app/main.js", "/static/app/main.js", ()),
    ("an escaped letter reads the same everywhere", "/%61ccount/x.css", "/account/x.css", ()),
    ("a raw dot segment is resolved everywhere", "/static/../account", "/account", ()),
    ("a servlet drops ';' up to the next raw '/', encoded '/' included",
     "/account;%2f%2e%2e%2fstatic%2fpage.html", "/static/page.html",
     ("/account", "/account;%2F..%2Fstatic%2Fpage.html")),
    ("the json-api example's auth bypass", "/api/auth/me;%2f%2e%2e%2f%2e%2e%2fv1%2fproducts%2fx",
     "/api/v1/products/x", ("/api/auth/me", "/api/auth/me;%2F..%2F..%2Fv1%2Fproducts%2Fx")),
    ("'..' never climbs over an escaped '/' on a raw router", "/static/..%2Faccount", "/account",
     ("/static/..%2Faccount",)),
    ("nor is read out of %2e%2e there", "/static/%2e%2e/account", "/account", ("/static/%2e%2e/account",)),
    ("an escaped dot in a name is decoded everywhere", "/style%2ecss", "/style.css", ()),
    ("Tomcat's '..;'", "/static/..;/account", "/static/..;/account", ("/account",)),
    ("a plain parameter", "/cart;jsessionid=1", "/cart;jsessionid=1", ("/cart",)),
    ("an escaped ';' is a servlet's name, IIS's parameter", "/cart%3Bx", "/cart;x", ("/cart%3Bx", "/cart")),
    ("IIS: '\\' is '/', trailing dots and spaces go", "/a%5C..%5Caccount./p%20", "/a\\..\\account./p ",
     ("/a%5C..%5Caccount./p ", "/account/p")),
    ("a NUL ends a C string", "/cart%00.css", "/cart\x00.css", ("/cart",)),
]


@pytest.mark.parametrize(("case", "raw", "rules", "others"), READINGS, ids=[r[0] for r in READINGS])
def test_a_path_is_read_as_each_kind_of_origin_reads_it(
        case: str, raw: str, rules: str, others: tuple[str, ...]) -> None:
    assert normalise_path(raw) == rules
    assert path_readings(raw) == others


# (case, target, Content-Type, forced, the guard allows)
GUARD: list[tuple[str, str, str, bool, bool]] = [
    ("a stylesheet", "/static/site.css", "text/css", True, True),
    ("an HTML page at .html", "/static/page.html", "text/html", True, True),
    ("the servlet's /account has no extension", "/account;%2f%2e%2e%2fstatic%2fpage.html", "text/html",
     True, False),
    ("unforced, a path without an extension proves nothing either way",
     "/account;%2f%2e%2e%2fstatic%2fpage.html", "text/html", False, True),
    ("unforced, every reading that has a known extension must agree", "/a.html;%2f..%2fb.css", "text/css",
     False, False),
    ("unknown extensions prove nothing unforced", "/x.css;%2f..%2fa.zzz", "text/css", False, True),
    ("the query is no part of it", "/static/page.html?x=;%2f..", "text/html", True, True),
]


@pytest.mark.parametrize(("case", "target", "ctype", "forced", "allows"), GUARD, ids=[g[0] for g in GUARD])
def test_the_deception_guard_judges_every_reading_of_the_path(
        case: str, target: str, ctype: str, forced: bool, allows: bool) -> None:
    assert guard_allows(target, ctype, forced=forced) is allows
