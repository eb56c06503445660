"""State containers: every operation of DESIGN.md and every bad input (errors name expected and found)."""

from __future__ import annotations

import pickle

import pytest
import torch

import mamba_state as ms
from mamba_state import (MambaInferenceState, MambaModelState, StateCompatibilityError, StateError,
                         StateShapeError)


def m1(batch=3, d_inner=6, d_conv=4, d_state=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MambaInferenceState(torch.randn(batch, d_inner, d_conv, generator=g, dtype=dtype),
                               torch.randn(batch, d_inner, d_state, generator=g, dtype=dtype))


def m2(batch=3, nheads=2, headdim=4, ngroups=1, d_state=3, d_conv=4, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return MambaInferenceState(
        torch.randn(batch, nheads * headdim + 2 * ngroups * d_state, d_conv, generator=g, dtype=dtype),
        torch.randn(batch, nheads, headdim, d_state, generator=g, dtype=dtype))


def model_state(batch=3, seed=0):
    return MambaModelState({0: m1(batch, seed=seed), 2: m2(batch, seed=seed + 1)}, seqlen_offset=7,
                           metadata={"note": "x"})


def snapshot(s):
    return [t.clone() for t in (s.conv_state, s.ssm_state)]


def unchanged(s, snap):
    return all(torch.equal(a, b) for a, b in zip((s.conv_state, s.ssm_state), snap))


# ------------------------------------------------------------------ construction
@pytest.mark.parametrize("make,kind", [(m1, "mamba1"), (m2, "mamba2")])
def test_properties(make, kind):
    s = make()
    assert s.kind == kind and s.batch_size == 3 and s.device == torch.device("cpu") and s.dtype == torch.float32
    assert s.nbytes == 4 * (s.conv_state.numel() + s.ssm_state.numel())
    assert s.layout()["kind"] == kind and s.layout()["ssm_shape"] == list(s.ssm_state.shape[1:])
    assert "batch_size=3" in repr(s)


def test_mamba2_with_groups():
    s = m2(ngroups=2, d_state=3)
    assert s.conv_state.shape[1] == 2 * 4 + 2 * 2 * 3


@pytest.mark.parametrize("conv,ssm,err,words", [
    ((2, 4), (2, 4, 3), StateShapeError, ["rank 3", "[2, 4]"]),
    ((2, 4, 3, 1), (2, 4, 3), StateShapeError, ["rank 3", "[2, 4, 3, 1]"]),
    ((2, 4, 3), (2, 4), StateShapeError, ["rank 3", "rank 4", "[2, 4]"]),
    ((2, 4, 3), (2, 4, 3, 2, 1), StateShapeError, ["[2, 4, 3, 2, 1]"]),
    ((2, 4, 3), (3, 4, 5), StateShapeError, ["2", "3", "batch"]),
    ((2, 4, 3), (2, 5, 5), StateShapeError, ["4", "5"]),
    ((2, 7, 3), (2, 2, 2, 3), StateShapeError, ["Mamba-2", "7"]),  # 7 - 4 = 3 is not a multiple of 2*3
    ((2, 4, 3), (2, 2, 2, 3), StateShapeError, ["Mamba-2", "4"]),  # no room for B and C channels
])
def test_bad_shapes(conv, ssm, err, words):
    with pytest.raises(err) as exc:
        MambaInferenceState(torch.zeros(conv), torch.zeros(ssm))
    assert all(w in str(exc.value) for w in words), str(exc.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_non_floating_dtype(dtype):
    with pytest.raises(StateError, match="floating"):
        MambaInferenceState(torch.zeros(2, 4, 3, dtype=dtype), torch.zeros(2, 4, 5))
    with pytest.raises(StateError, match=str(dtype)):
        MambaInferenceState(torch.zeros(2, 4, 3), torch.zeros(2, 4, 5, dtype=dtype))


def test_not_tensors():
    with pytest.raises(StateError, match="expected a torch.Tensor, found list"):
        MambaInferenceState([[0.0]], torch.zeros(2, 4, 5))


def test_mixed_devices():
    with pytest.raises(StateError) as exc:
        MambaInferenceState(torch.zeros(2, 4, 3), torch.zeros(2, 4, 5, device="meta"))
    assert "cpu" in str(exc.value) and "meta" in str(exc.value)


def test_errors_are_value_errors():
    for cls in (StateError, StateShapeError, StateCompatibilityError, ms.StateFormatError):
        assert issubclass(cls, ValueError) and issubclass(cls, StateError)


# ------------------------------------------------------------------ copies and moves
@pytest.mark.parametrize("make", [m1, m2])
def test_to_clone_detach(make):
    s = make()
    h = s.to(dtype=torch.float64)
    assert h.dtype == torch.float64 and h.conv_state.dtype == torch.float64 and s.dtype == torch.float32
    assert torch.equal(h.ssm_state.float(), s.ssm_state)
    meta = s.to(device="meta")
    assert meta.device.type == "meta" and s.device.type == "cpu"
    c = s.clone()
    assert c.allclose(s, rtol=0, atol=0) and c.ssm_state.data_ptr() != s.ssm_state.data_ptr()
    c.zero_()
    assert s.ssm_state.abs().sum() > 0
    r = MambaInferenceState(s.conv_state.clone().requires_grad_(), s.ssm_state.clone().requires_grad_())
    d = r.detach()
    assert not d.conv_state.requires_grad and not d.ssm_state.requires_grad
    assert d.ssm_state.data_ptr() == r.ssm_state.data_ptr()  # detach shares storage, like Tensor.detach
    with pytest.raises(StateError, match="floating"):
        s.to(dtype=torch.int32)


@pytest.mark.parametrize("make", [m1, m2])
def test_zero_and_reset(make):
    s = make(batch=4)
    before = s.clone()
    assert s.reset_(torch.tensor([True, False, True, False])) is s
    for row in range(4):
        zeroed = row in (0, 2)
        for a, b in ((s.conv_state, before.conv_state), (s.ssm_state, before.ssm_state)):
            assert torch.equal(a[row], torch.zeros_like(a[row]) if zeroed else b[row])
    assert s.zero_() is s and s.conv_state.abs().sum() == 0 and s.ssm_state.abs().sum() == 0


@pytest.mark.parametrize("mask,words", [
    (torch.tensor([1, 0, 1]), ["bool", "int64"]),
    (torch.tensor([True, False]), ["[3]", "[2]"]),
    (torch.ones(3, 1, dtype=torch.bool), ["[3]", "[3, 1]"]),
    ([True, False, True], ["bool tensor", "list"]),
])
def test_bad_reset_masks_change_nothing(mask, words):
    for s in (m1(), model_state()):
        layers = [s] if isinstance(s, MambaInferenceState) else [v for _, v in s.items()]
        snaps = [snapshot(x) for x in layers]
        with pytest.raises(StateError) as exc:
            s.reset_(mask)
        assert all(w in str(exc.value) for w in words), str(exc.value)
        assert all(unchanged(x, sn) for x, sn in zip(layers, snaps))


# ------------------------------------------------------------------ batch operations
@pytest.mark.parametrize("make", [m1, m2])
def test_select_forms(make):
    s = make(batch=5)
    rows = [(2, [2]), (-1, [4]), (slice(1, 4), [1, 2, 3]), (slice(None, None, 2), [0, 2, 4])]
    for index, expect in rows:
        out = s.select(index)
        assert torch.equal(out.ssm_state, s.ssm_state[expect]) and torch.equal(out.conv_state, s.conv_state[expect])
    for index, expect in [(torch.tensor([4, 0, 0]), [4, 0, 0]), (torch.tensor([True, False, False, True, False]), [0, 3]),
                          (torch.tensor([3, -5], dtype=torch.int32), [3, 0]),
                          ([1, 3], [1, 3]), (torch.tensor([], dtype=torch.long), []),
                          ([True, False, False, True, False], [0, 3])]:  # a list of bools is a mask, as in torch
        out = s.select(index)
        assert out.batch_size == len(expect)
        assert torch.equal(out.ssm_state, s.ssm_state[expect]) and torch.equal(out.conv_state, s.conv_state[expect])
    out = s.select(0)
    out.zero_()
    assert s.ssm_state[0].abs().sum() > 0  # select copies


@pytest.mark.parametrize("index,words", [
    (5, ["[-5, 5)", "5"]), (-6, ["-6"]), (True, ["bool"]), ("a", ["str"]), (1.5, ["float"]),
    (torch.tensor([0, 5]), ["[-5, 5)", "0..5"]), (torch.tensor([True, False]), ["[5]", "[2]"]),
    (torch.tensor([0.0, 1.0]), ["bool mask", "int64/int32", "float32"]), (torch.zeros(2, 2, dtype=torch.long), ["1-D"]),
    # torch reads uint8 as a (deprecated) mask: refused rather than guessed, like the other small int dtypes
    (torch.tensor([1, 0, 0, 1, 0], dtype=torch.uint8), ["bool mask", "int64/int32", "uint8"]),
    (torch.tensor([1, 3], dtype=torch.int16), ["int64/int32", "int16"]),
    (torch.tensor([1, 3], dtype=torch.int8), ["int64/int32", "int8"]),
    ([True, False], ["[5]", "[2]"]),  # a bool list is a mask, so its length must be the batch size
])
def test_bad_select(index, words):
    for s in (m1(batch=5), MambaModelState({0: m1(batch=5), 1: m2(batch=5)})):
        with pytest.raises(StateError) as exc:
            s.select(index)
        assert all(w in str(exc.value) for w in words), str(exc.value)


@pytest.mark.parametrize("make", [m1, m2])
def test_cat_split(make):
    a, b = make(batch=2, seed=3), make(batch=3, seed=4)
    c = MambaInferenceState.cat([a, b])
    assert c.batch_size == 5 and torch.equal(c.ssm_state[:2], a.ssm_state) and torch.equal(c.conv_state[2:], b.conv_state)
    parts = c.split([2, 3])
    assert parts[0].allclose(a, 0, 0) and parts[1].allclose(b, 0, 0)
    assert [p.batch_size for p in c.split(2)] == [2, 2, 1]
    assert [p.batch_size for p in c.split([0, 5])] == [0, 5]


def test_bad_cat_and_split():
    a = m1()
    with pytest.raises(StateCompatibilityError) as exc:
        MambaInferenceState.cat([a, m2()])
    assert "mamba1" in str(exc.value) and "mamba2" in str(exc.value)
    with pytest.raises(StateCompatibilityError, match="d_state|ssm_shape|\\[6, 4\\]|layout"):
        MambaInferenceState.cat([a, m1(d_state=4)])
    with pytest.raises(StateCompatibilityError) as exc:
        MambaInferenceState.cat([a, m1(dtype=torch.float64)])
    assert "float64" in str(exc.value) and "float32" in str(exc.value)
    with pytest.raises(StateCompatibilityError, match="meta"):
        MambaInferenceState.cat([a, m1().to(device="meta")])
    for bad in ([], [a, "x"]):
        with pytest.raises(StateError, match="non-empty sequence"):
            MambaInferenceState.cat(bad)
    for sizes, words in [(0, ["positive", "0"]), ([1, 1], ["summing", "3", "[1, 1]"]), ([4, -1], ["-1"]),
                         ([1.5, 1.5], ["1.5"])]:
        with pytest.raises(StateError) as exc:
            a.split(sizes)
        assert all(w in str(exc.value) for w in words), str(exc.value)


def test_allclose():
    a = m1()
    b = a.clone()
    b.ssm_state[0, 0, 0] += 1e-3
    assert not a.allclose(b) and a.allclose(b, atol=1e-2)
    assert not a.allclose(m2()) and not a.allclose(a.select(slice(0, 2))) and not a.allclose("x")
    assert a.allclose(a.to(dtype=torch.float64))


# ------------------------------------------------------------------ model state
def test_model_mapping_interface():
    s = model_state()
    assert len(s) == 2 and s.layer_indices == [0, 2] and list(s) == [0, 2] and 2 in s and 1 not in s
    assert s[2].kind == "mamba2" and dict(s.items())[0] is s[0]
    assert s.batch_size == 3 and s.dtype == torch.float32 and s.device == torch.device("cpu")
    assert s.nbytes == s[0].nbytes + s[2].nbytes and s.seqlen_offset == 7 and s.metadata == {"note": "x"}
    assert s.layout() == {0: s[0].layout(), 2: s[2].layout()}
    layers = s.layers
    layers.pop(0)
    assert len(s) == 2  # .layers is a copy
    with pytest.raises(StateError) as exc:
        s[1]
    assert "[0, 2]" in str(exc.value) and "1" in str(exc.value)
    # a missing layer is also a KeyError (mapping protocol), with an unquoted message
    for missing in (1, -1, "0", [0]):
        with pytest.raises(KeyError) as kexc:
            s[missing]
        assert isinstance(kexc.value, ms.errors.LayerNotFoundError) and isinstance(kexc.value, StateError)
        assert str(kexc.value).startswith("layer index: expected one of [0, 2], found")
        assert missing not in s and s.get(missing) is None and s.get(missing, "d") == "d"
    assert s.get(2) is s[2] and 0 in s
    # keys come out sorted whatever the insertion order
    assert MambaModelState({3: m1(), 1: m1()}).layer_indices == [1, 3]


def test_model_ops_apply_to_every_layer():
    s = model_state(batch=4)
    for out in (s.clone(), s.to(dtype=torch.float64), s.detach(), s.select(torch.tensor([0, 1, 2, 3]))):
        assert out.layer_indices == [0, 2] and out.seqlen_offset == 7 and out.metadata == {"note": "x"}
        assert out.allclose(s)
    assert s.to(dtype=torch.float64).dtype == torch.float64 and s.to(device="meta").device.type == "meta"
    sel = s.select(torch.tensor([True, False, True, False]))
    assert sel.batch_size == 2 and torch.equal(sel[2].ssm_state, s[2].ssm_state[[0, 2]])
    parts = s.split([1, 3])
    back = MambaModelState.cat(parts)
    assert back.allclose(s, 0, 0) and back.seqlen_offset == 7
    c = s.clone()
    c.reset_(torch.tensor([False, True, False, False]))
    for i in (0, 2):
        assert c[i].ssm_state[1].abs().sum() == 0 and torch.equal(c[i].ssm_state[0], s[i].ssm_state[0])
    assert c.zero_() is c and all(x.ssm_state.abs().sum() == 0 for _, x in c.items())
    assert s[0].ssm_state.abs().sum() > 0


@pytest.mark.parametrize("layers,seqlen_offset,metadata,err,words", [
    ({}, 0, None, StateError, ["non-empty"]),
    ({-1: None}, 0, None, StateError, ["non-negative", "-1"]),
    ({"a": None}, 0, None, StateError, ["non-negative", "'a'"]),
    ({0: "x"}, 0, None, StateError, ["MambaInferenceState", "str"]),
    ({0: "m1:2", 1: "m1:3"}, 0, None, StateShapeError, ["batch", "2", "3"]),
    ({0: "m1:2"}, -1, None, StateError, ["seqlen_offset", "-1"]),
    ({0: "m1:2"}, 1.5, None, StateError, ["seqlen_offset", "1.5"]),
    ({0: "m1:2"}, 0, {"a": object()}, StateError, ["JSON"]),
    ({0: "m1:2"}, 0, {1: "a"}, StateError, ["str keys"]),
])
def test_bad_model_state(layers, seqlen_offset, metadata, err, words):
    layers = {k: (m1(batch=int(v[3:])) if isinstance(v, str) and v.startswith("m1:") else v) for k, v in layers.items()}
    with pytest.raises(err) as exc:
        MambaModelState(layers, seqlen_offset=seqlen_offset, metadata=metadata)
    assert all(w in str(exc.value) for w in words), str(exc.value)


def test_model_mixed_dtype_and_device_are_named():
    s = MambaModelState({0: m1(), 1: m1(dtype=torch.float64)})
    with pytest.raises(StateError) as exc:
        s.dtype
    assert "float32" in str(exc.value) and "float64" in str(exc.value)
    s = MambaModelState({0: m1(), 1: m1().to(device="meta")})
    with pytest.raises(StateError, match="meta"):
        s.device


def test_model_bad_ops_change_nothing():
    s = model_state(batch=3)
    snaps = {i: snapshot(x) for i, x in s.items()}
    with pytest.raises(StateCompatibilityError) as exc:
        MambaModelState.cat([s, MambaModelState({0: m1()})])
    assert "[0]" in str(exc.value) and "[0, 2]" in str(exc.value)
    with pytest.raises(StateCompatibilityError):
        MambaModelState.cat([s, MambaModelState({0: m1(), 2: m1()})])
    with pytest.raises(StateError):
        MambaModelState.cat([s, m1()])
    with pytest.raises(StateError):
        s.split([1, 1])
    with pytest.raises(StateError):
        s.select(3)
    assert all(unchanged(x, snaps[i]) for i, x in s.items())


def test_model_allclose():
    s = model_state()
    assert s.allclose(s.clone()) and not s.allclose(MambaModelState({0: s[0]})) and not s.allclose(s[0])
    # documented: only tensors are compared, not seqlen_offset nor metadata
    assert s.allclose(MambaModelState(s.layers, seqlen_offset=s.seqlen_offset + 1, metadata={"other": 1}))


@pytest.mark.parametrize("make", [m1, m2, model_state])
def test_to_shares_unconverted_tensors_unless_copy(make):
    s = make()

    def tensors(x):
        layers = x.items() if isinstance(x, MambaModelState) else [(0, x)]
        return [t for _, layer in layers for t in (layer.conv_state, layer.ssm_state)]

    same = s.to("cpu")  # nothing to convert: shared, as Tensor.to shares
    assert same is not s and all(a is b for a, b in zip(tensors(same), tensors(s)))
    fresh = s.to("cpu", copy=True)
    assert all(a.data_ptr() != b.data_ptr() and torch.equal(a, b) for a, b in zip(tensors(fresh), tensors(s)))
    fresh.zero_()
    assert all(t.abs().sum() > 0 for t in tensors(s))
    cast = s.to(dtype=torch.float64, copy=True)
    assert all(t.dtype == torch.float64 for t in tensors(cast))
    if isinstance(s, MambaModelState):
        assert fresh.seqlen_offset == s.seqlen_offset and fresh.metadata == s.metadata


def test_pickle_rebuilds_through_validation():
    s = model_state()
    back = pickle.loads(pickle.dumps(s))
    assert back.allclose(s, 0, 0) and back.seqlen_offset == 7 and back.metadata == s.metadata
