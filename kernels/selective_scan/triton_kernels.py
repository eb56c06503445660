"""Triton kernels of Mamba-1's selective scan: the forward, the backward and their chunk-boundary passes.

Layout (the wrappers in :mod:`mamba_state.kernels.selective_scan.ops` make every input contiguous in time):
    u, delta, z, out:   [batch, dim, seqlen], all with the same strides (sxb, sxd, 1): contiguous, or
                        channel-major ([dim, batch, seqlen] in memory, as a projection's GEMM writes it)
    B, C:               [batch, ngroups, dstate, seqlen]
    A:                  [dim, dstate] float32
    initial_state:      [batch, dim, dstate] float32
    reset:              uint8 [batch, seqlen] (bool viewed as bytes)
    checkpoints:        [batch, dim, nchunks, dstate] float32: the state entering chunk c (before step c*CHUNK)

One program owns one batch row and a block of ``BD`` channels; its state tile [BD, BN] lives in registers, in
float32. Time advances in tiles of TILE = 8 steps: each input is read as one coalesced [rows, 8] tile and split
into its 8 columns in registers (reshape + split), the 8 recurrence steps are unrolled, and the 8 outputs are
joined back into one tile for a single store.

Each unrolled 8-step body is written once, in a helper: ``_steps8`` (the forward recurrence, for the forward and
the backward's recompute), ``_bsteps8`` (the reverse steps) and ``_lsteps8`` (the adjoint alone). Their columns
travel as tuples of 8 and the step index as a constant, so after inlining each is the same straight-line code
as written out by hand: values stay in registers.

Optional inputs are ``None`` when absent; ``optional_inputs`` derives each ``HAS_*`` flag from its pointer.

Packed sequences (``cu_seqlens``, batch 1; VARLEN, set when the per-step marks ``vs_ptr`` / ``ve_ptr`` are given):
``vs[t]`` is the sequence whose first step is t (else -1), ``ve[t]`` the sequence whose last step is t (else -1),
int32, padded with -1 to whole tiles. A sequence start acts as a reset after which the state is that sequence's
initial state instead of zero ([num_seqs, dim, dstate]), and a sequence end stores the state as that sequence's
final state ([num_seqs, dim, dstate]). Both are linear in the state, so the chunk summaries, the carry pass and
the chunk-parallel backward keep their form. The ``_v*`` helpers wrap the step functions with these per-step
events (one scalar load and a warp-uniform branch each); without VARLEN the kernels compile exactly as before.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._jit import (LN2, LOG2E, TILE, _channel_offsets, _halves8, _join4, _join8, _sigmoid, _softplus, _split4, _split8,
                   _unhalves8, optional_inputs)


@triton.jit
def _channel_block(A_ptr, bias_ptr, D_ptr, dim, dstate, cpg, BD: tl.constexpr, BN: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr):
    """This program's block of channels (program axis 0): offsets, masks and group (_channel_offsets), A and
    A * LOG2E [BD, BN] in float32, and delta_bias and D [BD] (zeros where absent)."""
    offs_d, offs_n, mask_d, mask_n, mask_dn, grp = _channel_offsets(dim, dstate, cpg, BD, BN)
    A = tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    A2 = A * LOG2E
    bias = tl.zeros((BD,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros((BD,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return offs_d, offs_n, mask_d, mask_n, mask_dn, grp, A, A2, bias, Dv


@triton.jit
def _state_offsets(pid_b, offs_d, offs_n, dim, dstate, nchunks):
    """Offsets of this program's [BD, BN] tile in a [batch, dim, dstate] state and in chunk 0 of a
    [batch, dim, nchunks, dstate] buffer (chunk c: + c * dstate)."""
    st_off = (pid_b * dim + offs_d[:, None]) * dstate + offs_n[None, :]
    ck_off = ((pid_b * dim + offs_d[:, None]) * nchunks) * dstate + offs_n[None, :]
    return st_off, ck_off


@triton.jit
def _tile_offsets(t0, L, mask_d):
    """Steps t0 .. t0+7: their offsets, which lie before L, and the [BD, 8] mask of the tile."""
    offs_t = t0 + tl.arange(0, TILE)
    mt = offs_t < L
    return offs_t, mt, mask_d[:, None] & mt[None, :]


@triton.jit
def _dt_tile(dt_ptr, row, bias, offs_t, m2, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta of a tile as read (draw) and as used (dt: plus delta_bias, softplus; 0 past L, a no-op step)."""
    draw = tl.load(dt_ptr + row + offs_t[None, :], mask=m2, other=0.0).to(tl.float32)
    dt = draw
    if HAS_BIAS:
        dt = dt + bias[:, None]
    if SOFTPLUS:
        dt = _softplus(dt)
    dt = tl.where(m2, dt, 0.0)
    return draw, dt


@triton.jit
def _keep_tile(reset_ptr, rst_row, offs_t, mt, HAS_RESET: tl.constexpr):
    """[1, 8]: 0 at a reset (the state is cleared before that step), else 1."""
    if HAS_RESET:
        r = tl.load(reset_ptr + rst_row + offs_t[None, :], mask=mt[None, :], other=0)
        keep = tl.where(r != 0, 0.0, 1.0)
    else:
        keep = tl.full((1, TILE), 1.0, tl.float32)
    return keep


@triton.jit
def _load_tile(u_ptr, dt_ptr, B_ptr, reset_ptr, row, bc_row, rst_row, bias, offs_t, mt, m2, mask_n,
               HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_RESET: tl.constexpr):
    """Inputs of steps t0 .. t0+7 as tiles; steps past L get dt = 0, B = 0, keep = 1 (no-ops)."""
    u = tl.load(u_ptr + row + offs_t[None, :], mask=m2, other=0.0).to(tl.float32)
    draw, dt = _dt_tile(dt_ptr, row, bias, offs_t, m2, HAS_BIAS, SOFTPLUS)
    mb = mask_n[:, None] & mt[None, :]
    Bt = tl.load(B_ptr + bc_row + offs_t[None, :], mask=mb, other=0.0).to(tl.float32)
    keep = _keep_tile(reset_ptr, rst_row, offs_t, mt, HAS_RESET)
    return u, draw, dt, Bt, keep


@triton.jit
def _split_inputs(dt, dtu, Bt, keep, BD: tl.constexpr, BN: tl.constexpr):
    """A tile's dt, dt*u, B and keep as tuples of their 8 columns."""
    return _split8(dt, BD), _split8(dtu, BD), _split8(Bt, BN), _split8(keep, 1)


@triton.jit
def _decay_exponent(dt, A2, keep, HAS_RESET: tl.constexpr):
    """dt*A*LOG2E for a [BD] column dt and A2 [BD, BN], and -inf at a reset (keep 0, a [1] column): exp2 of it
    is the step's decay times keep, exactly (exp2(-inf) = 0; adding 0 changes no product), for one fused
    multiply-add an element instead of a multiply by keep after the exponential."""
    e = dt[:, None] * A2
    if HAS_RESET:
        e = e + tl.where(keep > 0.5, 0.0, float("-inf"))[:, None]
    return e


@triton.jit
def _fstep(x, A2, dt, dtu, Bc, keep, HAS_RESET: tl.constexpr):
    """One step: x <- exp(dt*A) * keep * x + dt*u*B. Returns (new x, the decay used)."""
    a = tl.exp2(_decay_exponent(dt, A2, keep, HAS_RESET))
    return a * x + dtu[:, None] * Bc[None, :], a


@triton.jit
def _step(x, P, A2, d, v, b, k, c, I: tl.constexpr, HAS_RESET: tl.constexpr, PROD: tl.constexpr,
          OUT: tl.constexpr):
    """Step I of a tile (columns d = dt, v = dt*u, b = B, k = keep, c = C): the new state, P times the decay
    (PROD; else 0) and the output C . x (OUT; else 0). A jit function cannot return None: the 0s stand in."""
    x, a = _fstep(x, A2, d[I], v[I], b[I], k[I], HAS_RESET)
    Pa = 0.0
    if PROD:
        Pa = P * a
    y = 0.0
    if OUT:
        y = tl.sum(x * c[I][None, :], 1)
    return x, Pa, y


