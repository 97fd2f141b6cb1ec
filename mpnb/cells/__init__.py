"""The package that holds the modules ``%%mppool`` makes from notebook cells.

A cell module is imported as ``mpnb.cells.cell_<hash>``.  Its source lives in
a private directory of the kernel that made it, not in this package's folder;
the finder below locates it.  Going through a package of mpnb, rather than
putting the directory on ``sys.path``, is what lets *every* process that can
import mpnb find a cell module, including workers that were started before
the cell ran, or even before ``%load_ext mpnb``:

    kernel (pid K) ── MPNB_CELL_DIR=<base>/K-xxxx ──> children started later
        │
        └── <base>/K-xxxx/cell_<hash>.py   <── found by an ancestor's pid, for
                                               children that predate the env var

``<base>`` is a directory of the current user, mode 0700 (see
:func:`base_dir`).  The module names are content hashes, so whichever
directory a name is found in, its content is the same.

A process that shares no ancestor or file system with the kernel (a dask
worker) is sent a module's files (:func:`files_to_ship`), writes them
(:func:`write_files`) and adds their directory to the search
(:func:`add_directory`).  This module alone knows the files' names: a module
``cell_<hash>`` is ``cell_<hash>.py``, with the values it captured from the
notebook beside it in ``cell_<hash>.pkl``.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.util
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from mpnb import exits

ENV_VAR = "MPNB_CELL_DIR"
PREFIX = "cell_"
_SOURCE, _CAPTURED = ".py", ".pkl"

_kernel_dir: Path | None = None
_cleanup_registered = False


def base_dir() -> Path:
    """The per-user directory (mode 0700) under which kernels keep cell modules.

    ``$XDG_RUNTIME_DIR/mpnb`` when the session has one, else
    ``<tempdir>/mpnb-<uid>``.  A directory that is not ours, is a link, or is
    open to others is refused: nobody else may plant code we would import.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        path = Path(runtime) / "mpnb"
    else:
        path = Path(tempfile.gettempdir()) / f"mpnb-{os.getuid()}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = path.lstat()
    if not path.is_dir() or path.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(
            f"mpnb will not keep cell modules in {path}: it must be a directory "
            f"owned by you with mode 0700. Remove it, or set XDG_RUNTIME_DIR to "
            f"a private directory."
        )
    return path


def kernel_dir() -> Path | None:
    """This process's cell-module directory, if :func:`create_kernel_dir` ran."""
    return _kernel_dir


def create_kernel_dir() -> Path:
    """Create this kernel's private directory and announce it to children.

    Idempotent.  The directory is removed by :func:`remove_kernel_dir`, which
    also runs at interpreter exit; directories left by kernels that died are
    swept here.
    """
    global _kernel_dir
    if _kernel_dir is not None and _kernel_dir.is_dir():
        return _kernel_dir
    base = base_dir()
    _sweep_dead(base)
    _kernel_dir = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base))
    os.environ[ENV_VAR] = str(_kernel_dir)
    global _cleanup_registered
    if not _cleanup_registered:  # a reload must not chain another handler
        _at_exit(remove_kernel_dir)
        _cleanup_registered = True
    return _kernel_dir


def _at_exit(fn: Any) -> None:
    """Run ``fn`` when the interpreter exits, and when it is ended by SIGTERM.

    A Jupyter kernel whose children ignore SIGTERM (multiprocessing's resource
    tracker does) takes longer to shut down than its manager waits, and is
    then ended with SIGTERM, which skips ``atexit``: so ``fn`` runs from a
    SIGTERM handler too, which then hands the signal on.
    """
    fn = exits.here_only(fn)  # not in a forked copy of this process
    atexit.register(fn)
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        fn()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def remove_kernel_dir() -> None:
    """Delete this kernel's directory; modules already imported stay usable.

    Its exit and SIGTERM hooks do nothing in a forked copy of the kernel (a
    fork-context pool worker): see :mod:`mpnb.exits`.
    """
    global _kernel_dir
    path, _kernel_dir = _kernel_dir, None
    if os.environ.get(ENV_VAR) == str(path):
        del os.environ[ENV_VAR]
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def _sweep_dead(base: Path) -> None:
    from mpnb.shared import sweep_dead

    sweep_dead(str(base), "")


_added: list[Path] = []  # directories of modules shipped to this process


def add_directory(directory: Path) -> None:
    """Look for cell modules in ``directory`` too, before the kernels' ones."""
    if directory not in _added:
        _added.append(directory)


def _search_dirs():
    """Directories added here first, then this kernel's, then those of the
    process's ancestors."""
    yield from list(_added)
    own = os.environ.get(ENV_VAR)
    if own:
        yield Path(own)
    try:
        import psutil

        ancestors = [p.pid for p in psutil.Process().parents()]
        base = base_dir()
    except Exception:  # no registry to consult: the environment must do
        return
    for pid in ancestors:
        yield from sorted(base.glob(f"{pid}-*"))


def source_file(directory: Path, name: str) -> Path:
    """Where the source of cell module ``name`` (its last dotted part will do) is kept."""
    return directory / (name.rpartition(".")[2] + _SOURCE)


def captured_file(module_file: str | Path) -> Path:
    """Where the values captured by the cell module in ``module_file`` are kept."""
    return Path(module_file).with_suffix(_CAPTURED)


def locate(name: str) -> Path | None:
    """The file of cell module ``name`` (its last dotted part), or None."""
    if not name.rpartition(".")[2].startswith(PREFIX):
        return None
    for directory in _search_dirs():
        candidate = source_file(directory, name)
        if candidate.is_file():
            return candidate
    return None


def write_files(directory: Path, files: dict[str, bytes]) -> None:
    """Write each of ``files`` (file name: content) into ``directory``, in
    order, unless it is there already; each appears whole or not at all."""
    for filename, data in files.items():
        path = directory / filename
        if path.exists():  # content-addressed: same name, same bytes
            continue
        partial = path.with_name(f".{filename}.{os.getpid()}.tmp")
        partial.write_bytes(data)
        os.replace(partial, path)


def files_to_ship(module: Any) -> dict[str, bytes]:
    """The files of cell module ``module`` (captured values first, then the
    source that loads them), for :func:`write_files` in another process;
    empty for a module that has no file."""
    module_file = getattr(module, "__file__", None)
    if not module_file:
        return {}
    source, captured = Path(module_file), captured_file(module_file)
    files = {captured.name: captured.read_bytes()} if captured.exists() else {}
    files[source.name] = source.read_bytes()
    return files


class _CellFinder(importlib.abc.MetaPathFinder):
    """Finds ``mpnb.cells.cell_*`` in the directories :func:`_search_dirs` gives."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if not fullname.startswith(__name__ + "." + PREFIX):
            return None
        found = locate(fullname)
        if found is None:
            return None
        return importlib.util.spec_from_file_location(fullname, found)


def _install_finder() -> None:
    if not any(isinstance(f, _CellFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CellFinder())


def load_captured(module_file: str) -> dict[str, Any]:
    """The values a cell module captured from the notebook, as of its cell.

    Called by the generated module itself (line 1); they were pickled with
    cloudpickle beside it when the cell ran.
    """
    with open(captured_file(module_file), "rb") as f:
        return pickle.load(f)


_install_finder()
