"""The time-parallel gradient pass of the scan's backward (``MAMBA_STATE_SCAN_BWD=tp``): the third launch of the
chunk-parallel backward written the way upstream's CUDA backward works, time across the threads.

``_scan_bwd_kernel`` (MODE 1) walks a chunk step by step with the state tile [channels, dstate] in registers,
so every step reduces over dstate (across lanes) and over channels. Here a program owns ``BD`` channels and a
whole chunk of ``CHUNK`` steps as [BD, CHUNK] tiles, and loops over the ``dstate`` states one at a time; for
state n both recurrences are associative scans along time:

* forward: ``x_t = a_t x_{t-1} + b_t`` (``a_t = exp(dt_t A_n)``, 0 at a reset; ``b_t = dt_t u_t B_t[n]``) from the
  chunk's checkpoint: a scan of the pairs (a, b);
* adjoint: ``G_t = dL/dx_t = c_t + a_{t+1} G_{t+1}`` (``c_t = gy_t C_t[n]``) from the adjoint entering the chunk
  from the right (``hin``, from the local sweep and the carry pass): a reverse scan of segments (first decay,
  product of the others, partial sum), which needs no shifted copy of ``a``.

Then, with ``a_t x_{t-1} = x_t - b_t`` (upstream's identity: no shifted states either), the gradients of step t
are ``dB_t[n] += sum_d G dt u``, ``dC_t[n] += sum_d gy x``, ``du += dt G B_n``, ``ddt += G (x - b) A_n + u G B_n``,
``dA_n += sum_t G (x - b) dt``: the sums over dstate are accumulated across the loop in registers (no lane
reductions), the sums over channels are reductions of BD rows.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._jit import LOG2E, _sigmoid, _softplus, optional_inputs


@triton.jit
def _linear_combine(a1, b1, a2, b2):
    """(a1, b1) then (a2, b2) for x -> a x + b: the composition x -> a2 (a1 x + b1) + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _suffix_combine(rf, rq, rs, lf, lq, ls):
    """Joins a left segment [i..k] to the right segment [k+1..j] already scanned (a reverse scan passes the
    accumulated right part first). A segment is (its first decay a_i, the product a_{i+1}..a_k of the others,
    s = c_i + a_{i+1} c_{i+1} + ... + a_{i+1}..a_k c_k): then G_i = s + (product of the others) * G_{k+1}."""
    m = lq * rf
    return lf, m * rq, ls + m * rs


