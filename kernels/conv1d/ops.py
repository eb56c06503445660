"""Launches of the conv's Triton kernels and its autograd Function.

* :func:`conv_forward` -> ``(out, new_conv_state)``; ``out`` takes x's memory order (``torch.empty_like``), so a
  channel-major x ([dim, batch * L] viewed as [batch, dim, L]) gives a channel-major out that the next projection
  reads as one GEMM.
* :func:`conv_backward` -> ``(dx, dweight [dim, W] float32, dbias [dim] float32 or None, dstate float32 or None)``
  from the gradients of ``out`` and of the new window.
* :class:`CausalConvFn`: both, for autograd. Backward keeps the inputs only (x, weight, bias, state, reset): the
  pre-activation is recomputed.

Each takes ``cu_seqlens`` (keyword, default None): packed sequences, batch 1, ``conv_state`` and the new windows
[num_seqs, dim, W], one launch whatever the number of sequences; the new windows' gradient then goes into dx and
the state's gradient inside the backward kernel (unpacked, it is added afterwards in PyTorch).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .._device import launch_device

__all__ = ["conv_forward", "conv_backward", "CausalConvFn"]

_BD, _BL = 16, 128  # a [channels, steps] tile per program: 128 steps keep loads of a row coalesced
# packed: the windows of 16 sequences per [channels, 16 * padded width] tile (the new windows, their gradients)
_BS = 16
# the aligned forward for widths <= 4: rows of 8-step groups, G groups (8 * G steps) per channel and program;
# MAMBA_STATE_CONV_FWD=generic takes the general kernel instead (for comparisons)
_G4 = 16


def _time_stride_one(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# the backward for widths <= 4 keeps 7 shifted input tiles and 4 pre-activations live: 8 channels a program, so
# that each thread holds 8 elements a tile
_BD_BWD4 = 8
# the aligned backward for widths <= 4 (the default unpacked; MAMBA_STATE_CONV_BWD=generic takes bwd4): rows of
# 8-step groups as the aligned forward, BD channels and G groups (8 * G steps) a program. 4 x 32 (256 steps) was
# the fastest tile of probe_conv_bwd.py at the 130m training shape on the H200 (0.083 ms; bwd4 0.164-0.19 ms,
# 2026-12-03); its tile for sweeps is MAMBA_STATE_CONV_BWD_ALIGNED_TILE="BD,G,warps"
# (MAMBA_STATE_CONV_BWD_TILE is the other kernels' "BD,BL,warps")
_BD_BWD4A, _G_BWD4A = 4, 32


def _grid(bsz: int, ch: int, L: int, bd: int = _BD) -> tuple[int, int, int]:
    return ((L + _BL - 1) // _BL, (ch + bd - 1) // bd, bsz)


def _packed(cu_seqlens: Optional[Tensor], device: torch.device) -> tuple[Optional[Tensor], int, int]:
    """(cu_seqlens as int32 on the device, num_seqs, binary-search halvings), or (None, 1, 0) unpacked."""
    if cu_seqlens is None:
        return None, 1, 0
    cu = cu_seqlens.to(device=device, dtype=torch.int32).contiguous()
    nseq = cu.numel() - 1
    return cu, nseq, max(1, (nseq - 1).bit_length())


def conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], conv_state: Optional[Tensor],
                 reset: Optional[Tensor], silu: bool, state_dtype: Optional[torch.dtype],
                 cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The forward launch. x [batch, dim, L] (time stride 1 or it is copied); weight [dim, W]; bias [dim] or None;
    conv_state [batch, dim, W] or None; reset bool [batch, L] or None. Returns ``(out like x, new window)`` in
    conv_state's dtype (else ``state_dtype``, else x's). With ``cu_seqlens`` (checked int [num_seqs + 1], batch 1)
    conv_state and the new windows are [num_seqs, dim, W]."""
    import triton

    from . import triton_kernels as K

    x = _time_stride_one(x)
    bsz, ch, L = x.shape
    W = weight.shape[1]
    out = torch.empty_like(x)
    state = conv_state.contiguous() if conv_state is not None else None
    new_dtype = state.dtype if state is not None else (state_dtype or x.dtype)
    cu, nseq, niter = _packed(cu_seqlens, x.device)
    new_state = torch.empty(bsz if cu is None else nseq, ch, W, device=x.device, dtype=new_dtype)
    rst = reset.contiguous().view(torch.uint8) if reset is not None else None
    if L == 0 and cu is None:  # no step, no program: the window is the incoming one
        if state is not None:
            new_state.copy_(state)
        else:
            new_state.zero_()
        return out, new_state
    if W <= 4 and cu is None and os.environ.get("MAMBA_STATE_CONV_FWD", "aligned") != "generic":
        # Mamba's widths: aligned loads, every shifted input from registers (_causal_conv_fwd4_kernel)
        with launch_device(x):
            K._causal_conv_fwd4_kernel[((L + 8 * _G4 - 1) // (8 * _G4), (ch + _BD - 1) // _BD, bsz)](
                x, weight.contiguous(), bias, state, rst, out, new_state,
                ch, L, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                W=W, WP=triton.next_power_of_2(W), SILU=silu, BD=_BD, G=_G4, num_warps=4,
            )
        return out, new_state
    grid = _grid(bsz, ch, L)
    if cu is not None:  # at least one time block: the new windows are written even when every sequence is empty
        grid = (max(1, grid[0]), grid[1], grid[2])
    with launch_device(x):
        K._causal_conv_kernel[grid](
            x, weight.contiguous(), bias, state, rst, out, new_state, cu,
            ch, L, x.stride(0), x.stride(1), out.stride(0), out.stride(1), nseq, niter,
            W=W, WP=triton.next_power_of_2(W), SILU=silu, BD=_BD, BL=_BL, BS=_BS, num_warps=4,
        )
    return out, new_state


def conv_backward(x: Tensor, weight: Tensor, bias: Optional[Tensor], conv_state: Optional[Tensor],
                  reset: Optional[Tensor], silu: bool, dout: Optional[Tensor], dnew: Optional[Tensor],
                  state_grad: bool, cu_seqlens: Optional[Tensor] = None, dx_out: Optional[Tensor] = None,
                  ) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of :func:`conv_forward` (same arguments) from ``dout`` (of out; None: zeros) and ``dnew`` (of the
    new window; None: zeros). ``dx`` takes x's memory order and dtype, or is written into ``dx_out`` (x's shape,
    any strides with time stride 1; a caller's slice of a larger gradient, which saves a copy); dweight, dbias and
    dstate are float32 (dstate only when ``state_grad``, dbias only with a bias). With ``cu_seqlens``, dnew and
    dstate are [num_seqs, dim, W]."""
    import triton

    from . import triton_kernels as K

    x = _time_stride_one(x)
    bsz, ch, L = x.shape
    W = weight.shape[1]
    dout = torch.zeros_like(x) if dout is None else _time_stride_one(dout)
    narrow = W <= 4  # Mamba's d_conv: every shifted load and pre-activation once (_causal_conv_bwd4_kernel)
    aligned = narrow and cu_seqlens is None and os.environ.get("MAMBA_STATE_CONV_BWD", "aligned") != "generic"
    bd, bl, warps, g4 = (_BD_BWD4 if narrow else _BD), _BL, 4, _G_BWD4A
    if aligned:  # bl: the steps of a program, 8 per group
        bd = _BD_BWD4A
        tile = os.environ.get("MAMBA_STATE_CONV_BWD_ALIGNED_TILE")  # "BD,G,warps", for sweeps
        if tile:
            bd, g4, warps = (int(v) for v in tile.split(","))
        bl = 8 * g4
    elif narrow:
        tile = os.environ.get("MAMBA_STATE_CONV_BWD_TILE")  # "BD,BL,warps", for sweeps
        if tile:
            bd, bl, warps = (int(v) for v in tile.split(","))
    if L == 0 and cu_seqlens is None:  # no step: the new window is the incoming one, its gradient passes through
        f32 = torch.float32
        dx = torch.empty_like(x) if dx_out is None else dx_out
        dw = torch.zeros(ch, W, device=x.device, dtype=f32)
        db = torch.zeros(ch, device=x.device, dtype=f32) if bias is not None else None
        dstate0 = None
        if state_grad:
            dstate0 = (dnew.float().clone() if dnew is not None
                       else torch.zeros(bsz, ch, W, device=x.device, dtype=f32))
        return dx, dw, db, dstate0
    cu, nseq, niter = _packed(cu_seqlens, x.device)
    grid = ((L + bl - 1) // bl, (ch + bd - 1) // bd, bsz)
    if cu is not None:  # at least one time block: it writes the windows' gradients
        grid = (max(1, grid[0]), grid[1], grid[2])
    f32 = torch.float32
    if dx_out is not None and (dx_out.shape != x.shape or dx_out.stride(-1) != 1):
        raise ValueError(f"dx_out: expected {list(x.shape)} with time stride 1, found {list(dx_out.shape)} "
                         f"strides {dx_out.stride()}")
    dx = torch.empty_like(x) if dx_out is None else dx_out
    dw_part = torch.empty(bsz * grid[0], ch, W, device=x.device, dtype=f32)
    db_part = torch.empty(bsz * grid[0], ch, device=x.device, dtype=f32) if bias is not None else None
    state = conv_state.contiguous() if conv_state is not None else None
    dstate = torch.empty(bsz if cu is None else nseq, ch, W, device=x.device, dtype=f32) if state_grad else None
    rst = reset.contiguous().view(torch.uint8) if reset is not None else None
    dnew_k = dnew.contiguous() if cu is not None and dnew is not None else None  # packed: added in the kernel
    with launch_device(x):
        if aligned:
            K._causal_conv_bwd4_aligned_kernel[grid](
                x, weight.contiguous(), bias, state, rst, dout, dx, dw_part, db_part, dstate,
                ch, L, x.stride(0), x.stride(1), dout.stride(0), dout.stride(1), dx.stride(0), dx.stride(1),
                W=W, WP=triton.next_power_of_2(W), SILU=silu, BD=bd, G=g4, num_warps=warps,
            )
        else:
            kernel = K._causal_conv_bwd4_kernel if narrow else K._causal_conv_bwd_kernel
            kernel[grid](
                x, weight.contiguous(), bias, state, rst, dout, dx, dw_part, db_part, dstate, cu, dnew_k,
                ch, L, x.stride(0), x.stride(1), dout.stride(0), dout.stride(1), dx.stride(0), dx.stride(1), nseq,
                niter, W=W, WP=triton.next_power_of_2(W), SILU=silu, BD=bd, BL=bl, BS=_BS, num_warps=warps,
            )
    dw, db = dw_part.sum(0), db_part.sum(0) if db_part is not None else None
    if dnew is not None and cu is None:
        _add_window_grad(dx, dstate, dnew, reset, L, W)
    return dx, dw, db, dstate


def _add_window_grad(dx: Tensor, dstate: Optional[Tensor], dnew: Tensor, reset: Optional[Tensor], L: int,
                     W: int) -> None:
    """Adds the new window's gradient: its column j is the input at L - W + j (0 when a reset lies in
    (L - W + j, L - 1]), from x or, for L - W + j < 0, from the state's column L + j."""
    for j in range(W):
        pos = L - W + j
        g = dnew[:, :, j].float()
        if reset is not None and pos + 1 <= L - 1:
            gone = reset[:, max(pos + 1, 0):L].any(dim=1)
            g = g * (~gone).to(g.dtype)[:, None]
        if pos >= 0:
            dx[:, :, pos] += g.to(dx.dtype)
        elif dstate is not None:
            dstate[:, :, L + j] += g


