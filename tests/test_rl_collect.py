"""Graph-ready rollout collection (mamba_state.rl.collect): the same transitions as the eager path.

On the CPU the graph-ready step runs eagerly and must equal PPOTrainer.collect_eager bit for bit (actions,
log-probabilities, values, rewards, dones, resets, observations, advantages, carried state, environment and
generator states) for both controllers, both BPTT modes and the environment's options, across updates. On CUDA
(``gpu`` marker) the captured CUDA graphs must replay the same transitions as the same step run eagerly.
"""

from __future__ import annotations

import pytest
import torch

from mamba_state.errors import StateError
from mamba_state.rl.collect import GraphCollector, resolve_collect, sample_actions
from mamba_state.rl.envs import DelayedRecall
from mamba_state.rl.policies import GRUPolicy, make_policy
from mamba_state.rl.ppo import PPOConfig, PPOTrainer

FIELDS = ("obs", "actions", "logprobs", "values", "rewards", "dones", "resets", "last_value", "advantages", "returns")


def _trainer(controller, collect, device="cpu", bptt="rollout", num_envs=6, horizon=3, rollout_len=11,
             steps_per_graph=16, **env_kw):
    torch.manual_seed(0)
    env = DelayedRecall(num_envs, horizon, 2, device=device, seed=1, **env_kw)
    kw = ({"d_model": 16, "num_layers": 2, "backend": "reference" if device == "cpu" else None}
          if controller == "mamba" else {"hidden_size": 8, "num_layers": 2})
    policy = make_policy(controller, env.observation_size, env.num_actions, **kw).to(device)
    cfg = PPOConfig(rollout_len=rollout_len, seed=2, bptt=bptt, epochs=1, num_minibatches=2)
    return PPOTrainer(policy, env, cfg, collect=collect, steps_per_graph=steps_per_graph)


def _assert_same(a: PPOTrainer, b: PPOTrainer, ra, rb, where: str) -> None:
    for f in FIELDS:
        assert torch.equal(getattr(ra, f), getattr(rb, f)), f"{where}: {f}"
    assert ra.stats == rb.stats, where
    for x, y in zip(ra.init_state, rb.init_state):
        assert torch.equal(x, y), where
    for x, y in zip(a.state, b.state):
        assert torch.equal(x, y), f"{where}: carried state"
    assert torch.equal(a.obs, b.obs) and torch.equal(a.reset_flags, b.reset_flags), where
    assert torch.equal(a.generator.get_state(), b.generator.get_state()), f"{where}: sampling generator"
    ea, eb = a.env.state_dict(), b.env.state_dict()
    for k in ("phase", "bits", "episode_return", "episode_steps", "generator"):
        assert torch.equal(ea[k], eb[k]), f"{where}: env {k}"
    assert torch.equal(a.age, b.age) and a.env_steps == b.env_steps, where
    if ra.prefix_obs is not None or rb.prefix_obs is not None:
        assert torch.equal(ra.prefix_obs, rb.prefix_obs) and torch.equal(ra.prefix_resets, rb.prefix_resets), where


@pytest.mark.parametrize("controller", ["mamba", "gru"])
@pytest.mark.parametrize("bptt,env_kw", [("rollout", {}), ("episode", {"distractor_bits": True, "shaping": 0.3}),
                                         ("rollout", {"noise_channels": 0})])
def test_graph_ready_step_run_eagerly_equals_the_eager_collection(controller, bptt, env_kw, one_torch_thread):
    a, b = _trainer(controller, "eager", bptt=bptt, **env_kw), _trainer(controller, "graph", bptt=bptt, **env_kw)
    assert a.collect_mode == "eager" and b.collect_mode == "graph" and isinstance(b._collector, GraphCollector)
    for u in range(3):  # across updates: the carried state, the autoreset and the generators continue alike
        ra, rb = a.collect(), b.collect()
        _assert_same(a, b, ra, rb, f"{controller} {bptt} {env_kw} update {u}")
        assert ra.stats["episodes"] > 0 and ra.resets[:, 1:].any()  # resets inside the rollout were exercised
        a.update(ra)
        b.update(rb)
    for k, v in a.policy.state_dict().items():  # and so training on them stays identical
        assert torch.equal(v, b.policy.state_dict()[k]), k


def test_graph_collection_resumes_exactly_from_an_eager_checkpoint_and_back(one_torch_thread):
    a = _trainer("mamba", "eager")
    a.train_update()
    b = _trainer("mamba", "graph")
    b.load_state_dict(a.state_dict())  # the collector reads the carried state from the trainer at each collect
    ra, rb = a.collect(), b.collect()
    _assert_same(a, b, ra, rb, "after load_state_dict")
    b.set_collect("eager")
    a.set_collect("graph")
    _assert_same(a, b, a.collect(), b.collect(), "modes swapped")


