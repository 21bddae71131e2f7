"""An admin token no client can send is refused where it is given, saying which character.

A token read from ``${ADMIN_TOKEN}`` whose secret file was written with ``echo`` ends with a
newline: ``cachegate check`` said OK, the proxy ran, and every bearer request was a 401 (HTTP
strips whitespace around a field value; the admin API strips the token it is sent), while
``cachegate purge`` printed ``bad admin URL ...: Invalid header value``, blaming the URL.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.config import Overrides
from proxy.web.server import install_reloader
from tests.admin.test_cli_purge import cachegate
from tests.admin.util import absolute, settle
from tests.conftest import MakeProxy
from tests.harness import Origin

TOKEN = "tok-0123456789abcdef-xyz"

UNSENDABLE = [
    (TOKEN + "\n", "ends with a newline (\\n)"),  # echo > secret
    (TOKEN + "\r\n", "ends with a newline (\\n)"),
    (" " + TOKEN, "starts with a space"),
    (TOKEN + " ", "ends with a space"),
    (TOKEN + "\t", "ends with a tab (\\t)"),
    (TOKEN + "\u00a0", "ends with the character U+00A0"),  # the admin API strips it too
    ("tok\x07" + TOKEN, "holds the character U+0007 (a control character) at offset 3"),
    ("tok\n" + TOKEN, "holds a newline (\\n) (a control character) at offset 3"),
]


def write(tmp_path: Path) -> Path:
    config = tmp_path / "cachegate.yaml"
    config.write_text("listen: 127.0.0.1:0\n"
                      "upstreams: [http://127.0.0.1:9]\n"
                      "cache: {disk: null}\n"
                      "admin:\n"
                      "  listen: '127.0.0.1:0'\n"
                      "  token: ${ADMIN_TOKEN}\n")
    return config


@pytest.mark.parametrize("token, problem", UNSENDABLE, ids=[t[1].split(" (")[0] for t in UNSENDABLE])
def test_check_refuses_a_token_no_client_can_send_at_its_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        token: str, problem: str) -> None:
    config = write(tmp_path)
    monkeypatch.setenv("ADMIN_TOKEN", token)
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}:6: admin.token: {problem}, which no client can send in an Authorization field" in err
    assert TOKEN not in err  # a secret: never printed
    monkeypatch.setenv("ADMIN_TOKEN", TOKEN)
    assert main(["check", "--config", str(config)]) == 0


@pytest.mark.parametrize("token", [TOKEN + "\n", None], ids=["newline", "unset variable"])
def test_a_refused_token_on_a_reachable_listener_is_one_problem_not_also_not_set(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        token: str | None) -> None:
    """With ``admin.listen: 0.0.0.0:...``, a token refused at its line was reported a second
    time as "admin.token is not set", which sent the operator looking for a missing key."""
    config = tmp_path / "cachegate.yaml"
    config.write_text(write(tmp_path).read_text().replace("'127.0.0.1:0'", "'0.0.0.0:0'"))
    if token is None:
        monkeypatch.delenv("ADMIN_TOKEN", raising=False)
    else:
        monkeypatch.setenv("ADMIN_TOKEN", token)
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"{config}:6: "), err
    assert ("environment variable ADMIN_TOKEN is not set" if token is None else "ends with a newline") in err[0]
    config.write_text(config.read_text().replace("  token: ${ADMIN_TOKEN}\n", "  token: null\n"))
    assert main(["check", "--config", str(config)]) == 2  # written as null: not set, at admin.listen
    assert "admin.listen 0.0.0.0:0 is not loopback and admin.token is not set" in capsys.readouterr().err


async def test_a_reload_to_a_token_with_a_newline_is_refused_and_the_running_token_holds(
        origin: Origin, make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    text = Path(proxy.config_path).read_text()  # noqa: ASYNC240
    Path(proxy.config_path).write_text(text.replace(f"token: {TOKEN}", "token: '${ADMIN_TOKEN}'"))  # noqa: ASYNC240
    monkeypatch.setenv("ADMIN_TOKEN", TOKEN[::-1] + "\n")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    reply = await proxy.admin("POST", "/reload", headers=auth)
    assert reply.status == 400, reply.body
    problems = json.loads(reply.body)["problems"]
    assert any("admin.token: ends with a newline (\\n)" in p for p in problems), problems
    assert (await proxy.admin("GET", "/stats", headers=auth)).status == 200


async def test_cachegate_purge_names_the_token_not_the_url(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    origin.route("/a", body=b"a", headers={"Cache-Control": "max-age=300"})
    await proxy.get("/a")
    await settle(proxy)
    code, out, err = await cachegate("purge", "--admin", proxy.admin_url, absolute(proxy, "/a"),
                                     env={"CACHEGATE_ADMIN_TOKEN": TOKEN + "\n"})
    assert (code, out) == (2, ""), err
    assert err.startswith("cachegate purge: CACHEGATE_ADMIN_TOKEN ends with a newline (\\n), which no "
                          "client can send"), err
    assert "bad admin URL" not in err and TOKEN not in err
    assert (await proxy.get("/a")).x_cache == "HIT"


async def test_the_admin_client_names_the_token_whatever_gave_it(origin: Origin, make_proxy: MakeProxy) -> None:
    """``cachegate top`` and ``purge`` call the admin API through ``call_admin``: it says what is
    wrong with the token, not 'bad admin URL'."""
    import asyncio

    from proxy.admin_client import AdminClientError, call_admin

    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    with pytest.raises(AdminClientError) as caught:
        await asyncio.to_thread(call_admin, proxy.admin_url, "GET", "/stats", None, TOKEN + "\n", 10.0)
    assert str(caught.value).startswith("the admin token ends with a newline (\\n), which no client can send")
    assert TOKEN not in str(caught.value)


async def test_a_token_with_letters_beyond_ascii_is_sent_as_utf8_and_opens_the_api(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """curl sends it as UTF-8 and the admin API reads UTF-8; urllib wrote Latin-1, or refused
    the header as a 'bad admin URL'."""
    token = "t\u00f8ken-\u6771\u4eac-0123456789"
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: '{token}'}}\n")
    origin.route("/a", body=b"a", headers={"Cache-Control": "max-age=300"})
    await proxy.get("/a")
    await settle(proxy)
    code, out, err = await cachegate("purge", "--admin", proxy.admin_url, absolute(proxy, "/a"),
                                     env={"CACHEGATE_ADMIN_TOKEN": token})
    assert (code, json.loads(out or "{}")) == (0, {"purged": 1, "soft": False}), err
