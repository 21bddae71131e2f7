"""The mechanism under the settings: a dataclass whose fields carry their parsers is read, checked
and documented from one declaration (proxy.schema.setting / read_section / reference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from proxy.schema import (
    Context,
    Reported,
    byte_size,
    duration,
    file_path,
    integer,
    internal,
    parse_hostport,
    read_section,
    reference,
    setting,
)
from proxy.settings import parse_workers
from proxy.yamlsrc import Problems, parse_yaml


@dataclass(frozen=True)
class Inner:
    """An inner section."""

    where: str = setting("data", "a folder", file_path())
    depth: int = setting(2, "how deep", integer(minimum=1))


@dataclass(frozen=True)
class Toy:
    """A toy section."""

    name: str = setting(doc="required, a string", missing=" (e.g. toy)")
    mode: Literal["fast", "slow"] = setting("fast", "one of a Literal's values")
    enabled: bool = setting(True, "a flag")
    count: int = setting(3, "a plain integer")
    budget: int = setting(1 << 20, "a size", byte_size())
    wait: float = setting(5.0, "a duration", duration(positive=True))
    names: tuple[str, ...] = setting(("a",), "a list of strings, or one")
    inner: Inner = setting(Inner(), "a nested section")
    extra: Inner | None = setting(None, "an optional section")
    seen: int = internal(0)


def read(text: str, base_dir: str = "/base") -> tuple[Toy | None, list[str]]:
    problems = Problems()
    src = parse_yaml(text, "t.yaml", problems)
    assert src is not None
    try:
        value: Toy | None = read_section(Toy, src, Context(problems, base_dir))
    except Reported:
        value = None
    return value, problems.ordered()


def test_each_field_is_a_key_with_its_default_and_its_parser() -> None:
    toy, problems = read("name: x\nbudget: 2MB\nwait: 1m\nmode: slow\nnames: b\ninner: {depth: 5}\n")
    assert problems == []
    assert toy == Toy(name="x", mode="slow", budget=2 << 20, wait=60.0, names=("b",),
                      inner=Inner("/base/data", 5))


def test_a_relative_default_path_is_resolved_even_when_its_section_is_absent() -> None:
    toy, _ = read("name: x\n")
    assert toy is not None and toy.inner.where == "/base/data" and toy.extra is None


def test_null_is_the_default_except_where_the_type_says_none() -> None:
    toy, problems = read("name: x\ncount: null\ninner: null\nextra: null\nnames: null\n")
    assert problems == []
    assert toy is not None and (toy.count, toy.inner, toy.extra, toy.names) == (3, Inner("/base/data"), None, ())


def test_every_problem_is_reported_at_its_line_and_the_value_keeps_its_default() -> None:
    toy, problems = read("name: x\nmode: quick\nenabled: 1\ncount: 1.5\nwait: 0\nnames: [a, [b]]\n"
                         "inner:\n  depth: 0\n  wehre: y\nextra: 3\nnmae: y\n")
    assert problems == [
        "t.yaml:2: mode: must be one of fast, slow, got 'quick'",
        "t.yaml:3: enabled: expected true or false, got an integer",
        "t.yaml:4: count: expected an integer, got a number",
        "t.yaml:5: wait: must be more than 0",
        "t.yaml:6: names: expected strings in the list, got a list",
        "t.yaml:8: inner.depth: must be at least 1, got 0",
        "t.yaml:9: unknown key 'inner.wehre' (did you mean 'where'?)",
        "t.yaml:10: extra: expected a mapping, got an integer",
        "t.yaml:11: unknown key 'nmae' (did you mean 'name'?)",
    ]
    assert toy is not None and (toy.mode, toy.enabled, toy.count, toy.wait, toy.inner.depth) == ("fast", True, 3, 5.0, 2)


def test_a_missing_required_key_is_reported_where_its_section_is_and_the_section_is_not_built() -> None:
    toy, problems = read("mode: slow\n")
    assert toy is None
    assert problems == ["t.yaml:1: name: required (e.g. toy)"]


def test_the_reference_lists_every_key_with_its_type_default_and_meaning() -> None:
    page = reference(Toy)
    assert "| `name` | text | required | required, a string |" in page
    assert "| `mode` | fast or slow | `fast` | one of a Literal's values |" in page
    assert "| `budget` | size (512KB, 256MB, 10GB) | `1MB` | a size |" in page
    assert "| `wait` | duration (30s, 5m, 1h, 1d) > 0 | `5s` | a duration |" in page
    assert "| `inner` | mapping, see [`inner`](#inner) | see below | a nested section |" in page
    assert "## `inner`\n\nAn inner section." in page
    assert "seen" not in page  # internal: not a key of the file


@pytest.mark.parametrize("text", ["[1, 2]", "'just text'", "7"])
def test_a_section_that_is_not_a_mapping_is_one_problem(text: str) -> None:
    problems = Problems()
    src = parse_yaml(f"name: x\ninner: {text}\n", "t.yaml", problems)
    assert src is not None
    assert read_section(Toy, src, Context(problems, "/")).inner == Inner("/data")
    (problem,) = problems.ordered()
    assert problem.startswith("t.yaml:2: inner: expected a mapping, got ")


@pytest.mark.parametrize("text", ["127.0.0.1:\u00b2", "[::1]:\u2460", "h:\u0668\u0660"])
def test_a_port_of_digits_int_refuses_is_the_usual_message(text: str) -> None:
    """str.isdigit() accepts '²', '①' and Arabic-Indic digits; int() does not."""
    with pytest.raises(ValueError, match=r"^expected HOST:PORT, got "):
        parse_hostport(text)


@pytest.mark.parametrize("text", ["\u00b2", "\u2460", "\u0664"])
def test_workers_of_digits_int_refuses_is_the_usual_message(text: str) -> None:
    with pytest.raises(ValueError, match=r"^expected a positive number or auto, got "):
        parse_workers(text)
