"""Residual add and RMSNorm in one pass each way (the math of upstream's fused add-norm).

A Mamba LM block starts with ``r = hidden + residual`` (float32) and ``norm(r)``. In plain PyTorch that is four
passes over the activations (upcast, add, norm, downcast); one Triton program per row reads ``hidden`` and
``residual`` once and writes ``r`` and the normalised row once. Under autograd the forward also keeps each row's
1/rms, and the backward (:class:`AddRMSNormFn`) reads the returned ``r``, the two incoming gradients and the
weight once and writes the gradients of ``hidden``, ``residual`` and the weight (per-program partial sums).
:func:`add_rms_norm_ref` beside it is the PyTorch definition; float64 and CPU tensors (unless Triton is forced) take
it.
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

__all__ = ["add_rms_norm", "add_rms_norm_triton", "add_rms_norm_autograd", "AddRMSNormFn"]


def add_rms_norm(hidden: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float,
                 residual_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None
                 ) -> tuple[Tensor, Tensor]:
    """:func:`add_rms_norm_ref` as one Triton kernel (CUDA, or forced ``backend="triton"``, no gradient needed).

    Returns ``(out, r)``: ``out`` [..., d] contiguous in ``hidden.dtype``, ``r`` [..., d] contiguous in
    ``residual_dtype`` (float32 by default). Differentiable in hidden, residual and weight (Triton backward).
    Elsewhere (float64, the reference backend) the reference runs. Results agree with the reference to float32
    rounding before the cast to ``hidden.dtype``.
    """
    if not isinstance(hidden, Tensor) or hidden.dim() < 1:
        found = list(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
        raise StateShapeError(f"hidden: expected a tensor [..., d], found {found}")
    d = hidden.shape[-1]
    if residual is not None and residual.shape != hidden.shape:
        raise StateShapeError(f"residual: expected hidden's shape {list(hidden.shape)}, found {list(residual.shape)}")
    if weight.dim() != 1 or weight.shape[0] != d:
        raise StateShapeError(f"weight: expected [d={d}] (hidden's last size), found {list(weight.shape)}")
    use_triton = hidden.dtype != torch.float64 and resolve_backend(hidden.device, backend)[0] == "triton"
    if not use_triton:
        return add_rms_norm_ref(hidden, residual, weight, eps, residual_dtype)
    if not hidden.dtype.is_floating_point or (residual is not None and not residual.dtype.is_floating_point):
        raise StateError(f"add_rms_norm: expected floating tensors, found hidden {hidden.dtype}"
                         f"{'' if residual is None else f', residual {residual.dtype}'}")
    if needs_grad(hidden, residual, weight):
        return add_rms_norm_autograd(hidden, residual, weight, eps, residual_dtype)
    return add_rms_norm_triton(hidden, residual, weight, eps, residual_dtype)


def _forward(hidden: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float,
             residual_dtype: Optional[torch.dtype], keep_rstd: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The forward launch: ``(out, r, rstd [rows] float32 or None)``, out and r shaped as hidden."""
    import triton

    from .triton_kernels import add_rmsnorm_rows

    d = hidden.shape[-1]
    h2 = hidden.reshape(-1, d).contiguous()
    r2 = None if residual is None else residual.reshape(-1, d).contiguous()
    rows = h2.shape[0]
    out = torch.empty_like(h2)
    rout = torch.empty(rows, d, device=hidden.device, dtype=torch.float32 if residual_dtype is None else residual_dtype)
    rstd = torch.empty(rows, device=hidden.device, dtype=torch.float32) if keep_rstd else None
    if rows:
        with launch_device(h2):
            add_rmsnorm_rows[(rows,)](h2, r2, weight.contiguous(), out, rout, rstd, d, float(eps),
                                      BLOCK=triton.next_power_of_2(d), num_warps=4 if d >= 1024 else 2)
    return out.view(hidden.shape), rout.view(hidden.shape), rstd


def add_rms_norm_triton(hidden: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float,
                        residual_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """The Triton launch of :func:`add_rms_norm`, for callers that have already chosen it (inputs as there,
    on a device Triton runs on, no gradient needed; not checked again)."""
    out, r, _ = _forward(hidden, residual, weight, eps, residual_dtype, keep_rstd=False)
    return out, r


def _backward(dout: Optional[Tensor], dr: Optional[Tensor], r: Tensor, rstd: Tensor, weight: Tensor,
              hidden_dtype: torch.dtype, residual_dtype: Optional[torch.dtype]
              ) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """``(d hidden, d residual or None, d weight float32)`` from the gradients of out and of r (None: zeros)."""
    import triton

    from .._launch import _sm_count
    from .triton_kernels import add_rmsnorm_bwd_rows

    d = r.shape[-1]
    r2 = r.reshape(-1, d)
    rows = r2.shape[0]
    g2 = torch.zeros_like(r2, dtype=hidden_dtype) if dout is None else dout.reshape(-1, d).contiguous()
    dr2 = None if dr is None else dr.reshape(-1, d).contiguous()
    dh = torch.empty(rows, d, device=r.device, dtype=hidden_dtype)
    dres = torch.empty(rows, d, device=r.device, dtype=residual_dtype) if residual_dtype is not None else None
    # a few rows a program: enough programs to fill the GPU 4 times over, few enough weight partials to sum
    progs = max(1, min(rows, 4 * _sm_count(r.device)))
    per = -(-rows // progs)
    progs = -(-rows // per) if rows else 1
    dw_part = torch.zeros(progs, d, device=r.device, dtype=torch.float32)
    if rows:
        with launch_device(r2):
            add_rmsnorm_bwd_rows[(progs,)](g2, dr2, r2, weight.contiguous(), rstd, dh, dres, dw_part, rows, d, per,
                                           BLOCK=triton.next_power_of_2(d), num_warps=4 if d >= 1024 else 2)
    return dh.view(r.shape), None if dres is None else dres.view(r.shape), dw_part.sum(0)


class AddRMSNormFn(torch.autograd.Function):
    """Differentiable Triton add + RMSNorm over (hidden, residual or None, weight). Keeps the returned r and
    1/rms per row (r is the block's residual output, alive anyway); nothing is recomputed."""

    @staticmethod
    def forward(ctx, hidden, residual, weight, eps, residual_dtype):
        out, r, rstd = _forward(hidden, residual, weight, eps, residual_dtype, keep_rstd=True)
        ctx.save_for_backward(r, rstd, weight)
        ctx.hidden_dtype = hidden.dtype
        ctx.residual_dtype = residual.dtype if residual is not None else None
        return out, r

    @staticmethod
    def backward(ctx, dout, dr):
        r, rstd, weight = ctx.saved_tensors
        dh, dres, dw = _backward(dout, dr, r, rstd, weight, ctx.hidden_dtype, ctx.residual_dtype)
        return (dh if ctx.needs_input_grad[0] else None,
                dres if ctx.needs_input_grad[1] else None,
                dw.to(weight.dtype) if ctx.needs_input_grad[2] else None, None, None)


def add_rms_norm_autograd(hidden: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float,
                          residual_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """:func:`add_rms_norm_triton` recorded by autograd (:class:`AddRMSNormFn`): inputs as there."""
    out, r = AddRMSNormFn.apply(hidden, residual, weight, float(eps), residual_dtype)
    return out, r
