"""Side-by-side benchmarks of mpnb.Pool against the process pools people use.

Run ``python -m benchmarks`` (``--quick`` for a smoke run; ``--baseline main
--only mpnb`` to compare this mpnb with another revision of it).  Every contender
runs every workload in one process run, interleaved (A B C ... B C A ...) for
several rounds, so that load from other programs on the machine falls on all
contenders alike; the table gives medians with min-max and each figure as a
ratio to mpnb's.

- :mod:`benchmarks.tasks`: the functions the workers run (importable, as
  spawn and forkserver need).
- :mod:`benchmarks.contenders`: one small adapter per pool library.
- :mod:`benchmarks.measure`: the memory sampler and the table.
- :mod:`benchmarks.kernel_side`: what runs inside a real Jupyter kernel
  (the live widget, the ``%%mppool`` cell overhead).
- :mod:`benchmarks.workloads`: the workloads, and one round of them.
- :mod:`benchmarks.baseline`: ``--baseline REV``, an earlier revision of mpnb
  as one more contender, run in a child interpreter.
- :mod:`benchmarks.run`: the rounds, the report.
"""
