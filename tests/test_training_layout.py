"""The Mamba-1 layer's training layout (channel-major activations, plain GEMMs, the Triton conv and scan with
their backward) against the reference path: same outputs, states and gradients, from zero and from a state with
resets. Under the Triton interpreter on CPU at small sizes."""

from __future__ import annotations

import pytest
import torch

import mamba_state as ms

pytest.importorskip("triton")


def _run(layer, x, state, reset):
    xl = x.detach().clone().requires_grad_(True)
    st = None
    if state is not None:
        st = ms.MambaInferenceState(state.conv_state.detach().clone().requires_grad_(True),
                                    state.ssm_state.detach().clone().requires_grad_(True))
    layer.zero_grad(set_to_none=True)
    y, new = layer(xl, st, reset=reset)
    _run.last_fn = y.grad_fn.next_functions[0][0] if y.grad_fn is not None else None
    g = torch.Generator().manual_seed(99)
    weight = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device)
    loss = (y.double() * weight).sum() + (new.ssm_state * 0.3).sum() + (new.conv_state * 0.7).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    grads["x"] = xl.grad
    if st is not None:
        grads["conv_state"], grads["ssm_state"] = st.conv_state.grad, st.ssm_state.grad
    return y.detach(), new, grads


@pytest.mark.parametrize("with_state,bias", [(False, False), (True, False), (True, True)])
def test_training_layout_matches_reference(with_state, bias, monkeypatch):
    calls = []
    original = ms.StatefulMamba._forward_channel_major
    monkeypatch.setattr(ms.StatefulMamba, "_forward_channel_major",
                        lambda self, *a: calls.append(self.backend) or original(self, *a))
    torch.manual_seed(0)
    fast = ms.StatefulMamba.from_config(d_model=8, d_state=4, bias=bias, backend="triton")
    ref = ms.StatefulMamba(fast, backend="reference")  # the same parameters
    batch, L = 2, 21
    x = torch.randn(batch, L, 8)
    state, reset = None, None
    if with_state:
        state = ms.MambaInferenceState(torch.randn(batch, fast.d_inner, fast.d_conv),
                                       torch.randn(batch, fast.d_inner, fast.d_state))
        reset = torch.zeros(batch, L, dtype=torch.bool)
        reset[0, 5] = reset[1, 0] = reset[1, 13] = True
    y, new, grads = _run(fast, x, state, reset)
    y_fn = _run.last_fn
    y_ref, new_ref, grads_ref = _run(ref, x, state, reset)
    assert calls == ["triton"]  # the Triton layer took the training layout, the reference one did not
    assert type(y_fn).__name__ == "MambaInnerFnBackward"  # and its fused inner Function
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(new.conv_state, new_ref.conv_state, atol=1e-6, rtol=0)
    torch.testing.assert_close(new.ssm_state, new_ref.ssm_state, atol=1e-5, rtol=1e-4)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-4, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.gpu
def test_gpu_training_layout_matches_float64():
    """On CUDA (bf16 autocast, the 130m layer's sizes at a short length): the training layout's outputs and
    gradients against the same layer in float64 on the reference path."""
    torch.manual_seed(1)
    layer = ms.StatefulMamba.from_config(d_model=768, device="cuda")
    batch, L = 2, 300
    x = torch.randn(batch, L, 768, device="cuda")
    state = ms.MambaInferenceState(torch.randn(batch, layer.d_inner, layer.d_conv, device="cuda"),
                                   torch.randn(batch, layer.d_inner, layer.d_state, device="cuda"))
    reset = torch.rand(batch, L, device="cuda") < 0.01
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, new, grads = _run(layer, x, state, reset)
    ref_layer = ms.StatefulMamba(layer, backend="reference", state_dtype=torch.float64)
    ref_layer.double()
    st64 = ms.MambaInferenceState(state.conv_state.double(), state.ssm_state.double())
    y_ref, _, grads_ref = _run(ref_layer, x.double(), st64, reset)
    layer.float()
    scale = y_ref.abs().max().item()
    assert (y.double() - y_ref).abs().max().item() < 3e-2 * scale  # bf16 projections and activations
    for name in ("x", "in_proj.weight", "x_proj.weight", "dt_proj.weight", "A_log", "D", "conv1d.weight",
                 "conv_state", "ssm_state"):
        err = (grads[name].double() - grads_ref[name]).norm() / grads_ref[name].norm()
        assert err < 5e-2, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("used", ["output", "ssm_state", "conv_state"])
def test_training_layout_with_one_output_used(used):
    """A loss on one output alone (the others' gradients are None, not zeros, inside the autograd Functions):
    the gradients equal the reference path's."""
    torch.manual_seed(1)
    fast = ms.StatefulMamba.from_config(d_model=8, d_state=4, backend="triton")
    ref = ms.StatefulMamba(fast, backend="reference")
    x = torch.randn(2, 13, 8)
    state = ms.MambaInferenceState(torch.randn(2, fast.d_inner, fast.d_conv),
                                   torch.randn(2, fast.d_inner, fast.d_state))
    reset = torch.zeros(2, 13, dtype=torch.bool)
    reset[1, 4] = True
    grads = []
    for layer in (fast, ref):
        xl = x.clone().requires_grad_(True)
        st = ms.MambaInferenceState(state.conv_state.clone().requires_grad_(True),
                                    state.ssm_state.clone().requires_grad_(True))
        layer.zero_grad(set_to_none=True)
        y, new = layer(xl, st, reset=reset)
        picked = {"output": y, "ssm_state": new.ssm_state, "conv_state": new.conv_state}[used]
        (picked.double() ** 2).sum().backward()
        found = {n: p.grad for n, p in layer.named_parameters()}
        found.update(x=xl.grad, conv_state=st.conv_state.grad, ssm_state=st.ssm_state.grad)
        grads.append(found)
    for name, g_ref in grads[1].items():
        g = grads[0][name]
        if g_ref is None or not g_ref.abs().any():
            assert g is None or not g.abs().any(), name
            continue
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-3, msg=name)
