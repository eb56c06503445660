"""A horizon curriculum against training from scratch, at a short horizon on a CPU (docs/rl.md, "Curriculum").

For each controller and seed, at the same total number of PPO updates: one run from scratch at ``--horizon``
(``2 * --stage-updates`` updates) against a curriculum of ``--stage-updates`` updates at ``--first-horizon``,
then ``--stage-updates`` at ``--horizon`` starting from that policy (``--init-from``: the parameters only; a
fresh optimizer, environments and counters). The recipe's small policies, 32 environments, 2 minibatches,
lr 3e-3, the reference scan, one thread. Reports greedy success on 256 fresh episodes at ``--horizon`` and the
first update (counted from the run's start at that horizon) at which the 10-update training success window
reached 0.9. A CPU check of the idea before the GPU campaign (``rl_long_horizon.py --curriculum``) uses it.

    python benchmarks/rl_curriculum_cpu.py --out /tmp/rl_curriculum_cpu --doc docs/rl.md

Writes ``OUT/results.json`` (``--json`` copies it elsewhere too) and prints a markdown table; ``--doc`` replaces
the block between ``<!-- rl-curriculum-cpu:start -->`` and ``<!-- rl-curriculum-cpu:end -->``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def _run(controller: str, horizon: int, seed: int, updates: int, out: Path, init_from: Path | None = None
         ) -> dict[str, Any]:
    from mamba_state.rl.train import train

    t0 = time.time()
    s = train({"controller": controller, "horizon": horizon, "num_envs": 32, "minibatches": 2,
               "total_updates": updates, "seed": seed, "device": "cpu", "progress": False, "out": str(out),
               "checkpoint_every": updates, "eval_envs": 256, "backend": "reference", "threads": 1,
               "init_from": str(init_from) if init_from else None}, log=lambda *a, **k: None)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    learned = next((m["update"] for m in lines if (m["window_success_rate"] or 0) >= 0.9), None)
    return {"updates": s["updates"], "eval": s["eval_success_rate"], "learned_at": learned,
            "seconds": round(time.time() - t0, 1)}


def compare(controller: str, seed: int, args, out: Path) -> dict[str, Any]:
    """From scratch at the horizon against the two-stage curriculum, same total updates."""
    n = args.stage_updates
    scratch = _run(controller, args.horizon, seed, 2 * n, out / f"{controller}_scratch_s{seed}")
    first = _run(controller, args.first_horizon, seed, n, out / f"{controller}_stage1_s{seed}")
    second = _run(controller, args.horizon, seed, n, out / f"{controller}_stage2_s{seed}",
                  init_from=out / f"{controller}_stage1_s{seed}")
    return {"controller": controller, "seed": seed, "horizon": args.horizon, "first_horizon": args.first_horizon,
            "stage_updates": n, "scratch": scratch, "stage1": first, "stage2": second}


def markdown(rows: list[dict[str, Any]]) -> str:
    f = lambda x: "never" if x is None else str(x)  # noqa: E731
    lines = ["| controller | seed | from scratch at H: greedy (0.9 at update) | curriculum, stage 1 at H0: greedy "
             "| curriculum, stage 2 at H: greedy (0.9 at update) |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        sc, s1, s2 = r["scratch"], r["stage1"], r["stage2"]
        lines.append(f"| {r['controller']} | {r['seed']} | {sc['eval']:.3f} ({f(sc['learned_at'])} of "
                     f"{sc['updates']}) | {s1['eval']:.3f} | {s2['eval']:.3f} ({f(s2['learned_at'])} of "
                     f"{s2['updates']}) |")
    r0 = rows[0] if rows else {"horizon": "?", "first_horizon": "?", "stage_updates": "?"}
    lines += ["", f"H = {r0['horizon']}, H0 = {r0['first_horizon']}; {r0['stage_updates']} updates a stage, "
              f"twice that from scratch; greedy success on 256 fresh episodes at the run's horizon (chance 0.5)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--controllers", nargs="+", default=["gru", "mamba"], choices=["gru", "mamba"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--horizon", type=int, default=128)
    p.add_argument("--first-horizon", type=int, default=32)
    p.add_argument("--stage-updates", type=int, default=40)
    p.add_argument("--out", default="/tmp/rl_curriculum_cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--doc", default=None)
    p.add_argument("--from-json", default=None, help="no runs: the table of an earlier results.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())["rows"]
    else:
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for controller in args.controllers:
            for seed in args.seeds:
                rows.append(compare(controller, seed, args, out))
                print(json.dumps(rows[-1]), flush=True)
        import torch

        payload = {"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                   "device": "cpu", "rows": rows}
        for path in [out / "results.json"] + ([Path(args.json)] if args.json else []):
            path.write_text(json.dumps(payload, indent=2) + "\n")
    md = markdown(rows)
    print(md)
    if args.doc:
        from mamba_state.rl.scale import update_markdown_section

        update_markdown_section(args.doc, "rl-curriculum-cpu", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
