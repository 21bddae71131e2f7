"""The CI gate: the public HTTP cache test suite must never score lower than it does today.

Runs ``scripts/conformance`` (npm ``http-cache-tests``, its origin, cachegate in
front with the default configuration) and compares the suite's own pass counts
with the floor reached. Every required test that may fail is listed here and in
docs/caching.md, each for a documented reason; any other
required failure is a regression.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_FLOOR = 147  # of 165 (155 before Age was read as RFC 9111 §5.1 says: docs/caching.md)
# of 95 (85 while unknown Vary fields were normalised, 83 while Accept-* were lower-cased: docs/caching.md)
OPTIONAL_FLOOR = 82
# The required tests cachegate fails on purpose, or cannot pass (docs/caching.md).
DOCUMENTED_REQUIRED_FAILURES = frozenset({
    "headers-store-Set-Cookie",  # Set-Cookie responses are not stored by default
    "304-etag-update-response-Set-Cookie",  # same
    "headers-store-Content-Length",  # the origin sends more bytes than its Content-Length
    "304-etag-update-response-Content-Length",  # same
    "304-etag-update-response-ETag",  # RFC 9111 §4.3.4: a 304 with another strong ETag must not update
    # RFC 9111 §5.1: an invalid Age is ignored and a list counts by its first member; the 0.4.5
    # release expects "stale" for these, the suite's current version what cachegate does.
    "age-parse-nonnumeric", "age-parse-negative", "age-parse-float", "age-parse-parameter",
    "age-parse-numeric-parameter", "age-parse-prefix-twoline", "age-parse-dup-0", "age-parse-dup-0-twoline",
    "age-parse-dup-old",
    "stale-close-must-revalidate",  # the origin disconnects: no response can carry its request count
    "stale-close-proxy-revalidate",  # same
    "stale-close-no-cache",  # same
    "stale-close-s-maxage=2",  # same
})  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_cache_tests_suite_scores_at_least_the_recorded_level(tmp_path: Path) -> None:
    if shutil.which("npm") is None:
        pytest.fail("npm is needed to run the cache-tests suite (Node.js and npm are on every machine here)")
    summary_path = tmp_path / "summary.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "conformance.py"), "--out", str(tmp_path),
         "--summary-json", str(summary_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=540,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    required, optional = summary["required"], summary["optional"]
    unexpected = sorted(f"{f['id']}: {f['reason']}" for f in required["failing"]
                        if f["id"] not in DOCUMENTED_REQUIRED_FAILURES)
    assert unexpected == [], done.stdout
    assert (required["total"], optional["total"]) == (165, 95)
    assert required["passed"] >= REQUIRED_FLOOR, done.stdout
    assert optional["passed"] >= OPTIONAL_FLOOR, done.stdout
