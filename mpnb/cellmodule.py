"""Cell source -> a content-addressed module that child processes can import.

A notebook cell's functions live in ``__main__``, which a spawned child cannot
import, so pickle's by-reference lookup fails there.  :func:`build` moves the
cell's top-level definitions into a real module instead::

    cell source ──split──> definitions ──┬──> module source (same line numbers)
        │                                │        line 1: imports of the names
        │                                │        the definitions use from
        │                  free names ───┘        earlier cells; captured values
        │                      │                  loaded from a pickle beside it
        │                  resolve() against the notebook namespace
        │
        └──> rest: the other statements, run afterwards in the notebook

The module is named by a hash of its content, so a changed cell is a new
module and a warm worker can never run the old code.  Nothing here imports
IPython; :mod:`mpnb.magics` is the adapter.
"""

from __future__ import annotations

import ast
import builtins
import copy
import hashlib
import importlib
import os
import symtable
import sys
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import cloudpickle

from mpnb import cells, serialize
from mpnb.facts import byte_size

__all__ = [
    "CellModule",
    "CellModuleError",
    "UnpicklableNameError",
    "UndefinedNameError",
    "build",
    "split",
]

# Captures larger than this are allowed but announced: every worker loads them.
LARGE_CAPTURE_BYTES = int(os.environ.get("MPNB_LARGE_CAPTURE_BYTES", 50 * 2**20))

_MODULE_DUNDERS = frozenset(
    {"__name__", "__file__", "__doc__", "__spec__", "__loader__", "__package__",
     "__builtins__", "__cached__", "__annotations__", "__dict__", "__path__"}
)
_LITERAL_NODES = (
    ast.Constant, ast.Tuple, ast.List, ast.Set, ast.Dict, ast.UnaryOp, ast.BinOp,
    ast.unaryop, ast.operator, ast.Load, ast.expr_context,
)


class CellModuleError(Exception):
    """A cell's definitions cannot become a module; the message says why."""


class UndefinedNameError(CellModuleError, NameError):
    """A definition uses a name that no earlier cell defined."""


class UnpicklableNameError(CellModuleError, TypeError):
    """A definition uses a notebook value that cannot be sent to a worker."""


# ---------------------------------------------------------------- splitting


@dataclass
class SplitCell:
    """A cell cut into the definitions (module) and the rest (notebook)."""

    source: str
    definitions: list[ast.stmt]
    rest: list[ast.stmt]
    #: names the definitions bind at module level -> line
    defined: dict[str, int]
    #: names the other statements bind at top level -> line
    rest_assigned: dict[str, int]
    #: modules imported with ``from m import *``
    star_imports: list[str] = field(default_factory=list)


def _is_literal(node: ast.expr) -> bool:
    """A literal constant: numbers, strings, containers and arithmetic of them."""
    return all(isinstance(n, _LITERAL_NODES) for n in ast.walk(node))


def _simple_targets(targets: list[ast.expr]) -> list[str] | None:
    names: list[str] = []
    for target in targets:
        if isinstance(target, ast.Name):
            names.append(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)) and all(
            isinstance(e, ast.Name) for e in target.elts
        ):
            names.extend(e.id for e in target.elts)  # type: ignore[attr-defined]
        else:
            return None
    return names


def _bound_by_definition(node: ast.stmt) -> list[str] | None:
    """Names a top-level statement binds if it is a definition, else None."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [
            (alias.asname or alias.name.partition(".")[0])
            for alias in node.names
            if alias.name != "*"
        ]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign) and _is_literal(node.value):
        return _simple_targets(node.targets)
    if (
        isinstance(node, ast.AnnAssign)
        and node.value is not None
        and isinstance(node.target, ast.Name)
        and _is_literal(node.value)
    ):
        return [node.target.id]
    return None


class _TopLevelStores(ast.NodeVisitor):
    """Names a statement binds in the scope it runs in (not in nested scopes)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self.names.append(node.id)

    def _binds_name_only(self, node: Any) -> None:
        self.names.append(node.name)
        for deco in node.decorator_list:
            self.visit(deco)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _binds_name_only

    def visit_Lambda(self, node: ast.Lambda) -> None:
        pass

    def _comprehension(self, node: Any) -> None:
        # only the named-expression targets (:=) leak out of a comprehension
        for inner in ast.walk(node):
            if isinstance(inner, ast.NamedExpr) and isinstance(inner.target, ast.Name):
                self.names.append(inner.target.id)

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension

    def visit_alias(self, node: ast.alias) -> None:
        if node.name != "*":
            self.names.append(node.asname or node.name.partition(".")[0])

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self.names.append(node.name)
        self.generic_visit(node)


