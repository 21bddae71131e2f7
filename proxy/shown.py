"""What cachegate's commands print of text they did not write: an admin API's answers and
errors (``cachegate purge``, ``top``, ``health``), and origins' reasons and the URLs of
sitemaps and logs (``cachegate warm``, ``top``'s screen).

Such text could carry what a terminal acts on rather than shows: C0 and C1 controls (ESC,
BEL, U+009B, which start sequences that set the window title, clear the screen or recolour
it), DEL, bidi overrides and isolates that reorder what follows. Every such character (every
one ``str.isprintable`` refuses) goes through ``shown``, the one sanitiser: written as an
escape (``\\x1b``, ``\\u202e``), newline and tab kept. ``same_width`` is the same set of
characters for a screen laid out in columns (``cachegate top``): each replaced by U+FFFD, one
for one, so the columns stay where they are.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


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
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else _escape(c) for c in text)


def same_width(text: str) -> str:
    """``text`` with each such character (newline and tab too) replaced by U+FFFD, one for one.

    >>> same_width("a\\x1b[2Jb\\u202ec\\n")
    'a\\ufffd[2Jb\\ufffdc\\ufffd'
    """
    return text if text.isprintable() else "".join(c if c.isprintable() else REPLACEMENT for c in text)


__all__ = ["same_width", "shown"]
