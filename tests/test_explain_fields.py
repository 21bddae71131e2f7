"""``cachegate explain -H/-R`` refuses the fields the admin API's /explain refuses, in its words.

The CLI took a CR or LF in a value (``str.strip`` even dropped one at its end), a name that is
not a token (``X(``, ``Accept:`` with a space before the colon) and bytes that are not UTF-8,
and explained a request no client can send; the admin API refused them 400. Both now use
``explain.field_problem``; the CLI exits 2 with its reason.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.explain import parse_header
from tests.admin.util import js
from tests.harness import Origin, Proxy

CASES = [  # (the argument, the JSON field the admin is sent, the reason both give)
    ("X-A: a\rb", {"X-A": "a\rb"}, "the value of 'X-A' holds '\\r', which no field value may (RFC 9110 §5.5)"),
    ("X-A: a\nb", {"X-A": "a\nb"}, "the value of 'X-A' holds '\\n', which no field value may (RFC 9110 §5.5)"),
    ("X-A: ab\r", {"X-A": "ab\r"}, "the value of 'X-A' holds '\\r', which no field value may (RFC 9110 §5.5)"),
    ("X(: v", {"X(": "v"}, "'X(' is not a field name: a name is a token of ASCII letters, digits and "
                           "!#$%&'*+-.^_`|~ (RFC 9110 §5.1), as the proxy's parser takes them"),
    ("Accept : v", {"Accept ": "v"}, "'Accept ' is not a field name: a name is a token"),
    ("X-\u00e9: v", {"X-\u00e9": "v"}, "'X-\u00e9' is not a field name: a name is a token"),
]


async def _cli(tmp_path: Path, *args: str | bytes) -> tuple[int, str, str]:
    config = tmp_path / "c.yaml"
    config.write_text("upstreams: [{url: 'http://127.0.0.1:9'}]\nrules: []\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "explain", "--config", str(config), "http://shop.example/a", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="backslashreplace"), err.decode(errors="backslashreplace")


@pytest.mark.parametrize(("arg", "field", "reason"), CASES, ids=range(len(CASES)))
async def test_the_cli_refuses_a_field_as_the_admin_api_does(
        tmp_path: Path, proxy: Proxy, arg: str, field: dict[str, str], reason: str) -> None:
    for option, key in (("-H", "headers"), ("-R", "response_headers")):
        status, out, err = await _cli(tmp_path, option, arg)
        assert (status, out) == (2, ""), err
        assert err.startswith(f"cachegate explain: {option} {arg!r}: {reason}"), err
        reply = await proxy.admin("POST", "/explain", json={"url": proxy.url + "/a", key: field})
        assert reply.status == 400
        assert js(reply)["error"].startswith(f"'{key}': {reason}"), js(reply)
        cli_reason = err.removeprefix(f"cachegate explain: {option} {arg!r}: ").strip()
        assert js(reply)["error"] == f"'{key}': {cli_reason}"  # the same reason, word for word


async def test_the_cli_refuses_a_value_that_is_not_utf8(tmp_path: Path) -> None:
    status, out, err = await _cli(tmp_path, "-H", b"X-A: caf\xe9")
    assert (status, out) == (2, ""), err
    assert err == ("cachegate explain: -H 'X-A: caf\\udce9': the value of 'X-A' is not UTF-8: give the "
                   "field's text as UTF-8\n")


def test_a_nul_is_refused_too() -> None:
    """(No argv can hold a NUL: the parser's part, checked here as the admin API's test does.)"""
    with pytest.raises(ValueError, match=r"the value of 'X-A' holds '\\x00', which no field value may"):
        parse_header("X-A: a\x00b")


async def test_a_field_any_client_can_send_is_still_explained(tmp_path: Path, origin: Origin) -> None:
    status, out, err = await _cli(tmp_path, "-H", "Accept:  text/html \t", "-R", "Cache-Control: max-age=60")
    assert status == 0, err
    assert "request headers     Accept: text/html\n" in out, out
    assert parse_header("Accept:  text/html \t") == ("Accept", "text/html")
