"""A response stale on arrival (its Age past its max-age, or a Date long past) is stored: counted
in cachegate_fills_total only, never also in cachegate_not_stored_total (with no reason: a blank
row in ``cachegate top``)."""

from __future__ import annotations

import asyncio

import pytest

from tests.admin.test_metrics import scrape, value
from tests.conftest import MakeProxy
from tests.harness import Origin


@pytest.mark.parametrize("fields", [
    {"Cache-Control": "max-age=60", "Age": "100"},
    {"Cache-Control": "max-age=60", "Date": "Mon, 01 Jan 1900 00:00:00 GMT"},
])
async def test_a_response_stale_on_arrival_is_counted_as_stored_and_not_as_not_stored(
        origin: Origin, make_proxy: MakeProxy, fields: dict[str, str]) -> None:
    origin.route("/old", body=b"old", headers=fields)
    proxy = await make_proxy()
    before = await scrape(proxy)
    reply = await proxy.get("/old")
    assert reply.status == 200 and reply.cache_status.endswith("; stored"), reply.cache_status
    await asyncio.sleep(0.1)
    after = await scrape(proxy)
    assert value(after, "cachegate_fills_total") - value(before, "cachegate_fills_total") == 1
    not_stored = {k: v - before.get(k, 0.0) for k, v in after.items()
                  if k[0] == "cachegate_not_stored_total" and v != before.get(k, 0.0)}
    assert not_stored == {}
