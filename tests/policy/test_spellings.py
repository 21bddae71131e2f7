"""Field names CGI, WSGI and Rack origins read as one field (``_`` and ``-`` swapped, any case):
which of the names a key or a variant reads a request also carries spelled otherwise."""

from __future__ import annotations

import pytest

from proxy.policy.spellings import NO_SPELLING, spelled_otherwise, underscored
from tests.policy.build import headers

Pairs = list[tuple[str, str]]

# (case, the names read, the request's field lines, the name carried spelled otherwise or None)
CASES: list[tuple[str, tuple[str, ...], Pairs, str | None]] = [
    ("the field alone", ("x-tenant",), [("X-Tenant", "acme")], None),
    ("the field and its _ spelling", ("x-tenant",), [("X-Tenant", "acme"), ("X_Tenant", "evil")], "x-tenant"),
    ("the _ spelling first", ("x-tenant",), [("X_Tenant", "evil"), ("X-Tenant", "acme")], "x-tenant"),
    ("the _ spelling alone (the field absent to the cache)", ("x-tenant",), [("x_tenant", "evil")],
     "x-tenant"),
    ("in another case", ("x-tenant",), [("X_TENANT", "evil")], "x-tenant"),
    ("half the separators swapped", ("x-requested-with",), [("X-Requested_With", "1")], "x-requested-with"),
    ("a name read with _: its - spelling", ("x_tenant",), [("X-Tenant", "acme")], "x_tenant"),
    ("a name read with _, sent so", ("x_tenant",), [("X_Tenant", "acme")], None),
    ("the field twice, one spelling: lines, not spellings", ("x-tenant",),
     [("X-Tenant", "a"), ("x-tenant", "b")], None),
    ("another _ field", ("x-tenant",), [("X-Tenant", "acme"), ("X_Other", "1")], None),
    ("a _ where the name has none", ("x-tenant",), [("X-Tenant_", "1"), ("_X-Tenant", "1")], None),
    ("the first of several names", ("accept-language", "x-tenant"),
     [("Accept_Language", "de"), ("X_Tenant", "evil")], "accept-language"),
    ("a name of over five parts (the scan, not the look-ups)", ("x-a-b-c-d-e-f",),
     [("x-a-b-c-d_e-f", "1")], "x-a-b-c-d-e-f"),
    ("a name of over five parts, read with _", ("x_a_b_c_d_e_f",), [("X-A-B-C-D-E-F", "1")],
     "x_a_b_c_d_e_f"),
    ("nothing read", (), [("X_Tenant", "evil")], None),
]


@pytest.mark.parametrize(("case", "names", "lines", "expected"), CASES, ids=[c[0] for c in CASES])
def test_a_field_carried_under_another_spelling_is_found(
        case: str, names: tuple[str, ...], lines: Pairs, expected: str | None) -> None:
    assert spelled_otherwise(names, headers(*lines)) == expected


def test_a_request_without_underscores_costs_one_scan_and_shares_the_empty_answer() -> None:
    assert underscored(headers(("Host", "a"), ("Accept-Language", "de"))) is NO_SPELLING
