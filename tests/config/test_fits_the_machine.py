"""Configs that read well but that this machine cannot run as written: found by ``cachegate
check`` (and at start), at the line concerned, rather than by the running proxy."""

from __future__ import annotations

import shutil
from pathlib import Path

from proxy.config import load_config
from proxy.storage.room import human_size


def warnings(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "c.yaml"
    path.write_text("upstreams: [http://127.0.0.1:9]\n" + text)
    prefix = f"{path}:"
    return [w.removeprefix(prefix) for w in load_config(str(path)).warnings]


def test_a_disk_budget_bigger_than_its_whole_filesystem_is_a_warning_naming_both_sizes(tmp_path: Path) -> None:
    total = shutil.disk_usage(tmp_path).total
    found = warnings(tmp_path, "cache:\n  disk:\n    path: not/made/yet\n    size: 1024TB\n")
    assert len(found) == 1 and found[0].startswith("5: warning: cache.disk.size 1024 TB is more than the "
                                                   f"whole filesystem of {tmp_path / 'not/made/yet'} "
                                                   f"({human_size(total)})"), found
    assert warnings(tmp_path, "cache:\n  disk:\n    path: cache\n    size: 1MB\n") == []
