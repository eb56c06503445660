"""The aligned conv backward for widths <= 4 (``_causal_conv_bwd4_aligned_kernel``, the default unpacked;
``MAMBA_STATE_CONV_BWD=generic`` takes the bwd4 kernel), under the interpreter on CPU: every gradient (x, weight,
bias, the incoming window, through both outputs: out and the new window) equals autograd through the float64
reference and the bwd4 kernel's, on channel-major slices with a carried window and resets; the switch picks it only
where it applies (W <= 4, unpacked), and each tile variable reaches only its own kernel."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_kernel_conv_grad import _grads

from mamba_state.kernels import causal_conv1d
from mamba_state.kernels.conv1d import ops
from mamba_state.kernels.conv1d import triton_kernels as K

pytest.importorskip("triton")

NAMES = ("x", "weight", "bias", "conv_state")


@contextmanager
def _bwd(kernel: str | None, **extra: str) -> Iterator[list]:
    """MAMBA_STATE_CONV_BWD set to ``kernel`` (unset for None) and ``extra`` variables; yields the grids the aligned
    kernel was launched with (a spy: a comparison that never ran the new kernel would prove nothing)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAMBA_STATE_CONV_BWD")}
    if kernel is not None:
        env["MAMBA_STATE_CONV_BWD"] = kernel
    env.update(extra)
    launched: list = []
    real = K._causal_conv_bwd4_aligned_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    with mock.patch.dict(os.environ, env, clear=True), mock.patch.object(K, "_causal_conv_bwd4_aligned_kernel", Spy()):
        yield launched


def _channel_major_slice(x: torch.Tensor, extra: int = 3) -> torch.Tensor:
    """x [batch, ch, L] as the training layout gives it: the first ch channels of a [ch + extra, batch, L] tensor
    (a slice of a wider channel-major projection), permuted to [batch, ch, L]; same values, time stride 1."""
    bsz, ch, L = x.shape
    wide = torch.randn(ch + extra, bsz, L, dtype=x.dtype)
    wide[:ch] = x.permute(1, 0, 2)
    return wide[:ch].permute(1, 0, 2)


def _backward_args(seed: int, ch: int, L: int, reset_p: float) -> tuple:
    """Batch-2 inputs of ``ops.conv_backward`` at width 4: (x as a channel-major slice, weight [ch, 4], bias, the
    incoming window, resets, dout, the new window's gradient)."""
    g = torch.Generator().manual_seed(seed)
    x = _channel_major_slice(torch.randn(2, ch, L, generator=g))
    w, b = torch.randn(ch, 4, generator=g), torch.randn(ch, generator=g)
    state = torch.randn(2, ch, 4, generator=g)
    reset = torch.rand(2, L, generator=g) < reset_p
    dout, dnew = torch.randn(2, ch, L, generator=g), torch.randn(2, ch, 4, generator=g)
    return x, w, b, state, reset, dout, dnew


def _triton_grads(x, w, b, state, reset, silu, weights):
    """(out, new window, [dx, dw, dbias, dstate]) through the Triton conv, with x a channel-major slice; float64.
    The leaf is the wide tensor, so the conv gets the strided view itself (its batch stride L, channel stride
    batch * L) and dx comes back through it."""
    bsz, ch, L = x.shape
    wide = torch.randn(ch + 3, bsz, L, dtype=x.dtype)
    wide[:ch] = x.permute(1, 0, 2)
    wide.requires_grad_(True)
    xv = wide[:ch].permute(1, 0, 2)
    assert xv.stride() == (L, bsz * L, 1)
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (w, b, state)]
    wl, bl, sl = leaves
    out, new = causal_conv1d(xv, wl, bl, conv_state=sl, reset=reset, activation="silu" if silu else None,
                             backend="triton")
    g_out, g_new = weights
    ((out.double() * g_out).sum() + (new.double() * g_new).sum()).backward()
    assert wide.grad is not None and not wide.grad[ch:].any()  # the other channels get nothing
    grads = [wide.grad[:ch].permute(1, 0, 2)] + [None if t is None else t.grad for t in leaves]
    return out.detach().double(), new.detach().double(), [None if t is None else t.double() for t in grads]


def _case(seed, batch, ch, L, W, with_state, with_bias, reset_p, silu):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, ch, L, generator=g)
    w = torch.randn(ch, 1, W, generator=g)
    b = torch.randn(ch, generator=g) if with_bias else None
    state = torch.randn(batch, ch, W, generator=g) if with_state else None
    reset = None
    if reset_p is not None:
        reset = torch.rand(batch, L, generator=g) < reset_p
        reset[0, 0] = True  # the carried window dropped at the first step
        if L > 129:  # resets on both sides of a 128-step block boundary
            reset[-1, 127] = reset[-1, 129] = True
    weights = (torch.randn(batch, ch, L, generator=g, dtype=torch.float64),
               torch.randn(batch, ch, W, generator=g, dtype=torch.float64))
    return x, w, b, state, reset, silu, weights


