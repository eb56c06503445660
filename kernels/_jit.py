"""Triton helpers shared by every op's kernels: named constants and small element-wise functions."""

from __future__ import annotations

import triton
import triton.language as tl

# exp(x) = exp2(x * LOG2E): the scan kernels fold LOG2E into A once and then call the cheaper exp2 per step
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus with its default threshold of 20
    return tl.where(x > 20.0, x, tl.where(x < -20.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))
