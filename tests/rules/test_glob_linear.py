"""Path globs match in time linear in the path: a client cannot stall the event loop with a path
made to fail against a glob with several wildcards in one segment."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

from proxy.rules.compile import _path_pattern, glob_to_regex
from proxy.yamlsrc import Problems, Src

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
from proxy.rules.compile import _path_pattern
from proxy.yamlsrc import Problems, Src
pattern, _, _ = _path_pattern(Src("/thumbs/*-*x*.jpg", "r.yaml", 1), Problems(), "match.path")
assert pattern.fullmatch("/thumbs/" + "-x" * 20000) is None
assert pattern.fullmatch("/thumbs/" + "-x" * 20000 + ".jpg") is not None
print("done")
"""


def test_a_glob_with_wildcards_in_one_segment_fails_a_hostile_path_quickly() -> None:
    """A subprocess with a generous 10 s timeout, not a wall-clock assertion: the linear matcher
    takes about 0.1 s for this 40 KB path (a request head allows 32 KB and more), while the
    backtracking regex took 4 s at 4 KB and grows with the cube of the length (about an hour
    here), so the two cannot be confused however loaded the machine is; a subprocess because the
    old code would otherwise hold the test run for that hour."""
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                            timeout=10)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"


def glob(text: str) -> object:
    pattern, _, _ = _path_pattern(Src(text, "r.yaml", 1), Problems(), "match.path")
    return pattern


def test_a_double_star_matches_a_decoded_newline_as_any_other_character() -> None:
    """``/account/**`` as a bypass missed ``/account/orders%0A`` (decoded: a newline), which the
    origin served as Alice's orders and the cache then gave to anyone who asked."""
    for text, path, matches in [("/account/**", "/account/orders\n", True),
                                ("/account/**", "/account/\n/x", True),
                                ("/**", "/\n", True),
                                ("/a/**/b", "/a/\n/b", True),
                                ("/a/*", "/a/\n", True),  # within a segment too
                                ("/a/**", "/b/\n", False)]:
        assert (glob(text).fullmatch(path) is not None) is matches, (text, path)  # type: ignore[attr-defined]


def test_the_linear_matcher_agrees_with_the_glob_regex() -> None:
    """Every glob semantic (``*`` within a segment, ``**`` across, ``?``, the whole path) kept:
    random globs against random paths, compared with the regex the glob translates to."""
    rng = random.Random(7)
    pieces = ["*", "**", "?", "/", "a", "b", "-", "."]
    for _ in range(3000):
        text = "/" + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 7)))
        matcher = glob(text)
        regex = re.compile(glob_to_regex(text))
        for _ in range(10):
            path = "/" + "".join(rng.choice("ab/-.\n") for _ in range(rng.randint(0, 9)))
            assert (matcher.fullmatch(path) is not None) == (regex.fullmatch(path) is not None), (text, path)
