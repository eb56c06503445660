"""The reference causal depthwise conv1d with a carried window and resets, :func:`causal_conv1d_ref`, with the
window semantics of upstream's ``Mamba.step`` (the state holds the last ``d_conv`` inputs, oldest first);
float64-capable and differentiable."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mamba_state.errors import StateError, StateShapeError

from ..scan_inputs import compute_dtype

__all__ = ["causal_conv1d_ref"]


def causal_conv1d_ref(x, weight, bias=None, conv_state=None, reset=None, activation=None):
    """Causal depthwise conv1d with a carried window.

    Args:
        x: [batch, channels, seqlen].
        weight: [channels, width] (or nn.Conv1d's [channels, 1, width]).
        bias: [channels] or None.
        conv_state: [batch, channels, width], the last ``width`` inputs before ``x``, oldest first (zeros if None).
        reset: bool [batch, seqlen]; True at t clears the window before t (row starts afresh at t).
        activation: None or "silu".

    Returns:
        (out [batch, channels, seqlen] in x.dtype, new_conv_state [batch, channels, width] in conv_state's dtype
        (x's when conv_state is None)): the last ``width`` inputs, with inputs from before a reset zeroed.
    """
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
