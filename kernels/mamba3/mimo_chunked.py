"""The Mamba-3 MIMO scan parallel within chunks (the CPU path, and the chunk path on every device); same function
as :func:`~mamba_state.kernels.mamba3.mimo_naive.mamba3_mimo_scan_ref`.

As in the SISO :mod:`~mamba_state.kernels.mamba3.chunked`, with ranks (``cs_t``: running sum of ``adt``;
``w_s = lam_s dt_s``, ``u_s = a_s (1 - lam_s) dt_s``; primes: the previous token's keys and value)::

    y_{t,r} = exp(cs_t) S_0 q_{t,r} + sum_{s <= t} exp(cs_t - cs_s) sum_r' [w_s (q_{t,r} . k_{s,r'}) v_{s,r'}
                                                                        + u_s (q_{t,r} . k'_{s,r'}) v'_{s,r'}]

so a chunk is a few batched products over ``[chunk, R, chunk, R]`` per head (upstream's TileLang kernel fuses the
same ``chunk * R`` rows). Resets cut the sums as in SISO.
"""

from __future__ import annotations

import math

import torch

from ..scan_inputs import compute_dtype
from .mimo_naive import _heads, check_mimo_inputs, mimo_output, mimo_zero_states, rotate_halves
from .naive import TWO_PI, Mamba3States

__all__ = ["mamba3_mimo_scan_chunked"]


def _chunk(q, k, v, adt, dt, lam, angles, reset, qb, kb, psi, state: Mamba3States):
    """One chunk from ``state`` (compute dtype, heads expanded; ``q``, ``k`` ``[b, T, R, h, n]``, ``qb``, ``kb``,
    ``psi`` ``[R, h, .]``) -> ``(y_r [b, T, R, h, p] without D, new state)``."""
    b, T, h, p = v.shape
    if reset is None:
        seg = torch.zeros(b, T, dtype=torch.long, device=v.device)
    else:
        seg = torch.cumsum(reset.long(), dim=1)  # 0 = still continues the incoming state
    first = (seg == 0).to(v.dtype)

    inc = math.pi * torch.tanh(angles) * dt[..., None]  # [b, T, h, s]
    run = torch.cumsum(inc, dim=1)
    if reset is not None:  # restart the running angle at each segment's first token
        ar = torch.arange(T, device=v.device).expand(b, T)
        start = torch.cummax(torch.where(reset, ar, torch.zeros_like(ar)), dim=1).values
        idx = start[:, :, None, None].expand_as(run)
        run = run - (run.gather(1, idx) - inc.gather(1, idx))
    theta = torch.remainder(run + first[:, :, None, None] * state.angle[:, None], TWO_PI)
    qr = rotate_halves(q + qb, theta[:, :, None])  # [b, T, R, h, n]
    kr = rotate_halves(k + kb, theta[:, :, None])
    vr = v[:, :, None] * psi  # [b, T, R, h, p]

    kp = torch.cat([state.k[:, None], kr[:, :-1]], dim=1)
    vp = torch.cat([state.v[:, None], v[:, :-1]], dim=1)
    if reset is not None:
        keep = (~reset).to(v.dtype)
        kp, vp = kp * keep[:, :, None, None, None], vp * keep[:, :, None, None]
    vpr = vp[:, :, None] * psi

    cs = torch.cumsum(adt, dim=1)  # [b, T, h]
    w = lam * dt
    u = torch.exp(adt) * (1 - lam) * dt
    cs_h = cs.transpose(1, 2)
    diff = cs_h[:, :, :, None] - cs_h[:, :, None, :]  # [b, h, t, s]
    causal = torch.ones(T, T, dtype=torch.bool, device=v.device).tril()
    mask = causal & (seg[:, :, None] == seg[:, None, :])[:, None]
    decay = torch.exp(torch.where(mask, diff, torch.full_like(diff, -math.inf)))
    wt, ut = (decay * w.transpose(1, 2)[:, :, None, :]), (decay * u.transpose(1, 2)[:, :, None, :])
    qk = torch.einsum("btrhn,bsRhn->bhtrsR", qr, kr) * wt[:, :, :, None, :, None]
    qkp = torch.einsum("btrhn,bsRhn->bhtrsR", qr, kp) * ut[:, :, :, None, :, None]
    y = torch.einsum("bhtrsR,bsRhp->btrhp", qk, vr) + torch.einsum("bhtrsR,bsRhp->btrhp", qkp, vpr)
    from_state = torch.exp(cs) * first[:, :, None]  # [b, T, h]
    y = y + from_state[:, :, None, :, None] * torch.einsum("bhpn,btrhn->btrhp", state.ssm, qr)

    last = decay[:, :, -1, :]  # [b, h, s]: decay from each token to the chunk's end (0 across a reset)
    S = (from_state[:, -1, :, None, None] * state.ssm
         + torch.einsum("bhs,bsrhp,bsrhn->bhpn", last * w.transpose(1, 2), vr, kr)
         + torch.einsum("bhs,bsrhp,bsrhn->bhpn", last * u.transpose(1, 2), vpr, kp))
    return y, Mamba3States(theta[:, -1], S, kr[:, -1], v[:, -1])


def mamba3_mimo_scan_chunked(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z=None, mimo_o=None,
                             D=None, z=None, initial_state: Mamba3States | None = None,
                             reset: torch.Tensor | None = None, return_final_state: bool = False,
                             chunk_size: int = 16):
    """Same arguments, results and dtypes as :func:`~mamba_state.kernels.mamba3.mimo_naive.mamba3_mimo_scan_ref`;
    ``chunk_size`` tokens at once (upstream recommends ``64 / R`` for MIMO). Differentiable by autograd."""
    s = check_mimo_inputs(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z,
                          initial_state, reset)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, found {chunk_size!r}")
    init = tuple(initial_state) if initial_state is not None else ()
    ct = compute_dtype(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, *init)
    h = s.nheads
    qc, kc = _heads(q.to(ct), h, 3), _heads(k.to(ct), h, 3)
    vc, adtc, dtc, ac = v.to(ct), adt.to(ct), dt.to(ct), angles.to(ct)
    lam = torch.sigmoid(trap.to(ct))
    qb, kb, psi = (t.to(ct).transpose(0, 1) for t in (q_bias, k_bias, mimo_x))  # [R, h, .]
    if initial_state is not None:
        state = Mamba3States(*(t.to(ct) for t in initial_state))
    else:
        state = mimo_zero_states(s.batch, s.rank, h, s.headdim, s.dstate, s.nangles, ct, v.device)
    ys = []
    for t0 in range(0, s.seqlen, chunk_size):
        sl = slice(t0, min(t0 + chunk_size, s.seqlen))
        y, state = _chunk(qc[:, sl], kc[:, sl], vc[:, sl], adtc[:, sl], dtc[:, sl], lam[:, sl], ac[:, sl],
                          None if reset is None else reset[:, sl], qb, kb, psi, state)
        ys.append(y)
    y_r = torch.cat(ys, dim=1) if ys else vc.new_zeros(s.batch, 0, s.rank, h, s.headdim)
    if D is not None:
        y_r = y_r + D.to(ct)[:, None] * (vc[:, :, None] * psi)
    out = mimo_output(y_r, None if mimo_z is None else mimo_z.to(ct), None if mimo_o is None else mimo_o.to(ct),
                      None if z is None else z.to(ct)).to(v.dtype)
    return (out, state) if return_final_state else out
