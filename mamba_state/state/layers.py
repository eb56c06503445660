"""Recognising Mamba layers (upstream or ours) and describing the state they carry, without importing mamba_ssm.

An upstream ``Mamba`` / ``Mamba2`` module is recognised by its attributes (``conv1d``, ``d_state``, ``d_conv``
and ``dt_proj`` for Mamba-1, ``nheads``/``headdim`` for Mamba-2). Our adapters describe themselves through a
``state_layout()`` method. Attention mixers (upstream ``MHA``) are recognised so that callers can refuse them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch.nn as nn

from ..errors import StateCompatibilityError

__all__ = ["layer_layout", "find_mamba_layers", "model_layout", "layout_fingerprint", "is_attention_layer"]


def layer_layout(layer: Any) -> dict[str, Any] | None:
    """``{"kind", "conv_shape", "ssm_shape"}`` (shapes without the batch) for a Mamba layer, else ``None``."""
    if hasattr(layer, "state_layout") and callable(layer.state_layout):
        return dict(layer.state_layout())
    conv = getattr(layer, "conv1d", None)
    if conv is None or not hasattr(layer, "d_state") or not hasattr(layer, "d_conv"):
        return None
    channels = int(conv.weight.shape[0])
    if hasattr(layer, "nheads") and hasattr(layer, "headdim"):
        return {"kind": "mamba2", "conv_shape": [channels, int(layer.d_conv)],
                "ssm_shape": [int(layer.nheads), int(layer.headdim), int(layer.d_state)]}
    if hasattr(layer, "dt_proj"):
        return {"kind": "mamba1", "conv_shape": [channels, int(layer.d_conv)],
                "ssm_shape": [channels, int(layer.d_state)]}
    return None


def is_attention_layer(module: Any) -> bool:
    """Upstream's ``MHA`` mixer (keeps a KV cache in ``InferenceParams`` under its ``layer_idx``)."""
    return type(module).__name__ == "MHA" and hasattr(module, "layer_idx")


def find_mamba_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Every Mamba layer of ``model`` by ``layer_idx`` (a recognised layer's children are not searched).

    Raises ``StateCompatibilityError`` for attention layers (their KV cache is not part of a Mamba state), for a
    Mamba layer without ``layer_idx`` and for two layers sharing an index.
    """
    found: dict[int, nn.Module] = {}

    def walk(module: nn.Module, name: str) -> None:
        if is_attention_layer(module):
            raise StateCompatibilityError(
                f"{name or 'model'}: expected only Mamba layers, found an attention layer (layer_idx "
                f"{module.layer_idx}); models with attention layers are not supported"
            )
        if layer_layout(module) is not None:
            idx = getattr(module, "layer_idx", None)
            if not isinstance(idx, int):
                raise StateCompatibilityError(f"{name or 'layer'}: expected an int layer_idx, found {idx!r}")
            if idx in found and found[idx] is not module:
                raise StateCompatibilityError(f"{name}: expected unique layer indices, found {idx} twice")
            found[idx] = module
            return
        for child_name, child in module.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name)

    if not isinstance(model, nn.Module):
        raise StateCompatibilityError(f"model: expected a torch.nn.Module, found {type(model).__name__}")
    walk(model, "")
    if not found:
        raise StateCompatibilityError(f"model: expected at least one Mamba layer, found none in {type(model).__name__}")
    return dict(sorted(found.items()))


def model_layout(model: Any) -> dict[int, dict[str, Any]]:
    """``{layer_idx: layer_layout}`` for a model (or a single layer with a ``layer_idx``)."""
    if hasattr(model, "state_layouts") and callable(model.state_layouts):
        return {int(k): dict(v) for k, v in model.state_layouts().items()}
    return {idx: layer_layout(m) for idx, m in find_mamba_layers(model).items()}  # type: ignore[misc]


def layout_fingerprint(layout: dict[int, dict[str, Any]]) -> str:
    """A short hex digest of a model layout (stable across processes and versions of Python).

    It covers exactly what the layout holds: the Mamba layer indices and, per layer, its kind and the conv and SSM
    state shapes (without the batch). Nothing else: not the weights, parameter dtypes, vocabulary or config, so
    two models of one architecture (a base model and its fine-tune, float32 and bfloat16 copies) have the same
    fingerprint.
    """
    text = json.dumps({str(k): layout[k] for k in sorted(layout)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
