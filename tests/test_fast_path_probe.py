"""When this aiohttp lacks what the fast hit path needs, cachegate says so loudly: a warning in
the start-up line, the ``cachegate_fast_path_enabled`` gauge at 0 with a reason, and
``/stats``; hits still answer, on the general path. The probe's failure is simulated by
asking it for a handler field this aiohttp does not have (as an aiohttp upgrade that renamed
one would look)."""

from __future__ import annotations

import json

import pytest

import proxy.logs
from proxy.web import fastpath
from proxy.web.server import say_started
from tests.conftest import MakeProxy
from tests.harness import Origin


@pytest.fixture
def aiohttp_without_a_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastpath, "HANDLER_FIELDS", (*fastpath.HANDLER_FIELDS, "_renamed_in_3_15"))


def test_the_probe_names_what_is_missing(aiohttp_without_a_field: None) -> None:
    state = fastpath.probe()
    assert not state.enabled
    assert state.reason == "handler-internals"
    assert "RequestHandler._renamed_in_3_15" in state.detail


def test_this_aiohttp_passes_the_probe() -> None:
    assert fastpath.probe().enabled and fastpath.probe().reason == "ok"


async def test_without_the_internals_hits_take_the_general_path_and_say_so(
        aiohttp_without_a_field: None, origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/page", body=b"hello", headers={"Cache-Control": "max-age=60"})
    proxy = await make_proxy()
    server = proxy.listeners.runners[0].server
    assert isinstance(server, fastpath.ProxyServer) and server.fast is None
    assert (await proxy.get("/page")).x_cache == "MISS"
    hit = await proxy.get("/page")
    assert hit.x_cache == "HIT" and hit.body == b"hello"
    metrics = (await proxy.admin("GET", "/metrics")).body.decode()
    assert 'cachegate_fast_path_enabled{reason="handler-internals"} 0.0' in metrics
    stats = json.loads((await proxy.admin("GET", "/stats")).body)
    assert stats["fast_path"]["enabled"] is False
    assert stats["fast_path"]["reason"] == "handler-internals"
    assert "RequestHandler._renamed_in_3_15" in stats["fast_path"]["detail"]


async def test_with_the_internals_the_metric_and_stats_say_it_is_on(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    metrics = (await proxy.admin("GET", "/metrics")).body.decode()
    assert 'cachegate_fast_path_enabled{reason="ok"} 1.0' in metrics
    stats = json.loads((await proxy.admin("GET", "/stats")).body)
    assert stats["fast_path"] == {"enabled": True, "reason": "ok", "detail": ""}


def test_the_start_up_line_carries_a_warning(aiohttp_without_a_field: None, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.config import Overrides, load_config

    settings = load_config(None, Overrides(upstreams=["http://127.0.0.1:9"]))
    say_started(settings, ["http://127.0.0.1:8080"], [], 1)
    line = capsys.readouterr().out.strip()
    assert "started:" in line
    assert "warning: the fast hit path is off (aiohttp lacks RequestHandler._renamed_in_3_15)" in line
    monkeypatch.setattr(proxy.logs, "_json_lines", True)  # the logs are JSON lines
    say_started(settings, ["http://127.0.0.1:8080"], [], 1)
    record = json.loads(capsys.readouterr().out)
    assert record["level"] == "warning" and record["event"] == "started"
    assert "RequestHandler._renamed_in_3_15" in record["warnings"][0]


def test_without_a_problem_the_start_up_line_has_no_warning(capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.config import Overrides, load_config

    settings = load_config(None, Overrides(upstreams=["http://127.0.0.1:9"]))
    say_started(settings, ["http://127.0.0.1:8080"], [], 1)
    assert "warning" not in capsys.readouterr().out
