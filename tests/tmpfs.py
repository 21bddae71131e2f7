"""A small tmpfs mounted for one test: a real filesystem that fills up (root on Linux only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def mounted_tmpfs(path: Path, size: str, inodes: int | None = None) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (``"8m"``) at ``path`` for a fixture to yield from, with at
    most ``inodes`` files and folders when given; lazily unmounted after. Skips the test where
    it cannot be mounted."""
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not mount or not umount:
        pytest.skip("mounting a tmpfs needs root on Linux")
    path.mkdir()
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes is not None else "")
    done = subprocess.run([mount, "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run([umount, "-l", str(path)], capture_output=True)
