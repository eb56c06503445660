"""Long-horizon memory RL (issue 20): train AT horizons 1,000 / 5,000 / 20,000, 1 and 4 bits, several seeds,
Mamba (upstream initialisation and a long-memory initialisation) vs GRU, across device calls of at most 600 s.

Every run is one ``mamba-state rl`` process with ``--resume`` and ``--max-seconds``: a call trains the next
unfinished runs until its ``--budget`` is nearly spent, each run stops after the first update past its share and
writes its checkpoint, and the next call (with the same ``--out``) continues every run exactly where it stopped.
A run is finished when its cumulative training time (collection + updates, all calls) reaches its horizon's
``--run-seconds`` or it reaches ``--total-updates``; then its checkpoint is deleted (``--keep-checkpoints``
keeps it), so the folder stays small enough to carry between calls.

    python benchmarks/rl_long_horizon.py run --out DIR --budget 540            # one device call; repeat it
    python benchmarks/rl_long_horizon.py run --out DIR --budget 540 --gpus 4   # 4 runs at once, one per GPU
    python benchmarks/rl_long_horizon.py run --out DIR --budget 540 --per-gpu 4  # 4 runs at once on one GPU
    python benchmarks/rl_long_horizon.py status --out DIR                      # what is done, what is left
    python benchmarks/rl_long_horizon.py report --out DIR --doc docs/rl.md --img docs/img
    python benchmarks/rl_long_horizon.py run --out /tmp/x --smoke --budget 60  # CPU dry run of the pipeline

A device call returns only a few files, so ``--pack TGZ`` writes the whole folder as one archive at the end and
``--unpack TGZ`` extracts it (when it exists) before the next call::

    python benchmarks/rl_long_horizon.py run --out out/rl_long --unpack out/rl_long.tgz --pack "$OUT/rl_long.tgz"

``DIR/plan.json`` fixes the plan at the first call (later calls read it, so the run identities stay the same);
``DIR/driver.jsonl`` logs every invocation of every run. ``report`` turns the finished and unfinished runs into
the markdown table of docs/rl.md (between ``<!-- rl-long-horizon:start -->`` and ``<!-- rl-long-horizon:end -->``)
and plots (success vs training time per horizon and bits; final success vs horizon). Every planned run gets a
row that says whether it finished, is in progress or did not run; nothing is estimated.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# The long-memory initialisation (docs/rl.md, "Memory parametrisations"): the best of the CPU tests at short
# horizons, carried to the GPU as one variant. Change it with --memory-args.
MEMORY_ARGS = ["--a-init", "memory", "--memory-fraction", "0.5", "--memory-retention", "0.999", "0.99999"]
VARIANTS = {"mamba": ("mamba", []), "mamba-memory": ("mamba", MEMORY_ARGS), "gru": ("gru", [])}

COMMON = ["--num-envs", "512", "--minibatches", "4", "--lr", "3e-3", "--noise-std", "0.1", "--d-model", "32",
          "--n-layer", "1", "--gru-hidden", "32", "--checkpoint-every", "5", "--eval-envs", "256",
          "--eval-mode", "open-loop", "--no-progress"]
SMOKE = ["--num-envs", "8", "--minibatches", "2", "--d-model", "16", "--n-layer", "1", "--gru-hidden", "16",
         "--checkpoint-every", "2", "--eval-envs", "16", "--eval-mode", "open-loop", "--no-progress",
         "--threads", "1", "--backend", "reference"]


def run_name(variant: str, horizon: int, bits: int, seed: int) -> str:
    return f"{variant}_h{horizon}_b{bits}_s{seed}"


def make_plan(args) -> dict[str, Any]:
    seconds = dict(_pairs(args.run_seconds))
    updates = dict(_pairs(args.total_updates))
    memory = args.memory_args.split() if args.memory_args is not None else MEMORY_ARGS
    runs = []
    # a curriculum trains each horizon from the policy of the next shorter one (same variant, bits and seed):
    # ascending horizons, so every run comes after the run it starts from
    horizons = sorted(args.horizons) if args.curriculum else args.horizons
    for seed in args.seeds:
        for i, h in enumerate(horizons):
            for bits in args.bits:
                for variant in args.variants:
                    ctrl, extra = VARIANTS[variant]
                    if variant == "mamba-memory":
                        extra = memory
                    runs.append({"name": run_name(variant, h, bits, seed), "variant": variant, "controller": ctrl,
                                 "horizon": h, "bits": bits, "seed": seed,
                                 "run_seconds": float(seconds.get(h, seconds.get(0, 600.0))),
                                 "total_updates": int(updates.get(h, updates.get(0, 100000))), "extra": extra,
                                 "init_from": (run_name(variant, horizons[i - 1], bits, seed)
                                               if args.curriculum and i > 0 else None)})
    common = SMOKE if args.smoke else COMMON
    return {"created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": args.device,
            "common": common + list(args.extra or []), "curriculum": bool(args.curriculum), "runs": runs}


def _pairs(items: list[str]) -> list[tuple[int, float]]:
    """``["1000=300", "600"]`` -> ``[(1000, 300.0), (0, 600.0)]`` (0: every other horizon)."""
    out = []
    for it in items:
        h, _, v = it.partition("=")
        out.append((int(h), float(v)) if v else (0, float(h)))
    return out


def run_state(out: Path, run: dict[str, Any]) -> dict[str, Any]:
    """What is on disk for ``run``: updates, cumulative training seconds, finished or not, the last summary."""
    d = out / run["name"]
    metrics = _metrics(d)
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else None
    updates = metrics[-1]["update"] if metrics else 0
    seconds = metrics[-1].get("train_seconds", 0.0) if metrics else 0.0
    finished = (d / "FINISHED").exists()
    return {"updates": updates, "train_seconds": seconds, "finished": finished, "summary": summary,
            "metrics": metrics, "started": d.exists()}


def _metrics(d: Path) -> list[dict[str, Any]]:
    path = d / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def command(plan: dict[str, Any], run: dict[str, Any], out: Path, max_seconds: float) -> list[str]:
    return [sys.executable, "-m", "mamba_state.cli", "rl", "--controller", run["controller"],
            "--horizon", str(run["horizon"]), "--num-bits", str(run["bits"]), "--seed", str(run["seed"]),
            "--total-updates", str(run["total_updates"]), "--device", plan["device"], *plan["common"],
            *run["extra"], "--max-seconds", f"{max_seconds:.0f}", "--resume", "--out", str(out / run["name"]),
            *(["--init-from", str(out / run["init_from"] / POLICY_FILE)] if run.get("init_from") else [])]


def _finish_if_done(out: Path, run: dict[str, Any], keep: bool, needed: frozenset[str] = frozenset()) -> bool:
    """Mark ``run`` finished when it reached its seconds or updates, and drop its checkpoint (unless ``keep``);
    a run in ``needed`` (another run starts from it) first keeps its policy's parameters as ``POLICY_FILE``."""
    st = run_state(out, run)
    if st["finished"]:
        return True
    if st["summary"] is not None and (st["updates"] >= run["total_updates"]
                                      or st["train_seconds"] >= run["run_seconds"]):
        d = out / run["name"]
        (d / "FINISHED").write_text(json.dumps({"updates": st["updates"], "train_seconds": st["train_seconds"],
                                                "reason": "updates" if st["updates"] >= run["total_updates"]
                                                else "run seconds"}) + "\n")
        if run["name"] in needed and (d / "checkpoint.pt").exists():
            _keep_policy(d / "checkpoint.pt", d / POLICY_FILE)
        if not keep and (d / "checkpoint.pt").exists():
            (d / "checkpoint.pt").unlink()
        return True
    return False


