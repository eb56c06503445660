"""Flat byte layout of a state: every tensor of a state as an aligned slice of one ``uint8`` buffer.

Used by :mod:`mamba_state.distributed` (one message carries a whole state) and :mod:`mamba_state.offload`
(one pinned host buffer per parked state). The layout is derived from the tensors' shapes and dtypes alone, so
a receiver that knows the shapes and dtypes (from a header) computes the same offsets as the sender.

Order: layer by layer (ascending ``layer_idx`` for a model state), each layer's named tensors in its family's
order (``conv_state`` then ``ssm_state`` for Mamba-1/2; ``angle_dt_state``, ``ssm_state``, ``k_state``, ``v_state``
for Mamba-3). Each
tensor starts at a multiple of :data:`ALIGN` bytes, so a slice can be viewed as any dtype without a copy.
Bytes are moved as bytes: any floating dtype (bf16 and fp8 included) round-trips bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..errors import StateError
from .containers import MambaInferenceState, MambaModelState

__all__ = ["ALIGN", "TensorSpec", "LayerSpec", "StateSpec", "state_spec", "state_tensors", "byte_offsets",
           "pack_into", "unpack", "build_state", "dtype_name", "dtype_from_name"]

ALIGN = 64  # bytes: a multiple of every element size, and of the widest vector load


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: Any) -> torch.dtype | None:
    """The floating ``torch.dtype`` called ``name``, or ``None`` when there is none by that name."""
    if not isinstance(name, str) or not name.isidentifier():
        return None
    dtype = getattr(torch, name, None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and not dtype.is_complex:
        return dtype
    return None


@dataclass(frozen=True)
class TensorSpec:
    """Shape (batch first) and dtype of one tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def with_batch(self, batch: int) -> "TensorSpec":
        return TensorSpec((batch,) + tuple(self.shape[1:]), self.dtype)


@dataclass(frozen=True, init=False)
class LayerSpec:
    """One layer: its index (``None`` for a single-layer state) and its named tensors, in its family's order.

    ``LayerSpec(idx, conv, ssm)`` is a Mamba-1/2 layer (as in 0.1); ``LayerSpec(idx, tensors={name: spec, ...})``
    any family's."""

    idx: int | None
    tensors: tuple[tuple[str, TensorSpec], ...]

    def __init__(self, idx: int | None, conv: TensorSpec | None = None, ssm: TensorSpec | None = None, *,
                 tensors: Mapping[str, TensorSpec] | None = None):
        if tensors is None:
            if conv is None or ssm is None:
                raise StateError("LayerSpec: expected conv and ssm specs, or tensors={name: spec}, found neither")
            tensors = {"conv_state": conv, "ssm_state": ssm}
        object.__setattr__(self, "idx", idx)
        object.__setattr__(self, "tensors", tuple(tensors.items()))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.tensors)

    @property
    def specs(self) -> tuple[TensorSpec, ...]:
        return tuple(spec for _, spec in self.tensors)

    def get(self, name: str) -> TensorSpec:
        return dict(self.tensors)[name]

    @property
    def conv(self) -> TensorSpec:
        """Mamba-1/2: the conv window's spec (``KeyError`` for a Mamba-3 layer)."""
        return self.get("conv_state")

    @property
    def ssm(self) -> TensorSpec:
        return self.get("ssm_state")

    def with_batch(self, batch: int) -> "LayerSpec":
        return LayerSpec(self.idx, tensors={n: t.with_batch(batch) for n, t in self.tensors})


@dataclass(frozen=True)
class StateSpec:
    """Everything needed to rebuild a state from its bytes: container, layers, offset and metadata."""

    container: str  # "model" or "layer"
    layers: tuple[LayerSpec, ...]
    seqlen_offset: int = 0
    metadata: Any = None  # dict for a model state, None for a layer state

    @property
    def batch_size(self) -> int:
        return self.layers[0].specs[0].shape[0]

    def tensor_specs(self) -> list[TensorSpec]:
        return [t for layer in self.layers for t in layer.specs]

    def with_batch(self, batch: int) -> "StateSpec":
        layers = tuple(l.with_batch(batch) for l in self.layers)
        return StateSpec(self.container, layers, self.seqlen_offset, self.metadata)

    def nbytes(self) -> int:
        """Size of the packed buffer (tensors plus alignment padding)."""
        return byte_offsets(self.tensor_specs())[1]

    def layout_key(self) -> tuple:
        """What must agree between states that are concatenated along the batch (all but the batch size)."""
        return (self.container, tuple((l.idx, tuple((n, t.shape[1:], t.dtype) for n, t in l.tensors))
                                      for l in self.layers))


