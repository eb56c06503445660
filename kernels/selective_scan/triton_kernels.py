"""Triton kernels of Mamba-1's selective scan: the forward, the backward and their chunk-boundary passes.

Layout (the wrappers in :mod:`mamba_state.kernels.selective_scan.ops` make every input contiguous in time):
    u, delta, z, out:   [batch, dim, seqlen]
    B, C:               [batch, ngroups, dstate, seqlen]
    A:                  [dim, dstate] float32
    initial_state:      [batch, dim, dstate] float32
    reset:              uint8 [batch, seqlen] (bool viewed as bytes)
    checkpoints:        [batch, dim, nchunks, dstate] float32: the state entering chunk c (before step c*CHUNK)

One program owns one batch row and a block of ``BD`` channels; its state tile [BD, BN] lives in registers, in
float32. Time advances in tiles of 8 steps: each input is read as one coalesced [rows, 8] tile and split into
its 8 columns in registers (reshape + split), the 8 recurrence steps are unrolled, and the 8 outputs are joined
back into one tile for a single store.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._jit import LOG2E, _sigmoid, _softplus


@triton.jit
def _split8(x, R: tl.constexpr):
    """[R, 8] -> its 8 columns, each [R], in order."""
    e, o = tl.split(tl.reshape(x, (R, 4, 2)))
    ee, eo = tl.split(tl.reshape(e, (R, 2, 2)))
    oe, oo = tl.split(tl.reshape(o, (R, 2, 2)))
    c0, c4 = tl.split(ee)
    c2, c6 = tl.split(eo)
    c1, c5 = tl.split(oe)
    c3, c7 = tl.split(oo)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _join8(c0, c1, c2, c3, c4, c5, c6, c7, R: tl.constexpr):
    """8 columns [R] -> [R, 8] (inverse of _split8)."""
    e = tl.reshape(tl.join(tl.join(c0, c4), tl.join(c2, c6)), (R, 4))
    o = tl.reshape(tl.join(tl.join(c1, c5), tl.join(c3, c7)), (R, 4))
    return tl.reshape(tl.join(e, o), (R, 8))


@triton.jit
def _load_tile(u_ptr, dt_ptr, B_ptr, C_ptr, reset_ptr, row, bc_row, rst_row, bias, t0, L, mask_d, mask_n,
               HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_RESET: tl.constexpr):
    """Inputs of steps t0 .. t0+7 as tiles; steps past L get dt = 0, B = C = 0, keep = 1 (no-ops)."""
    offs_t = t0 + tl.arange(0, 8)
    mt = offs_t < L
    m2 = mask_d[:, None] & mt[None, :]
    u = tl.load(u_ptr + row + offs_t[None, :], mask=m2, other=0.0).to(tl.float32)
    draw = tl.load(dt_ptr + row + offs_t[None, :], mask=m2, other=0.0).to(tl.float32)
    dt = draw
    if HAS_BIAS:
        dt = dt + bias[:, None]
    if SOFTPLUS:
        dt = _softplus(dt)
    dt = tl.where(m2, dt, 0.0)
    mb = mask_n[:, None] & mt[None, :]
    Bt = tl.load(B_ptr + bc_row + offs_t[None, :], mask=mb, other=0.0).to(tl.float32)
    if HAS_RESET:
        r = tl.load(reset_ptr + rst_row + offs_t[None, :], mask=mt[None, :], other=0)
        keep = tl.where(r != 0, 0.0, 1.0)
    else:
        keep = tl.full((1, 8), 1.0, tl.float32)
    return u, draw, dt, Bt, keep, m2


@triton.jit
def _fstep(x, A2, dt, dtu, Bc, keep, HAS_RESET: tl.constexpr):
    """One step: x <- exp(dt*A) * keep * x + dt*u*B. Returns (new x, the decay used)."""
    a = tl.exp2(dt[:, None] * A2)
    if HAS_RESET:
        a = a * keep[:, None]
    return a * x + dtu[:, None] * Bc[None, :], a


@triton.jit
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, init_ptr, reset_ptr,
    out_ptr, last_ptr, ckpt_ptr, sum_ptr, prod_ptr, ypre_ptr,
    dim, L, dstate, cpg, nchunks,
    sBb, sBg, sBn, sCb, sCg, sCn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    HAS_RESET: tl.constexpr, SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr, MODE: tl.constexpr,
    BD: tl.constexpr, BN: tl.constexpr, STORE_YPRE: tl.constexpr,
):
    """MODE 0: the whole sequence in one program (grid [channel blocks, batch]); writes out, checkpoints, last.
    With z, STORE_YPRE also writes the output before the gate (for the backward; inference skips it).
    MODE 1: chunk summaries (grid [channel blocks, batch, chunks]): the chunk run from a zero state, its end
    state -> sum_ptr and the product of its decays -> prod_ptr (both [batch, dim, nchunks, dstate]).
    MODE 2: outputs of each chunk from its checkpoint (grid as MODE 1), after _carry_kernel filled them.
    """
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    grp = (pid_d * BD) // cpg
    A2 = tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32) * LOG2E
    bias = tl.zeros((BD,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros((BD,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    st_off = (pid_b * dim + offs_d[:, None]) * dstate + offs_n[None, :]
    ck_off = ((pid_b * dim + offs_d[:, None]) * nchunks) * dstate + offs_n[None, :]
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
    row = (pid_b * dim + offs_d[:, None]) * L
    B_row = pid_b * sBb + grp * sBg + offs_n[:, None] * sBn
    C_row = pid_b * sCb + grp * sCg + offs_n[:, None] * sCn
    rst_row = pid_b * L
    for t0 in range(t_lo, t_hi, 8):
        if MODE == 0:
            if t0 % CHUNK == 0:
                tl.store(ckpt_ptr + ck_off + (t0 // CHUNK) * dstate, x, mask=mask_dn)
        u, draw, dt, Bt, keep, m2 = _load_tile(u_ptr, dt_ptr, B_ptr, C_ptr, reset_ptr, row, B_row, rst_row, bias,
                                              t0, L, mask_d, mask_n, HAS_BIAS, SOFTPLUS, HAS_RESET)
        offs_t = t0 + tl.arange(0, 8)
        dtu = dt * u
        d0, d1, d2, d3, d4, d5, d6, d7 = _split8(dt, BD)
        v0, v1, v2, v3, v4, v5, v6, v7 = _split8(dtu, BD)
        b0, b1, b2, b3, b4, b5, b6, b7 = _split8(Bt, BN)
        k0, k1, k2, k3, k4, k5, k6, k7 = _split8(keep, 1)
        if MODE == 1:
            x, a = _fstep(x, A2, d0, v0, b0, k0, HAS_RESET)
            P = P * a
            x, a = _fstep(x, A2, d1, v1, b1, k1, HAS_RESET)
            P = P * a
            x, a = _fstep(x, A2, d2, v2, b2, k2, HAS_RESET)
            P = P * a
            x, a = _fstep(x, A2, d3, v3, b3, k3, HAS_RESET)
            P = P * a
            x, a = _fstep(x, A2, d4, v4, b4, k4, HAS_RESET)
            P = P * a
            x, a = _fstep(x, A2, d5, v5, b5, k5, HAS_RESET)
            P = P * a
            x, a = _fstep(x, A2, d6, v6, b6, k6, HAS_RESET)
            P = P * a
            x, a = _fstep(x, A2, d7, v7, b7, k7, HAS_RESET)
            P = P * a
        else:
            Ct = tl.load(C_ptr + C_row + offs_t[None, :], mask=mask_n[:, None] & (offs_t < L)[None, :],
                         other=0.0).to(tl.float32)
            c0, c1, c2, c3, c4, c5, c6, c7 = _split8(Ct, BN)
            x, _a = _fstep(x, A2, d0, v0, b0, k0, HAS_RESET)
            y0 = tl.sum(x * c0[None, :], 1)
            x, _a = _fstep(x, A2, d1, v1, b1, k1, HAS_RESET)
            y1 = tl.sum(x * c1[None, :], 1)
            x, _a = _fstep(x, A2, d2, v2, b2, k2, HAS_RESET)
            y2 = tl.sum(x * c2[None, :], 1)
            x, _a = _fstep(x, A2, d3, v3, b3, k3, HAS_RESET)
            y3 = tl.sum(x * c3[None, :], 1)
            x, _a = _fstep(x, A2, d4, v4, b4, k4, HAS_RESET)
            y4 = tl.sum(x * c4[None, :], 1)
            x, _a = _fstep(x, A2, d5, v5, b5, k5, HAS_RESET)
            y5 = tl.sum(x * c5[None, :], 1)
            x, _a = _fstep(x, A2, d6, v6, b6, k6, HAS_RESET)
            y6 = tl.sum(x * c6[None, :], 1)
            x, _a = _fstep(x, A2, d7, v7, b7, k7, HAS_RESET)
            y7 = tl.sum(x * c7[None, :], 1)
            y = _join8(y0, y1, y2, y3, y4, y5, y6, y7, BD)
            if HAS_D:
                y = y + Dv[:, None] * u
            if HAS_Z:
                if STORE_YPRE:  # the backward needs the output before the gate (as upstream saves it)
                    tl.store(ypre_ptr + row + offs_t[None, :], y.to(ypre_ptr.dtype.element_ty), mask=m2)
                zt = tl.load(z_ptr + row + offs_t[None, :], mask=m2, other=0.0).to(tl.float32)
                y = y * zt * _sigmoid(zt)
            tl.store(out_ptr + row + offs_t[None, :], y.to(out_ptr.dtype.element_ty), mask=m2)
    if MODE == 0:
        tl.store(last_ptr + st_off, x, mask=mask_dn)
    if MODE == 1:
        tl.store(sum_ptr + ck_off + c * dstate, x, mask=mask_dn)
        tl.store(prod_ptr + ck_off + c * dstate, P, mask=mask_dn)


@triton.jit
def _carry_kernel(init_ptr, sum_ptr, prod_ptr, ckpt_ptr, last_ptr, dim, dstate, nchunks,
                  HAS_INIT: tl.constexpr, BLOCK: tl.constexpr):
    """Short sequential pass over chunk boundaries: checkpoint[c] = state entering chunk c;
    state leaving chunk c = prod[c] * checkpoint[c] + sum[c]. Grid: [cdiv(dim * dstate, BLOCK), batch]."""
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
    for c in range(0, nchunks):
        tl.store(ckpt_ptr + base + c * dstate, x, mask=mask)
        s = tl.load(sum_ptr + base + c * dstate, mask=mask, other=0.0)
        p = tl.load(prod_ptr + base + c * dstate, mask=mask, other=0.0)
        x = p * x + s
    tl.store(last_ptr + pid_b * dim * dstate + offs, x, mask=mask)


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
def _bstep(h, x_prev, x_cur, A2, keep, dt, dtu, Bc, Cc, gy, A, gA, HAS_RESET: tl.constexpr):
    """Reverse of one step. h enters as dL/dx_t from later steps only and leaves as dL/dx_{t-1}.

    ``gy`` is the gradient reaching y_t = C_t . x_t (after the gate). The decay exp(dt*A) (times keep) is
    recomputed here rather than kept from the forward recompute: fewer live registers.
    Returns (h, gA, gC [BN], gB [BN], hb [BD] = sum_n h*B, gdt_state [BD] = sum_n h*x_prev*a*A).
    """
    a = tl.exp2(dt[:, None] * A2)
    if HAS_RESET:
        a = a * keep[:, None]
    h = h + gy[:, None] * Cc[None, :]
    gC = tl.sum(gy[:, None] * x_cur, 0)
    gB = tl.sum(h * dtu[:, None], 0)
    hb = tl.sum(h * Bc[None, :], 1)
    hx = h * (x_prev * a)
    gA = gA + hx * dt[:, None]
    gdt = tl.sum(hx * A, 1)
    h = h * a
    return h, gA, gC, gB, hb, gdt


@triton.jit
def _scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, reset_ptr, ckpt_ptr, gout_ptr, glast_ptr, scr_ptr,
    ypre_ptr, du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, dinit_ptr, hin_ptr,
    dim, L, dstate, cpg, nchunks, nbatch, nsplit,
    sBb, sBg, sBn, sCb, sCg, sCn, sdBb, sdBg, sdBn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GLAST: tl.constexpr,
    HAS_RESET: tl.constexpr, SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr, MODE: tl.constexpr,
    BD: tl.constexpr, BN: tl.constexpr,
):
    """Reverse sweep over chunks. For each chunk: recompute the state at every 8-step tile boundary from the
    chunk's checkpoint (written to a small per-program scratch), then walk the tiles backwards, recomputing the
    8 states of a tile in registers and applying 8 reverse steps.

    MODE 0 (grid [channel blocks, batch]): one program walks all chunks from last to first, carrying the
    adjoint h from the gradient of the last state (or zero); writes dinit [batch, dim, dstate].
    MODE 1 (grid [channel blocks, batch, nsplit]): program g takes chunks g, g + nsplit, ... in any order,
    each starting from the true adjoint entering it from the right, hin [batch, dim, nchunks, dstate]
    (from _scan_bwd_local_kernel and _carry_bwd_kernel); no dinit (the carry pass gives it).

    Writes du, ddelta, dz per element; dB, dC by atomic adds into float32 [batch, ngroups, dstate, seqlen];
    partial sums dA [parts, dim, dstate], dD and ddelta_bias [parts, dim] with parts = batch (MODE 0) or
    nsplit * batch (MODE 1, part g * batch + b); the scratch has the same parts.
    """
    SUB: tl.constexpr = CHUNK // 8
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    if MODE == 0:
        part = pid_b
    else:
        pid_g = tl.program_id(2)
        part = pid_g.to(tl.int64) * nbatch + pid_b
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    grp = (pid_d * BD) // cpg
    A = tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    A2 = A * LOG2E
    bias = tl.zeros((BD,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros((BD,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    st_off = (pid_b * dim + offs_d[:, None]) * dstate + offs_n[None, :]
    ck_off = ((pid_b * dim + offs_d[:, None]) * nchunks) * dstate + offs_n[None, :]
    part_off = (part * dim + offs_d[:, None]) * dstate + offs_n[None, :]
    scr_off = ((part * dim + offs_d[:, None]) * SUB) * dstate + offs_n[None, :]
    if HAS_GLAST:
        h = tl.load(glast_ptr + st_off, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BD, BN), tl.float32)
    gA = tl.zeros((BD, BN), tl.float32)
    gD = tl.zeros((BD,), tl.float32)
    gbias = tl.zeros((BD,), tl.float32)
    row = (pid_b * dim + offs_d[:, None]) * L
    B_row = pid_b * sBb + grp * sBg + offs_n[:, None] * sBn
    C_row = pid_b * sCb + grp * sCg + offs_n[:, None] * sCn
    B_row1 = pid_b * sBb + grp * sBg + offs_n * sBn
    C_row1 = pid_b * sCb + grp * sCg + offs_n * sCn
    dB_row = pid_b * sdBb + grp * sdBg + offs_n[:, None] * sdBn
    dC_row = pid_b * sdBb + grp * sdBg + offs_n[:, None] * sdBn
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
        ntiles = tl.minimum(SUB, (L - cstart + 7) // 8)
        # pass 1: states at the tile boundaries of this chunk
        x = tl.load(ckpt_ptr + ck_off + c * dstate, mask=mask_dn, other=0.0)
        for s in range(0, ntiles):
            tl.store(scr_ptr + scr_off + s * dstate, x, mask=mask_dn)
            u, draw, dt, Bt, keep, m2 = _load_tile(u_ptr, dt_ptr, B_ptr, C_ptr, reset_ptr, row, B_row, rst_row,
                                                  bias, cstart + 8 * s, L, mask_d, mask_n,
                                                  HAS_BIAS, SOFTPLUS, HAS_RESET)
            dtu = dt * u
            d0, d1, d2, d3, d4, d5, d6, d7 = _split8(dt, BD)
            v0, v1, v2, v3, v4, v5, v6, v7 = _split8(dtu, BD)
            b0, b1, b2, b3, b4, b5, b6, b7 = _split8(Bt, BN)
            k0, k1, k2, k3, k4, k5, k6, k7 = _split8(keep, 1)
            x, _a = _fstep(x, A2, d0, v0, b0, k0, HAS_RESET)
            x, _a = _fstep(x, A2, d1, v1, b1, k1, HAS_RESET)
            x, _a = _fstep(x, A2, d2, v2, b2, k2, HAS_RESET)
            x, _a = _fstep(x, A2, d3, v3, b3, k3, HAS_RESET)
            x, _a = _fstep(x, A2, d4, v4, b4, k4, HAS_RESET)
            x, _a = _fstep(x, A2, d5, v5, b5, k5, HAS_RESET)
            x, _a = _fstep(x, A2, d6, v6, b6, k6, HAS_RESET)
            x, _a = _fstep(x, A2, d7, v7, b7, k7, HAS_RESET)
        tl.debug_barrier()
        # pass 2: tiles backwards
        for ss in range(0, ntiles):
            s = ntiles - 1 - ss
            t0 = cstart + 8 * s
            x0 = tl.load(scr_ptr + scr_off + s * dstate, mask=mask_dn, other=0.0)
            u, draw, dt, Bt, keep, m2 = _load_tile(u_ptr, dt_ptr, B_ptr, C_ptr, reset_ptr, row, B_row, rst_row,
                                                  bias, t0, L, mask_d, mask_n, HAS_BIAS, SOFTPLUS, HAS_RESET)
            offs_t = t0 + tl.arange(0, 8)
            mt = offs_t < L
            mb = mask_n[:, None] & mt[None, :]
            g = tl.load(gout_ptr + row + offs_t[None, :], mask=m2, other=0.0).to(tl.float32)
            if HAS_Z:
                zt = tl.load(z_ptr + row + offs_t[None, :], mask=m2, other=0.0).to(tl.float32)
                yp = tl.load(ypre_ptr + row + offs_t[None, :], mask=m2, other=0.0).to(tl.float32)
                sz = _sigmoid(zt)
                gz = g * yp * sz * (1.0 + zt * (1.0 - sz))
                tl.store(dz_ptr + row + offs_t[None, :], gz.to(dz_ptr.dtype.element_ty), mask=m2)
                gy = g * zt * sz
            else:
                gy = g
            dtu = dt * u
            d0, d1, d2, d3, d4, d5, d6, d7 = _split8(dt, BD)
            v0, v1, v2, v3, v4, v5, v6, v7 = _split8(dtu, BD)
            # B_t, C_t as per-step vector loads (L1 hits): their layout then matches the state's, which keeps
            # far fewer registers live than splitting [BN, 8] tiles
            b0, b1, b2, b3, b4, b5, b6, b7 = _cols8(B_ptr, B_row1, t0, L, mask_n)
            c0, c1, c2, c3, c4, c5, c6, c7 = _cols8(C_ptr, C_row1, t0, L, mask_n)
            k0, k1, k2, k3, k4, k5, k6, k7 = _split8(keep, 1)
            g0, g1, g2, g3, g4, g5, g6, g7 = _split8(gy, BD)
            x1, _a = _fstep(x0, A2, d0, v0, b0, k0, HAS_RESET)
            x2, _a = _fstep(x1, A2, d1, v1, b1, k1, HAS_RESET)
            x3, _a = _fstep(x2, A2, d2, v2, b2, k2, HAS_RESET)
            x4, _a = _fstep(x3, A2, d3, v3, b3, k3, HAS_RESET)
            x5, _a = _fstep(x4, A2, d4, v4, b4, k4, HAS_RESET)
            x6, _a = _fstep(x5, A2, d5, v5, b5, k5, HAS_RESET)
            x7, _a = _fstep(x6, A2, d6, v6, b6, k6, HAS_RESET)
            x8, _a = _fstep(x7, A2, d7, v7, b7, k7, HAS_RESET)
            h, gA, gC7, gB7, hb7, gt7 = _bstep(h, x7, x8, A2, k7, d7, v7, b7, c7, g7, A, gA, HAS_RESET)
            h, gA, gC6, gB6, hb6, gt6 = _bstep(h, x6, x7, A2, k6, d6, v6, b6, c6, g6, A, gA, HAS_RESET)
            h, gA, gC5, gB5, hb5, gt5 = _bstep(h, x5, x6, A2, k5, d5, v5, b5, c5, g5, A, gA, HAS_RESET)
            h, gA, gC4, gB4, hb4, gt4 = _bstep(h, x4, x5, A2, k4, d4, v4, b4, c4, g4, A, gA, HAS_RESET)
            h, gA, gC3, gB3, hb3, gt3 = _bstep(h, x3, x4, A2, k3, d3, v3, b3, c3, g3, A, gA, HAS_RESET)
            h, gA, gC2, gB2, hb2, gt2 = _bstep(h, x2, x3, A2, k2, d2, v2, b2, c2, g2, A, gA, HAS_RESET)
            h, gA, gC1, gB1, hb1, gt1 = _bstep(h, x1, x2, A2, k1, d1, v1, b1, c1, g1, A, gA, HAS_RESET)
            h, gA, gC0, gB0, hb0, gt0 = _bstep(h, x0, x1, A2, k0, d0, v0, b0, c0, g0, A, gA, HAS_RESET)
            hb = _join8(hb0, hb1, hb2, hb3, hb4, hb5, hb6, hb7, BD)
            gdt = _join8(gt0, gt1, gt2, gt3, gt4, gt5, gt6, gt7, BD) + u * hb
            gu = dt * hb
            gCt = _join8(gC0, gC1, gC2, gC3, gC4, gC5, gC6, gC7, BN)
            gBt = _join8(gB0, gB1, gB2, gB3, gB4, gB5, gB6, gB7, BN)
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
            tl.atomic_add(dC_ptr + dC_row + offs_t[None, :], gCt, mask=mb)
        tl.debug_barrier()
    if MODE == 0:
        tl.store(dinit_ptr + st_off, h, mask=mask_dn)
    tl.store(dA_ptr + part_off, gA, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + part * dim + offs_d, gD, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + part * dim + offs_d, gbias, mask=mask_d)


@triton.jit
def _lstep(h, P, A2, dt, keep, gy, Cc, HAS_RESET: tl.constexpr):
    """Reverse of one step for the adjoint alone: h <- a_t * (h + gy_t C_t); P <- P * a_t."""
    a = tl.exp2(dt[:, None] * A2)
    if HAS_RESET:
        a = a * keep[:, None]
    h = (h + gy[:, None] * Cc[None, :]) * a
    return h, P * a


@triton.jit
def _scan_bwd_local_kernel(
    dt_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, reset_ptr, gout_ptr, sum_ptr, prod_ptr,
    dim, L, dstate, cpg, nchunks, sCb, sCg, sCn,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESET: tl.constexpr, SOFTPLUS: tl.constexpr,
    CHUNK: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
):
    """Phase 1 of the chunk-parallel backward, grid [channel blocks, batch, chunks].

    The adjoint recurrence h_{t-1} = a_t (h_t + gy_t C_t) is linear in h, so the adjoint leaving chunk c to
    the left is P_c * (adjoint entering from the right) + S_c. This kernel sweeps chunk c backwards from a
    zero adjoint: S_c -> sum_ptr, P_c = prod of the chunk's decays (0 after a reset) -> prod_ptr, both
    [batch, dim, nchunks, dstate] float32. It needs no states, only dt, reset, C and the output gradient.
    """
    SUB: tl.constexpr = CHUNK // 8
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    grp = (pid_d * BD) // cpg
    A2 = tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32) * LOG2E
    bias = tl.zeros((BD,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    ck_off = ((pid_b * dim + offs_d[:, None]) * nchunks) * dstate + offs_n[None, :]
    row = (pid_b * dim + offs_d[:, None]) * L
    C_row1 = pid_b * sCb + grp * sCg + offs_n * sCn
    rst_row = pid_b * L
    cstart = c * CHUNK
    ntiles = tl.minimum(SUB, (L - cstart + 7) // 8)
    h = tl.zeros((BD, BN), tl.float32)
    P = tl.full((BD, BN), 1.0, tl.float32)
    for ss in range(0, ntiles):
        t0 = cstart + 8 * (ntiles - 1 - ss)
        offs_t = t0 + tl.arange(0, 8)
        mt = offs_t < L
        m2 = mask_d[:, None] & mt[None, :]
        dt = tl.load(dt_ptr + row + offs_t[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt = dt + bias[:, None]
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = tl.where(m2, dt, 0.0)  # steps past L: decay 1, no input
        if HAS_RESET:
            r = tl.load(reset_ptr + rst_row + offs_t[None, :], mask=mt[None, :], other=0)
            keep = tl.where(r != 0, 0.0, 1.0)
        else:
            keep = tl.full((1, 8), 1.0, tl.float32)
        g = tl.load(gout_ptr + row + offs_t[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            zt = tl.load(z_ptr + row + offs_t[None, :], mask=m2, other=0.0).to(tl.float32)
            g = g * zt * _sigmoid(zt)
        d0, d1, d2, d3, d4, d5, d6, d7 = _split8(dt, BD)
        g0, g1, g2, g3, g4, g5, g6, g7 = _split8(g, BD)
        k0, k1, k2, k3, k4, k5, k6, k7 = _split8(keep, 1)
        c0, c1, c2, c3, c4, c5, c6, c7 = _cols8(C_ptr, C_row1, t0, L, mask_n)
        h, P = _lstep(h, P, A2, d7, k7, g7, c7, HAS_RESET)
        h, P = _lstep(h, P, A2, d6, k6, g6, c6, HAS_RESET)
        h, P = _lstep(h, P, A2, d5, k5, g5, c5, HAS_RESET)
        h, P = _lstep(h, P, A2, d4, k4, g4, c4, HAS_RESET)
        h, P = _lstep(h, P, A2, d3, k3, g3, c3, HAS_RESET)
        h, P = _lstep(h, P, A2, d2, k2, g2, c2, HAS_RESET)
        h, P = _lstep(h, P, A2, d1, k1, g1, c1, HAS_RESET)
        h, P = _lstep(h, P, A2, d0, k0, g0, c0, HAS_RESET)
    tl.store(sum_ptr + ck_off + c * dstate, h, mask=mask_dn)
    tl.store(prod_ptr + ck_off + c * dstate, P, mask=mask_dn)


@triton.jit
def _carry_bwd_kernel(glast_ptr, sum_ptr, prod_ptr, hin_ptr, dinit_ptr, dim, dstate, nchunks,
                      HAS_GLAST: tl.constexpr, BLOCK: tl.constexpr):
    """Phase 2 of the chunk-parallel backward: a short pass over chunk boundaries, right to left.

    g starts as the gradient of the last state (or 0); for c = last .. 0: hin[c] = g (the true adjoint entering
    chunk c from the right), then g = prod[c] * g + sum[c]. The final g is the gradient of initial_state.
    hin has its own buffer: stores then never alias the loads ahead. Grid: [cdiv(dim * dstate, BLOCK), batch].
    """
    pid_b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat (channel, state) index
    mask = offs < dim * dstate
    ch = offs // dstate
    n = offs % dstate
    if HAS_GLAST:
        g = tl.load(glast_ptr + pid_b * dim * dstate + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.zeros((BLOCK,), tl.float32)
    base = ((pid_b * dim + ch) * nchunks) * dstate + n
    for cc in range(0, nchunks):
        c = nchunks - 1 - cc
        tl.store(hin_ptr + base + c * dstate, g, mask=mask)
        s = tl.load(sum_ptr + base + c * dstate, mask=mask, other=0.0)
        p = tl.load(prod_ptr + base + c * dstate, mask=mask, other=0.0)
        g = p * g + s
    tl.store(dinit_ptr + pid_b * dim * dstate + offs, g, mask=mask)
