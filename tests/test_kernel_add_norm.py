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


def test_float64_takes_the_reference():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, generator=g, dtype=torch.float64)
    out, r = add_rms_norm(h, None, w, 1e-5, torch.float64, backend="triton")
    out.sum().backward()
    assert h.grad is not None and r.dtype == torch.float64 and out.dtype == torch.float64


@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 9), d=st.integers(1, 300),
       dtype=st.sampled_from(sorted(DTYPES)), res=st.sampled_from(["none", "fp32", "same"]),
       res_fp32=st.booleans(), use_r=st.booleans())
def test_gradients_match_float64_autograd(seed, rows, d, dtype, res, res_fp32, use_r):
    """The Triton backward (AddRMSNormFn) against float64 autograd through the definition: the gradients of
    hidden, residual and weight, from a loss on out and (use_r) on the returned r as the next block uses it."""
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    hidden = (3 * torch.randn(rows, d, generator=g)).to(dt)
    residual = None if res == "none" else (3 * torch.randn(rows, d, generator=g)).to(
        torch.float32 if res == "fp32" else dt)
    weight = (1 + 0.5 * torch.randn(d, generator=g)).to(dt)
    # the incoming gradients are exact in the dtypes they arrive in (out's: hidden's dtype; r's: its own)
    rdtype = torch.float32 if res_fp32 else dt
    g_out = torch.randn(rows, d, generator=g).to(dt).double()
    g_r = torch.randn(rows, d, generator=g).to(rdtype).double() if use_r else None

    def grads(fn, cast):
        leaves = [None if t is None else cast(t).detach().requires_grad_(True) for t in (hidden, residual, weight)]
        out, r = fn(*leaves)
        loss = (out.double() * g_out).sum() + ((r.double() * g_r).sum() if g_r is not None else 0.0)
        loss.backward()
        return [None if t is None else t.grad.double() for t in leaves], out

    got, out = grads(lambda h, res_, w: add_rms_norm(h, res_, w, 1e-5, rdtype, backend="triton"), lambda t: t)
    assert out.grad_fn is not None and "AddRMSNorm" in type(out.grad_fn).__name__
    want, _ = grads(lambda h, res_, w: _f64_ref(h, res_, w, 1e-5), lambda t: t.double())
    # float32 arithmetic, one rounding of each gradient to its tensor's dtype; the weight's sums over rows
    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dt]
    for name, a, b in zip(("hidden", "residual", "weight"), got, want):
        if b is None:
            assert a is None
            continue
        scale = b.abs().max().item() + 1.0
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=lambda m, n=name: f"{n}: {m}")


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
    infer, train = lm_mod._kernel_add_norm()

    def spy(kernel, kind):
        def call(*args, **kwargs):
            calls.append((kind, args[0].shape))
            return kernel(*args, **kwargs)
        return call

    monkeypatch.setattr(lm_mod, "_kernel_add_norm", lambda: (spy(infer, "infer"), spy(train, "train")))
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        want, want_state = ref(ids)
        got, got_state = fast(ids)
        got_last, _ = fast(ids, num_last_tokens=2)
    assert calls == [("infer", c[1]) for c in calls]
    assert len(calls) == 2 * (cfg["n_layer"] + 1)  # every block's add-norm and the final one, in both calls
    assert calls[-1][1] == torch.Size([2, 2, 24])  # the final add-norm only on the kept tokens
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_last, want[:, -2:], rtol=1e-4, atol=1e-5)
    assert want_state.allclose(got_state, rtol=1e-4, atol=1e-5)
    calls.clear()
    # with gradients needed the differentiable kernel serves, and its gradients equal the reference's
    logits, _ = fast(ids)
    assert [c[0] for c in calls] == ["train"] * (cfg["n_layer"] + 1)
    ref_logits, _ = ref(ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    logits.square().mean().backward()
    ref_logits.square().mean().backward()
    for (name, p), (_, q) in zip(fast.named_parameters(), ref.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


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


@pytest.mark.gpu
def test_gpu_backward_at_model_size():
    """The backward at 8 x 2048 tokens of d 768 (bf16 hidden, float32 residual, as in bf16 training): the
    gradients of hidden, residual and weight against float64 autograd on the same inputs."""
    g = torch.Generator(device="cuda").manual_seed(8)
    h = torch.randn(8 * 2048, 768, device="cuda", generator=g).bfloat16()
    res = torch.randn(8 * 2048, 768, device="cuda", generator=g)
    w = 1 + 0.3 * torch.randn(768, device="cuda", generator=g)
    g_out = torch.randn(8 * 2048, 768, device="cuda", generator=g).bfloat16()
    g_r = torch.randn(8 * 2048, 768, device="cuda", generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (h, res, w)]
    out, r = add_rms_norm(leaves[0], leaves[1], leaves[2], 1e-5)
    ((out.float() * g_out.float()).sum() + (r * g_r).sum()).backward()
    ref = [t.double().requires_grad_(True) for t in (h, res, w)]
    ro, rr = _f64_ref(ref[0], ref[1], ref[2], 1e-5)
    ((ro * g_out.double()).sum() + (rr * g_r.double()).sum()).backward()
    torch.testing.assert_close(leaves[0].grad.double(), ref[0].grad, rtol=1.6e-2, atol=1.6e-2)  # stored in bf16
    torch.testing.assert_close(leaves[1].grad.double(), ref[1].grad, rtol=1e-4, atol=1e-4)
    # float32 sums over 16384 rows
    torch.testing.assert_close(leaves[2].grad.double(), ref[2].grad, rtol=1e-3, atol=1e-2)
