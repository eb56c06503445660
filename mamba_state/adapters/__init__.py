"""Stateful adapters around upstream Mamba layers and language models.

* :class:`StatefulMamba` (``mamba.py``): one Mamba-1 layer, explicit state in and out.
* :class:`StatefulMamba2` (``mamba2.py``): one Mamba-2 layer, same interface (imported lazily).
* :class:`StatefulMamba3` (``mamba3.py``): one upstream Mamba-3 (SISO) layer, same interface (imported lazily).
* :class:`StatefulMambaLM` (``lm.py``): a whole ``MambaLMHeadModel``; ``from_pretrained`` / ``from_hf`` load
  checkpoints without importing mamba_ssm (``checkpoint.py``).
"""

from __future__ import annotations

from .lm import StatefulMambaLM
from .mamba import Mamba1Parameters, StatefulMamba

__all__ = ["StatefulMamba", "StatefulMamba2", "StatefulMamba3", "StatefulMambaLM", "Mamba1Parameters"]


def __getattr__(name: str):
    if name == "StatefulMamba2":  # written in its own module; imported on first use
        from .mamba2 import StatefulMamba2

        return StatefulMamba2
    if name == "StatefulMamba3":
        from .mamba3 import StatefulMamba3

        return StatefulMamba3
    raise AttributeError(f"module 'mamba_state.adapters' has no attribute {name!r}")
