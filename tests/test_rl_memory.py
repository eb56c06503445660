"""Mamba initialisations for long memory (mamba_state.rl.memory) and the claim's CLI spellings (--mode)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mamba_state.cli import build_parser, main
from mamba_state.errors import StateError
from mamba_state.rl.memory import apply_memory_init, memory_steps, step_retention
from mamba_state.rl.policies import MambaPolicy

SMALL = {"d_model": 32, "num_layers": 1}


def _policy(seed=0, **kw):
    torch.manual_seed(seed)
    return MambaPolicy(7, 2, **SMALL, **kw)


def test_defaults_draw_nothing_and_change_nothing():
    torch.manual_seed(0)
    a = MambaPolicy(7, 2, **SMALL)
    after_a = torch.get_rng_state()
    torch.manual_seed(0)
    b = MambaPolicy(7, 2, **SMALL, dt_init_floor=1e-4, dt_bias_init="upstream", a_init="upstream")
    assert torch.equal(after_a, torch.get_rng_state())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    before = {k: v.clone() for k, v in a.layers[0].state_dict().items()}
    rng = torch.get_rng_state()
    apply_memory_init(a.layers[0])  # the defaults: a no-op that draws no random numbers
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, a.layers[0].state_dict()[k]) for k, v in before.items())
    # upstream's memory: under ~1,000 steps for the slowest state of any channel
    assert memory_steps(step_retention(a.layers[0])).max() < 1100


def test_chrono_draws_time_scales_uniformly_up_to_tmax():
    torch.manual_seed(0)
    p = MambaPolicy(7, 2, d_model=64, num_layers=2, dt_bias_init="chrono", chrono_tmax=5000.0)
    for layer in p.layers:
        tau = 1.0 / F.softplus(layer.dt_proj.bias.detach().double())
        assert tau.min() >= 1 - 1e-6 and tau.max() <= 5000 * (1 + 1e-4)
        assert 1500 < tau.mean() < 3500  # uniform on [1, 5000]: mean 2500 (128 channels)
        assert (tau > 1000).float().mean() > 0.6  # most channels start with memory far beyond upstream's
    with pytest.raises(StateError, match="chrono_tmax"):
        MambaPolicy(7, 2, **SMALL, dt_bias_init="chrono")


def test_memory_a_init_puts_a_fraction_of_channels_on_the_retention_ring():
    base, mem = _policy(), _policy(a_init="memory", memory_fraction=0.25, memory_retention=(0.999, 0.9999))
    a0, a1 = base.layers[0].A_log.detach(), mem.layers[0].A_log.detach()
    changed = (a0 != a1).any(dim=1)
    assert int(changed.sum()) == round(0.25 * a0.shape[0])
    r = step_retention(mem.layers[0])[changed]
    assert r.min() >= 0.999 - 1e-6 and r.max() <= 0.9999 + 1e-6
    assert torch.equal(a0[~changed], a1[~changed])  # the other channels keep upstream's A
    assert torch.equal(base.layers[0].dt_proj.bias, mem.layers[0].dt_proj.bias)  # dt untouched
    for bad in ({"memory_fraction": 0.0}, {"memory_retention": (0.9, 1.0)}, {"memory_retention": (0.99, 0.9)},
                {"a_init": "ring"}, {"dt_bias_init": "slow"}, {"dt_init_floor": 0.0}):
        with pytest.raises(StateError, match=next(iter(bad))):
            MambaPolicy(7, 2, **SMALL, **bad)


def test_dt_init_floor_lets_dt_min_go_below_upstreams_clamp():
    clamped = _policy(dt_min=1e-6, dt_max=1e-5)
    free = _policy(dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-7)
    dt_c = F.softplus(clamped.layers[0].dt_proj.bias.detach().double())
    dt_f = F.softplus(free.layers[0].dt_proj.bias.detach().double())
    assert torch.allclose(dt_c, torch.full_like(dt_c, 1e-4), rtol=1e-3)
    assert dt_f.max() <= 1e-5 * 1.01 and dt_f.min() >= 1e-6 * 0.99
    assert memory_steps(step_retention(free.layers[0])).max() > 1e4


def test_cli_memory_options_are_part_of_the_run(tmp_path, capsys):
    base = ["rl", "--horizon", "2", "--num-envs", "4", "--rollout-len", "8", "--epochs", "1", "--minibatches", "1",
            "--device", "cpu", "--eval-envs", "4", "--no-progress", "--total-updates", "1", "--d-model", "16",
            "--backend", "reference", "--dt-bias-init", "chrono", "--a-init", "memory", "--memory-fraction", "0.5",
            "--memory-retention", "0.99", "0.999", "--dt-init-floor", "1e-5", "--out", str(tmp_path / "a")]
    assert main(base) == 0
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (cfg["dt_bias_init"], cfg["a_init"], cfg["memory_retention"], cfg["dt_init_floor"]) == (
        "chrono", "memory", [0.99, 0.999], 1e-5)
    capsys.readouterr()
    resume = [x if x != "memory" else "upstream" for x in base] + ["--resume", "--total-updates", "2"]
    assert main(resume) == 2 and "a_init" in capsys.readouterr().err  # another initialisation: another run


def test_the_claims_command_lines_parse_as_aliases(tmp_path, monkeypatch):
    args = build_parser().parse_args(
        ["rl", "--mode", "quick", "--controller", "mamba", "--horizon", "20000", "--num-bits", "4",
         "--total-updates", "300"])
    assert (args.mode, args.controller, args.horizon, args.num_bits, args.total_updates, args.scale) == (
        "quick", "mamba", 20000, 4, 300, False)
    args = build_parser().parse_args(["rl", "--mode", "scale", "--horizons", "1000", "5000", "10000", "20000"])
    assert args.mode == "scale" and args.horizons == [1000, 5000, 10000, 20000]
    # what they run: --mode scale is --scale, --mode quick one run (called with tiny sizes here)
    calls = []
    import mamba_state.rl.scale as scale
    import mamba_state.rl.train as train_mod

    monkeypatch.setattr(scale, "run_scale", lambda opts, horizons, **kw: calls.append(("scale", horizons, kw)))
    monkeypatch.setattr(train_mod, "train", lambda opts: calls.append(("one", opts["horizon"], opts["num_bits"])))
    assert main(["rl", "--mode", "scale", "--horizons", "1000", "5000", "10000", "20000", "--device", "cpu"]) == 0
    assert main(["rl", "--mode", "quick", "--controller", "mamba", "--horizon", "20000", "--num-bits", "4",
                 "--total-updates", "300", "--device", "cpu"]) == 0
    assert calls[0][0] == "scale" and calls[0][1] == [1000, 5000, 10000, 20000]
    assert calls[0][2]["controllers"] == ["mamba", "gru"]
    assert calls[1] == ("one", 20000, 4)
    assert main(["rl", "--mode", "quick", "--scale", "--device", "cpu"]) == 2
    assert main(["rl", "--mode", "quick", "--horizons", "4", "--device", "cpu"]) == 2  # sweep options need a sweep


@pytest.mark.parametrize("memory", [{"dt_bias_init": "chrono", "chrono_tmax": 6.0}, {"a_init": "memory"},
                                    {"dt_min": 1e-5, "dt_max": 1e-2, "dt_init_floor": 1e-6}],
                         ids=["chrono", "memory-A", "dt-floor"])
def test_each_memory_initialisation_learns_the_task_at_a_short_horizon(memory, one_torch_thread):
    """Each option still learns DelayedRecall at horizon 4 with PPO (30 updates of 16 environments, seconds on a
    CPU): the re-initialisations do not break learning; their effect at long horizons is the GPU table's job."""
    from mamba_state.rl.envs import DelayedRecall
    from mamba_state.rl.ppo import PPOConfig, PPOTrainer, evaluate

    torch.manual_seed(0)
    env = DelayedRecall(16, 4, 1, seed=1)
    policy = MambaPolicy(env.observation_size, env.num_actions, **SMALL, backend="reference", **memory)
    trainer = PPOTrainer(policy, env, PPOConfig(rollout_len=32, lr=3e-3, num_minibatches=2, seed=2))
    for _ in range(30):
        trainer.train_update()
    assert evaluate(policy, 4, 1, num_envs=128, seed=7)["success_rate"] >= 0.9
