"""Cache-Control parsing (RFC 9111 §5.2) and targeted cache-control fields (RFC 9213, Surrogate-Control).

Parsing never raises. Directive names are case-insensitive; unknown directives
are kept (extensions are ignored by the decisions, never fatal); commas inside
quoted strings do not split directives (``ext="max-age=1, x"`` is one directive).

Decisions on malformed input follow RFC 9111 §4.2.1: the first occurrence of a
duplicated directive is used, and a delta-seconds value that is not one (``a1``,
``1.5``, ``-1``) reads as 0, so the response is treated as stale rather than
fresh. Values above 2**31 are capped there (RFC 9111 §1.2.2).

>>> cc = parse_cache_control(['max-age=60, ext="a, max-age=9", No-Cache="Set-Cookie"'])
>>> cc.delta("max-age"), cc.field_names("no-cache"), "ext" in cc
(60, ('set-cookie',), True)
>>> parse_cache_control(["max-age=abc"]).delta("max-age")
0

Surrogate-Control (W3C Edge Architecture 1.0) predates RFC 9213 and is still what
many origins send to their CDN: directives apply to every surrogate unless a
``;device`` suffix targets one. cachegate announces itself upstream as
``Surrogate-Capability: cachegate="Surrogate/1.0"`` and obeys directives that are
untargeted or targeted at ``cachegate`` (targeted ones win).

>>> parse_surrogate_control(["max-age=60;other, max-age=30+600;cachegate, no-store;other"]).directives
mappingproxy({'max-age': '30', 'stale-if-error': '600'})
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

DELTA_SECONDS_MAX = 2**31
SURROGATE_DEVICE = "cachegate"  # our device token in Surrogate-Capability / Surrogate-Control
SURROGATE_CAPABILITY = f'{SURROGATE_DEVICE}="Surrogate/1.0"'

_EMPTY: Mapping[str, str | None] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class CacheControl:
    """Parsed directives: lower-cased name -> argument (``None`` when it has none)."""

    directives: Mapping[str, str | None] = field(default_factory=lambda: _EMPTY)

    def __contains__(self, name: object) -> bool:
        return name in self.directives

    def __bool__(self) -> bool:
        return bool(self.directives)

    def get(self, name: str) -> str | None:
        return self.directives.get(name)

    def delta(self, name: str) -> int | None:
        """The delta-seconds argument of ``name``; None when absent; 0 when malformed."""
        if name not in self.directives:
            return None
        return parse_delta_seconds(self.directives[name])

    def field_names(self, name: str) -> tuple[str, ...]:
        """Field names qualifying ``no-cache="a, b"`` or ``private="a"`` (lower-cased)."""
        arg = self.directives.get(name)
        if not arg:
            return ()
        return tuple(n.strip().lower() for n in arg.split(",") if n.strip())


EMPTY_CACHE_CONTROL = CacheControl()


def parse_delta_seconds(arg: str | None) -> int:
    if arg is None or not arg.isdigit() or not arg.isascii():
        return 0
    # Strip leading zeros before int() so a huge literal can't cost quadratic time.
    digits = arg.lstrip("0") or "0"
    if len(digits) > 10:
        return DELTA_SECONDS_MAX
    return min(int(digits), DELTA_SECONDS_MAX)


def split_directives(value: str) -> list[str]:
    """Split a comma-separated field value, leaving commas inside quoted strings alone."""
    parts: list[str] = []
    buf: list[str] = []
    in_quotes = escaped = False
    for ch in value:
        if escaped:
            buf.append(ch)
            escaped = False
        elif in_quotes and ch == "\\":
            buf.append(ch)
            escaped = True
        elif ch == '"':
            buf.append(ch)
            in_quotes = not in_quotes
        elif ch == "," and not in_quotes:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf))
    return [p.strip() for p in parts if p.strip()]


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        out: list[str] = []
        escaped = False
        for ch in value[1:-1]:
            if escaped:
                out.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            else:
                out.append(ch)
        return "".join(out)
    return value


def parse_cache_control(values: Iterable[str]) -> CacheControl:
    """Parse every field line of a Cache-Control-like field into one CacheControl."""
    directives: dict[str, str | None] = {}
    for line in values:
        for part in split_directives(line):
            name, eq, arg = part.partition("=")
            if not name or name != name.strip() or " " in name or "\t" in name:
                # "max-age =60" is not a max-age directive (no whitespace around "=").
                name = name.strip().lower()
                if name and name not in directives:
                    directives[f"{name} "] = None  # keep as an unknown extension
                continue
            name = name.lower()
            if name in directives:
                continue  # RFC 9111 §4.2.1: use the first occurrence
            if not eq:
                directives[name] = None
            elif arg != arg.lstrip():
                directives[name] = "\x00invalid"  # "max-age= 60": a malformed argument
            else:
                directives[name] = _unquote(arg)
    return CacheControl(MappingProxyType(directives)) if directives else EMPTY_CACHE_CONTROL


def targeted_cache_control(
    targets: Iterable[str], get_all: Callable[[str], Sequence[str]]
) -> tuple[CacheControl, str] | None:
    """The first targeted field (RFC 9213) present and valid, with its name; else None.

    RFC 9213 fields are Structured Field Dictionaries; a field that fails to parse
    is ignored, and the cache falls back to the next target, then Cache-Control.
    """
    for name in targets:
        values = get_all(name)
        if not values:
            continue
        parsed = _parse_sf_dictionary(values)
        if parsed is not None:
            return parsed, name
    return None


def _parse_sf_dictionary(values: Sequence[str]) -> CacheControl | None:
    """Parse the subset of RFC 8941 dictionaries that cache directives use.

    Members are ``key`` (true), ``key=integer``, ``key=token`` or ``key="string"``;
    parameters are ignored. Anything else makes the whole field invalid.
    """
    directives: dict[str, str | None] = {}
    for part in split_directives(", ".join(values)):
        member = part.split(";", 1)[0].strip()
        key, eq, arg = member.partition("=")
        if not key or key != key.lower() or not all(c.isalnum() or c in "_-.*" for c in key):
            return None
        if not eq:
            directives[key] = None
            continue
        if arg.startswith('"'):
            if not arg.endswith('"') or len(arg) < 2:
                return None
            directives[key] = _unquote(arg)
        elif arg.lstrip("-").isdigit():
            if arg.startswith("-"):
                directives[key] = "\x00invalid"
            else:
                directives[key] = arg
        elif arg in ("?1", "?0"):
            if arg == "?1":
                directives[key] = None
        elif arg and (arg[0].isalpha() or arg[0] == "*"):
            directives[key] = arg
        else:
            return None
    return CacheControl(MappingProxyType(directives))


def _partition_outside_quotes(text: str, sep: str) -> tuple[str, str, str]:
    in_quotes = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif in_quotes and ch == "\\":
            escaped = True
        elif ch == '"':
            in_quotes = not in_quotes
        elif ch == sep and not in_quotes:
            return text[:i], sep, text[i + 1:]
    return text, "", ""


def parse_surrogate_control(values: Sequence[str], device: str = SURROGATE_DEVICE) -> CacheControl | None:
    """The Surrogate-Control directives that apply to ``device``; None when none do.

    ``max-age=A+B`` means A seconds fresh, then B more seconds usable when the
    origin cannot be reached: it reads as ``max-age=A, stale-if-error=B``.
    """
    general: dict[str, str | None] = {}
    targeted: dict[str, str | None] = {}
    for part in split_directives(", ".join(values)):
        directive, semi, target = _partition_outside_quotes(part, ";")
        if semi and target.strip().lower() != device:
            continue
        bucket = targeted if semi else general
        for name, arg in parse_cache_control([directive]).directives.items():
            bucket.setdefault(name, arg)
    merged = {**general, **targeted}
    if not merged:
        return None
    max_age = merged.get("max-age")
    if max_age is not None and "+" in max_age:
        fresh, _, extra = max_age.partition("+")
        merged["max-age"] = fresh
        merged.setdefault("stale-if-error", extra)
    return CacheControl(MappingProxyType(merged))
