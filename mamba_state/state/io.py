"""Persistence: the public functions that write and read states as files.

The file format (safetensors with JSON metadata, written atomically, validated on load) is described and
implemented in :mod:`mamba_state.state.format`; the containers' ``save`` / ``load`` methods and these functions
share its glue to the containers (:mod:`mamba_state.state.containers`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, cast

import torch

from ..errors import StateError
from .containers import MambaInferenceState, MambaModelState, read_state_file, write_state_file
from .format import (FORMAT_NAME, FORMAT_VERSION, MAX_HEADER_BYTES, MAX_JSON_CONTAINERS, MAX_JSON_DEPTH, MAX_LAYERS,
                     StateFileAccessError, StateFileNotFoundError, StateWriteError)
from .format import _digest, read_metadata  # noqa: F401  (public here: read_metadata; the tests reach _digest)

__all__ = ["save_state", "load_state", "save_model_state", "load_model_state", "StateFileNotFoundError",
           "StateFileAccessError", "StateWriteError", "FORMAT_NAME", "FORMAT_VERSION", "MAX_HEADER_BYTES",
           "MAX_JSON_DEPTH", "MAX_JSON_CONTAINERS", "MAX_LAYERS"]


def save_state(state: MambaInferenceState | MambaModelState, path: str | os.PathLike, model: Any = None,
               metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same directory, fsync, rename).

    ``model`` (optional, an upstream or wrapped model) records its layer layout and fingerprint so that
    ``load(..., model=...)`` can check compatibility: layer indices, kinds and state shapes only, not the weights
    (record a model name or revision in the metadata to tell checkpoints of one architecture apart). ``metadata``
    is user data for a single-layer state (a model state carries its own ``.metadata``). Tensors are written in
    their own dtypes. An existing file is replaced only when writing succeeded, and keeps its permission bits; a
    new file gets those of the umask (``0o666 & ~umask``, as ``open(path, "wb")`` gives). ``path`` must name a
    file in an existing directory; a directory raises ``StateError`` (nothing is written). A symlink is followed
    (its target is written, the link kept); temporary files of a killed save to the same path are removed; a
    failed write (a full disk) raises ``StateWriteError`` naming the cause, the old file unchanged. Metadata
    beyond the reader's limits (``MAX_JSON_DEPTH``, ``MAX_HEADER_BYTES``) is refused here, so a file that saves
    loads.
    """
    write_state_file(state, path, model=model, metadata=metadata)


def save_model_state(state: MambaModelState, path: str | os.PathLike, model: Any = None) -> None:
    """Save a :class:`MambaModelState` (same as ``state.save(path)``)."""
    if not isinstance(state, MambaModelState):
        raise StateError(f"state: expected a MambaModelState, found {type(state).__name__}")
    save_state(state, path, model=model)


def load_state(path: str | os.PathLike, device: torch.device | str | None = None, model: Any = None,
               strict: bool = True) -> MambaInferenceState | MambaModelState:
    """Read a state file written by :func:`save_state`; validates everything before returning.

    ``device=None`` restores each layer to the device it was saved from when this process has it (else CPU,
    with a warning). Tensors come back in the dtypes they were saved in, bit for bit (there is no ``dtype``
    argument: convert with ``state.to(dtype=...)``). ``model``: check that the state fits it (``strict``: the same
    Mamba layers and, when one was recorded, the same layout fingerprint; otherwise a subset), naming the first
    mismatch. The check covers layer indices, kinds and state shapes, not the weights or dtypes: a state saved
    in one dtype loads against a model of another and keeps its own. A ``device`` that is not a device, or not
    available here (``"cuda"`` without CUDA), raises ``StateError`` before the file is read. The file must be a
    regular file (a FIFO or a device is refused without reading it); every other failure is a
    ``StateFormatError`` naming the file (``StateFileNotFoundError``, ``StateFileAccessError`` for OS errors).
    """
    return read_state_file(path, device=device, model=model, strict=strict)


def load_model_state(path: str | os.PathLike, device: torch.device | str | None = None, model: Any = None,
                     strict: bool = True) -> MambaModelState:
    """Read a :class:`MambaModelState` (same as ``MambaModelState.load``)."""
    return cast(MambaModelState, read_state_file(path, device=device, model=model, strict=strict, expect="model"))
