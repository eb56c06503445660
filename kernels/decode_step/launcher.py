"""Launchers of the fused decode step's kernels for one Mamba-1 layer and one token per row (CUDA, or the
interpreter): both update their state in place and read their inputs where they lie in the projections' outputs,
so the decode loop makes no copies."""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from . import triton_kernels as K

__all__ = ["conv_step", "ssm_step"]


def conv_step(xz: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor], d_inner: int) -> Tensor:
    """Shift ``conv_state`` [B, d_inner, K] left in place, insert ``x = xz[:, :d_inner]``, return
    ``silu(depthwise(window) + bias)`` as [B, d_inner] in ``xz``'s dtype (``xz``: [B, >= d_inner], row-strided)."""
    batch, k = xz.shape[0], conv_state.shape[-1]
    out = torch.empty(batch, d_inner, device=xz.device, dtype=xz.dtype)
    bc = 64
    K._conv_step_kernel[(batch, triton.cdiv(d_inner, bc))](
        xz, xz.stride(0), conv_state, weight, bias, out, d_inner, k,
        BC=bc, BK=triton.next_power_of_2(k), num_warps=2)
    return out


def ssm_step(ssm_state: Tensor, x: Tensor, x_db: Tensor, dt_weight: Tensor, A: Tensor, D: Tensor, dt_bias: Tensor,
             z: Tensor, dt_rank: int) -> Tensor:
    """One SSM step in place: ``dt = softplus(x_db[:, :dt_rank] @ dt_weight.T + dt_bias)``, ``ssm_state``
    [B, d_inner, n] advanced with ``B, C = x_db[:, dt_rank:dt_rank + n], x_db[:, dt_rank + n:]``; returns
    ``(C . state + D * x) * silu(z)`` as [B, d_inner] in ``x``'s dtype. A, D, dt_bias: float32."""
    d_inner, n = ssm_state.shape[1], ssm_state.shape[2]
    batch = x.shape[0]
    y = torch.empty_like(x)
    bn = triton.next_power_of_2(n)
    bd = min(max(1, 128 // bn), triton.next_power_of_2(d_inner))  # as the single-step kernel's H100 tuning
    K._ssm_step_kernel[(triton.cdiv(d_inner, bd), batch)](
        ssm_state, x, x_db, x_db.stride(0), dt_weight, dt_weight.stride(0), dt_weight.stride(1), A, D, dt_bias, z,
        z.stride(0), y, d_inner, n, dt_rank, BD=bd, BN=bn, BR=triton.next_power_of_2(dt_rank),
        num_warps=max(1, min(8, bd * bn // 512)))
    return y
