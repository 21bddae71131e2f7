"""Values a fuzzer found that ``cachegate check`` passed (or said in Python's words) and that
broke the start or serving: each is now refused at its line, in YAML's words, by ``check``, by
the start and by a reload (which keeps the running config)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from proxy.config import load_config
from tests.config.test_values_that_break_serving import problems
from tests.harness import Origin
from tests.storage.procs import ProxyProcess, write_config

U = "listen: 127.0.0.1:0\nadmin: {listen: null}\nupstreams: [http://127.0.0.1:9]\n"


AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")


# -- a cache directory the service user cannot make ----------------------------------------

MAKE = "give a directory the user cachegate runs as can make and write (or make this one so)"


@pytest.mark.parametrize(("path", "said"), [
    ("/proc/nonexist/c", "/proc/nonexist/c cannot be made: No such file or directory (making /proc/nonexist)"),
    ("/sys/kernel/cg", "/sys/kernel/cg cannot be made: "),
])
def test_a_cache_directory_that_cannot_be_made_is_refused_at_its_line(tmp_path: Path, path: str,
                                                                     said: str) -> None:
    found = problems(tmp_path, U + f"cache: {{disk: {{path: {path}}}}}\n")
    assert len(found) == 1 and found[0].startswith(f"c.yaml:4: cache.disk.path: {said}"), found
    assert found[0].endswith(MAKE), found
    assert not os.path.exists(path)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run check and run as nobody")
@pytest.mark.parametrize("command", [["check", "--no-lookup"], ["run"]])
def test_check_and_run_as_a_user_who_cannot_make_it_say_its_line(command: list[str]) -> None:
    """As nobody, /var/lib/x passed check; the start then failed "cannot open the cache directory
    ... Permission denied" with no line of the config."""
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:  # (pytest's own is the owner's alone)
        os.chmod(folder, 0o755)
        config = Path(folder) / "c.yaml"
        config.write_text(U + "cache: {memory: 8MB, disk: {path: /var/lib/cachegate-test-x/c}}\n")
        config.chmod(0o644)
        done = subprocess.run([*AS_NOBODY, sys.executable, "-m", "proxy", *command, "-c", str(config)],
                              capture_output=True, text=True, timeout=60, cwd="/")
    assert (done.returncode, done.stderr.splitlines()) == (2, [
        f"{config}:4: cache.disk.path: /var/lib/cachegate-test-x/c cannot be made: Permission denied (making "
        f"/var/lib/cachegate-test-x); {MAKE}"])
    assert not os.path.exists("/var/lib/cachegate-test-x")


