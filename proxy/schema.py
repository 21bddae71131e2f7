"""Typed reading of ``Src`` trees: every wrong key, type or value becomes one ``FILE:LINE:`` problem.

Readers return a usable default after recording a problem, so one pass reports
every problem in a file instead of stopping at the first.

Two ways to read a mapping: ``Section``, whose typed readers a hand-written reader calls
key by key (the rule compiler), and declared sections, where each key is a dataclass
field carrying its parser (``setting``, ``read_section``): the config file's settings
(``proxy.settings``), which ``reference`` also turns into docs/configuration.md.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import datetime
import ipaddress
import os
import re
import socket
import sys
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeAlias, TypeVar

from proxy.units import parse_duration, parse_size, yaml_number, yaml_scalar
from proxy.yamlsrc import Problems, Sources, Src

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
    if isinstance(value, bytes):
        return "binary data (!!binary)"
    if isinstance(value, datetime.datetime):
        return "a date and time"
    if isinstance(value, datetime.date):
        return "a date"
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
                # A key YAML read as no string (null, true, !!binary, a date) is shown in its words.
                word = key if isinstance(key, str) else yaml_scalar(key)
                hint = _suggest(str(word), allowed)
                name = self._name(word)
                shown = repr(name) if isinstance(key, str) else name
                self.problems.add((src.file, line), f"unknown key {shown}{hint}")

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
        if not isinstance(item.value, str | Int | float) or isinstance(item.value, bool):
            self._bad(item, key, "a string")
            return default
        return item.as_text()

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

    def _parsed(self, key: Str, default: T, parse: Callable[[object, Str | None], Any]) -> T:
        item = self.values.get(key)
        if item is None or item.value is None:
            return default
        try:
            return parse(item.value, item.raw)  # type: ignore[no-any-return]
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
            if isinstance(element.value, str | Int | float) and not isinstance(element.value, bool):
                out.append(element.as_text())
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


def url_bracket_problem(authority: str) -> str | None:
    """Why the host of a URL's authority (``[user@]host[:port]``), when in brackets, is no IPv6
    address a connect can take, or None. An IPvFuture literal (``[v1.fe]``, RFC 3986 §3.2.2) is
    none: yarl took ``[1:2:3]`` and a later step crashed (a traceback, not FILE:LINE), and
    ``[v1.fe]`` passed check and every request was a 502.

    >>> url_bracket_problem("[fe80::1%25eth0]:80"), url_bracket_problem("example.com:80")
    (None, None)
    >>> url_bracket_problem("[1:2:3]:9000")
    "the brackets hold no IPv6 address: '1:2:3' (an IPv6 address, [2001:db8::1], or a name without brackets)"
    """
    from urllib.parse import unquote

    host = authority.rpartition("@")[2]
    if not host.startswith("["):
        return None
    inside = host[1:].partition("]")[0]
    try:
        ipaddress.IPv6Address(unquote(inside))  # a zone percent-encoded: [fe80::1%25eth0]
    except ValueError:
        return (f"the brackets hold no IPv6 address: {inside!r} (an IPv6 address, [2001:db8::1], "
                "or a name without brackets)")
    return None


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[v6]:PORT`` or ``:PORT``); ValueError when malformed.

    >>> parse_hostport("127.0.0.1:8080"), parse_hostport("[::1]:0"), parse_hostport(":80")
    (('127.0.0.1', 8080), ('::1', 0), ('0.0.0.0', 80))
    """
    text = str(text).strip()
    bracketed = text.startswith("[")
    if bracketed:
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if bracketed and not sep:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if (":" in host and not bracketed) or "[" in host or "]" in host:
        # '::1' was read as host ':' and port 1, '::1:0' as [::1]:0: both passed check.
        raise ValueError(f"{text!r}: an IPv6 address is written in brackets, the port after them: "
                         "[::1]:8080")
    if not sep or not (port.isascii() and port.isdigit()):  # not '²'
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if int(port) > 65535:
        raise ValueError(f"{text!r}: port {int(port)} is out of range (a port is 0 to 65535; 0: one "
                         "the system chooses)")
    if bracketed:
        problem = _listen_v6_problem(host)
        if problem is not None:
            raise ValueError(f"{text!r}: {problem}")
    return host or "0.0.0.0", int(port)


