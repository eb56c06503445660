"""States at chosen positions (selective_scan_fn, the adapters, StatefulMambaLM) and traces (trace_layer,
trace_model): equal to stopping there, to stepping token by token, and to the rows of a full trace."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from mamba_state import MambaInferenceState, StatefulMamba, StatefulMamba2, StatefulMambaLM
from mamba_state.errors import StateError, StateShapeError
from mamba_state.kernels import selective_scan_fn
from mamba_state.reference import selective_scan_ref
from mamba_state.scan_positions import check_positions, conv_windows_at
from mamba_state.scan_states import selective_scan_all_states
from mamba_state.trace import LayerTrace, ModelTrace, TraceSizeWarning, trace_layer, trace_model

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny tensors: one torch thread is faster and leaves the shared cores alone."""


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _scan_inputs(seed, b, d, n, L, groups=0, dtype=F64):
    """Random scan inputs (groups 0: B/C [b, n, L]; else [b, groups, n, L])."""
    g = _gen(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64).to(dtype)  # noqa: E731
    bc = (b, groups, n, L) if groups else (b, n, L)
    return dict(u=r(b, d, L), delta=r(b, d, L), A=(-torch.rand(d, n, generator=g, dtype=F64) - 0.3).to(dtype),
                B=r(*bc), C=r(*bc), D=r(d), z=r(b, d, L), delta_bias=r(d) * 0.3)


def _prefix(inp, p):
    return {k: (v[..., :p] if v.dim() >= 3 else v) for k, v in inp.items()}


def _state_after(inp, p, h0, reset):
    """The oracle: the sequential reference run on the first p tokens only (stopping there)."""
    if p == 0:
        return h0
    _, last = selective_scan_ref(**_prefix(inp, p), delta_softplus=True, return_last_state=True, initial_state=h0,
                                 reset=None if reset is None else reset[:, :p])
    return last


@st.composite
def _positions(draw, L):
    ps = draw(st.lists(st.integers(0, L), min_size=0, max_size=6))
    return sorted(ps)


# ---------------------------------------------------------------------------------------------- positions
def test_check_positions_accepts_lists_ranges_tensors_and_rejects_the_rest():
    assert check_positions([0, 2, 2, 5], 5) == [0, 2, 2, 5]
    assert check_positions(range(0, 6, 2), 5) == [0, 2, 4]
    assert check_positions(torch.tensor([1, 3]), 5) == [1, 3]
    assert check_positions(np.array([0, 5]), 5) == [0, 5]
    for bad, what in (([3, 1], "non-decreasing"), ([0, 6], r"\[0, 5\]"), ([-1], r"\[0, 5\]"), ([1.0], "ints"),
                      ([True], "ints"), (torch.tensor([0.5]), "integer"), ("12", "list of ints")):
        with pytest.raises(StateError, match=what):
            check_positions(bad, 5)


def test_conv_windows_at_position_zero_is_the_incoming_window_and_resets_clear_older_inputs():
    g = _gen(3)
    cs, x = torch.randn(2, 3, 4, generator=g, dtype=F64), torch.randn(2, 3, 6, generator=g, dtype=F64)
    reset = torch.zeros(2, 6, dtype=torch.bool)
    reset[1, 2] = True
    win = conv_windows_at(cs, x, [0, 2, 3, 6], reset)
    torch.testing.assert_close(win[0], cs, rtol=0, atol=0)
    torch.testing.assert_close(win[1], torch.cat([cs[:, :, 2:], x[:, :, :2]], -1), rtol=0, atol=0)  # reset not yet
    torch.testing.assert_close(win[2, 0], torch.cat([cs[0, :, 3:], x[0, :, :3]], -1), rtol=0, atol=0)
    # row 1 after 3 tokens: token 2 started afresh, so only it is visible in the window
    torch.testing.assert_close(win[2, 1], torch.cat([torch.zeros(3, 3, dtype=F64), x[1, :, 2:3]], -1), rtol=0,
                               atol=0)
    torch.testing.assert_close(win[3, 1], x[1, :, 2:], rtol=0, atol=0)


