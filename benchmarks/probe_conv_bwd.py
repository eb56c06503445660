"""Probe of the causal conv's backward on a GPU: ours next to upstream's causal-conv1d, at the 130m training shape
(8 x 2048 tokens, 1536 channels, width 4, silu, bias), channel-major as the training layout gives it. Ours: the
bwd4 kernel (MAMBA_STATE_CONV_BWD=generic; tile variants through MAMBA_STATE_CONV_BWD_TILE="BD,BL,warps") and the
default aligned kernel (tile variants through MAMBA_STATE_CONV_BWD_ALIGNED_TILE="BD,G,warps"), with the aligned
kernel's gradients checked against the bwd4 kernel's. A diagnostic for choosing tiles and
kernels, not a benchmark of record.

    python benchmarks/probe_conv_bwd.py
"""

from __future__ import annotations

import os

import torch
import triton.testing

TILES = [None, "8,128,4", "4,128,2", "4,256,4", "8,256,8", "16,128,8", "16,64,4", "2,512,4", "1,1024,4"]
# the aligned kernel: BD channels x G 8-step groups a program (BD * G a power of 2)
ALIGNED_TILES = [None, "16,8,4", "8,16,4", "16,16,8", "32,8,8", "8,8,2", "4,32,4", "32,16,8"]


def main() -> None:
    from mamba_state.kernels.conv1d.ops import conv_backward

    b, ch, L, W = 8, 1536, 2048, 4
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(ch, b, L, device="cuda", generator=g).bfloat16().permute(1, 0, 2)
    w = torch.randn(ch, W, device="cuda", generator=g)
    bias = torch.randn(ch, device="cuda", generator=g)
    dout = torch.randn(ch, b, L, device="cuda", generator=g).bfloat16().permute(1, 0, 2)
    try:  # causal-conv1d 1.7's wrapper (its extension takes the output buffers as arguments)
        from causal_conv1d.cpp_functions import causal_conv1d_bwd_function

        xc, dc = x.contiguous(), dout.contiguous()
        up = triton.testing.do_bench(lambda: causal_conv1d_bwd_function(
            xc, w, bias, dc, None, None, None, None, False, True), return_mode="median")
        print(f"upstream causal_conv1d_bwd (contiguous): {up:.4f} ms")
    except Exception as exc:  # noqa: BLE001
        print(f"upstream: not run ({type(exc).__name__}: {exc})")
    def run() -> tuple:
        return conv_backward(x, w, bias, None, None, True, dout, None, False)

    os.environ["MAMBA_STATE_CONV_BWD"] = "generic"  # the bwd4 kernel
    for tile in TILES:
        if tile:
            os.environ["MAMBA_STATE_CONV_BWD_TILE"] = tile
        else:
            os.environ.pop("MAMBA_STATE_CONV_BWD_TILE", None)
        ms = triton.testing.do_bench(run, return_mode="median")
        print(f"ours bwd4 tile {tile or 'default'}: {ms:.4f} ms")
    os.environ.pop("MAMBA_STATE_CONV_BWD_TILE", None)
    want = run()
    os.environ["MAMBA_STATE_CONV_BWD"] = "aligned"
    for tile in ALIGNED_TILES:
        if tile:
            os.environ["MAMBA_STATE_CONV_BWD_ALIGNED_TILE"] = tile
        else:
            os.environ.pop("MAMBA_STATE_CONV_BWD_ALIGNED_TILE", None)
        got = run()
        # dx is bf16 (one rounding of a float32 sum apart); dw and dbias float32 sums over 16k steps
        errs = [(a.float() - b.float()).abs().max().item() for a, b in zip(got[:3], want[:3])]
        ms = triton.testing.do_bench(run, return_mode="median")
        print(f"ours aligned tile {tile or 'default'}: {ms:.4f} ms  (max |diff| vs bwd4: dx {errs[0]:.2e}, "
              f"dw {errs[1]:.2e}, dbias {errs[2]:.2e})")
    os.environ.pop("MAMBA_STATE_CONV_BWD", None)
    os.environ.pop("MAMBA_STATE_CONV_BWD_ALIGNED_TILE", None)


if __name__ == "__main__":
    main()
