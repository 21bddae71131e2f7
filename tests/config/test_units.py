"""Sizes and durations out of range are refused as ValueError (a ``FILE:LINE`` problem), never
an OverflowError at load or a value the proxy cannot compute with later."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.cli import main
from proxy.units import MAX_DURATION, MAX_SIZE, parse_duration, parse_size


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


@pytest.mark.parametrize("value", [float("inf"), float("nan"), "9" * 400, "9" * 400 + "s", "1e999"])
def test_a_duration_that_is_not_finite_is_a_value_error(value: object) -> None:
    with pytest.raises(ValueError, match=r"finite|bad duration"):
        parse_duration(value)


@pytest.mark.parametrize("value", [MAX_DURATION + 1, "2147483649", "3551w", 10 ** 30])
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
