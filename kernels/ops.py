"""PyTorch custom ops (namespace ``mamba_state``) around the Triton kernels, their fake implementations, and the
autograd Function of the scan.

Ops (all take B/C as [batch, ngroups, dstate, seqlen]; the public wrapper adds the group axis for 3-D B/C):

* ``mamba_state::scan_fwd(u, delta, A, B, C, D?, z?, delta_bias?, initial_state?, reset?, delta_softplus, chunk)``
  -> ``(out [batch, dim, seqlen] u.dtype, last_state [batch, dim, dstate] f32,
  checkpoints [batch, dim, nchunks, dstate] f32, ypre)``; ``ypre`` is the output before the silu(z) gate
  ([batch, dim, seqlen] u.dtype when z is given, else empty), kept for the backward as upstream does.
* ``mamba_state::scan_bwd(u, delta, A, B, C, D?, z?, delta_bias?, reset?, checkpoints, ypre, dout, dlast?,
  delta_softplus, chunk)`` -> ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state)``; gradients of
  absent optional inputs come back as empty tensors.
* ``mamba_state::state_update(state!, x, dt, A, B, C, D?, z?, dt_bias?, reset?, dt_softplus)`` -> out; updates
  ``state`` [batch, dim, dstate] in place (x, dt, z [batch, dim]; B, C [batch, ngroups, dstate]).

What backward keeps: the inputs (no copies), the ``checkpoints`` (one fp32 state per chunk of ``chunk`` steps),
the pre-gate output ``ypre`` when z is given,
and, during the backward kernel only, a scratch of ``chunk / 8`` fp32 states per (batch, channel) and program
row (one row per batch row; ``backward_splits`` rows in the chunk-parallel backward, which also holds three
[batch, dim, nchunks, dstate] fp32 buffers while it runs: local adjoints, decay products, incoming adjoints).

The backward has two schedules (``backward_mode``, ``MAMBA_STATE_SCAN_BWD=seq|chunk|auto``): ``seq``, one program
per (batch, channel block) walking all chunks right to left; ``chunk``, chunk-parallel (small grids, or a
part-empty last wave).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
from torch import Tensor

from ._device import launch_device

__all__ = ["default_chunk", "block_sizes", "backward_mode", "backward_splits", "ScanFn"]


def default_chunk(seqlen: int) -> int:
    """Checkpoint interval (a power of two >= 8): about sqrt(8 * seqlen), which balances the checkpoints
    (seqlen / chunk states) against the backward scratch (chunk / 8 states)."""
    c = 2 ** round(math.log2(max(8.0, math.sqrt(8.0 * seqlen))))
    return int(min(1024, max(8, c)))


def _pow2_divisor(n: int) -> int:
    return n & -n


def _sm_count(device: torch.device) -> int:
    return _cuda_sm_count(device.index) if device.type == "cuda" else 132


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: Optional[int]) -> int:
    if index is None:
        index = torch.cuda.current_device()
    # cached: asked several times per scan, and a device-properties query costs host time
    return torch.cuda.get_device_properties(torch.device("cuda", index)).multi_processor_count


def block_sizes(dim: int, dstate: int, ngroups: int, backward: bool = False, batch: int = 1,
                device: torch.device = torch.device("cpu"), seqpar: bool = False) -> tuple[int, int, int]:
    """(BD channels per program, BN padded dstate, num_warps), one warp per program.

    Measured on an H100 (benchmarks/bench_scan.py --sweep, dstate 16): the forward is fastest with 8 channels
    per program up to about 16 programs per SM (batch x channel blocks), else 16; the
    sequence-parallel forward with 16; the backward with 8, or 4 when the grid is small (long sequences, small
    batch). The chunk-parallel backward (``seqpar`` with ``backward``) takes 8 (its grid is large; on an H100 at
    1x1536x16384 fwd+bwd ran 3.6-4.0 ms with 8 channels a program against 4.9-6.0 ms with 4).
    ``MAMBA_STATE_SCAN_[BWD_]BD`` and ``MAMBA_STATE_SCAN_[BWD_]WARPS`` override (for sweeps).
    """
    bn = max(1, triton_next_pow2(dstate))
    base = max(1, 128 // bn)
    programs = batch * _cdiv(dim, base)
    sms = _sm_count(device)
    if backward:
        target = base if programs >= 2 * sms or seqpar else max(1, base // 2)
    elif seqpar or programs > 16 * sms:
        target = max(1, 256 // bn)
    else:
        target = base
    env = os.environ.get("MAMBA_STATE_SCAN_BWD_BD" if backward else "MAMBA_STATE_SCAN_BD")
    target = int(env) if env else target
    bd = min(target, triton_next_pow2(dim))
    if ngroups > 1:  # a program's channels must share one group
        bd = min(bd, _pow2_divisor(dim // ngroups))
    wenv = os.environ.get("MAMBA_STATE_SCAN_BWD_WARPS" if backward else "MAMBA_STATE_SCAN_WARPS", "0")
    warps = int(wenv) or max(1, min(8, (bd * bn) // 512))
    return bd, bn, warps


def triton_next_pow2(n: int) -> int:
    return 1 if n <= 1 else 2 ** (int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _nchunks(seqlen: int, chunk: int) -> int:
    return -(-seqlen // chunk)


def use_sequence_parallel(u: Tensor, batch: int, dim_blocks: int, nchunks: int) -> bool:
    """Split the forward along the sequence when batch x channel blocks leave the GPU idle.

    ``MAMBA_STATE_SCAN_SEQPAR=0/1`` forces the choice (tests use it under the interpreter)."""
    env = os.environ.get("MAMBA_STATE_SCAN_SEQPAR")
    if env in ("0", "1"):
        return env == "1" and nchunks >= 2
    if nchunks < 2 or not u.is_cuda:
        return False
    # Below 16 chunks the work is small enough that one launch beats three (each costs host time).
    return nchunks >= 16 and batch * dim_blocks < 2 * _sm_count(u.device)


BWD_MODES = ("auto", "seq", "chunk")


# Backward schedule model. A one-warp backward program needs about 255 registers (H100, dstate 16, 8 channels), so
# an SM holds 8 of them: the grid runs in waves of 8 x SMs programs, and a program's time is proportional to the
# chunks it walks. Cost of a grid in chunk-times: ceil(programs / resident) * chunks per program.
_RESIDENT_PER_SM = 8
# the chunk-parallel schedule's extra launches (local sweep + carry) relative to its gradient pass
# (H100, 8x1536x2048 bf16: 0.24 + 0.09 ms against 2.17 ms)
_CHUNK_OVERHEAD = 0.15
_MAX_WAVES = 4  # cap on the gradient pass's grid: bounds the scratch by the GPU's size, not by seqlen


@functools.lru_cache(maxsize=256)
def _chunk_plan(programs: int, nchunks: int, resident: int) -> tuple[int, int]:
    """(splits, cost) minimising ceil(programs * splits / resident) * ceil(nchunks / splits); on ties, splits
    that divide the chunks evenly (no program idles in the last round), then the fewest (less scratch)."""
    top = max(1, min(nchunks, _cdiv(_MAX_WAVES * resident, max(1, programs))))
    best = min(range(1, top + 1),
               key=lambda g: (_cdiv(programs * g, resident) * _cdiv(nchunks, g), nchunks % g != 0, g))
    return best, _cdiv(programs * best, resident) * _cdiv(nchunks, best)


def backward_mode(u: Tensor, batch: int, dim: int, dstate: int, nchunks: int, ngroups: int = 1) -> str:
    """'seq' (one program per (batch, channel block) walks every chunk right to left) or 'chunk' (chunk-parallel:
    local adjoints per chunk, a short pass over chunk boundaries, then every chunk's gradients in parallel).

    ``MAMBA_STATE_SCAN_BWD=seq|chunk|auto`` forces the choice (auto when unset). Auto, on CUDA with at least 2
    chunks, compares the two grids' costs in waves (see ``_chunk_plan``) and takes 'chunk' when its cost times
    1.15 (its extra launches) is lower. On an H100 (bf16, dstate 16) that picks 'chunk' for 1x1536x16384 (one
    wave of 192 programs otherwise), 8x1536x2048 and 4x5120x2048 (1.45 and 2.4 waves: a part-empty last wave),
    and 'seq' for 8x2048x2048 and 64x256x1024 (1.94 waves), as measured.
    """
    env = os.environ.get("MAMBA_STATE_SCAN_BWD", "auto").strip().lower() or "auto"
    if env not in BWD_MODES:
        from mamba_state.errors import StateError

        raise StateError(f"MAMBA_STATE_SCAN_BWD: expected one of {', '.join(BWD_MODES)}, found {env!r}")
    if env != "auto":
        return env
    if nchunks < 2 or not u.is_cuda:
        return "seq"
    bd, _, _ = block_sizes(dim, dstate, ngroups, backward=True, batch=batch, device=u.device, seqpar=True)
    programs = batch * _cdiv(dim, bd)
    resident = _RESIDENT_PER_SM * _sm_count(u.device)
    seq_cost = _cdiv(programs, resident) * nchunks
    _, chunk_cost = _chunk_plan(programs, nchunks, resident)
    return "chunk" if chunk_cost * (1.0 + _CHUNK_OVERHEAD) < seq_cost else "seq"


def backward_splits(batch: int, dim_blocks: int, nchunks: int, device: torch.device) -> int:
    """Programs per (batch, channel block) in the chunk-parallel backward's gradient pass; program g takes chunks
    g, g + splits, ... The fewest splits that minimise the wave cost (``_chunk_plan``; at most 4 waves of
    resident programs, so the scratch of chunk / 8 states per program is bounded by the GPU, not by seqlen).
    H100, 1x1536x16384: 16 splits (3.39 ms fwd+bwd) against 4 (3.91), 8 (4.05), 24 (3.53).
    ``MAMBA_STATE_SCAN_BWD_SPLIT`` overrides."""
    env = os.environ.get("MAMBA_STATE_SCAN_BWD_SPLIT")
    if env:
        return max(1, min(nchunks, int(env)))
    return _chunk_plan(batch * dim_blocks, nchunks, _RESIDENT_PER_SM * _sm_count(device))[0]


def _dummy(t: Tensor) -> Tensor:
    return t.new_empty(1)


def _reset_bytes(reset: Optional[Tensor]) -> Optional[Tensor]:
    return None if reset is None else reset.contiguous().view(torch.uint8)


# ----------------------------------------------------------------------------------------------- forward op

def scan_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
                 reset: Optional[Tensor], delta_softplus: bool, chunk: int,
                 keep_ypre: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward launches (see the module docstring for the outputs); registered below as the custom op
    ``mamba_state::scan_fwd``, and called directly for inference, where no autograd or tracing is needed
    (``keep_ypre=False`` then skips writing the pre-gate output, which only the backward reads: ``ypre`` comes
    back empty). B and C may be strided views (time stride 1), D and delta_bias any float dtype: read as they
    are, no copies."""
    from . import _triton_scan as K

    batch, dim, L = u.shape
    ngroups, dstate = B.shape[1], A.shape[1]
    u, delta = u.contiguous(), delta.contiguous()
    B = B if B.stride(-1) == 1 else B.contiguous()
    C = C if C.stride(-1) == 1 else C.contiguous()
    A = A.contiguous().float()
    z = z.contiguous() if z is not None else None
    nch = _nchunks(L, chunk)
    out = torch.empty_like(u)
    last = torch.empty(batch, dim, dstate, device=u.device, dtype=torch.float32)
    ckpt = torch.empty(batch, dim, nch, dstate, device=u.device, dtype=torch.float32)
    bd0, _, _ = block_sizes(dim, dstate, ngroups, batch=batch, device=u.device)
    seqpar = use_sequence_parallel(u, batch, _cdiv(dim, bd0), nch)
    bd, bn, warps = block_sizes(dim, dstate, ngroups, batch=batch, device=u.device, seqpar=seqpar)
    init = initial_state.contiguous().float() if initial_state is not None else None
    rst = _reset_bytes(reset)
    store_ypre = z is not None and keep_ypre
    ypre = torch.empty_like(u) if store_ypre else u.new_empty(0)
    summ = torch.empty_like(ckpt) if seqpar else _dummy(A)
    prod = torch.empty_like(ckpt) if seqpar else _dummy(A)
    common = (
        u, delta, A, B, C,
        D.contiguous() if D is not None else _dummy(A),
        z if z is not None else _dummy(u),
        delta_bias.contiguous() if delta_bias is not None else _dummy(A),
        init if init is not None else _dummy(A),
        rst if rst is not None else _dummy(A),
        out, last, ckpt, summ, prod, ypre if store_ypre else _dummy(u),
        dim, L, dstate, dim // ngroups, nch,
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
    )
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                 HAS_INIT=init is not None, HAS_RESET=rst is not None, SOFTPLUS=bool(delta_softplus),
                 CHUNK=int(chunk), BD=bd, BN=bn, STORE_YPRE=store_ypre, num_warps=warps)
    with launch_device(u):
        if not seqpar:
            K._scan_fwd_kernel[(_cdiv(dim, bd), batch)](*common, MODE=0, **flags)
        else:
            # chunk summaries in parallel, a short pass over chunk boundaries, then every chunk's outputs
            K._scan_fwd_kernel[(_cdiv(dim, bd), batch, nch)](*common, MODE=1, **flags)
            block = 256
            K._carry_kernel[(_cdiv(dim * dstate, block), batch)](
                init if init is not None else _dummy(A), summ, prod, ckpt, last, dim, dstate, nch,
                HAS_INIT=init is not None, BLOCK=block, num_warps=4)
            K._scan_fwd_kernel[(_cdiv(dim, bd), batch, nch)](*common, MODE=2, **flags)
    return out, last, ckpt, ypre


