"""What cachegate's commands print of text they did not write: an admin API's answers and
errors (``cachegate purge``, ``top``, ``health``), and origins' reasons and the URLs of
sitemaps and logs (``cachegate warm``, ``top``'s screen).

Such text could carry what a terminal acts on rather than shows: C0 and C1 controls (ESC,
BEL, U+009B, which start sequences that set the window title, clear the screen or recolour
it), DEL, bidi overrides and isolates (U+202A-U+202E, U+2066-U+2069) that reorder what follows.
Those characters, and only those, go through ``shown``, the one sanitiser: written as an escape
(``\\x1b``, ``\\u202e``), newline and tab kept. A backslash, which such an escape starts with, is
written ``\\\\``: the four characters ``\\x1b`` as a server or a client sent them are then shown as
``\\\\x1b``, not as an ESC would be. Everything else is text and stays as it is: a no-break
space, a zero-width joiner inside an emoji sequence, a soft hyphen, a left-to-right mark, a
character newer than Python's Unicode database. ``same_width`` is the same set of
characters (newline and tab too) for a screen laid out in columns (``cachegate top``): each
replaced by U+FFFD, one for one, so the columns stay where they are.
"""

from __future__ import annotations

import re

REPLACEMENT = "\ufffd"
# What a terminal acts on: C0 controls, DEL, C1 controls, bidi overrides (LRE, RLE, PDF, LRO,
# RLO) and isolates (LRI, RLI, FSI, PDI).
_HARMFUL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# ... and a backslash, which an escape starts with.
_ESCAPED = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(c: str) -> str:
    n = ord(c)
    if c == "\\":
        return "\\\\"
    if n < 0x100:
        return f"\\x{n:02x}"
    return f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def shown(text: str, keep: str = "\n\t", *, backslash: bool = True) -> str:
    """``text`` with every character a terminal would act on rather than show written as an
    escape, and every backslash as ``\\\\``; the characters of ``keep`` (newline and tab) stay
    as they are. ``backslash=False`` for text that writes its own backslashes as ``\\\\``
    already (JSON): there a ``\\x1b`` is this function's, a JSON escape is ``\\u001b``.

    >>> shown("bad \\x1b]0;PWNED\\x07\\x1b[2J\\x9b31m \\u202egpj.exe\\nnext line")
    'bad \\\\x1b]0;PWNED\\\\x07\\\\x1b[2J\\\\x9b31m \\\\u202egpj.exe\\nnext line'
    >>> shown("café ✓ 東京")
    'café ✓ 東京'

    Text that reads like an escape is not shown as the character it names:

    >>> print(shown("\\x1b"), shown("\\\\x1b"), shown("C:\\\\temp"))
    \\x1b \\\\x1b C:\\\\temp
    >>> print(shown('{"a": "\\\\u001b\\x1b"}', backslash=False))
    {"a": "\\u001b\\x1b"}
    >>> text = "prix\\u202f: 10\\u00a0€ 👨\\u200d👩 می\\u200cخواهم Silben\\u00adtrennung \\U0001fae8"
    >>> shown(text) == text
    True
    """
    pattern = _ESCAPED if backslash else _HARMFUL
    if pattern.search(text) is None:
        return text
    return pattern.sub(lambda m: m[0] if m[0] in keep else _escape(m[0]), text)


def same_width(text: str) -> str:
    """``text`` with each such character (newline and tab too) replaced by U+FFFD, one for one.

    >>> same_width("a\\x1b[2Jb\\u202ec\\n")
    'a\\ufffd[2Jb\\ufffdc\\ufffd'
    """
    return _HARMFUL.sub(REPLACEMENT, text)


__all__ = ["same_width", "shown"]
