"""State containers: the recurrent state of one Mamba layer and of a whole model.

A Mamba layer carries its family's named tensors between tokens (the same layout upstream ``mamba_ssm`` keeps in
``InferenceParams.key_value_memory_dict[layer_idx]``):

* Mamba-1: ``conv_state`` ``[B, d_inner, d_conv]`` (the last ``d_conv`` inputs of the causal conv, oldest first)
  and ``ssm_state`` ``[B, d_inner, d_state]``.
* Mamba-2: ``conv_state`` ``[B, d_inner + 2 * ngroups * d_state, d_conv]`` and ``ssm_state``
  ``[B, nheads, headdim, d_state]``.
* Mamba-3: ``angle_dt_state`` ``[B, nheads, num_rope_angles]``, ``ssm_state`` ``[B, nheads, headdim, d_state]``,
  ``k_state`` ``[B, mimo_rank, nheads, d_state]`` and ``v_state`` ``[B, nheads, headdim]``.

Every operation validates its input first and either completes or raises a :mod:`mamba_state.errors` error
without changing anything.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Mapping, Sequence, Union, cast

import torch

from ..errors import LayerNotFoundError, StateCompatibilityError, StateError, StateFormatError, StateShapeError
from .layers import FAMILY_TENSORS, TENSOR_FIELDS
from .format import BUILD_ERRORS, atomic_write, check_save_path, inconsistent, read_state, serialize

__all__ = ["MambaInferenceState", "MambaModelState", "BatchIndex", "FAMILY_TENSORS"]

BatchIndex = Union[int, slice, torch.Tensor, Sequence[int]]


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {list(t.shape)}, dtype {t.dtype}, device {t.device}"
    return f"{type(t).__name__}"


def _check_mask(mask: Any, batch_size: int) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise StateError(f"reset mask: expected a bool tensor of shape [{batch_size}], found {_describe(mask)}")
    if mask.dtype != torch.bool or mask.shape != (batch_size,):
        raise StateError(f"reset mask: expected a bool tensor of shape [{batch_size}], found {_describe(mask)}")
    return mask


def _normalize_index(index: BatchIndex, batch_size: int) -> torch.Tensor | slice:
    """Turn any supported batch index into a slice or a LongTensor of in-range row numbers (batch kept)."""
    if isinstance(index, bool):
        raise StateError(f"batch index: expected int, slice, LongTensor or bool mask, found bool {index}")
    if isinstance(index, int):
        if not -batch_size <= index < batch_size:
            raise StateError(f"batch index: expected an int in [{-batch_size}, {batch_size}), found {index}")
        index = index % batch_size
        return slice(index, index + 1)
    if isinstance(index, slice):
        return index
    if isinstance(index, (list, tuple)):
        # a list of Python bools is a mask, as in torch indexing (bool is an int subclass: as_tensor alone
        # would read [True, False] as the rows 1, 0)
        is_mask = len(index) > 0 and all(isinstance(v, bool) for v in index)
        index = torch.as_tensor(index, dtype=torch.bool if is_mask else torch.long)
    if not isinstance(index, torch.Tensor):
        raise StateError(f"batch index: expected int, slice, LongTensor or bool mask, found {type(index).__name__}")
    if index.dtype == torch.bool:
        if index.shape != (batch_size,):
            raise StateError(f"batch mask: expected a bool tensor of shape [{batch_size}], found {_describe(index)}")
        return index.nonzero().flatten().cpu()
    # uint8 is refused: torch reads a uint8 index as a (deprecated) mask, so its values are ambiguous
    if index.dtype not in (torch.int64, torch.int32) or index.dim() != 1:
        raise StateError(f"batch index: expected a bool mask or 1-D int64/int32 indices, found {_describe(index)}")
    index = index.long().cpu()
    if index.numel() and (index.min() < -batch_size or index.max() >= batch_size):
        raise StateError(
            f"batch index: expected rows in [{-batch_size}, {batch_size}), found "
            f"{index.min().item()}..{index.max().item()}"
        )
    return index % batch_size


def _split_sizes(sizes: int | Sequence[int], batch_size: int) -> list[int]:
    if isinstance(sizes, bool):
        raise StateError(f"split: expected an int or a list of ints, found {sizes!r}")
    if isinstance(sizes, int):
        if sizes <= 0:
            raise StateError(f"split: expected a positive chunk size, found {sizes}")
        return [min(sizes, batch_size - i) for i in range(0, batch_size, sizes)]
    sizes = list(sizes)
    if any((not isinstance(s, int)) or isinstance(s, bool) or s < 0 for s in sizes) or sum(sizes) != batch_size:
        raise StateError(f"split: expected non-negative ints summing to the batch size {batch_size}, found {sizes}")
    return sizes


def _zero_rows(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``t`` with the rows where ``mask`` is True zeroed: in place, or out of place for a tensor in a graph."""
    rows = mask.view((-1,) + (1,) * (t.dim() - 1))
    return t.masked_fill(rows, 0) if t.requires_grad else t.masked_fill_(rows, 0)


