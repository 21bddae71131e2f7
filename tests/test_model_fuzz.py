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

Since R92 it also models: clients' If-Modified-Since, If-Match, If-Unmodified-Since (412 before
a 304 or a 206) and If-Range with a Range, by strong and weak ETags, Last-Modified dates and
``*``, checked against the response each answer stands for (``preconditions``); weak ETags
from the origin; the origin's 304s that carry another ETag (refetched), no validator at all
(freshens, as ``validates_stored`` chooses), a weak or strong copy of the tag, or a Vary with
Cookie added; an origin whose Date is 300 s behind or ahead, or absent (the receipt time), or
that sends an Age (RFC 9111 §4.2.3 age: apparent age, corrected Age, resident time); invalid
Expires; ``max-age`` over ``s-maxage`` and the reverse; purges by URL prefix; and (the
``SmallMemoryMachine``) a memory tier of a few entries with some bodies disk-only, where
eviction may turn any hit into a refetch (allowed: the model never requires a hit) and all
that is served is still checked.

What it does not model: several workers or a cluster (one process; the leases, the shared
memory's cross-worker races and Redis are tested elsewhere), requests at once (each step waits
until nothing is in flight: no herds, no followers, no fills joined mid-body), unsafe methods and
their invalidations, request bodies, multi-range requests, bodies that break off or stall,
rules other than the defaults (ttl, keys, bypass, response edits), the clock going back. A 412
is checked only to be justified by some response of the key (which one is stored is not
tracked). Its freshness model is the documented one, not a copy of the code's: where they differ a
step fails, and the docs decide which is wrong.

The fast version (``scripts/test``) runs a fixed, derandomised set of sequences (12 x 30 steps,
about 8-12 s on the shared machine; k1 starts with Vary: X-Lang and k2 with Vary:
Accept-Encoding, the others without), 2 x 30 steps of ``SmallMemoryMachine`` (about 2 s), then
fixed sequences the random search seldom reaches (two found a bug: a soft-purged copy served
stale without bound, a stored error served in place of the origin's; one proves a fresh hit that
ignored Vary is caught; four walk the R92 areas: about 3 s together): about 15-20 s in all. Set
``CACHEGATE_MODEL_FUZZ_EXAMPLES`` (and ``..._STEPS``) for a longer, random search, e.g.
``CACHEGATE_MODEL_FUZZ_EXAMPLES=500 .venv/bin/python -m pytest -x --timeout 0 -p no:logging
tests/test_model_fuzz.py -k TestCacheModel`` (about 9 minutes; ``-k SmallMemory`` for the small
memory tier, ``CACHEGATE_MODEL_FUZZ_MEMORY`` to change its size). Run one search at a time:
``origin_mode("refused")`` restarts the origin on its old port, which another process may have
taken meanwhile (an ``OSError: address already in use``, not a finding).
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
    ims=st.sampled_from(core.IMSS),
    im=st.sampled_from(core.IMS_),
    ius=st.sampled_from(core.IUSS),
    if_range=st.sampled_from(core.IF_RANGES),
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
    weak=st.sampled_from((False, False, True)),
    r304=st.sampled_from(core.R304S),
    skew=st.sampled_from(core.SKEWS),
    age=st.sampled_from(core.ORIGIN_AGES),
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

    @rule(what=st.sampled_from(("url", "tag", "prefix")), key=st.sampled_from(core.KEYS),
          group=st.sampled_from(("g0", "g1")), soft=st.sampled_from((False, False, True)))
    def purge(self, what: str, key: str, group: str, soft: bool) -> None:
        name = key if what == "url" else (f"t-{key}" if key < "k2" else group)
        if what == "prefix":
            name = key if key < "k3" else "k"
        self.run(self.model.purge(what, name, soft))

    @precondition(lambda self: self.model.step > 3)
    @rule()
    def restart(self) -> None:
        self.run(self.model.restart())

    @invariant()
    def alive(self) -> None:
        assert self.model.proxy is not None


