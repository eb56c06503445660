"""The inside of a Mamba-1 layer for training, between ``in_proj`` and the layer's output, as one autograd Function
that keeps what upstream's ``mamba_inner_fn`` keeps and recomputes the rest.

Forward (activations channel-major, ``[channels, batch * L]`` in memory, as the projections' GEMMs write them)::

    xs, z  = xz[:d_inner], xz[d_inner:]                 (views)
    xc     = silu(conv(xs, conv_state, reset))          Triton conv, window carried
    x_dbl  = x_proj_w @ xc                              [dt_rank + 2 d_state, batch * L]
    dt     = dt_proj_w @ x_dbl[:dt_rank]
    y      = scan(xc, dt, A, B, C, D, z, dt_bias, h0, reset)      Triton scan; also the pre-gate output ypre
    out    = y^T @ out_proj_w^T (+ bias)                 [batch * L, d_model], token-major

Kept for the backward: xz, x_dbl, ypre, the scan's checkpoints and the parameters (as upstream: its
``checkpoint_lvl=1`` recomputes the conv output and dt too). Recomputed in the backward: xc (one conv forward), dt
(one small GEMM) and y = ypre * silu(z) (for ``out_proj``'s weight gradient; the scan's backward kernel writes it
where it reads ypre and z, as upstream's ``recompute_out_z``). Against autograd over the separate
ops this keeps three fewer ``[d_inner, batch * L]`` activations per layer (xc, dt, y), and the gradient of y comes
out of its GEMM channel-major, the scan's layout, instead of token-major (a copy).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["MambaInnerFn", "mamba_inner"]


def _cm(t2d: Tensor, batch: int, seqlen: int) -> Tensor:
    """[channels, batch * L] -> [batch, channels, L] (a view)."""
    return t2d.view(t2d.shape[0], batch, seqlen).permute(1, 0, 2)


def _flat(t3d: Tensor) -> Tensor:
    """The inverse of _cm (a view for a channel-major t3d, else a copy)."""
    return t3d.permute(1, 0, 2).reshape(t3d.shape[1], -1)


class MambaInnerFn(torch.autograd.Function):
    """See the module docstring. Inputs: ``xz`` [2 d_inner, batch * L] (contiguous), the layer's parameters
    (conv weight [d_inner, W], conv bias or None, x_proj [R + 2N, d_inner], dt_proj [d_inner, R], dt bias
    [d_inner], A_log [d_inner, N], D [d_inner], out_proj [d_model, d_inner], its bias or None), the incoming
    ``conv_state`` [batch, d_inner, W] and ``h0`` [batch, d_inner, N] (or None: zeros), ``reset`` bool
    [batch, L] or None, and ``(batch, seqlen, dt_rank, d_state, chunk, state_dtype)``.

    Returns ``(out [batch * L, d_model] in xz's dtype, new conv window, last ssm state float32)``."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A_log, D, out_proj_w, out_proj_b,
                conv_state, h0, reset, sizes):
        from mamba_state.kernels.conv1d.ops import conv_forward
        from mamba_state.kernels.selective_scan.ops import scan_forward

        batch, seqlen, rank, nstate, chunk, state_dtype = sizes
        d_inner = xz.shape[0] // 2
        cdt = xz.dtype
        xs, z = _cm(xz[:d_inner], batch, seqlen), _cm(xz[d_inner:], batch, seqlen)
        xc, new_conv = conv_forward(xs, conv_w, conv_b, conv_state, reset, True, state_dtype)
        # the GEMMs' weights in the activations' dtype, cast once and kept for the backward (as upstream does)
        x_proj_c, dt_proj_c, out_proj_c = x_proj_w.to(cdt), dt_proj_w.to(cdt), out_proj_w.to(cdt)
        x_dbl = torch.mm(x_proj_c, _flat(xc))
        dt = torch.mm(dt_proj_c, x_dbl[:rank])
        B = _cm(x_dbl[rank: rank + nstate], batch, seqlen).unsqueeze(1)
        C = _cm(x_dbl[rank + nstate:], batch, seqlen).unsqueeze(1)
        A = -torch.exp(A_log.float())
        y, last, ckpt, ypre = scan_forward(xc, _cm(dt, batch, seqlen), A, B, C, D.float(), z, dt_bias.float(),
                                           h0, reset, True, chunk)
        out = torch.mm(_flat(y).t(), out_proj_c.t())
        if out_proj_b is not None:
            out = out + out_proj_b.to(cdt)
        ctx.save_for_backward(xz, conv_w, conv_b, x_proj_c, dt_proj_c, dt_bias, A_log, D, out_proj_c, out_proj_b,
                              conv_state, h0, reset, x_dbl, ckpt, ypre)
        ctx.weight_dtypes = (x_proj_w.dtype, dt_proj_w.dtype, out_proj_w.dtype)
        # unused outputs (the new conv window, the last state: a loss on the logits alone) get None gradients,
        # not zeros that the backward would add in (a few small kernels per layer, and the scan reading zeros)
        ctx.set_materialize_grads(False)
        ctx.sizes = sizes
        return out, new_conv, last

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout, dnew_conv, dlast):
        from mamba_state.kernels.conv1d.ops import conv_backward, conv_forward
        from mamba_state.kernels.selective_scan.ops import scan_backward

        (xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A_log, D, out_proj_w, out_proj_b, conv_state, h0, reset,
         x_dbl, ckpt, ypre) = ctx.saved_tensors  # the three GEMM weights already in the activations' dtype
        x_dtype, dt_dtype, out_dtype = ctx.weight_dtypes
        batch, seqlen, rank, nstate, chunk, state_dtype = ctx.sizes
        d_inner = xz.shape[0] // 2
        cdt = xz.dtype
        xs, z = _cm(xz[:d_inner], batch, seqlen), _cm(xz[d_inner:], batch, seqlen)
        # recompute what was not kept: the conv output, dt, and the gated output y
        xc, _ = conv_forward(xs, conv_w, conv_b, conv_state, reset, True, state_dtype)
        dt = torch.mm(dt_proj_w, x_dbl[:rank])
        B = _cm(x_dbl[rank: rank + nstate], batch, seqlen).unsqueeze(1)
        C = _cm(x_dbl[rank + nstate:], batch, seqlen).unsqueeze(1)
        A = -torch.exp(A_log.float())
        if dout is None:
            dout = torch.zeros(batch * seqlen, out_proj_w.shape[0], device=xz.device, dtype=cdt)
        dout = dout.to(cdt)
        dy = torch.mm(out_proj_w.t(), dout.t())  # [d_inner, batch * L]: channel-major, the scan's layout
        # the scan's backward also recomputes the gated output y where it reads ypre and z (for out_proj's weight)
        # xz's gradient is written in place by its two producers: z's half by the scan, x's half by the conv
        dxz = torch.empty_like(xz)
        du, ddelta, dA, dB, dC, dD, _dz, dbias, dinit, y = scan_backward(
            xc, _cm(dt, batch, seqlen), A, B, C, D.float(), z, dt_bias.float(), reset, ckpt, ypre,
            _cm(dy, batch, seqlen), dlast, True, chunk, want_y=True, dz_out=_cm(dxz[d_inner:], batch, seqlen))
        d_out_w = torch.mm(dout.t(), _flat(y).t())
        d_out_b = dout.sum(0) if out_proj_b is not None else None
        dd = _flat(ddelta)  # [d_inner, batch * L]
        d_dt_w = torch.mm(dd, x_dbl[:rank].t())
        dB2, dC2 = dB[:, 0].permute(1, 0, 2).reshape(nstate, -1), dC[:, 0].permute(1, 0, 2).reshape(nstate, -1)
        dx_dbl = torch.cat([torch.mm(dt_proj_w.t(), dd), dB2.to(cdt), dC2.to(cdt)], dim=0)
        d_x_w = torch.mm(dx_dbl, _flat(xc).t())
        dxc = torch.addmm(_flat(du), x_proj_w.t(), dx_dbl)  # through x_proj and through the scan's u
        want_state = conv_state is not None and ctx.needs_input_grad[10]
        _dxs, dcw, dcb, dstate = conv_backward(xs, conv_w, conv_b, conv_state, reset, True,
                                               _cm(dxc, batch, seqlen), dnew_conv, want_state,
                                               dx_out=_cm(dxz[:d_inner], batch, seqlen))
        need = ctx.needs_input_grad
        return (dxz if need[0] else None,
                dcw.to(conv_w.dtype) if need[1] else None,
                dcb.to(conv_b.dtype) if conv_b is not None and need[2] else None,
                d_x_w.to(x_dtype) if need[3] else None,
                d_dt_w.to(dt_dtype) if need[4] else None,
                dbias.to(dt_bias.dtype) if need[5] else None,
                (dA * A).to(A_log.dtype) if need[6] else None,  # A = -exp(A_log): dA_log = dA * A
                dD.to(D.dtype) if need[7] else None,
                d_out_w.to(out_dtype) if need[8] else None,
                d_out_b.to(out_proj_b.dtype) if d_out_b is not None and out_proj_b is not None and need[9] else None,
                dstate.to(conv_state.dtype) if dstate is not None and conv_state is not None else None,
                dinit.to(h0.dtype) if h0 is not None and need[11] else None,
                None, None)


def mamba_inner(xz: Tensor, layer, conv_state: Optional[Tensor], h0: Optional[Tensor], reset: Optional[Tensor],
                batch: int, seqlen: int, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`MambaInnerFn` over a :class:`~mamba_state.adapters.mamba.StatefulMamba`'s shared parameters."""
    conv_w = layer.conv1d.weight
    conv_w = conv_w[:, 0] if conv_w.dim() == 3 else conv_w
    sizes = (batch, seqlen, layer.dt_rank, layer.d_state, chunk, layer.state_dtype)
    return MambaInnerFn.apply(xz, conv_w, layer.conv1d.bias, layer.x_proj.weight, layer.dt_proj.weight,
                              layer.dt_proj.bias, layer.A_log, layer.D, layer.out_proj.weight, layer.out_proj.bias,
                              conv_state, h0, reset, sizes)
