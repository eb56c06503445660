"""Triton helpers shared by every op's kernels: named constants, small element-wise functions, and the heuristics
that derive a kernel's ``HAS_*`` flags from its optional inputs."""

from __future__ import annotations

from typing import Any, Callable

import triton
import triton.language as tl

# exp(x) = exp2(x * LOG2E): the scan kernels fold LOG2E into A once and then call the cheaper exp2 per step
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # 1 / LOG2E
# time steps per tile in the scan kernels: each input is read as [rows, TILE] and split into its columns in
# registers (_split8 and _join8 below are written for 8); chunks are multiples of it
TILE: tl.constexpr = tl.constexpr(8)


def optional_inputs(**flags: str) -> Callable[[Any], Any]:
    """``@triton.heuristics`` that sets each ``flag`` (a ``tl.constexpr`` parameter) to whether the pointer
    argument it names was given: ``@optional_inputs(HAS_D="D_ptr")`` then a launch passes ``D_ptr=None`` for an
    absent D and no ``HAS_D``. Triton specialises a ``None`` argument as a constant (compiled and interpreted
    alike), so the kernel compiled without D has no D parameter and reads nothing for it."""
    return triton.heuristics({flag: (lambda args, name=name: args[name] is not None) for flag, name in flags.items()})


@triton.jit
def _channel_offsets(dim, dstate, cpg, BD: tl.constexpr, BN: tl.constexpr):
    """A [BD, BN] tile of (channel, state) for the channel block of program axis 0: the channel and state
    offsets, their masks and the tile's mask, and the channels' group (``cpg`` channels per group)."""
    pid_d = tl.program_id(0)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    grp = (pid_d * BD) // cpg
    return offs_d, offs_n, mask_d, mask_n, mask_d[:, None] & mask_n[None, :], grp


@triton.jit
def _softplus(x):
    """torch.nn.functional.softplus (threshold 20) in float32, to a few ulps: log1p(e) with e = exp(x).

    ``log(1 + e)`` loses the low bits of e when 1 + e is rounded (at dt near 0.05, typical of Mamba, that is a
    relative error of 2e-6 in dt, several times the rest of the scan's float32 rounding together:
    benchmarks/accuracy_fp32.py). ``log(u) * e / (u - 1)`` with ``u = 1 + e`` cancels that rounding (``u - 1`` is
    exact), and gives e itself where 1 + e rounds to 1."""
    e = tl.exp(tl.minimum(x, 20.0))
    u = 1.0 + e
    one = u == 1.0
    log1p_e = tl.where(one, e, tl.log(u) * (e / tl.where(one, 1.0, u - 1.0)))  # no 0 / 0 in the unused branch
    return tl.where(x > 20.0, x, log1p_e)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _split8(x, R: tl.constexpr):
    """[R, 8] -> its 8 columns, each [R], in order."""
    e, o = tl.split(tl.reshape(x, (R, 4, 2)))
    ee, eo = tl.split(tl.reshape(e, (R, 2, 2)))
    oe, oo = tl.split(tl.reshape(o, (R, 2, 2)))
    c0, c4 = tl.split(ee)
    c2, c6 = tl.split(eo)
    c1, c5 = tl.split(oe)
    c3, c7 = tl.split(oo)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _join8(c0, c1, c2, c3, c4, c5, c6, c7, R: tl.constexpr):
    """8 columns [R] -> [R, 8] (inverse of _split8)."""
    e = tl.reshape(tl.join(tl.join(c0, c4), tl.join(c2, c6)), (R, 4))
    o = tl.reshape(tl.join(tl.join(c1, c5), tl.join(c3, c7)), (R, 4))
    return tl.reshape(tl.join(e, o), (R, 8))


@triton.jit
def _split4(x, R: tl.constexpr):
    """[R, 4] -> its 4 columns, each [R], in order (register moves: the column axis stays inside a thread)."""
    e, o = tl.split(tl.reshape(x, (R, 2, 2)))
    c0, c2 = tl.split(e)
    c1, c3 = tl.split(o)
    return c0, c1, c2, c3


@triton.jit
def _join4(c0, c1, c2, c3, R: tl.constexpr):
    """4 columns [R] -> [R, 4] (inverse of _split4)."""
    return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (R, 4))


@triton.jit
def _halves8(x, R: tl.constexpr):
    """[R, 8] -> (columns 0-3, columns 4-7), each [R, 4] (register moves where a thread holds the row)."""
    return tl.split(tl.permute(tl.reshape(x, (R, 2, 4)), (0, 2, 1)))


@triton.jit
def _unhalves8(lo, hi, R: tl.constexpr):
    """Inverse of _halves8: two [R, 4] tiles -> [R, 8]."""
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (R, 8))

