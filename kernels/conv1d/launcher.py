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
from ..varlen import check_cu_seqlens
from .naive import causal_conv1d_ref, check_packed_windows
from .ops import CausalConvFn, conv_forward
from .packed import causal_conv1d_packed

__all__ = ["causal_conv1d"]


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, conv_state: Optional[Tensor] = None,
                  reset: Optional[Tensor] = None, activation: Optional[str] = None,
                  backend: Optional[str] = None, state_dtype: Optional[torch.dtype] = None,
                  cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv1d continuing ``conv_state``.

    Args:
        x: [batch, channels, seqlen], any float dtype; the time axis must have stride 1 (batch and channel
            strides are free, so slices of a wider projection need no copy).
        weight: [channels, width] or [channels, 1, width]. bias: [channels] or None.
        conv_state: [batch, channels, width], the last ``width`` inputs before ``x`` (zeros when None).
        reset: bool [batch, seqlen]; True at t clears the window before step t.
        activation: None or "silu".
        state_dtype: dtype of the new window when ``conv_state`` is None (default: x's); ignored otherwise.
        cu_seqlens: None, or int32 (or int64) [num_seqs + 1] on any device: packed variable-length sequences
            (flash-attention's convention). x is then [1, channels, total] with sequence i at
            ``x[:, :, cu_seqlens[i]:cu_seqlens[i + 1]]`` (lengths 0 allowed); ``conv_state`` is
            [num_seqs, channels, width], one incoming window per sequence (None: zeros), in the same layout as
            the unpacked window (the last ``width`` inputs, oldest first; column 0 is not read by the conv but
            carried, as upstream's ``step()`` keeps it), so the rows of a layer state go in as they are; reset is
            [1, total] and still clears the window inside a sequence. Each sequence runs exactly as it would
            alone from its own window: no input of another sequence is ever seen.

    Returns:
        ``(out [batch, channels, seqlen] in x.dtype, new_conv_state [batch, channels, width])`` in
        conv_state's dtype (``state_dtype``, else x's, when None), as :func:`~mamba_state.reference.causal_conv1d_ref`.
        With ``cu_seqlens`` the new windows are [num_seqs, channels, width], one per sequence: the last ``width``
        inputs of that sequence, so a sequence shorter than ``width`` keeps the tail of its incoming window (an
        empty one keeps it whole). The Triton path
        (Triton backend, half or float32 inputs) accumulates in float32 and is differentiable in x, weight, bias
        and conv_state (its backward recomputes the pre-activation; nothing is kept but the inputs). ``out`` takes
        x's memory order: contiguous for a contiguous x or a channel slice of one, channel-major
        ([channels, batch, seqlen] in memory) for a channel-major x.
        Packed, the Triton path is one launch forward (one backward) whatever the number of sequences; the
        reference backend and float64 take the vectorised PyTorch path (``conv1d/packed.py``), differentiable
        in the same tensors.

    Raises:
        StateShapeError: bad shapes; with ``cu_seqlens``, also boundaries that are not int32/int64, not
            1-D, do not start at 0, decrease or do not end at ``total``, a batch other than 1, or a
            ``conv_state`` whose rows are not num_seqs. Nothing is computed or changed on error.
    """
    w2 = weight[:, 0] if weight.dim() == 3 and weight.shape[1] == 1 else weight
    if cu_seqlens is not None:
        return _packed(x, w2, bias, conv_state, reset, activation, backend, state_dtype, cu_seqlens)
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


def _packed(x: Tensor, w2: Tensor, bias: Optional[Tensor], conv_state: Optional[Tensor], reset: Optional[Tensor],
            activation: Optional[str], backend: Optional[str], state_dtype: Optional[torch.dtype],
            cu_seqlens: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`causal_conv1d` with ``cu_seqlens``: every check first, then the Triton kernels or packed.py."""
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise StateShapeError(f"causal_conv1d: expected x [1, channels, total] with cu_seqlens, found "
                              f"{list(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if activation not in (None, "silu", "swish"):
        raise StateError(f"activation: expected None or 'silu', found {activation!r}")
    bsz, ch, total = x.shape
    if w2.dim() != 2 or w2.shape[0] != ch:
        raise StateShapeError(f"causal_conv1d: expected weight [channels={ch}, width], found {list(w2.shape)}")
    num_seqs = check_cu_seqlens(cu_seqlens, total, bsz)
    check_packed_windows(conv_state, num_seqs, ch, w2.shape[1])
    if reset is not None and (reset.dtype != torch.bool or list(reset.shape) != [1, total]):
        raise StateShapeError(f"reset: expected a bool tensor {[1, total]}, found {reset.dtype} {list(reset.shape)}")
    silu = activation is not None
    if x.dtype == torch.float64 or resolve_backend(x.device, backend)[0] != "triton":
        out, new_state = causal_conv1d_packed(x, w2, bias, conv_state, reset, silu, cu_seqlens, num_seqs)
        if conv_state is None and state_dtype is not None:
            new_state = new_state.to(state_dtype)
        return out, new_state
    if needs_grad(x, w2, bias, conv_state):
        return CausalConvFn.apply(x, w2, bias, conv_state, reset, silu, state_dtype, cu_seqlens)
    return conv_forward(x, w2, bias, conv_state, reset, silu, state_dtype, cu_seqlens=cu_seqlens)