def split(source: str, filename: str = "<cell>") -> SplitCell:
    """Cut Python ``source`` into definitions and the rest, keeping line numbers."""
    tree = ast.parse(source, filename=filename)
    definitions, rest = [], []
    defined: dict[str, int] = {}
    rest_assigned: dict[str, int] = {}
    star_imports: list[str] = []
    for node in tree.body:
        bound = _bound_by_definition(node)
        if bound is None:
            rest.append(node)
            visitor = _TopLevelStores()
            visitor.visit(node)
            for name in visitor.names:
                rest_assigned.setdefault(name, node.lineno)
            continue
        definitions.append(node)
        for name in bound:
            defined.setdefault(name, node.lineno)
        if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
            star_imports.append("." * node.level + (node.module or ""))
    return SplitCell(source, definitions, rest, defined, rest_assigned, star_imports)


# ------------------------------------------------------------- free names


def _walk_tables(table: symtable.SymbolTable):
    yield table
    for child in table.get_children():
        yield from _walk_tables(child)


def free_names(cell: SplitCell) -> dict[str, str]:
    """Names the definitions read but do not define -> the definition using it.

    Builtin names are included (an earlier cell may shadow them); names that
    a function of the cell declares ``global`` and assigns (the initializer
    pattern) and annotations that are never evaluated are not.
    """
    used: dict[str, str] = {}
    assigned_globals: set[str] = set()
    lazy = _lazy_annotations(cell)
    for node in cell.definitions:
        owner = getattr(node, "name", None) or _statement_label(node)
        if lazy:
            node = _WithoutAnnotations().visit(copy.deepcopy(node))
        top = symtable.symtable(ast.unparse(node), "<cell>", "exec")
        for table in _walk_tables(top):
            for symbol in table.get_symbols():
                name = symbol.get_name()
                if table is top:
                    reads_global = symbol.is_referenced() and not (
                        symbol.is_assigned() or symbol.is_imported()
                    )
                else:
                    reads_global = symbol.is_referenced() and symbol.is_global()
                    if symbol.is_declared_global() and symbol.is_assigned():
                        assigned_globals.add(name)
                if reads_global:
                    used.setdefault(name, owner)
    skip = set(cell.defined) | assigned_globals | _MODULE_DUNDERS
    return {name: owner for name, owner in used.items() if name not in skip}


def _lazy_annotations(cell: SplitCell) -> bool:
    """Whether annotations are left unevaluated (PEP 563 future, or 3.14's PEP 649)."""
    if sys.version_info >= (3, 14):
        return True
    return any(
        isinstance(n, ast.ImportFrom) and n.module == "__future__"
        and any(a.name == "annotations" for a in n.names)
        for n in cell.definitions
    )


class _WithoutAnnotations(ast.NodeTransformer):
    def visit_arg(self, node: ast.arg) -> ast.arg:
        node.annotation = None
        return node

    def _function(self, node: Any) -> Any:
        node.returns = None
        self.generic_visit(node)
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.stmt:
        if node.value is None:
            return ast.Pass()
        target = node.target
        if isinstance(target, ast.Name):
            target = ast.Name(target.id, ast.Store())
        return ast.Assign(targets=[target], value=node.value, lineno=node.lineno)


def _statement_label(node: ast.stmt) -> str:
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        return ast.unparse(node).partition("=")[0].strip()
    return ast.unparse(node).splitlines()[0][:40]


# ------------------------------------------------------------- resolution


@dataclass
class Resolution:
    """How the module obtains each free name: header statements and captures."""

    imports: list[str] = field(default_factory=list)
    captured: dict[str, Any] = field(default_factory=dict)


def _importable_as(value: Any) -> tuple[str, str] | None:
    """(module, qualname) under which ``value`` can be imported, or None."""
    module = getattr(value, "__module__", None)
    qualname = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        return None
    if module in ("__main__", "builtins", "__mp_main__") or "<" in qualname:
        return None
    try:
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except Exception:
        return None
    return (module, qualname) if found is value else None


def _module_importable(module: types.ModuleType) -> bool:
    name = getattr(module, "__name__", "")
    if name in ("__main__", "__mp_main__") or getattr(module, "__spec__", None) is None:
        return False
    return True