scan_fwd = torch.library.custom_op("mamba_state::scan_fwd", mutates_args=())(scan_forward)


@scan_fwd.register_fake
def _scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, initial_state, reset, delta_softplus, chunk,
                   keep_ypre=True):
    batch, dim, L = u.shape
    dstate = A.shape[1]
    nch = (L + chunk - 1) // chunk
    return (torch.empty_like(u), u.new_empty((batch, dim, dstate), dtype=torch.float32),
            u.new_empty((batch, dim, nch, dstate), dtype=torch.float32),
            torch.empty_like(u) if z is not None and keep_ypre else u.new_empty(0))


# ---------------------------------------------------------------------------------------------- backward op

@torch.library.custom_op("mamba_state::scan_bwd", mutates_args=())
def scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], reset: Optional[Tensor], checkpoints: Tensor, ypre: Tensor, dout: Tensor,
             dlast: Optional[Tensor], delta_softplus: bool, chunk: int
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from . import _triton_scan as K

    batch, dim, L = u.shape
    ngroups, dstate = B.shape[1], A.shape[1]
    u, delta, B, C = u.contiguous(), delta.contiguous(), B.contiguous(), C.contiguous()
    Af = A.contiguous().float()
    z = z.contiguous() if z is not None else None
    dout = dout.contiguous()
    nch = checkpoints.shape[2]
    mode = backward_mode(u, batch, dim, dstate, nch, ngroups)
    chunked = mode == "chunk"
    bd, bn, warps = block_sizes(dim, dstate, ngroups, backward=True, batch=batch, device=u.device, seqpar=chunked)
    dblocks = _cdiv(dim, bd)
    splits = backward_splits(batch, dblocks, nch, u.device) if chunked else 1
    parts = splits * batch  # partial sums of dA, dD, ddelta_bias (and scratch) per program row
    sub = chunk // 8
    dev, f32 = u.device, torch.float32
    scratch = torch.empty(parts, dim, sub, dstate, device=dev, dtype=f32)
    du = torch.empty_like(u)
    ddelta = torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else u.new_empty(0)
    dA_part = torch.empty(parts, dim, dstate, device=dev, dtype=f32)
    dB = torch.zeros(batch, ngroups, dstate, L, device=dev, dtype=f32)
    dC = torch.zeros(batch, ngroups, dstate, L, device=dev, dtype=f32)
    dD_part = torch.empty(parts, dim, device=dev, dtype=f32)
    dbias_part = torch.empty(parts, dim, device=dev, dtype=f32)
    dinit = torch.empty(batch, dim, dstate, device=dev, dtype=f32)
    rst = _reset_bytes(reset)
    Dp = D.contiguous().float() if D is not None else _dummy(Af)
    zp = z if z is not None else _dummy(u)
    biasp = delta_bias.contiguous().float() if delta_bias is not None else _dummy(Af)
    rstp = rst if rst is not None else _dummy(Af)
    ypp = ypre.contiguous() if z is not None else _dummy(u)
    glast = dlast.contiguous().float() if dlast is not None else _dummy(Af)
    hin = _dummy(Af)
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
                delta, Af, C, zp, biasp, rstp, dout, summ, prod,
                dim, L, dstate, dim // ngroups, nch, C.stride(0), C.stride(1), C.stride(2),
                HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_RESET=rst is not None,
                SOFTPLUS=bool(delta_softplus), CHUNK=int(chunk), BD=bdl, BN=bn,
                num_warps=max(1, min(8, (bdl * bn) // 512)))
            block = 64  # many small programs: this pass is latency-bound (nchunks dependent steps)
            K._carry_bwd_kernel[(_cdiv(dim * dstate, block), batch)](
                glast, summ, prod, hin, dinit, dim, dstate, nch, HAS_GLAST=dlast is not None, BLOCK=block, num_warps=2)
            del summ, prod
        K._scan_bwd_kernel[(dblocks, batch, splits) if chunked else (dblocks, batch)](
            u, delta, Af, B, C, Dp, zp, biasp, rstp,
            checkpoints.contiguous(), dout, glast, scratch, ypp,
            du, ddelta, dA_part, dB, dC, dD_part, dz if z is not None else _dummy(u), dbias_part, dinit, hin,
            dim, L, dstate, dim // ngroups, nch, batch, splits,
            B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
            dB.stride(0), dB.stride(1), dB.stride(2),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            HAS_GLAST=dlast is not None and not chunked, HAS_RESET=rst is not None, SOFTPLUS=bool(delta_softplus),
            CHUNK=int(chunk), MODE=1 if chunked else 0, BD=bd, BN=bn, num_warps=warps,
        )
    dA = dA_part.sum(0).to(A.dtype)
    dD = dD_part.sum(0).to(D.dtype) if D is not None else u.new_empty(0)
    dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else u.new_empty(0)
    return du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dz, dbias, dinit


@scan_bwd.register_fake
def _scan_bwd_fake(u, delta, A, B, C, D, z, delta_bias, reset, checkpoints, ypre, dout, dlast, delta_softplus,
                   chunk):
    batch, dim, L = u.shape
    dstate = A.shape[1]
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), torch.empty_like(D) if D is not None else u.new_empty(0),
            torch.empty_like(z) if z is not None else u.new_empty(0),
            torch.empty_like(delta_bias) if delta_bias is not None else u.new_empty(0),
            u.new_empty((batch, dim, dstate), dtype=torch.float32))


