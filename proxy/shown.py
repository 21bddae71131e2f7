"""What cachegate's commands print of text they did not write: an admin API's answers and
errors (``cachegate purge``, ``top``, ``health``), and origins' reasons and the URLs of
sitemaps and logs (``cachegate warm``, ``top``'s screen).

Such text could carry what a terminal acts on rather than shows: C0 and C1 controls (ESC,
BEL, U+009B, which start sequences that set the window title, clear the screen or recolour
it), DEL, bidi overrides and isolates (U+202A-U+202E, U+2066-U+2069) that reorder what follows.
Those characters, and only those, go through ``shown``, the one sanitiser: written as an escape
(``\\x1b``, ``\\u202e``), newline and tab kept. Everything else is text and stays as it is: a
no-break space, a zero-width joiner inside an emoji sequence, a soft hyphen, a left-to-right
mark, a character newer than Python's Unicode database. ``same_width`` is the same set of
characters (newline and tab too) for a screen laid out in columns (``cachegate top``): each
replaced by U+FFFD, one for one, so the columns stay where they are.
"""

from __future__ import annotations

import re

REPLACEMENT = "\ufffd"
# What a terminal acts on: C0 controls, DEL, C1 controls, bidi overrides (LRE, RLE, PDF, LRO,
# RLO) and isolates (LRI, RLI, FSI, PDI).
_HARMFUL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(c: str) -> str:
    n = ord(c)
    if n < 0x100:
        return f"\\x{n:02x}"
    return f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def shown(text: str, keep: str = "\n\t") -> str:
    """``text`` with every character a terminal would act on rather than show written as an
    escape; the characters of ``keep`` (newline and tab) stay as they are.

    >>> shown("bad \\x1b]0;PWNED\\x07\\x1b[2J\\x9b31m \\u202egpj.exe\\nnext line")
    'bad \\\\x1b]0;PWNED\\\\x07\\\\x1b[2J\\\\x9b31m \\\\u202egpj.exe\\nnext line'
    >>> shown("café ✓ 東京"), shown(shown("\\x1b[2J")) == shown("\\x1b[2J")
    ('café ✓ 東京', True)
    >>> text = "prix\\u202f: 10\\u00a0€ 👨\\u200d👩 می\\u200cخواهم Silben\\u00adtrennung \\U0001fae8"
    >>> shown(text) == text
    True
    """
    if _HARMFUL.search(text) is None:
        return text
    return _HARMFUL.sub(lambda m: m[0] if m[0] in keep else _escape(m[0]), text)


def same_width(text: str) -> str:
    """``text`` with each such character (newline and tab too) replaced by U+FFFD, one for one.

    >>> same_width("a\\x1b[2Jb\\u202ec\\n")
    'a\\ufffd[2Jb\\ufffdc\\ufffd'
    """
    return _HARMFUL.sub(REPLACEMENT, text)


__all__ = ["same_width", "shown"]
