"""Exclusive locks one running cachegate holds for its lifetime: its cache directory, its port
(and, for a refusal's message, who holds a port: ``port_in_use``).

Why ``flock`` on a file: the kernel drops the lock when the process ends, however it ends
(SIGKILL, a crash), so a stale lock never keeps the next start out, and a lock file left
behind is harmless. A lock taken with ``unlink=True`` (the ports': one file per address ever
used would pile up in the runtime directory) removes its file when released, while still
holding it; so every taker checks, once it holds the lock, that the file it locked is still the
one at the path (another may have locked a file that was removed meanwhile), and tries again
if not. The holder writes its pid into the file, so a refusal names the process
that holds it. The lock is non-blocking: a second instance is told at once and refuses to start.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile


class LockTaken(Exception):
    """Another process holds the lock; ``pid`` is what it wrote into the file (None: unknown)."""

    def __init__(self, path: str, pid: int | None) -> None:
        super().__init__(f"{path} is locked by {'pid ' + str(pid) if pid else 'another process'}")
        self.path = path
        self.pid = pid

    @property
    def holder(self) -> str:
        return f"pid {self.pid}" if self.pid else "another process"


class HeldLock:
    """An exclusive ``flock`` on ``path``, held until ``release`` (or the process ends)."""

    def __init__(self, path: str, *, unlink: bool = False, write_pid: bool = True) -> None:
        self.path = path
        self.unlink = unlink  # remove the file on release (see the module docstring)
        # ``write_pid`` False: the file is never written, so that its state (``found``) changes
        # only when another program takes the lock and writes its pid (a cache directory's
        # owner, ``proxy.storage.disk.unknown_writer``, names its pid elsewhere).
        self.write_pid = write_pid
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _same_file(fd, path):
                    break
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise LockTaken(path, pid) from None
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # locked a file its holder removed on release: the path has another now
        self.found = _state(fd)  # the file as the holders before left it
        if write_pid:
            with contextlib.suppress(OSError):  # best-effort (a full disk): the flock is the lock
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            if self.unlink:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)  # still holding it: a taker checks the file is the path's
            if self.write_pid:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)  # a holder that is gone names no pid
            os.close(fd)  # closing the only descriptor drops the flock


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _state(fd: int) -> list[int] | None:
    """A file's identity and last write: inode, size, modification time (ns). (Not the change
    time: a chown or chmod of the directory, as an operator mends its permissions, is none.)"""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def runtime_dir() -> str | None:
    """Where per-machine locks (the listening ports) live: ``$XDG_RUNTIME_DIR/cachegate``, else
    ``cachegate-<uid>`` in the system's temporary directory. Only a directory this user owns
    and nobody else may write to counts (another user could otherwise plant or hold the lock
    files); None when there is none."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        path = os.path.join(base, "cachegate")
    else:
        path = os.path.join(tempfile.gettempdir(), f"cachegate-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        return None
    return path


def _listening_inodes(port: int) -> set[str] | None:
    """The inodes of the sockets listening on TCP ``port`` (any user's), None without /proc."""
    inodes: set[str] = set()
    read = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                read = True
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{fields[9]}]")
        except (OSError, ValueError):
            continue
    return inodes if read else None


def _pids_of(inodes: set[str]) -> list[int]:
    """The processes (of this user: others' are not readable) holding these sockets."""
    pids: list[int] = []
    if not inodes:
        return pids
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{entry}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                            pids.append(int(entry))
                            break
    return sorted(pids)


def local_port_range() -> tuple[int, int] | None:
    """net.ipv4.ip_local_port_range: the ports the kernel gives outgoing connections (Linux)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(n) for n in f.read().split())
    except (OSError, ValueError):
        return None
    return low, high


def bind_refused(where: str, port: int, whose: str, exc: OSError) -> str | None:
    """Why ``where`` cannot be bound and what to do, for the errors that need saying more than
    the system's words: a port in use (``port_in_use``), a privileged port refused ("[Errno 13]
    Permission denied", alone, named neither the address nor the capability it takes). None
    for the others."""
    if exc.errno == errno.EADDRINUSE:
        return port_in_use(where, port, whose)
    first = unprivileged_port_start()
    if exc.errno == errno.EACCES and 0 < port < first:
        return (f"{where}: permission denied: a port below {first} needs the CAP_NET_BIND_SERVICE "
                "capability (systemd: uncomment AmbientCapabilities=CAP_NET_BIND_SERVICE and "
                f"CapabilityBoundingSet=CAP_NET_BIND_SERVICE in the unit); or give {whose} a port "
                f"from {first} up")
    return None


def unprivileged_port_start() -> int:
    """net.ipv4.ip_unprivileged_port_start: the first port any user may bind (Linux; 1024)."""
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024


def port_in_use(where: str, port: int, whose: str) -> str:
    """Why ``where`` (``admin.listen 127.0.0.1:8081``, ``127.0.0.1:8080``) cannot be bound
    ("address already in use"), and what to do, for the client and admin listeners alike.
    A process listening there is named; but a port held only as the local end of a connection
    (an outgoing one from the ephemeral range, one bound by hand, one closing) has no listener,
    and saying "stop that process" sent the operator after a process that does not exist."""
    listening = _listening_inodes(port)
    if listening is None:  # no /proc: who holds it is unknown
        return f"{where}: the port is in use; give {whose} a free port"
    if listening:
        pids = ", ".join(map(str, _pids_of(listening)))
        holder = f" ({'pids' if ',' in pids else 'pid'} {pids})" if pids else ""
        return (f"{where}: another process{holder} already accepts connections on this port; give "
                f"{whose} a free port, or stop that process")
    span = local_port_range()
    below = (f" below {span[0]} (the kernel takes the local ports of outgoing connections from "
             f"net.ipv4.ip_local_port_range, {span[0]}-{span[1]})") if span is not None else ""
    return (f"{where}: no process listens on this port, but a connection holds it (its local end: an "
            f"outgoing connection, or one still closing; `ss -tan 'sport = :{port}'` shows it); give "
            f"{whose} a free port{below}, or wait until that connection is closed")
