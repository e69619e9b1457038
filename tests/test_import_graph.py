"""The package's import graph has no circle: a reader follows one socket from creation to report
by going down imports, never back up one.

The graph is read from the source: every ``import`` and ``from ... import`` at any depth (the lazy
ones inside functions too), except those under ``if TYPE_CHECKING:`` (annotations only, never run),
and every module looked up by name (``sys.modules.get("leakguard.metrics")``, ``import_module(...)``,
the at-fork handler's ``FORK_ORDER``): an import in all but name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"leakguard": ROOT / "leakguard", "leakguard.integrations": ROOT / "integrations"}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):  # subpackages too (leakguard.pytest_plugin)
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


#: calls whose first argument names a module they use
_BY_NAME = {"sys.modules.get", "importlib.import_module", "import_module", "__import__"}


def _type_checking(test: ast.expr) -> bool:
    return "TYPE_CHECKING" in ast.unparse(test)


def imports_of(name: str, path: Path) -> dict[str, int]:
    """The package's modules *name* imports (or names), each with the first line doing it."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(module: str, line: int) -> None:
        if module in MODULES and module != name and not name.startswith(module + "."):
            found.setdefault(module, line)  # a parent package is imported before its modules anyway

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child.lineno)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                subs = [f"{module}.{a.name}" for a in child.names if f"{module}.{a.name}" in MODULES]
                for sub in subs:
                    add(sub, child.lineno)
                if len(subs) < len(child.names):
                    add(module, child.lineno)
            elif isinstance(child, ast.Call) and ast.unparse(child.func) in _BY_NAME:
                for arg in child.args[:1]:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        add(arg.value, child.lineno)
            elif isinstance(child, ast.Subscript) and ast.unparse(child.value) == "sys.modules":
                if isinstance(child.slice, ast.Constant) and isinstance(child.slice.value, str):
                    add(child.slice.value, child.lineno)
            elif isinstance(child, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id.endswith("_ORDER") for t in child.targets
            ):  # a table of modules called by name (_state.FORK_ORDER)
                for const in ast.walk(child.value):
                    if isinstance(const, ast.Constant) and isinstance(const.value, str):
                        add(const.value, child.lineno)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return found


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan), or self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            connect(v)
    return out


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


class TestImportGraph:
    """No module imports, directly or through others, a module that imports it back."""

    def test_the_walker_sees_the_package(self) -> None:
        assert {
            "leakguard.registry",
            "leakguard.judge",
            "leakguard.watcher",
            "leakguard.integrations._pools",
            "leakguard.pytest_plugin",
        } <= set(MODULES)
        # Lazy, relative, absolute and by-name imports are all edges.
        assert "leakguard.snapshot" in GRAPH["leakguard.watcher"]
        assert "leakguard.integrations" in GRAPH["leakguard._state"]
        assert "leakguard.metrics" in GRAPH["leakguard.watcher"]  # sys.modules.get("leakguard.metrics")

    def test_the_walker_finds_a_circle(self) -> None:
        """Its own check: a made-up graph with a circle is caught."""
        graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
        assert circles(graph) == [["a", "b", "c"]]

    def test_no_circle(self) -> None:
        found = circles(GRAPH)
        detail = [
            f"{a} -> {b} (line {GRAPH[a][b]})" for comp in found for a in comp for b in GRAPH[a] if b in comp
        ]
        assert found == [], "\n".join(detail)

    @pytest.mark.parametrize(
        "low, high",
        [
            ("leakguard.registry", "leakguard.kernel"),  # record, then observe
            ("leakguard.kernel", "leakguard.judge"),  # observe, then judge
            ("leakguard.judge", "leakguard.snapshot"),  # judge, then join (the snapshot asks the judge)
            ("leakguard.report", "leakguard.snapshot"),  # render what it is handed (Snapshot.to_dict asks report)
            ("leakguard.report", "leakguard.watcher"),  # render, then report periodically
            ("leakguard.metrics", "leakguard.watcher"),  # the watcher feeds the metrics
            ("leakguard.judge", "leakguard.integrations._pools"),  # the pools are judged, and log nothing
        ],
    )
    def test_the_path_of_a_socket_goes_one_way(self, low: str, high: str) -> None:
        """*high* may depend on *low*, never *low* on *high* (nor through others)."""
        seen, todo = set(), [low]
        while todo:
            here = todo.pop()
            for there in GRAPH[here]:
                if there not in seen:
                    seen.add(there)
                    todo.append(there)
        assert high not in seen, f"{low} depends on {high}"

    def test_the_pools_get_their_sink_from_install(self) -> None:
        assert not {"leakguard._state", "leakguard.report"} & set(GRAPH["leakguard.integrations._pools"])
