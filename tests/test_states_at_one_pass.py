"""States at positions from one pass of the Triton scan (kernels/selective_scan/positions.py; issue 19 item 6):
values and gradients of every input equal those of the float64 oracle run segment by segment (stopping at each
position), over batches, channel groups, resets, duplicate positions, 0 and the length, both forward schedules
and both backward schedules; one forward launch whatever the number of positions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_state.kernels import selective_scan_fn
from mamba_state.kernels.selective_scan import ops, positions as positions_mod
from mamba_state.kernels.selective_scan.naive import selective_scan_ref

F64 = torch.float64


def _inputs(seed, b, d, n, L, groups):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    bc = (b, groups, n, L) if groups > 1 else (b, n, L)
    return dict(u=r(b, d, L), delta=0.5 * r(b, d, L) - 1.0, A=-torch.exp(0.5 * r(d, n)), B=r(*bc), C=r(*bc),
                D=r(d), z=r(b, d, L), delta_bias=0.1 * r(d))


def _oracle(inp, h0, reset, pos):
    """Outputs, final state and states at ``pos`` by running the float64 oracle segment by segment."""
    L = inp["u"].shape[-1]
    cuts = sorted({p for p in pos if 0 < p < L})
    edges = [0, *cuts, L]
    state, outs, at = h0, [], {0: h0}

    def part(t, a, b):
        return t[..., a:b] if t.dim() >= 3 else t

    for a, b in zip(edges[:-1], edges[1:]):
        out, state = selective_scan_ref(**{k: part(v, a, b) for k, v in inp.items()}, delta_softplus=True,
                                        return_last_state=True, initial_state=state,
                                        reset=None if reset is None else reset[:, a:b])
        outs.append(out)
        at[b] = state
    states = torch.stack([at[p] for p in pos]) if pos else h0.new_zeros(0, *h0.shape)
    return torch.cat(outs, -1), state, states


def _loss(out, last, states, w):
    return (out * w["out"]).sum() + (last * w["last"]).sum() + (states * w["states"]).sum()


def _weights(seed, b, d, n, L, k):
    g = torch.Generator().manual_seed(seed)
    return dict(out=torch.randn(b, d, L, generator=g, dtype=F64), last=torch.randn(b, d, n, generator=g, dtype=F64),
                states=torch.randn(k, b, d, n, generator=g, dtype=F64))


def _check(seed, b, d, n, L, groups, pos, with_reset=True, with_h0=True, device="cpu"):
    inp = _inputs(seed, b, d, n, L, groups)
    g = torch.Generator().manual_seed(seed + 1)
    h0 = torch.randn(b, d, n, generator=g, dtype=F64) if with_h0 else torch.zeros(b, d, n, dtype=F64)
    reset = (torch.rand(b, L, generator=g) < 0.15) if with_reset else None
    w = _weights(seed + 2, b, d, n, L, len(pos))
    w_dev = {k: v.to(device) for k, v in w.items()}

    leaves64 = {k: v.clone().requires_grad_() for k, v in inp.items()}
    h64 = h0.clone().requires_grad_()
    out64, last64, st64 = _oracle(leaves64, h64, reset, pos)
    grads64 = torch.autograd.grad(_loss(out64, last64, st64, w), [*leaves64.values(), h64])

    leaves = {k: v.float().to(device).requires_grad_() for k, v in inp.items()}
    h32 = h0.float().to(device).requires_grad_()
    out, last, states = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True,
                                          initial_state=h32 if with_h0 else None,
                                          reset=None if reset is None else reset.to(device), backend="triton",
                                          chunk_size=8, return_states_at=pos)
    assert states.shape == (len(pos), b, d, n) and states.dtype == torch.float32
    wanted = [*leaves.values(), h32] if with_h0 else list(leaves.values())
    grads = torch.autograd.grad(_loss(out.double(), last.double(), states.double(), w_dev), wanted)
    torch.testing.assert_close(out.double().cpu(), out64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last.double().cpu(), last64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(states.double().cpu(), st64, rtol=1e-4, atol=1e-5)
    names = [*leaves, "initial_state"]
    for name, got, ref in zip(names, grads, grads64):
        torch.testing.assert_close(got.double().cpu(), ref, rtol=2e-4, atol=2e-4, msg=name)


@pytest.mark.parametrize("seqpar, bwd", [("0", "seq"), ("1", "chunk")])
def test_one_pass_states_match_the_oracle_by_segments(monkeypatch, seqpar, bwd):
    monkeypatch.setenv("MAMBA_STATE_SCAN_SEQPAR", seqpar)
    monkeypatch.setenv("MAMBA_STATE_SCAN_BWD", bwd)
    # duplicates, 0, a position inside a tile, at a tile edge, at a reset, and the length
    _check(5, 2, 4, 4, 21, 2, [0, 3, 8, 8, 13, 21])


def _check_inference(seed, b, d, n, L, groups, pos, device="cpu"):
    """Without autograd the kernels write the final state apart from the stored rows: it equals the oracle's
    and shares no memory with the states at positions (the length among them)."""
    inp = _inputs(seed, b, d, n, L, groups)
    g = torch.Generator().manual_seed(seed + 1)
    h0 = torch.randn(b, d, n, generator=g, dtype=F64)
    reset = torch.rand(b, L, generator=g) < 0.15
    out64, last64, st64 = _oracle(inp, h0, reset, pos)
    with torch.no_grad():
        out, last, states = selective_scan_fn(**{k: v.float().to(device) for k, v in inp.items()},
                                              delta_softplus=True, return_last_state=True,
                                              initial_state=h0.float().to(device), reset=reset.to(device),
                                              backend="triton", chunk_size=8, return_states_at=pos)
    torch.testing.assert_close(out.double().cpu(), out64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last.double().cpu(), last64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(states.double().cpu(), st64, rtol=1e-4, atol=1e-5)
    before = states.clone()
    last.zero_()  # the caller may modify the final state in place: the states beside it stay
    assert torch.equal(states, before)


@pytest.mark.parametrize("seqpar", ["0", "1"])
def test_one_pass_states_without_autograd_write_the_final_state_apart(monkeypatch, seqpar):
    monkeypatch.setenv("MAMBA_STATE_SCAN_SEQPAR", seqpar)
    _check_inference(11, 2, 4, 4, 21, 2, [0, 3, 8, 8, 13, 21])
    _check_inference(12, 1, 8, 4, 19, 1, [5, 19])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("seqpar, bwd", [("0", "seq"), ("1", "chunk")])
def test_gpu_one_pass_states_match_the_oracle_by_segments(monkeypatch, seqpar, bwd):
    """The compiled kernels (not the interpreter): positions at tile edges and inside, resets, channel groups, and
    a sequence long enough for several chunks of the default schedule."""
    monkeypatch.setenv("MAMBA_STATE_SCAN_SEQPAR", seqpar)
    monkeypatch.setenv("MAMBA_STATE_SCAN_BWD", bwd)
    _check(21, 2, 16, 16, 300, 2, [0, 3, 64, 64, 129, 200, 300], device="cuda")
    _check(22, 3, 8, 16, 77, 1, [1, 77], with_reset=False, with_h0=False, device="cuda")


def test_one_pass_without_initial_state_or_resets():
    _check(6, 3, 4, 4, 16, 1, [1, 16, 16], with_reset=False, with_h0=False)


def test_one_pass_distinct_positions_ending_at_the_length():
    """Distinct positions ending at the length (a trace's): the stored rows come back as they are, with the
    initial state in front for position 0; values and gradients as the oracle's."""
    _check(8, 2, 4, 4, 16, 1, [2, 9, 16])
    _check(9, 2, 4, 4, 16, 2, [0, 5, 16])


@settings(max_examples=6)
@given(L=st.integers(1, 19), data=st.data())
def test_one_pass_property_over_positions(L, data):
    pos = sorted(data.draw(st.lists(st.integers(0, L), min_size=0, max_size=5)))
    _check(7 + L, 1, 4, 4, L, 1, pos)


def test_one_forward_launch_for_many_positions(monkeypatch):
    """Eight positions cost one forward call of the kernels (not one per segment), without autograd too."""
    calls = []
    real = positions_mod.forward_launches

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(positions_mod, "forward_launches", spy)
    inp = {k: v.float() for k, v in _inputs(8, 2, 4, 4, 40, 1).items()}
    ref_out = selective_scan_fn(**inp, delta_softplus=True, backend="triton", chunk_size=8)
    out, states = selective_scan_fn(**inp, delta_softplus=True, backend="triton", chunk_size=8,
                                    return_states_at=[5, 10, 15, 20, 25, 30, 35, 40])
    assert len(calls) == 1
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)  # the marks do not touch the outputs
    last = selective_scan_fn(**inp, delta_softplus=True, backend="triton", chunk_size=8, return_last_state=True)[1]
    torch.testing.assert_close(states[-1], last, rtol=0, atol=0)


