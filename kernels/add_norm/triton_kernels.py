"""The Triton kernels behind :func:`mamba_state.kernels.add_rms_norm`: the forward (one program per row) and the
backward (a few rows per program, the weight's gradient as per-program partial sums: no atomics)."""

from __future__ import annotations

import triton
import triton.language as tl

from .._jit import optional_inputs


@optional_inputs(HAS_RES="r_ptr", STORE_RSTD="rstd_ptr")
@triton.jit
def add_rmsnorm_rows(h_ptr, r_ptr, w_ptr, out_ptr, rout_ptr, rstd_ptr, D, eps,
                     HAS_RES: tl.constexpr, STORE_RSTD: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``pid`` of contiguous [rows, D] tensors: r = h (+ res) in float32; rout = r (in rout's dtype);
    out = r * rsqrt(mean(r^2) + eps) * w (in out's dtype); rstd [rows] float32 when given (for the backward).
    BLOCK >= D, a power of two."""
    row = tl.program_id(0).to(tl.int64)  # rows * D can pass 2^31 at long prefills
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(h_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(r_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(rout_ptr + row * D + cols, x.to(rout_ptr.dtype.element_ty), mask=m)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    if STORE_RSTD:
        tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=m)


@optional_inputs(HAS_DR="dr_ptr", STORE_DRES="dres_ptr")
@triton.jit
def add_rmsnorm_bwd_rows(dout_ptr, dr_ptr, r_ptr, w_ptr, rstd_ptr, dh_ptr, dres_ptr, dw_part_ptr, rows, D,
                         rows_per_prog, HAS_DR: tl.constexpr, STORE_DRES: tl.constexpr, BLOCK: tl.constexpr):
    """Gradients of add_rmsnorm_rows for rows pid * rows_per_prog .. + rows_per_prog - 1 (contiguous [rows, D]).

    With xhat = r * rstd and g = dout * w: dr_total = rstd * (g - xhat * mean(g * xhat)) (+ dr, the gradient that
    reached the returned r) -> dh (hidden's dtype) and dres (the residual's dtype, when it had one); the weight's
    gradient sum(dout * xhat) over this program's rows -> dw_part [programs, D] float32."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, rows_per_prog):
        row = pid.to(tl.int64) * rows_per_prog + i
        mr = tl.where(row < rows, m, False)  # not `m & scalar`: triton 3.9's interpreter makes that an int mask
        off = row * D + cols
        r = tl.load(r_ptr + off, mask=mr, other=0.0).to(tl.float32)
        dy = tl.load(dout_ptr + off, mask=mr, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < rows, other=0.0)
        xhat = r * rstd
        g = dy * w
        c = tl.sum(g * xhat, axis=0) / D
        dx = (g - xhat * c) * rstd
        if HAS_DR:
            dx += tl.load(dr_ptr + off, mask=mr, other=0.0).to(tl.float32)
        tl.store(dh_ptr + off, dx.to(dh_ptr.dtype.element_ty), mask=mr)
        if STORE_DRES:
            tl.store(dres_ptr + off, dx.to(dres_ptr.dtype.element_ty), mask=mr)
        dw += dy * xhat
    tl.store(dw_part_ptr + pid * D + cols, dw, mask=m)
