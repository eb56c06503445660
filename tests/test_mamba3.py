"""Mamba-3 on the CPU: the float64 references, the adapter's laws, its agreement with upstream's layer
construction, and the generalised state container.

Oracles: ``mamba3_scan_ref`` (the sequential recurrence) and, independent of it, ``_kernel_form_oracle`` below, which
computes the output the way upstream's chunked Triton kernel does (gamma / shifted-gamma "scale" weights, the
diagonal through the q.k product, the incoming k/v states folded into the SSM state before the first token).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, strategies as st

import mamba_state as ms
from mamba_state import MambaInferenceState, StateCompatibilityError, StateError, StateShapeError
from mamba_state.kernels.mamba3 import Mamba3States, mamba3_scan_chunked, mamba3_scan_ref, rotate_pairs

D64 = torch.float64


def _problem(seed, b, L, h, p, g, n, s, with_state=True, reset_p=0.0, dtype=D64):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *sh: torch.randn(*sh, generator=gen, dtype=dtype)  # noqa: E731
    dt = torch.rand(b, L, h, generator=gen, dtype=dtype) * 0.6 + 0.05
    kw = dict(q=r(b, L, g, n), k=r(b, L, g, n), v=r(b, L, h, p), adt=-torch.rand(b, L, h, generator=gen,
                                                                                 dtype=dtype) * 2 * dt,
              dt=dt, trap=r(b, L, h), q_bias=r(h, n), k_bias=r(h, n), angles=r(b, L, h, s), D=r(h), z=r(b, L, h, p))
    if with_state:
        kw["initial_state"] = Mamba3States(torch.rand(b, h, s, generator=gen, dtype=dtype) * 6, r(b, h, p, n),
                                           r(b, h, n), r(b, h, p))
    if reset_p:
        kw["reset"] = torch.rand(b, L, generator=gen) < reset_p
    return kw


@st.composite
def problems(draw, min_len=1):
    h_per_g = draw(st.sampled_from([1, 2]))
    g = draw(st.integers(1, 2))
    n = draw(st.sampled_from([4, 8]))
    return dict(seed=draw(st.integers(0, 2**31 - 1)), b=draw(st.integers(1, 2)), L=draw(st.integers(min_len, 20)),
                h=g * h_per_g, p=draw(st.integers(1, 3)), g=g, n=n, s=draw(st.integers(1, n // 2)),
                with_state=draw(st.booleans()), reset_p=draw(st.sampled_from([0.0, 0.2])))


def _kernel_form_oracle(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, initial_state=None):
    """The output as upstream's chunked SISO kernel forms it, one token row at a time (no resets)."""
    b, L, h, p = v.shape
    n = q.shape[-1]
    rep = h // q.shape[2]
    lam = torch.sigmoid(trap)
    gamma = dt * lam
    shifted = torch.zeros_like(dt)
    shifted[:, :-1] = dt[:, 1:] * (1 - lam[:, 1:])  # the next token's (1 - lam) dt, zero after the last token
    scale = gamma + shifted
    theta0 = initial_state.angle if initial_state is not None else torch.zeros(b, h, angles.shape[-1], dtype=D64)
    theta = theta0[:, None] + torch.cumsum(math.pi * torch.tanh(angles) * dt[..., None], dim=1)
    qr = rotate_pairs(q.repeat_interleave(rep, 2) + q_bias, theta)
    kr = rotate_pairs(k.repeat_interleave(rep, 2) + k_bias, theta)
    S0 = torch.zeros(b, h, p, n, dtype=D64)
    if initial_state is not None:  # the kernel's fold of the incoming k/v states
        S0 = initial_state.ssm + (dt[:, 0] * (1 - lam[:, 0]))[..., None, None] * \
            initial_state.v[..., :, None] * initial_state.k[..., None, :]
    cs = torch.cumsum(adt, dim=1)
    out = torch.zeros(b, L, h, p, dtype=D64)
    for t in range(L):
        acc = torch.exp(cs[:, t])[..., None] * torch.einsum("bhpn,bhn->bhp", S0, qr[:, t])
        for s in range(t):
            w = torch.exp(cs[:, t] - cs[:, s]) * scale[:, s] * (qr[:, t] * kr[:, s]).sum(-1)
            acc = acc + w[..., None] * v[:, s]
        qk_dot = (qr[:, t] * kr[:, t]).sum(-1) * gamma[:, t]  # rotations cancel in the diagonal
        acc = acc + (D + qk_dot)[..., None] * v[:, t]
        out[:, t] = acc * torch.nn.functional.silu(z[:, t])
    return out


