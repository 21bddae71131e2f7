"""YAML loading that remembers where every value came from, for ``FILE:LINE:`` errors.

``load_yaml`` composes the YAML node graph (keeping each node's mark) and turns
it into ``Src`` values: the plain Python value plus file and line. ``Problems``
collects messages in the ``FILE:LINE: message`` shape every config error uses.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import yaml

from proxy.units import yaml_scalar

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class Src:
    value: Any  # dict[str, Src] | list[Src] | str | int | float | bool | None
    file: str
    line: int  # 1-based
    key_lines: dict[Any, int] = field(default_factory=dict)  # for mappings: the line of each key
    raw: str | None = None  # a plain scalar YAML read as a number: as written (1:30 for 90)
    key_texts: dict[Any, str] = field(default_factory=dict)  # mapping keys read as numbers: as written
    # A scalar read as null after these problems (an unset ${VAR}, a value YAML cannot build):
    # said where it is written, and not again as a missing value ("required").
    refused: tuple[str, ...] = ()

    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def as_text(self) -> str:
        """A scalar taken as a string: a number as written (a header value ``010`` stays 010, not
        YAML's octal 8; ``1.50`` stays 1.50)."""
        return self.raw if self.raw is not None else str(self.value)

    def key_text(self, key: Any) -> str:
        """One of this mapping's keys taken as a string, as written (``as_text``)."""
        return self.key_texts.get(key, str(key))


class Problems:
    """Errors (the config is refused) and warnings (it runs, but probably not as meant)."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._where: list[tuple[str, int]] = []
        self.warnings: list[str] = []
        self._warned_at: list[tuple[str, int]] = []

    def add(self, at: Src | tuple[str, int], message: str) -> None:
        file, line = (at.file, at.line) if isinstance(at, Src) else at
        self.items.append(f"{file}:{line}: {message}")
        self._where.append((file, line))

    def warn(self, at: Src | tuple[str, int], message: str) -> None:
        """A ``FILE:LINE: warning: message`` that does not refuse the config."""
        file, line = (at.file, at.line) if isinstance(at, Src) else at
        self.warnings.append(f"{file}:{line}: warning: {message}")
        self._warned_at.append((file, line))

    def __bool__(self) -> bool:
        return bool(self.items)

    def reported_at(self, at: tuple[str, int]) -> list[str]:
        """The problems already reported at ``at`` (FILE, LINE): a check of several fields then
        says nothing more of a value that was refused where it is written."""
        return [item for item, where in zip(self.items, self._where, strict=True) if where == at]

    def extend(self, other: Problems) -> None:
        self.items.extend(other.items)
        self._where.extend(other._where)
        self.warnings.extend(other.warnings)
        self._warned_at.extend(other._warned_at)

    def ordered(self) -> list[str]:
        """The messages by file (in the order files came up) and line, to read top-down."""
        return _by_place(self.items, self._where)

    def ordered_warnings(self) -> list[str]:
        return _by_place(self.warnings, self._warned_at)


def _by_place(messages: list[str], where: list[tuple[str, int]]) -> list[str]:
    files: dict[str, int] = {}
    for file, _ in where:
        files.setdefault(file, len(files))
    order = sorted(range(len(messages)), key=lambda i: (files[where[i][0]], where[i][1]))
    return [messages[i] for i in order]


class Sources:
    """Where the config file and its rule files are read from.

    By default the file system, keeping the bytes of every file read (``read``, by absolute
    path): what a load validated, exactly. With ``snapshot`` (such bytes, from an earlier load)
    from those bytes only: a supervisor's workers load what it last loaded good, its rule
    files too, whatever happened to the files since (``proxy.supervisor.ConfigCopy``)."""

    def __init__(self, snapshot: Mapping[str, bytes] | None = None) -> None:
        self.snapshot = snapshot
        self.read: dict[str, bytes] = {}

    def data(self, path: str) -> bytes:
        """The bytes of ``path``; OSError as reading the file would give."""
        key = os.path.abspath(path)
        if self.snapshot is not None:
            if key not in self.snapshot:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            data = self.snapshot[key]
        else:
            data = read_regular(path)
        self.read[key] = data
        return data

    def identity(self, path: str) -> str:
        """What makes two paths one file: its real path (links followed); in a snapshot, its
        path as the load that took it saw it."""
        return os.path.abspath(path) if self.snapshot is not None else os.path.realpath(path)

    def why_not(self, path: str) -> str | None:
        """Why ``path`` cannot be read as a rule file ("does not exist", "is a directory", ...),
        or None. A rule file is a regular file: not a directory, nor a device (/dev/zero would
        be read forever), FIFO or socket."""
        if self.snapshot is not None:
            return None if os.path.abspath(path) in self.snapshot else "does not exist"
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return "does not exist"
        except OSError as exc:
            return f"cannot be read: {exc.strerror or exc}"
        return None if stat.S_ISREG(st.st_mode) or _is_null(st) else _not_regular(st.st_mode)


class NotRegularFile(OSError):
    """A config or rule file that is a FIFO, socket or device: read, it would block or never end."""


def _kind(mode: int) -> str:
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")


def _is_null(st: os.stat_result) -> bool:
    """/dev/null (``os.devnull``, by any name): read as an empty file, as the shell
    idiom ``--config /dev/null`` means; the other devices are refused (/dev/zero never ends)."""
    return stat.S_ISCHR(st.st_mode) and os.path.samestat(st, os.stat(os.devnull))


def _not_regular(mode: int) -> str:
    """What a path that is not a regular file is, in the words both config and rule files get."""
    return "is a directory" if stat.S_ISDIR(mode) else f"is not a regular file ({_kind(mode)})"


def read_regular(path: str) -> bytes:
    """The bytes of ``path``, a regular file; ``NotRegularFile`` for anything else
    (``open_regular``)."""
    with open_regular(path) as f:
        return f.read()


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def open_regular(path: str, fifo: bool = False) -> BinaryIO:
    """``path`` open for reading, a regular file; ``NotRegularFile`` for anything else. Opened
    without blocking and checked on the open file (no window to swap it between a check and
    the read): a FIFO's open and read would wait for a writer forever (a reload that never
    answered, a stop that never ended, ``cachegate check`` hung), /dev/zero never ends; /dev/null
    is the empty file it reads as (``_is_null``). With ``fifo``, a FIFO or pipe is taken too,
    opened again to wait for its writer (a command's input: ``--urls <(grep ...)``), as a
    stream its reader bounds."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    try:
        # A FIFO taken is opened once, waiting for its writer: opened without blocking, then
        # closed and opened again, what a writer wrote in between was dropped with the last
        # reader gone (the reader then waited for another writer, for ever).
        fd = os.open(path, flags if fifo and _is_fifo(path) else flags | os.O_NONBLOCK)
    except OSError as exc:  # a socket cannot be opened (ENXIO): say what it is
        try:
            mode = os.stat(path).st_mode
        except OSError:
            raise exc from None
        if stat.S_ISREG(mode):
            raise
        raise NotRegularFile(exc.errno, _not_regular(mode), path) from None
    try:
        st = os.fstat(fd)
        if fifo and stat.S_ISFIFO(st.st_mode) and os.get_blocking(fd) is False:
            os.close(fd)  # (a FIFO only since the look above: rare; see there for what it costs)
            fd = -1
            fd = os.open(path, flags)  # (waits for a writer)
            st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) and not _is_null(st) and not (fifo and stat.S_ISFIFO(st.st_mode)):
            raise NotRegularFile(errno.EINVAL, _not_regular(st.st_mode), path)
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
        fd = -1
        return f
    finally:
        if fd >= 0:
            os.close(fd)


