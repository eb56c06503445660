"""The directory tier: one state file per cache entry, written and read through the library's state format.

Every entry is ``<directory>/<key>.safetensors``, a model state file (:mod:`mamba_state.state.format`: written
atomically with a SHA-256 checksum over header and data, read back through the validating front, never
unpickled). The entry's identity lives in the state's metadata under :data:`RECORD`::

    {"version": 1, "fingerprint": str, "kind": "prefix" | "session", "key": hex,
     "tokens": [int, ...] (prefix), "session": str (session), "extra": {...} (JSON)}

A file whose checksum fails, whose record is malformed, or whose record does not hash to its own file name is
*corrupted*: :func:`quarantine` renames it to ``<name>.corrupt`` (kept for inspection, never indexed again).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import StateError, StateFormatError
from ..state import MambaModelState
from ..state.io import read_metadata
from .keys import check_session_id, prefix_key, session_key

__all__ = ["RECORD", "DiskRecord", "entry_path", "write_entry", "read_record", "load_entry", "quarantine",
           "list_entries"]

RECORD = "mamba_state.cache"
SUFFIX = ".safetensors"


@dataclass
class DiskRecord:
    """What a cache file says about itself (checked against its file name)."""

    key: str
    fingerprint: str
    kind: str
    tokens: np.ndarray | None
    session: str | None
    extra: dict[str, Any]
    seqlen_offset: int


def entry_path(directory: str, key: str) -> str:
    return os.path.join(directory, key + SUFFIX)


def list_entries(directory: str) -> list[str]:
    """Paths of the cache files in ``directory``, oldest modification first."""
    names = [n for n in os.listdir(directory) if n.endswith(SUFFIX) and not n.startswith(".")]
    paths = [os.path.join(directory, n) for n in names]
    stamped = []
    for p in paths:
        try:
            stamped.append((os.stat(p).st_mtime_ns, p))
        except OSError:
            continue
    return [p for _, p in sorted(stamped)]


def write_entry(path: str, state: MambaModelState, record: dict[str, Any]) -> int:
    """Write ``state`` (batch 1) with ``record`` as its cache metadata, atomically; returns the file's size."""
    MambaModelState(dict(state.items()), seqlen_offset=state.seqlen_offset, metadata={RECORD: record}).save(path)
    return os.path.getsize(path)


def _parse(path: str, meta: Any, seqlen_offset: int) -> DiskRecord:
    """The record of ``meta`` (a file's user metadata), checked; raises StateFormatError naming what is wrong."""
    where = os.path.basename(path)
    rec = meta.get(RECORD) if isinstance(meta, dict) else None
    if not isinstance(rec, dict) or rec.get("version") != 1:
        raise StateFormatError(f"{where}: expected a {RECORD} record of version 1 in the metadata, found "
                               f"{type(rec).__name__ if not isinstance(rec, dict) else rec.get('version')!r}")
    fp, kind, key = rec.get("fingerprint"), rec.get("kind"), rec.get("key")
    if not isinstance(fp, str) or kind not in ("prefix", "session") or not isinstance(key, str):
        raise StateFormatError(f"{where}: expected fingerprint, kind (prefix|session) and key in the record, "
                               f"found {fp!r:.40}, {kind!r:.20}, {key!r:.70}")
    extra = rec.get("extra", {})
    if not isinstance(extra, dict):
        raise StateFormatError(f"{where}: expected a dict for extra, found {type(extra).__name__}")
    tokens = None
    session = None
    if kind == "prefix":
        raw = rec.get("tokens")
        if not isinstance(raw, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**63
                                                for t in raw):
            raise StateFormatError(f"{where}: expected tokens as a list of non-negative ints, found {raw!r:.60}")
        tokens = np.asarray(raw, dtype="<i8").reshape(-1)
        expect = prefix_key(fp, tokens)
        if seqlen_offset != tokens.size:
            raise StateFormatError(f"{where}: expected seqlen_offset {tokens.size} (the number of tokens), found "
                                   f"{seqlen_offset}")
    else:
        try:
            session = check_session_id(rec.get("session"))
        except StateError as exc:
            raise StateFormatError(f"{where}: {exc}") from None
        expect = session_key(fp, session)
    if key != expect or os.path.basename(path) != expect + SUFFIX:
        raise StateFormatError(f"{where}: expected the record to hash to the file name, found key {key[:16]}... "
                               f"for contents hashing to {expect[:16]}...")
    return DiskRecord(key, fp, kind, tokens, session, dict(extra), seqlen_offset)


def read_record(path: str) -> DiskRecord:
    """The checked record of a cache file (the whole file is validated, checksum included, no tensors built)."""
    meta = read_metadata(path)
    offset = meta.get("seqlen_offset")
    return _parse(path, meta.get("user_metadata"), int(offset) if isinstance(offset, (int, str)) else -1)


def load_entry(path: str, device: torch.device | str | None) -> tuple[MambaModelState, DiskRecord]:
    """The state of a cache file on ``device`` and its record, both checked; the state's metadata is cleared."""
    state = MambaModelState.load(path, device=device)
    record = _parse(path, state.metadata, state.seqlen_offset)
    if state.batch_size != 1:
        raise StateFormatError(f"{os.path.basename(path)}: expected a batch of 1, found {state.batch_size}")
    return MambaModelState(dict(state.items()), seqlen_offset=state.seqlen_offset), record


def quarantine(path: str) -> str | None:
    """Move a corrupted file aside (``<path>.corrupt``); returns the new path, or None if it could not be moved
    (then it is removed; failing that, left, but never indexed)."""
    target = path + ".corrupt"
    try:
        os.replace(path, target)
        return target
    except OSError:
        try:
            os.unlink(path)
        except OSError:
            pass
        return None