def _windows_by_slicing(cs, x, positions, reset):
    """The window after each position, one position at a time: the last W entries of the incoming window followed
    by x's first p tokens, with entries from before the latest reset in tokens [0, p) zeroed."""
    W = cs.shape[-1]
    out = []
    for p in positions:
        win = torch.cat([cs, x[:, :, :p].to(cs.dtype)], -1)[:, :, p:p + W].clone()
        if reset is not None:
            for b in range(cs.shape[0]):
                hits = [t for t in range(p) if reset[b, t]]
                if hits:  # token hits[-1] started afresh: it sits at entry W - (p - hits[-1]) of the window
                    win[b, :, :max(W - (p - hits[-1]), 0)] = 0
        out.append(win)
    return torch.stack(out) if out else cs.new_zeros(0, *cs.shape)


@given(data=st.data())
def test_conv_windows_at_equal_slicing_one_position_at_a_time(data):
    W = data.draw(st.integers(1, 4), label="W")
    L = data.draw(st.integers(0, 9), label="L")
    b = data.draw(st.integers(1, 3), label="b")
    seed = data.draw(st.integers(0, 10 ** 6), label="seed")
    g = _gen(seed)
    cs = torch.randn(b, 2, W, generator=g, dtype=F64)
    x = torch.randn(b, 2, L, generator=g, dtype=torch.float32)  # another dtype than the state's: cast on gather
    reset = (torch.rand(b, L, generator=g) < 0.3) if data.draw(st.booleans(), label="reset") else None
    positions = sorted(data.draw(st.lists(st.integers(0, L), max_size=6), label="positions"))
    got = conv_windows_at(cs, x, positions, reset)
    assert got.shape == (len(positions), b, 2, W) and got.dtype == F64 and got.is_contiguous()
    torch.testing.assert_close(got, _windows_by_slicing(cs, x, positions, reset), rtol=0, atol=0)


@pytest.mark.parametrize("L, positions", [(5, [1, 2, 3, 4, 5]), (300, [0, 2, 150, 300]), (300, [10, 300]),
                                          (300, [3]), (0, [0, 0]), (300, [60, 120, 180, 240, 300]),
                                          (300, [2, 100, 200, 300]), (300, [100, 103]), (300, [50, 50, 300])])
def test_conv_windows_at_both_ways_of_gathering(L, positions):
    """A short chunk or many positions take the concatenate-then-gather way, a long chunk with few positions the
    gather of single columns (from the window, from x, or both): each equals slicing, with and without resets."""
    g = _gen(L + len(positions))
    cs = torch.randn(3, 5, 4, generator=g, dtype=F64)
    x = torch.randn(3, 5, L, generator=g, dtype=torch.float32)
    for reset in (None, torch.rand(3, L, generator=g) < 0.05):
        got = conv_windows_at(cs, x, positions, reset)
        torch.testing.assert_close(got, _windows_by_slicing(cs, x, positions, reset), rtol=0, atol=0)


