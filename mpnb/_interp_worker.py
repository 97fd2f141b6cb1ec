"""What runs inside a subinterpreter for ``mpnb.Pool(backend="interpreters")``.

:func:`run_chunk` is called in a slot's subinterpreter (``Interpreter.call``
of :mod:`concurrent.interpreters`, Python 3.14) on the slot's thread.  Its
arguments are ``bytes`` and ints, which cross into the subinterpreter
without a copy; it runs the chunk with the same pieces as every other
worker (:mod:`mpnb._task`), each task's output captured on its thread
(:mod:`mpnb._capture`), and returns the chunk's one
:class:`~mpnb._protocol.Record`, pickled.  :func:`initialize` runs the
pool's initializer there when the subinterpreter is made.

It imports only what a subinterpreter can load: no numpy, no mpnb module
that would pull in IPython.
"""

from __future__ import annotations

from mpnb import _capture as capture
from mpnb._task import caller, dumps, hide_frames_of, load_failure, loads, pack, run_on_thread

hide_frames_of(__file__)


def run_chunk(count: int, fn_data: bytes, items_data: bytes, mode: int) -> bytes:
    """Run a chunk of ``count`` tasks here; its record (``seq`` 0), pickled."""
    try:
        task = caller(loads(fn_data), mode)
        items = loads(items_data)
    except BaseException as exc:  # a module this subinterpreter cannot load (numpy)
        return dumps(tuple(pack(load_failure(0, count, exc))))
    local = capture.install()
    return dumps(tuple(pack(run_on_thread(0, task, items, local, [0]))))


def initialize(data: bytes) -> None:
    """Run the pool's ``(initializer, initargs)`` in this subinterpreter."""
    initializer, initargs = loads(data)
    initializer(*initargs)