def _listen_v6_problem(host: str) -> str | None:
    """Why ``host`` (written in brackets) is no IPv6 address a listener can bind, or None. Each
    passed check and failed at start ("cannot listen: [Errno -2] Name or service not known",
    naming no address): no IPv6 address, a zone on an address that takes none, an interface
    that is not there; an IPv4-mapped one, which a listener (IPv6 only) cannot bind (EINVAL).

    >>> [_listen_v6_problem(h) for h in ("::1", "::", "fe80::1%1")]
    [None, None, None]
    >>> _listen_v6_problem("::ffff:127.0.0.1")
    'an IPv4-mapped address is bound in its IPv4 form: 127.0.0.1:PORT'
    """
    address, percent, zone = host.partition("%")
    try:
        parsed = ipaddress.IPv6Address(address)
    except ValueError:
        return "the brackets hold no IPv6 address"
    if parsed.ipv4_mapped is not None:
        return f"an IPv4-mapped address is bound in its IPv4 form: {parsed.ipv4_mapped}:PORT"
    if not percent:
        if parsed.is_link_local:
            return (f"a link-local address is bound on one interface: name it, [{address}%eth0]:PORT "
                    "(or its number)")
        return None
    if not parsed.is_link_local:
        return "a zone (%...) applies to a link-local address (fe80::/10) only: remove it"
    if not zone.isdigit():
        try:
            socket.if_nametoindex(zone)
        except OSError:
            return (f"no network interface {zone!r} here (the zone is the interface's name as "
                    "'ip link' shows it, not percent-encoded, or its number)")
    return None


# -- settings declared once: dataclass fields that carry their own parser ------------------
#
# A section of the config file is a frozen dataclass whose fields are declared with
# ``setting()``: the field's name is the YAML key (``key=`` where an older name must stay),
# its default is the default, and a ``Parser`` in the field's metadata reads and checks the
# value (inferred from the field's type where the type says enough: bool, int, str,
# Literal, tuple[str, ...], a nested dataclass). ``read_section`` reads a mapping with these
# declarations and ``reference`` writes them as a Markdown table, so the allowed keys, the
# defaults, ``cachegate check``'s messages and the reference page come from one place.


class Invalid(ValueError):
    """A value refused: reported as ``FILE:LINE: <dotted key>: <message>`` at the value, and
    the setting keeps its default."""


class Reported(Exception):
    """The parser has recorded its problems itself; the setting keeps its default."""


@dataclass(frozen=True)
class Context:
    """What a parser knows besides the value: where problems go, the value's dotted name, the
    line of its key (a missing key is reported there), and the folder relative paths start in."""

    problems: Problems
    base_dir: Str
    name: Str = ""
    where: tuple[Str, Int] | None = None  # None: where the section itself starts
    sources: Sources = dataclasses.field(default_factory=Sources)  # how files it names are read

    def child(self, key: Str, where: tuple[Str, Int]) -> Context:
        return replace(self, name=f"{self.name}.{key}" if self.name else key, where=where)

    def entry(self, name: Str, item: Src) -> Context:
        """The context of a list entry (``listen[0]``, ``upstreams[]``): its own line."""
        return replace(self, name=name, where=(item.file, item.line))

    def problem(self, at: Src | tuple[Str, Int], message: Str) -> None:
        self.problems.add(at, f"{self.name}: {message}" if self.name else message)

    def path(self, text: Str) -> Str:
        """A path as written in the config: relative ones are relative to the config file.
        Invalid for one holding a NUL, which no file's name can (every path setting comes
        through here: the system calls on it raised ValueError, a traceback, not FILE:LINE)."""
        if "\x00" in text:
            raise Invalid(f"a path cannot contain a NUL character (\\x00), got {text!r}")
        unwritable = unencodable_path(text)
        if unwritable is not None:
            raise Invalid(unwritable)
        return text if os.path.isabs(text) else os.path.normpath(os.path.join(self.base_dir, text))


def show_path(text: Str) -> Str:
    """A path as a message shows it: as it is, or quoted (``'a\\nb.yaml'``) when it holds a
    character that would not show as itself (a newline broke the message's line in two)."""
    return text if text.isprintable() else repr(text)


