"""The task cache: results that outlive the kernel, and maps that resume.

With ``cache=`` a pool looks each task up by its key (:mod:`mpnb.cachekey`)
before sending it: a hit is delivered at once and runs nothing; a computed
result is stored as soon as it is delivered, on the notebook's side, so
every engine (local, dask) fills the same cache::

    pool._chunks ── CallCache.take ──> hits: Call.deliver, no task
                                  └──> misses: chunks for the engine
    engine ── Call.deliver ── CallCache.put ──> writer thread ──> Store

The store is a directory (mode 0700) holding one SQLite database in WAL
mode, ``index.sqlite``, and a ``blobs/`` folder.  SQLite rather than a file
per entry: a batch of results is one transaction (a file per 1 ms task would
cost more than the task), a kernel killed while writing leaves the last
committed state, several kernels write at once under SQLite's locking, and
least-recently-used eviction and the per-function listing are queries.
A result is pickled with protocol 5; buffers of 1 MiB or more (numpy arrays)
are written out of band as raw files in ``blobs/`` (temporary name, then
rename) before their row commits, so large arrays are never pickled whole
and a row never names a missing file, except one that eviction removed: a
row that cannot be loaded, for whatever reason, is a miss.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import queue
import sqlite3
import sys
import threading
import time
import uuid
import warnings
from concurrent.futures import BrokenExecutor, CancelledError
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from mpnb import cachekey
from mpnb.facts import byte_size

__all__ = ["CallCache", "Store", "clear", "default_dir", "open_store", "listing"]

ENV_DIR = "MPNB_CACHE_DIR"
ENV_BYTES = "MPNB_CACHE_BYTES"
DEFAULT_BYTES = 10 * 2**30
#: buffers this large or larger are written as raw files, not into the pickle
BLOB_BYTES = 2**20
# the format of stored rows; rows of another format are misses
_FORMAT = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (key BLOB PRIMARY KEY, fn BLOB NOT NULL, size INTEGER NOT NULL,
    used REAL NOT NULL, failed INTEGER NOT NULL, format INTEGER NOT NULL, data BLOB NOT NULL,
    blobs TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS entries_used ON entries (used);
CREATE INDEX IF NOT EXISTS entries_fn ON entries (fn);
CREATE TABLE IF NOT EXISTS functions (fn BLOB PRIMARY KEY, name TEXT NOT NULL, origin TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS total (one INTEGER PRIMARY KEY CHECK (one = 1), bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO total VALUES (1, 0);
"""


_WAIT = 60.0  # seconds a connection waits for another process's lock


def _use_wal(db: sqlite3.Connection) -> None:
    """Put the database in WAL mode (kept in the file: a no-op once done).

    Switching the mode of a new database needs its exclusive lock, and SQLite reports
    "database is locked" at once, without its busy wait, when another process opens the
    same new file at that moment (two kernels' first cached map); so wait here."""
    deadline = time.monotonic() + _WAIT
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def default_dir() -> Path:
    """``$MPNB_CACHE_DIR``, else the platform's user cache directory + ``mpnb``."""
    given = os.environ.get(ENV_DIR)
    if given:
        return Path(given).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "mpnb"
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "mpnb" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mpnb"


def size_bound() -> int:
    text = os.environ.get(ENV_BYTES, "")
    try:
        return int(float(text)) if text else DEFAULT_BYTES
    except ValueError:
        raise ValueError(f"{ENV_BYTES}={text!r}: the cache's size bound must be a number of bytes, "
                         "such as 10e9") from None


# ------------------------------------------------------------------ the store


