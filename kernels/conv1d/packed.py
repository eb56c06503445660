"""The packed (``cu_seqlens``) causal conv1d in PyTorch, vectorised over sequences: the CPU path, and the
differentiable path for float64 on any device.

Every step t of sequence s (starting at ``st``) reads its ``width`` inputs from one gathered tensor: the packed
input where the position is inside the sequence, the sequence's own incoming window before its start. An input at
position p is visible at t unless a reset lies in ``(p, t]`` within the sequence; a prefix count of the resets
answers that for every (t, p) at once. Autograd differentiates the gathers, so x, weight, bias and the incoming
windows all get gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..scan_inputs import compute_dtype

__all__ = ["causal_conv1d_packed"]


def causal_conv1d_packed(x: Tensor, weight: Tensor, bias: Optional[Tensor], conv_state: Optional[Tensor],
                         reset: Optional[Tensor], silu: bool, cu_seqlens: Tensor,
                         num_seqs: int) -> tuple[Tensor, Tensor]:
    """Checked inputs (see :func:`~mamba_state.kernels.causal_conv1d`): x [1, ch, T]; weight [ch, W]; bias [ch]
    or None; conv_state [num_seqs, ch, W] or None; reset bool [1, T] or None; cu_seqlens int [num_seqs + 1].
    Returns ``(out [1, ch, T] in x.dtype, new windows [num_seqs, ch, W])`` in conv_state's dtype (x's when None)."""
    _, ch, T = x.shape
    W = weight.shape[1]
    ct = compute_dtype(x, weight, bias, conv_state)
    dev = x.device
    cu = cu_seqlens.to(device=dev, dtype=torch.long)
    starts, ends = cu[:-1], cu[1:]
    seq = torch.repeat_interleave(torch.arange(num_seqs, device=dev), ends - starts, output_size=T)  # [T]
    init = conv_state.to(ct) if conv_state is not None else torch.zeros(num_seqs, ch, W, dtype=ct, device=dev)
    # one source for every read: the windows [ch, num_seqs * W] then the packed input [ch, T]
    src = torch.cat([init.transpose(0, 1).reshape(ch, num_seqs * W), x[0].to(ct)], dim=1)
    # prefix count of resets: resets in positions [a, b) = count[b] - count[a]
    count = None
    if reset is not None:
        count = F.pad(torch.cumsum(reset[0].long(), 0), (1, 0))

    def gather(pos: Tensor, sid: Tensor, st: Tensor, last: Tensor) -> Tensor:
        """Inputs at positions ``pos`` [..., W] for steps of sequences ``sid`` (start ``st``) as seen at step
        ``last`` ([...] each): [ch, ..., W], zeroed where a reset in the sequence lies in (pos, last]."""
        inside = pos >= st[..., None]
        idx = torch.where(inside, num_seqs * W + pos, sid[..., None] * W + W + pos - st[..., None])
        v = src[:, idx]
        if count is not None:
            first = torch.maximum(pos + 1, st[..., None])  # resets before the sequence's start do not count
            v = v * (count[last[..., None] + 1] == count[first]).to(ct)
        return v

    t = torch.arange(T, device=dev)
    taps = torch.arange(W, device=dev)
    win = gather(t[:, None] - (W - 1) + taps, seq, starts[seq], t)  # [ch, T, W], oldest first
    out = torch.einsum("ctw,cw->ct", win, weight.to(ct))
    if bias is not None:
        out = out + bias.to(ct)[:, None]
    if silu:
        out = F.silu(out)
    ids = torch.arange(num_seqs, device=dev)
    new = gather(ends[:, None] - W + taps, ids, starts, ends - 1)  # [ch, num_seqs, W]
    state_dtype = conv_state.dtype if conv_state is not None else x.dtype
    return out.to(x.dtype)[None], new.transpose(0, 1).to(state_dtype)
