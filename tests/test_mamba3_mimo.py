"""Mamba-3 MIMO on the CPU: the float64 references, the adapter's laws, and agreement with upstream.

Oracles: ``mamba3_mimo_scan_ref`` (the sequential recurrence); independent of it, ``_tilelang_form_oracle`` below,
which forms the output as upstream's TileLang ``mamba_mimo_fwd`` does (gamma + shifted-gamma "trap scale" on each
key, the same-step diagonal through the unrotated ``q . k`` block, ranks fused into one row axis); and upstream's
own ``Mamba3.step()`` code, run on the CPU with its kernels replaced by upstream's own references
(tests/_mamba3_mimo.py). Upstream's MIMO layer is built without TileLang through the same helper.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

import mamba_state as ms
from mamba_state import MambaInferenceState, StateCompatibilityError, StateShapeError
from mamba_state.kernels.mamba3 import (Mamba3States, mamba3_mimo_scan_chunked, mamba3_mimo_scan_ref,
                                        rotate_halves)

from _mamba3_mimo import patch_upstream_step, upstream_mimo_mamba3, upstream_step_references

D64 = torch.float64
TIMED = ("q", "k", "v", "adt", "dt", "trap", "angles", "z", "reset")


def _problem(seed, b, L, R, h, p, g, n, s, with_state=True, reset_p=0.0, reduce=True):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *sh: torch.randn(*sh, generator=gen, dtype=D64)  # noqa: E731
    dt = torch.rand(b, L, h, generator=gen, dtype=D64) * 0.6 + 0.05
    kw = dict(q=r(b, L, R, g, n), k=r(b, L, R, g, n), v=r(b, L, h, p),
              adt=-torch.rand(b, L, h, generator=gen, dtype=D64) * 2 * dt, dt=dt, trap=r(b, L, h),
              q_bias=r(h, R, n), k_bias=r(h, R, n), angles=r(b, L, h, s), mimo_x=r(h, R, p), mimo_z=r(h, R, p),
              mimo_o=r(h, R, p) if reduce else None, D=r(h), z=r(b, L, h, p))
    if with_state:
        kw["initial_state"] = Mamba3States(torch.rand(b, h, s, generator=gen, dtype=D64) * 6, r(b, h, p, n),
                                           r(b, R, h, n), r(b, h, p))
    if reset_p:
        kw["reset"] = torch.rand(b, L, generator=gen) < reset_p
    return kw


@st.composite
def problems(draw, min_len=1):
    g = draw(st.integers(1, 2))
    n = draw(st.sampled_from([4, 8]))
    return dict(seed=draw(st.integers(0, 2**31 - 1)), b=draw(st.integers(1, 2)), L=draw(st.integers(min_len, 14)),
                R=draw(st.sampled_from([1, 2, 4])), h=g * draw(st.sampled_from([1, 2])), p=draw(st.integers(1, 3)),
                g=g, n=n, s=draw(st.integers(1, n // 2)), with_state=draw(st.booleans()),
                reset_p=draw(st.sampled_from([0.0, 0.25])), reduce=draw(st.booleans()))


def _split(kw, a, b):
    return {k: (v[:, a:b] if k in TIMED and v is not None else v) for k, v in kw.items()}


def _assert_states(a: Mamba3States, b: Mamba3States, tol: float):
    torch.testing.assert_close(torch.cos(a.angle), torch.cos(b.angle), rtol=0, atol=tol)  # on the circle
    torch.testing.assert_close(torch.sin(a.angle), torch.sin(b.angle), rtol=0, atol=tol)
    for x, y in zip(a[1:], b[1:]):  # dtypes may differ (upstream's decode keeps the SSM state in float32)
        torch.testing.assert_close(x.to(D64), y.to(D64), rtol=tol, atol=tol)


def _tilelang_form_oracle(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z):
    """From zero, no resets: upstream's TileLang forward's formulation, rows ``t * R + r`` fused as it fuses them."""
    b, L, R, g, n = q.shape
    h, p = v.shape[2:]
    qh = q.repeat_interleave(h // g, 3) + q_bias.transpose(0, 1)  # [b, L, R, h, n], bias added before the rotary
    kh = k.repeat_interleave(h // g, 3) + k_bias.transpose(0, 1)
    gamma = dt * torch.sigmoid(trap)
    shifted = torch.zeros_like(dt)
    shifted[:, :-1] = dt[:, 1:] * torch.sigmoid(-trap[:, 1:])  # zero after the sequence's last token
    scale = gamma + shifted
    theta = torch.cumsum(math.pi * torch.tanh(angles) * dt[..., None], dim=1)[:, :, None]
    qr, kr = rotate_halves(qh, theta), rotate_halves(kh, theta)
    psiv = v[:, :, None] * mimo_x.transpose(0, 1)  # [b, L, R, h, p]
    cs = torch.cumsum(adt, dim=1)
    out = torch.zeros(b, L, R, h, p, dtype=D64)
    for t in range(L):
        for s in range(t):  # strictly earlier steps: rotated q . k, trap-scaled key, decay
            w = (torch.exp(cs[:, t] - cs[:, s]) * scale[:, s])[:, None, None]  # [b, 1, 1, h]
            qk = torch.einsum("brhn,bRhn->brRh", qr[:, t], kr[:, s]) * w
            out[:, t] += torch.einsum("brRh,bRhp->brhp", qk, psiv[:, s])
        diag = torch.einsum("brhn,bRhn->brRh", qh[:, t], kh[:, t]) * gamma[:, t, None, None]  # rotation cancels
        out[:, t] += torch.einsum("brRh,bRhp->brhp", diag, psiv[:, t]) + D[:, None] * psiv[:, t]
    out = out * torch.nn.functional.silu(z[:, :, None] * mimo_z.transpose(0, 1))
    return (out * mimo_o.transpose(0, 1)).sum(2)


# ---------------------------------------------------------------------------------------------- kernels
@given(pr=problems())
def test_chunked_equals_sequential_reference(pr):
    kw = _problem(**pr)
    y1, f1 = mamba3_mimo_scan_ref(**kw, return_final_state=True)
    for cs in (1, 3, 16):
        y2, f2 = mamba3_mimo_scan_chunked(**kw, return_final_state=True, chunk_size=cs)
        torch.testing.assert_close(y2, y1, rtol=1e-10, atol=1e-10)
        _assert_states(f2, f1, 1e-10)


@given(seed=st.integers(0, 2**31 - 1), L=st.integers(1, 9), R=st.sampled_from([1, 2, 4]), g=st.integers(1, 2))
def test_reference_matches_upstream_tilelang_form(seed, L, R, g):
    kw = _problem(seed, 2, L, R, 2 * g, 3, g, 8, 2, with_state=False)
    torch.testing.assert_close(mamba3_mimo_scan_ref(**kw), _tilelang_form_oracle(**kw), rtol=1e-10, atol=1e-10)


def test_halved_rotation_matches_upstream_reference(upstream):
    from mamba_ssm.ops.triton.mamba3.mamba3_mimo_rotary_step import apply_rotary_qk_inference_reference

    g = torch.Generator().manual_seed(3)
    b, R, h, n, s = 2, 3, 2, 8, 2  # s < n / 2: pairs past the angles pass unchanged
    q, k = torch.randn(b, R, h, n, generator=g, dtype=D64), torch.randn(b, R, h, n, generator=g, dtype=D64)
    angle, proj = torch.randn(b, h, s, generator=g, dtype=D64), torch.randn(b, h, s, generator=g, dtype=D64)
    dt = torch.rand(b, h, generator=g, dtype=D64)
    uq, uk, ua = apply_rotary_qk_inference_reference(q, k, angle, proj, dt, rotate_pairwise=False)
    theta = angle + math.pi * torch.tanh(proj) * dt[..., None]
    torch.testing.assert_close(rotate_halves(q, theta[:, None]), uq)
    torch.testing.assert_close(rotate_halves(k, theta[:, None]), uk)
    torch.testing.assert_close(theta, ua)


@given(pr=problems(min_len=2), data=st.data())
def test_kernel_continuation_law(pr, data):
    kw = _problem(**pr)
    cut = data.draw(st.integers(1, pr["L"] - 1))
    y, f = mamba3_mimo_scan_chunked(**kw, return_final_state=True, chunk_size=4)
    y1, f1 = mamba3_mimo_scan_chunked(**_split(kw, 0, cut), return_final_state=True, chunk_size=4)
    y2, f2 = mamba3_mimo_scan_ref(**{**_split(kw, cut, None), "initial_state": f1}, return_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-10, atol=1e-10)
    _assert_states(f2, f, 1e-10)


@given(pr=problems(min_len=2), data=st.data())
def test_kernel_reset_law(pr, data):
    """Law 2: from a row's last reset on, the chunked scan equals the oracle on that suffix from zeros."""
    pr.update(with_state=True, reset_p=0.0)
    kw = _problem(**pr)
    b, L = pr["b"], pr["L"]
    reset = torch.zeros(b, L, dtype=torch.bool)
    for row in range(b):
        for t in data.draw(st.lists(st.integers(0, L - 1), min_size=1, max_size=3), label=f"resets of row {row}"):
            reset[row, t] = True
    y, f = mamba3_mimo_scan_chunked(**kw, reset=reset, return_final_state=True,
                                    chunk_size=data.draw(st.sampled_from([1, 3, 16]), label="chunk"))
    for row in range(b):
        t = int(reset[row].nonzero().max())
        part = {k_: (v_[row:row + 1, t:] if k_ in TIMED and v_ is not None else v_) for k_, v_ in kw.items()
                if k_ != "initial_state"}
        y_fresh, f_fresh = mamba3_mimo_scan_ref(**part, return_final_state=True)
        torch.testing.assert_close(y[row:row + 1, t:], y_fresh, rtol=1e-10, atol=1e-10)
        _assert_states(Mamba3States(*(x[row:row + 1] for x in f)), f_fresh, 1e-10)


