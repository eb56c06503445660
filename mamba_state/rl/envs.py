"""DelayedRecall: a batch of memory environments, vectorised in torch on any device.

Episode of one environment (``H = horizon``, ``K = num_bits``), phases counted from the bit display::

    phase  -d .. -1     pre-roll (only in each environment's first episode after ``reset``; ``d`` random)
    phase   0           the K bits are shown (bit channels +-1) with the start flag
    phase   1 .. H      distractor steps: bit channels 0 (or random +-1 with ``distractor_bits=True``)
    phase   H + 1       the cue flag asks for the bits; the action taken here is the answer

The action space has ``2**K`` actions; action ``a`` answers bit ``j`` with ``(a >> j) & 1`` (bit value 1 is
shown as +1, bit value 0 as -1). Reward is paid only at the cue: 1 for the right answer, else 0. With
``shaping = s > 0`` the cue reward becomes ``(1 - s) * exact + s * (fraction of bits right)`` (off by default).
Actions at all other steps are ignored. An episode (without pre-roll) lasts ``H + 2`` steps.

Observation layout, float32 ``[num_envs, K + 2 + noise_channels]``:

    channels 0 .. K-1        bit channels
    channel  K               start flag (1 at phase 0)
    channel  K + 1           cue flag (1 at phase H + 1)
    channels K + 2 ..        noise, i.i.d. N(0, noise_std**2) at every step

Gymnasium vector-env semantics with same-step autoreset: ``step`` returns ``terminated=True`` at the cue and,
for those environments, already the first observation of the next episode. ``truncated`` is always False
(episodes have a fixed length). Random pre-roll lengths ``d ~ U{0, .., H + 1}`` at ``reset`` stagger the
episode boundaries across environments, so resets fall in the middle of rollouts.

All randomness comes from one ``torch.Generator`` on the environment's device; ``state_dict`` /
``load_state_dict`` export and import everything (generator included), so a restored environment continues
bit-identically.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import StateError

__all__ = ["DelayedRecall"]


class DelayedRecall:
    """A batch of ``num_envs`` delayed-recall environments (see the module docstring for the dynamics).

    Args:
        num_envs: number of environments ``N`` (>= 1).
        horizon: number of distractor steps ``H`` between the bits and the cue (>= 0).
        num_bits: number of bits ``K`` to remember (1 .. 16); ``num_actions = 2**K``.
        device: where every tensor lives.
        seed: seed of the environment's generator (None: a random seed drawn from torch's global generator).
        noise_channels: number of pure-noise observation channels.
        noise_std: standard deviation of the noise channels (0.1: with 1.0, PPO left chance at horizon 32 in
            none of four CPU runs of 200+ updates; docs/rl.md "Recipe").
        distractor_bits: show random +-1 values on the bit channels during distractor steps (harder).
        shaping: partial credit at the cue (0 = off, the default; see the module docstring).
        random_offsets: draw a random pre-roll per environment at ``reset`` (False: all start at phase 0).
    """

    def __init__(self, num_envs: int, horizon: int, num_bits: int, device: torch.device | str = "cpu",
                 seed: int | None = None, *, noise_channels: int = 4, noise_std: float = 0.1,
                 distractor_bits: bool = False, shaping: float = 0.0, random_offsets: bool = True):
        for name, value, low in (("num_envs", num_envs, 1), ("horizon", horizon, 0), ("num_bits", num_bits, 1),
                                 ("noise_channels", noise_channels, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise StateError(f"{name}: expected an int >= {low}, found {value!r}")
        if num_bits > 16:
            raise StateError(f"num_bits: expected at most 16 (2**16 actions), found {num_bits}")
        if not 0.0 <= float(shaping) <= 1.0:
            raise StateError(f"shaping: expected a float in [0, 1], found {shaping!r}")
        if float(noise_std) < 0:
            raise StateError(f"noise_std: expected a non-negative float, found {noise_std!r}")
        self.num_envs = num_envs
        self.horizon = horizon
        self.num_bits = num_bits
        self.device = torch.device(device)
        self.noise_channels = noise_channels
        self.noise_std = float(noise_std)
        self.distractor_bits = bool(distractor_bits)
        self.shaping = float(shaping)
        self.random_offsets = bool(random_offsets)
        self.observation_size = num_bits + 2 + noise_channels
        self.num_actions = 2 ** num_bits
        self.episode_length = horizon + 2
        self._generator = torch.Generator(device=self.device)
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        self._generator.manual_seed(int(seed))
        self._powers = 2 ** torch.arange(num_bits, device=self.device)
        n = num_envs
        self.phase = torch.zeros(n, dtype=torch.long, device=self.device)
        self.bits = torch.zeros(n, num_bits, dtype=torch.long, device=self.device)
        self.episode_return = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.episode_steps = torch.zeros(n, dtype=torch.long, device=self.device)
        self._started = False

    # ------------------------------------------------------------------ randomness
    def _random_bits(self) -> torch.Tensor:
        return torch.randint(0, 2, (self.num_envs, self.num_bits), generator=self._generator, device=self.device)

    def _observe(self) -> torch.Tensor:
        n, k = self.num_envs, self.num_bits
        obs = torch.zeros(n, self.observation_size, dtype=torch.float32, device=self.device)
        shown = self.phase == 0
        signs = self.bits.float() * 2 - 1
        if self.distractor_bits:
            # Drawn every step (not only where used) so the generator advances the same way on every device.
            noise_bits = self._random_bits().float() * 2 - 1
            distract = ((self.phase >= 1) & (self.phase <= self.horizon))[:, None]
            obs[:, :k] = torch.where(distract, noise_bits, obs[:, :k])
        obs[:, :k] = torch.where(shown[:, None], signs, obs[:, :k])
        obs[:, k] = shown.float()
        obs[:, k + 1] = (self.phase == self.horizon + 1).float()
        if self.noise_channels:
            noise = torch.randn(n, self.noise_channels, generator=self._generator, device=self.device)
            obs[:, k + 2:] = noise * self.noise_std
        return obs

    def targets(self) -> torch.Tensor:
        """The right answer of every environment's current episode, LongTensor ``[N]`` in ``[0, 2**K)``."""
        return (self.bits * self._powers).sum(-1)

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[torch.Tensor, dict]:
        """Start every environment afresh. Returns ``(obs [N, obs_size] float32, info)``.

        ``seed`` reseeds the generator (same seed, same episodes). With ``random_offsets`` each environment
        first spends ``d ~ U{0, .., H+1}`` pre-roll steps, so episode boundaries differ across environments.
        """
        if seed is not None:
            self._generator.manual_seed(int(seed))
        n = self.num_envs
        if self.random_offsets:
            offsets = torch.randint(0, self.episode_length, (n,), generator=self._generator, device=self.device)
        else:
            offsets = torch.zeros(n, dtype=torch.long, device=self.device)
        self.phase = -offsets
        self.bits = self._random_bits()
        self.episode_return.zero_()
        self.episode_steps.zero_()
        self._started = True
        return self._observe(), {"phase": self.phase.clone()}

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Advance every environment by one step.

        Args:
            actions: integer tensor ``[N]`` with values in ``[0, num_actions)``.

        Returns:
            ``obs`` float32 ``[N, obs_size]`` (for terminated environments: the next episode's first
            observation), ``reward`` float32 ``[N]``, ``terminated`` bool ``[N]``, ``truncated`` bool ``[N]``
            (always False) and ``info`` with bool ``success`` (right answer at a cue), float32
            ``episode_return`` and long ``episode_length`` of the episodes that just ended (0 elsewhere).
        """
        if not self._started:
            raise StateError("DelayedRecall.step: expected reset() to be called first, found no reset yet")
        if (not isinstance(actions, torch.Tensor) or actions.shape != (self.num_envs,)
                or actions.dtype.is_floating_point or actions.dtype == torch.bool):
            found = (f"{list(actions.shape)} {actions.dtype}" if isinstance(actions, torch.Tensor)
                     else type(actions).__name__)
            raise StateError(f"actions: expected an integer tensor of shape [{self.num_envs}], found {found}")
        actions = actions.to(self.device)
        in_range = ((actions >= 0) & (actions < self.num_actions)).all()
        if self.device.type == "cpu":
            if not in_range:
                raise StateError(f"actions: expected values in [0, {self.num_actions}), found "
                                 f"{actions.min().item()}..{actions.max().item()}")
        else:  # checked on the device without a host synchronisation (a device-side assert if violated)
            torch._assert_async(in_range)
        at_cue = self.phase == self.horizon + 1
        correct = actions.long() == self.targets()
        reward = correct.float()
        if self.shaping > 0:
            answered = (actions.long()[:, None] // self._powers) % 2
            frac = (answered == self.bits).float().mean(-1)
            reward = (1 - self.shaping) * reward + self.shaping * frac
        reward = torch.where(at_cue, reward, torch.zeros_like(reward))
        terminated = at_cue
        self.episode_return += reward
        self.episode_steps += 1
        ep_return = torch.where(terminated, self.episode_return, torch.zeros_like(self.episode_return))
        ep_length = torch.where(terminated, self.episode_steps, torch.zeros_like(self.episode_steps))
        success = terminated & correct
        # Same-step autoreset: finished environments start their next episode (no pre-roll) right away.
        new_bits = self._random_bits()
        self.bits = torch.where(terminated[:, None], new_bits, self.bits)
        self.phase = torch.where(terminated, torch.zeros_like(self.phase), self.phase + 1)
        self.episode_return = torch.where(terminated, torch.zeros_like(self.episode_return), self.episode_return)
        self.episode_steps = torch.where(terminated, torch.zeros_like(self.episode_steps), self.episode_steps)
        truncated = torch.zeros_like(terminated)
        info = {"success": success, "episode_return": ep_return, "episode_length": ep_length}
        return self._observe(), reward, terminated, truncated, info

    # ------------------------------------------------------------------ checkpoints
    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable, device excluded)."""
        return {"num_envs": self.num_envs, "horizon": self.horizon, "num_bits": self.num_bits,
                "noise_channels": self.noise_channels, "noise_std": self.noise_std,
                "distractor_bits": self.distractor_bits, "shaping": self.shaping,
                "random_offsets": self.random_offsets}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically: config, episode tensors (on CPU), generator state."""
        return {
            "config": self.config(),
            "phase": self.phase.cpu().clone(),
            "bits": self.bits.cpu().clone(),
            "episode_return": self.episode_return.cpu().clone(),
            "episode_steps": self.episode_steps.cpu().clone(),
            "generator": self._generator.get_state().clone(),
            "started": self._started,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the config must match (else ``StateCompatibilityError``)."""
        from ..errors import StateCompatibilityError

        if not isinstance(state, dict) or "config" not in state:
            raise StateError(f"DelayedRecall state: expected a dict from state_dict(), found {type(state).__name__}")
        if state["config"] != self.config():
            raise StateCompatibilityError(
                f"DelayedRecall state: expected config {self.config()}, found {state['config']}")
        n = self.num_envs
        for name in ("phase", "bits", "episode_return", "episode_steps"):
            t = state[name]
            if not isinstance(t, torch.Tensor) or t.shape[:1] != (n,):
                raise StateError(f"DelayedRecall state {name}: expected a tensor with {n} rows, found {t!r}")
        self._generator.set_state(state["generator"])
        self.phase = state["phase"].to(self.device).clone()
        self.bits = state["bits"].to(self.device).clone()
        self.episode_return = state["episode_return"].to(self.device).clone()
        self.episode_steps = state["episode_steps"].to(self.device).clone()
        self._started = bool(state["started"])

    def __repr__(self) -> str:
        return (f"DelayedRecall(num_envs={self.num_envs}, horizon={self.horizon}, num_bits={self.num_bits}, "
                f"observation_size={self.observation_size}, num_actions={self.num_actions}, device={self.device})")