def _star_names(modules: list[str]) -> set[str]:
    names: set[str] = set()
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        names.update(getattr(mod, "__all__", [n for n in vars(mod) if not n.startswith("_")]))
    return names


def resolve(cell: SplitCell, namespace: Mapping[str, Any]) -> Resolution:
    """Decide, for each free name, how the module gets it (see module doc)."""
    resolution = Resolution()
    star = _star_names(cell.star_imports) if cell.star_imports else set()
    for name, owner in sorted(free_names(cell).items()):
        if name in cell.rest_assigned:
            line = cell.rest_assigned[name]
            raise UndefinedNameError(
                f"`{owner}` uses `{name}`, which this cell assigns on line {line} in a "
                f"statement that is not a definition. %%mppool builds the module from "
                f"the definitions before the other statements run, so `{owner}` would "
                f"not see it. Move that assignment to an earlier cell, or make `{name}` "
                f"a literal constant."
            )
        if name in namespace:
            _resolve_one(name, namespace[name], owner, resolution)
        elif name in star or hasattr(builtins, name):
            continue
        else:
            raise UndefinedNameError(
                f"`{owner}` uses `{name}`, which is not defined: neither this cell's "
                f"definitions nor an earlier cell bind it. Define `{name}` in this cell "
                f"or run the cell that defines it first."
            )
    return resolution


def _resolve_one(name: str, value: Any, owner: str, resolution: Resolution) -> None:
    if isinstance(value, types.ModuleType):
        if not _module_importable(value):
            raise UnpicklableNameError(
                f"`{owner}` uses the module `{name}` ({value!r}), which worker processes "
                f"cannot import. Import it inside the cell instead."
            )
        real = value.__name__
        resolution.imports.append(f"import {real}" if real == name else f"import {real} as {name}")
        return
    if value is getattr(builtins, name, object()):
        return
    where = _importable_as(value)
    if where is not None:
        module, qualname = where
        first, _, more = qualname.partition(".")
        resolution.imports.append(f"from {module} import {first} as {name}")
        if more:
            resolution.imports.append(f"{name} = {name}.{more}")
        return
    literal = _literal_source(value)
    if literal is not None:
        resolution.imports.append(f"{name} = {literal}")
        return
    try:
        cloudpickle.dumps(value)
    except Exception as exc:
        raise _unpicklable(name, value, owner, exc) from exc
    resolution.captured[name] = value


_PLAIN = (int, float, complex, str, bytes, bool, type(None), tuple, list, dict, set, frozenset)


def _literal_source(value: Any, limit: int = 2000) -> str | None:
    """``repr(value)`` when it is a short literal that reads back equal, else None."""
    if not all(type(v) in _PLAIN for v in _walk_plain(value)):
        return None
    text = repr(value)
    if len(text) > limit or "\n" in text:
        return None
    try:
        return text if ast.literal_eval(text) == value else None
    except (ValueError, SyntaxError, RecursionError):
        return None


def _walk_plain(value: Any, depth: int = 0):
    yield value
    if depth > 20:
        yield object()  # too deep to be a literal worth writing out
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk_plain(k, depth + 1)
            yield from _walk_plain(v, depth + 1)
    elif isinstance(value, (tuple, list, set, frozenset)):
        for item in value:
            yield from _walk_plain(item, depth + 1)


def _unpicklable(name: str, value: Any, owner: str, exc: Exception) -> UnpicklableNameError:
    kind = type(value)
    intro = (
        f"`{owner}` uses `{name}`, a {kind.__module__}.{kind.__qualname__} from an earlier "
        f"cell, which cannot be sent to worker processes ({type(exc).__name__}: {exc})."
    )
    detail = _diagnosis(value, name)
    fix = detail or (
        "Create it inside the function that uses it (or in a pool initializer), or pass "
        "what it is made from as an argument."
    )
    return UnpicklableNameError(f"{intro}\n{fix}\nNo process was started.")


def _diagnosis(value: Any, name: str) -> str:
    """The pickle doctor's account of the culprit and its fix, if it finds one."""
    from mpnb.pickling import diagnose

    found = diagnose(value, by_value=True, name=name)
    return str(found) if found is not None else ""


# --------------------------------------------------------------- the module


@dataclass
class CellModule:
    """The module made from one cell, and what the notebook should bind."""

    name: str
    module: types.ModuleType
    path: Path
    #: the cell's own definitions (name -> object), to bind in the notebook
    names: dict[str, Any]
    rest: list[ast.stmt]