def test_scanfn_returns_initial_state_gradients_of_the_callers_rows():
    """ScanFn's initial-state gradient has the rows of the initial state it was given (the positions buffer has
    more rows than the batch)."""
    inp = {k: v.float() for k, v in _inputs(9, 2, 4, 4, 16, 1).items()}
    h0 = torch.randn(2, 4, 4, requires_grad=True)
    _, states = selective_scan_fn(**inp, delta_softplus=True, initial_state=h0, backend="triton", chunk_size=8,
                                  return_states_at=[4, 12])
    (g,) = torch.autograd.grad(states.sum(), [h0])
    assert g.shape == h0.shape and g.abs().sum() > 0
    assert ops.ScanFn is positions_mod.ScanFn


def test_layer_on_triton_states_at_positions_equal_stopping_there(monkeypatch):
    """A Mamba-1 layer on the Triton backend (interpreted here) takes the one-pass states: the states it returns
    at positions equal the states of running the chunk cut there, values and gradients into the input."""
    from mamba_state.adapters import StatefulMamba
    from mamba_state.state import MambaInferenceState

    calls = []
    real = positions_mod.scan_states_at_one_pass

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(positions_mod, "scan_states_at_one_pass", spy)
    monkeypatch.setattr("mamba_state.kernels.selective_scan.launcher.scan_states_at_one_pass", spy)
    torch.manual_seed(0)
    layer = StatefulMamba.from_config(8, d_state=4, d_conv=3, layer_idx=0, backend="triton")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 14, 8, generator=g, requires_grad=True)
    s0 = MambaInferenceState(torch.randn(2, 16, 3, generator=g), torch.randn(2, 16, 4, generator=g))
    reset = torch.zeros(2, 14, dtype=torch.bool)
    reset[1, 6] = True
    pos = [0, 6, 9, 14]
    y, new, states = layer(x, s0, reset, return_states_at=pos)
    assert calls, "the layer did not take the one-pass path"
    ys, cur = [], s0
    for a, b in zip([0, 6, 9], [6, 9, 14]):
        yy, cur = layer(x[:, a:b], cur, reset[:, a:b])
        ys.append(yy)
        i = pos.index(b)
        torch.testing.assert_close(states[i].ssm_state, cur.ssm_state, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(states[i].conv_state, cur.conv_state, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(states[0].ssm_state, s0.ssm_state)
    torch.testing.assert_close(y, torch.cat(ys, 1), rtol=1e-4, atol=1e-5)
    (gx,) = torch.autograd.grad(sum(s.ssm_state.sum() for s in states) + y.sum(), [x])
    (gx_ref,) = torch.autograd.grad(cur.ssm_state.sum() + torch.cat(ys, 1).sum() + sum(
        layer(x[:, :p], s0, reset[:, :p])[1].ssm_state.sum() for p in (6, 9)), [x])
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seqpar, bwd", [("0", "seq"), ("1", "chunk")])
def test_packed_states_at_positions_in_one_pass(monkeypatch, seqpar, bwd):
    """Packed sequences with states at positions per sequence (0, interior, repeated, the length, an empty
    sequence): the Triton one pass against the float64 segment path of the reference backend, values and
    gradients of every input (the initial states included), in one forward launch."""
    monkeypatch.setenv("MAMBA_STATE_SCAN_SEQPAR", seqpar)
    monkeypatch.setenv("MAMBA_STATE_SCAN_BWD", bwd)
    lens = [6, 0, 11, 1, 9]
    positions = [[0, 2, 2, 6], [0], [5, 11], [1], [3, 8]]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    L = sum(lens)
    inp = _inputs(11, 1, 4, 4, L, 1)
    g = torch.Generator().manual_seed(12)
    h0 = torch.randn(len(lens), 4, 4, generator=g, dtype=F64)
    reset = torch.rand(1, L, generator=g) < 0.1
    results = []
    calls = []
    real = positions_mod.forward_launches
    monkeypatch.setattr(positions_mod, "forward_launches", lambda *a, **k: calls.append(1) or real(*a, **k))
    for backend, dtype in (("triton", torch.float32), ("reference", F64)):
        leaves = {k: v.to(dtype).clone().requires_grad_() for k, v in inp.items()}
        h = h0.to(dtype).clone().requires_grad_()
        out, last, states = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True, initial_state=h,
                                              reset=reset, cu_seqlens=cu, return_states_at=positions,
                                              backend=backend, chunk_size=8)
        w = torch.Generator().manual_seed(13)
        loss = (out.double() * torch.randn(out.shape, generator=w, dtype=F64)).sum() + last.double().sum()
        loss = loss + sum((x.double() * torch.randn(x.shape, generator=w, dtype=F64)).sum() for x in states)
        grads = torch.autograd.grad(loss, [*leaves.values(), h])
        results.append((out, last, states, grads))
    (out, last, states, grads), (rout, rlast, rstates, rgrads) = results
    torch.testing.assert_close(out.double(), rout, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last.double(), rlast, rtol=1e-4, atol=1e-5)
    for got_s, ref_s in zip(states, rstates):
        torch.testing.assert_close(got_s.double(), ref_s, rtol=1e-4, atol=1e-5)
    for name, got, ref in zip([*inp, "initial_state"], grads, rgrads):
        torch.testing.assert_close(got.double(), ref, rtol=2e-4, atol=2e-4, msg=name)
    assert len(calls) == 0  # the differentiable call goes through ScanFn, not the forward launches directly
    with torch.no_grad():
        selective_scan_fn(**{k: v.float() for k, v in inp.items()}, delta_softplus=True, initial_state=h0.float(),
                          reset=reset, cu_seqlens=cu, return_states_at=positions, backend="triton", chunk_size=8)
    assert len(calls) == 1  # inference: one forward launch for every position of every sequence


def test_states_at_positions_are_copies_not_views_of_the_final_state():
    """The state at the last position is a copy: writing into it (a user's reset_) leaves the final state alone."""
    inp = {k: v.float() for k, v in _inputs(7, 2, 4, 4, 16, 1).items()}
    out, last, states = selective_scan_fn(**inp, delta_softplus=True, return_last_state=True, backend="triton",
                                          chunk_size=8, return_states_at=[4, 16])
    before = last.clone()
    torch.testing.assert_close(states[1], last, rtol=0, atol=0)
    states.zero_()
    torch.testing.assert_close(last, before, rtol=0, atol=0)
