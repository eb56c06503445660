"""The state layer: containers (``containers``), files (``io``, ``format``, ``files``), wire and buffer layouts
(``packing``), pinned host pools (``offload``), collectives (``distributed``), upstream caches (``interop``) and
the discovery of a model's Mamba layers (``layers``). It imports the kernels layer at most, never the adapters.

``mamba_state.state`` was the containers' module in 0.1; ``from mamba_state.state import MambaModelState``
keeps working.
"""

from .containers import MambaInferenceState, MambaModelState

__all__ = ["MambaInferenceState", "MambaModelState"]