def test_sampler_equals_multinomial_and_the_gru_cell_step_equals_nn_gru():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    logits = torch.randn(257, 16) * 3
    expected = torch.multinomial(torch.softmax(logits, -1), 1, generator=g1).squeeze(-1)
    assert torch.equal(sample_actions(logits, g2), expected)
    assert torch.equal(g1.get_state(), g2.get_state())
    for layers in (1, 2):
        torch.manual_seed(layers)
        pol = GRUPolicy(7, 4, hidden_size=12, num_layers=layers)
        obs, state = torch.randn(9, 7), (torch.randn(9, layers, 12),)
        reset = torch.tensor([True, False] * 4 + [True])
        with torch.no_grad():
            out_a, out_b = pol.step(obs, state, reset), pol.collect_step(obs, state, reset)
        for x, y in zip(out_a[:2] + out_a[2], out_b[:2] + out_b[2]):
            assert torch.equal(x, y)


def test_collect_modes_and_errors():
    assert resolve_collect("auto", torch.device("cpu")) == "eager"
    assert resolve_collect(None, torch.device("cuda")) == "graph"
    assert resolve_collect("graph", torch.device("cpu")) == "graph"
    with pytest.raises(StateError, match="collect"):
        resolve_collect("fast", torch.device("cpu"))
    tr = _trainer("gru", "eager")
    with pytest.raises(StateError, match="CUDA device"):
        GraphCollector(tr, capture=True)
    with pytest.raises(StateError, match="steps_per_graph"):
        GraphCollector(tr, steps_per_graph=0)


