"""Residual add and RMSNorm in one pass (the math of upstream's fused add-norm), forward only, for inference.

A Mamba LM block starts with ``r = hidden + residual`` (float32) and ``norm(r)``. In plain PyTorch that is four
passes over the activations (upcast, add, norm, downcast); one Triton program per row reads ``hidden`` and
``residual`` once and writes ``r`` and the normalised row once. :func:`add_rms_norm_ref` beside it is the
PyTorch definition; gradients, float64 and CPU tensors (unless Triton is forced) take it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mamba_state.errors import StateError, StateShapeError

from .._device import launch_device
from .._launch import needs_grad
from ..backend import resolve_backend
from .naive import add_rms_norm_ref

__all__ = ["add_rms_norm", "add_rms_norm_triton"]


def add_rms_norm(hidden: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float,
                 residual_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None
                 ) -> tuple[Tensor, Tensor]:
    """:func:`add_rms_norm_ref` as one Triton kernel (CUDA, or forced ``backend="triton"``, no gradient needed).

    Returns ``(out, r)``: ``out`` [..., d] contiguous in ``hidden.dtype``, ``r`` [..., d] contiguous in
    ``residual_dtype`` (float32 by default). Elsewhere (gradients, float64, the reference backend) the
    reference runs. Results agree with the reference to float32 rounding before the cast to ``hidden.dtype``.
    """
    if not isinstance(hidden, Tensor) or hidden.dim() < 1:
        found = list(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
        raise StateShapeError(f"hidden: expected a tensor [..., d], found {found}")
    d = hidden.shape[-1]
    if residual is not None and residual.shape != hidden.shape:
        raise StateShapeError(f"residual: expected hidden's shape {list(hidden.shape)}, found {list(residual.shape)}")
    if weight.dim() != 1 or weight.shape[0] != d:
        raise StateShapeError(f"weight: expected [d={d}] (hidden's last size), found {list(weight.shape)}")
    use_triton = (hidden.dtype != torch.float64 and not needs_grad(hidden, residual, weight)
                  and resolve_backend(hidden.device, backend)[0] == "triton")
    if not use_triton:
        return add_rms_norm_ref(hidden, residual, weight, eps, residual_dtype)
    if not hidden.dtype.is_floating_point or (residual is not None and not residual.dtype.is_floating_point):
        raise StateError(f"add_rms_norm: expected floating tensors, found hidden {hidden.dtype}"
                         f"{'' if residual is None else f', residual {residual.dtype}'}")
    return add_rms_norm_triton(hidden, residual, weight, eps, residual_dtype)


def add_rms_norm_triton(hidden: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float,
                        residual_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """The Triton launch of :func:`add_rms_norm`, for callers that have already chosen it (inputs as there,
    on a device Triton runs on, no gradient needed; not checked again)."""
    import triton

    from .triton_kernels import add_rmsnorm_rows

    d = hidden.shape[-1]
    h2 = hidden.reshape(-1, d).contiguous()
    r2 = None if residual is None else residual.reshape(-1, d).contiguous()
    rows = h2.shape[0]
    out = torch.empty_like(h2)
    rout = torch.empty(rows, d, device=hidden.device, dtype=torch.float32 if residual_dtype is None else residual_dtype)
    if rows:
        with launch_device(h2):
            add_rmsnorm_rows[(rows,)](h2, r2, weight.contiguous(), out, rout, d, float(eps),
                                      BLOCK=triton.next_power_of_2(d), num_warps=4 if d >= 1024 else 2)
    return out.view(hidden.shape), rout.view(hidden.shape)
