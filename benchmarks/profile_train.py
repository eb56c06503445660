"""Where the time of one 130m training step goes: ``torch.profiler`` over a few steps of upstream's model, of
``StatefulMambaLM(model)`` from zero, and of ours from a state with resets (the set-up of bench_train.py).

Prints, per contender, the device time per step grouped by kernel (the top ``--top``), so a change to the
training path can be aimed at the largest item. Writes ``profile_train.txt`` into ``--out`` (default: here).

Usage (GPU machine with upstream's kernels): ``python benchmarks/profile_train.py --out DIR``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TrainingSetup  # noqa: E402


def _self_us(e) -> float:
    """Self device time (µs) of a profiler event average (the attribute was renamed across torch versions)."""
    return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per contender (after 2 warm-up steps)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()

    setup = TrainingSetup(args.batch, args.seqlen, "profile_train")
    step, contenders = setup.step, setup.contenders()
    lines = []
    for name, fwd in contenders.items():
        for _ in range(2):
            step(fwd)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step(fwd)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if _self_us(e) > 0]
        total = sum(_self_us(e) for e in events) / args.steps / 1e3
        lines.append(f"== {name}: {total:.1f} ms of device time per step")
        for e in sorted(events, key=lambda e: -_self_us(e))[:args.top]:
            per = _self_us(e) / args.steps / 1e3
            lines.append(f"  {per:8.2f} ms  {e.count // args.steps:5d}x  {e.key[:110]}")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out) / "profile_train.txt"
    out.write_text(text + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
