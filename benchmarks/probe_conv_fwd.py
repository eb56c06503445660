"""Probe of the causal conv's forward on a GPU: the aligned kernel for widths <= 4 against the general kernel
(``MAMBA_STATE_CONV_FWD=generic``) and upstream's causal-conv1d, at the 130m training shape (8 x 2048 tokens,
1536 channels, width 4, silu, bias), channel-major as the training layout gives it, and token-major
(contiguous); with and without a carried window and resets. A diagnostic for the kernel choice, not a benchmark
of record: it prints medians of ``triton.testing.do_bench`` and the bandwidth each reaches.

    python benchmarks/probe_conv_fwd.py
"""

from __future__ import annotations

import os

import torch
import triton.testing


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, return_mode="median")


def main() -> None:
    from mamba_state.kernels.conv1d.ops import conv_forward

    b, ch, L, W = 8, 1536, 2048, 4
    g = torch.Generator(device="cuda").manual_seed(0)
    layouts = {
        "channel-major": torch.randn(ch, b, L, device="cuda", generator=g).bfloat16().permute(1, 0, 2),
        "contiguous": torch.randn(b, ch, L, device="cuda", generator=g).bfloat16(),
    }
    w = torch.randn(ch, W, device="cuda", generator=g)
    bias = torch.randn(ch, device="cuda", generator=g)
    state = torch.randn(b, ch, W, device="cuda", generator=g)
    reset = torch.rand(b, L, device="cuda", generator=g) < 1 / 512
    moved = 2 * b * ch * L * 2  # bytes read and written once (bf16 in, bf16 out)
    try:
        # causal-conv1d 1.7's wrapper (its extension takes the output buffers as arguments)
        from causal_conv1d.cpp_functions import causal_conv1d_fwd_function

        xc = layouts["contiguous"]
        up = _bench(lambda: causal_conv1d_fwd_function(xc, w, bias, None, None, None, True))
        print(f"upstream causal_conv1d_fwd (contiguous): {up:.4f} ms ({moved / up / 1e6:.0f} GB/s)")
    except Exception as exc:  # noqa: BLE001
        print(f"upstream: not run ({type(exc).__name__}: {exc})")
    for name, x in layouts.items():
        for extras in (False, True):
            st, rs = (state, reset) if extras else (None, None)
            for kernel in ("aligned", "generic"):
                os.environ["MAMBA_STATE_CONV_FWD"] = kernel
                ms = _bench(lambda: conv_forward(x, w, bias, st, rs, True, torch.float32))
                print(f"ours {kernel:8s} {name:14s} {'state+resets' if extras else 'from zero':13s}: {ms:.4f} ms "
                      f"({moved / ms / 1e6:.0f} GB/s)")
    os.environ.pop("MAMBA_STATE_CONV_FWD", None)


if __name__ == "__main__":
    main()
