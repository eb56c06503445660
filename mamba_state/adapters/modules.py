"""Upstream ``MambaLMHeadModel``'s module tree rebuilt without importing mamba_ssm.

:class:`MambaLMParameters` has upstream's submodule names (``backbone.embedding``, ``backbone.layers.N.norm``,
``.mixer``, ``.norm2``, ``.mlp``, ``backbone.norm_f``, ``lm_head``), shapes and initialisation (the same random
draws in the same order, so one seed gives identical weights), with :class:`StatefulMamba` mixers. It holds
parameters only; :class:`~mamba_state.adapters.lm.StatefulMambaLM` runs them.

Config: a dict with upstream ``MambaConfig``'s fields (``d_model``, ``d_intermediate``, ``n_layer``,
``vocab_size``, ``ssm_cfg``, ``attn_layer_idx``, ``attn_cfg``, ``rms_norm``, ``residual_in_fp32``,
``fused_add_norm``, ``pad_vocab_size_multiple``, ``tie_embeddings``) plus an optional ``norm_epsilon``
(upstream always uses 1e-5).
``ssm_cfg["layer"]`` may also be ``"Mamba3"`` (the other ``ssm_cfg`` fields then are
:meth:`~mamba_state.adapters.mamba3.StatefulMamba3.from_config`'s): upstream's ``create_block`` builds Mamba-1/2
mixers only, so this is how :meth:`~mamba_state.adapters.lm.StatefulMambaLM.save_pretrained` describes a model of
upstream blocks with ``Mamba3`` mixers (docs/mamba3.md's recipe).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Callable, Mapping, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import StateCompatibilityError, StateError
from .mamba import StatefulMamba

__all__ = ["RMSNorm", "GatedMLP", "MambaLMParameters", "normalize_config", "DEFAULT_CONFIG", "norm_apply"]

DEFAULT_CONFIG: dict[str, Any] = {
    "d_model": 2560, "d_intermediate": 0, "n_layer": 64, "vocab_size": 50277, "ssm_cfg": {},
    "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
    "pad_vocab_size_multiple": 8, "tie_embeddings": True,
}


def normalize_config(config: Any) -> dict[str, Any]:
    """Upstream ``MambaConfig`` (dataclass), a dict or an object with its fields -> a plain dict with defaults."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        raw = dataclasses.asdict(config)
    elif isinstance(config, Mapping):
        raw = dict(config)
    elif config is not None and hasattr(config, "__dict__"):
        raw = {k: v for k, v in vars(config).items() if not k.startswith("_")}
    else:
        raise StateCompatibilityError(f"config: expected upstream MambaConfig or a dict, found {type(config).__name__}")
    unknown = sorted(set(raw) - set(DEFAULT_CONFIG) - {"norm_epsilon"})
    if unknown:
        raise StateCompatibilityError(
            f"config: expected upstream MambaConfig fields {sorted(DEFAULT_CONFIG)}, found unknown {unknown}"
        )
    out = {**DEFAULT_CONFIG, **raw}
    out["ssm_cfg"] = dict(out["ssm_cfg"] or {})
    out["attn_cfg"] = dict(out["attn_cfg"] or {})
    out["attn_layer_idx"] = list(out["attn_layer_idx"] or [])
    for key in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
        if not isinstance(out[key], int) or out[key] < 1:
            raise StateError(f"config {key}: expected a positive int, found {out[key]!r}")
    return out


class RMSNorm(nn.Module):
    """Upstream's ``RMSNorm`` parameters (``weight`` ones, ``bias`` None, ``eps``); forward in plain PyTorch."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_apply(self, x)


def norm_apply(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm or RMSNorm of ``x`` with ``norm``'s parameters, in plain PyTorch, output in ``x.dtype``.

    RMSNorm (upstream's, ours or transformers' ``MambaRMSNorm``) is computed in float32 as upstream's kernel does.
    """
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-5))
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(ct)
    bias = getattr(norm, "bias", None)
    weight = cast(torch.Tensor, norm.weight)  # every supported RMSNorm has a weight parameter
    if bias is None and hasattr(F, "rms_norm"):  # one fused kernel instead of five passes (same math)
        return F.rms_norm(xf, (xf.shape[-1],), weight.to(ct), eps).to(x.dtype)
    out = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.to(ct)
    if bias is not None:
        out = out + bias.to(ct)
    return out.to(x.dtype)


