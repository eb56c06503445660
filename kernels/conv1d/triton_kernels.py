"""Triton kernels: causal depthwise conv1d continuing a carried window, with per-step resets; forward and backward.

Semantics are those of :func:`mamba_state.reference.causal_conv1d_ref`: ``out[t] = act(pre[t])`` with ``pre[t] =
bias + sum_s w[W - 1 - s] * input[t - s]``, where inputs at negative positions come from ``conv_state`` (the last W
inputs before the chunk, oldest first), and an input is visible at step t only if no reset lies in (its position, t].

The backward recomputes the pre-activation where it needs it (W loads per value, all from cache) instead of keeping
it: ``dx[p] = sum_s w[W - 1 - s] * dpre[p + s]`` over the steps that see p, ``dw`` and ``dbias`` as per-program
partial sums (no atomics), and the gradient of the state's inputs the same way as ``dx`` at negative positions.

x, out, dout and dx are [batch, dim, L] with any batch and channel strides and time stride 1 (passed per tensor), so
channel-major slices of a projection ([dim, batch * L] viewed as [batch, dim, L]) run without copies.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._jit import optional_inputs


@triton.jit
def _inputs_at(x_rows, s_rows, state_ptr, pos, valid, mask_d, W: tl.constexpr, HAS_STATE: tl.constexpr):
    """The conv inputs at positions ``pos`` [P] as [BD, P] float32: x where pos >= 0, the state where -W <= pos < 0
    (zeros without one), 0 where not ``valid``."""
    m = mask_d[:, None] & (valid & (pos >= 0))[None, :]
    v = tl.load(x_rows + pos[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_STATE:
        ms = mask_d[:, None] & (valid & (pos < 0) & (pos >= -W))[None, :]
        v += tl.load(state_ptr + s_rows + (W + pos)[None, :], mask=ms, other=0.0).to(tl.float32)
    return v


@triton.jit
def _reset_at(reset_ptr, rst_row, pos, valid, L):
    """[P] int1: a reset at step ``pos`` (none outside [0, L))."""
    r = tl.load(reset_ptr + rst_row + pos, mask=valid & (pos >= 0) & (pos < L), other=0)
    return r != 0


@triton.jit
def _preact(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, offs_d, mask_d, q, valid, L,
            BD: tl.constexpr, W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
            HAS_RESET: tl.constexpr):
    """The pre-activation at steps ``q`` [P] as [BD, P] float32 (garbage-free 0 inputs where not ``valid``)."""
    acc = tl.zeros((BD, q.shape[0]), tl.float32)
    blocked = tl.zeros(q.shape, tl.int1)  # a reset lies in (q - s, q]
    for s in range(W):  # shift s: the input at step q - s, weighted by w[:, W - 1 - s]
        if HAS_RESET:
            if s > 0:
                blocked = blocked | _reset_at(reset_ptr, rst_row, q - s + 1, valid, L)
        v = _inputs_at(x_rows, s_rows, state_ptr, q - s, valid, mask_d, W, HAS_STATE)
        if HAS_RESET:
            v = tl.where(blocked[None, :], 0.0, v)
        wk = tl.load(w_ptr + offs_d * W + (W - 1 - s), mask=mask_d, other=0.0).to(tl.float32)
        acc += v * wk[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def _dpreact(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, g_rows, offs_d, mask_d, q, L,
             BD: tl.constexpr, W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
             HAS_RESET: tl.constexpr, SILU: tl.constexpr):
    """d loss / d pre at steps ``q`` [P] as [BD, P] float32 (0 outside [0, L))."""
    valid = (q >= 0) & (q < L)
    g = tl.load(g_rows + q[None, :], mask=mask_d[:, None] & valid[None, :], other=0.0).to(tl.float32)
    if SILU:
        pre = _preact(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, offs_d, mask_d, q, valid, L,
                      BD, W, HAS_BIAS, HAS_STATE, HAS_RESET)
        sig = 1.0 / (1.0 + tl.exp(-pre))
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return g


@triton.jit
def _dinputs(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, g_rows, offs_d, mask_d, p, L,
             BD: tl.constexpr, W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
             HAS_RESET: tl.constexpr, SILU: tl.constexpr):
    """d loss / d input at positions ``p`` [P] (negative: the state's inputs) as [BD, P] float32: the sum over the
    steps p + s that see p (no reset in (p, p + s]) of w[W - 1 - s] * dpre[p + s]."""
    acc = tl.zeros((BD, p.shape[0]), tl.float32)
    blocked = tl.zeros(p.shape, tl.int1)  # a reset lies in (p, p + s]
    for s in range(W):
        if HAS_RESET:
            if s > 0:
                blocked = blocked | _reset_at(reset_ptr, rst_row, p + s, p == p, L)
        g = _dpreact(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, g_rows, offs_d, mask_d,
                     p + s, L, BD, W, HAS_BIAS, HAS_STATE, HAS_RESET, SILU)
        if HAS_RESET:
            g = tl.where(blocked[None, :], 0.0, g)
        wk = tl.load(w_ptr + offs_d * W + (W - 1 - s), mask=mask_d, other=0.0).to(tl.float32)
        acc += g * wk[:, None]
    return acc


@optional_inputs(HAS_BIAS="bias_ptr", HAS_STATE="state_ptr", HAS_RESET="reset_ptr")
@triton.jit
def _causal_conv_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, reset_ptr, out_ptr, new_state_ptr,
    dim, L, sxb, sxd, sob, sod, W: tl.constexpr, WP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr, SILU: tl.constexpr,
    BD: tl.constexpr, BL: tl.constexpr,
):
    """Grid (time blocks, channel blocks, batch). x [batch, dim, L] with strides (sxb, sxd, 1), out with (sob, sod,
    1); state/new_state [batch, dim, W] contiguous float32 or x's dtype; reset uint8 [batch, L]. The programs of the
    first time block also write the new window."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_t = pid_t * BL + tl.arange(0, BL)
    mask_d = offs_d < dim
    mask_t = offs_t < L
    x_rows = x_ptr + b * sxb + offs_d[:, None].to(tl.int64) * sxd
    s_rows = (b * dim + offs_d[:, None]) * W  # rows of the state (read only when HAS_STATE: state_ptr may be None)
    rst_row = b * L
    acc = _preact(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, offs_d, mask_d, offs_t, mask_t, L,
                  BD, W, HAS_BIAS, HAS_STATE, HAS_RESET)
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    out_rows = out_ptr + b * sob + offs_d[:, None].to(tl.int64) * sod
    tl.store(out_rows + offs_t[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_t[None, :])

    if pid_t == 0:  # the window after the chunk: inputs at positions L - W + j, j = 0..W-1
        jj = tl.arange(0, WP)
        mask_j = jj < W
        pos = L - W + jj
        gone = tl.zeros((WP,), tl.int1)  # a reset lies in (pos, L - 1]
        if HAS_RESET:
            for s in range(1, W):
                q = L - s
                r = tl.load(reset_ptr + rst_row + q, mask=q >= 0, other=0)
                gone = gone | ((r != 0) & (jj < W - s))
        v = _inputs_at(x_rows, s_rows, state_ptr, pos, mask_j, mask_d, W, HAS_STATE)
        v = tl.where(gone[None, :], 0.0, v)
        ns_rows = new_state_ptr + (b * dim + offs_d[:, None]) * W
        tl.store(ns_rows + jj[None, :], v.to(new_state_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_j[None, :])


@optional_inputs(HAS_BIAS="bias_ptr", HAS_STATE="state_ptr", HAS_RESET="reset_ptr", STATE_GRAD="dstate_ptr")
@triton.jit
def _causal_conv_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, reset_ptr, dout_ptr, dx_ptr, dw_part_ptr, dbias_part_ptr, dstate_ptr,
    dim, L, sxb, sxd, sgb, sgd, sdb, sdd, W: tl.constexpr, WP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr, SILU: tl.constexpr,
    STATE_GRAD: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr,
):
    """Grid (time blocks, channel blocks, batch), as the forward. dout [batch, dim, L] strides (sgb, sgd, 1), dx
    (sdb, sdd, 1). Partial sums per program: dw_part [batch * time blocks, dim, W] and dbias_part [batch * time
    blocks, dim] float32. dstate [batch, dim, W] float32 (the gradient of the state's inputs through the outputs;
    its column 0 is never read by the conv: 0), written by the first time block when STATE_GRAD."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_t = pid_t * BL + tl.arange(0, BL)
    mask_d = offs_d < dim
    mask_t = offs_t < L
    x_rows = x_ptr + b * sxb + offs_d[:, None].to(tl.int64) * sxd
    g_rows = dout_ptr + b * sgb + offs_d[:, None].to(tl.int64) * sgd
    s_rows = (b * dim + offs_d[:, None]) * W
    rst_row = b * L
    dx = _dinputs(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, g_rows, offs_d, mask_d, offs_t, L,
                  BD, W, HAS_BIAS, HAS_STATE, HAS_RESET, SILU)
    dx_rows = dx_ptr + b * sdb + offs_d[:, None].to(tl.int64) * sdd
    tl.store(dx_rows + offs_t[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_t[None, :])

    # dw[W - 1 - s] = sum over this tile's steps q of dpre[q] * input[q - s] (visible); dbias = sum of dpre
    g = _dpreact(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, g_rows, offs_d, mask_d, offs_t, L,
                 BD, W, HAS_BIAS, HAS_STATE, HAS_RESET, SILU)
    part = b * tl.num_programs(0) + pid_t
    blocked = tl.zeros((BL,), tl.int1)
    for s in range(W):
        if HAS_RESET:
            if s > 0:
                blocked = blocked | _reset_at(reset_ptr, rst_row, offs_t - s + 1, mask_t, L)
        v = _inputs_at(x_rows, s_rows, state_ptr, offs_t - s, mask_t, mask_d, W, HAS_STATE)
        if HAS_RESET:
            v = tl.where(blocked[None, :], 0.0, v)
        tl.store(dw_part_ptr + (part * dim + offs_d) * W + (W - 1 - s), tl.sum(g * v, 1), mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + part * dim + offs_d, tl.sum(g, 1), mask=mask_d)

    if STATE_GRAD:
        if pid_t == 0:  # the state's inputs sit at positions j - W, j = 0..W-1
            jj = tl.arange(0, WP)
            ds = _dinputs(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, g_rows, offs_d, mask_d,
                          jj - W, L, BD, W, HAS_BIAS, HAS_STATE, HAS_RESET, SILU)
            ds = tl.where((jj >= 1)[None, :], ds, 0.0)
            ds_rows = dstate_ptr + (b * dim + offs_d[:, None]) * W
            tl.store(ds_rows + jj[None, :], ds, mask=mask_d[:, None] & (jj < W)[None, :])


# --- backward for widths up to 4 (Mamba's d_conv is 4): every shifted load once, every pre-activation once per use --


@triton.jit
def _tap(w_ptr, offs_d, mask_d, k: tl.constexpr, W: tl.constexpr):
    """Tap k (0..3) of the weight padded in front to width 4, as [BD] float32: w[:, k - (4 - W)], 0 for k < 4 - W.
    The conv of the padded weight is the conv of w (the extra taps multiply inputs by 0)."""
    if k >= 4 - W:
        return tl.load(w_ptr + offs_d * W + (k - (4 - W)), mask=mask_d, other=0.0).to(tl.float32)
    else:
        return tl.zeros(offs_d.shape, tl.float32)


@triton.jit
def _input4(x_rows, s_rows, state_ptr, p, k: tl.constexpr, L, mask_d, W: tl.constexpr, HAS_STATE: tl.constexpr):
    """The conv input at positions p + k as [BD, BL] float32 (0 at or past L, and before the state's W columns)."""
    return _inputs_at(x_rows, s_rows, state_ptr, p + k, p + k < L, mask_d, W, HAS_STATE)


@triton.jit
def _rst4(reset_ptr, rst_row, p, k: tl.constexpr, L, HAS_RESET: tl.constexpr):
    """[BL] int1: a reset at step p + k (False without resets or outside [0, L))."""
    if HAS_RESET:
        return _reset_at(reset_ptr, rst_row, p + k, p == p, L)
    else:
        return p != p


@triton.jit
def _vis(v, blocked, HAS_RESET: tl.constexpr):
    if HAS_RESET:
        return tl.where(blocked[None, :], 0.0, v)
    else:
        return v


@triton.jit
def _dpre4(g, xa, xb, xc, xd, ra, rb, rc, w0, w1, w2, w3, bias, HAS_BIAS: tl.constexpr, HAS_RESET: tl.constexpr,
           SILU: tl.constexpr):
    """d loss / d pre at one step q as [BD, BL]: g the output gradient there, xa..xd the inputs at q, q-1, q-2, q-3
    (weighted by taps 3, 2, 1, 0), ra, rb, rc the resets at q, q-1, q-2 (an input is hidden when a reset lies
    after it, up to q)."""
    if SILU:
        b1 = ra
        b2 = ra | rb
        b3 = b2 | rc
        pre = xa * w3[:, None] + _vis(xb, b1, HAS_RESET) * w2[:, None]
        pre += _vis(xc, b2, HAS_RESET) * w1[:, None] + _vis(xd, b3, HAS_RESET) * w0[:, None]
        if HAS_BIAS:
            pre += bias[:, None]
        sig = 1.0 / (1.0 + tl.exp(-pre))
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return g


@optional_inputs(HAS_BIAS="bias_ptr", HAS_STATE="state_ptr", HAS_RESET="reset_ptr", STATE_GRAD="dstate_ptr")
@triton.jit
def _causal_conv_bwd4_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, reset_ptr, dout_ptr, dx_ptr, dw_part_ptr, dbias_part_ptr, dstate_ptr,
    dim, L, sxb, sxd, sgb, sgd, sdb, sdd, W: tl.constexpr, WP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr, SILU: tl.constexpr,
    STATE_GRAD: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr,
):
    """_causal_conv_bwd_kernel (same arguments, grid and outputs) for W <= 4, with the weight padded to 4 taps.

    For the tile's positions p: the inputs at p-3 .. p+3 are loaded once each (7 shifted tiles), the output
    gradients at p .. p+3 once each, and the pre-activation at each of p .. p+3 computed once (the general kernel
    recomputes each one W times). dx[p] = sum_j tap[3 - j] * dpre[p + j] over the steps p + j that see p (no reset
    in (p, p + j]); dw[tap 3 - s] += dpre[p] * input[p - s] (visible); dbias += dpre[p]."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BD + tl.arange(0, BD)
    p = pid_t * BL + tl.arange(0, BL)
    mask_d = offs_d < dim
    mask_t = p < L
    x_rows = x_ptr + b * sxb + offs_d[:, None].to(tl.int64) * sxd
    g_rows = dout_ptr + b * sgb + offs_d[:, None].to(tl.int64) * sgd
    s_rows = (b * dim + offs_d[:, None]) * W
    rst_row = b * L
    w0 = _tap(w_ptr, offs_d, mask_d, 0, W)
    w1 = _tap(w_ptr, offs_d, mask_d, 1, W)
    w2 = _tap(w_ptr, offs_d, mask_d, 2, W)
    w3 = _tap(w_ptr, offs_d, mask_d, 3, W)
    bias = tl.zeros((BD,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    xm3 = _input4(x_rows, s_rows, state_ptr, p, -3, L, mask_d, W, HAS_STATE)
    xm2 = _input4(x_rows, s_rows, state_ptr, p, -2, L, mask_d, W, HAS_STATE)
    xm1 = _input4(x_rows, s_rows, state_ptr, p, -1, L, mask_d, W, HAS_STATE)
    x0 = _input4(x_rows, s_rows, state_ptr, p, 0, L, mask_d, W, HAS_STATE)
    r0 = _rst4(reset_ptr, rst_row, p, 0, L, HAS_RESET)
    rm1 = _rst4(reset_ptr, rst_row, p, -1, L, HAS_RESET)
    rm2 = _rst4(reset_ptr, rst_row, p, -2, L, HAS_RESET)
    # step p itself: its dpre feeds dx (tap 3), dw and dbias
    m2 = mask_d[:, None] & mask_t[None, :]
    g0 = tl.load(g_rows + p[None, :], mask=m2, other=0.0).to(tl.float32)
    d0 = _dpre4(g0, x0, xm1, xm2, xm3, r0, rm1, rm2, w0, w1, w2, w3, bias, HAS_BIAS, HAS_RESET, SILU)
    part = b * tl.num_programs(0) + pid_t
    dw_rows = dw_part_ptr + (part * dim + offs_d) * W
    if W >= 4:
        bl3 = r0 | rm1 | rm2
        tl.store(dw_rows + (W - 4), tl.sum(d0 * _vis(xm3, bl3, HAS_RESET), 1), mask=mask_d)
    if W >= 3:
        bl2 = r0 | rm1
        tl.store(dw_rows + (W - 3), tl.sum(d0 * _vis(xm2, bl2, HAS_RESET), 1), mask=mask_d)
    if W >= 2:
        tl.store(dw_rows + (W - 2), tl.sum(d0 * _vis(xm1, r0, HAS_RESET), 1), mask=mask_d)
    tl.store(dw_rows + (W - 1), tl.sum(d0 * x0, 1), mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + part * dim + offs_d, tl.sum(d0, 1), mask=mask_d)
    dx = d0 * w3[:, None]
    # steps p+1 .. p+3: each sees p unless a reset lies in (p, p + j]
    x1 = _input4(x_rows, s_rows, state_ptr, p, 1, L, mask_d, W, HAS_STATE)
    r1 = _rst4(reset_ptr, rst_row, p, 1, L, HAS_RESET)
    m1 = mask_d[:, None] & (p + 1 < L)[None, :]
    g1 = tl.load(g_rows + (p + 1)[None, :], mask=m1, other=0.0).to(tl.float32)
    d1 = _dpre4(g1, x1, x0, xm1, xm2, r1, r0, rm1, w0, w1, w2, w3, bias, HAS_BIAS, HAS_RESET, SILU)
    dx += _vis(d1, r1, HAS_RESET) * w2[:, None]
    x2 = _input4(x_rows, s_rows, state_ptr, p, 2, L, mask_d, W, HAS_STATE)
    r2 = _rst4(reset_ptr, rst_row, p, 2, L, HAS_RESET)
    m2b = mask_d[:, None] & (p + 2 < L)[None, :]
    g2 = tl.load(g_rows + (p + 2)[None, :], mask=m2b, other=0.0).to(tl.float32)
    d2 = _dpre4(g2, x2, x1, x0, xm1, r2, r1, r0, w0, w1, w2, w3, bias, HAS_BIAS, HAS_RESET, SILU)
    dx += _vis(d2, r1 | r2, HAS_RESET) * w1[:, None]
    x3 = _input4(x_rows, s_rows, state_ptr, p, 3, L, mask_d, W, HAS_STATE)
    r3 = _rst4(reset_ptr, rst_row, p, 3, L, HAS_RESET)
    m3 = mask_d[:, None] & (p + 3 < L)[None, :]
    g3 = tl.load(g_rows + (p + 3)[None, :], mask=m3, other=0.0).to(tl.float32)
    d3 = _dpre4(g3, x3, x2, x1, x0, r3, r2, r1, w0, w1, w2, w3, bias, HAS_BIAS, HAS_RESET, SILU)
    dx += _vis(d3, r1 | r2 | r3, HAS_RESET) * w0[:, None]
    dx_rows = dx_ptr + b * sdb + offs_d[:, None].to(tl.int64) * sdd
    tl.store(dx_rows + p[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m2)

    if STATE_GRAD:
        if pid_t == 0:  # the state's inputs sit at positions j - W, j = 0..W-1 (few: the general helper)
            jj = tl.arange(0, WP)
            ds = _dinputs(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, g_rows, offs_d, mask_d,
                          jj - W, L, BD, W, HAS_BIAS, HAS_STATE, HAS_RESET, SILU)
            ds = tl.where((jj >= 1)[None, :], ds, 0.0)
            ds_rows = dstate_ptr + (b * dim + offs_d[:, None]) * W
            tl.store(ds_rows + jj[None, :], ds, mask=mask_d[:, None] & (jj < W)[None, :])