# ---------------------------------------------------------------------------------------------- kernels
@given(pr=problems())
def test_chunked_equals_sequential_reference(pr):
    kw = _problem(**pr)
    y1, f1 = mamba3_scan_ref(**kw, return_final_state=True)
    for cs in (1, 3, 64):
        y2, f2 = mamba3_scan_chunked(**kw, return_final_state=True, chunk_size=cs)
        torch.testing.assert_close(y2, y1, rtol=1e-10, atol=1e-10)
        for a, b in zip(f2, f1):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@given(pr=problems())
def test_reference_matches_upstream_kernel_form(pr):
    pr["reset_p"] = 0.0
    kw = _problem(**pr)
    kw.pop("reset", None)
    torch.testing.assert_close(mamba3_scan_ref(**kw), _kernel_form_oracle(**kw), rtol=1e-10, atol=1e-10)


def test_rotation_matches_upstream_reference(upstream):
    from mamba_ssm.ops.triton.mamba3.mamba3_mimo_rotary_step import apply_rotary_qk_inference_reference

    g = torch.Generator().manual_seed(3)
    b, h, n, s = 2, 3, 8, 3
    q, k = torch.randn(b, 1, h, n, generator=g, dtype=D64), torch.randn(b, 1, h, n, generator=g, dtype=D64)
    angle, proj = torch.randn(b, h, s, generator=g, dtype=D64), torch.randn(b, h, s, generator=g, dtype=D64)
    dt = torch.rand(b, h, generator=g, dtype=D64)
    uq, uk, ua = apply_rotary_qk_inference_reference(q, k, angle, proj, dt, rotate_pairwise=True)
    theta = angle + math.pi * torch.tanh(proj) * dt[..., None]
    torch.testing.assert_close(rotate_pairs(q[:, 0], theta), uq[:, 0])
    torch.testing.assert_close(rotate_pairs(k[:, 0], theta), uk[:, 0])
    torch.testing.assert_close(theta, ua)


@given(pr=problems(min_len=2), data=st.data())
def test_kernel_continuation_law(pr, data):
    kw = _problem(**pr)
    L = pr["L"]
    cut = data.draw(st.integers(1, L - 1))
    y, f = mamba3_scan_chunked(**kw, return_final_state=True, chunk_size=4)
    timed = ("q", "k", "v", "adt", "dt", "trap", "angles", "z", "reset")
    first = {k_: (v_[:, :cut] if k_ in timed else v_) for k_, v_ in kw.items()}
    y1, f1 = mamba3_scan_chunked(**first, return_final_state=True, chunk_size=4)
    second = {k_: (v_[:, cut:] if k_ in timed else v_) for k_, v_ in kw.items()}
    second["initial_state"] = f1
    y2, f2 = mamba3_scan_ref(**second, return_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-10, atol=1e-10)
    for a, b in zip(f2, f):  # the angle is compared as a point on the circle (both wrap to [0, 2 pi))
        if a.shape == f.angle.shape and a is f2.angle:
            torch.testing.assert_close(torch.cos(a), torch.cos(b), rtol=0, atol=1e-10)
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@given(pr=problems(min_len=2), data=st.data())
def test_kernel_reset_law(pr, data):
    """Law 2: after a reset at t, row b of the chunked scan equals the oracle run on that row's tokens from t on,
    from zeros, whatever the state and the tokens before t."""
    pr.update(with_state=True, reset_p=0.0)
    kw = _problem(**pr)
    b, L = pr["b"], pr["L"]
    reset = torch.zeros(b, L, dtype=torch.bool)
    for row in range(b):
        for t in data.draw(st.lists(st.integers(0, L - 1), min_size=1, max_size=3), label=f"resets of row {row}"):
            reset[row, t] = True
    y, f = mamba3_scan_chunked(**kw, reset=reset, return_final_state=True, chunk_size=data.draw(
        st.sampled_from([1, 3, 4, 64]), label="chunk"))
    timed = ("q", "k", "v", "adt", "dt", "trap", "angles", "z")
    for row in range(b):
        t = int(reset[row].nonzero().max())  # the last reset: the row is fresh from there on
        part = {k_: (v_[row:row + 1, t:] if k_ in timed else v_) for k_, v_ in kw.items() if k_ != "initial_state"}
        y_fresh, f_fresh = mamba3_scan_ref(**part, return_final_state=True)
        torch.testing.assert_close(y[row:row + 1, t:], y_fresh, rtol=1e-10, atol=1e-10)
        for a, b_ in zip(f, f_fresh):
            torch.testing.assert_close(a[row:row + 1], b_, rtol=1e-10, atol=1e-10)