@pytest.mark.parametrize("controller", ["mamba", "gru"])
def test_compiled_policy_step_collects_what_the_graph_step_does(controller, monkeypatch, one_torch_thread):
    """collect="graph-compiled": the step's body goes through torch.compile (here its aot_eager backend, which
    needs no C++ compiler; CUDA runs TorchInductor, tested on the GPU) and the rollout matches the graph path's
    within float rounding; updates then change the parameters that the compiled step reads."""
    import mamba_state.rl.collect as collect_mod
    from torch._dynamo.utils import counters

    monkeypatch.setattr(collect_mod, "COMPILE_BACKEND", "aot_eager")
    compiled_before = counters["stats"]["unique_graphs"]
    a, b = _trainer(controller, "graph"), _trainer(controller, "graph-compiled")
    assert b.collect_mode == "graph-compiled" and b._collector.compile_step and not a._collector.compile_step
    for u in range(2):
        ra, rb = a.collect(), b.collect()
        assert torch.equal(ra.actions, rb.actions), f"update {u}"  # tiny rounding does not flip these draws
        for f in ("logprobs", "values", "advantages"):
            torch.testing.assert_close(getattr(ra, f), getattr(rb, f), rtol=1e-5, atol=1e-6)
        a.update(ra)
        b.update(rb)
    assert counters["stats"]["unique_graphs"] > compiled_before  # the step did go through torch.compile
    with pytest.raises(StateError, match="collect"):
        resolve_collect("compiled", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("controller", ["mamba", "gru"])
def test_compiled_graph_collection_on_cuda(controller):
    """collect="graph-compiled" on CUDA (TorchInductor inside the captured graphs): the first rollout's
    log-probabilities and values match the uncompiled graph path within float32 rounding, wherever the two
    trajectories still agree (the same actions so far)."""
    kw = {"device": "cuda", "num_envs": 64, "horizon": 5, "rollout_len": 32, "steps_per_graph": 16}
    a, b = _trainer(controller, "graph", **kw), _trainer(controller, "graph-compiled", **kw)
    ra, rb = a.collect(), b.collect()
    same = (ra.actions == rb.actions).long().cumprod(0).bool()  # [T, N]: every action so far equal
    assert same[:8].float().mean() > 0.9
    for f in ("logprobs", "values"):
        torch.testing.assert_close(getattr(ra, f)[same], getattr(rb, f)[same], rtol=1e-4, atol=1e-4)
    assert rb.stats["episodes"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("controller", ["mamba", "gru"])
@pytest.mark.parametrize("rollout_len,steps_per_graph", [(37, 8), (16, 16)])
def test_captured_graph_replays_the_eager_transitions_on_cuda(controller, rollout_len, steps_per_graph):
    kw = {"device": "cuda", "num_envs": 64, "horizon": 5, "rollout_len": rollout_len,
          "steps_per_graph": steps_per_graph, "distractor_bits": True}
    a, b = _trainer(controller, "graph", **kw), _trainer(controller, "graph", **kw)
    assert b._collector.capture
    a._collector.capture = False  # the same graph-ready step, run eagerly on the GPU
    for u in range(3):
        ra, rb = a.collect(), b.collect()
        _assert_same(a, b, ra, rb, f"{controller} update {u}")
        b.update(rb)  # parameters change in place: the graphs must read the new ones
        a.policy.load_state_dict(b.policy.state_dict())  # (GPU backwards need not be bitwise reproducible)
        a.generator.set_state(b.generator.get_state())
    if controller == "mamba":  # Mamba's step is the same code on both paths: the eager 0.1 path agrees too
        c = _trainer(controller, "eager", **kw)
        d = _trainer(controller, "graph", **kw)
        _assert_same(c, d, c.collect(), d.collect(), "eager path vs graph")


@pytest.mark.gpu
def test_graph_collection_checkpoint_resume_is_exact_on_cuda():
    kw = {"device": "cuda", "num_envs": 32, "horizon": 4, "rollout_len": 20, "steps_per_graph": 8}
    a = _trainer("mamba", "graph", **kw)
    a.train_update()
    saved = a.state_dict()
    ra = a.collect()
    b = _trainer("mamba", "graph", **kw)
    b.collect()  # capture the graphs first, then restore generators and state under them
    b.load_state_dict(saved)
    rb = b.collect()
    _assert_same(a, b, ra, rb, "resume")


class _ReplayEagerly:
    """Stands in for a captured graph on the CPU: a replay runs the captured function ``steps`` times."""

    def __init__(self, fn, steps):
        self.fn, self.steps = fn, steps

    def replay(self):
        for _ in range(self.steps):
            self.fn()


@pytest.mark.parametrize("steps_per_graph", [4, 11, 64])
def test_graph_replay_schedule_with_warm_ups_equals_eager(monkeypatch, steps_per_graph, one_torch_thread):
    """The capture logic without CUDA: warm-ups that write the buffers and draw random numbers (then restore the
    generators), a graph of k steps replayed T // k times and one of T % k, for the collection and for GAE."""
    def fake_capture(self, steps, fn, rewind, generators):
        saved = [g.get_state() for g in generators]
        for _ in range(2):  # what _capture's warm-up does to the buffers and generators
            rewind()
            for _ in range(steps):
                fn()
        for g, s in zip(generators, saved):
            g.set_state(s)
        return _ReplayEagerly(fn, steps)

    monkeypatch.setattr(GraphCollector, "_capture", fake_capture)
    a, b = _trainer("mamba", "eager"), _trainer("mamba", "graph", steps_per_graph=steps_per_graph)
    b._collector.capture = True  # replays through the schedule above
    for u in range(2):
        ra, rb = a.collect(), b.collect()
        _assert_same(a, b, ra, rb, f"k={steps_per_graph} update {u}")
    assert len(b._collector._graphs) == (2 if 11 % min(steps_per_graph, 11) == 0 else 4)


def test_a_failed_capture_falls_back_to_the_eager_step(monkeypatch, one_torch_thread):
    def broken(self, steps, fn, rewind, generators):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphCollector, "_capture", broken)
    a, b = _trainer("gru", "eager"), _trainer("gru", "graph")
    b._collector.capture = True
    with pytest.warns(RuntimeWarning, match="capture failed"):
        rb = b.collect()
    assert not b._collector.capture
    _assert_same(a, b, a.collect(), rb, "fallback")


def _assert_close_rollouts(a: PPOTrainer, b: PPOTrainer, ra, rb, where: str) -> None:
    """Two collections whose policy steps differ by float32 rounding only (same actions, environment, draws)."""
    for f in FIELDS:
        x, y = getattr(ra, f), getattr(rb, f)
        if x.dtype.is_floating_point:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=lambda m: f"{where}: {f}: {m}")
        else:
            assert torch.equal(x, y), f"{where}: {f}"
    assert ra.stats == rb.stats, where
    for x, y in zip(a.state, b.state):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    ea, eb = a.env.state_dict(), b.env.state_dict()
    for k in ("phase", "bits", "episode_steps", "generator"):
        assert torch.equal(ea[k], eb[k]), f"{where}: env {k}"
    assert torch.equal(a.age, b.age) and torch.equal(a.reset_flags, b.reset_flags), where
    assert torch.equal(a.generator.get_state(), b.generator.get_state()), f"{where}: sampling generator"


