"""Rollout collection at GPU speed: one collection step written so that it can be captured as a CUDA graph.

:meth:`PPOTrainer.collect <mamba_state.rl.ppo.PPOTrainer.collect>` with ``collect="eager"`` (the 0.1 path) runs
``policy.step``, the sampler and ``env.step`` for every time step from Python: on a GPU that is about 80-200
small kernel launches per step plus the Python around them, whatever the number of environments, so collection is
launch-bound. :class:`GraphCollector` runs the same step written for capture:

* **static buffers**: the carried policy state, the last observation and reset flags, the environment's phases,
  bits and episode accumulators, and the rollout storage ``[T, N, ...]`` live in tensors allocated once; a
  step reads them and writes its results back into them in place (``copy_``, ``index_copy_`` at a device-side
  step counter), so a replayed graph sees the next step's inputs where the capture saw them;
* **no host synchronisation and no data-dependent Python control flow** inside a step: resets are masks
  (``where``), the per-environment autoreset is a ``where`` over phases and bits, the statistics accumulate in
  device scalars read once per rollout;
* **randomness from the generators CUDA graphs support**: actions are drawn as ``argmax(probs / E)`` with ``E``
  exponential from the trainer's ``torch.Generator`` (exactly what ``torch.multinomial(probs, 1)`` computes,
  without its host-side validity checks), the environment draws its bits and noise from its own generator in the
  same order as :meth:`DelayedRecall.step <mamba_state.rl.envs.DelayedRecall.step>`; both generators are
  registered with every captured graph (``CUDAGraph.register_generator_state``), so each replay advances their
  philox offsets as the eager ops would, and checkpoints of the generators stay exact;
* **the environment step vectorised in torch** (:meth:`GraphCollector._env_step`), written apart from
  :class:`~mamba_state.rl.envs.DelayedRecall` and tested against it;
* **GAE on the device too**: after the rollout, :meth:`GraphCollector.gae_step` runs backwards over the
  time-major buffers at a device counter (captured like the step), with the float operations of
  :func:`~mamba_state.rl.ppo.compute_gae` in the same order, so the advantages are the same bit for bit.

With ``capture=False`` (every CPU run) the same step runs eagerly; a test checks that it gives the very same
transitions as the eager path for a fixed seed (actions, log-probabilities, values, rewards, resets,
observations, carried state, generator states). With ``capture=True`` (CUDA) ``steps_per_graph`` consecutive
steps are captured as one graph (and the remainder of the rollout as a second one) and replayed; a GPU test checks
the replay against the eager run of the same step. Should a capture fail, a warning says so and the same step
runs eagerly from then on (the same transitions, slower).

``collect="graph-compiled"`` is the graph path with the step compiled by ``torch.compile`` before the capture
(:class:`GraphCollector` with ``compile_step=True``): a step first draws its random numbers (their shapes do
not depend on its values, so each generator gives the numbers it gives the other paths, in the same order), then
runs policy, sampler, environment and storage as one traced function, in which TorchInductor fuses the small
elementwise kernels (about 200 ops a Mamba step) into a few; a replayed graph launches those. Fused float
operations round differently, so its transitions equal the eager path's only up to float rounding (a sampled
action can then differ), not bit for bit; the first rollout pays the compilation (seconds).

The GRU's graph step is ``torch.gru_cell`` per layer (:meth:`GRUPolicy.collect_step
<mamba_state.rl.policies.GRUPolicy.collect_step>`): on the CPU it is bit-identical to ``nn.GRU`` over one
step (tested); on CUDA it is the fused GRU-cell kernel instead of cuDNN's RNN, equal up to float rounding.

``collect="graph-fused"`` (:class:`GraphCollector` with ``fused=True``) runs the step's body as two Triton kernels
(:mod:`mamba_state.kernels.rl_step`): the policy's whole step with the sampler and the stores (Mamba or GRU,
parameters packed by :mod:`mamba_state.rl.fused`), then the environment step; the same draws, equal to the
graph path up to float32 rounding.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import StateError
from .envs import DelayedRecall

__all__ = ["GraphCollector", "COLLECT_MODES", "resolve_collect", "sample_actions", "actions_from"]

COLLECT_MODES = ("auto", "eager", "graph", "graph-compiled", "graph-fused")


def resolve_collect(mode: str | None, device: torch.device) -> str:
    """``"auto"`` (or None) -> ``"graph"`` on CUDA, ``"eager"`` elsewhere; ``"eager"``, ``"graph"``,
    ``"graph-compiled"`` and ``"graph-fused"`` as given."""
    if mode in (None, "auto"):
        return "graph" if torch.device(device).type == "cuda" else "eager"
    if mode not in COLLECT_MODES:
        raise StateError(f"collect: expected one of {list(COLLECT_MODES)}, found {mode!r}")
    return mode


def sample_actions(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One action per row from ``softmax(logits)``: ``argmax(probs / E)``, ``E ~ Exp(1)`` from ``generator``.

    The same draws and the same result as ``torch.multinomial(probs, 1, generator=generator)`` (which computes
    exactly this for one sample, after host-side checks of the probabilities that a CUDA graph cannot hold).
    """
    q = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(1, generator=generator)
    return actions_from(logits, q)