@optional_inputs(HAS_D="D_ptr", HAS_Z="z_ptr", HAS_BIAS="bias_ptr", HAS_RESET="reset_ptr", STORE_Y="yout_ptr")
@triton.jit
def _scan_bwd_tp_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, reset_ptr, ckpt_ptr, gout_ptr, hin_ptr,
    ypre_ptr, yout_ptr, du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr,
    dim, L, dstate, cpg, nchunks, nbatch, sxb, sxd, sBb, sBg, sBn, sCb, sCg, sCn, sdBb, sdBg, sdBn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESET: tl.constexpr,
    SOFTPLUS: tl.constexpr, STORE_Y: tl.constexpr, CHUNK: tl.constexpr, BD: tl.constexpr,
):
    """Grid [channel blocks, batch, chunks]: program (db, b, c) writes the gradients of chunk c for channels
    [db*BD, (db+1)*BD) of row b (layouts as ``_scan_bwd_kernel``'s). dA, dD and ddelta_bias as partial sums
    per program row ``part = c * nbatch + b`` ([nchunks * batch, dim, dstate] and [nchunks * batch, dim]); dB and
    dC by atomic adds of one [CHUNK] row per state. ckpt and hin: [batch, dim, nchunks, dstate] float32, the
    state entering chunk c and the adjoint reaching its last state from the right. BD must divide the channels
    of a group (cpg)."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2)
    part = c.to(tl.int64) * nbatch + pid_b
    offs_d = pid_d * BD + tl.arange(0, BD)
    mask_d = offs_d < dim
    grp = (pid_d * BD) // cpg
    offs_t = c * CHUNK + tl.arange(0, CHUNK)
    mt = offs_t < L
    m2 = mask_d[:, None] & mt[None, :]
    row = pid_b * sxb + offs_d[:, None].to(tl.int64) * sxd
    at = row + offs_t[None, :]

    u = tl.load(u_ptr + at, mask=m2, other=0.0).to(tl.float32)
    draw = tl.load(dt_ptr + at, mask=m2, other=0.0).to(tl.float32)
    pre = draw
    if HAS_BIAS:
        pre = pre + tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    dt = pre
    if SOFTPLUS:
        dt = _softplus(pre)
    dt = tl.where(m2, dt, 0.0)  # past L: no-op steps (a = 1, b = 0)
    if HAS_RESET:
        r = tl.load(reset_ptr + pid_b * L + offs_t, mask=mt, other=0)
        keep = tl.where(r != 0, 0.0, 1.0)[None, :]
    g = tl.load(gout_ptr + at, mask=m2, other=0.0).to(tl.float32)
    if HAS_Z:
        zt = tl.load(z_ptr + at, mask=m2, other=0.0).to(tl.float32)
        yp = tl.load(ypre_ptr + at, mask=m2, other=0.0).to(tl.float32)
        sz = _sigmoid(zt)
        tl.store(dz_ptr + at, (g * yp * sz * (1.0 + zt * (1.0 - sz))).to(dz_ptr.dtype.element_ty), mask=m2)
        if STORE_Y:
            tl.store(yout_ptr + at, (yp * zt * sz).to(yout_ptr.dtype.element_ty), mask=m2)
        gy = g * zt * sz
    else:
        gy = g
    dtu = dt * u
    hb = tl.zeros((BD, CHUNK), tl.float32)  # sum_n G B_n
    gst = tl.zeros((BD, CHUNK), tl.float32)  # sum_n G (x - b) A_n
    ones = tl.full((BD, CHUNK), 1.0, tl.float32)
    ck = ((pid_b * dim + offs_d) * nchunks + c) * dstate
    B_row = pid_b * sBb + grp * sBg
    C_row = pid_b * sCb + grp * sCg
    dB_row = pid_b * sdBb + grp * sdBg
    for n in range(0, dstate):
        An = tl.load(A_ptr + offs_d * dstate + n, mask=mask_d, other=0.0).to(tl.float32)
        Bn = tl.load(B_ptr + B_row + n * sBn + offs_t, mask=mt, other=0.0).to(tl.float32)[None, :]
        Cn = tl.load(C_ptr + C_row + n * sCn + offs_t, mask=mt, other=0.0).to(tl.float32)[None, :]
        a = tl.exp2(dt * (An * LOG2E)[:, None])
        if HAS_RESET:
            a = a * keep
        b = dtu * Bn
        pa, pb = tl.associative_scan((a, b), 1, _linear_combine)
        x0 = tl.load(ckpt_ptr + ck + n, mask=mask_d, other=0.0)
        x = pa * x0[:, None] + pb
        cc = gy * Cn
        _f, q, s = tl.associative_scan((a, ones, cc), 1, _suffix_combine, reverse=True)
        # past L: a = 1, b = B = c = dt = 0, so G carries hin there but adds nothing to a gradient
        G = s + q * tl.load(hin_ptr + ck + n, mask=mask_d, other=0.0)[:, None]
        hb += G * Bn
        hx = G * (x - b)  # G_t a_t x_{t-1}
        gst += hx * An[:, None]
        tl.store(dA_ptr + (part * dim + offs_d) * dstate + n, tl.sum(hx * dt, 1), mask=mask_d)
        tl.atomic_add(dB_ptr + dB_row + n * sdBn + offs_t, tl.sum(G * dtu, 0), mask=mt)
        tl.atomic_add(dC_ptr + dB_row + n * sdBn + offs_t, tl.sum(gy * x, 0), mask=mt)
    gu = dt * hb
    if HAS_D:
        gu += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None] * gy
        tl.store(dD_ptr + part * dim + offs_d, tl.sum(tl.where(m2, gy * u, 0.0), 1), mask=mask_d)
    gdt = gst + u * hb
    if SOFTPLUS:
        gdt = gdt * _sigmoid(pre)
    gdt = tl.where(m2, gdt, 0.0)
    if HAS_BIAS:
        tl.store(dbias_ptr + part * dim + offs_d, tl.sum(gdt, 1), mask=mask_d)
    tl.store(du_ptr + at, gu.to(du_ptr.dtype.element_ty), mask=m2)
    tl.store(ddt_ptr + at, gdt.to(ddt_ptr.dtype.element_ty), mask=m2)
