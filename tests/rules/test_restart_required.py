"""A reload names each cache key that only a restart applies, not just "cache".

``restart_required`` said "cache" for a change of ``max_object``, ``memory_max_object``,
``hit_for_pass``, ``memory_policy`` or the disk tier alike, leaving the operator to guess which
of the cache keys waits for a restart (the others, ``tag_headers``, ``lock_timeout`` and
``range_fill``, apply at once).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.config import Overrides, Settings
from proxy.web.server import install_reloader, live_settings
from tests.harness import Origin, Proxy

MakeProxy = Callable[..., Awaitable[Proxy]]
OLD = Settings(source="a")


@pytest.mark.parametrize(("change", "named"), [
    ({"max_object": 1}, ["cache.max_object"]),
    ({"memory_max_object": 1}, ["cache.memory_max_object"]),
    ({"hit_for_pass": 1.0}, ["cache.hit_for_pass"]),
    ({"memory_policy": "lfu" if OLD.cache.memory_policy != "lfu" else "lru"}, ["cache.memory_policy"]),
    ({"memory": 1 << 20, "max_object": 1}, ["cache.memory", "cache.max_object"]),
    ({"disk": None}, ["cache.disk"]),
    ({"lock_timeout": 1.0, "range_fill": "none", "tag_headers": ("X-Tag",)}, []),
])
def test_each_cache_key_a_restart_applies_is_named(change: dict[str, object], named: list[str]) -> None:
    new = replace(OLD, cache=replace(OLD.cache, **change))  # type: ignore[arg-type]
    assert live_settings(OLD, new)[1] == named


def test_a_disk_tier_key_is_named_with_its_tier() -> None:
    assert OLD.cache.disk is not None
    new = replace(OLD, cache=replace(OLD.cache, disk=replace(OLD.cache.disk, size=1 << 30)))
    assert live_settings(OLD, new)[1] == ["cache.disk.size"]


async def test_a_reload_answers_the_cache_key_that_needs_a_restart(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    proxy = await make_proxy()
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    config = Path(proxy.config_path)
    text = config.read_text()  # noqa: ASYNC240 (a small local file)
    assert "cache: {memory: 64MB," in text
    config.write_text(text.replace("cache: {memory: 64MB,", "cache: {memory: 64MB, max_object: 2MB,"))  # noqa: ASYNC240
    reply = await proxy.admin("POST", "/reload")
    assert reply.status == 200, reply.body
    assert json.loads(reply.body)["restart_required"] == ["cache.max_object"]
