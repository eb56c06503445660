"""Recurrent PPO with GAE for a vectorised environment and a :class:`~mamba_state.rl.policies.RecurrentPolicy`.

One update:

1. **Collect** ``T = rollout_len`` steps in all ``N`` environments with ``policy.step``. The policy state at
   the rollout's start is stored; the per-step ``reset`` flags (True where the observation is the first of an
   episode, i.e. where the previous step terminated, and everywhere at the very first step) are stored too.
2. **GAE** advantages and returns (``gamma``, ``gae_lambda``; no bootstrap across a termination).
3. **Train** ``epochs`` passes; each pass shuffles the *environments* and splits them into ``num_minibatches``
   minibatches of whole sequences. Each sequence is replayed with ``policy.forward_sequence`` from the stored
   initial state of its rows, with the stored reset mask, so the recomputed log-probabilities at the first
   epoch equal those at collection time and nothing leaks across episode boundaries (tested). The loss is the
   clipped surrogate + ``vf_coef`` * value loss - ``ent_coef`` * entropy, with advantage normalisation per
   minibatch and gradient-norm clipping.

``bptt="rollout"`` (default) truncates backpropagation at the rollout's start (the stored state is a constant).
``bptt="episode"`` backpropagates through whole episodes: each environment's observations since its current
episode began (kept in a history of up to ``2 * episode_length`` steps) are replayed from a zero state in front
of the rollout, and gradients flow through them. In that mode the state entering the rollout is recomputed with
the current parameters, so it differs from the one used at collection (the ratio absorbs it).

Randomness: action sampling and minibatch shuffling use the trainer's own ``torch.Generator``; with the
environment's generator, everything is in :meth:`PPOTrainer.state_dict`, and a restored trainer makes exactly
the same next updates.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn

from ..errors import StateCompatibilityError, StateError
from .envs import DelayedRecall
from .policies import PolicyState, RecurrentPolicy, clone_state, select_state

__all__ = ["PPOConfig", "Rollout", "PPOTrainer", "compute_gae", "evaluate", "evaluate_open_loop", "update_metrics"]


@dataclass
class PPOConfig:
    """PPO hyper-parameters (defaults follow common recurrent-PPO practice)."""

    rollout_len: int = 64
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_coef: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    lr: float = 3e-4
    epochs: int = 4
    num_minibatches: int = 4
    max_grad_norm: float = 0.5
    norm_adv: bool = True
    clip_vloss: bool = True
    bptt: str = "rollout"
    seed: int = 0
    stats_window: int = 10

    def __post_init__(self) -> None:
        if self.bptt not in ("rollout", "episode"):
            raise StateError(f"bptt: expected 'rollout' or 'episode', found {self.bptt!r}")
        for name in ("rollout_len", "epochs", "num_minibatches", "stats_window"):
            if int(getattr(self, name)) < 1:
                raise StateError(f"{name}: expected a positive int, found {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PPOConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Rollout:
    """One rollout of ``T`` steps in ``N`` environments (all tensors ``[N, T]`` unless noted).

    ``obs [N, T, O]`` float32; ``actions`` long; ``logprobs``, ``values``, ``rewards`` float32; ``dones`` bool
    (the episode ended at this step); ``resets`` bool (the observation is an episode's first); ``init_state``
    the policy state before step 0; ``last_value [N]`` the value of the observation after the last step;
    ``advantages``, ``returns`` filled by :func:`compute_gae`. In ``bptt="episode"`` mode ``prefix_obs
    [N, P, O]`` and ``prefix_resets [N, P]`` hold the steps of the current episodes before the rollout.
    """

    obs: torch.Tensor
    actions: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    dones: torch.Tensor
    resets: torch.Tensor
    init_state: PolicyState
    last_value: torch.Tensor
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    prefix_obs: torch.Tensor | None = None
    prefix_resets: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
                gamma: float, gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over ``[N, T]`` tensors; ``dones[:, t]`` stops bootstrapping after t.

    Returns ``(advantages, returns)``, both float32 ``[N, T]``.
    """
    n, t_len = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(last_value)
    for t in reversed(range(t_len)):
        next_value = last_value if t == t_len - 1 else values[:, t + 1]
        nonterminal = (~dones[:, t]).float()
        delta = rewards[:, t] + gamma * next_value * nonterminal - values[:, t]
        last = delta + gamma * gae_lambda * nonterminal * last
        adv[:, t] = last
    return adv, adv + values


def _sample(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class PPOTrainer:
    """Runs PPO updates of ``policy`` on ``env`` (a :class:`DelayedRecall` or anything with its API).

    Args:
        policy: a recurrent actor-critic on ``env.device``.
        env: the vectorised environment (reset here, with its own generator).
        config: :class:`PPOConfig`.
    """

    def __init__(self, policy: RecurrentPolicy, env: DelayedRecall, config: PPOConfig | None = None,
                 collect: str = "eager", steps_per_graph: int = 16):
        self.policy = policy
        self.env = env
        self.config = config or PPOConfig()
        self.device = env.device
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=self.config.lr, eps=1e-5)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(self.config.seed))
        n = env.num_envs
        self.obs, _ = env.reset()
        self.reset_flags = torch.ones(n, dtype=torch.bool, device=self.device)
        self.state = policy.initial_state(n, device=self.device)
        self.updates = 0
        self.env_steps = 0  # over all environments (all ranks when data-parallel)
        self.train_seconds = 0.0  # collection + training time of all updates so far (across resumes)
        self.global_num_envs = n  # a data-parallel subclass sets the count over all ranks
        self.age = torch.zeros(n, dtype=torch.long, device=self.device)  # steps since the episode began
        self.history_len = 2 * getattr(env, "episode_length", self.config.rollout_len)
        self.history: collections.deque = collections.deque(maxlen=self.history_len)
        self.window: collections.deque = collections.deque(maxlen=self.config.stats_window)
        self._collector: Any = None
        self.set_collect(collect, steps_per_graph)

    # ------------------------------------------------------------------ collection
    def set_collect(self, mode: str = "eager", steps_per_graph: int = 16) -> None:
        """How :meth:`collect` runs: ``"eager"`` (one ``policy.step`` and ``env.step`` per time step from Python,
        the 0.1 path), ``"graph"`` (:class:`~mamba_state.rl.collect.GraphCollector`: the graph-ready step,
        captured and replayed as CUDA graphs on CUDA, run eagerly elsewhere; the same transitions),
        ``"graph-compiled"`` (the same with the step's body through ``torch.compile``: fewer kernels a step,
        transitions equal up to float rounding), ``"graph-fused"`` (the same with the step's body as two Triton
        kernels, the Mamba policy step and the environment step: equal up to float rounding) or ``"auto"``
        (graph on CUDA, eager elsewhere)."""
        from .collect import GraphCollector, resolve_collect

        self.collect_mode = resolve_collect(mode, self.device)
        self._collector = (GraphCollector(self, capture=self.device.type == "cuda", steps_per_graph=steps_per_graph,
                                          compile_step=self.collect_mode == "graph-compiled",
                                          fused=self.collect_mode == "graph-fused")
                           if self.collect_mode != "eager" else None)

    def collect(self) -> Rollout:
        """Run ``rollout_len`` steps in every environment; returns the :class:`Rollout` (GAE filled in)."""
        if self._collector is not None:
            return Rollout(**self._collector.collect())
        return self.collect_eager()

    @torch.no_grad()
    def collect_eager(self) -> Rollout:
        """:meth:`collect` on the eager path (one ``policy.step``, sampling and ``env.step`` per time step)."""
        cfg, env, policy = self.config, self.env, self.policy
        n, t_len = env.num_envs, cfg.rollout_len
        prefix_obs = prefix_resets = None
        if cfg.bptt == "episode":
            prefix_obs, prefix_resets = self._prefix()
        init_state = clone_state(self.state)
        obs_buf, act_buf, logp_buf, val_buf, rew_buf, done_buf, reset_buf = ([] for _ in range(7))
        # Counters stay on the device: no host synchronisation inside the loop.
        successes = torch.zeros((), dtype=torch.long, device=self.device)
        episodes = torch.zeros((), dtype=torch.long, device=self.device)
        return_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        state, obs, reset_flags = self.state, self.obs, self.reset_flags
        was_training = policy.training
        policy.eval()
        for _ in range(t_len):
            logits, value, state = policy.step(obs, state, reset_flags)
            action = _sample(logits, self.generator)
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, action[:, None]).squeeze(-1)
            obs_buf.append(obs)
            reset_buf.append(reset_flags)
            act_buf.append(action)
            logp_buf.append(logp)
            val_buf.append(value.float())
            if cfg.bptt == "episode":
                self.history.append((obs, reset_flags))
                self.age = torch.where(reset_flags, torch.ones_like(self.age), self.age + 1)
            obs, reward, terminated, truncated, info = env.step(action)
            done = terminated | truncated
            rew_buf.append(reward.float())
            done_buf.append(done)
            reset_flags = done
            successes += info["success"].sum()
            episodes += done.sum()
            return_sum += info["episode_return"].sum()
        _, last_value, _ = policy.step(obs, state, reset_flags)  # bootstrap only: this state is discarded
        policy.train(was_training)
        self.state, self.obs, self.reset_flags = state, obs, reset_flags
        self.env_steps += self.global_num_envs * t_len
        stack = lambda xs: torch.stack(xs, dim=1)  # noqa: E731
        ro = Rollout(stack(obs_buf), stack(act_buf), stack(logp_buf), stack(val_buf), stack(rew_buf),
                     stack(done_buf), stack(reset_buf), init_state, last_value.float(),
                     prefix_obs=prefix_obs, prefix_resets=prefix_resets)
        ro.advantages, ro.returns = compute_gae(ro.rewards, ro.values, ro.dones, ro.last_value, cfg.gamma,
                                                cfg.gae_lambda)
        ro.stats = {"successes": int(successes), "episodes": int(episodes), "return_sum": float(return_sum)}
        return ro

    def _prefix(self) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """The steps of each environment's current episode before the rollout (episode-BPTT mode)."""
        lengths = torch.where(self.reset_flags, torch.zeros_like(self.age), self.age)
        p = min(int(lengths.max()), len(self.history)) if len(self.history) else 0
        if p == 0:
            return None, None
        items = list(self.history)[-p:]
        obs = torch.stack([o for o, _ in items], dim=1)
        resets = torch.stack([r for _, r in items], dim=1).clone()
        resets[:, 0] = True  # replay starts from a zero state; earlier junk is cut by each row's own reset
        return obs, resets

    # ------------------------------------------------------------------ training
    def evaluate_rollout(self, ro: Rollout, index: torch.Tensor | slice = slice(None)
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replay rows ``index`` of a rollout: returns ``(logits [n, T, A], values [n, T], log-probs [n, T])``."""
        obs, resets = ro.obs[index], ro.resets[index]
        if ro.prefix_obs is not None:
            assert ro.prefix_resets is not None  # set together with prefix_obs
            p = ro.prefix_obs.shape[1]
            obs = torch.cat([ro.prefix_obs[index], obs], dim=1)
            resets = torch.cat([ro.prefix_resets[index], resets], dim=1)
            state = self.policy.initial_state(obs.shape[0], device=obs.device)
        else:
            p = 0
            state = select_state(ro.init_state, index)
        logits, values, _ = self._replay(obs, state, resets)
        logits, values = logits[:, p:], values[:, p:]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ro.actions[index][..., None]).squeeze(-1)
        return logits, values, logp

    def _replay(self, obs: torch.Tensor, state: PolicyState, resets: torch.Tensor):
        """``policy.forward_sequence``; the data-parallel subclass routes it through DistributedDataParallel."""
        return self.policy.forward_sequence(obs, state, resets)

    def _minibatch_count(self, n: int) -> int:
        """Minibatches per epoch for ``n`` local environments (every rank must take the same number)."""
        return min(self.config.num_minibatches, n)

    def _reduce(self, stats: dict[str, float], losses: dict[str, float]
                ) -> tuple[dict[str, float], dict[str, float]]:
        """Combine one update's statistics over ranks (identity in one process)."""
        return stats, losses

    def update(self, ro: Rollout) -> dict[str, float]:
        """``epochs`` passes of minibatch SGD over the rollout; returns mean losses and diagnostics."""
        cfg = self.config
        n = ro.obs.shape[0]
        mb_count = self._minibatch_count(n)
        assert ro.advantages is not None and ro.returns is not None, "compute_gae fills them in collect()"
        loss_scale = float(getattr(self, "loss_scale", 1.0))
        sums: dict[str, float] = collections.defaultdict(float)
        steps = 0
        self.policy.train()
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=self.generator, device=self.device)
            for idx in perm.tensor_split(mb_count):
                logits, values, logp = self.evaluate_rollout(ro, idx)
                adv = ro.advantages[idx]
                if cfg.norm_adv:
                    adv = (adv - adv.mean()) / (adv.std(unbiased=False) + 1e-8)
                log_ratio = logp - ro.logprobs[idx]
                ratio = log_ratio.exp()
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
                ret, old_v = ro.returns[idx], ro.values[idx]
                values = values.float()
                if cfg.clip_vloss:
                    clipped = old_v + (values - old_v).clamp(-cfg.clip_coef, cfg.clip_coef)
                    v_loss = 0.5 * torch.max((values - ret) ** 2, (clipped - ret) ** 2).mean()
                else:
                    v_loss = 0.5 * ((values - ret) ** 2).mean()
                logp_all = torch.log_softmax(logits.float(), dim=-1)
                entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
                loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy
                self.optimizer.zero_grad(set_to_none=True)
                (loss if loss_scale == 1.0 else loss * loss_scale).backward()
                grad_norm = nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    sums["policy_loss"] += float(pg_loss)
                    sums["value_loss"] += float(v_loss)
                    sums["entropy"] += float(entropy)
                    sums["approx_kl"] += float(((ratio - 1) - log_ratio).mean())
                    sums["clip_frac"] += float(((ratio - 1).abs() > cfg.clip_coef).float().mean())
                    sums["grad_norm"] += float(grad_norm)
                steps += 1
        return {k: v / steps for k, v in sums.items()}

    def train_update(self) -> dict[str, float]:
        """Collect one rollout and train on it. Returns the update's metrics (see :func:`update_metrics`)."""
        t0 = time.perf_counter()
        ro = self.collect()
        t1 = time.perf_counter()
        losses = self.update(ro)
        t2 = time.perf_counter()
        self.updates += 1
        stats = {**ro.stats, "steps": ro.obs.shape[0] * ro.obs.shape[1], "collect_s": t1 - t0, "total_s": t2 - t0}
        stats, losses = self._reduce(stats, losses)
        self.window.append((stats["successes"], stats["episodes"], stats["return_sum"]))
        self.train_seconds += float(stats["total_s"])
        return {**update_metrics(stats, self.window, losses, self.updates, self.env_steps),
                "train_seconds": self.train_seconds}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: model, optimizer, generators, environment, carried state."""
        cpu = lambda t: t.detach().cpu().clone()  # noqa: E731
        return {
            "format": "mamba_state.rl.ppo/1",
            "config": asdict(self.config),
            "policy": {k: cpu(v) for k, v in self.policy.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state().clone(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "env": self.env.state_dict(),
            "obs": cpu(self.obs),
            "reset_flags": cpu(self.reset_flags),
            "state": [cpu(t) for t in self.state],
            "updates": self.updates,
            "env_steps": self.env_steps,
            "train_seconds": self.train_seconds,
            "age": cpu(self.age),
            "history_obs": [cpu(o) for o, _ in self.history],
            "history_resets": [cpu(r) for _, r in self.history],
            "window": [list(x) for x in self.window],
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the policy architecture and environment config must match)."""
        if not isinstance(ckpt, dict) or ckpt.get("format") != "mamba_state.rl.ppo/1":
            found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
            raise StateCompatibilityError(f"PPO checkpoint: expected format 'mamba_state.rl.ppo/1', found {found!r}")
        dev = self.device
        self.config = PPOConfig.from_dict(ckpt["config"])
        self.policy.load_state_dict(ckpt["policy"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.generator.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        self.env.load_state_dict(ckpt["env"])
        self.obs = ckpt["obs"].to(dev)
        self.reset_flags = ckpt["reset_flags"].to(dev)
        state = tuple(t.to(dev) for t in ckpt["state"])
        expected = self.policy.initial_state(self.env.num_envs, device=dev)
        if [t.shape for t in state] != [t.shape for t in expected]:
            raise StateCompatibilityError(
                f"PPO checkpoint policy state: expected shapes {[list(t.shape) for t in expected]}, "
                f"found {[list(t.shape) for t in state]}")
        self.state = state
        self.updates = int(ckpt["updates"])
        self.env_steps = int(ckpt["env_steps"])
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))  # absent in checkpoints before 0.2
        self.age = ckpt["age"].to(dev)
        self.history = collections.deque(
            ((o.to(dev), r.to(dev)) for o, r in zip(ckpt["history_obs"], ckpt["history_resets"])),
            maxlen=self.history_len)
        self.window = collections.deque((tuple(x) for x in ckpt["window"]), maxlen=self.config.stats_window)


