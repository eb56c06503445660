"""Interop with upstream's InferenceParams cache: get/set/zero for one layer and for whole models."""

from __future__ import annotations

import pytest
import torch

import mamba_state as ms
from mamba_state import MambaInferenceState, MambaModelState, StateCompatibilityError, StateError, StateShapeError
from mamba_state.layers import find_mamba_layers, model_layout
from state_builders import tiny_lm

pytestmark = pytest.mark.upstream


def _params(batch=2):
    from mamba_ssm.utils.generation import InferenceParams

    return InferenceParams(max_seqlen=16, max_batch_size=batch)


def _state_for(layer, batch=2, seed=0, dtype=torch.float32):
    layout = ms.layers.layer_layout(layer)
    g = torch.Generator().manual_seed(seed)
    return MambaInferenceState(torch.randn(batch, *layout["conv_shape"], generator=g).to(dtype),
                               torch.randn(batch, *layout["ssm_shape"], generator=g).to(dtype))


def _model_state(model, batch=2, seed=0, offset=4):
    return MambaModelState({i: _state_for(l, batch, seed + i) for i, l in find_mamba_layers(model).items()},
                           seqlen_offset=offset)


def _snapshot(params):
    return {i: (c.clone(), s.clone(), c, s) for i, (c, s) in params.key_value_memory_dict.items()}


def _same_as(params, snap):
    d = params.key_value_memory_dict
    return set(d) == set(snap) and all(
        d[i][0] is c0 and d[i][1] is s0 and torch.equal(c0, c) and torch.equal(s0, s) for i, (c, s, c0, s0) in snap.items())


@pytest.fixture(params=["mamba1", "mamba2"])
def model(request):
    return tiny_lm(request.param, n_layer=2)


def test_allocation_matches_upstream(model):
    for idx, layer in find_mamba_layers(model).items():
        ours, theirs = _params(), _params()
        ms.set_inference_state(layer, _state_for(layer), ours)
        conv_u, ssm_u = layer._get_states_from_cache(theirs, 2)
        conv, ssm = ours.key_value_memory_dict[idx]
        for a, b in ((conv, conv_u), (ssm, ssm_u)):
            assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride()


def test_allocation_follows_layer_dtype():
    model = tiny_lm("mamba1", n_layer=1).to(torch.bfloat16)
    layer = find_mamba_layers(model)[0]
    params = _params()
    s = _state_for(layer)
    ms.set_inference_state(layer, s, params)
    conv, ssm = params.key_value_memory_dict[0]
    assert conv.dtype == ssm.dtype == torch.bfloat16
    assert torch.equal(ssm, s.ssm_state.to(torch.bfloat16))  # copied with a cast into upstream's dtype


def test_layer_get_set_zero(model):
    layer = find_mamba_layers(model)[1]
    params = _params()
    assert ms.get_inference_state(layer, params) is None
    s = _state_for(layer, seed=3)
    ms.set_inference_state(layer, s, params)
    conv, ssm = params.key_value_memory_dict[1]
    got = ms.get_inference_state(layer, params)
    assert got.allclose(s, 0, 0) and got.conv_state.data_ptr() != conv.data_ptr()
    got.zero_()  # a clone: the cache is not touched
    assert torch.equal(ssm, s.ssm_state)
    # in place: the very same tensors stay in the cache
    s2 = _state_for(layer, seed=4)
    ms.set_inference_state(layer, s2, params)
    assert params.key_value_memory_dict[1][0] is conv and params.key_value_memory_dict[1][1] is ssm
    assert torch.equal(ssm, s2.ssm_state) and torch.equal(conv, s2.conv_state)
    ms.zero_inference_state(layer, params)
    assert conv.abs().sum() == 0 and ssm.abs().sum() == 0 and params.key_value_memory_dict[1][1] is ssm
    ms.zero_inference_state(find_mamba_layers(model)[0], params)  # nothing cached: nothing to do
    assert 0 not in params.key_value_memory_dict


def test_get_returns_detached_clones(model):
    layer = find_mamba_layers(model)[0]
    params = _params()
    ms.set_inference_state(layer, _state_for(layer), params)
    conv, ssm = params.key_value_memory_dict[0]
    params.key_value_memory_dict[0] = (conv.requires_grad_(), ssm)
    got = ms.get_inference_state(layer, params)
    assert not got.conv_state.requires_grad and got.conv_state.grad_fn is None


