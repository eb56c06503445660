"""A world-size-independent form of the PPO trainer state, for data-parallel checkpoints.

Each rank of a data-parallel run holds a :class:`~mamba_state.rl.ppo.PPOTrainer` over its own slice of the
environments. :func:`merge_states` joins the ranks' :meth:`PPOTrainer.state_dict` dicts into **the global
form**: exactly the dict a single-process trainer over all ``N`` environments would write (per-environment
tensors concatenated in rank order, ``env.config.num_envs == N``, the model and optimizer of rank 0, which all
ranks share, and rank 0's generators). :func:`split_state` cuts a global dict back into the slice of one rank
for any partition of the ``N`` environments. So a checkpoint written with ``W`` processes loads in a single
process unchanged, and in ``W'`` processes by splitting.

Per-rank random generators cannot be merged; :func:`rank_rngs` extracts them so a checkpoint can also keep
every rank's generator states next to the global form (used for a bit-exact resume with the same ``W``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import StateCompatibilityError

__all__ = ["split_counts", "merge_states", "split_state", "rank_rngs", "local_part"]

# Per-environment tensors of a trainer state dict (batch dimension first), beside env.* and the lists below.
_ENV_KEYS = ("phase", "bits", "episode_return", "episode_steps")
_ROW_KEYS = ("obs", "reset_flags", "age")
_ROW_LISTS = ("state", "history_obs", "history_resets")


def split_counts(num_envs: int, world_size: int) -> list[int]:
    """Environments per rank: ``num_envs // world_size`` each, one more on the first ``num_envs % world_size``.

    Raises ``StateCompatibilityError`` when a rank would get none.
    """
    if world_size < 1 or num_envs < world_size:
        raise StateCompatibilityError(f"num_envs: expected at least one environment per rank (>= {world_size} "
                                      f"for {world_size} processes), found {num_envs}")
    base, extra = divmod(num_envs, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def rank_rngs(sd: dict[str, Any]) -> dict[str, Any]:
    """The generator states of one rank's trainer state dict (trainer, environment, torch CPU and CUDA)."""
    return {"generator": sd["generator"], "env_generator": sd["env"]["generator"], "torch_rng": sd["torch_rng"],
            "cuda_rng": sd["cuda_rng"]}


def local_part(sd: dict[str, Any], rank: int) -> dict[str, Any]:
    """What rank ``rank`` must send for a merge: everything on rank 0; on the others the model and optimizer
    (identical on every rank under DistributedDataParallel) are left out."""
    if rank == 0:
        return sd
    return {k: v for k, v in sd.items() if k not in ("policy", "optimizer")}


def merge_states(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Join per-rank trainer state dicts (rank order) into the global form (see the module docstring)."""
    if not parts:
        raise StateCompatibilityError("merge_states: expected at least one rank's state, found none")
    first = parts[0]
    lengths = {len(p["history_obs"]) for p in parts}
    if len(lengths) != 1:
        raise StateCompatibilityError(f"merge_states: expected equal history lengths on every rank, found {lengths}")
    out = dict(first)
    out["env"] = dict(first["env"])
    out["env"]["config"] = {**first["env"]["config"], "num_envs": sum(p["env"]["config"]["num_envs"] for p in parts)}
    for k in _ENV_KEYS:
        out["env"][k] = torch.cat([p["env"][k] for p in parts], dim=0)
    for k in _ROW_KEYS:
        out[k] = torch.cat([p[k] for p in parts], dim=0)
    for k in _ROW_LISTS:
        out[k] = [torch.cat(ts, dim=0) for ts in zip(*(p[k] for p in parts))]
    out["env_steps"] = first["env_steps"]  # already counted over all environments on every rank
    return out


def split_state(sd: dict[str, Any], counts: Sequence[int], rank: int) -> dict[str, Any]:
    """Rank ``rank``'s slice of a global trainer state dict for the partition ``counts`` (environments per rank).

    Generators are copied as they are (the caller decides whether to keep or reseed them).
    """
    total = int(sd["env"]["config"]["num_envs"])
    if sum(counts) != total:
        raise StateCompatibilityError(f"split_state: expected a partition of the checkpoint's {total} environments, "
                                      f"found counts {list(counts)} (sum {sum(counts)})")
    if len(counts) == 1:
        return sd
    lo = sum(counts[:rank])
    hi = lo + counts[rank]
    out = dict(sd)
    out["env"] = dict(sd["env"])
    out["env"]["config"] = {**sd["env"]["config"], "num_envs": counts[rank]}
    for k in _ENV_KEYS:
        out["env"][k] = sd["env"][k][lo:hi].clone()
    for k in _ROW_KEYS:
        out[k] = sd[k][lo:hi].clone()
    for k in _ROW_LISTS:
        out[k] = [t[lo:hi].clone() for t in sd[k]]
    return out
