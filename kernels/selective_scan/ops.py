"""PyTorch custom ops (namespace ``mamba_state``) around the scan's Triton kernels, their fake implementations, and the
autograd Function of the scan.

Ops (all take B/C as [batch, ngroups, dstate, seqlen]; the public wrapper adds the group axis for 3-D B/C):

* ``mamba_state::scan_fwd(u, delta, A, B, C, D?, z?, delta_bias?, initial_state?, reset?, delta_softplus, chunk)``
  -> ``(out [batch, dim, seqlen] u.dtype, last_state [batch, dim, dstate] f32,
  checkpoints [batch, dim, nchunks, dstate] f32, ypre)``; ``ypre`` is the output before the silu(z) gate
  ([batch, dim, seqlen] u.dtype when z is given, else empty), kept for the backward as upstream does.
* ``mamba_state::scan_bwd(u, delta, A, B, C, D?, z?, delta_bias?, reset?, checkpoints, ypre, dout, dlast?,
  delta_softplus, chunk)`` -> ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state)``; gradients of
  absent optional inputs come back as empty tensors.

What backward keeps: the inputs (no copies), the ``checkpoints`` (one fp32 state per chunk of ``chunk`` steps),
the pre-gate output ``ypre`` when z is given,
and, during the backward kernel only, a scratch of ``chunk / 8`` fp32 states per (batch, channel) and program
row (one row per batch row; ``backward_splits`` rows in the chunk-parallel backward, which also holds three
[batch, dim, nchunks, dstate] fp32 buffers while it runs: local adjoints, decay products, incoming adjoints).

Packed sequences (``cu_seqlens``, batch 1): the launcher passes the per-step marks ``seq_start`` / ``seq_end``
(int32, see :func:`mamba_state.kernels.selective_scan.packed.step_marks`) and ``nseq``; ``initial_state``, the
last state, ``dlast`` and ``dinitial_state`` are then [nseq, dim, dstate], and ``scan_bwd`` also takes
``initial_state`` (the backward's recompute puts it in at each sequence's first step). Without the marks every
launch is the one it was before. Without a backward, packed sequences take :func:`packed_forward_by_sequence`
instead: no marks, each sequence in its own programs (``MAMBA_STATE_PACKED_FWD=row`` keeps the packed row's
schedule above, for comparison).

The backward has two schedules (``backward_mode``, ``MAMBA_STATE_SCAN_BWD=seq|chunk|auto``): ``seq``, one program
per (batch, channel block) walking all chunks right to left; ``chunk``, chunk-parallel (small grids, or a
part-empty last wave).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from .._device import launch_device
from .._host import cached_host_tensor
from .._launch import (_cdiv, _nchunks, _pow2_divisor, _reset_bytes, backward_half_tiles, backward_mode,
                       backward_splits, register_cap, block_sizes, time_parallel_plan, triton_next_pow2,
                       use_sequence_parallel)

__all__ = ["scan_forward", "scan_backward", "ScanFn", "packed_forward_by_sequence"]


def _dense(t: Tensor) -> bool:
    """Whether t's elements fill its memory without gaps or overlaps, in some order of its axes."""
    expect = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride != expect:
            return False
        expect *= size
    return True


def _layout_of(u: Tensor) -> Tensor:
    """u itself when its time axis has stride 1 and it is dense (contiguous, or channel-major: [dim, batch, L] in
    memory, as a projection written as ``weight @ tokens^T`` gives it), else a contiguous copy. Every other
    [batch, dim, L] tensor of the scan takes this layout (:func:`_like`): the kernels read them all with one pair
    of strides."""
    return u if u.stride(-1) == 1 and _dense(u) else u.contiguous()


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """t in ref's memory layout (no copy when it already is)."""
    return t if t.stride() == ref.stride() else torch.empty_like(ref, dtype=t.dtype).copy_(t)


def scan_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
                 reset: Optional[Tensor], delta_softplus: bool, chunk: int,
                 keep_ypre: bool = True, seq_start: Optional[Tensor] = None, seq_end: Optional[Tensor] = None,
                 nseq: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward launches (see the module docstring for the outputs); registered below as the custom op
    ``mamba_state::scan_fwd``, and called directly for inference, where no autograd or tracing is needed
    (``keep_ypre=False`` then skips writing the pre-gate output, which only the backward reads: ``ypre`` comes
    back empty). B and C may be strided views (time stride 1), D and delta_bias any float dtype: read as they
    are, no copies. With ``seq_start`` / ``seq_end`` (packed sequences) the last state is [nseq, dim, dstate]
    and an empty sequence's row is left zero (the launcher puts its initial state there)."""
    return forward_launches(u, delta, A, B, C, D, z, delta_bias, initial_state, reset, delta_softplus, chunk,
                            keep_ypre, seq_start, seq_end, nseq)


