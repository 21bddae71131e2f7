"""Typed reading of ``Src`` trees: every wrong key, type or value becomes one ``FILE:LINE:`` problem.

Readers return a usable default after recording a problem, so one pass reports
every problem in a file instead of stopping at the first.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias, TypeVar

from proxy.units import parse_duration, parse_size
from proxy.yamlsrc import Problems, Src

T = TypeVar("T")

_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", float: "a number",
               list: "a list", dict: "a mapping"}  # fmt: skip


def type_name(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


# Section's readers are named after the types they read (str, int, bool, list), which
# shadows the builtins inside the class body: annotations there use these aliases.
Str: TypeAlias = str
Int: TypeAlias = int
Bool: TypeAlias = bool


class Section:
    """A mapping being read: tracks the keys read so unknown ones can be reported."""

    def __init__(self, src: Src, problems: Problems, path: Str, allowed: Iterable[Str]) -> None:
        self.src = src
        self.problems = problems
        self.path = path
        self.values: dict[Any, Src] = src.value if isinstance(src.value, dict) else {}
        allowed = list(allowed)
        for key in self.values:
            if key not in allowed:
                line = src.key_lines.get(key, src.line)
                hint = _suggest(str(key), allowed)
                self.problems.add((src.file, line), f"unknown key {self._name(key)!r}{hint}")

    def _name(self, key: Any) -> Str:
        return f"{self.path}.{key}" if self.path else str(key)

    def has(self, key: Str) -> Bool:
        return key in self.values

    def raw(self, key: Str) -> Src | None:
        return self.values.get(key)

    def line_of(self, key: Str) -> tuple[Str, int]:
        return (self.src.file, self.src.key_lines.get(key, self.src.line))

    def _bad(self, item: Src, key: Str, expected: Str) -> None:
        self.problems.add(item, f"{self._name(key)}: expected {expected}, got {type_name(item.value)}")

    def str(self, key: Str, default: Str) -> Str:
        item = self.values.get(key)
        if item is None or item.value is None:
            return default
        if not isinstance(item.value, str | Int) or isinstance(item.value, bool):
            self._bad(item, key, "a string")
            return default
        return str(item.value)

    def optional_str(self, key: Str) -> Str | None:
        item = self.values.get(key)
        if item is None or item.value is None:
            return None
        if not isinstance(item.value, str):
            self._bad(item, key, "a string")
            return None
        return item.value

    def bool(self, key: Str, default: Bool) -> Bool:
        item = self.values.get(key)
        if item is None or item.value is None:
            return default
        if not isinstance(item.value, bool):
            self._bad(item, key, "true or false")
            return default
        return item.value

    def int(self, key: Str, default: Int, minimum: Int | None = None) -> Int:
        item = self.values.get(key)
        if item is None or item.value is None:
            return default
        if not isinstance(item.value, int) or isinstance(item.value, bool):
            self._bad(item, key, "an integer")
            return default
        if minimum is not None and item.value < minimum:
            self.problems.add(item, f"{self._name(key)}: must be at least {minimum}, got {item.value}")
            return default
        return item.value

    def number(self, key: Str, default: float) -> float:
        item = self.values.get(key)
        if item is None or item.value is None:
            return default
        if not isinstance(item.value, int | float) or isinstance(item.value, bool):
            self._bad(item, key, "a number")
            return default
        return float(item.value)

    def duration(self, key: Str, default: float) -> float:
        return self._parsed(key, default, parse_duration)

    def optional_duration(self, key: Str) -> float | None:
        return self._parsed(key, None, parse_duration)

    def size(self, key: Str, default: Int) -> Int:
        return self._parsed(key, default, parse_size)

    def _parsed(self, key: Str, default: T, parse: Callable[[object], Any]) -> T:
        item = self.values.get(key)
        if item is None or item.value is None:
            return default
        try:
            return parse(item.value)  # type: ignore[no-any-return]
        except ValueError as exc:
            self.problems.add(item, f"{self._name(key)}: {exc}")
            return default

    def choice(self, key: Str, default: Str, choices: tuple[Str, ...]) -> Str:
        value = self.str(key, default)
        if value not in choices:
            item = self.values[key]
            self.problems.add(item, f"{self._name(key)}: must be one of {', '.join(choices)}, got {value!r}")
            return default
        return value

    def section(self, key: Str, allowed: Iterable[Str]) -> Section | None:
        item = self.values.get(key)
        if item is None or item.value is None:
            return None
        if not isinstance(item.value, dict):
            self._bad(item, key, "a mapping")
            return None
        return Section(item, self.problems, self._name(key), allowed)

    def list(self, key: Str) -> builtins.list[Src]:
        item = self.values.get(key)
        if item is None or item.value is None:
            return []
        if not isinstance(item.value, list):
            self._bad(item, key, "a list")
            return []
        return list(item.value)

    def str_list(self, key: Str) -> builtins.list[Str]:
        """A list of strings; a single string is accepted as a list of one."""
        item = self.values.get(key)
        if item is None or item.value is None:
            return []
        if isinstance(item.value, str):
            return [item.value]
        out: builtins.list[Str] = []
        for element in self.list(key):
            if isinstance(element.value, str | Int) and not isinstance(element.value, bool):
                out.append(str(element.value))
            else:
                self.problems.add(element, f"{self._name(key)}: expected strings in the list, "
                                           f"got {type_name(element.value)}")
        return out


def _suggest(key: str, allowed: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (allowed: {', '.join(allowed)})" if len(allowed) <= 12 else ""


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[v6]:PORT`` or ``:PORT``); ValueError when malformed.

    >>> parse_hostport("127.0.0.1:8080"), parse_hostport("[::1]:0"), parse_hostport(":80")
    (('127.0.0.1', 8080), ('::1', 0), ('0.0.0.0', 80))
    """
    text = str(text).strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host or "0.0.0.0", int(port)
