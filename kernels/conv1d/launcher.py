"""Causal depthwise conv1d with a carried window and resets: Triton kernels forward and backward (CUDA, or anywhere
under ``TRITON_INTERPRET=1`` when ``backend='triton'`` is forced), the reference
(:func:`~mamba_state.kernels.conv1d.naive.causal_conv1d_ref`) for float64 or where Triton cannot run."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mamba_state.errors import StateError, StateShapeError

from .._launch import needs_grad
from ..backend import resolve_backend
from .naive import causal_conv1d_ref
from .ops import CausalConvFn, conv_forward

__all__ = ["causal_conv1d"]


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, conv_state: Optional[Tensor] = None,
                  reset: Optional[Tensor] = None, activation: Optional[str] = None,
                  backend: Optional[str] = None, state_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv1d continuing ``conv_state``.

    Args:
        x: [batch, channels, seqlen], any float dtype; the time axis must have stride 1 (batch and channel
            strides are free, so slices of a wider projection need no copy).
        weight: [channels, width] or [channels, 1, width]. bias: [channels] or None.
        conv_state: [batch, channels, width], the last ``width`` inputs before ``x`` (zeros when None).
        reset: bool [batch, seqlen]; True at t clears the window before step t.
        activation: None or "silu".
        state_dtype: dtype of the new window when ``conv_state`` is None (default: x's); ignored otherwise.

    Returns:
        ``(out [batch, channels, seqlen] in x.dtype, new_conv_state [batch, channels, width])`` in
        conv_state's dtype (``state_dtype``, else x's, when None), as :func:`~mamba_state.reference.causal_conv1d_ref`. The Triton path
        (Triton backend, half or float32 inputs) accumulates in float32 and is differentiable in x, weight, bias
        and conv_state (its backward recomputes the pre-activation; nothing is kept but the inputs). ``out`` takes
        x's memory order: contiguous for a contiguous x or a channel slice of one, channel-major
        ([channels, batch, seqlen] in memory) for a channel-major x.
    """
    w2 = weight[:, 0] if weight.dim() == 3 and weight.shape[1] == 1 else weight
    use_triton = (isinstance(x, Tensor) and x.dim() == 3 and x.dtype != torch.float64
                  and resolve_backend(x.device, backend)[0] == "triton")
    if not use_triton:
        out, new_state = causal_conv1d_ref(x, weight, bias, conv_state=conv_state, reset=reset, activation=activation)
        if conv_state is None and state_dtype is not None:
            new_state = new_state.to(state_dtype)
        return out, new_state
    if activation not in (None, "silu", "swish"):
        raise StateError(f"activation: expected None or 'silu', found {activation!r}")
    bsz, ch, L = x.shape
    if w2.dim() != 2 or w2.shape[0] != ch:
        raise StateShapeError(f"causal_conv1d: expected weight [channels={ch}, width], found {list(weight.shape)}")
    W = w2.shape[1]
    if conv_state is not None and list(conv_state.shape) != [bsz, ch, W]:
        raise StateShapeError(f"conv_state: expected [batch, channels, width] = {[bsz, ch, W]}, "
                              f"found {list(conv_state.shape)}")
    if reset is not None and (reset.dtype != torch.bool or list(reset.shape) != [bsz, L]):
        raise StateShapeError(f"reset: expected a bool tensor {[bsz, L]}, found {reset.dtype} {list(reset.shape)}")
    silu = activation is not None
    if needs_grad(x, weight, bias, conv_state):
        return CausalConvFn.apply(x, w2, bias, conv_state, reset, silu, state_dtype)
    return conv_forward(x, w2, bias, conv_state, reset, silu, state_dtype)
