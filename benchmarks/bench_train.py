"""One training step of the 130m-shaped LM, upstream's model against ``StatefulMambaLM(model)`` on the same weights.

A step: forward, cross-entropy on next-token targets, backward, fused AdamW step (one optimizer over the shared
parameters, gradients set to None before each step), under bf16 autocast with float32 parameters. Contenders:

* ``upstream``: ``MambaLMHeadModel.forward`` (its fused ``mamba_inner_fn`` and CUDA kernels);
* ``ours``: ``StatefulMambaLM(model)`` from a zero state;
* ``ours, state + resets``: ours from a non-zero initial state (a detached prefill of other tokens) with resets
  at about one token in 512, reported as overhead over ours from zero.

Times are medians of rounds in turns (each round runs every contender once); peak memory is
``torch.cuda.max_memory_allocated`` over one step of each contender alone (after ``reset_peak_memory_stats``;
the parameters and the optimizer state are allocated before, so the peaks differ by what each step adds).
Writes ``benchmarks/results/bench_train.json`` and the section "Training step (130m)" of docs/benchmarks.md.

Usage (GPU machine with upstream's kernels): ``python benchmarks/bench_train.py [--batch 8] [--seqlen 2048]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (TrainingSetup, environment, environment_line, interleaved_median_times,  # noqa: E402
                    markdown_table, replace_section, write_json)

GIB = 1024 ** 3


def _commit() -> str:
    """The checkout's commit, else ``$MAMBA_STATE_COMMIT`` (a device copy of the tree may have no .git)."""
    fallback = os.environ.get("MAMBA_STATE_COMMIT", "unknown")
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=10).stdout.strip() or fallback
    except Exception:
        return fallback


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds (each runs every contender once)")
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = ap.parse_args()

    setup = TrainingSetup(args.batch, args.seqlen, "bench_train")
    model, lm, loss_of = setup.model, setup.lm, setup.loss_of
    inputs = setup.inputs
    contenders = {name: (lambda fwd=fwd: setup.step(fwd)) for name, fwd in setup.contenders().items()}
    # the same loss from both paths first (bf16 autocast: a loose check that they compute one function)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        lu, lo = loss_of(model(inputs).logits).item(), loss_of(lm(inputs)[0]).item()
    assert abs(lu - lo) < 1e-2 * max(1.0, abs(lu)), f"losses differ: upstream {lu}, ours {lo}"

    times = interleaved_median_times(contenders, repeats=args.repeats, warmup=2)
    peaks = {}
    for name, fn in contenders.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated()
    env = environment(["causal-conv1d"])
    commit = _commit()
    rows = []
    for name in contenders:
        ratio_t = times[name] / times["upstream"]
        ratio_m = peaks[name] / peaks["upstream"]
        rows.append([name, f"{times[name] * 1e3:.1f}", f"{ratio_t:.2f}", f"{peaks[name] / GIB:.2f}", f"{ratio_m:.2f}"])
    overhead = times["ours, state + resets"] / times["ours"] - 1
    payload = {"commit": commit, "batch": args.batch, "seqlen": args.seqlen, "repeats": args.repeats,
               "loss_check": {"upstream": lu, "ours": lo},
               "median_s": times, "peak_bytes": peaks, "state_resets_overhead": overhead}
    path = write_json("bench_train", payload, env)
    table = markdown_table(["contender", "step ms", "/ upstream", "peak GiB", "/ upstream"], rows)
    print(table)
    print(f"ours from a state with resets: {overhead * 100:+.1f}% over ours from zero; wrote {path}")
    if not args.no_doc:
        replace_section("Training step (130m)", f"""{environment_line(env)} Commit {commit}.

`benchmarks/bench_train.py`: the 130m-shaped `MambaLMHeadModel` (d_model 768, 24 layers), batch {args.batch} x
{args.seqlen} tokens, bf16 autocast over float32 parameters; forward, cross-entropy, backward and a fused AdamW
step on the same weights; medians of {args.repeats} rounds in turns. Peak memory: `torch.cuda.max_memory_allocated`
over one step of each alone (parameters and optimizer state included). "ours, state + resets" starts from a
non-zero state with a reset at about one token in 512.

{table}

From a state with resets ours costs {overhead * 100:+.1f}% over ours from zero.
""")


if __name__ == "__main__":
    main()
