"""Probe of the scan forward's schedule for few long rows (issue 22, item 2: the batch-1 prefill), on a GPU: the
130m shape 1 x 1536 x 16384 (and 8 x 1536 x 2048 for contrast), bf16, dstate 16, with z and delta_bias, no
state. Ours under each schedule (one pass, ``MAMBA_STATE_SCAN_SEQPAR=0``, or chunk-parallel, ``=1``) and
channels per program (``MAMBA_STATE_SCAN_BD``), next to upstream's ``selective_scan_fn`` in the same process;
``triton.testing.do_bench`` medians. Each variant's output is checked against the default's first. A diagnostic
for choosing the defaults of ``kernels/_launch.py``, not a benchmark of record.

    python benchmarks/probe_scan_fwd.py
"""

from __future__ import annotations

import os

import torch
import triton.testing

from mamba_state.kernels import selective_scan_fn

# (SEQPAR, BD, WARPS); None: the default. 16 and 32 channels a program sequentially (one wave of programs at
# 8 x 2048, against 1.45 waves at 8) and two warps a program were not probed on the H200
VARIANTS = [(None, None, None), ("1", "16", None), ("1", "8", None), ("0", "4", None), ("0", "2", None),
            ("0", "8", None), ("0", "16", None), ("0", "16", "2"), ("0", "32", "2"), ("1", "16", "2"),
            ("1", "32", "2")]


def _inputs(batch: int, dim: int, L: int, n: int = 16) -> dict:
    g = torch.Generator("cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    return dict(u=r(batch, dim, L).bfloat16(), delta=(0.5 * r(batch, dim, L) - 1).bfloat16(),
                A=-torch.exp(0.5 * r(dim, n)), B=r(batch, n, L).bfloat16(), C=r(batch, n, L).bfloat16(),
                D=r(dim), z=r(batch, dim, L).bfloat16(), delta_bias=0.1 * r(dim))


def main() -> None:
    for batch, L in ((1, 16384), (8, 2048)):
        inp = _inputs(batch, 1536, L)
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as upstream

            up = triton.testing.do_bench(lambda: upstream(**inp, delta_softplus=True), return_mode="median")
            print(f"({batch}, 1536, {L}) upstream: {up:.3f} ms", flush=True)
        except Exception as exc:  # noqa: BLE001
            up = float("nan")
            print(f"upstream: not run ({type(exc).__name__}: {exc})")
        want = None
        for seqpar, bd, warps in VARIANTS:
            for key, val in (("MAMBA_STATE_SCAN_SEQPAR", seqpar), ("MAMBA_STATE_SCAN_BD", bd),
                             ("MAMBA_STATE_SCAN_WARPS", warps)):
                if val is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = val
            run = lambda: selective_scan_fn(**inp, delta_softplus=True, backend="triton")  # noqa: E731
            out = run()
            want = out if want is None else want
            err = ((out.float() - want.float()).norm() / want.float().norm()).item()
            ms = triton.testing.do_bench(run, return_mode="median")
            print(f"({batch}, 1536, {L}) ours seqpar {seqpar or 'auto'} bd {bd or 'auto'} warps {warps or 'auto'}: "
                  f"{ms:.3f} ms "
                  f"({ms / up:.2f} of upstream; rel diff vs default {err:.1e})", flush=True)
    for key in ("MAMBA_STATE_SCAN_SEQPAR", "MAMBA_STATE_SCAN_BD", "MAMBA_STATE_SCAN_WARPS"):
        os.environ.pop(key, None)


if __name__ == "__main__":
    main()
