"""The kernels one device runs, chosen once: :func:`device_ops` answers a :class:`DeviceOps` (the backend,
``"triton"`` or ``"reference"``, why, and each op bound to that choice). A model layer asks once per call and then
calls the ops; the ops' public functions keep their ``backend=`` argument for direct callers."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .backend import resolve_backend

__all__ = ["DeviceOps", "device_ops"]


@dataclass(frozen=True)
class DeviceOps:
    """The ops for one device and backend request. ``backend``: ``"triton"`` or ``"reference"``; ``reason``:
    why (as :func:`~mamba_state.kernels.backend.resolve_backend` says)."""

    backend: str
    reason: str

    @property
    def triton(self) -> bool:
        return self.backend == "triton"

    def selective_scan(self, *args: Any, **kwargs: Any) -> Any:
        """:func:`~mamba_state.kernels.selective_scan_fn` on Triton, else the chunked PyTorch path (same
        arguments, without ``backend``)."""
        if self.triton:
            from .selective_scan.launcher import selective_scan_fn

            return selective_scan_fn(*args, **{**kwargs, "backend": "triton"})
        from .selective_scan.chunked import selective_scan_chunked

        return selective_scan_chunked(*args, **kwargs)

    def selective_state_update(self, *args: Any, **kwargs: Any) -> Tensor:
        """One decoding step in place: the Triton step kernel, else its reference (same arguments)."""
        if self.triton:
            from .state_update.launcher import selective_state_update

            return selective_state_update(*args, **{**kwargs, "backend": "triton"})
        from .state_update.naive import selective_state_update_ref

        return selective_state_update_ref(*args, **kwargs)

    def causal_conv1d(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """:func:`~mamba_state.kernels.causal_conv1d` with this backend (its Triton forward serves inference;
        gradients and float64 take the reference inside it)."""
        from .conv1d.launcher import causal_conv1d

        return causal_conv1d(*args, **{**kwargs, "backend": self.backend})


def device_ops(device: torch.device | str, backend: Optional[str] = None) -> DeviceOps:
    """The :class:`DeviceOps` for work on ``device`` under ``backend`` (None: ``MAMBA_STATE_BACKEND`` or auto).
    Raises :class:`~mamba_state.errors.StateError` when ``triton`` is forced but cannot run there."""
    return _ops(*resolve_backend(device, backend))


@functools.lru_cache(maxsize=64)
def _ops(name: str, reason: str) -> DeviceOps:
    return DeviceOps(name, reason)
