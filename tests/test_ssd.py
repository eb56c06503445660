"""SSD scans (mamba_state.ssd): chunked vs sequential oracle, continuation, resets, gradients, upstream agreement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from mamba_state.errors import StateError, StateShapeError
from mamba_state.ssd import ssd_scan_chunked, ssd_scan_ref

F64 = torch.float64


def make_inputs(seed, b=2, L=11, h=4, p=3, g=2, n=5, dtype=F64, D_hdim=False, with_z=True, reset_p=0.0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    inp = dict(
        x=r(b, L, h, p), dt=r(b, L, h), A=-(torch.rand(h, generator=gen, dtype=F64) * 2 + 0.2),
        B=r(b, L, g, n), C=r(b, L, g, n), D=r(h, p) if D_hdim else r(h), z=r(b, L, h, p) if with_z else None,
        dt_bias=r(h) * 0.5, initial_state=r(b, h, p, n),
    )
    inp = {k: (v.to(dtype) if v is not None and k not in ("A",) else v) for k, v in inp.items()}
    reset = (torch.rand(b, L, generator=gen) < reset_p) if reset_p > 0 else None
    return inp, reset


def run(fn, inp, reset=None, **kw):
    return fn(**inp, reset=reset, dt_softplus=True, return_final_state=True, **kw)


@pytest.mark.parametrize("chunk", [1, 3, 4, 8, 64])
@pytest.mark.parametrize("g", [1, 2])
@pytest.mark.parametrize("D_hdim", [False, True])
def test_chunked_matches_sequential_float64(chunk, g, D_hdim):
    inp, reset = make_inputs(chunk * 10 + g, L=13, g=g, D_hdim=D_hdim, reset_p=0.2)
    reset[0, 0] = True  # a reset on the first token drops the initial state
    y_ref, s_ref = run(ssd_scan_ref, inp, reset)
    y, s = run(ssd_scan_chunked, inp, reset, chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_dt_limit_and_no_softplus():
    inp, reset = make_inputs(3, reset_p=0.3)
    for kw in ({"dt_limit": (0.05, 0.5), "dt_softplus": True}, {"dt_softplus": False}):
        inp2 = dict(inp)
        if not kw["dt_softplus"]:
            inp2["dt"] = inp["dt"].abs()
            inp2["dt_bias"] = None
        y_ref, s_ref = ssd_scan_ref(**inp2, reset=reset, return_final_state=True, **kw)
        y, s = ssd_scan_chunked(**inp2, reset=reset, return_final_state=True, chunk_size=4, **kw)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
    # the limit really clamps: a tiny upper limit changes the output
    y_free = ssd_scan_ref(**inp, dt_softplus=True)
    y_lim = ssd_scan_ref(**inp, dt_softplus=True, dt_limit=(0.0, 1e-3))
    assert (y_free - y_lim).abs().max() > 1e-3


def test_sequential_oracle_by_hand():
    """The oracle itself, against an explicit per-element loop on one head."""
    inp, _ = make_inputs(5, b=1, L=4, h=2, p=2, g=1, n=3, with_z=False)
    y, s = ssd_scan_ref(**inp, dt_softplus=True, return_final_state=True)
    dt = F.softplus(inp["dt"] + inp["dt_bias"])
    S = inp["initial_state"][0].clone()
    for t in range(4):
        for hh in range(2):
            a = torch.exp(dt[0, t, hh] * inp["A"][hh])
            for pp in range(2):
                for nn_ in range(3):
                    S[hh, pp, nn_] = a * S[hh, pp, nn_] + dt[0, t, hh] * inp["x"][0, t, hh, pp] * inp["B"][0, t, 0, nn_]
                out = (S[hh, pp] * inp["C"][0, t, 0]).sum() + inp["D"][hh] * inp["x"][0, t, hh, pp]
                assert torch.allclose(y[0, t, hh, pp], out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s[0], S, rtol=1e-12, atol=1e-12)


@given(data=st.data())
def test_continuation_property(data):
    L = data.draw(st.integers(2, 20), label="L")
    inp, reset = make_inputs(data.draw(st.integers(0, 10**6), label="seed"), L=L,
                             reset_p=data.draw(st.sampled_from([0.0, 0.2])))
    chunk = data.draw(st.sampled_from([None, 1, 2, 5]), label="chunk")
    cuts = sorted(set(data.draw(st.lists(st.integers(1, L - 1), max_size=4), label="cuts")))
    y_all, s_all = run(ssd_scan_chunked, inp, reset, chunk_size=chunk)
    state, ys = inp["initial_state"], []
    for a, b in zip([0] + cuts, cuts + [L]):
        part = {k: (v[:, a:b] if k in ("x", "dt", "B", "C", "z") and v is not None else v) for k, v in inp.items()}
        part["initial_state"] = state
        y, state = run(ssd_scan_chunked, part, None if reset is None else reset[:, a:b], chunk_size=chunk)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_all, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, s_all, rtol=1e-10, atol=1e-10)


def test_reset_starts_afresh():
    inp, _ = make_inputs(11, L=12)
    reset = torch.zeros(2, 12, dtype=torch.bool)
    reset[1, 5] = True
    y, s = run(ssd_scan_chunked, inp, reset, chunk_size=4)
    fresh = {k: (v[1:, 5:] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inp.items()}
    fresh["initial_state"] = None
    y_f, s_f = run(ssd_scan_ref, fresh)
    torch.testing.assert_close(y[1:, 5:], y_f, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s[1:], s_f, rtol=1e-10, atol=1e-10)
    # row 0 had no reset: it still depends on its initial state
    y0 = run(ssd_scan_ref, {**inp, "initial_state": torch.zeros_like(inp["initial_state"])})[0]
    assert (y0[0] - y[0]).abs().max() > 1e-6


def test_gradients_match_oracle_and_finite_differences():
    inp, reset = make_inputs(21, b=1, L=6, h=2, p=2, g=1, n=3, reset_p=0.25)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items() if v is not None}
    y, s = run(ssd_scan_chunked, leaves, reset, chunk_size=4)
    (y.square().sum() + (s * 0.7).sum()).backward()
    grads = {k: v.grad.clone() for k, v in leaves.items()}
    leaves_ref = {k: v.clone().requires_grad_(True) for k, v in inp.items() if v is not None}
    y_r, s_r = run(ssd_scan_ref, leaves_ref, reset)
    (y_r.square().sum() + (s_r * 0.7).sum()).backward()
    for k, v in leaves_ref.items():
        assert torch.isfinite(grads[k]).all()
        torch.testing.assert_close(grads[k], v.grad, rtol=1e-9, atol=1e-9, msg=k)
    assert grads["initial_state"].abs().sum() > 0

    names = ["x", "dt", "A", "B", "C", "initial_state"]

    def f(*args):
        kw = dict(inp)
        kw.update(zip(names, args))
        return run(ssd_scan_chunked, kw, reset, chunk_size=4)

    assert torch.autograd.gradcheck(f, tuple(inp[k].clone().requires_grad_(True) for k in names))


def test_half_inputs_compute_in_float32():
    inp, reset = make_inputs(8, L=9, reset_p=0.2)
    half = {k: (v.to(torch.bfloat16) if v is not None and k not in ("initial_state",) else v) for k, v in inp.items()}
    half["initial_state"] = inp["initial_state"].float()
    y, s = run(ssd_scan_chunked, half, reset)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    ref_in = {k: (v.double() if v is not None else None) for k, v in half.items()}
    y_r, s_r = run(ssd_scan_ref, ref_in, reset)
    torch.testing.assert_close(y.double(), y_r, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(s.double(), s_r, rtol=1e-4, atol=1e-4)


def test_empty_and_no_state():
    inp, _ = make_inputs(2, L=5)
    inp["initial_state"] = None
    y, s = run(ssd_scan_chunked, inp)
    y_r, s_r = run(ssd_scan_ref, inp)
    torch.testing.assert_close(y, y_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_r, rtol=1e-10, atol=1e-10)
    empty = {k: (v[:, :0] if k in ("x", "dt", "B", "C", "z") and v is not None else v) for k, v in inp.items()}
    y0, s0 = run(ssd_scan_chunked, empty)
    assert y0.shape == (2, 0, 4, 3) and torch.equal(s0, torch.zeros_like(s0))


def test_bad_inputs_raise():
    inp, _ = make_inputs(1)
    with pytest.raises(StateShapeError, match="initial_state"):
        ssd_scan_chunked(**{**inp, "initial_state": torch.zeros(2, 4, 3, 4, dtype=F64)})
    with pytest.raises(StateShapeError, match="reset"):
        ssd_scan_chunked(**inp, reset=torch.zeros(2, 11))
    with pytest.raises(StateShapeError, match="ngroups"):
        ssd_scan_ref(**{**inp, "B": torch.zeros(2, 11, 3, 5, dtype=F64), "C": torch.zeros(2, 11, 3, 5, dtype=F64)})
    with pytest.raises(StateShapeError, match="dt"):
        ssd_scan_ref(**{**inp, "dt": torch.zeros(2, 11, 3, dtype=F64)})
    with pytest.raises(StateError, match="chunk_size"):
        ssd_scan_chunked(**inp, chunk_size=0)


@pytest.mark.upstream
@pytest.mark.parametrize("g", [1, 2])
def test_agrees_with_upstream_ssd_minimal(upstream, g):
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete

    inp, _ = make_inputs(31 + g, L=13, g=g, with_z=False)
    y, s = run(ssd_scan_chunked, {**inp, "D": None})
    dt = F.softplus(inp["dt"] + inp["dt_bias"])
    rep = inp["x"].shape[2] // g
    block, pad = 4, 3  # upstream's minimal needs a multiple of the block length: pad with empty steps

    def padded(t):
        return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))

    y_up, s_up = ssd_minimal_discrete(
        padded(inp["x"] * dt[..., None]), padded(inp["A"] * dt), padded(inp["B"].repeat_interleave(rep, 2)),
        padded(inp["C"].repeat_interleave(rep, 2)), block, initial_states=inp["initial_state"][:, None],
    )
    torch.testing.assert_close(y, y_up[:, :13], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_up, rtol=1e-10, atol=1e-10)
