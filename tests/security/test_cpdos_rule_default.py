"""CPDoS (cache-poisoned denial of service) through a rule's ``ttl`` default.

The attack (Nguyen et al., "Your Cache Has Fallen", CCS 2019): one request carries a field
the origin rejects, an oversized header (HHO) or a meta character (HMC), but that the cache
does not key on. The origin answers 400 or 431; if the cache stores that answer under the
page's key, every innocent client gets the error until it expires. A rule's
``ttl: {..., default: 1m}`` used to give such errors a lifetime; it no longer covers error
statuses RFC 9110 §15.1 does not call heuristically cacheable.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from aiohttp import web

from proxy.cli import main
from proxy.config import Overrides
from proxy.web.server import install_reloader
from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.rules.util import settle

# The README's own example table, and a lone duration (a default for every status).
RULES = [
    'rules:\n  - {name: site, match: {path: "/**"}, ttl: {200: 5m, 404: 1m, default: 1m}}\n',
    'rules:\n  - {name: site, match: {path: "/**"}, ttl: 1m}\n',
    'defaults: {ttl: {200: 5m, default: 1m}}\n',
]


def touchy_origin(origin: Origin) -> None:
    """A real page, with no freshness of its own, behind an origin that rejects odd requests."""

    async def page(request: web.Request) -> web.Response:
        if "X-Meta" in request.headers:  # HMC: a header value the origin's framework refuses
            return web.Response(status=400, text="bad header")
        if any(len(v) > 4096 for v in request.headers.values()):  # HHO: over the origin's limit
            return web.Response(status=431, text="header too large")
        if "X-Crash" in request.headers:  # a field that crashes the application
            return web.Response(status=500, text="oops")
        return web.Response(text="the real page")

    origin.route("/page", page)


@pytest.mark.parametrize("rules", RULES, ids=["ttl-table-default", "ttl-duration", "defaults-default"])
@pytest.mark.parametrize("poison, status", [
    ({"X-Meta": "\\"}, 400),
    ({"X-Oversized": "x" * 6000}, 431),
    ({"X-Crash": "1"}, 500),
], ids=["meta-character-400", "oversized-header-431", "crash-500"])
async def test_an_error_caused_by_one_request_is_not_served_to_the_next_client(
        origin: Origin, make_proxy: MakeProxy, rules: str, poison: dict[str, str], status: int) -> None:
    touchy_origin(origin)
    proxy = await make_proxy(rules=rules)
    attack = await proxy.get("/page", headers=poison)
    assert attack.status == status
    assert "stored" not in attack.cache_status.split("; ")
    await settle(proxy)
    innocent = await proxy.get("/page")
    assert (innocent.status, innocent.body) == (200, b"the real page")
    assert origin.count("/page") == 2
    assert (await proxy.get("/page")).x_cache == "HIT"  # and the real page is what is kept


async def test_an_error_status_named_in_the_table_is_still_stored(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """The operator's explicit choice stands (cachegate check warns about it)."""
    touchy_origin(origin)
    proxy = await make_proxy(rules='rules:\n  - {name: site, match: {path: "/**"}, ttl: {200: 5m, 400: 1m}}\n')
    assert (await proxy.get("/page", headers={"X-Meta": "1"})).status == 400
    await settle(proxy)
    reply = await proxy.get("/page")
    assert (reply.status, reply.x_cache) == (400, "HIT")


# -- cachegate check warns where a ttl meets error statuses ---------------------------------------

WARNINGS = [
    ("""
     rules:
       - name: site
         match: {path: "/**"}
         ttl:
           200: 5m
           default: 1m
     """, 6, "rule 'site': ttl default: 1m does not apply to error statuses other than 404, 405, 410, "
             "414 and 501"),
    ("""
     rules:
       - name: site
         match: {path: "/**"}
         ttl: 10m
     """, 4, "rule 'site': ttl: 10m (a default for every status) does not apply to error statuses"),
    ("""
     defaults:
       ttl: {200: 5m, default: 30s}
     """, 2, "defaults: ttl default: 30s does not apply to error statuses"),
    ("""
     rules:
       - name: api
         match: {path: "/api/**"}
         ttl:
           200: 5m
           503: 10s
     """, 6, "rule 'api': ttl 503: 10s stores the origin's 503 for every client"),
    ("""
     rules:
       - name: errors
         match: {path: "/api/**", status: [404, 500, 502]}
         ttl: {502: 5s, default: 1m}
     """, 4, "rule 'errors': ttl default: 1m never applies to 500 (in match.status)"),
]


