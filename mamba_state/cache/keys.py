"""Cache keys: token ids checked and hashed, a model's fingerprint, session names.

A prefix entry's key is ``sha256(fingerprint || 0x00 || ids as little-endian int64)``, so that one pass of an
incremental hash over a prompt gives the keys of all its prefixes (:func:`prefix_digests`). A session's key is
``sha256(fingerprint || 0x01 || session id)``. The fingerprint (:func:`model_fingerprint`) covers the model's
layer layout, its configuration and every weight's bytes: two checkpoints of one architecture differ, so a state
never meets another model.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..errors import StateError, StateShapeError

__all__ = ["token_array", "prefix_key", "prefix_digests", "session_key", "check_session_id", "model_fingerprint",
           "check_fingerprint", "SESSION_ID_PATTERN"]

SESSION_ID_PATTERN = r"[A-Za-z0-9_.:\-]{1,128}"
_SESSION = re.compile(SESSION_ID_PATTERN)
_FINGERPRINT = re.compile(r"[0-9A-Za-z_.:\-]{1,128}")


def token_array(ids: Any, where: str = "token_ids") -> np.ndarray:
    """``ids`` as a 1-D little-endian int64 numpy array (a copy).

    Accepts a 1-D integer tensor (or ``[1, L]``), a numpy integer array or a sequence of Python ints; ids must be
    non-negative. Raises :class:`~mamba_state.errors.StateShapeError` / ``StateError`` naming what was found.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise StateError(f"{where}: expected integer token ids, found a {ids.dtype} tensor")
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise StateShapeError(f"{where}: expected a 1-D tensor of token ids (or [1, L]), found shape "
                                  f"{list(ids.shape)}")
        arr = ids.detach().to("cpu", torch.int64).numpy().astype("<i8", copy=True)
    elif isinstance(ids, np.ndarray):
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise StateShapeError(f"{where}: expected a 1-D integer array, found {ids.dtype} shape {list(ids.shape)}")
        arr = ids.astype("<i8", copy=True)
    elif isinstance(ids, (list, tuple)):
        types = set(map(type, ids))  # one pass in C: a prompt of thousands of ids is checked in microseconds
        if not all(t is int or (issubclass(t, np.integer) and t is not np.bool_) for t in types):
            bad = next(i for i in ids if not (type(i) is int or isinstance(i, np.integer)))
            raise StateError(f"{where}: expected a sequence of ints, found an element {bad!r}")
        try:
            arr = np.asarray(ids, dtype="<i8").reshape(-1)
        except OverflowError:
            raise StateError(f"{where}: expected ids that fit int64, found larger ones") from None
    else:
        raise StateError(f"{where}: expected a 1-D integer tensor or a sequence of ints, found {type(ids).__name__}")
    if arr.size and int(arr.min()) < 0:
        raise StateError(f"{where}: expected non-negative token ids, found {int(arr.min())}")
    return arr


def check_fingerprint(fingerprint: Any) -> str:
    """``fingerprint`` when it is a short printable name (1 to 128 of ``[0-9A-Za-z_.:-]``)."""
    if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
        raise StateError(f"fingerprint: expected 1 to 128 characters of [0-9A-Za-z_.:-], found {fingerprint!r:.80}")
    return fingerprint


def check_session_id(session_id: Any) -> str:
    """``session_id`` when it is 1 to 128 characters of ``[A-Za-z0-9_.:-]``."""
    if not isinstance(session_id, str) or not _SESSION.fullmatch(session_id):
        raise StateError(f"session_id: expected 1 to 128 characters of [A-Za-z0-9_.:-], found {session_id!r:.80}")
    return session_id


def prefix_key(fingerprint: str, ids: np.ndarray) -> str:
    """The hex key of the prefix entry for ``ids`` (int64 ``[L]``) under ``fingerprint``."""
    h = hashlib.sha256(fingerprint.encode() + b"\x00")
    h.update(ids.astype("<i8", copy=False).tobytes())
    return h.hexdigest()


def prefix_digests(fingerprint: str, ids: np.ndarray, lengths: Iterable[int]) -> dict[int, str]:
    """``{L: prefix_key(fingerprint, ids[:L])}`` for every ``L`` of ``lengths`` (<= ``len(ids)``), in one pass."""
    data = ids.astype("<i8", copy=False).tobytes()
    h = hashlib.sha256(fingerprint.encode() + b"\x00")
    out: dict[int, str] = {}
    done = 0
    for n in sorted(set(lengths)):
        if n > ids.size:
            break
        h.update(data[done * 8:n * 8])
        done = n
        out[n] = h.copy().hexdigest()
    return out


def session_key(fingerprint: str, session_id: str) -> str:
    """The hex key of a session entry."""
    return hashlib.sha256(fingerprint.encode() + b"\x01" + session_id.encode()).hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8).cpu().numpy().tobytes() if t.numel() else b""


def model_fingerprint(model: Any, extra: Sequence[str] = ()) -> str:
    """A 32-hex-digit digest of ``model``: its Mamba layer layout, its ``config`` (when it has one) and every
    parameter and buffer (names, dtypes, shapes, bytes).

    Two models get the same fingerprint only when they compute the same function from the same states, so a
    cache keyed by it never serves a state to another model (a fine-tune, another dtype, other weights). Costs one
    read of the weights (host copies of CUDA tensors); compute it once per model. ``extra``: strings mixed in
    (e.g. a backend name).
    """
    if not isinstance(model, torch.nn.Module):
        raise StateError(f"model: expected a torch.nn.Module (e.g. a StatefulMambaLM), found {type(model).__name__}")
    from ..state.layers import model_layout

    h = hashlib.sha256(b"mamba-state cache fingerprint v1\x00")
    try:
        layout = model_layout(model)
    except StateError:
        layout = {}
    h.update(json.dumps({str(k): v for k, v in layout.items()}, sort_keys=True).encode())
    config = getattr(model, "config", None)
    if isinstance(config, dict):
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict(keep_vars=False).items()):
        h.update(f"\x00{name}\x00{t.dtype}\x00{list(t.shape)}\x00".encode())
        h.update(_tensor_bytes(t))
    for s in extra:
        h.update(b"\x00" + str(s).encode())
    return h.hexdigest()[:32]
