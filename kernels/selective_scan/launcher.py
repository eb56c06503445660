"""The public entry point :func:`selective_scan_fn` (a drop-in superset of upstream's): validates its inputs,
then runs the Triton kernels (CUDA tensors, or anywhere under ``TRITON_INTERPRET=1`` when ``backend='triton'`` is
forced) or the pure-PyTorch chunked path, chosen by :func:`mamba_state.kernels.backend.resolve_backend`.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from mamba_state.errors import StateError

from .._launch import default_chunk, needs_grad
from ..backend import backend_name
from ..scan_inputs import check_scan_inputs, compute_dtype, match_groups
from ..scan_positions import check_positions, run_segments, use_dense_states
from .all_states import selective_scan_all_states
from .chunked import selective_scan_chunked
from .ops import ScanFn, packed_forward_by_sequence, scan_forward
from .packed import check_varlen_positions, check_varlen_state, seq_bounds, step_marks
from .positions import scan_packed_states_at_one_pass, scan_states_at_one_pass

__all__ = ["selective_scan_fn"]

_HALF_OR_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
MAX_SEQUENCES_BY_SEQUENCE = 65535
"""Most sequences a no-grad packed call runs in their own programs: they are the launch grid's second axis, which
CUDA caps at 65535 blocks. More take the packed row's schedule."""


def _on_triton(u: Tensor, backend: Optional[str], shape, initial_state: Optional[Tensor] = None) -> bool:
    """Whether the Triton kernels run a call: the Triton backend for u's device, time-varying B and C, no float64
    u (nor a float64 initial state, where the caller passes it: those paths then compute in float64)."""
    return (backend_name(u.device, backend) == "triton" and shape.ngroups_B > 0 and shape.ngroups_C > 0
            and u.dtype != torch.float64 and (initial_state is None or initial_state.dtype != torch.float64))


def _triton_inputs(u: Tensor, delta: Tensor, B: Tensor, C: Tensor, z: Optional[Tensor], chunk_size: Optional[int],
                   seqlen: int) -> tuple[int, Tensor, Tensor]:
    """``(chunk, B4, C4)`` for the kernels: the dtypes they read checked, the checkpoint interval checked (default
    about sqrt(8 * seqlen)), B and C with a group axis and one group count (:func:`match_groups`)."""
    for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype not in _HALF_OR_FLOAT:
            raise StateError(f"{name}: expected float32, float16 or bfloat16 on the Triton path, found {t.dtype}")
    chunk = int(chunk_size) if chunk_size is not None else default_chunk(seqlen)
    if chunk < 8 or chunk % 8:
        raise StateError(f"chunk_size: expected a positive multiple of 8, found {chunk_size}")
    B4, C4 = match_groups(B if B.dim() == 4 else B.unsqueeze(1), C if C.dim() == 4 else C.unsqueeze(1))
    return chunk, B4, C4


