"""The library's modules import each other without cycles (issue 17, item 2).

Every ``import`` statement counts, at module level or inside a function: a function-level import
that only postpones a cycle is still a cycle (the modules still depend on each other both ways).
Imports under ``if TYPE_CHECKING:`` never run and are left out. Importing ``a.b.c`` also runs the
packages ``a`` and ``a.b`` (their ``__init__``), so those are edges too, except from a module inside
them: a module's own packages have always started initialising before it runs, so reaching them
again reads nothing new, unless the import reads a name their ``__init__`` defines (``from . import
__version__``), which is an edge. Found with :mod:`ast`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "AnomalyDiffusionLib"


def module_names(pkg_dir: Path) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file of the package (``__init__`` names the package)."""
    out = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(pkg_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that can run: everywhere except the body of ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _with_parents(name: str, modules: dict[str, Path]) -> list[str]:
    """``name`` and the packages whose ``__init__`` importing it runs, those that are library modules."""
    parts = name.split(".")
    return [m for m in (".".join(parts[: i + 1]) for i in range(len(parts))) if m in modules]


def import_graph(pkg_dir: Path) -> dict[str, dict[str, int]]:
    """module → {imported library module: line of the first such import}."""
    modules = module_names(pkg_dir)
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]  # the package relative imports start from
        parts = mod.split(".")
        ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}  # packages that hold ``mod``
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = here[: len(here) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # "from pkg import name": name may be a submodule
                subs = [f"{prefix}.{a.name}" for a in node.names if f"{prefix}.{a.name}" in modules]
                reads_init = len(subs) < len(node.names)  # some name is defined in pkg's __init__
                targets = ([prefix] if reads_init or prefix not in ancestors else []) + subs
            for t in targets:
                for dep in _with_parents(t, modules):
                    if dep != mod and (dep == t or dep not in ancestors):
                        graph[mod].setdefault(dep, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strong(w)
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

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(out)


def _describe(comp: list[str], graph: dict[str, dict[str, int]], modules: dict[str, Path]) -> str:
    lines = [f"cycle among {', '.join(comp)}:"]
    for m in comp:
        for dep, line in sorted(graph[m].items()):
            if dep in comp:
                lines.append(f"  {modules[m].relative_to(ROOT)}:{line} imports {dep}")
    return "\n".join(lines)


def test_library_has_no_import_cycle() -> None:
    pkg = ROOT / PACKAGE
    graph = import_graph(pkg)
    found = cycles(graph)
    modules = module_names(pkg)
    assert not found, "\n".join(_describe(c, graph, modules) for c in found)


def test_bundle_module_reads_bytes_and_schema_only() -> None:
    """bundle.py imports no method and no network module (issue 17 item 2): the method side builds
    networks from a verified bundle, never the other way round."""
    graph = import_graph(ROOT / PACKAGE)
    assert set(graph[f"{PACKAGE}.bundle"]) <= {PACKAGE, f"{PACKAGE}.errors"}
    for method in ("fpdm", "dode"):
        assert f"{PACKAGE}.bundle" in graph[f"{PACKAGE}.{method}.model"]
        assert f"{PACKAGE}.bundle" in graph[f"{PACKAGE}.{method}.manifest"]


def test_library_graph_sees_the_known_edges() -> None:
    """The graph reads relative, package-level and function-level imports (a blind parser would
    pass the test above trivially)."""
    graph = import_graph(ROOT / PACKAGE)
    assert f"{PACKAGE}.errors" in graph[f"{PACKAGE}.volumes"]  # module level, "from .errors import ..."
    assert f"{PACKAGE}.pipeline" in graph[f"{PACKAGE}.cli"]  # inside a function
    assert f"{PACKAGE}.nets" in graph[f"{PACKAGE}.dode.score"]  # "from ..nets import ..."
    assert f"{PACKAGE}.diffusion" in graph[f"{PACKAGE}.fpdm.forward"]  # "from ..diffusion import ..."
    assert f"{PACKAGE}.fpdm" in graph[f"{PACKAGE}.methods"]  # the subpackage's __init__ runs first


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "pkg"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # a cycle closed by a function-level import is a cycle
        (
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "from .b import f\n",
                "pkg/b.py": "def f():\n    from .a import g\n    return g\n",
            },
            [["pkg.a", "pkg.b"]],
        ),
        # through a subpackage, with "from .. import module" and an absolute import
        (
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "import pkg.sub.c\n",
                "pkg/sub/__init__.py": "",
                "pkg/sub/c.py": "from .. import a\n",
            },
            [["pkg.a", "pkg.sub.c"]],
        ),
        # an import only for type checkers is not a cycle; one in its else branch is
        (
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "from .b import f\n",
                "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import g\n",
            },
            [],
        ),
        (
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "from .b import f\n",
                "pkg/b.py": "import typing\nif typing.TYPE_CHECKING:\n    pass\nelse:\n    from . import a\n",
            },
            [["pkg.a", "pkg.b"]],
        ),
        # a package __init__ importing a module that imports the package back
        (
            {"pkg/__init__.py": "from .a import x\n", "pkg/a.py": "from . import version\nx = 1\n"},
            [["pkg", "pkg.a"]],
        ),
        # one-way imports only
        (
            {"pkg/__init__.py": "", "pkg/a.py": "from . import b\n", "pkg/b.py": "import os\n"},
            [],
        ),
        # a package re-exporting its modules, which import each other one way: no cycle (their
        # package has started initialising before they run, and they read nothing from it)
        (
            {
                "pkg/__init__.py": "",
                "pkg/sub/__init__.py": "from .a import x\nfrom .b import y\n",
                "pkg/sub/a.py": "x = 1\n",
                "pkg/sub/b.py": "from .a import x\nfrom . import a\ny = x\n",
            },
            [],
        ),
        # ... but a module reading a name the re-exporting __init__ defines closes a cycle
        (
            {
                "pkg/__init__.py": "",
                "pkg/sub/__init__.py": "from .a import x\nz = 2\n",
                "pkg/sub/a.py": "from . import z\nx = z\n",
            },
            [["pkg.sub", "pkg.sub.a"]],
        ),
    ],
)
def test_cycle_finder(tmp_path: Path, files: dict[str, str], expected: list[list[str]]) -> None:
    assert cycles(import_graph(_write(tmp_path, files))) == expected