POLICY_FILE = "policy.pt"  # a finished run's policy parameters, for the runs of a curriculum that start from it


def _keep_policy(checkpoint: Path, dest: Path) -> None:
    """The policy's parameters of a PPO checkpoint as a checkpoint of their own (what ``--init-from`` reads;
    a small fraction of the full checkpoint, which also holds the optimizer, environments and generators)."""
    from mamba_state.rl.checkpoint import load_checkpoint, save_checkpoint

    payload = load_checkpoint(checkpoint)
    save_checkpoint(dest, {"policy": payload["trainer"]["policy"]}, payload.get("run"))


def unpack(archive: Path, out: Path) -> None:
    """Extract ``archive`` (written by :func:`pack`) so that its folder becomes ``out``."""
    import tarfile

    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        if any(n.startswith(("/", "..")) or "/../" in n for n in names):
            raise SystemExit(f"{archive}: refusing an archive with absolute or parent paths")
        try:
            tar.extractall(out.parent, filter="data")
        except TypeError:  # Python without extraction filters (the names were checked above)
            tar.extractall(out.parent)
    root = {n.split("/", 1)[0] for n in names}
    if root != {out.name}:
        raise SystemExit(f"{archive}: expected one folder {out.name!r}, found {sorted(root)}")


def pack(out: Path, archive: Path) -> None:
    """``out`` as one gzipped tar (device calls return a few files only), written atomically."""
    import tarfile

    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname=out.name)
    tmp.replace(archive)


