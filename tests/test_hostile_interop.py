"""set_model_state is all or nothing also for caches that cannot be written, and for states whose layers disagree
on the batch size (issue 21, item 4)."""

from __future__ import annotations

import pytest
import torch

import mamba_state as ms
from mamba_state import MambaInferenceState, MambaModelState, StateCompatibilityError, StateShapeError
from mamba_state.layers import find_mamba_layers
from state_builders import tiny_lm

pytestmark = pytest.mark.upstream


def _params(batch=2):
    from mamba_ssm.utils.generation import InferenceParams

    return InferenceParams(max_seqlen=16, max_batch_size=batch)


def _model_state(model, batch=2, seed=0, offset=4):
    states = {}
    for i, layer in find_mamba_layers(model).items():
        layout = ms.layers.layer_layout(layer)
        g = torch.Generator().manual_seed(seed + i)
        states[i] = MambaInferenceState(torch.randn(batch, *layout["conv_shape"], generator=g),
                                        torch.randn(batch, *layout["ssm_shape"], generator=g))
    return MambaModelState(states, seqlen_offset=offset)


def _snapshot(params):
    return {i: (c.clone(), s.clone()) for i, (c, s) in params.key_value_memory_dict.items()}


def _unchanged(params, snap):
    d = params.key_value_memory_dict
    return set(d) == set(snap) and all(torch.equal(d[i][0], c) and torch.equal(d[i][1], s)
                                       for i, (c, s) in snap.items())


@pytest.fixture(params=["mamba1", "mamba2"])
def model(request):
    return tiny_lm(request.param, n_layer=3)


def _cached(model):
    params = _params()
    ms.set_model_state(model, _model_state(model, seed=1), params)
    return params


def test_a_stride_zero_cache_in_the_last_layer_changes_nothing(model):
    params = _cached(model)
    last = max(params.key_value_memory_dict)
    conv, ssm = params.key_value_memory_dict[last]
    params.key_value_memory_dict[last] = (conv, ssm[:1].expand_as(ssm))  # one row seen twice: copy_ refuses it
    snap = _snapshot(params)
    with pytest.raises(StateCompatibilityError, match=f"layer {last} ssm_state.*share memory"):
        ms.set_model_state(model, _model_state(model, seed=2, offset=9), params)
    assert _unchanged(params, snap) and params.seqlen_offset == 4


def test_an_inference_tensor_cache_changes_nothing(model):
    params = _cached(model)
    last = max(params.key_value_memory_dict)
    conv, ssm = params.key_value_memory_dict[last]
    with torch.inference_mode():
        frozen = conv.clone()
    params.key_value_memory_dict[last] = (frozen, ssm)
    snap = _snapshot(params)
    with pytest.raises(StateCompatibilityError, match=f"layer {last} conv_state.*inference tensor"):
        ms.set_model_state(model, _model_state(model, seed=2), params)
    assert _unchanged(params, snap)
    with torch.inference_mode():  # where copy_ can write it, it is written
        ms.set_model_state(model, _model_state(model, seed=2), params)
    assert torch.equal(params.key_value_memory_dict[last][0], _model_state(model, seed=2)[last].conv_state)


def test_layers_with_different_batch_sizes_are_refused_before_writing(model):
    state = _model_state(model, batch=2)
    last = state.layer_indices[-1]
    state[last].conv_state = state[last].conv_state[:1]  # replaced after the container checked it
    state[last].ssm_state = state[last].ssm_state[:1]
    params = _params()
    with pytest.raises(StateShapeError, match="one batch size"):
        ms.set_model_state(model, state, params)
    assert params.key_value_memory_dict == {} and params.seqlen_offset == 0
