"""Execute notebooks top to bottom on a fresh kernel and fail on any error or on a slow notebook.

Usage: ``python scripts/run_notebooks.py [--limit SECONDS] [--write DIR] NOTEBOOK...`` (default: every
``examples/*.ipynb``). Each notebook runs in a temporary working directory with nbclient; a cell that raises, a
cell that runs past the limit, or a whole notebook slower than ``--limit`` (default 60 s, kernel start included)
fails the run. ``--write DIR`` keeps the executed copies (with outputs) there; the repository's copies stay
output-free.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

ROOT = Path(__file__).resolve().parent.parent


def run_one(path: Path, limit: float, write: Path | None) -> tuple[bool, float, str]:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nb-") as cwd:
        # IPC sockets in the temporary directory: the kernel is local, no TCP port needs to be opened
        km = KernelManager(kernel_name="python3", transport="ipc", ip=str(Path(cwd) / "kernel"))
        client = NotebookClient(nb, km=km, timeout=int(limit), kernel_name="python3",
                                resources={"metadata": {"path": cwd}})
        try:
            client.execute()
            ok, why = True, ""
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as exc:
            ok, why = False, str(exc)[-4000:]
        finally:  # a kernel manager passed in is not shut down by nbclient
            if km.has_kernel:
                km.shutdown_kernel(now=False)
    elapsed = time.perf_counter() - start
    if ok and elapsed > limit:
        ok, why = False, f"took {elapsed:.1f} s, expected at most {limit:.0f} s"
    if write is not None:
        write.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, write / path.name)
    return ok, elapsed, why


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="execute notebooks; fail on errors and slow notebooks")
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--limit", type=float, default=60.0, help="seconds per notebook (default 60)")
    parser.add_argument("--write", type=Path, default=None, help="directory for the executed copies")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "examples").glob("*.ipynb"))
    if not paths:
        print("run_notebooks: expected notebooks, found none")
        return 1
    failed = 0
    for path in paths:
        ok, elapsed, why = run_one(path, args.limit, args.write)
        print(f"run_notebooks: {'ok  ' if ok else 'FAIL'} {path.name} ({elapsed:.1f} s)")
        if not ok:
            failed += 1
            print(why)
    print(f"run_notebooks: {len(paths) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