@given(pr=problems())
def test_kernel_gradients_equal_the_oracle(pr):
    """Gradients of the chunked path (autograd through the chunk algebra) equal the sequential oracle's in every
    input, the initial state included, with resets: float64, so agreement to rounding."""
    pr["with_state"] = True
    kw = _problem(**pr)
    init = Mamba3States(*(t.clone().requires_grad_() for t in kw.pop("initial_state")))
    leaves = {k_: v_.clone().requires_grad_() for k_, v_ in kw.items() if k_ != "reset"}
    g = torch.Generator().manual_seed(pr["seed"] + 1)
    grads = []
    for fn in (mamba3_scan_ref, lambda **a: mamba3_scan_chunked(**a, chunk_size=3)):
        y, f = fn(**leaves, reset=kw.get("reset"), initial_state=init, return_final_state=True)
        g.manual_seed(pr["seed"] + 1)  # the same random cotangents for both
        loss = (y * torch.randn(y.shape, generator=g, dtype=D64)).sum()
        for t in (f.ssm, f.k, f.v, torch.cos(f.angle)):  # the angle wraps: a smooth function of it
            loss = loss + (t * torch.randn(t.shape, generator=g, dtype=D64)).sum()
        inputs = [*leaves.values(), *init]
        grads.append(torch.autograd.grad(loss, inputs, allow_unused=True))
    names = [*leaves, "init.angle", "init.ssm", "init.k", "init.v"]
    for name, a, b in zip(names, *grads):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_gradients_into_initial_state_gradcheck():
    kw = _problem(5, 1, 5, 2, 2, 1, 4, 1, reset_p=0.3)
    init = tuple(t.clone().requires_grad_() for t in kw.pop("initial_state"))
    v = kw.pop("v").requires_grad_()

    def fn(v_, a, s, k_, vv):
        y, f = mamba3_scan_chunked(v=v_, **kw, initial_state=Mamba3States(a, s, k_, vv), return_final_state=True,
                                   chunk_size=2)
        return y, f.ssm, f.k, f.v

    assert torch.autograd.gradcheck(fn, (v, *init))


def test_kernel_rejects_bad_inputs():
    kw = _problem(0, 1, 4, 2, 2, 1, 4, 1)
    with pytest.raises(StateShapeError, match="angles"):
        mamba3_scan_ref(**{**kw, "angles": kw["angles"][..., :0]})
    with pytest.raises(StateShapeError, match=r"initial_state\.ssm"):
        mamba3_scan_ref(**{**kw, "initial_state": kw["initial_state"]._replace(ssm=torch.zeros(1, 2, 2, 3))})


