"""Vary normalisation (RFC 9111 §4.1): only what every origin reads alike is normalised.

RFC 9110 makes more spellings equivalent (the case of tokens, q-value spelling, the order of
members of different weights), but origins read the raw value: PHP's ``substr($_SERVER[
'HTTP_ACCEPT_LANGUAGE'], 0, 2)`` and any reader of the first member answer ``en;q=0.5, de``
in English and ``de, en;q=0.5`` in German, and a string comparison sees ``EN`` as another
language. So an Accept-* value loses only the whitespace around its members and their ``;``;
its order, case and weights stay as written, and spellings that differ only there are apart.
"""

from __future__ import annotations

import pytest

from proxy.policy import fields, keys
from proxy.policy.keys import normalise_selecting
from proxy.policy.messages import CacheOptions
from proxy.policy.reuse import Serve, decide_lookup, select_variant
from tests.policy.build import request, stored

CHROME_AE = "gzip, deflate, br, zstd"
CHROME_AL = "en-US,en;q=0.9"
FIREFOX_AL = "en-US,en;q=0.5"

# (case, field, first request's lines, second request's lines, same variant?)
EQUIVALENT: list[tuple[str, str, list[str], list[str], bool]] = [
    # Accept-Encoding (RFC 9110 §12.5.3): a set of codings with weights; order means nothing.
    ("the same codings in another order: one variant (whichever an origin takes, each client decodes it)",
     "Accept-Encoding", [CHROME_AE], ["deflate, gzip, br, zstd"], True),
    ("the same codings and weights in another order: one variant", "Accept-Encoding",
     ["br;q=0.9, gzip"], ["gzip,br;q=0.9"], True),
    ("the same codings with their weights on others: apart", "Accept-Encoding",
     ["br;q=0.9, gzip"], ["br, gzip;q=0.9"], False),
    ("the same codings over two lines: apart (an origin may read the first line only)", "Accept-Encoding",
     [CHROME_AE], ["gzip, deflate", "br, zstd"], False),
    ("codings in another case: apart (a string comparison sees another coding)", "Accept-Encoding", ["gzip, br"],
     ["GZip, BR"], False),
    ("x-gzip is not gzip to an origin that looks for gzip", "Accept-Encoding", ["gzip"], ["x-gzip"], False),
    ("q=1.0 and no q: apart (a reader of the raw value sees other text)", "Accept-Encoding", ["gzip, br;q=1.0"],
     ["gzip, br"], False),
    ("whitespace around ';' means nothing", "Accept-Encoding", ["gzip;q=0.5, br"], ["gzip ;\tq=0.5 ,br"],
     True),
    ("a coding listed twice is compared as written", "Accept-Encoding", ["gzip, gzip, br"], ["br, gzip"], False),
    ("whitespace means nothing", "Accept-Encoding", ["gzip,br"], [" gzip ,  br "], True),
    ("an empty member is compared as written", "Accept-Encoding", ["gzip, br"], ["gzip,, br ,"], False),
    ("another set of codings differs", "Accept-Encoding", ["gzip"], ["gzip, br"], False),
    ("another weight differs", "Accept-Encoding", ["gzip, br"], ["gzip, br;q=0.5"], False),
    ("q=0 (not acceptable) is not absent", "Accept-Encoding", ["gzip"], ["gzip, identity;q=0"], False),
    ("an empty Accept-Encoding (no coding wanted) is not an absent one", "Accept-Encoding", [""], [], False),
    # Accept-Language (RFC 9110 §12.5.4): language ranges with weights.
    ("Chrome's Accept-Language with other whitespace", "Accept-Language", [CHROME_AL], [" en-US , en ; q=0.9"],
     True),
    ("Chrome's Accept-Language in other case and weight spelling: apart", "Accept-Language", [CHROME_AL],
     ["en-us, en;q=0.90"], False),
    ("members whose order the weights decide, in another order: apart (first-member readers)",
     "Accept-Language", ["en-US,en;q=0.9,de;q=0.8"], ["de;q=0.8, en-US, en;q=0.9"], False),
    ("a weighted-down first member is still the first (PHP's substr(..., 0, 2))", "Accept-Language",
     ["de, en;q=0.5"], ["en;q=0.5, de"], False),
    ("language tags in another case: apart (RFC 4647 ignores case, a string comparison does not)",
     "Accept-Language", ["en, de;q=0.5"], ["EN, De;q=0.5"], False),
    ("q=1.0 is not written as no q", "Accept-Language", ["de;q=1.0"], ["de"], False),
    ("Chrome and Firefox weigh en differently: apart", "Accept-Language", [CHROME_AL], [FIREFOX_AL], False),
    ("equal weights in another order: apart (the first may be chosen)", "Accept-Language", ["en, de"],
     ["de, en"], False),
    ("another language differs", "Accept-Language", [CHROME_AL], ["en-GB,en;q=0.9"], False),
    # An attacker's spelling that an origin reads otherwise must not select the victim's variant.
    ("an empty line before en is not en (an origin reading the first line sees none)", "Accept-Language", ["en"],
     ["", "en"], False),
    ("a language listed twice (servers take the first, the last or the best weight)", "Accept-Language",
     ["de, en;q=0.5"], ["de;q=0.1, en;q=0.5, de"], False),
    ("Origin is no list: a trailing comma is another origin", "Origin", ["https://app.example"],
     ["https://app.example,"], False),
    ("an empty Origin line beside the real one is not the real one", "Origin", ["https://app.example"],
     [",", "https://app.example"], False),
    ("a leading empty member is not the origin either", "Origin", ["https://app.example"],
     [", https://app.example"], False),
    ("two empty lines are not an absent field", "Origin", [], ["", ""], False),
    ("a Kelvin sign is no k (Unicode case folding made it uk): past ASCII, as written", "Accept-Language",
     ["uk"], ["u\u212a"], False),
    ("the same past a list field's ASCII", "Cache-Control", ["no-cache"], ["no-cache\u212a"], False),
    # Accept (RFC 9110 §12.5.1) and unknown fields.
    ("media types in another case: apart", "Accept", ["text/html;level=1"], ["Text/HTML; level=1"], False),
    ("media types with other whitespace around ';' and ','", "Accept", ["text/html;level=1, */*;q=0.8"],
     ["text/html ; level=1,*/* ;q=0.8"], True),
    ("a weighted-down JSON first is not a browser's HTML first", "Accept",
     ["text/html, application/json;q=0.9"], ["application/json;q=0.9, text/html"], False),
    ("whitespace around '=' is kept (the grammar has none; parsers differ)", "Accept", ["text/html;q=0.9"],
     ["text/html;q = 0.9"], False),
    ("unknown fields are compared as written", "Foo", ["1, 2"], ["1,2"], False),
    ("unknown fields' lines stay apart", "Foo", ["1, 2"], ["1", "2"], False),
    ("unknown fields: the same text is the same value", "Foo", ["1, 2"], ["1, 2"], True),
    ("unknown fields keep their order", "Foo", ["1, 2"], ["2, 1"], False),
    ("unknown fields keep their case", "Foo", ["a"], ["A"], False),
]


