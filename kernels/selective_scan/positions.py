"""States at chosen positions from one pass of the Triton scan (issue 19, item 6).

The packed-sequence machinery of the kernels (``VARLEN``: per-step marks, see
:mod:`mamba_state.kernels.selective_scan.packed`) stores the state after a marked step into row ``e`` of a buffer
of states, at address ``e * dim * dstate`` plus the program's own ``(row, channel, n)`` offset, and adds the
gradient of that row back into the adjoint at the same step. For states at positions of a batch the marks are
the same for every row, so a position's states for all rows are one block ``[batch, dim, dstate]``: mark ``k``
is written as ``k * batch``, and the buffer ``[K * batch, dim, dstate]`` is ``[K, batch, dim, dstate]``. Step 0
carries a start mark 0, so the kernels take the initial state there (row b at ``b * dim * dstate``) and the
backward stores its gradient there. No sequence ends anywhere else, no state is reset, and the scan runs once
over the whole row: the cost of K positions is K extra state stores (and K extra loads in the backward), not K
launches.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch import Tensor

from .._host import cached_host_tensor, cached_on_device, to_device
from .ops import ScanFn, forward_launches

__all__ = ["position_marks", "scan_states_at_one_pass", "packed_position_marks", "scan_packed_states_at_one_pass"]


def _marked_scan(args: tuple, starts: Tensor, ends: Tensor, nrows: int, differentiable: bool,
                 every_row_marked: bool = False,
                 final: bool = False) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(out, stored states [nrows, dim, dstate] float32, final states or None)`` of the kernels with the marks:
    through ScanFn when autograd is needed, else the forward launches directly (``every_row_marked``: every row
    has a step that stores it, so the buffer needs no zero fill; ``final``: the marks are those of states at
    positions, and the kernels also write each row's final state into a [batch, dim, dstate] tensor of its own,
    the third result; without autograd only, else None)."""
    u, delta, A, B4, C4, D, z, delta_bias, h0, reset, softplus, chunk = args
    full = (u, delta, A, B4, C4, D, z, delta_bias, h0, reset, bool(softplus), chunk)
    if differentiable:
        out, buf, _, _ = ScanFn.apply(*full, starts, ends, nrows)
        return out, buf, None
    fin = torch.empty(u.shape[0], u.shape[1], A.shape[1], device=u.device, dtype=torch.float32) if final else None
    out, buf, _, _ = forward_launches(*full, keep_ypre=False, seq_start=starts, seq_end=ends, nseq=nrows,
                                      zero_rows=not every_row_marked, final_out=fin)
    return out, buf, fin


def _initial(initial_state: Optional[Tensor], rows: int, dim: int, dstate: int, device: torch.device) -> Tensor:
    """The initial states as float32 [rows, dim, dstate] (zeros when None)."""
    if initial_state is not None:
        return initial_state.float()
    return torch.zeros(rows, dim, dstate, device=device, dtype=torch.float32)