# -------------------------------------------------------------------------------------------- single step op

@torch.library.custom_op("mamba_state::state_update", mutates_args=("state",))
def state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 z: Optional[Tensor], dt_bias: Optional[Tensor], reset: Optional[Tensor],
                 dt_softplus: bool) -> Tensor:
    from . import _triton_scan as K

    batch, dim, dstate = state.shape
    ngroups = B.shape[1]
    work = state if state.is_contiguous() else state.contiguous()
    x, dt = x.contiguous(), dt.contiguous()
    B, C = B.contiguous(), C.contiguous()
    Af = A.contiguous().float()
    out = torch.empty_like(x)
    bd, bn, warps = block_sizes(dim, dstate, ngroups, batch=batch, device=state.device)
    rst = _reset_bytes(reset)
    with launch_device(x):
        K._state_update_kernel[(_cdiv(dim, bd), batch)](
            work, x, dt, Af, B, C,
            D.contiguous().float() if D is not None else _dummy(Af),
            z.contiguous() if z is not None else _dummy(x),
            dt_bias.contiguous().float() if dt_bias is not None else _dummy(Af),
            rst if rst is not None else _dummy(Af),
            out, dim, dstate, dim // ngroups, B.stride(0), B.stride(1), C.stride(0), C.stride(1),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, HAS_RESET=rst is not None,
            SOFTPLUS=bool(dt_softplus), BD=bd, BN=bn, num_warps=warps,
        )
    if work is not state:
        state.copy_(work)
    return out


