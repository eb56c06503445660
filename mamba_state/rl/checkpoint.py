"""PPO checkpoints on disk: one ``torch.save`` file written atomically, read back with ``weights_only=True``.

A checkpoint holds :meth:`PPOTrainer.state_dict` (model, optimizer, trainer and environment generators, torch's
global RNG, environment state, the carried recurrent state and the last observation) plus a JSON-like ``run``
dict (the command-line options). Data-parallel runs write the trainer state in the world-size-independent form
of :mod:`mamba_state.rl.shard` and add a ``world`` dict (world size, environments per rank, every rank's generator
states). Only tensors, numbers, strings, lists and dicts: loading executes no code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import StateFormatError
from ..state.files import open_temp_beside, replace_keeping_mode

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(path: str | os.PathLike, trainer: Any, run: dict[str, Any] | None = None,
                    world: dict[str, Any] | None = None) -> Path:
    """Write ``trainer.state_dict()`` (or ``trainer`` itself if it is already such a dict), ``run`` and, when
    given, ``world`` to ``path`` (temporary file, then rename: all or nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = trainer if isinstance(trainer, dict) else trainer.state_dict()
    payload = {"trainer": state, "run": dict(run or {})}
    if world is not None:
        payload["world"] = world
    fd, tmp = open_temp_beside(path, prefix=path.name + ".")  # the umask's permissions, not mkstemp's 0o600
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        replace_keeping_mode(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``{"trainer": ..., "run": ...}`` (tensors on CPU)."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # truncated file, pickle with code, not a torch file
        raise StateFormatError(f"checkpoint {path}: expected a mamba-state PPO checkpoint, found an unreadable "
                               f"file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or "trainer" not in payload or "run" not in payload:
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise StateFormatError(f"checkpoint {path}: expected keys ['run', 'trainer'], found {found}")
    return payload