def unencodable_path(text: Str) -> Str | None:
    """Why ``text`` cannot be handed to the system as a file name, or None: under an ASCII
    locale (``LC_ALL=POSIX``, no UTF-8 mode) the file system encoding cannot write ``è``, and
    every call on such a path (``realpath``, ``stat``, ``open``) raised UnicodeEncodeError, a
    traceback where the config's line was due."""
    encoding = sys.getfilesystemencoding()
    try:
        text.encode(encoding, "surrogateescape")
    except UnicodeEncodeError as exc:
        return (f"{text!r} cannot be a file name here: the file system encoding is {encoding} (from the "
                f"locale), which cannot write {exc.object[exc.start]!r}; run with a UTF-8 locale "
                "(LC_ALL=C.UTF-8) or PYTHONUTF8=1, or give the path in ASCII")
    return None


@dataclass(frozen=True)
class Parser(Generic[T]):
    """How one setting is read, and how the reference describes it.

    ``read`` gets a value that is not null; it returns the setting's value, raises
    ``Invalid``, or records problems itself and raises ``Reported``. ``on_null``: what an
    explicit null means (None: the default). ``resolve``: applied to the default when the key
    is absent (a relative default path becomes absolute). ``show``: the default as a config
    file would write it. ``sections``: the dataclasses it reads, documented after the table
    that names them."""

    kind: Str
    read: Callable[[Src, Context], T]
    on_null: Callable[[Context], T] | None = None
    resolve: Callable[[T, Context], T] | None = None
    show: Callable[[T], Str] | None = None
    sections: tuple[type, ...] = ()
    entries: Bool = False  # its sections are list entries (documented as ``key[]``)


@dataclass(frozen=True)
class _Declared:
    doc: Str
    parser: Parser[Any] | None
    key: Str | None
    missing: Str


_META = "cachegate.setting"
_INTERNAL = "cachegate.internal"