@given(pr=problems())
def test_kernel_gradients_equal_the_oracle(pr):
    """Gradients of the chunked path equal the sequential oracle's in every input, the initial state included
    (float64: agreement to rounding)."""
    pr["with_state"] = True
    kw = _problem(**pr)
    init = Mamba3States(*(t.clone().requires_grad_() for t in kw.pop("initial_state")))
    leaves = {k_: v_.clone().requires_grad_() for k_, v_ in kw.items() if k_ != "reset" and v_ is not None}
    rest = {k_: v_ for k_, v_ in kw.items() if k_ not in leaves}
    grads = []
    for fn in (mamba3_mimo_scan_ref, lambda **a: mamba3_mimo_scan_chunked(**a, chunk_size=3)):
        y, f = fn(**leaves, **rest, initial_state=init, return_final_state=True)
        g = torch.Generator().manual_seed(pr["seed"] + 1)  # the same random cotangents for both
        loss = (y * torch.randn(y.shape, generator=g, dtype=D64)).sum()
        for t in (f.ssm, f.k, f.v, torch.cos(f.angle)):  # the angle wraps: a smooth function of it
            loss = loss + (t * torch.randn(t.shape, generator=g, dtype=D64)).sum()
        grads.append(torch.autograd.grad(loss, [*leaves.values(), *init], allow_unused=True))
    for name, a, b in zip([*leaves, "init.angle", "init.ssm", "init.k", "init.v"], *grads):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_gradcheck_into_initial_state_and_projections():
    kw = _problem(5, 1, 5, 2, 2, 2, 1, 4, 1, reset_p=0.3)
    init = tuple(t.clone().requires_grad_() for t in kw.pop("initial_state"))
    v, psi = kw.pop("v").requires_grad_(), kw.pop("mimo_x").requires_grad_()

    def fn(v_, psi_, a, s, k_, vv):
        y, f = mamba3_mimo_scan_chunked(v=v_, mimo_x=psi_, **kw, initial_state=Mamba3States(a, s, k_, vv),
                                        return_final_state=True, chunk_size=2)
        return y, f.ssm, f.k, f.v

    assert torch.autograd.gradcheck(fn, (v, psi, *init))


