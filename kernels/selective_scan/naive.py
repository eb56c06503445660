"""The sequential float64-capable oracle of Mamba-1's selective scan, :func:`selective_scan_ref`: initial state,
final state and per-step resets, one step at a time. Every fast path (the chunked CPU path, the Triton kernels)
is tested against it.

Recurrence, per batch row ``b``, channel ``d``, state ``n`` and step ``t``::

    dt      = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    x_t     = exp(dt_t * A[d, n]) * (0 if reset[b, t] else x_{t-1}) + dt_t * B_t[n] * u_t
    y_t     = sum_n C_t[n] * x_t[n]  (+ D[d] * u_t)  (* silu(z_t))

with ``x_{-1} = initial_state`` (zeros when absent). Arithmetic runs in float32 for half and float32 inputs,
float64 when any input is float64; the output has ``u``'s dtype and the last state the compute dtype.

With ``cu_seqlens`` (packed sequences, batch 1) the same recurrence runs over each sequence on its own, from its
row of ``initial_state`` [num_seqs, dim, dstate]; the last state is one row per sequence (an empty sequence keeps
its initial state).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..scan_inputs import check_scan_inputs, compute_dtype
from .packed import check_varlen_state, seq_bounds

__all__ = ["selective_scan_ref"]


def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reset):
    """Validate, cast to the compute dtype and apply bias/softplus. Returns the tensors and shape info."""
    shape = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, reset)
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    return shape, ct, dt


def _bc_at(t: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C as a tensor broadcastable to [batch, dim, seqlen, dstate] (no copy for groups)."""
    if t.dim() == 2:  # [dim, dstate], constant over time
        return t[None, :, None, :]
    if t.dim() == 3:  # [batch, dstate, seqlen]
        return t.transpose(1, 2)[:, None]
    b, g, n, L = t.shape  # [batch, groups, dstate, seqlen] -> [batch, dim, seqlen, dstate]
    return t.permute(0, 1, 3, 2)[:, :, None].expand(b, g, dim // g, L, n).reshape(b, dim, L, n)


def _finish(y, u, D, z, ct, out_dtype):
    if D is not None:
        y = y + u.to(ct) * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(out_dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None, reset=None, cu_seqlens=None):
    """Sequential selective scan (the oracle). Shapes as in :mod:`mamba_state.scan_inputs`.

    Returns ``out`` [batch, dim, seqlen] in ``u.dtype``, or ``(out, last_state)`` with ``last_state``
    [batch, dim, dstate] in the compute dtype (float32, or float64 for float64 inputs). With ``cu_seqlens``
    (int32/int64 [num_seqs + 1], batch 1): ``initial_state`` and ``last_state`` are [num_seqs, dim, dstate].
    """
    if cu_seqlens is not None:
        return _ref_packed(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state,
                           reset, cu_seqlens)
    shape, ct, dt = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reset)
    Bt = _bc_at(B.to(ct), shape.dim)
    Ct = _bc_at(C.to(ct), shape.dim)
    Af = A.to(ct)
    du = dt * u.to(ct)
    x = (initial_state.to(ct) if initial_state is not None
         else torch.zeros(shape.batch, shape.dim, shape.dstate, dtype=ct, device=u.device))
    ys = []
    for t in range(shape.seqlen):
        decayed = torch.exp(dt[:, :, t, None] * Af) * x
        if reset is not None:
            decayed = torch.where(reset[:, t, None, None], torch.zeros_like(decayed), decayed)
        x = decayed + du[:, :, t, None] * Bt[:, :, min(t, Bt.shape[2] - 1)]
        ys.append((x * Ct[:, :, min(t, Ct.shape[2] - 1)]).sum(-1))
    out = _finish(torch.stack(ys, dim=2), u, D, z, ct, u.dtype)
    return (out, x) if return_last_state else out


def _ref_packed(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state, reset,
                cu_seqlens):
    """:func:`selective_scan_ref` with ``cu_seqlens``: every sequence scanned alone from its own initial state."""
    shape = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, None, reset)
    bounds = seq_bounds(cu_seqlens, shape.seqlen, shape.batch)
    nseq = len(bounds) - 1
    check_varlen_state(initial_state, nseq, shape.dim, shape.dstate)
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    h0 = (initial_state.to(ct) if initial_state is not None
          else torch.zeros(nseq, shape.dim, shape.dstate, dtype=ct, device=u.device))

    def part(t, a, b):  # time slice of a time-varying input; constant B/C, D, bias and None pass through
        return t[..., a:b] if t is not None and t.dim() >= 3 else t

    outs, lasts = [], []
    for s in range(nseq):
        a, b = bounds[s], bounds[s + 1]
        if a == b:  # an empty sequence: no output, its state unchanged
            lasts.append(h0[s])
            continue
        out, last = selective_scan_ref(part(u, a, b), part(delta, a, b), A, part(B, a, b), part(C, a, b), D,
                                       part(z, a, b), delta_bias, delta_softplus, True, h0[s:s + 1],
                                       None if reset is None else reset[:, a:b])
        outs.append(out)
        lasts.append(last[0])
    out = torch.cat(outs, dim=-1)
    return (out, torch.stack(lasts)) if return_last_state else out
