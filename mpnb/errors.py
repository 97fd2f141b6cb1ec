"""The exceptions a pool's caller sees, and the one place their messages are written.

Every engine builds its errors here, so a timeout, a crash or a task that did
not run reads the same whichever engine ran it.  A *where* is a task's
description (``task 3 (argument 7)``, from :func:`mpnb.calls.describe`),
sometimes with the place it ran (``in worker pid 123``).
"""

from __future__ import annotations

import linecache
import pickle
import signal
from concurrent.futures import CancelledError
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, Callable


if TYPE_CHECKING:  # pragma: no cover
    from mpnb._task import Failure
    from mpnb.pickling import Diagnosis

__all__ = [
    "RemoteTaskError",
    "RemoteTraceback",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "WorkerMemoryError",
]

#: environment variable: seconds a worker may take to start, its initializer included
START_TIMEOUT_VAR = "MPNB_START_TIMEOUT"


class WorkerCrashedError(BrokenProcessPool):
    """A worker process died (segfault, os._exit, SIGKILL, OOM) while running the task."""


class TaskTimeoutError(TimeoutError):
    """The task ran longer than the pool's timeout; its worker was killed and replaced."""


class WorkerMemoryError(MemoryError):
    """The task's worker held more memory than the pool's ``max_memory``; it was killed and replaced."""


