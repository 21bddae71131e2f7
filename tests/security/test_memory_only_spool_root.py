"""A memory-only instance (no cache.disk) spools in a folder of its user's alone.

It spooled in ``<temp dir>/cachegate-spool``, one folder for every user of the machine: a local
user who made it first owned it, and so could rename or replace cachegate's folders in it and
plant links where its lock files were created; and a root-owned, unwritable one stopped every
other user's memory-only cachegate from starting ("cannot open the cache directory ?
(cache.disk.path)"). Now: ``<temp dir>/cachegate-spool-<uid>``, mode 700, used only when it is a
folder (not a link) owned by this user that no one else may use; otherwise a fresh private one,
said once."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Origin
from tests.storage.procs import ProxyProcess, write_config

UNSAFE = "is not safe to use"


@pytest.fixture
def tmpdir_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temp directory of the test's own, as TMPDIR (never the machine's /tmp/cachegate-spool*):
    world-writable and sticky like /tmp, and reachable by another user."""
    base = Path(tempfile.mkdtemp(prefix="cg-tmpdir-", dir="/tmp"))
    base.chmod(0o1777)
    monkeypatch.setenv("TMPDIR", str(base))
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_the_spool_root_is_this_users_own_and_reused(tmpdir_env: Path) -> None:
    from proxy.storage.spool import private_spool_root

    root, own = private_spool_root()
    assert (root, own) == (str(tmpdir_env / f"cachegate-spool-{os.geteuid()}"), False)
    st = os.lstat(root)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700
    assert private_spool_root() == (root, False)  # the same across restarts: the sweep finds it


def test_a_symlinked_spool_root_is_refused(tmpdir_env: Path, caplog: pytest.LogCaptureFixture) -> None:
    from proxy.storage.spool import SpoolDir, private_spool_root

    target = tmpdir_env / "elsewhere"
    target.mkdir(mode=0o700)
    (tmpdir_env / f"cachegate-spool-{os.geteuid()}").symlink_to(target)
    root, own = private_spool_root()
    assert own and os.path.dirname(root) == str(tmpdir_env) and not os.path.islink(root)
    assert stat.S_IMODE(os.lstat(root).st_mode) == 0o700
    spools = SpoolDir(root, own_root=own)
    spools.close()
    assert not os.path.exists(root)  # a private one is removed with its process's folder
    assert list(target.iterdir()) == []  # nothing made where the link points
    warned = [r.getMessage() for r in caplog.records if UNSAFE in r.getMessage()]
    assert len(warned) == 1 and "symbolic link" in warned[0], warned


def test_a_spool_root_open_to_others_is_refused(tmpdir_env: Path, caplog: pytest.LogCaptureFixture) -> None:
    from proxy.storage.spool import private_spool_root

    shared = tmpdir_env / f"cachegate-spool-{os.geteuid()}"
    shared.mkdir()
    shared.chmod(0o777)
    root, own = private_spool_root()
    assert own and root != str(shared)
    assert any("mode 777" in r.getMessage() for r in caplog.records)


def test_the_lock_file_does_not_follow_a_planted_link(tmp_path: Path) -> None:
    from proxy.storage import spool

    victim = tmp_path / "victim"
    real = tmp_path / "root"
    real.mkdir()
    made = []
    original = os.makedirs

    def plant(path: str, *args: object, **kwargs: object) -> None:  # as a racing owner of root would
        original(path, *args, **kwargs)  # type: ignore[arg-type]
        if os.path.dirname(path) == str(real):
            made.append(path)
            os.symlink(victim, os.path.join(path, spool.LOCK_NAME))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(spool.os, "makedirs", plant)
        with pytest.raises(OSError):
            spool.SpoolDir(str(real))
    assert made and not victim.exists()


def _as_other_user() -> int:
    if os.geteuid() != 0:
        pytest.skip("needs root: the folder must belong to another user (os.chown)")
    return 65534


