"""The package's shape, read from its source with ``ast``: nothing is imported.

The rules are the table below, each with its reason.  A failure names every
culprit (module, line, import) so that the fix is plain.  The checker is tested
too, on small fabricated packages, so that it cannot pass by finding nothing.

An import counts wherever it is written: at module level or inside a function.
A lazy import still ties the two modules together in the design, even when it
does not break at import time.  Imports under ``if TYPE_CHECKING:`` do not
count: they are never executed.  ``importlib.import_module("mpnb.x")`` and
``sys.modules["mpnb.x"]`` (or ``.get``) with a literal name count as imports of
``mpnb.x``: they are the same dependency, hidden.  Importing ``mpnb.a.b`` counts
as depending on ``mpnb.a.b`` alone, not on the packages above it, and
``from mpnb.a import name`` as depending on the module of ``mpnb.a`` that
defines ``name`` when ``mpnb/a/__init__.py`` imports it from there.  The top
package (``mpnb/__init__.py``) is no part of the graph: it is the door above
every module, and imports what it exports only when a name is asked for.
"""

from __future__ import annotations

import ast
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "mpnb"
SOURCE = Path(os.environ.get("MPNB_SOURCE") or Path(__file__).resolve().parents[1])

# -- the rules -----------------------------------------------------------------------

NO_CYCLES = ("modules import each other in one direction only: a cycle means neither side "
             "can be understood, tested or changed alone (a lazy import hides the cycle, "
             "it does not remove it)")

# (importer, imported, reason); importer is a module or a package (with everything in it)
FORBIDDEN_IMPORTS = [
    ("mpnb.backends", "mpnb.pool",
     "engines are mechanics under the pool's policy: they talk to it through the engine "
     "contract, never by importing it"),
    ("mpnb.backends", "mpnb.view",
     "engines report to the monitor; what the notebook shows is decided above them"),
    ("mpnb.backends", "mpnb.widget",
     "engines report to the monitor; what the notebook shows is decided above them"),
    ("mpnb.widget", "mpnb.view",
     "the view decides and the widget draws the facts it is given; nothing reads back up"),
]

MAX_FUNCTION_LINES = 60
FUNCTION_REASON = "a function fits on a screen"

# module -> (most lines, reason)
MAX_MODULE_LINES = {
    "mpnb.pool": (700, "pool.py is policy only: chunks, waiting, output, interrupts, results; "
                       "mechanics live in the engines"),
}


# -- the checker ---------------------------------------------------------------------

@dataclass(frozen=True)
class Import:
    """One dependency of ``importer`` on ``imported``, written at ``path:line``."""

    importer: str
    imported: str
    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line} {self.importer} imports {self.imported}"


def find_modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Module name -> source file, for every ``.py`` under ``root/package``."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _literal_module(node: ast.AST) -> str | None:
    """The module named by ``import_module("x")``, ``sys.modules["x"]`` or ``.get("x")``."""
    if isinstance(node, ast.Subscript):
        target, key = node.value, node.slice
    elif isinstance(node, ast.Call) and node.args:
        func, key = node.func, node.args[0]
        is_get = isinstance(func, ast.Attribute) and func.attr == "get"
        target = func.value if is_get else func
    else:
        return None
    name = getattr(target, "attr", getattr(target, "id", None))
    if name in ("modules", "import_module") and isinstance(key, ast.Constant) \
            and isinstance(key.value, str):
        return key.value
    return None


