"""Launch plans and small launch helpers shared by the ops (block sizes, chunk sizes, backward schedules).

The plans are hand tables measured with ``benchmarks/bench_scan.py --sweep`` and kept here in one module rather
than left to ``@triton.autotune``: autotuning benchmarks every configuration at the first call of each new key
(seconds of compile and timing per shape, paid again by every process) and cannot run while a CUDA graph is being
captured, which the decode path does. The environment overrides below exist for sweeps.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
from torch import Tensor

__all__ = ["default_chunk", "block_sizes", "backward_mode", "backward_splits", "backward_half_tiles",
           "time_parallel_plan", "register_cap", "use_sequence_parallel", "needs_grad"]


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
        # 16 channels (dstate 16) in both schedules: measured on an H200 (probe_scan_bwd.py, 2026-12-02) 13-20%
        # faster than 8 at every shape of the issue, although it spills: twice the independent work per warp hides
        # more of the latency of the step's dependent chain, at the same 8 resident warps per SM
        target = max(1, 256 // bn)
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


BWD_MODES = ("auto", "seq", "chunk", "tp")


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

    ``MAMBA_STATE_SCAN_BWD=seq|chunk|tp|auto`` forces the choice (auto when unset; ``tp``: the chunk-parallel
    schedule with the time-parallel gradient pass, which auto does not pick yet). Auto, on CUDA with at least 2
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


def time_parallel_plan(chunk: int, cpg: int, dim: int) -> tuple[int, int]:
    """(channels a program, warps) of the time-parallel gradient pass (``MAMBA_STATE_SCAN_BWD=tp``): [channels,
    chunk] tiles of ``MAMBA_STATE_SCAN_TP_TILE`` elements (1,024 by default: 8 a thread on 4 warps; compiled for
    sm_90 with triton 3.6 and 3.9, 160-164 registers and no spills at chunks 128 and 256), at most the largest
    power of two dividing a group's channels (a program's channels share B and C) and dim's next power of two;
    ``MAMBA_STATE_SCAN_TP_WARPS`` warps (4). Not yet timed on a GPU: the overrides are for that sweep."""
    tile = int(os.environ.get("MAMBA_STATE_SCAN_TP_TILE", "1024"))
    warps = int(os.environ.get("MAMBA_STATE_SCAN_TP_WARPS", "4"))
    bd = max(1, tile // max(1, chunk))
    bd = min(1 << (bd.bit_length() - 1), _pow2_divisor(cpg), 1 << max(0, (dim - 1).bit_length()))
    return bd, warps


BWD_HALF_TILES = ("0", "1", "2", "3")


def backward_half_tiles() -> int:
    """How the backward's gradient pass walks an 8-step tile (``_scan_bwd_kernel``'s HALF): 0 all 8 reverse steps
    at once (9 recomputed states live), 1, 2 or 3 as two halves of 4 (5 states live), the state between the halves
    recomputed (1) or kept in the scratch (2 and 3; twice the scratch; 3 also computes each reverse step's decay
    anew instead of sharing the recompute's: fewer registers for more exponentials). Compiled for sm_90 at 16
    channels a warp, 0 spills about 0.5 KB a thread, 2 about 0.3 KB and 3 0.1 KB; on an H100 (2026-12-08) 3 timed
    within -2.4% / +4.1% of 0 and 2 slower, so 0 is the default (docs/kernel.md, "Half tiles").
    ``MAMBA_STATE_SCAN_BWD_HALF`` chooses; packed sequences always take 0."""
    env = os.environ.get("MAMBA_STATE_SCAN_BWD_HALF", "0").strip() or "0"
    if env not in BWD_HALF_TILES:
        from mamba_state.errors import StateError

        raise StateError(f"MAMBA_STATE_SCAN_BWD_HALF: expected one of {', '.join(BWD_HALF_TILES)}, found {env!r}")
    return int(env)


def register_cap(scan_pass: str) -> dict[str, int]:
    """Launch options capping the registers a thread of the scan's ``"FWD"`` or ``"BWD"`` (gradient) pass
    (``maxnreg``), from ``MAMBA_STATE_SCAN_FWD_MAXNREG`` / ``MAMBA_STATE_SCAN_BWD_MAXNREG`` (unset: none; the
    compiler takes what it needs, 167 for the forward and 255 for the gradient pass at dstate 16 on sm_90). The
    gradient pass is latency-bound more than issue-bound (its loop is about 32 instructions per (step, channel,
    state), which at the H100's issue rate would take a fifth of the measured time), and 255 registers allow 8
    one-warp programs an SM; a cap trades spills for occupancy: compiled for sm_90 (triton 3.6), 168 registers
    (12 programs an SM) spill 144 B a thread with half tiles 3 at 8 channels, 128 (16) 428 B. Not timed yet:
    an override for the GPU sweep (``benchmarks/probe_scan_bwd.py --maxnreg``)."""
    name = f"MAMBA_STATE_SCAN_{scan_pass}_MAXNREG"
    env = os.environ.get(name, "").strip()
    if not env:
        return {}
    try:
        cap = int(env)
    except ValueError:
        cap = -1
    if not 24 <= cap <= 255:
        from mamba_state.errors import StateError

        raise StateError(f"{name}: expected an int in [24, 255], found {env!r}")
    return {"maxnreg": cap}


def _reset_bytes(reset: Optional[Tensor]) -> Optional[Tensor]:
    return None if reset is None else reset.contiguous().view(torch.uint8)


def needs_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd will record an op on these tensors (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
