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

Only the local backend exists so far: worker processes on this machine,
started with loky's process launcher.
"""

from __future__ import annotations

from mpnb.backends.local import LocalBackend

__all__ = ["LocalBackend"]
