"""Small host-built tensors (positions, per-step marks, sequence bounds) moved to the device without making the
host wait for the GPU, and, for the small ones that calls repeat (the marks of a verify step's positions), kept
on the device between calls."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable, Sequence, Union

import torch
from torch import Tensor

__all__ = ["to_device", "host_tensor", "cached_on_device", "cached_host_tensor"]


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


CACHE_ENTRIES = 64
"""Device tensors kept by :func:`cached_on_device` (least recently used first out)."""
CACHE_MAX_BYTES = 1 << 16
"""Larger tensors are copied every call, not kept (a trace's marks: their copy is small next to its work)."""

_cache: "OrderedDict[tuple, Tensor]" = OrderedDict()
_cache_lock = threading.Lock()


def cached_on_device(key: Hashable, build: Callable[[], Tensor], device: Union[torch.device, str]) -> Tensor:
    """``to_device(build(), device)``, kept for the next call with the same ``key`` and device when it is small.

    For the index and mark tensors a call derives from its arguments alone (``key`` must determine ``build()``'s
    value): the speculative-decoding verify step asks for the same positions every step, and each copy costs
    host time in every layer. The tensors are shared between calls, so callers only read them (the kernels do).
    Nothing is kept for a CPU device (no copy to save) or while a CUDA graph is being captured (a tensor made
    then would live in the graph's memory pool)."""
    device = device if isinstance(device, torch.device) else torch.device(device)
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return to_device(build(), device)
    # the stream too: a tensor's first copy is ordered on the stream that made it, not on another one
    full = (key, *_stream_key(device))
    with _cache_lock:
        hit = _cache.get(full)
        if hit is not None:
            _cache.move_to_end(full)
            return hit
    t = to_device(build(), device)
    if t.numel() * t.element_size() <= CACHE_MAX_BYTES:
        with _cache_lock:
            _cache[full] = t
            while len(_cache) > CACHE_ENTRIES:
                _cache.popitem(last=False)
    return t


def _stream_key(device: torch.device) -> tuple[int, int]:
    """``(device index, raw handle of its current CUDA stream)``: a lookup that runs in every layer of a forward
    with positions, where building ``torch.cuda.current_stream(device)`` (a Stream object, the device index
    resolved in Python) cost about 20 us of host time against about 1 us for the raw handle."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if _raw_stream is not None:
        return index, int(_raw_stream(index))
    return index, int(torch.cuda.current_stream(index).cuda_stream)


# what TorchInductor's generated code calls for the current stream; looked up once, not in every layer's call
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def cached_host_tensor(values: Sequence[int], dtype: torch.dtype, device: Union[torch.device, str]) -> Tensor:
    """:func:`host_tensor` through :func:`cached_on_device`, keyed by the values and dtype: index tensors that
    depend on a call's positions alone (read-only for the caller)."""
    key = ("values", tuple(values), dtype)
    return cached_on_device(key, lambda: torch.tensor(list(key[1]), dtype=dtype), device)
