"""Packed variable-length sequences in the selective scan: per-sequence states, the per-step marks the Triton
kernels read, and states at positions given per sequence.

``num_seqs`` sequences are packed one after another along the time axis of a batch of one row; sequence ``s`` is
steps ``cu_seqlens[s]:cu_seqlens[s + 1]`` (checked by :func:`mamba_state.kernels.varlen.check_cu_seqlens`, shared
with the conv and SSD). States are indexed by sequence: ``initial_state`` and the final state are
``[num_seqs, dim, dstate]``.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence

import torch

from mamba_state.errors import StateError, StateShapeError

from .._host import to_device
from ..varlen import cu_seqlens_bounds

__all__ = ["seq_bounds", "check_varlen_state", "step_marks", "check_varlen_positions"]


def seq_bounds(cu_seqlens: Any, seqlen: int, batch: int) -> list[int]:
    """``cu_seqlens`` checked (:func:`~mamba_state.kernels.varlen.check_cu_seqlens`) and read as a host list."""
    return cu_seqlens_bounds(cu_seqlens, seqlen, batch)  # one device-to-host copy, for the check and the list


def check_varlen_state(state: Optional[torch.Tensor], num_seqs: int, dim: int, dstate: int,
                       name: str = "initial_state") -> None:
    """Raise :class:`~mamba_state.errors.StateShapeError` unless ``state`` is None or a floating tensor
    ``[num_seqs, dim, dstate]``."""
    if state is None:
        return
    if not isinstance(state, torch.Tensor) or list(state.shape) != [num_seqs, dim, dstate]:
        found = list(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
        raise StateShapeError(f"{name}: expected [num_seqs, dim, dstate] = {[num_seqs, dim, dstate]} (num_seqs "
                              f"{num_seqs} from cu_seqlens, dim from u, dstate from A), found {found}")
    if not state.is_floating_point():
        raise StateError(f"{name}: expected a floating dtype, found {state.dtype}")


def step_marks(bounds: Sequence[int], device: torch.device, multiple: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step marks of packed sequences: ``(starts, ends)``, int32, ``seqlen`` rounded up to ``multiple``.

    ``starts[t]`` is the sequence whose first step is ``t`` (else -1), ``ends[t]`` the sequence whose last step
    is ``t`` (else -1); empty sequences mark nothing. The padding past ``seqlen`` is -1, so a kernel walking whole
    tiles of ``multiple`` steps reads them without masks."""
    seqlen = bounds[-1]
    n = -(-seqlen // multiple) * multiple
    # both rows reach the device in one copy; n is a multiple of 8, so the second row stays 32-byte aligned
    marks = torch.full((2, n), -1, dtype=torch.int32)
    starts, ends = marks[0], marks[1]
    nonempty = [s for s in range(len(bounds) - 1) if bounds[s + 1] > bounds[s]]
    if nonempty:
        idx = torch.tensor(nonempty, dtype=torch.int32)
        starts[torch.tensor([bounds[s] for s in nonempty])] = idx
        ends[torch.tensor([bounds[s + 1] - 1 for s in nonempty])] = idx
    marks = to_device(marks, device)
    return marks[0], marks[1]


def check_varlen_positions(positions: Any, bounds: Sequence[int], name: str = "return_states_at") -> list[list[int]]:
    """States-at-positions of packed sequences, checked: one list per sequence of non-decreasing token counts
    within that sequence (``0``: its initial state; its length: its final state). Raises ``StateError``."""
    num_seqs = len(bounds) - 1
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence) or len(positions) != num_seqs:
        found = f"{len(positions)} entries" if isinstance(positions, Sequence) else type(positions).__name__
        raise StateError(f"{name}: with cu_seqlens, expected one list of positions per sequence ({num_seqs} "
                         f"lists), found {found}")
    out = []
    for s, ps in enumerate(positions):
        if isinstance(ps, torch.Tensor):
            if ps.dim() != 1 or ps.is_floating_point() or ps.dtype == torch.bool:
                raise StateError(f"{name}[{s}]: expected a 1-D integer tensor or a list of ints, found {ps.dtype} "
                                 f"{list(ps.shape)}")
            ps = ps.tolist()
        if isinstance(ps, (str, bytes)) or not hasattr(ps, "__iter__"):
            raise StateError(f"{name}[{s}]: expected a list of ints, found {type(ps).__name__}")
        items = list(ps)
        wrong = [p for p in items if isinstance(p, bool) or not isinstance(p, numbers.Integral)]
        if wrong:
            raise StateError(f"{name}[{s}]: expected ints, found {type(wrong[0]).__name__} {wrong[0]!r}")
        length = bounds[s + 1] - bounds[s]
        items = [int(p) for p in items]
        for p in items:
            if not 0 <= p <= length:
                raise StateError(f"{name}[{s}]: expected positions in [0, {length}] (token counts of sequence {s}), "
                                 f"found {p}")
        if any(b < a for a, b in zip(items, items[1:])):
            raise StateError(f"{name}[{s}]: expected non-decreasing positions, found {items}")
        out.append(items)
    return out
