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

__all__ = ["run_scale", "plot_results", "results_markdown", "update_markdown_section"]


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


def _transfer(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (controller, training horizon, evaluation horizon): the seeds' greedy success at that horizon."""
    groups: dict[tuple[str, int, int], list[float]] = {}
    for r in runs:
        for h, ev in (r.get("eval_at_horizons") or {}).items():
            groups.setdefault((r["controller"], r["horizon"], int(h)), []).append(ev["success_rate"])
    return [{"controller": c, "train_horizon": ht, "eval_horizon": he, "success": v,
             "success_mean": sum(v) / len(v)} for (c, ht, he), v in sorted(groups.items())]


def plot_results(results: dict[str, Any], path: str | Path) -> Path:
    """Two panels: eval success rate vs horizon (seeds as dots, mean as line) and train steps/s vs horizon."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    transfer = results.get("transfer") or []
    fig, axes = plt.subplots(1, 3 if transfer else 2, figsize=(15 if transfer else 10, 4))
    ax1, ax2 = axes[0], axes[1]
    if transfer:  # greedy success at longer horizons of the policies trained at each training horizon
        ax3 = axes[2]
        for key in sorted({(t["controller"], t["train_horizon"]) for t in transfer}):
            rows = [t for t in transfer if (t["controller"], t["train_horizon"]) == key]
            line, = ax3.plot([t["eval_horizon"] for t in rows], [t["success_mean"] for t in rows], marker="o",
                             label=f"{key[0]} (trained at H={key[1]})")
            for t in rows:
                ax3.scatter([t["eval_horizon"]] * len(t["success"]), t["success"], color=line.get_color(),
                            alpha=0.4, s=14)
        ax3.set_xscale("log")
        ax3.set_xlabel("evaluation horizon")
        ax3.set_ylabel("greedy success (transfer)")
        ax3.set_ylim(0, 1.02)
        ax3.axhline(results["runs"][0]["chance"], color="grey", linestyle=":")
        ax3.legend(fontsize=8)
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
    horizons = [a["horizon"] for a in results["aggregate"]]
    for ax in (ax1, ax2):
        if horizons and min(horizons) > 0:  # a log axis cannot show horizon 0
            ax.set_xscale("log")
        ax.set_xlabel("horizon (distractor steps)")
        ax.legend()
    ax1.set_ylabel("eval success rate")
    ax1.set_ylim(0, 1.02)
    ax2.set_ylabel("train env steps / s")
    rates = [a["steps_per_s_mean"] for a in results["aggregate"]]
    if any(r is not None and math.isfinite(r) and r > 0 for r in rates):  # nothing to show on a log axis otherwise
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
                           "runs": every, "aggregate": _aggregate(every), "transfer": _transfer(every)}
                if main:
                    results_path.write_text(json.dumps(results, indent=2))
                    plotted = _try_plot(results, out / "scale.png")
    log(f"wrote {results_path}" + (f" and {out / 'scale.png'}" if plotted else " (no plot: matplotlib missing)"))
    return results


def results_markdown(results: dict[str, Any]) -> str:
    """Markdown tables of a sweep: one row per run (training horizon, seed, updates, env steps, success at the
    training horizon, steps/s, seconds) and, if any run has ``eval_at_horizons``, greedy success at each
    evaluation horizon per (controller, training horizon) with every seed's value."""
    def f(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    lines = [f"Device: {results.get('device', '?')}; {results.get('date', '')}; {results.get('num_bits')} bit(s), "
             f"chance {results['runs'][0]['chance'] if results.get('runs') else '?'}.", "",
             "| controller | train horizon | seed | updates | env steps | eval success (train horizon) "
             "| train env steps/s (median) | train s | stopped by time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(results.get("runs", []), key=lambda r: (r["horizon"], r["controller"], r["seed"])):
        lines.append(f"| {r['controller']} | {r['horizon']} | {r['seed']} | {r['updates']} | {r['env_steps']:,} | "
                     f"{f(r['eval_success_rate'], '.3f')} | {f(r['train_steps_per_s_median'], ',.0f')} | "
                     f"{f(r.get('train_seconds_this_session'), '.0f')} | {'yes' if r.get('stopped_early') else 'no'} |")
    transfer = results.get("transfer") or []
    if transfer:
        hs = sorted({t["eval_horizon"] for t in transfer})
        lines += ["", "Greedy success at longer horizons (the trained policy, no further training; mean over "
                  "seeds, then each seed):", "",
                  "| controller | trained at | " + " | ".join(f"H = {h}" for h in hs) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in hs) + " |"]
        for key in sorted({(t["controller"], t["train_horizon"]) for t in transfer}):
            cells = []
            for h in hs:
                t = next((t for t in transfer if (t["controller"], t["train_horizon"], t["eval_horizon"])
                          == (*key, h)), None)
                cells.append("-" if t is None else f"{t['success_mean']:.3f} ("
                             + ", ".join(f"{v:.3f}" for v in t["success"]) + ")")
            lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def update_markdown_section(path: str | Path, marker: str, body: str) -> None:
    """Replace the text between ``<!-- marker:start -->`` and ``<!-- marker:end -->`` in ``path`` with
    ``body`` (appends the marked section at the end when the markers are missing)."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    path.write_text(text)
