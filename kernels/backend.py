"""Choosing between the Triton kernels and the pure-PyTorch reference path.

``backend`` arguments and the ``MAMBA_STATE_BACKEND`` environment variable take ``auto`` (default),
``reference`` or ``triton``. ``auto`` runs Triton on CUDA tensors and the reference path otherwise (also for
CPU tensors under ``TRITON_INTERPRET=1``, where only a forced ``triton`` runs the kernels in the interpreter).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from mamba_state.errors import StateError

__all__ = ["BACKENDS", "requested_backend", "triton_usable", "resolve_backend", "backend_name"]

BACKENDS = ("auto", "reference", "triton")


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: the argument, else ``$MAMBA_STATE_BACKEND``, else ``auto``."""
    if backend is not None:
        return _normalised(backend, "backend")
    return _normalised(os.environ.get("MAMBA_STATE_BACKEND", "auto"), "MAMBA_STATE_BACKEND")


def _normalised(value, source: str) -> str:
    choice = str(value).strip().lower()
    if choice not in BACKENDS:
        raise StateError(f"{source}: expected one of {list(BACKENDS)}, found {choice!r}")
    return choice


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    # cached: find_spec touches the file system, and torch.compile cannot trace it
    return importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device | str) -> tuple[bool, str]:
    """Whether Triton kernels can run on tensors of ``device``, and why (or why not)."""
    device = torch.device(device)
    return _triton_usable(device.type, device.index, os.environ.get("TRITON_INTERPRET", "0") == "1")


@functools.lru_cache(maxsize=None)
def _triton_usable(kind: str, index: int | None, interpret: bool) -> tuple[bool, str]:
    # cached per device: every layer of every forward asks, and the device queries cost host time
    if not _triton_installed():
        return False, "triton is not installed"
    if interpret:
        return True, "TRITON_INTERPRET=1: Triton runs in its (slow) interpreter"
    if kind == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        device = torch.device(kind) if index is None else torch.device(kind, index)
        major, _ = torch.cuda.get_device_capability(device)
        if major < 7:
            return False, f"GPU compute capability {major}.x is below 7.0"
        return True, f"CUDA device {torch.cuda.get_device_name(device)}"
    return False, f"tensors on {kind}: Triton needs a CUDA device"


def resolve_backend(device: torch.device | str, backend: str | None = None) -> tuple[str, str]:
    """``("triton" | "reference", reason)`` for work on ``device``; raises if ``triton`` is forced but unusable."""
    # the environment is read on every call (a changed MAMBA_STATE_BACKEND / TRITON_INTERPRET takes effect at
    # once); the answer for it is cached
    choice = requested_backend(backend)
    device = device if isinstance(device, torch.device) else torch.device(device)
    return _resolve(choice, device.type, device.index, os.environ.get("TRITON_INTERPRET", "0") == "1")


@functools.lru_cache(maxsize=256)
def _resolve(choice: str, kind: str, index: int | None, interpret: bool) -> tuple[str, str]:
    # cached: every layer of every forward asks several times; errors are raised, hence never cached
    ok, why = _triton_usable(kind, index, interpret)
    if choice == "reference":
        return "reference", "forced (backend='reference' or MAMBA_STATE_BACKEND=reference)"
    if choice == "triton":
        if not ok:
            raise StateError(f"backend: expected Triton to be usable when forced, found: {why}")
        return "triton", f"forced; {why}"
    if ok and kind == "cuda":
        return "triton", why
    return "reference", f"auto: {why}" if not ok else "auto: CPU tensors use the PyTorch reference path"


def backend_name(device: torch.device, backend: str | None) -> str:
    """``"triton"`` or ``"reference"`` as :func:`resolve_backend` says, except while torch.compile traces: it
    cannot trace the import probe inside, so there CUDA tensors take Triton unless the reference is asked for."""
    if torch.compiler.is_compiling():
        choice = requested_backend(backend)
        return "triton" if choice == "triton" or (choice == "auto" and device.type == "cuda") else "reference"
    return resolve_backend(device, backend)[0]
