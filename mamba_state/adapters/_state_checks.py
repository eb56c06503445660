"""The checks every adapter runs on a state and a reset mask passed in with an input."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import StateCompatibilityError, StateError, StateShapeError
from ..state import MambaInferenceState


def check_layer_state(state: Any, layout: dict[str, Any], layer_idx: int | None, batch: int,
                      device: torch.device) -> MambaInferenceState:
    """``state`` if it fits a layer of ``layout`` and an input of ``batch`` rows on ``device``; else raise."""
    if not isinstance(state, MambaInferenceState):
        raise StateError(f"state: expected a MambaInferenceState or None, found {type(state).__name__}")
    got = state.layout()
    if got != layout:
        raise StateCompatibilityError(f"state of layer {layer_idx}: expected layout {layout}, found {got}")
    if state.batch_size != batch:
        raise StateShapeError(f"state batch size: expected {batch} (the input's), found {state.batch_size}")
    if state.device != device:
        raise StateError(f"state device: expected {device} (the input's), found {state.device}")
    return state


def check_reset(reset: Any, shape: Sequence[int]) -> None:
    """Nothing if ``reset`` is None or a bool tensor of ``shape`` (``[batch, seqlen]``, or ``[batch]`` for one
    step); else ``StateShapeError`` naming both."""
    if reset is None:
        return
    if not isinstance(reset, torch.Tensor) or reset.dtype != torch.bool or list(reset.shape) != list(shape):
        found = f"{reset.dtype} {list(reset.shape)}" if isinstance(reset, torch.Tensor) else type(reset).__name__
        dims = "[batch, seqlen]" if len(shape) == 2 else "[batch]"
        raise StateShapeError(f"reset: expected a bool tensor {dims} = {list(shape)}, found {found}")
