"""Model-based stateful fuzzing of the whole cache: hypothesis chooses the sequences.

What it models: a real cachegate (runtime, listeners and fast path, a disk tier in a temporary
folder, the rules' defaults of ``rules/default.yaml``: stale_if_error 1h) in front of a
loopback origin whose answers each step programs (status, Cache-Control, Expires, ETag,
Last-Modified, Vary, Set-Cookie, 304s to its validators, Range), with five keys. Steps: GET or
HEAD with Vary'd fields, Accept-Encoding, Cookie, Authorization, Cache-Control, If-None-Match
or Range; a new version or new headers at the origin; the origin failing (500, refused, a
timeout); the fake clock moved on (the engine runs on it, and the origin dates its answers by
it); a purge, hard or soft, by URL or tag; a restart on the same disk. After every step the
answer is checked against what the origin really sent (a serial in every body) and against RFC
9111 and docs/caching.md, docs/admin-api.md: the right key and variant, bodies and ranges, no
one's private answer or Set-Cookie replayed, a HIT fresh and never from the origin, Age by the
fake clock, STALE only on an origin failure within stale-if-error and never a stored error in
place of the origin's, UPDATING within stale-while-revalidate (a soft-purged copy past its
windows once per soft purge: once its refresh failed, only within them), nothing from before a
purge answered 200 (tests/model_fuzz_core.py: ``Model.check``).

What it does not model: several workers or a cluster (one process; the leases, the shared
memory's cross-worker races and Redis are tested elsewhere), requests at once (each step waits
until nothing is in flight: no herds, no followers, no fills joined mid-body), unsafe methods and
their invalidations, request bodies, If-Modified-Since / If-Match / If-Range from clients and
multi-range requests, bodies that break off or stall, eviction and size limits, rules other
than the defaults (ttl, keys, bypass, response edits), the clock going back, an origin's own
Age. Its freshness model is the documented one, not a copy of the code's: where they differ a
step fails, and the docs decide which is wrong.

The fast version (``scripts/test``) runs a fixed, derandomised set of sequences (12 x 30 steps,
about 5 s; k1 starts with Vary: X-Lang and k2 with Vary: Accept-Encoding, the others without),
then three fixed sequences the random search seldom reaches (two found a bug: a soft-purged copy
served stale without bound, a stored error served in place of the origin's; the third proves a
fresh hit that ignored Vary is caught). Set ``CACHEGATE_MODEL_FUZZ_EXAMPLES`` (and ``..._STEPS``)
for a longer, random search (``--timeout 0``: 200 examples take about two minutes).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests import model_fuzz_core as core

EXAMPLES = int(os.environ.get("CACHEGATE_MODEL_FUZZ_EXAMPLES", "0"))
STEPS = int(os.environ.get("CACHEGATE_MODEL_FUZZ_STEPS", "40"))
RANDOM = EXAMPLES > 0

requests = st.builds(
    core.Request,
    method=st.sampled_from(("GET", "GET", "GET", "HEAD")),
    key=st.sampled_from(core.KEYS),
    lang=st.sampled_from(core.LANGS),
    ae=st.sampled_from(core.ENCODINGS),
    cookie=st.sampled_from(core.COOKIES),
    auth=st.sampled_from(core.AUTHS),
    cc=st.sampled_from(core.REQUEST_CCS),
    inm=st.sampled_from(core.INMS),
    range=st.sampled_from(core.RANGES),
)
policies = st.builds(
    core.Policy,
    status=st.sampled_from(core.STATUSES),
    cc=st.sampled_from(core.CACHE_CONTROLS),
    expires=st.sampled_from(core.EXPIRES),
    etag=st.booleans(),
    lm_age=st.sampled_from((None, 100, 1000, 100000)),
    vary=st.sampled_from(core.VARIES),
    set_cookie=st.sampled_from((False, False, False, True)),
)


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.model, _ = core.new_model()
        self.run(core.open_model(self.model))

    def run(self, coro: Coroutine[Any, Any, None]) -> None:
        self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(core.close_model(self.model))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    @rule(r=requests)
    def request(self, r: core.Request) -> None:
        self.run(self.model.request(r))

    @rule(r=requests)
    def request_again(self, r: core.Request) -> None:  # (more requests than other steps)
        self.run(self.model.request(r))

    @rule(key=st.sampled_from(core.KEYS), pol=policies, bump=st.booleans())
    def origin_changes(self, key: str, pol: core.Policy, bump: bool) -> None:
        self.run(self.model.set_policy(key, pol, bump))

    @rule(mode=st.sampled_from(("ok", "ok", "ok", "ok", "error500", "refused", "refused", "timeout")))
    def origin_mode(self, mode: str) -> None:
        self.run(self.model.set_mode(mode))

    @rule(seconds=st.sampled_from((0, 1, 4, 5, 6, 9, 10, 11, 20, 29, 30, 31, 59, 60, 61, 100, 120)))
    def advance(self, seconds: int) -> None:
        self.run(self.model.advance(seconds))

    @rule(what=st.sampled_from(("url", "tag")), key=st.sampled_from(core.KEYS),
          group=st.sampled_from(("g0", "g1")), soft=st.sampled_from((False, False, True)))
    def purge(self, what: str, key: str, group: str, soft: bool) -> None:
        self.run(self.model.purge(what, key if what == "url" else (f"t-{key}" if key < "k2" else group),
                                  soft))

    @precondition(lambda self: self.model.step > 3)
    @rule()
    def restart(self) -> None:
        self.run(self.model.restart())

    @invariant()
    def alive(self) -> None:
        assert self.model.proxy is not None


TestCacheModel = CacheMachine.TestCase
TestCacheModel.settings = settings(
    max_examples=EXAMPLES or 12,
    stateful_step_count=STEPS if RANDOM else 30,
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=RANDOM,
)


# -- sequences the random search seldom reaches ---------------------------


async def test_a_soft_purged_copy_is_served_at_once_then_within_its_windows_while_the_origin_fails() -> None:
    """It was served UPDATING at every request, however stale, for as long as its refresh
    failed (still after 30 days, for max-age=60 with no stale permission)."""
    for mode, cc in (("error500", "max-age=60"), ("refused", "max-age=60"), ("error500", "max-age=0"),
                     ("timeout", "max-age=60, stale-if-error=60")):
        model, _ = core.new_model()
        model.policies["k0"] = core.Policy(cc=cc)
        await core.open_model(model)
        try:
            await model.request(core.Request(key="k0"))
            await model.purge("url", "k0", soft=True)
            await model.set_mode(mode)
            for seconds in (0, 0, 5, 3600, 86400 * 30):
                await model.advance(seconds)
                await model.request(core.Request(key="k0"))
            assert model.stats["UPDATING"] == 1, (mode, cc, model.log)
        finally:
            await core.close_model(model)


async def test_a_stored_error_never_stands_in_for_the_origins_new_one() -> None:
    """A stored 503 with a lifetime, once stale, was served STALE in place of the origin's new
    503 (without its Retry-After) for the rules' stale_if_error hour."""
    model, _ = core.new_model()
    model.policies["k0"] = core.Policy(status=503, cc="max-age=10")
    await core.open_model(model)
    try:
        await model.request(core.Request(key="k0"))
        await model.set_policy("k0", core.Policy(status=503, cc=""), bump=True)
        await model.advance(11)
        await model.request(core.Request(key="k0"))
        await model.request(core.Request(key="k0", auth="Bearer alice"))
        await model.set_mode("refused")
        await model.request(core.Request(key="k0"))
        assert model.stats["STALE"] == 0, model.log
    finally:
        await core.close_model(model)


async def test_a_fresh_variant_is_never_served_for_another_value_of_a_varied_field() -> None:
    """A Vary: X-Lang page filled for en, then asked for de while fresh: the random search
    seldom reached it when every key started without a Vary, and passed a fresh hit that
    ignored Vary for a key with one stored variant."""
    for key, first, second in (
        ("k1", core.Request(key="k1", lang="en"), core.Request(key="k1", lang="de")),
        ("k2", core.Request(key="k2", ae="gzip"), core.Request(key="k2", ae="br")),
    ):
        model, _ = core.new_model()
        await core.open_model(model)
        try:
            assert model.policies[key].vary
            await model.request(first)
            await model.request(second)
            await model.request(first)
            assert model.stats["HIT"] == 1, model.log
        finally:
            await core.close_model(model)
