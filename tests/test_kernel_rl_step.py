"""The fused collection step's kernels (mamba_state.kernels.rl_step) against their float64 references, and the
references against the modules they stand for (MambaPolicy.step, the graph-ready collector's environment step).

Runs in Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET=1 there) and compiled on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mamba_state.errors import StateError, StateShapeError
from mamba_state.kernels.rl_step import (GRUPolicyWeights, MambaPolicyWeights, gru_policy_step,
                                         gru_policy_step_ref, mamba_policy_step, mamba_policy_step_ref,
                                         policy_step_fits, recall_env_step, recall_env_step_ref,
                                         recall_observation_ref)
from mamba_state.rl.fused import PackedGRUPolicy, PackedMambaPolicy, fused_policy_fits
from mamba_state.rl.policies import GRUPolicy, MambaPolicy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _random_weights(g: torch.Generator, L: int, O: int, DM: int, DI: int, NS: int, R: int, K: int, NA: int,
                    biases: bool) -> MambaPolicyWeights:
    """Random weights at scales that keep every activation O(1) (not zeros: each term of the step matters)."""
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    return MambaPolicyWeights(
        emb_w=r(DM, O, scale=O ** -0.5), emb_b=r(DM, scale=0.1), norm_w=1 + r(L, DM, scale=0.1),
        norm_b=r(L, DM, scale=0.1), in_w=r(L, 2 * DI, DM, scale=DM ** -0.5),
        in_b=r(L, 2 * DI, scale=0.1) if biases else None, conv_w=r(L, DI, K, scale=0.5),
        conv_b=r(L, DI, scale=0.1) if biases else None, x_w=r(L, R + 2 * NS, DI, scale=DI ** -0.5),
        dt_w=r(L, DI, R, scale=R ** -0.5), dt_b=r(L, DI, scale=0.5) - 3,
        A=-torch.exp(r(L, DI, NS, scale=0.5)), D=r(L, DI), out_w=r(L, DM, DI, scale=DI ** -0.5),
        out_b=r(L, DM, scale=0.1) if biases else None, fin_w=1 + r(DM, scale=0.1), fin_b=r(DM, scale=0.1),
        act_w=r(NA, DM, scale=DM ** -0.5), act_b=r(NA, scale=0.1), crit_w=r(DM, scale=DM ** -0.5),
        crit_b=r(1), eps=1e-5)


def _f64(w):
    """The packed weights (either kind) in float64."""
    return type(w)(*[x.double() if isinstance(x, torch.Tensor) else x for x in w])


def _policy_buffers(T: int, N: int, O: int) -> dict[str, torch.Tensor]:
    # filled with a marker, so a store outside row t (or a missing one) shows
    return {"obs_buf": torch.full((T, N, O), -7.0, device=DEVICE),
            "reset_buf": torch.full((T, N), 9, dtype=torch.uint8, device=DEVICE),
            "action_buf": torch.full((T, N), -1, dtype=torch.long, device=DEVICE),
            "logp_buf": torch.full((T, N), -7.0, device=DEVICE),
            "value_buf": torch.full((T, N), -7.0, device=DEVICE)}


@given(seed=st.integers(0, 2**31 - 1), L=st.integers(1, 2), O=st.integers(1, 20), DM=st.sampled_from([8, 16, 24, 32]),
       expand=st.sampled_from([1, 2]), NS=st.sampled_from([4, 16]), R=st.integers(1, 3), K=st.integers(2, 4),
       NA=st.sampled_from([2, 3, 16]), N=st.integers(1, 40), biases=st.booleans())
def test_policy_kernel_matches_the_float64_reference(seed, L, O, DM, expand, NS, R, K, NA, N, biases):
    g = torch.Generator().manual_seed(seed)
    DI = expand * DM
    w = _random_weights(g, L, O, DM, DI, NS, R, K, NA, biases)
    obs = torch.randn(N, O, generator=g).to(DEVICE)
    reset = (torch.rand(N, generator=g) < 0.3).to(DEVICE)
    q = torch.empty(N, NA).exponential_(1, generator=g).to(DEVICE)
    conv = torch.randn(L, N, DI, K, generator=g).to(DEVICE)
    ssm = torch.randn(L, N, DI, NS, generator=g).to(DEVICE)
    action, logp, value, conv_ref, ssm_ref = mamba_policy_step_ref(_f64(w), obs.double(), reset, q.double(),
                                                                   conv.double(), ssm.double())
    T, t = 3, 1
    bufs = _policy_buffers(T, N, O)
    mamba_policy_step(w, obs, reset.view(torch.uint8), q, torch.tensor([t], device=DEVICE), conv, ssm, **bufs)
    # float32 with its own summation order: a few ulps of the O(1) activations, through up to two layers
    tol = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(conv.double(), conv_ref, **tol)
    torch.testing.assert_close(ssm.double(), ssm_ref, **tol)
    torch.testing.assert_close(bufs["value_buf"][t].double(), value, **tol)
    # the sampled action is argmax(probs / q): equal unless two ratios are within rounding of each other
    assert torch.equal(bufs["action_buf"][t].cpu(), action.cpu())
    torch.testing.assert_close(bufs["logp_buf"][t].double(), logp, **tol)
    assert torch.equal(bufs["obs_buf"][t], obs) and torch.equal(bufs["reset_buf"][t].bool(), reset)
    for name, marker in (("obs_buf", -7.0), ("reset_buf", 9), ("action_buf", -1), ("logp_buf", -7.0)):
        others = torch.cat([bufs[name][:t], bufs[name][t + 1:]])
        assert (others == marker).all(), f"{name}: written outside row t"


def test_reference_is_the_policy_step_in_float64():
    """The packed reference computes what MambaPolicy.step does (float64 both, so only the packing is tested)."""
    torch.manual_seed(3)
    for layers, obs_size, actions in ((1, 7, 2), (2, 10, 16)):
        policy = MambaPolicy(obs_size, actions, d_model=24, num_layers=layers, backend="reference")
        with torch.no_grad():  # non-zero biases everywhere the policy has them
            for p in policy.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
        w = _f64(PackedMambaPolicy(policy).weights)
        # the packed A is -exp(A_log) rounded to float32; the float64 policy computes it in float64
        w = w._replace(A=torch.stack([-torch.exp(m.A_log.double()) for m in policy.layers]))
        n = 13
        obs, reset = torch.randn(n, obs_size, dtype=torch.float64), torch.rand(n) < 0.4
        state = tuple(torch.randn_like(s, dtype=torch.float64) for s in policy.initial_state(n))
        q = torch.empty(n, actions, dtype=torch.float64).exponential_(1)
        action, logp, value, conv, ssm = mamba_policy_step_ref(w, obs, reset, q, torch.stack(state[0::2]),
                                                               torch.stack(state[1::2]))
        with torch.no_grad():
            logits, value_p, new = policy.double().step(obs, state, reset)
        torch.testing.assert_close(value, value_p, rtol=1e-12, atol=1e-12)
        assert torch.equal(action, (torch.softmax(logits, -1) / q).argmax(-1))
        torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(-1, action[:, None])[:, 0])
        for i in range(layers):
            torch.testing.assert_close(conv[i], new[2 * i], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(ssm[i], new[2 * i + 1], rtol=1e-12, atol=1e-12)


@given(seed=st.integers(0, 2**31 - 1), L=st.integers(1, 3), O=st.integers(1, 20), E=st.sampled_from([8, 16, 40, 64]),
       H=st.sampled_from([8, 16, 32]), NA=st.sampled_from([2, 5, 16]), N=st.integers(1, 40))
def test_gru_kernel_matches_the_float64_reference(seed, L, O, E, H, NA, N):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    w = GRUPolicyWeights(emb_w=r(E, O, scale=O ** -0.5), emb_b=r(E, scale=0.1), w_ih0=r(3 * H, E, scale=E ** -0.5),
                         w_ih_rest=r(max(L - 1, 1), 3 * H, H, scale=H ** -0.5), b_ih=r(L, 3 * H, scale=0.1),
                         w_hh=r(L, 3 * H, H, scale=H ** -0.5), b_hh=r(L, 3 * H, scale=0.1),
                         act_w=r(NA, H, scale=H ** -0.5), act_b=r(NA, scale=0.1), crit_w=r(H, scale=H ** -0.5),
                         crit_b=r(1))
    obs, h = r(N, O), r(N, L, H)
    reset = (torch.rand(N, generator=g) < 0.3).to(DEVICE)
    q = torch.empty(N, NA).exponential_(1, generator=g).to(DEVICE)
    action, logp, value, h_ref = gru_policy_step_ref(_f64(w), obs.double(), reset, q.double(), h.double())
    T, t = 2, 0
    bufs = _policy_buffers(T, N, O)
    gru_policy_step(w, obs, reset.view(torch.uint8), q, torch.tensor([t], device=DEVICE), h, **bufs)
    tol = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(h.double(), h_ref, **tol)
    torch.testing.assert_close(bufs["value_buf"][t].double(), value, **tol)
    assert torch.equal(bufs["action_buf"][t].cpu(), action.cpu())
    torch.testing.assert_close(bufs["logp_buf"][t].double(), logp, **tol)
    assert torch.equal(bufs["obs_buf"][t], obs) and torch.equal(bufs["reset_buf"][t].bool(), reset)
    assert (bufs["action_buf"][1] == -1).all() and (bufs["value_buf"][1] == -7).all()


def test_gru_reference_is_the_policy_step_in_float64():
    """The packed GRU reference (equations written out) computes what GRUPolicy.step (nn.GRU) does."""
    torch.manual_seed(4)
    for layers in (1, 2):
        policy = GRUPolicy(9, 4, hidden_size=12, num_layers=layers, embed_size=20)
        w = _f64(PackedGRUPolicy(policy).weights)
        n = 11
        obs, reset = torch.randn(n, 9, dtype=torch.float64), torch.rand(n) < 0.4
        h = torch.randn(n, layers, 12, dtype=torch.float64)
        q = torch.empty(n, 4, dtype=torch.float64).exponential_(1)
        action, logp, value, h_new = gru_policy_step_ref(w, obs, reset, q, h)
        with torch.no_grad():
            logits, value_p, (h_p,) = policy.double().step(obs, (h,), reset)
        torch.testing.assert_close(value, value_p, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_new, h_p, rtol=1e-12, atol=1e-12)
        assert torch.equal(action, (torch.softmax(logits, -1) / q).argmax(-1))
        torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(-1, action[:, None])[:, 0])


@given(seed=st.integers(0, 2**31 - 1), N=st.integers(1, 300), KB=st.integers(1, 5), NC=st.integers(0, 3),
       horizon=st.integers(0, 4), distract=st.booleans(), shaping=st.sampled_from([0.0, 0.3]), age=st.booleans())
def test_env_kernel_matches_the_reference(seed, N, KB, NC, horizon, distract, shaping, age):
    g = torch.Generator().manual_seed(seed)

    def ints(high, *shape):
        return torch.randint(0, high, shape, generator=g).to(DEVICE)

    T, t = 4, 2
    phase = ints(horizon + 3, N) - 1  # pre-roll, show, distractors, cue
    bits, new_bits = ints(2, N, KB), ints(2, N, KB)
    noise_bits = ints(2, N, KB) if distract else None
    noise = torch.randn(N, NC, generator=g).to(DEVICE) if NC else None
    ep_return = torch.rand(N, generator=g).to(DEVICE)
    ep_steps = ints(50, N)
    ages = ints(50, N)
    reset = torch.rand(N, generator=g).to(DEVICE) < 0.3
    actions = torch.full((T, N), -1, dtype=torch.long, device=DEVICE)
    actions[t] = ints(2 ** KB, N)
    ref = recall_env_step_ref(actions[t], phase, bits, ep_return, ep_steps, new_bits, horizon, shaping)
    obs_ref = recall_observation_ref(ref["phase"], ref["bits"], horizon, noise_bits, noise, 0.25)

    obs = torch.zeros(N, KB + 2 + NC, device=DEVICE)
    rewards = torch.full((T, N), -7.0, device=DEVICE)
    dones = torch.zeros(T, N, dtype=torch.bool, device=DEVICE)
    successes, episodes = torch.tensor(5, device=DEVICE), torch.tensor(6, device=DEVICE)
    return_sum = torch.tensor(0.5, dtype=torch.float64, device=DEVICE)
    age_before, reset_before = ages.clone(), reset.clone()
    recall_env_step(torch.tensor([t], device=DEVICE), actions, phase, bits, ep_return, ep_steps,
                    reset.view(torch.uint8), obs, new_bits, noise_bits, noise, rewards, dones.view(torch.uint8),
                    successes, episodes, return_sum, horizon, shaping, 0.25, age=ages if age else None)
    exact = {} if shaping == 0 else {"rtol": 1e-6, "atol": 1e-7}  # a fused multiply-add may round differently
    torch.testing.assert_close(rewards[t], ref["reward"], **(exact or {"rtol": 0, "atol": 0}))
    torch.testing.assert_close(ep_return, ref["ep_return"], **(exact or {"rtol": 0, "atol": 0}))
    assert (rewards[:t] == -7).all() and (rewards[t + 1:] == -7).all()
    assert torch.equal(dones[t], ref["done"]) and not dones[:t].any() and not dones[t + 1:].any()
    assert torch.equal(reset, ref["done"])
    for name, got in (("phase", phase), ("bits", bits), ("ep_steps", ep_steps)):
        assert torch.equal(got, ref[name]), name
    assert torch.equal(obs, obs_ref)
    assert int(successes) == 5 + int(ref["success"].sum()) and int(episodes) == 6 + int(ref["done"].sum())
    torch.testing.assert_close(return_sum, 0.5 + ref["episode_return"].double().sum(), rtol=1e-6, atol=1e-6)
    expected_age = torch.where(reset_before, 1, age_before + 1) if age else age_before
    assert torch.equal(ages, expected_age)


def test_limits_and_errors():
    assert policy_step_fits({"O": 8, "DM": 64, "DI": 128, "NS": 16, "R": 4, "K": 4, "NA": 16, "L": 2})[0]
    ok, why = policy_step_fits({"O": 8, "DM": 64, "DI": 128, "NS": 16, "R": 4, "K": 4, "NA": 2 ** 10, "L": 1})
    assert not ok and "NA = 1024 > 256" in why
    assert fused_policy_fits(GRUPolicy(4, 2, hidden_size=32))[0]  # the recipe's GRU (embed 64)
    assert "H = 120 > 64" in fused_policy_fits(GRUPolicy(4, 2))[1]  # 0.1's default GRU: the graph path's step
    assert "written for MambaPolicy and GRUPolicy" in fused_policy_fits(torch.nn.Linear(2, 2))[1]
    big = MambaPolicy(4, 2 ** 9, d_model=8, num_layers=1)
    assert "NA = 512" in fused_policy_fits(big)[1]
    with pytest.raises(StateError, match="NA = 512"):
        PackedMambaPolicy(big)
    w = PackedMambaPolicy(MambaPolicy(4, 2, d_model=8, num_layers=1)).weights
    with pytest.raises(StateShapeError, match="conv: expected a contiguous tensor"):
        mamba_policy_step(w, torch.zeros(3, 4), torch.zeros(3, dtype=torch.uint8), torch.ones(3, 2),
                          torch.zeros(1, dtype=torch.long), torch.zeros(1, 3, 16, 3), torch.zeros(1, 3, 16, 16),
                          **_policy_buffers(2, 3, 4))