def update_metrics(stats: dict[str, float], window: Any, losses: dict[str, float], updates: int,
                   env_steps: int) -> dict[str, float]:
    """The metrics of one update from its statistics (summed over ranks when data-parallel).

    ``stats``: ``successes``, ``episodes`` (episodes that ended in the rollout), ``return_sum`` (their summed
    returns), ``steps`` (environment steps), ``collect_s`` and ``total_s`` (seconds: collection, whole update).
    ``window``: ``(successes, episodes, return_sum)`` of the last updates, this one included.
    """
    s = stats
    w_succ = sum(x[0] for x in window)
    w_eps = sum(x[1] for x in window)
    w_ret = sum(x[2] for x in window)
    return {
        "update": updates,
        "env_steps": env_steps,
        "episodes": s["episodes"],
        "success_rate": s["successes"] / s["episodes"] if s["episodes"] else math.nan,
        "mean_return": s["return_sum"] / s["episodes"] if s["episodes"] else math.nan,
        "window_success_rate": w_succ / w_eps if w_eps else math.nan,
        "window_mean_return": w_ret / w_eps if w_eps else math.nan,
        "collect_steps_per_s": s["steps"] / max(s["collect_s"], 1e-9),
        "steps_per_s": s["steps"] / max(s["total_s"], 1e-9),
        **losses,
    }