def forward_launches(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                     z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
                     reset: Optional[Tensor], delta_softplus: bool, chunk: int, keep_ypre: bool = True,
                     seq_start: Optional[Tensor] = None, seq_end: Optional[Tensor] = None, nseq: int = 0,
                     zero_rows: bool = True,
                     final_out: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`scan_forward` itself (its arguments and outputs), plus ``zero_rows``: with the marks, whether the
    [nseq, dim, dstate] rows of final states start zeroed. False when every row is marked somewhere, so that the
    kernels write each of them (states at positions: each stored row has its step), which saves the fill of a
    buffer that is a whole trace's size for a full trace. ``final_out`` (with the marks of states at positions
    only, whose one sequence start is step 0): float32 [batch, dim, dstate], filled with each row's final state
    besides the stored rows."""
    from . import triton_kernels as K

    batch, dim, L = u.shape
    ngroups, dstate = B.shape[1], A.shape[1]
    u = _layout_of(u)
    delta = _like(delta, u)
    B = B if B.stride(-1) == 1 else B.contiguous()
    C = C if C.stride(-1) == 1 else C.contiguous()
    A = A.contiguous().float()
    z = _like(z, u) if z is not None else None
    nch = _nchunks(L, chunk)
    out = torch.empty_like(u)
    varlen = seq_start is not None
    if varlen:  # rows of the sequences, written at their last steps (an empty sequence has none: zeros)
        last = (torch.zeros if zero_rows else torch.empty)(nseq, dim, dstate, device=u.device, dtype=torch.float32)
    else:
        last = torch.empty(batch, dim, dstate, device=u.device, dtype=torch.float32)
    ckpt = torch.empty(batch, dim, nch, dstate, device=u.device, dtype=torch.float32)
    bd0, _, _ = block_sizes(dim, dstate, ngroups, batch=batch, device=u.device)
    seqpar = use_sequence_parallel(u, batch, _cdiv(dim, bd0), nch)
    bd, bn, warps = block_sizes(dim, dstate, ngroups, batch=batch, device=u.device, seqpar=seqpar)
    init = initial_state.contiguous().float() if initial_state is not None else None
    rst = _reset_bytes(reset)
    store_ypre = z is not None and keep_ypre
    ypre = torch.empty_like(u) if store_ypre else u.new_empty(0)
    summ = torch.empty_like(ckpt) if seqpar else None
    prod = torch.empty_like(ckpt) if seqpar else None
    # absent inputs go in as None: the kernels' HAS_* flags follow from them (optional_inputs)
    common = (
        u, delta, A, B, C, D.contiguous() if D is not None else None, z,
        delta_bias.contiguous() if delta_bias is not None else None, init, rst,
        out, last, ckpt, summ, prod, ypre if store_ypre else None, seq_start, seq_end,
        final_out if not seqpar else None,
        dim, L, dstate, dim // ngroups, nch, u.stride(0), u.stride(1),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
    )
    flags = dict(SOFTPLUS=bool(delta_softplus), CHUNK=int(chunk), BD=bd, BN=bn, num_warps=warps,
                 **(register_cap("FWD") if u.is_cuda else {}))  # a launch option the interpreter does not take
    with launch_device(u):
        if not seqpar:
            K._scan_fwd_kernel[(_cdiv(dim, bd), batch)](*common, MODE=0, **flags)
        else:
            # chunk summaries in parallel, a short pass over chunk boundaries, then every chunk's outputs
            K._scan_fwd_kernel[(_cdiv(dim, bd), batch, nch)](*common, MODE=1, **flags)
            block = 256
            # packed: chunk 0 starts a sequence (its initial state enters there), and the carry's final value is not
            # a sequence's final state (MODE 2 stores those), except with the marks of states at positions (no
            # sequence starts past step 0): then it is the row's final state, which final_out asks for
            carry_end = (last if not varlen else final_out if final_out is not None
                         else torch.empty_like(ckpt[:, :, 0]))
            K._carry_kernel[(_cdiv(dim * dstate, block), batch)](
                None if varlen else init, summ, prod, ckpt, carry_end,
                dim, dstate, nch, REVERSE=False, BLOCK=block, num_warps=4)
            K._scan_fwd_kernel[(_cdiv(dim, bd), batch, nch)](*common, MODE=2, **flags)
    return out, last, ckpt, ypre


def segment_table(bounds: Sequence[int]) -> list[int]:
    """Flat (sequence, first step, end step) of the non-empty packed sequences, longest first (ties in order):
    the programs of :func:`packed_forward_by_sequence`, long sequences in the first wave."""
    spans = [(s, bounds[s], bounds[s + 1]) for s in range(len(bounds) - 1) if bounds[s + 1] > bounds[s]]
    spans.sort(key=lambda r: r[1] - r[2])  # stable: equal lengths keep their order
    return [v for r in spans for v in r]


def _skewed_block(bd: int, table: Sequence[int], dim: int, ngroups: int) -> int:
    """Channels per program for sequences of unequal lengths. While the GPU is full, every program advances at
    about the same rate per step, and a step costs in proportion to its channels, so the longest sequence's
    programs end last. At a length ``max`` against a mean ``mean`` the programs take ``bd * 4 * mean / max``
    channels, rounded down to a power of two, at least 8 and at most ``bd``. Fitted to the H200 probe
    (benchmarks/probe_varlen_tile.py, 2026-12-03, 64 sessions of 16-4096 tokens): log-uniform lengths (mean 633,
    max 4030) ran 0.94x an equal batch with 8 channels against 1.37x with 16 and 1.38x with 4; uniform ones (mean
    2173, max 4021) 1.01x with 16 and 1.05x with 8; 4 and 2 channels were slower in both. ``MAMBA_STATE_SCAN_BD``
    overrides."""
    if os.environ.get("MAMBA_STATE_SCAN_BD"):
        return bd
    lengths = [table[i + 2] - table[i + 1] for i in range(0, len(table), 3)]
    target = bd * 4 * (sum(lengths) / len(lengths)) / max(lengths)
    small = bd
    while small > 8 and small > target:
        small //= 2
    if ngroups > 1:  # a program's channels must share one group
        small = min(small, _pow2_divisor(dim // ngroups))
    return small


def packed_forward_by_sequence(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                               z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
                               reset: Optional[Tensor], delta_softplus: bool,
                               bounds: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Packed sequences (batch 1, ``bounds`` = cu_seqlens as a host list) without a backward: each sequence in its
    own programs (``_scan_fwd_segments_kernel``), side by side as the rows of a batch. Returns ``(out
    [1, dim, seqlen] in u.dtype, last [nseq, dim, dstate] float32)``; an empty sequence's row is zero (the
    launcher puts its initial state there). B and C [1, ngroups, dstate, seqlen]."""
    from . import triton_kernels as K

    _, dim, L = u.shape
    ngroups, dstate, nseq = B.shape[1], A.shape[1], len(bounds) - 1
    u = _layout_of(u)
    delta = _like(delta, u)
    B = B if B.stride(-1) == 1 else B.contiguous()
    C = C if C.stride(-1) == 1 else C.contiguous()
    z = _like(z, u) if z is not None else None
    table = segment_table(bounds)
    nseg = len(table) // 3
    out = torch.empty_like(u)
    last = (torch.empty if nseg == nseq else torch.zeros)(nseq, dim, dstate, device=u.device, dtype=torch.float32)
    if nseg == 0:
        return out, last
    bd, bn, warps = block_sizes(dim, dstate, ngroups, batch=nseg, device=u.device)
    bd = _skewed_block(bd, table, dim, ngroups)
    seg = cached_host_tensor(table, torch.int32, u.device)
    with launch_device(u):
        K._scan_fwd_segments_kernel[(_cdiv(dim, bd), nseg)](
            u, delta, A.contiguous().float(), B, C, D.contiguous() if D is not None else None, z,
            delta_bias.contiguous() if delta_bias is not None else None,
            initial_state.contiguous().float() if initial_state is not None else None, _reset_bytes(reset),
            out, last, seg, dim, dstate, dim // ngroups, u.stride(1), B.stride(1), B.stride(2), C.stride(1),
            C.stride(2), SOFTPLUS=bool(delta_softplus), BD=bd, BN=bn, num_warps=warps)
    return out, last


