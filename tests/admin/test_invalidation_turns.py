"""An unsafe method's invalidation (RFC 9111 §4.4) against a full shared memory: a POST answered
2xx/3xx costs the process a lookup of the URL's keys when no rule keys it on fields or cookies,
and one pass over the records, a slice of the event loop at a time, when one does; the next GET
of the URL is a miss either way.

The records are copies of one real entry's, put straight into the shared memory
(``tests.admin.util.crowd``).
"""

from __future__ import annotations

import pytest

from tests.admin.test_inspection_turns import DISK, MEMORY_ONLY, MOBILE
from tests.admin.util import absolute, crowd, loop_held, memory_passes, settle, stored
from tests.conftest import MakeProxy
from tests.harness import Edited, Origin

RECORDS = 120_000  # two passes over them held the loop for 0.6 s of CPU in all, per POST


@pytest.mark.parametrize(("config", "rules"), [
    (DISK, None), (MEMORY_ONLY, None),  # the key is the URL: looked up
    (DISK, MOBILE), (MEMORY_ONLY, MOBILE),  # keyed on a field: looked for, in slices
], ids=["url-key", "url-key-memory-only", "field-key", "field-key-memory-only"])
async def test_a_post_costs_a_lookup_of_its_urls_keys_not_passes_over_the_shared_memory(
        origin: Origin, make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch, config: str,
        rules: str | None) -> None:
    """Each POST (any client's) had the process answering it look through every record of the
    shared memory twice without a disk tier (250,000 records: 1.4 s of its loop's CPU per POST,
    in slices) and through the records' heads with one (0.16 s). Now a URL whose keys follow from
    it is looked up: the invalidation goes by a handful of records, not the memory's; one a rule
    keys on a field is looked for in one pass, a slice at a time. The next GET is a miss."""
    proxy = await make_proxy(config=config, rules=rules)
    crowd(proxy, await stored(origin, proxy, "/template"), absolute(proxy, "/crowd/"), RECORDS)
    origin.route("/m/page", Edited().page)
    mobile = {"X-Mobile": "yes"}
    await proxy.get("/m/page", headers=mobile)
    assert (await proxy.get("/m/page", headers=mobile)).x_cache == "HIT"
    await settle(proxy)
    passes = memory_passes(proxy, monkeypatch)
    held = len(proxy.runtime.storage.memory)
    async with loop_held() as gaps:
        reply = await proxy.request("POST", "/m/page", data=b"x", headers=mobile)
    assert reply.status == 204, reply.body
    assert max(gaps) < 0.1, f"the loop was held for {max(gaps) * 1000:.0f} ms of CPU at a time"
    if rules is None:
        assert passes[1] < 1000, f"{passes[1]} records gone through for one URL's keys ({passes[0]} passes)"
    else:
        # (one pass: every record's place, those gone or pushed out too; two made it twice that)
        assert passes[1] < 1.5 * held, f"{passes[1]} records gone through, {held} held ({passes[0]} passes)"
    monkeypatch.undo()
    after = await proxy.get("/m/page", headers=mobile)
    assert (after.x_cache, after.body) == ("MISS", b"new")
