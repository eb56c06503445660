"""Triton launches on the tensors' GPU: Triton runs a kernel on the *current* CUDA device, so a model on
``cuda:1`` while ``cuda:0`` is current would otherwise launch on the wrong GPU."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

__all__ = ["launch_device"]


def launch_device(t: torch.Tensor) -> ContextManager:
    """A context that makes ``t``'s CUDA device current for the launches inside it; a no-op for CPU tensors
    (the interpreter) and when that device is already current (the common case: one cheap query)."""
    dev = t.device
    if dev.type != "cuda" or dev.index is None or dev.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(dev.index)
