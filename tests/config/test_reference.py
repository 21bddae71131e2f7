"""docs/configuration.md is what the settings' declarations say, and every setting is declared."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

import pytest

from proxy.config import reference_page
from proxy.schema import fields_of, setting
from proxy.settings import Settings

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_reference_page_is_the_one_the_declarations_write() -> None:
    written = reference_page()
    committed = PAGE.read_text(encoding="utf-8")
    if committed != written:
        diff = "".join(list(difflib.unified_diff(committed.splitlines(True), written.splitlines(True),
                                                 "docs/configuration.md", "declared"))[:40])
        pytest.fail(f"docs/configuration.md is out of date: run scripts/config-reference\n{diff}")


def _sections(cls: type, seen: set[type]) -> set[type]:
    if cls not in seen:
        seen.add(cls)
        for f in fields_of(cls):
            for sub in f.parser.sections:
                _sections(sub, seen)
    return seen


def test_every_key_of_every_section_is_in_the_reference_with_its_default() -> None:
    page = reference_page()
    sections = _sections(Settings, set())
    assert len(sections) >= 14  # the top level, listen, listen.tls, upstreams[], upstream.*, cache.*, ...
    for cls in sections:
        for f in fields_of(cls):
            assert f"| `{f.key}` |" in page, (cls.__name__, f.key)
    assert "| `max_request_head` | size ≥ 1KB | `32KB` |" in page
    assert "| `memory_policy` | lru or lfu | `lru` |" in page  # choices from the Literal
    assert "| `redis` | Redis URL | required |" in page


def test_a_field_declared_neither_as_a_setting_nor_internal_is_refused() -> None:
    @dataclasses.dataclass(frozen=True)
    class Loose:
        declared: int = setting(1, "a setting")
        forgotten: int = 2

    with pytest.raises(TypeError, match=r"Loose\.forgotten: declare it with setting"):
        fields_of(Loose)

    @dataclasses.dataclass(frozen=True)
    class Undocumented:
        quiet: int = setting(1)

    with pytest.raises(TypeError, match="needs its one-line doc"):
        fields_of(Undocumented)
