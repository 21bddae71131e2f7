"""Rules' ``regex:`` patterns run on RE2: no client input makes a match take more than linear time.

On Python's backtracking ``re``, ``path: "regex:^/r/(a+)+$"`` and ``GET /r/aaa...a%21`` (34 a's)
held a worker for 30 s, until the watchdog killed it with every request it held; a header or
query regex the same. What RE2 cannot run (backreferences, lookaround) is refused at its line
(tests/rules/test_cli.py); what it reads otherwise than ``re`` is pinned here and in docs/rules.md.
"""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import pytest

from proxy.rules import RequestView
from proxy.rules.match import Regex, RegexRefused
from tests.harness import Origin, spawn_cachegate, write_config
from tests.rules.test_compile import _warnings, compile_text, head

A_LOT = "a" * 34 + "!"  # 2^34 ways to split for (a+)+: hours on a backtracking engine


@pytest.mark.parametrize(("pattern", "text", "found"), [
    (r"^/r/(a+)+$", "/r/" + A_LOT, False),
    (r"^/r/(a+)+$", "/r/" + "a" * 34, True),
    (r"(.*,)*x", "," * 40 + "y", False),
    (r"^/v[0-9]+/[^/]*\.json$", "/v2/list.json", True),
    (r"(?i)^/ADMIN", "/admin/x", True),
    # RE2's $ is the end of the text: re's also matched before a final newline (a decoded %0A).
    (r"^/admin$", "/admin\n", False),
    # What re read otherwise is refused (below); written out, it means the same on both.
    (r"^/account/[0-9]{0,8}/", "/account/12/", True),
    (r"[{,3}]", ",", True),  # a class's {,3} is characters, as in re
    (r"^\{,3}$", "{,3}", True),
    (r"\p{Nd}", "\u0663", True),
    (r"[0-9]", "\u0663", False),
    (r"[[:alpha:]]", "b", True),  # RE2's POSIX class (ASCII): re read [[:alph] and a "]"
    # A field byte that is not UTF-8 (aiohttp keeps it as a lone surrogate) is one character.
    (r"^a.$", "a\udcff", True),
    (r"^a$", "a\udcff", False),
])
def test_a_regex_is_searched_by_re2(pattern: str, text: str, found: bool) -> None:
    assert (Regex(pattern).search(text) is not None) is found


@pytest.mark.parametrize(("pattern", "message"), [
    # re read x{,n} as 0 to n repeats and RE2 reads the literal text: a bypass rule for
    # ^/account/[0-9]{,8}/ stopped bypassing when rules moved to RE2, and private pages were cached.
    (r"^/account/[0-9]{,8}/", "{,8} is the literal text '{,8}' in RE2, where Python's re read it as "
                              "0 to 8 repeats: write {0,8}"),
    (r"^a{,}$", "{,} is the literal text '{,}' in RE2, where Python's re read it as any number of "
                "repeats: write * (or {0,})"),
    # re's \d \w \s \b were Unicode; RE2's are ASCII: ^/account/\d+ stopped matching /account/%D9%A3.
    (r"^/account/\d+/", "\\d is ASCII-only in RE2, where Python's re read it over all of Unicode"),
    (r"[\w.]+", "\\w is ASCII-only in RE2"),
    (r"\S", "\\S is ASCII-only in RE2"),
    (r"\bx", "\\b is ASCII-only in RE2"),
    (r"\u00e9", "\\u is not an escape in RE2: write the character itself, or its code point as \\x{00e9}"),
    ("^/a\ud800", "a lone surrogate U+D800 at character 4: not a character, so RE2 cannot read the "
                   "pattern"),
])
def test_what_re2_would_read_otherwise_than_re_is_refused(pattern: str, message: str) -> None:
    with pytest.raises(RegexRefused) as refused:
        Regex(pattern)
    assert str(refused.value).startswith(message), refused.value