def _check_state(state: Any, where: str) -> None:
    if not isinstance(state, (MambaInferenceState, MambaModelState)):
        raise StateError(f"{where}: expected a MambaInferenceState or MambaModelState, found {type(state).__name__}")


def state_spec(state: MambaInferenceState | MambaModelState, where: str = "state") -> StateSpec:
    """The :class:`StateSpec` of a state (validates the container type)."""
    _check_state(state, where)

    def layer(idx: int | None, s: MambaInferenceState) -> LayerSpec:
        return LayerSpec(idx, tensors={n: TensorSpec(tuple(t.shape), t.dtype) for n, t in s.tensors.items()})

    if isinstance(state, MambaModelState):
        return StateSpec("model", tuple(layer(i, s) for i, s in state.items()), state.seqlen_offset,
                         dict(state.metadata))
    return StateSpec("layer", (layer(None, state),), 0, None)


def state_tensors(state: MambaInferenceState | MambaModelState) -> list[torch.Tensor]:
    """The tensors of a state in packing order (each layer's named tensors in its family's order)."""
    if isinstance(state, MambaModelState):
        return [t for _, s in state.items() for t in s.tensors.values()]
    return list(state.tensors.values())


def byte_offsets(specs: Sequence[TensorSpec]) -> tuple[list[int], int]:
    """Start offset of each tensor and the total size in bytes (a multiple of :data:`ALIGN`)."""
    offsets, pos = [], 0
    for spec in specs:
        offsets.append(pos)
        pos += -(-spec.nbytes // ALIGN) * ALIGN
    return offsets, pos


def _view(buffer: torch.Tensor, offset: int, spec: TensorSpec) -> torch.Tensor:
    return buffer[offset:offset + spec.nbytes].view(spec.dtype).view(spec.shape)


def pack_into(buffer: torch.Tensor, tensors: Sequence[torch.Tensor], non_blocking: bool = False) -> None:
    """Copy ``tensors`` into the flat ``uint8`` ``buffer`` (any device; non-contiguous sources are fine).

    ``buffer`` must hold at least ``byte_offsets(specs)[1]`` bytes; padding bytes are left as they are.
    """
    specs = [TensorSpec(tuple(t.shape), t.dtype) for t in tensors]
    offsets, total = byte_offsets(specs)
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < total:
        raise StateError(f"pack: expected a 1-D uint8 buffer of at least {total} bytes, found "
                         f"{buffer.dtype} {list(buffer.shape)}")
    for t, off, spec in zip(tensors, offsets, specs):
        _view(buffer, off, spec).copy_(t.detach(), non_blocking=non_blocking)


def unpack(buffer: torch.Tensor, specs: Sequence[TensorSpec]) -> list[torch.Tensor]:
    """Views of ``buffer`` as the tensors described by ``specs`` (no copy; they share the buffer's storage)."""
    offsets, total = byte_offsets(specs)
    if buffer.numel() < total:
        raise StateError(f"unpack: expected at least {total} bytes, found {buffer.numel()}")
    return [_view(buffer, off, spec) for off, spec in zip(offsets, specs)]


def build_state(spec: StateSpec, tensors: Sequence[torch.Tensor]) -> MambaInferenceState | MambaModelState:
    """Rebuild a state of ``spec`` from tensors in packing order (the containers validate them)."""
    layers, pos = [], 0
    for layer in spec.layers:
        n = len(layer.tensors)
        layers.append(MambaInferenceState.from_tensors(dict(zip(layer.names, tensors[pos:pos + n]))))
        pos += n
    if pos != len(tensors):
        raise StateError(f"build_state: expected {pos} tensors for the layout, found {len(tensors)}")
    if spec.container == "layer":
        return layers[0]
    by_idx = {layer.idx: s for layer, s in zip(spec.layers, layers) if layer.idx is not None}
    return MambaModelState(by_idx, seqlen_offset=spec.seqlen_offset, metadata=spec.metadata)
