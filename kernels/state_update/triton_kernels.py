"""Triton kernel of one decoding step of the selective scan, state updated in place."""

from __future__ import annotations

import triton
import triton.language as tl

from .._jit import _channel_offsets, _sigmoid, _softplus, optional_inputs


@optional_inputs(HAS_D="D_ptr", HAS_Z="z_ptr", HAS_BIAS="bias_ptr", HAS_RESET="reset_ptr")
@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, reset_ptr, out_ptr,
    dim, dstate, cpg, sBb, sBg, sCb, sCg,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESET: tl.constexpr,
    SOFTPLUS: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
):
    """One decoding step in place: state [batch, dim, dstate]; x, dt, z, out [batch, dim]; B, C [batch, g, dstate].
    D, z, bias and reset are None when absent."""
    offs_d, offs_n, mask_d, mask_n, mask_dn, grp = _channel_offsets(dim, dstate, cpg, BD, BN)
    pid_b = tl.program_id(1).to(tl.int64)
    st_off = (pid_b * dim + offs_d[:, None]) * dstate + offs_n[None, :]
    s = tl.load(state_ptr + st_off, mask=mask_dn, other=0.0).to(tl.float32)
    if HAS_RESET:
        r = tl.load(reset_ptr + pid_b)
        s = s * tl.where(r != 0, 0.0, 1.0)
    x = tl.load(x_ptr + pid_b * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt = dt + tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + pid_b * sBb + grp * sBg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + pid_b * sCb + grp * sCg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    s = tl.exp(dt[:, None] * A) * s + (dt * x)[:, None] * Bv[None, :]
    tl.store(state_ptr + st_off, s.to(state_ptr.dtype.element_ty), mask=mask_dn)
    y = tl.sum(s * Cv[None, :], 1)
    if HAS_D:
        y = y + x * tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + pid_b * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        y = y * zv * _sigmoid(zv)
    tl.store(out_ptr + pid_b * dim + offs_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)