class CausalConvFn(torch.autograd.Function):
    """Differentiable Triton conv over (x, weight [dim, W], bias, conv_state); reset, silu, state_dtype and
    cu_seqlens are not differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv_state, reset, silu, state_dtype, cu_seqlens=None):
        out, new_state = conv_forward(x, weight, bias, conv_state, reset, silu, state_dtype, cu_seqlens=cu_seqlens)
        ctx.set_materialize_grads(False)  # an unused new window's gradient stays None (no zeros added in)
        ctx.save_for_backward(x, weight, bias, conv_state, reset, cu_seqlens)
        ctx.silu = silu
        return out, new_state

    @staticmethod
    def backward(ctx, dout, dnew):
        x, weight, bias, conv_state, reset, cu_seqlens = ctx.saved_tensors
        want_state = conv_state is not None and ctx.needs_input_grad[3]
        dx, dw, db, dstate = conv_backward(x, weight, bias, conv_state, reset, ctx.silu, dout, dnew, want_state,
                                           cu_seqlens=cu_seqlens)
        return (dx if ctx.needs_input_grad[0] else None,
                dw.to(weight.dtype) if ctx.needs_input_grad[1] else None,
                db.to(bias.dtype) if db is not None and ctx.needs_input_grad[2] else None,
                dstate.to(conv_state.dtype) if dstate is not None else None,
                None, None, None, None)
