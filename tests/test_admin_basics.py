"""The admin API's foundation: token, health, metrics, purge validation."""

from __future__ import annotations

import pytest

from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy

TOKEN = "s3cret-token"


async def test_with_a_token_every_endpoint_but_healthz_needs_it(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    assert (await proxy.admin("GET", "/healthz")).status == 200
    for method, path in (("GET", "/metrics"), ("POST", "/purge")):
        denied = await proxy.admin(method, path, json={"all": True})
        assert denied.status == 401, path
        wrong = await proxy.admin(method, path, json={"all": True}, headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401, path
    ok = await proxy.admin("GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status == 200


def test_without_a_token_the_admin_api_stays_on_loopback(tmp_path: object) -> None:
    from pathlib import Path

    from proxy.config import load_config
    from proxy.errors import ConfigError

    config = Path(str(tmp_path)) / "c.yaml"
    config.write_text("upstreams: [{url: 'http://127.0.0.1:9'}]\nadmin: {listen: '0.0.0.0:8081'}\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(config))
    assert "is not loopback and admin.token is not set" in str(err.value)


async def test_metrics_count_requests_by_cache_status(origin: Origin, proxy: Proxy) -> None:
    origin.route("/m", body=b"m", headers={"Cache-Control": "max-age=60"})
    await proxy.get("/m")
    await proxy.get("/m")
    text = (await proxy.admin("GET", "/metrics")).body.decode()
    assert 'cachegate_requests_total{cache_status="MISS",method="GET"} 1.0' in text
    assert 'cachegate_requests_total{cache_status="HIT",method="GET"} 1.0' in text


@pytest.mark.parametrize("body, message", [
    (b"{not json", "invalid JSON"),
    (b'{"urls": "http://a/"}', "'urls' must be a list"),
    (b'{"urls": ["http://a/"], "bogus": 1}', "unknown field(s): bogus"),
    (b'{"urls": ["not a url"]}', "absolute http"),
    (b'{"soft": "yes", "all": true}', "'soft' must be true or false"),
    (b"{}", "nothing to purge"),
    (b"[]", "must be a JSON object"),
])
async def test_bad_purge_requests_get_400_and_purge_nothing(
    origin: Origin, proxy: Proxy, body: bytes, message: str
) -> None:
    origin.route("/keep", body=b"k", headers={"Cache-Control": "max-age=60"})
    await proxy.get("/keep")
    reply = await proxy.admin("POST", "/purge", data=body)
    assert reply.status == 400
    assert message in reply.body.decode()
    assert (await proxy.get("/keep")).x_cache == "HIT"