def position_marks(stops: Sequence[int], seqlen: int, batch: int, device: torch.device,
                   multiple: int = 8) -> tuple[Tensor, Tensor]:
    """``(starts, ends)`` int32 marks, ``seqlen`` rounded up to ``multiple`` and padded with -1: ``starts[0] = 0``
    (the initial state enters there); ``ends[p - 1] = k * batch`` for the k-th of ``stops`` (distinct
    increasing token counts in ``[1, seqlen]``)."""
    def build() -> Tensor:
        n = -(-seqlen // multiple) * multiple
        marks = torch.full((2, n), -1, dtype=torch.int32)  # both rows reach the device in one copy
        if seqlen > 0:
            marks[0, 0] = 0
        if stops:
            marks[1, torch.tensor([p - 1 for p in stops])] = torch.arange(len(stops), dtype=torch.int32) * batch
        return marks

    # the same positions every call (a verify step's): the marks stay on the device
    marks = cached_on_device(("position_marks", tuple(stops), seqlen, batch, multiple), build, device)
    return marks[0], marks[1]


def scan_states_at_one_pass(u: Tensor, delta: Tensor, A: Tensor, B4: Tensor, C4: Tensor, D: Optional[Tensor],
                            z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
                            reset: Optional[Tensor], delta_softplus: bool, chunk: int, positions: Sequence[int],
                            differentiable: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton scan of ``u`` [batch, dim, L] (B4/C4 [batch, ngroups, dstate, L]) with the states after each
    of ``positions`` (non-decreasing token counts in [0, L], checked by the caller).

    Returns ``(out [batch, dim, L] in u.dtype, last [batch, dim, dstate] float32, states [len(positions), batch,
    dim, dstate] float32)``; differentiable in every input through ``ScanFn`` when ``differentiable``.
    """
    batch, dim, L = u.shape
    dstate = A.shape[1]
    stops, nz, index = _stops_of(tuple(positions), L)
    starts, ends = position_marks(stops, L, batch, u.device)
    nrows = max(1, len(stops)) * batch
    # every stop is marked at its step, and each row of a stop is written there (L > 0)
    out, buf, fin = _marked_scan((u, delta, A, B4, C4, D, z, delta_bias, initial_state, reset, delta_softplus,
                                  chunk), starts, ends, nrows, differentiable, every_row_marked=L > 0, final=L > 0)
    if L == 0:
        # no step ran: every state is the initial state (copies: never the caller's own tensor)
        h0 = _initial(initial_state, batch, dim, dstate, u.device)
        return out, h0.clone(), h0.unsqueeze(0).repeat(len(positions), 1, 1, 1)
    by_stop = buf.view(len(stops), batch, dim, dstate)
    # the final state never shares memory with the states returned beside it: the kernels wrote it apart
    # (inference), or it is a copy of its row (autograd records the copy)
    last = fin if fin is not None else by_stop[-1].clone()
    # a trace asks for thousands of states: they come as one view or one gather, never a view per position
    picked = by_stop if index is None else by_stop.index_select(0, cached_host_tensor(index, torch.long, u.device))
    if nz == 0:
        return out, last, picked
    h0 = _initial(initial_state, batch, dim, dstate, u.device)
    states = torch.cat([h0.unsqueeze(0).expand(nz, batch, dim, dstate), picked])
    return out, last, states


@functools.lru_cache(maxsize=256)
def _stops_of(positions: tuple[int, ...], L: int) -> tuple[tuple[int, ...], int, Optional[tuple[int, ...]]]:
    """What a call with these (checked, non-decreasing) ``positions`` stores and returns, worked out once per
    distinct call (a verify step repeats its positions every step, in every layer): ``(stops, nz, index)``, the
    distinct positive positions and ``L`` in order (one stored row block each), the number of leading zeros
    (the initial state), and the stored row of each later position, or None when they are the stops themselves
    (traces, distinct positions ending at ``L``: the stored rows are returned as they are)."""
    stops = tuple(sorted({p for p in positions if p > 0} | {L})) if L > 0 else ()
    nz = next((i for i, p in enumerate(positions) if p != 0), len(positions))
    rest = positions[nz:]
    if rest == stops:
        return stops, nz, None
    row = {p: k for k, p in enumerate(stops)}
    return stops, nz, tuple(row[p] for p in rest)


def packed_position_marks(bounds: Sequence[int], positions: Sequence[Sequence[int]], device: torch.device,
                          multiple: int = 8) -> tuple[Tensor, Tensor, list[list[int]]]:
    """Marks of packed sequences (``bounds``: cu_seqlens as a list) with states at ``positions`` (one list of
    token counts per sequence): ``(starts, ends, rows)``. Row s of the stored states is sequence s's final state
    (marked at its last step, as :func:`~.packed.step_marks` does); each distinct interior position
    ``0 < p < length`` of sequence s gets a row of its own after those, marked at step ``bounds[s] + p - 1``
    (never a sequence's last step, so no step carries two marks). ``rows[s][i]`` is the row of
    ``positions[s][i]``: -1 for p = 0 (the sequence's initial state), s for its length."""
    nseq = len(bounds) - 1
    n = -(-bounds[-1] // multiple) * multiple
    marks = torch.full((2, n), -1, dtype=torch.int32)  # both rows reach the device in one copy
    starts, ends = marks[0], marks[1]
    rows: list[list[int]] = []
    extra = nseq
    for s in range(nseq):
        a, b = bounds[s], bounds[s + 1]
        if b > a:
            starts[a] = s
            ends[b - 1] = s
        inner: dict[int, int] = {}
        mine = []
        for p in positions[s]:
            if p == 0:
                mine.append(-1)
            elif p == b - a:
                mine.append(s)
            else:
                if p not in inner:
                    inner[p] = extra
                    ends[a + p - 1] = extra
                    extra += 1
                mine.append(inner[p])
        rows.append(mine)
    marks = to_device(marks, device)
    return marks[0], marks[1], rows


def scan_packed_states_at_one_pass(u: Tensor, delta: Tensor, A: Tensor, B4: Tensor, C4: Tensor, D: Optional[Tensor],
                                   z: Optional[Tensor], delta_bias: Optional[Tensor],
                                   initial_state: Optional[Tensor], reset: Optional[Tensor], delta_softplus: bool,
                                   chunk: int, bounds: Sequence[int], positions: Sequence[Sequence[int]],
                                   differentiable: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The Triton scan of packed sequences (batch 1; ``bounds`` cu_seqlens as a list, ``initial_state``
    [num_seqs, dim, dstate] or None) with each sequence's states at its ``positions`` (checked by the caller),
    in one pass: ``(out [1, dim, L], last [num_seqs, dim, dstate] float32, states)``, ``states[s]``
    [len(positions[s]), dim, dstate] float32. An empty sequence's final state is its initial state."""
    dim, dstate = u.shape[1], A.shape[1]
    nseq = len(bounds) - 1
    starts, ends, rows = packed_position_marks(bounds, positions, u.device)
    nrows = max(nseq + len({r for rs in rows for r in rs if r >= nseq}), 1)
    out, buf, _ = _marked_scan((u, delta, A, B4, C4, D, z, delta_bias, initial_state, reset, delta_softplus,
                                chunk), starts, ends, nrows, differentiable)
    h0 = _initial(initial_state, nseq, dim, dstate, u.device)
    empty = [s for s in range(nseq) if bounds[s] == bounds[s + 1]]
    last = buf[:nseq]
    if empty:  # no step of theirs ran: their final state is their initial state
        mask = torch.zeros(nseq, 1, 1, dtype=torch.bool)
        mask[empty] = True
        last = torch.where(to_device(mask, u.device), h0, last)
    states = []
    for s, rs in enumerate(rows):
        picked = [h0[s] if r < 0 else last[s] if r == s else buf[r] for r in rs]
        states.append(torch.stack(picked) if picked else h0.new_zeros(0, dim, dstate))
    return out, last, states