def machine_settings(examples: int) -> settings:
    """A state machine's run: ``examples`` sequences unless the environment asks a random search."""
    return settings(
        max_examples=EXAMPLES or examples,
        stateful_step_count=STEPS if RANDOM else 30,
        deadline=None,
        derandomize=not RANDOM,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=RANDOM,
    )


TestCacheModel = CacheMachine.TestCase
TestCacheModel.settings = machine_settings(12)


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


class SmallMemoryMachine(CacheMachine):
    """The same steps with a memory tier of a few entries and some bodies too big for it (disk
    only), so entries move between the tiers: eviction may turn any hit into a refetch, which
    the model allows (it never requires a hit), and everything served is still checked (R92)."""

    def __init__(self) -> None:
        RuleBasedStateMachine.__init__(self)
        self.loop = asyncio.new_event_loop()
        self.model, _ = core.new_model(memory=os.environ.get("CACHEGATE_MODEL_FUZZ_MEMORY", "8KB"),
                                       memory_max_object="280")
        self.run(core.open_model(self.model))


TestSmallMemoryModel = SmallMemoryMachine.TestCase
TestSmallMemoryModel.settings = machine_settings(2)


# -- R92: conditionals, the origin's 304s, Date and Age, prefixes, small memory --------------


async def _sequence(steps: Any, **kw: Any) -> core.Model:
    model, _ = core.new_model(**kw)
    await core.open_model(model)
    try:
        await steps(model)
        return model
    finally:
        await core.close_model(model)


async def test_client_preconditions_and_if_range_against_stored_passed_and_unstored_responses() -> None:
    """If-Match (strong comparison, `*`), If-Unmodified-Since -> 412 before If-None-Match or
    Range; If-Modified-Since ignored beside If-None-Match; If-Range by a strong ETag or a strong
    Last-Modified only; weak ETags; a private page's conditionals relayed to the origin."""
    R, P = core.Request, core.Policy

    async def steps(m: core.Model) -> None:
        await m.set_policy("k0", P(cc="max-age=600", weak=True), bump=True)
        await m.set_policy("k3", P(cc="max-age=600"), bump=True)
        for k in ("k0", "k3"):
            for r in (R(key=k), R(key=k, im="current"), R(key=k, im="*"), R(key=k, im="weak"),
                      R(key=k, im="previous", inm="current"), R(key=k, ius="before"), R(key=k, ius="lm"),
                      R(key=k, inm="weak"), R(key=k, inm="*"), R(key=k, range="bytes=0-9", if_range="current"),
                      R(key=k, range="bytes=0-9", if_range="lm"), R(key=k, range="bytes=0-9", if_range="before"),
                      R(key=k, range="bytes=0-9", if_range="weak"), R(key=k, ims="lm", inm='"nope"'),
                      R(key=k, ims="before"), R(key=k, ims="garbage"), R(key=k, method="HEAD", im="previous"),
                      R(key=k, method="HEAD", ims="now")):
                await m.request(r)
        await m.set_policy("k4", P(cc="private, max-age=60"), bump=True)
        for r in (R(key="k4"), R(key="k4", im="previous"), R(key="k4", inm="current"), R(key="k4", ius="before"),
                  R(key="k4", range="bytes=0-9", if_range="previous"), R(key="k4", ims="now")):
            await m.request(r)

    model = await _sequence(steps)
    assert model.stats["HIT"] >= 30, model.log
    assert sum("-> 412" in line for line in model.log) >= 8, model.log


