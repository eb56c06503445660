"""DelayedRecall: dynamics, autoreset, staggered episodes, reproducibility, export/import of its state."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from mamba_state.errors import StateCompatibilityError, StateError
from mamba_state.rl.envs import DelayedRecall


def _wrong(env: DelayedRecall) -> torch.Tensor:
    return (env.targets() + 1) % env.num_actions


def test_layout_and_sizes():
    env = DelayedRecall(3, horizon=5, num_bits=3, noise_channels=2, seed=0, random_offsets=False)
    assert env.observation_size == 3 + 2 + 2 and env.num_actions == 8
    obs, info = env.reset()
    assert obs.shape == (3, 7) and obs.dtype == torch.float32
    signs = env.bits.float() * 2 - 1
    assert torch.equal(obs[:, :3], signs)            # bits shown as +-1
    assert torch.all(obs[:, 3] == 1) and torch.all(obs[:, 4] == 0)  # start flag on, cue off
    assert torch.equal(info["phase"], torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("horizon,num_bits", [(0, 1), (3, 2), (6, 1)])
def test_reward_only_at_cue_and_right_answer_gets_one(horizon, num_bits):
    env = DelayedRecall(4, horizon, num_bits, seed=1, noise_channels=3, random_offsets=False)
    obs, _ = env.reset()
    k = num_bits
    for t in range(horizon + 1):  # bits and distractors: any action, no reward, no termination
        if t > 0:
            assert torch.all(obs[:, :k] == 0) and torch.all(obs[:, k] == 0) and torch.all(obs[:, k + 1] == 0)
        actions = torch.randint(0, env.num_actions, (4,))
        obs, reward, term, trunc, info = env.step(actions)
        assert torch.all(reward == 0) and not term.any() and not trunc.any() and not info["success"].any()
    assert torch.all(obs[:, k + 1] == 1) and torch.all(obs[:, k] == 0)  # the cue
    answers = env.targets().clone()
    answers[::2] = _wrong(env)[::2]  # even rows answer wrong
    obs, reward, term, trunc, info = env.step(answers)
    assert torch.equal(reward, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert torch.all(term) and not trunc.any()
    assert torch.equal(info["success"], torch.tensor([False, True, False, True]))
    assert torch.equal(info["episode_length"], torch.full((4,), horizon + 2))
    assert torch.equal(info["episode_return"], reward)
    # autoreset: the returned observation already starts the next episode (bits + start flag)
    assert torch.all(obs[:, k] == 1) and torch.equal(obs[:, :k], env.bits.float() * 2 - 1)
    assert torch.all(env.phase == 0)


def test_autoreset_of_one_env_leaves_others_untouched():
    env = DelayedRecall(16, horizon=4, num_bits=4, seed=3)
    env.reset()
    seen_partial = False
    for _ in range(30):
        before_bits, before_phase = env.bits.clone(), env.phase.clone()
        _, _, term, _, _ = env.step(env.targets())
        keep = ~term
        assert torch.equal(env.bits[keep], before_bits[keep])
        assert torch.equal(env.phase[keep], before_phase[keep] + 1)
        seen_partial |= bool(term.any() and keep.any())
    assert seen_partial  # some steps reset only part of the batch


def test_random_offsets_stagger_episode_boundaries():
    env = DelayedRecall(64, horizon=10, num_bits=1, seed=4)
    _, info = env.reset()
    assert len(torch.unique(info["phase"])) > 5
    assert info["phase"].min() >= -11 and info["phase"].max() <= 0
    first_end = torch.full((64,), -1)
    for t in range(40):
        _, _, term, _, _ = env.step(env.targets())
        first_end = torch.where((first_end < 0) & term, torch.full_like(first_end, t), first_end)
    assert torch.all(first_end >= 0) and len(torch.unique(first_end)) > 5
    # pre-roll shows nothing but noise
    env2 = DelayedRecall(8, horizon=3, num_bits=2, seed=5)
    obs, info = env2.reset()
    pre = info["phase"] < 0
    assert torch.all(obs[pre, :4] == 0)


def test_shaping_and_distractor_bits():
    env = DelayedRecall(2, horizon=2, num_bits=2, seed=6, shaping=0.5, distractor_bits=True, random_offsets=False)
    env.reset()
    obs, *_ = env.step(torch.zeros(2, dtype=torch.long))
    assert torch.all(obs[:, :2].abs() == 1) and torch.all(obs[:, 2] == 0)  # random +-1, no start flag
    env.step(torch.zeros(2, dtype=torch.long))
    env.step(torch.zeros(2, dtype=torch.long))  # now at the cue (phase H + 1 = 3)
    target = env.targets()
    half = target ^ 1  # flip bit 0 only: one of two bits right
    actions = torch.stack([target[0], half[1]])
    _, reward, term, _, info = env.step(actions)
    assert torch.all(term)
    assert torch.allclose(reward, torch.tensor([1.0, 0.25]))  # (1-s)*exact + s*fraction
    assert torch.equal(info["success"], torch.tensor([True, False]))


def _trajectory(env: DelayedRecall, steps: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        obs, reward, term, _, _ = env.step(torch.randint(0, env.num_actions, (env.num_envs,), generator=g))
        out += [obs, reward, term.float()]
    return out


def test_reproducible_and_state_roundtrip():
    a = DelayedRecall(5, 3, 2, seed=7)
    b = DelayedRecall(5, 3, 2, seed=7)
    oa, _ = a.reset()
    ob, _ = b.reset()
    assert torch.equal(oa, ob)
    assert all(torch.equal(x, y) for x, y in zip(_trajectory(a, 12, 0), _trajectory(b, 12, 0)))
    # reset(seed=...) reseeds
    o1, _ = a.reset(seed=99)
    o2, _ = b.reset(seed=99)
    assert torch.equal(o1, o2)
    _trajectory(a, 7, 1)
    saved = a.state_dict()
    cont = _trajectory(a, 10, 2)
    c = DelayedRecall(5, 3, 2, seed=12345)  # other seed: everything comes from the saved state
    c.load_state_dict(saved)
    assert all(torch.equal(x, y) for x, y in zip(cont, _trajectory(c, 10, 2)))
    with pytest.raises(StateCompatibilityError, match="config"):
        DelayedRecall(5, 4, 2).load_state_dict(saved)


def test_bad_arguments_raise():
    with pytest.raises(StateError, match="horizon"):
        DelayedRecall(2, -1, 1)
    with pytest.raises(StateError, match="num_bits"):
        DelayedRecall(2, 3, 0)
    env = DelayedRecall(2, 3, 1, seed=0)
    with pytest.raises(StateError, match="reset"):
        env.step(torch.zeros(2, dtype=torch.long))
    env.reset()
    with pytest.raises(StateError, match=r"shape \[2\]"):
        env.step(torch.zeros(3, dtype=torch.long))
    with pytest.raises(StateError, match=r"\[0, 2\)"):
        env.step(torch.tensor([0, 2]))


@given(horizon=st.integers(0, 6), num_bits=st.integers(1, 3), seed=st.integers(0, 2 ** 31 - 1))
def test_oracle_policy_always_succeeds(horizon, num_bits, seed):
    """Answering the right bits at every step: every finished episode pays exactly 1, and only at its cue."""
    env = DelayedRecall(6, horizon, num_bits, seed=seed)
    env.reset()
    for _ in range(3 * (horizon + 2)):
        phase = env.phase.clone()
        _, reward, term, _, info = env.step(env.targets())
        assert torch.equal(term, phase == horizon + 1)
        assert torch.equal(reward, term.float())
        assert torch.equal(info["success"], term)


@pytest.mark.gpu
def test_runs_on_cuda_reproducibly():
    a = DelayedRecall(32, 5, 2, device="cuda", seed=0)
    b = DelayedRecall(32, 5, 2, device="cuda", seed=0)
    oa, _ = a.reset()
    ob, _ = b.reset()
    assert oa.device.type == "cuda" and torch.equal(oa, ob)
    for _ in range(10):
        ra = a.step(a.targets())
        rb = b.step(b.targets())
        assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], ra[2].float())