def setting(default: Any = dataclasses.MISSING, doc: Str = "", parse: Parser[Any] | None = None, *,
            key: Str | None = None, factory: Callable[[], Any] | None = None, missing: Str = "") -> Any:
    """A dataclass field that is one key of the config file. Without ``default`` (or
    ``factory``) the key is required; ``missing`` is added to the "is required" message."""
    meta = {_META: _Declared(doc, parse, key, missing)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def internal(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None) -> Any:
    """A field of a settings dataclass that the program fills, not the config file."""
    meta = {_INTERNAL: True}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Field:
    """One declared setting of a section, with its parser worked out."""

    name: Str  # the dataclass field
    key: Str  # the YAML key
    parser: Parser[Any]
    doc: Str
    default: Any  # dataclasses.MISSING: required
    missing: Str

    @property
    def required(self) -> Bool:
        return self.default is dataclasses.MISSING


_FIELDS: dict[type, tuple[Field, ...]] = {}


def fields_of(cls: type) -> tuple[Field, ...]:
    """The settings of a section dataclass; TypeError for a field declared neither with
    ``setting()`` nor ``internal()`` (so no field is silently left out of the file)."""
    known = _FIELDS.get(cls)
    if known is None:
        known = _FIELDS[cls] = _declared_fields(cls)
    return known


def _declared_fields(cls: type) -> tuple[Field, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        declared = f.metadata.get(_META)
        if declared is None:
            if f.metadata.get(_INTERNAL):
                continue
            raise TypeError(f"{cls.__name__}.{f.name}: declare it with setting() (a key of the "
                            "config file) or internal()")
        if not declared.doc:
            raise TypeError(f"{cls.__name__}.{f.name}: a setting needs its one-line doc")
        default: Any = f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        out.append(Field(f.name, declared.key or f.name, declared.parser or parser_for(hints[f.name]),
                         declared.doc, default, declared.missing))
    return tuple(out)


def parser_for(tp: Any) -> Parser[Any]:
    """The parser a field's type implies: bool, int, str, a Literal (one of its values),
    tuple[str, ...] (a list, or one string), a dataclass (a nested section), or one of these
    or None (null gives None; an optional string must be a string)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = (a for a in args if a is not type(None))
        base = text(strict=True) if inner is str else parser_for(inner)
        return replace(base, on_null=lambda ctx: None)
    if tp is bool:
        return flag()
    if tp is int:
        return integer()
    if tp is str:
        return text()
    if origin is typing.Literal:
        return choice(*args)
    if origin is tuple and args == (str, ...):
        return strings()
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return section(tp)
    raise TypeError(f"no parser for {tp!r}: give setting(..., parse=...)")


def read_section(cls: type[T], src: Src, ctx: Context, **fixed: Any) -> T:
    """Read the mapping ``src`` into the section dataclass ``cls`` (``fixed``: values of its
    ``internal()`` fields): unknown keys (with a "did you mean"), wrong values and missing
    required keys all recorded; a wrong value keeps its default. Reported when a required key
    is missing or wrong."""
    declared = fields_of(cls)
    sec = Section(src, ctx.problems, ctx.name, [f.key for f in declared])
    values: dict[Str, Any] = dict(fixed)
    complete = True
    for f in declared:
        item = sec.raw(f.key)
        sub = ctx.child(f.key, sec.line_of(f.key))
        if item is not None and item.refused:  # its problem said where it is written, once
            if f.required:
                complete = False
            else:
                values[f.name] = default_of(f, sub)
            continue
        if item is None or (item.value is None and (f.required or f.parser.on_null is None)):
            if f.required:
                sub.problems.add(ctx.where or (src.file, src.line), f"{sub.name}: required{f.missing}")
                complete = False
            else:
                values[f.name] = default_of(f, sub)
            continue
        try:
            if item.value is None:
                assert f.parser.on_null is not None
                values[f.name] = f.parser.on_null(sub)
            else:
                values[f.name] = f.parser.read(item, sub)
        except Invalid as exc:
            sub.problem(item, str(exc))
        except Reported:
            pass
        else:
            continue
        if f.required:
            complete = False
        else:
            values[f.name] = default_of(f, sub)
    if not complete:
        raise Reported
    return cls(**values)


def default_of(f: Field, ctx: Context) -> Any:
    return f.parser.resolve(f.default, ctx) if f.parser.resolve is not None else f.default


def _resolve_section(value: Any, ctx: Context) -> Any:
    """A section's default, with each of its settings' defaults resolved (relative paths)."""
    if value is None:
        return None
    changes = {f.name: f.parser.resolve(getattr(value, f.name), ctx.child(f.key, ctx.where or ("", 0)))
               for f in fields_of(type(value)) if f.parser.resolve is not None}
    return replace(value, **changes) if changes else value


# -- parsers -------------------------------------------------------------------------------


def section(cls: type[T], *, check: Callable[[T, Context], T] | None = None,
            expected: Str = "a mapping", null: Callable[[Context], Any] | None = None) -> Parser[T]:
    """A nested section; ``check`` sees the whole section once read (and may raise Invalid);
    ``null``: what an explicit null means (None: the default)."""
    def read(item: Src, ctx: Context) -> T:
        if not isinstance(item.value, dict):
            raise Invalid(f"expected {expected}, got {type_name(item.value)}")
        value = read_section(cls, item, ctx)
        return check(value, ctx) if check is not None else value

    return Parser("mapping", read, on_null=null, resolve=_resolve_section,
                  show=lambda v: "none" if v is None else "", sections=(cls,))


def flag() -> Parser[Bool]:
    def read(item: Src, ctx: Context) -> Bool:
        if not isinstance(item.value, bool):
            raise Invalid(f"expected true or false, got {type_name(item.value)}")
        return item.value

    return Parser("true/false", read)


def integer(minimum: Int | None = None, maximum: Int | None = None, why: Str = "") -> Parser[Int]:
    """An integer; ``why`` says what is wrong past ``maximum`` (after "must be at most ...")."""
    def read(item: Src, ctx: Context) -> Int:
        value = item.value
        if not isinstance(value, int) or isinstance(value, bool):
            raise Invalid(f"expected an integer, got {type_name(value)}")
        try:
            yaml_number(value, item.raw, str(value))
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        if minimum is not None and value < minimum:
            raise Invalid(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise Invalid(f"must be at most {maximum}{why}, got {value}")
        return value

    kind = "integer" if minimum is None else f"integer ≥ {minimum}"
    if maximum is not None:
        kind += f", at most {maximum}"
    return Parser(kind, read)


def _text(item: Src, strict: Bool) -> Str:
    value = item.value
    if isinstance(value, str):
        return value
    if strict or not isinstance(value, int | float) or isinstance(value, bool):
        raise Invalid(f"expected a string, got {type_name(value)}")
    return item.as_text()


def text(*, strict: Bool = False, check: Callable[[Str], Any] | None = None,
         kind: Str = "text") -> Parser[Any]:
    """A string (a number is taken as its text unless ``strict``); ``check`` may normalise it
    or raise Invalid."""
    def read(item: Src, ctx: Context) -> Any:
        value = _text(item, strict)
        return check(value) if check is not None else value

    return Parser(kind, read)


def choice(*options: Str) -> Parser[Any]:
    def read(item: Src, ctx: Context) -> Str:
        value = _text(item, strict=False)
        if value not in options:
            raise Invalid(f"must be one of {', '.join(options)}, got {value!r}")
        return value

    return Parser(" or ".join(options), read)


def strings() -> Parser[tuple[Str, ...]]:
    """A list of strings; one string is a list of one, null an empty list."""
    def read(item: Src, ctx: Context) -> tuple[Str, ...]:
        out = []
        for element in elements(item):
            if isinstance(element.value, str | int | float) and not isinstance(element.value, bool):
                out.append(element.as_text())
            else:
                ctx.problem(element, f"expected strings in the list, got {type_name(element.value)}")
        return tuple(out)

    return Parser("list of strings", read, on_null=lambda ctx: (), show=_show_list)


def elements(item: Src) -> builtins.list[Src]:
    """A list's elements; a single string is a list of one."""
    if isinstance(item.value, str):
        return [item]
    if not isinstance(item.value, list):
        raise Invalid(f"expected a list, got {type_name(item.value)}")
    return builtins.list(item.value)


def byte_size(*, minimum: Int | None = None, why: Str = "", null: Str = "") -> Parser[Any]:
    """A size; ``null``: what an explicit null means (None: no limit), when it is allowed."""
    def read(item: Src, ctx: Context) -> Int:
        try:
            value = parse_size(item.value, item.raw)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        if minimum is not None and value < minimum:
            raise Invalid(f"must be at least {show_size(minimum)}{why}, got {value} bytes")
        return value

    kind = "size (512KB, 256MB, 10GB)" if minimum is None else f"size ≥ {show_size(minimum)}"
    if null:
        return Parser(f"{kind}, or null ({null})", read, on_null=lambda ctx: None,
                      show=lambda v: "null" if v is None else show_size(v))
    return Parser(kind, read, show=show_size)


def duration(*, positive: Bool = False, minimum: float | None = None, maximum: float | None = None,
             why: Str = "", zero: Str = "") -> Parser[float]:
    """A duration; ``minimum``: a floor below which the setting breaks serving (``why`` says
    how, after "must be at least ..."); ``zero``: what 0 means, when 0 is allowed below it."""
    def read(item: Src, ctx: Context) -> float:
        try:
            value = parse_duration(item.value, item.raw)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        if positive and value <= 0:
            raise Invalid("must be more than 0")
        if minimum is not None and value < minimum and not (zero and value == 0):
            floor = f"{f'0 ({zero}) or ' if zero else ''}at least {show_duration(minimum)}"
            raise Invalid(f"must be {floor}{why}, got {show_duration(value)}")
        if maximum is not None and value > maximum:
            raise Invalid(f"must be at most {show_duration(maximum)}")
        return value

    if minimum is not None:
        kind = f"duration (30s, 5m, 1h, 1d) ≥ {show_duration(minimum)}" + (f", or 0 ({zero})" if zero else "")
    else:
        kind = "duration (30s, 5m, 1h, 1d)" + (" > 0" if positive else "")
    if maximum is not None:
        kind += f", at most {show_duration(maximum)}"
    return Parser(kind, read, show=show_duration)


def hostport(*, off: Bool = False) -> Parser[Any]:
    """``HOST:PORT``; with ``off``, null or false turns the listener off (None)."""
    def read(item: Src, ctx: Context) -> tuple[Str, Int] | None:
        if off and item.value is False:
            return None
        if isinstance(item.value, list | dict):  # (its text would be the reader's records)
            raise Invalid(f"expected HOST:PORT, got {type_name(item.value)}")
        try:
            return parse_hostport(item.as_text())
        except ValueError as exc:
            raise Invalid(str(exc)) from None

    kind = "HOST:PORT, or null (off)" if off else "HOST:PORT"
    return Parser(kind, read, on_null=(lambda ctx: None) if off else None,
                  show=lambda v: "null" if v is None else show_hostport(v))


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")  # IPv4-mapped IPv6 addresses (RFC 4291 §2.5.5.2)


def unmapped(network: Any) -> Any:
    """An IPv4-mapped IPv6 network (``::ffff:127.0.0.0/104``, ``::ffff:10.0.0.1``) as the IPv4
    network it maps (``127.0.0.0/8``, ``10.0.0.1/32``); any other network as it is.

    >>> [str(unmapped(ipaddress.ip_network(n))) for n in ("::ffff:127.0.0.0/104", "::ffff:10.0.0.1",
    ...                                                     "::ffff:0:0/96", "::/0", "10.0.0.0/8")]
    ['127.0.0.0/8', '10.0.0.1/32', '0.0.0.0/0', '::/0', '10.0.0.0/8']
    """
    if not isinstance(network, ipaddress.IPv6Network) or not network.subnet_of(_MAPPED):
        return network
    return ipaddress.IPv4Network((int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96))


def _mapped_host(text: Str) -> Any:
    """The IPv4 address an IPv4-mapped IPv6 address maps (None: it is not one)."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None


def networks(wide: Callable[[Any], Str | None] | None = None) -> Parser[tuple[Any, ...]]:
    """IP addresses and CIDR networks: a list, or one. ``wide`` says why a network is a risk
    worth a warning at its line (None: nothing to say); it is kept either way.

    An IPv4-mapped entry (``::ffff:127.0.0.1``, as dual-stack software logs an IPv4 peer) is
    taken as the IPv4 network it maps, with a warning saying so: each listener serves one
    family (a ``[::]`` one IPv6 alone), so an IPv4 client's address is always seen as IPv4, and
    the entry as written never matched anyone."""
    def read(item: Src, ctx: Context) -> tuple[Any, ...]:
        out = []
        for element in elements(item):
            if isinstance(element.value, list | dict):
                ctx.problem(element, f"expected IP addresses or CIDR networks in the list, "
                                     f"got {type_name(element.value)}")
                continue
            text = str(element.value)
            try:
                network = ipaddress.ip_network(text, strict=True)
            except ValueError:
                try:  # host bits set: which network was meant is a guess (trust is at stake)
                    meant = ipaddress.ip_network(text, strict=False)
                except ValueError:
                    ctx.problem(element, f"{element.value!r} is not an IP address or CIDR network")
                    continue
                host: Any = text.split("/", 1)[0].strip()
                mapped = _mapped_host(host)
                if mapped is not None and unmapped(meant) is not meant:  # the forms that can match
                    host, meant = mapped, unmapped(meant)
                ctx.problem(element, f"{text} has host bits set: write {host}/{meant.max_prefixlen} "
                                     f"for the host or {meant} for the network")
                continue
            four = unmapped(network)
            if four is not network:
                shown = four.network_address if four.prefixlen == four.max_prefixlen else four
                said = (f"{text.strip()} is written IPv4-mapped (::ffff:...), a form no peer's address "
                        "takes here (an IPv4 client is seen as its IPv4 address): taken as "
                        f"{shown}; write {shown}")
                ctx.problems.warn(element, f"{ctx.name}: {said}" if ctx.name else said)
                network = four
            out.append(network)
            why = wide(network) if wide is not None else None
            if why is not None:
                ctx.problems.warn(element, f"{ctx.name}: {network} {why}" if ctx.name else f"{network} {why}")
        return tuple(out)

    return Parser("list of IP addresses or CIDR networks (10.0.0.0/8: with host bits set, as 10.0.0.1/8, "
                  "an error; IPv4-mapped, as ::ffff:10.0.0.0/104, taken as the IPv4 network, "
                  "10.0.0.0/8, with a warning)", read, show=_show_list)


def file_path(*, must_exist: Bool = False, strict: Bool = False, folder: Bool = False) -> Parser[Str]:
    """A file or folder; relative to the config file (the default too). ``folder``: one that
    exists must be a directory (a file there passed the check, then the start failed)."""
    def read(item: Src, ctx: Context) -> Str:
        resolved = ctx.path(_text(item, strict))
        if must_exist and not os.path.isfile(resolved):
            raise Invalid(f"{resolved} does not exist")
        if folder and os.path.exists(resolved) and not os.path.isdir(resolved):
            what = "a file" if os.path.isfile(resolved) else "not a file nor a directory"
            raise Invalid(f"{resolved} is {what}: give a directory (made if it does not exist)")
        if folder and not os.path.exists(resolved):
            # Made at the start: under a file it cannot be ("Not a directory" once check passed).
            parent = _nearest_existing(resolved)
            if not os.path.isdir(parent):
                what = "a file" if os.path.isfile(parent) else "not a directory"
                raise Invalid(f"{resolved} cannot be made: {parent} is {what}; give a directory "
                              "elsewhere")
        why = _unmakeable(resolved) if folder else None
        if why is not None:
            raise Invalid(f"{why}; give a directory the user cachegate runs as can make and write "
                          "(or make this one so)")
        return resolved

    return Parser("path", read, resolve=lambda v, ctx: None if v is None else ctx.path(v))


def _unmakeable(path: Str) -> Str | None:
    """Why this user cannot make the folder ``path`` or write in it (None: it can), tried as the
    start makes it: a folder under one it may not write (/var/lib/x for nobody), in /proc or
    /sys passed the check, then the start failed ("Permission denied") without the config's
    line. The first missing folder is made and removed again; one that exists is asked."""
    if os.path.isdir(path):
        return None if os.access(path, os.W_OK | os.X_OK) else f"{path} cannot be written"
    first = path
    while not os.path.lexists(os.path.dirname(first)) and os.path.dirname(first) != first:
        first = os.path.dirname(first)
    try:
        os.mkdir(first, 0o700)
    except FileExistsError:  # made meanwhile (another start): the start will see
        return None
    except OSError as exc:
        return f"{path} cannot be made: {exc.strerror or exc} (making {first})"
    with contextlib.suppress(OSError):
        os.rmdir(first)
    return None


def _nearest_existing(path: Str) -> Str:
    """``path``'s nearest ancestor that exists (a dangling link counts: it is there)."""
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


# -- how the reference writes values -------------------------------------------------------


def show_size(n: Int) -> Str:
    """A size as the reference writes it: in the largest unit it is a whole number of.

    >>> show_size(10 << 30), show_size(1536), show_size(100)
    ('10GB', '1536', '100')
    """
    for unit, mult in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def show_duration(seconds: float | None) -> Str:
    """A duration as the reference writes it: in the largest unit it is a whole number of.

    >>> show_duration(60.0), show_duration(5.0), show_duration(None), show_duration(0.5)
    ('1m', '5s', 'none', '0.5s')
    """
    if seconds is None:
        return "none"
    for unit, mult in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % mult == 0:
            return f"{int(seconds // mult)}{unit}"
    return f"{seconds:g}s"


def show_hostport(address: tuple[Str, Int]) -> Str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _show_list(values: tuple[Any, ...]) -> Str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def show_value(f: Field) -> Str:
    """A field's default as a config file would write it."""
    if f.required:
        return "required"
    value = f.default
    if f.parser.show is not None:
        shown = f.parser.show(value)
    elif value is None:
        return "none"
    elif isinstance(value, bool):
        shown = "true" if value else "false"
    elif isinstance(value, tuple):
        shown = _show_list(value)
    else:
        shown = str(value) if value != "" else '""'
    return f"`{shown}`" if shown and shown != "none" else shown or "see below"


def reference(root: type, top: Str = "Top level") -> Str:
    """Markdown tables of every setting under the section ``root``: one table per section
    (its dotted name as the heading, the first paragraph of its docstring below), each key's
    type, default and one-line meaning."""
    out: builtins.list[Str] = []
    seen: set[type] = set()

    def heading(name: Str) -> Str:
        return f"`{name}`" if name else top

    def anchor(name: Str) -> Str:
        return re.sub(r"[^a-z0-9_ -]", "", heading(name).lower()).replace(" ", "-")

    def walk(cls: type, name: Str) -> None:
        if cls in seen:
            return
        seen.add(cls)
        out.append(f"## {heading(name)}\n")
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        if doc and not doc.startswith(f"{cls.__name__}("):
            out.append(" ".join(line.strip() for line in doc.splitlines()).replace("``", "`") + "\n")
        out.append("| key | type | default | meaning |\n|---|---|---|---|")
        nested: builtins.list[tuple[type, Str]] = []
        for f in fields_of(cls):
            kind = f.parser.kind
            for sub in f.parser.sections:
                sub_name = (f"{name}.{f.key}" if name else f.key) + ("[]" if f.parser.entries else "")
                if sub is not cls and sub not in seen:
                    nested.append((sub, sub_name))
                kind += f", see [{heading(sub_name)}](#{anchor(sub_name)})"
            cells = (f"`{f.key}`", kind, show_value(f), f.doc)
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
        for sub, sub_name in nested:
            walk(sub, sub_name)

    walk(root, "")
    return "\n".join(out)
