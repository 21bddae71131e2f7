"""SECURITY.md cites tests as its proof: every file and test it names exists, so the page cannot
keep claiming a defence whose test was renamed or removed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def citations(text: str) -> list[tuple[str, str | None]]:
    """``(file, test name or None)`` for each `tests/...` and `::test_...` cited; a bare
    `::name` continues the file cited last."""
    out: list[tuple[str, str | None]] = []
    current = ""
    for m in re.finditer(r"`(tests/[\w/]+\.py)?(?:::(test_\w+))?`", text):
        file, name = m.group(1), m.group(2)
        if file:
            current = file
        if file or name:
            out.append((current, name))
    return out


def test_every_test_security_md_cites_exists() -> None:
    cited = citations((ROOT / "SECURITY.md").read_text())
    assert len(cited) > 30
    for file, name in cited:
        path = ROOT / file
        assert path.is_file(), file
        if name is not None:
            assert re.search(rf"^(async )?def {name}\(", path.read_text(), re.M), f"{file}::{name}"