def selective_scan_fn(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                      z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                      return_last_state: bool = False, initial_state: Optional[Tensor] = None,
                      reset: Optional[Tensor] = None, backend: Optional[str] = None, chunk_size: Optional[int] = None,
                      return_states_at=None, cu_seqlens: Optional[Tensor] = None):
    """Mamba-1 selective scan with initial state, final state, per-step resets and states at chosen positions.

    Args:
        u, delta: [batch, dim, seqlen], fp32/fp16/bf16.
        A: [dim, dstate], real (fp32).
        B, C: [batch, dstate, seqlen] or [batch, ngroups, dstate, seqlen] (dim divisible by ngroups), or
            [dim, dstate] (constant over time; runs on the reference path).
        D, delta_bias: [dim] or None. z: [batch, dim, seqlen] or None (output gated by silu(z)).
        delta_softplus: apply softplus to delta + delta_bias.
        return_last_state: also return the final state.
        initial_state: [batch, dim, dstate] or None (zeros).
        reset: bool [batch, seqlen] or None; True at t zeroes the state just before step t.
        backend: None/'auto', 'reference' or 'triton' (see :mod:`mamba_state.backend`).
        chunk_size: checkpoint interval of the Triton path (a multiple of 8; default about sqrt(8 * seqlen)).
        return_states_at: None, or non-decreasing ints in [0, seqlen] (any iterable of ints, or a 1-D integer tensor):
            also return the state after ``p`` tokens for each ``p`` (0: the initial state; seqlen: the final
            state; the state at ``p`` is taken before a reset at token ``p`` is applied). On the Triton path the
            kernels store these states during their one pass over the sequence (each position costs one state
            store); on the reference path the sequence is scanned in segments cut at these positions, each
            continuing from the previous one's final state, or, for many dense positions (see
            :func:`mamba_state.scan_positions.use_dense_states`), in one PyTorch pass that keeps every state
            (:func:`mamba_state.scan_states.selective_scan_all_states`). Every token is processed once (no
            replay) and gradients flow through the returned states.
        cu_seqlens: None, or int32/int64 [num_seqs + 1] (starts at 0, non-decreasing, ends at seqlen; read on the
            host): the inputs are ``num_seqs`` sequences packed along the time axis of a batch of 1, sequence
            ``s`` being steps ``cu_seqlens[s]:cu_seqlens[s + 1]`` (possibly empty). Each runs from its own row of
            ``initial_state`` [num_seqs, dim, dstate] (or zeros); ``last_state`` is [num_seqs, dim, dstate] (an
            empty sequence returns its initial state); ``reset`` [1, seqlen] still works inside sequences. With
            ``return_states_at``, positions are given per sequence: a list of ``num_seqs`` lists of token counts
            within each sequence (``[[0, 3], [], [5]]``), and ``states`` is a list of ``num_seqs`` tensors
            ``[len(positions[s]), dim, dstate]``. See docs/varlen.md.

    Returns:
        out [batch, dim, seqlen] in u.dtype, or (out, last_state [batch, dim, dstate] float32) when
        ``return_last_state``. With ``return_states_at``, the states are appended as one more value:
        ``(out, states)`` or ``(out, last_state, states)``, ``states`` [len(positions), batch, dim, dstate] in the
        compute dtype (float32; float64 for float64 inputs). Differentiable in every tensor input, initial_state
        included.
    """
    if cu_seqlens is not None:
        return _scan_packed(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state,
                            reset, backend, chunk_size, return_states_at, cu_seqlens)
    shape = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, reset)
    if return_states_at is not None:
        return _scan_at_positions(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state, reset, backend, chunk_size, return_states_at, shape)
    if not _on_triton(u, backend, shape):
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                      initial_state, reset)
    chunk, B4, C4 = _triton_inputs(u, delta, B, C, z, chunk_size, shape.seqlen)
    args = (u, delta, A, B4, C4, D, z, delta_bias, initial_state, reset, bool(delta_softplus), chunk)
    if torch.compiler.is_compiling() or needs_grad(u, delta, A, B, C, D, z, delta_bias, initial_state):
        out, last, _, _ = ScanFn.apply(*args)
    else:  # inference: straight to the kernels (the custom op and autograd dispatch cost host time per call)
        out, last, _, _ = scan_forward(*args, keep_ypre=False)
    return (out, last) if return_last_state else out


def _scan_at_positions(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state,
                       reset, backend, chunk_size, return_states_at, shape):
    """:func:`selective_scan_fn` with ``return_states_at``: on the Triton path one pass that stores the states at
    the positions (:mod:`.positions`); elsewhere one scan per segment between positions, or for many dense
    positions one PyTorch pass keeping every state."""
    positions = check_positions(return_states_at, shape.seqlen)
    if _on_triton(u, backend, shape, initial_state):
        # one pass of the kernels, storing the states at the positions as it goes (positions.py)
        chunk, B4, C4 = _triton_inputs(u, delta, B, C, z, chunk_size, shape.seqlen)
        grad = torch.compiler.is_compiling() or needs_grad(u, delta, A, B, C, D, z, delta_bias, initial_state)
        out, last, states = scan_states_at_one_pass(u, delta, A, B4, C4, D, z, delta_bias, initial_state, reset,
                                                    delta_softplus, chunk, positions, grad)
        return (out, last, states) if return_last_state else (out, states)
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    init = (initial_state if initial_state is not None
            else torch.zeros(shape.batch, shape.dim, shape.dstate, dtype=ct, device=u.device))
    if use_dense_states(positions, shape.seqlen):  # many positions: one pass keeping every state
        out, every = selective_scan_all_states(u, delta, A, B, C, D, z, delta_bias, delta_softplus, init, reset)
        states = every[positions]
        return (out, every[-1], states) if return_last_state else (out, states)

    def part(t, a, b):  # time slice of a time-varying input; constant B/C, D, bias and None pass through
        return t[..., a:b] if t is not None and t.dim() >= 3 else t

    def run(a, b, state):
        return selective_scan_fn(part(u, a, b), part(delta, a, b), A, part(B, a, b), part(C, a, b), D,
                                 part(z, a, b), delta_bias, delta_softplus, True, state,
                                 None if reset is None else reset[:, a:b], backend, chunk_size)

    out, last, states = run_segments(run, shape.seqlen, positions, init, time_dim=-1, state_dtype=ct)
    return (out, last, states) if return_last_state else (out, states)


