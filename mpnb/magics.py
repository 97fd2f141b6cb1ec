"""The IPython adapter: ``%load_ext mpnb`` and the ``%%mppool`` cell magic.

Thin on purpose: options are parsed here, bad ones raise ``UsageError``, and
the work is done by :mod:`mpnb.cellmodule`, :mod:`mpnb.cells` and
:mod:`mpnb.pool`.
"""

from __future__ import annotations

import ast
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from mpnb import cellmodule, cells


@magics_class
class MpnbMagics(Magics):
    """``%%mppool``: run a cell whose definitions worker processes can import."""

    @magic_arguments()
    @argument("-n", "--workers", type=int, default=None,
              help="Number of worker processes (default: the usable CPUs).")
    @argument("--name", default="pool",
              help="Name the cell's pool is bound to in the notebook (default: pool).")
    @argument("--by-value", action="store_true",
              help="Keep the definitions in the notebook and ship them with cloudpickle "
                   "(mpnb.Pool and loky only) instead of writing a module.")
    @cell_magic
    def mppool(self, line: str, cell: str) -> Any:
        """Move the cell's definitions into an importable module, then run the rest.

        The cell's imports, functions, classes and literal constants become the
        module ``mpnb.cells.cell_<hash>``, so that any spawn- or forkserver-based
        pool (multiprocessing, concurrent.futures, joblib, loky, PyTorch
        DataLoader) can pickle them by reference.  Their names are bound in the
        notebook.  The other statements then run in the notebook with ``pool``
        bound to an :class:`mpnb.Pool`.
        """
        __tracebackhide__ = True
        args = _parse(self.mppool, line)
        shell = self.shell
        raw = f"%%mppool {line}\n{cell}"
        filename = shell.compile.cache(raw, shell.execution_count, raw_code=raw)
        source = "\n" + _transform(shell, cell)
        if args.by_value:
            parsed = cellmodule.split(source, filename)
            cellmodule.check_by_value(parsed, shell.user_ns)
            rest: list[ast.stmt] = parsed.definitions + parsed.rest
            rest.sort(key=lambda node: node.lineno)
        else:
            built = cellmodule.build(source, shell.user_ns, cells.create_kernel_dir(), filename)
            shell.user_ns.update(built.names)
            rest = built.rest
        if not rest:
            return None
        _bind_pool(shell, args)
        return _run(rest, filename, shell.user_ns, quiet=cell.rstrip().endswith(";"))


    @line_magic
    def mpdoctor(self, line: str) -> Any:
        """Check this kernel's setup for process pools: each finding with a verdict and a fix."""
        from mpnb.doctor import doctor

        return doctor()


def _parse(magic: Any, line: str) -> Any:
    try:
        args = parse_argstring(magic, line)
    except UsageError:
        raise
    except Exception as exc:  # argparse reports some errors as SystemExit/ValueError
        raise UsageError(f"%%mppool {line}: {exc}") from None
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"%%mppool -n {args.workers}: the number of workers must be at least 1.")
    if not args.name.isidentifier():
        raise UsageError(f"%%mppool --name {args.name!r}: the pool's name must be a Python identifier.")
    return args


def _transform(shell: Any, cell: str) -> str:
    """IPython syntax (``!cmd``, ``%magic``, ``x?``) to Python, keeping line numbers."""
    leading = len(cell) - len(cell.lstrip("\n"))
    return "\n" * leading + shell.transform_cell(cell)


def _bind_pool(shell: Any, args: Any) -> None:
    from mpnb.pool import Pool

    current = shell.user_ns.get(args.name)
    if isinstance(current, Pool) and not current.closed:
        if args.workers is None or current.workers == args.workers:
            return  # same pool, same warm workers
        current.shutdown(wait=False, cancel_futures=True)
    shell.user_ns[args.name] = Pool(args.workers)


def _run(nodes: list[ast.stmt], filename: str, namespace: dict[str, Any], quiet: bool) -> Any:
    """Run statements in the notebook namespace; return the last expression's value."""
    __tracebackhide__ = True
    *body, last = nodes
    if body:
        exec(compile(ast.Module(body=body, type_ignores=[]), filename, "exec"), namespace)
    if isinstance(last, ast.Expr):
        value = eval(compile(ast.Expression(body=last.value), filename, "eval"), namespace)
        return None if quiet else value
    exec(compile(ast.Module(body=[last], type_ignores=[]), filename, "exec"), namespace)
    return None


def load(shell: Any) -> None:
    """Register the magics and create this kernel's cell-module directory."""
    from mpnb import diagnostics

    cells.create_kernel_dir()
    shell.register_magics(MpnbMagics)
    diagnostics.install(shell)


def unload(shell: Any) -> None:
    """Forget the magics and delete the cell-module directory."""
    from mpnb import diagnostics

    shell.magics_manager.magics["cell"].pop("mppool", None)
    shell.magics_manager.magics["line"].pop("mpdoctor", None)
    diagnostics.uninstall(shell)
    cells.remove_kernel_dir()