class GatedMLP(nn.Module):
    """Upstream ``GatedMLP`` (``fc1`` to 2*hidden, SiLU gate, ``fc2``), hidden rounded up to ``multiple_of``."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 bias: bool = False, multiple_of: int = 128, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        out_features = out_features if out_features is not None else in_features
        hidden = hidden_features if hidden_features is not None else int(8 * in_features / 3)
        hidden = (hidden + multiple_of - 1) // multiple_of * multiple_of
        self.fc1 = nn.Linear(in_features, 2 * hidden, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))


class _BlockParameters(nn.Module):
    def __init__(self, norm: nn.Module, mixer: nn.Module, norm2: nn.Module | None, mlp: nn.Module | None):
        super().__init__()
        self.norm = norm
        self.mixer = mixer
        if mlp is not None:
            self.norm2 = norm2
        self.mlp = mlp


def _make_mixer(d_model: int, ssm_cfg: dict, layer_idx: int, fk: dict, state_dtype, backend) -> nn.Module:
    cfg = dict(ssm_cfg)
    kind = cfg.pop("layer", "Mamba1")
    if kind == "Mamba1":
        return StatefulMamba.from_config(d_model, layer_idx=layer_idx, state_dtype=state_dtype, backend=backend,
                                         **cfg, **fk)
    if kind == "Mamba2":
        try:
            from .mamba2 import StatefulMamba2
        except ImportError as exc:
            raise StateCompatibilityError(
                f"ssm_cfg layer: found 'Mamba2', which needs mamba_state.adapters.mamba2.StatefulMamba2 ({exc})"
            ) from None
        return StatefulMamba2.from_config(d_model, layer_idx=layer_idx, state_dtype=state_dtype, backend=backend,
                                          **cfg, **fk)
    if kind == "Mamba3":  # our extension of upstream's config (its create_block builds Mamba1/Mamba2 only)
        from .mamba3 import StatefulMamba3

        return StatefulMamba3.from_config(d_model, layer_idx=layer_idx, state_dtype=state_dtype, backend=backend,
                                          **cfg, **fk)
    raise StateCompatibilityError(f"ssm_cfg layer: expected 'Mamba1', 'Mamba2' or 'Mamba3', found {kind!r}")


def _init_weights(module: nn.Module, n_layer: int, initializer_range: float = 0.02,
                  rescale_prenorm_residual: bool = True, n_residuals_per_layer: int = 1) -> None:
    # Upstream's GPT-2 style initialisation: zero Linear biases (except dt_proj's), embeddings N(0, 0.02),
    # residual output projections scaled by 1/sqrt(n_residuals_per_layer * n_layer).
    if isinstance(module, nn.Linear):
        if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    if rescale_prenorm_residual:
        for name, p in module.named_parameters():
            if name in ("out_proj.weight", "fc2.weight"):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p.div_(math.sqrt(n_residuals_per_layer * n_layer))


class _MixerModelParameters(nn.Module):
    def __init__(self, cfg: dict, vocab_size: int, fk: dict, state_dtype, backend, initializer_cfg):
        super().__init__()
        d_model, n_layer, d_int = cfg["d_model"], cfg["n_layer"], cfg["d_intermediate"]
        eps = cfg.get("norm_epsilon", 1e-5)
        self.embedding = nn.Embedding(vocab_size, d_model, **fk)
        norm_cls: Callable[[int], nn.Module] = partial(RMSNorm if cfg["rms_norm"] else nn.LayerNorm, eps=eps, **fk)
        mlp_cls: Callable[[int], nn.Module] | None = (
            None if d_int == 0 else partial(GatedMLP, hidden_features=d_int, out_features=d_model, **fk))
        self.layers = nn.ModuleList()
        for i in range(n_layer):
            # creation order as upstream's Block: norm, mixer, norm2, mlp (same random draws)
            norm = norm_cls(d_model)
            mixer = _make_mixer(d_model, cfg["ssm_cfg"], i, fk, state_dtype, backend)
            norm2 = norm_cls(d_model) if mlp_cls is not None else None
            mlp = mlp_cls(d_model) if mlp_cls is not None else None
            self.layers.append(_BlockParameters(norm, mixer, norm2, mlp))
        self.norm_f = (RMSNorm if cfg["rms_norm"] else nn.LayerNorm)(d_model, eps=eps, **fk)
        self.apply(partial(_init_weights, n_layer=n_layer, **(initializer_cfg or {}),
                           n_residuals_per_layer=1 if d_int == 0 else 2))


class MambaLMParameters(nn.Module):
    """Upstream ``MambaLMHeadModel``'s parameters with Stateful mixers (attention layers are refused).

    Args:
        config: upstream ``MambaConfig`` fields (see :func:`normalize_config`).
        device, dtype: as upstream (``A_log`` and ``D`` stay float32).
        state_dtype, backend: passed to the mixers.
    """

    def __init__(self, config: Any, device: Any = None, dtype: torch.dtype | None = None,
                 state_dtype: torch.dtype = torch.float32, backend: str | None = None,
                 initializer_cfg: dict | None = None):
        super().__init__()
        cfg = normalize_config(config)
        if cfg["attn_layer_idx"]:
            raise StateCompatibilityError(
                f"config attn_layer_idx: expected none (attention layers keep a KV cache, not a Mamba state, and "
                f"are not supported), found {cfg['attn_layer_idx']}"
            )
        self.config = cfg
        fk = {"device": device, "dtype": dtype}
        vocab = cfg["vocab_size"]
        mult = cfg["pad_vocab_size_multiple"]
        if vocab % mult:
            vocab += mult - vocab % mult
        self.backbone = _MixerModelParameters(cfg, vocab, fk, state_dtype, backend, initializer_cfg)
        self.lm_head = nn.Linear(cfg["d_model"], vocab, bias=False, **fk)
        self.apply(partial(_init_weights, n_layer=cfg["n_layer"], **(initializer_cfg or {})))
        if cfg["tie_embeddings"]:
            self.lm_head.weight = self.backbone.embedding.weight
