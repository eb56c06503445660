"""``StateCache``: model states keyed by token prefixes (and by session ids), in tiers with byte budgets.

Tiers, fastest first:

* ``device``: states held as tensors on the cache's device (a GPU in a server; the CPU elsewhere);
* ``host``: states parked in host memory, pinned when CUDA is there (:func:`mamba_state.state.offload.offload_state`:
  one pinned buffer per state, copied on a side stream);
* ``disk`` (optional, ``directory=``): one safetensors state file per entry (:mod:`mamba_state.cache.disk`),
  written through on insert, so that entries survive a restart of the process.

An insert goes to the fastest tier whose budget can hold it. When a tier is over its budget, its least recently
used entries move down: device -> host; an entry that is also on disk just leaves memory; one that is nowhere else
is evicted. The disk tier deletes its least recently used files. A hit refreshes the entry's recency; a hit on
disk brings the entry back into memory.

Every entry belongs to one model fingerprint (:func:`~mamba_state.cache.keys.model_fingerprint`). A lookup sees
only its own fingerprint's entries, and compares the stored token ids with the query (not only their hash).

A disk file that fails its checks (checksum, record, its name) is never served: it is moved aside
(``<name>.corrupt``), counted in ``stats()["corrupted"]``, listed in :attr:`StateCache.problems` and reported
with a :class:`CacheCorruptionWarning`; the lookup goes on with the next shorter prefix.

All methods are thread-safe (one lock; disk reads and writes happen under it, so keep the disk tier on a local
disk).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, cast

import numpy as np
import torch

from ..errors import StateError, StateFormatError, StateShapeError
from ..state import MambaModelState
from ..state.offload import OffloadHandle, offload_state, restore_state
from . import disk
from .keys import (check_fingerprint, check_session_id, model_fingerprint, prefix_digests, prefix_key, session_key,
                   token_array)

__all__ = ["StateCache", "CacheCorruptionWarning", "DEFAULT_DEVICE_BYTES", "DEFAULT_HOST_BYTES"]

DEFAULT_DEVICE_BYTES = 1 << 30
DEFAULT_HOST_BYTES = 4 << 30
_TIERS = ("device", "host", "disk")


class CacheCorruptionWarning(UserWarning):
    """A disk entry of a :class:`StateCache` failed its checks and was dropped (moved to ``<name>.corrupt``)."""


@dataclass(eq=False)
class _Entry:
    key: str
    kind: str  # "prefix" | "session"
    fingerprint: str
    nbytes: int
    seqlen_offset: int
    tokens: np.ndarray | None = None
    session: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    tier: str | None = None  # memory residence: "device" | "host" | None
    state: MambaModelState | None = None  # device tier
    handle: OffloadHandle | None = None  # host tier
    source_device: torch.device | None = None
    path: str | None = None  # on disk
    disk_bytes: int = 0

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"version": 1, "fingerprint": self.fingerprint, "kind": self.kind, "key": self.key,
                               "extra": self.extra}
        if self.kind == "prefix":
            assert self.tokens is not None
            rec["tokens"] = [int(t) for t in self.tokens]
        else:
            rec["session"] = self.session
        return rec


def _budget(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise StateError(f"{name}: expected a non-negative int (bytes) or None (no limit), found {value!r}")
    return value


def _check_state(state: Any, where: str) -> MambaModelState:
    if not isinstance(state, MambaModelState):
        raise StateError(f"{where}: expected a MambaModelState, found {type(state).__name__}")
    if state.batch_size != 1:
        raise StateShapeError(f"{where}: expected a state of batch size 1 (one sequence), found batch size "
                              f"{state.batch_size} (take a row with state.select(i))")
    state.device  # noqa: B018  (raises StateError for a state spread over devices)
    return state


class StateCache:
    """Model states by token prefix and by session id, with LRU tiers bounded in bytes.

    Args:
        model: the model the states belong to (its :func:`model_fingerprint` keys every entry); or give
            ``fingerprint`` directly. Neither: the fingerprint ``"default"`` (then never share the cache, or its
            directory, between models).
        fingerprint: a string of ``[0-9A-Za-z_.:-]`` (1-128 chars) instead of ``model``.
        device_bytes: budget of the device tier (None: unbounded; 0: tier off).
        host_bytes: budget of the host tier (None: unbounded; 0: tier off).
        directory: the disk tier's directory (created if missing); None: no disk tier.
        disk_bytes: budget of the disk tier, in file bytes (None: unbounded).
        device: where the device tier keeps states (default: the device of each inserted state).

    ``lookup`` returns copies, so callers may update them in place; ``insert`` stores a copy.
    """

    def __init__(self, model: Any = None, *, fingerprint: str | None = None,
                 device_bytes: int | None = DEFAULT_DEVICE_BYTES, host_bytes: int | None = DEFAULT_HOST_BYTES,
                 directory: str | os.PathLike | None = None, disk_bytes: int | None = None,
                 device: torch.device | str | None = None):
        if model is not None and fingerprint is not None:
            raise StateError("StateCache: expected model= or fingerprint=, found both")
        self.fingerprint = (check_fingerprint(fingerprint) if fingerprint is not None
                            else model_fingerprint(model) if model is not None else "default")
        self.budgets: dict[str, int | None] = {"device": _budget("device_bytes", device_bytes),
                                               "host": _budget("host_bytes", host_bytes),
                                               "disk": _budget("disk_bytes", disk_bytes)}
        try:
            self.device = torch.device(device) if device is not None else None
        except (RuntimeError, TypeError) as exc:
            raise StateError(f"device: expected a torch device, found {device!r} ({exc})") from None
        self.directory: str | None = None
        if directory is not None:
            self.directory = os.path.abspath(os.fspath(directory))
            if os.path.exists(self.directory) and not os.path.isdir(self.directory):
                raise StateError(f"directory: expected a directory, found a file at {self.directory!r}")
            os.makedirs(self.directory, exist_ok=True)
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._lru: dict[str, OrderedDict[str, _Entry]] = {t: OrderedDict() for t in _TIERS}
        self._bytes: dict[str, int] = dict.fromkeys(_TIERS, 0)
        self._lengths: Counter[int] = Counter()  # lengths of this fingerprint's prefix entries
        self._counts: Counter[str] = Counter()
        self.problems: list[tuple[str, str]] = []  # (path, reason) of dropped disk entries
        if self.directory is not None:
            self._scan()

    # ------------------------------------------------------------------ public API
    def insert(self, token_ids: Any, state: MambaModelState, extra: Mapping[str, Any] | None = None) -> None:
        """Cache ``state`` as the state after ``token_ids`` (1-D ints, at least one).

        ``state``: a :class:`MambaModelState` of batch size 1 whose ``seqlen_offset`` equals ``len(token_ids)``
        (it consumed exactly those tokens from a zero state). An entry for the same ids is replaced.
        """
        ids = token_array(token_ids)
        if ids.size == 0:
            raise StateShapeError("token_ids: expected at least one token, found none")
        state = _check_state(state, "insert")
        if state.seqlen_offset != ids.size:
            raise StateError(f"insert: expected state.seqlen_offset == len(token_ids) = {ids.size} (the state after "
                             f"exactly these tokens), found seqlen_offset {state.seqlen_offset}")
        if self.directory is None and self.budgets["device"] == 0 and self.budgets["host"] == 0:
            with self._lock:  # every tier off: nothing is kept (no entry built, no bytes counted)
                self._kept_nowhere(prefix_key(self.fingerprint, ids))
                self._counts["insertions"] += 1
            return
        key = prefix_key(self.fingerprint, ids)
        entry = _Entry(key, "prefix", self.fingerprint, state.nbytes, state.seqlen_offset, tokens=ids,
                       extra=dict(extra or {}))
        with self._lock:
            self._put(entry, state)
            self._counts["insertions"] += 1

    def lookup(self, token_ids: Any, device: torch.device | str | None = None
               ) -> tuple[int, MambaModelState | None]:
        """``(matched_len, state)``: the longest cached prefix of ``token_ids`` and a copy of its state (on
        ``device``, default the device it was inserted from), or ``(0, None)``. A whole-length match counts."""
        ids = token_array(token_ids)
        with self._lock:
            lengths = [n for n in self._lengths if n <= ids.size]
            digests = prefix_digests(self.fingerprint, ids, lengths)
            for n in sorted(digests, reverse=True):
                entry = self._entries.get(digests[n])
                if entry is None or entry.tokens is None or not np.array_equal(entry.tokens, ids[:n]):
                    continue
                state = self._fetch(entry, device)
                if state is None:  # corrupted on disk: dropped, try the next shorter prefix
                    continue
                self._counts["hits"] += 1
                self._counts["hit_tokens"] += n
                return n, state
            self._counts["misses"] += 1
            return 0, None

    def put_session(self, session_id: str, state: MambaModelState, extra: Mapping[str, Any] | None = None
                    ) -> None:
        """Park a session's state (batch 1) with JSON ``extra`` (e.g. the token not yet fed); replaces any
        earlier one of that id."""
        sid = check_session_id(session_id)
        state = _check_state(state, "put_session")
        entry = _Entry(session_key(self.fingerprint, sid), "session", self.fingerprint, state.nbytes,
                       state.seqlen_offset, session=sid, extra=dict(extra or {}))
        with self._lock:
            self._put(entry, state)
            self._counts["sessions_parked"] += 1

    def get_session(self, session_id: str, device: torch.device | str | None = None
                    ) -> tuple[MambaModelState, dict[str, Any]] | None:
        """``(state copy, extra)`` of a parked session, or None when there is none (or it was evicted)."""
        sid = check_session_id(session_id)
        with self._lock:
            entry = self._entries.get(session_key(self.fingerprint, sid))
            if entry is None or entry.session != sid:
                self._counts["session_misses"] += 1
                return None
            state = self._fetch(entry, device)
            if state is None:
                self._counts["session_misses"] += 1
                return None
            self._counts["session_hits"] += 1
            return state, dict(entry.extra)

    def drop_session(self, session_id: str) -> bool:
        """Forget a session (memory and disk); True when there was one."""
        sid = check_session_id(session_id)
        with self._lock:
            entry = self._entries.get(session_key(self.fingerprint, sid))
            if entry is None:
                return False
            self._remove(entry, delete_file=True)
            return True

    def fill(self, lm: Any, token_ids: Any, *, state: MambaModelState | None = None, start: int = 0,
             every: int | None = None, positions: Sequence[int] = (), insert_end: bool = True,
             num_last_tokens: int = 0) -> tuple[torch.Tensor, MambaModelState]:
        """Run ``lm`` over ``token_ids[start:]`` from ``state`` (the state after ``token_ids[:start]``; None:
        zeros, with ``start`` 0) in one forward, inserting the states at the chosen absolute positions.

        Positions: every multiple of ``every`` in ``(start, L]``, the ``positions`` given (in ``(start, L]``) and
        ``L`` itself when ``insert_end``; taken from that one forward with ``return_states_at``. Returns
        ``(logits [1, L - start, vocab], final_state)`` (the last ``num_last_tokens`` positions' logits only, when
        it is > 0).
        """
        ids = token_array(token_ids)
        n = ids.size
        if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < n:
            raise StateError(f"start: expected an int in [0, {n}) (tokens already in state), found {start!r}")
        if (state is None) != (start == 0):
            raise StateError(f"fill: expected state=None with start=0, or a state with start > 0, found "
                             f"state={'None' if state is None else 'given'}, start={start}")
        if state is not None and state.seqlen_offset != start:
            raise StateError(f"fill: expected state.seqlen_offset == start = {start}, found {state.seqlen_offset}")
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise StateError(f"every: expected None or an int >= 1, found {every!r}")
        wanted = {int(p) for p in positions}
        if any(not start < p <= n for p in wanted):
            raise StateError(f"positions: expected ints in ({start}, {n}], found {sorted(wanted)}")
        if every:
            wanted.update(range((start // every + 1) * every, n + 1, every))
        if insert_end:
            wanted.add(n)
        at = sorted(p - start for p in wanted)
        device = next(lm.parameters()).device
        x = torch.as_tensor(ids[start:], device=device)[None]
        with torch.no_grad():
            if at:
                logits, final, states = lm(x, state, return_states_at=at, num_last_tokens=num_last_tokens)
            else:
                logits, final = lm(x, state, num_last_tokens=num_last_tokens)
                states = []
        for p, s in zip(at, states):
            self.insert(ids[:start + p], MambaModelState(dict(s.items()), seqlen_offset=start + p))
        return logits, final

    def stats(self) -> dict[str, Any]:
        """Counters and sizes: ``hits``, ``misses``, ``hit_tokens``, ``insertions``, ``evictions``,
        ``demotions``, ``corrupted``, ``disk_errors``, session counters, ``entries`` and ``bytes`` per tier and
        the budgets."""
        with self._lock:
            out: dict[str, Any] = {k: self._counts.get(k, 0) for k in
                                   ("hits", "misses", "hit_tokens", "insertions", "evictions", "demotions",
                                    "corrupted", "disk_errors", "sessions_parked", "session_hits", "session_misses")}
            out["entries"] = {t: len(self._lru[t]) for t in _TIERS}
            out["bytes"] = dict(self._bytes)
            out["budgets"] = dict(self.budgets)
            out["total_entries"] = len(self._entries)
            return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, token_ids: Any) -> bool:
        ids = token_array(token_ids)
        with self._lock:
            e = self._entries.get(prefix_key(self.fingerprint, ids))
            return e is not None and e.tokens is not None and np.array_equal(e.tokens, ids)

    def clear(self, disk: bool = False) -> None:
        """Drop every entry from memory (and delete the files too when ``disk``)."""
        with self._lock:
            for e in list(self._entries.values()):
                if disk or e.path is None:
                    self._remove(e, delete_file=disk)
                else:
                    self._leave_memory(e)

    def __repr__(self) -> str:
        s = self.stats()
        return (f"StateCache(fingerprint={self.fingerprint[:12]}, entries={s['entries']}, bytes={s['bytes']}, "
                f"hits={s['hits']}, misses={s['misses']})")

    # ------------------------------------------------------------------ internals (called with the lock held)
    def _target_device(self, state: MambaModelState) -> torch.device:
        return self.device if self.device is not None else state.device

    def _kept_nowhere(self, key: str) -> None:
        """A state for ``key`` that no tier can hold: the older entry of that key goes, and it counts as an
        eviction (the caller holds the lock)."""
        old = self._entries.get(key)
        if old is not None:
            self._remove(old, delete_file=False)
        self._counts["evictions"] += 1

    def _put(self, entry: _Entry, state: MambaModelState) -> None:
        if self.directory is None and self._memory_tier(entry.nbytes) is None:
            # fits nowhere: not kept, counted as below, without copying it first
            self._kept_nowhere(entry.key)
            return
        old = self._entries.get(entry.key)
        if old is not None:
            self._remove(old, delete_file=False)
        entry.source_device = state.device
        self._entries[entry.key] = entry
        if entry.kind == "prefix":
            self._lengths[entry.seqlen_offset] += 1
        if self.directory is not None:
            self._write(entry, state)
        self._place(entry, state.detach(), copy=True)
        if entry.tier is None and entry.path is None:  # fits nowhere
            self._remove(entry, delete_file=False)
            self._counts["evictions"] += 1

    def _fits(self, tier: str, nbytes: int) -> bool:
        budget = self.budgets[tier]
        return budget is None or nbytes <= budget

    def _memory_tier(self, nbytes: int) -> str | None:
        """The fastest memory tier that can hold ``nbytes`` (evicting there as needed), or None."""
        return next((t for t in ("device", "host") if self._fits(t, nbytes) and self.budgets[t] != 0), None)

    def _place(self, entry: _Entry, state: MambaModelState, copy: bool) -> None:
        """Put ``entry`` into the fastest memory tier that can hold it (evicting there as needed)."""
        tier = self._memory_tier(entry.nbytes)
        if tier == "device":
            target = self._target_device(state)
            entry.state = state.to(target, copy=True) if copy or state.device != target else state
            entry.state = MambaModelState(dict(entry.state.items()), seqlen_offset=entry.seqlen_offset)
            self._enter(entry, "device", entry.nbytes)
        elif tier == "host":
            self._park_host(entry, state)

    def _park_host(self, entry: _Entry, state: MambaModelState) -> None:
        clean = MambaModelState(dict(state.items()), seqlen_offset=entry.seqlen_offset)
        entry.handle = offload_state(clean)  # a copy (pinned for a CUDA source), never shared with the caller
        self._enter(entry, "host", entry.handle.nbytes)

    def _enter(self, entry: _Entry, tier: str, nbytes: int) -> None:
        entry.tier = tier
        self._lru[tier][entry.key] = entry
        self._bytes[tier] += nbytes
        self._shrink(tier)

    def _tier_bytes(self, entry: _Entry, tier: str) -> int:
        if tier == "host":
            return entry.handle.nbytes if entry.handle is not None else 0
        if tier == "disk":
            return entry.disk_bytes
        return entry.nbytes

    def _shrink(self, tier: str) -> None:
        budget = self.budgets[tier]
        if budget is None:
            return
        lru = self._lru[tier]
        while self._bytes[tier] > budget and lru:
            _, victim = next(iter(lru.items()))
            if tier == "disk":
                self._drop_file(victim)
                if victim.tier is None:
                    self._forget(victim)
                    self._counts["evictions"] += 1
                continue
            state = self._memory_state(victim)
            self._leave_memory(victim)
            to_host = self.budgets["host"] != 0 and self._fits("host", victim.nbytes)
            if tier == "device" and to_host and state is not None:
                self._park_host(victim, state)
                self._counts["demotions"] += 1
            elif victim.path is None:
                self._forget(victim)
                self._counts["evictions"] += 1
            else:
                self._counts["demotions"] += 1

    def _memory_state(self, entry: _Entry) -> MambaModelState | None:
        if entry.tier == "device":
            return entry.state
        if entry.tier == "host" and entry.handle is not None:
            return cast(MambaModelState, entry.handle.wait())
        return None

    def _leave_memory(self, entry: _Entry) -> None:
        if entry.tier is not None:
            self._lru[entry.tier].pop(entry.key, None)
            self._bytes[entry.tier] -= self._tier_bytes(entry, entry.tier)
        entry.tier, entry.state, entry.handle = None, None, None

    def _drop_file(self, entry: _Entry, delete: bool = True) -> None:
        if entry.path is None:
            return
        self._lru["disk"].pop(entry.key, None)
        self._bytes["disk"] -= entry.disk_bytes
        if delete:
            try:
                os.unlink(entry.path)
            except OSError:
                pass
        entry.path, entry.disk_bytes = None, 0

    def _forget(self, entry: _Entry) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            if entry.kind == "prefix":
                self._lengths[entry.seqlen_offset] -= 1
                if self._lengths[entry.seqlen_offset] <= 0:
                    del self._lengths[entry.seqlen_offset]

    def _remove(self, entry: _Entry, delete_file: bool) -> None:
        self._leave_memory(entry)
        self._drop_file(entry, delete=delete_file)
        self._forget(entry)

    def _write(self, entry: _Entry, state: MambaModelState) -> None:
        assert self.directory is not None
        path = disk.entry_path(self.directory, entry.key)
        try:
            size = disk.write_entry(path, state, entry.record())
        except (StateError, OSError) as exc:  # e.g. a full disk, or a state the format cannot store
            self._counts["disk_errors"] += 1
            self.problems.append((path, f"write failed: {exc}"))
            return
        if not self._fits("disk", size):
            try:
                os.unlink(path)
            except OSError:
                pass
            return
        entry.path, entry.disk_bytes = path, size
        self._lru["disk"][entry.key] = entry
        self._bytes["disk"] += size
        self._shrink("disk")

    def _touch(self, entry: _Entry) -> None:
        if entry.tier is not None:
            self._lru[entry.tier].move_to_end(entry.key)
        if entry.path is not None:
            self._lru["disk"].move_to_end(entry.key)

    def _fetch(self, entry: _Entry, device: torch.device | str | None) -> MambaModelState | None:
        """A copy of ``entry``'s state on ``device``; None (entry dropped and reported) when its file is bad."""
        target = torch.device(device) if device is not None else entry.source_device
        self._touch(entry)
        if entry.tier == "device":
            assert entry.state is not None
            return entry.state.to(target, copy=True)
        if entry.tier == "host":
            assert entry.handle is not None
            host = entry.handle.wait()
            return restore_state(host, target if target is not None else host.device)  # type: ignore[return-value]
        assert entry.path is not None
        try:
            state, record = disk.load_entry(entry.path, device=target)
            if record.key != entry.key or (entry.tokens is not None and (record.tokens is None or not
                                                                         np.array_equal(record.tokens, entry.tokens))):
                raise StateFormatError(f"{os.path.basename(entry.path)}: expected the entry indexed at start, found "
                                       "another record")
        except StateFormatError as exc:
            self._corrupted(entry.path, str(exc))
            self._drop_file(entry, delete=False)
            self._forget(entry)
            return None
        self._counts["disk_loads"] += 1
        entry.nbytes, entry.source_device = state.nbytes, state.device
        self._place(entry, state, copy=True)  # back into memory
        return state

    def _corrupted(self, path: str, reason: str) -> None:
        moved = disk.quarantine(path)
        self._counts["corrupted"] += 1
        self.problems.append((path, reason))
        warnings.warn(f"StateCache: dropped the corrupted entry {path} ({reason}); "
                      f"{'moved to ' + moved if moved else 'removed'}", CacheCorruptionWarning, stacklevel=4)

    def _scan(self) -> None:
        """Index the directory's entries of this fingerprint (oldest first, so LRU order follows the files)."""
        assert self.directory is not None
        for path in disk.list_entries(self.directory):
            try:
                record = disk.read_record(path)
            except StateFormatError as exc:
                self._corrupted(path, str(exc))
                continue
            if record.fingerprint != self.fingerprint:
                continue  # another model's entry: not ours to judge or delete
            entry = _Entry(record.key, record.kind, record.fingerprint, 0, record.seqlen_offset,
                           tokens=record.tokens, session=record.session, extra=record.extra, path=path,
                           disk_bytes=os.path.getsize(path))
            self._entries[entry.key] = entry
            if entry.kind == "prefix":
                self._lengths[entry.seqlen_offset] += 1
            self._lru["disk"][entry.key] = entry
            self._bytes["disk"] += entry.disk_bytes
        self._shrink("disk")
