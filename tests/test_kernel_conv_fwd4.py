"""The aligned conv forward for widths <= 4 (``_causal_conv_fwd4_kernel``): it is the kernel that runs for
Mamba's widths, and it gives what the general kernel gives (``MAMBA_STATE_CONV_FWD=generic``), window included,
on channel-major slices with a carried window and resets (the float64 comparison is in test_kernel_conv.py)."""

from __future__ import annotations

import pytest
import torch

from mamba_state.kernels.conv1d import ops
from mamba_state.kernels.conv1d import triton_kernels as K

pytest.importorskip("triton")


@pytest.mark.parametrize("W", [2, 3, 4])
def test_aligned_forward_runs_for_narrow_widths_and_equals_the_general_kernel(W, monkeypatch):
    g = torch.Generator().manual_seed(W)
    wide = torch.randn(24, 3, 150, generator=g)  # [channels, batch, L] in memory: a channel-major projection
    x = wide[:20].permute(1, 0, 2)  # [batch 3, 20 channels, L], time stride 1, channel stride 3 * 150
    w, bias = torch.randn(20, W, generator=g), torch.randn(20, generator=g)
    state = torch.randn(3, 20, W, generator=g)
    reset = torch.rand(3, 150, generator=g) < 0.1
    reset[0, 0] = reset[1, 129] = True  # at the first step, and one past a 128-step block
    launched = []
    real = K._causal_conv_fwd4_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(K, "_causal_conv_fwd4_kernel", Spy())
    out, new = ops.conv_forward(x, w, bias, state, reset, True, None)
    assert launched, "the aligned kernel did not run"
    monkeypatch.setenv("MAMBA_STATE_CONV_FWD", "generic")
    ref, ref_new = ops.conv_forward(x, w, bias, state, reset, True, None)
    assert len(launched) == 1
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new, ref_new, rtol=0, atol=0)


@pytest.mark.parametrize("with_state", [False, True])
def test_empty_chunk_keeps_the_window_and_passes_its_gradient(with_state):
    """Zero steps launch no program: the new window is the incoming one (zeros without one), and its gradient
    is the incoming window's (before 2026-12-03 the window came back uninitialised)."""
    from mamba_state.kernels import causal_conv1d

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 0, generator=g, requires_grad=True)
    w = torch.randn(6, 1, 4, generator=g, requires_grad=True)
    state = torch.randn(2, 6, 4, generator=g, requires_grad=True) if with_state else None
    out, new = causal_conv1d(x, w, None, conv_state=state, activation="silu", backend="triton")
    assert out.shape == (2, 6, 0)
    torch.testing.assert_close(new, state if with_state else torch.zeros(2, 6, 4), rtol=0, atol=0)
    if with_state:
        weight = torch.randn(2, 6, 4, generator=g)
        (new * weight).sum().backward()
        torch.testing.assert_close(state.grad, weight, rtol=0, atol=0)
        assert w.grad is None or not w.grad.abs().any()
