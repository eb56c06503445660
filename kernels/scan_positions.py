"""States at chosen positions of a sequence, straight from the scan (no replay).

A *position* ``p`` is a token count: "the state after ``p`` tokens" of the chunk, with ``p = 0`` the state the
chunk started from and ``p = seqlen`` its final state. A reset at token ``p`` is applied when token ``p`` is
processed, so the state *at* ``p`` is the one before that reset (what a caller stopping after ``p`` tokens gets).

* :func:`check_positions` validates a list of positions (non-decreasing ints in ``[0, seqlen]``).
* :func:`run_segments` cuts a sequence at the positions and runs any scan segment by segment, each segment
  starting from the previous segment's final state. Every token is processed once, gradients flow through
  the chained states, and resets work across segment boundaries because each segment gets its own slice of
  the reset mask.
* :func:`conv_windows_at` gives the causal-conv window (the last ``d_conv`` conv inputs, oldest first) after
  each position, from the incoming window and the chunk's conv inputs.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Iterable, Sequence

import torch

from mamba_state.errors import StateError, StateShapeError

from ._host import cached_host_tensor

__all__ = ["check_positions", "segment_bounds", "run_segments", "conv_windows_at", "use_dense_states"]

DENSE_MIN_SEGMENTS = 32
"""Positions cutting the sequence into more segments than this, and dense (at least one position per 8 tokens),
use :func:`mamba_state.scan_states.selective_scan_all_states` (about 3 * sqrt(seqlen) vectorised steps) instead
of one scan call per segment."""


def check_positions(positions: Any, seqlen: int, name: str = "return_states_at") -> list[int]:
    """``positions`` as a list of ints; raises ``StateError`` unless they are non-decreasing ints in [0, seqlen].

    Accepts any iterable of ints (a list, a ``range``, a numpy array) or a 1-D integer tensor. ``name`` is the
    caller's argument name, used in error messages.
    """
    if type(positions) is _Checked and positions.seqlen == seqlen:
        return positions  # what this function returned for the same length (a layer's check, then its scan's)
    if type(positions) is list and all(type(p) is int for p in positions):
        # the common case: no conversion
        if positions and (positions[0] < 0 or positions[-1] > seqlen
                          or any(b < a for a, b in zip(positions, positions[1:]))):
            _raise_bad_positions(positions, seqlen, name)
        return _Checked(positions, seqlen)
    if isinstance(positions, torch.Tensor):
        if positions.dim() != 1 or positions.is_floating_point() or positions.dtype == torch.bool:
            raise StateError(f"{name}: expected a 1-D integer tensor or a list of ints, found "
                             f"{positions.dtype} {list(positions.shape)}")
        out = [int(p) for p in positions.tolist()]
    elif isinstance(positions, Iterable) and not isinstance(positions, (str, bytes)):
        items = list(positions)  # lists, tuples, ranges, numpy arrays, generators
        bad = [p for p in items if isinstance(p, bool) or not isinstance(p, numbers.Integral)]
        if bad:
            raise StateError(f"{name}: expected ints, found {type(bad[0]).__name__} {bad[0]!r}")
        out = [int(p) for p in items]
    else:
        raise StateError(f"{name}: expected a list of ints or a 1-D integer tensor, found "
                         f"{type(positions).__name__}")
    _raise_bad_positions(out, seqlen, name)
    return _Checked(out, seqlen)


class _Checked(list):
    """The list :func:`check_positions` returns: a new list (never the caller's own), marked with the length it
    was checked against, so that the next check of it for that length (the scan's, after the layer's) is free.
    Treat it as read-only."""

    __slots__ = ("seqlen",)

    def __init__(self, items, seqlen: int) -> None:
        super().__init__(items)
        self.seqlen = seqlen


def _raise_bad_positions(out: list[int], seqlen: int, name: str) -> None:
    """Raise ``StateError`` for the first out-of-range position, else for an order violation; nothing if fine."""
    for p in out:
        if not 0 <= p <= seqlen:
            raise StateError(f"{name}: expected positions in [0, {seqlen}] (token counts of this chunk), "
                             f"found {p}")
    if any(b < a for a, b in zip(out, out[1:])):
        raise StateError(f"{name}: expected non-decreasing positions, found {out}")


def segment_bounds(positions: Sequence[int], seqlen: int) -> list[tuple[int, int]]:
    """The segments ``[(start, stop), ...]`` covering ``[0, seqlen)``, cut at every interior position."""
    cuts = sorted({p for p in positions if 0 < p < seqlen})
    edges = [0, *cuts, seqlen]
    return list(zip(edges[:-1], edges[1:]))


def use_dense_states(positions: Sequence[int], seqlen: int) -> bool:
    """Whether states at ``positions`` are cheaper from one scan that keeps every state than per segment."""
    return len(segment_bounds(positions, seqlen)) > DENSE_MIN_SEGMENTS and 8 * len(set(positions)) >= seqlen


def run_segments(run: Callable[[int, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], seqlen: int,
                 positions: Sequence[int], initial_state: torch.Tensor, time_dim: int,
                 state_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run a scan in segments and collect the states at ``positions``.

    Args:
        run: ``run(start, stop, state) -> (out, last_state)`` scanning tokens ``start:stop`` from ``state``.
        seqlen: the chunk's length; ``positions`` must already be checked (:func:`check_positions`).
        initial_state: the state before token 0 (a tensor; pass zeros for "no state").
        time_dim: the time axis of ``out``; segment outputs are concatenated along it.
        state_dtype: dtype of the returned states (default: that of the scan's last state).

    Returns:
        ``(out, last_state, states)`` with ``states`` stacked as ``[len(positions), *initial_state.shape]``.
    """
    at: dict[int, torch.Tensor] = {0: initial_state}
    outs = []
    state = initial_state
    for start, stop in segment_bounds(positions, seqlen):
        out, state = run(start, stop, state)
        outs.append(out)
        at[stop] = state
    dtype = state_dtype if state_dtype is not None else state.dtype
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=time_dim)
    if positions:
        states = torch.stack([at[p].to(dtype) for p in positions])
    else:
        states = initial_state.new_zeros((0, *initial_state.shape), dtype=dtype)
    return out, state, states


