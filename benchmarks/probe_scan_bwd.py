"""Probe of the scan's backward on a GPU: registers and spills of each backward kernel, and the backward alone
(fwd+bwd minus fwd, both timed here) of ours under launch-plan variants, next to upstream's, at the issue's shapes.

A diagnostic for choosing what to change in the backward, not a benchmark of record (bench_scan.py is that).

    python benchmarks/probe_scan_bwd.py                       # default plan, every shape
    python benchmarks/probe_scan_bwd.py --variants            # also BD / warps / schedule / chunk variants
    python benchmarks/probe_scan_bwd.py --half                # also the half-tile variants (BWD_HALF)
    python benchmarks/probe_scan_bwd.py --tp                  # also the time-parallel gradient pass (BWD=tp)
    python benchmarks/probe_scan_bwd.py --maxnreg             # also register caps (BWD_MAXNREG: occupancy)
    python benchmarks/probe_scan_bwd.py --once                # one fwd+bwd at the first shape (for ncu)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan import bench, make_inputs, run_case, upstream_scan  # noqa: E402

SHAPES = [(8, 1536, 2048), (8, 2048, 2048), (4, 5120, 2048), (1, 1536, 16384)]

VARIANTS = [
    {},
    {"BWD": "seq"}, {"BWD": "chunk"},
    {"BWD_BD": 8}, {"BWD_BD": 32},
    # two or four warps a program: compiled for sm_90 with triton 3.6, 16 channels on one warp spill about 2 KB
    # a thread, on two warps 0.24 KB (the same per-program work, but cross-warp reductions over channels)
    {"BWD_BD": 16, "BWD_WARPS": 2}, {"BWD_BD": 32, "BWD_WARPS": 4}, {"BWD_BD": 8, "BWD_WARPS": 2},
    {"chunk_size": 64}, {"chunk_size": 256},
]

# the gradient pass's tiles walked as two halves of 4 steps (MAMBA_STATE_SCAN_BWD_HALF; fewer states live)
HALF_VARIANTS = [
    {"BWD_HALF": 2}, {"BWD_HALF": 3}, {"BWD_HALF": 3, "BWD_BD": 8},
    {"BWD_HALF": 3, "BWD_BD": 16, "BWD_WARPS": 2}, {"BWD_HALF": 0, "BWD_BD": 16, "BWD_WARPS": 2},
]


# the time-parallel gradient pass (MAMBA_STATE_SCAN_BWD=tp): tile elements per program and warps
TP_VARIANTS = [
    {"BWD": "tp"}, {"BWD": "tp", "TP_TILE": 512}, {"BWD": "tp", "TP_TILE": 512, "TP_WARPS": 2},
    {"BWD": "tp", "TP_TILE": 2048, "TP_WARPS": 8}, {"BWD": "tp", "TP_WARPS": 8}, {"BWD": "tp", "TP_TILE": 256,
                                                                                    "TP_WARPS": 1},
]


# registers a thread capped (MAMBA_STATE_SCAN_BWD_MAXNREG): more one-warp programs an SM for more spills
MAXNREG_VARIANTS = [
    {"BWD_MAXNREG": 168}, {"BWD_MAXNREG": 128},
    {"BWD_MAXNREG": 168, "BWD_HALF": 3}, {"BWD_MAXNREG": 128, "BWD_HALF": 3},
    {"BWD_MAXNREG": 168, "BWD_HALF": 3, "BWD_BD": 8}, {"BWD_MAXNREG": 128, "BWD_HALF": 3, "BWD_BD": 8},
    {"BWD_MAXNREG": 168, "BWD_BD": 8},
    {"FWD_MAXNREG": 128}, {"FWD_MAXNREG": 96},  # the forward at 167 registers: 12 programs an SM
]


def kernel_report() -> list[str]:
    """n_regs / n_spills of every compiled specialisation of the backward kernels."""
    from mamba_state.kernels.selective_scan import triton_kernels as K
    from mamba_state.kernels.selective_scan import triton_time_parallel as TP

    lines = []
    for name in ("_scan_bwd_kernel", "_scan_bwd_local_kernel", "_scan_fwd_kernel", "_scan_bwd_tp_kernel"):
        fn = getattr(TP if name == "_scan_bwd_tp_kernel" else K, name)
        fn = getattr(fn, "fn", fn)
        caches = getattr(fn, "device_caches", None)
        kernels = []
        if caches:
            for dev_cache in caches.values():
                kernels += list(dev_cache[0].values())
        else:
            for dev_cache in getattr(fn, "cache", {}).values():
                kernels += list(dev_cache.values())
        for k in kernels:
            consts = getattr(getattr(k, "src", None), "constants", {}) or {}
            keys = {str(a): v for a, v in consts.items() if str(a)[-1:] in "DNE" or "MODE" in str(a)}
            lines.append(f"{name}: regs {getattr(k, 'n_regs', '?')} spills {getattr(k, 'n_spills', '?')} "
                         f"warps {getattr(getattr(k, 'metadata', None), 'num_warps', '?')} {keys}")
    return lines


def timed(impl, shape, dtype, env):
    env = dict(env)
    if "chunk_size" in env:
        size, base = env.pop("chunk_size"), impl
        impl = lambda **a: base(chunk_size=size, **a)  # noqa: E731
    for k, v in env.items():
        os.environ[f"MAMBA_STATE_SCAN_{k}"] = str(v)
    try:
        inp = make_inputs(*shape, dtype, False)
        fwd = bench(run_case(impl, inp, False))
        both = bench(run_case(impl, inp, True))
    finally:
        for k in env:
            os.environ.pop(f"MAMBA_STATE_SCAN_{k}", None)
    torch.cuda.empty_cache()
    return fwd, both - fwd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--half", action="store_true")
    ap.add_argument("--tp", action="store_true")
    ap.add_argument("--maxnreg", action="store_true")
    ap.add_argument("--once", action="store_true")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    from mamba_state.kernels import selective_scan_fn

    dtype = getattr(torch, args.dtype)
    ours = lambda **a: selective_scan_fn(delta_softplus=True, backend="triton", **a)  # noqa: E731
    if args.once:
        inp = make_inputs(*SHAPES[0], dtype, False)
        step = run_case(ours, inp, True)
        step()
        torch.cuda.synchronize()
        step()
        torch.cuda.synchronize()
        return
    up = upstream_scan()
    upa = (lambda **a: up(delta_softplus=True, **a)) if up is not None else None
    for shape in SHAPES:
        ref = timed(upa, shape, dtype, {}) if upa else (float("nan"), float("nan"))
        print(f"{shape} upstream: fwd {ref[0]:.3f} bwd {ref[1]:.3f} ms", flush=True)
        for env in ([{}] + (VARIANTS[1:] if args.variants else []) + (HALF_VARIANTS if args.half else [])
                    + (TP_VARIANTS if args.tp else []) + (MAXNREG_VARIANTS if args.maxnreg else [])):
            f, b = timed(ours, shape, dtype, env)
            print(f"{shape} ours {env}: fwd {f:.3f} ({f / ref[0]:.2f}) bwd {b:.3f} ({b / ref[1]:.2f}) ms", flush=True)
    print("\n".join(kernel_report()))


if __name__ == "__main__":
    main()
