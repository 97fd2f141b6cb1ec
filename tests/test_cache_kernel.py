"""The task cache in real kernels: resume, restarts, invalidation, sharing, kills, eviction.

Tasks count their executions by writing a file each time they run.
"""

from __future__ import annotations

import time
from pathlib import Path

from kernel import Kernel


def _wait(condition, what: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"waited {within} s for {what}"
        time.sleep(0.05)


def _ran(runs: Path) -> list[int]:
    """The task arguments that ran since the last call, and forget them."""
    found = sorted(int(p.name.split("-")[0]) for p in runs.iterdir())
    for p in runs.iterdir():
        p.unlink()
    return found


def _cell(runs: Path, run: str, body: str = "x * x", extra: str = "", pause: str = "0.3 if x >= 4 else 0") -> str:
    """A %%mppool cell that defines ``slow`` and runs ``run`` (one line: the module is the same for any)."""
    return f"""%%mppool -n 2 --cache
import os, time, uuid
{extra}
def slow(x):
    open(os.path.join({str(runs)!r}, f"{{x}}-{{uuid.uuid4().hex}}"), "w").close()
    time.sleep({pause})
    return {body}
{run}
"""


def test_interrupted_map_resumes_and_a_restarted_kernel_recomputes_nothing(tag, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    kernel = Kernel(tag, env={"MPNB_CACHE_DIR": str(tmp_path / "cache")})
    try:
        kernel.run("%load_ext mpnb").ok()
        cell = _cell(runs, "r = pool.map(slow, range(16), chunksize=1)")
        # interrupted after some tasks: what finished is kept, and only the rest run again
        msg = kernel.submit(cell)
        _wait(lambda: len(list(runs.iterdir())) >= 7, "some tasks to run")
        kernel.interrupt()
        assert kernel.collect(msg).ename == "KeyboardInterrupt"
        reply = kernel.run("print([i for i, r in enumerate(pool.last_results) if not isinstance(r, BaseException)])")
        finished = eval(reply.ok().stdout)
        assert 4 <= len(finished) < 16, finished
        _ran(runs)
        kernel.run(cell).ok()
        reply = kernel.run("print(r == [x * x for x in range(16)], pool.monitor.calls()[-1].cached)").ok()
        assert reply.stdout.split() == ["True", str(len(finished))]
        assert _ran(runs) == sorted(set(range(16)) - set(finished))

        # a new kernel, the same cell: nothing runs
        kernel.restart()
        kernel.run("%load_ext mpnb").ok()
        kernel.run(cell).ok()
        reply = kernel.run("print(r == [x * x for x in range(16)])").ok()
        assert reply.stdout.strip() == "True" and _ran(runs) == []

        # a changed body, captured value or helper cell computes again
        kernel.run(_cell(runs, "pool.map(slow, range(3))", body="x * x + 1")).ok()
        assert _ran(runs) == [0, 1, 2]
        for offset in (1, 2):
            kernel.run(f"import numpy as np; OFFSET = np.array([{offset}])").ok()
            cell = _cell(runs, "print(pool.map(slow, range(3)))", body="x * x + int(OFFSET[0])")
            assert kernel.run(cell).ok().stdout.strip() == str(
                [x * x + offset for x in range(3)])
            assert _ran(runs) == [0, 1, 2]
        kernel.run(cell).ok()  # the same again: hits
        assert _ran(runs) == []
        # the third helper is the first again: its results are still stored
        for helper, expected in (("x + 10", [0, 1, 2]), ("x + 20", [0, 1, 2]), ("x + 10", [])):
            kernel.run(f"%%mppool\ndef helper(x):\n    return {helper}\n").ok()
            kernel.run(_cell(runs, "pool.map(slow, range(3))", body="helper(x)")).ok()
            assert _ran(runs) == expected, helper
    finally:
        kernel.shutdown()


def test_two_kernels_fill_one_cache_at_once(tag, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {"MPNB_CACHE_DIR": str(tmp_path / "cache")}
    kernels = [Kernel(tag, env=env), Kernel(tag, env=env)]
    try:
        for k in kernels:
            k.run("%load_ext mpnb").ok()
        # overlapping inputs, at the same time
        sent = [k.submit(_cell(runs, f"r = pool.map(slow, range({start}, {start} + 60))", body="list(range(x))",
                               pause="0.001")) for k, start in zip(kernels, (0, 30))]
        for k, msg in zip(kernels, sent):
            k.collect(msg).ok()
        assert len(_ran(runs)) >= 90
        reply = kernels[0].run("print(pool.map(slow, range(90)) == [list(range(x)) for x in range(90)])\n%mpcache")
        assert reply.ok().stdout.startswith("True\n")
        assert "slow (%%mppool cell_" in reply.stdout and ": 90 results" in reply.stdout
        assert _ran(runs) == []
        # a function of an ordinary cell: the same key in both kernels; a changed global it uses, another
        code = ("import numpy as np, mpnb.cachekey as ck\nSCALE = np.array([{}])\ndef helper(x):\n"
                "    return x * SCALE[0]\ndef plain(x):\n    return helper(x) + 1\nprint(ck.function_key(plain).hex())")
        keys = [[k.run(code.format(scale)).ok().stdout for scale in (2.0, 3.0)] for k in kernels]
        assert keys[0] == keys[1] and keys[0][0] != keys[0][1]
        reply = kernels[1].run("%mpcache --clear slow\n%mpcache").ok()
        assert reply.stdout.startswith("mpnb cache: removed 90 results of slow\n") and ": empty" in reply.stdout
    finally:
        for k in kernels:
            k.shutdown()


def test_a_kernel_killed_while_writing_then_a_reader_and_eviction(tag, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    cache = tmp_path / "cache"
    env = {"MPNB_CACHE_DIR": str(cache)}
    # 2 MiB results: each is written as a raw file beside the database
    cell = _cell(runs, "r = pool.map(slow, range(200), chunksize=1)", body="np.full(2**18, float(x))",
                 extra="import numpy as np", pause="0.05")
    writer = Kernel(tag, env=env)
    try:
        writer.run("%load_ext mpnb").ok()
        writer.submit(cell)
        blobs = cache / "blobs"
        _wait(lambda: blobs.is_dir() and len(list(blobs.iterdir())) >= 20, "results to be written")
    except BaseException:
        writer.shutdown()
        raise
    writer.kill()  # its workers go too (mpnb's guardian; the tag fixture checks)
    reader = Kernel(tag, env=env)
    try:
        reader.run("%load_ext mpnb").ok()
        _ran(runs)
        reader.run(cell).ok()
        code = "print(all((a == x).all() and a.shape == (2**18,) for x, a in enumerate(r)))"
        assert reader.run(code).ok().stdout.strip() == "True"
        assert len(_ran(runs)) < 200  # what the killed kernel committed is used
        # eviction: a bound of 10 MiB keeps the last few results only
        code = ("import os, mpnb; os.environ['MPNB_CACHE_BYTES'] = str(10 * 2**20)\n"
                f"r = pool.map(slow, range(300, 310), chunksize=1, cache={str(tmp_path / 'small')!r})\n"
                f"print(sum(row[3] for row in mpnb.cache.listing({str(tmp_path / 'small')!r})) <= 10 * 2**20)")
        assert reader.run(code).ok().stdout.strip() == "True"
        _ran(runs)
        reader.run(f"pool.map(slow, range(300, 310), chunksize=1, cache={str(tmp_path / 'small')!r})").ok()
        again = _ran(runs)
        # the least recently used went first
        assert 300 in again and 5 <= len(again) <= 8, again
    finally:
        reader.shutdown()


def test_the_resume_notebook_resumes_then_takes_everything_from_the_cache(tag, tmp_path):
    import re

    from kernel import cell_text, notebook_errors, run_notebook

    env = {"MPNB_CACHE_DIR": str(tmp_path / "cache")}
    counts = []
    for _ in range(2):  # the second run is the notebook after a kernel restart
        nb = run_notebook("resume.ipynb", tag=tag, env=env, timeout=300)
        assert notebook_errors(nb) == []
        texts = [cell_text(cell) for cell in nb.cells if cell.cell_type == "code"]
        counts.append([tuple(map(int, re.search(r"(\d+) computed, (\d+) from the cache", text).groups()))
                       for text in texts[1:3]])
        assert "simulate (%%mppool cell_" in texts[3] and "24 results" in texts[3]
    (first_done, _), (rest_done, rest_cached) = counts[0]
    assert first_done < 24 and rest_cached == first_done and rest_done == 24 - first_done
    assert counts[1] == [(0, 24), (0, 24)]
