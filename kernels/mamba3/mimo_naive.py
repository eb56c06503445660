"""Pure-PyTorch Mamba-3 **MIMO** scan (``Mamba3(is_mimo=True, mimo_rank=R)``) with an initial state, a final state
and per-step resets: the sequential oracle.

Written from upstream's sources (mamba-ssm 2.3.2.post1; docs/mamba3.md cites each piece): the TileLang chunked
forward ``mamba_mimo_fwd`` (``ops/tilelang/mamba3/mamba3_mimo_fwd.py``), the decode path of ``Mamba3.step``
(``modules/mamba3.py``: ``_preprocess``, ``apply_rotary_qk_inference_fwd(rotate_pairwise=False)``,
``mamba3_step_fn``, ``_postprocess``) and the pure-PyTorch ``selective_state_update_fused_ref_v2``
(``ops/cute/mamba3/mamba3_step_fn.py``). Inputs, after the layer's projections and the RMSNorms of B and C:

* ``q``, ``k``: ``[batch, seqlen, R, ngroups, dstate]`` (C and B, one per rank; head ``h`` reads group
  ``h // (nheads // ngroups)``); ``dstate`` even (the rotation pairs its two halves)
* ``v``: ``[batch, seqlen, nheads, headdim]`` (x)
* ``adt``, ``dt``, ``trap``: ``[batch, seqlen, nheads]`` (``A * dt``, the softplus'd step, the trapezoid's logit)
* ``q_bias``, ``k_bias``: ``[nheads, R, dstate]`` (upstream's ``C_bias`` / ``B_bias``)
* ``angles``: ``[batch, seqlen, nheads, nangles]`` raw rotary rates, ``nangles <= dstate // 2``; angle ``i`` turns
  the pair ``(i, dstate/2 + i)`` (upstream's "halved" rotary; SISO turns ``(2i, 2i+1)``)
* ``mimo_x``: ``[nheads, R, headdim]`` (psi: x up to R values); ``mimo_z`` (zeta, z up to R gates) and ``mimo_o``
  (phi, R outputs down to one): ``[nheads, R, headdim]`` or None
* ``D``: ``[nheads]`` or None; ``z``: like ``v`` or None (needs ``mimo_z``)
* ``initial_state``: :class:`~mamba_state.kernels.mamba3.naive.Mamba3States` ``(angle [b, h, nangles],
  ssm [b, h, headdim, dstate], k [b, R, h, dstate], v [b, h, headdim])`` or None; ``reset``: bool ``[b, seqlen]``

Recurrence, per batch row and head (``Rh(theta)``: the halved rotation; ``k_prev``, ``v_prev``: the previous
token's rotated keys and its value x)::

    a_t = exp(adt[t]);  lam_t = sigmoid(trap[t]);  theta_t = (theta_{t-1} + pi tanh(angles[t]) dt_t) mod 2 pi
    q_{t,r} = Rh(theta_t)(q[t, r] + q_bias[r]);   k_{t,r} = Rh(theta_t)(k[t, r] + k_bias[r])
    v_{t,r} = x_t * mimo_x[r]                                                # elementwise over headdim
    S_t = a_t S_{t-1} + a_t (1 - lam_t) dt_t sum_r v_{t-1,r} k_{t-1,r}^T + lam_t dt_t sum_r v_{t,r} k_{t,r}^T
    y_{t,r} = S_t q_{t,r} + D v_{t,r};   y_{t,r} *= silu(z_t * mimo_z[r])    (when z is given)
    y_t = sum_r mimo_o[r] * y_{t,r}                                          (when mimo_o is given)

Without ``mimo_o`` the per-rank ``y_{t,r}`` come back ``[batch, seqlen, R, nheads, headdim]`` (upstream's
``is_outproj_norm`` variant normalises them per rank before reducing). The state is ``(theta, S, k_t [R, h, n],
x_t)``, upstream's ``(angle_dt_state, ssm_state, k_state, v_state)`` with ``k_state`` ``[B, R, nheads, d_state]``.
Arithmetic in float32 for half/float32 inputs, float64 when any input is float64; differentiable by autograd in
every floating input, the initial state included.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mamba_state.errors import StateError, StateShapeError

from ..scan_inputs import compute_dtype
from .naive import TWO_PI, Mamba3States, _desc

__all__ = ["MimoShape", "check_mimo_inputs", "mamba3_mimo_scan_ref", "mamba3_mimo_step_ref", "rotate_halves",
           "mimo_zero_states", "mimo_output"]


class MimoShape(NamedTuple):
    batch: int
    seqlen: int
    rank: int
    nheads: int
    headdim: int
    ngroups: int
    dstate: int
    nangles: int


def check_mimo_inputs(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z=None, mimo_o=None, D=None,
                      z=None, initial_state=None, reset=None) -> MimoShape:
    """Validate shapes, dtypes and devices (module docstring); returns the sizes. ``StateShapeError`` for a wrong
    shape, ``StateError`` for a wrong type or device."""
    named = (("q", q), ("k", k), ("v", v), ("adt", adt), ("dt", dt), ("trap", trap), ("q_bias", q_bias),
             ("k_bias", k_bias), ("angles", angles), ("mimo_x", mimo_x))
    for name, t in named:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise StateError(f"{name}: expected a floating torch.Tensor, found {_desc(t)}")
    if v.dim() != 4:
        raise StateShapeError(f"v: expected [batch, seqlen, nheads, headdim], found {_desc(v)}")
    b, L, h, p = v.shape
    if q.dim() != 5 or q.shape[:2] != (b, L):
        raise StateShapeError(f"q: expected [{b}, {L}, mimo_rank, ngroups, dstate], found {_desc(q)}")
    R, g, n = q.shape[2:]
    if g < 1 or h % g != 0:
        raise StateShapeError(f"q: expected ngroups dividing nheads={h}, found ngroups={g}")
    if n % 2:
        raise StateShapeError(f"q: expected an even dstate (the rotation pairs its halves), found {n}")
    if angles.dim() != 4 or list(angles.shape[:3]) != [b, L, h]:
        raise StateShapeError(f"angles: expected [{b}, {L}, {h}, nangles], found {_desc(angles)}")
    s = angles.shape[3]
    if not 0 < s <= n // 2:
        raise StateShapeError(f"angles: expected 1 <= nangles <= dstate // 2 = {n // 2}, found {s}")
    expected = {"k": (k, [b, L, R, g, n]), "adt": (adt, [b, L, h]), "dt": (dt, [b, L, h]), "trap": (trap, [b, L, h]),
                "q_bias": (q_bias, [h, R, n]), "k_bias": (k_bias, [h, R, n]), "mimo_x": (mimo_x, [h, R, p])}
    for opt_name, opt in (("mimo_z", mimo_z), ("mimo_o", mimo_o)):
        if opt is not None:
            expected[opt_name] = (opt, [h, R, p])
    for name, (t, shape) in expected.items():
        if not isinstance(t, torch.Tensor) or list(t.shape) != shape:
            raise StateShapeError(f"{name}: expected shape {shape}, found {_desc(t)}")
    if D is not None and (not isinstance(D, torch.Tensor) or list(D.shape) != [h]):
        raise StateShapeError(f"D: expected shape [{h}], found {_desc(D)}")
    if z is not None and (not isinstance(z, torch.Tensor) or z.shape != v.shape):
        raise StateShapeError(f"z: expected shape {list(v.shape)} (like v), found {_desc(z)}")
    if z is not None and mimo_z is None:
        raise StateError("mimo_z: expected a [nheads, R, headdim] tensor when z is given, found None")
    extra: list[tuple[str, object]] = [("mimo_z", mimo_z), ("mimo_o", mimo_o), ("D", D), ("z", z), ("reset", reset)]
    if initial_state is not None:
        if not isinstance(initial_state, tuple) or len(initial_state) != 4:
            raise StateError(f"initial_state: expected Mamba3States(angle, ssm, k, v) or None, found "
                             f"{_desc(initial_state)}")
        want = {"angle": [b, h, s], "ssm": [b, h, p, n], "k": [b, R, h, n], "v": [b, h, p]}
        for (name, shape), t in zip(want.items(), initial_state):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or list(t.shape) != shape:
                raise StateShapeError(f"initial_state.{name}: expected a floating tensor of shape {shape}, found "
                                      f"{_desc(t)}")
            extra.append((f"initial_state.{name}", t))
    if reset is not None:
        if not isinstance(reset, torch.Tensor) or reset.dtype != torch.bool or list(reset.shape) != [b, L]:
            raise StateShapeError(f"reset: expected a bool tensor of shape {[b, L]}, found {_desc(reset)}")
    for name, t in list(named) + extra:
        if isinstance(t, torch.Tensor) and t.device != v.device:
            raise StateError(f"{name}: expected device {v.device} (v's), found {t.device}")
    return MimoShape(b, L, R, h, p, g, n, s)


def mimo_zero_states(batch: int, rank: int, nheads: int, headdim: int, dstate: int, nangles: int,
                     dtype: torch.dtype, device: torch.device | str) -> Mamba3States:
    """Zero MIMO :class:`Mamba3States` (``k`` ``[batch, rank, nheads, dstate]``)."""
    return Mamba3States(torch.zeros(batch, nheads, nangles, dtype=dtype, device=device),
                        torch.zeros(batch, nheads, headdim, dstate, dtype=dtype, device=device),
                        torch.zeros(batch, rank, nheads, dstate, dtype=dtype, device=device),
                        torch.zeros(batch, nheads, headdim, dtype=dtype, device=device))


def rotate_halves(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Turn each pair ``(x[..., i], x[..., n/2 + i])`` by ``theta[..., i]`` for ``i < theta.shape[-1]`` (the others
    pass unchanged): upstream's MIMO rotary. ``x``: ``[..., n]`` (n even); ``theta``: ``[..., nangles]``,
    broadcastable to ``x``'s leading shape."""
    half = x.shape[-1] // 2
    pad = half - theta.shape[-1]
    if pad:  # angle 0 is the identity exactly (cos 0 = 1, sin 0 = 0)
        theta = torch.cat([theta, theta.new_zeros(*theta.shape[:-1], pad)], dim=-1)
    x0, x1 = x[..., :half], x[..., half:]
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.cat([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)


def _heads(t: torch.Tensor, nheads: int, dim: int) -> torch.Tensor:
    g = t.shape[dim]
    return t if g == nheads else t.repeat_interleave(nheads // g, dim=dim)


def mimo_output(y_r: torch.Tensor, mimo_z: torch.Tensor | None, mimo_o: torch.Tensor | None,
                z: torch.Tensor | None) -> torch.Tensor:
    """Gate and reduce per-rank outputs ``y_r`` ``[..., R, nheads, headdim]``: times ``silu(z * mimo_z[r])`` when
    ``z`` (``[..., nheads, headdim]``) is given, then ``sum_r mimo_o[r] * .`` when ``mimo_o`` is given (else the
    per-rank result). ``mimo_z``, ``mimo_o``: ``[nheads, R, headdim]``."""
    if z is not None:
        assert mimo_z is not None
        y_r = y_r * F.silu(z.unsqueeze(-3) * mimo_z.transpose(0, 1))
    if mimo_o is None:
        return y_r
    return (y_r * mimo_o.transpose(0, 1)).sum(-3)


def mamba3_mimo_step_ref(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z=None, mimo_o=None, D=None,
                         z=None, state: Mamba3States | None = None) -> tuple[torch.Tensor, Mamba3States]:
    """One token of the recurrence (module docstring), for decoding and for the scan below.

    Shapes without the time axis: ``q``, ``k`` ``[b, R, ngroups, dstate]``; ``v``, ``z`` ``[b, nheads, headdim]``;
    ``adt``, ``dt``, ``trap`` ``[b, nheads]``; ``angles`` ``[b, nheads, nangles]``; ``state`` the states before the
    token (zeros when None). Computes in its inputs' dtype as given (callers cast); returns ``(y, states after)``
    with ``y`` ``[b, nheads, headdim]``, or ``[b, R, nheads, headdim]`` without ``mimo_o``. Pure.
    """
    b, R, h = v.shape[0], q.shape[1], v.shape[1]
    if state is None:
        state = mimo_zero_states(b, R, h, v.shape[2], q.shape[-1], angles.shape[-1], v.dtype, v.device)
    theta = torch.remainder(state.angle + math.pi * torch.tanh(angles) * dt[..., None], TWO_PI)  # [b, h, s]
    qt = rotate_halves(_heads(q, h, 2) + q_bias.transpose(0, 1), theta[:, None])  # [b, R, h, n]
    kt = rotate_halves(_heads(k, h, 2) + k_bias.transpose(0, 1), theta[:, None])
    psi = mimo_x.transpose(0, 1)  # [R, h, p]
    vr, vr_prev = v[:, None] * psi, state.v[:, None] * psi  # [b, R, h, p]
    a, lam = torch.exp(adt), torch.sigmoid(trap)
    prev_w = (a * (1 - lam) * dt)[..., None, None]
    cur_w = (lam * dt)[..., None, None]
    S = (a[..., None, None] * state.ssm + prev_w * torch.einsum("brhp,brhn->bhpn", vr_prev, state.k)
         + cur_w * torch.einsum("brhp,brhn->bhpn", vr, kt))
    y_r = torch.einsum("bhpn,brhn->brhp", S, qt)
    if D is not None:
        y_r = y_r + D[:, None] * vr
    return mimo_output(y_r, mimo_z, mimo_o, z), Mamba3States(theta, S, kt, v)


def mamba3_mimo_scan_ref(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z=None, mimo_o=None, D=None,
                         z=None, initial_state: Mamba3States | None = None, reset: torch.Tensor | None = None,
                         return_final_state: bool = False):
    """Sequential Mamba-3 MIMO scan (the oracle); shapes and recurrence in the module docstring.

    Returns ``y`` in ``v.dtype`` (``[b, L, nheads, headdim]``, or ``[b, L, R, nheads, headdim]`` without
    ``mimo_o``), or ``(y, final_states)`` (compute dtype) when ``return_final_state``.
    """
    s = check_mimo_inputs(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z,
                          initial_state, reset)
    init = tuple(initial_state) if initial_state is not None else ()
    ct = compute_dtype(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, *init)
    c = [t.to(ct) for t in (q, k, v, adt, dt, trap, angles)]
    params = [None if t is None else t.to(ct) for t in (q_bias, k_bias, mimo_x, mimo_z, mimo_o, D)]
    zc = z.to(ct) if z is not None else None
    if initial_state is not None:
        state = Mamba3States(*(t.to(ct) for t in initial_state))
    else:
        state = mimo_zero_states(s.batch, s.rank, s.nheads, s.headdim, s.dstate, s.nangles, ct, v.device)
    ys = []
    for t in range(s.seqlen):
        if reset is not None:
            keep = (~reset[:, t]).to(ct)
            state = Mamba3States(*(x * keep.view(-1, *([1] * (x.dim() - 1))) for x in state))
        qb, kb, px, pz, po, Dc = params
        qt, kt, vt, adtt, dtt, trapt, angt = (x[:, t] for x in c)
        y, state = mamba3_mimo_step_ref(qt, kt, vt, adtt, dtt, trapt, qb, kb, angt, px, pz, po, Dc,
                                        zc[:, t] if zc is not None else None, state)
        ys.append(y)
    if ys:
        out = torch.stack(ys, dim=1)
    else:
        shape = (s.batch, 0, s.nheads, s.headdim) if mimo_o is not None else (s.batch, 0, s.rank, s.nheads, s.headdim)
        out = v.new_zeros(shape, dtype=ct)
    out = out.to(v.dtype)
    return (out, state) if return_final_state else out