def test_a_cache_directory_that_can_be_made_is_left_unmade_by_check(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(U + "cache: {disk: {path: a/b/c}}\n")
    assert load_config(str(tmp_path / "c.yaml")).cache.disk is not None
    assert not (tmp_path / "a").exists()


# -- fields cachegate writes itself; names that are no names; names listed twice -----------

R = "rules: [r.yaml]\n"


def _rule(body: str) -> str:
    return f"rules:\n  - name: a\n    match: {{path: /**}}\n{body}"


@pytest.mark.parametrize("name", ["Age", "cache-status", "Date"])
def test_response_headers_may_not_set_the_fields_cachegate_writes(tmp_path: Path, name: str) -> None:
    found = problems(tmp_path, U + R, _rule(f"    response_headers:\n      add: {{{name}: '5'}}\n"))
    assert found == [f"r.yaml:5: rules[0].response_headers.add: {name} is cachegate's own on every reply "
                     "(a hit's age, its Cache-Status member, the time a downstream cache counts the age "
                     "from): cachegate sets it; remove: may drop it"]
    (tmp_path / "r.yaml").write_text(_rule(f"    response_headers:\n      remove: [{name}]\n"))
    assert load_config(str(tmp_path / "c.yaml")).rules is not None


@pytest.mark.parametrize(("key", "expected"), [
    ("{headers: [Accept, accept]}", "rules[0].key.headers: 'accept' is listed twice (as 'Accept': header "
                                    "names are case-insensitive); list it once"),
    ("{cookies: [a, a]}", "rules[0].key.cookies: 'a' is listed twice; list it once"),
])
def test_a_key_name_listed_twice_is_refused_as_a_repeated_header_match_is(tmp_path: Path, key: str,
                                                                          expected: str) -> None:
    assert problems(tmp_path, U + R, _rule(f"    key: {key}\n")) == [f"r.yaml:4: {expected}"]


def test_a_key_of_two_cookies_differing_in_case_is_two_cookies(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(_rule("    key: {cookies: [a, A], headers: [Accept, X-A]}\n"))
    (tmp_path / "c.yaml").write_text(U + R)
    assert load_config(str(tmp_path / "c.yaml")).rules is not None


@pytest.mark.parametrize(("value", "expected"), [
    ("['', ' ']", ["c.yaml:4: cache.tag_headers: '' is not a header field name (a token: letters, digits and "
                   "!#$%&'*+-.^_`|~, without spaces)",
                   "c.yaml:4: cache.tag_headers: ' ' is not a header field name (a token: letters, digits and "
                   "!#$%&'*+-.^_`|~, without spaces)"]),
    ("[Surrogate Key]", ["c.yaml:4: cache.tag_headers: 'Surrogate Key' is not a header field name (a token: "
                         "letters, digits and !#$%&'*+-.^_`|~, without spaces)"]),
    ("[Cache-Tag, cache-tag]", ["c.yaml:4: cache.tag_headers: cache-tag is listed twice (as Cache-Tag: field "
                                "names are case-insensitive); list it once"]),
])
def test_tag_headers_are_field_names(tmp_path: Path, value: str, expected: list[str]) -> None:
    assert problems(tmp_path, U + f"cache: {{tag_headers: {value}}}\n") == expected


@pytest.mark.parametrize("interval", ["1ms", "99ms", "0.05"])
def test_a_health_check_interval_below_100ms_is_refused(tmp_path: Path, interval: str) -> None:
    found = problems(tmp_path, U + f"upstream: {{health: {{interval: {interval}}}}}\n")
    assert len(found) == 1 and found[0].startswith(
        "c.yaml:4: upstream.health.interval: must be at least 0.1s (every worker checks every upstream that "
        "often: less is a load of its own on the upstreams, not a quicker verdict), got "), found
    (tmp_path / "c.yaml").write_text(U + "upstream: {health: {interval: 100ms}}\n")
    health = load_config(str(tmp_path / "c.yaml")).pool.health
    assert health is not None and health.interval == 0.1


async def test_a_reload_adding_age_or_a_duplicate_key_is_refused_and_the_running_rules_stay(
        origin: Origin, tmp_path: Path) -> None:
    """A rule's add: {Age: ...} replaced the Age of every hit; a reload to it is refused at its
    line (400), and hits keep cachegate's own Age and Cache-Status."""
    origin.route("/x", body=b"x", headers={"Cache-Control": "max-age=60"})
    (tmp_path / "r.yaml").write_text(_rule("    response_headers: {add: {X-A: '1'}}\n"))
    config = write_config(str(tmp_path), origin.url, "cache: {memory: 16MB, disk: null}\n", "rules: [r.yaml]\n")
    proxy = ProxyProcess(str(tmp_path), config)
    await proxy.start(with_log=True)
    try:
        await proxy.wait_for(lambda: bool(proxy.admin_url))
        await proxy.get("/x")
        for body, line, said in [
                ("    response_headers: {add: {X-A: '1', Age: '0'}}\n", 4, "response_headers.add: Age is "),
                ("    response_headers: {add: {Cache-Status: x}}\n", 4, "response_headers.add: Cache-Status is "),
                ("    key: {headers: [Accept, accept]}\n", 4, "key.headers: 'accept' is listed twice"),
                ("    ttl: {~: 1m}\n", 4, "ttl: null is not a status code")]:
            (tmp_path / "r.yaml").write_text(_rule(body))
            reply = await proxy.admin("POST", "/reload")
            assert reply.status == 400, reply.body
            problem = json.loads(reply.body)["problems"][0]
            assert f"r.yaml:{line}: rules[0].{said}" in problem, problem
        (tmp_path / "r.yaml").write_text(_rule("    <<: {ttl: 1m}\n"))
        reply = await proxy.admin("POST", "/reload")
        assert reply.status == 400, reply.body
        assert json.loads(reply.body)["problems"][0].endswith(
            "r.yaml:4: merge keys (<<:) are not supported in cachegate's files, as anchors and aliases are "
            "not: write the values out"), reply.body
        hit = await proxy.get("/x")
        assert hit.headers.get("X-A") == "1" and "Age" in hit.headers, hit.headers
        assert hit.headers["Cache-Status"].startswith("cachegate; hit"), hit.headers
    finally:
        await proxy.stop(signal.SIGTERM)


# -- messages in YAML's words, not Python's -------------------------------------------------

@pytest.mark.parametrize(("text", "rules", "expected"), [
    (U + R, _rule("    ttl: {~: 1m, true: 2m, 2024-01-01: 1m}\n"), [
        "r.yaml:4: rules[0].ttl: null is not a status code (100-599) or 'default'",
        "r.yaml:4: rules[0].ttl: true is not a status code (100-599) or 'default'",
        "r.yaml:4: rules[0].ttl: 2024-01-01 is not a status code (100-599) or 'default'"]),
    (U + "~: 1\n", None, ["c.yaml:4: unknown key null"]),
    (U + "!!binary aGk=: 1\n", None, ["c.yaml:4: unknown key !!binary aGk="]),
    (U + "cache: {true: 1}\n", None, ["c.yaml:4: unknown key cache.true (allowed: memory, memory_max_object, "
                                      "memory_policy, max_object, lock_timeout, hit_for_pass, disk, apparent_age, tag_headers, "
                                      "range_fill)"]),
    (U + "via: !!binary aGk=\n", None, ["c.yaml:4: via: expected a string, got binary data (!!binary)"]),
    (U + "via: 2024-01-01\n", None, ["c.yaml:4: via: expected a string, got a date"]),
    (U + "via: 2024-01-01 10:00:00\n", None, ["c.yaml:4: via: expected a string, got a date and time"]),
    (U + "cache: {memory: ~, max_object: true}\n", None,
     ["c.yaml:4: cache.max_object: expected a size like 256MB, got true"]),
    (U + 'rules: ["a\\nb.yaml"]\n', None, ["c.yaml:4: rules: rule file 'a\\nb.yaml' does not exist"]),
    (U + "cache:\n  <<: {memory: 1MB}\n", None, ["c.yaml:5: merge keys (<<:) are not supported in cachegate's "
                                               "files, as anchors and aliases are not: write the values out"]),
    (U + "~: 1\n~: 2\n", None, ["c.yaml:5: duplicate key null", "c.yaml:5: unknown key null"]),
])
def test_messages_show_values_in_yaml_words(tmp_path: Path, text: str, rules: str | None,
                                            expected: list[str]) -> None:
    found = problems(tmp_path, text, rules)
    assert found == expected
    assert not any(word in p for p in found for word in ("None", "True", "b'", "datetime", "constructor"))


def test_check_says_them_in_yaml_words_too(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(U + "~: 1\nvia: 2024-01-01\n")
    done = subprocess.run([sys.executable, "-m", "proxy", "check", "--no-lookup", "-c", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr.splitlines()) == (2, [f"{config}:4: unknown key null",
                                                               f"{config}:5: via: expected a string, got a date"])