class _ImportFinder(ast.NodeVisitor):
    def __init__(self, name: str, is_package: bool, modules: dict[str, Path], path: str,
                 reexports: dict[str, dict[str, str]]):
        self.name, self.modules, self.path, self.reexports = name, modules, path, reexports
        # the package that relative imports start from
        self.base = name if is_package else name.rpartition(".")[0]
        self.found: list[Import] = []

    def known(self, dotted: str) -> str | None:
        """The longest prefix of ``dotted`` that is a module of the package."""
        parts = dotted.split(".")
        while parts:
            candidate = ".".join(parts)
            if candidate in self.modules:
                return candidate
            parts.pop()
        return None

    def source_of(self, node: ast.ImportFrom) -> str:
        """The absolute name of the module ``node`` imports from."""
        if not node.level:
            return node.module or ""
        parts = self.base.split(".")
        parts = parts[:len(parts) - (node.level - 1)]
        return ".".join(parts + ([node.module] if node.module else []))

    def target(self, source: str, name: str) -> str:
        """``from source import name``: ``name`` is a submodule, a name that the package
        ``source`` re-exports from one of its modules, or a name defined in ``source``."""
        submodule = f"{source}.{name}"
        if submodule in self.modules:
            return submodule
        return self.reexports.get(source, {}).get(name, source)

    def _add(self, dotted: str, node: ast.AST) -> None:
        module = self.known(dotted)
        if module is not None and module != self.name:
            self.found.append(Import(self.name, module, self.path, node.lineno))

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.visit(node.test)
            for child in node.body:
                self.visit(child)
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = self.source_of(node)
        for alias in node.names:
            self._add(self.target(source, alias.name), node)

    def generic_visit(self, node: ast.AST) -> None:
        literal = _literal_module(node)
        if literal is not None:
            self._add(literal, node)
        super().generic_visit(node)


def _reexports(modules: dict[str, Path]) -> dict[str, dict[str, str]]:
    """Package -> {name: the package's module that defines it}, for each name that a
    package's ``__init__`` imports from its own modules; ``if TYPE_CHECKING:`` imports
    included, since they say where a lazily exported name lives."""
    found: dict[str, dict[str, str]] = {}
    for package, path in modules.items():
        if path.name != "__init__.py":
            continue
        finder = _ImportFinder(package, True, modules, "", {})
        names = found.setdefault(package, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                source = finder.source_of(node)
                for alias in node.names:
                    module = finder.known(finder.target(source, alias.name))
                    if module is not None and module != package:
                        names[alias.asname or alias.name] = module
    return found


def find_imports(root: Path, package: str = PACKAGE) -> list[Import]:
    """Every import of one of the package's modules by another, anywhere in its source,
    once per line.  The top package itself (``mpnb/__init__.py``) is left out: it is the
    door, above every module, and imports what it exports only when a name is asked for;
    a name imported from it counts as an import of the module that defines the name."""
    modules = find_modules(root, package)
    reexports = _reexports(modules)
    found: dict[Import, None] = {}
    for name, path in modules.items():
        finder = _ImportFinder(name, path.name == "__init__.py", modules,
                               str(path.relative_to(root)), reexports)
        finder.visit(ast.parse(path.read_text(), str(path)))
        found.update((i, None) for i in finder.found if package not in (i.importer, i.imported))
    return list(found)


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of ``graph``, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.get(successor, ())))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def import_cycles(imports: list[Import]) -> list[tuple[list[str], list[Import]]]:
    """Each group of modules that import each other in a circle, with the imports inside it."""
    graph: dict[str, set[str]] = {}
    for found in imports:
        graph.setdefault(found.importer, set()).add(found.imported)
        graph.setdefault(found.imported, set())
    cycles = []
    for component in _strongly_connected(graph):
        if len(component) > 1:
            members = set(component)
            inside = [i for i in imports if i.importer in members and i.imported in members]
            cycles.append((component, sorted(inside, key=lambda i: (i.path, i.line))))
    return cycles


def shortest_cycle(start: str, imports: list[Import]) -> list[str]:
    """The shortest chain of imports from ``start`` back to itself ([] if there is none)."""
    graph: dict[str, set[str]] = {}
    for found in imports:
        graph.setdefault(found.importer, set()).add(found.imported)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph.get(node, ())):
                if successor == start:
                    return paths[node] + [start]
                if successor not in paths:
                    paths[successor] = paths[node] + [successor]
                    following.append(successor)
        frontier = following
    return []


def _within(module: str, scope: str) -> bool:
    return module == scope or module.startswith(scope + ".")


def forbidden_imports(imports: list[Import]) -> list[tuple[Import, str]]:
    """Each import that a rule of FORBIDDEN_IMPORTS forbids, with the rule's reason."""
    return [(found, reason)
            for importer, imported, reason in FORBIDDEN_IMPORTS
            for found in imports
            if _within(found.importer, importer) and _within(found.imported, imported)]


