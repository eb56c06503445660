"""Fill Triton's on-disk kernel cache in parallel before a run that autotunes.

Upstream's Mamba-3 Triton kernels autotune over 27 configurations each (the backward's over about 200), and Triton
compiles those configurations one after the other, about 4 s each on an H200 host: the first forward of a new
autotune key costs about two minutes, the gradient test about eight. Compiling is what takes the time, not timing
the configurations (about 0.1 s each). This script runs a command ``--workers`` times at once, each copy with only
its share of every autotuned kernel's configurations (configuration ``i`` goes to worker ``i % workers``), so the
copies compile disjoint shares side by side into the shared ``TRITON_CACHE_DIR``. The real run afterwards still
autotunes over every configuration, now from cached binaries, and picks the same winner it would have picked alone:
the timings it compares are its own. A worker's compiled binary is the one the real run would build, because the
inputs (shapes, dtypes, divisibility), the options and the environment are the same; pass the same command.

Usage (GPU machine; the workers' output goes to ``--log-dir``, their failures are reported and otherwise ignored,
since a worker only has to compile)::

    python3 benchmarks/triton_prewarm.py --workers 14 -- python3 benchmarks/bench_mamba3.py --warm-only
    python3 benchmarks/triton_prewarm.py --workers 14 -- python3 -m pytest -q -m gpu tests/test_mamba3_gpu.py

Each worker is this script again with ``--shard I/N``: it narrows ``triton.runtime.autotuner.Autotuner``'s
configurations (after upstream's own pruning) to its share, then runs the command in the same process through
``runpy`` (``python3 -m module ...`` or ``python3 script.py ...``). A kernel without autotuning is compiled by every
worker that reaches it (the cache makes that harmless). A worker's own autotune result is keyed by its share of the
configurations, so it never stands in for the full search.
"""

from __future__ import annotations

import argparse
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

SHARD_ENV = "MAMBA_STATE_PREWARM_SHARD"


def _cache_dir() -> Path:
    return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def _count_files(path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(path)) if path.is_dir() else 0


def narrow_autotuning(index: int, count: int) -> None:
    """Make every Triton autotuner in this process try only configurations ``index, index + count, ...`` of its
    pruned list (at least one, so that a kernel with fewer configurations than workers still compiles one)."""
    from triton.runtime.autotuner import Autotuner

    prune = Autotuner.prune_configs

    def prune_to_share(self, kwargs):
        configs = prune(self, kwargs)
        share = configs[index::count]
        return share or configs[index % len(configs):][:1]

    Autotuner.prune_configs = prune_to_share


def _run_in_process(command: list[str]) -> None:
    """Run ``python3 -m module args`` or ``python3 script args`` here (after the autotuner was narrowed)."""
    if Path(command[0]).name.startswith("python"):
        command = command[1:]
    if command[:1] == ["-m"]:
        sys.argv = [command[1], *command[2:]]
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(command)
        sys.path.insert(0, str(Path(command[0]).resolve().parent))
        runpy.run_path(command[0], run_name="__main__")


def _worker(shard: str, command: list[str]) -> int:
    index, count = (int(v) for v in shard.split("/"))
    narrow_autotuning(index, count)
    try:
        _run_in_process(command)
    except SystemExit as exc:  # pytest and argparse end with SystemExit: the code is the worker's result
        return exc.code if isinstance(exc.code, int) else 0
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: triton_prewarm.py [--workers N] [--timeout S] [--log-dir D] -- python3 ...", file=sys.stderr)
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before the remaining workers are stopped")
    p.add_argument("--log-dir", default="/tmp/triton_prewarm", help="one log per worker")
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # set for the workers themselves
    args = p.parse_args(argv[:cut])
    command = argv[cut + 1:]
    if not command:
        p.error("no command after --")
    if args.shard:
        return _worker(args.shard, command)

    cache = _cache_dir()
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    before, t0 = _count_files(cache), time.perf_counter()
    procs = []
    for i in range(args.workers):
        log = open(log_dir / f"worker{i}.log", "w")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--shard", f"{i}/{args.workers}", "--", *command]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ}), log))
    codes = []
    for proc, log in procs:
        left = max(1.0, args.timeout - (time.perf_counter() - t0))
        try:
            codes.append(proc.wait(timeout=left))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append("timeout")
        log.close()
    failed = [i for i, c in enumerate(codes) if c != 0]
    print(f"triton prewarm: {args.workers} workers in {time.perf_counter() - t0:.1f} s, cache {cache} "
          f"{before} -> {_count_files(cache)} files"
          + (f"; workers {failed} ended with {[codes[i] for i in failed]} (logs in {log_dir})" if failed else ""),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
