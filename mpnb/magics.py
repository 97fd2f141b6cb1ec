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

from mpnb import cellmodule, cells, processes


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
    @argument("--backend", choices=("local", "dask"), default=None,
              help="Where the pool's tasks run: 'local' processes (default) or a 'dask' cluster.")
    @argument("--address", default=None,
              help="The dask scheduler's address, such as tcp://host:8786 (implies --backend dask).")
    @argument("--no-live", action="store_true",
              help="Show no live status widget while the cell's pool works.")
    @argument("--cache", nargs="?", const=True, default=False, metavar="DIR",
              help="Keep each task's result in the cache (default directory, or DIR) and take "
                   "results computed before, in this kernel or an earlier one, instead of running them.")
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
        assert shell is not None, "load() registers the magics on a shell"
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
        pool = shell.user_ns[args.name]
        pool.live = False if args.no_live else None
        from mpnb.pool import cache_store

        pool.cache = cache_store(args.cache)
        return _run(rest, filename, shell.user_ns, quiet=cell.rstrip().endswith(";"))


    @magic_arguments()
    @argument("--clear", nargs="?", const="", default=None, metavar="NAME",
              help="Remove the cached results of function NAME, or all of them.")
    @argument("--dir", default=None,
              help="The cache directory (default: $MPNB_CACHE_DIR, else the user cache directory + mpnb).")
    @line_magic
    def mpcache(self, line: str) -> Any:
        """List the task cache per function (entries, size, last use, cell), or clear it."""
        from mpnb import cache as task_cache

        args = _arguments(self.mpcache, "%mpcache", line)
        where = args.dir or True
        if args.clear is not None:
            removed = task_cache.clear(args.clear or None, where)
            print(f"mpnb cache: removed {removed} result{'s' * (removed != 1)}"
                  + (f" of {args.clear}" if args.clear else ""))
            return None
        print(task_cache.listing_text(where))
        return None

    @line_magic
    def mpdoctor(self, line: str) -> Any:
        """Check this kernel's setup for process pools: each finding with a verdict and a fix."""
        from mpnb.doctor import doctor

        return doctor()

    @magic_arguments()
    @argument("--kill-leftovers", action="store_true",
              help="Stop the leftover processes first, each with its subprocesses.")
    @argument("--limit", type=int, default=None,
              help="Warn when the kernel has more processes below it than this "
                   "(default: MPNB_MAX_PROCESSES, else max(64, 8 x CPUs)).")
    @argument("--on-runaway", choices=("warn", "kill", "off"), default=None,
              help="What the runaway guard does past the limit: warn, also kill the "
                   "newest processes, or nothing (default: MPNB_RUNAWAY, else warn).")
    @line_magic
    def mpstatus(self, line: str) -> Any:
        """Every process below this kernel, and the leftovers no live pool accounts for."""
        args = _arguments(self.mpstatus, "%mpstatus", line)
        try:
            return processes.magic(self.shell, args.kill_leftovers, args.limit, args.on_runaway)
        except ValueError as exc:
            raise UsageError(f"%mpstatus {line}: {exc}") from None

    @magic_arguments()
    @argument("--off", action="store_true",
              help="Undo the patch: the stdlib's pool names create stdlib pools again.")
    @argument("--timeout", type=float, default=None,
              help="Per-task timeout in seconds for the pools the patch creates.")
    @line_magic
    def mppool_patch(self, line: str) -> None:
        """Make multiprocessing.Pool, get_context(...).Pool and ProcessPoolExecutor create mpnb.Pools."""
        from mpnb import patching

        args = _arguments(self.mppool_patch, "%mppool_patch", line)
        if args.off:
            patching.unpatch()
            print("mpnb: multiprocessing.Pool and ProcessPoolExecutor are the stdlib's again")
            return
        try:
            patching.patch(**({} if args.timeout is None else {"timeout": args.timeout}))
        except ValueError as exc:
            raise UsageError(f"%mppool_patch {line}: {exc}") from None
        print("mpnb: multiprocessing.Pool, get_context(...).Pool and concurrent.futures.ProcessPoolExecutor "
              "now create mpnb.Pools; %mppool_patch --off undoes it")


def _arguments(magic: Any, name: str, line: str) -> Any:
    """A magic's arguments; what argparse refuses becomes a UsageError naming the magic."""
    try:
        return parse_argstring(magic, line)
    except UsageError:
        raise
    except Exception as exc:  # argparse reports some errors as SystemExit/ValueError
        raise UsageError(f"{name} {line}: {exc}") from None


def _parse(magic: Any, line: str) -> Any:
    args = _arguments(magic, "%%mppool", line)
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"%%mppool -n {args.workers}: the number of workers must be at least 1.")
    if not args.name.isidentifier():
        raise UsageError(f"%%mppool --name {args.name!r}: the pool's name must be a Python identifier.")
    if args.backend is None:
        args.backend = "dask" if args.address else "local"
    if args.backend == "local" and args.address:
        raise UsageError(f"%%mppool --address {args.address}: an address is for --backend dask.")
    if args.backend == "dask" and args.workers is not None:
        raise UsageError(f"%%mppool -n {args.workers} --backend dask: the dask cluster's workers "
                         "decide how many tasks run at once; leave out -n.")
    return args


def _transform(shell: Any, cell: str) -> str:
    """IPython syntax (``!cmd``, ``%magic``, ``x?``) to Python, keeping line numbers."""
    leading = len(cell) - len(cell.lstrip("\n"))
    return "\n" * leading + shell.transform_cell(cell)


def _bind_pool(shell: Any, args: Any) -> None:
    from mpnb.pool import Pool

    current = shell.user_ns.get(args.name)
    if isinstance(current, Pool) and not current.closed:
        if args.backend == "dask":
            if current.backend == "dask" and args.address in (None, current.address):
                return  # same cluster, same connection
        elif current.backend == "local" and (args.workers is None or current.workers == args.workers):
            return  # same pool, same warm workers
        current.shutdown(wait=False, cancel_futures=True)
    if args.backend == "dask":
        shell.user_ns[args.name] = Pool(backend="dask", address=args.address)
    else:
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
    from mpnb import diagnostics, shutdown

    cells.create_kernel_dir()
    processes.mark_lineage()
    shell.register_magics(MpnbMagics)
    diagnostics.install(shell)
    shutdown.install(shell)
    processes.start_guard(shell)  # last: a bad setting it refuses leaves the rest working


def unload(shell: Any) -> None:
    """Forget the magics and delete the cell-module directory."""
    from mpnb import diagnostics, shutdown

    shell.magics_manager.magics["cell"].pop("mppool", None)
    shell.magics_manager.magics["line"].pop("mpdoctor", None)
    shell.magics_manager.magics["line"].pop("mpcache", None)
    shell.magics_manager.magics["line"].pop("mpstatus", None)
    shell.magics_manager.magics["line"].pop("mppool_patch", None)
    processes.stop_guard()
    diagnostics.uninstall(shell)
    shutdown.uninstall(shell)
    cells.remove_kernel_dir()
