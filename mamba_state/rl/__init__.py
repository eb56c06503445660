"""Recurrent reinforcement learning on a long-horizon memory task (docs/rl.md).

* :class:`~mamba_state.rl.envs.DelayedRecall`: a vectorised memory environment in torch on any device;
* :class:`~mamba_state.rl.policies.MambaPolicy`, :class:`~mamba_state.rl.policies.GRUPolicy`: recurrent
  actor-critics with per-environment state resets;
* :class:`~mamba_state.rl.ppo.PPOTrainer`: recurrent PPO with GAE, exact checkpoints;
  :func:`~mamba_state.rl.ppo.evaluate` (step by step) and :func:`~mamba_state.rl.ppo.evaluate_open_loop`
  (whole episodes in chunks, for long horizons);
* :class:`~mamba_state.rl.ddp.DistributedPPOTrainer`: data-parallel PPO (DistributedDataParallel) over ranks
  that each run a slice of the environments; :mod:`mamba_state.rl.shard` keeps checkpoints independent of
  the number of processes;
* ``mamba-state rl`` (:mod:`mamba_state.rl.cli`): one run, or ``--scale`` across horizons; data-parallel under
  ``torchrun --nproc_per_node=W -m mamba_state.cli rl ...``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._lazy import load_attribute, names

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first use (below)
    from .ddp import DistributedPPOTrainer
    from .envs import DelayedRecall
    from .policies import GRUPolicy, MambaPolicy, RecurrentPolicy, make_policy
    from .ppo import PPOConfig, PPOTrainer, Rollout, compute_gae, evaluate, evaluate_open_loop

__all__ = ["DelayedRecall", "MambaPolicy", "GRUPolicy", "RecurrentPolicy", "make_policy", "PPOConfig",
           "PPOTrainer", "Rollout", "compute_gae", "evaluate", "evaluate_open_loop", "DistributedPPOTrainer"]

# name -> submodule defining it. Loaded on first use (PEP 562), so that ``mamba_state.rl.cli`` (the command
# line's ``rl`` options) imports without torch.
_EXPORTS = {"DelayedRecall": "envs", "MambaPolicy": "policies", "GRUPolicy": "policies",
            "RecurrentPolicy": "policies", "make_policy": "policies", "PPOConfig": "ppo", "PPOTrainer": "ppo",
            "Rollout": "ppo", "compute_gae": "ppo", "evaluate": "ppo", "evaluate_open_loop": "ppo",
            "DistributedPPOTrainer": "ddp"}


def __getattr__(name: str) -> Any:
    return load_attribute(__name__, _EXPORTS, name)


def __dir__() -> list[str]:
    return names(globals(), __all__)