# ---------------------------------------------------------------------------------------------- adapter
def _layer(seed=0, outnorm=False, ngroups=1, d_state=8, headdim=4):
    torch.manual_seed(seed)
    lay = ms.StatefulMamba3.from_config(16, d_state=d_state, headdim=headdim, ngroups=ngroups,
                                        is_outproj_norm=outnorm, chunk_size=4, layer_idx=0, dtype=D64,
                                        state_dtype=D64)
    with torch.no_grad():  # fresh random parameters (biases and norms are ones at init)
        for p in lay.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return lay


def test_from_config_matches_upstream_parameters(upstream):
    from mamba_ssm.modules.mamba3 import Mamba3

    for outnorm in (False, True):
        torch.manual_seed(7)
        up = Mamba3(32, d_state=16, headdim=8, ngroups=2, is_outproj_norm=outnorm, layer_idx=3)
        torch.manual_seed(7)
        ours = ms.StatefulMamba3.from_config(32, d_state=16, headdim=8, ngroups=2, is_outproj_norm=outnorm,
                                             layer_idx=3)
        a, b = up.state_dict(), ours.state_dict()
        assert list(a) == list(b)
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        wrapped = ms.StatefulMamba3(up)
        assert list(wrapped.state_dict()) == list(a) and wrapped.in_proj is up.in_proj and wrapped.D is up.D
        assert not any(m is up for m in wrapped.modules())
        assert wrapped.state_layout() == ours.state_layout() and wrapped.num_rope_angles == up.num_rope_angles


def test_malformed_mimo_is_refused(upstream):
    """MIMO layers are supported (tests/test_mamba3_mimo.py); a layer flagged MIMO without its projections, or
    with an odd d_state, is refused by name."""
    with pytest.raises(StateCompatibilityError, match="even d_state"):
        ms.StatefulMamba3.from_config(16, d_state=7, headdim=4, is_mimo=True)
    from mamba_ssm.modules.mamba3 import Mamba3

    up = Mamba3(16, d_state=8, headdim=4)
    up.is_mimo = True  # a SISO layer with the flag set: no mimo_x / mimo_z / mimo_o
    with pytest.raises(StateCompatibilityError, match="mimo_x"):
        ms.StatefulMamba3(up)


@pytest.mark.parametrize("outnorm", [False, True])
@given(seed=st.integers(0, 2**16), L=st.integers(2, 12), data=st.data())
def test_adapter_continuation_and_step_laws(outnorm, seed, L, data):
    lay = _layer(seed % 7, outnorm=outnorm, ngroups=1 + seed % 2)
    x = torch.randn(2, L, 16, dtype=D64, generator=torch.Generator().manual_seed(seed))
    s0 = lay.new_state(2)
    for t in s0.tensors.values():
        t.normal_()
    y, s = lay(x, s0)
    cut = data.draw(st.integers(1, L - 1))
    y1, s1 = lay(x[:, :cut], s0)
    y2, s2 = lay(x[:, cut:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-9, atol=1e-9)
    ys, st_ = [], s0
    for t in range(L):
        yt, st_ = lay.step(x[:, t:t + 1], st_)
        ys.append(yt)
    torch.testing.assert_close(torch.cat(ys, 1), y, rtol=1e-9, atol=1e-9)
    for name in ("ssm_state", "k_state", "v_state"):
        torch.testing.assert_close(st_.tensors[name], s.tensors[name], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(s2.tensors[name], s.tensors[name], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.cos(st_.angle_dt_state), torch.cos(s.angle_dt_state), rtol=0, atol=1e-9)
    # the input state is not modified
    assert all(torch.equal(a, b) for a, b in zip(s0.tensors.values(), lay(x[:, :0], s0)[1].tensors.values()))


@given(seed=st.integers(0, 2**16), L=st.integers(1, 11), data=st.data())
def test_adapter_reset_law_property(seed, L, data):
    """Law 2 through the layer: a row reset at t (at a chunk's first token, inside a chunk, several times) equals
    that row run alone from zeros from its last reset on; stepping with the same resets gives the same."""
    lay = _layer(seed % 5, outnorm=bool(seed % 2))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, L, 16, dtype=D64, generator=g)
    s0 = lay.new_state(2)
    for t in s0.tensors.values():
        t.normal_(generator=g)
    reset = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=L, max_size=L), min_size=2,
                                            max_size=2), label="reset"))
    y, s = lay(x, s0, reset=reset)
    for row in range(2):
        if reset[row].any():
            t = int(reset[row].nonzero().max())
            yf, sf = lay(x[row:row + 1, t:])
            torch.testing.assert_close(y[row:row + 1, t:], yf, rtol=1e-10, atol=1e-10)
            assert s.select(row).allclose(sf, rtol=1e-10, atol=1e-10)
    st_, ys = s0, []
    for t in range(L):
        yt, st_ = lay.step(x[:, t], st_, reset=reset[:, t])
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-9, atol=1e-9)