def render(cell: SplitCell, resolution: Resolution) -> str:
    """Module source whose line N is line N of the cell; line 1 is the header."""
    lines = cell.source.splitlines()
    out = [""] * max(len(lines), 1)
    future: list[str] = []
    spans = _spans(cell.definitions + cell.rest)
    for node in cell.definitions:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            future.append(ast.unparse(node))
            continue
        start, end = spans[id(node)]
        shared = any(
            key != id(node) and s <= end and start <= e for key, (s, e) in spans.items()
        )
        if shared:  # several statements on one line: take just this one
            text = ast.get_source_segment(cell.source, node) or ast.unparse(node)
            first, *more = text.splitlines()
            out[start - 1] = f"{out[start - 1]}; {first}" if out[start - 1] else first
            for offset, line in enumerate(more, start=start):
                out[offset] = line
        else:
            out[start - 1 : end] = lines[start - 1 : end]
    header = future + resolution.imports
    if resolution.captured:
        header.append("from mpnb.cells import load_captured as _mpnb_load")
        header.append("_mpnb_c = _mpnb_load(__file__)")
        header.extend(f"{n} = _mpnb_c[{n!r}]" for n in resolution.captured)
        header.append("del _mpnb_c, _mpnb_load")
    if out[0].strip():
        raise CellModuleError("line 1 of a cell module is reserved for its header")
    out[0] = "; ".join(header)
    return "\n".join(out) + "\n"


def _spans(nodes: list[ast.stmt]) -> dict[int, tuple[int, int]]:
    spans = {}
    for node in nodes:
        decorators = getattr(node, "decorator_list", [])
        start = min([node.lineno] + [d.lineno for d in decorators])
        spans[id(node)] = (start, node.end_lineno or node.lineno)
    return spans


def module_name(source: str, captured: bytes) -> str:
    digest = hashlib.sha256(source.encode() + b"\0" + captured).hexdigest()[:16]
    return f"{cells.__name__}.{cells.PREFIX}{digest}"


def build(source: str, namespace: Mapping[str, Any], directory: Path,
          filename: str = "<cell>") -> CellModule:
    """Make, write and import the module of a cell's definitions.

    ``source`` is plain Python (IPython syntax already transformed) whose line
    1 is free: in a ``%%mppool`` cell that is the magic's own line.  Raises a
    :class:`CellModuleError` that names the culprit before anything is written.
    """
    cell = split(source, filename)
    resolution = resolve(cell, namespace)
    text = render(cell, resolution)
    captured = serialize.dumps(resolution.captured) if resolution.captured else b""
    if len(captured) > LARGE_CAPTURE_BYTES:
        sizes = {n: len(cloudpickle.dumps(v)) for n, v in resolution.captured.items()}
        biggest = max(sizes, key=sizes.__getitem__)
        warnings.warn(
            f"The cell module captures {byte_size(len(captured))} from the notebook "
            f"(`{biggest}`: {byte_size(sizes[biggest])}); every worker loads it when it "
            f"imports the module. Pass large data as task arguments, or load it inside "
            f"the worker.",
            stacklevel=2,
        )
    name = module_name(text, captured)
    path = cells.source_file(directory, name)
    # the captured values first: the module loads them on import
    files = {cells.captured_file(path).name: captured} if captured else {}
    files[path.name] = text.encode()
    cells.write_files(directory, files)
    module = importlib.import_module(name)
    names = {n: getattr(module, n) for n in cell.defined if hasattr(module, n)}
    for star in cell.star_imports:
        names.update({n: getattr(module, n) for n in _star_names([star]) if hasattr(module, n)})
    return CellModule(name, module, path, names, cell.rest)


def check_by_value(cell: SplitCell, namespace: Mapping[str, Any]) -> None:
    """For ``--by-value``: every notebook value the definitions use must pickle.

    The definitions stay in ``__main__`` and cloudpickle ships them with the
    globals they use, so only unpicklable values are an error here.
    """
    for name, owner in sorted(free_names(cell).items()):
        if name not in namespace or name in cell.rest_assigned:
            continue
        value = namespace[name]
        if isinstance(value, types.ModuleType) or _importable_as(value) is not None:
            continue
        try:
            cloudpickle.dumps(value)
        except Exception as exc:
            raise _unpicklable(name, value, owner, exc) from exc
