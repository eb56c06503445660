"""MambaPolicy and GRUPolicy: one interface, step == sequence, per-environment resets isolate rows."""

from __future__ import annotations

import pytest
import torch

from mamba_state.errors import StateError, StateShapeError
from mamba_state.rl.envs import DelayedRecall
from mamba_state.rl.policies import (GRUPolicy, MambaPolicy, clone_state, count_parameters, make_policy,
                                     select_state)

OBS, ACT = 7, 4


# The CPU is shared; one thread avoids oversubscription (much faster for these small ops).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _small(controller: str, seed: int = 0):
    torch.manual_seed(seed)
    if controller == "mamba":
        return MambaPolicy(OBS, ACT, d_model=16, num_layers=2, d_state=4, backend="reference")
    return GRUPolicy(OBS, ACT, hidden_size=24, num_layers=2, embed_size=16)


def _randomize_heads(policy):
    # The actor is initialised near zero; larger weights make logit comparisons meaningful.
    with torch.no_grad():
        policy.actor.weight.normal_(0, 0.5)
        policy.critic.weight.normal_(0, 0.5)


def _random_state(policy, n, gen):
    return tuple(torch.randn(t.shape, generator=gen) for t in policy.initial_state(n))


CONTROLLERS = ["mamba", "gru"]