def _scan_packed(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state, reset,
                 backend, chunk_size, return_states_at, cu_seqlens):
    """:func:`selective_scan_fn` with ``cu_seqlens``: every check first, then one launch over the packed row (the
    kernels treat a sequence start as a reset to that sequence's initial state and store its final state at its
    last step), or the chunked path on the reference backend."""
    shape = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, None, reset)
    bounds = seq_bounds(cu_seqlens, shape.seqlen, shape.batch)
    nseq = len(bounds) - 1
    check_varlen_state(initial_state, nseq, shape.dim, shape.dstate)
    if return_states_at is not None:
        positions = check_varlen_positions(return_states_at, bounds)
        return _packed_at_positions(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                    initial_state, reset, backend, chunk_size, positions, bounds, shape)
    if not _on_triton(u, backend, shape, initial_state):
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                      initial_state, reset, cu_seqlens=cu_seqlens)
    chunk, B4, C4 = _triton_inputs(u, delta, B, C, z, chunk_size, shape.seqlen)
    args = (u, delta, A, B4, C4, D, z, delta_bias, initial_state, reset, bool(delta_softplus), chunk)
    if torch.compiler.is_compiling() or needs_grad(u, delta, A, B, C, D, z, delta_bias, initial_state):
        seq_start, seq_end = step_marks(bounds, u.device)
        out, last, _, _ = ScanFn.apply(*args, seq_start, seq_end, nseq)
    elif os.environ.get("MAMBA_STATE_PACKED_FWD", "") != "row" and nseq <= MAX_SEQUENCES_BY_SEQUENCE:
        # no backward: each sequence in its own programs, side by side (a batch's cost, not a long row's)
        out, last = packed_forward_by_sequence(u, delta, A, B4, C4, D, z, delta_bias, initial_state, reset,
                                               bool(delta_softplus), bounds)
    else:  # the packed row's schedule (sequential or chunk-parallel over the whole row), for comparison
        seq_start, seq_end = step_marks(bounds, u.device)
        out, last, _, _ = scan_forward(*args, keep_ypre=False, seq_start=seq_start, seq_end=seq_end, nseq=nseq)
    if not return_last_state:
        return out
    empty = [s for s in range(nseq) if bounds[s] == bounds[s + 1]]
    if empty and initial_state is not None:  # no step of theirs ran: their final state is their initial state
        mask = torch.zeros(nseq, 1, 1, dtype=torch.bool)
        mask[empty] = True
        last = torch.where(mask.to(u.device, non_blocking=True), initial_state.float(), last)
    return out, last


def _packed_at_positions(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state,
                         reset, backend, chunk_size, positions, bounds, shape):
    """Packed sequences with states at positions per sequence: the packed row is cut at every requested position
    (``cu_seqlens[s] + p``) and scanned segment by segment, each segment itself packed (its pieces of the
    sequences it overlaps), a sequence continuing from the state its previous piece left. Every token is scanned
    once; gradients flow through the chained states. On the Triton path one pass instead, which stores the
    states at the positions as it goes (:func:`.positions.scan_packed_states_at_one_pass`)."""
    if _on_triton(u, backend, shape, initial_state):
        chunk, B4, C4 = _triton_inputs(u, delta, B, C, z, chunk_size, shape.seqlen)
        grad = torch.compiler.is_compiling() or needs_grad(u, delta, A, B, C, D, z, delta_bias, initial_state)
        out, last, states = scan_packed_states_at_one_pass(u, delta, A, B4, C4, D, z, delta_bias, initial_state,
                                                           reset, delta_softplus, chunk, bounds, positions, grad)
        return (out, last, states) if return_last_state else (out, states)
    L, nseq = shape.seqlen, len(bounds) - 1
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    h0 = (initial_state.to(ct) if initial_state is not None
          else torch.zeros(nseq, shape.dim, shape.dstate, dtype=ct, device=u.device))
    cur = list(h0.unbind(0))
    wanted: dict[int, list[int]] = {}  # global position -> sequences whose state is wanted right after it
    for s, ps in enumerate(positions):
        for p in ps:
            if p > 0:
                wanted.setdefault(bounds[s] + p, []).append(s)
    at: dict[tuple[int, int], Tensor] = {(s, 0): h0[s] for s in range(nseq)}
    edges = [0, *sorted(g for g in wanted if 0 < g < L), L]

    def part(t, a, b):  # time slice of a time-varying input; constant B/C, D, bias and None pass through
        return t[..., a:b] if t is not None and t.dim() >= 3 else t

    outs = []
    for a, b in zip(edges[:-1], edges[1:]):
        lo = next(s for s in range(nseq) if bounds[s + 1] > a)  # the sequences this segment overlaps
        hi = max(s for s in range(nseq) if bounds[s] < b)
        local = [min(max(bounds[s], a), b) - a for s in range(lo, hi + 2)]
        out, last = selective_scan_fn(part(u, a, b), part(delta, a, b), A, part(B, a, b), part(C, a, b), D,
                                      part(z, a, b), delta_bias, delta_softplus, True, torch.stack(cur[lo:hi + 1]),
                                      None if reset is None else reset[:, a:b], backend, chunk_size,
                                      cu_seqlens=torch.tensor(local, dtype=torch.int32))
        outs.append(out)
        for i, s in enumerate(range(lo, hi + 1)):
            cur[s] = last[i].to(ct)
        for s in wanted.get(b, []):
            at[(s, b - bounds[s])] = cur[s]
    states = [torch.stack([at[(s, p)] for p in ps]) if ps else h0.new_zeros(0, shape.dim, shape.dstate)
              for s, ps in enumerate(positions)]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    return (out, torch.stack(cur), states) if return_last_state else (out, states)