def test_a_lower_casing_rule_whose_regex_has_a_capital_is_warned_about() -> None:
    """``key.lowercase_path`` reads the rules again on the lower-cased path, where ^/Low/ never
    matches: every request the rule matched was bypassed, and check said OK."""
    text = """
        rules:
          - name: lower
            match:
              path: "regex:^/Low/"
            ttl: {200: 1m}
            key: {lowercase_path: true}
    """
    assert compile_text(text).plan(head("/Low/x")).bypass
    (warning,) = _warnings(text)
    assert warning.startswith("t.yaml:5: warning: rule 'lower': path 'regex:^/Low/' has the capital 'L' "
                              "outside a class and no (?i), but key.lowercase_path reads the rules again")
    for path in (r"regex:^/low/[A-Z]", r"regex:(?i)^/Low/", r"regex:^/low/\PL\pL\p{Lu}\xAB(?P<Name>x)"):
        assert _warnings(f"""
            rules:
              - name: lower
                match: {{path: '{path}'}}
                ttl: {{200: 1m}}
                key: {{lowercase_path: true}}
        """) == [], path


def test_a_backtracking_pattern_in_each_place_a_rule_takes_a_regex_matches_at_once() -> None:
    rules = compile_text(r"""
        rules:
          - name: path
            match: {path: "regex:^/r/(a+)+$"}
            bypass: true
          - name: header
            match: {header: {X-A: {regex: "^(a+)+$"}}}
            bypass: true
          - name: query
            match: {query: {q: {regex: "^(a+)+$"}}}
            bypass: true
          - name: cookie
            match: {cookie: {c: {regex: "^(a+)+$"}}}
            bypass: true
    """)
    view = RequestView(head("/r/" + A_LOT.replace("!", "%21") + "?q=" + A_LOT.replace("!", "%21"),
                            X_A=A_LOT, Cookie=f"c={A_LOT}"))
    assert [r.match.request_mismatch(view) for r in rules.rules] == [
        f"path /r/{A_LOT} does not match 'regex:^/r/(a+)+$'", "header: not X-A ~ /^(a+)+$/",
        "query: not q ~ /^(a+)+$/", "cookie: not c ~ /^(a+)+$/"]
    assert not rules.plan(head("/r/" + A_LOT.replace("!", "%21"))).bypass
    assert rules.plan(head("/r/aaaa")).bypass


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as resp:
        return resp.status, resp.headers.get("X-Cache-Status", "")


@pytest.mark.slow
async def test_a_request_made_to_fail_a_backtracking_regex_is_answered_and_no_worker_is_killed(
        origin: Origin, tmp_path: Path) -> None:
    """A real proxy with two workers: the request is answered (10 s at most, where the worker
    hung until the watchdog's SIGKILL), and the worker lives on."""
    for name in ("/r/" + A_LOT, "/r/aaaa", "/h"):
        origin.route(name, body="ok", headers={"Cache-Control": "max-age=60"})
    config = write_config(str(tmp_path), origin.url, config="cache: {memory: 16MB, disk: null}\n", rules=r"""
        rules:
          - name: r
            match: {path: "regex:^/r/(a+)+$"}
            bypass: true
          - name: h
            match: {header: {X-A: {regex: "^(a+)+$"}}}
            bypass: true
    """)
    proc = await asyncio.to_thread(spawn_cachegate, ["run", "--config", config, "--workers", "2"])
    try:
        url = proc.proxy_url
        assert await asyncio.to_thread(_get, f"{url}/r/{A_LOT.replace('!', '%21')}") == (200, "MISS")
        assert await asyncio.to_thread(_get, f"{url}/r/aaaa") == (200, "BYPASS")
        assert await asyncio.to_thread(_get, f"{url}/h", {"X-A": A_LOT}) == (200, "MISS")
    finally:
        code = await asyncio.to_thread(proc.stop)
    assert code == 0, proc.text
    assert "killing" not in proc.text and "unresponsive" not in proc.text, proc.text
