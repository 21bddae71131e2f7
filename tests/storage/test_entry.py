"""An arena record decodes to the very entries that were encoded: equal, of the same classes,
as frozen and as hashable as ones built by their own constructors."""

from __future__ import annotations

import dataclasses
import marshal

import pytest

from proxy.policy.messages import Freshness, StoredResponse
from proxy.storage.entry import (
    ALL_TO_WRITE,
    ON_DISK,
    Entry,
    _fast_new,
    decode_record,
    decode_variants,
    encode_record,
    encode_variants,
    record_tags,
)


def variants() -> list[tuple[Entry, int, int]]:
    plain = StoredResponse(200, "OK", (("Date", "Fri, 04 Dec 2026 10:00:00 GMT"), ("Content-Type", "text/html"),
                                       ("X-Own", "v")), 999.5, 1000.0, Freshness(60.0, "max-age", 3.0, 1000.0))
    odd = StoredResponse(203, "Fine Then", (("Link", "</a>"), ("Link", "</b>")), 990.0, 1000.0,
                         Freshness(0.0, "heuristic", 0.0, 995.0, True, True, 30.0, 60.0, True),
                         vary=(("accept-encoding", "gzip"),), etag='"v1"', last_modified="Thu, 03 Dec 2026 10:00:00 GMT",
                         invalidated=True)
    personal = dataclasses.replace(plain, credentials=True)
    return [(Entry("http://h/k", "http://h/k", plain, "b1", 10, stored_at=1000.0, seq=3), 10, ON_DISK),
            (Entry("http://h/k\x1fgzip", "http://h/k", odd, "b2", 20, ("t1", "t2"), 1001.0, 4), -1, ALL_TO_WRITE),
            (Entry("http://h/k\x1fbr", "http://h/k", personal, "b3", 10, stored_at=1000.0), 10, ON_DISK),
            (Entry("http://h/k\x1fzstd", "http://h/k", dataclasses.replace(odd, credentials=True), "b4", 20),
             -1, ALL_TO_WRITE),
            (Entry("http://h/k\x1fdeflate", "http://h/k",
                   dataclasses.replace(odd, credentials=True, authorization=True), "b5", 20), -1, ALL_TO_WRITE),
            (Entry("http://h/k\x1fidentity", "http://h/k",
                   dataclasses.replace(plain, credentials=True, authorization=True), "b6", 10), 10, ON_DISK)]


def test_a_record_decodes_to_the_entries_encoded() -> None:
    encoded = variants()
    decoded = decode_record("http://h/k", encode_record(encoded))
    assert decoded is not None
    for (e, body_len, state), (d, d_len, d_state) in zip(encoded, decoded, strict=True):
        assert (d_len, d_state) == (body_len, state)
        assert d == dataclasses.replace(e, key="http://h/k")  # the record's key is the one asked for
        assert type(d) is Entry and type(d.response) is StoredResponse
        assert type(d.response.freshness) is Freshness
        assert hash(d.response.freshness) == hash(e.response.freshness)
        with pytest.raises(dataclasses.FrozenInstanceError):
            d.response.freshness.lifetime = 1.0  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            d.seq = 9  # type: ignore[misc]


@pytest.mark.parametrize("tags", [(), ("t1",), ("a", "b c", "caf\u00e9", "\udc80")])
def test_a_records_tags_read_alone_are_the_decoded_entries_tags(tags: tuple[str, ...]) -> None:
    """A purge by tag reads only the tags of each record in the shared memory (``record_tags``):
    they must be exactly what ``decode_record`` gives, variant by variant."""
    encoded = [(dataclasses.replace(e, tags=tags if i % 2 else ("other", *tags)), n, s)
               for i, (e, n, s) in enumerate(variants())]
    meta = encode_record(encoded)
    decoded = decode_record("http://h/k", meta)
    assert decoded is not None
    assert record_tags(meta) == [e.tags for e, _, _ in decoded]
    assert record_tags(b"") is None and record_tags(b"\x00garbage") is None
    assert record_tags(marshal.dumps((99, ()))) is None  # another version's record


def test_a_disk_record_decodes_to_the_entries_encoded_through_the_same_twins() -> None:
    encoded = tuple(e for e, _, _ in variants())
    decoded = decode_variants(encode_variants(encoded))
    assert decoded == encoded
    for d in decoded:
        assert type(d) is Entry and type(d.response) is StoredResponse
        assert type(d.response.freshness) is Freshness
        assert hash(d.response) == hash(encoded[decoded.index(d)].response)
        with pytest.raises(dataclasses.FrozenInstanceError):
            d.response.status = 500  # type: ignore[misc]


def test_the_fast_constructor_builds_the_class_itself() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Point:
        x: int
        y: int = 2
        note: str | None = dataclasses.field(default=None, compare=False)

    new = _fast_new(Point)
    assert new(1) == Point(1) and new(1, 3) == Point(1, 3) != new(1)
    p = new(1, 3, "n")
    assert type(p) is Point and p.note == "n" and repr(p) == repr(Point(1, 3, "n"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.x = 2  # type: ignore[misc]


def test_a_new_body_or_sequence_number_is_what_replace_would_give() -> None:
    for e, _, _ in variants():
        e = dataclasses.replace(e, wire_headers=b"X: y\r\n")
        for made, wanted in ((e.with_body("b9", 77), dataclasses.replace(e, body_id="b9", body_size=77)),
                             (e.with_seq(12), dataclasses.replace(e, seq=12))):
            assert made == wanted and type(made) is Entry
            assert [getattr(made, f.name) for f in dataclasses.fields(Entry)] == \
                [getattr(wanted, f.name) for f in dataclasses.fields(Entry)]  # wire_headers too
            with pytest.raises(dataclasses.FrozenInstanceError):
                made.seq = 1  # type: ignore[misc]


def test_records_written_before_the_credentials_flag_read_as_filled_without_credentials() -> None:
    """Both formats held ``invalidated`` as a bool where the flags are now: a response filled
    for a request with credentials is the only one written differently."""
    import json
    import marshal

    old_disk = [1, "http://h/k", "http://h/k", "b1", 10, [], 1000.0, 3, 200, "OK", ["Date", "x"], 999.5, 1000.0,
                [60.0, "max-age", 3.0, 1000.0, False, False, 0.0, 0.0, False], [], None, None, True]
    (disk,) = decode_variants(json.dumps([old_disk]).encode())
    assert disk.response.invalidated and not disk.response.credentials
    old_arena = (1, (("", "b1", 10, -1, (), None, 3, 200, None, ("\x01", "x"), None, 1000.0,
                      (60.0, "max-age", 3.0, None, False, False, 0.0, 0.0, False), (), None, None, True, ON_DISK),))
    decoded = decode_record("http://h/k", marshal.dumps(old_arena))
    assert decoded is not None
    assert decoded[0][0].response.invalidated and not decoded[0][0].response.credentials
    for e, _, _ in variants():  # without credentials, a record is what the previous code wrote
        if not e.response.credentials:
            assert json.loads(encode_variants((e,)))[0][17] is e.response.invalidated