scan_fwd = torch.library.custom_op("mamba_state::scan_fwd", mutates_args=())(scan_forward)


@scan_fwd.register_fake
def _scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, initial_state, reset, delta_softplus, chunk,
                   keep_ypre=True, seq_start=None, seq_end=None, nseq=0):
    batch, dim, L = u.shape
    dstate = A.shape[1]
    nch = (L + chunk - 1) // chunk
    rows = nseq if seq_start is not None else batch
    return (torch.empty_like(u), u.new_empty((rows, dim, dstate), dtype=torch.float32),
            u.new_empty((batch, dim, nch, dstate), dtype=torch.float32),
            torch.empty_like(u) if z is not None and keep_ypre else u.new_empty(0))


@torch.library.custom_op("mamba_state::scan_bwd", mutates_args=())
def scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], reset: Optional[Tensor], checkpoints: Tensor, ypre: Tensor, dout: Tensor,
             dlast: Optional[Tensor], delta_softplus: bool, chunk: int, initial_state: Optional[Tensor] = None,
             seq_start: Optional[Tensor] = None, seq_end: Optional[Tensor] = None, nseq: int = 0
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = scan_backward(u, delta, A, B, C, D, z, delta_bias, reset, checkpoints, ypre, dout, dlast,
                          delta_softplus, chunk, initial_state=initial_state, seq_start=seq_start, seq_end=seq_end,
                          nseq=nseq)
    return grads[:9]  # type: ignore[return-value]