def _check(case):
    x, w, b, state, reset, silu, weights = case
    batch, _, L = x.shape
    W = w.shape[-1]
    with _bwd(None) as launched:
        out, new, grads = _triton_grads(*case)
    assert launched, "the aligned kernel is not the default"
    with _bwd("generic") as launched_generic:
        _, _, current = _triton_grads(*case)
    assert not launched_generic, "the aligned kernel ran under MAMBA_STATE_CONV_BWD=generic"
    _, _, ref = _grads(x, w, b, state, reset, silu, "float64", weights)
    for name, got, cur, want in zip(NAMES, grads, current, ref):
        if want is None:
            assert got is None and cur is None
            continue
        # float32 sums: dx and the window of up to W + W products of order 1 (the new window's gradient added),
        # dweight and dbias of batch * L
        n = batch * L if name in ("weight", "bias") else 2 * W
        torch.testing.assert_close(got, want, atol=1e-5 * (1 + n), rtol=1e-4, msg=lambda m, k=name: f"{k}: {m}")
        # against the current kernel: the same products, summed in another order
        torch.testing.assert_close(got, cur, atol=1e-5 * (1 + n), rtol=1e-5, msg=lambda m, k=name: f"{k}: {m}")


@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 2), ch=st.integers(1, 19),
       L=st.sampled_from([1, 2, 3, 7, 8, 9, 16, 17, 130, 300]), W=st.sampled_from([2, 3, 4]),
       with_state=st.booleans(), with_bias=st.booleans(), reset_p=st.sampled_from([None, 0.1, 0.5]),
       silu=st.booleans())
def test_aligned_backward_matches_float64_reference_and_current_kernel(seed, batch, ch, L, W, with_state,
                                                                       with_bias, reset_p, silu):
    _check(_case(seed, batch, ch, L, W, with_state, with_bias, reset_p, silu))


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("L", [1, 7, 8, 9, 130, 300])
def test_aligned_backward_each_width_and_length(W, L):
    """Every width and the lengths around a group (8) and a block (128): a state, resets, a bias, silu."""
    _check(_case(1000 + 10 * W + L, 2, 11, L, W, True, True, 0.15, True))


@pytest.mark.parametrize("with_state,with_bias,reset_p,silu", [
    (False, False, None, False), (True, False, None, False), (False, True, 0.3, False), (True, False, 0.3, True)])
def test_aligned_backward_without_each_input(with_state, with_bias, reset_p, silu):
    _check(_case(7, 2, 12, 140, 4, with_state, with_bias, reset_p, silu))


def test_aligned_backward_writes_into_dx_out_and_leaves_the_rest():
    """The training layer passes its slice of d(xz) as dx_out: the kernel writes only that slice."""
    x, w, b, state, reset, dout, dnew = _backward_args(3, 12, 140, 0.1)
    dxz = torch.full((24, 2, 140), 5.0)  # [2 * channels, batch, L]: x's half then z's
    with _bwd("aligned") as launched:
        dx, dw, db, ds = ops.conv_backward(x, w, b, state, reset, True, dout, dnew, True)
        got = ops.conv_backward(x, w, b, state, reset, True, dout, dnew, True,
                                dx_out=dxz[:12].permute(1, 0, 2))
    assert len(launched) == 2
    torch.testing.assert_close(dxz[:12].permute(1, 0, 2), dx, rtol=0, atol=0)
    assert (dxz[12:] == 5.0).all()
    for a, want in zip(got[1:], (dw, db, ds)):
        torch.testing.assert_close(a, want, rtol=0, atol=0)


def test_switch_applies_only_where_the_aligned_kernel_does():
    """Packed calls and widths over 4 keep their kernels (the aligned one is the default for the rest)."""
    g = torch.Generator().manual_seed(4)
    x, dout = torch.randn(1, 6, 50, generator=g), torch.randn(1, 6, 50, generator=g)
    cu = torch.tensor([0, 20, 50], dtype=torch.int32)
    with _bwd(None) as launched:
        ops.conv_backward(x, torch.randn(6, 4, generator=g), None, torch.randn(2, 6, 4, generator=g), None, True,
                          dout, None, True, cu_seqlens=cu)
        ops.conv_backward(x, torch.randn(6, 5, generator=g), None, None, None, True, dout, None, False)
        assert not launched
        ops.conv_backward(x, torch.randn(6, 3, generator=g), None, None, None, True, dout, None, False)
        assert len(launched) == 1


def test_each_tile_variable_reaches_only_its_kernel():
    """MAMBA_STATE_CONV_BWD_ALIGNED_TILE ("BD,G,warps") sets the aligned kernel's tile, with the same gradients;
    MAMBA_STATE_CONV_BWD_TILE ("BD,BL,warps", the other kernels') leaves it alone."""
    x, w, b, state, reset, dout, dnew = _backward_args(6, 10, 75, 0.2)
    args = (x, w, b, state, reset, True, dout, dnew, True)
    with _bwd("aligned") as launched:
        want = ops.conv_backward(*args)
    with _bwd("aligned", MAMBA_STATE_CONV_BWD_TILE="4,32,2") as launched_other:
        same = ops.conv_backward(*args)
    with _bwd("aligned", MAMBA_STATE_CONV_BWD_ALIGNED_TILE="4,2,2") as launched_small:
        small = ops.conv_backward(*args)
    assert launched_other == launched  # the default grid: 256 steps, 4 channels a program
    assert launched == [(1, 3, 2)] and launched_small == [(5, 3, 2)]  # 16 steps, 4 channels a program
    with _bwd(None) as launched_default:
        ops.conv_backward(*args)
    assert launched_default == launched  # "aligned" names the default
    for a, c, s in zip(want, same, small):
        torch.testing.assert_close(c, a, rtol=0, atol=0)
        torch.testing.assert_close(s, a, rtol=1e-6, atol=1e-5)
