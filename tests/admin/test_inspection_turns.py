"""Inspection lets clients in while the shared memory is full: ``GET /cache?url=`` and the check
of a URL's host (``/cache``, ``/purge``, ``/explain``) against a shared memory of 120,000
records hold the event loop for a slice at a time, never for a pass over all of them, and a
URL whose keys follow from it (no rule keys it on fields or cookies) is looked up, not looked for.

The records are put straight into the shared memory (as many fills would leave them), copies
of one real entry's record under other keys: flagged as written to disk where there is a disk
tier (the write-behind then leaves them alone, and a lookup with an index that answers passes
them over), else not.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest

from tests.admin.util import absolute, crowd, js, loop_held, memory_passes, stored
from tests.conftest import MakeProxy
from tests.harness import Origin

RECORDS = 120_000  # a pass over them in one go held the loop for 0.3-1.4 s of CPU
DISK = "cache: {memory: 128MB, disk: {path: cache, size: 256MB, shards: 2}}\n"
MEMORY_ONLY = "cache: {memory: 128MB, disk: null}\n"
MOBILE = """
rules:
  - name: mobile
    match: {path: "/m/**"}
    key: {headers: [X-Mobile]}
"""


@pytest.mark.parametrize(("config", "rules", "passes"), [
    (DISK, None, 0),  # the key is the URL: looked up
    (MEMORY_ONLY, None, 0),
    (DISK, MOBILE, 1),  # keyed on a field: the index, and the records not on disk yet
    (MEMORY_ONLY, MOBILE, 1),  # ... no index: every record, in slices
], ids=["url-key", "url-key-memory-only", "field-key", "field-key-memory-only"])
async def test_cache_of_a_url_holds_the_loop_for_a_slice_at_a_time_and_lists_the_memory_copy(
        origin: Origin, make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch, config: str,
        rules: str | None, passes: int) -> None:
    """Every worker read every record of the shared memory in one go for one URL (250,000
    records: 2.4-4.5 s, its clients waiting up to 3 s; past the supervisor's 2 s wait, the answer
    listed no memory copy at all). Now the loop's thread spends under 100 ms of CPU between two
    wakes of a probe while the call runs, and the stored variant is listed in memory."""
    proxy = await make_proxy(config=config, rules=rules)
    mobile = {"X-Mobile": "yes"}
    crowd(proxy, await stored(origin, proxy, "/template"), absolute(proxy, "/m/crowd/"), RECORDS)
    url = await stored(origin, proxy, "/m/page", headers=mobile)
    key = url + ("\x1fh:x-mobile=yes" if rules else "")
    counted = memory_passes(proxy, monkeypatch)
    async with loop_held() as gaps:
        reply = await proxy.admin("GET", "/cache?url=" + quote(url))
    assert reply.status == 200, reply.body
    [variant] = js(reply)["variants"]
    assert (variant["key"], variant["body_in_memory"]) == (key, True)
    assert "memory" in variant["tiers"]
    assert counted[0] == passes, f"{counted[0]} passes over the shared memory for one URL"
    assert max(gaps) < 0.1, f"the loop was held for {max(gaps) * 1000:.0f} ms of CPU at a time"


@pytest.mark.parametrize("config", [DISK, MEMORY_ONLY], ids=["disk", "memory-only"])
async def test_a_host_not_seen_since_start_is_looked_for_a_slice_at_a_time(
        origin: Origin, make_proxy: MakeProxy, config: str) -> None:
    """An admin URL naming a host no client asked for since start had every process build the
    list of every key of that host in the shared memory, in one go (2.1 s, clients held for a
    second); one key is enough, and it is looked for in slices. A host the shared memory holds
    (and no client asked for) is still served; one it does not hold is still refused."""
    proxy = await make_proxy(config=config)
    url = await stored(origin, proxy, "/template")
    crowd(proxy, url, absolute(proxy, "/crowd/"), RECORDS)
    if config == MEMORY_ONLY:  # (with a disk, its records are flagged written: the index's to tell)
        crowd(proxy, url, "http://held.example/x/", n=3)
        async with loop_held() as gaps:
            reply = await proxy.admin("GET", "/cache?url=" + quote("http://held.example/x/2"))
        assert reply.status == 200, reply.body
        assert max(gaps) < 0.1, f"the loop was held for {max(gaps) * 1000:.0f} ms of CPU at a time"
    for method, path, body in (("GET", "/cache?url=" + quote("http://unknown.example/x"), None),
                               ("POST", "/purge", {"urls": ["http://unknown.example/x"]})):
        async with loop_held() as gaps:
            reply = await proxy.admin(method, path, json=body)
        assert reply.status == 400 and b"unknown.example" in reply.body, reply.body
        assert max(gaps) < 0.1, f"{path}: the loop was held for {max(gaps) * 1000:.0f} ms of CPU at a time"
