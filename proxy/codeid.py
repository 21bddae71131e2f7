"""The running code's identity: how a worker tells that cachegate was upgraded in place under
the supervisor that starts it.

``pip install .`` into the virtualenv a service runs from (docs/deploy.md) replaces the
package's files while the supervisor keeps running the code it imported. A worker it starts
after that (a crash, an OOM kill, a watchdog kill) would run the new code against the old
supervisor's arguments, shared memory layout and calls: it died at once (an ``Overrides``
field the new code no longer had), and the supervisor restarted it with backoff for ever.

So the supervisor hashes the package's source files once, at its start (``identity``: their
relative paths, sizes and contents; about 4 ms for the 1.5 MB of ``proxy/**/*.py``), and
passes the hash to every worker (``ARG``). A worker hashes its own files first thing
(``exit_if_changed``, at the top of ``proxy.supervisor`` before anything else of its version
is imported or reads what the supervisor passed) and exits with ``EXIT_CODE_CHANGED`` and
one line when they differ. No hash at all comes from a supervisor older than this check,
which cannot tell and would restart the worker for ever: such a worker goes on (it runs when
the arguments that supervisor passes still parse, as between this release and the one
before). The supervisor does not restart a worker that exits so (``Supervisor._code_changed``), and
``/healthz`` says degraded; nor, hashing the installed files again when a worker exited, one whose
code changed (an older release, a rollback, has no check of its own: its worker refused the
supervisor's arguments and was restarted for ever); when no worker is left it stops (exit 1).
Contents, not modification times: a reinstall of the same version changes nothing and must not
stop a worker.

Keep this module free of imports from the rest of the package, and the check at the top of
``proxy.supervisor``: a newer version's worker has to reach it under an older supervisor.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Sequence

ARG = "--code-id"
# A worker's exit when its code is not its supervisor's (0 to 3 are taken: proxy.startup).
EXIT_CODE_CHANGED = 4
CHANGED = ("the installed cachegate changed under a running supervisor (this worker's code differs "
           "from the supervisor's); restart the service to run the new version")
PACKAGE = os.path.dirname(os.path.abspath(__file__))


def identity(root: str = PACKAGE) -> str:
    """A hash of every ``.py`` file under ``root`` (the package): relative path, size, bytes.
    A file that cannot be read (half-installed) counts as such, and makes another hash."""
    paths: list[str] = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        paths += (os.path.join(directory, f) for f in files if f.endswith(".py"))
    digest = hashlib.sha256()
    for path in sorted(paths):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            data, mark = b"", b"?"
        else:
            mark = str(len(data)).encode()
        digest.update(os.path.relpath(path, root).encode(errors="surrogateescape") + b"\0" + mark + b"\0")
        digest.update(data)
    return digest.hexdigest()[:32]


def given(argv: Sequence[str], name: str = ARG) -> str | None:
    """The value of ``name`` in ``argv`` (``--x V`` or ``--x=V``), read by hand: this runs before
    the worker's argument parser, which an older supervisor's arguments may not satisfy."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1] if i + 1 < len(argv) else ""
        if arg.startswith(name + "="):
            return arg[len(name) + 1:]
    return None


def exit_if_changed(argv: Sequence[str]) -> None:
    """In a worker, before anything else: exit ``EXIT_CODE_CHANGED`` with one line on standard
    error when the supervisor's code (its ``ARG``; none: an older supervisor) is not this
    worker's."""
    theirs = given(argv)
    if theirs is None or theirs == identity():
        # (None: a supervisor older than this check, which cannot tell; exiting would only make
        # it restart this worker for ever, where arguments it passes that this version still
        # reads let the worker run: a reviewer's upgrade from the release before this one)
        return
    worker = given(argv, "--worker-id") or "?"
    from proxy.logs import write_line

    with contextlib.suppress(OSError):  # (standard error's reader gone: the exit status still says why)
        write_line(sys.stderr, f"cachegate: worker {worker}: {CHANGED}")
    raise SystemExit(EXIT_CODE_CHANGED)