def long_functions(root: Path, package: str = PACKAGE,
                   limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(``path:line qualified.name``, lines) of each function longer than ``limit`` lines,
    counted from its ``def`` to its last line."""
    found = []
    for name, path in find_modules(root, package).items():
        def walk(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    qualified = f"{prefix}.{child.name}"
                    length = child.end_lineno - child.lineno + 1
                    if not isinstance(child, ast.ClassDef) and length > limit:
                        found.append((f"{path.relative_to(root)}:{child.lineno} {qualified}",
                                      length))
                    walk(child, qualified)
                else:
                    walk(child, prefix)

        walk(ast.parse(path.read_text(), str(path)), name)
    return found


def long_modules(root: Path, package: str = PACKAGE) -> list[tuple[str, int, int, str]]:
    """(module, lines, most lines allowed, reason) of each module over its limit."""
    modules = find_modules(root, package)
    found = []
    for name, (limit, reason) in MAX_MODULE_LINES.items():
        if name in modules:
            lines = len(modules[name].read_text().splitlines())
            if lines > limit:
                found.append((name, lines, limit, reason))
    return found


# -- the package obeys the rules -----------------------------------------------------

def test_the_package_is_found_and_read():
    """The rules below would pass on an empty list: make sure the package was read."""
    modules = find_modules(SOURCE)
    assert {"mpnb", "mpnb.pool", "mpnb.backends", "mpnb.backends.local"} <= set(modules), (
        f"the package's source was not found under {SOURCE}")
    imports = {(i.importer, i.imported) for i in find_imports(SOURCE)}
    assert ("mpnb.cellmodule", "mpnb.cells") in imports, sorted(imports)
    assert ("mpnb.backends.launcher", "mpnb._worker") in imports, sorted(imports)


def test_no_import_cycle():
    cycles = import_cycles(find_imports(SOURCE))
    report = "\n\n".join(
        "cycle between " + ", ".join(members) + " (the shortest: "
        + " -> ".join(shortest_cycle(members[0], inside)) + "), through these imports:\n"
        + "\n".join(f"  {found}" for found in inside)
        for members, inside in cycles)
    assert not cycles, f"{NO_CYCLES}.\n\n{report}"


def test_no_forbidden_import():
    found = forbidden_imports(find_imports(SOURCE))
    report = "\n".join(f"  {i}: {reason}" for i, reason in found)
    assert not found, f"imports that go up or sideways:\n{report}"


def test_functions_fit_on_a_screen():
    found = long_functions(SOURCE)
    report = "\n".join(f"  {where}: {lines} lines" for where, lines in found)
    assert not found, (f"{FUNCTION_REASON}: {MAX_FUNCTION_LINES} lines at most; "
                       f"split these:\n{report}")


def test_modules_within_their_size():
    found = long_modules(SOURCE)
    report = "\n".join(f"  {name}: {lines} lines, {limit} at most: {reason}"
                       for name, lines, limit, reason in found)
    assert not found, f"modules over their size:\n{report}"


# -- the checker finds what it should, on fabricated packages ------------------------

def make_package(root: Path, files: dict[str, str]) -> Path:
    """Write ``files`` (path under root -> source) and return root."""
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root


def edges(root: Path) -> set[tuple[str, str]]:
    return {(i.importer, i.imported) for i in find_imports(root)}


def test_checker_finds_a_cycle_through_a_lazy_relative_import(tmp_path):
    root = make_package(tmp_path, {
        "mpnb/__init__.py": "",
        "mpnb/a.py": "from mpnb import b\n",
        "mpnb/b.py": "def f():\n    from . import c\n",
        "mpnb/c.py": "def g():\n    from .a import name\n",
        "mpnb/d.py": "import mpnb.a\n",
    })
    cycles = import_cycles(find_imports(root))
    assert [members for members, _ in cycles] == [["mpnb.a", "mpnb.b", "mpnb.c"]]
    assert shortest_cycle("mpnb.b", cycles[0][1]) == ["mpnb.b", "mpnb.c", "mpnb.a", "mpnb.b"]
    assert [(i.importer, i.imported, i.line) for i in cycles[0][1]] == [
        ("mpnb.a", "mpnb.b", 1), ("mpnb.b", "mpnb.c", 2), ("mpnb.c", "mpnb.a", 2)]


def test_checker_ignores_type_checking_imports(tmp_path):
    root = make_package(tmp_path, {
        "mpnb/__init__.py": "",
        "mpnb/a.py": "from mpnb import b\n",
        "mpnb/b.py": """\
            import typing
            TYPE_CHECKING = False
            if TYPE_CHECKING:
                from mpnb import a
            if typing.TYPE_CHECKING:
                import mpnb.a
            else:
                from mpnb import c
            """,
        "mpnb/c.py": "",
    })
    assert edges(root) == {("mpnb.a", "mpnb.b"), ("mpnb.b", "mpnb.c")}
    assert import_cycles(find_imports(root)) == []


def test_checker_resolves_every_form_of_import(tmp_path):
    root = make_package(tmp_path, {
        "mpnb/__init__.py": """\
            TYPE_CHECKING = False
            if TYPE_CHECKING:
                from mpnb.pool import Pool
            def load():
                from mpnb.magics import load
            """,
        "mpnb/magics.py": "",
        "mpnb/pool.py": "",
        "mpnb/view.py": "",
        "mpnb/backends/__init__.py": "from .local import Local\n",
        "mpnb/backends/local.py": "from .. import pool\nfrom ..magics import load\n",
        "mpnb/backends/dask.py": """\
            import sys, importlib
            import mpnb
            from mpnb import __version__
            from mpnb.backends import local
            from mpnb.backends import Local as L
            import mpnb.view.something
            def later():
                from mpnb import Pool
                sys.modules.get("mpnb.magics")
                sys.modules["mpnb.view"]
                importlib.import_module("mpnb.backends")
                import json, os.path
            """,
    })
    assert edges(root) == {
        ("mpnb.backends", "mpnb.backends.local"),
        ("mpnb.backends.local", "mpnb.pool"),
        ("mpnb.backends.local", "mpnb.magics"),
        ("mpnb.backends.dask", "mpnb.backends.local"),
        ("mpnb.backends.dask", "mpnb.view"),
        ("mpnb.backends.dask", "mpnb.pool"),
        ("mpnb.backends.dask", "mpnb.magics"),
        ("mpnb.backends.dask", "mpnb.backends"),
    }
    lines = sorted(i.line for i in find_imports(root) if i.importer == "mpnb.backends.dask")
    assert lines == [4, 5, 6, 8, 9, 10, 11]


def test_checker_finds_forbidden_imports(tmp_path):
    root = make_package(tmp_path, {
        "mpnb/__init__.py": "",
        "mpnb/pool.py": "",
        "mpnb/view.py": "",
        "mpnb/widget.py": "def draw():\n    from .view import facts\n",
        "mpnb/backends/__init__.py": "",
        "mpnb/backends/inner/__init__.py": "",
        "mpnb/backends/inner/engine.py": "def f():\n    from ...pool import Pool\n",
        "mpnb/viewer.py": "from mpnb import pool, view, widget\n",
    })
    found = sorted((i.importer, i.imported) for i, _ in forbidden_imports(find_imports(root)))
    assert found == [("mpnb.backends.inner.engine", "mpnb.pool"), ("mpnb.widget", "mpnb.view")]


def test_checker_finds_long_functions_and_modules(tmp_path):
    body = "    x = 1\n" * (MAX_FUNCTION_LINES - 1)
    root = make_package(tmp_path, {
        "mpnb/__init__.py": "",
        "mpnb/pool.py": ("def fits():\n" + body + "\n\nclass C:\n"
                         + textwrap.indent("def too_long():\n" + body + "    x = 2\n", "    ")
                         + "\n" * (MAX_MODULE_LINES["mpnb.pool"][0] - 2 * MAX_FUNCTION_LINES)),
    })
    assert long_functions(root) == [("mpnb/pool.py:64 mpnb.pool.C.too_long",
                                     MAX_FUNCTION_LINES + 1)]
    lines = len((root / "mpnb/pool.py").read_text().splitlines())
    assert lines > MAX_MODULE_LINES["mpnb.pool"][0]
    assert [(name, n) for name, n, _, _ in long_modules(root)] == [("mpnb.pool", lines)]