@state_update.register_fake
def _state_update_fake(state, x, dt, A, B, C, D, z, dt_bias, reset, dt_softplus):
    return torch.empty_like(x)


# ------------------------------------------------------------------------------------------------ autograd

class ScanFn(torch.autograd.Function):
    """Differentiable Triton scan over (u, delta, A, B, C, D, z, delta_bias, initial_state); B/C 4-D."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, reset, delta_softplus, chunk):
        out, last, ckpt, ypre = torch.ops.mamba_state.scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                                               reset, delta_softplus, chunk)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, reset, ckpt, ypre)
        ctx.delta_softplus = delta_softplus
        ctx.chunk = chunk
        ctx.has_init = initial_state is not None
        ctx.init_dtype = initial_state.dtype if initial_state is not None else None
        ctx.mark_non_differentiable(ckpt, ypre)
        return out, last, ckpt, ypre

    @staticmethod
    def backward(ctx, dout, dlast, _dckpt, _dypre):
        u, delta, A, B, C, D, z, delta_bias, reset, ckpt, ypre = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(u)
        du, ddelta, dA, dB, dC, dD, dz, dbias, dinit = torch.ops.mamba_state.scan_bwd(
            u, delta, A, B, C, D, z, delta_bias, reset, ckpt, ypre, dout, dlast, ctx.delta_softplus, ctx.chunk)
        return (du, ddelta, dA, dB, dC,
                dD if D is not None else None,
                dz if z is not None else None,
                dbias if delta_bias is not None else None,
                dinit.to(ctx.init_dtype) if ctx.has_init else None,
                None, None, None)

