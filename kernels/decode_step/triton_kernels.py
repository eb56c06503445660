"""Triton kernels of the fused Mamba-1 decode step: the conv window step and the SSM step (dt projection,
softplus, one state update, D skip and SiLU(z) gate), both updating their state in place."""

from __future__ import annotations

import triton
import triton.language as tl

from .._jit import _softplus, optional_inputs


@optional_inputs(HAS_BIAS="b_ptr")
@triton.jit
def _conv_step_kernel(x_ptr, sxb, state_ptr, w_ptr, b_ptr, out_ptr, C, K,
                      HAS_BIAS: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """Channels [cb*BC, (cb+1)*BC) of row b: window <- (window[1:], x); out = silu(sum(window * w) + bias).

    state [B, C, K] contiguous (updated in place, its dtype kept); x [B, C] with row stride ``sxb``; w [C, K].
    """
    b = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    k = tl.arange(0, BK)
    cm = c < C
    last = k[None, :] == K - 1
    base = state_ptr + b * C * K + c[:, None] * K + k[None, :]
    shifted = tl.load(base + 1, mask=cm[:, None] & (k[None, :] < K - 1), other=0.0)
    x = tl.load(x_ptr + b * sxb + c, mask=cm, other=0.0).to(state_ptr.dtype.element_ty)
    win = tl.where(last, x[:, None], shifted)
    tl.store(base, win, mask=cm[:, None] & (k[None, :] < K))
    w = tl.load(w_ptr + c[:, None] * K + k[None, :], mask=cm[:, None] & (k[None, :] < K), other=0.0).to(tl.float32)
    acc = tl.sum(win.to(tl.float32) * w, axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
    out = acc / (1.0 + tl.exp(-acc))
    tl.store(out_ptr + b * C + c, out.to(out_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _ssm_step_kernel(state_ptr, x_ptr, xdb_ptr, sxdb, w_ptr, swd, swr, A_ptr, D_ptr, bias_ptr, z_ptr, sz, out_ptr,
                     dim, dstate, R, BD: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    """Channels [pid*BD, (pid+1)*BD) of row b: dt = softplus(W_dt @ xdb[:R] + bias) (rounded to xdb's dtype before
    the bias, where ``F.linear`` rounds it), then one SSM step in place and the gated output.

    state [B, dim, dstate] contiguous; x, out [B, dim]; xdb [B, R + 2*dstate] (dt input, B, C) with row stride
    ``sxdb``; W_dt [dim, R] with strides (swd, swr); A [dim, dstate], D and bias [dim] float32; z [B, dim] with
    row stride ``sz``. Arithmetic in float32; the state keeps its dtype.
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, BN)
    j = tl.arange(0, BR)
    md = d < dim
    mn = n < dstate
    mdn = md[:, None] & mn[None, :]
    row = xdb_ptr + b * sxdb
    dtin = tl.load(row + j, mask=j < R, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + d[:, None] * swd + j[None, :] * swr, mask=md[:, None] & (j[None, :] < R),
                other=0.0).to(tl.float32)
    dt = tl.sum(w * dtin[None, :], 1).to(xdb_ptr.dtype.element_ty).to(tl.float32)
    dt = _softplus(dt + tl.load(bias_ptr + d, mask=md, other=0.0))
    Bv = tl.load(row + R + n, mask=mn, other=0.0).to(tl.float32)
    Cv = tl.load(row + R + dstate + n, mask=mn, other=0.0).to(tl.float32)
    st_off = (b * dim + d[:, None]) * dstate + n[None, :]
    s = tl.load(state_ptr + st_off, mask=mdn, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * dim + d, mask=md, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + d[:, None] * dstate + n[None, :], mask=mdn, other=0.0)
    s = tl.exp(dt[:, None] * A) * s + (dt * x)[:, None] * Bv[None, :]
    tl.store(state_ptr + st_off, s.to(state_ptr.dtype.element_ty), mask=mdn)
    y = tl.sum(s * Cv[None, :], 1) + x * tl.load(D_ptr + d, mask=md, other=0.0)
    zv = tl.load(z_ptr + b * sz + d, mask=md, other=0.0).to(tl.float32)
    y = y * zv / (1.0 + tl.exp(-zv))
    tl.store(out_ptr + b * dim + d, y.to(out_ptr.dtype.element_ty), mask=md)
