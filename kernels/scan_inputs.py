"""Validation of selective-scan arguments, shared by the references and the Triton kernels.

Shapes (upstream ``selective_scan_fn`` plus our additions):
    u, delta, z:    [batch, dim, seqlen]
    A:              [dim, dstate], real
    B, C:           [batch, dstate, seqlen] or [batch, ngroups, dstate, seqlen] (dim divisible by ngroups),
                    or [dim, dstate] (constant over time, as upstream allows)
    D, delta_bias:  [dim]
    initial_state:  [batch, dim, dstate]
    reset:          bool [batch, seqlen]; True zeroes the state just before step t
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mamba_state.errors import StateError, StateShapeError

__all__ = ["ScanShape", "check_scan_inputs", "compute_dtype", "with_groups", "match_groups"]


@dataclass(frozen=True)
class ScanShape:
    batch: int
    dim: int
    seqlen: int
    dstate: int
    ngroups_B: int  # 0 when B is constant [dim, dstate]
    ngroups_C: int


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _check_bc(name: str, t: torch.Tensor, batch: int, dim: int, seqlen: int, dstate: int) -> int:
    # every expected size is named with its source, so a mismatch with A (dstate) does not read as B's own fault
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise StateError(f"{name}: expected a floating tensor, found "
                         f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
    if t.dim() == 2:
        if _shape(t) != [dim, dstate]:
            raise StateShapeError(f"{name}: expected [dim, dstate] = {[dim, dstate]} (dim {dim} from u, dstate "
                                  f"{dstate} from A), found {_shape(t)}")
        return 0
    if t.dim() == 3:
        if _shape(t) != [batch, dstate, seqlen]:
            raise StateShapeError(f"{name}: expected [batch, dstate, seqlen] = {[batch, dstate, seqlen]} (batch "
                                  f"{batch} and seqlen {seqlen} from u, dstate {dstate} from A), found {_shape(t)}")
        return 1
    if t.dim() == 4:
        g = t.shape[1]
        if _shape(t) != [batch, g, dstate, seqlen] or g < 1 or dim % g != 0:
            raise StateShapeError(
                f"{name}: expected [batch, ngroups, dstate, seqlen] = {[batch, 'g', dstate, seqlen]} with dim {dim} "
                f"divisible by ngroups (batch, dim and seqlen from u, dstate {dstate} from A), found {_shape(t)}"
            )
        return g
    raise StateShapeError(f"{name}: expected rank 2, 3 or 4, found shape {_shape(t)}")


def check_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None, reset=None) -> ScanShape:
    """Validate every argument of a selective scan; raise ``StateShapeError``/``StateError`` naming the problem."""
    for name, t in (("u", u), ("delta", delta), ("A", A)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise StateError(f"{name}: expected a floating tensor, found "
                             f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if u.dim() != 3:
        raise StateShapeError(f"u: expected [batch, dim, seqlen], found {_shape(u)}")
    batch, dim, seqlen = u.shape
    if seqlen < 1:
        raise StateShapeError(f"u: expected seqlen >= 1, found {_shape(u)}")
    if _shape(delta) != [batch, dim, seqlen]:
        raise StateShapeError(f"delta: expected {[batch, dim, seqlen]} like u, found {_shape(delta)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise StateShapeError(f"A: expected [dim, dstate] with dim {dim}, found {_shape(A)}")
    if A.is_complex():
        raise StateError("A: expected a real tensor, found a complex one")
    dstate = A.shape[1]
    gB = _check_bc("B", B, batch, dim, seqlen, dstate)
    gC = _check_bc("C", C, batch, dim, seqlen, dstate)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and (not isinstance(t, torch.Tensor) or _shape(t) != [dim]):
            raise StateShapeError(f"{name}: expected [dim] = {[dim]}, found "
                                  f"{_shape(t) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if z is not None and (not isinstance(z, torch.Tensor) or _shape(z) != [batch, dim, seqlen]):
        raise StateShapeError(f"z: expected {[batch, dim, seqlen]} like u, found "
                              f"{_shape(z) if isinstance(z, torch.Tensor) else type(z).__name__}")
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or _shape(initial_state) != [batch, dim, dstate]:
            raise StateShapeError(
                f"initial_state: expected [batch, dim, dstate] = {[batch, dim, dstate]} (batch and dim from u, "
                f"dstate {dstate} from A), found "
                f"{_shape(initial_state) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__}"
            )
        if not initial_state.is_floating_point():
            raise StateError(f"initial_state: expected a floating dtype, found {initial_state.dtype}")
    if reset is not None:
        if not isinstance(reset, torch.Tensor) or reset.dtype != torch.bool or _shape(reset) != [batch, seqlen]:
            raise StateShapeError(
                f"reset: expected a bool tensor [batch, seqlen] = {[batch, seqlen]}, found "
                + (f"{reset.dtype} {_shape(reset)}" if isinstance(reset, torch.Tensor) else type(reset).__name__)
            )
    devices = {t.device for t in (u, delta, A, B, C, D, z, delta_bias, initial_state, reset) if t is not None}
    if len(devices) != 1:
        raise StateError(f"device: expected every tensor on one device, found {sorted(map(str, devices))}")
    return ScanShape(batch, dim, seqlen, dstate, gB, gC)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in float32, as upstream does)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def with_groups(t: torch.Tensor, groups: int) -> torch.Tensor:
    """B or C with its group axis (axis 1) widened to ``groups`` (a multiple of its own count): group j of the
    result is group ``j // (groups // k)`` of t. One group becomes a stride-0 view (no copy); more are repeated."""
    k = t.shape[1]
    if k == groups:
        return t
    if k == 1:
        return t.expand(t.shape[0], groups, *t.shape[2:])
    return t.repeat_interleave(groups // k, dim=1)


def match_groups(B: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B and C (group axis 1) with one group count, the least common multiple of theirs (it divides dim, since
    both counts do): the Triton kernels read both with one group index per channel block. Channel c reads group
    ``c // (dim // g)`` of each, so widening by repetition keeps every channel's B and C as they were."""
    gb, gc = B.shape[1], C.shape[1]
    if gb == gc:
        return B, C
    g = gb * gc // math.gcd(gb, gc)
    return with_groups(B, g), with_groups(C, g)
