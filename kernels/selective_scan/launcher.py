"""The public entry point :func:`selective_scan_fn` (a drop-in superset of upstream's): validates its inputs,
then runs the Triton kernels (CUDA tensors, or anywhere under ``TRITON_INTERPRET=1`` when ``backend='triton'`` is
forced) or the pure-PyTorch chunked path, chosen by :func:`mamba_state.kernels.backend.resolve_backend`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mamba_state.errors import StateError

from .._launch import default_chunk, needs_grad
from ..backend import backend_name
from ..scan_inputs import check_scan_inputs, compute_dtype
from ..scan_positions import check_positions, run_segments, use_dense_states
from .all_states import selective_scan_all_states
from .chunked import selective_scan_chunked
from .ops import ScanFn, scan_forward

__all__ = ["selective_scan_fn"]

_HALF_OR_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def selective_scan_fn(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                      z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                      return_last_state: bool = False, initial_state: Optional[Tensor] = None,
                      reset: Optional[Tensor] = None, backend: Optional[str] = None, chunk_size: Optional[int] = None,
                      return_states_at=None):
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
            state; the state at ``p`` is taken before a reset at token ``p`` is applied). The sequence is scanned
            in segments cut at these positions, each continuing from the previous one's final state: every
            token is processed once (no replay) and gradients flow through the returned states. Many dense
            positions (see :func:`mamba_state.scan_positions.use_dense_states`) take one PyTorch pass that keeps
            every state instead (:func:`mamba_state.scan_states.selective_scan_all_states`).

    Returns:
        out [batch, dim, seqlen] in u.dtype, or (out, last_state [batch, dim, dstate] float32) when
        ``return_last_state``. With ``return_states_at``, the states are appended as one more value:
        ``(out, states)`` or ``(out, last_state, states)``, ``states`` [len(positions), batch, dim, dstate] in the
        compute dtype (float32; float64 for float64 inputs). Differentiable in every tensor input, initial_state
        included.
    """
    shape = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, reset)
    if return_states_at is not None:
        return _scan_at_positions(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state, reset, backend, chunk_size, return_states_at, shape)
    which = backend_name(u.device, backend)
    constant_bc = shape.ngroups_B == 0 or shape.ngroups_C == 0
    if which == "reference" or constant_bc or u.dtype == torch.float64:
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                      initial_state, reset)
    for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype not in _HALF_OR_FLOAT:
            raise StateError(f"{name}: expected float32, float16 or bfloat16 on the Triton path, found {t.dtype}")
    chunk = int(chunk_size) if chunk_size is not None else default_chunk(shape.seqlen)
    if chunk < 8 or chunk % 8:
        raise StateError(f"chunk_size: expected a positive multiple of 8, found {chunk_size}")
    B4 = B if B.dim() == 4 else B.unsqueeze(1)
    C4 = C if C.dim() == 4 else C.unsqueeze(1)
    args = (u, delta, A, B4, C4, D, z, delta_bias, initial_state, reset, bool(delta_softplus), chunk)
    if torch.compiler.is_compiling() or needs_grad(u, delta, A, B, C, D, z, delta_bias, initial_state):
        out, last, _, _ = ScanFn.apply(*args)
    else:  # inference: straight to the kernels (the custom op and autograd dispatch cost host time per call)
        out, last, _, _ = scan_forward(*args, keep_ypre=False)
    return (out, last) if return_last_state else out


def _scan_at_positions(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state,
                       reset, backend, chunk_size, return_states_at, shape):
    """:func:`selective_scan_fn` with ``return_states_at``: one scan per segment between positions."""
    positions = check_positions(return_states_at, shape.seqlen)
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