@torch.no_grad()
def evaluate(policy: RecurrentPolicy, horizon: int, num_bits: int, num_envs: int = 256, seed: int = 12345,
             greedy: bool = True, device: torch.device | str | None = None, **env_kwargs: Any) -> dict[str, float]:
    """Success rate of ``policy`` on ``num_envs`` fresh episodes (no pre-roll), greedy actions by default.

    Runs exactly ``horizon + 2`` steps; every environment answers once. Returns ``success_rate``, ``episodes``
    and ``steps_per_s`` (policy + environment steps per second, summed over environments).
    """
    device = torch.device(device) if device is not None else next(policy.parameters()).device
    env = DelayedRecall(num_envs, horizon, num_bits, device=device, seed=seed, random_offsets=False, **env_kwargs)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    obs, _ = env.reset()
    state = policy.initial_state(num_envs, device=device)
    reset = torch.ones(num_envs, dtype=torch.bool, device=device)
    was_training = policy.training
    policy.eval()
    successes = torch.zeros(num_envs, dtype=torch.long, device=device)
    t0 = time.perf_counter()
    for _ in range(env.episode_length):
        logits, _, state = policy.step(obs, state, reset)
        action = logits.argmax(-1) if greedy else _sample(logits, gen)
        obs, _, terminated, truncated, info = env.step(action)
        successes += info["success"].long()
        reset = terminated | truncated
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    policy.train(was_training)
    return {"success_rate": float(successes.float().mean()), "episodes": num_envs,
            "steps_per_s": num_envs * env.episode_length / max(elapsed, 1e-9)}


