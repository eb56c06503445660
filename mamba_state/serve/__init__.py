"""Serving: a continuous-batching engine over the state cache (``engine``, ``batch``, ``sampler``) and the
``mamba-state serve`` HTTP server (``app``, ``cli``; FastAPI + uvicorn, the ``serve`` extra). See docs/serving.md.

Importing this package loads the engine (torch) but not FastAPI: the HTTP app lives in
:mod:`mamba_state.serve.app`.
"""

from .engine import MAX_NEW_TOKENS, Engine, EngineOverloadedError, EngineStoppedError, RequestHandle

__all__ = ["Engine", "RequestHandle", "EngineOverloadedError", "EngineStoppedError", "MAX_NEW_TOKENS"]
