"""A shard (or the index, the lock file, the spool folder, the cache directory itself) that cannot
be written at start (read-only for this user, immutable, a read-only mount) is an operator's
setting, not damage and not a traceback: cachegate does not start, says so in one line naming
the file and ``cache.disk.path``, exits 1 (as on a full filesystem), and changes nothing: once
the file is writable again every entry is there."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from proxy.storage.disk import DiskTier, NotWritable
from tests.conftest import MakeProxy
from tests.harness import Origin, write_config
from tests.storage.test_damaged import CONFIG, KEYS, filled, x_caches
from tests.storage.test_full_filesystem import run


@contextmanager
def read_only(path: Path) -> Iterator[str]:
    """``path`` made unwritable for this process: immutable (``chattr +i``) as root, else its
    mode 0444 (a folder's 0555; root writes whatever the mode says); what was done."""
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        if chattr is None:
            pytest.skip("root needs chattr to make a file unwritable")
        done = subprocess.run([chattr, "+i", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"chattr +i does not work here: {done.stderr.strip()}")
        try:
            yield "immutable"
        finally:
            subprocess.run([chattr, "-i", str(path)], check=True)
    else:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield "mode 0444"
        finally:
            path.chmod(mode)


def test_opening_an_unwritable_shard_raises_not_writable_naming_it(tmp_path: Path) -> None:
    DiskTier(str(tmp_path / "c"), 8 << 20, 2).close()
    db = tmp_path / "c" / "001" / "cache.db"
    with read_only(db), pytest.raises(NotWritable) as raised:
        DiskTier(str(tmp_path / "c"), 8 << 20, 2, repair=True)
    assert raised.value.filename == str(db) and str(db) in str(raised.value)
    assert not [p for p in (tmp_path / "c").iterdir() if ".corrupt-" in p.name]


@pytest.mark.parametrize("workers", [1, 2])
async def test_an_unwritable_shard_at_start_is_one_line_and_exit_1(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, workers: int) -> None:
    directory = tmp_path / "p"
    await filled(origin, make_proxy, directory)
    cache = directory / "cache"
    db = cache / "000" / "cache.db"
    with read_only(db):
        code, out = run(write_config(str(directory), origin.url, CONFIG), workers)
    assert (code, "Traceback" in out, "restarting" in out) == (1, False, False), out
    said = [line for line in out.splitlines() if line.startswith("cachegate: ")]
    assert len(said) == 1, out
    assert str(db) in said[0] and "(cache.disk.path)" in said[0] and "cannot be written" in said[0], out
    assert not [p for p in cache.iterdir() if ".corrupt-" in p.name]  # nothing set aside

    proxy = await make_proxy(config=CONFIG, directory=directory)
    assert await x_caches(proxy) == ["HIT"] * KEYS


@pytest.mark.parametrize(("unwritable", "named"), [
    ("index.sqlite3", "index.sqlite3"),  # SQLite opened it read-only without a word: it started
    (".lock", ".lock"),  # "Permission denied", naming nothing (an existing cache of another user)
    ("tmp", "tmp/"),  # the spool folder: the same bare message
])
async def test_an_unwritable_part_of_the_cache_directory_at_start_is_one_line_naming_it(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, unwritable: str, named: str) -> None:
    directory = tmp_path / "p"
    await filled(origin, make_proxy, directory)
    cache = directory / "cache"
    with read_only(cache / unwritable):
        code, out = run(write_config(str(directory), origin.url, CONFIG), 1)
    assert (code, "Traceback" in out) == (1, False), out
    said = [line for line in out.splitlines() if line.startswith("cachegate: ")]
    assert len(said) == 1, out
    assert f"{cache}/{named}" in said[0] and "(cache.disk.path)" in said[0], out
    assert "make it and its folder writable by the user cachegate runs as" in said[0], out
    assert not [p for p in cache.iterdir() if ".corrupt-" in p.name]  # nothing set aside

    proxy = await make_proxy(config=CONFIG, directory=directory)
    assert await x_caches(proxy) == ["HIT"] * KEYS


async def test_an_unwritable_cache_directory_at_start_is_refused_at_its_line(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    """The cache directory itself read-only: a 49-line traceback (its index's journal), then one
    line naming its index; now the config's line, as ``check`` says it (exit 2), and nothing in
    it changed."""
    directory = tmp_path / "p"
    await filled(origin, make_proxy, directory)
    cache = directory / "cache"
    config = write_config(str(directory), origin.url, CONFIG)
    with read_only(cache):
        code, out = run(config, 1)
    assert (code, "Traceback" in out) == (2, False), out
    assert (f"{config}:4: cache.disk.path: {cache} cannot be written; give a directory the user cachegate runs "
            "as can make and write (or make this one so)") in out.splitlines(), out
    proxy = await make_proxy(config=CONFIG, directory=directory)
    assert await x_caches(proxy) == ["HIT"] * KEYS
