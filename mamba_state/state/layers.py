"""Recognising Mamba layers (upstream or ours) and describing the state they carry, without importing mamba_ssm.

An upstream ``Mamba`` / ``Mamba2`` module is recognised by its attributes (``conv1d``, ``d_state``, ``d_conv``
and ``dt_proj`` for Mamba-1, ``nheads``/``headdim`` for Mamba-2), an upstream ``Mamba3`` by ``num_rope_angles``,
``nheads``, ``headdim``, ``d_state`` and ``mimo_rank`` (it has no conv). Our adapters describe themselves through a
``state_layout()`` method.

The families' named tensors and the fields that describe them (in a layout, a state file and a transfer header:
``<field>_shape`` / ``<field>_dtype``) are defined here, the lowest layer, for the containers, the file format,
the packing and the collectives alike. Attention mixers (upstream ``MHA``) are recognised so that callers can
refuse them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch.nn as nn

from ..errors import StateCompatibilityError

__all__ = ["FAMILY_TENSORS", "TENSOR_FIELDS", "FAMILY_RANKS", "family_fields", "layer_layout", "find_mamba_layers",
           "model_layout", "layout_fingerprint", "is_attention_layer"]


FAMILY_TENSORS: dict[str, tuple[str, ...]] = {
    "mamba1": ("conv_state", "ssm_state"),
    "mamba2": ("conv_state", "ssm_state"),
    "mamba3": ("angle_dt_state", "ssm_state", "k_state", "v_state"),
}
"""The named tensors each family's layer state holds, in order."""

TENSOR_FIELDS: dict[str, str] = {"conv_state": "conv", "ssm_state": "ssm", "angle_dt_state": "angle",
                                 "k_state": "k", "v_state": "v"}
"""Tensor name -> the field name of its ``<field>_shape`` / ``<field>_dtype`` keys (layouts, files, headers)."""

FAMILY_RANKS: dict[str, tuple[int, ...]] = {"mamba1": (3, 3), "mamba2": (3, 4), "mamba3": (3, 4, 4, 3)}
"""The rank (batch included) of each of a family's tensors, in :data:`FAMILY_TENSORS` order."""


def family_fields(kind: str) -> list[tuple[str, str, int]]:
    """``[(tensor name, field, rank), ...]`` of a family (``kind`` one of :data:`FAMILY_TENSORS`)."""
    return [(name, TENSOR_FIELDS[name], rank) for name, rank in zip(FAMILY_TENSORS[kind], FAMILY_RANKS[kind])]


def _mamba3_layout(layer: Any) -> dict[str, Any]:
    h, p, n = int(layer.nheads), int(layer.headdim), int(layer.d_state)
    r = int(layer.mimo_rank) if bool(getattr(layer, "is_mimo", False)) else 1
    return {"kind": "mamba3", "angle_shape": [h, int(layer.num_rope_angles)], "ssm_shape": [h, p, n],
            "k_shape": [r, h, n], "v_shape": [h, p]}


def layer_layout(layer: Any) -> dict[str, Any] | None:
    """The state layout (shapes without the batch) of a Mamba layer, else ``None``: ``{"kind", "conv_shape",
    "ssm_shape"}`` for Mamba-1/2, ``{"kind", "angle_shape", "ssm_shape", "k_shape", "v_shape"}`` for Mamba-3."""
    if hasattr(layer, "state_layout") and callable(layer.state_layout):
        return dict(layer.state_layout())
    if (isinstance(layer, nn.Module) and not hasattr(layer, "conv1d")
            and all(hasattr(layer, a) for a in ("num_rope_angles", "nheads", "headdim", "d_state", "mimo_rank"))):
        return _mamba3_layout(layer)
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
