"""``python -m benchmarks [--quick] [--rounds N] [--out FILE] [--no-kernel] [--baseline REV] [--only NAME]``.

Imports nothing at module level: spawn and forkserver workers of the stdlib
pools import the main module, and a heavy one would slow their start.
"""

if __name__ == "__main__":
    from benchmarks.run import main

    raise SystemExit(main())
