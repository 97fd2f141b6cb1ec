"""``python -m benchmarks [--quick] [--rounds N] [--out FILE]``."""

from benchmarks.run import main

if __name__ == "__main__":
    raise SystemExit(main())
