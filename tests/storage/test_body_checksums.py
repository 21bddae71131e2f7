"""Body files carry a CRC-32 in their id (``disk.with_checksum``): a file whose bytes changed on
disk (flipped by a failing disk, by hand) is not served, nor promoted into memory, nor sent in
place of memory's copy. Ids without one (stored before, or bodies kept in the database) are not
checked, and records keep their format: an older cachegate takes the id as an opaque name."""

from __future__ import annotations

import asyncio
import logging
import os
import zlib
from pathlib import Path

import pytest

from proxy.storage.disk import INLINE_LIMIT, body_checksum, body_time, new_body_id, with_checksum
from proxy.storage.entry import decode_variants, encode_variants
from proxy.storage.tiered import Storage
from tests.storage.helpers import entry, open_store, read_body, store

BIG = bytes(range(256)) * 160  # 40 KiB: a file on disk, small enough for memory


def garble(directory: Path, at: int = 1000) -> Path:
    """Zero 16 bytes inside the one body file under ``directory`` (its length unchanged)."""
    (val,) = directory.rglob("*.val")
    with open(val, "r+b") as f:
        f.seek(at)
        f.write(b"\0" * 16)
    return val


@pytest.fixture
def st(tmp_path: Path) -> Storage:
    s = open_store(str(tmp_path / "cache"), memory_max_object=64 * 1024)
    yield s  # type: ignore[misc]
    s.close()


async def test_a_body_file_carries_its_crc_in_its_id_and_a_small_body_none(st: Storage) -> None:
    assert await store(st, entry("http://h.test/big"), BIG)
    assert await store(st, entry("http://h.test/small"), b"s" * (INLINE_LIMIT - 1))
    (big,) = await st.get("http://h.test/big")
    (small,) = await st.get("http://h.test/small")
    assert body_checksum(big.entry.body_id) == zlib.crc32(BIG)
    assert body_checksum(small.entry.body_id) is None
    # The disk record keeps its format: the id is a name, as before (its time read as before).
    (on_disk,) = st.disk.get_variants("http://h.test/big")  # type: ignore[union-attr]
    assert on_disk.body_id == big.entry.body_id
    assert decode_variants(encode_variants((on_disk,))) == (on_disk,)
    plain = new_body_id(1234.5)
    assert body_time(with_checksum(plain, 0xDEADBEEF)) == body_time(plain) == pytest.approx(1234.5)


async def test_a_spooled_file_body_gets_the_same_crc(st: Storage) -> None:
    body = os.urandom(300 * 1024)  # past the memory spool: summed as it goes to the spool file
    assert await store(st, entry("http://h.test/spooled"), body)
    (c,) = await st.get("http://h.test/spooled")
    assert body_checksum(c.entry.body_id) == zlib.crc32(body)
    assert await read_body(st, "http://h.test/spooled") == body


async def test_a_body_file_with_changed_bytes_is_neither_served_nor_promoted(
        st: Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert await store(st, entry("http://h.test/big"), BIG)
    st.memory.clear()
    garble(tmp_path / "cache")
    with caplog.at_level(logging.WARNING, "cachegate.storage"):
        for _ in range(2):  # the second disk read would promote it
            variants = await st.get("http://h.test/big", bodies=True)
            assert [c.body for c in variants] == [None]
            assert await st.open_body(variants[0]) is None
    assert "does not match its checksum" in caplog.text
    # Read and summed once, not by each reader of each request (the warning says when).
    assert caplog.text.count("does not match its checksum") == 1
    held = st.memory.peek("http://h.test/big")
    assert not held or all(c.body is None for c in held)


async def test_memory_s_copy_is_sent_not_a_damaged_file(st: Storage, tmp_path: Path) -> None:
    """A body memory holds goes out by its file once open (``sendable_file``): a file whose bytes
    changed is not opened for that, once or again; memory's copy is sent."""
    assert await store(st, entry("http://h.test/big"), BIG)
    (c,) = await st.get("http://h.test/big")
    assert c.body is not None
    garble(tmp_path / "cache")
    for _ in range(3):
        assert st.sendable_file(c.entry) is None
        await asyncio.sleep(0.05)
    assert st.sendable_file(c.entry) is None and not st.reads._opening
    assert await read_body(st, "http://h.test/big") == BIG


async def test_a_sound_file_is_opened_for_sendfile(st: Storage) -> None:
    assert await store(st, entry("http://h.test/big"), BIG)
    (c,) = await st.get("http://h.test/big")
    for _ in range(20):
        if st.sendable_file(c.entry) is not None:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("never opened")


async def test_a_body_stored_before_checksums_is_read_unchecked(st: Storage, tmp_path: Path) -> None:
    """Ids without a CRC (an older cachegate's) are read as before: not checked (the limit)."""
    e = entry("http://h.test/old")
    spool = st.spool(e, len(BIG))
    await spool.write(BIG)
    old = e.with_body(spool.body_id, len(BIG))  # what an older cachegate finalised: no CRC
    st.put_memory(old, spool)
    assert await st.put_disk(old, spool)
    await st.flush()
    st.memory.clear()
    assert await read_body(st, "http://h.test/old") == BIG
    st.memory.clear()
    garble(tmp_path / "cache")
    damaged = await read_body(st, "http://h.test/old")
    assert damaged is not None and damaged != BIG and len(damaged) == len(BIG)


def test_the_disk_module_s_examples_hold() -> None:
    import doctest

    import proxy.storage.disk

    assert doctest.testmod(proxy.storage.disk).failed == 0
