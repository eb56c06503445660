"""The check every adapter runs on a state passed in with an input."""

from __future__ import annotations

from typing import Any

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