@triton.jit
def _steps8(x0, P, A2, d, v, b, k, c, BD: tl.constexpr, HAS_RESET: tl.constexpr, PROD: tl.constexpr,
            OUT: tl.constexpr):
    """The 8 steps of a tile from state x0. Returns (x0 and the 8 states after each step, as a tuple of 9;
    P times the 8 decays when PROD, else 0; the 8 outputs as one [BD, 8] tile when OUT, else 0). P and c may
    be None when PROD, OUT are off."""
    x1, P, y0 = _step(x0, P, A2, d, v, b, k, c, 0, HAS_RESET, PROD, OUT)
    x2, P, y1 = _step(x1, P, A2, d, v, b, k, c, 1, HAS_RESET, PROD, OUT)
    x3, P, y2 = _step(x2, P, A2, d, v, b, k, c, 2, HAS_RESET, PROD, OUT)
    x4, P, y3 = _step(x3, P, A2, d, v, b, k, c, 3, HAS_RESET, PROD, OUT)
    x5, P, y4 = _step(x4, P, A2, d, v, b, k, c, 4, HAS_RESET, PROD, OUT)
    x6, P, y5 = _step(x5, P, A2, d, v, b, k, c, 5, HAS_RESET, PROD, OUT)
    x7, P, y6 = _step(x6, P, A2, d, v, b, k, c, 6, HAS_RESET, PROD, OUT)
    x8, P, y7 = _step(x7, P, A2, d, v, b, k, c, 7, HAS_RESET, PROD, OUT)
    y = 0.0
    if OUT:
        y = _join8(y0, y1, y2, y3, y4, y5, y6, y7, BD)
    return (x0, x1, x2, x3, x4, x5, x6, x7, x8), P, y


@triton.jit
def _vstep(x, P, A2, d, v, b, k, c, I: tl.constexpr, t0, vs_ptr, ve_ptr, init_ptr, last_ptr, st_off, sd, mask_dn,
           HAS_RESET: tl.constexpr, PROD: tl.constexpr, OUT: tl.constexpr, HAS_INIT: tl.constexpr,
           STORE_LAST: tl.constexpr):
    """Step I of a tile of packed sequences (VARLEN; ``sd`` = dim * dstate, the stride of a sequence's state):
    where step t0 + I starts sequence s, the state before it is s's initial state (zeros without HAS_INIT) and
    P restarts at 0 (nothing from before the start survives); where it ends sequence e, the state after it is
    stored as e's final state (STORE_LAST). Returns (state before the step, state after it, P, y)."""
    s = tl.load(vs_ptr + t0 + I)
    if s >= 0:
        if HAS_INIT:
            x = tl.load(init_ptr + s.to(tl.int64) * sd + st_off, mask=mask_dn, other=0.0)
        else:
            x = tl.zeros_like(x)
        if PROD:
            P = tl.zeros_like(P)
    xb = x
    x, Pa, y = _step(x, P, A2, d, v, b, k, c, I, HAS_RESET, PROD, OUT)
    if STORE_LAST:
        e = tl.load(ve_ptr + t0 + I)
        if e >= 0:
            tl.store(last_ptr + e.to(tl.int64) * sd + st_off, x, mask=mask_dn)
    return xb, x, Pa, y


@triton.jit
def _tile_marked(vs_ptr, ve_ptr, t0, L):
    """Whether a sequence starts or ends at one of the 8 steps from t0 (VARLEN): one vector load of each mark
    array. Tiles without a mark (most of them: packed sequences are long next to 8 steps, and states at positions
    are few) take the unmarked steps, whose per-step scalar loads and branches would stall the dependent chain."""
    offs = t0 + tl.arange(0, 8)
    inside = offs < L
    m = tl.maximum(tl.load(vs_ptr + offs, mask=inside, other=-1), tl.load(ve_ptr + offs, mask=inside, other=-1))
    return tl.max(m, 0) >= 0


@triton.jit
def _vsteps8(x, P, A2, d, v, b, k, c, t0, vs_ptr, ve_ptr, init_ptr, last_ptr, st_off, sd, mask_dn,
             BD: tl.constexpr, HAS_RESET: tl.constexpr, PROD: tl.constexpr, OUT: tl.constexpr,
             HAS_INIT: tl.constexpr, STORE_LAST: tl.constexpr):
    """_steps8 over packed sequences (see _vstep). Returns (the 8 states before each step, after a sequence's
    initial state was put in; the 8 states after each step; P; the outputs): _steps8's returns, with the states
    before and after as two tuples of 8, since at a sequence start one step's "after" is not the next's "before"."""
    b0, a0, P, y0 = _vstep(x, P, A2, d, v, b, k, c, 0, t0, vs_ptr, ve_ptr, init_ptr, last_ptr, st_off, sd, mask_dn,
                           HAS_RESET, PROD, OUT, HAS_INIT, STORE_LAST)
    b1, a1, P, y1 = _vstep(a0, P, A2, d, v, b, k, c, 1, t0, vs_ptr, ve_ptr, init_ptr, last_ptr, st_off, sd,
                           mask_dn, HAS_RESET, PROD, OUT, HAS_INIT, STORE_LAST)
    b2, a2, P, y2 = _vstep(a1, P, A2, d, v, b, k, c, 2, t0, vs_ptr, ve_ptr, init_ptr, last_ptr, st_off, sd,
                           mask_dn, HAS_RESET, PROD, OUT, HAS_INIT, STORE_LAST)
    b3, a3, P, y3 = _vstep(a2, P, A2, d, v, b, k, c, 3, t0, vs_ptr, ve_ptr, init_ptr, last_ptr, st_off, sd,
                           mask_dn, HAS_RESET, PROD, OUT, HAS_INIT, STORE_LAST)
    b4, a4, P, y4 = _vstep(a3, P, A2, d, v, b, k, c, 4, t0, vs_ptr, ve_ptr, init_ptr, last_ptr, st_off, sd,
                           mask_dn, HAS_RESET, PROD, OUT, HAS_INIT, STORE_LAST)
    b5, a5, P, y5 = _vstep(a4, P, A2, d, v, b, k, c, 5, t0, vs_ptr, ve_ptr, init_ptr, last_ptr, st_off, sd,
                           mask_dn, HAS_RESET, PROD, OUT, HAS_INIT, STORE_LAST)
    b6, a6, P, y6 = _vstep(a5, P, A2, d, v, b, k, c, 6, t0, vs_ptr, ve_ptr, init_ptr, last_ptr, st_off, sd,
                           mask_dn, HAS_RESET, PROD, OUT, HAS_INIT, STORE_LAST)
    b7, a7, P, y7 = _vstep(a6, P, A2, d, v, b, k, c, 7, t0, vs_ptr, ve_ptr, init_ptr, last_ptr, st_off, sd,
                           mask_dn, HAS_RESET, PROD, OUT, HAS_INIT, STORE_LAST)
    y = 0.0
    if OUT:
        y = _join8(y0, y1, y2, y3, y4, y5, y6, y7, BD)
    return (b0, b1, b2, b3, b4, b5, b6, b7), (a0, a1, a2, a3, a4, a5, a6, a7), P, y


@optional_inputs(HAS_D="D_ptr", HAS_Z="z_ptr", HAS_BIAS="bias_ptr", HAS_INIT="init_ptr", HAS_RESET="reset_ptr",
                 STORE_YPRE="ypre_ptr", VARLEN="vs_ptr", HAS_FINAL="final_ptr")
