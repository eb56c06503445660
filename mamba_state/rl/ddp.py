"""Data-parallel PPO with torch DistributedDataParallel (``torchrun --nproc_per_node=W -m mamba_state.cli rl``).

* :func:`distributed`: a context manager that joins the process group torchrun describes (``WORLD_SIZE``,
  ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL with ``cuda:LOCAL_RANK`` on CUDA, Gloo on
  CPU. Without ``WORLD_SIZE > 1`` (and no group already initialised) it yields a one-process context and
  touches nothing. A group it creates it also destroys; one the caller initialised it leaves alone.
* :class:`DistributedPPOTrainer`: a :class:`~mamba_state.rl.ppo.PPOTrainer` over this rank's slice of the
  environments whose training replay runs through DistributedDataParallel, so gradients are averaged over the
  ranks in every minibatch step and the parameters stay identical everywhere. Every rank takes the same number
  of minibatches; with an uneven split each rank's loss is weighted by its share of the environments.
* :func:`reduce_update_stats`: one update's statistics summed (counts), maxed (seconds) and averaged (losses)
  over the ranks, so every rank logs the metrics of all ``N`` environments.
* :func:`gather_trainer_state` / :func:`restore_trainer_state`: checkpoints in the world-size-independent form
  of :mod:`mamba_state.rl.shard`, plus every rank's generator states for a bit-exact resume with the same ``W``.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import StateError
from .envs import DelayedRecall
from .policies import PolicyState, RecurrentPolicy
from .ppo import PPOConfig, PPOTrainer
from .shard import local_part, merge_states, rank_rngs, split_counts, split_state

__all__ = ["DistContext", "distributed", "rank_seed", "DistributedPPOTrainer", "reduce_update_stats",
           "gather_trainer_state", "restore_trainer_state", "broadcast_object", "TIMEOUT"]

# Collective timeout of the groups created here: rank 0 alone writes checkpoints and runs the final greedy
# evaluation while the other ranks wait in a collective.
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its ``device`` and the collective ``backend``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value in (None, "") else int(value)
    except ValueError:
        raise StateError(f"{name}: expected an integer environment variable, found {value!r}") from None


def _device_for(device: str | None, local_rank: int) -> torch.device:
    """The device of this rank: ``auto``/``cuda`` -> ``cuda:LOCAL_RANK`` (when CUDA exists), ``cpu`` -> cpu."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise StateError(f"device: expected an available device, found {device!r} without CUDA")
        if dev.index is not None and dev.index != local_rank:
            raise StateError(f"device: under torchrun each rank uses cuda:LOCAL_RANK; expected 'cuda' (or "
                             f"'cuda:{local_rank}' on this rank), found {device!r} (pick GPUs with "
                             f"CUDA_VISIBLE_DEVICES)")
        if local_rank >= torch.cuda.device_count():
            raise StateError(f"device: expected LOCAL_RANK < {torch.cuda.device_count()} visible GPUs, found "
                             f"LOCAL_RANK={local_rank}")
        return torch.device("cuda", local_rank)
    if dev.type != "cpu":
        raise StateError(f"device: data-parallel runs support cuda and cpu, found {device!r}")
    return dev


