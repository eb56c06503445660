"""The Triton causal conv1d (carried window, resets) against the float64 reference, under the interpreter on CPU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mamba_state.kernels import causal_conv1d
from mamba_state.reference import causal_conv1d_ref

triton = pytest.importorskip("triton")


def _case(seed, batch, ch, L, W, dtype, with_state, with_bias, reset_p, strided):
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(batch, 2 * ch, L, generator=g).to(dtype)
    x = wide[:, :ch] if strided else wide[:, :ch].contiguous()  # a slice of a wider projection, time stride 1
    w = torch.randn(ch, 1, W, generator=g).to(dtype)
    b = torch.randn(ch, generator=g).to(dtype) if with_bias else None
    state = torch.randn(batch, ch, W, generator=g) if with_state else None
    reset = (torch.rand(batch, L, generator=g) < reset_p) if reset_p > 0 else None
    return x, w, b, state, reset


@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 2), ch=st.integers(1, 20), L=st.integers(1, 140),
       W=st.integers(2, 5), with_state=st.booleans(), with_bias=st.booleans(),
       reset_p=st.sampled_from([0.0, 0.1, 0.5]), strided=st.booleans(), silu=st.booleans())
def test_triton_conv_matches_float64_reference(seed, batch, ch, L, W, with_state, with_bias, reset_p, strided, silu):
    x, w, b, state, reset = _case(seed, batch, ch, L, W, torch.float32, with_state, with_bias, reset_p, strided)
    act = "silu" if silu else None
    with torch.no_grad():
        out, new = causal_conv1d(x, w, b, conv_state=state, reset=reset, activation=act, backend="triton")
    ref, ref_new = causal_conv1d_ref(x.double(), w.double(), None if b is None else b.double(),
                                     conv_state=None if state is None else state.double(), reset=reset,
                                     activation=act)
    assert out.shape == x.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new.double(), ref_new, atol=1e-6, rtol=0)
    assert new.dtype == (state.dtype if state is not None else x.dtype)


def test_triton_conv_bf16_state_float32():
    x, w, b, state, reset = _case(3, 2, 24, 37, 4, torch.bfloat16, True, True, 0.1, True)
    with torch.no_grad():
        out, new = causal_conv1d(x, w, b, conv_state=state, reset=reset, activation="silu", backend="triton")
    ref, ref_new = causal_conv1d_ref(x.double(), w.double(), b.double(), conv_state=state.double(), reset=reset,
                                     activation="silu")
    assert out.dtype == torch.bfloat16 and new.dtype == torch.float32
    # bf16 output: one rounding of values of order 1 (8 bits of mantissa)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(new.double(), ref_new, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_new_window_from_zeros_takes_state_dtype(backend):
    """No conv_state: the window starts from zeros and the new one comes back in ``state_dtype`` (both paths)."""
    x, w, b, _, _ = _case(8, 2, 10, 3, 4, torch.bfloat16, False, True, 0.0, True)
    zeros = torch.zeros(2, 10, 4)
    with torch.no_grad():
        out, new = causal_conv1d(x, w, b, activation="silu", backend=backend, state_dtype=torch.float32)
        out_z, new_z = causal_conv1d(x, w, b, conv_state=zeros, activation="silu", backend=backend,
                                     state_dtype=torch.float16)  # ignored: the given state's dtype wins
    assert new.dtype == torch.float32 and new_z.dtype == torch.float32
    torch.testing.assert_close(out, out_z, rtol=0, atol=0)
    torch.testing.assert_close(new, new_z, rtol=0, atol=0)
    # L = 3 < W = 4: one zero (from the empty start), then the chunk's three inputs
    torch.testing.assert_close(new, torch.cat([torch.zeros(2, 10, 1), x.float()], -1), rtol=0, atol=0)


def test_gradients_take_the_reference_path():
    x, w, b, state, _ = _case(5, 1, 6, 9, 4, torch.float32, True, True, 0.0, False)
    x.requires_grad_(True)
    out, _ = causal_conv1d(x, w, b, conv_state=state, activation="silu", backend="triton")
    out.sum().backward()  # with grad needed the Triton path serves too (tests/test_kernel_conv_grad.py checks its values)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_conv_matches_reference_at_model_size(dtype):
    x, w, b, state, reset = _case(11, 8, 1536, 2048 + 3, 4, dtype, True, True, 0.0, True)
    _, _, _, _, reset = _case(12, 8, 1536, 2048 + 3, 4, dtype, True, True, 0.01, True)
    for rst in (None, reset):
        args = [t.cuda() if t is not None else None for t in (x, w, b, state, rst)]
        with torch.no_grad():
            out, new = causal_conv1d(args[0], args[1], args[2], conv_state=args[3], reset=args[4], activation="silu")
        ref, ref_new = causal_conv1d_ref(x.double(), w.double(), b.double(), conv_state=state.double(), reset=rst,
                                         activation="silu")
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=1e-2)
        torch.testing.assert_close(out.double().cpu(), ref, **tol)
        torch.testing.assert_close(new.double().cpu(), ref_new, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)
