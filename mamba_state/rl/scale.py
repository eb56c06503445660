"""The scaling sweep: both controllers across horizons and seeds, a results JSON and a plot.

Each run goes to ``out/<controller>_h<H>_s<seed>/`` (see :mod:`mamba_state.rl.train`); finished runs (with a
``summary.json``) are skipped when ``resume`` is set, so an interrupted sweep continues where it stopped.
``out/scale_results.json`` is rewritten after every run; ``out/scale.png`` plots success rate vs horizon and
training throughput (environment steps per second) vs horizon.

Under torchrun every run is data-parallel over all processes (:mod:`mamba_state.rl.ddp`); rank 0 alone logs and
writes the results and the plot.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

from .ddp import DistContext, broadcast_object, distributed
from .train import DEFAULTS, train

__all__ = ["run_scale", "plot_results"]


def _aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["controller"], r["horizon"]), []).append(r)
    rows = []
    for (ctrl, h), rs in sorted(groups.items()):
        succ = [r["eval_success_rate"] for r in rs]
        sps = [r["train_steps_per_s_median"] for r in rs if r["train_steps_per_s_median"] is not None]
        rows.append({"controller": ctrl, "horizon": h, "seeds": [r["seed"] for r in rs],
                     "success_mean": sum(succ) / len(succ), "success_min": min(succ), "success_max": max(succ),
                     "steps_per_s_mean": sum(sps) / len(sps) if sps else None})
    return rows


def plot_results(results: dict[str, Any], path: str | Path) -> Path:
    """Two panels: eval success rate vs horizon (seeds as dots, mean as line) and train steps/s vs horizon."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for ctrl in sorted({r["controller"] for r in results["runs"]}):
        rows = [a for a in results["aggregate"] if a["controller"] == ctrl]
        hs = [a["horizon"] for a in rows]
        line, = ax1.plot(hs, [a["success_mean"] for a in rows], marker="o", label=ctrl)
        pts = [r for r in results["runs"] if r["controller"] == ctrl]
        ax1.scatter([r["horizon"] for r in pts], [r["eval_success_rate"] for r in pts], color=line.get_color(),
                    alpha=0.4, s=14)
        ax2.plot(hs, [a["steps_per_s_mean"] or math.nan for a in rows], marker="o", label=ctrl)
    chance = results["runs"][0]["chance"] if results["runs"] else 0.5
    ax1.axhline(chance, color="grey", linestyle=":", label="chance")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("horizon (distractor steps)")
        ax.legend()
    ax1.set_ylabel("eval success rate")
    ax1.set_ylim(0, 1.02)
    ax2.set_ylabel("train env steps / s")
    ax2.set_yscale("log")
    fig.suptitle(f"DelayedRecall, {results['num_bits']} bit(s): Mamba vs GRU ({results['device']})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _try_plot(results: dict[str, Any], path: Path) -> bool:
    if importlib.util.find_spec("matplotlib") is None:  # optional dependency: the JSON is still written
        return False
    plot_results(results, path)
    return True


def run_scale(opts: dict[str, Any], horizons: Sequence[int], controllers: Sequence[str] = ("mamba", "gru"),
              seeds: Sequence[int] = (0, 1), log=print) -> dict[str, Any]:
    """Train every (horizon, controller, seed); returns and writes the results (JSON and plot) under ``out``."""
    o = {**DEFAULTS, **opts}
    with distributed(o["device"]) as ctx:
        if not ctx.is_main:
            log = lambda *a, **k: None  # noqa: E731
        return _sweep(o, horizons, controllers, seeds, log, ctx)


def _sweep(o: dict[str, Any], horizons: Sequence[int], controllers: Sequence[str], seeds: Sequence[int], log,
           ctx: DistContext) -> dict[str, Any]:
    main = ctx.is_main
    out = Path(o["out"])
    if main:
        out.mkdir(parents=True, exist_ok=True)
    results_path = out / "scale_results.json"
    plotted = False
    # Runs already in the results file (earlier invocations) are kept unless this sweep redoes them.
    earlier: dict[tuple, dict[str, Any]] = {}
    if results_path.exists():
        for r in json.loads(results_path.read_text()).get("runs", []):
            earlier[(r["controller"], r["horizon"], r["seed"])] = r
    runs: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    for h in horizons:
        for ctrl in controllers:
            for seed in seeds:
                run_dir = out / f"{ctrl}_h{h}_s{seed}"
                done = run_dir / "summary.json"
                if broadcast_object(bool(o["resume"] and done.exists()), ctx):  # rank 0 decides for all
                    summary = broadcast_object(json.loads(done.read_text()) if main else None, ctx)
                    log(f"skip {run_dir.name}: already finished")
                else:
                    summary = train({**o, "controller": ctrl, "horizon": int(h), "seed": int(seed),
                                     "out": str(run_dir)}, log=log)
                runs.append(summary)
                earlier.pop((ctrl, int(h), int(seed)), None)
                every = sorted(list(earlier.values()) + runs, key=lambda r: (r["horizon"], r["controller"], r["seed"]))
                results = {"task": "DelayedRecall", "num_bits": o["num_bits"], "device": runs[0]["device_name"],
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "options": {k: v for k, v in o.items() if k not in ("out",)},
                           "runs": every, "aggregate": _aggregate(every)}
                if main:
                    results_path.write_text(json.dumps(results, indent=2))
                    plotted = _try_plot(results, out / "scale.png")
    log(f"wrote {results_path}" + (f" and {out / 'scale.png'}" if plotted else " (no plot: matplotlib missing)"))
    return results