def test_layer_set_rejects_bad_states_and_changes_nothing(model):
    layer = find_mamba_layers(model)[0]
    params = _params()
    ms.set_inference_state(layer, _state_for(layer), params)
    snap = _snapshot(params)
    other = tiny_lm("mamba1" if ms.layers.layer_layout(layer)["kind"] == "mamba2" else "mamba2", n_layer=1)
    cases = [
        (_state_for(layer, batch=3), StateShapeError, ["batch size", "2", "3"]),
        (_state_for(find_mamba_layers(other)[0]), StateCompatibilityError, ["kind", "expected", "found"]),
        (_state_for(layer).to(device="meta"), StateError, ["meta"]),
        ("state", StateError, ["MambaInferenceState", "str"]),
    ]
    for bad, err, words in cases:
        with pytest.raises(err) as exc:
            ms.set_inference_state(layer, bad, params)
        assert all(w in str(exc.value) for w in words), str(exc.value)
        assert _same_as(params, snap)


def _with_tensor(state, name, tensor):
    """A state whose ``name`` tensor was replaced after construction (attributes are plain and assignable)."""
    out = state.clone()
    setattr(out, name, tensor)
    return out


def test_set_casts_floating_dtypes_like_copy(model):
    layer = find_mamba_layers(model)[0]
    params = _params()
    ms.set_inference_state(layer, _state_for(layer, seed=1), params)
    conv, ssm = params.key_value_memory_dict[0]
    wide = _state_for(layer, seed=2, dtype=torch.float64)
    ms.set_inference_state(layer, wide, params)
    assert params.key_value_memory_dict[0][1] is ssm and ssm.dtype == torch.float32
    assert torch.equal(ssm, wide.ssm_state.to(torch.float32)) and torch.equal(conv, wide.conv_state.float())
    half = _state_for(layer, seed=3, dtype=torch.bfloat16)
    ms.set_inference_state(layer, half, params)
    assert torch.equal(ssm, half.ssm_state.float())
    # a narrowing cast: float64 values beyond float16's range become inf, as Tensor.copy_ does
    hp = _params()
    hp.key_value_memory_dict[0] = (conv.clone().half(), ssm.clone().half())
    big = _state_for(layer, seed=4, dtype=torch.float64)
    big.ssm_state.view(-1)[0] = 1e6
    ms.set_inference_state(layer, big, hp)
    out = hp.key_value_memory_dict[0][1]
    assert out.dtype == torch.float16 and out.flatten()[0].isinf() and torch.equal(out, big.ssm_state.half())


