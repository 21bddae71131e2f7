"""Parse the human units of config files: durations (``30s``, ``5m``) and sizes (``256MB``).

>>> parse_duration("1h30m")
5400.0
>>> parse_duration(45)
45.0
>>> parse_size("1.5KB")
1536
>>> parse_size("10GB")
10737418240
"""

from __future__ import annotations

import base64
import datetime
import math
import re
from decimal import Decimal

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
# [0-9], not \d: \d (and float, Decimal) take any script's digits ("１６MB", "٣s"), which
# ``workers`` and the status codes of rules refuse.
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)\s*")  # 10s, 10 s, 1h 30m
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib|k|m|g|t)?", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}  # fmt: skip
MAX_DURATION = float(1 << 31)  # about 68 years: the cap RFC 9111 (1.2.2) puts on delta-seconds
MAX_SIZE = 1 << 50  # 1024TB (a pebibyte): beyond any disk or memory one cache node has


def yaml_number(value: object, written: str | None, example: str) -> None:
    """ValueError for a number YAML (1.1) read from a form that does not mean what it looks
    like: ``1:30`` is 90 (base 60), ``010`` is 8 (octal). ``written``: the scalar as written,
    when YAML read it as a number; ``example``: the value written as meant."""
    if written is None:
        return
    digits = written.strip().lstrip("+-")
    if ":" in digits:
        raise ValueError(f"{written} reads as the number {value} in YAML (base 60, as in 1:30 = 90); "
                         f"write {example}")
    if re.fullmatch(r"0[0-7_]+", digits) and value:
        raise ValueError(f"{written} reads as the number {value} in YAML (octal, from its leading 0); "
                         "write it without the leading 0")


def shown(value: object) -> str:
    """A config value as an error message shows it after "got": a scalar as YAML read it
    (``'5 mins'``, ``-3``), a list or a mapping by its kind (``a list``, ``a mapping``, the words
    of ``proxy.schema.type_name``): their elements are the reader's records (``Src``: a file,
    a line, the value as written), which read as Python's internals, not as the config. A
    scalar of hundreds of characters (a 400-digit number) is cut to its first ones."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return _short(value)


def parse_duration(value: object, written: str | None = None) -> float:
    """Seconds from a number or a string like ``30s``, ``5m``, ``1h30m``, ``7d``; ValueError otherwise.
    ``written``: the YAML scalar as written when YAML read it as a number (``yaml_number``).

    >>> parse_duration("10 s"), parse_duration("1h 30m"), parse_duration("500ms"), parse_duration("1w")
    (10.0, 5400.0, 0.5, 604800.0)
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30s, 5m, 1h, got {shown(value)}")
    if isinstance(value, int | float):
        yaml_number(value, written, "1m30s")
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value!r}")
        if isinstance(value, int) and value > MAX_DURATION:  # (float() of a 310-digit int overflows)
            return _duration_cap(math.inf, value)
        return _duration_cap(float(value), value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration like 30s, 5m, 1h, got {shown(value)}")
    text = value.strip().lower()
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
        return _duration_cap(float(text), value)
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        # (ms and w too)
        raise ValueError(f"bad duration {value!r}: use seconds or 30s, 5m, 1h, 1d{_ascii(text)}")
    return _duration_cap(total, value)


def _duration_cap(seconds: float, value: object) -> float:
    """``seconds`` unless infinite, not a number (.inf, .nan) or above MAX_DURATION (a number
    too big for a float, written as digits, is too long: ``math.inf`` here)."""
    if math.isnan(seconds) or (math.isinf(seconds) and isinstance(value, float)):
        raise ValueError(f"duration must be a finite number of seconds, got {value!r}")
    if seconds > MAX_DURATION:
        raise ValueError(f"duration {_short(value)} is too long: at most {int(MAX_DURATION)}s "
                         "(about 68 years)")
    return seconds


def _ascii(text: str) -> str:
    """A hint for a number written in another script's digits (``１６``, ``٣``)."""
    return " (in the digits 0-9)" if any(c.isdigit() and not c.isascii() for c in text) else ""


def yaml_scalar(value: object) -> str:
    """A scalar as YAML writes it, for messages: ``null``, ``true``, ``!!binary aGk=``, the date
    ``2024-01-01``; a string or a number as Python's ``repr`` (a string quoted). Python's own
    words (``None``, ``True``, ``b'hi'``, ``datetime.date(...)``) name nothing in a YAML file.

    >>> [yaml_scalar(v) for v in (None, True, b"hi", datetime.date(2024, 1, 1), "x", 5)]
    ['null', 'true', '!!binary aGk=', '2024-01-01', "'x'", '5']
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return "!!binary " + base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime.date):  # (a datetime too)
        return value.isoformat(sep=" ") if isinstance(value, datetime.datetime) else value.isoformat()
    return repr(value)


def _short(value: object) -> str:
    """``value`` as a message shows it (``yaml_scalar``), a huge number cut to its first digits
    and its length."""
    text = yaml_scalar(value)
    return text if len(text) <= 60 else f"{text[:20]}... ({len(text)} characters)"


def parse_size(value: object, written: str | None = None) -> int:
    """Bytes from a number or a string like ``512KB``, ``256MB``, ``10GB`` (binary multiples).
    ``written`` as for ``parse_duration``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 256MB, got {shown(value)}")
    if isinstance(value, int):
        yaml_number(value, written, "the bytes, or a size such as 64KB")
        if value < 0:
            raise ValueError(f"size must not be negative, got {value!r}")
        return _size_cap(value, value)
    if not isinstance(value, str):
        raise ValueError(f"expected a size like 256MB, got {shown(value)}")
    m = _SIZE.fullmatch(value.strip())
    if not m:
        raise ValueError(f"bad size {value!r}: use bytes or KB, MB, GB{_ascii(value)}")
    unit = m.group(2).lower() if m.group(2) else None
    return _size_cap(int(Decimal(m.group(1)) * _SIZE_UNITS[unit]), value)  # exact: no float overflow


def _size_cap(size: int, value: object) -> int:
    if size > MAX_SIZE:
        raise ValueError(f"size {_short(value)} is too large: at most 1024TB")
    return size
