"""The PyTorch definition of a block's residual add and RMSNorm, :func:`add_rms_norm_ref` (float32 sum and norm,
float64 for float64 input; differentiable)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["add_rms_norm_ref"]


def add_rms_norm_ref(hidden: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float,
                     residual_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """``(rms_norm(r) * weight in hidden.dtype, r in residual_dtype)`` with ``r = hidden (+ residual)``.

    Args:
        hidden: [..., d], any float dtype. residual: same shape, any float dtype, or None (first block).
        weight: [d]. eps: added to the mean square.
        residual_dtype: dtype of the returned ``r`` (default float32).

    The sum and the norm are computed in float32 (float64 when ``hidden`` is float64); differentiable.
    """
    ct = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    r = hidden.to(ct) if residual is None else hidden.to(ct) + residual.to(ct)
    out = r * torch.rsqrt(r.square().mean(-1, keepdim=True) + eps) * weight.to(ct)
    return out.to(hidden.dtype), r.to(ct if residual_dtype is None else residual_dtype)
