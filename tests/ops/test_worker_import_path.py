"""Workers run the installed cachegate, whatever directory the supervisor was started from.

``python -m`` puts the current directory first on ``sys.path``: a ``proxy/`` package in the
directory ``cachegate run`` was started from (planted in /tmp, or a checkout of another version)
would be imported by every worker, as the service's user. Workers are started with ``-P``."""

from __future__ import annotations

import os
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


def _uninstalled_python(tmp_path: Path) -> str:
    """A Python that sees cachegate's dependencies but not cachegate: a virtualenv whose only
    addition is the test's site-packages as a plain path entry (its .pth files, an editable
    install's finder among them, are not run from there)."""
    import site
    import subprocess
    import venv

    env = tmp_path / "venv-without-cachegate"
    venv.create(env, with_pip=False, symlinks=True)
    (purelib,) = list((env / "lib").glob("python3*/site-packages"))
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = str(env / "bin" / "python")
    probe = subprocess.run([python, "-c", "import aiohttp, yaml, proxy"], capture_output=True, text=True,
                           cwd=tmp_path, timeout=60,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if "No module named 'proxy'" not in probe.stderr:
        pytest.skip(f"cannot make a Python without cachegate here: {probe.returncode} {probe.stderr[-300:]}")
    return python


CHECKOUT = Path(__file__).resolve().parents[2]


async def test_workers_import_an_uninstalled_checkout_that_python_m_ran_from_the_current_directory(
        origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m proxy run --workers 2`` from a checkout, not installed: the supervisor imports
    ``proxy`` from the current directory, and its workers (``-P``) could not, restarted for ever."""
    origin.route("/k", body=b"k", headers={"Cache-Control": "max-age=300"})
    monkeypatch.delenv("PYTHONPATH", raising=False)  # (the tests' conftest sets it to the checkout)
    python = _uninstalled_python(tmp_path)
    checkout = str(CHECKOUT)
    config = write_config(str(tmp_path), origin.url, "cache: {disk: null}\n")
    proxy = ProxyProcess(checkout, config, program=(python, "-m", "proxy"))
    await proxy.start("--workers", "2", with_log=True, wait=30)  # (its working directory: the checkout)
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2, wait=30)
        assert (await proxy.get("/k")).body == b"k"
    finally:
        code = await proxy.stop()
    assert code == 0, "\n".join(proxy.lines)
    assert not any("No module named" in line or "exited with" in line for line in proxy.lines), \
        "\n".join(proxy.lines)


def test_the_worker_path_adds_only_the_checkout_imported_as_the_current_directory(tmp_path: Path) -> None:
    from proxy import supervisor

    home = str(Path(supervisor.__file__).resolve().parents[1])
    site_dir = str(tmp_path / "site-packages")
    env = supervisor.worker_environment([home, "/usr/lib/python3.11", site_dir], home, {"PYTHONPATH": "/x"})
    assert env is not None and env["PYTHONPATH"] == f"{home}{os.pathsep}/x"
    env = supervisor.worker_environment(["", site_dir], home, {})
    assert env is not None and env["PYTHONPATH"] == home
    # Installed (or on the path anyway), or not run from its own directory: nothing added.
    assert supervisor.worker_environment([home, site_dir, home], home, {}) is None
    assert supervisor.worker_environment([str(tmp_path), site_dir], str(tmp_path), {}) is None
    assert supervisor.worker_environment(["/usr/bin", site_dir], home, {}) is None
