"""The Mamba-3 SISO scan parallel within chunks (the fast CPU path); same function as
:func:`~mamba_state.kernels.mamba3.naive.mamba3_scan_ref`.

Unrolling the recurrence of :mod:`~mamba_state.kernels.mamba3.naive` inside a chunk (``cs_t``: the running sum of
``adt``; ``w_s = lam_s dt_s``, ``u_s = a_s (1 - lam_s) dt_s``; ``k'_s``, ``v'_s``: the previous token's key and value,
the carried ``k_prev``, ``v_prev`` for the chunk's first token)::

    y_t = exp(cs_t) S_0 q_t + sum_{s <= t} exp(cs_t - cs_s) [w_s (q_t . k_s) v_s + u_s (q_t . k'_s) v'_s] + D v_t

so each chunk is a few batched matrix products over ``[chunk, chunk]`` (as in SSD), and the chunk's last state is
the same sum at ``t = end``. A reset at ``t`` cuts the sum: a token only sees tokens of its own segment, the chunk's
incoming state only reaches the tokens before the first reset, and the previous key and value are zero at a reset.
The rotary angle is a running sum restarted at resets, wrapped to ``[0, 2 pi)`` once per chunk.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..scan_inputs import compute_dtype
from .naive import TWO_PI, Mamba3States, _heads, check_mamba3_inputs, rotate_pairs, zero_states

__all__ = ["mamba3_scan_chunked"]


def _chunk(q, k, v, adt, dt, lam, angles, reset, qb, kb, state: Mamba3States):
    """One chunk ``[b, T, ...]`` (compute dtype, heads expanded) from ``state`` -> ``(y without D, new state)``."""
    b, T, h, p = v.shape
    if reset is None:
        seg = torch.zeros(b, T, dtype=torch.long, device=v.device)
    else:
        seg = torch.cumsum(reset.long(), dim=1)  # segment number of each token; 0 = continues the state
    first = (seg == 0).to(v.dtype)  # [b, T]: tokens that still see the incoming state

    # rotary angle: running sum within the segment, plus the incoming angle in segment 0
    inc = math.pi * torch.tanh(angles) * dt[..., None]  # [b, T, h, s]
    run = torch.cumsum(inc, dim=1)
    if reset is not None:
        ar = torch.arange(T, device=v.device).expand(b, T)
        start = torch.cummax(torch.where(reset, ar, torch.zeros_like(ar)), dim=1).values  # segment's first token
        idx = start[:, :, None, None].expand_as(run)
        run = run - (run.gather(1, idx) - inc.gather(1, idx))
    theta = torch.remainder(run + first[:, :, None, None] * state.angle[:, None], TWO_PI)
    qr = rotate_pairs(q + qb, theta)  # [b, T, h, n]
    kr = rotate_pairs(k + kb, theta)

    # previous token's key and value (the trapezoid's left end); zero at a reset
    kp = torch.cat([state.k[:, None], kr[:, :-1]], dim=1)
    vp = torch.cat([state.v[:, None], v[:, :-1]], dim=1)
    if reset is not None:
        keep = (~reset).to(v.dtype)[:, :, None, None]
        kp, vp = kp * keep, vp * keep

    a_log = adt  # [b, T, h]
    cs = torch.cumsum(a_log, dim=1)
    w = lam * dt
    u = torch.exp(a_log) * (1 - lam) * dt
    cs_h = cs.transpose(1, 2)  # [b, h, T]
    diff = cs_h[:, :, :, None] - cs_h[:, :, None, :]  # [b, h, t, s]
    causal = torch.ones(T, T, dtype=torch.bool, device=v.device).tril()
    mask = causal & (seg[:, :, None] == seg[:, None, :])[:, None]  # [b, 1 or h, t, s]
    decay = torch.exp(torch.where(mask, diff, torch.full_like(diff, -math.inf)))
    qk = torch.einsum("bthn,bshn->bhts", qr, kr)
    qkp = torch.einsum("bthn,bshn->bhts", qr, kp)
    wt, ut = w.transpose(1, 2)[:, :, None, :], u.transpose(1, 2)[:, :, None, :]  # [b, h, 1, s]
    y = (torch.einsum("bhts,bshp->bthp", decay * qk * wt, v)
         + torch.einsum("bhts,bshp->bthp", decay * qkp * ut, vp))
    from_state = (torch.exp(cs) * first[:, :, None])  # [b, T, h]
    y = y + from_state[..., None] * torch.einsum("bhpn,bthn->bthp", state.ssm, qr)

    last = decay[:, :, -1, :]  # [b, h, s]: decay from each token to the chunk's end (0 across a reset)
    S = (from_state[:, -1, :, None, None] * state.ssm
         + torch.einsum("bhs,bshp,bshn->bhpn", last * w.transpose(1, 2), v, kr)
         + torch.einsum("bhs,bshp,bshn->bhpn", last * u.transpose(1, 2), vp, kp))
    return y, Mamba3States(theta[:, -1], S, kr[:, -1], v[:, -1])


def mamba3_scan_chunked(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D=None, z=None,
                        initial_state: Mamba3States | None = None, reset: torch.Tensor | None = None,
                        return_final_state: bool = False, chunk_size: int = 64):
    """Same arguments, results and dtypes as :func:`~mamba_state.kernels.mamba3.naive.mamba3_scan_ref`;
    ``chunk_size`` tokens are computed at once (``[chunk, chunk]`` matrices per head). Differentiable by autograd."""
    s = check_mamba3_inputs(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, initial_state, reset)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, found {chunk_size!r}")
    init = tuple(initial_state) if initial_state is not None else ()
    ct = compute_dtype(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, *init)
    h = s.nheads
    qc, kc = _heads(q.to(ct), h, 2), _heads(k.to(ct), h, 2)
    vc, adtc, dtc, ac = v.to(ct), adt.to(ct), dt.to(ct), angles.to(ct)
    lam = torch.sigmoid(trap.to(ct))
    qb, kb = q_bias.to(ct), k_bias.to(ct)
    if initial_state is not None:
        state = Mamba3States(*(t.to(ct) for t in initial_state))
    else:
        state = zero_states(s.batch, h, s.headdim, s.dstate, s.nangles, ct, v.device)
    ys = []
    for t0 in range(0, s.seqlen, chunk_size):
        sl = slice(t0, min(t0 + chunk_size, s.seqlen))
        y, state = _chunk(qc[:, sl], kc[:, sl], vc[:, sl], adtc[:, sl], dtc[:, sl], lam[:, sl], ac[:, sl],
                          None if reset is None else reset[:, sl], qb, kb, state)
        ys.append(y)
    y = torch.cat(ys, dim=1) if ys else vc.new_zeros(vc.shape)
    if D is not None:
        y = y + D.to(ct)[:, None] * vc
    if z is not None:
        y = y * F.silu(z.to(ct))
    out = y.to(v.dtype)
    return (out, state) if return_final_state else out
