"""RL rollout collection: environment steps per second, the eager path (0.1) vs the graph-ready path, Mamba vs GRU.

Side by side in one run, for each controller and policy size: ``PPOTrainer.collect`` with ``collect="eager"``
(one ``policy.step``, sampling and ``env.step`` per time step from Python) and with ``collect="graph"``
(:class:`mamba_state.rl.collect.GraphCollector`: the step captured as CUDA graphs and replayed on CUDA; on a CPU
the same step run eagerly, so the CPU figure measures the refactor, not graphs). One collection is a rollout of
``--rollout-len`` steps in ``--num-envs`` environments, GAE included (what a training update pays). Before timing,
one rollout of each path from identical trainers is compared (``same_transitions``: actions, rewards, values).

``--replay`` (CUDA only) also measures training replay: forward + backward of ``policy.forward_sequence`` over
``--replay-envs`` sequences (one PPO minibatch) of each length in ``--replay-lengths`` (2,000-40,000 by
default) with episode resets every ``L / 2`` steps, staggered per row (Mamba: one chunked scan per layer with
the reset mask; GRU: one call over the reset-cut segments).

    python benchmarks/bench_rl_collect.py                   # GPU: 512 envs, both sizes, JSON + docs table
    python benchmarks/bench_rl_collect.py --replay          # + replay at 2,000-40,000 steps
    python benchmarks/bench_rl_collect.py --quick           # a CPU-sized smoke run (seconds)
    python benchmarks/bench_rl_collect.py --replay --no-doc --json "$OUT/bench_rl_collect_h200.json"   # on a device
    python benchmarks/bench_rl_collect.py --doc-from benchmarks/results/bench_rl_collect_h200.json     # then here

Writes ``benchmarks/results/bench_rl_collect_<device>.json`` (``_quick`` appended with ``--quick``) and the
``## RL collection`` section of docs/benchmarks.md (not with ``--no-doc``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, environment_line, markdown_table, replace_section, write_json  # noqa: E402

from mamba_state.rl.envs import DelayedRecall  # noqa: E402
from mamba_state.rl.policies import count_parameters, make_policy  # noqa: E402
from mamba_state.rl.ppo import PPOConfig, PPOTrainer  # noqa: E402

SIZES = {  # the recipe's small policies (docs/rl.md) and the 0.1 defaults
    "small": {"mamba": {"d_model": 32, "num_layers": 1}, "gru": {"hidden_size": 32}},
    "default": {"mamba": {"d_model": 64, "num_layers": 2}, "gru": {"hidden_size": 120}},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer(controller: str, size: str, collect: str, args, device: torch.device) -> PPOTrainer:
    torch.manual_seed(0)
    env = DelayedRecall(args.num_envs, args.horizon, args.num_bits, device=device, seed=1)
    kw = dict(SIZES[size][controller])
    if controller == "mamba":
        kw["backend"] = args.backend
    policy = make_policy(controller, env.observation_size, env.num_actions, **kw).to(device)
    cfg = PPOConfig(rollout_len=args.rollout_len, seed=2)
    return PPOTrainer(policy, env, cfg, collect=collect, steps_per_graph=args.graph_steps)


def same_transitions(controller: str, size: str, args, device: torch.device) -> bool:
    a, b = trainer(controller, size, "eager", args, device), trainer(controller, size, "graph", args, device)
    ra, rb = a.collect(), b.collect()
    return all(torch.equal(getattr(ra, f), getattr(rb, f)) for f in ("actions", "rewards", "values", "obs"))


def time_collect(controller: str, size: str, args, device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {"controller": controller, "size": size}
    modes = (("eager", "graph") + (("graph-compiled",) if args.compiled else ())
             + (("graph-fused",) if args.fused else ()))
    trainers = {mode: trainer(controller, size, mode, args, device) for mode in modes}
    out["parameters"] = count_parameters(trainers["eager"].policy)
    for mode in modes[1:]:
        t0 = time.perf_counter()
        trainers[mode].collect()  # the first graph collection captures the graphs (and compiles)
        _sync(device)
        out[f"{mode}_first_collect_s"] = time.perf_counter() - t0
    trainers["eager"].collect()
    times: dict[str, list[float]] = {m: [] for m in trainers}
    for _ in range(args.repeats):  # in turns, so that a slow spell of the host falls on both alike
        for mode, tr in trainers.items():
            _sync(device)
            start = time.perf_counter()
            tr.collect()
            _sync(device)
            times[mode].append(time.perf_counter() - start)
    steps = args.num_envs * args.rollout_len
    for mode, ts in times.items():
        med = statistics.median(ts)
        out[f"{mode}_s"] = med
        out[f"{mode}_steps_per_s"] = steps / med
    out["speedup"] = out["graph_steps_per_s"] / out["eager_steps_per_s"]
    if args.compiled:
        out["compiled_speedup"] = out["graph-compiled_steps_per_s"] / out["eager_steps_per_s"]
    if args.fused:
        out["fused_speedup"] = out["graph-fused_steps_per_s"] / out["eager_steps_per_s"]
    out["same_transitions"] = same_transitions(controller, size, args, device)
    return out


def time_replay(controller: str, size: str, length: int, args, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    n = args.replay_envs
    env = DelayedRecall(1, args.horizon, args.num_bits)
    kw = dict(SIZES[size][controller])
    if controller == "mamba":
        kw["backend"] = args.backend
    policy = make_policy(controller, env.observation_size, env.num_actions, **kw).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    obs = torch.randn(n, length, env.observation_size, device=device, generator=gen)
    period = max(2, length // 2)  # two episodes per sequence, boundaries staggered across rows
    offsets = torch.randint(0, period, (n, 1), device=device, generator=gen)
    reset = (torch.arange(length, device=device)[None, :] + offsets) % period == 0
    state = policy.initial_state(n, device=device)
    row: dict[str, Any] = {"controller": controller, "size": size, "length": length, "sequences": n}

    def step() -> None:
        logits, values, _ = policy.forward_sequence(obs, state, reset)
        (logits.float().sum() + values.float().sum()).backward()
        policy.zero_grad(set_to_none=True)

    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        ts = []
        for _ in range(args.replay_repeats):
            start = time.perf_counter()
            step()
            _sync(device)
            ts.append(time.perf_counter() - start)
        med = statistics.median(ts)
        row.update({"fwd_bwd_ms": med * 1e3, "steps_per_s": n * length / med})
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - depends on the device
        row["error"] = f"out of memory: {exc}".splitlines()[0][:200]
    return row


def add_setting_args(p: argparse.ArgumentParser) -> None:
    """The collection setting's options (what :func:`trainer` reads), shared with profile_rl_collect.py."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-envs", type=int, default=512)
    p.add_argument("--rollout-len", type=int, default=256)
    p.add_argument("--horizon", type=int, default=1000)
    p.add_argument("--num-bits", type=int, default=1)
    p.add_argument("--controllers", nargs="+", default=["mamba", "gru"], choices=["mamba", "gru"])
    p.add_argument("--graph-steps", type=int, default=16)
    p.add_argument("--backend", default=None, help="Mamba scan backend (default: auto)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_setting_args(p)
    p.add_argument("--sizes", nargs="+", default=["small", "default"], choices=list(SIZES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--replay", action="store_true", help="also time training replay (CUDA only)")
    p.add_argument("--replay-lengths", type=int, nargs="+", default=[2000, 5000, 10000, 20000, 40000])
    p.add_argument("--replay-envs", type=int, default=128, help="sequences per replay (one minibatch of 512 / 4)")
    p.add_argument("--replay-repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: 16 envs, 24 steps, small policies, 2 repeats (no replay)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads on a CPU device (0: torch's own)")
    p.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    p.add_argument("--json", default=None, help="write the JSON here instead of benchmarks/results/")
    p.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=None,
                   help="also time --collect graph-compiled (the policy step through torch.compile; default: on "
                        "CUDA)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="also time --collect graph-fused (the Mamba policy step and the environment step as Triton "
                        "kernels; default: on CUDA)")
    p.add_argument("--doc-from", default=None, metavar="JSON",
                   help="measure nothing: rewrite the docs section from a JSON this script wrote (e.g. on a GPU)")
    args = p.parse_args(argv)
    if args.doc_from:
        import json

        doc = json.loads(Path(args.doc_from).read_text())
        replace_section("RL collection", section(doc["environment"], doc["config"], doc["collect"], doc["replay"],
                                                 Path(args.doc_from).name))
        print(f"rewrote the RL collection section of docs/benchmarks.md from {args.doc_from}")
        return 0
    device = torch.device(args.device)
    if args.compiled is None:
        args.compiled = device.type == "cuda"
    if args.fused is None:
        args.fused = device.type == "cuda"
    if args.quick:
        args.num_envs, args.rollout_len, args.horizon, args.repeats = 16, 24, 6, 2
        args.sizes, args.replay = ["small"], False
        args.backend = args.backend or ("reference" if device.type == "cpu" else None)
    if args.replay and device.type != "cuda":
        p.error("--replay needs a CUDA device (training replay at 2,000-40,000 steps is a GPU measurement)")
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    rows = []
    for size in args.sizes:
        for ctrl in args.controllers:
            r = time_collect(ctrl, size, args, device)
            compiled = (f"  graph-compiled {r['graph-compiled_steps_per_s']:12,.0f} x{r['compiled_speedup']:.1f}"
                        if "compiled_speedup" in r else "")
            compiled += (f"  graph-fused {r['graph-fused_steps_per_s']:12,.0f} x{r['fused_speedup']:.1f}"
                         if "fused_speedup" in r else "")
            print(f"{ctrl:5s} {size:7s} eager {r['eager_steps_per_s']:12,.0f}  graph {r['graph_steps_per_s']:12,.0f} "
                  f"env steps/s  x{r['speedup']:.1f}{compiled}  same transitions: {r['same_transitions']}",
                  flush=True)
            rows.append(r)
    replay = []
    if args.replay:
        for size in args.sizes:
            for ctrl in args.controllers:
                for length in args.replay_lengths:
                    r = time_replay(ctrl, size, length, args, device)
                    print(f"replay {ctrl:5s} {size:7s} L={length:6d} "
                          + (f"{r['fwd_bwd_ms']:9.1f} ms  {r['steps_per_s']:12,.0f} steps/s" if "error" not in r
                             else r["error"]), flush=True)
                    replay.append(r)
    config = {k: getattr(args, k) for k in ("num_envs", "rollout_len", "horizon", "num_bits", "graph_steps",
                                            "repeats", "backend", "quick", "replay_envs", "compiled",
                                            "fused")}
    tag = ("cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).lower().replace(" ", "_"))
    name = f"bench_rl_collect_{tag}" + ("_quick" if args.quick else "")
    payload = {"config": config, "collect": rows, "replay": replay}
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({"environment": env, **payload}, indent=2) + "\n")
        path = Path(args.json)
    else:
        path = write_json(name, payload, env)
    print(f"wrote {path}")
    if not args.no_doc:
        replace_section("RL collection", section(env, config, rows, replay, path.name))
    return 0


def section(env: dict[str, Any], config: dict[str, Any], rows: list[dict[str, Any]],
            replay: list[dict[str, Any]], json_name: str) -> str:
    where = "CUDA graph replays" if env["gpu"] else "the same step run eagerly: no graphs on a CPU"
    compiled = bool(config.get("compiled")) and all("compiled_speedup" in r for r in rows)
    fused = bool(config.get("fused")) and all("fused_speedup" in r for r in rows)
    text = [environment_line(env), "",
            f"`python benchmarks/bench_rl_collect.py{' --quick' if config['quick'] else ''}`: one rollout of "
            f"{config['rollout_len']} steps in {config['num_envs']} DelayedRecall environments (horizon "
            f"{config['horizon']}, GAE included), median of {config['repeats']}; eager = `--collect eager` (0.1's "
            f"path), graph = `--collect graph` ({where}, {config['graph_steps']} steps per graph). "
            f"Raw numbers: `benchmarks/results/{json_name}`. *Same transitions*: one rollout of each path from "
            "identical trainers, compared bit for bit (on CUDA the GRU's graph step is the fused GRU cell, not "
            "cuDNN's RNN, so it may differ there by float rounding).", "",
            markdown_table(["controller", "policy", "parameters", "eager env steps/s", "graph env steps/s",
                            "graph / eager"] + (["graph-compiled env steps/s", "graph-compiled / eager"]
                                                if compiled else [])
                           + (["graph-fused env steps/s", "graph-fused / eager"] if fused else [])
                           + ["same transitions"],
                           [[r["controller"], r["size"], f"{r['parameters']:,}", f"{r['eager_steps_per_s']:,.0f}",
                             f"{r['graph_steps_per_s']:,.0f}", f"{r['speedup']:.1f}x"]
                            + ([f"{r['graph-compiled_steps_per_s']:,.0f}", f"{r['compiled_speedup']:.1f}x"]
                               if compiled else [])
                            + ([f"{r['graph-fused_steps_per_s']:,.0f}", f"{r['fused_speedup']:.1f}x"] if fused else [])
                            + ["yes" if r["same_transitions"] else "no"] for r in rows])]
    if compiled:
        text += ["", "graph-compiled = `--collect graph-compiled`: the graph path with the step's body (policy, "
                 "sampler, environment, storage; the random draws made first) through `torch.compile` "
                 "(TorchInductor) before the capture; its transitions equal the graph path's up to float "
                 "rounding, so *same transitions* is about eager vs graph only."]
    if fused:
        text += ["", "graph-fused = `--collect graph-fused`: the graph path with the policy's whole step (layers, "
                 "heads, sampler, rollout stores) as one Triton kernel and the environment step as another "
                 "(`mamba_state.kernels.rl_step`); a GRU wider than 64 (the default size) keeps its torch policy "
                 "step there with the fused environment step. Equal to the graph path up to float rounding."]
        text += ["", "Mamba / GRU, the fastest path of each: " + "; ".join(
            f"{size}: {ratio:.2f}x" for size, ratio in _mamba_over_gru(rows).items())]
    if env["gpu"]:
        text += ["", "Targets (issue 20): the Mamba policy's collection >= 20x the eager path at 512 environments, "
                 "and at least as fast as the GRU's."]
    if replay:
        text += ["", f"Training replay (forward + backward of `forward_sequence`, {config['replay_envs']} "
                 "sequences, two episodes per sequence with staggered resets):", "",
                 markdown_table(["controller", "policy", "length", "ms", "steps/s", "peak GiB"],
                                [[r["controller"], r["size"], f"{r['length']:,}",
                                  f"{r['fwd_bwd_ms']:.1f}" if "error" not in r else r["error"],
                                  f"{r['steps_per_s']:,.0f}" if "error" not in r else "-",
                                  f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"] for r in replay])]
    if not env["gpu"]:
        text += ["", "A CPU figure: it shows that the graph-ready step costs nothing there. The speed-up that "
                 "matters is the GPU one: **not measured yet** (`python benchmarks/bench_rl_collect.py --replay` "
                 "on the H200 writes it here)."]
    return "\n".join(text)


def _mamba_over_gru(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per policy size: the Mamba policy's best collection rate over the GRU's best (any path each)."""
    best: dict[tuple[str, str], float] = {}
    for r in rows:
        rate = max(v for k, v in r.items() if k.endswith("_steps_per_s") and k != "eager_steps_per_s")
        best[(r["size"], r["controller"])] = rate
    return {size: best[(size, "mamba")] / best[(size, "gru")] for size in dict.fromkeys(s for s, _ in best)
            if (size, "mamba") in best and (size, "gru") in best}


if __name__ == "__main__":
    raise SystemExit(main())
