"""mamba-state: the recurrent state of Mamba models as a first-class object.

Import name ``mamba_state``; distribution ``mamba-state``. Upstream ``mamba_ssm`` is optional and imported lazily.

``import mamba_state`` itself is light: every name below (and every submodule, ``mamba_state.io`` and so on) loads
on first use, so the ``mamba-state`` command answers ``--help`` without importing torch. ``ms.X`` and
``from mamba_state import X`` work as before for every name in ``__all__``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from ._lazy import load_attribute, names

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first use (PEP 562, below)
    from .adapters import StatefulMamba, StatefulMambaLM
    from .adapters.mamba2 import StatefulMamba2
    from .adapters.mamba3 import StatefulMamba3
    from .errors import LayerNotFoundError, StateCompatibilityError, StateError, StateFormatError, StateShapeError
    from .generation import GenerationOutput, SamplingConfig, TokenStream, clear_graph_cache, generate, stream
    from .state import MambaInferenceState, MambaModelState
    from .state.interop import (
        get_inference_state,
        get_model_state,
        set_inference_state,
        set_model_state,
        zero_inference_state,
        zero_model_state,
    )
    from .state.io import StateFileNotFoundError, load_model_state, save_model_state
    from .trace import LayerTrace, ModelTrace, TraceSizeWarning, trace_layer, trace_model

__version__ = "0.1.0"

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
    "StatefulMamba3",
    "StatefulMambaLM",
    "GenerationOutput",
    "SamplingConfig",
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

# name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["StateError", "StateShapeError", "StateCompatibilityError", "StateFormatError",
                     "LayerNotFoundError"], "errors"),
    **dict.fromkeys(["MambaInferenceState", "MambaModelState"], "state"),
    **dict.fromkeys(["StateFileNotFoundError", "load_model_state", "save_model_state"], "state.io"),
    **dict.fromkeys(["get_inference_state", "get_model_state", "set_inference_state", "set_model_state",
                     "zero_inference_state", "zero_model_state"], "state.interop"),
    **dict.fromkeys(["StatefulMamba", "StatefulMambaLM"], "adapters"),
    "StatefulMamba2": "adapters.mamba2",
    "StatefulMamba3": "adapters.mamba3",
    **dict.fromkeys(["GenerationOutput", "SamplingConfig", "TokenStream", "clear_graph_cache", "generate", "stream"],
                    "generation"),
    **dict.fromkeys(["LayerTrace", "ModelTrace", "TraceSizeWarning", "trace_layer", "trace_model"], "trace"),
}

def __getattr__(name: str) -> Any:
    return load_attribute(__name__, _EXPORTS, name)


def __dir__() -> list[str]:
    return names(globals(), __all__)


if "torch" in sys.modules:  # torch is paid for already: load the containers now (registering them for
    # torch.load(weights_only=True), as 0.1.0's import did)
    from . import state as _state  # noqa: E402,F401
