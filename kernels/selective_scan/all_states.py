"""A selective scan that keeps the state after every token (the dense path of full traces).

:func:`selective_scan_all_states` computes the same outputs as :func:`mamba_state.reference.selective_scan_ref`
and also returns every intermediate state ``[seqlen + 1, batch, dim, dstate]`` (row 0 the initial state). It is
what states at many positions use instead of one scan call per segment: the work is three loops of about
``sqrt(seqlen)`` vectorised steps each, whatever the number of positions.

Method (chunks of ``T`` steps, ``K`` chunks; all of it differentiable PyTorch):

1. every chunk is scanned from a zero state, all chunks at once (``T`` steps), giving its end state and, as the
   product of its per-step decays, its total decay (zero across a reset);
2. a loop over the ``K`` chunk boundaries carries the true state into each chunk;
3. every chunk is scanned again from its true entering state (``T`` steps), now keeping each step's state.

Memory is a few ``[batch, dim, seqlen, dstate]`` tensors in the compute dtype (float32, or float64 for float64
inputs), the size of the trace itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..scan_inputs import check_scan_inputs, compute_dtype

__all__ = ["selective_scan_all_states"]


def _time_major(x: torch.Tensor, K: int, T: int) -> torch.Tensor:
    """``[b, c, K*T]`` -> ``[T, b, c, K]`` (one small copy; every step then reads a contiguous slice)."""
    b, c, _ = x.shape
    return x.reshape(b, c, K, T).permute(3, 0, 1, 2).contiguous()


def _bc_time_major(t: torch.Tensor, dim: int, K: int, T: int, pad: int, ct: torch.dtype) -> torch.Tensor:
    """B or C as ``[T, b, dim or 1, K, dstate]`` (constant ``[dim, dstate]``: ``[1, 1, dim, 1, dstate]``)."""
    t = t.to(ct)
    if t.dim() == 2:
        return t[None, None, :, None, :]
    if t.dim() == 3:
        t = t[:, None]
    b, g, n, _ = t.shape
    if pad:
        t = F.pad(t, (0, pad))
    t = t.reshape(b, g, n, K, T).permute(4, 0, 1, 3, 2)  # [T, b, g, K, n]
    return t.repeat_interleave(dim // g, dim=2) if g > 1 else t.contiguous()


def selective_scan_all_states(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                              initial_state=None, reset=None, chunk_size: int | None = None):
    """Selective scan returning ``(out [batch, dim, seqlen] in u.dtype, states [seqlen + 1, batch, dim, dstate])``.

    Arguments and semantics as :func:`mamba_state.reference.selective_scan_ref` (shapes in
    :mod:`mamba_state.scan_inputs`); ``states[p]`` is the state after ``p`` tokens (before a reset at token
    ``p``), in the compute dtype. ``chunk_size`` defaults to about ``sqrt(seqlen)``.
    """
    shape = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, reset)
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    b, d, L, n = shape.batch, shape.dim, shape.seqlen, shape.dstate
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    T = int(chunk_size) if chunk_size is not None else max(1, round(math.sqrt(L)))
    T = min(T, L)
    K = -(-L // T)
    pad = K * T - L
    du = dt * u.to(ct)
    if pad:  # padded steps keep the state: dt 0 gives decay 1 and input 0
        dt, du = F.pad(dt, (0, pad)), F.pad(du, (0, pad))
    Af = A.to(ct)[None, None, :, None, :]  # [1, 1, d, 1, n]
    dt_tm = _time_major(dt, K, T)[..., None]  # [T, b, d, K, 1]
    dA = torch.exp(dt_tm * Af)  # [T, b, d, K, n], contiguous per step
    total = torch.exp(dt_tm.sum(0) * Af[0])  # [b, d, K, n]: each chunk's decay over all its steps
    if reset is not None:
        keep = F.pad(~reset, (0, pad), value=True) if pad else ~reset
        keep_tm = _time_major(keep[:, None].to(ct), K, T)[..., None]  # [T, b, 1, K, 1]
        dA = dA * keep_tm
        total = total * keep_tm.prod(0)
    dBu = _time_major(du, K, T)[..., None] * _bc_time_major(B, d, K, T, pad, ct)  # [T, b, d, K, n]
    dA_t, dBu_t = dA.unbind(0), dBu.unbind(0)
    # 1. chunk end states from zero, all chunks at once
    h = dBu_t[0]
    for t in range(1, T):
        h = torch.addcmul(dBu_t[t], dA_t[t], h)
    # 2. the true state entering each chunk
    carry = initial_state.to(ct) if initial_state is not None else u.new_zeros(b, d, n, dtype=ct)
    first = carry
    entering = []
    for h_k, p_k in zip(h.unbind(2), total.unbind(2)):
        entering.append(carry)
        carry = torch.addcmul(h_k, p_k, carry)
    h = torch.stack(entering, dim=2)  # [b, d, K, n]
    # 3. rerun every chunk from its entering state, keeping every step (written in place into one buffer)
    steps = torch.empty(T, b, d, K, n, dtype=ct, device=u.device)
    for t in range(T):
        h = torch.addcmul(dBu_t[t], dA_t[t], h)
        steps[t] = h
    C_tm = _bc_time_major(C, d, K, T, pad, ct)
    y = (steps * C_tm).sum(-1)  # [T, b, d, K]
    y = y.permute(1, 2, 3, 0).reshape(b, d, K * T)[:, :, :L]
    if D is not None:
        y = y + u.to(ct) * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    states = steps.permute(3, 0, 1, 2, 4).reshape(K * T, b, d, n)[:L]  # [L, b, d, n] (one copy)
    return y.to(u.dtype), torch.cat([first[None], states], dim=0)
