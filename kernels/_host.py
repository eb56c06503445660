"""Small host-built tensors (positions, per-step marks, sequence bounds) moved to the device without making the
host wait for the GPU."""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

__all__ = ["to_device", "host_tensor"]


def to_device(t: Tensor, device: Union[torch.device, str]) -> Tensor:
    """CPU tensor ``t`` on ``device``. To a CUDA device it goes pinned and asynchronously: a copy from pageable
    memory, or a blocking one (``torch.tensor(values, device=...)`` is one), may make the host wait for every
    kernel queued before it, and the GPU then idles while the host catches up (once per layer, in a forward that
    asks for states at positions). The pinned block is held by PyTorch's host allocator until the copy is done."""
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        # under CUDA graph capture the copy would be recorded from a pinned block the allocator later reuses (a
        # replay would read whatever is there then): the blocking copy refuses capture, as it always did
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def host_tensor(values: Sequence, dtype: torch.dtype, device: Union[torch.device, str]) -> Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device``, through :func:`to_device`."""
    return to_device(torch.tensor(list(values), dtype=dtype), device)
