"""Triton kernel: causal depthwise conv1d continuing a carried window, with per-step resets (forward only).

Semantics are those of :func:`mamba_state.reference.causal_conv1d_ref`: ``out[t] = act(bias + sum_k w[k] *
input[t - (W - 1 - k)])`` where inputs at negative positions come from ``conv_state`` (the last W inputs before
the chunk, oldest first), and an input is visible at step t only if no reset lies in (its position, t].
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._jit import optional_inputs


@optional_inputs(HAS_BIAS="bias_ptr", HAS_STATE="state_ptr", HAS_RESET="reset_ptr")
@triton.jit
def _causal_conv_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, reset_ptr, out_ptr, new_state_ptr,
    dim, L, sxb, sxd, W: tl.constexpr, WP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr, SILU: tl.constexpr,
    BD: tl.constexpr, BL: tl.constexpr,
):
    """Grid (time blocks, channel blocks, batch). x [batch, dim, L] with strides (sxb, sxd, 1); out contiguous;
    state/new_state [batch, dim, W] contiguous float32 or x's dtype; reset uint8 [batch, L]. The programs of the
    first time block also write the new window."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_t = pid_t * BL + tl.arange(0, BL)
    mask_d = offs_d < dim
    mask_t = offs_t < L
    x_rows = x_ptr + b * sxb + offs_d[:, None].to(tl.int64) * sxd
    s_off = (b * dim + offs_d[:, None]) * W  # rows of state (read only when HAS_STATE: state_ptr may be None)
    acc = tl.zeros((BD, BL), tl.float32)
    blocked = tl.zeros((BL,), tl.int1)  # a reset lies in (t - s, t]
    for s in range(W):  # shift s: the input at position t - s, weighted by w[:, W - 1 - s]
        src = offs_t - s
        if HAS_RESET:
            if s > 0:
                q = offs_t - s + 1
                r = tl.load(reset_ptr + b * L + q, mask=mask_t & (q >= 0), other=0)
                blocked = blocked | (r != 0)
        m = mask_d[:, None] & mask_t[None, :] & (src >= 0)[None, :]
        v = tl.load(x_rows + src[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_STATE:
            ms = mask_d[:, None] & mask_t[None, :] & (src < 0)[None, :]
            v += tl.load(state_ptr + s_off + (W + src)[None, :], mask=ms, other=0.0).to(tl.float32)
        if HAS_RESET:
            v = tl.where(blocked[None, :], 0.0, v)
        wk = tl.load(w_ptr + offs_d * W + (W - 1 - s), mask=mask_d, other=0.0).to(tl.float32)
        acc += v * wk[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    out_rows = out_ptr + (b * dim + offs_d[:, None]) * L
    tl.store(out_rows + offs_t[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_t[None, :])

    if pid_t == 0:  # the window after the chunk: inputs at positions L - W + j, j = 0..W-1
        jj = tl.arange(0, WP)
        mask_j = jj < W
        pos = L - W + jj
        gone = tl.zeros((WP,), tl.int1)  # a reset lies in (pos, L - 1]
        if HAS_RESET:
            for s in range(1, W):
                q = L - s
                r = tl.load(reset_ptr + b * L + q, mask=q >= 0, other=0)
                gone = gone | ((r != 0) & (jj < W - s))
        m = mask_d[:, None] & (mask_j & (pos >= 0))[None, :]
        v = tl.load(x_rows + pos[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_STATE:
            ms = mask_d[:, None] & (mask_j & (pos < 0))[None, :]
            v += tl.load(state_ptr + s_off + (W + pos)[None, :], mask=ms, other=0.0).to(tl.float32)
        v = tl.where(gone[None, :], 0.0, v)
        ns_rows = new_state_ptr + (b * dim + offs_d[:, None]) * W
        tl.store(ns_rows + jj[None, :], v.to(new_state_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_j[None, :])
