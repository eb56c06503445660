"""The public entry point :func:`selective_state_update`: one decoding step, state updated in place, on the
Triton kernel or the reference."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mamba_state.errors import StateError, StateShapeError

from .._launch import needs_grad
from ..backend import backend_name
from ..scan_inputs import match_groups
from .naive import selective_state_update_ref
from .ops import state_update  # noqa: F401  (registers torch.ops.mamba_state.state_update)

__all__ = ["selective_state_update"]

_HALF_OR_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def _check_step(state, x, dt, A, B, C, D, z, dt_bias, reset):
    if not isinstance(state, Tensor) or state.dim() not in (3, 4):
        raise StateShapeError(f"state: expected [batch, dim, dstate] or [batch, nheads, headdim, dstate], found "
                              f"{list(state.shape) if isinstance(state, Tensor) else type(state).__name__}")
    for name, t in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("dt_bias", dt_bias)):
        if t is not None and not t.is_floating_point():  # an int state would be truncated in place
            raise StateError(f"{name}: expected a floating dtype, found {t.dtype}")
    lead = list(state.shape[:-1])
    bsz, n = state.shape[0], state.shape[-1]
    for name, t in (("x", x), ("dt", dt), ("z", z)):
        if t is not None and list(t.shape) != lead:
            raise StateShapeError(f"{name}: expected {lead} (state's shape without dstate), found {list(t.shape)}")
    if list(A.shape) != list(state.shape[1:]):
        raise StateShapeError(f"A: expected {list(state.shape[1:])} (state {list(state.shape)} without its batch), "
                              f"found {list(A.shape)}: A and state disagree")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None and list(t.shape) != lead[1:]:
            raise StateShapeError(f"{name}: expected {lead[1:]} (from state {list(state.shape)}), found "
                                  f"{list(t.shape)}")
    heads = state.shape[1] if state.dim() == 4 else None
    for name, t in (("B", B), ("C", C)):
        ok = t.dim() in (2, 3) and t.shape[0] == bsz and t.shape[-1] == n
        if ok and t.dim() == 3:
            ok = (heads if heads is not None else state.shape[1]) % t.shape[1] == 0
        if not ok:
            raise StateShapeError(f"{name}: expected [batch, dstate] = {[bsz, n]} or [batch, ngroups, dstate] with "
                                  f"ngroups dividing the heads/channels (batch and dstate from state "
                                  f"{list(state.shape)}), found {list(t.shape)}")
    if reset is not None and (reset.dtype != torch.bool or list(reset.shape) != [bsz]):
        raise StateShapeError(f"reset: expected a bool tensor [batch] = {[bsz]} (batch from state), found "
                              f"{reset.dtype} {list(reset.shape)}")


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                           dt_softplus: bool = False, reset: Optional[Tensor] = None,
                           backend: Optional[str] = None) -> Tensor:
    """One decoding step, updating ``state`` in place (upstream ``selective_state_update`` semantics).

    Mamba-1 form: state [batch, dim, dstate]; x, dt, z [batch, dim]; A [dim, dstate]; B, C [batch, dstate] or
    [batch, ngroups, dstate]; D, dt_bias [dim]. Multi-head form: state [batch, nheads, headdim, dstate]; x, dt, z
    [batch, nheads, headdim]; A [nheads, headdim, dstate]; B, C [batch, ngroups, dstate]; D, dt_bias
    [nheads, headdim]. ``reset`` bool [batch] zeroes a row's state first. Returns out shaped like x, x.dtype.
    The state keeps its dtype; arithmetic is float32 (float64 for float64 inputs, on the reference path).
    The Triton kernel serves inference; a step that autograd records (an input requires grad and grad mode is
    on) runs the differentiable PyTorch reference, whatever the backend.
    """
    _check_step(state, x, dt, A, B, C, D, z, dt_bias, reset)
    which = backend_name(state.device, backend)
    # the Triton step kernel is inference-only: a step that autograd records takes the (differentiable) reference
    recorded = needs_grad(state, x, dt, A, B, C, D, z, dt_bias)
    if which == "reference" or recorded or state.dtype == torch.float64 or x.dtype == torch.float64:
        return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, reset)
    bsz, n = state.shape[0], state.shape[-1]
    flat = state.reshape(bsz, -1, n) if state.is_contiguous() else None
    work = flat if flat is not None else state.reshape(bsz, -1, n).contiguous()
    B3, C3 = match_groups(B if B.dim() == 3 else B.unsqueeze(1), C if C.dim() == 3 else C.unsqueeze(1))
    out = torch.ops.mamba_state.state_update(
        work, x.reshape(bsz, -1), dt.reshape(bsz, -1), A.reshape(-1, n), B3, C3,
        D.reshape(-1) if D is not None else None, z.reshape(bsz, -1) if z is not None else None,
        dt_bias.reshape(-1) if dt_bias is not None else None, reset, bool(dt_softplus))
    if flat is None:
        state.copy_(work.view_as(state))
    return out.reshape(x.shape)
