"""Hypothesis properties for DESIGN.md's laws: continuation, reset, round trip, cat/split, select, all-or-nothing."""

from __future__ import annotations

import functools
import pytest
import torch
from hypothesis import given, strategies as st

import mamba_state as ms
from mamba_state import MambaInferenceState, MambaModelState, StateError
from mamba_state.io import load_state
from mamba_state.reference import (causal_conv1d_ref, selective_scan_chunked, selective_scan_ref,
                                   selective_state_update_ref)
from state_builders import bit_identical, model_bit_identical, rand_state

F64 = torch.float64
SCANS = {"ref": selective_scan_ref, "chunked": selective_scan_chunked,
         "chunked-small-blocks": functools.partial(selective_scan_chunked, chunk_size=2, block_size=3)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def scan_problem(draw, min_len=2):
    """Tiny float64 scan inputs with an initial state; B/C layout drawn among plain, grouped and constant."""
    b, d, n = draw(st.integers(1, 3)), draw(st.sampled_from([2, 4])), draw(st.integers(1, 3))
    L = draw(st.integers(min_len, 12))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def r(*s):
        return torch.randn(*s, generator=g, dtype=F64)

    def bc():
        layout = draw(st.sampled_from(["plain", "groups", "const"]))
        return {"plain": lambda: r(b, n, L), "groups": lambda: r(b, 2, n, L), "const": lambda: r(d, n)}[layout]()

    kw = dict(u=r(b, d, L), delta=r(b, d, L), A=-torch.rand(d, n, generator=g, dtype=F64) - 0.05, B=bc(), C=bc(),
              D=r(d), z=r(b, d, L), delta_bias=r(d), initial_state=r(b, d, n))
    return kw


def _time_slice(kw, start, stop):
    """The inputs of steps [start, stop) (time-varying tensors sliced; constant B/C and params kept)."""
    out = dict(kw)
    for k in ("u", "delta", "z"):
        out[k] = kw[k][..., start:stop]
    for k in ("B", "C"):
        if kw[k].dim() >= 3:
            out[k] = kw[k][..., start:stop]
    if kw.get("reset") is not None:
        out["reset"] = kw["reset"][:, start:stop]
    return out


TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(SCANS))
@given(kw=scan_problem(), data=st.data())
def test_scan_continuation(name, kw, data):
    fn = SCANS[name]
    L = kw["u"].shape[-1]
    cut = data.draw(st.integers(1, L - 1))
    whole, last = fn(**kw, delta_softplus=True, return_last_state=True)
    first, mid = fn(**_time_slice(kw, 0, cut), delta_softplus=True, return_last_state=True)
    second, last2 = fn(**{**_time_slice(kw, cut, L), "initial_state": mid}, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(torch.cat([first, second], -1), whole, **TOL)
    torch.testing.assert_close(last2, last, **TOL)


@given(kw=scan_problem())
def test_stepping_equals_one_call(kw):
    whole, last = selective_scan_chunked(**kw, delta_softplus=True, return_last_state=True)
    state = kw["initial_state"].clone()
    for t in range(kw["u"].shape[-1]):
        b = kw["u"].shape[0]
        # the step takes B/C per token; constant [dim, dstate] is the same as dim groups of one channel
        at = lambda x: x[..., t] if x.dim() >= 3 else x.expand(b, *x.shape)  # noqa: E731
        y = selective_state_update_ref(state, kw["u"][..., t], kw["delta"][..., t], kw["A"], at(kw["B"]), at(kw["C"]),
                                       kw["D"], kw["z"][..., t], kw["delta_bias"], dt_softplus=True)
        torch.testing.assert_close(y, whole[..., t], **TOL)
    torch.testing.assert_close(state, last, **TOL)


@pytest.mark.parametrize("name", list(SCANS))
@given(kw=scan_problem(), data=st.data())
def test_scan_reset_is_a_fresh_start(name, kw, data):
    fn = SCANS[name]
    b, L = kw["u"].shape[0], kw["u"].shape[-1]
    row, t = data.draw(st.integers(0, b - 1)), data.draw(st.integers(0, L - 1))
    noise = torch.rand(b, L, generator=torch.Generator().manual_seed(t)) < 0.2
    noise[row, t:] = False  # the last reset of this row is at t
    noise[row, t] = True
    kw["reset"] = noise
    out, last = fn(**kw, return_last_state=True)
    fresh = _time_slice(kw, t, L)
    fresh = {k: (v[row:row + 1] if isinstance(v, torch.Tensor) and v.dim() >= 3 and k != "A" else v)
             for k, v in fresh.items()}
    fresh.update(initial_state=None, reset=None)
    if kw["B"].dim() == 2:
        fresh["B"] = kw["B"]
    if kw["C"].dim() == 2:
        fresh["C"] = kw["C"]
    want, want_last = selective_scan_ref(**fresh, return_last_state=True)
    torch.testing.assert_close(out[row:row + 1, :, t:], want, **TOL)
    torch.testing.assert_close(last[row:row + 1], want_last, **TOL)


@given(data=st.data())
def test_conv_continuation_and_reset(data):
    b, ch, W, L = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4)), data.draw(st.integers(2, 4)), \
        data.draw(st.integers(2, 10))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x, w, bias, init = (torch.randn(b, ch, L, generator=g, dtype=F64), torch.randn(ch, W, generator=g, dtype=F64),
                        torch.randn(ch, generator=g, dtype=F64), torch.randn(b, ch, W, generator=g, dtype=F64))
    cut = data.draw(st.integers(1, L - 1))
    whole, last = causal_conv1d_ref(x, w, bias, conv_state=init, activation="silu")
    a, mid = causal_conv1d_ref(x[..., :cut], w, bias, conv_state=init, activation="silu")
    c, last2 = causal_conv1d_ref(x[..., cut:], w, bias, conv_state=mid, activation="silu")
    torch.testing.assert_close(torch.cat([a, c], -1), whole, **TOL)
    assert torch.equal(last2, last)
    row, t = data.draw(st.integers(0, b - 1)), data.draw(st.integers(0, L - 1))
    reset = torch.zeros(b, L, dtype=torch.bool)
    reset[row, t] = True
    out, st_r = causal_conv1d_ref(x, w, bias, conv_state=init, reset=reset)
    want, want_state = causal_conv1d_ref(x[row:row + 1, :, t:], w, bias)
    torch.testing.assert_close(out[row:row + 1, :, t:], want, **TOL)
    assert torch.equal(st_r[row:row + 1], want_state)