@pytest.mark.parametrize(("case", "field", "first", "second", "same"), EQUIVALENT, ids=[e[0] for e in EQUIVALENT])
def test_equivalent_selecting_values_share_a_variant_and_others_do_not(
    case: str, field: str, first: list[str], second: list[str], same: bool
) -> None:
    assert (normalise_selecting(field, first) == normalise_selecting(field, second)) is same
    # And through the lookup itself: the variant stored for the first request serves the second.
    s = stored([("Cache-Control", "max-age=60"), ("Vary", field)], req=request(*((field, v) for v in first)))
    decision = decide_lookup(request(*((field, v) for v in second)), [s], s.response_time + 1, CacheOptions())
    assert isinstance(decision, Serve) is same


def test_normalised_values_lose_only_whitespace_around_members_and_their_semicolons() -> None:
    assert normalise_selecting("accept-encoding", ["deflate , X-GZIP;q=1.0,br ;  q=0.50"]) == \
        "X-GZIP;q=1.0, br;q=0.50, deflate"  # a set: sorted as written
    assert normalise_selecting("accept-language", ["de;q=0.8,EN-us , en;q=0.90"]) == "de;q=0.8, EN-us, en;q=0.90"
    assert normalise_selecting("accept-language", ["de, de;q=0.1"]) == "de, de;q=0.1"  # as sent, twice


