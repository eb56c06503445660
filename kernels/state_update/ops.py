"""The custom op ``mamba_state::state_update(state!, x, dt, A, B, C, D?, z?, dt_bias?, reset?, dt_softplus)``
-> out: one decoding step that updates ``state`` [batch, dim, dstate] in place (x, dt, z [batch, dim]; B, C
[batch, ngroups, dstate]), and its fake implementation."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._device import launch_device
from .._launch import _cdiv, _reset_bytes, block_sizes

__all__ = ["state_update"]


@torch.library.custom_op("mamba_state::state_update", mutates_args=("state",))
def state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 z: Optional[Tensor], dt_bias: Optional[Tensor], reset: Optional[Tensor],
                 dt_softplus: bool) -> Tensor:
    from . import triton_kernels as K

    batch, dim, dstate = state.shape
    ngroups = B.shape[1]
    work = state if state.is_contiguous() else state.contiguous()
    x, dt = x.contiguous(), dt.contiguous()
    B, C = B.contiguous(), C.contiguous()
    Af = A.contiguous().float()
    out = torch.empty_like(x)
    bd, bn, warps = block_sizes(dim, dstate, ngroups, batch=batch, device=state.device)
    rst = _reset_bytes(reset)
    with launch_device(x):
        K._state_update_kernel[(_cdiv(dim, bd), batch)](
            work, x, dt, Af, B, C,
            D.contiguous().float() if D is not None else None,
            z.contiguous() if z is not None else None,
            dt_bias.contiguous().float() if dt_bias is not None else None,
            rst,  # absent inputs go in as None: the kernel's HAS_* flags follow from them (optional_inputs)
            out, dim, dstate, dim // ngroups, B.stride(0), B.stride(1), C.stride(0), C.stride(1),
            SOFTPLUS=bool(dt_softplus), BD=bd, BN=bn, num_warps=warps,
        )
    if work is not state:
        state.copy_(work)
    return out


@state_update.register_fake
def _state_update_fake(state, x, dt, A, B, C, D, z, dt_bias, reset, dt_softplus):
    return torch.empty_like(x)
