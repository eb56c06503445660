"""Triton kernels: causal depthwise conv1d continuing a carried window, with per-step resets; forward and backward.

Semantics are those of :func:`mamba_state.reference.causal_conv1d_ref`: ``out[t] = act(pre[t])`` with ``pre[t] =
bias + sum_s w[W - 1 - s] * input[t - s]``, where inputs at negative positions come from ``conv_state`` (the last W
inputs before the chunk, oldest first), and an input is visible at step t only if no reset lies in (its position, t].

The backward recomputes the pre-activation where it needs it (W loads per value, all from cache) instead of keeping
it: ``dx[p] = sum_s w[W - 1 - s] * dpre[p + s]`` over the steps that see p, ``dw`` and ``dbias`` as per-program
partial sums (no atomics), and the gradient of the state's inputs the same way as ``dx`` at negative positions.

x, out, dout and dx are [batch, dim, L] with any batch and channel strides and time stride 1 (passed per tensor), so
channel-major slices of a projection ([dim, batch * L] viewed as [batch, dim, L]) run without copies.

Packed sequences (``VARLEN``, set by a ``cu_seqlens`` argument; batch 1, ``L`` the packed length): every position
finds its sequence by a binary search over ``cu_seqlens`` and its window then starts at the sequence's start
``st`` instead of 0: inputs before ``st`` come from that sequence's row of the state ([num_seqs, dim, W]), resets
before ``st`` do not count, and steps past the sequence's end ``en`` do not see it. The helpers take ``st`` and
``en`` as arguments: 0 and L without VARLEN, so the unpacked kernels compile to what they were. The new windows
(forward) and the gradients of the incoming windows (backward) are computed per sequence by a loop in which the
programs along the time axis share the sequences out in blocks of BS (program t takes blocks t, t + programs,
...), each block one [BD, BS * WP] tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._jit import _join8, _split4, _split8, optional_inputs


@triton.jit
def _seq_of(cu_ptr, q, nseq, NITER):
    """[P] int32: the packed sequence holding position ``q`` [P], the last i with cu[i] <= q (empty sequences
    share their start with the next one and are skipped). ``NITER`` >= log2(nseq) halvings; every load stays
    inside cu[0 : nseq] whatever q is, so masked positions are safe."""
    lo = tl.zeros(q.shape, tl.int32)
    hi = tl.zeros(q.shape, tl.int32) + (nseq - 1)
    for _ in range(NITER):
        mid = (lo + hi + 1) // 2
        ok = tl.load(cu_ptr + mid) <= q
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@triton.jit
def _inputs_at(x_rows, s_rows, state_ptr, pos, st, valid, mask_d, W: tl.constexpr, HAS_STATE: tl.constexpr):
    """The conv inputs at positions ``pos`` [P] as [BD, P] float32: x where pos >= st (the sequence's start), the
    state where st - W <= pos < st (zeros without one), 0 where not ``valid``. ``s_rows`` [BD, 1] (one state row
    per channel) or [BD, P] (packed: the row of each position's sequence)."""
    rel = pos - st
    m = mask_d[:, None] & (valid & (rel >= 0))[None, :]
    v = tl.load(x_rows + pos[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_STATE:
        ms = mask_d[:, None] & (valid & (rel < 0) & (rel >= -W))[None, :]
        v += tl.load(state_ptr + s_rows + (W + rel)[None, :], mask=ms, other=0.0).to(tl.float32)
    return v


@triton.jit
def _reset_at(reset_ptr, rst_row, pos, st, valid, en):
    """[P] int1: a reset at step ``pos`` (none outside the sequence [st, en))."""
    r = tl.load(reset_ptr + rst_row + pos, mask=valid & (pos >= st) & (pos < en), other=0)
    return r != 0


@triton.jit
def _preact(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, offs_d, mask_d, q, st, valid, en,
            BD: tl.constexpr, W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
            HAS_RESET: tl.constexpr):
    """The pre-activation at steps ``q`` [P] as [BD, P] float32 (garbage-free 0 inputs where not ``valid``)."""
    acc = tl.zeros((BD, q.shape[0]), tl.float32)
    blocked = tl.zeros(q.shape, tl.int1)  # a reset lies in (q - s, q]
    for s in range(W):  # shift s: the input at step q - s, weighted by w[:, W - 1 - s]
        if HAS_RESET:
            if s > 0:
                blocked = blocked | _reset_at(reset_ptr, rst_row, q - s + 1, st, valid, en)
        v = _inputs_at(x_rows, s_rows, state_ptr, q - s, st, valid, mask_d, W, HAS_STATE)
        if HAS_RESET:
            v = tl.where(blocked[None, :], 0.0, v)
        wk = tl.load(w_ptr + offs_d * W + (W - 1 - s), mask=mask_d, other=0.0).to(tl.float32)
        acc += v * wk[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def _dpreact(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, g_rows, offs_d, mask_d, q, st, en,
             BD: tl.constexpr, W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
             HAS_RESET: tl.constexpr, SILU: tl.constexpr):
    """d loss / d pre at steps ``q`` [P] as [BD, P] float32 (0 outside the sequence [st, en))."""
    valid = (q >= st) & (q < en)
    g = tl.load(g_rows + q[None, :], mask=mask_d[:, None] & valid[None, :], other=0.0).to(tl.float32)
    if SILU:
        pre = _preact(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, offs_d, mask_d, q, st, valid,
                      en, BD, W, HAS_BIAS, HAS_STATE, HAS_RESET)
        sig = 1.0 / (1.0 + tl.exp(-pre))
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return g


@triton.jit
def _dinputs(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, g_rows, offs_d, mask_d, p, st, en,
             BD: tl.constexpr, W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
             HAS_RESET: tl.constexpr, SILU: tl.constexpr):
    """d loss / d input at positions ``p`` [P] (before ``st``: the state's inputs) as [BD, P] float32: the sum over
    the steps p + s of the sequence [st, en) that see p (no reset in (p, p + s]) of w[W - 1 - s] * dpre[p + s]."""
    acc = tl.zeros((BD, p.shape[0]), tl.float32)
    blocked = tl.zeros(p.shape, tl.int1)  # a reset lies in (p, p + s]
    for s in range(W):
        if HAS_RESET:
            if s > 0:
                blocked = blocked | _reset_at(reset_ptr, rst_row, p + s, st, p == p, en)
        g = _dpreact(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, g_rows, offs_d, mask_d,
                     p + s, st, en, BD, W, HAS_BIAS, HAS_STATE, HAS_RESET, SILU)
        if HAS_RESET:
            g = tl.where(blocked[None, :], 0.0, g)
        wk = tl.load(w_ptr + offs_d * W + (W - 1 - s), mask=mask_d, other=0.0).to(tl.float32)
        acc += g * wk[:, None]
    return acc


@triton.jit
def _positions(cu_ptr, b, offs_d, offs_t, dim, L, nseq, NITER, W: tl.constexpr, VARLEN: tl.constexpr):
    """Per tile position: the start and end of its sequence and the state rows it reads before the start:
    (st, en, s_rows) = (0, L, [BD, 1] rows of batch row b) unpacked, ([P], [P], [BD, P]) packed."""
    if VARLEN:
        sq = _seq_of(cu_ptr, offs_t, nseq, NITER)
        st = tl.load(cu_ptr + sq)
        en = tl.load(cu_ptr + sq + 1)
        s_rows = (sq[None, :] * dim + offs_d[:, None]) * W
        return st, en, s_rows
    else:
        return 0, L, (b * dim + offs_d[:, None]) * W


@triton.jit
def _seq_block(cu_ptr, i0, dim, nseq, offs_d, W: tl.constexpr, WP: tl.constexpr, BS: tl.constexpr):
    """A block of BS sequences from i0, laid out as BS * WP columns (sequence i0 + k // WP, window column
    k % WP): (column jj, its mask, st, en, state rows [BD, BS * WP]). Masked columns get st = en = 0, an empty
    sequence, so everything they would read is masked too."""
    k = tl.arange(0, BS * WP)
    jj = k % WP
    i = i0 + k // WP
    mask_j = (jj < W) & (i < nseq)
    st = tl.load(cu_ptr + i, mask=i < nseq, other=0)
    en = tl.load(cu_ptr + i + 1, mask=i < nseq, other=0)
    return jj, mask_j, st, en, (i[None, :] * dim + offs_d[:, None]) * W


@triton.jit
def _final_window(x_rows, s_rows, state_ptr, reset_ptr, rst_row, new_state_ptr, offs_d, mask_d, jj, mask_j, st, en,
                  W: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr):
    """Writes the window after the sequence [st, en) at window columns ``jj`` (``st``, ``en`` scalars or one per
    column, ``s_rows`` the rows of the window in state and new_state, [., dim, W] contiguous): the inputs at
    en - W + jj (before st from the incoming window), zeroed where a reset of the sequence lies in
    (position, en - 1]."""
    pos = en - W + jj
    gone = jj != jj  # a reset lies in (pos, en - 1]
    if HAS_RESET:
        for s in range(1, W):
            q = en - s
            r = tl.load(reset_ptr + rst_row + q, mask=q >= st, other=0)  # masked columns: st = en = 0
            gone = gone | ((r != 0) & (jj < W - s))
    v = _inputs_at(x_rows, s_rows, state_ptr, pos, st, mask_j, mask_d, W, HAS_STATE)
    v = tl.where(gone[None, :], 0.0, v)
    tl.store(new_state_ptr + s_rows + jj[None, :], v.to(new_state_ptr.dtype.element_ty),
             mask=mask_d[:, None] & mask_j[None, :])


@optional_inputs(HAS_BIAS="bias_ptr", HAS_STATE="state_ptr", HAS_RESET="reset_ptr", VARLEN="cu_ptr")
@triton.jit
def _causal_conv_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, reset_ptr, out_ptr, new_state_ptr, cu_ptr,
    dim, L, sxb, sxd, sob, sod, nseq, NITER, W: tl.constexpr, WP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr, VARLEN: tl.constexpr,
    SILU: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr, BS: tl.constexpr,
):
    """Grid (time blocks, channel blocks, batch). x [batch, dim, L] with strides (sxb, sxd, 1), out with (sob, sod,
    1); state/new_state [batch, dim, W] contiguous float32 or x's dtype; reset uint8 [batch, L]. The programs of the
    first time block also write the new window. VARLEN (cu_ptr int32 [nseq + 1], batch 1): state/new_state
    [nseq, dim, W], one window per sequence, the new ones written by the time blocks in turn; ``NITER`` the
    binary search's halvings."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_t = pid_t * BL + tl.arange(0, BL)
    mask_d = offs_d < dim
    mask_t = offs_t < L
    x_rows = x_ptr + b * sxb + offs_d[:, None].to(tl.int64) * sxd
    # rows of the state (read only when HAS_STATE: state_ptr may be None)
    st, en, s_rows = _positions(cu_ptr, b, offs_d, offs_t, dim, L, nseq, NITER, W, VARLEN)
    rst_row = b * L
    acc = _preact(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, offs_d, mask_d, offs_t, st, mask_t,
                  en, BD, W, HAS_BIAS, HAS_STATE, HAS_RESET)
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    out_rows = out_ptr + b * sob + offs_d[:, None].to(tl.int64) * sod
    tl.store(out_rows + offs_t[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_t[None, :])

    if VARLEN:  # the window after each sequence, BS sequences at a time, the blocks shared out over the time blocks
        for i0 in range(pid_t * BS, nseq, tl.num_programs(0) * BS):
            jj, mask_j, st_i, en_i, rows_i = _seq_block(cu_ptr, i0, dim, nseq, offs_d, W, WP, BS)
            _final_window(x_rows, rows_i, state_ptr, reset_ptr, rst_row, new_state_ptr, offs_d, mask_d, jj, mask_j,
                          st_i, en_i, W, HAS_STATE, HAS_RESET)
    else:
        if pid_t == 0:  # the window after the chunk
            jj = tl.arange(0, WP)
            _final_window(x_rows, s_rows, state_ptr, reset_ptr, rst_row, new_state_ptr, offs_d, mask_d, jj, jj < W,
                          0, L, W, HAS_STATE, HAS_RESET)


@triton.jit
def _dnew_at(dnew_ptr, s_rows, reset_ptr, rst_row, offs_d, mask_d, p, st, en, mask_t, W: tl.constexpr,
             HAS_RESET: tl.constexpr):
    """Packed: the gradient reaching the inputs at positions ``p`` [P] through their sequence's new window, as
    [BD, P] float32: column p - en + W of the window when p >= en - W and no reset of the sequence lies in
    (p, en - 1]. ``s_rows`` [BD, P]: the sequence's rows (dnew is laid out as the state)."""
    j = p - en + W
    seen = mask_t & (j >= 0)
    if HAS_RESET:
        for s in range(1, W):
            seen = seen & ~_reset_at(reset_ptr, rst_row, p + s, st, mask_t, en)
    return tl.load(dnew_ptr + s_rows + j[None, :], mask=mask_d[:, None] & seen[None, :], other=0.0).to(tl.float32)


@triton.jit
def _dwindow(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, g_rows, dnew_ptr, dstate_ptr, offs_d,
             mask_d, jj, mask_j, st, en, BD: tl.constexpr, W: tl.constexpr, HAS_BIAS: tl.constexpr,
             HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr, SILU: tl.constexpr, HAS_DNEW: tl.constexpr):
    """Writes the gradient of the window entering the sequence [st, en) at window columns ``jj`` (as
    :func:`_final_window`; the window's inputs sit at positions st - W + jj) to dstate: through the outputs
    (column 0 is never read: 0) and, with HAS_DNEW (packed), through the new window, which keeps column jj at
    jj - (en - st) when the sequence is shorter than W and has no reset."""
    ds = _dinputs(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, g_rows, offs_d, mask_d,
                  st - W + jj, st, en, BD, W, HAS_BIAS, HAS_STATE, HAS_RESET, SILU)
    ds = tl.where((jj >= 1)[None, :], ds, 0.0)
    if HAS_DNEW:
        c = jj - (en - st)
        kept = mask_j & (c >= 0)
        if HAS_RESET:  # only a sequence shorter than W keeps any: its steps are among the first W - 1
            for k in range(W - 1):
                r = tl.load(reset_ptr + rst_row + st + k, mask=kept & (st + k < en), other=0)
                kept = kept & (r == 0)
        ds += tl.load(dnew_ptr + s_rows + c[None, :], mask=mask_d[:, None] & kept[None, :], other=0.0).to(tl.float32)
    tl.store(dstate_ptr + s_rows + jj[None, :], ds, mask=mask_d[:, None] & mask_j[None, :])


@triton.jit
def _state_grads(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, g_rows, dnew_ptr, dstate_ptr,
                 cu_ptr, pid_t, offs_d, mask_d, dim, L, nseq, BD: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr, SILU: tl.constexpr,
                 VARLEN: tl.constexpr, HAS_DNEW: tl.constexpr, BS: tl.constexpr):
    """The incoming windows' gradients: the batch row's by the first time block, or (VARLEN) every sequence's,
    BS sequences at a time, the blocks shared out over the time blocks."""
    if VARLEN:
        for i0 in range(pid_t * BS, nseq, tl.num_programs(0) * BS):
            jj, mask_j, st_i, en_i, rows_i = _seq_block(cu_ptr, i0, dim, nseq, offs_d, W, WP, BS)
            _dwindow(x_rows, rows_i, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, g_rows, dnew_ptr, dstate_ptr,
                     offs_d, mask_d, jj, mask_j, st_i, en_i, BD, W, HAS_BIAS, HAS_STATE, HAS_RESET, SILU, HAS_DNEW)
    else:
        if pid_t == 0:
            jj = tl.arange(0, WP)
            _dwindow(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, g_rows, dnew_ptr, dstate_ptr,
                     offs_d, mask_d, jj, jj < W, 0, L, BD, W, HAS_BIAS, HAS_STATE, HAS_RESET, SILU, False)


@optional_inputs(HAS_BIAS="bias_ptr", HAS_STATE="state_ptr", HAS_RESET="reset_ptr", STATE_GRAD="dstate_ptr",
                 VARLEN="cu_ptr", HAS_DNEW="dnew_ptr")
@triton.jit
def _causal_conv_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, reset_ptr, dout_ptr, dx_ptr, dw_part_ptr, dbias_part_ptr, dstate_ptr,
    cu_ptr, dnew_ptr, dim, L, sxb, sxd, sgb, sgd, sdb, sdd, nseq, NITER, W: tl.constexpr, WP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr, SILU: tl.constexpr,
    STATE_GRAD: tl.constexpr, VARLEN: tl.constexpr, HAS_DNEW: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr,
    BS: tl.constexpr,
):
    """Grid (time blocks, channel blocks, batch), as the forward. dout [batch, dim, L] strides (sgb, sgd, 1), dx
    (sdb, sdd, 1). Partial sums per program: dw_part [batch * time blocks, dim, W] and dbias_part [batch * time
    blocks, dim] float32. dstate [batch, dim, W] float32 (the gradient of the state's inputs through the outputs;
    its column 0 is never read by the conv: 0), written by the first time block when STATE_GRAD. VARLEN (as the
    forward): dstate [nseq, dim, W] written per sequence by the time blocks in turn, and dnew [nseq, dim, W] (the
    new windows' gradient, HAS_DNEW only with VARLEN) added inside the kernel, to dx and dstate."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_t = pid_t * BL + tl.arange(0, BL)
    mask_d = offs_d < dim
    mask_t = offs_t < L
    x_rows = x_ptr + b * sxb + offs_d[:, None].to(tl.int64) * sxd
    g_rows = dout_ptr + b * sgb + offs_d[:, None].to(tl.int64) * sgd
    st, en, s_rows = _positions(cu_ptr, b, offs_d, offs_t, dim, L, nseq, NITER, W, VARLEN)
    rst_row = b * L
    dx = _dinputs(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, g_rows, offs_d, mask_d, offs_t,
                  st, en, BD, W, HAS_BIAS, HAS_STATE, HAS_RESET, SILU)
    if HAS_DNEW:
        dx += _dnew_at(dnew_ptr, s_rows, reset_ptr, rst_row, offs_d, mask_d, offs_t, st, en, mask_t, W, HAS_RESET)
    dx_rows = dx_ptr + b * sdb + offs_d[:, None].to(tl.int64) * sdd
    tl.store(dx_rows + offs_t[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_t[None, :])

    # dw[W - 1 - s] = sum over this tile's steps q of dpre[q] * input[q - s] (visible); dbias = sum of dpre
    g = _dpreact(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, g_rows, offs_d, mask_d, offs_t,
                 st, en, BD, W, HAS_BIAS, HAS_STATE, HAS_RESET, SILU)
    part = b * tl.num_programs(0) + pid_t
    blocked = tl.zeros((BL,), tl.int1)
    for s in range(W):
        if HAS_RESET:
            if s > 0:
                blocked = blocked | _reset_at(reset_ptr, rst_row, offs_t - s + 1, st, mask_t, en)
        v = _inputs_at(x_rows, s_rows, state_ptr, offs_t - s, st, mask_t, mask_d, W, HAS_STATE)
        if HAS_RESET:
            v = tl.where(blocked[None, :], 0.0, v)
        tl.store(dw_part_ptr + (part * dim + offs_d) * W + (W - 1 - s), tl.sum(g * v, 1), mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + part * dim + offs_d, tl.sum(g, 1), mask=mask_d)

    if STATE_GRAD:
        _state_grads(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, g_rows, dnew_ptr, dstate_ptr,
                     cu_ptr, pid_t, offs_d, mask_d, dim, L, nseq, BD, W, WP, HAS_BIAS, HAS_STATE, HAS_RESET, SILU,
                     VARLEN, HAS_DNEW, BS)


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
def _input4(x_rows, s_rows, state_ptr, p, k: tl.constexpr, st, en, mask_d, W: tl.constexpr,
            HAS_STATE: tl.constexpr):
    """The conv input at positions p + k as [BD, BL] float32 (0 at or past the sequence's end en, and before the
    state's W columns)."""
    return _inputs_at(x_rows, s_rows, state_ptr, p + k, st, p + k < en, mask_d, W, HAS_STATE)


@triton.jit
def _rst4(reset_ptr, rst_row, p, k: tl.constexpr, st, en, HAS_RESET: tl.constexpr):
    """[BL] int1: a reset at step p + k (False without resets or outside the sequence [st, en))."""
    if HAS_RESET:
        return _reset_at(reset_ptr, rst_row, p + k, st, p == p, en)
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


@optional_inputs(HAS_BIAS="bias_ptr", HAS_STATE="state_ptr", HAS_RESET="reset_ptr", STATE_GRAD="dstate_ptr",
                 VARLEN="cu_ptr", HAS_DNEW="dnew_ptr")
@triton.jit
def _causal_conv_bwd4_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, reset_ptr, dout_ptr, dx_ptr, dw_part_ptr, dbias_part_ptr, dstate_ptr,
    cu_ptr, dnew_ptr, dim, L, sxb, sxd, sgb, sgd, sdb, sdd, nseq, NITER, W: tl.constexpr, WP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr, SILU: tl.constexpr,
    STATE_GRAD: tl.constexpr, VARLEN: tl.constexpr, HAS_DNEW: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr,
    BS: tl.constexpr,
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
    st, en, s_rows = _positions(cu_ptr, b, offs_d, p, dim, L, nseq, NITER, W, VARLEN)
    rst_row = b * L
    w0 = _tap(w_ptr, offs_d, mask_d, 0, W)
    w1 = _tap(w_ptr, offs_d, mask_d, 1, W)
    w2 = _tap(w_ptr, offs_d, mask_d, 2, W)
    w3 = _tap(w_ptr, offs_d, mask_d, 3, W)
    bias = tl.zeros((BD,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    xm3 = _input4(x_rows, s_rows, state_ptr, p, -3, st, en, mask_d, W, HAS_STATE)
    xm2 = _input4(x_rows, s_rows, state_ptr, p, -2, st, en, mask_d, W, HAS_STATE)
    xm1 = _input4(x_rows, s_rows, state_ptr, p, -1, st, en, mask_d, W, HAS_STATE)
    x0 = _input4(x_rows, s_rows, state_ptr, p, 0, st, en, mask_d, W, HAS_STATE)
    r0 = _rst4(reset_ptr, rst_row, p, 0, st, en, HAS_RESET)
    rm1 = _rst4(reset_ptr, rst_row, p, -1, st, en, HAS_RESET)
    rm2 = _rst4(reset_ptr, rst_row, p, -2, st, en, HAS_RESET)
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
    x1 = _input4(x_rows, s_rows, state_ptr, p, 1, st, en, mask_d, W, HAS_STATE)
    r1 = _rst4(reset_ptr, rst_row, p, 1, st, en, HAS_RESET)
    m1 = mask_d[:, None] & (p + 1 < en)[None, :]
    g1 = tl.load(g_rows + (p + 1)[None, :], mask=m1, other=0.0).to(tl.float32)
    d1 = _dpre4(g1, x1, x0, xm1, xm2, r1, r0, rm1, w0, w1, w2, w3, bias, HAS_BIAS, HAS_RESET, SILU)
    dx += _vis(d1, r1, HAS_RESET) * w2[:, None]
    x2 = _input4(x_rows, s_rows, state_ptr, p, 2, st, en, mask_d, W, HAS_STATE)
    r2 = _rst4(reset_ptr, rst_row, p, 2, st, en, HAS_RESET)
    m2b = mask_d[:, None] & (p + 2 < en)[None, :]
    g2 = tl.load(g_rows + (p + 2)[None, :], mask=m2b, other=0.0).to(tl.float32)
    d2 = _dpre4(g2, x2, x1, x0, xm1, r2, r1, r0, w0, w1, w2, w3, bias, HAS_BIAS, HAS_RESET, SILU)
    dx += _vis(d2, r1 | r2, HAS_RESET) * w1[:, None]
    x3 = _input4(x_rows, s_rows, state_ptr, p, 3, st, en, mask_d, W, HAS_STATE)
    r3 = _rst4(reset_ptr, rst_row, p, 3, st, en, HAS_RESET)
    m3 = mask_d[:, None] & (p + 3 < en)[None, :]
    g3 = tl.load(g_rows + (p + 3)[None, :], mask=m3, other=0.0).to(tl.float32)
    d3 = _dpre4(g3, x3, x2, x1, x0, r3, r2, r1, w0, w1, w2, w3, bias, HAS_BIAS, HAS_RESET, SILU)
    dx += _vis(d3, r1 | r2 | r3, HAS_RESET) * w0[:, None]
    if HAS_DNEW:
        dx += _dnew_at(dnew_ptr, s_rows, reset_ptr, rst_row, offs_d, mask_d, p, st, en, mask_t, W, HAS_RESET)
    dx_rows = dx_ptr + b * sdb + offs_d[:, None].to(tl.int64) * sdd
    tl.store(dx_rows + p[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m2)

    if STATE_GRAD:  # the state's inputs are few: the general helper
        _state_grads(x_rows, s_rows, state_ptr, reset_ptr, rst_row, w_ptr, bias_ptr, g_rows, dnew_ptr, dstate_ptr,
                     cu_ptr, pid_t, offs_d, mask_d, dim, L, nseq, BD, W, WP, HAS_BIAS, HAS_STATE, HAS_RESET, SILU,
                     VARLEN, HAS_DNEW, BS)


# ------------------------------------------------------------------------------------- aligned forward, W <= 4
@triton.jit
def _masked_taps(base, a, b, c, d, r1, r2, r3, w0, w1, w2, w3, HAS_RESET: tl.constexpr):
    """base + w3 a + w2 b + w1 c + w0 d ([R] float32), each term after the first dropped once a reset flag of
    r1, r2, r3 (cumulatively: r1 hides b, c and d; r2 hides c and d; r3 hides d) is set. The forward's output
    column and the backward's dx column are this sum over different columns."""
    acc = base + w3 * a
    if HAS_RESET:
        hidden = r1 != 0
        acc += tl.where(hidden, 0.0, w2 * b)
        hidden = hidden | (r2 != 0)
        acc += tl.where(hidden, 0.0, w1 * c)
        hidden = hidden | (r3 != 0)
        acc += tl.where(hidden, 0.0, w0 * d)
    else:
        acc += w2 * b + w1 * c + w0 * d
    return acc


@triton.jit
def _out_col(xs, rs, w0, w1, w2, w3, bias, I: tl.constexpr, HAS_RESET: tl.constexpr):
    """Output column I of an 8-step group as [R] float32 (before the activation): xs and rs are the inputs and
    reset flags at the group's steps t0 - 3 .. t0 + 7 (11 columns each), taps w3..w0 weigh the inputs at
    t, t - 1, t - 2, t - 3 (t = t0 + I); an input is hidden when a reset lies in (its step, t]."""
    return _masked_taps(bias, xs[I + 3], xs[I + 2], xs[I + 1], xs[I], rs[I + 3], rs[I + 2], rs[I + 1],
                        w0, w1, w2, w3, HAS_RESET)


@triton.jit
def _group_rows(x_ptr, b, pid_t, pid_d, dim, sxb, sxd, W: tl.constexpr, BD: tl.constexpr, G: tl.constexpr):
    """The rows of an aligned program (one per channel and 8-step group): ``(d, t0, mask_d, x_row, s_row, pos,
    pre)``, each row's channel, first step, channel mask, row of x, row of the [batch, dim, W] window, and the
    [R, 8] group steps and [R, 4] steps before it (R = BD * G)."""
    rows = tl.arange(0, BD * G)
    d = pid_d * BD + rows // G
    t0 = pid_t * (8 * G) + (rows % G) * 8
    x_row = x_ptr + b * sxb + d.to(tl.int64) * sxd
    pos = t0[:, None] + tl.arange(0, 8)[None, :]
    pre = t0[:, None] - 4 + tl.arange(0, 4)[None, :]
    return d, t0, d < dim, x_row, (b * dim + d) * W, pos, pre


@triton.jit
def _row_taps(w_ptr, bias_ptr, d, mask_d, W: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Each row's channel's 4 padded taps (_tap) and bias as [R] float32 (cached loads; bias 0 without one)."""
    bias = tl.zeros(d.shape, tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    return (_tap(w_ptr, d, mask_d, 0, W), _tap(w_ptr, d, mask_d, 1, W), _tap(w_ptr, d, mask_d, 2, W),
            _tap(w_ptr, d, mask_d, 3, W), bias)


@optional_inputs(HAS_BIAS="bias_ptr", HAS_STATE="state_ptr", HAS_RESET="reset_ptr")
@triton.jit
def _causal_conv_fwd4_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, reset_ptr, out_ptr, new_state_ptr,
    dim, L, sxb, sxd, sob, sod, W: tl.constexpr, WP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr, SILU: tl.constexpr,
    BD: tl.constexpr, G: tl.constexpr,
):
    """_causal_conv_kernel (unpacked; same arguments but the packed ones, same outputs) for W <= 4, with aligned
    loads. Grid (time blocks of 8 * G steps, channel blocks of BD, batch).

    The general kernel loads the input at W shifts (t, t - 1, ...): a shifted address is not aligned, so those
    loads cannot be vectorised. Here each program row is one (channel, 8-step group) pair: the group's 8 inputs
    are one aligned load [BD * G, 8] and the 4 steps before it one aligned load [BD * G, 4] (from the carried
    window before step 0); both are split into their columns in registers, and every shifted input is one of
    those 12 columns. The reset flags are read the same way. The weight is padded in front to 4 taps (_tap)."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    R: tl.constexpr = BD * G
    d, t0, mask_d, x_row, s_row, pos, pre = _group_rows(x_ptr, b, pid_t, pid_d, dim, sxb, sxd, W, BD, G)
    m8 = mask_d[:, None] & (pos < L)
    cur = tl.load(x_row[:, None] + pos, mask=m8, other=0.0).to(tl.float32)
    inside = (pre >= 0) & (pre < L)  # past L only in groups past L, but those must not read past the tensor
    mp = mask_d[:, None] & inside
    prev = tl.load(x_row[:, None] + pre, mask=mp, other=0.0).to(tl.float32)
    if HAS_STATE:  # steps before 0 come from the carried window (its columns are steps -W .. -1)
        ms = mask_d[:, None] & (pre < 0) & (pre >= -W)
        prev += tl.load(state_ptr + s_row[:, None] + (W + pre), mask=ms, other=0.0).to(tl.float32)
    c0, c1, c2, c3, c4, c5, c6, c7 = _split8(cur, R)
    _p0, p1, p2, p3 = _split4(prev, R)
    xs = (p1, p2, p3, c0, c1, c2, c3, c4, c5, c6, c7)
    if HAS_RESET:
        rc = tl.load(reset_ptr + b * L + pos, mask=pos < L, other=0).to(tl.int32)
        rp = tl.load(reset_ptr + b * L + pre, mask=inside, other=0).to(tl.int32)
        r0, r1, r2, r3, r4, r5, r6, r7 = _split8(rc, R)
        _q0, q1, q2, q3 = _split4(rp, R)
        rs = (q1, q2, q3, r0, r1, r2, r3, r4, r5, r6, r7)
    else:
        rs = xs  # not read
    w0, w1, w2, w3, bias = _row_taps(w_ptr, bias_ptr, d, mask_d, W, HAS_BIAS)
    y = _join8(_out_col(xs, rs, w0, w1, w2, w3, bias, 0, HAS_RESET),
               _out_col(xs, rs, w0, w1, w2, w3, bias, 1, HAS_RESET),
               _out_col(xs, rs, w0, w1, w2, w3, bias, 2, HAS_RESET),
               _out_col(xs, rs, w0, w1, w2, w3, bias, 3, HAS_RESET),
               _out_col(xs, rs, w0, w1, w2, w3, bias, 4, HAS_RESET),
               _out_col(xs, rs, w0, w1, w2, w3, bias, 5, HAS_RESET),
               _out_col(xs, rs, w0, w1, w2, w3, bias, 6, HAS_RESET),
               _out_col(xs, rs, w0, w1, w2, w3, bias, 7, HAS_RESET), R)
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    out_row = out_ptr + b * sob + d.to(tl.int64) * sod
    tl.store(out_row[:, None] + pos, y.to(out_ptr.dtype.element_ty), mask=m8)
    if pid_t == 0:  # the window after the chunk, as the general kernel writes it
        offs = pid_d * BD + tl.arange(0, BD)
        mask_o = offs < dim
        x_rows = x_ptr + b * sxb + offs[:, None].to(tl.int64) * sxd
        s_rows = (b * dim + offs[:, None]) * W
        jj = tl.arange(0, WP)
        _final_window(x_rows, s_rows, state_ptr, reset_ptr, b * L, new_state_ptr, offs, mask_o, jj, jj < W,
                      0, L, W, HAS_STATE, HAS_RESET)


# ------------------------------------------------------------------------------------ aligned backward, W <= 4
@triton.jit
def _dpre_col(xs, rs, gs, w0, w1, w2, w3, bias, I: tl.constexpr, HAS_RESET: tl.constexpr, SILU: tl.constexpr):
    """d loss / d pre at step t0 + I as [R] float32: xs and rs the inputs and reset flags at t0 - 3 .. t0 + 11
    (15 columns, step t0 + I at column I + 3), gs the output gradients at t0 .. t0 + 11 (0 at or past L)."""
    g = gs[I]
    if SILU:
        pre = _out_col(xs, rs, w0, w1, w2, w3, bias, I, HAS_RESET)
        sig = 1.0 / (1.0 + tl.exp(-pre))
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return g


@triton.jit
def _dx_col(ds, rs, w0, w1, w2, w3, I: tl.constexpr, HAS_RESET: tl.constexpr):
    """dx at position t0 + I as [R] float32: ds the dpre at t0 .. t0 + 10 (11 columns), rs as in _dpre_col. Step
    t0 + I + j weighs the input at t0 + I by tap 3 - j and sees it unless a reset lies in (t0 + I, t0 + I + j]."""
    return _masked_taps(0.0, ds[I], ds[I + 1], ds[I + 2], ds[I + 3], rs[I + 4], rs[I + 5], rs[I + 6],
                        w0, w1, w2, w3, HAS_RESET)


@triton.jit
def _seen(xs, rs, I: tl.constexpr, S: tl.constexpr, HAS_RESET: tl.constexpr):
    """The input at step t0 + I - S as step t0 + I sees it, [R]: 0 when a reset lies in (t0 + I - S, t0 + I]."""
    v = xs[I + 3 - S]
    if HAS_RESET:
        if S >= 1:
            v = tl.where(rs[I + 3] != 0, 0.0, v)
        if S >= 2:
            v = tl.where(rs[I + 2] != 0, 0.0, v)
        if S >= 3:
            v = tl.where(rs[I + 1] != 0, 0.0, v)
    return v


@triton.jit
def _dw_rows(ds, xs, rs, S: tl.constexpr, HAS_RESET: tl.constexpr):
    """Each row's part of the gradient of tap 3 - S, [R]: the sum over its group's 8 steps q of dpre[q] times the
    input at q - S as q sees it."""
    acc = ds[0] * _seen(xs, rs, 0, S, HAS_RESET) + ds[1] * _seen(xs, rs, 1, S, HAS_RESET)
    acc += ds[2] * _seen(xs, rs, 2, S, HAS_RESET) + ds[3] * _seen(xs, rs, 3, S, HAS_RESET)
    acc += ds[4] * _seen(xs, rs, 4, S, HAS_RESET) + ds[5] * _seen(xs, rs, 5, S, HAS_RESET)
    acc += ds[6] * _seen(xs, rs, 6, S, HAS_RESET) + ds[7] * _seen(xs, rs, 7, S, HAS_RESET)
    return acc


@triton.jit
def _per_channel(v, BD: tl.constexpr, G: tl.constexpr):
    """[BD * G] row values -> [BD], the sum over each channel's G rows (rows are channel-major: row = c * G + g)."""
    return tl.sum(tl.reshape(v, (BD, G)), 1)


@optional_inputs(HAS_BIAS="bias_ptr", HAS_STATE="state_ptr", HAS_RESET="reset_ptr", STATE_GRAD="dstate_ptr")
@triton.jit
def _causal_conv_bwd4_aligned_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, reset_ptr, dout_ptr, dx_ptr, dw_part_ptr, dbias_part_ptr, dstate_ptr,
    dim, L, sxb, sxd, sgb, sgd, sdb, sdd, W: tl.constexpr, WP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr, SILU: tl.constexpr,
    STATE_GRAD: tl.constexpr, BD: tl.constexpr, G: tl.constexpr,
):
    """_causal_conv_bwd4_kernel (unpacked; same arguments but the packed ones, same outputs) with aligned loads, as
    _causal_conv_fwd4_kernel. Grid (time blocks of 8 * G steps, channel blocks of BD, batch); dw_part [batch * time
    blocks, dim, W] and dbias_part [batch * time blocks, dim] float32, one partial sum per program and channel;
    dstate [batch, dim, W] float32 written by the first time block when STATE_GRAD. The new window's gradient is
    added afterwards in PyTorch (ops._add_window_grad), as for the unpacked bwd4 kernel.

    Each program row is one (channel, 8-step group at t0) pair. The gradient at the group's positions needs dpre at
    t0 .. t0 + 10 and so the inputs at t0 - 3 .. t0 + 10 and the output gradients at t0 .. t0 + 10: the inputs are
    three aligned loads (the 4 steps before the group, from the carried window before step 0; its 8; the 4 after),
    the output gradients and reset flags the same way, all split into columns in registers, and every shifted value
    is one of those columns. Each dpre is computed once (silu recomputed from the pre-activation); dw and dbias are
    summed over a row's 8 steps in registers and then over the G rows of each channel."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    R: tl.constexpr = BD * G
    d, t0, mask_d, x_row, s_row, pos, pre = _group_rows(x_ptr, b, pid_t, pid_d, dim, sxb, sxd, W, BD, G)
    g_row = dout_ptr + b * sgb + d.to(tl.int64) * sgd
    j4 = tl.arange(0, 4)
    nxt = t0[:, None] + 8 + j4[None, :]  # [R, 4] the 4 after it
    m8 = mask_d[:, None] & (pos < L)
    mn = mask_d[:, None] & (nxt < L)
    cur = tl.load(x_row[:, None] + pos, mask=m8, other=0.0).to(tl.float32)
    aft = tl.load(x_row[:, None] + nxt, mask=mn, other=0.0).to(tl.float32)
    inside = (pre >= 0) & (pre < L)  # past L only in groups past L, but those must not read past the tensor
    prev = tl.load(x_row[:, None] + pre, mask=mask_d[:, None] & inside, other=0.0).to(tl.float32)
    if HAS_STATE:  # steps before 0 come from the carried window (its columns are steps -W .. -1)
        ms = mask_d[:, None] & (pre < 0) & (pre >= -W)
        prev += tl.load(state_ptr + s_row[:, None] + (W + pre), mask=ms, other=0.0).to(tl.float32)
    c0, c1, c2, c3, c4, c5, c6, c7 = _split8(cur, R)
    _p0, p1, p2, p3 = _split4(prev, R)
    a0, a1, a2, a3 = _split4(aft, R)
    xs = (p1, p2, p3, c0, c1, c2, c3, c4, c5, c6, c7, a0, a1, a2, a3)  # steps t0 - 3 .. t0 + 11
    gc = tl.load(g_row[:, None] + pos, mask=m8, other=0.0).to(tl.float32)
    ga = tl.load(g_row[:, None] + nxt, mask=mn, other=0.0).to(tl.float32)  # 0 past L: those steps do not exist
    h0, h1, h2, h3, h4, h5, h6, h7 = _split8(gc, R)
    e0, e1, e2, e3 = _split4(ga, R)
    gs = (h0, h1, h2, h3, h4, h5, h6, h7, e0, e1, e2, e3)  # steps t0 .. t0 + 11
    if HAS_RESET:
        rrow = reset_ptr + b * L
        rc = tl.load(rrow + pos, mask=pos < L, other=0).to(tl.int32)
        rp = tl.load(rrow + pre, mask=inside, other=0).to(tl.int32)
        ra = tl.load(rrow + nxt, mask=nxt < L, other=0).to(tl.int32)
        r0, r1, r2, r3, r4, r5, r6, r7 = _split8(rc, R)
        _q0, q1, q2, q3 = _split4(rp, R)
        n0, n1, n2, n3 = _split4(ra, R)
        rs = (q1, q2, q3, r0, r1, r2, r3, r4, r5, r6, r7, n0, n1, n2, n3)
    else:
        rs = xs  # not read
    w0, w1, w2, w3, bias = _row_taps(w_ptr, bias_ptr, d, mask_d, W, HAS_BIAS)
    ds = (_dpre_col(xs, rs, gs, w0, w1, w2, w3, bias, 0, HAS_RESET, SILU),
          _dpre_col(xs, rs, gs, w0, w1, w2, w3, bias, 1, HAS_RESET, SILU),
          _dpre_col(xs, rs, gs, w0, w1, w2, w3, bias, 2, HAS_RESET, SILU),
          _dpre_col(xs, rs, gs, w0, w1, w2, w3, bias, 3, HAS_RESET, SILU),
          _dpre_col(xs, rs, gs, w0, w1, w2, w3, bias, 4, HAS_RESET, SILU),
          _dpre_col(xs, rs, gs, w0, w1, w2, w3, bias, 5, HAS_RESET, SILU),
          _dpre_col(xs, rs, gs, w0, w1, w2, w3, bias, 6, HAS_RESET, SILU),
          _dpre_col(xs, rs, gs, w0, w1, w2, w3, bias, 7, HAS_RESET, SILU),
          _dpre_col(xs, rs, gs, w0, w1, w2, w3, bias, 8, HAS_RESET, SILU),
          _dpre_col(xs, rs, gs, w0, w1, w2, w3, bias, 9, HAS_RESET, SILU),
          _dpre_col(xs, rs, gs, w0, w1, w2, w3, bias, 10, HAS_RESET, SILU))  # steps t0 .. t0 + 10
    dx = _join8(_dx_col(ds, rs, w0, w1, w2, w3, 0, HAS_RESET), _dx_col(ds, rs, w0, w1, w2, w3, 1, HAS_RESET),
                _dx_col(ds, rs, w0, w1, w2, w3, 2, HAS_RESET), _dx_col(ds, rs, w0, w1, w2, w3, 3, HAS_RESET),
                _dx_col(ds, rs, w0, w1, w2, w3, 4, HAS_RESET), _dx_col(ds, rs, w0, w1, w2, w3, 5, HAS_RESET),
                _dx_col(ds, rs, w0, w1, w2, w3, 6, HAS_RESET), _dx_col(ds, rs, w0, w1, w2, w3, 7, HAS_RESET), R)
    dx_row = dx_ptr + b * sdb + d.to(tl.int64) * sdd
    tl.store(dx_row[:, None] + pos, dx.to(dx_ptr.dtype.element_ty), mask=m8)

    # dw[tap 3 - s] and dbias: per row over its 8 steps (0 past L: dpre is), then over each channel's G rows
    offs = pid_d * BD + tl.arange(0, BD)
    mask_o = offs < dim
    part = b * tl.num_programs(0) + pid_t
    dw_rows = dw_part_ptr + (part * dim + offs) * W
    tl.store(dw_rows + (W - 1), _per_channel(_dw_rows(ds, xs, rs, 0, HAS_RESET), BD, G), mask=mask_o)
    if W >= 2:
        tl.store(dw_rows + (W - 2), _per_channel(_dw_rows(ds, xs, rs, 1, HAS_RESET), BD, G), mask=mask_o)
    if W >= 3:
        tl.store(dw_rows + (W - 3), _per_channel(_dw_rows(ds, xs, rs, 2, HAS_RESET), BD, G), mask=mask_o)
    if W >= 4:
        tl.store(dw_rows + (W - 4), _per_channel(_dw_rows(ds, xs, rs, 3, HAS_RESET), BD, G), mask=mask_o)
    if HAS_BIAS:
        db = ds[0] + ds[1] + ds[2] + ds[3] + ds[4] + ds[5] + ds[6] + ds[7]
        tl.store(dbias_part_ptr + part * dim + offs, _per_channel(db, BD, G), mask=mask_o)

    if STATE_GRAD:  # the window's W inputs: the general helper on a [BD, WP] tile, as the bwd4 kernel
        x_rows = x_ptr + b * sxb + offs[:, None].to(tl.int64) * sxd
        g_rows = dout_ptr + b * sgb + offs[:, None].to(tl.int64) * sgd
        s_rows = (b * dim + offs[:, None]) * W
        # cu_ptr and dnew_ptr are read only when VARLEN / HAS_DNEW (both False here): dstate_ptr stands in
        _state_grads(x_rows, s_rows, state_ptr, reset_ptr, b * L, w_ptr, bias_ptr, g_rows, dstate_ptr, dstate_ptr,
                     dstate_ptr, pid_t, offs, mask_o, dim, L, 1, BD, W, WP, HAS_BIAS, HAS_STATE, HAS_RESET, SILU,
                     False, False, 1)