@pytest.mark.parametrize("name", ["conv_state", "ssm_state"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_set_rejects_non_floating_dtypes_before_writing(model, name, dtype):
    params = _params()
    ms.set_model_state(model, _model_state(model, seed=1, offset=3), params)
    snap = _snapshot(params)
    good = _model_state(model, seed=2)
    bad_layer = _with_tensor(good[1], name, getattr(good[1], name).to(dtype))
    with pytest.raises(StateCompatibilityError) as exc:
        ms.set_model_state(model, MambaModelState({0: good[0], 1: bad_layer}), params)
    msg = str(exc.value)
    assert f"layer 1 {name} dtype" in msg and "expected a real floating dtype" in msg, msg
    assert str(dtype) in msg and "torch.float32" in msg, msg  # found, and the cache's dtype it would be cast to
    assert _same_as(params, snap) and params.seqlen_offset == 3  # layer 0 was not written either
    with pytest.raises(StateCompatibilityError, match=f"found {dtype}"):
        ms.set_inference_state(find_mamba_layers(model)[1], bad_layer, params)
    assert _same_as(params, snap)
    fresh = _params()  # no cache yet: nothing allocated
    with pytest.raises(StateCompatibilityError):
        ms.set_model_state(model, MambaModelState({0: good[0], 1: bad_layer}), fresh)
    assert fresh.key_value_memory_dict == {}


def test_set_rejects_a_non_floating_cache(model):
    layer = find_mamba_layers(model)[0]
    params = _params()
    ms.set_inference_state(layer, _state_for(layer), params)
    conv, ssm = params.key_value_memory_dict[0]
    params.key_value_memory_dict[0] = (conv, ssm.to(torch.int64))
    snap = _snapshot(params)
    with pytest.raises(StateCompatibilityError) as exc:
        ms.set_inference_state(layer, _state_for(layer, seed=7), params)
    assert "inference cache of layer 0 ssm_state dtype" in str(exc.value) and "torch.int64" in str(exc.value)
    assert _same_as(params, snap)


def test_set_rejects_a_cache_shaped_unlike_its_layer(model):
    """A hand-made cache whose tensors disagree with the layer's layout is reported before any layer is written."""
    params = _params()
    ms.set_model_state(model, _model_state(model, seed=1), params)
    conv, ssm = params.key_value_memory_dict[1]
    params.key_value_memory_dict[1] = (conv, ssm[..., :-1].clone())  # layer 1's cache one d_state short
    snap = _snapshot(params)
    with pytest.raises(StateShapeError) as exc:
        ms.set_model_state(model, _model_state(model, seed=2), params)
    assert all(w in str(exc.value) for w in ("layer 1", "ssm_state", str(list(ssm.shape)), "existing cache"))
    assert _same_as(params, snap)


def test_bad_arguments(model):
    layer = find_mamba_layers(model)[0]
    with pytest.raises(StateError, match="key_value_memory_dict"):
        ms.get_inference_state(layer, object())
    with pytest.raises(StateCompatibilityError, match="Linear"):
        ms.get_inference_state(torch.nn.Linear(2, 2), _params())
    params = _params()
    params.key_value_memory_dict[0] = "junk"
    with pytest.raises(StateCompatibilityError, match="pair"):
        ms.get_inference_state(layer, params)


# ------------------------------------------------------------------ whole models
def test_model_round_trip(model):
    params = _params()
    assert ms.get_model_state(model, params) is None
    s = _model_state(model, offset=9)
    ms.set_model_state(model, s, params)
    assert params.seqlen_offset == 9 and set(params.key_value_memory_dict) == {0, 1}
    got = ms.get_model_state(model, params)
    assert got.allclose(s, 0, 0) and got.seqlen_offset == 9
    tensors = {i: pair for i, pair in params.key_value_memory_dict.items()}
    ms.set_model_state(model, _model_state(model, seed=5), params)
    assert all(params.key_value_memory_dict[i][k] is tensors[i][k] for i in tensors for k in (0, 1))
    ms.zero_model_state(model, params)
    assert params.seqlen_offset == 0
    assert all(t.abs().sum() == 0 for pair in params.key_value_memory_dict.values() for t in pair)


def test_model_state_matches_upstream_allocate_inference_cache(model):
    cache = model.allocate_inference_cache(2, 16)
    params = _params()
    ms.set_model_state(model, _model_state(model), params)
    for i, (conv, ssm) in cache.items():
        ours = params.key_value_memory_dict[i]
        assert ours[0].shape == conv.shape and ours[1].shape == ssm.shape and ours[1].dtype == ssm.dtype


def test_model_set_is_all_or_nothing(model):
    params = _params()
    ms.set_model_state(model, _model_state(model, seed=1, offset=3), params)
    snap = _snapshot(params)
    good = _model_state(model, seed=2)
    half = good[1].ssm_state[..., : good[1].ssm_state.shape[-1] // 2].clone()  # layer 1 with half its d_state
    bad_layer = MambaInferenceState(good[1].conv_state, half)
    cases = [
        (MambaModelState({0: good[0], 1: bad_layer}), StateCompatibilityError, ["layer 1"]),
        (MambaModelState({0: good[0], 1: good[1].to(device="meta")}), StateError, ["meta"]),
        (MambaModelState({0: good[0]}), StateCompatibilityError, ["[0, 1]", "[0]"]),
        (_model_state(model, batch=3), StateShapeError, ["max_batch_size=2", "3"]),
        (good[0], StateError, ["MambaModelState"]),
    ]
    for bad, err, words in cases:
        with pytest.raises(err) as exc:
            ms.set_model_state(model, bad, params)
        assert all(w in str(exc.value) for w in words), str(exc.value)
        assert _same_as(params, snap) and params.seqlen_offset == 3
    # on an empty cache a failure allocates nothing either
    fresh = _params()
    with pytest.raises(StateCompatibilityError):
        ms.set_model_state(model, MambaModelState({0: good[0], 1: bad_layer}), fresh)
    assert fresh.key_value_memory_dict == {} and fresh.seqlen_offset == 0


def test_partially_cached_model_is_reported(model):
    params = _params()
    layer0 = find_mamba_layers(model)[0]
    ms.set_inference_state(layer0, _state_for(layer0), params)
    with pytest.raises(StateCompatibilityError, match=r"\[1\] missing"):
        ms.get_model_state(model, params)


def test_attention_models_are_refused():
    model = tiny_lm("mamba1", n_layer=2, attn=True)
    params = _params()
    state = MambaModelState({0: _state_for(find_mamba_layers(tiny_lm("mamba1", n_layer=1))[0])})
    for call in (lambda: ms.get_model_state(model, params), lambda: ms.set_model_state(model, state, params),
                 lambda: ms.zero_model_state(model, params), lambda: model_layout(model)):
        with pytest.raises(StateCompatibilityError, match="attention"):
            call()
    assert params.key_value_memory_dict == {}