# ------------------------------------------------------------------ containers
@st.composite
def states(draw, batch=None):
    kind = draw(st.sampled_from(["mamba1", "mamba2"]))
    return rand_state(kind, batch=draw(st.integers(0, 4)) if batch is None else batch,
                      dtype=draw(st.sampled_from(DTYPES)), seed=draw(st.integers(0, 10_000)),
                      d_state=draw(st.integers(1, 4)), d_conv=draw(st.integers(1, 4)), ngroups=draw(st.integers(1, 2)))


@given(s=states(), special=st.booleans())
def test_round_trip_is_bit_identical(tmp_path_factory, s, special):
    if special and s.batch_size:
        s.ssm_state.view(-1)[0] = float("nan")
        s.conv_state.view(-1)[-1] = -0.0
    path = tmp_path_factory.mktemp("rt") / "s.mstate"
    s.save(path)
    assert bit_identical(MambaInferenceState.load(path), s)
    m = MambaModelState({0: s, 4: s.clone()}, seqlen_offset=3, metadata={"k": [1]})
    m.save(path)
    assert model_bit_identical(MambaModelState.load(path), m)


@given(s=states(), data=st.data())
def test_cat_split_identity(s, data):
    sizes, left = [], s.batch_size
    while left:
        k = data.draw(st.integers(0, left))
        sizes.append(k)
        left -= k
    sizes.append(0)
    parts = s.split(sizes)
    assert [p.batch_size for p in parts] == sizes
    assert bit_identical(MambaInferenceState.cat(parts), s)
    m = MambaModelState({1: s, 2: s.clone()})
    assert all(model_bit_identical(a, b) for a, b in zip(MambaModelState.cat(m.split(sizes)).split(sizes), m.split(sizes)))