def test_adapter_reset_law_and_positions():
    lay = _layer(2)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 10, 16, dtype=D64, generator=g)
    s0 = lay.new_state(3)
    for t in s0.tensors.values():
        t.normal_(generator=g)
    reset = torch.zeros(3, 10, dtype=torch.bool)
    reset[0, 4] = reset[1, 0] = reset[2, 7] = True
    y, s = lay(x, s0, reset=reset)
    for row, t in ((0, 4), (1, 0), (2, 7)):  # from the reset on, the row is a fresh sequence
        yf, sf = lay(x[row:row + 1, t:])
        torch.testing.assert_close(y[row:row + 1, t:], yf, rtol=1e-10, atol=1e-10)
        assert s.select(row).allclose(sf, rtol=1e-10, atol=1e-10)
    y0, _ = lay(x[2:, :7], s0.select(2))
    torch.testing.assert_close(y[2:, :7], y0, rtol=1e-10, atol=1e-10)
    # step with a reset == step from zeros for that row
    yt, st_ = lay.step(x[:, 0], s0, reset=torch.tensor([True, False, False]))
    yz, _ = lay.step(x[:1, 0], None)
    torch.testing.assert_close(yt[:1], yz)
    # states at positions equal runs of the prefixes
    yp, sp, at = lay(x, s0, return_states_at=[0, 3, 3, 10])
    torch.testing.assert_close(yp, lay(x, s0)[0])
    assert at[0].allclose(s0) and at[3].allclose(sp) and at[1].allclose(lay(x[:, :3], s0)[1], atol=1e-12)


def test_adapter_gradients_reach_the_initial_state():
    lay = _layer(4)
    x = torch.randn(1, 6, 16, dtype=D64)
    s0 = lay.new_state(1)
    leaves = {k: t.normal_().requires_grad_() for k, t in s0.tensors.items()}
    y, s = lay(x, MambaInferenceState.from_tensors(leaves))
    (y.square().sum() + s.ssm_state.sum()).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves.values())


