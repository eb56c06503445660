"""The engine's decode batch (mamba_state.serve.batch.DecodeBatch): rows joining several at once and leaving
several at once equal joining and leaving one by one, with fresh random states on a tiny CPU model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mamba_state import MambaModelState
from mamba_state.adapters import StatefulMambaLM
from mamba_state.errors import StateError
from mamba_state.serve.batch import DecodeBatch

VOCAB = 29


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = dict(d_model=16, n_layer=2, vocab_size=VOCAB, d_intermediate=0, ssm_cfg={"d_state": 4}, rms_norm=True,
               fused_add_norm=True, residual_in_fp32=True, tie_embeddings=True, pad_vocab_size_multiple=8)
    return StatefulMambaLM.from_config(cfg, dtype=torch.float64, state_dtype=torch.float64).eval()


def _random_rows(lm, n: int, seed: int) -> MambaModelState:
    g = torch.Generator().manual_seed(seed)
    state = lm.new_state(n)
    for _, layer in state.items():
        for t in layer.tensors.values():
            t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype))
    return state


def _rows_equal(a: MambaModelState, b: MambaModelState) -> bool:
    return a.seqlen_offset == b.seqlen_offset and a.allclose(b, rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(first=st.integers(1, 5), leave=st.lists(st.integers(0, 10), max_size=6, unique=True),
       second=st.integers(1, 6), seed=st.integers(0, 10 ** 6))
def test_many_at_once_equals_one_by_one(lm, first, leave, second, seed):
    """Join ``first`` rows, let some leave (freeing slots in the middle), join ``second`` more (consecutive or
    scattered free slots, a bucket move when they do not fit): the slots, the rows, the inputs and the rows
    taken out equal what ``add`` and ``remove`` one at a time give."""
    batches = [DecodeBatch(lm, max_batch=16, cuda_graph=False) for _ in range(2)]
    rows1, rows2 = _random_rows(lm, first, seed), _random_rows(lm, second, seed + 1)
    tokens1, tokens2 = [(seed + i) % VOCAB for i in range(first)], [(seed * 7 + i) % VOCAB for i in range(second)]
    many, single = batches
    slots_many = many.add_many([f"a{i}" for i in range(first)], rows1, tokens1)
    slots_single = [single.add(f"a{i}", rows1.select(slice(i, i + 1)), t) for i, t in enumerate(tokens1)]
    assert slots_many == slots_single
    gone = [s for s in slots_many if s in leave]
    out_many = many.remove_many(gone, [10 + s for s in gone])
    out_single = [single.remove(s, 10 + s) for s in gone]
    assert len(out_many) == len(out_single) and all(_rows_equal(a, b) for a, b in zip(out_many, out_single))
    slots_many = many.add_many([f"b{i}" for i in range(second)], rows2, tokens2)
    slots_single = [single.add(f"b{i}", rows2.select(slice(i, i + 1)), t) for i, t in enumerate(tokens2)]
    assert slots_many == slots_single and many.slots == single.slots and many.capacity == single.capacity
    assert torch.equal(many.ids, single.ids)
    assert many.state.allclose(single.state, rtol=0, atol=0)
    for j, s in enumerate(slots_many):  # what joined is where it was put
        assert many.remove(s, 0).allclose(rows2.select(slice(j, j + 1)), rtol=0, atol=0)


def test_rows_taken_out_together_are_copies(lm):
    """Rows taken out together do not change when the batch's state is written afterwards."""
    batch = DecodeBatch(lm, max_batch=8, cuda_graph=False)
    rows = _random_rows(lm, 3, 5)
    batch.add_many(["x", "y", "z"], rows, [1, 2, 3])
    out = batch.remove_many([2, 0], [4, 6])
    for _, layer in batch.state.items():
        for t in layer.tensors.values():
            t.fill_(123.0)
    assert out[0].allclose(rows.select(slice(2, 3)), rtol=0, atol=0) and out[0].seqlen_offset == 4
    assert out[1].allclose(rows.select(slice(0, 1)), rtol=0, atol=0) and out[1].seqlen_offset == 6
    assert batch.slots == [None, "y", None, None]


def test_reserve_moves_to_the_bucket_once(lm):
    batch = DecodeBatch(lm, max_batch=8, cuda_graph=False)
    batch.reserve(5)
    assert batch.capacity == 8 and batch.slots == [None] * 8
    batch.reserve(2)  # never shrinks
    assert batch.capacity == 8
    batch.reserve(100)  # at most max_batch
    assert batch.capacity == 8


def test_bad_arguments_are_refused_and_change_nothing(lm):
    batch = DecodeBatch(lm, max_batch=4, cuda_graph=False)
    rows = _random_rows(lm, 2, 1)
    with pytest.raises(StateError, match="one owner and one token per row"):
        batch.add_many(["a"], rows, [1, 2])
    with pytest.raises(StateError, match="one owner and one token per row"):
        batch.add_many(["a", None], rows, [1, 2])
    assert batch.capacity == 0 and batch.state is None
    batch.add_many(["a", "b"], rows, [1, 2])
    with pytest.raises(StateError, match="distinct slots"):
        batch.remove_many([0, 0], [1, 1])
    with pytest.raises(StateError, match="decode batch: expected at most max_batch=4 rows"):
        batch.add_many(list("cdef"), _random_rows(lm, 4, 2), [0, 0, 0, 0])
    assert batch.slots[:2] == ["a", "b"] and batch.active == 2


def test_row_views_are_views_of_each_row(lm):
    """``RowViews`` (the packed prefill's per-request rows) and ``rows_view``: every row equals ``select`` of
    it, carries the offset asked for, shares the source's storage (so later in-place writes show), and the
    unvalidated construction still gives a state every public method accepts."""
    from mamba_state.serve.packed_prefill import RowViews, rows_view, write_rows

    state = _random_rows(lm, 5, seed=5)
    row = RowViews(state)
    for j, off in ((0, 3), (4, 9), (2, 0)):
        v = row(j, off)
        assert v.batch_size == 1 and v.seqlen_offset == off and v.metadata == {}
        assert v.allclose(state.select([j]), rtol=0, atol=0)
        assert v.layer_indices == state.layer_indices
        assert _rows_equal(MambaModelState(dict(v.items()), seqlen_offset=off), v.clone())  # validated rebuild
    block = rows_view(state, 1, 4, seqlen_offset=7)
    assert block.batch_size == 3 and block.seqlen_offset == 7
    assert block.allclose(state.select([1, 2, 3]), rtol=0, atol=0)
    new = lm.new_state(2)  # zeros written over rows 2, 3: the views made before see them
    before = row(2, 0)
    write_rows(state, 2, new)
    assert all(t.abs().sum() == 0 for _, layer in before.items() for t in layer.tensors.values())
    assert all(t.abs().sum() == 0 for _, layer in block.select([1, 2]).items() for t in layer.tensors.values())
    assert all(t.abs().sum() > 0 for _, layer in block.select([0]).items() for t in layer.tensors.values())
