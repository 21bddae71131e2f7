"""The demo (`scripts/run` with no arguments) does what the curl lines it prints say.

The printed lines are parsed and carried out as written (the URL, the method, the JSON), so
the README's first impression is tested, not a copy of it.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import socket
from pathlib import Path

import aiohttp

from tests.harness import spawn_cachegate

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_steps(text: str) -> list[tuple[float, list[str], str]]:
    """The first five curl lines: (seconds to sleep first, curl's argv, the comment's first word)."""
    steps = []
    for line in text.splitlines():
        m = re.match(r"\s*(?:sleep (\d+); )?(curl [^|#]*?)\s*(?:\|[^#]*)?#\s*(\S+)", line)
        if m:
            steps.append((float(m.group(1) or 0), shlex.split(m.group(2)), m.group(3)))
    return steps[:5]


async def carry_out(session: aiohttp.ClientSession, argv: list[str]) -> tuple[str | None, str]:
    """Run one printed curl command: (its X-Cache-Status, its body)."""
    method, data, url = "GET", None, argv[-1]
    if "-X" in argv:
        method = argv[argv.index("-X") + 1]
    if "-d" in argv:
        data = argv[argv.index("-d") + 1]
        url = next(a for a in argv if a.startswith("http"))
    # curl -d sends a form's Content-Type unless -H says otherwise (the admin guard refuses a form).
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if data is not None else {}
    for i, arg in enumerate(argv[:-1]):
        if arg == "-H":
            name, _, value = argv[i + 1].partition(":")
            headers[name.strip()] = value.strip()
    async with session.request(method, url, data=data, headers=headers) as r:
        return r.headers.get("X-Cache-Status"), await r.text()


async def test_demo_shows_miss_hit_revalidated_purge_miss(tmp_path: Path) -> None:
    origin, listen, admin = free_port(), free_port(), free_port()
    demo = await asyncio.to_thread(spawn_cachegate, [
        "demo", "--origin-listen", f"127.0.0.1:{origin}", "--listen", f"127.0.0.1:{listen}",
        "--admin-listen", f"127.0.0.1:{admin}", "--cache-dir", str(tmp_path / "cache"),
        "--rules", str(ROOT / "rules" / "default.yaml")])
    try:
        steps = demo_steps(demo.text)
        assert [word for _, _, word in steps] == ["MISS:", "HIT:", "REVALIDATED:", '{"purged":', "MISS"]
        assert f"http://127.0.0.1:{origin}" in demo.text
        async with aiohttp.ClientSession() as session:
            for wait, argv, word in steps:
                await asyncio.sleep(wait)
                status, body = await carry_out(session, argv)
                if word.startswith("{"):
                    assert json.loads(body)["purged"] == 1, body
                else:
                    assert status == word.rstrip(":"), (argv, status, body)
    finally:
        assert await asyncio.to_thread(demo.stop) == 0, demo.text
