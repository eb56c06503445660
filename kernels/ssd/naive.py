"""Pure-PyTorch SSD (Mamba-2 state space duality) scans with an initial state, a final state and resets.

Shapes follow upstream's ``mamba_chunk_scan_combined``:

* ``x``: ``[batch, seqlen, nheads, headdim]``
* ``dt``: ``[batch, seqlen, nheads]`` (raw; ``dt_bias``, ``dt_softplus`` and ``dt_limit`` are applied here)
* ``A``: ``[nheads]`` (real, normally negative: ``-exp(A_log)``)
* ``B``, ``C``: ``[batch, seqlen, ngroups, dstate]`` (head ``h`` reads group ``h // (nheads // ngroups)``)
* ``D``: ``[nheads]`` or ``[nheads, headdim]``; ``z``: like ``x``; ``dt_bias``: ``[nheads]``
* ``initial_state``: ``[batch, nheads, headdim, dstate]``; ``reset``: bool ``[batch, seqlen]``

Recurrence, per batch row, head ``h``, head channel ``p`` and state ``n``::

    dt_t  = clamp(softplus(dt_t + dt_bias) if dt_softplus else dt_t + dt_bias, *dt_limit)
    S_t   = exp(dt_t * A[h]) * (0 if reset[t] else S_{t-1}) + dt_t * x_t[p] * B_t[n]
    y_t   = sum_n C_t[n] * S_t[p, n]  (+ D * x_t)  (* silu(z_t))

with ``S_{-1} = initial_state`` (zeros when absent). A reset at ``t`` makes the row start afresh at ``t``.
Arithmetic runs in float32 for half and float32 inputs, float64 when any input is float64; ``y`` has ``x``'s
dtype and the final state the compute dtype. Both functions are differentiable by autograd in every input.

This module holds the input checks and the sequential oracle, :func:`ssd_scan_ref` (one step at a time); the
fast CPU path is :func:`~mamba_state.kernels.ssd.chunked.ssd_scan_chunked`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from mamba_state.errors import StateError, StateShapeError

from ..scan_inputs import compute_dtype

__all__ = ["ssd_scan_ref", "check_ssd_inputs", "check_packed_states", "SSDShape"]

_NO_LIMIT = (0.0, float("inf"))


class SSDShape(NamedTuple):
    batch: int
    seqlen: int
    nheads: int
    headdim: int
    ngroups: int
    dstate: int


def _desc(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{list(t.shape)} {t.dtype}"
    return type(t).__name__


def check_ssd_inputs(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_state=None, reset=None) -> SSDShape:
    """Validate shapes, dtypes and devices; returns the sizes. Raises ``StateShapeError`` / ``StateError``."""
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise StateError(f"{name}: expected a floating torch.Tensor, found {_desc(t)}")
    if x.dim() != 4:
        raise StateShapeError(f"x: expected [batch, seqlen, nheads, headdim], found {_desc(x)}")
    b, L, h, p = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, L):
        raise StateShapeError(f"B: expected [{b}, {L}, ngroups, dstate], found {_desc(B)}")
    g, n = B.shape[2], B.shape[3]
    if g < 1 or h % g != 0:
        raise StateShapeError(f"B: expected ngroups dividing nheads={h}, found ngroups={g}")
    expected = {
        "dt": (dt, [b, L, h]), "A": (A, [h]), "C": (C, [b, L, g, n]),
    }
    for name, (t, shape) in expected.items():
        if list(t.shape) != shape:
            raise StateShapeError(f"{name}: expected shape {shape}, found {_desc(t)}")
    if D is not None and list(D.shape) not in ([h], [h, p]):
        raise StateShapeError(f"D: expected shape [{h}] or [{h}, {p}], found {_desc(D)}")
    if z is not None and z.shape != x.shape:
        raise StateShapeError(f"z: expected shape {list(x.shape)} (like x), found {_desc(z)}")
    if dt_bias is not None and list(dt_bias.shape) != [h]:
        raise StateShapeError(f"dt_bias: expected shape [{h}], found {_desc(dt_bias)}")
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or list(initial_state.shape) != [b, h, p, n]:
            raise StateShapeError(f"initial_state: expected shape {[b, h, p, n]}, found {_desc(initial_state)}")
    if reset is not None:
        if not isinstance(reset, torch.Tensor) or reset.dtype != torch.bool or list(reset.shape) != [b, L]:
            raise StateShapeError(f"reset: expected a bool tensor of shape {[b, L]}, found {_desc(reset)}")
    for name, t in (("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("dt_bias", dt_bias),
                    ("initial_state", initial_state), ("reset", reset)):
        if t is not None and t.device != x.device:
            raise StateError(f"{name}: expected device {x.device} (x's), found {t.device}")
    return SSDShape(b, L, h, p, g, n)


def _prep_dt(dt, dt_bias, dt_softplus, dt_limit, ct):
    dt = dt.to(ct)
    if dt_bias is not None:
        dt = dt + dt_bias.to(ct)
    if dt_softplus:
        dt = F.softplus(dt)
    lo, hi = dt_limit
    if (lo, hi) != _NO_LIMIT:
        dt = dt.clamp(min=lo, max=hi)
    return dt


def _heads(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """[b, L, g, n] -> [b, L, nheads, n]: each group serves nheads // g consecutive heads."""
    g = t.shape[2]
    return t if g == nheads else t.repeat_interleave(nheads // g, dim=2)


def _finish(y, x, D, z, ct, out_dtype):
    if D is not None:
        Dc = D.to(ct)
        y = y + x.to(ct) * (Dc[:, None] if Dc.dim() == 1 else Dc)
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(out_dtype)


def ssd_scan_ref(x, dt, A, B, C, D=None, z=None, initial_state=None, reset=None, dt_bias=None,
                 dt_softplus=False, dt_limit=_NO_LIMIT, return_final_state=False, cu_seqlens=None):
    """Sequential SSD scan (the oracle); see the module docstring for shapes and the recurrence.

    Returns ``y`` ``[batch, seqlen, nheads, headdim]`` in ``x.dtype``, or ``(y, final_state)`` with
    ``final_state`` ``[batch, nheads, headdim, dstate]`` in the compute dtype when ``return_final_state``.

    ``cu_seqlens`` (int32/int64 ``[num_seqs + 1]``): packed sequences in a batch of 1, ``initial_state`` and the
    final state ``[num_seqs, nheads, headdim, dstate]``; the oracle runs each sequence alone, one after another
    (an empty sequence returns its initial state).
    """
    if cu_seqlens is not None:
        return _ref_by_sequence(x, dt, A, B, C, D, z, initial_state, reset, dt_bias, dt_softplus, dt_limit,
                                return_final_state, cu_seqlens)
    s = check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state, reset)
    ct = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_state)
    dtc = _prep_dt(dt, dt_bias, dt_softplus, dt_limit, ct)  # [b, L, h]
    Bh, Ch = _heads(B.to(ct), s.nheads), _heads(C.to(ct), s.nheads)  # [b, L, h, n]
    xc = x.to(ct)
    Ac = A.to(ct)
    state = (initial_state.to(ct) if initial_state is not None
             else torch.zeros(s.batch, s.nheads, s.headdim, s.dstate, dtype=ct, device=x.device))
    ys = []
    for t in range(s.seqlen):
        decay = torch.exp(dtc[:, t] * Ac)  # [b, h]
        if reset is not None:
            decay = decay * (~reset[:, t]).to(ct)[:, None]
        inp = (dtc[:, t, :, None] * xc[:, t])[..., None] * Bh[:, t, :, None, :]  # [b, h, p, n]
        state = decay[:, :, None, None] * state + inp
        ys.append((state * Ch[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if ys else xc.new_zeros(xc.shape)
    y = _finish(y, x, D, z, ct, x.dtype)
    return (y, state) if return_final_state else y


def _ref_by_sequence(x, dt, A, B, C, D, z, initial_state, reset, dt_bias, dt_softplus, dt_limit, return_final_state,
                     cu_seqlens):
    """The packed form by its definition: :func:`ssd_scan_ref` on every sequence from its own initial state."""
    from ..varlen import check_cu_seqlens

    s = check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, None, reset)
    n = check_cu_seqlens(cu_seqlens, s.seqlen, s.batch)
    check_packed_states(initial_state, n, s.nheads, s.headdim, s.dstate)
    ct = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_state)
    bounds = [int(v) for v in cu_seqlens.tolist()]
    ys, finals = [], []
    for i in range(n):
        a, b = bounds[i], bounds[i + 1]
        h0 = (initial_state[i:i + 1].to(ct) if initial_state is not None
              else torch.zeros(1, s.nheads, s.headdim, s.dstate, dtype=ct, device=x.device))
        if a == b:
            finals.append(h0)
            continue
        y, h = ssd_scan_ref(x[:, a:b], dt[:, a:b], A, B[:, a:b], C[:, a:b], D, None if z is None else z[:, a:b],
                            h0, None if reset is None else reset[:, a:b], dt_bias, dt_softplus, dt_limit, True)
        ys.append(y)
        finals.append(h)
    y = torch.cat(ys, dim=1) if ys else x.new_zeros(x.shape)
    final = torch.cat(finals, dim=0)
    return (y, final) if return_final_state else y


def check_packed_states(initial_state: Any, num_seqs: int, nheads: int, headdim: int, dstate: int,
                        name: str = "initial_state") -> None:
    """Raise :class:`StateShapeError` unless ``initial_state`` is None or [num_seqs, nheads, headdim, dstate]."""
    shape = [num_seqs, nheads, headdim, dstate]
    if initial_state is not None and (not isinstance(initial_state, torch.Tensor) or list(initial_state.shape) != shape):
        found = list(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
        raise StateShapeError(f"{name}: expected one state per packed sequence, [num_seqs, nheads, headdim, "
                              f"dstate] = {shape}, found {found}")
