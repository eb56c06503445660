"""The default options of ``mamba-state rl`` and :func:`mamba_state.rl.train.train` (no torch import here, so the
command line's ``--help`` stays fast).

The defaults make a run that finishes in well under a minute on a CPU (2026-12-02, 2 cores: about 15-20 s) and
usually learns the task: horizon 16, 32 environments, 2 minibatches, 100 updates, the small policies (Mamba
``d_model`` 32 with 1 layer, 10,403 parameters; GRU hidden size 32, 10,019), one CPU thread. Until 0.1.0 they
were horizon 1000, 64 environments, 4 minibatches, ``d_model`` 64 with 2 layers, GRU hidden size 120 and torch's
thread count (:data:`DEFAULTS_0_1`), which took tens of minutes per run on a CPU.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULTS", "DEFAULTS_0_1", "SWEEP_DEFAULTS"]

DEFAULTS: dict[str, Any] = {
    "controller": "mamba", "horizon": 16, "num_bits": 1, "num_envs": 32, "total_updates": 100, "seed": 0,
    "device": "auto", "out": "runs/rl", "rollout_len": None, "lr": 3e-3, "epochs": 4, "minibatches": 2,
    "gamma": 0.99, "gae_lambda": 0.95, "clip_coef": 0.2, "ent_coef": 0.01, "vf_coef": 0.5, "max_grad_norm": 0.5,
    "bptt": "rollout", "d_model": 32, "num_layers": 1, "d_state": 16, "gru_hidden": 32, "gru_layers": 1,
    "backend": None, "noise_channels": 4, "noise_std": 0.1, "distractor_bits": False, "shaping": 0.0,
    "checkpoint_every": 10, "resume": False, "eval_envs": 256, "progress": True, "threads": None,
    "max_seconds": None, "eval_horizons": None, "init_from": None, "dt_min": 0.001, "dt_max": 0.1,
    "collect": "auto", "graph_steps": 16, "eval_mode": "step",
    # Mamba initialisations for long memory (mamba_state.rl.memory); these defaults are upstream's
    "dt_init_floor": 1e-4, "dt_bias_init": "upstream", "chrono_tmax": None, "a_init": "upstream",
    "memory_fraction": 0.5, "memory_retention": [0.999, 0.99999],
}

# The defaults of version 0.1.0 where they differ ("threads": 0 is torch's own thread count). On the command line:
# --horizon 1000 --num-envs 64 --minibatches 4 --d-model 64 --n-layer 2 --gru-hidden 120 --threads 0
DEFAULTS_0_1: dict[str, Any] = {"horizon": 1000, "num_envs": 64, "minibatches": 4, "d_model": 64, "num_layers": 2,
                                "gru_hidden": 120, "threads": 0}

# --scale's lists when not given (the argparse defaults stay None so that run() can refuse them without --scale)
SWEEP_DEFAULTS: dict[str, list] = {"horizons": [8, 16, 32], "seeds": [0, 1], "controllers": ["mamba", "gru"]}
