"""The one-pass residual add + RMSNorm (``mamba_state.kernels.add_rms_norm``) against float64, under the
interpreter on CPU, and its use in the LM's blocks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mamba_state.errors import StateShapeError
from mamba_state.kernels import add_rms_norm
from mamba_state.kernels.add_norm import add_rms_norm_ref
from state_builders import same_weight_lms

triton = pytest.importorskip("triton")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _f64_ref(hidden, residual, weight, eps):
    r = hidden.double() if residual is None else hidden.double() + residual.double()
    return r * torch.rsqrt(r.square().mean(-1, keepdim=True) + eps) * weight.double(), r


@given(seed=st.integers(0, 2**31 - 1), lead=st.lists(st.integers(1, 5), min_size=1, max_size=2),
       d=st.integers(1, 300), dtype=st.sampled_from(sorted(DTYPES)), res=st.sampled_from(["none", "fp32", "same"]),
       res_fp32=st.booleans(), eps=st.sampled_from([1e-5, 1e-6]))
def test_matches_float64(seed, lead, d, dtype, res, res_fp32, eps):
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    hidden = (3 * torch.randn(*lead, d, generator=g)).to(dt)
    residual = None if res == "none" else (3 * torch.randn(*lead, d, generator=g)).to(
        torch.float32 if res == "fp32" else dt)
    weight = (1 + 0.5 * torch.randn(d, generator=g)).to(dt)
    rdtype = torch.float32 if res_fp32 else dt
    out, r = add_rms_norm(hidden, residual, weight, eps, rdtype, backend="triton")
    ref_out, ref_r = _f64_ref(hidden, residual, weight, eps)
    assert out.shape == hidden.shape and out.dtype == dt and out.is_contiguous()
    assert r.shape == hidden.shape and r.dtype == rdtype
    # float32 arithmetic, then one rounding to the output dtype (2^-24 / 2^-11 / 2^-8 relative)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dt]
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(r.double(), ref_r.to(rdtype).double(), rtol=tol, atol=tol)
    # and the PyTorch reference beside the kernel says the same
    o2, r2 = add_rms_norm_ref(hidden, residual, weight, eps, rdtype)
    torch.testing.assert_close(o2.double(), ref_out, rtol=tol, atol=tol)
    assert r2.dtype == rdtype


def test_gradients_and_float64_take_the_reference():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, generator=g, dtype=torch.float64)
    out, r = add_rms_norm(h, None, w, 1e-5, torch.float64, backend="triton")
    out.sum().backward()  # the kernel has no backward: float64 and grad-needing inputs run the reference
    assert h.grad is not None and r.dtype == torch.float64
    h32 = h.detach().float().requires_grad_(True)
    out32, _ = add_rms_norm(h32, None, w.float(), 1e-5, backend="triton")
    assert out32.grad_fn is not None


def test_bad_shapes_are_refused():
    h = torch.randn(2, 4, 8)
    with pytest.raises(StateShapeError, match="residual"):
        add_rms_norm(h, torch.randn(2, 4, 7), torch.ones(8), 1e-5, backend="triton")
    with pytest.raises(StateShapeError, match="weight"):
        add_rms_norm(h, None, torch.ones(9), 1e-5, backend="triton")


def test_lm_forced_triton_uses_the_kernel_and_matches_the_reference(monkeypatch):
    """A tiny fused_add_norm LM on CPU: backend='triton' (interpreter) runs every add-norm through the kernel,
    and its logits and states equal the reference backend's to float32 rounding."""
    import mamba_state.adapters.lm as lm_mod

    ref, fast = same_weight_lms(24, 40, dict(backend="reference"), dict(backend="triton"))
    cfg = ref.config
    calls = []
    kernel = lm_mod._kernel_add_norm()

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(lm_mod, "_kernel_add_norm", lambda: spy)
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        want, want_state = ref(ids)
        got, got_state = fast(ids)
        got_last, _ = fast(ids, num_last_tokens=2)
    assert len(calls) == 2 * (cfg["n_layer"] + 1)  # every block's add-norm and the final one, in both calls
    assert calls[-1] == torch.Size([2, 2, 24])  # the final add-norm only on the kept tokens
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_last, want[:, -2:], rtol=1e-4, atol=1e-5)
    assert want_state.allclose(got_state, rtol=1e-4, atol=1e-5)
    calls.clear()
    fast(ids)  # with gradients needed the differentiable PyTorch path serves
    assert not calls


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_kernel_at_model_size(dtype):
    """8 x 2048 tokens of a 130m-shaped model (d 768): the kernel against float64, both residual kinds."""
    g = torch.Generator(device="cuda").manual_seed(7)
    h = torch.randn(8, 2048, 768, device="cuda", generator=g).to(dtype)
    res = torch.randn(8, 2048, 768, device="cuda", generator=g)
    w = (1 + 0.3 * torch.randn(768, device="cuda", generator=g)).to(dtype)
    tol = 1.6e-2 if dtype == torch.bfloat16 else 1e-5
    for residual in (None, res):
        with torch.no_grad():
            out, r = add_rms_norm(h, residual, w, 1e-5)
        ref_out, ref_r = _f64_ref(h, residual, w, 1e-5)
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
        torch.testing.assert_close(r.double(), ref_r, rtol=1e-6, atol=1e-6)
