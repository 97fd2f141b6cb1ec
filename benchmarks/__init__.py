"""Side-by-side benchmarks of mpnb.Pool against the process pools people use.

Run ``python -m benchmarks`` (``--quick`` for a smoke run; ``--baseline main
--only mpnb`` to compare this mpnb with another revision of it).  Every contender
runs every workload in one process run, interleaved (A B C ... B C A ...) for
several rounds, so that load from other programs on the machine falls on all
contenders alike.  The floor (a bare interpreter's start, a pipe round trip,
a memcpy) is measured in the same rounds.  The table gives medians with
min-max, marks the best of each column, and gives each figure as a ratio to
the best peer's (the best pool that is not mpnb) and to the floor's.

- :mod:`benchmarks.tasks`: the functions the workers run (importable, as
  spawn and forkserver need).
- :mod:`benchmarks.contenders`: one small adapter per pool library.
- :mod:`benchmarks.measure`: the memory sampler and the table.
- :mod:`benchmarks.floor`: the physical floor and the ideal, measured between
  the contenders.
- :mod:`benchmarks.kernel_side`: what runs inside a real Jupyter kernel
  (the live widget, the ``%%mppool`` cell overhead).
- :mod:`benchmarks.workloads`: the workloads, and one round of them.
- :mod:`benchmarks.baseline`: ``--baseline REV``, an earlier revision of mpnb
  as one more contender, run in a child interpreter.
- :mod:`benchmarks.run`: the rounds, the report.
"""
