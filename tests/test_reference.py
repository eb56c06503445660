"""The pure-PyTorch references against upstream's own references, each other, plain conv1d, and autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from mamba_state import StateError, StateShapeError
from mamba_state.reference import (causal_conv1d_ref, selective_scan_chunked, selective_scan_ref,
                                   selective_state_update_ref)

F64 = torch.float64


def scan_inputs(b=2, d=4, L=9, n=3, groups_B=None, groups_C=None, const_B=False, const_C=False, dtype=F64, seed=0,
                D=True, z=True, bias=True, init=False, reset=None):
    """Random scan inputs; groups_* = None for [b, n, L], k for [b, k, n, L]; const_* for [d, n]."""
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=F64)

    def bc(groups, const):
        if const:
            return r(d, n)
        return r(b, n, L) if groups is None else r(b, groups, n, L)

    kw = dict(
        u=r(b, d, L), delta=0.5 * r(b, d, L), A=-torch.rand(d, n, generator=g, dtype=F64) * 2 - 0.1,
        B=bc(groups_B, const_B), C=bc(groups_C, const_C),
        D=r(d) if D else None, z=r(b, d, L) if z else None, delta_bias=0.3 * r(d) if bias else None,
        initial_state=r(b, d, n) if init else None,
        reset=(torch.rand(b, L, generator=g) < reset) if reset else None,
    )
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}


UPSTREAM_CASES = [
    dict(),
    dict(groups_B=2, groups_C=2),
    dict(groups_B=4, groups_C=1, D=False, z=False),
    dict(const_B=True, groups_C=2, bias=False),
    dict(const_C=True),
]


@pytest.mark.upstream
@pytest.mark.parametrize("case", UPSTREAM_CASES)
@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scan_ref_equals_upstream(case, softplus, dtype):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref as upstream_ref

    kw = scan_inputs(dtype=dtype, seed=len(str(case)), **case)
    kw.pop("initial_state"), kw.pop("reset")
    for fn in (selective_scan_ref, selective_scan_chunked):
        out, last = fn(**kw, delta_softplus=softplus, return_last_state=True)
        # upstream computes in float32 and cannot take float64 A: it gets the same values in float32
        kw32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        out_u, last_u = upstream_ref(**kw32, delta_softplus=softplus, return_last_state=True)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), out_u, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(last.to(last_u.dtype), last_u, rtol=1e-5, atol=1e-5)
        out_only = fn(**kw, delta_softplus=softplus)
        assert torch.equal(out_only, out)


CHUNK_CASES = [
    dict(init=True, reset=0.2),
    dict(groups_B=2, groups_C=4, init=True, reset=0.3),
    dict(const_B=True, groups_C=2, init=True),
    dict(const_B=True, const_C=True, reset=0.3, z=False),
    dict(groups_B=4, const_C=True, D=False, bias=False),
]


@pytest.mark.parametrize("case", CHUNK_CASES)
@pytest.mark.parametrize("chunk,block", [(1, None), (2, 4), (3, None), (4, 1), (9, None), (20, 5), (None, None), (None, 2)])
def test_chunked_equals_ref_float64(case, chunk, block):
    kw = scan_inputs(L=9, seed=chunk or 0, **case)
    out, last = selective_scan_ref(**kw, delta_softplus=True, return_last_state=True)
    out_c, last_c = selective_scan_chunked(**kw, delta_softplus=True, return_last_state=True, chunk_size=chunk,
                                           block_size=block)
    assert out_c.dtype == F64 and last_c.dtype == F64 and last_c.shape == (2, 4, 3)
    torch.testing.assert_close(out_c, out, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(last_c, last, rtol=1e-11, atol=1e-12)


def test_chunked_long_sequence_default_chunk_and_blocks():
    kw = scan_inputs(b=1, d=2, L=300, n=2, init=True, reset=0.01, seed=5)
    out, last = selective_scan_ref(**kw, return_last_state=True)
    for block in (None, 64, 100):
        out_c, last_c = selective_scan_chunked(**kw, return_last_state=True, block_size=block)
        torch.testing.assert_close(out_c, out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(last_c, last, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_dtypes(dtype):
    kw64 = scan_inputs(init=True, reset=0.2, seed=7)
    kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw64.items()}
    want, want_last = selective_scan_ref(**{k: (v.to(dtype).to(F64) if isinstance(v, torch.Tensor) and
                                                 v.is_floating_point() else v) for k, v in kw64.items()},
                                         return_last_state=True)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for fn in (selective_scan_ref, selective_scan_chunked):
        out, last = fn(**kw, return_last_state=True)
        assert out.dtype == dtype and last.dtype == torch.float32  # fp32 state and accumulation
        torch.testing.assert_close(out.to(F64), want, rtol=tol, atol=tol)
        torch.testing.assert_close(last.to(F64), want_last, rtol=1e-5, atol=1e-5)


def test_reset_everywhere_makes_every_step_independent():
    kw = scan_inputs(init=True, L=5, seed=2)
    kw["reset"] = torch.ones(2, 5, dtype=torch.bool)
    out = selective_scan_chunked(**kw, chunk_size=2)
    for t in range(5):
        one = {k: (v[..., t:t + 1] if k in ("u", "delta", "z", "B", "C") else v) for k, v in kw.items()}
        one["reset"], one["initial_state"] = None, None
        torch.testing.assert_close(out[..., t:t + 1], selective_scan_ref(**one), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ gradients
def test_chunked_gradcheck():
    kw = scan_inputs(b=1, d=2, L=5, n=2, groups_B=2, init=True, reset=0.3, seed=11)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    tensors = [kw[k].clone().requires_grad_() for k in names]

    def f(*ts):
        args = dict(zip(names, ts), reset=kw["reset"])
        out, last = selective_scan_chunked(**args, delta_softplus=True, return_last_state=True, chunk_size=2,
                                           block_size=3)
        return out, last

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CHUNK_CASES[:3])
def test_chunked_gradients_equal_ref(case):
    kw = scan_inputs(L=11, seed=3, **case)
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    grads = []
    for fn in (selective_scan_ref, selective_scan_chunked):
        leaves = {k: kw[k].clone().requires_grad_() for k in names}
        out, last = fn(**{**kw, **leaves}, delta_softplus=True, return_last_state=True)
        w = torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)
        ((out * w).sum() + (last ** 2).sum()).backward()
        grads.append({k: leaves[k].grad for k in names})
    for k in names:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-10, atol=1e-10, msg=k)


def _grads(fn, kw, names, out_weight=True, last_weight=True, **extra):
    """Gradients of a random linear functional of (out, last state) w.r.t. the inputs ``names``."""
    leaves = {k: kw[k].clone().requires_grad_() for k in names}
    out, last = fn(**{**kw, **leaves}, delta_softplus=True, return_last_state=True, **extra)
    g = torch.Generator().manual_seed(123)
    loss = 0
    if out_weight:
        loss = loss + (out * torch.randn(out.shape, generator=g, dtype=F64).to(out.dtype)).sum()
    if last_weight:
        loss = loss + (last * torch.randn(last.shape, generator=g, dtype=F64).to(last.dtype)).sum()
    loss.backward()
    # an input that cannot reach the loss (C when only the last state counts) gets None from the sequential
    # oracle's graph and zeros from the chunked scan's single node: the same gradient
    return {k: leaves[k].grad if leaves[k].grad is not None else torch.zeros_like(leaves[k]) for k in names}


@pytest.mark.parametrize("case", CHUNK_CASES)
@pytest.mark.parametrize("chunk,block", [(1, None), (3, 4), (4, None), (5, 7), (None, 6), (16, None)])
def test_chunked_hand_backward_equals_ref_autograd(case, chunk, block):
    # the hand-written adjoint against autograd through the sequential oracle, in float64: every layout of B/C,
    # resets, an initial state, chunks that do not divide the block, blocks that do not divide the sequence
    kw = scan_inputs(L=13, seed=17 + (chunk or 0), **case)
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    want = _grads(selective_scan_ref, kw, names)
    got = _grads(selective_scan_chunked, kw, names, chunk_size=chunk, block_size=block)
    for k in names:
        assert got[k].shape == kw[k].shape and got[k].dtype == kw[k].dtype, k
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-10, msg=k)


@pytest.mark.parametrize("out_weight,last_weight", [(True, False), (False, True)])
def test_chunked_gradients_from_one_output_and_some_inputs(out_weight, last_weight):
    # only some inputs require grad, and only one of the two outputs reaches the loss
    kw = scan_inputs(L=10, init=True, reset=0.2, groups_B=2, seed=4)
    for names in (["u", "initial_state"], ["A", "C"], ["delta", "B", "delta_bias"]):
        want = _grads(selective_scan_ref, kw, names, out_weight, last_weight)
        got = _grads(selective_scan_chunked, kw, names, out_weight, last_weight, chunk_size=3, block_size=7)
        for k in names:
            torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-10, msg=k)


def test_chunked_float32_gradients_are_float32_accurate():
    # float32 through the default chunk and block sizes (several blocks) against the float64 oracle
    kw64 = scan_inputs(b=2, d=8, L=700, n=4, groups_C=2, init=True, reset=0.01, seed=21)
    kw64["delta"] = kw64["delta"] - 1.0  # softplus(dt) mostly below 1, as in trained models
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    want = _grads(selective_scan_ref, kw64, names)
    kw32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw64.items()}
    got = _grads(selective_scan_chunked, kw32, names, block_size=256)
    for k in names:
        assert got[k].dtype == torch.float32, k
        scale = want[k].abs().max()
        torch.testing.assert_close(got[k].to(F64) / scale, want[k] / scale, rtol=0, atol=2e-5, msg=k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunked_low_precision_gradients(dtype):
    kw64 = scan_inputs(init=True, reset=0.2, seed=8)
    kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw64.items()}
    names = ["u", "delta", "A", "B", "C", "initial_state"]
    got = _grads(selective_scan_chunked, kw, names, chunk_size=4)
    want = _grads(selective_scan_ref, kw, names)  # the oracle on the same half inputs (float32 compute)
    for k in names:
        assert got[k].dtype == dtype, k
        torch.testing.assert_close(got[k], want[k], rtol=1e-2, atol=1e-2, msg=k)


@given(data=st.data())
def test_chunked_gradients_property(data):
    # random sizes, B/C layouts, resets, chunk and block sizes: the hand backward equals autograd through the oracle
    L = data.draw(st.integers(1, 14), label="L")
    layout = {k: data.draw(st.sampled_from([dict(), {f"groups_{k}": 2}, {f"const_{k}": True}]), label=k)
              for k in ("B", "C")}
    kw = scan_inputs(b=data.draw(st.integers(1, 2)), d=4, L=L, n=data.draw(st.integers(1, 3)), init=True,
                     reset=data.draw(st.sampled_from([None, 0.3])), seed=data.draw(st.integers(0, 10**6)),
                     **layout["B"], **layout["C"])
    chunk = data.draw(st.one_of(st.none(), st.integers(1, 6)), label="chunk")
    block = data.draw(st.one_of(st.none(), st.integers(1, 8)), label="block")
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    want = _grads(selective_scan_ref, kw, names)
    got = _grads(selective_scan_chunked, kw, names, chunk_size=chunk, block_size=block)
    for k in names:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-9, msg=k)


def test_chunked_backward_twice_with_retained_graph():
    # the backward reuses its own buffers but never the saved tensors: a second backward gives the same gradients
    kw = scan_inputs(L=9, init=True, reset=0.2, seed=10)
    names = ["u", "delta", "A", "B", "C", "initial_state"]
    leaves = {k: kw[k].clone().requires_grad_() for k in names}
    out, last = selective_scan_chunked(**{**kw, **leaves}, return_last_state=True, chunk_size=2, block_size=5)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum() + last.sum()
    first = torch.autograd.grad(loss, list(leaves.values()), retain_graph=True)
    second = torch.autograd.grad(loss, list(leaves.values()))
    for k, a, b in zip(names, first, second):
        assert torch.equal(a, b), k


def test_chunked_is_not_twice_differentiable():
    # the backward is hand-written: asking for a second derivative fails loudly instead of returning zeros
    kw = scan_inputs(L=6, seed=9)
    u = kw.pop("u").requires_grad_()
    out = selective_scan_chunked(u, **kw)
    (gu,) = torch.autograd.grad(out.pow(2).sum(), u, create_graph=True)
    with pytest.raises(RuntimeError):
        gu.sum().backward()


# ------------------------------------------------------------------ bad inputs
def test_scan_bad_inputs():
    good = scan_inputs()
    cases = [
        (dict(u=good["u"][0]), StateShapeError, ["u", "[4, 9]"]),
        (dict(delta=good["delta"][:, :3]), StateShapeError, ["delta", "[2, 3, 9]"]),
        (dict(A=good["A"][:3]), StateShapeError, ["A", "[3, 3]"]),
        (dict(B=good["B"][..., :4]), StateShapeError, ["B", "[2, 3, 4]"]),
        (dict(C=torch.randn(2, 3, 3, 9, dtype=F64)), StateShapeError, ["C", "divisible"]),
        (dict(D=torch.randn(5, dtype=F64)), StateShapeError, ["D", "[5]"]),
        (dict(initial_state=torch.randn(2, 4, 2, dtype=F64)), StateShapeError, ["initial_state", "[2, 4, 2]"]),
        (dict(reset=torch.zeros(2, 9)), StateShapeError, ["reset", "bool", "float32"]),
        (dict(u=good["u"].long()), StateError, ["u", "floating", "int64"]),
        (dict(z=good["z"].to("meta")), StateError, ["device", "meta", "cpu"]),
    ]
    for change, err, words in cases:
        for fn in (selective_scan_ref, selective_scan_chunked):
            with pytest.raises(err) as exc:
                fn(**{**good, **change})
            assert all(w in str(exc.value) for w in words), str(exc.value)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(StateError, match="chunk_size"):
            selective_scan_chunked(**good, chunk_size=bad)
        with pytest.raises(StateError, match="block_size"):
            selective_scan_chunked(**good, block_size=bad)


# ------------------------------------------------------------------ causal conv1d
def _conv_inputs(b=2, ch=3, L=7, W=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, ch, L, generator=g, dtype=F64), torch.randn(ch, W, generator=g, dtype=F64),
            torch.randn(ch, generator=g, dtype=F64))


@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_equals_plain_conv1d(activation):
    x, w, bias = _conv_inputs()
    out, state = causal_conv1d_ref(x, w, bias, activation=activation)
    want = F.conv1d(F.pad(x, (3, 0)), w[:, None], bias, groups=3)
    want = F.silu(want) if activation else want
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(state, x[..., -4:])
    out2, _ = causal_conv1d_ref(x, w[:, None, :], bias, activation=activation)  # nn.Conv1d weight layout
    assert torch.equal(out, out2)
    short, short_state = causal_conv1d_ref(x[..., :2], w)  # shorter than the window: zero history kept
    torch.testing.assert_close(short, F.conv1d(F.pad(x[..., :2], (3, 0)), w[:, None], groups=3))
    assert torch.equal(short_state, F.pad(x[..., :2], (2, 0)))


@pytest.mark.parametrize("splits", [[7], [3, 4], [1, 1, 1, 1, 1, 1, 1], [2, 1, 4], [6, 1]])
def test_conv_state_continues_across_splits(splits):
    x, w, bias = _conv_inputs(seed=1)
    g = torch.Generator().manual_seed(9)
    init = torch.randn(2, 3, 4, generator=g, dtype=F64)
    whole, whole_state = causal_conv1d_ref(x, w, bias, conv_state=init, activation="silu")
    want = F.silu(F.conv1d(torch.cat([init[..., 1:], x], -1), w[:, None], bias, groups=3))
    torch.testing.assert_close(whole, want, rtol=1e-12, atol=1e-12)
    outs, state, start = [], init, 0
    for n in splits:
        o, state = causal_conv1d_ref(x[..., start:start + n], w, bias, conv_state=state, activation="silu")
        outs.append(o)
        start += n
    torch.testing.assert_close(torch.cat(outs, -1), whole, rtol=1e-12, atol=1e-12)
    assert torch.equal(state, whole_state)


def test_conv_matches_upstream_step_window():
    """Upstream Mamba.step: roll the window left, write the new input last, dot with the weight."""
    x, w, bias = _conv_inputs(seed=2)
    window = torch.randn(2, 3, 4, dtype=F64)
    out, final = causal_conv1d_ref(x, w, bias, conv_state=window)
    for t in range(x.shape[-1]):
        window = torch.roll(window, shifts=-1, dims=-1)
        window[:, :, -1] = x[:, :, t]
        torch.testing.assert_close(out[:, :, t], (window * w).sum(-1) + bias, rtol=1e-12, atol=1e-12)
    assert torch.equal(final, window)


def test_conv_reset():
    x, w, bias = _conv_inputs(L=8, seed=3)
    init = torch.randn(2, 3, 4, dtype=F64)
    reset = torch.zeros(2, 8, dtype=torch.bool)
    reset[0, 5] = True
    reset[1, 2] = True
    reset[1, 3] = True
    out, state = causal_conv1d_ref(x, w, bias, conv_state=init, reset=reset)
    plain, _ = causal_conv1d_ref(x, w, bias, conv_state=init)
    torch.testing.assert_close(out[0, :, :5], plain[0, :, :5])
    fresh0, st0 = causal_conv1d_ref(x[:1, :, 5:], w, bias)  # row 0 from t=5 as a fresh sequence
    torch.testing.assert_close(out[:1, :, 5:], fresh0, rtol=1e-12, atol=1e-12)
    fresh1, st1 = causal_conv1d_ref(x[1:, :, 3:], w, bias)
    torch.testing.assert_close(out[1:, :, 3:], fresh1, rtol=1e-12, atol=1e-12)
    assert torch.equal(state[:1], st0) and torch.equal(state[1:], st1)
    # a reset in the last steps: the carried window holds only the inputs since the reset
    reset2 = torch.zeros(2, 8, dtype=torch.bool)
    reset2[:, 7] = True
    _, st = causal_conv1d_ref(x, w, conv_state=init, reset=reset2)
    assert torch.equal(st[..., :3], torch.zeros_like(st[..., :3])) and torch.equal(st[..., 3], x[..., 7])


def test_conv_bad_inputs():
    x, w, bias = _conv_inputs()
    with pytest.raises(StateShapeError, match=r"\[3, 4\]"):
        causal_conv1d_ref(x[0], w)
    with pytest.raises(StateShapeError, match="conv_state"):
        causal_conv1d_ref(x, w, conv_state=torch.zeros(2, 3, 3, dtype=F64))
    with pytest.raises(StateShapeError, match="reset"):
        causal_conv1d_ref(x, w, reset=torch.zeros(2, 7))
    with pytest.raises(StateError, match="'relu'"):
        causal_conv1d_ref(x, w, activation="relu")


# ------------------------------------------------------------------ single-step update
@pytest.mark.parametrize("groups", [None, 2])
def test_state_update_equals_one_scan_step(groups):
    kw = scan_inputs(L=1, init=True, groups_B=groups, groups_C=groups, seed=4)
    out, last = selective_scan_ref(**kw, delta_softplus=True, return_last_state=True)
    state = kw["initial_state"].clone()
    sq = lambda t: t[..., 0]  # noqa: E731
    y = selective_state_update_ref(state, sq(kw["u"]), sq(kw["delta"]), kw["A"], sq(kw["B"]), sq(kw["C"]), kw["D"],
                                   sq(kw["z"]), kw["delta_bias"], dt_softplus=True)
    torch.testing.assert_close(y, out[..., 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, last, rtol=1e-12, atol=1e-12)
    # reset: the row's state is zeroed before the step
    state2 = kw["initial_state"].clone()
    reset = torch.tensor([True, False])
    y2 = selective_state_update_ref(state2, sq(kw["u"]), sq(kw["delta"]), kw["A"], sq(kw["B"]), sq(kw["C"]), kw["D"],
                                    sq(kw["z"]), kw["delta_bias"], dt_softplus=True, reset=reset)
    want = selective_scan_ref(**{**kw, "reset": reset[:, None]}, delta_softplus=True)
    torch.testing.assert_close(y2, want[..., 0], rtol=1e-12, atol=1e-12)


def test_state_update_multihead_equals_flattened_scan():
    g = torch.Generator().manual_seed(5)
    b, h, p, n, ng = 2, 4, 3, 5, 2
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    state, x, dt, z = r(b, h, p, n), r(b, h, p), r(b, h, p), r(b, h, p)
    A = -torch.rand(h, 1, 1, generator=g, dtype=F64).expand(h, p, n)  # Mamba-2: one decay per head
    B, C, D, bias = r(b, ng, n), r(b, ng, n), r(h, p), r(h, p)
    s = state.clone()
    y = selective_state_update_ref(s, x, dt, A, B, C, D, z, bias, dt_softplus=True)
    flat = lambda t: t.reshape(b, h * p, 1)  # noqa: E731
    out, last = selective_scan_ref(flat(x), flat(dt), A.reshape(h * p, n), B[..., None], C[..., None], D.reshape(-1),
                                   flat(z), bias.reshape(-1), delta_softplus=True, return_last_state=True,
                                   initial_state=state.reshape(b, h * p, n))
    torch.testing.assert_close(y, out.reshape(b, h, p), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, last.reshape(b, h, p, n), rtol=1e-12, atol=1e-12)


@pytest.mark.upstream
def test_state_update_equals_upstream_ref():
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update_ref as upstream

    kw = scan_inputs(L=1, init=True, seed=6, dtype=torch.float32)  # upstream's Mamba-1 form has no groups
    sq = lambda t: t[..., 0]  # noqa: E731
    args = (sq(kw["u"]), sq(kw["delta"]), kw["A"], sq(kw["B"]), sq(kw["C"]), kw["D"], sq(kw["z"]), kw["delta_bias"])
    s1, s2 = kw["initial_state"].clone(), kw["initial_state"].clone()
    y1 = selective_state_update_ref(s1, *args, dt_softplus=True)
    y2 = upstream(s2, *args, dt_softplus=True)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)