def test_adapter_rejects_bad_states():
    lay = _layer(0)
    x = torch.randn(2, 3, 16, dtype=D64)
    with pytest.raises(StateCompatibilityError, match="mamba3"):
        lay(x, MambaInferenceState(torch.zeros(2, 8, 4), torch.zeros(2, 8, 16)))
    with pytest.raises(StateShapeError, match="batch size"):
        lay(x, lay.new_state(3))
    with pytest.raises(StateShapeError, match="reset"):
        lay(x, reset=torch.zeros(2, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- container
def _m3_state(b=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return MambaInferenceState(ssm_state=r(b, 2, 4, 8), angle_dt_state=r(b, 2, 2), k_state=r(b, 1, 2, 8),
                               v_state=r(b, 2, 4))


def test_mamba3_container_operations(tmp_path):
    s = _m3_state()
    assert s.kind == "mamba3" and s.batch_size == 3 and s.tensor_names == ms.state.containers.FAMILY_TENSORS["mamba3"]
    assert s.layout() == {"kind": "mamba3", "angle_shape": [2, 2], "ssm_shape": [2, 4, 8], "k_shape": [1, 2, 8],
                          "v_shape": [2, 4]}
    assert s.nbytes == 4 * (3 * 2 * 2 + 3 * 2 * 4 * 8 + 3 * 2 * 8 + 3 * 2 * 4)
    assert not hasattr(s, "conv_state")
    with pytest.raises(StateCompatibilityError, match="conv_state"):
        s.conv_state
    parts = s.split([1, 2])
    assert MambaInferenceState.cat(parts).allclose(s, rtol=0, atol=0)
    assert s.select(torch.tensor([2, 0])).allclose(MambaInferenceState.cat([s.select(2), s.select(0)]), 0, 0)
    c = s.clone().reset_(torch.tensor([False, True, False]))
    assert all(t[1].abs().sum() == 0 and torch.equal(t[0], s.tensors[k][0]) for k, t in c.tensors.items())
    assert not c.allclose(s) and s.to(dtype=D64).dtype == D64 and s.to(dtype=D64).k_state.dtype == D64
    assert s.clone().zero_().nbytes == s.nbytes and s.clone().zero_().v_state.abs().sum() == 0
    buf = io.BytesIO()
    torch.save(s, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True).allclose(s, rtol=0, atol=0)
    model = ms.MambaModelState({0: s, 1: _m3_state(seed=1)})
    assert model.select([0, 2]).batch_size == 2 and model.layout()[1]["kind"] == "mamba3"
    # state files (format version 2; tests/test_mamba3_state.py has the property tests and the hostile files)
    s.save(tmp_path / "x.safetensors")
    model.save(tmp_path / "m.safetensors")
    assert MambaInferenceState.load(tmp_path / "x.safetensors").allclose(s, rtol=0, atol=0)
    assert ms.MambaModelState.load(tmp_path / "m.safetensors").allclose(model, rtol=0, atol=0)


def test_mamba3_model_state_operations_over_mixed_families():
    """Every MambaModelState operation on a model state of Mamba-1 and Mamba-3 layers acts on all named tensors of
    every layer; detach cuts the graph; select commutes with running the layer (law 3)."""
    g = torch.Generator().manual_seed(11)
    m1 = MambaInferenceState(torch.randn(3, 6, 4, generator=g), torch.randn(3, 6, 5, generator=g))
    m3 = _m3_state(seed=4)
    model = ms.MambaModelState({0: m1, 3: m3}, seqlen_offset=5)
    leaf = {k: t.clone().requires_grad_() for k, t in m3.tensors.items()}
    d = ms.MambaModelState({0: m1, 3: MambaInferenceState.from_tensors(
        {k: t * 2 for k, t in leaf.items()})}).detach()
    assert not any(t.requires_grad for t in d[3].tensors.values())
    assert all(torch.equal(d[3].tensors[k], 2 * m3.tensors[k]) for k in leaf)
    c = model.clone()
    assert c.allclose(model, rtol=0, atol=0) and c[3].v_state.data_ptr() != m3.v_state.data_ptr()
    c.reset_(torch.tensor([True, False, False]))
    assert all(t[0].abs().sum() == 0 for _, lay_ in c.items() for t in lay_.tensors.values())
    assert all(torch.equal(t[1:], model[i].tensors[k][1:]) for i, lay_ in c.items() for k, t in lay_.tensors.items())
    assert model.to(dtype=D64)[3].angle_dt_state.dtype == D64 and model.to(dtype=D64).seqlen_offset == 5
    parts = model.split([2, 1])
    assert [p_.batch_size for p_ in parts] == [2, 1] and ms.MambaModelState.cat(parts).allclose(model, 0, 0)
    assert model.clone().zero_().nbytes == model.nbytes and all(
        t.abs().sum() == 0 for _, lay_ in model.clone().zero_().items() for t in lay_.tensors.values())
    assert model.nbytes == m1.nbytes + m3.nbytes
    lay = _layer(3)
    x = torch.randn(3, 5, 16, dtype=D64, generator=g)
    s0 = lay.new_state(3)
    for t in s0.tensors.values():
        t.normal_(generator=g)
    idx = torch.tensor([2, 0])
    y, s = lay(x, s0)
    y_sel, s_sel = lay(x[idx], s0.select(idx))
    torch.testing.assert_close(y_sel, y[idx], rtol=1e-12, atol=1e-12)
    assert s_sel.allclose(s.select(idx), rtol=1e-12, atol=1e-12)


def test_mamba3_container_validation():
    s = _m3_state()
    t = s.tensors
    with pytest.raises(StateShapeError, match="batch size"):
        MambaInferenceState(ssm_state=t["ssm_state"], angle_dt_state=t["angle_dt_state"][:2], k_state=t["k_state"],
                            v_state=t["v_state"])
    with pytest.raises(StateShapeError, match="nheads"):
        MambaInferenceState(ssm_state=t["ssm_state"], angle_dt_state=t["angle_dt_state"],
                            k_state=t["k_state"], v_state=torch.zeros(3, 3, 4))
    with pytest.raises(StateError, match="k_state"):
        MambaInferenceState(ssm_state=t["ssm_state"], angle_dt_state=t["angle_dt_state"], v_state=t["v_state"])
    with pytest.raises(StateError, match="found conv_state with"):
        MambaInferenceState(torch.zeros(3, 8, 4), t["ssm_state"], k_state=t["k_state"])
    with pytest.raises(StateCompatibilityError, match="layout"):
        MambaInferenceState.cat([s, MambaInferenceState(torch.zeros(3, 8, 4), torch.zeros(3, 8, 16))])


def _fake_siso_combined(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None,
                        chunk_size=64, return_final_states=False, cu_seqlens=None):
    """Upstream ``mamba3_siso_combined``'s interface (ADT/DT/Trap ``[B, H, L]``, varlen through ``cu_seqlens`` with
    one state per sequence), computed by our float64 oracle: stands in on the CPU to test the adapter's packing."""
    t = lambda a: a.transpose(1, 2)  # noqa: E731
    if cu_seqlens is None:
        y, f = mamba3_scan_ref(Q, K, V, t(ADT), t(DT), t(Trap), Q_bias, K_bias, Angles, D, Z,
                               initial_state=Mamba3States(*Input_States), return_final_state=True)
        return (y, *f)
    ys, finals = [], []
    cu = cu_seqlens.tolist()
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        sl = slice(a, b)
        y, f = mamba3_scan_ref(Q[:, sl], K[:, sl], V[:, sl], t(ADT)[:, sl], t(DT)[:, sl], t(Trap)[:, sl], Q_bias,
                               K_bias, Angles[:, sl], D, None if Z is None else Z[:, sl],
                               initial_state=Mamba3States(*(s[i:i + 1] for s in Input_States)),
                               return_final_state=True)
        ys.append(y)
        finals.append(f)
    return (torch.cat(ys, 1), *(torch.cat([f[j] for f in finals]) for j in range(4)))


def test_cuda_path_packing_of_resets_into_segments(monkeypatch):
    """The CUDA path's call of upstream's kernel (states in upstream's layout, resets as cu_seqlens segments), with
    the kernel replaced by the oracle: equal to the reference path."""
    import mamba_state.adapters.mamba3 as m3

    lay = _layer(6)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 9, 16, dtype=D64, generator=g)
    s0 = lay.new_state(3)
    for t in s0.tensors.values():
        t.normal_(generator=g)
    reset = torch.zeros(3, 9, dtype=torch.bool)
    reset[0, 0] = reset[0, 5] = reset[1, 3] = reset[1, 4] = reset[2, 8] = True
    z, xs, B, C, adt, dt, trap, angles = lay._project(x, False)
    monkeypatch.setattr(m3, "_upstream_siso_scan", lambda: _fake_siso_combined)
    for r in (None, reset):
        y, st = lay._scan_upstream(C, B, xs, adt, dt, trap, angles, z, lay._states_of(s0.to(dtype=torch.float32)),
                                   r)
        y_ref, st_ref = mamba3_scan_ref(C, B, xs, adt, dt, trap, lay.C_bias[:, 0], lay.B_bias[:, 0], angles, lay.D,
                                        z, initial_state=lay._states_of(s0.to(dtype=torch.float32)), reset=r,
                                        return_final_state=True)
        torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
        for a, b in zip(st, st_ref):
            torch.testing.assert_close(a.to(D64), b.to(D64), rtol=1e-6, atol=1e-6)


def test_cuda_path_passes_no_grad_inputs_to_upstream_under_no_grad(monkeypatch):
    """Upstream's autograd Function takes its training forward (chunk states saved) whenever an input requires grad,
    even under no_grad: the adapter passes detached inputs there, and parameters (gradients intact) otherwise."""
    import mamba_state.adapters.mamba3 as m3

    seen = []

    def spy(*args, **kw):
        tensors = [t for t in (*args, *kw.values(), *(kw.get("Input_States") or ())) if isinstance(t, torch.Tensor)]
        seen.append(any(t.requires_grad for t in tensors))
        return _fake_siso_combined(*args, **kw)

    lay = _layer(7)
    x = torch.randn(2, 6, 16, dtype=D64)
    s0 = lay.new_state(2)
    leaves = {k: t.normal_().requires_grad_() for k, t in s0.tensors.items()}
    s0 = MambaInferenceState.from_tensors(leaves)
    monkeypatch.setattr(m3, "_upstream_siso_scan", lambda: spy)

    def run():  # what _forward does on the CUDA path
        z, xs, B, C, adt, dt, trap, angles = lay._project(x, False)
        return lay._scan_upstream(C, B, xs, adt, dt, trap, angles, z, lay._states_of(s0), None)

    with torch.no_grad():
        y0, _ = run()
    y1, st1 = run()
    assert seen == [False, True]
    torch.testing.assert_close(y0, y1.detach(), rtol=0, atol=0)
    (y1.square().sum() + st1.ssm.sum()).backward()
    assert lay.D.grad is not None and leaves["ssm_state"].grad is not None and leaves["k_state"].grad is not None


def test_lm_over_mamba3_blocks(upstream):
    """The recipe of docs/mamba3.md: upstream's MambaLMHeadModel with each block's mixer replaced by a Mamba3."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.modules.mamba3 import Mamba3

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 8},
                      rms_norm=True, fused_add_norm=False, residual_in_fp32=True, pad_vocab_size_multiple=8)
    model = MambaLMHeadModel(cfg).double()
    for i, block in enumerate(model.backbone.layers):
        block.mixer = Mamba3(32, d_state=16, headdim=8, layer_idx=i).double()
    lm = ms.StatefulMambaLM(model, state_dtype=D64)
    assert all(isinstance(b.mixer, ms.StatefulMamba3) for b in lm.backbone.blocks())
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    logits, s = lm(ids)
    assert [v["kind"] for v in s.layout().values()] == ["mamba3", "mamba3"]
    l1, s1 = lm(ids[:, :5])
    l2, s2 = lm(ids[:, 5:], s1)
    torch.testing.assert_close(torch.cat([l1, l2], 1), logits, rtol=1e-9, atol=1e-9)
    assert s2.allclose(s, rtol=1e-9, atol=1e-9)
    st_, outs = s1, []
    for t in range(5, 12):
        lt, st_ = lm.step(ids[:, t:t + 1], st_)
        outs.append(lt)
    torch.testing.assert_close(torch.cat(outs, 1), logits[:, 5:], rtol=1e-9, atol=1e-9)
    out = lm.generate(ids[:, :4], max_new_tokens=3, temperature=0)
    greedy = ids[:, :4]
    for _ in range(3):  # greedy decoding by hand through the forward
        greedy = torch.cat([greedy, lm(greedy)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.sequences, greedy)