def test_a_member_with_a_quoted_string_is_compared_as_written() -> None:
    assert normalise_selecting("accept", ['text/html;x="a, b" , */*']) == 'text/html;x="a, b" , */*'


def test_an_invalid_weight_is_kept_as_written_and_never_matches_a_valid_one() -> None:
    assert normalise_selecting("accept-encoding", ["gzip;q=2"]) != normalise_selecting("accept-encoding", ["gzip"])
    assert normalise_selecting("accept-encoding", ["gzip ; q=2"]) == "gzip;q=2"


def _count_calls(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[object]:
    calls: list[object] = []
    real = getattr(module, name)

    def counting(*args: object) -> object:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(module, name, counting)
    return calls


def test_a_lookup_normalises_each_selecting_field_once_whatever_the_number_of_variants(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The request's value used to be normalised again for every stored variant: 32 variants
    # of Vary: Cookie and a long Cookie made one lookup cost 32 normalisations.
    vary = [("Cache-Control", "max-age=60"), ("Vary", "Cookie, X-Device")]
    variants = [stored(vary, req=request(("Cookie", f"s={i}"), ("X-Device", "phone"))) for i in range(32)]
    calls = _count_calls(monkeypatch, keys, "normalise_selecting")
    mine = request(("Cookie", "s=31"), ("X-Device", "phone"))
    assert select_variant(mine, variants) == 31
    assert len(calls) == 2  # Cookie and X-Device, once each
    calls.clear()
    decision = decide_lookup(mine, variants, variants[0].response_time + 1, CacheOptions())
    assert isinstance(decision, Serve) and decision.index == 31
    assert len(calls) == 2


def test_a_long_selecting_value_is_compared_as_written_not_member_by_member(
        monkeypatch: pytest.MonkeyPatch) -> None:
    long = "a," * 3900  # 7.8 KB of list members
    assert normalise_selecting("cookie", [long, long]) == f"{long}\n{long}\n"
    assert normalise_selecting("accept-encoding", [long]) == long
    split = _count_calls(monkeypatch, keys, "split_list")
    quotes = _count_calls(monkeypatch, fields, "split_outside_quotes")
    s = stored([("Cache-Control", "max-age=60"), ("Vary", "Cookie")], req=request(("Cookie", long)))
    now = s.response_time + 1
    assert isinstance(decide_lookup(request(("Cookie", long)), [s], now, CacheOptions()), Serve)
    assert not isinstance(decide_lookup(request(("Cookie", long + "b")), [s], now, CacheOptions()), Serve)
    assert not isinstance(decide_lookup(request(("Cookie", long.replace(",", ", "))), [s], now, CacheOptions()),
                          Serve)  # the same list spelled otherwise: a miss, never a wrong variant
    assert [c for c in split + quotes if long in repr(c)] == []  # (Vary itself is split, not the Cookie)
    # Up to the limit, values are still normalised.
    short = "a ,b" * (keys.SELECTING_VALUE_MAX // 5)
    assert normalise_selecting("cache-control", [short]) == normalise_selecting("cache-control",
                                                                             [short.replace(" ,", ",")])


def test_the_accept_memo_keeps_only_short_values_so_its_size_is_bounded_in_bytes() -> None:
    # 4096 distinct 23 KB Accept-Encoding values used to stay remembered: ~230 MB per worker.
    keys._NORMALISED.clear()
    for i in range(keys._NORMALISED_MAX + 100):
        normalise_selecting("accept-encoding", [f"gzip, br;q=0.{i % 10}, {'x' * 1000}-{i}"])
    assert keys._NORMALISED == {}
    for i in range(keys._NORMALISED_MAX + 100):
        normalise_selecting("accept-encoding", [f"gzip, br;q=0.5, {'x' * 200}-{i}"])
    held = sum(len(k[0]) + sum(map(len, k[1])) + len(v) for k, v in keys._NORMALISED.items())
    assert 0 < len(keys._NORMALISED) <= keys._NORMALISED_MAX
    assert held <= keys._NORMALISED_MAX * 2 * (keys.MEMO_VALUE_MAX + len("accept-encoding"))
    # Browsers' values are remembered as before.
    normalise_selecting("accept-encoding", [CHROME_AE])
    assert ("accept-encoding", (CHROME_AE,)) in keys._NORMALISED
