"""The fused rollout-collection step of recurrent PPO on the delayed-recall task: a small Mamba-1 (or GRU)
actor-critic's whole step (with the sampler and the rollout stores) as one kernel, and the environment's step as
another;
references in ``naive.py``. The collector that runs them is ``mamba_state.rl.fused`` (``--collect graph-fused``)."""

from .launcher import (POLICY_ROWS, gru_policy_step, gru_step_fits, mamba_policy_step, policy_step_fits,
                       recall_env_step)
from .naive import gru_policy_step_ref, mamba_policy_step_ref, recall_env_step_ref, recall_observation_ref
from .weights import GRUPolicyWeights, MambaPolicyWeights

__all__ = ["MambaPolicyWeights", "GRUPolicyWeights", "mamba_policy_step", "gru_policy_step", "recall_env_step",
           "policy_step_fits", "gru_step_fits", "POLICY_ROWS", "mamba_policy_step_ref", "gru_policy_step_ref",
           "recall_env_step_ref", "recall_observation_ref"]
