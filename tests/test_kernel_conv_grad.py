"""Gradients of the Triton causal conv1d (carried window, resets) against autograd through the float64 reference,
under the interpreter on CPU: x, weight, bias and the incoming window, through both outputs (out and the new
window), in contiguous, sliced and channel-major layouts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mamba_state.kernels import causal_conv1d
from mamba_state.reference import causal_conv1d_ref

triton = pytest.importorskip("triton")


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x [batch, ch, L] in one of three memory orders, same values."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "slice":  # a channel slice of a wider projection
        wide = torch.cat([x, torch.randn_like(x)], dim=1)
        return wide[:, : x.shape[1]]
    # channel-major: [ch, batch, L] in memory, as a projection written as weight @ tokens^T gives it
    return x.permute(1, 0, 2).contiguous().permute(1, 0, 2)


def _grads(x, w, b, state, reset, silu, backend, weights):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b, state)]
    xl, wl, bl, sl = leaves
    act = "silu" if silu else None
    if backend == "float64":
        out, new = causal_conv1d_ref(xl.double(), wl.double(), None if bl is None else bl.double(),
                                     conv_state=None if sl is None else sl.double(), reset=reset, activation=act)
    else:
        out, new = causal_conv1d(_layout(xl, backend), wl, bl, conv_state=sl, reset=reset, activation=act,
                                 backend="triton")
    g_out, g_new = weights
    loss = (out.double() * g_out).sum() + (new.double() * g_new).sum()
    loss.backward()
    return out.detach().double(), new.detach().double(), [None if t is None else t.grad.double() for t in leaves]


@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 2), ch=st.integers(1, 19), L=st.integers(1, 150),
       W=st.integers(2, 5), with_state=st.booleans(), with_bias=st.booleans(),
       reset_p=st.sampled_from([0.0, 0.1, 0.5]), silu=st.booleans(),
       layout=st.sampled_from(["contiguous", "slice", "channel-major"]))
def test_triton_conv_gradients_match_float64_reference(seed, batch, ch, L, W, with_state, with_bias, reset_p, silu,
                                                       layout):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, ch, L, generator=g)
    w = torch.randn(ch, 1, W, generator=g)
    b = torch.randn(ch, generator=g) if with_bias else None
    state = torch.randn(batch, ch, W, generator=g) if with_state else None
    reset = (torch.rand(batch, L, generator=g) < reset_p) if reset_p > 0 else None
    weights = (torch.randn(batch, ch, L, generator=g, dtype=torch.float64),
               torch.randn(batch, ch, W, generator=g, dtype=torch.float64))
    out, new, grads = _grads(x, w, b, state, reset, silu, layout, weights)
    ref_out, ref_new, ref_grads = _grads(x, w, b, state, reset, silu, "float64", weights)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new, ref_new, atol=1e-6, rtol=0)
    for name, got, ref in zip(("x", "weight", "bias", "conv_state"), grads, ref_grads):
        if ref is None:
            assert got is None
            continue
        # float32 sums of up to W (x) or batch * L (weight, bias) products of order 1
        scale = 1e-5 * (1 + (batch * L if name in ("weight", "bias") else W))
        torch.testing.assert_close(got, ref, atol=scale, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_triton_conv_gradient_layout_follows_x():
    """A channel-major x gets a channel-major out and dx: the projections around the conv stay single GEMMs."""
    x = _layout(torch.randn(2, 6, 40), "channel-major").requires_grad_(True)
    w = torch.randn(6, 4, requires_grad=True)
    out, _ = causal_conv1d(x, w, None, activation="silu", backend="triton")
    assert out.stride() == x.stride()
    out.sum().backward()
    assert x.grad is not None and x.grad.stride() == x.stride()


def test_triton_conv_bf16_gradients_within_bf16_rounding():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 24, 70, generator=g).bfloat16()
    w = torch.randn(24, 1, 4, generator=g)
    b = torch.randn(24, generator=g)
    state = torch.randn(2, 24, 4, generator=g)
    reset = torch.rand(2, 70, generator=g) < 0.1
    # the gradient reaching a bf16 out is bf16: draw it bf16-exact so that both sides start from the same one
    g_out = torch.randn(2, 24, 70, generator=g).bfloat16().double()
    weights = (g_out, torch.zeros(2, 24, 4, dtype=torch.float64))
    _, _, grads = _grads(x, w, b, state, reset, True, "contiguous", weights)
    _, _, ref = _grads(x.double(), w, b, state, reset, True, "float64", weights)
    assert grads[0].dtype == torch.float64
    # dx is stored in bf16 (8 bits of mantissa) from a float32 sum; dweight and dbias stay float32
    torch.testing.assert_close(grads[0], ref[0], atol=5e-2, rtol=2e-2)
    for got, want in zip(grads[1:], ref[1:]):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_gpu_conv_gradients_at_model_size():
    """bf16 at the 130m model's channel count, channel-major, with a state and resets, against float64 autograd
    through the reference on the CPU."""
    g = torch.Generator().manual_seed(21)
    batch, ch, L, W = 2, 1536, 515, 4
    x = torch.randn(batch, ch, L, generator=g).bfloat16()
    w = torch.randn(ch, 1, W, generator=g) * 0.5
    b = torch.randn(ch, generator=g)
    state = torch.randn(batch, ch, W, generator=g)
    reset = torch.rand(batch, L, generator=g) < 0.01
    g_out = torch.randn(batch, ch, L, generator=g).bfloat16()
    g_new = torch.randn(batch, ch, W, generator=g)
    leaves = [t.cuda().requires_grad_(True) for t in (x, w, b, state)]
    out, new = causal_conv1d(_layout(leaves[0], "channel-major"), leaves[1], leaves[2], conv_state=leaves[3],
                             reset=reset.cuda(), activation="silu")
    ((out.float() * g_out.cuda().float()).sum() + (new * g_new.cuda()).sum()).backward()
    weights = (g_out.double(), g_new.double())
    _, _, ref = _grads(x.double(), w, b, state, reset, True, "float64", weights)
    got = [t.grad.double().cpu() for t in leaves]
    torch.testing.assert_close(got[0], ref[0], atol=5e-2, rtol=2e-2)  # dx stored in bf16
    for name, a, r in zip(("weight", "bias", "conv_state"), got[1:], ref[1:]):
        # float32 sums over batch * L bf16-exact products
        torch.testing.assert_close(a, r, atol=1e-2, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("W", [2, 3, 4, 5])
@pytest.mark.parametrize("silu", [True, False])
def test_each_backward_kernel_matches_float64_reference(W, silu):
    """Widths up to 4 take the 4-tap backward kernel, wider ones the general kernel: both with a state, resets
    (one at step 0, adjacent ones), a bias, and a time block boundary inside the sequence (L > 128)."""
    g = torch.Generator().manual_seed(100 + W)
    batch, ch, L = 2, 11, 140
    x = torch.randn(batch, ch, L, generator=g)
    w = torch.randn(ch, 1, W, generator=g)
    b = torch.randn(ch, generator=g)
    state = torch.randn(batch, ch, W, generator=g)
    reset = torch.rand(batch, L, generator=g) < 0.15
    reset[0, 0] = True
    reset[1, 127:130] = True
    weights = (torch.randn(batch, ch, L, generator=g, dtype=torch.float64),
               torch.randn(batch, ch, W, generator=g, dtype=torch.float64))
    _, _, grads = _grads(x, w, b, state, reset, silu, "slice", weights)
    _, _, ref = _grads(x, w, b, state, reset, silu, "float64", weights)
    for name, got, want in zip(("x", "weight", "bias", "conv_state"), grads, ref):
        scale = 1e-5 * (1 + (batch * L if name in ("weight", "bias") else W))
        torch.testing.assert_close(got, want, atol=scale, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
