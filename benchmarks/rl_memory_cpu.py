"""The Mamba memory initialisations at short horizons on a CPU (docs/rl.md, "Memory initialisations").

For each horizon and seed, one PPO run per variant (the recipe's small Mamba policy, 32 environments, 2
minibatches, lr 3e-3, rollouts of ``2 * (H + 2)`` steps, ``--updates`` updates, the reference scan, one thread):
the first update whose 10-update training success window reaches 0.9, greedy success on 256 fresh episodes at
the training horizon, and greedy success at ``4 * H`` (open loop, the trained policy without further training).

    python benchmarks/rl_memory_cpu.py --horizons 16 32 --seeds 0 1 --out /tmp/rl_memory_cpu

Prints a markdown table and writes ``OUT/results.json``; ``--doc docs/rl.md`` replaces the block between
``<!-- rl-memory-cpu:start -->`` and ``<!-- rl-memory-cpu:end -->``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

VARIANTS = {
    "upstream": {},
    "chrono": {"dt_bias_init": "chrono"},
    "memory-A": {"a_init": "memory"},
    "chrono + memory-A": {"dt_bias_init": "chrono", "a_init": "memory"},
    "dt 1e-5..1e-2": {"dt_min": 1e-5, "dt_max": 1e-2, "dt_init_floor": 1e-6},
}
FLAGS = {"upstream": "", "chrono": "--dt-bias-init chrono", "memory-A": "--a-init memory",
         "chrono + memory-A": "--dt-bias-init chrono --a-init memory",
         "dt 1e-5..1e-2": "--dt-min 1e-5 --dt-max 1e-2 --dt-init-floor 1e-6"}


def run_one(name: str, horizon: int, seed: int, updates: int, out: Path) -> dict:
    from mamba_state.rl.train import train

    d = out / f"{name.replace(' ', '').replace('+', '_')}_h{horizon}_s{seed}"
    t0 = time.time()
    s = train({"controller": "mamba", "horizon": horizon, "num_envs": 32, "minibatches": 2,
               "total_updates": updates, "seed": seed, "device": "cpu", "progress": False, "out": str(d),
               "checkpoint_every": 0, "eval_envs": 256, "eval_horizons": [4 * horizon], "backend": "reference",
               "threads": 1, **VARIANTS[name]}, log=lambda *a, **k: None)
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    learned = next((m["update"] for m in lines if (m["window_success_rate"] or 0) >= 0.9), None)
    return {"variant": name, "horizon": horizon, "seed": seed, "updates": s["updates"], "learned_at": learned,
            "eval": s["eval_success_rate"], "eval_4h": s["eval_at_horizons"][str(4 * horizon)]["success_rate"],
            "seconds": time.time() - t0}


def markdown(rows: list[dict]) -> str:
    lines = ["| horizon | seed | variant | flags | learned at (update) | greedy at H | greedy at 4H |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        flags = f"`{FLAGS[r['variant']]}`" if FLAGS[r["variant"]] else "(none)"
        lines.append(f"| {r['horizon']} | {r['seed']} | {r['variant']} | {flags} | "
                     f"{r['learned_at'] if r['learned_at'] is not None else 'never'} | {r['eval']:.3f} | "
                     f"{r['eval_4h']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--horizons", type=int, nargs="+", default=[16, 32])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--updates", type=int, default=120)
    p.add_argument("--out", default="/tmp/rl_memory_cpu")
    p.add_argument("--doc", default=None)
    p.add_argument("--from-json", default=None, help="no runs: the table of an earlier results.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
    else:
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for h in args.horizons:
            for seed in args.seeds:
                for name in args.variants:
                    rows.append(run_one(name, h, seed, args.updates, out))
                    print(json.dumps(rows[-1]), flush=True)
                    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    md = markdown(rows)
    print(md)
    if args.doc:
        from mamba_state.rl.scale import update_markdown_section

        update_markdown_section(args.doc, "rl-memory-cpu", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