@pytest.mark.parametrize("name", list(SCANS))
@given(kw=scan_problem(), data=st.data())
def test_select_commutes_with_the_scan(name, kw, data):
    fn = SCANS[name]
    b = kw["u"].shape[0]
    rows = data.draw(st.lists(st.integers(0, b - 1), min_size=1, max_size=4))
    d, n = kw["A"].shape
    conv = torch.randn(b, d, 3, dtype=F64)
    state = MambaInferenceState(conv, kw["initial_state"])
    out, last = fn(**kw, return_last_state=True)
    sub = state.select(torch.tensor(rows))
    kw_sub = {k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() >= 3 and k != "A" else v) for k, v in kw.items()}
    kw_sub["initial_state"] = sub.ssm_state
    for k in ("B", "C"):
        if kw[k].dim() == 2:
            kw_sub[k] = kw[k]
    out_s, last_s = fn(**kw_sub, return_last_state=True)
    torch.testing.assert_close(out_s, out[rows], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(MambaInferenceState(sub.conv_state, last_s).ssm_state,
                               MambaInferenceState(conv, last).select(torch.tensor(rows)).ssm_state, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ all or nothing
@pytest.mark.upstream
@given(data=st.data())
def test_set_model_state_all_or_nothing(data):
    from mamba_ssm.utils.generation import InferenceParams
    from mamba_state.layers import find_mamba_layers

    model = _model(data.draw(st.sampled_from(["mamba1", "mamba2"])))
    layers = find_mamba_layers(model)
    params = InferenceParams(max_seqlen=8, max_batch_size=2)

    def state_for(layer, seed, batch=2):
        lay = ms.layers.layer_layout(layer)
        g = torch.Generator().manual_seed(seed)
        return MambaInferenceState(torch.randn(batch, *lay["conv_shape"], generator=g),
                                   torch.randn(batch, *lay["ssm_shape"], generator=g))

    prefill = data.draw(st.booleans())
    if prefill:
        ms.set_model_state(model, MambaModelState({i: state_for(l, i) for i, l in layers.items()}, seqlen_offset=2), params)
    before = {i: tuple(t.clone() for t in pair) for i, pair in params.key_value_memory_dict.items()}
    bad_idx = data.draw(st.sampled_from(sorted(layers)))
    how = data.draw(st.sampled_from(["d_state", "batch", "meta", "missing"]))
    new = {i: state_for(l, 100 + i) for i, l in layers.items()}
    good = new[bad_idx]
    if how == "d_state":  # half the d_state: still a valid state, but not this layer's
        new[bad_idx] = MambaInferenceState(good.conv_state, good.ssm_state[..., : good.ssm_state.shape[-1] // 2].clone())
    elif how == "batch":  # unlike the existing cache (batch 2), or over max_batch_size on an empty one
        new = {i: state_for(l, 7, batch=1 if prefill else 3) for i, l in layers.items()}
    elif how == "meta":
        new[bad_idx] = good.to(device="meta")
    else:
        del new[bad_idx]
    bad_state = MambaModelState(new, seqlen_offset=5)
    with pytest.raises(StateError):
        ms.set_model_state(model, bad_state, params)
    after = params.key_value_memory_dict
    assert set(after) == set(before) and params.seqlen_offset == (2 if prefill else 0)
    assert all(torch.equal(after[i][k], before[i][k]) for i in before for k in (0, 1))


_MODELS: dict = {}


def _model(kind):
    if kind not in _MODELS:
        from state_builders import tiny_lm

        _MODELS[kind] = tiny_lm(kind, n_layer=3)
    return _MODELS[kind]


@given(s=states(batch=2), data=st.data())
def test_failed_load_changes_nothing(tmp_path_factory, s, data):
    directory = tmp_path_factory.mktemp("load")
    path = directory / "s.mstate"
    s.save(path)
    good = path.read_bytes()
    how = data.draw(st.sampled_from(["truncate", "flip", "append"]))
    if how == "truncate":
        bad = good[:data.draw(st.integers(0, len(good) - 1))]
    elif how == "flip":
        i = data.draw(st.integers(0, len(good) - 1))
        bad = good[:i] + bytes([good[i] ^ (1 << data.draw(st.integers(0, 7)))]) + good[i + 1:]
    else:
        bad = good + data.draw(st.binary(min_size=1, max_size=16))
    (directory / "bad.mstate").write_bytes(bad)
    held = s.clone()
    with pytest.raises(ms.StateFormatError):
        load_state(directory / "bad.mstate")
    assert path.read_bytes() == good and (directory / "bad.mstate").read_bytes() == bad
    assert bit_identical(s, held)
    # a failed save over an existing file leaves it as it was
    with pytest.raises(StateError):
        MambaInferenceState(s.conv_state.to(torch.float8_e4m3fn), s.ssm_state).save(path)
    assert path.read_bytes() == good and sorted(p.name for p in directory.iterdir()) == ["bad.mstate", "s.mstate"]
