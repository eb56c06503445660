"""The decode batch of a continuous-batching engine: slots of one batched state that rows join and leave.

The batch holds one :class:`~mamba_state.state.MambaModelState` with ``capacity`` rows, a power of two up to
``max_batch`` (the bucket). A request that joins is written into a free row in place (an indexed copy per
tensor); one that leaves is copied out (``select``) and its row becomes free: nothing else moves. Free rows
decode a pad token alongside (rows of a Mamba model never mix, so they cannot disturb the others). When more
rows are needed than the bucket has, the batch moves to the next bucket (the rows keep their slots); when at most
a quarter of a bucket is in use, it compacts into a smaller one.

On CUDA each bucket's step is a CUDA graph (the generation layer's captured decode step, with the fused Mamba-1
step where the model qualifies): the batch state then *is* the graph's static state, and a step is one replay.
Elsewhere (or with ``cuda_graph=False``) a step is ``lm.step`` on the batch.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from ..errors import StateError
from ..kernels._host import to_device
from ..state import MambaModelState

__all__ = ["DecodeBatch", "bucket"]


def bucket(n: int, max_batch: int) -> int:
    """The capacity for ``n`` rows: the smallest power of two >= n, at most ``max_batch``."""
    if n > max_batch:
        raise StateError(f"decode batch: expected at most max_batch={max_batch} rows, found {n}")
    cap = 1
    while cap < n:
        cap *= 2
    return min(cap, max_batch)


def _write_row(buffers: MambaModelState, slot: int, row: MambaModelState) -> None:
    for idx, layer in buffers.items():
        src = row[idx].tensors
        for name, t in layer.tensors.items():
            t[slot].copy_(src[name][0])


class DecodeBatch:
    """Rows of one batched decode state.

    Args:
        lm: a :class:`~mamba_state.adapters.StatefulMambaLM` (in eval mode).
        max_batch: most rows at once.
        cuda_graph: replay each bucket's step as a CUDA graph on CUDA (ignored elsewhere).
    """

    def __init__(self, lm: Any, max_batch: int, cuda_graph: bool = True):
        self.lm = lm
        self.max_batch = max_batch
        param = next(lm.parameters())
        self.device = param.device
        kinds = {layout.get("kind") for layout in lm.state_layouts().values()}
        # the captured decode step copies conv_state / ssm_state: Mamba-1/2 layers only
        self.use_graph = bool(cuda_graph) and self.device.type == "cuda" and kinds <= {"mamba1", "mamba2"}
        self.capacity = 0
        self.slots: list[Any] = []  # owner per row (None: free)
        self.state: MambaModelState | None = None
        self._graph: Any = None
        self.ids: torch.Tensor | None = None  # int64 [capacity] on the device: each slot's next input token

    # ------------------------------------------------------------------ rows
    @property
    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    def add(self, owner: Any, row: MambaModelState, token: int) -> int:
        """Write ``row`` (batch 1) into a free slot, growing the bucket if needed, with ``token`` as the slot's
        next input; returns the slot."""
        if owner is None:
            raise StateError("decode batch: expected an owner for the row, found None")
        if None not in self.slots:
            self._resize(bucket(self.active + 1, self.max_batch))
        slot = self.slots.index(None)
        assert self.state is not None and self.ids is not None
        _write_row(self.state, slot, row)
        self.ids[slot] = token
        self.slots[slot] = owner
        return slot

    def reserve(self, rows: int) -> None:
        """Grow the bucket now to hold ``rows`` rows in all (at most ``max_batch``), so that rows joining one
        after another do not move it through every bucket on the way (each move copies the state)."""
        cap = bucket(min(rows, self.max_batch), self.max_batch)
        if rows > 0 and cap > self.capacity:
            self._resize(cap)

    def add_many(self, owners: Sequence[Any], rows: MambaModelState, tokens: Sequence[int]) -> list[int]:
        """Write row ``j`` of ``rows`` (batch ``len(owners)``) into a free slot with ``tokens[j]`` as its next
        input, growing the bucket at most once; returns the slots. One copy per state tensor for all the rows
        (``add`` costs one per tensor per row: 48 launches a row at 24 layers)."""
        k = len(owners)
        if rows.batch_size != k or len(tokens) != k or any(o is None for o in owners):
            raise StateError(f"decode batch: expected one owner and one token per row of the {rows.batch_size} "
                             f"rows, found {k} owners (None among them: {any(o is None for o in owners)}) and "
                             f"{len(tokens)} tokens")
        if k == 0:
            return []
        if self.capacity - self.active < k:
            self._resize(bucket(self.active + k, self.max_batch))
        slots = [i for i, s in enumerate(self.slots) if s is None][:k]
        assert self.state is not None and self.ids is not None and len(slots) == k
        lo = slots[0]
        if slots[-1] - lo == k - 1:  # consecutive free slots (an empty or a full-from-the-start batch): slices
            for idx, layer in self.state.items():
                src = rows[idx].tensors
                for name, t in layer.tensors.items():
                    t[lo:lo + k].copy_(src[name])
            self.ids[lo:lo + k].copy_(to_device(torch.tensor(list(tokens), dtype=torch.long), self.device))
        else:
            index = to_device(torch.tensor(slots, dtype=torch.long), self.device)
            for idx, layer in self.state.items():
                src = rows[idx].tensors
                for name, t in layer.tensors.items():
                    t.index_copy_(0, index, src[name].to(t.dtype))
            self.ids.index_copy_(0, index, to_device(torch.tensor(list(tokens), dtype=torch.long), self.device))
        for slot, owner in zip(slots, owners):
            self.slots[slot] = owner
        return slots

    def remove_many(self, slots: Sequence[int], seqlen_offsets: Sequence[int]) -> list[MambaModelState]:
        """Take the rows at ``slots`` out (one gathered copy per state tensor for all of them; row ``j`` of the
        result has ``seqlen_offsets[j]``); the slots become free."""
        if len(slots) != len(seqlen_offsets) or len(set(slots)) != len(slots):
            raise StateError(f"decode batch: expected distinct slots and one seqlen_offset each, found slots "
                             f"{list(slots)} and {len(seqlen_offsets)} offsets")
        if not slots:
            return []
        if len(slots) == 1:
            return [self.remove(slots[0], seqlen_offsets[0])]
        assert self.state is not None and all(self.slots[s] is not None for s in slots)
        index = to_device(torch.tensor(list(slots), dtype=torch.long), self.device)
        gathered = MambaModelState._of_checked({idx: s._rebuild_unchecked(lambda t: t.index_select(0, index))
                                                for idx, s in self.state.items()})
        for slot in slots:
            self.slots[slot] = None
        # each row a view of the gathered copy (the batch's later steps never write there), one split per tensor
        return gathered._row_views(0, len(slots), seqlen_offsets)

    def remove(self, slot: int, seqlen_offset: int) -> MambaModelState:
        """Take the row out (a copy, with ``seqlen_offset``); the slot becomes free."""
        assert self.state is not None and self.slots[slot] is not None
        layers = {idx: s._rebuild_unchecked(lambda t: t[slot:slot + 1].clone()) for idx, s in self.state.items()}
        self.slots[slot] = None
        return MambaModelState._of_checked(layers, seqlen_offset)

    def maybe_shrink(self) -> dict[int, int]:
        """Compact into a smaller bucket when at most a quarter is used; returns ``{old slot: new slot}`` (empty
        when nothing moved)."""
        n = self.active
        if self.capacity <= 1 or n * 4 > self.capacity:
            return {}
        if n == 0:
            self.release()
            return {}
        keep = [i for i, s in enumerate(self.slots) if s is not None]
        assert self.state is not None and self.ids is not None
        index = torch.as_tensor(keep, dtype=torch.long)
        rows = self.state.select(index)
        ids = self.ids.index_select(0, index.to(self.ids.device))
        owners = [self.slots[i] for i in keep]
        self._resize(bucket(n, self.max_batch), carry=False)
        assert self.state is not None and self.ids is not None
        for j, owner in enumerate(owners):
            _write_row(self.state, j, rows.select(j))
            self.slots[j] = owner
        self.ids[:n].copy_(ids)
        return {old: new for new, old in enumerate(keep)}

    # ------------------------------------------------------------------ buckets
    def _resize(self, capacity: int, carry: bool = True) -> None:
        old_state, old_cap, old_ids = self.state, self.capacity, self.ids
        template = self.lm.new_state(capacity, device=self.device)
        if carry and old_state is not None:
            for idx, layer in template.items():
                src = old_state[idx].tensors
                for name, t in layer.tensors.items():
                    t[:old_cap].copy_(src[name][:old_cap])
        self._release_graph()
        self.state = template
        self.ids = torch.zeros(capacity, dtype=torch.long, device=self.device)
        if self.use_graph:
            self._take_graph(template)
        if carry and old_ids is not None:
            self.ids[:old_cap].copy_(old_ids[:old_cap])
        owners = self.slots if carry else []
        self.slots = list(owners) + [None] * (capacity - len(owners))
        self.capacity = capacity

    def _take_graph(self, template: MambaModelState) -> None:
        from ..generation.decode import _acquire_graph, _fused_decoder

        try:
            fused = _fused_decoder(self.lm, template, torch.zeros(template.batch_size, 1, dtype=torch.long,
                                                                  device=self.device), None)
            graph = _acquire_graph(self.lm, template, fused, fused_auto=True)
        except Exception as exc:  # decode eagerly rather than fail the server
            warnings.warn(f"DecodeBatch: no CUDA graph for batch {template.batch_size} ({type(exc).__name__}: "
                          f"{exc}); decoding eagerly", RuntimeWarning, stacklevel=3)
            graph = None
        if graph is None:
            return
        graph.load(template, fused)
        self._graph = graph
        self.state = graph.state  # the static buffers are the batch state (and ids) from now on
        self.ids = graph.ids

    def _release_graph(self) -> None:
        if self._graph is not None:
            self._graph.busy = False
            self._graph = None

    def release(self) -> None:
        """Give everything back (graph included); the batch is empty afterwards."""
        self._release_graph()
        self.state, self.capacity, self.slots, self.ids = None, 0, [], None

    # ------------------------------------------------------------------ step
    def step(self) -> torch.Tensor:
        """Feed :attr:`ids` (one token per slot; free slots hold any id) through the model; returns logits
        ``[capacity, vocab_padded]``, valid until the next step. Write the next inputs into :attr:`ids` (on the
        device, e.g. ``ids.copy_(chosen)``): no host transfer is needed between steps."""
        assert self.state is not None and self.ids is not None
        if self._graph is not None:
            self._graph._replay()
            assert self._graph.logits is not None
            return self._graph.logits
        with torch.no_grad():
            logits, self.state = self.lm.step(self.ids, self.state)
        return logits