async def test_a_spool_root_owned_by_another_user_is_not_used(
        origin: Origin, tmp_path: Path, tmpdir_env: Path) -> None:
    other = _as_other_user()
    planted = tmpdir_env / f"cachegate-spool-{os.geteuid()}"
    planted.mkdir(mode=0o700)
    os.chown(planted, other, other)
    origin.route("/k", body=b"k" * 1000, headers={"Cache-Control": "max-age=300"})
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, "cache: {disk: null}\n"))
    await proxy.start("--workers", "2", with_log=True, wait=30)
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2, wait=30)
        for _ in range(3):
            assert (await proxy.get("/k")).body == b"k" * 1000
        assert os.listdir(planted) == []  # nothing of cachegate's in the other user's folder
        names = os.listdir(tmpdir_env)
        private = [n for n in names if n.startswith(f"cachegate-spool-{os.geteuid()}-")]
        assert private, names
        for name in private:
            st = os.lstat(tmpdir_env / name)
            assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700
    finally:
        code = await proxy.stop()
    assert code == 0, "\n".join(proxy.lines)
    warned = [line for line in proxy.lines if UNSAFE in line]
    assert len(warned) == 1 and str(planted) in warned[0] and "owned by uid 65534" in warned[0], \
        "\n".join(proxy.lines)


def _nobody(tmpdir_env: Path) -> list[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root: to run cachegate as another user (setpriv)")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("no setpriv (util-linux): cannot run cachegate as another user")
    as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run([*as_nobody, sys.executable, "-c", "import proxy"], capture_output=True,
                           cwd=tmpdir_env, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot import cachegate from here: {probe.stderr.decode()[-200:]}")
    return as_nobody


def test_a_root_owned_shared_folder_does_not_stop_another_users_start(tmpdir_env: Path) -> None:
    as_nobody = _nobody(tmpdir_env)
    for name in ("cachegate-spool", "cachegate-spool-65534"):  # the old shared name and nobody's own
        (tmpdir_env / name).mkdir(mode=0o755)
    work = tmpdir_env / "work"
    work.mkdir()
    config = write_config(str(work), "http://127.0.0.1:9", "cache: {disk: null}\n")
    os.chmod(config, 0o644)
    proc = subprocess.Popen([*as_nobody, sys.executable, "-m", "proxy", "run", "--config", config],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work)
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "proxy listening on" in line:
                break
    finally:
        proc.terminate()
        rest, _ = proc.communicate(timeout=30)
    lines.append(rest)
    out = "".join(lines)
    assert "proxy listening on" in out, out
    assert any(UNSAFE in line and "cachegate-spool-65534" in line for line in lines), out


async def test_a_spool_folder_that_cannot_be_made_is_named_at_the_start(
        tmp_path: Path, tmpdir_env: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Not "cannot open the cache directory ? (cache.disk.path)": there is none."""
    from proxy.config import load_config
    from proxy.web.server import open_runtime

    (tmpdir_env / f"cachegate-spool-{os.geteuid()}").mkdir(mode=0o777)
    os.chmod(tmpdir_env / f"cachegate-spool-{os.geteuid()}", 0o777)  # unsafe: a private one is made
    where = str(tmpdir_env / f"cachegate-spool-{os.geteuid()}-x")

    def denied(*args: object, **kwargs: object) -> str:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), where)

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    path = tmp_path / "c.yaml"
    path.write_text("upstreams: [http://127.0.0.1:9]\ncache: {memory: 64MB, disk: null}\n")
    assert await open_runtime(load_config(str(path)), owner=True) is None
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("cachegate: cannot")]
    assert line.startswith("cachegate: cannot make a spool folder in the temp directory (TMPDIR; "
                           f"there is no cache.disk): {where} cannot be made (Permission denied)"), line
    assert "cache.disk.path" not in line and "?" not in line, line


def test_a_killed_processs_spool_folder_is_swept_at_the_next_start(tmpdir_env: Path) -> None:
    """The per-user root is the same across restarts, so a memory-only start finds there what a
    process killed by SIGKILL left (its folder and lock file); a running one's stays."""
    from proxy.config import load_config
    from proxy.runtime import open_storage
    from proxy.storage.spool import private_spool_root

    root, _ = private_spool_root()
    killed = subprocess.run([sys.executable, "-c", "import os, signal\nfrom proxy.storage.spool import SpoolDir\n"
                             f"s = SpoolDir({root!r})\nprint(s.path, flush=True)\n"
                             "os.kill(os.getpid(), signal.SIGKILL)"],
                            capture_output=True, text=True, timeout=60, env=dict(os.environ, TMPDIR=str(tmpdir_env)))
    left = killed.stdout.strip()
    assert killed.returncode == -9 and os.path.isdir(left), killed
    config = tmpdir_env / "c.yaml"
    config.write_text("upstreams: [http://127.0.0.1:9]\ncache: {memory: 64MB, disk: null}\n")
    storage = open_storage(load_config(str(config)))
    try:
        assert storage.spools.root == root
        assert not os.path.exists(left)
        assert os.listdir(root) == [os.path.basename(storage.spools.path)]
    finally:
        storage.close()
