"""States that come out of a forward with gradients on can be reset and zeroed in place, and training goes on
through them: ``y, st = core(x); st.reset_(done); y2, st2 = core(x2, st); loss.backward()`` (the recurrent-RL
pattern). Each producer of states is checked: the chunked forward, ``step``, ``return_states_at``, and the LM,
with both backends (Triton in its interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

import mamba_state as ms
from mamba_state.adapters import StatefulMamba, StatefulMamba2, StatefulMambaLM

from state_builders import tiny_lm

ROWS = torch.tensor([True, False])


def _mamba1(backend, dtype=torch.float32):
    torch.manual_seed(0)
    return StatefulMamba.from_config(d_model=8, d_state=4, expand=2, layer_idx=0, backend=backend,
                                     state_dtype=dtype).to(dtype)


def _states_of(layer, x):
    """Every kind of state a layer hands out for ``x``, each from its own forward with gradients on (each one's
    backward then frees only its own graph)."""
    yield "forward", layer(x)[1]
    yield "step", layer.step(x[:, :1], layer.new_state(x.shape[0]))[1]
    yield "step after forward", layer.step(x[:, :1], layer(x)[1])[1]
    for i, p in enumerate([0, 2, x.shape[1]]):
        yield f"at[{p}]", layer(x, return_states_at=[0, 2, x.shape[1]])[2][i]


def _reset_then_train_on(layer, state, x2):
    """reset_ one row of ``state`` in place, continue from it and backpropagate; returns the reset state."""
    state.reset_(ROWS)
    assert torch.count_nonzero(state.ssm_state[0]) == 0 and torch.count_nonzero(state.conv_state[0]) == 0
    y2, st2 = layer(x2, state=state)
    (y2.square().sum() + st2.ssm_state.sum()).backward()
    return state


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_mamba1_states_can_be_reset_and_zeroed_in_place_under_autograd(backend):
    layer = _mamba1(backend)
    x, x2 = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    for name, state in _states_of(layer, x):
        layer.zero_grad()
        kept = state.ssm_state[1].detach().clone()
        _reset_then_train_on(layer, state, x2)
        assert torch.equal(state.ssm_state[1].detach(), kept), name  # the other row is untouched
        assert layer.A_log.grad is not None and torch.isfinite(layer.A_log.grad).all(), name
        state.zero_()
        assert torch.count_nonzero(state.ssm_state) == 0, name


def test_reset_in_place_equals_a_fresh_row_in_the_gradient():
    """The gradient after an in-place reset of row 0 equals the gradient with row 0 started from zeros."""
    layer = _mamba1("reference", torch.float64)
    x, x2 = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)

    def loss_grad(reset_in_place):
        layer.zero_grad()
        _, st = layer(x)
        if reset_in_place:
            st.reset_(ROWS)
        else:  # the same state built out of place
            keep = (~ROWS).to(st.ssm_state.dtype)
            st = ms.MambaInferenceState(st.conv_state * keep[:, None, None], st.ssm_state * keep[:, None, None])
        y2, st2 = layer(x2, state=st)
        (y2.square().sum() + st2.ssm_state.sum()).backward()
        return [p.grad.clone() for p in layer.parameters()]

    for a, b in zip(loss_grad(True), loss_grad(False)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_step_is_differentiable_and_agrees_with_a_one_token_forward():
    """Gradients through ``step`` (the reference step, which the step kernel defers to under autograd) equal
    those through the chunked forward of the same token from the same state (float64)."""
    layer = _mamba1("reference", torch.float64)
    x, x_t = torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, 1, 8, dtype=torch.float64)

    def grads(use_step):
        layer.zero_grad()
        _, st = layer(x)
        y, st2 = layer.step(x_t, st) if use_step else layer(x_t, state=st)
        (y.square().sum() + st2.ssm_state.square().sum() + st2.conv_state.sum()).backward()
        return [p.grad.clone() for p in layer.parameters()]

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.upstream
def test_mamba2_states_can_be_reset_in_place_under_autograd(upstream):
    from mamba_ssm.modules.mamba2 import Mamba2

    torch.manual_seed(0)
    layer = StatefulMamba2(Mamba2(d_model=16, d_state=8, headdim=8, chunk_size=16, layer_idx=0), backend="reference")
    x, x2 = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    for name, state in _states_of(layer, x):
        layer.zero_grad()
        _reset_then_train_on(layer, state, x2)
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in layer.parameters()), name


@pytest.mark.upstream
def test_lm_states_can_be_reset_in_place_under_autograd(upstream):
    lm = StatefulMambaLM(tiny_lm("mamba1", n_layer=2), backend="reference")
    ids = torch.randint(0, 32, (2, 6))
    _, state = lm(ids)
    _, _, states_at = lm(ids, return_states_at=[3])
    for st in (state, states_at[0]):
        lm.zero_grad()
        st.reset_(ROWS)
        logits, _ = lm(torch.randint(0, 32, (2, 2)), state=st)
        logits.square().mean().backward()
        assert all(torch.count_nonzero(s.ssm_state[0]) == 0 for _, s in st.items())


@pytest.mark.gpu
def test_gpu_triton_states_reset_in_place_and_step_gradients():
    """On CUDA (Triton scan and step kernels): states from a training forward can be reset in place and trained
    through, and a step under autograd (which takes the differentiable reference) gives the gradients of the
    chunked forward of the same token."""
    torch.manual_seed(1)
    layer = StatefulMamba.from_config(d_model=64, d_state=16, layer_idx=0, device="cuda")
    x, x2 = torch.randn(4, 300, 64, device="cuda"), torch.randn(4, 40, 64, device="cuda")
    rows = torch.tensor([True, False, True, False], device="cuda")
    _, st = layer(x)
    st.reset_(rows)
    y2, st2 = layer(x2, state=st)
    (y2.square().mean() + st2.ssm_state.mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert torch.count_nonzero(st.ssm_state[rows]) == 0

    x_t = torch.randn(4, 1, 64, device="cuda")

    def grads(use_step):
        layer.zero_grad()
        _, s = layer(x[:, :50])
        y, s2 = layer.step(x_t, s) if use_step else layer(x_t, state=s)
        (y.square().sum() + s2.ssm_state.square().sum()).backward()
        return [p.grad.clone() for p in layer.parameters()]

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