def test_kernel_rejects_bad_inputs():
    kw = _problem(0, 1, 4, 2, 2, 2, 1, 4, 1)
    with pytest.raises(StateShapeError, match=r"initial_state\.k"):
        mamba3_mimo_scan_ref(**{**kw, "initial_state": kw["initial_state"]._replace(k=torch.zeros(1, 2, 4))})
    with pytest.raises(StateShapeError, match="even dstate"):
        mamba3_mimo_scan_ref(**{**kw, "q": kw["q"][..., :3], "k": kw["k"][..., :3], "q_bias": kw["q_bias"][..., :3],
                                "k_bias": kw["k_bias"][..., :3]})
    with pytest.raises(StateShapeError, match="mimo_o"):
        mamba3_mimo_scan_ref(**{**kw, "mimo_o": kw["mimo_o"][:, :1]})


# ---------------------------------------------------------------------------------------------- adapter
def _layer(seed=0, outnorm=False, ngroups=1, rank=2):
    torch.manual_seed(seed)
    lay = ms.StatefulMamba3.from_config(16, d_state=8, headdim=4, ngroups=ngroups, is_outproj_norm=outnorm,
                                        is_mimo=True, mimo_rank=rank, chunk_size=4, layer_idx=0, dtype=D64,
                                        state_dtype=D64)
    with torch.no_grad():  # fresh random parameters (biases, projections and norms are constants at init)
        for p in lay.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return lay


