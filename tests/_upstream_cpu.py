"""Test helpers: run upstream mamba_ssm's own pure-PyTorch paths on a CPU.

Upstream's ``Mamba.step`` calls its Triton ``selective_state_update`` and upstream's blocks call the Triton
``layer_norm_fn`` / ``rms_norm_fn``; all of them enter ``torch.cuda.device`` first, which fails on a CPU-only torch.
For the tests only, :func:`use_upstream_cpu_paths` points those names at upstream's own fallbacks: ``None`` for
``selective_state_update`` (upstream's step then uses its built-in einsum path) and upstream's ``layer_norm_ref`` /
``rms_norm_ref`` for the norms. The library never does this.
"""

from __future__ import annotations

import torch


def _norm_shim(is_rms_default: bool):
    from mamba_ssm.ops.triton.layer_norm import layer_norm_ref, rms_norm_ref

    def fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
           rowscale=None, prenorm=False, residual_in_fp32=False, is_rms_norm=is_rms_default,
           return_dropout_mask=False):
        assert x1 is None and weight1 is None and dropout_p == 0.0 and rowscale is None
        ref = rms_norm_ref if is_rms_norm else layer_norm_ref
        out = ref(x, weight, bias, residual=residual, eps=eps, prenorm=prenorm, upcast=True)
        if not prenorm:
            return out.to(x.dtype)
        y, res = out
        return y.to(x.dtype), (res.float() if residual_in_fp32 else res.to(x.dtype))

    return fn


def use_upstream_cpu_paths(monkeypatch) -> None:
    """Make upstream's step() and norms run on CPU through upstream's own reference code (tests only)."""
    import mamba_ssm.models.mixer_seq_simple as mixer_seq_simple
    import mamba_ssm.modules.block as block
    import mamba_ssm.modules.mamba_simple as mamba_simple
    import mamba_ssm.ops.triton.layer_norm as layer_norm

    monkeypatch.setattr(mamba_simple, "selective_state_update", None)
    monkeypatch.setattr(mamba_simple, "causal_conv1d_update", None)
    monkeypatch.setattr(block, "layer_norm_fn", _norm_shim(False))
    monkeypatch.setattr(mixer_seq_simple, "layer_norm_fn", _norm_shim(False))
    monkeypatch.setattr(layer_norm, "rms_norm_fn", _norm_shim(True))


def upstream_layer_forward_ref(layer, x: torch.Tensor) -> torch.Tensor:
    """Upstream ``Mamba.forward`` from a zero state, composed on CPU from upstream's ``selective_scan_ref`` and a plain
    depthwise ``F.conv1d`` with the layer's own weights (``mamba_inner_ref`` needs causal-conv1d's CUDA build).

    Computed in float32 (upstream's reference computes in float32). x: ``[B, L, d_model]`` -> ``[B, L, d_model]``.
    """
    import torch.nn.functional as F
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    d = torch.float32
    L = x.shape[1]
    xz = (x.to(d) @ layer.in_proj.weight.to(d).t())
    if layer.in_proj.bias is not None:
        xz = xz + layer.in_proj.bias.to(d)
    xs, z = xz.transpose(1, 2).chunk(2, dim=1)
    bias = layer.conv1d.bias.to(d) if layer.conv1d.bias is not None else None
    xs = F.conv1d(xs, layer.conv1d.weight.to(d), bias, padding=layer.d_conv - 1, groups=layer.d_inner)[..., :L]
    xs = F.silu(xs)
    x_dbl = xs.transpose(1, 2) @ layer.x_proj.weight.to(d).t()
    dt, B, C = torch.split(x_dbl, [layer.dt_rank, layer.d_state, layer.d_state], dim=-1)
    dt = (dt @ layer.dt_proj.weight.to(d).t()).transpose(1, 2)
    A = -torch.exp(layer.A_log.to(d))
    y = selective_scan_ref(xs, dt, A, B.transpose(1, 2), C.transpose(1, 2), layer.D.to(d), z=z,
                           delta_bias=layer.dt_proj.bias.to(d), delta_softplus=True)
    out = y.transpose(1, 2) @ layer.out_proj.weight.to(d).t()
    if layer.out_proj.bias is not None:
        out = out + layer.out_proj.bias.to(d)
    return out