def scan_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                  z: Optional[Tensor], delta_bias: Optional[Tensor], reset: Optional[Tensor], checkpoints: Tensor,
                  ypre: Tensor, dout: Tensor, dlast: Optional[Tensor], delta_softplus: bool, chunk: int,
                  want_y: bool = False, initial_state: Optional[Tensor] = None, seq_start: Optional[Tensor] = None,
                  seq_end: Optional[Tensor] = None, nseq: int = 0, dz_out: Optional[Tensor] = None
                  ) -> tuple[Tensor, ...]:
    """The backward launches behind ``mamba_state::scan_bwd`` (same arguments and first nine outputs). With
    ``want_y`` and z, a tenth output: the gated output ``y = ypre * silu(z)`` in u's layout and dtype, which the
    kernel recomputes where it reads ypre and z anyway (as upstream's ``recompute_out_z``), for a caller that
    did not keep y (:class:`mamba_state.adapters.mamba_inner.MambaInnerFn`). With ``seq_start`` / ``seq_end``
    (packed sequences): ``initial_state`` (or None: zeros) and ``dlast`` are [nseq, dim, dstate], and so is the
    initial states' gradient (zero for an empty sequence: the launcher routes its final state's gradient).
    ``dz_out``: z's gradient is written there (z's shape, in u's layout: a caller's slice of a larger gradient,
    which saves a copy)."""
    from .._jit import TILE
    from . import triton_kernels as K

    batch, dim, L = u.shape
    ngroups, dstate = B.shape[1], A.shape[1]
    u = _layout_of(u)
    delta, dout = _like(delta, u), _like(dout, u)
    B, C = B.contiguous(), C.contiguous()
    Af = A.contiguous().float()
    z = _like(z, u) if z is not None else None
    nch = checkpoints.shape[2]
    varlen = seq_start is not None
    mode = backward_mode(u, batch, dim, dstate, nch, ngroups)
    if mode == "tp" and varlen:  # the time-parallel pass has no packed-sequence marks
        mode = "chunk"
    tp = mode == "tp"
    chunked = mode in ("chunk", "tp")
    bd, bn, warps = block_sizes(dim, dstate, ngroups, backward=True, batch=batch, device=u.device, seqpar=chunked)
    dblocks = _cdiv(dim, bd)
    splits = nch if tp else backward_splits(batch, dblocks, nch, u.device) if chunked else 1
    parts = splits * batch  # partial sums of dA, dD, ddelta_bias (and scratch) per program row
    half = 0 if varlen else backward_half_tiles()
    cap = register_cap("BWD") if u.is_cuda else {}  # a launch option the interpreter does not take
    sub = (chunk // TILE.value) * (2 if half >= 2 else 1)  # scratch states a program row
    dev, f32 = u.device, torch.float32
    scratch = torch.empty(0 if tp else parts, dim, sub, dstate, device=dev, dtype=f32)
    du = torch.empty_like(u)
    ddelta = torch.empty_like(delta)
    if dz_out is not None and (z is None or dz_out.shape != z.shape or dz_out.stride() != z.stride()):
        raise ValueError(f"dz_out: expected z's shape and layout {list(z.shape) if z is not None else None} "
                         f"{z.stride() if z is not None else ''}, found {list(dz_out.shape)} {dz_out.stride()}")
    dz = dz_out if dz_out is not None else torch.empty_like(z) if z is not None else u.new_empty(0)
    y_out = torch.empty_like(u) if want_y and z is not None else None
    dA_part = torch.empty(parts, dim, dstate, device=dev, dtype=f32)
    dB = torch.zeros(batch, ngroups, dstate, L, device=dev, dtype=f32)
    dC = torch.zeros(batch, ngroups, dstate, L, device=dev, dtype=f32)
    dD_part = torch.empty(parts, dim, device=dev, dtype=f32) if D is not None else None
    dbias_part = torch.empty(parts, dim, device=dev, dtype=f32) if delta_bias is not None else None
    # packed: every sequence's row is written at its first step; an empty sequence's stays zero
    dinit = (torch.zeros(nseq, dim, dstate, device=dev, dtype=f32) if varlen
             else torch.empty(batch, dim, dstate, device=dev, dtype=f32))
    rst = _reset_bytes(reset)
    # absent inputs go in as None: the kernels' HAS_* flags follow from them (optional_inputs)
    Dp = D.contiguous().float() if D is not None else None
    biasp = delta_bias.contiguous().float() if delta_bias is not None else None
    ypp = _like(ypre, u) if z is not None else None
    glast = dlast.contiguous().float() if dlast is not None else None
    vinit = vlast = None
    if varlen:  # the final states' gradients enter at the sequences' last steps, not at the end of the row
        vlast, glast = glast, None
        vinit = initial_state.contiguous().float() if initial_state is not None else None
    hin = None
    with launch_device(u):
        if chunked:
            # (1) every chunk's local adjoint from zero and its decay product, in parallel; (2) right-to-left pass
            # over chunk boundaries: hin[c] and dinit; (3) below: gradients per chunk
            summ = torch.empty(batch, dim, nch, dstate, device=dev, dtype=f32)
            prod = torch.empty_like(summ)
            hin = torch.empty_like(summ)
            # the local sweep keeps only h and the decay product live: twice the channels of the forward's block
            bdl = min(max(1, 256 // bn), triton_next_pow2(dim))
            if ngroups > 1:
                bdl = min(bdl, _pow2_divisor(dim // ngroups))
            K._scan_bwd_local_kernel[(_cdiv(dim, bdl), batch, nch)](
                delta, Af, C, z, biasp, rst, dout, summ, prod, seq_start, seq_end, vlast,
                dim, L, dstate, dim // ngroups, nch, u.stride(0), u.stride(1), C.stride(0), C.stride(1), C.stride(2),
                SOFTPLUS=bool(delta_softplus), CHUNK=int(chunk), BD=bdl, BN=bn,
                num_warps=max(1, min(8, (bdl * bn) // 512)))
            block = 64  # many small programs: this pass is latency-bound (nchunks dependent steps)
            K._carry_kernel[(_cdiv(dim * dstate, block), batch)](
                glast, summ, prod, hin, torch.empty_like(summ[:, :, 0]) if varlen else dinit, dim, dstate, nch,
                REVERSE=True, BLOCK=block, num_warps=2)
            del summ, prod
            glast = None  # the carry pass has taken it
        if tp:
            from . import triton_time_parallel as TP

            bdt, tp_warps = time_parallel_plan(int(chunk), dim // ngroups, dim)
            TP._scan_bwd_tp_kernel[(_cdiv(dim, bdt), batch, nch)](
                u, delta, Af, B, C, Dp, z, biasp, rst, checkpoints.contiguous(), dout, hin, ypp, y_out,
                du, ddelta, dA_part, dB, dC, dD_part, dz if z is not None else None, dbias_part,
                dim, L, dstate, dim // ngroups, nch, batch, u.stride(0), u.stride(1),
                B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
                dB.stride(0), dB.stride(1), dB.stride(2),
                SOFTPLUS=bool(delta_softplus), CHUNK=int(chunk), BD=bdt, num_warps=tp_warps)
        else:
            K._scan_bwd_kernel[(dblocks, batch, splits) if chunked else (dblocks, batch)](
                u, delta, Af, B, C, Dp, z, biasp, rst,
                checkpoints.contiguous(), dout, glast, scratch, ypp, y_out,
                du, ddelta, dA_part, dB, dC, dD_part, dz if z is not None else None, dbias_part,
                None if chunked and not varlen else dinit, hin, seq_start, seq_end, vinit, vlast,
                dim, L, dstate, dim // ngroups, nch, batch, splits, u.stride(0), u.stride(1),
                B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
                dB.stride(0), dB.stride(1), dB.stride(2),
                SOFTPLUS=bool(delta_softplus), CHUNK=int(chunk), MODE=1 if chunked else 0, BD=bd, BN=bn,
                HALF=half, num_warps=warps, **cap,
            )
    dA = dA_part.sum(0).to(A.dtype)
    dD = dD_part.sum(0).to(D.dtype) if dD_part is not None and D is not None else u.new_empty(0)
    dbias = (dbias_part.sum(0).to(delta_bias.dtype) if dbias_part is not None and delta_bias is not None
             else u.new_empty(0))
    grads: tuple[Tensor, ...] = (du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dz, dbias, dinit)
    if want_y:
        grads += (y_out if y_out is not None else u.new_empty(0),)  # no gate, no gated output
    return grads


@scan_bwd.register_fake
def _scan_bwd_fake(u, delta, A, B, C, D, z, delta_bias, reset, checkpoints, ypre, dout, dlast, delta_softplus,
                   chunk, initial_state=None, seq_start=None, seq_end=None, nseq=0):
    batch, dim, L = u.shape
    dstate = A.shape[1]
    rows = nseq if seq_start is not None else batch
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), torch.empty_like(D) if D is not None else u.new_empty(0),
            torch.empty_like(z) if z is not None else u.new_empty(0),
            torch.empty_like(delta_bias) if delta_bias is not None else u.new_empty(0),
            u.new_empty((rows, dim, dstate), dtype=torch.float32))


class ScanFn(torch.autograd.Function):
    """Differentiable Triton scan over (u, delta, A, B, C, D, z, delta_bias, initial_state); B/C 4-D. With
    ``seq_start`` / ``seq_end`` / ``nseq``, packed sequences (see the module docstring)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, reset, delta_softplus, chunk,
                seq_start=None, seq_end=None, nseq=0):
        if seq_start is None:  # the call as before packed sequences existed (the same custom-op schema use)
            out, last, ckpt, ypre = torch.ops.mamba_state.scan_fwd(u, delta, A, B, C, D, z, delta_bias,
                                                                   initial_state, reset, delta_softplus, chunk)
        else:
            out, last, ckpt, ypre = torch.ops.mamba_state.scan_fwd(u, delta, A, B, C, D, z, delta_bias,
                                                                   initial_state, reset, delta_softplus, chunk,
                                                                   True, seq_start, seq_end, nseq)
        ctx.nseq = nseq if seq_start is not None else None
        # packed: the backward's recompute needs the initial states and the marks
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, reset, ckpt, ypre,
                              *((initial_state, seq_start, seq_end) if seq_start is not None else ()))
        ctx.delta_softplus = delta_softplus
        ctx.chunk = chunk
        ctx.has_init = initial_state is not None
        ctx.init_dtype = initial_state.dtype if initial_state is not None else None
        # states at positions (positions.py) read the initial states of the first rows only of nseq
        ctx.init_rows = initial_state.shape[0] if initial_state is not None else 0
        ctx.mark_non_differentiable(ckpt, ypre)
        ctx.set_materialize_grads(False)  # an unused last state's gradient stays None: the kernels skip it
        return out, last, ckpt, ypre

    @staticmethod
    def backward(ctx, dout, dlast, _dckpt, _dypre):
        u, delta, A, B, C, D, z, delta_bias, reset, ckpt, ypre, *marks = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(u)
        if ctx.nseq is None:
            du, ddelta, dA, dB, dC, dD, dz, dbias, dinit = torch.ops.mamba_state.scan_bwd(
                u, delta, A, B, C, D, z, delta_bias, reset, ckpt, ypre, dout, dlast, ctx.delta_softplus, ctx.chunk)
        else:
            h0, seq_start, seq_end = marks
            du, ddelta, dA, dB, dC, dD, dz, dbias, dinit = torch.ops.mamba_state.scan_bwd(
                u, delta, A, B, C, D, z, delta_bias, reset, ckpt, ypre, dout, dlast, ctx.delta_softplus, ctx.chunk,
                h0, seq_start, seq_end, ctx.nseq)
        return (du, ddelta, dA, dB, dC,
                dD if D is not None else None,
                dz if z is not None else None,
                dbias if delta_bias is not None else None,
                dinit[:ctx.init_rows].to(ctx.init_dtype) if ctx.has_init else None,
                None, None, None, None, None, None)
