"""Run a notebook in a real Jupyter kernel and print what its cells show.

    python -m mpnb.demo                 # the quickstart notebook
    python -m mpnb.demo path/to/nb.ipynb

This is mpnb's main job seen end to end: the cells run in an ipykernel, where
``__main__`` is the kernel's own, exactly as in Jupyter.  Needs the ``demo``
extra (nbclient, nbformat).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

# the notebooks are package data, so an installed wheel finds them as a checkout does
NOTEBOOKS = Path(__file__).resolve().parent / "notebooks"
QUICKSTART = NOTEBOOKS / "quickstart.ipynb"


def _require_nbclient():
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError:
        raise SystemExit(
            "mpnb.demo runs notebooks with nbclient: pip install 'mpnb[demo]'"
        ) from None
    return nbformat, NotebookClient


def _this_interpreter_kernel():
    """A kernel manager class whose ``python3`` is the interpreter running the demo.

    A ``python3`` kernelspec installed for the user (``ipykernel install --user``)
    usually points at another Python, one without mpnb; looking in no kernelspec
    directory leaves ipykernel's own spec, which is ``sys.executable``.
    """
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class ThisInterpreterKernelManager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _kernel_spec_manager_default(self):
            return KernelSpecManager(parent=self, kernel_dirs=[])

    return ThisInterpreterKernelManager


def shown(cell) -> str:
    """Everything a code cell showed, as text: streams, results, errors."""
    parts: list[str] = []
    stream = None  # the name of the stream the last part came from
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            # the kernel flushes a stream on a timer, so one print may arrive
            # as several outputs: they join as written, as the page shows them
            if parts and stream == out.name:
                parts[-1] += out.text
            else:
                parts.append(out.text)
            stream = out.name
            continue
        stream = None
        if out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
        elif out.output_type == "error":
            parts.append(f"{out.ename}: {out.evalue}")
    return "".join(p if p.endswith("\n") else p + "\n" for p in parts if p)


def run(path: Path, kernel_name: str | None = None, timeout: int = 300) -> int:
    """Run ``path`` in kernel ``kernel_name`` (default: this interpreter's ipykernel)."""
    nbformat, NotebookClient = _require_nbclient()
    nb = nbformat.read(path, as_version=4)
    options = {"kernel_name": kernel_name} if kernel_name else {
        "kernel_name": "python3", "kernel_manager_class": _this_interpreter_kernel()}
    client = NotebookClient(nb, timeout=timeout, allow_errors=True,
                            resources={"metadata": {"path": str(path.parent)}}, **options)
    where = f"kernel {kernel_name!r}" if kernel_name else sys.executable
    print(f"Running {path.name} in a real Jupyter kernel ({where})\n")
    client.execute()
    failures = 0
    for number, cell in enumerate((c for c in nb.cells if c.cell_type == "code"), start=1):
        print(f"── In [{number}] " + "─" * 50)
        print(textwrap.indent(cell.source.rstrip(), "   "))
        text = shown(cell)
        if text:
            print(f"── Out [{number}]")
            print(textwrap.indent(text.rstrip(), "   "))
        failures += any(o.output_type == "error" for o in cell.get("outputs", []))
        print()
    print("All cells ran." if not failures else f"{failures} cell(s) raised an error.")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpnb.demo", description=__doc__.splitlines()[0])
    parser.add_argument("notebook", nargs="?", type=Path, default=QUICKSTART)
    parser.add_argument("--kernel", default=None,
                        help="a kernelspec name (default: an ipykernel of this interpreter)")
    args = parser.parse_args(argv)
    if not args.notebook.is_file():
        parser.error(f"{args.notebook} not found; pass the path of a notebook")
    return run(args.notebook, args.kernel)


if __name__ == "__main__":
    sys.exit(main())
