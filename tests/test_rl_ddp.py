"""Data-parallel RL (``torchrun ... -m mamba_state.cli rl``): a two-process Gloo run through the real CLI entry.

One group of two spawned processes (once per module) sets torchrun's environment variables and, in order:

1. builds a :class:`DistributedPPOTrainer` for one update, recording each rank's local rollout statistics and
   the metrics it returned, and all-reduces random per-environment statistics with ``reduce_update_stats``;
2. calls ``mamba_state.cli.main([...])`` (what torchrun runs) for an uninterrupted 4-update run, a 2-update run
   and its resume to 4 updates, a resume of a one-process checkpoint (each with 5 environments, 3 + 2: an uneven
   split, and a tiny Mamba policy on the reference backend) and a one-run ``--scale`` sweep; each on its own port.

The tests then check the outcome: identical parameters on both ranks, rank 0's checkpoint, bit-exact resume with
the same number of processes, resume with one process (here, in the test process) and with two from one,
and reduced metrics equal to the one-process computation on the same data.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import traceback

import pytest
import torch
from hypothesis import given
from _spawn import describe_failure, free_ports, read_rank_results, spawn_ranks
from hypothesis import strategies as st

from mamba_state.rl.checkpoint import load_checkpoint
from mamba_state.rl.ddp import rank_seed
from mamba_state.rl.shard import merge_states, split_counts, split_state

WORLD = 2
NUM_ENVS, ROLLOUT = 5, 8
RUN = ["rl", "--controller", "mamba", "--d-model", "8", "--num-layers", "1", "--d-state", "4", "--backend", "reference",
       "--horizon", "3", "--num-bits", "1", "--num-envs", str(NUM_ENVS), "--rollout-len", str(ROLLOUT), "--epochs", "2",
       "--minibatches", "2", "--device", "cpu", "--eval-envs", "8", "--no-progress", "--threads", "1",
       "--checkpoint-every", "2"]
GRU_OPTS = {"controller": "gru", "gru_hidden": 8, "horizon": 2, "num_envs": NUM_ENVS, "rollout_len": ROLLOUT,
            "epochs": 1, "minibatches": 2, "device": "cpu", "progress": False}
# Random per-environment statistics for the reduction check: everything derived from this seed.
STATS_SEED, STATS_ENVS = 1234, 7


def stats_data():
    """Per-environment successes, episodes, returns, and per-rank seconds and losses (float64)."""
    g = torch.Generator().manual_seed(STATS_SEED)
    episodes = torch.randint(1, 5, (STATS_ENVS,), generator=g)
    successes = (torch.rand(STATS_ENVS, generator=g, dtype=torch.float64) * (episodes + 1)).floor().long()
    successes = torch.minimum(successes, episodes)
    returns = torch.rand(STATS_ENVS, generator=g, dtype=torch.float64) * episodes
    seconds = torch.rand(WORLD, 2, generator=g, dtype=torch.float64) + 0.1
    losses = torch.randn(WORLD, 3, generator=g, dtype=torch.float64)
    return successes, episodes, returns, seconds, losses


# ---------------------------------------------------------------------------------------------- worker side
def _check_metrics(rank: int, out_dir: str) -> dict:
    from mamba_state.rl.ddp import distributed, reduce_update_stats
    from mamba_state.rl.ppo import update_metrics
    from mamba_state.rl.train import build

    record: dict = {}
    with distributed("cpu") as ctx:
        assert ctx.enabled and ctx.rank == rank and ctx.world_size == WORLD and ctx.backend == "gloo"
        # (a) the trainer's own reduction over one real update
        env, policy, trainer = build(GRU_OPTS, ctx)
        seen = {}
        collect = trainer.collect

        def spy():
            ro = collect()
            seen.update(ro.stats, steps=ro.obs.shape[0] * ro.obs.shape[1])
            return ro

        trainer.collect = spy
        metrics = trainer.train_update()
        record["local"] = seen
        record["metrics"] = metrics
        record["env_seed_differs"] = bool(env._generator.initial_seed() != rank_seed(1, 0, "env")) == (rank != 0)
        # (b) random statistics, this rank's slice
        successes, episodes, returns, seconds, losses = stats_data()
        counts = split_counts(STATS_ENVS, WORLD)
        lo, hi = sum(counts[:rank]), sum(counts[:rank + 1])
        stats = {"successes": int(successes[lo:hi].sum()), "episodes": int(episodes[lo:hi].sum()),
                 "return_sum": float(returns[lo:hi].sum()), "steps": (hi - lo) * ROLLOUT,
                 "collect_s": float(seconds[rank, 0]), "total_s": float(seconds[rank, 1])}
        loss = {k: float(losses[rank, i]) for i, k in enumerate(("policy_loss", "value_loss", "entropy"))}
        red, red_loss = reduce_update_stats(stats, loss, ctx)
        record["reduced"] = update_metrics(red, [(red["successes"], red["episodes"], red["return_sum"])], red_loss,
                                           1, STATS_ENVS * ROLLOUT)
    return record


def _worker(rank: int, ports: list[int], runs: list[tuple[str, list[str]]], out_dir: str) -> None:
    os.environ.update({"WORLD_SIZE": str(WORLD), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1"})
    torch.set_num_threads(1)
    import mamba_state.rl.train as train_mod
    from mamba_state.cli import main

    results: dict = {}
    try:
        os.environ["MASTER_PORT"] = str(ports[0])
        results["metrics"] = _check_metrics(rank, out_dir)
    except Exception:
        results["metrics_error"] = traceback.format_exc()
    captured = {}
    build = train_mod.build

    def spy(opts, ctx=None):  # keep each rank's policy to compare parameters afterwards
        env, policy, trainer = build(opts, ctx)
        captured["policy"] = policy
        return env, policy, trainer

    train_mod.build = spy
    for (tag, argv), port in zip(runs, ports[1:]):
        os.environ["MASTER_PORT"] = str(port)
        try:
            results[tag] = main(argv)
            torch.save({k: v.detach().clone() for k, v in captured["policy"].state_dict().items()},
                       os.path.join(out_dir, f"{tag}_rank{rank}.pt"))
        except BaseException:
            results[tag] = traceback.format_exc()
            break
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)



# ---------------------------------------------------------------------------------------------- the group
@pytest.fixture(scope="module")
def group(tmp_path_factory):
    from mamba_state.cli import main

    root = tmp_path_factory.mktemp("ddp")
    # a one-process checkpoint that the group resumes with two processes
    assert main([*RUN, "--total-updates", "2", "--out", str(root / "single")]) == 0
    runs = [("full", [*RUN, "--total-updates", "4", "--out", str(root / "full")]),
            ("part", [*RUN, "--total-updates", "2", "--out", str(root / "part")]),
            ("resumed", [*RUN, "--total-updates", "4", "--out", str(root / "part"), "--resume"]),
            ("from_single", [*RUN, "--total-updates", "3", "--out", str(root / "single"), "--resume"]),
            ("scale", [*RUN, "--scale", "--horizons", "2", "--seeds", "0", "--controllers", "gru", "--gru-hidden", "8",
                       "--total-updates", "1", "--out", str(root / "scale")])]
    with tempfile.TemporaryDirectory() as out_dir:
        ports = free_ports(1 + len(runs))
        hung, exitcodes = spawn_ranks(_worker, lambda r: (r, ports, runs, out_dir), WORLD)
        ranks = read_rank_results(out_dir, WORLD)
        params = [{tag: torch.load(os.path.join(out_dir, f"{tag}_rank{r}.pt"))
                   for tag, _ in runs if os.path.exists(os.path.join(out_dir, f"{tag}_rank{r}.pt"))}
                  for r in range(WORLD)]
    assert not hung, describe_failure(hung, exitcodes, ranks)
    return {"root": root, "ranks": ranks, "params": params, "exitcodes": exitcodes}


def _ok(group, tag):
    for r, res in enumerate(group["ranks"]):
        assert tag in res, f"rank {r} never ran {tag} (exit codes {group['exitcodes']}): {res}"
        assert res[tag] == 0, f"rank {r}, run {tag}:\n{res[tag]}"


def test_ranks_end_with_identical_parameters_and_rank0_checkpoint(group):
    _ok(group, "full")
    a, b = (p["full"] for p in group["params"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    root = group["root"] / "full"
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json"):
        assert (root / name).exists(), name
    assert not list(root.glob("*.tmp")), "a temporary checkpoint file was left behind"
    payload = load_checkpoint(root / "checkpoint.pt")
    sd, world = payload["trainer"], payload["world"]
    assert world["world_size"] == 2 and world["counts"] == [3, 2] and len(world["ranks"]) == 2
    assert sd["updates"] == 4 and sd["env_steps"] == 4 * NUM_ENVS * ROLLOUT
    assert sd["env"]["config"]["num_envs"] == NUM_ENVS and sd["obs"].shape[0] == NUM_ENVS
    assert all(t.shape[0] == NUM_ENVS for t in sd["state"])
    for k, v in a.items():  # the checkpoint holds the parameters the ranks share
        assert torch.equal(sd["policy"][k], v), k
    # the two ranks drew different random streams (per-rank seeds)
    assert not torch.equal(world["ranks"][0]["env_generator"], world["ranks"][1]["env_generator"])
    config = json.loads((root / "config.json").read_text())
    assert config["world_size"] == 2 and config["envs_per_rank"] == [3, 2] and config["backend"] == "gloo"
    summary = json.loads((root / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["updates"] == 4
    lines = [json.loads(x) for x in (root / "metrics.jsonl").read_text().splitlines()]
    assert [m["update"] for m in lines] == [1, 2, 3, 4]  # one writer
    assert [m["env_steps"] for m in lines] == [u * NUM_ENVS * ROLLOUT for u in (1, 2, 3, 4)]


def test_same_world_size_resume_is_bit_exact(group):
    _ok(group, "part")
    _ok(group, "resumed")
    for r in range(WORLD):
        full, resumed = group["params"][r]["full"], group["params"][r]["resumed"]
        for k in full:
            assert torch.equal(full[k], resumed[k]), (r, k)
    a = load_checkpoint(group["root"] / "full" / "checkpoint.pt")["trainer"]
    b = load_checkpoint(group["root"] / "part" / "checkpoint.pt")["trainer"]
    for k in ("obs", "reset_flags"):
        assert torch.equal(a[k], b[k]), k
    assert all(torch.equal(x, y) for x, y in zip(a["state"], b["state"]))
    assert torch.equal(a["env"]["generator"], b["env"]["generator"])


def test_resume_two_process_checkpoint_with_one_process(group, capsys):
    from mamba_state.cli import main

    _ok(group, "full")
    root = group["root"] / "full_then_one"  # a copy: the other tests read the original
    shutil.copytree(group["root"] / "full", root)
    before = load_checkpoint(root / "checkpoint.pt")["trainer"]
    assert main([*RUN, "--total-updates", "6", "--out", str(root), "--resume"]) == 0
    assert "written by 2 process(es), now 1" in capsys.readouterr().out
    after = load_checkpoint(root / "checkpoint.pt")
    sd = after["trainer"]
    assert sd["updates"] == 6 and sd["env_steps"] == 6 * NUM_ENVS * ROLLOUT
    assert after["world"]["world_size"] == 1 and after["world"]["counts"] == [NUM_ENVS]
    assert any(not torch.equal(sd["policy"][k], before["policy"][k]) for k in sd["policy"])  # it trained on
    lines = [json.loads(x) for x in (root / "metrics.jsonl").read_text().splitlines()]
    assert [m["update"] for m in lines] == [1, 2, 3, 4, 5, 6]


def test_resume_one_process_checkpoint_with_two(group):
    _ok(group, "from_single")
    a, b = (p["from_single"] for p in group["params"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    payload = load_checkpoint(group["root"] / "single" / "checkpoint.pt")
    assert payload["trainer"]["updates"] == 3 and payload["world"]["counts"] == [3, 2]


def test_scale_sweep_under_two_processes(group):
    _ok(group, "scale")
    results = json.loads((group["root"] / "scale" / "scale_results.json").read_text())
    assert [(r["controller"], r["horizon"], r["world_size"]) for r in results["runs"]] == [("gru", 2, 2)]
    assert (group["root"] / "scale" / "gru_h2_s0" / "checkpoint.pt").exists()


def test_reduced_metrics_equal_one_process_computation(group):
    from mamba_state.rl.ppo import update_metrics

    recs = []
    for r, res in enumerate(group["ranks"]):
        assert "metrics" in res, f"rank {r}: {res.get('metrics_error')}"
        recs.append(res["metrics"])
    # (a) a real update: every rank reports the totals of both ranks' rollouts
    local = [rec["local"] for rec in recs]
    assert [x["steps"] for x in local] == [3 * ROLLOUT, 2 * ROLLOUT]
    succ, eps = sum(x["successes"] for x in local), sum(x["episodes"] for x in local)
    ret = sum(x["return_sum"] for x in local)
    assert eps > 0
    for rec in recs:
        m = rec["metrics"]
        assert m["episodes"] == eps and m["env_steps"] == NUM_ENVS * ROLLOUT
        assert m["success_rate"] == pytest.approx(succ / eps, rel=1e-12)
        assert m["mean_return"] == pytest.approx(ret / eps, rel=1e-12)
        assert rec["env_seed_differs"]
    assert recs[0]["metrics"] == recs[1]["metrics"]
    # (b) random statistics split 4 + 3: the reduced metrics equal the one-process computation on all of them
    successes, episodes, returns, seconds, losses = stats_data()
    tot = {"successes": int(successes.sum()), "episodes": int(episodes.sum()), "return_sum": float(returns.sum()),
           "steps": STATS_ENVS * ROLLOUT, "collect_s": float(seconds[:, 0].max()), "total_s": float(seconds[:, 1].max())}
    names = ("policy_loss", "value_loss", "entropy")
    want = update_metrics(tot, [(tot["successes"], tot["episodes"], tot["return_sum"])],
                          {k: float(losses[:, i].mean()) for i, k in enumerate(names)}, 1, STATS_ENVS * ROLLOUT)
    direct = {"success_rate": float(successes.sum()) / float(episodes.sum()),
              "mean_return": float(returns.sum()) / float(episodes.sum()),
              "steps_per_s": STATS_ENVS * ROLLOUT / float(seconds[:, 1].max())}
    for rec in recs:
        got = rec["reduced"]
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k
        for k, v in direct.items():
            assert got[k] == pytest.approx(v, rel=1e-12), k


# ---------------------------------------------------------------------------------------------- in-process
def test_split_counts():
    assert split_counts(5, 2) == [3, 2] and split_counts(8, 4) == [2, 2, 2, 2] and split_counts(3, 1) == [3]
    from mamba_state.errors import StateCompatibilityError

    with pytest.raises(StateCompatibilityError, match="at least one environment per rank"):
        split_counts(2, 3)


def test_rank_seed():
    assert rank_seed(7, 0, "env") == 7  # one process: unchanged seeds
    seeds = {rank_seed(7, r, "env") for r in range(1, 6)} | {rank_seed(7, 0, "env", "resume:3:2")}
    assert len(seeds) == 6 and 7 not in seeds and all(0 <= s < 2 ** 63 for s in seeds)


@functools.lru_cache(maxsize=None)
def _trained_state(bptt: str, num_envs: int) -> dict:
    """A one-process trainer state after two updates (GRU, CPU), built once per (bptt, num_envs)."""
    from mamba_state.rl.train import build

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, _, trainer = build({**GRU_OPTS, "bptt": bptt, "num_envs": num_envs})
        trainer.train_update()
        trainer.train_update()
        return trainer.state_dict()
    finally:
        torch.set_num_threads(old)


def _same(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    return x == y


@given(bptt=st.sampled_from(["rollout", "episode"]), world=st.integers(1, 7))
def test_split_then_merge_is_identity(bptt, world):
    sd = _trained_state(bptt, 7)
    counts = split_counts(7, world)
    parts = [split_state(sd, counts, r) for r in range(world)]
    assert [p["obs"].shape[0] for p in parts] == counts
    assert [p["env"]["config"]["num_envs"] for p in parts] == counts
    assert all(t.shape[0] == n for p, n in zip(parts, counts) for t in p["state"])
    if bptt == "episode":
        assert sd["history_obs"] and all(p["history_obs"][0].shape[0] == n for p, n in zip(parts, counts))
    # rows land on the rank that owns them, in order
    assert torch.equal(torch.cat([p["obs"] for p in parts]), sd["obs"])
    assert _same(merge_states(parts), sd)


def test_split_rejects_a_wrong_partition():
    from mamba_state.errors import StateCompatibilityError

    with pytest.raises(StateCompatibilityError, match="partition of the checkpoint's 7 environments"):
        split_state(_trained_state("rollout", 7), [3, 3], 0)


@pytest.mark.slow
def test_torchrun_entry(tmp_path):
    """The documented command itself: torchrun with two CPU processes, then a one-process resume."""
    import subprocess
    import sys

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "mamba_state.cli", *RUN, "--total-updates", "2", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 processes)" in proc.stdout
    payload = load_checkpoint(out / "checkpoint.pt")
    assert payload["world"]["world_size"] == 2 and payload["trainer"]["updates"] == 2
    one = subprocess.run([sys.executable, "-m", "mamba_state", *RUN, "--total-updates", "3", "--out", str(out),
                          "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert load_checkpoint(out / "checkpoint.pt")["trainer"]["updates"] == 3
