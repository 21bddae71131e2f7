"""A metadata record on disk that holds what cachegate never writes, and Python's JSON reads all
the same (``Infinity``, ``NaN``, ``1e999``, JSON nested too deep), reads as a miss: the origin
answers, never a 502 or a 500."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from proxy.storage.entry import decode_variants, encode_variants
from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.storage.test_entry import variants

SPOILS: dict[str, tuple[Any, Any]] = {
    "seq-inf": (7, math.inf), "status-inf": (8, math.inf), "stored_at-inf": (6, math.inf),
    "response_time-nan": (12, math.nan), "request_time-1e999": (11, 1e999), "lifetime-inf": ((13, 0), math.inf),
    "swr-minus-inf": ((13, 6), -math.inf), "etag-number": (15, 1), "last_modified-list": (16, ["x"]),
    "vary-number": (14, ["accept", 1]), "body_size-inf": (4, math.inf),
}


def spoiled(blob: bytes, how: str) -> bytes:
    if how == "deep":
        return b"[" * 100_000 + b"]" * 100_000
    records = json.loads(blob)
    slot, value = SPOILS[how]
    if isinstance(slot, tuple):
        records[0][slot[0]][slot[1]] = value
    else:
        records[0][slot] = value
    return json.dumps(records).encode()


@pytest.mark.parametrize("how", [*SPOILS, "deep"])
def test_a_record_cachegate_never_writes_decodes_as_nothing(how: str) -> None:
    blob = encode_variants((variants()[1][0],))
    assert decode_variants(blob)
    assert decode_variants(spoiled(blob, how)) == ()


@pytest.mark.parametrize("how", ["seq-inf", "stored_at-inf", "response_time-nan", "etag-number", "deep"])
async def test_a_spoiled_disk_record_is_a_miss_and_the_origin_answers(
        origin: Origin, make_proxy: MakeProxy, how: str) -> None:
    origin.route("/d", body=b"fresh", headers={"Cache-Control": "max-age=300", "ETag": '"e1"'})
    proxy = await make_proxy()
    assert (await proxy.get("/d")).body == b"fresh"
    storage = proxy.runtime.storage
    await storage.flush()  # the disk commit (write-behind)
    disk = storage.disk
    assert disk is not None
    (shard, key), = [(s, k) for s in disk._shards for k in s.iterkeys() if str(k).startswith("m:")]
    shard.set(key, spoiled(shard.get(key), how))
    storage.memory.clear()  # read from disk
    for _ in range(2):
        r = await proxy.get("/d")
        assert (r.status, r.body) == (200, b"fresh"), (r.status, r.body)
    assert origin.count("/d") == 2
