"""The reference of one decoding step, :func:`selective_state_update_ref` (upstream ``selective_state_update``
semantics, with resets), float64-capable and differentiable."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mamba_state.errors import StateShapeError

from ..scan_inputs import compute_dtype

__all__ = ["selective_state_update_ref"]


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                               reset=None):
    """One step of the scan, updating ``state`` in place (upstream ``selective_state_update`` semantics).

    Mamba-1 form: state [batch, dim, dstate]; x, dt, z [batch, dim]; A [dim, dstate]; B, C [batch, dstate] or
    [batch, ngroups, dstate]; D, dt_bias [dim]. Multi-head form: state [batch, nheads, headdim, dstate];
    x, dt, z [batch, nheads, headdim]; A [nheads, headdim, dstate]; B, C [batch, ngroups, dstate];
    D, dt_bias [nheads, headdim]. ``reset`` bool [batch] zeroes a row's state before the step.
    Returns out in x.dtype, shaped like x.
    """
    multihead = state.dim() == 4
    if not multihead:
        # Channel groups of B/C (as in the scan) become heads: [batch, dim] -> [batch, G, dim // G].
        G = math.lcm(*(t.shape[1] if t.dim() == 3 else 1 for t in (B, C)))
        if state.dim() != 3 or state.shape[1] % G:
            raise StateShapeError(
                f"selective_state_update: expected state [batch, dim, dstate] with dim divisible by the {G} groups "
                f"of B and C, found {list(state.shape)}")
        B, C = (t.repeat_interleave(G // t.shape[1], dim=1) if t.dim() == 3 else t for t in (B, C))
        bsz, dim = state.shape[:2]
        heads_of = lambda t: t.unflatten(-1, (G, dim // G))  # noqa: E731  (a view: writes reach `state`)
        state4 = state.unflatten(1, (G, dim // G))
        x4, dt4 = heads_of(x), heads_of(dt)
        A4 = A.view(G, dim // G, A.shape[-1])
        D4 = heads_of(D) if D is not None else None
        z4 = heads_of(z) if z is not None else None
        bias4 = heads_of(dt_bias) if dt_bias is not None else None
    else:
        state4, x4, dt4, A4, D4, z4, bias4 = state, x, dt, A, D, z, dt_bias
    bsz, h, p, n = state4.shape
    if list(x4.shape) != [bsz, h, p] or list(dt4.shape) != [bsz, h, p] or list(A4.shape) != [h, p, n]:
        raise StateShapeError(
            f"selective_state_update: expected x, dt {[bsz, h, p]} and A {[h, p, n]}, found x {list(x.shape)}, "
            f"dt {list(dt.shape)}, A {list(A.shape)}"
        )
    ct = compute_dtype(state, x, dt, A, B, C)
    dtf = dt4.to(ct)
    if bias4 is not None:
        dtf = dtf + bias4.to(ct)
    if dt_softplus:
        dtf = F.softplus(dtf)

    def heads(t):  # [batch, n] or [batch, g, n] -> [batch, h, 1, n]
        t = t.to(ct)
        if t.dim() == 2:
            return t[:, None, None, :]
        g = t.shape[1]
        return t[:, :, None, None, :].expand(bsz, g, h // g, 1, n).reshape(bsz, h, 1, n)

    # a copy when autograd records the step: the products below save `prev`, and `state` is overwritten at the end
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (state, x, dt, A, B, C, D, z, dt_bias))
    prev = state4.to(ct, copy=grad)
    if reset is not None:
        prev = torch.where(reset.view(-1, 1, 1, 1), torch.zeros_like(prev), prev)
    new = torch.exp(dtf[..., None] * A4.to(ct)) * prev + (dtf * x4.to(ct))[..., None] * heads(B)
    out = (new * heads(C)).sum(-1)
    if D4 is not None:
        out = out + x4.to(ct) * D4.to(ct)
    if z4 is not None:
        out = out * F.silu(z4.to(ct))
    state4.copy_(new.to(state.dtype))
    return out.to(x.dtype).reshape(x.shape)