def conv_windows_at(conv_state: torch.Tensor, x: torch.Tensor, positions: Sequence[int],
                    reset: torch.Tensor | None = None) -> torch.Tensor:
    """The causal-conv window after each position.

    Args:
        conv_state: ``[B, C, W]`` the window before the chunk (last ``W`` conv inputs, oldest first).
        x: ``[B, C, L]`` the chunk's conv inputs (before the conv).
        positions: checked positions in ``[0, L]``.
        reset: bool ``[B, L]`` or None; inputs from before the latest reset at or before ``p - 1`` are zeroed,
            as the conv does (a reset at token ``p`` itself is not applied yet).

    Returns:
        ``[len(positions), B, C, W]`` in ``conv_state.dtype``; position 0 gives ``conv_state`` itself.
    """
    if conv_state.dim() != 3 or x.dim() != 3 or conv_state.shape[:2] != x.shape[:2]:
        raise StateShapeError(f"conv windows: expected conv_state [B, C, W] and x [B, C, L] with the same B, C, "
                              f"found {list(conv_state.shape)} and {list(x.shape)}")
    bsz, ch, W = conv_state.shape
    L = x.shape[-1]
    if not positions:
        return conv_state.new_zeros(0, bsz, ch, W)
    # The window after p tokens is entries p .. p + W - 1 of cat(conv_state, x) along time: window p of its
    # unfold(W, 1), which is a view. Rows of such views are gathered with one index_select along a leading
    # positions axis, which writes the [P, B, C, W] result contiguously in one launch. The position indices
    # depend on the positions alone and stay on the device between calls (cached_host_tensor).
    pos = tuple(positions)

    def windows(seq: torch.Tensor, at: tuple[int, ...]) -> torch.Tensor:  # [B, C, T] -> [len(at), B, C, W]
        return seq.unfold(-1, W, 1).permute(2, 0, 1, 3).index_select(0, cached_host_tensor(at, torch.long,
                                                                                              x.device))

    plan = _window_plan(pos, W, L)
    if plan[0] == "cat":
        # a short chunk, or many positions: concatenate (cat promotes x to the state's dtype in the same
        # launch), then one gather
        win = windows(torch.cat([conv_state, x], dim=-1), pos)
    else:
        _, head, tail, step = plan
        parts = []
        if head:
            parts.append(windows(torch.cat([conv_state, x[..., : W - 1]], dim=-1), head))
        if tail and step:
            # evenly spaced (a trace's stride, positions every N tokens): the windows are one strided view of x
            # (window i starts at entry tail[i]), so the cast below is the only copy (no gather, no index tensor)
            sb, sc, sx = x.stride()
            parts.append(x.as_strided((len(tail), bsz, ch, W), (step * sx, sb, sc, sx),
                                      x.storage_offset() + tail[0] * sx))
        elif tail:
            parts.append(windows(x, tail))
        win = parts[0] if len(parts) == 1 else torch.cat(parts)
    # contiguous in the same launch as the cast: a cast of the strided view above keeps its stride order
    # (window entries fastest), which a .contiguous() after it then copied a second time
    win = win.to(conv_state.dtype, memory_format=torch.contiguous_format)
    if reset is not None:
        # segment id of every entry of cat(conv_state, x): the incoming window is segment 0, and each reset
        # starts a new one; an entry is visible in a window when it shares the window's newest entry's segment
        seg = torch.cat([torch.zeros(bsz, W, dtype=torch.long, device=x.device),
                         torch.cumsum(reset.long(), dim=1)], dim=1)
        seg_win = seg.unfold(-1, W, 1).index_select(1, cached_host_tensor(pos, torch.long, x.device))  # [B, P, W]
        visible = (seg_win == seg_win[..., -1:]).permute(1, 0, 2)[:, :, None, :]  # [P, B, 1, W]
        win = win * visible.to(win.dtype)
    return win.contiguous()


@functools.lru_cache(maxsize=256)
def _window_plan(pos: tuple[int, ...], W: int, L: int) -> tuple:
    """How :func:`conv_windows_at` gathers the windows after ``pos`` (worked out once per distinct call: a verify
    step repeats its positions in every layer). ``("cat",)`` when the chunk is short next to the positions'
    windows (concatenate the incoming window and ``x``, then one gather); else ``("split", head, tail, step)``:
    with a long chunk and few positions (at batch 8 x 2048 the concatenation moved about 100 MB per layer),
    windows wholly inside ``x`` come from ``x`` (``tail``: each one's first entry in ``x``; ``step`` their common
    spacing when evenly spaced, else 0), and the positions before ``W`` (``head``, a prefix: positions are
    non-decreasing), which reach into the incoming window, from the incoming window and ``x``'s first ``W - 1``
    entries."""
    if W + L <= 4 * len(pos) * W:
        return ("cat",)
    k = next((i for i, p in enumerate(pos) if p >= W), len(pos))
    tail = tuple(p - W for p in pos[k:])
    step = tail[1] - tail[0] if len(tail) > 1 else 0
    if step <= 0 or any(b - a != step for a, b in zip(tail, tail[1:])):
        step = 0
    return ("split", pos[:k], tail, step)
