"""Failures of pools that do not use mpnb, explained in the cell.

With ``%load_ext mpnb``, :func:`install` adds three things to the kernel; each
comes off again with :func:`uninstall`.

* A check when work is handed to a stdlib ``multiprocessing.Pool`` or a
  ``concurrent.futures.ProcessPoolExecutor`` whose start method is spawn or
  forkserver: if the function (or the first item of the work) is defined in
  the notebook's ``__main__``, no worker could import it, so the call raises
  :class:`~mpnb.pickling.PicklingProblem` at once, naming it and the fix,
  instead of failing later in the children.
* A watch on stdlib ``multiprocessing.Pool`` workers.  When a worker dies
  (the task it held is lost), the stdlib Pool starts another one and waits
  for the lost result forever.  The watch fails the pending results with
  :class:`BrokenPool`, which says what happened and what usually causes it,
  and stops the pool from starting workers that die the same way::

      worker handler thread        (stdlib, unchanged loop)
        _maintain_pool
          _join_exited_workers --> mpnb: worker exited with code != 0?
                                     -> fail every pending result
                                     -> report "nothing cleaned": no respawn

* A note after a cell that failed with ``BrokenProcessPool``, a pickling
  error, ``Can't get attribute ... on <module '__main__'>`` (Python 3.14:
  ``module '__main__' has no attribute ...``), a module object sent to a
  stdlib pool, or a PyTorch
  ``DataLoader worker ... exited unexpectedly``: which notebook-defined names
  the cell used and the one-line fix.
* A warning, once, when the kernel forks while other threads run.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import os
import re
import sys
import threading
import types
import warnings
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

from mpnb.pickling import MODULE_FIX, PicklingProblem, diagnose, interactive_main

__all__ = ["BrokenPool", "ForkInThreadedKernelWarning", "install", "uninstall"]


class BrokenPool(BrokenProcessPool):
    """A stdlib ``multiprocessing.Pool`` lost a worker; its pending results failed."""


class ForkInThreadedKernelWarning(RuntimeWarning):
    """The kernel forked while other threads were running."""


FIX = ("put the definitions the workers need in a %%mppool cell, which makes them "
       "importable, or use mpnb.Pool, which sends notebook functions by value")

_installed: dict[str, Any] = {}
_lock = threading.Lock()


def install(shell: Any) -> None:
    """Add the checks, the Pool watch, the cell notes and the fork warning."""
    with _lock:
        if _installed:
            return
        _installed["shell"] = shell
        _installed["restore"] = _patch_stdlib_pools()
        shell.events.register("post_run_cell", _note_after_cell)
        _enable_fork_warning(True)


def uninstall(shell: Any) -> None:
    """Take everything :func:`install` added away again."""
    with _lock:
        if not _installed:
            return
        try:
            shell.events.unregister("post_run_cell", _note_after_cell)
        except ValueError:
            pass
        for restore in _installed["restore"]:
            restore()
        _enable_fork_warning(False)
        _installed.clear()


# ------------------------------------------------- what refers to __main__


def main_definition(obj: Any) -> Any:
    """The notebook-defined function or class ``obj`` leads to, cheaply, or None.

    Looks only where pickle will certainly go (a partial's parts, a method's
    owner, an instance's class); a full walk is :func:`mpnb.diagnose`.
    """
    if not interactive_main():
        return None
    for candidate in _shallow_parts(obj):
        if isinstance(candidate, (types.FunctionType, type)):
            if getattr(candidate, "__module__", None) == "__main__":
                return candidate
        elif type(candidate).__module__ == "__main__":
            return type(candidate)
    return None


def _shallow_parts(obj: Any, depth: int = 2) -> list[Any]:
    parts = [obj]
    if depth == 0:
        return parts
    if isinstance(obj, functools.partial):
        inner = [obj.func, *obj.args, *obj.keywords.values()]
    elif isinstance(obj, types.MethodType):
        inner = [obj.__func__, obj.__self__]
    elif isinstance(obj, (list, tuple)):
        inner = list(obj[:1])
    elif isinstance(obj, dict):
        inner = list(obj.values())[:1]
    else:
        inner = []
    for item in inner:
        parts.extend(_shallow_parts(item, depth - 1))
    return parts


def _shares_as_code(culprit: Any) -> bool:
    """True for a notebook function a subinterpreter receives as code, not by name.

    Python 3.14's ``Interpreter.call`` copies a "stateless" function (no closure,
    no defaults, no globals but builtins) into the subinterpreter; everything
    else goes by pickle, by name, and a name in ``__main__`` is not found there.
    """
    if not isinstance(culprit, types.FunctionType):
        return False
    if culprit.__closure__ or culprit.__defaults__ or culprit.__kwdefaults__:
        return False
    import builtins
    import dis

    codes = [culprit.__code__]
    while codes:
        code = codes.pop()
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        for op in dis.get_instructions(code):
            if op.opname in _GLOBAL_OPS and not hasattr(builtins, op.argval):
                return False
    return True


_GLOBAL_OPS = {"LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "DELETE_GLOBAL", "STORE_NAME",
               "DELETE_NAME"}

# a subinterpreter, like a spawned process, has a __main__ of its own
_SUBINTERPRETER = ("a worker started by spawn or forkserver",
                   "a subinterpreter of InterpreterPoolExecutor")


def _refuse_main(what: Any, label: str, reword: tuple[str, str] | None = None) -> None:
    """Raise PicklingProblem if ``what`` needs a notebook definition by name,
    or is or holds a module object (which stdlib pickle refuses only in the
    pool's feeder thread, with a bare ``TypeError``)."""
    if main_definition(what) is None and not _holds_module(what):
        return
    found = diagnose(what, by_value=False, name=label)
    if found is not None and reword is not None:
        found = dataclasses.replace(found, reason=found.reason.replace(*reword))
    if found is not None:
        raise PicklingProblem(found)


def _holds_module(obj: Any) -> bool:
    """True if ``obj`` is a module, or holds one where pickle will certainly go."""
    return any(isinstance(part, types.ModuleType) for part in _shallow_parts(obj))


def _spawns(context: Any) -> bool:
    """True if children of ``context`` start fresh (spawn, forkserver)."""
    try:
        method = context.get_start_method(allow_none=True)
    except (AttributeError, TypeError):
        method = None
    if method is None:
        import multiprocessing

        method = multiprocessing.get_start_method(allow_none=True)
        if method is None:  # not chosen yet: the platform's default
            method = multiprocessing.get_all_start_methods()[0]
    return method != "fork"


# ------------------------------------------------------- stdlib patches


def _patch_stdlib_pools() -> list[Callable[[], None]]:
    import concurrent.futures.process as cf_process
    import multiprocessing.pool as mp_pool

    restore: list[Callable[[], None]] = []

    def patch(owner: type, name: str, make: Callable[[Any], Any]) -> None:
        original = owner.__dict__.get(name)
        if original is None:  # a Python whose pool differs: leave it alone
            return
        setattr(owner, name, make(original))
        restore.append(lambda: setattr(owner, name, original))

    for name in ("apply_async", "_map_async", "imap", "imap_unordered"):
        patch(mp_pool.Pool, name, _checked)
    patch(cf_process.ProcessPoolExecutor, "submit", _checked_submit)
    patch(mp_pool.Pool, "_handle_workers", _watched_handler)
    patch(mp_pool.Pool, "_join_exited_workers", _watched_join)
    restore.extend(_patch_interpreter_pool())
    return restore


def _patch_interpreter_pool() -> list[Callable[[], None]]:
    """Python 3.14's ``InterpreterPoolExecutor``: its ``submit`` (which ``map``
    calls too) refuses notebook functions first, as ``ProcessPoolExecutor``'s."""
    import importlib

    try:  # by name: the type checker judges the package as on 3.11
        InterpreterPoolExecutor = importlib.import_module(
            "concurrent.futures.interpreter").InterpreterPoolExecutor
    except ImportError:  # before 3.14, or a build without subinterpreters
        return []
    if "submit" in InterpreterPoolExecutor.__dict__:  # a Python whose pool differs
        return []
    submit = InterpreterPoolExecutor.submit  # ThreadPoolExecutor's, inherited

    @functools.wraps(submit)
    def checked(self: Any, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        for what, label in ((args, "args"), (fn, _label(fn))):
            if not _shares_as_code(main_definition(what)):
                _refuse_main(what, label, _SUBINTERPRETER)
        return submit(self, fn, *args, **kwargs)

    setattr(InterpreterPoolExecutor, "submit", checked)
    return [lambda: delattr(InterpreterPoolExecutor, "submit")]


def _checked(method: Callable[..., Any]) -> Callable[..., Any]:
    """``multiprocessing.Pool``'s ``method``, refusing notebook functions first."""
    import multiprocessing.pool as mp_pool

    keyword = "args" if method.__name__ == "apply_async" else "iterable"

    @functools.wraps(method)
    def run(self: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(self, mp_pool.ThreadPool):
            work = args[0] if args else kwargs.get(keyword, ())
            _check_pool_call(self, func, work, method.__name__)
        return method(self, func, *args, **kwargs)

    return run


def _checked_submit(submit: Callable[..., Any]) -> Callable[..., Any]:
    """``ProcessPoolExecutor.submit``, refusing notebook functions first."""
    import concurrent.futures.process as cf_process

    @functools.wraps(submit)
    def run(self: Any, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        if _spawns(self._mp_context):
            if getattr(fn, "func", None) is cf_process._process_chunk:  # from map()
                _refuse_main(fn.args[0], _label(fn.args[0]))
            else:
                _refuse_main(args, "args")
                _refuse_main(fn, _label(fn))
        return submit(self, fn, *args, **kwargs)

    return run


def _watched_handler(original: classmethod) -> classmethod:
    """``Pool._handle_workers``, with its pool watched while the thread runs."""
    import multiprocessing.pool as mp_pool

    def handle(cls: type, cache: Any, taskqueue: Any, ctx: Any, Process: Any,
               processes: int, pool: list, inqueue: Any, outqueue: Any,
               initializer: Any, *rest: Any) -> Any:
        if cls is not mp_pool.ThreadPool:
            _watched[id(pool)] = _Watch(id(pool), cache, threading.current_thread(),
                                        initializer)
        try:
            return original.__func__(cls, cache, taskqueue, ctx, Process, processes,
                                     pool, inqueue, outqueue, initializer, *rest)
        finally:
            _watched.pop(id(pool), None)
            _broken.pop(id(pool), None)

    return classmethod(handle)


def _watched_join(original: staticmethod) -> staticmethod:
    """``Pool._join_exited_workers``, telling a watched pool which workers died."""
    join = original.__func__

    def join_exited(pool: list) -> bool:
        watch = _watched.get(id(pool))
        if watch is None:
            return join(pool)
        dead = [w for w in pool if w.exitcode not in (None, 0)]
        cleaned = join(pool)
        return watch.after_join(dead, cleaned)

    return staticmethod(join_exited)


def _label(obj: Any) -> str:
    return getattr(obj, "__name__", None) or type(obj).__name__


def _check_pool_call(pool: Any, func: Any, work: Any, method: str) -> None:
    broken = _broken.get(id(pool._pool))
    if broken is not None:
        raise BrokenPool(broken)
    if not _spawns(pool._ctx):
        return
    _refuse_main(func, _label(func))
    if method == "apply_async":
        _refuse_main(work, "args")
    elif isinstance(work, (list, tuple)):  # never consume an iterator
        _refuse_main(work[:1], "iterable")


# ------------------------------------------------------- the Pool watch

_watched: dict[int, "_Watch"] = {}
_broken: dict[int, str] = {}


class _Watch:
    """The worker handler's view of one stdlib Pool."""

    def __init__(self, key: int, cache: dict, thread: threading.Thread, initializer: Any):
        self.key = key  # id() of the pool's worker list, which the stdlib hands around
        self.cache = cache
        self.thread = thread
        self.initializer = initializer
        self.message: str | None = None

    def after_join(self, dead: list, cleaned: bool) -> bool:
        """Called after exited workers were joined; False stops the respawn."""
        from multiprocessing.pool import RUN

        if self.message is None and dead and getattr(self.thread, "_state", None) == RUN:
            self.message = _death_message(dead[0], self.initializer)
            _broken[self.key] = self.message
        if self.message is None:
            return cleaned
        if self.cache:
            self.fail_pending()
        return False

    def fail_pending(self) -> None:
        assert self.message is not None
        for job in list(self.cache.values()):
            _fail(job, BrokenPool(self.message))


def _fail(job: Any, error: BaseException) -> None:
    """Make a pending stdlib Pool result raise ``error`` now."""
    if hasattr(job, "_event"):  # ApplyResult, MapResult
        job._success, job._value = False, error
        job._cache.pop(job._job, None)
        job._event.set()
    else:  # IMapIterator, IMapUnorderedIterator
        with job._cond:
            job._items.append((False, error))
            job._length = job._index + len(job._items)
            job._cache.pop(job._job, None)
            job._cond.notify()


def _death_message(worker: Any, initializer: Any) -> str:
    code = worker.exitcode
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    lines = [
        f"A worker of this multiprocessing.Pool (pid {worker.pid}) {how} while work was "
        "pending. The stdlib Pool does not notice that the task it held is lost and "
        "would wait forever, so mpnb failed the pending results and stopped the pool "
        "from starting new workers; call pool.terminate() and make a new pool.",
    ]
    culprit = main_definition(initializer) if initializer is not None else None
    if culprit is not None:
        lines.append(f"Its initializer uses {culprit.__qualname__}, defined in this "
                     "notebook (__main__), which a worker started by spawn or forkserver "
                     "cannot import.")
    else:
        lines.append(
            "In a notebook the usual cause is a function or class defined in a cell "
            "(__main__): a worker started by spawn or forkserver cannot import it and "
            "dies with AttributeError: Can't get attribute '...' on <module '__main__'> "
            "(from Python 3.14: module '__main__' has no attribute '...'), printed above "
            "or in the Jupyter server log. A crash (segfault, out of "
            "memory) gives the same loss.")
    lines.append(f"Fix: {FIX}. mpnb.diagnose(obj) shows which part of an object does "
                 "not pickle.")
    return " ".join(lines)


# ------------------------------------------------------ notes after cells

# how a child says it cannot find a notebook definition: up to Python 3.13,
# from 3.14 (a plain getattr), and from 3.14 for a dotted name
_MAIN_ATTR = re.compile(
    r"Can't get attribute '([^']+)' on <module '__main__'"
    r"|module '__main__' has no attribute '([^']+)'"
    r"|Can't resolve path '([^']+)' on module '__main__'")
_MODULE_PICKLE = re.compile(r"cannot pickle 'module' object")
_DATALOADER = re.compile(r"DataLoader worker \(pid")


def _note_after_cell(result: Any) -> None:
    error = getattr(result, "error_in_exec", None)
    if error is None:
        return
    note = explain(error, _cell_definitions(result))
    if note:
        print(note, file=sys.stderr)


def explain(error: BaseException, definitions: list[str] | None = None) -> str | None:
    """A short explanation of a foreign pool failure, or None if it is not one."""
    chain = []
    seen = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        chain.append(link)
        link = link.__cause__ or link.__context__
    if any(isinstance(e, (PicklingProblem, BrokenPool)) for e in chain):
        return None  # already explains itself
    if any(type(e).__module__ == "concurrent.interpreters" for e in chain):
        note = _explain_subinterpreter(chain)
        if note:
            return note
    names = ", ".join(definitions or [])
    used = (f" This cell uses {names}, defined in the notebook (__main__)." if names else "")
    for e in chain:
        text = str(e)
        match = _MAIN_ATTR.search(text)
        if isinstance(e, AttributeError) and match:
            missing = next(name for name in match.groups() if name)
            return (f"mpnb: a child process could not find {missing}: it is defined "
                    "in the notebook (__main__), and a process started by spawn or "
                    f"forkserver has its own __main__ without it. Fix: {FIX}.")
        if isinstance(e, BrokenProcessPool):
            return ("mpnb: a worker process died before returning its result, so the pool "
                    "is broken; the worker's own error is in the output above or in the "
                    "Jupyter server log. In a notebook the usual cause is a function or "
                    "class defined in a cell, which a worker started by spawn or "
                    f"forkserver cannot import.{used} Fix: {FIX}.")
        if isinstance(e, RuntimeError) and _DATALOADER.search(text):
            return ("mpnb: a DataLoader worker died. With num_workers > 0 each worker "
                    "unpickles the Dataset (and collate_fn, worker_init_fn); a class defined "
                    "in the notebook (__main__) cannot be imported there when workers are "
                    f"started by spawn or forkserver.{used} Fix: {FIX}; or num_workers=0.")
        if isinstance(e, TypeError) and _MODULE_PICKLE.search(text):
            return ("mpnb: a module object was handed to another process; stdlib pickle "
                    f"cannot send modules. Fix: {MODULE_FIX} mpnb.diagnose(obj) shows "
                    "where the module sits in what you passed.")
        if _is_pickling_error(e):
            return ("mpnb: something handed to another process could not be pickled. "
                    "mpnb.diagnose(obj) names the part that fails, why, and the fix; "
                    "mpnb.diagnose(obj, by_value=True) judges it as cloudpickle "
                    "(mpnb.Pool, loky, joblib) would.")
    return None


# an extension module that refuses subinterpreters (numpy, today)
_SUBINTERPRETER_IMPORT = re.compile(r"module '?([\w.]+)'? does not support loading in subinterpreters")


def _explain_subinterpreter(chain: list[BaseException]) -> str | None:
    """A failure of InterpreterPoolExecutor's: the subinterpreter's error comes
    back as text (``NotShareableError``, ``ExecutionFailed``), not as its type."""
    for e in chain:
        text = str(e)
        match = _MAIN_ATTR.search(text)
        if match:
            missing = next(name for name in match.groups() if name)
            return (f"mpnb: a subinterpreter of InterpreterPoolExecutor could not find "
                    f"{missing}: it is defined in the notebook (__main__), and a "
                    "subinterpreter has its own __main__ without it (only a function "
                    "that uses no globals, closure or defaults is copied there as code). "
                    f"Fix: {FIX}.")
        note = subinterpreter_import(text, "InterpreterPoolExecutor")
        if note is not None:
            return note
    return None


def subinterpreter_import(text: str, where: str) -> str | None:
    """mpnb's note on an error ``text`` that says a library refuses to load in
    a subinterpreter (numpy, today), for tasks run in ``where``; else None."""
    match = _SUBINTERPRETER_IMPORT.search(text)
    if not match:
        return None
    library = match.group(1).split(".")[0]
    return (f"mpnb: {library} cannot be loaded in a subinterpreter ({match.group(1)} "
            "does not support it), so a task that imports it, or comes from a "
            f"%%mppool cell that imports it, cannot run in {where}. "
            f"Fix: run these tasks in processes (mpnb.Pool(), or ProcessPoolExecutor "
            f"with the definitions in a %%mppool cell), or move the definitions "
            f"the subinterpreters need to a %%mppool cell that does not import "
            f"{library}.")


def _is_pickling_error(error: BaseException) -> bool:
    import pickle

    if isinstance(error, pickle.PicklingError):
        return True
    text = str(error)
    return isinstance(error, (TypeError, AttributeError)) and (
        "pickle" in text and ("cannot" in text.lower() or "can't" in text.lower()))


def _cell_definitions(result: Any) -> list[str]:
    """Names the failed cell used that are notebook-defined functions, classes, objects."""
    shell = _installed.get("shell")
    source = getattr(getattr(result, "info", None), "raw_cell", None)
    if shell is None or not source:
        return []
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    found = []
    for name in sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}):
        value = shell.user_ns.get(name)
        if value is None or isinstance(value, types.ModuleType):
            continue
        culprit = main_definition(value)
        if culprit is None:
            continue
        if culprit is value:
            found.append(name)
        elif type(value) is culprit:
            found.append(f"{name} (a {culprit.__qualname__})")
        else:
            found.append(f"{name} (holding {culprit.__qualname__})")
    return found


# ------------------------------------------------------- fork warning

_fork = {"hooked": False, "enabled": False, "warned": False}


def _enable_fork_warning(enabled: bool) -> None:
    # os.register_at_fork has no way back: hook once, switch with a flag
    if enabled and not _fork["hooked"] and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork)
        _fork["hooked"] = True
    _fork["enabled"] = enabled


def _before_fork() -> None:
    if not _fork["enabled"] or _fork["warned"] or threading.active_count() < 2:
        return
    _fork["warned"] = True
    current = threading.current_thread()
    others = [t.name for t in threading.enumerate() if t is not current]
    warnings.warn(ForkInThreadedKernelWarning(fork_message(others)), stacklevel=2)


def fork_message(threads: list[str]) -> str:
    shown = ", ".join(threads[:6]) + (", ..." if len(threads) > 6 else "")
    return (
        f"mpnb: this kernel is forking while {len(threads)} other threads run ({shown}). "
        "The child is a copy of the kernel with only the forking thread: a lock another "
        "thread held stays locked forever, and the kernel's sockets are shared, so the "
        "child can hang or garble messages. Use the spawn or forkserver start method "
        "(multiprocessing.get_context('forkserver')) with definitions from a %%mppool "
        "cell, or mpnb.Pool. This warning shows once per kernel."
    )
