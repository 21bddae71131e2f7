"""The ``proxy`` package's imports, read statically with ``ast``: no circles, and the layers hold.

Two graphs. Module level: the imports that run when a module is imported (those under
``if TYPE_CHECKING:`` do not, and are left out). No circle at all is allowed there. With the
imports inside functions too (the lazy ones: a command that needs the server imports it when
it runs): no circle either, except the few named in ``LAZY_CIRCLES``, each a deliberate pair
whose reason is written beside it. A circle is found as a strongly connected component of
the graph (Tarjan), so every circle is reported, not just the first.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "proxy"

# Circles through imports inside functions that stay on purpose (each pair, sorted), each
# lazy in one direction only:
LAZY_CIRCLES = {
    # The package's join() imports the node (and with it the Redis client) only when a
    # cluster: section asks for it; the node imports the package's errors.
    ("proxy.cluster", "proxy.cluster.node"),
    # The admin app mounts the console; the console's handlers borrow three of the admin
    # API's helpers (its JSON reader, token check and query parser) where they use them.
    ("proxy.web.admin", "proxy.web.console"),
    # The fast path sends files with the general handler's sendfile; the general handler's
    # server factory installs the fast path's request handler where it builds the server.
    ("proxy.web.fastpath", "proxy.web.proxy_handler"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(tree: ast.AST, modules: dict[str, Path], *, in_functions: bool) -> set[str]:
    """The package's modules ``tree`` imports (``from proxy.x import y`` counts as proxy.x.y
    when that is a module, else proxy.x)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) and not in_functions:
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "proxy")
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module \
                    and child.module.split(".")[0] == "proxy":
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    found.add(full if full in modules else child.module)
            visit(child)

    visit(tree)
    return {m for m in found if m in modules}


@functools.cache
def graph(*, in_functions: bool) -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(ast.parse(path.read_text(encoding="utf-8")), modules, in_functions=in_functions)
            - {name} for name, path in modules.items()}


def circles(g: dict[str, set[str]]) -> Iterator[tuple[str, ...]]:
    """Every strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def connect(v: str) -> Iterator[tuple[str, ...]]:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                yield from connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                yield tuple(sorted(component))

    for v in sorted(g):
        if v not in index:
            yield from connect(v)


def test_the_walk_finds_the_package_and_a_planted_circle() -> None:
    g = graph(in_functions=True)
    assert {"proxy.cli", "proxy.config", "proxy.settings", "proxy.supervisor", "proxy.web.server"} <= set(g)
    assert "proxy.settings" in g["proxy.config"]
    assert list(circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})) == [("a", "b", "c")]


def test_no_module_level_import_circle() -> None:
    assert list(circles(graph(in_functions=False))) == []


def test_no_import_circle_even_through_imports_inside_functions_beyond_the_named_ones() -> None:
    found = set(circles(graph(in_functions=True)))
    assert found - LAZY_CIRCLES == set(), "a new import circle (move what both sides need to a module below them)"
    assert LAZY_CIRCLES - found == set(), "a named circle is gone: take it out of LAZY_CIRCLES"


def test_the_settings_sit_below_what_runs_them() -> None:
    """config and the settings module import no storage, upstream, engine, runtime or web module;
    the storage tiers take their setting types from the settings module, not from config."""
    g = graph(in_functions=True)

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for m in g[todo.pop()] - seen:
                seen.add(m)
                todo.append(m)
        return seen

    runtime_side = ("proxy.storage", "proxy.upstream", "proxy.engine", "proxy.runtime", "proxy.web",
                    "proxy.config", "proxy.cli", "proxy.supervisor")
    assert not {m for m in reaches("proxy.settings") if m.startswith(runtime_side)}
    assert not {m for m in reaches("proxy.config") if m.startswith(runtime_side[:-3])}
    storage_imports = set().union(*(g[m] for m in g if m.startswith("proxy.storage")))
    assert "proxy.settings" in storage_imports and "proxy.config" not in storage_imports