@triton.jit
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, init_ptr, reset_ptr,
    out_ptr, last_ptr, ckpt_ptr, sum_ptr, prod_ptr, ypre_ptr, vs_ptr, ve_ptr, final_ptr,
    dim, L, dstate, cpg, nchunks, sxb, sxd,
    sBb, sBg, sBn, sCb, sCg, sCn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    HAS_RESET: tl.constexpr, SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr, MODE: tl.constexpr,
    BD: tl.constexpr, BN: tl.constexpr, STORE_YPRE: tl.constexpr, VARLEN: tl.constexpr, HAS_FINAL: tl.constexpr,
):
    """MODE 0: the whole sequence in one program (grid [channel blocks, batch]); writes out, checkpoints, last.
    With z and ypre_ptr given (STORE_YPRE), also writes the output before the gate (for the backward; inference
    passes None). MODE 1: chunk summaries (grid [channel blocks, batch, chunks]): the chunk run from a zero state,
    its end state -> sum_ptr and the product of its decays -> prod_ptr (both [batch, dim, nchunks, dstate]).
    MODE 2: outputs of each chunk from its checkpoint (grid as MODE 1), after _carry_kernel filled them.
    sum_ptr and prod_ptr are read in MODE 1 only (None otherwise).
    VARLEN (batch 1, vs_ptr/ve_ptr given): init_ptr and last_ptr are per sequence [num_seqs, dim, dstate]; the
    initial states enter at the sequences' first steps and the final states are stored at their last steps
    (MODE 0 and 2; MODE 1's chunks start from zero, so it stores none).
    HAS_FINAL (VARLEN, MODE 0; final_ptr [batch, dim, dstate]): also store each row's state after its last step
    there, for states at positions, whose marks never start a sequence past step 0 (the row's final state is
    also a stored row; a copy of its own saves a launch). MODE 2 leaves that to _carry_kernel.
    """
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d, offs_n, mask_d, mask_n, mask_dn, grp, A, A2, bias, Dv = _channel_block(
        A_ptr, bias_ptr, D_ptr, dim, dstate, cpg, BD, BN, HAS_BIAS, HAS_D)
    st_off, ck_off = _state_offsets(pid_b, offs_d, offs_n, dim, dstate, nchunks)
    if MODE == 0:
        t_lo = 0
        t_hi = L
        if HAS_INIT:
            x = tl.load(init_ptr + st_off, mask=mask_dn, other=0.0).to(tl.float32)
        else:
            x = tl.zeros((BD, BN), tl.float32)
    else:
        c = tl.program_id(2)
        t_lo = c * CHUNK
        t_hi = tl.minimum(L, t_lo + CHUNK)
        if MODE == 2:
            x = tl.load(ckpt_ptr + ck_off + c * dstate, mask=mask_dn, other=0.0)
        else:
            x = tl.zeros((BD, BN), tl.float32)
    P = tl.full((BD, BN), 1.0, tl.float32)
    row = pid_b * sxb + offs_d[:, None].to(tl.int64) * sxd
    B_row = pid_b * sBb + grp * sBg + offs_n[:, None] * sBn
    C_row = pid_b * sCb + grp * sCg + offs_n[:, None] * sCn
    rst_row = pid_b * L
    for t0 in range(t_lo, t_hi, TILE):
        if MODE == 0:
            if t0 % CHUNK == 0:
                tl.store(ckpt_ptr + ck_off + (t0 // CHUNK) * dstate, x, mask=mask_dn)
        offs_t, mt, m2 = _tile_offsets(t0, L, mask_d)
        u, draw, dt, Bt, keep = _load_tile(u_ptr, dt_ptr, B_ptr, reset_ptr, row, B_row, rst_row, bias,
                                           offs_t, mt, m2, mask_n, HAS_BIAS, SOFTPLUS, HAS_RESET)
        d, v, b, k = _split_inputs(dt, dt * u, Bt, keep, BD, BN)
        if MODE == 1:
            if VARLEN:
                # a tile with no mark (most: sequences are long next to 8 steps, positions few) takes the
                # unmarked steps, whose chain has no per-step scalar loads and branches
                if _tile_marked(vs_ptr, ve_ptr, t0, L):
                    _xb, xa, P, _y = _vsteps8(x, P, A2, d, v, b, k, None, t0, vs_ptr, ve_ptr, init_ptr, last_ptr,
                                              st_off, dim * dstate, mask_dn, BD, HAS_RESET, True, False, HAS_INIT, False)
                    x = xa[7]
                else:
                    xs, P, _y = _steps8(x, P, A2, d, v, b, k, None, BD, HAS_RESET, True, False)
                    x = xs[8]
            else:
                xs, P, _y = _steps8(x, P, A2, d, v, b, k, None, BD, HAS_RESET, True, False)
                x = xs[8]
        else:
            Ct = tl.load(C_ptr + C_row + offs_t[None, :], mask=mask_n[:, None] & mt[None, :],
                         other=0.0).to(tl.float32)
            if VARLEN:
                # a tile with no mark (most: sequences are long next to 8 steps, positions few) takes the
                # unmarked steps, whose chain has no per-step scalar loads and branches
                if _tile_marked(vs_ptr, ve_ptr, t0, L):
                    _xb, xa, _P, y = _vsteps8(x, None, A2, d, v, b, k, _split8(Ct, BN), t0, vs_ptr, ve_ptr, init_ptr,
                                              last_ptr, st_off, dim * dstate, mask_dn, BD, HAS_RESET, False, True,
                                              HAS_INIT, True)
                    x = xa[7]
                else:
                    xs, _P, y = _steps8(x, None, A2, d, v, b, k, _split8(Ct, BN), BD, HAS_RESET, False, True)
                    x = xs[8]
            else:
                xs, _P, y = _steps8(x, None, A2, d, v, b, k, _split8(Ct, BN), BD, HAS_RESET, False, True)
                x = xs[8]
            if HAS_D:
                y = y + Dv[:, None] * u
            if HAS_Z:
                if STORE_YPRE:  # the backward needs the output before the gate (as upstream saves it)
                    tl.store(ypre_ptr + row + offs_t[None, :], y.to(ypre_ptr.dtype.element_ty), mask=m2)
                zt = tl.load(z_ptr + row + offs_t[None, :], mask=m2, other=0.0).to(tl.float32)
                y = y * zt * _sigmoid(zt)
            tl.store(out_ptr + row + offs_t[None, :], y.to(out_ptr.dtype.element_ty), mask=m2)
    if MODE == 0:
        if not VARLEN:  # packed sequences stored theirs at their last steps
            tl.store(last_ptr + st_off, x, mask=mask_dn)
        elif HAS_FINAL:
            tl.store(final_ptr + st_off, x, mask=mask_dn)
    if MODE == 1:
        tl.store(sum_ptr + ck_off + c * dstate, x, mask=mask_dn)
        tl.store(prod_ptr + ck_off + c * dstate, P, mask=mask_dn)


@optional_inputs(HAS_D="D_ptr", HAS_Z="z_ptr", HAS_BIAS="bias_ptr", HAS_INIT="init_ptr", HAS_RESET="reset_ptr")
@triton.jit
def _scan_fwd_segments_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, init_ptr, reset_ptr, out_ptr, last_ptr, seg_ptr,
    dim, dstate, cpg, sxd, sBg, sBn, sCg, sCn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    HAS_RESET: tl.constexpr, SOFTPLUS: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
):
    """Packed sequences without a backward (batch 1): one program per (channel block, sequence) runs that sequence
    alone, from its initial state to its final state, as MODE 0 runs a batch row. Grid [channel blocks, non-empty
    sequences]; ``seg_ptr`` int32 [nseg, 3] holds (sequence, first step, end step) per program, longest first, so
    that the long sequences start in the first wave and the short ones fill in behind them.

    Where MODE 0 over the packed row would scan every sequence one after another in each program (or the
    chunk-parallel modes would read every input twice), the sequences here run side by side, as an equal batch
    would. The first tile starts at the 8-aligned step at or below the first step (aligned loads); its steps
    before the first step are masked: dt = 0, B = 0 and keep = 1 make them no-op steps, and their outputs (the
    previous sequence's) are not stored. ``reset`` [1, L] still clears the state inside a sequence. No
    checkpoints and no pre-gate output: the backward takes the other modes."""
    j = tl.program_id(1)
    seq = tl.load(seg_ptr + 3 * j).to(tl.int64)
    t_first = tl.load(seg_ptr + 3 * j + 1)
    t_end = tl.load(seg_ptr + 3 * j + 2)
    offs_d, offs_n, mask_d, mask_n, mask_dn, grp, A, A2, bias, Dv = _channel_block(
        A_ptr, bias_ptr, D_ptr, dim, dstate, cpg, BD, BN, HAS_BIAS, HAS_D)
    st_off = seq * dim * dstate + offs_d[:, None] * dstate + offs_n[None, :]
    if HAS_INIT:
        x = tl.load(init_ptr + st_off, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        x = tl.zeros((BD, BN), tl.float32)
    row = offs_d[:, None].to(tl.int64) * sxd
    B_row = grp * sBg + offs_n[:, None] * sBn
    C_row = grp * sCg + offs_n[:, None] * sCn
    for t0 in range((t_first // TILE) * TILE, t_end, TILE):
        offs_t = t0 + tl.arange(0, TILE)
        mt = (offs_t >= t_first) & (offs_t < t_end)
        m2 = mask_d[:, None] & mt[None, :]
        u, draw, dt, Bt, keep = _load_tile(u_ptr, dt_ptr, B_ptr, reset_ptr, row, B_row, 0, bias,
                                           offs_t, mt, m2, mask_n, HAS_BIAS, SOFTPLUS, HAS_RESET)
        d, v, b, k = _split_inputs(dt, dt * u, Bt, keep, BD, BN)
        Ct = tl.load(C_ptr + C_row + offs_t[None, :], mask=mask_n[:, None] & mt[None, :], other=0.0).to(tl.float32)
        xs, _P, y = _steps8(x, None, A2, d, v, b, k, _split8(Ct, BN), BD, HAS_RESET, False, True)
        x = xs[8]
        if HAS_D:
            y = y + Dv[:, None] * u
        if HAS_Z:
            zt = tl.load(z_ptr + row + offs_t[None, :], mask=m2, other=0.0).to(tl.float32)
            y = y * zt * _sigmoid(zt)
        tl.store(out_ptr + row + offs_t[None, :], y.to(out_ptr.dtype.element_ty), mask=m2)
    tl.store(last_ptr + st_off, x, mask=mask_dn)


@optional_inputs(HAS_INIT="init_ptr")
@triton.jit
def _carry_kernel(init_ptr, sum_ptr, prod_ptr, entering_ptr, final_ptr, dim, dstate, nchunks,
                  HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """Short sequential pass over chunk boundaries of the linear recurrence v <- prod[c] * v + sum[c], for
    c = 0 .. nchunks-1 (REVERSE: from the last chunk to the first); v starts as init (or 0), entering[c] gets the
    v entering chunk c, final the v after the last. Grid: [cdiv(dim * dstate, BLOCK), batch]; all buffers float32,
    [batch, dim, nchunks, dstate] and [batch, dim, dstate].

    Forward (REVERSE off): v is the state: init = initial_state, entering = the checkpoints, final = the last state.
    Backward (REVERSE on): v is the adjoint: init = the gradient of the last state, entering = the adjoint entering
    each chunk from the right (hin, its own buffer: stores then never alias the loads ahead), final = the gradient
    of initial_state."""
    pid_b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat (channel, state) index
    mask = offs < dim * dstate
    ch = offs // dstate
    n = offs % dstate
    if HAS_INIT:
        x = tl.load(init_ptr + pid_b * dim * dstate + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.zeros((BLOCK,), tl.float32)
    base = ((pid_b * dim + ch) * nchunks) * dstate + n
    for cc in range(0, nchunks):
        if REVERSE:
            c = nchunks - 1 - cc
        else:
            c = cc
        tl.store(entering_ptr + base + c * dstate, x, mask=mask)
        s = tl.load(sum_ptr + base + c * dstate, mask=mask, other=0.0)
        p = tl.load(prod_ptr + base + c * dstate, mask=mask, other=0.0)
        x = p * x + s
    tl.store(final_ptr + pid_b * dim * dstate + offs, x, mask=mask)


@triton.jit
def _col(ptr, row1, t, L, mask_n):
    """The column ptr[row1 + t] as one [BN] load (zeros at or past L). The scalar bound joins the mask through
    tl.where, not `mask_n & (t < L)`: triton 3.9's interpreter makes that vector-and-scalar `&` an integer mask,
    which tl.load refuses."""
    m = tl.where(t < L, mask_n, False)
    return tl.load(ptr + row1 + t, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _cols8(ptr, row1, t0, L, mask_n):
    """The 8 columns ptr[row1 + t0 .. t0+7] as separate [BN] loads (zeros past L)."""
    return (_col(ptr, row1, t0, L, mask_n), _col(ptr, row1, t0 + 1, L, mask_n),
            _col(ptr, row1, t0 + 2, L, mask_n), _col(ptr, row1, t0 + 3, L, mask_n),
            _col(ptr, row1, t0 + 4, L, mask_n), _col(ptr, row1, t0 + 5, L, mask_n),
            _col(ptr, row1, t0 + 6, L, mask_n), _col(ptr, row1, t0 + 7, L, mask_n))


@triton.jit
def _bstep(h, gA, A2, xs, d, v, b, c, k, g, I: tl.constexpr, HAS_RESET: tl.constexpr, FRESH: tl.constexpr = False):
    """Reverse of step I of a tile (xs: the tile's 9 states, xs[I] before the step; d, v, b, c, k, g: the
    columns of dt, dt*u, B, C, keep and gy). h enters as dL/dx after the step from later steps only and leaves as
    dL/dx before it.

    ``gy`` is the gradient reaching y = C . x (after the gate). The decay exp(dt*A) (times keep) is recomputed
    here rather than kept from the forward recompute: fewer live registers.
    Returns (h, gA, gC [BN], gB [BN], hb [BD] = sum_n h*B, gdt_state [BD] = sum_n h*x_prev*a*A2, which is
    LOG2E times the gradient reaching dt through the decay: the caller scales it, so that A itself need not stay
    live next to A2).
    """
    return _bstep_core(h, gA, A2, xs[I], xs[I + 1], d[I], v[I], b[I], c[I], k[I], g[I], HAS_RESET, FRESH)


@triton.jit
def _bstep_core(h, gA, A2, x_prev, x_new, dt, dtu, Bc, Cc, keep, gy, HAS_RESET: tl.constexpr,
                FRESH: tl.constexpr = False):
    """_bstep on one step's values: the states before (x_prev) and after (x_new) the step, and its columns.
    FRESH: the decay computed anew (the + 0.0 keeps the compiler from sharing the recompute's, which would keep
    a tile's decays live through its reverse steps)."""
    if FRESH:
        a = tl.exp2(_decay_exponent(dt, A2, keep, HAS_RESET) + 0.0)
    else:
        a = tl.exp2(_decay_exponent(dt, A2, keep, HAS_RESET))
    h = h + gy[:, None] * Cc[None, :]
    gC = tl.sum(gy[:, None] * x_new, 0)
    gB = tl.sum(h * dtu[:, None], 0)
    hb = tl.sum(h * Bc[None, :], 1)
    hx = h * (x_prev * a)
    gA = gA + hx * dt[:, None]
    gdt = tl.sum(hx * A2, 1)
    h = h * a
    return h, gA, gC, gB, hb, gdt


@triton.jit
def _bsteps8(h, gA, A2, xs, d, v, b, c, k, g, u, dt, BD: tl.constexpr, BN: tl.constexpr,
             HAS_RESET: tl.constexpr):
    """The 8 reverse steps of a tile, last step first (arguments as _bstep's; u and dt: the tile's [BD, 8]).
    Returns (h, gA, and as tiles: the gradient reaching dt through the state and u through the state
    [BD, 8], gC and gB [BN, 8])."""
    h, gA, gC7, gB7, hb7, gt7 = _bstep(h, gA, A2, xs, d, v, b, c, k, g, 7, HAS_RESET)
    h, gA, gC6, gB6, hb6, gt6 = _bstep(h, gA, A2, xs, d, v, b, c, k, g, 6, HAS_RESET)
    h, gA, gC5, gB5, hb5, gt5 = _bstep(h, gA, A2, xs, d, v, b, c, k, g, 5, HAS_RESET)
    h, gA, gC4, gB4, hb4, gt4 = _bstep(h, gA, A2, xs, d, v, b, c, k, g, 4, HAS_RESET)
    h, gA, gC3, gB3, hb3, gt3 = _bstep(h, gA, A2, xs, d, v, b, c, k, g, 3, HAS_RESET)
    h, gA, gC2, gB2, hb2, gt2 = _bstep(h, gA, A2, xs, d, v, b, c, k, g, 2, HAS_RESET)
    h, gA, gC1, gB1, hb1, gt1 = _bstep(h, gA, A2, xs, d, v, b, c, k, g, 1, HAS_RESET)
    h, gA, gC0, gB0, hb0, gt0 = _bstep(h, gA, A2, xs, d, v, b, c, k, g, 0, HAS_RESET)
    hb = _join8(hb0, hb1, hb2, hb3, hb4, hb5, hb6, hb7, BD)
    gdt = _join8(gt0, gt1, gt2, gt3, gt4, gt5, gt6, gt7, BD) * LN2 + u * hb
    gu = dt * hb
    gCt = _join8(gC0, gC1, gC2, gC3, gC4, gC5, gC6, gC7, BN)
    gBt = _join8(gB0, gB1, gB2, gB3, gB4, gB5, gB6, gB7, BN)
    return h, gA, gdt, gu, gCt, gBt


@triton.jit
def _cols4(ptr, row1, t0, L, mask_n):
    """The 4 columns ptr[row1 + t0 .. t0+3] as separate [BN] loads (zeros past L)."""
    return (_col(ptr, row1, t0, L, mask_n), _col(ptr, row1, t0 + 1, L, mask_n),
            _col(ptr, row1, t0 + 2, L, mask_n), _col(ptr, row1, t0 + 3, L, mask_n))


@triton.jit
def _steps4_end(x, A2, d, v, b, k, HAS_RESET: tl.constexpr):
    """The state after the 4 steps of a half tile (columns as _step's, 4 of each) from x."""
    x, _P, _y = _step(x, 0.0, A2, d, v, b, k, None, 0, HAS_RESET, False, False)
    x, _P, _y = _step(x, 0.0, A2, d, v, b, k, None, 1, HAS_RESET, False, False)
    x, _P, _y = _step(x, 0.0, A2, d, v, b, k, None, 2, HAS_RESET, False, False)
    x, _P, _y = _step(x, 0.0, A2, d, v, b, k, None, 3, HAS_RESET, False, False)
    return x


@triton.jit
def _bsteps4(h, gA, A2, x0, d, v, b, c, k, g, u4, dt4, BD: tl.constexpr, BN: tl.constexpr,
             HAS_RESET: tl.constexpr, FRESH: tl.constexpr):
    """A half tile (4 steps from state x0; columns as _bstep's, 4 of each; u4, dt4 [BD, 4]): recompute its 5
    states, then its 4 reverse steps. Same returns as _bsteps8, as [*, 4] tiles. Half the live states of a full
    tile: what the backward's registers are spent on at 16 channels a warp."""
    x1, _P, _y = _step(x0, 0.0, A2, d, v, b, k, None, 0, HAS_RESET, False, False)
    x2, _P, _y = _step(x1, 0.0, A2, d, v, b, k, None, 1, HAS_RESET, False, False)
    x3, _P, _y = _step(x2, 0.0, A2, d, v, b, k, None, 2, HAS_RESET, False, False)
    x4, _P, _y = _step(x3, 0.0, A2, d, v, b, k, None, 3, HAS_RESET, False, False)
    xs = (x0, x1, x2, x3, x4)
    h, gA, gC3, gB3, hb3, gt3 = _bstep(h, gA, A2, xs, d, v, b, c, k, g, 3, HAS_RESET, FRESH)
    h, gA, gC2, gB2, hb2, gt2 = _bstep(h, gA, A2, xs, d, v, b, c, k, g, 2, HAS_RESET, FRESH)
    h, gA, gC1, gB1, hb1, gt1 = _bstep(h, gA, A2, xs, d, v, b, c, k, g, 1, HAS_RESET, FRESH)
    h, gA, gC0, gB0, hb0, gt0 = _bstep(h, gA, A2, xs, d, v, b, c, k, g, 0, HAS_RESET, FRESH)
    hb = _join4(hb0, hb1, hb2, hb3, BD)
    gdt = _join4(gt0, gt1, gt2, gt3, BD) * LN2 + u4 * hb
    gu = dt4 * hb
    return h, gA, gdt, gu, _join4(gC0, gC1, gC2, gC3, BN), _join4(gB0, gB1, gB2, gB3, BN)


@triton.jit
def _bsteps_halves(h, gA, A2, x0, xm, u, dt, keep, gy, B_ptr, C_ptr, B_row1, C_row1, t0, L, mask_n,
                   BD: tl.constexpr, BN: tl.constexpr, HAS_RESET: tl.constexpr, HALF: tl.constexpr):
    """_bsteps8 as two half tiles, the second first (u, dt, gy [BD, 8], keep [1, 8]; x0: the state before the
    tile; xm: the state before its step 4 when HALF >= 2, recomputed from x0 when HALF == 1; HALF 3: each reverse
    step computes its decay anew). Same returns."""
    u_lo, u_hi = _halves8(u, BD)
    dt_lo, dt_hi = _halves8(dt, BD)
    v_lo, v_hi = _halves8(dt * u, BD)
    g_lo, g_hi = _halves8(gy, BD)
    k_lo, k_hi = _halves8(keep, 1)
    if HALF == 1:
        xm = _steps4_end(x0, A2, _split4(dt_lo, BD), _split4(v_lo, BD), _cols4(B_ptr, B_row1, t0, L, mask_n),
                         _split4(k_lo, 1), HAS_RESET)
    h, gA, gdt_hi, gu_hi, gC_hi, gB_hi = _bsteps4(
        h, gA, A2, xm, _split4(dt_hi, BD), _split4(v_hi, BD), _cols4(B_ptr, B_row1, t0 + 4, L, mask_n),
        _cols4(C_ptr, C_row1, t0 + 4, L, mask_n), _split4(k_hi, 1), _split4(g_hi, BD), u_hi, dt_hi, BD, BN,
        HAS_RESET, HALF == 3)
    h, gA, gdt_lo, gu_lo, gC_lo, gB_lo = _bsteps4(
        h, gA, A2, x0, _split4(dt_lo, BD), _split4(v_lo, BD), _cols4(B_ptr, B_row1, t0, L, mask_n),
        _cols4(C_ptr, C_row1, t0, L, mask_n), _split4(k_lo, 1), _split4(g_lo, BD), u_lo, dt_lo, BD, BN,
        HAS_RESET, HALF == 3)
    return (h, gA, _unhalves8(gdt_lo, gdt_hi, BD), _unhalves8(gu_lo, gu_hi, BD), _unhalves8(gC_lo, gC_hi, BN),
            _unhalves8(gB_lo, gB_hi, BN))


@triton.jit
def _vbstep(h, gA, A2, xb, xa, d, v, b, c, k, g, I: tl.constexpr, t0, vs_ptr, ve_ptr, vlast_ptr, dinit_ptr, st_off,
            sd, mask_dn, HAS_RESET: tl.constexpr, HAS_VLAST: tl.constexpr):
    """Reverse of step I over packed sequences (xb, xa: the tile's states before and after each step, from
    _vsteps8). Where the step ends sequence e, the gradient of e's final state joins h first (HAS_VLAST); where
    it starts sequence s, h after the step is the gradient of s's initial state: stored, then zero (nothing
    before a start reaches the states after it)."""
    if HAS_VLAST:
        e = tl.load(ve_ptr + t0 + I)
        if e >= 0:
            h = h + tl.load(vlast_ptr + e.to(tl.int64) * sd + st_off, mask=mask_dn, other=0.0)
    h, gA, gC, gB, hb, gdt = _bstep_core(h, gA, A2, xb[I], xa[I], d[I], v[I], b[I], c[I], k[I], g[I], HAS_RESET)
    s = tl.load(vs_ptr + t0 + I)
    if s >= 0:
        tl.store(dinit_ptr + s.to(tl.int64) * sd + st_off, h, mask=mask_dn)
        h = tl.zeros_like(h)
    return h, gA, gC, gB, hb, gdt


@triton.jit
def _vbsteps8(h, gA, A2, xb, xa, d, v, b, c, k, g, u, dt, t0, vs_ptr, ve_ptr, vlast_ptr, dinit_ptr, st_off, sd,
              mask_dn, BD: tl.constexpr, BN: tl.constexpr, HAS_RESET: tl.constexpr, HAS_VLAST: tl.constexpr):
    """_bsteps8 over packed sequences (see _vbstep); same returns."""
    h, gA, gC7, gB7, hb7, gt7 = _vbstep(h, gA, A2, xb, xa, d, v, b, c, k, g, 7, t0, vs_ptr, ve_ptr, vlast_ptr,
                                        dinit_ptr, st_off, sd, mask_dn, HAS_RESET, HAS_VLAST)
    h, gA, gC6, gB6, hb6, gt6 = _vbstep(h, gA, A2, xb, xa, d, v, b, c, k, g, 6, t0, vs_ptr, ve_ptr, vlast_ptr,
                                        dinit_ptr, st_off, sd, mask_dn, HAS_RESET, HAS_VLAST)
    h, gA, gC5, gB5, hb5, gt5 = _vbstep(h, gA, A2, xb, xa, d, v, b, c, k, g, 5, t0, vs_ptr, ve_ptr, vlast_ptr,
                                        dinit_ptr, st_off, sd, mask_dn, HAS_RESET, HAS_VLAST)
    h, gA, gC4, gB4, hb4, gt4 = _vbstep(h, gA, A2, xb, xa, d, v, b, c, k, g, 4, t0, vs_ptr, ve_ptr, vlast_ptr,
                                        dinit_ptr, st_off, sd, mask_dn, HAS_RESET, HAS_VLAST)
    h, gA, gC3, gB3, hb3, gt3 = _vbstep(h, gA, A2, xb, xa, d, v, b, c, k, g, 3, t0, vs_ptr, ve_ptr, vlast_ptr,
                                        dinit_ptr, st_off, sd, mask_dn, HAS_RESET, HAS_VLAST)
    h, gA, gC2, gB2, hb2, gt2 = _vbstep(h, gA, A2, xb, xa, d, v, b, c, k, g, 2, t0, vs_ptr, ve_ptr, vlast_ptr,
                                        dinit_ptr, st_off, sd, mask_dn, HAS_RESET, HAS_VLAST)
    h, gA, gC1, gB1, hb1, gt1 = _vbstep(h, gA, A2, xb, xa, d, v, b, c, k, g, 1, t0, vs_ptr, ve_ptr, vlast_ptr,
                                        dinit_ptr, st_off, sd, mask_dn, HAS_RESET, HAS_VLAST)
    h, gA, gC0, gB0, hb0, gt0 = _vbstep(h, gA, A2, xb, xa, d, v, b, c, k, g, 0, t0, vs_ptr, ve_ptr, vlast_ptr,
                                        dinit_ptr, st_off, sd, mask_dn, HAS_RESET, HAS_VLAST)
    hb = _join8(hb0, hb1, hb2, hb3, hb4, hb5, hb6, hb7, BD)
    gdt = _join8(gt0, gt1, gt2, gt3, gt4, gt5, gt6, gt7, BD) * LN2 + u * hb
    gu = dt * hb
    gCt = _join8(gC0, gC1, gC2, gC3, gC4, gC5, gC6, gC7, BN)
    gBt = _join8(gB0, gB1, gB2, gB3, gB4, gB5, gB6, gB7, BN)
    return h, gA, gdt, gu, gCt, gBt


@optional_inputs(HAS_D="D_ptr", HAS_Z="z_ptr", HAS_BIAS="bias_ptr", HAS_GLAST="glast_ptr", HAS_RESET="reset_ptr",
                 STORE_Y="yout_ptr", VARLEN="vs_ptr", HAS_VINIT="vinit_ptr", HAS_VLAST="vlast_ptr")
@triton.jit
def _scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, reset_ptr, ckpt_ptr, gout_ptr, glast_ptr, scr_ptr,
    ypre_ptr, yout_ptr, du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, dinit_ptr, hin_ptr,
    vs_ptr, ve_ptr, vinit_ptr, vlast_ptr,
    dim, L, dstate, cpg, nchunks, nbatch, nsplit, sxb, sxd,
    sBb, sBg, sBn, sCb, sCg, sCn, sdBb, sdBg, sdBn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GLAST: tl.constexpr,
    HAS_RESET: tl.constexpr, SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr, MODE: tl.constexpr,
    BD: tl.constexpr, BN: tl.constexpr, STORE_Y: tl.constexpr, VARLEN: tl.constexpr, HAS_VINIT: tl.constexpr,
    HAS_VLAST: tl.constexpr, HALF: tl.constexpr = 0,
):
    """Reverse sweep over chunks. For each chunk: recompute the state at every 8-step tile boundary from the
    chunk's checkpoint (written to a small per-program scratch), then walk the tiles backwards, recomputing the
    8 states of a tile in registers and applying 8 reverse steps.

    MODE 0 (grid [channel blocks, batch]): one program walks all chunks from last to first, carrying the
    adjoint h from the gradient of the last state (or zero: glast_ptr None); writes dinit [batch, dim, dstate].
    MODE 1 (grid [channel blocks, batch, nsplit]): program g takes chunks g, g + nsplit, ... in any order,
    each starting from the true adjoint entering it from the right, hin [batch, dim, nchunks, dstate]
    (from _scan_bwd_local_kernel and _carry_kernel); no dinit (the carry pass gives it) and glast_ptr None.

    Writes du, ddelta, dz per element; dB, dC by atomic adds into float32 [batch, ngroups, dstate, seqlen];
    partial sums dA [parts, dim, dstate], dD and ddelta_bias [parts, dim] with parts = batch (MODE 0) or
    nsplit * batch (MODE 1, part g * batch + b); the scratch has the same parts. z_ptr, ypre_ptr and dz_ptr are
    None together (no z), as D_ptr and dD_ptr, bias_ptr and dbias_ptr; hin_ptr is None in MODE 0, dinit_ptr in
    MODE 1. With z, yout_ptr (else None) receives the gated output ypre * silu(z) (u's layout).
    VARLEN (batch 1, vs_ptr/ve_ptr given; glast_ptr None): the recompute puts each sequence's initial state
    (vinit_ptr [num_seqs, dim, dstate], or None for zeros) in at its first step; both modes write the gradient
    of each sequence's initial state into dinit [num_seqs, dim, dstate] at its first step, and add the gradient
    of each sequence's final state (vlast_ptr [num_seqs, dim, dstate], or None) at its last step.
    HALF (without VARLEN): 0 walks each tile's 8 reverse steps at once (its 9 states live), 1, 2 and 3 as two
    half tiles of 4 (5 states live), the state before the second half recomputed (1) or kept in the scratch by
    the first pass (2 and 3: two scratch states a tile; 3 also computes each reverse step's decay anew).
    """
    tl.static_assert(HALF == 0 or not VARLEN)
    SUB: tl.constexpr = CHUNK // TILE
    SCR: tl.constexpr = 2 if HALF >= 2 else 1  # scratch states a tile
    pid_b = tl.program_id(1).to(tl.int64)
    if MODE == 0:
        part = pid_b
    else:
        pid_g = tl.program_id(2)
        part = pid_g.to(tl.int64) * nbatch + pid_b
    offs_d, offs_n, mask_d, mask_n, mask_dn, grp, A, A2, bias, Dv = _channel_block(
        A_ptr, bias_ptr, D_ptr, dim, dstate, cpg, BD, BN, HAS_BIAS, HAS_D)
    st_off, ck_off = _state_offsets(pid_b, offs_d, offs_n, dim, dstate, nchunks)
    part_off = (part * dim + offs_d[:, None]) * dstate + offs_n[None, :]
    scr_off = ((part * dim + offs_d[:, None]) * (SUB * SCR)) * dstate + offs_n[None, :]
    if HAS_GLAST:
        h = tl.load(glast_ptr + st_off, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BD, BN), tl.float32)
    gA = tl.zeros((BD, BN), tl.float32)
    gD = tl.zeros((BD,), tl.float32)
    gbias = tl.zeros((BD,), tl.float32)
    row = pid_b * sxb + offs_d[:, None].to(tl.int64) * sxd
    B_row = pid_b * sBb + grp * sBg + offs_n[:, None] * sBn
    B_row1 = pid_b * sBb + grp * sBg + offs_n * sBn
    C_row1 = pid_b * sCb + grp * sCg + offs_n * sCn
    dB_row = pid_b * sdBb + grp * sdBg + offs_n[:, None] * sdBn
    rst_row = pid_b * L
    if MODE == 0:
        c_lo = 0
        c_step = 1
    else:
        c_lo = pid_g
        c_step = nsplit
    for cc in range(c_lo, nchunks, c_step):
        if MODE == 0:
            c = nchunks - 1 - cc
        else:
            c = cc
            h = tl.load(hin_ptr + ck_off + c * dstate, mask=mask_dn, other=0.0)
        cstart = c * CHUNK
        ntiles = tl.minimum(SUB, (L - cstart + TILE - 1) // TILE)
        # pass 1: states at the tile boundaries of this chunk
        x = tl.load(ckpt_ptr + ck_off + c * dstate, mask=mask_dn, other=0.0)
        for s in range(0, ntiles):
            tl.store(scr_ptr + scr_off + (s * SCR) * dstate, x, mask=mask_dn)
            offs_t, mt, m2 = _tile_offsets(cstart + TILE * s, L, mask_d)
            u, draw, dt, Bt, keep = _load_tile(u_ptr, dt_ptr, B_ptr, reset_ptr, row, B_row, rst_row, bias,
                                               offs_t, mt, m2, mask_n, HAS_BIAS, SOFTPLUS, HAS_RESET)
            d, v, b, k = _split_inputs(dt, dt * u, Bt, keep, BD, BN)
            if VARLEN:
                # a tile with no mark (most: sequences are long next to 8 steps, positions few) takes the
                # unmarked steps, whose chain has no per-step scalar loads and branches
                if _tile_marked(vs_ptr, ve_ptr, cstart + TILE * s, L):
                    _xb, xa, _P, _y = _vsteps8(x, None, A2, d, v, b, k, None, cstart + TILE * s, vs_ptr, ve_ptr,
                                               vinit_ptr, None, st_off, dim * dstate, mask_dn, BD, HAS_RESET, False,
                                               False, HAS_VINIT, False)
                    x = xa[7]
                else:
                    xs, _P, _y = _steps8(x, None, A2, d, v, b, k, None, BD, HAS_RESET, False, False)
                    x = xs[8]
            else:
                xs, _P, _y = _steps8(x, None, A2, d, v, b, k, None, BD, HAS_RESET, False, False)
                if HALF >= 2:
                    tl.store(scr_ptr + scr_off + (s * SCR + 1) * dstate, xs[4], mask=mask_dn)
                x = xs[8]
        tl.debug_barrier()
        # pass 2: tiles backwards
        for ss in range(0, ntiles):
            s = ntiles - 1 - ss
            t0 = cstart + TILE * s
            x0 = tl.load(scr_ptr + scr_off + (s * SCR) * dstate, mask=mask_dn, other=0.0)
            offs_t, mt, m2 = _tile_offsets(t0, L, mask_d)
            u, draw, dt, Bt, keep = _load_tile(u_ptr, dt_ptr, B_ptr, reset_ptr, row, B_row, rst_row, bias,
                                               offs_t, mt, m2, mask_n, HAS_BIAS, SOFTPLUS, HAS_RESET)
            mb = mask_n[:, None] & mt[None, :]
            g = tl.load(gout_ptr + row + offs_t[None, :], mask=m2, other=0.0).to(tl.float32)
            if HAS_Z:
                zt = tl.load(z_ptr + row + offs_t[None, :], mask=m2, other=0.0).to(tl.float32)
                yp = tl.load(ypre_ptr + row + offs_t[None, :], mask=m2, other=0.0).to(tl.float32)
                sz = _sigmoid(zt)
                gz = g * yp * sz * (1.0 + zt * (1.0 - sz))
                tl.store(dz_ptr + row + offs_t[None, :], gz.to(dz_ptr.dtype.element_ty), mask=m2)
                if STORE_Y:  # the gated output, for a caller that did not keep it (yout_ptr None otherwise)
                    tl.store(yout_ptr + row + offs_t[None, :], (yp * zt * sz).to(yout_ptr.dtype.element_ty),
                             mask=m2)
                gy = g * zt * sz
            else:
                gy = g
            if HALF == 0:
                d = _split8(dt, BD)
                v = _split8(dt * u, BD)
                # B_t, C_t as per-step vector loads (L1 hits): their layout then matches the state's, which
                # keeps far fewer registers live than splitting [BN, 8] tiles
                b = _cols8(B_ptr, B_row1, t0, L, mask_n)
                c8 = _cols8(C_ptr, C_row1, t0, L, mask_n)
                k = _split8(keep, 1)
                gs = _split8(gy, BD)
            if HALF > 0:
                xm = x0
                if HALF >= 2:
                    xm = tl.load(scr_ptr + scr_off + (s * SCR + 1) * dstate, mask=mask_dn, other=0.0)
                h, gA, gdt, gu, gCt, gBt = _bsteps_halves(h, gA, A2, x0, xm, u, dt, keep, gy, B_ptr, C_ptr, B_row1,
                                                          C_row1, t0, L, mask_n, BD, BN, HAS_RESET, HALF)
            elif VARLEN:
                # a tile with no mark (most: sequences are long next to 8 steps, positions few) takes the
                # unmarked steps, whose chain has no per-step scalar loads and branches
                if _tile_marked(vs_ptr, ve_ptr, t0, L):
                    xb, xa, _P, _y = _vsteps8(x0, None, A2, d, v, b, k, None, t0, vs_ptr, ve_ptr, vinit_ptr, None,
                                              st_off, dim * dstate, mask_dn, BD, HAS_RESET, False, False, HAS_VINIT,
                                              False)
                    h, gA, gdt, gu, gCt, gBt = _vbsteps8(h, gA, A2, xb, xa, d, v, b, c8, k, gs, u, dt, t0, vs_ptr, ve_ptr,
                                                         vlast_ptr, dinit_ptr, st_off, dim * dstate, mask_dn, BD, BN,
                                                         HAS_RESET, HAS_VLAST)
                else:
                    xs, _P, _y = _steps8(x0, None, A2, d, v, b, k, None, BD, HAS_RESET, False, False)
                    h, gA, gdt, gu, gCt, gBt = _bsteps8(h, gA, A2, xs, d, v, b, c8, k, gs, u, dt, BD, BN, HAS_RESET)
            else:
                xs, _P, _y = _steps8(x0, None, A2, d, v, b, k, None, BD, HAS_RESET, False, False)
                h, gA, gdt, gu, gCt, gBt = _bsteps8(h, gA, A2, xs, d, v, b, c8, k, gs, u, dt, BD, BN, HAS_RESET)
            if HAS_D:
                gu = gu + Dv[:, None] * gy
                gD += tl.sum(tl.where(m2, gy * u, 0.0), 1)
            if SOFTPLUS:
                pre = draw
                if HAS_BIAS:
                    pre = pre + bias[:, None]
                gdt = gdt * _sigmoid(pre)
            gdt = tl.where(m2, gdt, 0.0)
            if HAS_BIAS:
                gbias += tl.sum(gdt, 1)
            tl.store(du_ptr + row + offs_t[None, :], gu.to(du_ptr.dtype.element_ty), mask=m2)
            tl.store(ddt_ptr + row + offs_t[None, :], gdt.to(ddt_ptr.dtype.element_ty), mask=m2)
            tl.atomic_add(dB_ptr + dB_row + offs_t[None, :], gBt, mask=mb)
            tl.atomic_add(dC_ptr + dB_row + offs_t[None, :], gCt, mask=mb)
        tl.debug_barrier()
    if MODE == 0:
        if not VARLEN:  # packed sequences stored theirs at their first steps
            tl.store(dinit_ptr + st_off, h, mask=mask_dn)
    tl.store(dA_ptr + part_off, gA, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + part * dim + offs_d, gD, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + part * dim + offs_d, gbias, mask=mask_d)


@triton.jit
def _lstep(h, P, A2, d, k, g, c, I: tl.constexpr, HAS_RESET: tl.constexpr):
    """Reverse of step I for the adjoint alone: h <- a_t * (h + gy_t C_t); P <- P * a_t."""
    a = tl.exp2(_decay_exponent(d[I], A2, k[I], HAS_RESET))
    h = (h + g[I][:, None] * c[I][None, :]) * a
    return h, P * a


@triton.jit
def _lsteps8(h, P, A2, d, k, g, c, HAS_RESET: tl.constexpr):
    """The 8 adjoint steps of a tile, last step first (columns d = dt, k = keep, g = gy, c = C)."""
    h, P = _lstep(h, P, A2, d, k, g, c, 7, HAS_RESET)
    h, P = _lstep(h, P, A2, d, k, g, c, 6, HAS_RESET)
    h, P = _lstep(h, P, A2, d, k, g, c, 5, HAS_RESET)
    h, P = _lstep(h, P, A2, d, k, g, c, 4, HAS_RESET)
    h, P = _lstep(h, P, A2, d, k, g, c, 3, HAS_RESET)
    h, P = _lstep(h, P, A2, d, k, g, c, 2, HAS_RESET)
    h, P = _lstep(h, P, A2, d, k, g, c, 1, HAS_RESET)
    h, P = _lstep(h, P, A2, d, k, g, c, 0, HAS_RESET)
    return h, P


@triton.jit
def _vlstep(h, P, A2, d, k, g, c, I: tl.constexpr, t0, vs_ptr, ve_ptr, vlast_ptr, st_off, sd, mask_dn,
            HAS_RESET: tl.constexpr, HAS_VLAST: tl.constexpr):
    """_lstep over packed sequences: a sequence end adds the gradient of its final state (HAS_VLAST), a
    sequence start stops the adjoint (h and P to zero)."""
    if HAS_VLAST:
        e = tl.load(ve_ptr + t0 + I)
        if e >= 0:
            h = h + tl.load(vlast_ptr + e.to(tl.int64) * sd + st_off, mask=mask_dn, other=0.0)
    h, P = _lstep(h, P, A2, d, k, g, c, I, HAS_RESET)
    s = tl.load(vs_ptr + t0 + I)
    if s >= 0:
        h = tl.zeros_like(h)
        P = tl.zeros_like(P)
    return h, P


@triton.jit
def _vlsteps8(h, P, A2, d, k, g, c, t0, vs_ptr, ve_ptr, vlast_ptr, st_off, sd, mask_dn, HAS_RESET: tl.constexpr,
              HAS_VLAST: tl.constexpr):
    """_lsteps8 over packed sequences (see _vlstep)."""
    h, P = _vlstep(h, P, A2, d, k, g, c, 7, t0, vs_ptr, ve_ptr, vlast_ptr, st_off, sd, mask_dn, HAS_RESET, HAS_VLAST)
    h, P = _vlstep(h, P, A2, d, k, g, c, 6, t0, vs_ptr, ve_ptr, vlast_ptr, st_off, sd, mask_dn, HAS_RESET, HAS_VLAST)
    h, P = _vlstep(h, P, A2, d, k, g, c, 5, t0, vs_ptr, ve_ptr, vlast_ptr, st_off, sd, mask_dn, HAS_RESET, HAS_VLAST)
    h, P = _vlstep(h, P, A2, d, k, g, c, 4, t0, vs_ptr, ve_ptr, vlast_ptr, st_off, sd, mask_dn, HAS_RESET, HAS_VLAST)
    h, P = _vlstep(h, P, A2, d, k, g, c, 3, t0, vs_ptr, ve_ptr, vlast_ptr, st_off, sd, mask_dn, HAS_RESET, HAS_VLAST)
    h, P = _vlstep(h, P, A2, d, k, g, c, 2, t0, vs_ptr, ve_ptr, vlast_ptr, st_off, sd, mask_dn, HAS_RESET, HAS_VLAST)
    h, P = _vlstep(h, P, A2, d, k, g, c, 1, t0, vs_ptr, ve_ptr, vlast_ptr, st_off, sd, mask_dn, HAS_RESET, HAS_VLAST)
    h, P = _vlstep(h, P, A2, d, k, g, c, 0, t0, vs_ptr, ve_ptr, vlast_ptr, st_off, sd, mask_dn, HAS_RESET, HAS_VLAST)
    return h, P


@optional_inputs(HAS_Z="z_ptr", HAS_BIAS="bias_ptr", HAS_RESET="reset_ptr", VARLEN="vs_ptr", HAS_VLAST="vlast_ptr")
@triton.jit
def _scan_bwd_local_kernel(
    dt_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, reset_ptr, gout_ptr, sum_ptr, prod_ptr, vs_ptr, ve_ptr, vlast_ptr,
    dim, L, dstate, cpg, nchunks, sxb, sxd, sCb, sCg, sCn,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESET: tl.constexpr, SOFTPLUS: tl.constexpr,
    CHUNK: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, VARLEN: tl.constexpr, HAS_VLAST: tl.constexpr,
):
    """Phase 1 of the chunk-parallel backward, grid [channel blocks, batch, chunks].

    The adjoint recurrence h_{t-1} = a_t (h_t + gy_t C_t) is linear in h, so the adjoint leaving chunk c to
    the left is P_c * (adjoint entering from the right) + S_c. This kernel sweeps chunk c backwards from a
    zero adjoint: S_c -> sum_ptr, P_c = prod of the chunk's decays (0 after a reset) -> prod_ptr, both
    [batch, dim, nchunks, dstate] float32. It needs no states, only dt, reset, C and the output gradient.
    VARLEN: the final states' gradients (vlast_ptr, or None) enter at the sequences' last steps, and a
    sequence's first step stops the adjoint (S_c and P_c then hold only what lies after it).
    """
    SUB: tl.constexpr = CHUNK // TILE
    pid_b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2)
    offs_d, offs_n, mask_d, mask_n, mask_dn, grp, _A, A2, bias, _Dv = _channel_block(
        A_ptr, bias_ptr, None, dim, dstate, cpg, BD, BN, HAS_BIAS, False)
    _st_off, ck_off = _state_offsets(pid_b, offs_d, offs_n, dim, dstate, nchunks)
    row = pid_b * sxb + offs_d[:, None].to(tl.int64) * sxd
    C_row1 = pid_b * sCb + grp * sCg + offs_n * sCn
    rst_row = pid_b * L
    cstart = c * CHUNK
    ntiles = tl.minimum(SUB, (L - cstart + TILE - 1) // TILE)
    h = tl.zeros((BD, BN), tl.float32)
    P = tl.full((BD, BN), 1.0, tl.float32)
    for ss in range(0, ntiles):
        t0 = cstart + TILE * (ntiles - 1 - ss)
        offs_t, mt, m2 = _tile_offsets(t0, L, mask_d)
        _draw, dt = _dt_tile(dt_ptr, row, bias, offs_t, m2, HAS_BIAS, SOFTPLUS)
        keep = _keep_tile(reset_ptr, rst_row, offs_t, mt, HAS_RESET)
        g = tl.load(gout_ptr + row + offs_t[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            zt = tl.load(z_ptr + row + offs_t[None, :], mask=m2, other=0.0).to(tl.float32)
            g = g * zt * _sigmoid(zt)
        d = _split8(dt, BD)
        gs = _split8(g, BD)
        k = _split8(keep, 1)
        c8 = _cols8(C_ptr, C_row1, t0, L, mask_n)
        if VARLEN:
            # a tile with no mark (most: sequences are long next to 8 steps, positions few) takes the
            # unmarked steps, whose chain has no per-step scalar loads and branches
            if _tile_marked(vs_ptr, ve_ptr, t0, L):
                h, P = _vlsteps8(h, P, A2, d, k, gs, c8, t0, vs_ptr, ve_ptr, vlast_ptr, _st_off, dim * dstate, mask_dn,
                                 HAS_RESET, HAS_VLAST)
            else:
                h, P = _lsteps8(h, P, A2, d, k, gs, c8, HAS_RESET)
        else:
            h, P = _lsteps8(h, P, A2, d, k, gs, c8, HAS_RESET)
    tl.store(sum_ptr + ck_off + c * dstate, h, mask=mask_dn)
    tl.store(prod_ptr + ck_off + c * dstate, P, mask=mask_dn)
