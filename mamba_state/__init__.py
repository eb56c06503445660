"""mamba-state: the recurrent state of Mamba models as a first-class object.

Import name ``mamba_state``; distribution ``mamba-state``. Upstream ``mamba_ssm`` is optional and imported lazily.
"""

from __future__ import annotations

import torch as _torch

from .errors import LayerNotFoundError, StateCompatibilityError, StateError, StateFormatError, StateShapeError
from .state import MambaInferenceState, MambaModelState
from .io import StateFileNotFoundError, load_model_state, save_model_state
from .interop import (
    get_inference_state,
    get_model_state,
    set_inference_state,
    set_model_state,
    zero_inference_state,
    zero_model_state,
)

from .adapters import StatefulMamba, StatefulMambaLM
from .adapters.mamba2 import StatefulMamba2
from .generation import GenerationOutput, TokenStream, clear_graph_cache, generate, stream
from .trace import LayerTrace, ModelTrace, TraceSizeWarning, trace_layer, trace_model

__version__ = "0.1.0"

# Let torch.load(..., weights_only=True) rebuild our containers (their constructors validate).
_torch.serialization.add_safe_globals([MambaInferenceState, MambaModelState])

__all__ = [
    "__version__",
    "StateError",
    "StateShapeError",
    "StateCompatibilityError",
    "StateFormatError",
    "StateFileNotFoundError",
    "LayerNotFoundError",
    "MambaInferenceState",
    "MambaModelState",
    "save_model_state",
    "load_model_state",
    "get_inference_state",
    "set_inference_state",
    "zero_inference_state",
    "get_model_state",
    "set_model_state",
    "zero_model_state",
    "StatefulMamba",
    "StatefulMamba2",
    "StatefulMambaLM",
    "GenerationOutput",
    "TokenStream",
    "generate",
    "stream",
    "clear_graph_cache",
    "LayerTrace",
    "ModelTrace",
    "TraceSizeWarning",
    "trace_layer",
    "trace_model",
]
