"""Pure-PyTorch Mamba-3 (SISO) scan with an initial state, a final state and per-step resets: the sequential oracle.

The inputs are those of upstream's fused ``mamba3_siso_combined`` (``mamba_ssm/ops/triton/mamba3``), after the
layer's projections and the RMSNorms of B and C, but with time before heads for the per-head scalars:

* ``q``, ``k``: ``[batch, seqlen, ngroups, dstate]`` (C and B of the paper; head ``h`` reads group
  ``h // (nheads // ngroups)``)
* ``v``: ``[batch, seqlen, nheads, headdim]`` (x)
* ``adt``, ``dt``: ``[batch, seqlen, nheads]``: ``A * dt`` (negative) and the positive step ``dt`` (softplus applied)
* ``trap``: ``[batch, seqlen, nheads]``, the trapezoid's mixing logit (``sigmoid`` applied here, as upstream does)
* ``q_bias``, ``k_bias``: ``[nheads, dstate]``
* ``angles``: ``[batch, seqlen, nheads, nangles]`` raw rotary rates (``tanh(.) * pi`` applied here), ``nangles <=
  dstate // 2``; pair ``i`` of the state dimensions, ``(2i, 2i+1)``, turns by angle ``i``; the others do not turn
* ``D``: ``[nheads]`` or None; ``z``: like ``v`` or None (gate ``silu(z)``)
* ``initial_state``: :class:`Mamba3States` ``(angle [b, h, nangles], ssm [b, h, headdim, dstate], k [b, h, dstate],
  v [b, h, headdim])`` or None (zeros); ``reset``: bool ``[batch, seqlen]``, True = all four cleared before step t

Recurrence, per batch row and head (``theta``: the angle state; ``k_prev``, ``v_prev``: the previous token's
rotated key and value, which the trapezoid needs; ``R(theta)``: the pairwise rotation)::

    dt_t, a_t = dt[t], exp(adt[t]);  lam_t = sigmoid(trap[t])
    theta_t = (theta_{t-1} + pi * tanh(angles[t]) * dt_t) mod 2 pi
    q_t = R(theta_t) (q[t] + q_bias);   k_t = R(theta_t) (k[t] + k_bias)
    S_t = a_t S_{t-1} + a_t (1 - lam_t) dt_t v_prev k_prev^T + lam_t dt_t v_t k_t^T    # [headdim, dstate]
    y_t = S_t q_t + D v_t   (* silu(z_t))
    k_prev, v_prev = k_t, v_t

This is the trapezoidal rule between the previous token's input (weight ``1 - lam``, carried through one decay)
and this token's (weight ``lam``). The carried state is ``(theta, S, k_prev, v_prev)``: exactly upstream's
``(angle_dt_state, ssm_state, k_state, v_state)``. A reset at ``t`` makes the row start afresh at ``t``.

Arithmetic runs in float32 for half and float32 inputs, float64 when any input is float64; ``y`` has ``v``'s dtype
and the final states the compute dtype. Differentiable by autograd in every floating input, the initial state
included. :func:`mamba3_step_ref` is one step of the same recurrence; the fast CPU path is
:func:`~mamba_state.kernels.mamba3.chunked.mamba3_scan_chunked`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mamba_state.errors import StateError, StateShapeError

from ..scan_inputs import compute_dtype

__all__ = ["Mamba3States", "Mamba3Shape", "check_mamba3_inputs", "mamba3_scan_ref", "mamba3_step_ref",
           "rotate_pairs", "zero_states"]

TWO_PI = 2.0 * math.pi


class Mamba3States(NamedTuple):
    """The four tensors a Mamba-3 SISO layer carries between tokens (batch first)."""

    angle: torch.Tensor  # [b, nheads, nangles]: accumulated rotary angle, in [0, 2 pi)
    ssm: torch.Tensor  # [b, nheads, headdim, dstate]
    k: torch.Tensor  # [b, nheads, dstate]: the last token's key, bias added and rotated
    v: torch.Tensor  # [b, nheads, headdim]: the last token's value


class Mamba3Shape(NamedTuple):
    batch: int
    seqlen: int
    nheads: int
    headdim: int
    ngroups: int
    dstate: int
    nangles: int


def _desc(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{list(t.shape)} {t.dtype} on {t.device}"
    return type(t).__name__


def check_mamba3_inputs(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D=None, z=None, initial_state=None,
                        reset=None) -> Mamba3Shape:
    """Validate shapes, dtypes and devices (see the module docstring); returns the sizes.

    Raises ``StateShapeError`` for a wrong shape and ``StateError`` for a wrong type or device.
    """
    named = (("q", q), ("k", k), ("v", v), ("adt", adt), ("dt", dt), ("trap", trap), ("q_bias", q_bias),
             ("k_bias", k_bias), ("angles", angles))
    for name, t in named:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise StateError(f"{name}: expected a floating torch.Tensor, found {_desc(t)}")
    if v.dim() != 4:
        raise StateShapeError(f"v: expected [batch, seqlen, nheads, headdim], found {_desc(v)}")
    b, L, h, p = v.shape
    if q.dim() != 4 or q.shape[:2] != (b, L):
        raise StateShapeError(f"q: expected [{b}, {L}, ngroups, dstate], found {_desc(q)}")
    g, n = q.shape[2], q.shape[3]
    if g < 1 or h % g != 0:
        raise StateShapeError(f"q: expected ngroups dividing nheads={h}, found ngroups={g}")
    if angles.dim() != 4 or list(angles.shape[:3]) != [b, L, h]:
        raise StateShapeError(f"angles: expected [{b}, {L}, {h}, nangles], found {_desc(angles)}")
    s = angles.shape[3]
    if not 0 < s <= n // 2:
        raise StateShapeError(f"angles: expected 1 <= nangles <= dstate // 2 = {n // 2}, found {s}")
    expected = {"k": (k, [b, L, g, n]), "adt": (adt, [b, L, h]), "dt": (dt, [b, L, h]), "trap": (trap, [b, L, h]),
                "q_bias": (q_bias, [h, n]), "k_bias": (k_bias, [h, n])}
    for name, (t, shape) in expected.items():
        if list(t.shape) != shape:
            raise StateShapeError(f"{name}: expected shape {shape}, found {_desc(t)}")
    if D is not None and (not isinstance(D, torch.Tensor) or list(D.shape) != [h]):
        raise StateShapeError(f"D: expected shape [{h}], found {_desc(D)}")
    if z is not None and (not isinstance(z, torch.Tensor) or z.shape != v.shape):
        raise StateShapeError(f"z: expected shape {list(v.shape)} (like v), found {_desc(z)}")
    extra: list[tuple[str, object]] = [("D", D), ("z", z), ("reset", reset)]
    if initial_state is not None:
        if not isinstance(initial_state, tuple) or len(initial_state) != 4:
            raise StateError(f"initial_state: expected Mamba3States(angle, ssm, k, v) or None, found "
                             f"{_desc(initial_state)}")
        want = {"angle": [b, h, s], "ssm": [b, h, p, n], "k": [b, h, n], "v": [b, h, p]}
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
    return Mamba3Shape(b, L, h, p, g, n, s)


def zero_states(batch: int, nheads: int, headdim: int, dstate: int, nangles: int, dtype: torch.dtype,
                device: torch.device | str) -> Mamba3States:
    """Zero :class:`Mamba3States` (the state before a fresh sequence)."""
    return Mamba3States(torch.zeros(batch, nheads, nangles, dtype=dtype, device=device),
                        torch.zeros(batch, nheads, headdim, dstate, dtype=dtype, device=device),
                        torch.zeros(batch, nheads, dstate, dtype=dtype, device=device),
                        torch.zeros(batch, nheads, headdim, dtype=dtype, device=device))


def rotate_pairs(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Turn each pair ``(x[..., 2i], x[..., 2i+1])`` by ``theta[..., i]`` for ``i < theta.shape[-1]``.

    ``x``: ``[..., dstate]``; ``theta``: ``[..., nangles]`` (same leading shape), ``2 * nangles <= dstate``. The
    dimensions past ``2 * nangles`` pass through unchanged.
    """
    s = theta.shape[-1]
    rot, rest = x[..., :2 * s], x[..., 2 * s:]
    pairs = rot.reshape(*rot.shape[:-1], s, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, si = torch.cos(theta), torch.sin(theta)
    turned = torch.stack([x0 * c - x1 * si, x0 * si + x1 * c], dim=-1).reshape(rot.shape)
    return torch.cat([turned, rest], dim=-1) if rest.shape[-1] else turned


def _heads(t: torch.Tensor, nheads: int, dim: int) -> torch.Tensor:
    """Groups -> heads along ``dim``: each group serves ``nheads // ngroups`` consecutive heads."""
    g = t.shape[dim]
    return t if g == nheads else t.repeat_interleave(nheads // g, dim=dim)


def mamba3_step_ref(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D=None, z=None,
                    state: Mamba3States | None = None) -> tuple[torch.Tensor, Mamba3States]:
    """One token of the recurrence (the module docstring's loop body), for decoding and for the scan below.

    Shapes without the time axis: ``q``, ``k`` ``[b, ngroups, dstate]``; ``v``, ``z`` ``[b, nheads, headdim]``;
    ``adt``, ``dt``, ``trap`` ``[b, nheads]``; ``angles`` ``[b, nheads, nangles]``; ``state`` the states before
    the token (zeros when None). Computes in the dtype of its inputs as given (callers cast); returns
    ``(y [b, nheads, headdim], states after the token)``. Pure: nothing is modified in place.
    """
    h = v.shape[1]
    if state is None:
        state = zero_states(v.shape[0], h, v.shape[2], q.shape[-1], angles.shape[-1], v.dtype, v.device)
    theta = torch.remainder(state.angle + math.pi * torch.tanh(angles) * dt[..., None], TWO_PI)
    qt = rotate_pairs(_heads(q, h, 1) + q_bias, theta)  # [b, h, n]
    kt = rotate_pairs(_heads(k, h, 1) + k_bias, theta)
    a = torch.exp(adt)  # [b, h]
    lam = torch.sigmoid(trap)
    prev_w = (a * (1 - lam) * dt)[..., None, None]
    cur_w = (lam * dt)[..., None, None]
    S = (a[..., None, None] * state.ssm + prev_w * state.v[..., :, None] * state.k[..., None, :]
         + cur_w * v[..., :, None] * kt[..., None, :])
    y = (S * qt[..., None, :]).sum(-1)
    if D is not None:
        y = y + D[:, None] * v
    if z is not None:
        y = y * F.silu(z)
    return y, Mamba3States(theta, S, kt, v)


def mamba3_scan_ref(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D=None, z=None,
                    initial_state: Mamba3States | None = None, reset: torch.Tensor | None = None,
                    return_final_state: bool = False):
    """Sequential Mamba-3 SISO scan (the oracle); see the module docstring for shapes and the recurrence.

    Returns ``y`` ``[batch, seqlen, nheads, headdim]`` in ``v.dtype``, or ``(y, final_states)`` with
    ``final_states`` a :class:`Mamba3States` in the compute dtype when ``return_final_state``.
    """
    s = check_mamba3_inputs(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, initial_state, reset)
    init = tuple(initial_state) if initial_state is not None else ()
    ct = compute_dtype(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, *init)
    c = [t.to(ct) for t in (q, k, v, adt, dt, trap, angles)]
    qb, kb = q_bias.to(ct), k_bias.to(ct)
    Dc = D.to(ct) if D is not None else None
    zc = z.to(ct) if z is not None else None
    if initial_state is not None:
        state = Mamba3States(*(t.to(ct) for t in initial_state))
    else:
        state = zero_states(s.batch, s.nheads, s.headdim, s.dstate, s.nangles, ct, v.device)
    ys = []
    for t in range(s.seqlen):
        if reset is not None:
            keep = ~reset[:, t]
            state = Mamba3States(*(x * keep.view(-1, *([1] * (x.dim() - 1))).to(ct) for x in state))
        qt, kt, vt, adtt, dtt, trapt, angt = (x[:, t] for x in c)
        y, state = mamba3_step_ref(qt, kt, vt, adtt, dtt, trapt, qb, kb, angt, Dc,
                                   zc[:, t] if zc is not None else None, state)
        ys.append(y)
    out = torch.stack(ys, dim=1) if ys else v.new_zeros(v.shape, dtype=ct)
    out = out.to(v.dtype)
    return (out, state) if return_final_state else out