@torch.no_grad()
def evaluate_open_loop(policy: RecurrentPolicy, horizon: int, num_bits: int, num_envs: int = 256,
                       seed: int = 12345, chunk: int = 2048, device: torch.device | str | None = None,
                       **env_kwargs: Any) -> dict[str, float]:
    """Greedy success rate on ``num_envs`` fresh episodes, replaying each episode with ``forward_sequence``.

    DelayedRecall's observations do not depend on the actions (only the answer at the cue counts), so the
    ``horizon + 2`` observations of an episode can be generated first and fed to the policy in chunks of
    ``chunk`` steps (one chunked scan per Mamba layer, one segment-batched call for the GRU) instead of one
    ``policy.step`` per time step: at horizon 20000 this replaces 20,002 small calls by about ten. Same
    episodes (same seed) and same answers as :func:`evaluate` up to float rounding of the logits.

    Returns ``success_rate``, ``episodes`` and ``steps_per_s`` (environment + policy steps per second, summed
    over environments).
    """
    if int(chunk) < 1:
        raise StateError(f"chunk: expected a positive int, found {chunk!r}")
    device = torch.device(device) if device is not None else next(policy.parameters()).device
    env = DelayedRecall(num_envs, horizon, num_bits, device=device, seed=seed, random_offsets=False, **env_kwargs)
    obs, _ = env.reset()
    targets = env.targets().clone()
    idle = torch.zeros(num_envs, dtype=torch.long, device=device)  # ignored before the cue
    state = policy.initial_state(num_envs, device=device)
    was_training = policy.training
    policy.eval()
    t0 = time.perf_counter()
    buf: list[torch.Tensor] = [obs]
    first = True
    logits = None
    for t in range(1, env.episode_length + 1):
        if t < env.episode_length:
            obs, *_ = env.step(idle)
        if len(buf) == chunk or t == env.episode_length:
            seq = torch.stack(buf, dim=1)
            reset = torch.zeros(seq.shape[:2], dtype=torch.bool, device=device)
            reset[:, 0] = first  # every episode starts afresh at its first observation
            logits, _, state = policy.forward_sequence(seq, state, reset)
            first, buf = False, []
        if t < env.episode_length:
            buf.append(obs)
    assert logits is not None
    answers = logits[:, -1].argmax(-1)  # the last observation is the cue
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    policy.train(was_training)
    return {"success_rate": float((answers == targets).float().mean()), "episodes": num_envs,
            "steps_per_s": num_envs * env.episode_length / max(elapsed, 1e-9)}