@pytest.mark.parametrize("controller", ["mamba", "gru"])
@pytest.mark.parametrize("bptt,env_kw", [("rollout", {}), ("episode", {"distractor_bits": True, "shaping": 0.3}),
                                         ("rollout", {"noise_channels": 0})])
def test_fused_collection_collects_what_the_graph_step_does(controller, bptt, env_kw, one_torch_thread):
    """collect="graph-fused" (Triton's interpreter here): the same transitions as the graph path up to float32
    rounding, across updates (the packed parameters follow the optimizer), for both controllers (each through
    its own fused policy kernel, with the fused environment step)."""
    a, b = _trainer(controller, "graph", bptt=bptt, **env_kw), _trainer(controller, "graph-fused", bptt=bptt, **env_kw)
    assert b.collect_mode == "graph-fused" and b._collector.fused
    assert b._collector._packed is not None and b._collector._gru == (controller == "gru"), \
        b._collector.fused_policy_reason
    for u in range(3):
        ra, rb = a.collect(), b.collect()
        _assert_close_rollouts(a, b, ra, rb, f"{controller} {bptt} {env_kw} update {u}")
        assert ra.stats["episodes"] > 0 and ra.resets[:, 1:].any()
        a.update(ra)
        b.update(rb)
    b.set_collect("eager")  # the carried state went back to the trainer: the eager path continues from it
    a.set_collect("eager")
    _assert_close_rollouts(a, b, a.collect(), b.collect(), "eager after fused")


def test_fused_collection_needs_triton_on_the_device(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("CPU tensors: this machine has CUDA, where graph-fused runs")
    with pytest.raises(StateError, match="graph-fused.*Triton runs on"):
        _trainer("mamba", "graph-fused")
    assert resolve_collect("graph-fused", torch.device("cpu")) == "graph-fused"
    with pytest.raises(StateError, match="one of fused and compile_step"):
        GraphCollector(_trainer("gru", "eager"), fused=True, compile_step=True)


@pytest.mark.gpu
@pytest.mark.parametrize("controller", ["mamba", "gru"])
def test_fused_graphs_replay_the_fused_step_and_match_the_graph_path_on_cuda(controller):
    """On CUDA: the captured graphs of the fused step replay what the same kernels give launched one by one,
    bit for bit (each program owns its rows; only the statistics are added across programs); and the fused
    rollout matches the graph path's within float32 rounding where the trajectories still agree."""
    kw = {"device": "cuda", "num_envs": 70, "horizon": 5, "rollout_len": 37, "steps_per_graph": 8,
          "distractor_bits": True}
    a, b = _trainer(controller, "graph-fused", **kw), _trainer(controller, "graph-fused", **kw)
    a._collector.capture = False
    assert b._collector.capture
    for u in range(2):
        ra, rb = a.collect(), b.collect()
        for f in FIELDS:
            assert torch.equal(getattr(ra, f), getattr(rb, f)), f"update {u}: {f}"
        b.update(rb)
        a.policy.load_state_dict(b.policy.state_dict())
        a.generator.set_state(b.generator.get_state())
    c, d = _trainer(controller, "graph", **kw), _trainer(controller, "graph-fused", **kw)
    rc, rd = c.collect(), d.collect()
    same = (rc.actions == rd.actions).long().cumprod(0).bool()
    assert same[:8].float().mean() > 0.9
    for f in ("logprobs", "values"):
        torch.testing.assert_close(getattr(rc, f)[same], getattr(rd, f)[same], rtol=1e-4, atol=1e-4)


def test_a_failed_fused_capture_falls_back_to_the_graph_step(monkeypatch, one_torch_thread):
    """Should the kernels fail while a graph is captured (say a Triton that cannot compile them), the collector
    warns and captures the graph path's step instead: the graph path's transitions exactly."""
    def capture_eagerly(self, steps, fn, rewind, generators):
        saved = [g.get_state() for g in generators]
        try:
            rewind()
            fn()  # the warm-up: here the fused kernels raise
        finally:
            for g, s in zip(generators, saved):
                g.set_state(s)
        return _ReplayEagerly(fn, steps)

    def broken_kernel(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    import mamba_state.kernels.rl_step as rl_step

    monkeypatch.setattr(GraphCollector, "_capture", capture_eagerly)
    monkeypatch.setattr(rl_step, "mamba_policy_step", broken_kernel)
    a, b = _trainer("mamba", "graph"), _trainer("mamba", "graph-fused")
    b._collector.capture = True
    with pytest.warns(RuntimeWarning, match="fused kernels failed"):
        rb = b.collect()
    assert not b._collector.fused and b._collector.capture
    _assert_same(a, b, a.collect(), rb, "fallback")