def cmd_run(args) -> int:
    out = Path(args.out)
    if args.unpack and Path(args.unpack).exists():
        if out.exists():  # a warm machine kept the folder: it is at least as new as the archive packed from it
            print(f"--unpack: {out} exists already; continuing it (not unpacking {args.unpack})", flush=True)
        else:
            unpack(Path(args.unpack), out)
            print(f"unpacked {args.unpack} into {out}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
    else:
        plan = make_plan(args)
        plan_path.write_text(json.dumps(plan, indent=2) + "\n")
    deadline = time.monotonic() + args.budget
    # a slot is (GPU or None, k): --per-gpu runs share each GPU (the policies are small and collection is
    # launch-bound, so one run leaves most of the GPU idle)
    slots = [(g, k) for g in (range(args.gpus) if args.gpus > 0 else [None]) for k in range(args.per_gpu)]
    running: dict[Any, tuple[subprocess.Popen, dict[str, Any], float, Any]] = {}
    log = (out / "driver.jsonl").open("a")
    needed = frozenset(r["init_from"] for r in plan["runs"] if r.get("init_from"))
    todo = [r for r in plan["runs"] if not _finish_if_done(out, r, args.keep_checkpoints, needed)]
    print(f"{len(plan['runs']) - len(todo)} of {len(plan['runs'])} runs finished; {len(todo)} to go", flush=True)
    if args.only:  # the runs this call may train, in the plan's order (the others wait for a later call)
        todo = [r for r in todo if any(fnmatch.fnmatchcase(r["name"], pat) for pat in args.only)]
        print(f"--only: {len(todo)} of them in this call: {', '.join(r['name'] for r in todo) or 'none'}",
              flush=True)
    while todo or running:
        for slot in [s for s in slots if s not in running]:
            left = deadline - time.monotonic()
            if not todo or left < args.min_slot:
                break
            # the first run whose curriculum predecessor (if any) has finished; the others wait
            ready = [r for r in todo if not r.get("init_from") or (out / r["init_from"] / "FINISHED").exists()]
            if not ready:
                break
            run = ready[0]
            todo.remove(run)
            st = run_state(out, run)
            # the run's remaining share, and what this call can still give it after startup, capture and the
            # final evaluation (--reserve) and one update past the limit (the last update's duration)
            m = st["metrics"]
            last_update_s = (m[-1]["train_seconds"] - (m[-2]["train_seconds"] if len(m) > 1 else 0.0)) if m else 0.0
            share = max(5.0, min(run["run_seconds"] - st["train_seconds"], left - args.reserve - last_update_s))
            env = dict(os.environ)
            if slot[0] is not None:
                env["CUDA_VISIBLE_DEVICES"] = str(slot[0])
            at_once = sum(1 for s in running if s[0] == slot[0]) + 1
            cmd = command(plan, run, out, share)
            (out / run["name"]).mkdir(parents=True, exist_ok=True)
            logf = (out / run["name"] / "stdout.log").open("a")
            print(f"[{time.strftime('%H:%M:%S')}] start {run['name']} (gpu {slot[0]}, {at_once} on it, "
                  f"{share:.0f} s, at update {st['updates']}, {st['train_seconds']:.0f} of "
                  f"{run['run_seconds']:.0f} s)", flush=True)
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running[slot] = (proc, run, time.monotonic(), logf, at_once)
        if not running:
            break
        time.sleep(0.5)
        for slot in running:  # the most runs seen on each run's GPU while it ran
            proc, run, t0, logf, at_once = running[slot]
            running[slot] = (proc, run, t0, logf, max(at_once, sum(1 for s in running if s[0] == slot[0])))
        for slot, (proc, run, t0, logf, at_once) in list(running.items()):
            if proc.poll() is None:
                if time.monotonic() > deadline + args.grace:  # a run that overshoots the call: stop it
                    proc.terminate()
                continue
            logf.close()
            del running[slot]
            st = run_state(out, run)
            done = _finish_if_done(out, run, args.keep_checkpoints, needed)
            entry = {"run": run["name"], "rc": proc.returncode, "seconds": time.monotonic() - t0,
                     "updates": st["updates"], "train_seconds": st["train_seconds"], "finished": done,
                     "runs_on_gpu": at_once,
                     "ended": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
            log.write(json.dumps(entry) + "\n")
            log.flush()
            print(f"[{time.strftime('%H:%M:%S')}] end   {run['name']} rc={proc.returncode} updates={st['updates']} "
                  f"train_s={st['train_seconds']:.0f}" + (" finished" if done else ""), flush=True)
            if proc.returncode != 0:
                print(f"  (see {out / run['name'] / 'stdout.log'})", flush=True)
            elif not done:
                todo.append(run)  # continue it later in this call if time allows, else in the next call
    log.close()
    left = [r["name"] for r in plan["runs"] if not run_state(out, r)["finished"]]
    print(f"{len(plan['runs']) - len(left)} of {len(plan['runs'])} runs finished"
          + (f"; next call continues {left[0]} ..." if left else "; all done"), flush=True)
    if args.pack:
        pack(out, Path(args.pack))
        print(f"packed {out} into {args.pack} ({Path(args.pack).stat().st_size / 2 ** 20:.1f} MiB)", flush=True)
    return 0


def rows(out: Path) -> list[dict[str, Any]]:
    plan = json.loads((out / "plan.json").read_text())
    sharing: dict[str, int] = {}  # most runs seen on a run's GPU while it ran, over its calls (driver log)
    if (out / "driver.jsonl").exists():
        for line in (out / "driver.jsonl").read_text().splitlines():
            e = json.loads(line)
            sharing[e["run"]] = max(sharing.get(e["run"], 1), int(e.get("runs_on_gpu", 1)))
    table = []
    for run in plan["runs"]:
        st = run_state(out, run)
        m = st["metrics"]
        s = st["summary"] or {}
        reached = next((x for x in m if (x.get("window_success_rate") or 0) >= 0.8), None)
        sps = sorted(x["steps_per_s"] for x in m) if m else []
        csps = sorted(x["collect_steps_per_s"] for x in m) if m else []
        status = "finished" if st["finished"] else ("in progress" if m else "not run")
        table.append({**{k: run[k] for k in ("name", "variant", "horizon", "bits", "seed")}, "status": status,
                      "updates": st["updates"], "env_steps": m[-1]["env_steps"] if m else 0,
                      "train_seconds": st["train_seconds"],
                      "eval_success": s.get("eval_success_rate") if m else None,
                      "eval_after_update": s.get("updates"),
                      "train_success_last": m[-1].get("window_success_rate") if m else None,
                      "steps_per_s": sps[len(sps) // 2] if sps else None,
                      "collect_steps_per_s": csps[len(csps) // 2] if csps else None,
                      "seconds_to_80": reached.get("train_seconds") if reached else None,
                      "updates_to_80": reached["update"] if reached else None,
                      "device": s.get("device_name"), "chance": 1 / 2 ** run["bits"],
                      "runs_on_gpu": sharing.get(run["name"], 1),
                      "curve": [(x.get("train_seconds"), x.get("window_success_rate")) for x in m]})
    return table


def markdown(out: Path, table: list[dict[str, Any]]) -> str:
    plan = json.loads((out / "plan.json").read_text())
    f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    devices = sorted({r["device"] for r in table if r["device"]})
    done = sum(r["status"] == "finished" for r in table)
    prog = sum(r["status"] == "in progress" for r in table)
    lines = [f"Produced by `benchmarks/rl_long_horizon.py report` from `{out.name}` (plan of "
             f"{plan['created']}; device: {', '.join(devices) or 'none yet'}). {len(table)} runs planned: {done} "
             f"finished, {prog} in progress (trained so far, not to their budget), "
             f"{len(table) - done - prog} not run. Common options: `{' '.join(plan['common'])}`"
             + "".join(f"; `{v}` adds `{' '.join(extra)}`" for v, extra in
                       {r["variant"]: r["extra"] for r in plan["runs"] if r["extra"]}.items())
             + ("; a curriculum: each horizon's run starts from the policy of the same variant, bits and seed at the "
                "next shorter horizon" if plan.get("curriculum") else "") + ".",
             "", "*eval success*: greedy, on `--eval-envs` fresh episodes at the training horizon after the last "
             "update trained (open loop); *80% after*: cumulative training seconds (collection + updates) when "
             "the 10-update training success window first reached 0.8; *runs on GPU*: how many runs shared the "
             "GPU (`--per-gpu`; steps/s are per run, so they fall when runs share).", "",
             "| variant | horizon | bits | seed | status | updates | env steps | train s | eval success (chance) "
             "| last train success | env steps/s (train) | env steps/s (collect) | runs on GPU | 80% after |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(table, key=lambda r: (r["bits"], r["horizon"], r["variant"], r["seed"])):
        lines.append(
            f"| {r['variant']} | {r['horizon']:,} | {r['bits']} | {r['seed']} | {r['status']} | {r['updates']} | "
            f"{r['env_steps']:,} | {f(r['train_seconds'] if r['updates'] else None, '.0f')} | "
            f"{f(r['eval_success'], '.3f')} ({r['chance']:.4g}) | {f(r['train_success_last'], '.3f')} | "
            f"{f(r['steps_per_s'], ',.0f')} | {f(r['collect_steps_per_s'], ',.0f')} | "
            f"{r['runs_on_gpu'] if r['updates'] else '-'} | "
            + ("not reached" if r["updates"] and r["seconds_to_80"] is None
               else "-" if not r["updates"] else f"{r['seconds_to_80']:.0f} s (update {r['updates_to_80']})")
            + " |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict[str, Any]], img: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    panels = sorted({(r["bits"], r["horizon"]) for r in table})
    cols = max(1, len({h for _, h in panels}))
    nrows = max(1, len({b for b, _ in panels}))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.4 * nrows), squeeze=False)
    bits_list = sorted({b for b, _ in panels})
    hs = sorted({h for _, h in panels})
    colors = {"mamba": "tab:blue", "mamba-memory": "tab:green", "gru": "tab:orange"}
    for r in table:
        ax = axes[bits_list.index(r["bits"])][hs.index(r["horizon"])]
        pts = [(t, s) for t, s in r["curve"] if t is not None and s is not None]
        if pts:
            ax.plot([t for t, _ in pts], [s for _, s in pts], color=colors.get(r["variant"]), alpha=0.8,
                    linestyle="-" if r["seed"] == 0 else "--", label=f"{r['variant']} s{r['seed']}")
    for b in bits_list:
        for h in hs:
            ax = axes[bits_list.index(b)][hs.index(h)]
            ax.axhline(1 / 2 ** b, color="grey", linestyle=":")
            ax.axhline(0.8, color="grey", linestyle="-", linewidth=0.5)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"H = {h:,}, {b} bit(s)")
            ax.set_xlabel("training seconds")
            ax.set_ylabel("train success (10-update window)")
            if ax.lines[2:]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    curves = img / "rl_long_horizon_curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    fig, axes2 = plt.subplots(1, len(bits_list), figsize=(5 * len(bits_list), 3.6), squeeze=False)
    for i, b in enumerate(bits_list):
        ax = axes2[0][i]
        for v in colors:
            pts = [(r["horizon"], r["eval_success"]) for r in table
                   if r["variant"] == v and r["bits"] == b and r["eval_success"] is not None]
            if pts:
                ax.scatter([h for h, _ in pts], [s for _, s in pts], color=colors[v], label=v, alpha=0.8)
        ax.axhline(1 / 2 ** b, color="grey", linestyle=":", label="chance")
        ax.axhline(0.8, color="grey", linewidth=0.5)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("training horizon")
        ax.set_ylabel("greedy eval success")
        ax.set_title(f"{b} bit(s): trained at the horizon")
        ax.legend(fontsize=8)
    fig.tight_layout()
    success = img / "rl_long_horizon_success.png"
    fig.savefig(success, dpi=110)
    plt.close(fig)
    return [curves, success]


def cmd_report(args) -> int:
    out = Path(args.out)
    if args.unpack:
        unpack(Path(args.unpack), out)
    table = rows(out)
    md = markdown(out, table)
    if args.img:
        paths = plot(table, Path(args.img))
        for p in paths:
            print(f"wrote {p}")
        if args.doc:  # image links relative to the doc
            rel = [os.path.relpath(p, Path(args.doc).resolve().parent) for p in (q.resolve() for q in paths)]
            md += ("\n![Training success vs training seconds, per horizon and bits](" + rel[0] + ")\n\n"
                   "![Greedy success at the training horizon](" + rel[1] + ")\n")
    (out / "report.md").write_text(md)
    (out / "report.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "curve"} for r in table],
                                                indent=2) + "\n")
    print(md)
    if args.doc:
        sys.path.insert(0, str(ROOT))
        from mamba_state.rl.scale import update_markdown_section

        update_markdown_section(args.doc, "rl-long-horizon", md)
        print(f"updated {args.doc}")
    return 0


def cmd_status(args) -> int:
    out = Path(args.out)
    for r in rows(out):
        print(f"{r['name']:28s} {r['status']:12s} updates={r['updates']:5d} train_s={r['train_seconds']:7.0f} "
              f"success={r['train_success_last']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the next unfinished runs for --budget seconds (one device call)")
    r.add_argument("--out", required=True)
    r.add_argument("--budget", type=float, default=540, help="seconds this call may use (default 540)")
    r.add_argument("--gpus", type=int, default=1, help="GPUs to use (0: no CUDA_VISIBLE_DEVICES)")
    r.add_argument("--per-gpu", type=int, default=1, help="runs at once on each GPU (default 1)")
    r.add_argument("--horizons", type=int, nargs="+", default=[1000, 5000, 20000])
    r.add_argument("--bits", type=int, nargs="+", default=[1, 4])
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    r.add_argument("--variants", nargs="+", default=["mamba", "mamba-memory", "gru"], choices=list(VARIANTS))
    r.add_argument("--run-seconds", nargs="+", default=["1000=300", "5000=600", "20000=1200", "600"],
                   help="training seconds per run, per horizon (H=S; a bare S for other horizons)")
    r.add_argument("--total-updates", nargs="+", default=["100000"], help="update cap per run (H=U or U)")
    r.add_argument("--only", nargs="+", default=None, metavar="PATTERN",
                   help="train only the unfinished runs whose names match one of these shell patterns, e.g. "
                        "'gru_h20000_*' (the plan itself is unchanged)")
    r.add_argument("--curriculum", action="store_true",
                   help="plan: each horizon's run starts from the policy of the same variant, bits and seed at the "
                        "next shorter horizon (--init-from), after that run has finished")
    r.add_argument("--memory-args", default=None, help="the mamba-memory variant's options (one string)")
    r.add_argument("--device", default="cuda")
    r.add_argument("--extra", nargs=argparse.REMAINDER, help="more mamba-state rl options for every run")
    r.add_argument("--reserve", type=float, default=45, help="seconds kept per run start for startup and eval")
    r.add_argument("--min-slot", type=float, default=75, help="start no run with less than this left")
    r.add_argument("--grace", type=float, default=40, help="stop a run this long past the budget")
    r.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoints of finished runs")
    r.add_argument("--smoke", action="store_true", help="tiny CPU settings (for a dry run of the pipeline)")
    r.add_argument("--unpack", default=None, metavar="TGZ",
                   help="first extract this archive of an earlier call (if it exists) as --out")
    r.add_argument("--pack", default=None, metavar="TGZ", help="at the end, write --out as this one archive")
    rep = sub.add_parser("report", help="the markdown table (and plots) of the runs under --out")
    rep.add_argument("--out", required=True)
    rep.add_argument("--unpack", default=None, metavar="TGZ", help="first extract this archive as --out")
    rep.add_argument("--doc", default=None, help="update this markdown file's rl-long-horizon section")
    rep.add_argument("--img", default=None, help="write the plots into this folder")
    st = sub.add_parser("status", help="one line per planned run")
    st.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.cmd == "run" and args.smoke:
        args.device = "cpu" if args.device == "cuda" else args.device
        args.gpus = 0
    return {"run": cmd_run, "report": cmd_report, "status": cmd_status}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
