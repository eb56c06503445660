"""Packed prefill for the engine: the prompts of several requests in one forward (``cu_seqlens``, issue 18).

The requests admitted in one engine step are laid end to end and cut into forwards of at most
``prefill_chunk_size`` tokens (:func:`plan_forwards`); in each forward every request's piece continues from its
own state row (the row the previous piece left, or the state its cached prefix or session gave it), so every
request computes what it would alone. This module plans (pure Python over lengths and positions), finds out
what the model can run packed (:func:`packed_capabilities`, by asking it) and moves state rows; the engine runs
the forwards.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import StateError
from ..state import MambaModelState

__all__ = ["Piece", "plan_forwards", "cache_positions", "first_insert", "serves_prefix", "packed_capabilities",
           "rows_view", "RowViews", "write_rows"]


@dataclass(frozen=True)
class Piece:
    """Tokens ``lo:hi`` of the feed of the group's sequence ``seq``, inside one packed forward."""

    seq: int
    lo: int
    hi: int


def plan_forwards(lengths: Sequence[int], chunk: int) -> list[list[Piece]]:
    """The packed forwards for feeds of ``lengths`` tokens: laid end to end and cut every ``chunk`` tokens.

    Every forward holds at most ``chunk`` tokens and its pieces belong to consecutive sequences; a feed longer
    than the room left goes on in the next forward (from the state its previous piece left). Empty feeds get no
    piece. ``plan_forwards([3, 5, 2], 4) == [[(0, 0, 3), (1, 0, 1)], [(1, 1, 5)], [(2, 0, 2)]]`` as pieces.
    """
    if chunk < 1:
        raise StateError(f"chunk: expected an int >= 1, found {chunk!r}")
    forwards: list[list[Piece]] = []
    current: list[Piece] = []
    room = chunk
    for seq, n in enumerate(lengths):
        lo = 0
        while lo < n:
            take = min(n - lo, room)
            current.append(Piece(seq, lo, lo + take))
            lo += take
            room -= take
            if room == 0:
                forwards.append(current)
                current, room = [], chunk
    if current:
        forwards.append(current)
    return forwards


def cache_positions(start: int, lo: int, hi: int, total: int, every: int | None) -> list[int]:
    """The absolute positions whose states a piece puts into the cache, as ``StateCache.fill`` chooses them for a
    chunk: the multiples of ``every`` in ``(start + lo, start + hi]``, and the feed's end when the piece reaches
    it (``hi == total``). ``start``: tokens the sequence's start state had consumed. Ascending."""
    a, b = start + lo, start + hi
    out = list(range((a // every + 1) * every, b + 1, every)) if every else []
    if hi == total and (not out or out[-1] != b):
        out.append(b)
    return out


def first_insert(start: int, total: int, every: int | None) -> int:
    """The first position at which a request's prefill of ``total`` tokens from ``start`` fills the cache."""
    end = start + total
    return min((start // every + 1) * every, end) if every else end


def serves_prefix(prompt: np.ndarray, ids: np.ndarray, position: int) -> bool:
    """Whether the state after ``ids[:position]`` would be a hit for ``prompt``'s lookup (of ``prompt[:-1]``).

    The engine holds back a request whose prompt would start from a state another request of the same step is
    about to cache (as it would have, prefilled after that one), rather than prefill those tokens twice.
    """
    return position <= prompt.size - 1 and ids.size >= position and bool(np.array_equal(ids[:position],
                                                                                        prompt[:position]))


def packed_capabilities(lm: Any) -> tuple[bool, bool]:
    """``(packed, positions)``: whether ``lm`` runs packed sequences (``cu_seqlens``), and states at positions
    with them (``return_states_at`` per sequence).

    Asked of the model itself by two forwards of two tokens (the LM refuses ``cu_seqlens`` with a
    ``StateCompatibilityError`` when a mixer has no packed path, and a mixer refuses positions it cannot give
    with a ``StateError``), so a family that gains a packed path is used without a change here. Any other failure
    counts as no packing, with a ``RuntimeWarning`` (the engine then prefills one request at a time).
    """
    device = next(lm.parameters()).device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)  # on the host: the LM reads the boundaries there
    state = lm.new_state(2, device=device)
    with torch.no_grad():
        for positions in (None, [[1], []]):
            try:
                lm(ids, state, cu_seqlens=cu, return_states_at=positions)
            except StateError:
                return positions is not None, False
            except Exception as exc:  # a kernel that fails to build: serve unpacked rather than fail
                warnings.warn(f"packed prefill turned off: a packed forward failed ({type(exc).__name__}: {exc}); "
                              "prefilling one request at a time", RuntimeWarning, stacklevel=2)
                return False, False
    return True, True


def rows_view(state: MambaModelState, lo: int, hi: int, seqlen_offset: int = 0) -> MambaModelState:
    """Rows ``lo:hi`` of ``state`` as views (no copy): the input of a forward, which never modifies its state.
    Built without a second validation (rows of a validated state)."""
    return MambaModelState._of_checked({i: s._rebuild_unchecked(lambda t: t[lo:hi]) for i, s in state.items()},
                                       seqlen_offset)


class RowViews:
    """Batch-1 views of every row of ``state`` (no copies), made on first use with one ``split`` per tensor
    (a packed prefill hands each request's row to the cache and to the decode batch: at 64 requests x 24
    layers, slicing each row alone cost about 10 ms of host time a step). The views follow later in-place
    writes into ``state`` (:func:`write_rows`)."""

    def __init__(self, state: MambaModelState):
        self._state = state
        self._rows: list[MambaModelState] | None = None

    def __call__(self, j: int, seqlen_offset: int) -> MambaModelState:
        """Row ``j`` with ``seqlen_offset``."""
        if self._rows is None:
            self._rows = self._state._row_views(0, self._state.batch_size)
        return MambaModelState._of_checked(self._rows[j]._layers, seqlen_offset)


def write_rows(dst: MambaModelState, lo: int, src: MambaModelState) -> None:
    """Copy ``src``'s rows into ``dst``'s rows from ``lo`` on (in place)."""
    for idx, layer in dst.items():
        other = src[idx].tensors
        for name, t in layer.tensors.items():
            t[lo:lo + other[name].shape[0]].copy_(other[name])
