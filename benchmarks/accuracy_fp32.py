"""Where the float32 scan's rounding error comes from, at large outputs (|y| ~ 1e4, as in upstream's
``mamba_inner_fn`` test cases): each path against the float64 oracle, with variants of the sequential float32 loop
that change one thing at a time (issue 22, item 4).

Paths, all float32 in and out:

* ``sequential``: :func:`selective_scan_ref` in float32 (one step at a time, ``exp(dt * A)``, readout by ``sum``);
* ``sequential, exp2``: the same loop with the decay as the kernel computes it, ``exp2(dt * (A * log2 e))``
  (``A * log2 e`` rounded to float32 once per channel, as ``_channel_block`` does);
* ``sequential, dt*u*B``: the same loop with the input term as the kernel rounds it, ``(dt * u) * B``;
* ``sequential, softplus as log(1 + exp)``: dt as the kernels computed it before 2026-12-03 (1 + e rounded);
* ``sequential, numpy's float32 exp2 and dt*u*B``: the loop with the exponential the Triton interpreter evaluates
  (numpy's float32 ``exp2``): on a CPU, the kernel's arithmetic step for step;
* ``triton, one pass`` and ``triton, chunk-parallel``: our kernel (the interpreter on a CPU) with the whole
  sequence in one program, and with the chunk summaries composed by the carry pass (``MODE`` 1/2, the schedule
  for few long rows).

Error: max |y - y64| / max |y64| over the output, and the same for the final state. Writes
``benchmarks/results/accuracy_fp32_<device>.json``; prints a markdown table. On a CPU (``TRITON_INTERPRET=1`` is
set when no GPU is present) the kernel's ``exp2`` is numpy's, so the GPU's approximate ``ex2`` is not in those
figures; run it on the GPU for that.

    python benchmarks/accuracy_fp32.py [--seqlen 1024] [--dim 64]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, write_json  # noqa: E402

from mamba_state.kernels import selective_scan_fn  # noqa: E402
from mamba_state.kernels.selective_scan.naive import selective_scan_ref  # noqa: E402


def make_inputs(batch: int, dim: int, seqlen: int, dstate: int, device: str, seed: int = 0) -> dict:
    """Float64 inputs whose outputs reach about 1e4: slow decays (small dt, |A| about 0.1-1) let the state sum
    many large inputs (u ~ 30 randn, B and C ~ 3 randn)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    inp = dict(u=30 * r(batch, dim, seqlen), delta=0.05 * r(batch, dim, seqlen) - 3.0,
               A=-torch.exp(r(dim, dstate) - 1.0), B=3 * r(batch, dstate, seqlen), C=3 * r(batch, dstate, seqlen),
               D=r(dim), delta_bias=0.1 * r(dim))
    return {k: v.to(device) for k, v in inp.items()}


def sequential_variant(inp: dict, exp2: bool = False, dtu_first: bool = False, naive_softplus: bool = False,
                       numpy_exp2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequential float32 loop with some of the kernel's roundings switched on. Returns (y, last state)."""
    f = {k: v.float() for k, v in inp.items()}
    pre = f["delta"] + f["delta_bias"][:, None]
    dt = torch.log(1.0 + torch.exp(pre)) if naive_softplus else torch.nn.functional.softplus(pre)
    A2 = f["A"] * math.log2(math.e)
    Bt, Ct = f["B"].transpose(1, 2)[:, None], f["C"].transpose(1, 2)[:, None]  # [b, 1, L, n]
    x = torch.zeros(dt.shape[0], dt.shape[1], f["A"].shape[1], dtype=torch.float32, device=dt.device)
    ys = []
    for t in range(dt.shape[2]):
        if numpy_exp2:  # the Triton interpreter's exp2: numpy's float32 exp2, not torch's
            a = torch.from_numpy(np.exp2((dt[:, :, t, None] * A2).cpu().numpy())).to(dt.device)
        elif exp2:
            a = torch.exp2(dt[:, :, t, None] * A2)
        else:
            a = torch.exp(dt[:, :, t, None] * f["A"])
        if dtu_first:
            inc = (dt[:, :, t] * f["u"][:, :, t])[:, :, None] * Bt[:, :, t]
        else:
            inc = dt[:, :, t, None] * Bt[:, :, t] * f["u"][:, :, t, None]
        x = a * x + inc
        ys.append((x * Ct[:, :, t]).sum(-1))
    y = torch.stack(ys, 2) + f["D"][:, None] * f["u"]
    return y, x


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max() / ref.abs().max())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--dstate", type=int, default=16)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inp = make_inputs(args.batch, args.dim, args.seqlen, args.dstate, device)
    y64, h64 = selective_scan_ref(**inp, delta_softplus=True, return_last_state=True)
    f32 = {k: v.float() for k, v in inp.items()}
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
        "sequential": selective_scan_ref(**f32, delta_softplus=True, return_last_state=True),
        "sequential, exp2": sequential_variant(inp, exp2=True),
        "sequential, dt*u*B": sequential_variant(inp, dtu_first=True),
        "sequential, exp2 and dt*u*B": sequential_variant(inp, exp2=True, dtu_first=True),
        "sequential, softplus as log(1 + exp)": sequential_variant(inp, naive_softplus=True),
        "sequential, numpy's float32 exp2 and dt*u*B": sequential_variant(inp, dtu_first=True, numpy_exp2=True),
    }
    chunk = 64
    os.environ["MAMBA_STATE_SCAN_SEQPAR"] = "0"
    rows["triton, one pass"] = selective_scan_fn(**f32, delta_softplus=True, return_last_state=True,
                                                 backend="triton", chunk_size=chunk)
    os.environ["MAMBA_STATE_SCAN_SEQPAR"] = "1"
    rows["triton, chunk-parallel"] = selective_scan_fn(**f32, delta_softplus=True, return_last_state=True,
                                                       backend="triton", chunk_size=chunk)
    del os.environ["MAMBA_STATE_SCAN_SEQPAR"]
    base = rel(rows["sequential"][0], y64)
    table = []
    results = {}
    for name, (y, h) in rows.items():
        ey, eh = rel(y, y64), rel(h, h64)
        results[name] = {"out_rel_err": ey, "state_rel_err": eh}
        table.append([name, f"{ey:.2e}", f"{ey / base:.2f}", f"{eh:.2e}"])
    header = (f"batch {args.batch}, dim {args.dim}, seqlen {args.seqlen}, dstate {args.dstate}; max |y64| = "
              f"{float(y64.abs().max()):.3g} on {device}")
    print(header)
    print(markdown_table(["path (float32)", "out error / max |y|", "/ sequential", "state error / max |h|"], table))
    if not args.no_write:
        env = environment()
        tag = (env["gpu"] or "cpu").lower().replace(" ", "_")
        write_json(f"accuracy_fp32_{tag}", {"shape": vars(args), "max_abs_out": float(y64.abs().max()),
                                            "results": results}, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
