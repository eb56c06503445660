"""Serving: a continuous-batching engine over the state cache (``engine``, ``batch``, ``sampler``) and the
``mamba-state serve`` HTTP server (``app``, ``metrics``, ``cli``; FastAPI + uvicorn, the ``serve`` extra). See
docs/serving.md.

The names below load on first use (PEP 562): ``mamba_state.serve.cli`` builds the ``serve`` parser without
importing torch, and nothing here imports FastAPI until :mod:`mamba_state.serve.app` is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._lazy import load_attribute, names

if TYPE_CHECKING:
    from .engine import MAX_NEW_TOKENS, Engine, EngineOverloadedError, EngineStoppedError, RequestHandle

__all__ = ["Engine", "RequestHandle", "EngineOverloadedError", "EngineStoppedError", "MAX_NEW_TOKENS"]

_EXPORTS = dict.fromkeys(__all__, "engine")


def __getattr__(name: str) -> Any:
    return load_attribute(__name__, _EXPORTS, name)


def __dir__() -> list[str]:
    return names(globals(), __all__)
