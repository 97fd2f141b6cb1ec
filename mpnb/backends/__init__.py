"""Where workers run: the mechanics under :class:`mpnb.Pool`.

A backend starts worker processes and moves bytes to and from them; it makes
no decisions.  The pool (``mpnb/pool.py``) decides what to send, when to give
up on a task and what the notebook sees.

A backend offers:

``start_worker(worker_id) -> handle``
    Start one worker.  The handle has ``pid``, ``conn`` (a
    ``multiprocessing.connection.Connection``: ``send_bytes``/``recv_bytes``
    and waitable), ``sentinel`` (waitable; ready when the process ended),
    ``current()`` (the task the worker runs now, read from shared memory),
    ``kill()``, ``join(timeout)``, ``exitcode`` and ``crash_report()``.
``close()``
    Release what the backend holds (files, directories) after every worker
    ended.

The local backend runs worker processes on this machine, started with loky's
process launcher.  A dask.distributed cluster is not a backend of this kind:
its workers are already running and shared, so :mod:`mpnb.backends.dask`
replaces the pool's manager thread as a whole (``Pool(backend="dask")``),
taking the same commands, and is imported only when asked for, since
``distributed`` is an optional extra.
"""

from __future__ import annotations

from mpnb.backends.local import LocalBackend

__all__ = ["LocalBackend"]
