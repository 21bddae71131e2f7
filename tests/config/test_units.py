"""Sizes and durations out of range are refused as ValueError (a ``FILE:LINE`` problem), never
an OverflowError at load or a value the proxy cannot compute with later."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.cli import main
from proxy.units import MAX_SIZE, parse_size


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