@contextlib.contextmanager
def distributed(device: str | None = "auto") -> Iterator[DistContext]:
    """Yield the :class:`DistContext` of this process, joining torchrun's process group if there is one."""
    if dist.is_available() and dist.is_initialized():  # the caller's group: use it, leave it
        world, rank = dist.get_world_size(), dist.get_rank()
        if world <= 1:
            yield DistContext()
            return
        local = _env_int("LOCAL_RANK", rank)
        backend = str(dist.get_backend())
        dev = _device_for(device, local)
        if backend == "nccl" and dev.type != "cuda":
            raise StateError(f"device: the process group uses NCCL, which needs CUDA tensors; expected a cuda "
                             f"device, found {device!r}")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        yield DistContext(rank, world, local, dev, backend)
        return
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        yield DistContext()
        return
    if not dist.is_available():
        raise StateError("WORLD_SIZE > 1: expected a torch build with torch.distributed, found none")
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = _device_for(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        yield DistContext(rank, world, local, dev, backend)
        # DDP's reducer sits in reference cycles that hold its communication work and buckets: collected at
        # interpreter exit, after the group is gone, their destructors abort the process ("terminate called
        # without an active exception", seen under load in CI). Collect them while the group is alive.
        gc.collect()
        # every rank reaches the end before any tears the group down: a rank that left first closed its Gloo
        # connections under one still finishing its last writes
        dist.barrier()
    finally:
        dist.destroy_process_group()
        gc.collect()


def rank_seed(seed: int, rank: int, purpose: str = "", salt: str = "") -> int:
    """A 63-bit seed for ``rank`` derived from ``seed``: ``seed`` itself on rank 0 without ``salt`` (so a
    one-process run is unchanged), else a hash of ``(seed, rank, purpose, salt)``."""
    if rank == 0 and not salt:
        return int(seed)
    digest = hashlib.blake2b(f"{seed}:{rank}:{purpose}:{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def _comm_device(ctx: DistContext) -> torch.device:
    return ctx.device if ctx.backend == "nccl" else torch.device("cpu")


_SUMS = ("successes", "episodes", "return_sum", "steps")
_MAXES = ("collect_s", "total_s")


def reduce_update_stats(stats: dict[str, float], losses: dict[str, float], ctx: DistContext
                        ) -> tuple[dict[str, float], dict[str, float]]:
    """Statistics of one update over all ranks: ``successes``, ``episodes``, ``return_sum``, ``steps`` summed
    (counts come back as ints); ``collect_s``, ``total_s`` the slowest rank's; losses averaged over ranks.

    Two all-reduces of small float64 tensors. Every rank gets the same result.
    """
    if not ctx.enabled:
        return stats, losses
    dev = _comm_device(ctx)
    loss_keys = sorted(losses)
    sums = torch.tensor([float(stats[k]) for k in _SUMS] + [float(losses[k]) for k in loss_keys],
                        dtype=torch.float64, device=dev)
    maxes = torch.tensor([float(stats[k]) for k in _MAXES], dtype=torch.float64, device=dev)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
    total: list[float] = sums.tolist()
    slowest: list[float] = maxes.tolist()
    out = {**stats}
    for i, k in enumerate(_SUMS):
        out[k] = int(round(total[i])) if k != "return_sum" else total[i]
    for i, k in enumerate(_MAXES):
        out[k] = slowest[i]
    red_losses = {k: total[len(_SUMS) + i] / ctx.world_size for i, k in enumerate(loss_keys)}
    return out, red_losses


class _Replay(nn.Module):
    """``forward = policy.forward_sequence``, so DistributedDataParallel sees the training replay."""

    def __init__(self, policy: RecurrentPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, obs: torch.Tensor, state: PolicyState, resets: torch.Tensor):
        return self.policy.forward_sequence(obs, state, resets)


class DistributedPPOTrainer(PPOTrainer):
    """PPO on this rank's ``env`` (its slice of ``num_envs_global`` environments) with gradients averaged over
    the ranks by DistributedDataParallel.

    Rollout collection is local (no communication); each training minibatch step is one DDP forward/backward.
    The DDP constructor copies rank 0's parameters to every rank. All ranks take ``min(num_minibatches,
    smallest rank's environment count)`` minibatches per epoch. With an uneven split the loss of rank ``r`` is
    multiplied by ``n_r * W / N``, so each rank's gradient counts in proportion to its share of the environments.
    """

    def __init__(self, policy: RecurrentPolicy, env: DelayedRecall, config: PPOConfig, ctx: DistContext,
                 num_envs_global: int):
        counts = split_counts(num_envs_global, ctx.world_size)
        if counts[ctx.rank] != env.num_envs:
            raise StateError(f"DistributedPPOTrainer: expected {counts[ctx.rank]} environments on rank {ctx.rank}, "
                             f"found {env.num_envs}")
        super().__init__(policy, env, config)
        self.ctx = ctx
        self.counts = counts
        self.global_num_envs = num_envs_global
        self.loss_scale = counts[ctx.rank] * ctx.world_size / num_envs_global
        dev_ids = [env.device.index] if env.device.type == "cuda" else None
        self.ddp = nn.parallel.DistributedDataParallel(_Replay(policy), device_ids=dev_ids)

    def _replay(self, obs, state, resets):
        return self.ddp(obs, state, resets)

    def _minibatch_count(self, n: int) -> int:
        return min(self.config.num_minibatches, min(self.counts))

    def _reduce(self, stats, losses):
        return reduce_update_stats(stats, losses, self.ctx)


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; small objects only)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device(ctx) if ctx.backend == "nccl" else None)
    return box[0]


def gather_trainer_state(trainer: PPOTrainer, ctx: DistContext) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The global trainer state and the world record, on rank 0 (``None`` on the other ranks).

    The world record is ``{"world_size", "counts", "ranks": [per-rank generator states]}``. A collective:
    every rank must call it.
    """
    sd = trainer.state_dict()
    if not ctx.enabled:
        return sd, {"world_size": 1, "counts": [trainer.env.num_envs], "ranks": [rank_rngs(sd)]}
    parts: list[Any] = [None] * ctx.world_size
    dist.gather_object(local_part(sd, ctx.rank), parts if ctx.is_main else None, dst=0)
    if not ctx.is_main:
        return None
    world = {"world_size": ctx.world_size, "counts": [p["env"]["config"]["num_envs"] for p in parts],
             "ranks": [rank_rngs(p) for p in parts]}
    return merge_states(parts), world


def restore_trainer_state(trainer: PPOTrainer, payload: dict[str, Any], ctx: DistContext, seed: int) -> bool:
    """Load a checkpoint payload (global form + world record) into this rank's trainer.

    Same partition of the environments as when it was written (same ``W``, same ``N``): every rank gets back its
    own generators and the run continues bit for bit. Otherwise every environment continues its episode in
    progress (phase, bits, returns, carried recurrent state, last observation) on whichever rank now holds it,
    the model and optimizer are restored exactly, and each rank's trainer and environment generators are
    reseeded from ``(seed, rank, updates, W)``. Returns whether the resume is the bit-exact kind.
    """
    counts = getattr(trainer, "counts", [trainer.env.num_envs])
    world = payload.get("world") or {"world_size": 1, "counts": [payload["trainer"]["env"]["config"]["num_envs"]]}
    trainer.load_state_dict(split_state(payload["trainer"], counts, ctx.rank))
    if list(world["counts"]) == list(counts):
        if "ranks" in world:
            rng = world["ranks"][ctx.rank]
            trainer.generator.set_state(rng["generator"])
            trainer.env._generator.set_state(rng["env_generator"])
            torch.set_rng_state(rng["torch_rng"])
            if rng["cuda_rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda_rng"])
        return True
    salt = f"resume:{trainer.updates}:{ctx.world_size}"
    trainer.generator.manual_seed(rank_seed(seed + 2, ctx.rank, "trainer", salt))
    trainer.env._generator.manual_seed(rank_seed(seed + 1, ctx.rank, "env", salt))
    return False