@given(data=st.data())
def test_conv_windows_at_evenly_spaced_positions_in_a_long_chunk(data):
    """Evenly spaced positions of a long chunk are read as one strided view of x (no gather): equal to slicing,
    overlapping windows (a step under W) included."""
    W = data.draw(st.integers(1, 4), label="W")
    L = data.draw(st.integers(60, 160), label="L")
    count = data.draw(st.integers(2, 3), label="count")
    step = data.draw(st.integers(1, L // count), label="step")
    first = data.draw(st.integers(0, L - (count - 1) * step), label="first")
    positions = [first + i * step for i in range(count)]
    seed = data.draw(st.integers(0, 10 ** 6), label="seed")
    g = _gen(seed)
    cs = torch.randn(2, 3, W, generator=g, dtype=F64)
    x = torch.randn(2, 3, L, generator=g, dtype=torch.float32)
    reset = (torch.rand(2, L, generator=g) < 0.05) if data.draw(st.booleans(), label="reset") else None
    got = conv_windows_at(cs, x, positions, reset)
    assert got.shape == (count, 2, 3, W) and got.dtype == F64 and got.is_contiguous()
    torch.testing.assert_close(got, _windows_by_slicing(cs, x, positions, reset), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- the scan
@given(data=st.data())
def test_scan_states_at_equal_stopping_there_reference(data):
    L = data.draw(st.integers(1, 14), label="L")
    b, groups = data.draw(st.sampled_from([(1, 0), (2, 0), (2, 2)]), label="b, groups")
    seed = data.draw(st.integers(0, 10 ** 6), label="seed")
    inp = _scan_inputs(seed, b, 4, 3, L, groups)
    g = _gen(seed + 1)
    h0 = torch.randn(b, 4, 3, generator=g, dtype=F64) if data.draw(st.booleans(), label="h0") else None
    reset = (torch.rand(b, L, generator=g) < 0.25) if data.draw(st.booleans(), label="reset") else None
    pos = data.draw(_positions(L), label="positions")
    out, last, states = selective_scan_fn(**inp, delta_softplus=True, return_last_state=True, initial_state=h0,
                                          reset=reset, backend="reference", return_states_at=pos)
    ref_out, ref_last = selective_scan_ref(**inp, delta_softplus=True, return_last_state=True, initial_state=h0,
                                           reset=reset)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(last, ref_last, rtol=1e-10, atol=1e-11)
    assert states.shape == (len(pos), b, 4, 3) and states.dtype == F64
    zero = torch.zeros(b, 4, 3, dtype=F64)
    for i, p in enumerate(pos):
        torch.testing.assert_close(states[i], _state_after(inp, p, zero if h0 is None else h0, reset),
                                   rtol=1e-10, atol=1e-11)


@given(data=st.data())
def test_all_states_scan_equals_the_sequential_reference(data):
    """The dense path (every state kept) against the sequential oracle, chunk sizes and padding included."""
    L = data.draw(st.integers(1, 40), label="L")
    b, groups = data.draw(st.sampled_from([(1, 0), (2, 0), (2, 2)]), label="b, groups")
    chunk = data.draw(st.sampled_from([None, 1, 3, 8, 64]), label="chunk")
    seed = data.draw(st.integers(0, 10 ** 6), label="seed")
    inp = _scan_inputs(seed, b, 4, 3, L, groups)
    g = _gen(seed + 1)
    h0 = torch.randn(b, 4, 3, generator=g, dtype=F64) if data.draw(st.booleans(), label="h0") else None
    reset = (torch.rand(b, L, generator=g) < 0.2) if data.draw(st.booleans(), label="reset") else None
    out, every = selective_scan_all_states(**inp, delta_softplus=True, initial_state=h0, reset=reset,
                                           chunk_size=chunk)
    ref_out = selective_scan_ref(**inp, delta_softplus=True, initial_state=h0, reset=reset)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-11)
    assert every.shape == (L + 1, b, 4, 3)
    zero = torch.zeros(b, 4, 3, dtype=F64)
    for p in sorted({0, 1, L // 2, L - 1, L}):
        torch.testing.assert_close(every[p], _state_after(inp, p, zero if h0 is None else h0, reset),
                                   rtol=1e-10, atol=1e-11)


def test_dense_positions_take_one_pass_with_the_same_values_and_gradients(monkeypatch):
    """Many positions use selective_scan_all_states; forcing segments instead gives the same values and
    gradients (float64, reference backend)."""
    import mamba_state.scan_positions as sp

    b, d, n, L = 2, 3, 2, 50
    pos = list(range(L + 1))
    inp = _scan_inputs(31, b, d, n, L, groups=0)
    h0 = torch.randn(b, d, n, generator=_gen(32), dtype=F64)
    reset = torch.rand(b, L, generator=_gen(33)) < 0.1
    w = _weights(34, b, d, n, L, len(pos))
    assert sp.use_dense_states(pos, L) and not sp.use_dense_states(pos[::10], L)
    dense = _grads(inp, h0, reset, pos, w, "reference", F64)
    monkeypatch.setattr(sp, "DENSE_MIN_SEGMENTS", 10 ** 9)
    assert not sp.use_dense_states(pos, L)
    segmented = _grads(inp, h0, reset, pos, w, "reference", F64)
    torch.testing.assert_close(dense[0], segmented[0], rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(dense[1], segmented[1], rtol=1e-10, atol=1e-11)
    for k in dense[2]:
        torch.testing.assert_close(dense[2][k], segmented[2][k], rtol=1e-9, atol=1e-10, msg=k)


def test_scan_states_at_return_convention():
    inp = _scan_inputs(0, 1, 2, 2, 5)
    out, states = selective_scan_fn(**inp, return_states_at=[5])
    assert out.shape == (1, 2, 5) and states.shape == (1, 1, 2, 2)
    _, last = selective_scan_fn(**inp, return_last_state=True)
    torch.testing.assert_close(states[0], last)
    empty = selective_scan_fn(**inp, return_states_at=[])[1]
    assert empty.shape == (0, 1, 2, 2)
    with pytest.raises(StateError, match=r"\[0, 5\]"):
        selective_scan_fn(**inp, return_states_at=[6])


def _grads(inp, h0, reset, pos, weights, backend, dtype):
    leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in inp.items()}
    h = h0.detach().to(dtype).requires_grad_()
    out, last, states = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True, initial_state=h,
                                          reset=reset, backend=backend, return_states_at=pos)
    w_out, w_last, w_states = weights
    loss = (out.double() * w_out).sum() + (last.double() * w_last).sum() + (states.double() * w_states).sum()
    loss.backward()
    return out, states, {**{k: v.grad for k, v in leaves.items()}, "h0": h.grad}


def _grads_by_stopping(inp, h0, reset, pos, weights):
    """Independent float64 oracle: each state from its own sequential run on the prefix."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    h = h0.detach().clone().requires_grad_()
    out, last = selective_scan_ref(**leaves, delta_softplus=True, return_last_state=True, initial_state=h, reset=reset)
    states = torch.stack([_state_after(leaves, p, h, reset) for p in pos])
    w_out, w_last, w_states = weights
    ((out * w_out).sum() + (last * w_last).sum() + (states * w_states).sum()).backward()
    return out, states, {**{k: v.grad for k, v in leaves.items()}, "h0": h.grad}


def _weights(seed, b, d, n, L, P):
    g = _gen(seed)
    return (torch.randn(b, d, L, generator=g, dtype=F64), torch.randn(b, d, n, generator=g, dtype=F64),
            torch.randn(P, b, d, n, generator=g, dtype=F64))


def test_scan_states_at_gradients_reference_float64():
    b, d, n, L, pos = 2, 3, 2, 9, [0, 2, 2, 5, 9]
    inp = _scan_inputs(11, b, d, n, L, groups=0)
    h0 = torch.randn(b, d, n, generator=_gen(12), dtype=F64)
    reset = torch.zeros(b, L, dtype=torch.bool)
    reset[0, 5] = True  # exactly at a segment boundary
    reset[1, 3] = True
    w = _weights(13, b, d, n, L, len(pos))
    out, states, grads = _grads(inp, h0, reset, pos, w, "reference", F64)
    ref_out, ref_states, ref_grads = _grads_by_stopping(inp, h0, reset, pos, w)
    torch.testing.assert_close(states, ref_states, rtol=1e-10, atol=1e-11)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-9, atol=1e-10, msg=k)


@pytest.mark.parametrize("groups, pos", [(0, [0, 3, 5, 11]), (2, [4, 4, 5, 7])])  # [4, 5): a 1-token segment
def test_scan_states_at_triton_interpreter_values_and_gradients(groups, pos):
    """The Triton kernels (interpreted on CPU) cut into segments: values and gradients vs the float64 oracle."""
    b, d, n, L = 1, 4, 4, 11
    inp = _scan_inputs(21 + groups, b, d, n, L, groups)
    h0 = torch.randn(b, d, n, generator=_gen(22), dtype=F64)
    reset = torch.zeros(b, L, dtype=torch.bool)
    reset[0, 5] = True
    w = _weights(23, b, d, n, L, len(pos))
    out, states, grads = _grads(inp, h0, reset, pos, w, "triton", torch.float32)
    ref_out, ref_states, ref_grads = _grads_by_stopping(inp, h0, reset, pos, w)
    assert states.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(states.double(), ref_states, rtol=1e-4, atol=1e-5)
    for k in ref_grads:
        torch.testing.assert_close(grads[k].double(), ref_grads[k], rtol=1e-4, atol=1e-4, msg=k)


# ---------------------------------------------------------------------------------------------- the adapters
def _mamba1(seed=0):
    torch.manual_seed(seed)
    layer = StatefulMamba.from_config(8, d_state=4, d_conv=3, layer_idx=0).to(F64)
    with torch.no_grad():
        layer.D.add_(torch.randn(layer.D.shape, generator=_gen(seed + 1), dtype=F64))
    return layer


def _mamba2(seed=0, **cfg):
    torch.manual_seed(seed)
    cfg = cfg or dict(d_state=4, headdim=4, ngroups=2)
    layer = StatefulMamba2.from_config(16, layer_idx=0, dtype=F64, **cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=_gen(seed + 2), dtype=F64))
    return layer


def _random_state(layer, b, seed):
    z = layer.new_state(b, dtype=F64)
    g = _gen(seed)
    return MambaInferenceState(torch.randn(z.conv_state.shape, generator=g, dtype=F64),
                               0.5 * torch.randn(z.ssm_state.shape, generator=g, dtype=F64))


def _mamba2_gated(seed=0):
    """No norm (y gated by silu(z) in the scan), D per channel, a gated-MLP part, a dt limit, d_conv 3."""
    return _mamba2(seed, d_state=4, headdim=8, d_ssm=16, rmsnorm=False, D_has_hdim=True, d_conv=3,
                   dt_limit=(0.01, 0.3))


LAYERS = {"mamba1": _mamba1, "mamba2": _mamba2, "mamba2_gated": _mamba2_gated}


@pytest.mark.parametrize("kind", sorted(LAYERS))
@given(data=st.data())
def test_layer_states_at_equal_stopping_there(kind, data):
    layer = LAYERS[kind]()
    L = data.draw(st.integers(1, 10), label="L")
    seed = data.draw(st.integers(0, 10 ** 6), label="seed")
    g = _gen(seed)
    x = torch.randn(2, L, layer.d_model, generator=g, dtype=F64)
    s0 = _random_state(layer, 2, seed + 1)
    reset = (torch.rand(2, L, generator=g) < 0.3) if data.draw(st.booleans(), label="reset") else None
    pos = data.draw(_positions(L), label="positions")
    y, new, states = layer(x, s0, reset, return_states_at=pos)
    y_ref, new_ref = layer(x, s0, reset)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-11)
    assert new.allclose(new_ref, rtol=1e-10, atol=1e-11)
    assert len(states) == len(pos)
    for p, s in zip(pos, states):
        ref = s0 if p == 0 else layer(x[:, :p], s0, None if reset is None else reset[:, :p])[1]
        torch.testing.assert_close(s.conv_state, ref.conv_state, rtol=1e-10, atol=1e-11)
        torch.testing.assert_close(s.ssm_state, ref.ssm_state, rtol=1e-10, atol=1e-11)


# ---------------------------------------------------------------------------------------------- trace_layer
@pytest.mark.parametrize("kind, L", [("mamba1", 9), ("mamba1", 40), ("mamba2", 9), ("mamba2", 40),
                                     ("mamba2_gated", 40)])
def test_full_trace_equals_stepping_token_by_token(kind, L):
    """L = 9 runs segments; L = 40 (more than 32 segments) takes the dense one-pass path."""
    layer = LAYERS[kind](5)
    x = torch.randn(2, L, layer.d_model, generator=_gen(6), dtype=F64)
    s = _random_state(layer, 2, 7)
    tr = trace_layer(layer, x, s)
    assert isinstance(tr, LayerTrace) and tr.positions == list(range(L + 1))
    assert tr.outputs.shape == (L, 2, layer.d_model)
    assert tr.ssm_states.shape == (L + 1, *s.ssm_state.shape)
    assert tr.conv_states.shape == (L + 1, *s.conv_state.shape)
    torch.testing.assert_close(tr.ssm_states[0], s.ssm_state, rtol=0, atol=0)
    for t in range(L):
        y_t, s = layer.step(x[:, t], s)
        torch.testing.assert_close(tr.outputs[t], y_t, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(tr.ssm_states[t + 1], s.ssm_state, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(tr.conv_states[t + 1], s.conv_state, rtol=1e-9, atol=1e-10)
    assert tr.state_at(-1).allclose(s, rtol=1e-9, atol=1e-10)


def test_traced_positions_and_stride_are_rows_of_the_full_trace():
    layer = _mamba1(8)
    x = torch.randn(1, 13, 8, generator=_gen(9), dtype=F64)
    s0 = _random_state(layer, 1, 10)
    reset = torch.zeros(1, 13, dtype=torch.bool)
    reset[0, 6] = True
    full = trace_layer(layer, x, s0, reset=reset)
    for kw, rows in ((dict(positions=[0, 4, 6, 6, 13]), [0, 4, 6, 6, 13]), (dict(stride=4), [0, 4, 8, 12]),
                     (dict(positions=torch.tensor([7])), [7])):
        part = trace_layer(layer, x, s0, reset=reset, **kw)
        assert part.positions == rows
        torch.testing.assert_close(part.ssm_states, full.ssm_states[rows], rtol=1e-10, atol=1e-11)
        torch.testing.assert_close(part.conv_states, full.conv_states[rows], rtol=1e-10, atol=1e-11)
        torch.testing.assert_close(part.outputs, full.outputs, rtol=1e-10, atol=1e-11)
    none = trace_layer(layer, x, s0, positions=[])
    assert none.ssm_states.shape == (0, 1, 16, 4) and len(none) == 0
    with pytest.raises(StateError, match="not both"):
        trace_layer(layer, x, positions=[1], stride=2)
    with pytest.raises(StateError, match="stride"):
        trace_layer(layer, x, stride=0)
    # errors name the argument the caller passed (positions), not the adapter's return_states_at
    for bad, words in (([14], ["expected positions in [0, 13]", "found 14"]), ([5, 2], ["non-decreasing"]),
                       ([1.5], ["expected ints"])):
        with pytest.raises(StateError) as exc:
            trace_layer(layer, x, positions=bad)
        assert str(exc.value).startswith("positions: ") and "return_states_at" not in str(exc.value)
        assert all(w in str(exc.value) for w in words), str(exc.value)
    with pytest.raises(StateShapeError, match="seqlen"):
        trace_layer(layer, x[0])


def test_full_trace_warns_with_its_size_before_allocating():
    layer = _mamba1()
    x = torch.randn(1, 6, 8, dtype=F64)
    expected = 7 * 1 * (16 * 3 + 16 * 4) * 8  # rows * batch * (conv + ssm elements) * float64 bytes
    with pytest.warns(TraceSizeWarning, match=f"{expected} bytes"):
        trace_layer(layer, x, layer.new_state(1, dtype=F64), warn_bytes=expected - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trace_layer(layer, x, layer.new_state(1, dtype=F64), warn_bytes=expected)
        trace_layer(layer, x, layer.new_state(1, dtype=F64), stride=2, warn_bytes=1)  # not a full trace


def test_trace_runs_without_autograd_unless_asked():
    layer = _mamba1()
    x = torch.randn(1, 4, 8, dtype=F64)
    assert not trace_layer(layer, x).ssm_states.requires_grad
    tr = trace_layer(layer, x, requires_grad=True)
    tr.ssm_states[-1].sum().backward()
    assert layer.A_log.grad is not None and layer.A_log.grad.abs().sum() > 0


@pytest.mark.upstream
def test_trace_layer_wraps_an_upstream_layer(upstream):
    torch.manual_seed(0)
    up = upstream.Mamba(8, d_state=4, layer_idx=2)
    x = torch.randn(1, 5, 8)
    tr = trace_layer(up, x, positions=[0, 5])
    _, final = StatefulMamba(up)(x)
    assert tr.layer_idx == 2
    torch.testing.assert_close(tr.ssm_states[1], final.ssm_state)


# ---------------------------------------------------------------------------------------------- the model
VOCAB = 29


def _lm(seed=0, n_layer=2, d_intermediate=0):
    torch.manual_seed(seed)
    cfg = dict(d_model=16, n_layer=n_layer, vocab_size=VOCAB, ssm_cfg={"d_state": 4}, d_intermediate=d_intermediate,
               pad_vocab_size_multiple=8)
    lm = StatefulMambaLM.from_config(cfg).to(F64)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.uniform_(0.5, 1.5)
    return lm


def _lm_state(lm, ids):
    """A non-trivial incoming state with a non-zero seqlen_offset."""
    return lm(ids, lm.new_state(ids.shape[0], dtype=F64))[1]


def test_lm_forward_return_states_at_equals_stopping_there():
    lm = _lm(1)
    g = _gen(2)
    ids = torch.randint(0, VOCAB, (2, 11), generator=g)
    s0 = _lm_state(lm, torch.randint(0, VOCAB, (2, 3), generator=g))
    reset = torch.zeros(2, 11, dtype=torch.bool)
    reset[1, 4] = True
    out = lm(ids, s0, reset)
    assert len(out) == 2  # the 2-tuple contract without the argument
    logits, new, states = lm(ids, s0, reset, return_states_at=[0, 4, 7, 11])
    torch.testing.assert_close(logits, out[0], rtol=1e-10, atol=1e-11)
    assert new.allclose(out[1], rtol=1e-10, atol=1e-11) and new.seqlen_offset == 14
    for p, s in zip([0, 4, 7, 11], states):
        ref = s0 if p == 0 else lm(ids[:, :p], s0, reset[:, :p])[1]
        assert s.seqlen_offset == 3 + p
        assert s.layer_indices == ref.layer_indices and s.allclose(ref, rtol=1e-10, atol=1e-11)
    with pytest.raises(StateError, match="non-decreasing"):
        lm(ids, s0, return_states_at=[4, 2])


@pytest.mark.parametrize("d_intermediate", [0, 24])
def test_trace_model_matches_the_model_and_its_states(d_intermediate):
    lm = _lm(3, n_layer=3, d_intermediate=d_intermediate)
    g = _gen(4)
    ids = torch.randint(0, VOCAB, (2, 8), generator=g)
    s0 = _lm_state(lm, torch.randint(0, VOCAB, (2, 2), generator=g))
    mt = trace_model(lm, ids, s0)
    assert isinstance(mt, ModelTrace) and mt.layer_indices == [0, 1, 2] and mt.positions == list(range(9))
    logits, final, states = lm(ids, s0, return_states_at=mt.positions)
    torch.testing.assert_close(mt.logits, logits, rtol=1e-10, atol=1e-11)
    assert mt.final_state.allclose(final, rtol=1e-10, atol=1e-11) and mt.final_state.seqlen_offset == 10
    for i, s in enumerate(states):
        row = mt.state_at(i)
        assert row.seqlen_offset == s.seqlen_offset and row.allclose(s, rtol=1e-10, atol=1e-11)
    for idx, lt in mt.layers.items():
        assert lt.layer_idx == idx and lt.outputs.shape == (8, 2, 16)
    strided = trace_model(lm, ids, s0, stride=3)
    assert strided.positions == [0, 3, 6]
    torch.testing.assert_close(strided.layers[2].ssm_states, mt.layers[2].ssm_states[[0, 3, 6]])
    with pytest.warns(TraceSizeWarning, match="bytes"):
        trace_model(lm, ids, s0, warn_bytes=10)


def _example(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speculative_rollback_example_reproduces_greedy_decoding(capsys):
    """The example asserts its tokens equal greedy decoding and its rolled-back state equals a direct run."""
    stats = _example("speculative_rollback").main(["--new-tokens", "10", "--draft-len", "3"])
    assert stats["accepted_draft_tokens"] > 0 and stats["target_forwards"] < 10
    assert "identical to greedy decoding" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_layer_states_at_triton_equal_stopping_there_and_gradients(dtype):
    """Mamba-1 on CUDA (Triton scan in segments): states at positions vs prefix runs, and gradients into the
    initial state and parameters through the returned states vs the float64 reference path on the CPU."""
    torch.manual_seed(0)
    layer = StatefulMamba.from_config(64, d_state=16, layer_idx=0, device="cuda", dtype=dtype)
    b, L, pos = 2, 300, [0, 1, 37, 128, 128, 299, 300]
    x = torch.randn(b, L, 64, device="cuda", dtype=dtype)
    s0 = layer.new_state(b)
    s0 = MambaInferenceState(torch.randn_like(s0.conv_state), 0.3 * torch.randn_like(s0.ssm_state))
    reset = torch.zeros(b, L, dtype=torch.bool, device="cuda")
    reset[1, 128] = True
    reset[0, 50] = True
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    with torch.no_grad():
        y, new, states = layer(x, s0, reset, return_states_at=pos)
        y_ref, new_ref = layer(x, s0, reset)
        torch.testing.assert_close(y, y_ref, **tol)
        for p, s in zip(pos, states):
            ref = s0 if p == 0 else layer(x[:, :p], s0, reset[:, :p])[1]
            torch.testing.assert_close(s.ssm_state, ref.ssm_state, **tol)
            torch.testing.assert_close(s.conv_state, ref.conv_state, **tol)
    if dtype != torch.float32:
        return
    cpu = StatefulMamba.from_config(64, d_state=16, layer_idx=0, dtype=F64, backend="reference")
    cpu.load_state_dict({k: v.double().cpu() for k, v in layer.state_dict().items()})
    w = torch.randn(len(pos), b, layer.d_inner, 16, dtype=F64)

    def grads(m, dev, dt):
        h = s0.ssm_state.detach().to(dev, dt).requires_grad_()
        _, _, st_ = m(x.to(dev, dt), MambaInferenceState(s0.conv_state.to(dev, dt), h), reset.to(dev),
                      return_states_at=pos)
        loss = sum((s.ssm_state.double().cpu() * w[i]).sum() for i, s in enumerate(st_))
        loss.backward()
        return h.grad.double().cpu(), m.A_log.grad.double().cpu()

    g_gpu, g_ref = grads(layer, "cuda", torch.float32), grads(cpu, "cpu", F64)
    for a, r in zip(g_gpu, g_ref):
        assert ((a - r).abs().max() / r.abs().max()).item() < 2e-3


@pytest.mark.gpu
@pytest.mark.upstream
def test_gpu_mamba2_states_at_with_upstream_chunk_scan(upstream):
    """Mamba-2 on CUDA: upstream's fused SSD scan run in segments, states equal prefix runs."""
    torch.manual_seed(0)
    layer = StatefulMamba2.from_config(128, d_state=32, headdim=32, ngroups=2, chunk_size=64, layer_idx=0,
                                       device="cuda")
    assert layer.resolved_backend("cuda")[0] == "triton"
    b, L, pos = 2, 200, [0, 10, 64, 65, 200]
    x = torch.randn(b, L, 128, device="cuda")
    s0 = layer.new_state(b)
    s0 = MambaInferenceState(torch.randn_like(s0.conv_state), 0.3 * torch.randn_like(s0.ssm_state))
    reset = torch.zeros(b, L, dtype=torch.bool, device="cuda")
    reset[0, 64] = True
    with torch.no_grad():
        y, _, states = layer(x, s0, reset, return_states_at=pos)
        torch.testing.assert_close(y, layer(x, s0, reset)[0], rtol=2e-3, atol=2e-3)
        for p, s in zip(pos, states):
            ref = s0 if p == 0 else layer(x[:, :p], s0, reset[:, :p])[1]
            torch.testing.assert_close(s.ssm_state, ref.ssm_state, rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(s.conv_state, ref.conv_state, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
def test_gpu_trace_model_matches_the_model():
    torch.manual_seed(0)
    cfg = dict(d_model=64, n_layer=3, vocab_size=VOCAB, ssm_cfg={"d_state": 16}, pad_vocab_size_multiple=8)
    lm = StatefulMambaLM.from_config(cfg, device="cuda")
    ids = torch.randint(0, VOCAB, (2, 70), device="cuda")
    mt = trace_model(lm, ids, stride=7)
    with torch.no_grad():
        logits, final = lm(ids)
    torch.testing.assert_close(mt.logits, logits, rtol=1e-3, atol=1e-3)
    assert mt.final_state.allclose(final, rtol=1e-3, atol=1e-3)
    assert mt.layers[2].ssm_states.shape == (11, 2, 128, 16) and mt.layers[2].ssm_states.is_cuda


def _layer_of(kind, backend):
    if kind == "mamba1":
        return StatefulMamba, StatefulMamba.from_config(16, d_state=4, d_conv=4, layer_idx=0, backend=backend)
    return StatefulMamba2, StatefulMamba2.from_config(32, d_state=8, headdim=8, layer_idx=0, backend=backend)


@pytest.mark.parametrize("kind, backend, L", [("mamba1", "reference", 21), ("mamba1", "triton", 21),
                                              ("mamba2", "reference", 21), ("mamba2", "reference", 0)])
def test_trace_takes_the_stacked_states_and_equals_the_forward(monkeypatch, kind, backend, L):
    """trace_layer on a Mamba-1 or Mamba-2 layer gets the states stacked from the layer (no state object per
    position) and they equal the forward's states at the same positions, every tensor, with resets and an
    initial state (an empty chunk too, which Mamba-2 layers take and Mamba-1 layers refuse)."""
    torch.manual_seed(3)
    cls, layer = _layer_of(kind, backend)
    x = torch.randn(2, L, layer.d_model)
    s0 = layer.new_state(2)
    for t in s0.tensors.values():
        t.copy_(torch.randn_like(t))
    reset = torch.zeros(2, L, dtype=torch.bool)
    if L > 7:
        reset[1, 7] = True
    calls = []
    real = cls._forward_stacked_states
    monkeypatch.setattr(cls, "_forward_stacked_states", lambda self, *a: calls.append(1) or real(self, *a))
    tr = trace_layer(layer, x, s0, reset=reset)
    assert calls == [1]
    with torch.no_grad():
        y, new, states = layer(x, s0, reset=reset, return_states_at=list(range(L + 1)))
    torch.testing.assert_close(tr.outputs, y.transpose(0, 1), rtol=0, atol=0)
    for name in ("conv_state", "ssm_state"):
        want = torch.stack([s.tensors[name] for s in states])
        torch.testing.assert_close(tr.states[name], want, rtol=0, atol=0)
    torch.testing.assert_close(tr.ssm_states[-1], new.ssm_state, rtol=0, atol=0)


def test_check_positions_returns_a_new_list_and_rechecks_for_another_length():
    mine = [0, 3, 8]
    checked = check_positions(mine, 10)
    assert checked == mine and checked is not mine
    assert check_positions(checked, 10) is checked  # a second check for the same length: the same list
    with pytest.raises(StateError, match=r"expected positions in \[0, 5\].*found 8"):
        check_positions(checked, 5)  # checked for 10, not for 5
