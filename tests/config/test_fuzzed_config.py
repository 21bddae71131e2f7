"""Values a fuzzer found that ``cachegate check`` passed (or said in Python's words) and that
broke the start or serving: each is now refused at its line, in YAML's words, by ``check``, by
the start and by a reload (which keeps the running config)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from proxy.config import load_config
from proxy.errors import ConfigError

U = "listen: 127.0.0.1:0\nadmin: {listen: null}\nupstreams: [http://127.0.0.1:9]\n"


def problems(folder: Path, text: str, rules: str | None = None) -> list[str]:
    """The problems of a config (``rules``: the rule file r.yaml), without the folder."""
    if rules is not None:
        (folder / "r.yaml").write_text(rules)
    path = folder / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    return [p.replace(f"{folder}/", "") for p in info.value.problems]


AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")


# -- a cache directory the service user cannot make ----------------------------------------

MAKE = "give a directory the user cachegate runs as can make and write (or make this one so)"


@pytest.mark.parametrize(("path", "said"), [
    ("/proc/nonexist/c", "/proc/nonexist/c cannot be made: No such file or directory (making /proc/nonexist)"),
    ("/sys/kernel/cg", "/sys/kernel/cg cannot be made: "),
])
def test_a_cache_directory_that_cannot_be_made_is_refused_at_its_line(tmp_path: Path, path: str,
                                                                     said: str) -> None:
    found = problems(tmp_path, U + f"cache: {{disk: {{path: {path}}}}}\n")
    assert len(found) == 1 and found[0].startswith(f"c.yaml:4: cache.disk.path: {said}"), found
    assert found[0].endswith(MAKE), found
    assert not os.path.exists(path)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run check and run as nobody")
@pytest.mark.parametrize("command", [["check", "--no-lookup"], ["run"]])
def test_check_and_run_as_a_user_who_cannot_make_it_say_its_line(command: list[str]) -> None:
    """As nobody, /var/lib/x passed check; the start then failed "cannot open the cache directory
    ... Permission denied" with no line of the config."""
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:  # (pytest's own is the owner's alone)
        os.chmod(folder, 0o755)
        config = Path(folder) / "c.yaml"
        config.write_text(U + "cache: {memory: 8MB, disk: {path: /var/lib/cachegate-test-x/c}}\n")
        config.chmod(0o644)
        done = subprocess.run([*AS_NOBODY, sys.executable, "-m", "proxy", *command, "-c", str(config)],
                              capture_output=True, text=True, timeout=60, cwd="/")
    assert (done.returncode, done.stderr.splitlines()) == (2, [
        f"{config}:4: cache.disk.path: /var/lib/cachegate-test-x/c cannot be made: Permission denied (making "
        f"/var/lib/cachegate-test-x); {MAKE}"])
    assert not os.path.exists("/var/lib/cachegate-test-x")


def test_a_cache_directory_that_can_be_made_is_left_unmade_by_check(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(U + "cache: {disk: {path: a/b/c}}\n")
    assert load_config(str(tmp_path / "c.yaml")).cache.disk is not None
    assert not (tmp_path / "a").exists()
