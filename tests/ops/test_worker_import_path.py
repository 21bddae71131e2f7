"""Workers run the installed cachegate, whatever directory the supervisor was started from.

``python -m`` puts the current directory first on ``sys.path``: a ``proxy/`` package in the
directory ``cachegate run`` was started from (planted in /tmp, or a checkout of another version)
would be imported by every worker, as the service's user. Workers are started with ``-P``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.harness import Origin
from tests.storage.procs import ProxyProcess, write_config

pytestmark = pytest.mark.slow


async def test_a_proxy_package_in_the_current_directory_is_not_imported_by_the_workers(
        origin: Origin, tmp_path: Path) -> None:
    origin.route("/k", body=b"k", headers={"Cache-Control": "max-age=300"})
    marker = tmp_path / "PLANTED-CODE-RAN"
    planted = tmp_path / "proxy"
    planted.mkdir()
    (planted / "__init__.py").write_text(
        f"import os\nopen({str(marker)!r}, 'a').write(f'pid {{os.getpid()}}\\n')\n")
    program = Path(sys.executable).parent / "cachegate"  # the console script, as a service runs it
    assert program.exists()
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, "cache: {disk: null}\n"),
                         program=(str(program),))
    await proxy.start("--workers", "2", with_log=True, wait=20)  # (its working directory: tmp_path)
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2, wait=20)
        for _ in range(4):
            assert (await proxy.get("/k")).body == b"k"
    finally:
        code = await proxy.stop()
    assert not marker.exists(), marker.read_text() + "\n".join(proxy.lines)
    assert code == 0, "\n".join(proxy.lines)