class _NoSuchTensorError(StateCompatibilityError, AttributeError):
    """A tensor name the state's family does not carry (also an ``AttributeError``, so ``hasattr`` answers False)."""


_LAYOUT_KEYS = {name: f"{field}_shape" for name, field in TENSOR_FIELDS.items()}


class MambaInferenceState:
    """The recurrent state of one Mamba, Mamba-2 or Mamba-3 layer: its family's named tensors, batch first.

    Args:
        conv_state: Mamba-1/2: ``[B, C, d_conv]`` floating tensor, the last ``d_conv`` conv inputs per channel,
            oldest first (``C = d_inner`` for Mamba-1, ``d_inner + 2 * ngroups * d_state`` for Mamba-2).
        ssm_state: ``[B, d_inner, d_state]`` (Mamba-1) or ``[B, nheads, headdim, d_state]`` (Mamba-2, Mamba-3).
        angle_dt_state, k_state, v_state: Mamba-3 only (give these three and ``ssm_state``, no ``conv_state``):
            ``[B, nheads, num_rope_angles]`` (the accumulated rotary angle), ``[B, R, nheads, d_state]`` (the last
            token's rotated key; ``R`` = mimo_rank, 1 for SISO) and ``[B, nheads, headdim]`` (its value).
            Upstream's ``Mamba3`` layout.

    ``MambaInferenceState(conv, ssm)`` is a Mamba-1/2 state as in 0.1; ``MambaInferenceState(ssm_state=ssm,
    angle_dt_state=a, k_state=k, v_state=v)`` a Mamba-3 one. All tensors must share the batch size and the device.
    They are held as given (not copied). :attr:`tensors` gives them by name; every batch, device and dtype
    operation applies to all of them.
    """

    __slots__ = ("_t",)

    _t: dict[str, torch.Tensor]

    def __init__(self, conv_state: torch.Tensor | None = None, ssm_state: torch.Tensor | None = None,
                 angle_dt_state: torch.Tensor | None = None, k_state: torch.Tensor | None = None,
                 v_state: torch.Tensor | None = None):
        m3 = {"angle_dt_state": angle_dt_state, "k_state": k_state, "v_state": v_state}
        if conv_state is not None or all(t is None for t in m3.values()):
            if any(t is not None for t in m3.values()):
                raise StateError("state: expected conv_state and ssm_state (Mamba-1/2) or angle_dt_state, "
                                 "ssm_state, k_state and v_state (Mamba-3), found conv_state with "
                                 f"{sorted(k for k, t in m3.items() if t is not None)}")
            self._validate(conv_state, ssm_state)
            object.__setattr__(self, "_t", {"conv_state": conv_state, "ssm_state": ssm_state})
        else:
            tensors = {"angle_dt_state": angle_dt_state, "ssm_state": ssm_state, "k_state": k_state,
                       "v_state": v_state}
            self._validate_mamba3(tensors)
            object.__setattr__(self, "_t", cast(dict, tensors))

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> "MambaInferenceState":
        """A state from its named tensors (the keys of one family in :data:`FAMILY_TENSORS`)."""
        if not isinstance(tensors, Mapping):
            raise StateError(f"tensors: expected a dict of named tensors, found {type(tensors).__name__}")
        names = set(tensors)
        if names == {"conv_state", "ssm_state"}:
            return cls(tensors["conv_state"], tensors["ssm_state"])
        if names == set(FAMILY_TENSORS["mamba3"]):
            return cls(ssm_state=tensors["ssm_state"], angle_dt_state=tensors["angle_dt_state"],
                       k_state=tensors["k_state"], v_state=tensors["v_state"])
        raise StateError(f"tensors: expected the names {list(FAMILY_TENSORS['mamba1'])} or "
                         f"{list(FAMILY_TENSORS['mamba3'])}, found {sorted(names)}")

    @classmethod
    def _of_checked(cls, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> "MambaInferenceState":
        """A Mamba-1/2 state from tensors whose shapes the caller guarantees (rows of tensors it built from a
        validated state), without validating them again: the states at many positions of a forward are built
        this way (validation costs about 10 us a state)."""
        obj = object.__new__(cls)
        object.__setattr__(obj, "_t", {"conv_state": conv_state, "ssm_state": ssm_state})
        return obj

    @classmethod
    def _unchecked(cls, tensors: dict[str, torch.Tensor]) -> "MambaInferenceState":
        """A state of any family from named tensors the caller guarantees (rows of a validated state, in its
        names' order), not validated again."""
        obj = object.__new__(cls)
        object.__setattr__(obj, "_t", tensors)
        return obj

    def _rebuild_unchecked(self, fn) -> "MambaInferenceState":
        """:meth:`_rebuild` for an ``fn`` that keeps every shape past the batch and the batch size equal across
        tensors (a row gather, a slice): not validated again."""
        return MambaInferenceState._unchecked({k: fn(t) for k, t in self._t.items()})

    def _rebuild(self, fn) -> "MambaInferenceState":
        """A new state of the same family with ``fn(tensor)`` for every tensor (validated)."""
        return MambaInferenceState.from_tensors({k: fn(t) for k, t in self._t.items()})

    @staticmethod
    def _validate(conv_state: Any, ssm_state: Any) -> None:
        for name, t in (("conv_state", conv_state), ("ssm_state", ssm_state)):
            if not isinstance(t, torch.Tensor):
                raise StateError(f"{name}: expected a torch.Tensor, found {_describe(t)}")
            if not t.is_floating_point():
                raise StateError(f"{name}: expected a floating dtype, found {t.dtype}")
        if conv_state.dim() != 3:
            raise StateShapeError(
                f"conv_state: expected rank 3 [batch, channels, d_conv], found shape {list(conv_state.shape)}"
            )
        if ssm_state.dim() not in (3, 4):
            raise StateShapeError(
                "ssm_state: expected rank 3 [batch, d_inner, d_state] (Mamba-1) or rank 4 "
                f"[batch, nheads, headdim, d_state] (Mamba-2), found shape {list(ssm_state.shape)}"
            )
        if conv_state.shape[0] != ssm_state.shape[0]:
            raise StateShapeError(
                f"batch size: expected conv_state and ssm_state to agree, found {conv_state.shape[0]} "
                f"(conv_state) and {ssm_state.shape[0]} (ssm_state)"
            )
        if conv_state.device != ssm_state.device:
            raise StateError(
                f"device: expected conv_state and ssm_state on one device, found {conv_state.device} "
                f"and {ssm_state.device}"
            )
        if ssm_state.dim() == 3 and conv_state.shape[1] != ssm_state.shape[1]:
            raise StateShapeError(
                "Mamba-1 channels: expected conv_state.shape[1] == ssm_state.shape[1] (d_inner), found "
                f"{conv_state.shape[1]} and {ssm_state.shape[1]}"
            )
        if ssm_state.dim() == 4:
            _, nheads, headdim, d_state = ssm_state.shape
            extra = conv_state.shape[1] - nheads * headdim
            if extra <= 0 or extra % (2 * d_state) != 0:
                raise StateShapeError(
                    "Mamba-2 channels: expected conv_state.shape[1] == nheads*headdim + 2*ngroups*d_state = "
                    f"{nheads * headdim} + 2*ngroups*{d_state}, found {conv_state.shape[1]}"
                )

    @staticmethod
    def _validate_mamba3(tensors: dict[str, Any]) -> None:
        ranks = {"angle_dt_state": (3, "[batch, nheads, num_rope_angles]"),
                 "ssm_state": (4, "[batch, nheads, headdim, d_state]"),
                 "k_state": (4, "[batch, mimo_rank, nheads, d_state]"), "v_state": (3, "[batch, nheads, headdim]")}
        for name, (rank, dims) in ranks.items():
            t = tensors[name]
            if not isinstance(t, torch.Tensor):
                raise StateError(f"Mamba-3 {name}: expected a torch.Tensor, found {_describe(t)}")
            if not t.is_floating_point():
                raise StateError(f"Mamba-3 {name}: expected a floating dtype, found {t.dtype}")
            if t.dim() != rank:
                raise StateShapeError(f"Mamba-3 {name}: expected rank {rank} {dims}, found shape {list(t.shape)}")
        a, s, k, v = (tensors[n] for n in FAMILY_TENSORS["mamba3"])
        if len({a.shape[0], s.shape[0], k.shape[0], v.shape[0]}) != 1:
            raise StateShapeError(
                "batch size: expected the four Mamba-3 tensors to agree, found "
                f"{ {n: int(tensors[n].shape[0]) for n in FAMILY_TENSORS['mamba3']} }")
        if len({a.device, s.device, k.device, v.device}) != 1:
            raise StateError("device: expected the four Mamba-3 tensors on one device, found "
                             f"{ {n: str(tensors[n].device) for n in FAMILY_TENSORS['mamba3']} }")
        _, h, p, n = s.shape
        if a.shape[1] != h or k.shape[2] != h or v.shape[1] != h:
            raise StateShapeError(f"Mamba-3 nheads: expected {h} (ssm_state.shape[1]) in angle_dt_state.shape[1], "
                                  f"k_state.shape[2] and v_state.shape[1], found {a.shape[1]}, {k.shape[2]}, "
                                  f"{v.shape[1]}")
        if k.shape[3] != n or v.shape[2] != p:
            raise StateShapeError(f"Mamba-3 sizes: expected k_state d_state {n} and v_state headdim {p} (as "
                                  f"ssm_state), found {k.shape[3]} and {v.shape[2]}")
        if not 0 < a.shape[2] <= n // 2 or k.shape[1] < 1:
            raise StateShapeError(f"Mamba-3 sizes: expected 1 <= num_rope_angles <= d_state // 2 = {n // 2} and "
                                  f"mimo_rank >= 1, found {a.shape[2]} and {k.shape[1]}")

    # ------------------------------------------------------------------ named tensors
    def _get(self, name: str) -> torch.Tensor:
        try:
            return self._t[name]
        except KeyError:
            raise _NoSuchTensorError(f"{name}: a {self.kind} state holds {list(self._t)}, not {name}") from None

    def _set(self, name: str, value: torch.Tensor) -> None:
        if name not in self._t:
            raise _NoSuchTensorError(f"{name}: a {self.kind} state holds {list(self._t)}, not {name}")
        # not validated, as the plain attributes of 0.1 were not: the checks of the layers and of set_* see it
        self._t[name] = value

    @property
    def conv_state(self) -> torch.Tensor:
        """Mamba-1/2: ``[B, C, d_conv]``, the conv window (a Mamba-3 state has none: ``StateCompatibilityError``,
        also an ``AttributeError``)."""
        return self._get("conv_state")

    @conv_state.setter
    def conv_state(self, value: torch.Tensor) -> None:
        self._set("conv_state", value)

    @property
    def ssm_state(self) -> torch.Tensor:
        """The SSM state (every family)."""
        return self._t["ssm_state"]

    @ssm_state.setter
    def ssm_state(self, value: torch.Tensor) -> None:
        self._set("ssm_state", value)

    @property
    def angle_dt_state(self) -> torch.Tensor:
        """Mamba-3: ``[B, nheads, num_rope_angles]``, the accumulated rotary angle."""
        return self._get("angle_dt_state")

    @angle_dt_state.setter
    def angle_dt_state(self, value: torch.Tensor) -> None:
        self._set("angle_dt_state", value)

    @property
    def k_state(self) -> torch.Tensor:
        """Mamba-3: ``[B, mimo_rank, nheads, d_state]``, the last token's key (bias added, rotated)."""
        return self._get("k_state")

    @k_state.setter
    def k_state(self, value: torch.Tensor) -> None:
        self._set("k_state", value)

    @property
    def v_state(self) -> torch.Tensor:
        """Mamba-3: ``[B, nheads, headdim]``, the last token's value."""
        return self._get("v_state")

    @v_state.setter
    def v_state(self, value: torch.Tensor) -> None:
        self._set("v_state", value)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The named tensors, in the family's order (a new dict holding the state's own tensors)."""
        return dict(self._t)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The names of :attr:`tensors`."""
        return tuple(self._t)

    # ------------------------------------------------------------------ description
    @property
    def kind(self) -> str:
        """``"mamba1"``, ``"mamba2"`` (from the rank of ``ssm_state``) or ``"mamba3"``."""
        if "angle_dt_state" in self._t:
            return "mamba3"
        return "mamba1" if self._t["ssm_state"].dim() == 3 else "mamba2"

    @property
    def batch_size(self) -> int:
        """Rows in the batch (dimension 0 of every tensor)."""
        return int(self.ssm_state.shape[0])

    @property
    def device(self) -> torch.device:
        """The device of the tensors."""
        return self.ssm_state.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of ``ssm_state`` (the other tensors usually share it; see each tensor's ``dtype``)."""
        return self.ssm_state.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors (every layer for a model state)."""
        return sum(t.numel() * t.element_size() for t in self._t.values())

    def layout(self) -> dict[str, Any]:
        """Batch-free description: kind and the non-batch shapes (JSON-serialisable). Mamba-1/2:
        ``{kind, conv_shape, ssm_shape}``; Mamba-3: ``{kind, angle_shape, ssm_shape, k_shape, v_shape}``."""
        out: dict[str, Any] = {"kind": self.kind}
        for name, t in self._t.items():
            out[_LAYOUT_KEYS[name]] = list(t.shape[1:])
        return out

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}={list(t.shape)} {t.dtype}" for name, t in self._t.items())
        return f"MambaInferenceState(kind={self.kind}, batch_size={self.batch_size}, {parts}, device={self.device})"

    def __reduce__(self):
        # Rebuilt by calling the class, which validates: works with torch.load(weights_only=True) once
        # the class is an allowed global (registered in mamba_state/__init__.py).
        if self.kind == "mamba3":
            t = self._t
            return (MambaInferenceState, (None, t["ssm_state"], t["angle_dt_state"], t["k_state"], t["v_state"]))
        return (MambaInferenceState, (self._t["conv_state"], self._t["ssm_state"]))

    # ------------------------------------------------------------------ copies and moves
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False, copy: bool = False) -> "MambaInferenceState":
        """A new state object on ``device`` with every tensor cast to ``dtype`` (``None`` keeps each).

        As with ``Tensor.to``, a tensor already on ``device`` with ``dtype`` is *shared*, not copied: with nothing
        to change, ``s.to("cpu")`` holds the very tensors of ``s`` and an in-place change to one shows in the
        other. ``copy=True`` always makes new tensors; :meth:`clone` gives an independent copy in place.
        """
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise StateError(f"dtype: expected a floating torch.dtype, found {dtype!r}")
        return self._rebuild(lambda t: t.to(device=device, dtype=dtype, non_blocking=non_blocking, copy=copy))

    def clone(self) -> "MambaInferenceState":
        """A copy with new storage (same dtypes, devices; autograd history kept)."""
        return self._rebuild(torch.Tensor.clone)

    def detach(self) -> "MambaInferenceState":
        """A state sharing storage with this one, cut from the autograd graph."""
        return self._rebuild(torch.Tensor.detach)

    def zero_(self) -> "MambaInferenceState":
        """Zero every tensor; returns self.

        In place, except for a tensor in an autograd graph (``requires_grad``): autograd may have saved it for
        the backward, where an in-place change would fail, so this state takes a new zero tensor in its place
        (the old tensor is left as it was). Either way ``self`` then holds zeros.
        """
        object.__setattr__(self, "_t", {k: (torch.zeros_like(t) if t.requires_grad else t.zero_())
                                        for k, t in self._t.items()})
        return self

    def reset_(self, mask: torch.Tensor) -> "MambaInferenceState":
        """Zero the rows where ``mask`` (bool ``[B]``) is True in every tensor; returns self.

        In place, except for a tensor in an autograd graph (``requires_grad``, e.g. a state straight out of a
        forward in training): this state then takes a new tensor with those rows zeroed, built by a
        differentiable ``masked_fill`` (the other rows keep their gradient path; the old tensor, which autograd
        may have saved for the backward, is left as it was). Recurrent training can reset rows between chunks.
        """
        mask = _check_mask(mask, self.batch_size).to(self.device)
        object.__setattr__(self, "_t", {k: _zero_rows(t, mask) for k, t in self._t.items()})
        return self

    # ------------------------------------------------------------------ batch operations
    def select(self, index: BatchIndex) -> "MambaInferenceState":
        """A new state holding the chosen rows (always copies; an int keeps a batch dimension of 1)."""
        idx = _normalize_index(index, self.batch_size)
        if isinstance(idx, slice):
            sl = idx
            return self._rebuild(lambda t: t[sl].clone())
        rows = idx.to(self.device)
        return self._rebuild(lambda t: t.index_select(0, rows))

    @staticmethod
    def cat(states: Sequence["MambaInferenceState"]) -> "MambaInferenceState":
        """Concatenate states of one layout, dtype and device along the batch."""
        states = list(states)
        if not states or not all(isinstance(s, MambaInferenceState) for s in states):
            raise StateError(
                f"cat: expected a non-empty sequence of MambaInferenceState, found {[type(s).__name__ for s in states]}"
            )
        first = states[0]
        # one signature a state (names, shapes past the batch, dtypes, devices); layout() only for the message
        sig = [(k, t.shape[1:], t.dtype, t.device) for k, t in first._t.items()]
        for i, s in enumerate(states[1:], start=1):
            if [(k, t.shape[1:], t.dtype, t.device) for k, t in s._t.items()] == sig:
                continue
            if s.layout() != first.layout():
                raise StateCompatibilityError(f"cat: state {i} has layout {s.layout()}, expected {first.layout()}")
            for name in first.tensor_names:
                a, b = first._t[name], s._t[name]
                if a.dtype != b.dtype or a.device != b.device:
                    raise StateCompatibilityError(
                        f"cat: state {i} {name} is {b.dtype} on {b.device}, expected {a.dtype} on {a.device}"
                    )
        return MambaInferenceState.from_tensors({name: torch.cat([s._t[name] for s in states])
                                                 for name in first.tensor_names})

    def split(self, sizes: int | Sequence[int]) -> list["MambaInferenceState"]:
        """Split along the batch (an int is a chunk size, a list gives each part's size); parts are copies."""
        out, start = [], 0
        for size in _split_sizes(sizes, self.batch_size):
            out.append(self.select(slice(start, start + size)))
            start += size
        return out

    def allclose(self, other: "MambaInferenceState", rtol: float = 1e-5, atol: float = 1e-8) -> bool:
        """True when ``other`` has the same layout and every tensor agrees within tolerance (compared in float64)."""
        if not isinstance(other, MambaInferenceState):
            return False
        if other.layout() != self.layout() or other.batch_size != self.batch_size:
            return False
        for name, a in self._t.items():
            b = other._t[name]
            if not torch.allclose(a.detach().double().cpu(), b.detach().double().cpu(), rtol=rtol, atol=atol):
                return False
        return True

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> None:
        """Write this single-layer state atomically to a safetensors file (see :mod:`mamba_state.io`): its
        family's named tensors (format version 1 for Mamba-1/2, as 0.1.0 wrote it; version 2 for Mamba-3)."""
        write_state_file(self, path, metadata=metadata)

    @staticmethod
    def load(path: str | os.PathLike, device: torch.device | str | None = None) -> "MambaInferenceState":
        """Read a state written by :meth:`save`, in the dtypes it was saved in (bit for bit; convert with
        ``.to(dtype=...)``); raises ``StateFormatError`` for anything else."""
        return cast(MambaInferenceState, read_state_file(path, device=device, expect="layer"))


def _check_metadata(metadata: Any) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise StateError(f"metadata: expected a dict with str keys, found {type(metadata).__name__}")
    try:
        json.dumps(dict(metadata))
    except (TypeError, ValueError) as exc:
        raise StateError(f"metadata: expected JSON-serialisable values, found {exc}") from None
    return dict(metadata)


def _layer_rows(state: MambaInferenceState, lo: int, hi: int) -> list[MambaInferenceState]:
    """Rows ``lo .. hi - 1`` of one layer's state as batch-1 states of views (one ``split`` per tensor)."""
    parts = {k: t[lo:hi].split(1) for k, t in state.tensors.items()}  # rows of a validated state: no re-check
    return [MambaInferenceState._unchecked({k: p[j] for k, p in parts.items()}) for j in range(hi - lo)]


class MambaModelState:
    """The states of every Mamba layer of a model, keyed by ``layer_idx``.

    Args:
        layers: ``{layer_idx: MambaInferenceState}`` (non-negative int keys), all with one batch size.
        seqlen_offset: how many tokens the state has consumed (upstream's ``InferenceParams.seqlen_offset``).
        metadata: JSON-serialisable user data kept with the state and in saved files.
    """

    __slots__ = ("_layers", "seqlen_offset", "metadata")

    def __init__(self, layers: Mapping[int, MambaInferenceState], seqlen_offset: int = 0,
                 metadata: Mapping[str, Any] | None = None):
        if not isinstance(layers, Mapping) or not layers:
            raise StateError(f"layers: expected a non-empty dict {{layer_idx: MambaInferenceState}}, found "
                             f"{layers!r:.80}")
        checked: dict[int, MambaInferenceState] = {}
        for idx in sorted(layers, key=lambda k: (not isinstance(k, int), k if isinstance(k, int) else 0)):
            s = layers[idx]
            if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
                raise StateError(f"layers: expected non-negative int layer indices, found {idx!r}")
            if not isinstance(s, MambaInferenceState):
                raise StateError(f"layers[{idx}]: expected a MambaInferenceState, found {type(s).__name__}")
            checked[idx] = s
        sizes = {i: s.batch_size for i, s in checked.items()}
        if len(set(sizes.values())) != 1:
            raise StateShapeError(f"batch size: expected every layer to agree, found {sizes}")
        if not isinstance(seqlen_offset, int) or isinstance(seqlen_offset, bool) or seqlen_offset < 0:
            raise StateError(f"seqlen_offset: expected a non-negative int, found {seqlen_offset!r}")
        self._layers = checked
        self.seqlen_offset = seqlen_offset
        self.metadata = _check_metadata(metadata)

    @classmethod
    def _of_checked(cls, layers: dict[int, MambaInferenceState], seqlen_offset: int = 0) -> "MambaModelState":
        """A model state from layers the caller guarantees (sorted non-negative int indices, one batch size:
        rows of a validated state), without validating them again; no metadata. The serving engine builds its
        per-request row views this way (validation costs about 0.2 ms a 24-layer state)."""
        obj = object.__new__(cls)
        obj._layers = layers
        obj.seqlen_offset = seqlen_offset
        obj.metadata = {}
        return obj

    def _row_views(self, lo: int, hi: int, seqlen_offsets: Sequence[int] | None = None) -> list["MambaModelState"]:
        """Rows ``lo .. hi - 1`` as batch-1 states of views into this state's tensors (no copy; one
        ``split`` per tensor, not a slice per row and tensor), row ``j`` with ``seqlen_offsets[j]`` (default:
        this state's offset); no metadata."""
        n = hi - lo
        offsets = [self.seqlen_offset] * n if seqlen_offsets is None else list(seqlen_offsets)
        per_layer = {i: _layer_rows(s, lo, hi) for i, s in self._layers.items()}
        return [MambaModelState._of_checked({i: rows[j] for i, rows in per_layer.items()}, offsets[j])
                for j in range(n)]

    # ------------------------------------------------------------------ mapping interface
    def __getitem__(self, layer_idx: int) -> MambaInferenceState:
        """The state of layer ``layer_idx``; a missing index raises :class:`LayerNotFoundError` (a ``KeyError``)."""
        try:
            return self._layers[layer_idx]
        except (KeyError, TypeError):  # TypeError: an unhashable index
            raise LayerNotFoundError(f"layer index: expected one of {self.layer_indices}, found {layer_idx!r}") \
                from None

    def get(self, layer_idx: int, default: Any = None) -> Any:
        """The state of layer ``layer_idx``, or ``default`` when the state has no such layer (like ``dict.get``)."""
        return self._layers[layer_idx] if layer_idx in self else default

    def __len__(self) -> int:
        return len(self._layers)

    def __iter__(self) -> Iterator[int]:
        return iter(self._layers)

    def __contains__(self, layer_idx: object) -> bool:
        try:
            return layer_idx in self._layers
        except TypeError:  # an unhashable object is no layer index
            return False

    def items(self):
        """``(layer_idx, MambaInferenceState)`` pairs in ascending layer order."""
        return self._layers.items()

    @property
    def layers(self) -> dict[int, MambaInferenceState]:
        """A shallow copy of the layer mapping."""
        return dict(self._layers)

    @property
    def layer_indices(self) -> list[int]:
        """The layer indices, ascending."""
        return list(self._layers)

    # ------------------------------------------------------------------ description
    @property
    def batch_size(self) -> int:
        """Rows in the batch (dimension 0 of both tensors)."""
        return next(iter(self._layers.values())).batch_size

    @property
    def device(self) -> torch.device:
        """The device shared by all layers (raises ``StateError`` if layers differ)."""
        devices = {s.device for s in self._layers.values()}
        if len(devices) != 1:
            raise StateError(f"device: expected all layers on one device, found {sorted(map(str, devices))}")
        return devices.pop()

    @property
    def dtype(self) -> torch.dtype:
        """The SSM-state dtype shared by all layers (raises ``StateError`` if layers differ)."""
        dtypes = {s.dtype for s in self._layers.values()}
        if len(dtypes) != 1:
            raise StateError(f"dtype: expected one dtype over layers, found {sorted(map(str, dtypes))}")
        return dtypes.pop()

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors (conv and SSM; every layer for a model state)."""
        return sum(s.nbytes for s in self._layers.values())

    def layout(self) -> dict[int, dict[str, Any]]:
        """``{layer_idx: layer.layout()}`` (JSON-serialisable, batch-free)."""
        return {i: s.layout() for i, s in self._layers.items()}

    def __repr__(self) -> str:
        return (
            f"MambaModelState(layers={len(self)}, batch_size={self.batch_size}, seqlen_offset={self.seqlen_offset}, "
            f"nbytes={self.nbytes})"
        )

    def __reduce__(self):
        return (MambaModelState, (dict(self._layers), self.seqlen_offset, dict(self.metadata)))

    def _map(self, fn) -> "MambaModelState":
        return MambaModelState({i: fn(s) for i, s in self._layers.items()}, self.seqlen_offset, dict(self.metadata))

    # ------------------------------------------------------------------ copies and moves
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False, copy: bool = False) -> "MambaModelState":
        """Every layer moved and cast (:meth:`MambaInferenceState.to`); offset and metadata kept.

        Tensors that need no conversion are shared with this state, as ``Tensor.to`` shares them; ``copy=True``
        always makes new tensors (and :meth:`clone` copies without moving).
        """
        return self._map(lambda s: s.to(device=device, dtype=dtype, non_blocking=non_blocking, copy=copy))

    def clone(self) -> "MambaModelState":
        """A copy of every layer with new storage (offset and metadata copied)."""
        return self._map(MambaInferenceState.clone)

    def detach(self) -> "MambaModelState":
        """Every layer cut from the autograd graph (storage shared)."""
        return self._map(MambaInferenceState.detach)

    def zero_(self) -> "MambaModelState":
        """Zero every layer in place; returns self."""
        for s in self._layers.values():
            s.zero_()
        return self

    def reset_(self, mask: torch.Tensor) -> "MambaModelState":
        _check_mask(mask, self.batch_size)
        for s in self._layers.values():
            s.reset_(mask)
        return self

    # ------------------------------------------------------------------ batch operations
    def select(self, index: BatchIndex) -> "MambaModelState":
        _normalize_index(index, self.batch_size)  # validate once, before touching any layer
        return self._map(lambda s: s.select(index))

    @staticmethod
    def cat(states: Sequence["MambaModelState"]) -> "MambaModelState":
        """Concatenate along the batch. Layers must match; ``seqlen_offset`` is the largest (the SSM state carries
        the history, so the offset is informational for Mamba layers); metadata is the first state's."""
        states = list(states)
        if not states or not all(isinstance(s, MambaModelState) for s in states):
            raise StateError(
                f"cat: expected a non-empty sequence of MambaModelState, found {[type(s).__name__ for s in states]}"
            )
        first = states[0]
        for i, s in enumerate(states[1:], start=1):
            if s.layer_indices != first.layer_indices:
                raise StateCompatibilityError(
                    f"cat: state {i} has layers {s.layer_indices}, expected {first.layer_indices}"
                )
        layers = {idx: MambaInferenceState.cat([s[idx] for s in states]) for idx in first.layer_indices}
        return MambaModelState(layers, max(s.seqlen_offset for s in states), dict(first.metadata))

    def split(self, sizes: int | Sequence[int]) -> list["MambaModelState"]:
        sizes = _split_sizes(sizes, self.batch_size)
        per_layer = {i: s.split(sizes) for i, s in self._layers.items()}
        return [
            MambaModelState({i: parts[k] for i, parts in per_layer.items()}, self.seqlen_offset, dict(self.metadata))
            for k in range(len(sizes))
        ]

    def allclose(self, other: "MambaModelState", rtol: float = 1e-5, atol: float = 1e-8) -> bool:
        """True when ``other`` has the same layers and every layer agrees within tolerance
        (:meth:`MambaInferenceState.allclose`).

        Only the tensors are compared: ``seqlen_offset`` and ``metadata`` are not (check
        ``a.seqlen_offset == b.seqlen_offset`` as well when the token count matters).
        """
        if not isinstance(other, MambaModelState) or other.layer_indices != self.layer_indices:
            return False
        return all(s.allclose(other[i], rtol=rtol, atol=atol) for i, s in self._layers.items())

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, model: Any = None) -> None:
        """Write atomically to a safetensors file, in the state's own dtypes; with ``model``, record its layer
        layout and fingerprint (layer indices, kinds and state shapes; not the weights) for later checks."""
        write_state_file(self, path, model=model)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None, model: Any = None,
             strict: bool = True) -> "MambaModelState":
        """Read a model state. ``device=None`` restores the saved device when it exists here (else CPU).

        With ``model`` (an upstream model or a wrapped one), the state must fit it: with ``strict`` the same
        set of Mamba layers, otherwise a subset; shapes must match exactly. Only the layout is checked (layer
        indices, kinds, state shapes), not the weights or dtypes. The state comes back in the dtypes it was saved
        in, bit for bit, whatever the model's dtype; convert with ``.to(dtype=...)`` if you want another
        (``StatefulMambaLM`` continues from a state in its own dtype; ``set_model_state`` casts into upstream's
        cache like ``Tensor.copy_``). Raises ``StateFormatError`` for a file that is not a valid model state and
        ``StateCompatibilityError`` for a mismatch.
        """
        return cast(MambaModelState, read_state_file(path, device=device, model=model, strict=strict, expect="model"))