def test_parameter_counts_match_at_defaults():
    env = DelayedRecall(2, 10, 1)
    m = MambaPolicy(env.observation_size, env.num_actions)
    g = GRUPolicy(env.observation_size, env.num_actions)
    pm, pg = count_parameters(m), count_parameters(g)
    assert abs(pg - pm) / pm <= 0.10, (pm, pg)


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_step_matches_sequence_with_resets(controller):
    policy = _small(controller)
    _randomize_heads(policy)
    gen = torch.Generator().manual_seed(1)
    n, t_len = 5, 11
    obs = torch.randn(n, t_len, OBS, generator=gen)
    reset = torch.rand(n, t_len, generator=gen) < 0.25
    state = _random_state(policy, n, gen)
    with torch.no_grad():
        logits, values, final = policy.forward_sequence(obs, state, reset)
        s = state
        for t in range(t_len):
            lt, vt, s = policy.step(obs[:, t], s, reset[:, t])
            torch.testing.assert_close(lt, logits[:, t], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(vt, values[:, t], rtol=1e-4, atol=1e-5)
    for a, b in zip(s, final):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # continuation: two chunks from the carried state equal one call
    with torch.no_grad():
        l1, _, mid = policy.forward_sequence(obs[:, :4], state, reset[:, :4])
        l2, _, end = policy.forward_sequence(obs[:, 4:], mid, reset[:, 4:])
    torch.testing.assert_close(torch.cat([l1, l2], 1), logits, rtol=1e-4, atol=1e-5)
    for a, b in zip(end, final):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_reset_of_one_row_leaves_the_others_untouched(controller):
    policy = _small(controller, seed=2)
    _randomize_heads(policy)
    gen = torch.Generator().manual_seed(3)
    n, t_len, t_reset = 4, 9, 5
    obs = torch.randn(n, t_len, OBS, generator=gen)
    state = _random_state(policy, n, gen)
    kept = clone_state(state)
    none = torch.zeros(n, t_len, dtype=torch.bool)
    one = none.clone()
    one[1, t_reset] = True
    with torch.no_grad():
        l0, v0, s0 = policy.forward_sequence(obs, state, none)
        l1, v1, s1 = policy.forward_sequence(obs, state, one)
        # row 1 after its reset == a fresh sequence starting at t_reset
        fresh, _, s_fresh = policy.forward_sequence(obs[1:2, t_reset:], policy.initial_state(1),
                                                    torch.zeros(1, t_len - t_reset, dtype=torch.bool))
        # step path: resetting row 2 only
        mask = torch.tensor([False, False, True, False])
        ls0, _, ss0 = policy.step(obs[:, 0], state, torch.zeros(n, dtype=torch.bool))
        ls1, _, ss1 = policy.step(obs[:, 0], state, mask)
        lf, _, _ = policy.step(obs[2:3, 0], policy.initial_state(1), torch.zeros(1, dtype=torch.bool))
    others = torch.tensor([0, 2, 3])
    # Mamba's sequence path is bit-identical; the GRU's batches the segments of all rows into one nn.GRU call,
    # and one more segment changes the matrix shapes, so its other rows agree to float32 rounding (a leak
    # between rows would be of order one).
    tol = {"rtol": 0, "atol": 0} if controller == "mamba" else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(l1[others], l0[others], **tol)
    torch.testing.assert_close(v1[others], v0[others], **tol)
    for a, b in zip(select_state(s1, others), select_state(s0, others)):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(l1[1, :t_reset], l0[1, :t_reset], **tol)
    torch.testing.assert_close(l1[1:2, t_reset:], fresh, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(l1[1, t_reset:], l0[1, t_reset:], atol=1e-4)  # the reset did something
    for a, b in zip(select_state(s1, torch.tensor([1])), s_fresh):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    keep_rows = torch.tensor([0, 1, 3])
    torch.testing.assert_close(ls1[keep_rows], ls0[keep_rows], rtol=0, atol=0)
    torch.testing.assert_close(ls1[2:3], lf, rtol=1e-4, atol=1e-5)
    for a, b in zip(select_state(ss1, keep_rows), select_state(ss0, keep_rows)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(state, kept):  # inputs never modified in place
        assert torch.equal(a, b)


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_gradients_reach_every_parameter(controller):
    policy = _small(controller, seed=4)
    gen = torch.Generator().manual_seed(5)
    obs = torch.randn(3, 6, OBS, generator=gen)
    reset = torch.zeros(3, 6, dtype=torch.bool)
    reset[0, 3] = True
    logits, values, _ = policy(obs, policy.initial_state(3), reset)
    (logits.square().sum() + values.square().sum()).backward()
    missing = [n for n, p in policy.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_bad_inputs_raise():
    policy = _small("gru")
    state = policy.initial_state(2)
    with pytest.raises(StateShapeError, match="obs"):
        policy.step(torch.randn(2, OBS + 1), state, torch.zeros(2, dtype=torch.bool))
    with pytest.raises(StateShapeError, match="reset"):
        policy.forward_sequence(torch.randn(2, 3, OBS), state, torch.zeros(2, 3))
    with pytest.raises(StateError, match="controller"):
        make_policy("lstm", OBS, ACT)
    mamba = _small("mamba")
    with pytest.raises(StateError, match="MambaPolicy state"):
        mamba.step(torch.randn(2, OBS), state, torch.zeros(2, dtype=torch.bool))


@pytest.mark.parametrize("window", [None, 1, 3])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_gru_segment_replay_equals_the_step_loop_in_values_and_gradients(num_layers, window, monkeypatch):
    """The one-call replay of GRUPolicy (segments cut at resets, right-padded) against a float64 loop of
    ``step``: resets at t = 0, back to back, at the last step, and a row without any; the final state (read
    from the output with one layer, recomputed with two) and gradients of the parameters and of the initial
    state agree too. ``window``: GRU calls of that many time steps (the hidden state carried between them; the
    cap that keeps long replays under cuDNN's limit), None for one call."""
    gen = torch.Generator().manual_seed(11)
    n, t_len = 5, 13
    obs = torch.randn(n, t_len, OBS, generator=gen, dtype=torch.float64)
    reset = torch.rand(n, t_len, generator=gen) < 0.3
    reset[0] = False
    reset[1, 0] = True
    reset[2, 4:6] = True
    reset[3, -1] = True
    outs = []
    for packed in (True, False):
        torch.manual_seed(6)
        policy = GRUPolicy(OBS, ACT, hidden_size=10, num_layers=num_layers, embed_size=8).double()
        if window is not None:  # elements per call for `window` steps of the segments (or of the last ones)
            monkeypatch.setattr(policy, "max_call_elements", window * 4 * 10 * num_layers * n)
            assert policy._time_window(n) == window
        calls = []
        policy.gru.register_forward_hook(lambda mod, inp, out: calls.append(1))
        _randomize_heads(policy)
        h0 = torch.randn(n, num_layers, 10, generator=torch.Generator().manual_seed(12), dtype=torch.float64,
                         requires_grad=True)
        if packed:
            logits, values, (h_end,) = policy.forward_sequence(obs, (h0,), reset)
            one_call = 1 if num_layers == 1 else 2  # with two layers the last segments run once more
            assert (len(calls) == one_call) == (window is None)
        else:
            state, ls, vs = (h0,), [], []
            for t in range(t_len):
                lt, vt, state = policy.step(obs[:, t], state, reset[:, t])
                ls.append(lt)
                vs.append(vt)
            logits, values, (h_end,) = torch.stack(ls, 1), torch.stack(vs, 1), state
        (logits.sin().sum() + values.cos().sum() + h_end.square().sum()).backward()
        grads = {k: p.grad.clone() for k, p in policy.named_parameters()}
        outs.append((logits.detach(), values.detach(), h_end.detach(), h0.grad.clone(), grads))
    (la, va, ha, ga, pa), (lb, vb, hb, gb, pb) = outs
    for a, b in ((la, lb), (va, vb), (ha, hb), (ga, gb)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert ga[1].abs().sum() == 0 and ga[0].abs().sum() > 0  # row 1 is reset at t = 0: its state is unused
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-9, atol=1e-12)


def test_mamba_policy_dt_range_sets_the_initial_step_sizes():
    """``dt_min`` / ``dt_max`` reach upstream's initialisation: softplus(dt bias) lies in the range."""
    import torch.nn.functional as F

    from mamba_state.rl.policies import MambaPolicy

    torch.manual_seed(0)
    for lo, hi in ((1e-3, 1e-1), (2e-4, 5e-3)):
        policy = MambaPolicy(6, 2, d_model=16, num_layers=2, d_state=4, dt_min=lo, dt_max=hi)
        for layer in policy.layers:
            dt = F.softplus(layer.dt_proj.bias.detach())
            assert lo * 0.999 <= dt.min().item() and dt.max().item() <= hi * 1.001
            assert dt.max().item() > 2 * dt.min().item()  # a spread, not a constant