def write_rules(tmp_path: Path, rules: str) -> str:
    (tmp_path / "rules.yaml").write_text(textwrap.dedent(rules).lstrip("\n"))
    config = tmp_path / "cachegate.yaml"
    config.write_text("listen: 127.0.0.1:0\nadmin: {listen: '127.0.0.1:0'}\n"
                      "upstreams: [http://127.0.0.1:9]\ncache: {disk: null}\nrules: [rules.yaml]\n")
    return str(config)


@pytest.mark.parametrize(("rules", "line", "message"), WARNINGS, ids=[m.split(":")[0] + str(n)
                                                                      for n, (_, _, m) in enumerate(WARNINGS)])
def test_check_warns_at_the_line_but_accepts_the_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        rules: str, line: int, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    write_rules(tmp_path, rules)
    config = "cachegate.yaml"  # (named relatively: its rule files are too)
    assert main(["check", "--config", config]) == 0
    out, err = capsys.readouterr()
    assert any(e.startswith(f"rules.yaml:{line}: warning: ") and message in e for e in err.splitlines()), err
    assert "OK" in out and "warning(s)" in out
    assert main(["check", "--strict", "--config", config]) == 2  # for CI: warnings refuse too
    assert "refused by --strict" in capsys.readouterr().err


@pytest.mark.parametrize("rules", [
    'rules:\n  - {name: a, match: {path: "/**"}, ttl: {200: 5m, 301: 1h, 404: 1m, 410: 1h}}\n',
    'rules:\n  - {name: a, match: {path: "/**", status: [200, 404]}, ttl: {default: 1m}}\n',
    'rules:\n  - {name: a, match: {path: "/**", status: [500, 503]}, no_store: true}\n',
    'defaults: {ttl: {200: 5m}}\nrules: []\n',  # a defaults-only file says 'rules: []' (else: a warning)
], ids=["no-default-no-error", "default-over-covered-statuses", "no-store", "defaults-without-default"])
def test_check_is_silent_where_no_error_status_is_stored(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], rules: str) -> None:
    config = write_rules(tmp_path, rules)
    assert main(["check", "--strict", "--config", config]) == 0
    assert "warning" not in capsys.readouterr().err


async def test_a_reload_answers_and_logs_the_warnings(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    proxy = await make_proxy(rules='rules:\n  - {name: a, match: {path: "/**"}, ttl: {200: 5m}}\n')
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    (tmp_path / "rules.yaml").write_text('rules:\n  - {name: a, match: {path: "/**"}, ttl: {200: 5m, default: 1m}}\n')
    reply = await proxy.admin("POST", "/reload", headers={"Content-Type": "application/json"})
    assert reply.status == 200
    (warning,) = json.loads(reply.body)["warnings"]
    assert "rules.yaml:2: warning: rule 'a': ttl default: 1m does not apply to error statuses" in warning
    assert any(warning in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_explain_says_why_an_unnamed_error_status_is_not_stored(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_rules(tmp_path, 'rules:\n  - {name: site, match: {path: "/**"}, ttl: {200: 5m, default: 1m}}\n')
    assert main(["explain", "--config", config, "http://shop.example/page",
                 "--status", "302", "--status", "431", "--brief"]) == 0
    out = capsys.readouterr().out
    assert "fresh for 1m (rule ttl; used because the origin gave no freshness)" in out  # the 302
    assert "not stored: UNCACHEABLE-STATUS" in out  # the 431
    assert "a ttl default never covers an error status other than 404, 405, 410, 414 and 501" in out
