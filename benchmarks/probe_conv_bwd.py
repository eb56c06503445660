"""Probe of the causal conv's backward on a GPU: ours (tile variants through MAMBA_STATE_CONV_BWD_TILE) next to
upstream's causal-conv1d, at the 130m training shape (8 x 2048 tokens, 1536 channels, width 4, silu, bias),
channel-major as the training layout gives it. A diagnostic for choosing tiles, not a benchmark of record.

    python benchmarks/probe_conv_bwd.py
"""

from __future__ import annotations

import os

import torch
import triton.testing

TILES = [None, "8,128,4", "4,128,2", "4,256,4", "8,256,8", "16,128,8", "16,64,4", "2,512,4", "1,1024,4"]


def main() -> None:
    from mamba_state.kernels.conv1d.ops import conv_backward

    b, ch, L, W = 8, 1536, 2048, 4
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(ch, b, L, device="cuda", generator=g).bfloat16().permute(1, 0, 2)
    w = torch.randn(ch, W, device="cuda", generator=g)
    bias = torch.randn(ch, device="cuda", generator=g)
    dout = torch.randn(ch, b, L, device="cuda", generator=g).bfloat16().permute(1, 0, 2)
    try:
        import causal_conv1d_cuda

        xc, dc = x.contiguous(), dout.contiguous()
        up = triton.testing.do_bench(lambda: causal_conv1d_cuda.causal_conv1d_bwd(
            xc, w, bias, dc, None, None, None, None, False, True), return_mode="median")
        print(f"upstream causal_conv1d_bwd (contiguous): {up:.4f} ms")
    except Exception as exc:  # noqa: BLE001
        print(f"upstream: not run ({type(exc).__name__}: {exc})")
    for tile in TILES:
        if tile:
            os.environ["MAMBA_STATE_CONV_BWD_TILE"] = tile
        else:
            os.environ.pop("MAMBA_STATE_CONV_BWD_TILE", None)
        ms = triton.testing.do_bench(lambda: conv_backward(x, w, bias, None, None, True, dout, None, False),
                                     return_mode="median")
        print(f"ours tile {tile or 'default'}: {ms:.4f} ms")


if __name__ == "__main__":
    main()