def _random_state(lay, b, gen):
    s0 = lay.new_state(b)
    for t in s0.tensors.values():
        t.normal_(generator=gen)
    return s0


def test_from_config_and_wrapping_match_upstream(upstream):
    for outnorm in (False, True):
        torch.manual_seed(7)
        up = upstream_mimo_mamba3(32, d_state=16, headdim=8, ngroups=2, mimo_rank=4, is_outproj_norm=outnorm,
                                  layer_idx=3)
        torch.manual_seed(7)
        ours = ms.StatefulMamba3.from_config(32, d_state=16, headdim=8, ngroups=2, is_mimo=True, mimo_rank=4,
                                             is_outproj_norm=outnorm, layer_idx=3)
        a, b = up.state_dict(), ours.state_dict()
        assert list(a) == list(b)
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        wrapped = ms.StatefulMamba3(up)
        assert list(wrapped.state_dict()) == list(a) and wrapped.mimo_x is up.mimo_x
        assert wrapped.state_layout() == ours.state_layout() == ms.state.layers.layer_layout(up)
        assert ours.state_layout()["k_shape"] == [4, up.nheads, 16]
        assert ms.StatefulMamba3.from_config(32, **ours.config()).state_layout() == ours.state_layout()


def test_odd_d_state_is_refused():
    with pytest.raises(StateCompatibilityError, match="even d_state"):
        ms.StatefulMamba3.from_config(16, d_state=10 - 1, headdim=4, is_mimo=True, mimo_rank=2)


@pytest.mark.parametrize("outnorm", [False, True])
@given(seed=st.integers(0, 2**16), L=st.integers(2, 10), data=st.data())
def test_adapter_continuation_and_step_laws(outnorm, seed, L, data):
    lay = _layer(seed % 7, outnorm=outnorm, ngroups=1 + seed % 2, rank=1 + seed % 3)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, L, 16, dtype=D64, generator=g)
    s0 = _random_state(lay, 2, g)
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
    for other in (st_, s2):
        _assert_states(lay._states_of(other), lay._states_of(s), 1e-9)


@given(seed=st.integers(0, 2**16), L=st.integers(1, 9), data=st.data())
def test_adapter_reset_law(seed, L, data):
    """A row reset at t equals that row run alone from zeros from its last reset on; step agrees."""
    lay = _layer(seed % 5, outnorm=bool(seed % 2))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, L, 16, dtype=D64, generator=g)
    s0 = _random_state(lay, 2, g)
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