def dump_snapshot(files: Mapping[str, bytes]) -> bytes:
    """``Sources.read`` as one file (``load_snapshot`` reads it back)."""
    return json.dumps({"files": {path: base64.b64encode(data).decode("ascii")
                                 for path, data in files.items()}}).encode()


def load_snapshot(path: str) -> Sources:
    """The ``Sources`` of a file ``dump_snapshot`` wrote; OSError or ValueError when it cannot."""
    with open(path, "rb") as f:
        raw = json.loads(f.read())
    files = raw["files"] if isinstance(raw, dict) else None
    if not isinstance(files, dict):
        raise ValueError("not a snapshot of config files")
    return Sources({str(p): base64.b64decode(d, validate=True) for p, d in files.items()})


MERGE_REFUSED = ("merge keys (<<:) are not supported in cachegate's files, as anchors and aliases are "
                 "not: write the values out")


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that cachegate's files do not take (reported without "syntax error")."""


class _Loader(yaml.SafeLoader):
    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        # Anchors and aliases (and so ``<<: *merge``) are refused: a config has no need of
        # them, and an alias shares a node, which a few bytes can nest into billions of values.
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(problem="anchors and aliases (&name, *name) are not supported in "
                                   "cachegate's files: write the value out",
                           problem_mark=event.start_mark)
        node: yaml.Node | None = super().compose_node(parent, index)
        return node


def _expand_env(text: str, at: tuple[str, int], problems: Problems) -> str | None:
    """``text`` with its ``${VAR}`` expanded; None after a problem for each one that is not set
    (the value is then read as an unreadable one is: not checked again, which only added a
    second error about the empty text left, such as ``bad size ''``)."""
    unset = False

    def sub(m: re.Match[str]) -> str:
        nonlocal unset
        value = os.environ.get(m.group(1))
        if value is None:
            if m.group(2) is not None:
                return m.group(2)
            problems.add(at, f"environment variable {m.group(1)} is not set")
            unset = True
            return ""
        return value

    expanded = _ENV.sub(sub, text)
    return None if unset else expanded


