"""The reference causal depthwise conv1d with a carried window and resets, :func:`causal_conv1d_ref`, with the
window semantics of upstream's ``Mamba.step`` (the state holds the last ``d_conv`` inputs, oldest first);
float64-capable and differentiable. With ``cu_seqlens`` (packed sequences) it runs each sequence alone from
its own window: the oracle of the packed fast paths (``packed.py``, the Triton kernels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mamba_state.errors import StateError, StateShapeError

from ..scan_inputs import compute_dtype
from ..varlen import check_cu_seqlens

__all__ = ["causal_conv1d_ref", "check_packed_windows"]


def causal_conv1d_ref(x, weight, bias=None, conv_state=None, reset=None, activation=None, cu_seqlens=None):
    """Causal depthwise conv1d with a carried window.

    Args:
        x: [batch, channels, seqlen] (with ``cu_seqlens``: [1, channels, total], sequences packed along time).
        weight: [channels, width] (or nn.Conv1d's [channels, 1, width]).
        bias: [channels] or None.
        conv_state: [batch, channels, width], the last ``width`` inputs before ``x``, oldest first (zeros if None).
        reset: bool [batch, seqlen]; True at t clears the window before t (row starts afresh at t).
        activation: None or "silu".
        cu_seqlens: None, or int32/int64 [num_seqs + 1] (packed sequences, batch 1): sequence i is
            ``x[:, :, cu[i]:cu[i + 1]]``; ``conv_state`` is then [num_seqs, channels, width], one window per
            sequence, and the new windows come back per sequence.

    Returns:
        (out [batch, channels, seqlen] in x.dtype, new_conv_state [batch, channels, width] in conv_state's dtype
        (x's when conv_state is None)): the last ``width`` inputs, with inputs from before a reset zeroed. With
        ``cu_seqlens`` the new windows are [num_seqs, channels, width]; a sequence shorter than ``width`` keeps
        the tail of its incoming window, an empty one keeps it whole.
    """
    if cu_seqlens is not None:
        return _packed_by_sequence(x, weight, bias, conv_state, reset, activation, cu_seqlens)
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight[:, 0]
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise StateShapeError(
            f"causal_conv1d: expected x [batch, channels, seqlen] and weight [channels, width], found x "
            f"{list(x.shape)} and weight {list(weight.shape)}"
        )
    if activation not in (None, "silu", "swish"):
        raise StateError(f"activation: expected None or 'silu', found {activation!r}")
    bsz, ch, L = x.shape
    W = weight.shape[1]
    if conv_state is not None and list(conv_state.shape) != [bsz, ch, W]:
        raise StateShapeError(f"conv_state: expected [batch, channels, width] = {[bsz, ch, W]}, found {list(conv_state.shape)}")
    if reset is not None and (reset.dtype != torch.bool or list(reset.shape) != [bsz, L]):
        raise StateShapeError(f"reset: expected a bool tensor {[bsz, L]}, found {reset.dtype} {list(reset.shape)}")
    ct = compute_dtype(x, weight, bias, conv_state)
    state_dtype = conv_state.dtype if conv_state is not None else x.dtype
    prev = (conv_state.to(ct) if conv_state is not None else torch.zeros(bsz, ch, W, dtype=ct, device=x.device))
    full = torch.cat([prev, x.to(ct)], dim=-1)  # [b, ch, W + L]; position j < W is from the state
    if reset is not None:
        # segment of each position: inputs are visible only within their segment
        seg_x = torch.cumsum(reset.long(), dim=1)
        seg = torch.cat([torch.zeros(bsz, W, dtype=torch.long, device=x.device), seg_x], dim=1)  # [b, W + L]
        windows = full[:, :, 1:].unfold(-1, W, 1)  # [b, ch, L, W]: inputs t-W+1 .. t
        seg_win = seg[:, 1:].unfold(-1, W, 1)  # [b, L, W]
        visible = (seg_win == seg_x[:, :, None]).to(ct)
        out = (windows * visible[:, None] * weight.to(ct)[None, :, None, :]).sum(-1)
        last = full[:, :, -W:] * (seg[:, -W:] == seg[:, -1:]).to(ct)[:, None, :]
    else:
        out = F.conv1d(full[:, :, 1:], weight.to(ct)[:, None, :], groups=ch)
        last = full[:, :, -W:]
    if bias is not None:
        out = out + bias.to(ct)[None, :, None]
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype), last.to(state_dtype)


def _packed_by_sequence(x, weight, bias, conv_state, reset, activation, cu_seqlens):
    """The packed form as its definition: one :func:`causal_conv1d_ref` per sequence, from its own window."""
    if x.dim() != 3:
        raise StateShapeError(f"causal_conv1d: expected x [1, channels, total], found {list(x.shape)}")
    n = check_cu_seqlens(cu_seqlens, x.shape[2], x.shape[0])
    w2 = weight[:, 0] if weight.dim() == 3 and weight.shape[1] == 1 else weight
    ch, W = x.shape[1], w2.shape[-1]
    check_packed_windows(conv_state, n, ch, W)
    if reset is not None and (reset.dtype != torch.bool or list(reset.shape) != [1, x.shape[2]]):
        raise StateShapeError(f"reset: expected a bool tensor {[1, x.shape[2]]}, found {reset.dtype} "
                              f"{list(reset.shape)}")
    bounds = [int(v) for v in cu_seqlens.tolist()]
    outs, lasts = [], []
    for i in range(n):
        st, en = bounds[i], bounds[i + 1]
        cs = conv_state[i:i + 1] if conv_state is not None else None
        if en == st:  # nothing to run: the window passes through unchanged
            lasts.append(cs if cs is not None else x.new_zeros(1, ch, W))
            continue
        rs = reset[:, st:en] if reset is not None else None
        o, last = causal_conv1d_ref(x[:, :, st:en], weight, bias, conv_state=cs, reset=rs, activation=activation)
        outs.append(o)
        lasts.append(last)
    out = torch.cat(outs, dim=2) if outs else x.new_zeros(1, ch, 0)
    return out, torch.cat(lasts, dim=0)


def check_packed_windows(conv_state, num_seqs: int, channels: int, width: int, name: str = "conv_state") -> None:
    """Raise :class:`StateShapeError` unless ``conv_state`` is None or [num_seqs, channels, width]."""
    if conv_state is not None and list(conv_state.shape) != [num_seqs, channels, width]:
        raise StateShapeError(f"{name}: expected one window per packed sequence, [num_seqs, channels, width] = "
                              f"{[num_seqs, channels, width]}, found {list(conv_state.shape)}")
