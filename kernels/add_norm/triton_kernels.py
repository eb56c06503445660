"""The Triton kernel behind :func:`mamba_state.kernels.add_rms_norm` (one program per row)."""

from __future__ import annotations

import triton
import triton.language as tl

from .._jit import optional_inputs


@optional_inputs(HAS_RES="r_ptr")
@triton.jit
def add_rmsnorm_rows(h_ptr, r_ptr, w_ptr, out_ptr, rout_ptr, D, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``pid`` of contiguous [rows, D] tensors: r = h (+ res) in float32; rout = r (in rout's dtype);
    out = r * rsqrt(mean(r^2) + eps) * w (in out's dtype). BLOCK >= D, a power of two."""
    row = tl.program_id(0).to(tl.int64)  # rows * D can pass 2^31 at long prefills
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(h_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(r_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(rout_ptr + row * D + cols, x.to(rout_ptr.dtype.element_ty), mask=m)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=m)