class RemoteTaskError(Exception):
    """A task's exception that could not be sent back as itself (shown by type and message)."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker (set as ``__cause__``)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


# ---------------------------------------------------------------- describing


def signal_name(exitcode: int | None) -> str:
    if exitcode is None:
        return "an unknown status"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def _likely_cause(exitcode: int | None) -> str:
    if exitcode == -signal.SIGSEGV or exitcode == -getattr(signal, "SIGBUS", 0):
        return "a segmentation fault in native code (a C extension, ctypes, or a library bug)"
    if exitcode == -signal.SIGKILL:
        return (
            "the process was killed from outside; most often the out-of-memory killer "
            "stopping a task that used too much memory (check RSS in pool.monitor.sample())"
        )
    if exitcode == -signal.SIGABRT:
        return "abort() in native code (a failed assertion in a C library)"
    if exitcode is not None and exitcode >= 0:
        return "the task or a library ended the process (os._exit or exit() in native code)"
    return "the process was stopped by a signal"


def note(exc: BaseException, where: str) -> BaseException:
    """Name the task on ``exc`` (a note; a cancellation says it in its message)."""
    if not isinstance(exc, CancelledError):
        exc.add_note(f"mpnb: raised by {where}")
    return exc


# ------------------------------------------------------- failures in a worker


def remote_exception(failure: Failure, where: str) -> BaseException:
    """The task's own exception, with the worker's traceback as its cause."""
    exc: Any = None
    if failure.exc_bytes is not None:
        try:
            exc = pickle.loads(failure.exc_bytes)
        except BaseException:  # whatever loading raises (SystemExit too) is the task's, not ours
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteTaskError(f"{failure.type_name}: {failure.message}")
    lines = [failure.chained, "Traceback (most recent call last):\n"]
    for filename, lineno, name, line in failure.frames:
        # cell sources live in the notebook's linecache, not in the worker's
        line = line or linecache.getline(filename, lineno).strip()
        lines.append(f'  File "{filename}", line {lineno}, in {name}\n')
        if line:
            lines.append(f"    {line}\n")
    lines.append(f"{failure.type_name.removeprefix('builtins.')}: {failure.message}\n")
    exc.__cause__ = RemoteTraceback("\n" + "".join(lines))
    return note(exc, where)


def failure_here(failure: Failure | tuple[str, BaseException], where: str) -> BaseException:
    """The exception a task's caller sees, for a failure in the worker or a
    value (or an exception) that cannot be loaded in this process."""
    if not isinstance(failure, tuple):
        try:
            return remote_exception(failure, where)
        except BaseException as exc:  # the exception itself does not load here
            failure = (failure.type_name, exc)
    kind, problem = failure
    error = pickle.UnpicklingError(
        f"{where} ended, but what it returned or raised, a {kind}, cannot be loaded in this process "
        f"({type(problem).__name__}: {problem}); make it a type this process can import, or return plain data"
    )
    error.__cause__ = problem
    return note(error, where)


# ------------------------------------------------- what the engines decide


def timeout_error(where: str, seconds: float, timeout: float, then: str) -> BaseException:
    """A task ran past its timeout; ``then`` says what the engine did about it."""
    return TaskTimeoutError(f"{where} ran for {seconds:.1f} s, longer than the timeout of {timeout:g} s; {then}")


def crash_error(pid: int, exitcode: int | None, report: str) -> Callable[[str], BaseException]:
    """The error of the task that was running when its worker died; ``report``
    is what faulthandler wrote, if anything."""

    def make(where: str) -> BaseException:
        exc = WorkerCrashedError(
            f"{where} crashed its worker (pid {pid}, {signal_name(exitcode)}); "
            f"likely cause: {_likely_cause(exitcode)}. The pool replaced the worker."
        )
        if report:
            exc.__cause__ = RemoteTraceback("\n" + report + "\n")
        return exc

    return make


def memory_error(pid: int, peak: int, limit: int, given: Any) -> Callable[[str], BaseException]:
    """The error of the task whose worker passed ``max_memory`` (``given`` as the user wrote it)."""
    from mpnb.facts import byte_size

    def make(where: str) -> BaseException:
        return WorkerMemoryError(
            f"{where} made its worker (pid {pid}) hold {byte_size(peak)}, past the pool's "
            f"max_memory={given!r} ({byte_size(limit)} per worker); the worker was killed and replaced, "
            f"and the other tasks go on. Give this task less data at once, or raise max_memory.")

    return make


def cancelled(where: str, why: str = "") -> CancelledError:
    return CancelledError(f"{where} was cancelled{why}")


def not_run(why: str) -> Callable[[str], BaseException]:
    """The error of work that reached an engine which no longer runs."""
    return lambda where: BrokenProcessPool(f"{where} was not run: {why}; create a new mpnb.Pool")


def broken(why: str) -> Callable[[str], BaseException]:
    """The error of every task held when the engine itself failed, or could
    not start its workers."""
    return lambda where: BrokenProcessPool(f"{where}: {why}")


def forked_copy_error(owner: int, here: int) -> RuntimeError:
    """Work given to the copy of a pool in a forked process: the copy has no
    manager thread, and would wait forever."""
    return RuntimeError(f"this mpnb.Pool belongs to process {owner}, and process {here} is a forked copy of it, "
                        f"where the pool's workers cannot be reached: create a new mpnb.Pool in this process")


def start_timeout_error(initializer: str | None, seconds: float) -> BaseException:
    if initializer is not None:
        why = f"the initializer {initializer} did not return; make it return sooner, or"
    else:
        why = "the machine may be overloaded, or an import at start-up is slow;"
    return BrokenProcessPool(
        f"the pool's workers did not start within {seconds:g} s ({START_TIMEOUT_VAR}): {why} "
        f"set {START_TIMEOUT_VAR} to more seconds before creating the pool"
    )


def start_error(exitcode: int | None, init_failure: Failure | None) -> BaseException:
    exc = WorkerCrashedError(
        f"the pool's worker processes exit before they are ready ({signal_name(exitcode)}); "
        "if you gave an initializer, it is the first suspect"
    )
    if init_failure is not None:
        exc.__cause__ = remote_exception(init_failure, "the initializer")
    return exc


# ------------------------------------------------------- what does not pickle


def pickling_error(exc: BaseException, where: str, args: tuple, kwargs: dict) -> BaseException:
    """The error of a task whose arguments do not pickle: the pickle
    doctor's sentence (which argument, the path inside it, why, the fix)."""
    from mpnb.pickling import PicklingProblem, diagnose_call  # only on failure: it is slow to import
    from mpnb.shared import NoRoomToShare

    if isinstance(exc, NoRoomToShare):  # it pickles: there was no room to share it
        return exc
    found = _diagnosis(lambda: diagnose_call(args, kwargs, by_value=True))
    if found is not None:
        err: BaseException = PicklingProblem(found)
    else:  # the doctor finds nothing wrong on its own: say what pickle said
        err = pickle.PicklingError(f"the arguments of {where} cannot be sent to a worker: {exc}")
    err.__cause__ = exc
    return err


def function_error(fn: Callable, exc: BaseException) -> BaseException:
    """The error of a function that does not pickle, in the pickle doctor's words."""
    from mpnb.pickling import PicklingProblem, diagnose, function_label

    found = _diagnosis(lambda: diagnose(fn, by_value=True, name=function_label(fn)))
    if found is not None:
        return PicklingProblem(found)
    return pickle.PicklingError(f"the function {getattr(fn, '__qualname__', fn)!r} cannot be sent to a worker: {exc}")


def _diagnosis(run: Callable[[], Diagnosis | None]) -> Diagnosis | None:
    # only after pickling failed, so the happy path never pays for the walk;
    # a doctor that trips over a strange object must not hide the real error
    try:
        return run()
    except KeyboardInterrupt:
        raise
    except BaseException:  # SystemExit from a __reduce__ too
        return None