def test_adapter_positions_round_trip_and_gradients(tmp_path):
    lay = _layer(2, rank=3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 16, dtype=D64, generator=g)
    s0 = _random_state(lay, 2, g)
    yp, sp, at = lay(x, s0, return_states_at=[0, 3, 7])
    torch.testing.assert_close(yp, lay(x, s0)[0])
    assert at[0].allclose(s0) and at[2].allclose(sp) and at[1].allclose(lay(x[:, :3], s0)[1], atol=1e-12)
    # law 3: files are bit exact (k_state [B, R, H, N] included), cat/split is the identity
    sp.save(tmp_path / "s.safetensors")
    back = MambaInferenceState.load(tmp_path / "s.safetensors")
    assert back.layout() == lay.state_layout() | {"kind": "mamba3"} and back.allclose(sp, rtol=0, atol=0)
    assert all(back.tensors[k].dtype == t.dtype for k, t in sp.tensors.items())
    model = ms.MambaModelState({0: sp})
    model.save(tmp_path / "m.safetensors")
    assert ms.MambaModelState.load(tmp_path / "m.safetensors").allclose(model, rtol=0, atol=0)
    assert MambaInferenceState.cat(sp.split([1, 1])).allclose(sp, rtol=0, atol=0)
    # gradients reach every tensor of the initial state
    leaves = {k: t.clone().requires_grad_() for k, t in s0.tensors.items()}
    y, s = lay(x, MambaInferenceState.from_tensors(leaves))
    (y.square().sum() + s.ssm_state.sum() + s.k_state.sum()).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves.values())


def test_adapter_gradcheck_into_the_state():
    lay = _layer(3, outnorm=True, rank=2).requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 16, dtype=D64, generator=g)
    s0 = _random_state(lay, 1, g)
    names = list(s0.tensors)

    def fn(*ts):
        y, s = lay(x, MambaInferenceState.from_tensors(dict(zip(names, ts))))
        return y, s.ssm_state, s.k_state

    assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in s0.tensors.values()),
                                    fast_mode=True)


# ---------------------------------------------------------------------------------------------- upstream
@pytest.mark.parametrize("outnorm", [False, True])
def test_layer_agrees_with_upstream_step(upstream, monkeypatch, outnorm):
    """Upstream's own ``Mamba3.step()`` (MIMO: halved rotary, its step kernel's recurrence, its postprocess),
    with its kernels replaced by upstream's references, continuing a random state token by token; our chunked
    forward from the same state and our step agree.

    Dtypes and tolerances: upstream computes A in float32 whatever the layer's dtype (``_preprocess``), so a float64
    layer agrees to float32 rounding of A (2e-6); its outproj-norm postprocess multiplies ``z.float()`` by the
    projection, which only runs on a float32 layer (then float32 rounding over six steps, 2e-5). Norm weights are
    float32-exact because upstream's reference RMSNorm casts the weight to float32."""
    dtype, tol = (torch.float32, 2e-5) if outnorm else (D64, 2e-6)
    patch_upstream_step(monkeypatch)
    torch.manual_seed(11)
    # ngroups 1: upstream's step() expands B and C from one group to the heads (it fails for more groups)
    up = upstream_mimo_mamba3(16, d_state=8, headdim=4, ngroups=1, mimo_rank=3, is_outproj_norm=outnorm,
                              layer_idx=0).to(dtype)
    with torch.no_grad():
        for name, p in up.named_parameters():
            p.add_(0.3 * torch.randn_like(p))
            if name.endswith("norm.weight"):
                p.copy_(p.float().to(dtype))
    ours = ms.StatefulMamba3(up, state_dtype=dtype)
    g = torch.Generator().manual_seed(12)
    b, L = 2, 6
    x = torch.randn(b, L, 16, dtype=dtype, generator=g)
    s0 = _random_state(ours, b, g)
    s0.angle_dt_state.uniform_(0, 2 * math.pi, generator=g)
    cache = tuple(t.clone() for t in (s0.angle_dt_state, s0.ssm_state, s0.k_state, s0.v_state))
    with torch.no_grad():
        y_up = torch.stack([up.step(x[:, t], *cache)[0] for t in range(L)], 1)
    y, s = ours(x, s0)
    torch.testing.assert_close(y, y_up, rtol=tol, atol=tol)
    _assert_states(ours._states_of(s), Mamba3States(cache[0], cache[1], cache[2], cache[3]), tol)
    # the adapter's call of upstream's decode kernels (what runs on CUDA), served by the same references
    refs = upstream_step_references()
    z, xs, B, C, adt, dt, trap, angles = ours._project(x[:, 0], False)
    y_k, st_k = ours._step_upstream_mimo((refs["rotary"], refs["step_fn"]), C, B, xs, z, adt, dt, trap, angles,
                                         ours._states_of(s0))
    y1, s1 = ours.step(x[:, 0], s0)
    torch.testing.assert_close(ours._output(y_k, z, dtype, False), y1, rtol=tol, atol=tol)
    _assert_states(st_k, ours._states_of(s1), tol)


