"""Probe of the packed forward's channels per program (issue 18): ``bench_varlen.py``'s 64 sessions (uniform and
log-uniform lengths, 16-4096 tokens, 130m shape, bf16), the no-grad packed call (each sequence in its own
programs) at each ``MAMBA_STATE_SCAN_BD`` (and two warps a program), next to the equal batch of the mean length
at its default. ``triton.testing.do_bench`` medians; each variant's output is checked against the default's.

Why: a program's steps run one after another, and while the GPU is full every program advances at the same
rate per step whatever its sequence's length, so the longest sequence ends last, long after the mean one
(log-uniform lengths: 4030 tokens against a mean of 633). Fewer channels a program make each step cheaper, so
that long chain ends sooner, at the cost of more, smaller programs. A diagnostic for the default in
``kernels/selective_scan/ops.py``, not a benchmark of record.

    python benchmarks/probe_varlen_tile.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_varlen import DIM, DSTATE, SESSIONS, draw_lengths, layer_inputs  # noqa: E402

from mamba_state.kernels import selective_scan_fn  # noqa: E402

VARIANTS = [(None, None), ("2", None), ("4", None), ("8", None), ("16", None), ("4", "2"), ("8", "2"), ("16", "2")]


def _set(name: str, value) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def main() -> None:
    dev, dtype = torch.device("cuda"), torch.bfloat16
    for kind in ("uniform", "log-uniform"):
        lens = draw_lengths(kind)
        total, mean = sum(lens), round(sum(lens) / len(lens))
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        packed = layer_inputs(1, total, dev, dtype, 1)
        equal = layer_inputs(SESSIONS, mean, dev, dtype, 3)
        h0 = torch.randn(SESSIONS, DIM, DSTATE, device=dev)
        with torch.no_grad():
            t_eq = triton.testing.do_bench(lambda: selective_scan_fn(**equal, initial_state=h0), rep=200)
            ref = None
            print(f"{kind}: {total} tokens, mean {mean}, max {max(lens)}; equal batch {t_eq:.3f} ms", flush=True)
            for bd, warps in VARIANTS:
                _set("MAMBA_STATE_SCAN_BD", bd)
                _set("MAMBA_STATE_SCAN_WARPS", warps)
                try:
                    fn = lambda: selective_scan_fn(**packed, initial_state=h0, cu_seqlens=cu)  # noqa: E731
                    out, last = fn()
                    if ref is None:
                        ref = (out.float(), last)
                    err = max((out.float() - ref[0]).abs().max().item(), (last - ref[1]).abs().max().item())
                    t = triton.testing.do_bench(fn, rep=200)
                    print(f"  BD {bd or 'default'} warps {warps or 'default'}: packed {t:.3f} ms "
                          f"({t / t_eq:.2f}x equal), max diff to the default {err:.1e}", flush=True)
                except Exception as exc:  # noqa: BLE001 (a variant that fails to compile: report and go on)
                    print(f"  BD {bd} warps {warps}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        _set("MAMBA_STATE_SCAN_BD", None)
        _set("MAMBA_STATE_SCAN_WARPS", None)


if __name__ == "__main__":
    main()
