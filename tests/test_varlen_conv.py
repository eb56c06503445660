"""Packed variable-length causal conv1d (``cu_seqlens``): the packed call equals each sequence run alone from its
own incoming window, in the outputs, the new windows and the gradients of x, weight, bias and the incoming windows;
on the reference backend (``conv1d/packed.py``) and the Triton kernels (interpreter on the CPU), against float64
per-sequence runs of the unpacked reference. Bad boundaries raise ``StateShapeError``.

Tolerances: float32 inputs against float64 on the same values. Each output is a sum of at most 5 products of
unit-scale normals (plus silu), accumulated in float32: relative error about 1e-7, so 1e-5 absolute / 1e-5
relative has a margin of 100. The gradients of weight and bias sum up to a few hundred such terms (float32
accumulation, partial sums per time block): 1e-4 absolute. bf16 inputs: the output is rounded to bf16 once
(2^-9 relative), so 1e-2 relative plus 1e-2 absolute at values of order 1-5.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mamba_state.errors import StateShapeError
from mamba_state.kernels import causal_conv1d
from mamba_state.kernels.varlen import check_cu_seqlens
from mamba_state.reference import causal_conv1d_ref

triton = pytest.importorskip("triton")

F64 = torch.float64


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32)


def _inputs(lengths, ch, W, seed, with_state=True, with_bias=True, reset_p=0.1):
    g = torch.Generator().manual_seed(seed)
    T, n = sum(lengths), len(lengths)
    x = torch.randn(1, ch, T, generator=g)
    w = torch.randn(ch, 1, W, generator=g)
    b = torch.randn(ch, generator=g) if with_bias else None
    s = torch.randn(n, ch, W, generator=g) if with_state else None
    reset = (torch.rand(1, T, generator=g) < reset_p) if reset_p > 0 else None
    g_out = torch.randn(1, ch, T, generator=g, dtype=F64)
    g_new = torch.randn(n, ch, W, generator=g, dtype=F64)
    return x, w, b, s, reset, (g_out, g_new)


def _leaves(*ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_(True) for t in ts]


def _touch(*leaves):
    """0, depending on every leaf: each gets a gradient (zeros where nothing reads it, e.g. all sequences
    empty), so that both sides of a comparison have one."""
    return sum(t.sum() * 0 for t in leaves if t is not None)


def _separately(x, w, b, s, reset, silu, lengths, weights):
    """The oracle: every sequence alone through the unpacked float64 reference, from its own window (an empty
    sequence leaves its window as it is); outputs, new windows and the gradients of (x, w, b, s)."""
    xl, wl, bl, sl = _leaves(x, w, b, s, dtype=F64)
    ch, W = x.shape[1], w.shape[-1]
    outs, news, pos = [], [], 0
    for i, n in enumerate(lengths):
        si = sl[i:i + 1] if sl is not None else None
        if n == 0:
            news.append(si if si is not None else torch.zeros(1, ch, W, dtype=F64))
            continue
        o, new = causal_conv1d_ref(xl[:, :, pos:pos + n], wl, bl, conv_state=si,
                                   reset=None if reset is None else reset[:, pos:pos + n],
                                   activation="silu" if silu else None)
        outs.append(o)
        news.append(new)
        pos += n
    out = torch.cat(outs, dim=2) if outs else torch.zeros(1, ch, 0, dtype=F64)
    new = torch.cat(news, dim=0)
    ((out * weights[0]).sum() + (new * weights[1]).sum() + _touch(xl, wl, bl, sl)).backward()
    return out.detach(), new.detach(), [None if t is None else t.grad for t in (xl, wl, bl, sl)]


def _packed(x, w, b, s, reset, silu, cu, weights, backend, dtype=None, layout="contiguous"):
    xl, wl, bl, sl = _leaves(x, w, b, s, dtype=dtype)
    xin = xl
    if layout == "slice":  # a channel slice of a wider projection: channel stride 2 * T... of a [1, 2ch, T]
        xin = torch.cat([xl, torch.randn_like(xl)], dim=1)[:, : x.shape[1]]
    out, new = causal_conv1d(xin, wl, bl, conv_state=sl, reset=reset, activation="silu" if silu else None,
                             backend=backend, cu_seqlens=cu)
    ((out.double() * weights[0]).sum() + (new.double() * weights[1]).sum() + _touch(xl, wl, bl, sl)).backward()
    return out.detach().double(), new.detach().double(), [None if t is None else t.grad.double()
                                                         for t in (xl, wl, bl, sl)]


def _assert_match(got, want, atol=1e-5, grad_atol=1e-4):
    out, new, grads = got
    r_out, r_new, r_grads = want
    torch.testing.assert_close(out, r_out, atol=atol, rtol=1e-5)
    torch.testing.assert_close(new, r_new, atol=atol, rtol=1e-5)
    for name, a, r in zip(("x", "weight", "bias", "conv_state"), grads, r_grads):
        assert (a is None) == (r is None), name
        if a is not None:
            torch.testing.assert_close(a, r, atol=grad_atol, rtol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


lengths_st = st.lists(st.one_of(st.integers(0, 3), st.integers(0, 40)), min_size=1, max_size=6)


@given(lengths=lengths_st, seed=st.integers(0, 2**31 - 1), ch=st.integers(1, 9), W=st.integers(2, 5),
       with_state=st.booleans(), with_bias=st.booleans(), reset_p=st.sampled_from([0.0, 0.15, 0.5]),
       silu=st.booleans(), backend=st.sampled_from(["reference", "triton"]))
def test_packed_equals_each_sequence_alone(lengths, seed, ch, W, with_state, with_bias, reset_p, silu, backend):
    x, w, b, s, reset, weights = _inputs(lengths, ch, W, seed, with_state, with_bias, reset_p)
    want = _separately(x, w, b, s, reset, silu, lengths, weights)
    _assert_match(_packed(x, w, b, s, reset, silu, _cu(lengths), weights, backend), want)


@pytest.mark.parametrize("W", [2, 3, 4, 5])
@pytest.mark.parametrize("silu", [True, False])
def test_triton_packed_across_time_blocks(W, silu):
    """Both backward kernels (4-tap for W <= 4, general above), sequences crossing the 128-step time blocks,
    empty sequences first, between and last, sequences shorter than W, a reset at a sequence's first step (it
    drops the incoming window) and adjacent resets; x a channel slice of a wider tensor."""
    lengths = [0, 1, 2, 150, 0, 3, 97, W - 1, 0]
    x, w, b, s, reset, weights = _inputs(lengths, 6, W, seed=7 + W, reset_p=0.05)
    starts = _cu(lengths)
    reset[0, int(starts[3])] = True  # first step of the 150-long sequence
    reset[0, int(starts[3]) + 128: int(starts[3]) + 131] = True
    want = _separately(x, w, b, s, reset, silu, lengths, weights)
    _assert_match(_packed(x, w, b, s, reset, silu, starts, weights, "triton", layout="slice"), want)


def test_float64_and_int64_boundaries_take_the_reference_path():
    """float64 inputs (any backend) and int64 boundaries; the packed float64 path agrees with the oracle to
    float64 rounding."""
    lengths = [5, 0, 2, 9]
    x, w, b, s, reset, weights = _inputs(lengths, 4, 4, seed=3)
    want = _separately(x, w, b, s, reset, True, lengths, weights)
    cu = _cu(lengths).long()
    for backend in ("reference", "triton"):
        got = _packed(x, w, b, s, reset, True, cu, weights, backend, dtype=F64)
        _assert_match(got, want, atol=1e-12, grad_atol=1e-12)
    # the reference itself, packed
    out, new = causal_conv1d_ref(x.double(), w.double(), b.double(), conv_state=s.double(), reset=reset,
                                 activation="silu", cu_seqlens=cu)
    torch.testing.assert_close(out, want[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(new, want[1], atol=1e-12, rtol=0)


def test_bf16_inputs_and_float32_windows():
    """bf16 x with float32 windows (the layer state's usual dtype): out in bf16, new windows in float32 (exact
    copies of bf16 inputs or of the incoming float32 window)."""
    lengths = [40, 1, 0, 77]
    x, w, b, s, reset, weights = _inputs(lengths, 8, 4, seed=11)
    xb = x.bfloat16()
    want = _separately(xb.float(), w, b, s, reset, True, lengths, weights)
    for backend in ("reference", "triton"):
        out, new = causal_conv1d(xb, w, b, conv_state=s, reset=reset, activation="silu", backend=backend,
                                 cu_seqlens=_cu(lengths))
        assert out.dtype == torch.bfloat16 and new.dtype == torch.float32
        torch.testing.assert_close(out.double(), want[0], atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(new.double(), want[1], atol=0, rtol=0)


def test_state_dtype_without_windows():
    lengths = [3, 4]
    x, w, b, _, _, _ = _inputs(lengths, 3, 4, seed=5, with_state=False, reset_p=0.0)
    for backend in ("reference", "triton"):
        _, new = causal_conv1d(x, w, b, backend=backend, cu_seqlens=_cu(lengths), state_dtype=torch.float64)
        assert new.dtype == torch.float64 and list(new.shape) == [2, 3, 4]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", ["decreasing", "first", "last", "float", "batch", "rows", "rank", "reset"])
def test_bad_packed_inputs_raise_and_change_nothing(backend, case):
    x = torch.randn(1, 3, 6)
    w = torch.randn(3, 4)
    s = torch.randn(2, 3, 4)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    reset = None
    expect = {"decreasing": "non-decreasing", "first": "first entry 0", "last": "packed length 6",
              "float": "int32", "batch": "batch 1", "rows": "num_seqs", "rank": "1-D", "reset": "reset"}[case]
    if case == "decreasing":
        cu = torch.tensor([0, 4, 3, 6], dtype=torch.int32)
        s = torch.randn(3, 3, 4)
    elif case == "first":
        cu = torch.tensor([1, 2, 6], dtype=torch.int32)
    elif case == "last":
        cu = torch.tensor([0, 2, 7], dtype=torch.int32)
    elif case == "float":
        cu = cu.float()
    elif case == "batch":
        x = torch.randn(2, 3, 6)
    elif case == "rows":
        s = torch.randn(3, 3, 4)
    elif case == "rank":
        cu = cu[None]
    elif case == "reset":
        reset = torch.zeros(2, 6, dtype=torch.bool)
    before = [t.clone() for t in (x, s, cu)]
    with pytest.raises(StateShapeError, match=expect):
        causal_conv1d(x, w, conv_state=s, reset=reset, backend=backend, cu_seqlens=cu)
    for t, b in zip((x, s, cu), before):
        assert torch.equal(t, b)


def test_check_cu_seqlens():
    assert check_cu_seqlens(torch.tensor([0, 0, 3, 3], dtype=torch.int32), 3, 1) == 3
    assert check_cu_seqlens(torch.tensor([0, 5]), 5, 1) == 1  # int64 accepted
    for bad, msg in ((torch.tensor([0, 5], dtype=torch.int16), "int16"), (torch.tensor([0, 5]).bool(), "bool"),
                     (torch.tensor([0]), "num_seqs >= 1")):
        with pytest.raises(StateShapeError, match=msg):
            check_cu_seqlens(bad, 5, 1)
    with pytest.raises(StateShapeError, match="my_cu"):
        check_cu_seqlens(torch.tensor([0, 6]), 5, 1, name="my_cu")
    with pytest.raises(StateShapeError, match="found batch 3"):
        check_cu_seqlens(torch.tensor([0, 5]), 5, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_packed_conv_at_model_size(dtype):
    """64 sessions of 16-1024 tokens (and empty ones) at the 130m model's 1536 channels, W = 4, with windows and
    resets, forward and backward on the GPU against the float64 packed reference on the CPU (itself checked
    against per-sequence runs above). dx in bf16 is stored once (2^-9 relative on values of order 10)."""
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(16, 1025, (64,), generator=g).tolist()
    lengths[3] = lengths[40] = 0
    lengths[7] = 2
    x, w, b, s, reset, weights = _inputs(lengths, 1536, 4, seed=6, reset_p=0.002)
    w = w * 0.5
    cu = _cu(lengths)
    # autograd rounds the gradient reaching a bf16 output to bf16; the reference gets the same rounded gradient,
    # so the check measures the kernel's arithmetic (unrounded, the weight's gradient moves by 0.85 of 590)
    weights = tuple(t.to(dtype).double() for t in weights)
    want = _packed(x.to(dtype).double(), w, b, s, reset, True, cu, weights, "reference", dtype=F64)
    xl, wl, bl, sl = [t.detach().cuda().requires_grad_(True) for t in (x.to(dtype), w, b, s)]
    out, new = causal_conv1d(xl, wl, bl, conv_state=sl, reset=reset.cuda(), activation="silu", cu_seqlens=cu.cuda())
    ((out.double() * weights[0].cuda()).sum() + (new.double() * weights[1].cuda()).sum()).backward()
    tol = dict(atol=5e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.double().cpu(), want[0], **tol)
    torch.testing.assert_close(new.double().cpu(), want[1], atol=0, rtol=0)
    torch.testing.assert_close(xl.grad.double().cpu(), want[2][0], **tol)
    for name, a, r in zip(("weight", "bias", "conv_state"), (wl.grad, bl.grad, sl.grad), want[2][1:]):
        # float32 sums over up to 40k terms
        torch.testing.assert_close(a.double().cpu(), r, atol=2e-2, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
