"""Sizes and durations out of range are refused as ValueError (a ``FILE:LINE`` problem), never
an OverflowError at load or a value the proxy cannot compute with later."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.cli import main
from proxy.units import MAX_DURATION, MAX_SIZE, parse_duration, parse_size
from tests.harness import self_signed


@pytest.mark.parametrize("value", ["9" * 400 + "KB", "9" * 400, 10 ** 20, "1025TB", MAX_SIZE + 1])
def test_a_size_too_large_is_a_value_error(value: object) -> None:
    with pytest.raises(ValueError, match="too large: at most 1024TB"):
        parse_size(value)


@pytest.mark.parametrize(("value", "size"), [("1.5KB", 1536), ("1024TB", MAX_SIZE), (MAX_SIZE, MAX_SIZE),
                                             ("0.1KB", 102), ("10GB", 10 << 30)])
def test_sizes_up_to_the_limit_are_exact(value: object, size: int) -> None:
    assert parse_size(value) == size


def test_check_names_the_line_of_a_huge_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("upstreams: [http://127.0.0.1:9]\nmax_request_head: " + "9" * 400 + "KB\n")
    assert main(["check", "--config", str(config)]) == 2
    (message,) = capsys.readouterr().err.splitlines()
    assert message.startswith(f"{config}:2: max_request_head: size ") and "at most 1024TB" in message


@pytest.mark.parametrize("value", [float("inf"), float("nan"), "1e999"])
def test_a_duration_that_is_not_finite_is_a_value_error(value: object) -> None:
    with pytest.raises(ValueError, match=r"finite|bad duration"):
        parse_duration(value)


@pytest.mark.parametrize("value", [MAX_DURATION + 1, "2147483649", "3551w", 10 ** 30, 10 ** 400, "9" * 400,
                                   "9" * 400 + "s"])
def test_a_duration_above_two_to_the_31_seconds_is_a_value_error(value: object) -> None:
    with pytest.raises(ValueError, match="too long: at most 2147483648s"):
        parse_duration(value)


@pytest.mark.parametrize(("value", "seconds"), [(MAX_DURATION, MAX_DURATION), ("2147483648", MAX_DURATION),
                                                ("1h30m", 5400.0), (0, 0.0), ("3550w", 3550 * 604800.0)])
def test_durations_up_to_the_limit(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


# (config body, rule file or None, the file and line named, words)
INFINITE = [
    ("shutdown_grace: .nan\n", None, "c", 2, "shutdown_grace: duration must be a finite number"),
    ("upstream: {timeouts: {read: .inf}}\n", None, "c", 2, "upstream.timeouts.read: duration must be a finite"),
    ("rules: [r.yaml]\n", "rules:\n  - name: all\n    match: {path: /**}\n    ttl: .inf\n", "r", 4,
     "ttl: expected a duration"),
    ("rules: [r.yaml]\n", "rules:\n  - name: all\n    match: {path: /**}\n    ttl: {200: 99999999999}\n", "r", 4,
     "ttl.200: duration 99999999999 is too long"),
    ("rules: [r.yaml]\n", "defaults:\n  stale_if_error: .inf\nrules: []\n", "r", 2,
     "defaults.stale_if_error: duration must be a finite"),
]


@pytest.mark.parametrize(("config", "rules", "file", "line", "words"), INFINITE)
def test_check_refuses_an_infinite_or_huge_duration(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    config: str, rules: str | None, file: str, line: int,
                                                    words: str) -> None:
    """``ttl: .inf`` passed check, then every hit was a 500 (an OverflowError computing Age)."""
    if rules is not None:
        (tmp_path / "r.yaml").write_text(rules)
    (tmp_path / "c.yaml").write_text("upstreams: [http://127.0.0.1:9]\n" + config)
    assert main(["check", "--config", str(tmp_path / "c.yaml")]) == 2
    (message,) = [m for m in capsys.readouterr().err.splitlines() if ": warning: " not in m]
    assert message.startswith(f"{tmp_path / file}.yaml:{line}: ") and words in message


@pytest.mark.parametrize(("value", "seconds"), [("10 s", 10.0), ("10S", 10.0), ("1h 30m", 5400.0),
                                                ("500ms", 0.5), ("1w", 604800.0), (" 2 m ", 120.0)])
def test_durations_take_a_space_before_a_unit_as_sizes_do(value: str, seconds: float) -> None:
    """``10 GB`` was a size and ``10 s`` not a duration; both are now, as docs/configuration.md says."""
    assert parse_duration(value) == seconds
    assert parse_size("10 GB") == parse_size("10gb") == 10 << 30


# (the value as written in the config, the words of the problem): numbers YAML 1.1 reads from a
# form that does not say what it looks like, refused where a duration or a size is meant.
MISREAD = [
    ("shutdown_grace: 1:30", "2: shutdown_grace: 1:30 reads as the number 90 in YAML (base 60"),
    ("shutdown_grace: 1:30:00", "2: shutdown_grace: 1:30:00 reads as the number 5400 in YAML (base 60"),
    ("shutdown_grace: 010", "2: shutdown_grace: 010 reads as the number 8 in YAML (octal"),
    ("max_request_head: 16:00", "2: max_request_head: 16:00 reads as the number 960 in YAML (base 60"),
    ("upstream: {timeouts: {read: 1:30.5}}", "2: upstream.timeouts.read: 1:30.5 reads as the number 90.5"),
    ("workers: 010", "2: workers: 010 reads as the number 8 in YAML (octal"),
    ("workers: 1:00", "2: workers: 1:00 reads as the number 60 in YAML (base 60"),
    ("upstream: {pool_size: 0100}", "2: upstream.pool_size: 0100 reads as the number 64 in YAML (octal"),
]


@pytest.mark.parametrize(("line", "words"), MISREAD, ids=[m[0] for m in MISREAD])
def test_a_base_60_or_octal_number_is_refused_for_a_duration_a_size_or_a_count(
        tmp_path: Path, line: str, words: str) -> None:
    from proxy.config import load_config
    from proxy.errors import ConfigError

    config = tmp_path / "c.yaml"
    config.write_text(f"upstreams: [http://127.0.0.1:9]\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(config))
    (problem,) = caught.value.problems
    assert problem.startswith(f"{config}:") and words in problem, problem


def test_numbers_in_the_other_yaml_forms_still_read(tmp_path: Path) -> None:
    from proxy.config import load_config

    config = tmp_path / "c.yaml"
    config.write_text("upstreams: [http://127.0.0.1:9]\nshutdown_grace: '1m30s'\n"
                      "max_request_head: 1_048_576\nclient_body_timeout: 0x10\n")
    s = load_config(str(config))
    assert (s.shutdown_grace, s.max_request_head, s.client_body_timeout) == (90.0, 1 << 20, 16.0)


def test_a_rule_ttl_in_base_60_is_refused_at_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.yaml").write_text("rules:\n  - name: a\n    match: {path: /a}\n    ttl: {200: 1:30}\n"
                                     "  - name: b\n    match: {path: /b}\n    ttl: 2:00\n")
    (tmp_path / "c.yaml").write_text("upstreams: [http://127.0.0.1:9]\nrules: [r.yaml]\n")
    assert main(["check", "--config", str(tmp_path / "c.yaml")]) == 2
    messages = [m for m in capsys.readouterr().err.splitlines() if ": warning: " not in m]
    assert [m.split(": ")[0] for m in messages] == [f"{tmp_path}/r.yaml:4", f"{tmp_path}/r.yaml:7"]
    assert all("base 60" in m for m in messages), messages


def test_an_unquoted_variable_in_braces_is_a_syntax_error_that_says_to_quote_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("upstreams: [http://127.0.0.1:9]\ncache: {memory: ${M}}\n")
    assert main(["check", "--config", str(config)]) == 2
    (message,) = capsys.readouterr().err.splitlines()
    assert message.startswith(f"{config}:2: YAML syntax error") and "quote a ${VAR}" in message


def test_each_mistake_gets_one_clear_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An unset ${VAR} also said "bad size ''" about the empty text left; a refused ttl (.inf)
    was also warned about as "a default for every status"; a port above 65535 said only "expected
    HOST:PORT"; --workers 0 said "--workers: workers: ...". One message each now."""
    monkeypatch.delenv("CACHEGATE_TEST_UNSET", raising=False)
    config = tmp_path / "c.yaml"

    def check(text: str, *args: str, command: str = "check") -> list[str]:
        config.write_text(text)
        assert main([command, "--config", str(config), *args]) == 2
        return capsys.readouterr().err.splitlines()

    assert check("upstreams: [http://127.0.0.1:9]\ncache:\n  memory: ${CACHEGATE_TEST_UNSET}\n") == [
        f"{config}:3: environment variable CACHEGATE_TEST_UNSET is not set"]
    (tmp_path / "r.yaml").write_text("rules:\n  - name: a\n    match: {path: /a}\n    ttl: .inf\n")
    [message] = check("upstreams: [http://127.0.0.1:9]\nrules: [r.yaml]\n")
    assert message.startswith(f"{tmp_path}/r.yaml:4: rules[0].ttl: expected a duration"), message
    assert check("upstreams: [http://127.0.0.1:9]\nlisten: 127.0.0.1:99999\n") == [
        f"{config}:2: listen: '127.0.0.1:99999': port 99999 is out of range (a port is 0 to 65535; 0: one "
        "the system chooses)"]
    assert check("upstreams: [http://127.0.0.1:9]\n", "--workers", "0", command="run") == [
        "<command line>:0: --workers: expected a positive number or auto, got '0'"]


@pytest.mark.parametrize(("key", "expected"), [
    ("'${CACHEGATE_TEST_UNSET}/tls.key'", "environment variable CACHEGATE_TEST_UNSET is not set"),
    ("2024-13-45", "cannot read '2024-13-45' as a timestamp"),
])
def test_a_required_value_refused_where_it_is_written_is_not_missing_as_well(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        key: str, expected: str) -> None:
    """``key: ${CREDENTIALS_DIRECTORY}/tls.key`` checked by hand, where systemd's variable is not
    set, also said "listen[1].tls.key: required (a PEM file)": one problem, one message."""
    monkeypatch.delenv("CACHEGATE_TEST_UNSET", raising=False)
    _, cert = self_signed(tmp_path, "a", "a.test", "IP:127.0.0.1")
    config = tmp_path / "c.yaml"
    config.write_text(f"upstreams: [http://127.0.0.1:9]\nlisten:\n  - 127.0.0.1:0\n"
                      f"  - {{address: 127.0.0.1:0, tls: {{cert: {cert}, key: {key}}}}}\n")
    assert main(["check", "--config", str(config)]) == 2
    [message] = capsys.readouterr().err.splitlines()
    assert message.startswith(f"{config}:4: {expected}"), message