# ---------------------------------------------------------------------------------------------- files
# The containers as files of mamba_state.state.format: the bodies of the save()/load() methods above and of
# mamba_state.state.io's public functions.
def write_state_file(state: MambaInferenceState | MambaModelState, path: str | os.PathLike, model: Any = None,
                     metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``state`` to ``path`` (see :func:`mamba_state.state.io.save_state`)."""
    where = os.fspath(path)
    check_save_path(where)  # before serialising: a bad path is an argument error, not a failed write
    if isinstance(state, MambaModelState):
        data = serialize("model", [(i, s.kind, s.tensors) for i, s in state.items()],
                         seqlen_offset=state.seqlen_offset, metadata=state.metadata, model=model)
    elif isinstance(state, MambaInferenceState):
        data = serialize("layer", [(None, state.kind, state.tensors)], seqlen_offset=0,
                         metadata=metadata or {}, model=model)
    else:
        raise StateError(f"state: expected a MambaInferenceState or MambaModelState, found {type(state).__name__}")
    atomic_write(where, data)


_WRONG_CONTAINER = {
    "layer": "expected a single-layer state, found a model state (use MambaModelState.load)",
    "model": "expected a model state, found a single-layer state (use MambaInferenceState.load)",
}


def read_state_file(path: str | os.PathLike, device: torch.device | str | None = None, model: Any = None,
                    strict: bool = True, expect: str | None = None) -> MambaInferenceState | MambaModelState:
    """Read a state file (see :func:`mamba_state.state.io.load_state`); ``expect`` (``"model"`` or ``"layer"``)
    refuses the other container."""
    parts = read_state(path, device)
    try:
        built: dict[int | None, MambaInferenceState] = {}
        for idx, tensors in parts.named_layers():
            built[idx] = MambaInferenceState.from_tensors(tensors)
        if parts.container == "layer":
            state: MambaInferenceState | MambaModelState = built[None]
        else:
            by_idx = {idx: s for idx, s in built.items() if idx is not None}
            state = MambaModelState(by_idx, seqlen_offset=parts.seqlen_offset, metadata=parts.metadata)
    except StateFormatError:
        raise
    except BUILD_ERRORS as exc:
        raise inconsistent(parts.where, exc) from None
    if model is not None:
        parts.check_model(state.layout() if isinstance(state, MambaModelState) else {}, model, strict)
    if expect is not None and parts.container != expect:
        raise StateFormatError(f"{parts.where}: {_WRONG_CONTAINER[expect]}")
    return state


# torch.load(..., weights_only=True) may rebuild the containers (their constructors validate): registered with the
# module itself, so any import of the containers (ms.MambaModelState, mamba_state.state, a loaded file) covers it.
torch.serialization.add_safe_globals([MambaInferenceState, MambaModelState])
