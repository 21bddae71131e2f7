"""The supervisor's copy of the config for its workers (``proxy.supervisor.ConfigCopy``)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from proxy.supervisor import COPY_PREFIX, ConfigCopy
from proxy.yamlsrc import load_snapshot


def test_a_copy_whose_directory_was_removed_is_never_written_into_a_directory_someone_else_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its name is visible in the temporary directory: once a cleaner removed it, another user
    could make a directory of that name first, read the config (the admin token) and replace it
    for the next worker. A directory that is not this process's own (0700) is never reused;
    and one copy per supervisor: the one left there goes when it is this user's."""
    original = tmp_path / "cachegate.yaml"
    original.write_text("admin: {token: secret-token-0123456789}\n")
    files = {str(original): original.read_bytes()}
    copy = ConfigCopy(str(original), files)
    first = copy.directory
    written: list[str] = []
    write = ConfigCopy._write

    def recording(path: str, data: bytes) -> None:
        written.append(path)
        write(path, data)

    monkeypatch.setattr(ConfigCopy, "_write", staticmethod(recording))
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
        assert not [p for p in written if p.startswith(first + os.sep)]  # nothing was written there
        assert not os.path.exists(first)  # this user's (a test cannot be another): removed
        assert _copies() == [os.path.basename(copy.directory)]
        shutil.rmtree(copy.directory)  # a cleaner again: a reload takes a new private one too
        copy.commit(files)
        assert load_snapshot(copy.current()).snapshot == files
        assert _copies() == [os.path.basename(copy.directory)]
    finally:
        copy.close()
        shutil.rmtree(first, ignore_errors=True)


def _copies() -> list[str]:
    """This process's copy directories in the temporary directory."""
    return [n for n in os.listdir(tempfile.gettempdir()) if n.startswith(f"{COPY_PREFIX}{os.getpid()}-")]