async def test_the_origins_304s_that_change_validators_vary_or_omit_them() -> None:
    """A 304 with another ETag (refetched), without validators (freshens: validates_stored), a
    weak one for a strong stored tag (which it replaces) and the reverse (which keeps the stored
    one weak), one adding Cookie to Vary (the variants dropped, refetched)."""
    R, P = core.Request, core.Policy

    async def steps(m: core.Model) -> None:
        for key, r304 in (("k0", "new_etag"), ("k3", "bare"), ("k4", "weak")):
            await m.set_policy(key, P(cc="max-age=10", r304=r304), bump=False)
            await m.request(R(key=key))
        await m.set_policy("k2", P(cc="max-age=10", weak=True, vary=("Accept-Encoding",)), bump=True)
        await m.set_policy("k2", P(cc="max-age=10", r304="strong"), bump=False)
        await m.request(R(key="k2", ae="gzip"))
        await m.request(R(key="k1", lang="en", cookie="u=alice"))
        await m.set_policy("k1", P(cc="max-age=60", r304="vary"), bump=False)
        for _ in range(2):
            await m.advance(11)
            for key in ("k0", "k3", "k4"):
                await m.request(R(key=key))
                await m.request(R(key=key, im="current"))
                await m.request(R(key=key, method="HEAD"))
            await m.request(R(key="k2", ae="gzip", range="bytes=0-9", if_range="current"))
            await m.request(R(key="k1", lang="en", cookie="u=bob"))
            await m.request(R(key="k1", lang="en", cookie="u=alice"))

    model = await _sequence(steps)
    assert model.stats["REVALIDATED"] >= 4, model.log


async def test_dates_off_missing_and_the_origins_age() -> None:
    """A Date 300 s behind (apparent age) or ahead (age 0), none at all (the receipt time), an
    Age from the origin (stale on arrival past the lifetime), Expires by the origin's clock,
    s-maxage under max-age, no-cache with max-age, must-revalidate with the origin failing."""
    R, P = core.Request, core.Policy

    async def steps(m: core.Model) -> None:
        for key, skew, age in (("k0", 300, None), ("k3", -300, None), ("k4", None, 10), ("k2", 0, 100)):
            await m.set_policy(key, P(cc="max-age=60", skew=skew, age=age), bump=False)
            await m.request(R(key=key))
        await m.set_policy("k1", P(cc="max-age=60, s-maxage=5, must-revalidate"), bump=False)
        await m.request(R(key="k1"))
        for seconds in (30, 31, 10):
            await m.advance(seconds)
            for key in ("k0", "k3", "k4", "k2", "k1"):
                await m.request(R(key=key))
                await m.request(R(key=key, ims="now"))
        for key in ("k0", "k3", "k4"):
            await m.set_policy(key, P(cc="", expires="+30", skew=m.policies[key].skew), bump=True)
            await m.request(R(key=key))
        await m.set_policy("k2", P(cc="no-cache, max-age=60", expires="garbage"), bump=True)
        await m.request(R(key="k2"))
        await m.advance(20)
        await m.set_mode("error500")
        for key in ("k0", "k3", "k4", "k2", "k1"):
            await m.request(R(key=key))
        await m.advance(20)
        await m.set_mode("timeout")
        for key in ("k0", "k1"):
            await m.request(R(key=key))

    model = await _sequence(steps)
    assert model.stats["HIT"] >= 6 and model.stats["STALE"] >= 1, model.log


async def test_prefix_purges_and_a_small_memory_tier() -> None:
    """Prefix purges (hard and soft), with a memory tier of a few entries over the disk."""
    R = core.Request

    async def steps(m: core.Model) -> None:
        for lang in ("en", "de", None):
            for key in core.KEYS:
                await m.request(R(key=key, lang=lang, ae="gzip"))
        await m.purge("prefix", "k1")
        await m.purge("prefix", "k", soft=True)
        for key in core.KEYS:
            await m.request(R(key=key, lang="en", ae="gzip"))
        await m.restart()
        await m.purge("prefix", "k")
        for key in core.KEYS:
            await m.request(R(key=key, lang="de", ae="gzip"))

    model = await _sequence(steps, memory="8KB", memory_max_object="280")
    assert model.stats["UPDATING"] >= 1 and model.stats["HIT"] >= 5, model.log