class Store:
    """One cache directory; thread-safe; several processes may share it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)  # private even when it existed with a looser mode
        self.blobs = self.path / "blobs"
        self.blobs.mkdir(mode=0o700, exist_ok=True)
        self.bound = size_bound()
        self._local = threading.local()
        self._queue: queue.Queue = queue.Queue()
        self._writer: threading.Thread | None = None
        self._lock = threading.Lock()
        with self._db() as db:
            db.executescript(_SCHEMA)
        self._sweep()

    def _sweep(self, age: float = 3600.0) -> None:
        """Remove what a writer killed between writing a blob and committing its row left: files
        of no row, an hour old (younger ones may be a live writer's, about to be committed)."""
        old = time.time() - age
        try:
            files = [p for p in self.blobs.iterdir() if p.stat().st_mtime < old]
            if not files:
                return
            named = {n for (blobs,) in self._db().execute("SELECT blobs FROM entries WHERE blobs != ''")
                     for n in blobs.split(",")}
        except (OSError, sqlite3.Error):
            return
        for path in files:
            if path.name not in named:
                path.unlink(missing_ok=True)

    def _db(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections are not shared between threads)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path / "index.sqlite", timeout=_WAIT, isolation_level=None)
            _use_wal(db)
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    # -- reading

    def get(self, keys: list[bytes]) -> dict[bytes, tuple[Any, bool]]:
        """The stored ``(value, failed)`` of those ``keys`` that hit; an entry that cannot be loaded is left out."""
        found: dict[bytes, tuple[Any, bool]] = {}
        rows = []
        try:
            db = self._db()
            for start in range(0, len(keys), 500):
                part = keys[start : start + 500]
                rows += db.execute(f"SELECT key, failed, format, data, blobs FROM entries WHERE key IN "
                                   f"({','.join('?' * len(part))})", part).fetchall()
        except sqlite3.Error as exc:  # locked for a minute, or a damaged file: the tasks run
            warnings.warn(f"mpnb cache: could not read {self.path} ({exc}); these tasks run", RuntimeWarning,
                          stacklevel=2)
        for key, failed, fmt, data, blobs in rows:
            value = self._load(fmt, data, blobs)
            if value is not _MISS:
                found[key] = (value, bool(failed))
        if found:
            self._queue_op(("touch", list(found)))
        return found

    def _load(self, fmt: int, data: bytes, blobs: str) -> Any:
        if fmt != _FORMAT:
            return _MISS
        try:
            buffers = []
            for name in filter(None, blobs.split(",")):
                with open(self.blobs / name, "rb") as f:
                    buffer = bytearray(os.fstat(f.fileno()).st_size)
                    f.readinto(buffer)
                buffers.append(buffer)
            return pickle.loads(data, buffers=buffers)
        except Exception:  # evicted meanwhile, or written by a Python or library that differs
            return _MISS

    # -- writing: on a thread of the store's own, in batches

    def put(self, fn: bytes, label: tuple[str, str], entries: list[tuple[bytes, Any, bool]]) -> None:
        """Store ``(key, value, failed)`` entries of function ``fn`` soon; values that do not pickle are skipped."""
        packed = []
        for key, value, failed in entries:
            buffers: list[pickle.PickleBuffer] = []
            try:
                data = pickle.dumps(value, 5, buffer_callback=lambda b: _keep_large(b, buffers))
            except Exception:
                continue
            packed.append((key, data, buffers, failed))
        if packed:
            self._queue_op(("put", fn, label, packed))

    def _queue_op(self, op: tuple) -> None:
        with self._lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write_loop, name="mpnb-cache-writer", daemon=True)
                self._writer.start()
        self._queue.put(op)

    def flush(self) -> None:
        """Wait until what was given to :meth:`put` is stored."""
        if self._writer is not None:
            self._queue.join()

    def _write_loop(self) -> None:
        while True:
            ops = [self._queue.get()]
            while True:  # everything queued meanwhile: one transaction
                try:
                    ops.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(ops)
            except Exception as exc:  # a full disk, a removed directory: the cache is best effort
                warnings.warn(f"mpnb: could not write to the cache in {self.path} ({exc}); "
                              "results are returned but not kept", RuntimeWarning, stacklevel=1)
            finally:
                for _ in ops:
                    self._queue.task_done()

    def _write(self, ops: list[tuple]) -> None:
        rows, functions, touched = [], {}, []
        now = time.time()
        for op in ops:
            if op[0] == "touch":
                touched.extend(op[1])
                continue
            _, fn, label, packed = op
            functions[fn] = label
            for key, data, buffers, failed in packed:
                names = [self._write_blob(buffer) for buffer in buffers]
                size = len(data) + sum(b.raw().nbytes for b in buffers)
                rows.append((key, fn, size, now, int(failed), _FORMAT, data, ",".join(names)))
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR IGNORE INTO functions VALUES (?, ?, ?)",
                           [(fn, *label) for fn, label in functions.items()])
            added = 0
            for row in rows:
                if db.execute("INSERT OR IGNORE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row).rowcount:
                    added += row[2]
                else:  # another kernel stored it first: ours is not needed
                    self._unlink(row[7])
            db.executemany("UPDATE entries SET used = ? WHERE key = ?", [(now, k) for k in touched])
            db.execute("UPDATE total SET bytes = bytes + ?", (added,))
            doomed = self._evict(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        for blobs in doomed:
            self._unlink(blobs)

    def _write_blob(self, buffer: pickle.PickleBuffer) -> str:
        name = uuid.uuid4().hex
        partial = self.blobs / f".{name}.tmp"
        with open(partial, "wb") as f:
            f.write(buffer.raw())
        os.replace(partial, self.blobs / name)
        return name

    def _unlink(self, blobs: str) -> None:
        for name in filter(None, blobs.split(",")):
            try:
                os.unlink(self.blobs / name)
            except FileNotFoundError:
                pass

    def _evict(self, db: sqlite3.Connection) -> list[str]:
        """Delete the least recently used rows until the total is within the bound; their blobs, to unlink after commit."""
        (total,) = db.execute("SELECT bytes FROM total").fetchone()
        doomed: list[str] = []
        freed = 0
        if total <= self.bound:
            return doomed
        for key, size, blobs in db.execute("SELECT key, size, blobs FROM entries ORDER BY used, rowid").fetchall():
            if total - freed <= self.bound:
                break
            db.execute("DELETE FROM entries WHERE key = ?", (key,))
            freed += size
            doomed.append(blobs)
        db.execute("UPDATE total SET bytes = bytes - ?", (freed,))
        return doomed

    # -- seeing and clearing

    def listing(self) -> list[tuple[str, str, int, int, float]]:
        """``(name, origin, entries, bytes, last use)`` per function, most recently used first."""
        return self._db().execute(
            "SELECT f.name, f.origin, COUNT(*), SUM(e.size), MAX(e.used) FROM entries e "
            "JOIN functions f ON f.fn = e.fn GROUP BY e.fn ORDER BY MAX(e.used) DESC").fetchall()

    def clear(self, name: str | None = None) -> int:
        """Remove every entry, or those of functions called ``name`` (qualified name); how many."""
        self.flush()
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            where, params = ("", ()) if name is None else (
                " WHERE fn IN (SELECT fn FROM functions WHERE name = ? OR name LIKE ?)", (name, "%." + name))
            rows = db.execute("SELECT size, blobs FROM entries" + where, params).fetchall()
            db.execute("DELETE FROM entries" + where, params)
            db.execute("UPDATE total SET bytes = MAX(0, bytes - ?)", (sum(r[0] for r in rows),))
            db.execute("DELETE FROM functions WHERE fn NOT IN (SELECT DISTINCT fn FROM entries)")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        for _, blobs in rows:
            self._unlink(blobs)
        return len(rows)


_MISS = object()


def _keep_large(buffer: pickle.PickleBuffer, large: list[pickle.PickleBuffer]) -> bool:
    """pickle's buffer callback: a large buffer goes out of band (False), a small one stays in the pickle."""
    if buffer.raw().nbytes < BLOB_BYTES:
        return True
    large.append(buffer)
    return False


_stores: dict[Path, Store] = {}
_stores_lock = threading.Lock()


def open_store(where: Any) -> Store | None:
    """The store a ``cache=`` value names: ``True`` the default directory, a path that one, ``False``/``None`` none."""
    if where is None or where is False:
        return None
    if where is True:
        path = default_dir()
    elif isinstance(where, (str, os.PathLike)):
        path = Path(where).expanduser()
    else:
        raise TypeError(f"cache={where!r}: give True (the default directory, ${ENV_DIR} or the user cache "
                        "directory), a directory path, or False")
    path = path.resolve()
    with _stores_lock:
        if path not in _stores:
            try:
                _stores[path] = Store(path)
            except (OSError, sqlite3.Error) as exc:
                raise OSError(f"cache={where!r}: {path} cannot hold the task cache ({exc}); give cache= a "
                              f"directory you can write, or set {ENV_DIR}") from exc
        return _stores[path]


def clear(fn: Any = None, cache: Any = True) -> int:
    """Remove the cached results of function ``fn`` (a function or its name), or all; returns how many."""
    store = open_store(cache)
    assert store is not None
    name = None if fn is None else fn if isinstance(fn, str) else cachekey.function_label(fn)[0]
    return store.clear(name)


def listing(cache: Any = True) -> list[tuple[str, str, int, int, float]]:
    """What :meth:`Store.listing` says of the cache ``cache`` names."""
    store = open_store(cache)
    assert store is not None
    return store.listing()


def listing_text(cache: Any = True) -> str:
    """``%mpcache``: one line per function, most recently used first."""
    store = open_store(cache)
    assert store is not None
    rows = store.listing()
    if not rows:
        return f"mpnb cache {store.path}: empty"
    lines = [f"mpnb cache {store.path}: {sum(r[2] for r in rows)} results, "
             f"{byte_size(sum(r[3] for r in rows))} of at most {byte_size(store.bound)}"]
    for name, origin, entries, size, used in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(used))
        lines.append(f"  {name} ({origin}): {entries} result{'s' * (entries != 1)}, {byte_size(size)}, "
                     f"last used {when}")
    return "\n".join(lines)


# ------------------------------------------------------------------ per call


@dataclass
class CallCache:
    """One call's use of a store: its function's key and its tasks' keys."""

    store: Store
    fn: bytes
    label: tuple[str, str]
    errors: bool  # store failed tasks too
    arguments: Callable[[Any], tuple[tuple, dict]]
    warned: bool = False

    def __post_init__(self) -> None:
        self.keys: dict[int, bytes] = {}
        self.lock = threading.Lock()
        self.hits = 0

    def take(self, indices: Sequence[int], items: list, deliver: Callable) -> tuple[Sequence[int], list]:
        """Deliver the stored results among these tasks; the indices and items left to run."""
        keys: dict[int, bytes] = {}
        for index, item in zip(indices, items):
            key = self._key(index, item)
            if key is not None:
                keys[index] = key
        found = self.store.get(list(keys.values())) if keys else {}
        hit = [i for i in indices if keys.get(i) in found]
        if hit:
            values = [found[keys[i]][0] for i in hit]
            deliver(hit, values, [i for i in hit if found[keys[i]][1]], {})
            self.hits += len(hit)
        with self.lock:
            self.keys.update((i, k) for i, k in keys.items() if k not in found)
        hits = set(hit)
        left = [(i, item) for i, item in zip(indices, items) if i not in hits]
        return [i for i, _ in left], [item for _, item in left]

    def _key(self, index: int, item: Any) -> bytes | None:
        args, kwargs = self.arguments(item)
        try:
            parts = self.fn + cachekey.digest(args, "args") + cachekey.digest(kwargs, "kwargs")
        except cachekey.Uncacheable as exc:
            if not self.warned:
                self.warned = True
                warnings.warn(f"mpnb cache: task {index} is not cached: its {exc}. Tasks with such "
                              "arguments run every time; pass what the object is made from instead "
                              "(a file's path, not the open file).", RuntimeWarning, stacklevel=2)
            return None
        return hashlib.blake2b(parts, digest_size=16).digest()

    def put(self, indices: Iterable[int], values: list[Any], failed: Iterable[int]) -> None:
        """Store what the engine delivered (failures only with ``cache_errors``)."""
        failed = set(failed)
        entries = []
        with self.lock:
            for index, value in zip(indices, values):
                key = self.keys.pop(index, None)
                # a cancelled task, or one the pool could not run, has no outcome of its own
                if isinstance(value, (CancelledError, BrokenExecutor)):
                    continue
                if key is not None and (self.errors or index not in failed):
                    entries.append((key, value, index in failed))
        if entries:
            self.store.put(self.fn, self.label, entries)


def for_call(store: Store | None, fn: Callable, arguments: Callable[[Any], tuple[tuple, dict]],
             errors: bool) -> CallCache | None:
    """A call's cache, or None when there is no store or its function has no stable key (warned)."""
    if store is None:
        return None
    try:
        key = cachekey.function_key(fn)
    except cachekey.Uncacheable as exc:
        warnings.warn(f"mpnb cache: nothing of this call is cached: {exc}.", RuntimeWarning, stacklevel=3)
        return None
    return CallCache(store, key, cachekey.function_label(fn), errors, arguments)
