"""The clock set back (NTP, an operator) past entries stored before: each is stored "in the
future" and revalidated (``Freshness.stamped_ahead``), and why is said once per process. It was
said only when such an entry was read from disk, never for one found in memory, the common case
of a running process. The engine runs on a clock the test sets back."""

from __future__ import annotations

import logging

import pytest

from proxy.storage import reads
from tests.conftest import MakeProxy, clocked
from tests.harness import Clock, Origin


def said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "ahead of this machine's clock" in r.getMessage()]


async def test_a_memory_entry_stored_before_the_clock_went_back_is_revalidated_and_that_is_said_once(
        make_proxy: MakeProxy, origin: Origin, clock: Clock, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reads._ClockBack, "seen", False)  # (once per process: this test's)
    caplog.set_level(logging.WARNING)
    origin.route("/a", body=b"a", headers={"Cache-Control": "max-age=600", "ETag": '"a"'})
    origin.route("/b", body=b"b", headers={"Cache-Control": "max-age=600"})
    proxy = await clocked(make_proxy, clock)
    for path in ("/a", "/b"):
        assert (await proxy.get(path)).x_cache == "MISS"
        assert (await proxy.get(path)).x_cache == "HIT"  # in memory
    assert said(caplog) == []
    clock.step(-86400)  # set back a day
    again = await proxy.get("/a")  # with a validator: revalidated
    assert again.status == 200 and again.x_cache != "HIT", again.headers
    lines = said(caplog)
    assert len(lines) == 1 and "was stored 86400 s ahead" in lines[0] and "(logged once)" in lines[0], lines
    other = await proxy.get("/b")  # without one: fetched again, not said again
    assert other.status == 200 and other.x_cache != "HIT", other.headers
    assert len(said(caplog)) == 1
    assert origin.count("/a") == origin.count("/b") == 2
