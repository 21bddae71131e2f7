"""The supervisor's copy of the config for its workers (``proxy.supervisor.ConfigCopy``)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from proxy.supervisor import ConfigCopy
from proxy.yamlsrc import load_snapshot


def test_a_copy_whose_directory_was_removed_is_never_written_into_a_directory_someone_else_made(
        tmp_path: Path) -> None:
    """Its name is visible in the temporary directory: once a cleaner removed it, another user
    could make a directory of that name first, read the config (the admin token) and replace it
    for the next worker. A directory that is not this process's own (0700) is never reused."""
    original = tmp_path / "cachegate.yaml"
    original.write_text("admin: {token: secret-token-0123456789}\n")
    files = {str(original): original.read_bytes()}
    copy = ConfigCopy(str(original), files)
    first = copy.directory
    try:
        assert stat.S_IMODE(os.stat(first).st_mode) == 0o700
        shutil.rmtree(first)
        os.mkdir(first)
        os.chmod(first, 0o777)  # made by someone else, open to all
        path = copy.current()
        assert not path.startswith(first + os.sep)
        assert stat.S_IMODE(os.stat(copy.directory).st_mode) == 0o700
        assert load_snapshot(path).snapshot == files
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert os.listdir(first) == []  # nothing was written there
        shutil.rmtree(copy.directory)  # a cleaner again: a reload takes a new private one too
        copy.commit(files)
        assert load_snapshot(copy.current()).snapshot == files
    finally:
        copy.close()
        shutil.rmtree(first, ignore_errors=True)
