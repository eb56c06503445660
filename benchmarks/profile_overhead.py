"""Host (CPU) cost of a 130m-shaped prefill, ours vs upstream: where short prefills spend their time.

At small shapes a forward is bound by the host issuing kernels, not by the GPU running them. For each
``--shapes`` (batch x seqlen) this prints, for ours and upstream's forward (same weights, ``num_last_tokens=1``):

* wall ms per forward (synchronised each time);
* issue ms per forward: the host time of ``--loops`` back-to-back forwards before the final synchronise, divided
  by ``--loops`` (the host's own cost while the GPU queue does not fill);
* GPU kernel ms and kernel launches per forward (torch.profiler);

then the Python functions that take the most host time in our forward (cProfile, by own time and cumulative).
Writes nothing into docs; ``--out DIR`` keeps the report as text.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LM_130M, median_time, upstream_lm  # noqa: E402

from mamba_state.adapters import StatefulMambaLM  # noqa: E402


def _issue_ms(fn, loops: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(loops):
        fn()
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    return issued / loops * 1e3


def _gpu_ms_and_launches(fn) -> tuple[float, int]:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in events) / 1e3, len(events)


def _cprofile(fn, loops: int, rows: int) -> str:
    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(loops):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumtime").print_stats(rows)
    return out.getvalue()


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["1x256", "1x2048", "8x2048"])
    p.add_argument("--loops", type=int, default=20)
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_overhead: needs a CUDA GPU")
        return 0
    up, why = upstream_lm(dict(LM_130M), torch.device("cuda"), torch.bfloat16)
    lm = StatefulMambaLM(up) if up is not None else StatefulMambaLM.from_config(
        dict(LM_130M), device="cuda", dtype=torch.bfloat16)
    lm.eval()
    report = [] if up is not None else [f"upstream not measured: {why}"]
    for shape in args.shapes:
        b, L = (int(v) for v in shape.split("x"))
        ids = torch.randint(0, 50000, (b, L), device="cuda")
        sides = {"ours": lambda: lm(ids, num_last_tokens=1)}
        if up is not None:
            sides["upstream"] = lambda: up(ids, num_last_tokens=1)
        for name, fn in sides.items():
            wall = median_time(fn, repeats=args.loops) * 1e3
            issue = _issue_ms(fn, args.loops)
            gpu, launches = _gpu_ms_and_launches(fn)
            report.append(f"{shape} {name:8s}: wall {wall:6.2f} ms | issue {issue:6.2f} ms | GPU kernels {gpu:6.2f} ms"
                          f" | {launches} launches")
            print(report[-1], flush=True)
    b, L = (int(v) for v in args.shapes[0].split("x"))
    ids = torch.randint(0, 50000, (b, L), device="cuda")
    report.append(f"\n### cProfile, ours, {args.shapes[0]}, {args.loops} forwards\n")
    report.append(_cprofile(lambda: lm(ids, num_last_tokens=1), args.loops, args.rows))
    if up is not None:
        report.append(f"\n### cProfile, upstream, {args.shapes[0]}, {args.loops} forwards\n")
        report.append(_cprofile(lambda: up(ids, num_last_tokens=1), args.loops, 15))
    print("\n".join(report[-4:]))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_overhead.txt").write_text("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
