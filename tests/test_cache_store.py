"""The task cache's store and keys, in plain processes (mpnb.cache, mpnb.cachekey)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pandas as pd
import pytest

from mpnb import cache, cachekey


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv(cache.ENV_BYTES, raising=False)
    return cache.Store(tmp_path / "c")


def _key_in_fresh_interpreter(code: str) -> str:
    """The digest an expression gets in another interpreter (another hash seed)."""
    script = f"from mpnb import cachekey\n{textwrap.dedent(code)}\nprint(cachekey.digest(value).hex())"
    env = dict(os.environ, PYTHONHASHSEED="random")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env=env).stdout.strip()


def test_keys_are_stable_across_interpreters_and_follow_content():
    code = """
        import numpy as np, pandas as pd, fractions
        value = ({"b": {1, "x", (2, 3)} | {f"s{i}" for i in range(20)}, "a": [1.5, None]}, np.arange(12.0).reshape(3, 4),
                 pd.DataFrame({"x": [1, 2], "y": ["a", "b"]}, index=[5, 6]), fractions.Fraction(1, 3))
    """
    first, second = _key_in_fresh_interpreter(code), _key_in_fresh_interpreter(code)
    assert first == second
    namespace: dict = {}
    exec(textwrap.dedent(code), namespace)
    assert cachekey.digest(namespace["value"]).hex() == first
    # content, not identity: an equal array hits, a changed element, dtype, shape or index misses
    a = np.arange(12.0).reshape(3, 4)
    assert cachekey.digest(a) == cachekey.digest(a.copy())
    assert len({cachekey.digest(x) for x in (a, a.T, a.astype(np.float32), a.reshape(4, 3), a + 1)}) == 5
    frame = pd.DataFrame({"x": [1, 2]})
    assert cachekey.digest(frame) != cachekey.digest(frame.set_axis([7, 8]))
    assert cachekey.digest(frame) != cachekey.digest(frame.rename(columns={"x": "z"}))


def test_unhashable_arguments_name_where_they_are(tmp_path):
    with open(tmp_path / "f", "w") as f:
        with pytest.raises(cachekey.Uncacheable, match=r"args\[0\]\['file'\] \(a _io.TextIOWrapper\)"):
            cachekey.digest({"file": f}, "args[0]")
    with pytest.raises(cachekey.Uncacheable, match="_thread.lock"):
        cachekey.digest(threading.Lock())


def test_library_functions_are_named_with_their_version():
    assert cachekey.function_label(np.sum) == ("sum", f"numpy.fromnumeric numpy {np.__version__}".replace(
        "numpy.fromnumeric", np.sum.__module__))
    assert cachekey.function_key(np.sum) != cachekey.function_key(np.prod)
    assert cachekey.function_key(os.path.join) == cachekey.function_key(os.path.join)


def test_store_round_trip_large_arrays_out_of_band(store):
    big = np.arange(2**20, dtype=np.float64)  # 8 MiB: a raw file, not in the pickle
    store.put(b"f", ("f", "test"), [(b"k1", {"a": big}, False), (b"k2", ValueError("bad"), True)])
    store.flush()
    assert len(os.listdir(store.blobs)) == 1
    (row,) = store._db().execute("SELECT length(data) FROM entries WHERE key = ?", (b"k1",)).fetchall()
    assert row[0] < 10_000
    found = store.get([b"k1", b"k2", b"missing"])
    assert set(found) == {b"k1", b"k2"}
    np.testing.assert_array_equal(found[b"k1"][0]["a"], big)
    assert found[b"k1"][0]["a"].flags.writeable and found[b"k1"][1] is False
    assert isinstance(found[b"k2"][0], ValueError) and found[b"k2"][1] is True
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o700


def test_unloadable_entries_are_misses(store):
    store.put(b"f", ("f", "test"), [(b"ok", 1, False), (b"bad", 2, False), (b"old", 3, False)])
    store.flush()
    db = store._db()
    db.execute("UPDATE entries SET data = ? WHERE key = ?", (b"\x80\x05garbage", b"bad"))
    db.execute("UPDATE entries SET format = 0 WHERE key = ?", (b"old",))
    assert {k: v for k, (v, _) in store.get([b"ok", b"bad", b"old"]).items()} == {b"ok": 1}


def test_eviction_keeps_the_recently_used_within_the_bound(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV_BYTES, str(5 * 2**20))
    store = cache.Store(tmp_path / "c")
    for i in range(4):  # 2 MiB each, written one after another
        store.put(b"f", ("f", "test"), [(b"%d" % i, np.full(2**18, i, dtype=np.float64), False)])
        store.flush()
        if i in (1, 2):
            # 0 is used again each time: 1, then 2, are the least recently used
            assert set(store.get([b"0"] if i == 1 else [b"0", b"1"])) == {b"0"}
            store.flush()
    assert set(store.get([b"0", b"1", b"2", b"3"])) == {b"0", b"3"}
    (total,) = store._db().execute("SELECT bytes FROM total").fetchone()
    assert total <= 5 * 2**20
    assert len(os.listdir(store.blobs)) == 2  # evicted entries' files are gone


def test_clear_by_name_and_all(store):
    store.put(b"f", ("mod.square", "x"), [(b"a", 1, False)])
    store.put(b"g", ("cube", "x"), [(b"b", 1, False), (b"c", 2, False)])
    store.flush()
    assert store.clear("square") == 1
    assert [row[0] for row in store.listing()] == ["cube"]
    assert store.clear() == 2
    assert store.listing() == []


def test_a_call_cache_takes_hits_and_warns_once_for_unhashable(store):
    from mpnb._protocol import Mode
    from mpnb.calls import arguments
    import functools

    calls = cache.for_call(store, np.sqrt, functools.partial(arguments, Mode.ARG), errors=False)
    assert calls is not None
    assert calls.take([0, 1], [4.0, 9.0], lambda *a: pytest.fail("nothing is stored yet")) == ([0, 1], [4.0, 9.0])
    calls.put([0, 1], [2.0, 3.0], [])
    store.flush()
    lock = threading.Lock()
    delivered = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        left = calls.take([0, 1, 2, 3], [4.0, 9.0, lock, lock], lambda i, v, f, o: delivered.append((i, v)))
    assert delivered == [([0, 1], [2.0, 3.0])]
    assert left == ([2, 3], [lock, lock])
    assert len(caught) == 1 and "task 2" in str(caught[0].message) and "args[0]" in str(caught[0].message)


def test_files_a_killed_writer_left_are_swept_once_old(store):
    store.put(b"f", ("f", "test"), [(b"k", np.zeros(2**18), False)])
    store.flush()
    (kept,) = os.listdir(store.blobs)
    for name in (".partial.tmp", "uncommitted"):
        (store.blobs / name).write_bytes(b"x")
    store._sweep()
    assert len(os.listdir(store.blobs)) == 3  # young: perhaps a live writer's
    for name in os.listdir(store.blobs):
        os.utime(store.blobs / name, (0, 0))
    store._sweep()
    assert os.listdir(store.blobs) == [kept]
    assert store.get([b"k"])[b"k"][0].shape == (2**18,)


def _open_stores_in_step(base: str, rounds: int, barrier, failures) -> None:
    from pathlib import Path

    for i in range(rounds):
        barrier.wait()
        try:
            cache.Store(Path(base) / f"c{i}").get([b"k"])
        except Exception as exc:  # noqa: BLE001 - what the parent reports
            failures.put(f"store {i}: {exc!r}")


def test_processes_that_open_a_new_store_at_once_all_get_it(tag, tmp_path, monkeypatch):
    # two kernels' first cached maps create the store together: each must get it
    # (SQLite refused one of them "database is locked", at once, in about one round in three)
    import multiprocessing

    from kernel import TAG_VAR

    ctx = multiprocessing.get_context("spawn")
    barrier, failures = ctx.Barrier(4), ctx.Queue()
    # tagged after the barrier is made: the resource tracker it starts is this process's
    monkeypatch.setenv(TAG_VAR, tag)
    procs = [ctx.Process(target=_open_stores_in_step, args=(str(tmp_path), 25, barrier, failures))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, p
    found = []
    while not failures.empty():
        found.append(failures.get())
    assert found == []


def test_the_dask_engine_fills_and_reads_the_cache(cluster, tag, tmp_path):
    import mpnb

    with mpnb.Pool(backend="dask", address=cluster.address, cache=tmp_path / "c", live=False) as pool:
        assert pool.map(abs, range(-5, 5)) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
        assert pool.map(abs, range(-5, 7)) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4, 5, 6]
        status = pool.monitor.calls()[-1]
        assert (status.done, status.cached) == (2, 10)


def test_views_count_results_from_the_cache_apart_and_the_eta_counts_what_is_left():
    from mpnb.facts import Facts, status_line, summary_text

    facts = Facts(name="pool", backend="local", method="exec", alive=2, size=2, done=10, failed=0, total=100,
                  elapsed=10.0, rows=(), failures=(), cached=50)
    assert facts.progress == "60/100 (60%)"
    assert facts.rate == 1.0 and facts.eta == 40.0  # 40 left at 1 computed task per second
    assert "50 from cache" in status_line(facts)
    assert "10 of 100 tasks returned, 0 failed" in summary_text(facts) and "50 from cache" in summary_text(facts)


def test_the_background_calls_take_cache_per_call(tag, tmp_path):
    """apply_async, map_async and starmap_async take ``cache=`` as apply and
    map do, over the pool's; submit uses the pool's."""
    import mpnb
    from kernel import TAG_VAR

    def counts():
        status = pool.monitor.calls()[-1]
        return status.done, status.cached

    other = tmp_path / "other"
    with mpnb.Pool(2, cache=tmp_path / "c", live=False, env={TAG_VAR: tag}) as pool:
        assert pool.apply_async(abs, (-4,)).get(timeout=60) == 4 and counts() == (1, 0)
        pool.cache.flush()
        assert pool.submit(abs, -4).result(timeout=60) == 4 and counts() == (0, 1)
        assert pool.apply_async(abs, (-4,)).get(timeout=60) == 4 and counts() == (0, 1)
        assert pool.apply_async(abs, (-4,), cache=False).get(timeout=60) == 4 and counts() == (1, 0)
        assert pool.map_async(abs, range(-3, 3), cache=other).get(timeout=60) == [3, 2, 1, 0, 1, 2]
        assert counts() == (6, 0)
        mpnb.cache.open_store(other).flush()
        assert pool.map_async(abs, range(-3, 3), cache=other).get(timeout=60) == [3, 2, 1, 0, 1, 2]
        assert counts() == (0, 6)
        assert pool.starmap_async(pow, [(2, 3)], cache=other).get(timeout=60) == [8] and counts() == (1, 0)
        assert pool.map_async(abs, range(-3, 3)).get(timeout=60) == [3, 2, 1, 0, 1, 2] and counts() == (6, 0)