def actions_from(logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """:func:`sample_actions` given its exponential draws ``q`` (``[N, actions]`` float32)."""
    return (torch.softmax(logits.float(), dim=-1) / q).argmax(-1)


COMPILE_BACKEND = "inductor"  # torch.compile's backend for collect="graph-compiled" (tests use "aot_eager")


def _compiled(fn: Any) -> Any:
    """``torch.compile(fn)`` (shapes static: a collector's are fixed), quiet about the memoised helpers it
    traces through (the backend choice, which cannot change under it)."""
    import warnings

    compiled = torch.compile(fn, dynamic=False, backend=COMPILE_BACKEND)

    def run(*args: Any) -> Any:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")
            return compiled(*args)

    return run


class GraphCollector:
    """Graph-ready collection for a :class:`~mamba_state.rl.ppo.PPOTrainer` on a
    :class:`~mamba_state.rl.envs.DelayedRecall` (see the module docstring).

    Args:
        trainer: the trainer whose policy, environment, generators and carried state are used; :meth:`collect`
            reads the carried state from it and writes the new one back, so checkpoints and the eager path see
            the same attributes as after an eager collection.
        capture: capture the step as CUDA graphs (needs a CUDA device); False runs the same step eagerly.
        steps_per_graph: time steps per captured graph (the rollout is ``T // k`` replays of it and one replay
            of a graph of the ``T % k`` remaining steps).
        compile_step: run the step's body (policy, sampling, environment, storage; the random draws stay
            outside) through ``torch.compile`` (fused kernels; equal to the uncompiled step up to float
            rounding).
        fused: run the step's body as two Triton kernels (``collect="graph-fused"``): the whole Mamba or GRU
            policy step with sampling and storage (:mod:`mamba_state.kernels.rl_step`; a policy the kernels do not
            take keeps the graph path's policy step, see ``fused_policy_reason``), and the environment step. Needs Triton on the trainer's device (CUDA, or ``TRITON_INTERPRET=1``).
    """

    def __init__(self, trainer: Any, capture: bool = False, steps_per_graph: int = 16, compile_step: bool = False,
                 fused: bool = False):
        if not isinstance(trainer.env, DelayedRecall):
            raise StateError(f"graph collection: expected a DelayedRecall environment, found "
                             f"{type(trainer.env).__name__} (use collect='eager')")
        if capture and trainer.device.type != "cuda":
            raise StateError(f"graph collection: capturing CUDA graphs needs a CUDA device, found "
                             f"{trainer.device} (capture=False runs the same step eagerly)")
        if int(steps_per_graph) < 1:
            raise StateError(f"steps_per_graph: expected a positive int, found {steps_per_graph!r}")
        self.trainer = trainer
        self.capture = bool(capture)
        self.steps_per_graph = int(steps_per_graph)
        self.compile_step = bool(compile_step)
        self._compiled_step: Any = _compiled(self._step_from) if compile_step else None
        if fused and compile_step:
            raise StateError("graph collection: expected one of fused and compile_step, found both")
        self.fused = bool(fused)
        self._packed: Any = None  # the packed policy parameters the fused policy kernel reads
        self._gru = False
        self.fused_policy_reason = "not fused"
        if fused:
            from ..kernels.backend import triton_usable
            from .fused import PackedGRUPolicy, fused_policy_fits, pack_policy

            ok, why = triton_usable(trainer.device)
            if not ok:
                raise StateError(f"collect='graph-fused': expected a device Triton runs on, found {trainer.device} "
                                 f"({why}); use collect='graph', or TRITON_INTERPRET=1 on a CPU")
            fits, self.fused_policy_reason = fused_policy_fits(trainer.policy)
            self._packed = pack_policy(trainer.policy) if fits else None
            self._gru = isinstance(self._packed, PackedGRUPolicy)
        self._graphs: dict[tuple[str, int], Any] = {}
        self._rollout_len = -1

    # ------------------------------------------------------------------ buffers
    def _allocate(self, t_len: int) -> None:
        tr, env = self.trainer, self.trainer.env
        n, o, k, dev = env.num_envs, env.observation_size, env.num_bits, tr.device
        self.obs = torch.zeros(n, o, dtype=torch.float32, device=dev)
        self.reset = torch.zeros(n, dtype=torch.bool, device=dev)
        self.state = tuple(torch.zeros_like(t) for t in tr.policy.initial_state(n, device=dev))
        if self._packed is not None and not self._gru:  # the Mamba kernel updates every layer's states in two
            # stacked tensors
            self.conv_all = torch.stack(self.state[0::2])
            self.ssm_all = torch.stack(self.state[1::2])
            self.state = tuple(x for i in range(len(self.conv_all)) for x in (self.conv_all[i], self.ssm_all[i]))
        self.phase = torch.zeros(n, dtype=torch.long, device=dev)
        self.bits = torch.zeros(n, k, dtype=torch.long, device=dev)
        self.ep_return = torch.zeros(n, dtype=torch.float32, device=dev)
        self.ep_steps = torch.zeros(n, dtype=torch.long, device=dev)
        self.age = torch.zeros(n, dtype=torch.long, device=dev)
        self.t = torch.zeros(1, dtype=torch.long, device=dev)
        self.successes = torch.zeros((), dtype=torch.long, device=dev)
        self.episodes = torch.zeros((), dtype=torch.long, device=dev)
        self.return_sum = torch.zeros((), dtype=torch.float64, device=dev)
        # values with one more row: the bootstrap value after the last step (GAE reads row t + 1)
        self.values_ext = torch.zeros(t_len + 1, n, dtype=torch.float32, device=dev)
        self.adv = torch.zeros(t_len, n, dtype=torch.float32, device=dev)
        self.gae_last = torch.zeros(n, dtype=torch.float32, device=dev)
        self.gae_t = torch.zeros(1, dtype=torch.long, device=dev)
        self.buf = {
            "obs": torch.zeros(t_len, n, o, dtype=torch.float32, device=dev),
            "actions": torch.zeros(t_len, n, dtype=torch.long, device=dev),
            "logprobs": torch.zeros(t_len, n, dtype=torch.float32, device=dev),
            "values": self.values_ext[:t_len],
            "rewards": torch.zeros(t_len, n, dtype=torch.float32, device=dev),
            "dones": torch.zeros(t_len, n, dtype=torch.bool, device=dev),
            "resets": torch.zeros(t_len, n, dtype=torch.bool, device=dev),
        }
        self._graphs = {}
        self._rollout_len = t_len

    def _load(self) -> None:
        """Copy the trainer's and the environment's carried tensors into the static buffers."""
        tr, env = self.trainer, self.trainer.env
        if not env._started:
            raise StateError("graph collection: expected the environment to be reset first, found no reset yet")
        self.obs.copy_(tr.obs)
        self.reset.copy_(tr.reset_flags)
        for dst, src in zip(self.state, tr.state):
            dst.copy_(src)
        self.phase.copy_(env.phase)
        self.bits.copy_(env.bits)
        self.ep_return.copy_(env.episode_return)
        self.ep_steps.copy_(env.episode_steps)
        self.age.copy_(tr.age)
        self.t.zero_()
        self.successes.zero_()
        self.episodes.zero_()
        self.return_sum.zero_()

    # ------------------------------------------------------------------ one step
    def _draws(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """A step's random numbers, drawn first (their shapes do not depend on the step's values): the
        sampler's exponentials from the trainer's generator; from the environment's, in DelayedRecall's
        order, the new episodes' bits, the distractor bits and the noise channels (None when off)."""
        tr, env = self.trainer, self.trainer.env
        dev, n = self.obs.device, env.num_envs
        q = torch.empty(n, env.num_actions, device=dev).exponential_(1, generator=tr.generator)
        new_bits = torch.randint(0, 2, (n, env.num_bits), generator=env._generator, device=dev)
        noise_bits = (torch.randint(0, 2, (n, env.num_bits), generator=env._generator, device=dev)
                      if env.distractor_bits else None)
        noise = (torch.randn(n, env.noise_channels, generator=env._generator, device=dev)
                 if env.noise_channels else None)
        return q, new_bits, noise_bits, noise

    def _observe(self, noise_bits: torch.Tensor | None, noise: torch.Tensor | None) -> torch.Tensor:
        """The observation of the current phases and bits (DelayedRecall's layout; its draws from _draws)."""
        from ..kernels.rl_step.naive import recall_observation_ref

        env = self.trainer.env
        return recall_observation_ref(self.phase, self.bits, env.horizon, noise_bits, noise, env.noise_std)

    def _env_step(self, action: torch.Tensor, new_bits: torch.Tensor, noise_bits: torch.Tensor | None,
                  noise: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """DelayedRecall's step on the static buffers: ``(obs, reward, terminated, success, episode_return)``."""
        from ..kernels.rl_step.naive import recall_env_step_ref

        env = self.trainer.env
        out = recall_env_step_ref(action, self.phase, self.bits, self.ep_return, self.ep_steps, new_bits,
                                  env.horizon, env.shaping)
        self.bits.copy_(out["bits"])
        self.phase.copy_(out["phase"])
        self.ep_return.copy_(out["ep_return"])
        self.ep_steps.copy_(out["ep_steps"])
        return self._observe(noise_bits, noise), out["reward"], out["done"], out["success"], out["episode_return"]

    def step(self) -> None:
        """One collection step on the static buffers (what a graph captures): the random draws, then policy
        step, sampling, storage, environment step, statistics, and the carried state, observation and reset
        flags for the next step (:meth:`_step_from`; compiled with ``compile_step``)."""
        draws = self._draws()
        if self.fused:
            self._fused_step_from(*draws)
        else:
            (self._compiled_step or self._step_from)(*draws)

    def _step_from(self, q: torch.Tensor, new_bits: torch.Tensor, noise_bits: torch.Tensor | None,
                   noise: torch.Tensor | None) -> None:
        """:meth:`step` given its draws (no generator inside: what ``torch.compile`` traces whole)."""
        tr, b, t = self.trainer, self.buf, self.t
        action = self._policy_step(q)
        if tr.config.bptt == "episode":
            self.age.copy_(torch.where(self.reset, 1, self.age + 1))
        obs, reward, done, success, ep_return = self._env_step(action, new_bits, noise_bits, noise)
        b["rewards"].index_copy_(0, t, reward[None])
        b["dones"].index_copy_(0, t, done[None])
        self.successes.add_(success.sum())
        self.episodes.add_(done.sum())
        self.return_sum.add_(ep_return.sum())
        self.obs.copy_(obs)
        self.reset.copy_(done)
        t.add_(1)

    def _policy_step(self, q: torch.Tensor) -> torch.Tensor:
        """The step's first half on the graph path: ``policy.collect_step`` from the carried state, the sampler on
        the draws ``q``, the rollout's stores at step ``t`` (observation, reset flags, action, log-probability,
        value) and the new carried state. Returns the actions [N]."""
        logits, value, new_state = self.trainer.policy.collect_step(self.obs, self.state, self.reset)
        action = actions_from(logits, q)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, action[:, None]).squeeze(-1)
        b, t = self.buf, self.t
        b["obs"].index_copy_(0, t, self.obs[None])
        b["resets"].index_copy_(0, t, self.reset[None])
        b["actions"].index_copy_(0, t, action[None])
        b["logprobs"].index_copy_(0, t, logp[None])
        b["values"].index_copy_(0, t, value.float()[None])
        for dst, src in zip(self.state, new_state):  # read by nothing else this step
            dst.copy_(src)
        return action

    def _fused_step_from(self, q: torch.Tensor, new_bits: torch.Tensor, noise_bits: torch.Tensor | None,
                         noise: torch.Tensor | None) -> None:
        """:meth:`step` given its draws with ``fused``: the policy kernel (or, without one, the graph path's
        policy step, sampler and stores), then the environment kernel, then the step counter."""
        from ..kernels.rl_step import gru_policy_step, mamba_policy_step, recall_env_step

        tr, env, b, t = self.trainer, self.trainer.env, self.buf, self.t
        resets, dones, reset = b["resets"].view(torch.uint8), b["dones"].view(torch.uint8), self.reset.view(torch.uint8)
        stores = (b["obs"], resets, b["actions"], b["logprobs"], b["values"])
        if self._packed is not None and self._gru:
            gru_policy_step(self._packed.weights, self.obs, reset, q, t, self.state[0], *stores)
        elif self._packed is not None:
            mamba_policy_step(self._packed.weights, self.obs, reset, q, t, self.conv_all, self.ssm_all, *stores)
        else:
            self._policy_step(q)
        recall_env_step(t, b["actions"], self.phase, self.bits, self.ep_return, self.ep_steps, reset, self.obs,
                        new_bits, noise_bits, noise, b["rewards"], dones, self.successes, self.episodes,
                        self.return_sum, env.horizon, env.shaping, env.noise_std,
                        age=self.age if tr.config.bptt == "episode" else None)
        t.add_(1)

    def gae_step(self) -> None:
        """One step of :func:`~mamba_state.rl.ppo.compute_gae`, backwards in time at the device counter
        ``gae_t`` (the same float operations in the same order, so the same advantages bit for bit)."""
        cfg, t = self.trainer.config, self.gae_t
        gamma, gae_lambda = cfg.gamma, cfg.gae_lambda
        next_value = self.values_ext.index_select(0, t + 1)[0]
        nonterminal = (~self.buf["dones"].index_select(0, t)[0]).float()
        delta = (self.buf["rewards"].index_select(0, t)[0] + gamma * next_value * nonterminal
                 - self.values_ext.index_select(0, t)[0])
        self.gae_last.copy_(delta + gamma * gae_lambda * nonterminal * self.gae_last)
        self.adv.index_copy_(0, t, self.gae_last[None])
        t.sub_(1)

    # ------------------------------------------------------------------ CUDA graphs
    def _graph(self, steps: int, gae: bool = False) -> Any:
        key = ("gae" if gae else "step", steps)
        graph = self._graphs.get(key)
        if graph is not None:
            return graph
        if gae:
            graph = self._capture(steps, self.gae_step, lambda: self.gae_t.fill_(steps - 1), generators=())
        else:
            tr = self.trainer
            graph = self._capture(steps, self.step, self.t.zero_, generators=(tr.generator, tr.env._generator))
        self._graphs[key] = graph
        return graph

    def _capture(self, steps: int, fn: Any, rewind: Any, generators: tuple) -> Any:
        tr = self.trainer
        saved = [g.get_state() for g in generators]
        try:
            with torch.cuda.device(tr.device):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # compile Triton kernels, settle the allocator, outside the capture
                    for _ in range(2):
                        rewind()
                        for _ in range(steps):
                            fn()
                torch.cuda.current_stream().wait_stream(side)
                torch.cuda.synchronize()
                rewind()
                graph = torch.cuda.CUDAGraph()
                for g in generators:
                    graph.register_generator_state(g)
                # thread_local: other threads' CUDA calls (e.g. a process group's watchdog) do not break the capture
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    for _ in range(steps):
                        fn()
                torch.cuda.synchronize()
        finally:
            for g, s in zip(generators, saved):  # the warm-up drew numbers: back to where the eager path would be
                g.set_state(s)
        return graph

    def _run(self, t_len: int, gae: bool) -> None:
        """``t_len`` collection steps (or GAE steps) from the start: graph replays when capturing, else eager."""
        if self.capture:
            k = min(self.steps_per_graph, t_len)
            full, rest = divmod(t_len, k)
            try:  # the first rollout captures the graphs (before the buffers are loaded: the warm-up writes them)
                graphs = [self._graph(k, gae)] * full + ([self._graph(rest, gae)] if rest else [])
            except Exception as exc:
                if self.fused and not gae:  # the graph path's step instead of the kernels, still captured
                    self._fused_failed(exc)
                    return self._run(t_len, gae)
                self._capture_failed(exc)  # the same step eagerly from here on (same transitions, slower)
            else:
                self._rewind(t_len, gae)
                for graph in graphs:
                    graph.replay()
                return
        self._rewind(t_len, gae)
        fn = self.gae_step if gae else self.step
        for _ in range(t_len):
            fn()

    def _rewind(self, t_len: int, gae: bool) -> None:
        if gae:
            self.gae_last.zero_()
            self.gae_t.fill_(t_len - 1)
        else:
            self._load()

    def _capture_failed(self, exc: Exception) -> None:
        import warnings

        warnings.warn(f"graph collection: CUDA graph capture failed ({type(exc).__name__}: {exc}); running the "
                      "same step eagerly from now on", RuntimeWarning, stacklevel=3)
        self.capture = False
        self._graphs = {}

    def _fused_failed(self, exc: Exception) -> None:
        import warnings

        warnings.warn(f"graph-fused collection: the fused kernels failed while capturing ({type(exc).__name__}: "
                      f"{exc}); capturing the graph path's step instead", RuntimeWarning, stacklevel=3)
        self.fused, self._packed = False, None  # the stacked state tensors stay: self.state views them
        self.fused_policy_reason = f"the fused kernels failed: {type(exc).__name__}"
        self._graphs = {}

    def invalidate(self) -> None:
        """Drop the captured graphs (after replacing the policy's parameter tensors, not needed after in-place
        optimizer steps or ``load_state_dict``)."""
        self._graphs = {}

    # ------------------------------------------------------------------ one rollout
    @torch.no_grad()
    def collect(self) -> dict[str, Any]:
        """One rollout of ``trainer.config.rollout_len`` steps: the fields of a :class:`~mamba_state.rl.ppo.Rollout`
        (GAE filled in) as a dict; the trainer's and environment's carried tensors are updated as
        :meth:`PPOTrainer.collect <mamba_state.rl.ppo.PPOTrainer.collect>` would."""
        from .policies import clone_state

        tr, env, policy = self.trainer, self.trainer.env, self.trainer.policy
        cfg = tr.config
        t_len = cfg.rollout_len
        if t_len != self._rollout_len:
            self._allocate(t_len)
        prefix_obs = prefix_resets = None
        if cfg.bptt == "episode":
            prefix_obs, prefix_resets = tr._prefix()
        init_state = clone_state(tr.state)
        was_training = policy.training
        policy.eval()
        if self._packed is not None:
            self._packed.refresh()  # the parameters as they are now (in place: captured graphs read these buffers)
        try:
            self._run(t_len, gae=False)
            _, last_value, _ = policy.step(self.obs, self.state, self.reset)  # bootstrap only
            self.values_ext[t_len].copy_(last_value.float())
            self._run(t_len, gae=True)  # GAE backwards over the time-major buffers
        finally:
            policy.train(was_training)
        b = self.buf
        nt = {name: b[name].transpose(0, 1).contiguous() for name in b}  # [N, T, ...], private copies
        tr.state = tuple(s.clone() for s in self.state)
        tr.obs, tr.reset_flags = self.obs.clone(), self.reset.clone()
        env.phase, env.bits = self.phase.clone(), self.bits.clone()
        env.episode_return, env.episode_steps = self.ep_return.clone(), self.ep_steps.clone()
        if cfg.bptt == "episode":
            tr.age = self.age.clone()
            keep = min(t_len, tr.history_len)
            tr.history.extend((nt["obs"][:, t], nt["resets"][:, t]) for t in range(t_len - keep, t_len))
        tr.env_steps += tr.global_num_envs * t_len
        advantages = self.adv.transpose(0, 1).contiguous()
        return {**nt, "init_state": init_state, "last_value": last_value.float(), "advantages": advantages,
                "returns": advantages + nt["values"],  # as compute_gae returns them
                "prefix_obs": prefix_obs, "prefix_resets": prefix_resets,
                "stats": {"successes": int(self.successes), "episodes": int(self.episodes),
                          "return_sum": float(self.return_sum)}}
