"""Validation of ``cu_seqlens``, the packed variable-length convention (flash-attention's and
flash-linear-attention's): sequences packed one after another along the time axis of a batch of one, sequence
``i`` occupying positions ``cu_seqlens[i] : cu_seqlens[i + 1]``. Shared by every op that takes ``cu_seqlens``
(selective scan, causal conv1d, SSD) so that they refuse the same inputs with the same words.
"""

from __future__ import annotations

import torch

from mamba_state.errors import StateError, StateShapeError

__all__ = ["check_cu_seqlens", "cu_seqlens_bounds"]

_INDEX_DTYPES = (torch.int32, torch.int64)


def check_cu_seqlens(cu_seqlens: torch.Tensor, total_len: int, batch: int, name: str = "cu_seqlens") -> int:
    """Check packed-sequence boundaries and return the number of sequences.

    Args:
        cu_seqlens: int32 or int64 [num_seqs + 1] (num_seqs >= 1): starts at 0, non-decreasing, ends at
            ``total_len``; sequences of length 0 are allowed (equal neighbours).
        total_len: the length of the packed time axis of the inputs.
        batch: the batch size of the inputs; packed inputs have a batch of 1.
        name: the argument's name in messages.

    Returns:
        num_seqs (``cu_seqlens.numel() - 1``).

    Raises:
        StateShapeError: not a 1-D tensor of at least two entries, a floating/bool dtype, batch != 1, or values
            that do not start at 0, decrease, or do not end at ``total_len``. Nothing is modified.

    Reading the values costs one device-to-host copy of num_seqs + 1 integers (a synchronisation on CUDA).
    """
    return len(cu_seqlens_bounds(cu_seqlens, total_len, batch, name)) - 1


def cu_seqlens_bounds(cu_seqlens: torch.Tensor, total_len: int, batch: int, name: str = "cu_seqlens") -> list[int]:
    """:func:`check_cu_seqlens`'s checks, returning the checked values as a host list (for callers that need
    the boundaries themselves: one read of the tensor serves both)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise StateShapeError(f"{name}: expected an int32 tensor [num_seqs + 1], found {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in _INDEX_DTYPES:
        raise StateShapeError(f"{name}: expected dtype int32 (or int64), found {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise StateShapeError(f"{name}: expected a 1-D tensor [num_seqs + 1] with num_seqs >= 1, found shape "
                              f"{list(cu_seqlens.shape)}")
    if batch != 1:
        raise StateShapeError(f"{name}: expected packed inputs with batch 1, found batch {batch}")
    if total_len < 0:
        raise StateError(f"{name}: expected a total length >= 0, found {total_len}")
    c = cu_seqlens.detach().cpu().tolist()  # one host copy; the checks below run on the list (65 entries: ~10 us)
    if c[0] != 0:
        raise StateShapeError(f"{name}: expected the first entry 0, found {c[0]}")
    for i in range(len(c) - 1):
        if c[i + 1] < c[i]:
            raise StateShapeError(f"{name}: expected non-decreasing entries, found {name}[{i}] = {c[i]} > "
                                  f"{name}[{i + 1}] = {c[i + 1]}")
    if c[-1] != total_len:
        raise StateShapeError(f"{name}: expected the last entry to equal the packed length {total_len}, found "
                              f"{c[-1]}")
    return c