def test_tilelang_prefill_call(monkeypatch):
    """The prefill-from-zero call of upstream's TileLang ``mamba3_mimo`` (its interface, served by our oracle):
    equal to our path, with and without the outproj norm (then per-rank outputs, MIMO_Out and Z None)."""
    import mamba_state.adapters.mamba3 as m3

    def fake(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z, chunk_size,
             rotary_dim_divisor, dtype, return_state=False, cu_seqlens=None):
        assert cu_seqlens is None and return_state and K.shape[-1] // rotary_dim_divisor == Angles.shape[-1]
        t = lambda a: a.transpose(1, 2)  # noqa: E731
        y, f = mamba3_mimo_scan_ref(Q, K, V, t(ADT), t(DT), t(Trap), Q_bias, K_bias, Angles, MIMO_V, MIMO_Z,
                                    MIMO_Out, D, Z, return_final_state=True)
        return (y.to(dtype), *f)

    monkeypatch.setattr(m3, "_upstream_mimo_scan", lambda: fake)
    for outnorm in (False, True):
        lay = _layer(8, outnorm=outnorm, rank=2)
        x = torch.randn(2, 6, 16, dtype=D64, generator=torch.Generator().manual_seed(8))
        z, xs, B, C, adt, dt, trap, angles = lay._project(x, False)
        y_up, st_up = lay._mimo_prefill_upstream(C, B, xs, adt, dt, trap, angles, None if outnorm else z)
        y, s = lay(x)
        torch.testing.assert_close(lay._output(y_up, z, D64, False), y, rtol=1e-10, atol=1e-10)
        _assert_states(st_up, lay._states_of(s), 1e-10)


def test_lm_over_mimo_blocks_and_checkpoint(upstream, tmp_path):
    """docs/mamba3.md's recipe with MIMO mixers: continuation and step through the LM; save_pretrained writes
    is_mimo / mimo_rank and from_pretrained rebuilds the same model."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 8},
                      rms_norm=True, fused_add_norm=False, residual_in_fp32=True, pad_vocab_size_multiple=8)
    model = MambaLMHeadModel(cfg).double()
    for i, block in enumerate(model.backbone.layers):
        block.mixer = upstream_mimo_mamba3(32, d_state=16, headdim=8, mimo_rank=2, chunk_size=8, layer_idx=i).double()
    lm = ms.StatefulMambaLM(model, state_dtype=D64)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    logits, s = lm(ids)
    assert [v["k_shape"][0] for v in s.layout().values()] == [2, 2]
    l1, s1 = lm(ids[:, :5])
    l2, _ = lm(ids[:, 5:], s1)
    torch.testing.assert_close(torch.cat([l1, l2], 1), logits, rtol=1e-9, atol=1e-9)
    lt, _ = lm.step(ids[:, 5:6], s1)
    torch.testing.assert_close(lt, logits[:, 5:6], rtol=1e-9, atol=1e-9)
    lm.save_pretrained(tmp_path / "ckpt")
    again = ms.StatefulMambaLM.from_pretrained(tmp_path / "ckpt", state_dtype=D64)
    torch.testing.assert_close(again.double()(ids)[0], logits, rtol=1e-9, atol=1e-9)