_UNREADABLE = object()


def _scalar(node: yaml.Node, file: str, loader: _Loader, problems: Problems) -> Any:
    """A scalar's value, or ``_UNREADABLE`` after a ``FILE:LINE`` problem: YAML resolves some
    plain scalars to values Python cannot build (an integer over 4300 digits, a date such as
    2024-13-45)."""
    try:
        return loader.construct_object(node, deep=True)
    except ValueError as exc:
        line = node.start_mark.line + 1
        text = str(node.value)
        if node.tag == "tag:yaml.org,2002:int":
            problems.add((file, line), f"an integer of {len(text)} characters is too long to read "
                                       "(at most 4300 digits)")
        else:
            shown = text if len(text) <= 40 else text[:40] + "..."
            problems.add((file, line), f"cannot read {shown!r} as a {node.tag.rsplit(':', 1)[-1]}: "
                                       f"{exc} (quote it to write a string)")
        return _UNREADABLE


def _convert(node: yaml.Node, file: str, loader: _Loader, problems: Problems) -> Src:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Src] = {}
        key_lines: dict[Any, int] = {}
        key_texts: dict[Any, str] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):  # before hashing it
                problems.add((file, key_node.start_mark.line + 1), "a key must be a scalar")
                continue
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<:``, with or without an alias
                raise _Refused(problem=MERGE_REFUSED, problem_mark=key_node.start_mark)
            key = _scalar(key_node, file, loader, problems)
            if key is _UNREADABLE:
                continue
            if key in out:
                problems.add((file, key_node.start_mark.line + 1), f"duplicate key {yaml_scalar(key)}")
            out[key] = _convert(value_node, file, loader, problems)
            key_lines[key] = key_node.start_mark.line + 1
            if isinstance(key, int | float) and not isinstance(key, bool):
                key_texts[key] = str(key_node.value)
        return Src(out, file, line, key_lines, key_texts=key_texts)
    if isinstance(node, yaml.SequenceNode):
        return Src([_convert(n, file, loader, problems) for n in node.value], file, line)
    before = len(problems.items)
    value = _scalar(node, file, loader, problems)
    if value is _UNREADABLE:
        return Src(None, file, line, refused=tuple(problems.items[before:]))
    if isinstance(value, str) and node.tag == "tag:yaml.org,2002:str":
        value = _expand_env(value, (file, line), problems)
        if value is None:  # its problems kept on it: another value may share its line (flow style)
            return Src(None, file, line, refused=tuple(problems.items[before:]))
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Src(value, file, line, raw=str(node.value))
    return Src(value, file, line)


def load_yaml(path: str, problems: Problems, display: str | None = None,
              sources: Sources | None = None) -> Src | None:
    """Parse ``path`` (read from ``sources``: by default the file system); on failure record
    ``FILE:LINE: message`` and return None."""
    name = display or path
    try:
        data = (sources or Sources()).data(path)
    except OSError as exc:
        problems.add((name, 0), f"cannot read file: {exc.strerror or exc}")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        problems.add((name, line), f"not UTF-8 text: byte 0x{data[exc.start]:02x} "
                                   "(save the file as UTF-8)")
        return None
    return parse_yaml(text, name, problems)


def parse_yaml(text: str, name: str, problems: Problems) -> Src | None:
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # the reader checks every character here
        node = loader.get_single_node()
        if node is None:
            return Src({}, name, 1)
        return _convert(node, name, loader, problems)
    except _Refused as exc:
        problems.add((name, exc.problem_mark.line + 1 if exc.problem_mark else 1), str(exc.problem))
        return None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        hint = ""
        lines = text.splitlines()
        if 0 < line <= len(lines) and "${" in lines[line - 1] and re.search(r"[\[{]", lines[line - 1]):
            # ``cache: {memory: ${M}}``: in YAML's [...] and {...}, braces are syntax.
            hint = " (inside [...] or {...}, quote a ${VAR}: '${VAR}')"
        problems.add((name, line), f"YAML syntax error: {exc.problem or exc.context}{hint}")
        return None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (a control character)
        line = text.count("\n", 0, exc.position) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or "\0")
        problems.add((name, line), f"YAML error: character U+{char:04X} is not allowed (write a control "
                                   "character as an escape in a double-quoted string)")
        return None
    except yaml.YAMLError as exc:
        problems.add((name, 0), f"YAML error: {exc}")
        return None
    except RecursionError:
        mark = loader.get_mark() if loader is not None else None
        problems.add((name, mark.line + 1 if mark else 1), "YAML error: nested too deeply")
        return None
    finally:
        if loader is not None:
            loader.dispose()
