"""Mamba-3 (SISO) layer: continue a stream from a state in one chunk vs upstream's step() loop; prefill from zero.

GPU run (issue 17, item 6): one upstream ``Mamba3`` layer (d_model 1536, d_state 128, headdim 64, expand 2: 48
heads; bf16), batch 1 and 8:

* continue N = 2048 tokens from a state (left by a 512-token prefill): ours = ``StatefulMamba3`` forward from the
  state in one call (upstream's ``mamba3_siso_combined`` with ``Input_States``); upstream = ``Mamba3.step`` once per
  token (its CuTe-DSL step kernel; where that is not importable, our ``step()`` stands in and the table says so).
  The step loop costs the same per token, so it is timed over ``--step-tokens`` tokens and scaled to N;
* prefill N in {2048, 8192} from zero: ours vs upstream's ``Mamba3.forward``.

Targets: continue / step loop <= 1/100; our prefill / upstream's forward <= 1.05. Writes
``benchmarks/results/bench_mamba3.json`` and the "Mamba-3 layer" section of ``docs/benchmarks.md``.

``--smoke`` runs a tiny layer of ours on the CPU (no upstream columns; our ``step()`` loop is the baseline) and
writes nothing unless ``--write`` is given.

Compile cost: upstream's Triton kernels autotune (27 configurations each) once per autotune key, which holds the
head sizes, the chunk size, which optional inputs are present and the tensor dtypes, not the batch or the length.
This run needs three keys: ``mamba3_siso_fwd`` with states (every forward of ours), without (upstream's forward) and
``mamba3_siso_step`` (our step, when upstream's CuTe step is missing), plus upstream's CuTe step. One warm-up pass
over every path, before anything is timed, pays for all of them (its time is printed). Lengths must be multiples
of 16 (Triton specialises integer arguments on divisibility by 16: other lengths compile new variants); batch 1
and batch 8 differ only in that specialisation. ``--cache-autotuning`` sets ``TRITON_CACHE_AUTOTUNING=1`` so that
a later run reuses the autotune results from disk; ``tests/test_mamba3_gpu.py`` shares this run's keys (same head
sizes and chunk), so run it after this script, both with the variable set, and it autotunes only what it adds.

Progress: every step prints a line with the UTC time and the seconds since the start (each warm-up path timed on
its own), and the JSON (``"complete": false`` until the last row) and the doc section are rewritten after every
row, so a run stopped by a time limit keeps what it measured. The commit comes from ``git`` where the tree is a
checkout, else from ``$MAMBA_STATE_COMMIT``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    environment, environment_line, interleaved_median_times, markdown_table, median_time, replace_section,
    write_json,
)

from mamba_state import StatefulMamba3  # noqa: E402

SECTION = "Mamba-3 layer"


def _layers(smoke: bool, device: torch.device, dtype: torch.dtype):
    """(upstream Mamba3 or None, ours on the same weights, why upstream is missing)."""
    cfg = dict(d_model=64, d_state=16, headdim=16) if smoke else dict(d_model=1536, d_state=128, headdim=64)
    torch.manual_seed(0)
    if not smoke and device.type == "cuda":
        try:
            from mamba_ssm.modules.mamba3 import Mamba3

            up = Mamba3(**cfg, layer_idx=0, device=device, dtype=dtype).eval()
            return up, StatefulMamba3(up).eval(), cfg, ""
        except Exception as exc:  # upstream missing or failing: ours alone, and say why
            why = f"{type(exc).__name__}: {exc}"
    else:
        why = "smoke run on the CPU"
    ours = StatefulMamba3.from_config(**cfg, layer_idx=0, device=device, dtype=dtype).eval()
    return None, ours, cfg, why


def _commit() -> str:
    """The checkout's commit (``git rev-parse``), else ``$MAMBA_STATE_COMMIT`` (a device copy of the tree may have
    no ``.git``), else "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
            return out.stdout.strip() + (" (with local changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("MAMBA_STATE_COMMIT", "unknown")


class _Progress:
    """Timestamped progress lines (a killed run still shows how far it got and where the time went)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, what: str) -> None:
        now = time.strftime("%H:%M:%S", time.gmtime())
        print(f"[{now} UTC +{time.perf_counter() - self.t0:6.1f} s] {what}", flush=True)


HEADERS = ["batch", "N", "ours: continue (ms)", "step loop (ms)", "continue / step loop", "prefill tokens",
           "ours: prefill (ms)", "upstream forward (ms)", "ours / upstream prefill"]


def _write(args, cfg, dtype, up, why_not, raw, rows, planned: int, warmup_s: dict[str, float]) -> None:
    """JSON and doc section of the rows measured so far (called after every row: a timeout keeps them)."""
    env = {**environment(), "commit": _commit()}
    done = len(rows) == planned
    table = markdown_table(HEADERS, rows)
    note = "" if up is not None else f"\n\nUpstream columns not measured: {why_not}."
    partial = "" if done else f"\n\n**Partial run**: {len(rows)} of {planned} rows measured (the run stopped early)."
    baseline = raw[0]["step_baseline"] if raw else "n/a"
    body = (f"{environment_line(env)} Commit {env['commit']}.\n\nOne Mamba-3 SISO layer (d_model {cfg['d_model']}, "
            f"d_state {cfg['d_state']}, headdim {cfg['headdim']}, expand 2), {str(dtype).replace('torch.', '')}, "
            f"state from a 512-token prefill. Targets: continue / step loop <= 1/100; our prefill <= 1.05x "
            f"upstream's forward. Ours continues N tokens from the state in one call; the step loop ({baseline}) "
            f"is timed over {args.step_tokens} tokens and scaled to N. Both sides under `torch.no_grad()`; medians "
            f"of {args.repeats} rounds, the two prefills timed in turns. Raw numbers: "
            f"`benchmarks/results/bench_mamba3.json`.{note}{partial}\n\n{table}\n")
    write_json("bench_mamba3", {"config": cfg, "dtype": str(dtype), "complete": done, "rows_planned": planned,
                                "warmup_s": warmup_s, "results": raw}, env)
    replace_section(SECTION, body)


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny layer on the CPU, quick")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8; smoke 1,2)")
    p.add_argument("--tokens", type=int, default=None, help="continuation length N (default 2048; smoke 64)")
    p.add_argument("--prefill", default=None, help="comma-separated prefill lengths (default 2048,8192; smoke 64)")
    p.add_argument("--step-tokens", type=int, default=64, help="tokens over which the step loop is timed")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--write", action="store_true", help="with --smoke: still write the JSON and the doc section")
    p.add_argument("--warm-only", action="store_true",
                   help="stop after the warm-up pass (compiles and autotuning only; for benchmarks/triton_prewarm.py)")
    p.add_argument("--cache-autotuning", action="store_true",
                   help="set TRITON_CACHE_AUTOTUNING=1 (reuse upstream's autotune results of an earlier run)")
    args = p.parse_args(argv)
    if args.cache_autotuning:  # before upstream's Triton modules are imported (_layers imports them)
        os.environ["TRITON_CACHE_AUTOTUNING"] = "1"
    log = _Progress()

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    batches = [int(b) for b in (args.batches or ("1,2" if args.smoke else "1,8")).split(",")]
    N = args.tokens or (64 if args.smoke else 2048)
    prefills = [int(n) for n in (args.prefill or ("64" if args.smoke else "2048,8192")).split(",")]
    bad = [n for n in [N, *prefills, args.step_tokens] if n % 16 or n < 16]
    if bad:
        p.error(f"lengths must be multiples of 16 (no new kernel variants to compile), found {bad}")
    write = not args.smoke or args.write
    up, ours, cfg, why_not = _layers(args.smoke, device, dtype)
    d = cfg["d_model"]
    step_fn_ok = False
    if up is not None:
        from mamba_ssm.modules import mamba3 as up_mod

        step_fn_ok = up_mod.mamba3_step_fn is not None
    log(f"device {device}, layers built; upstream {'yes' if up is not None else 'no: ' + why_not}; "
        f"upstream CuTe step {'yes' if step_fn_ok else 'no'}; TRITON_CACHE_AUTOTUNING="
        f"{os.environ.get('TRITON_CACHE_AUTOTUNING', '')!r}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    # one pass over every kernel path before anything is timed: compiles and autotuning happen here, each timed
    warmup_s: dict[str, float] = {}

    def warm(name: str, fn) -> None:
        t = time.perf_counter()
        fn()
        sync()
        warmup_s[name] = warmup_s.get(name, 0.0) + time.perf_counter() - t
        log(f"warm-up {name}: {time.perf_counter() - t:.1f} s")

    for B in batches:
        xw = torch.randn(B, 64, d, device=device, dtype=dtype)
        t_first = time.perf_counter()
        sw = ours(xw)[1]  # the first forward of ours pays its kernel's compiles and autotuning
        sync()
        warmup_s[f"ours forward, batch {B}"] = time.perf_counter() - t_first
        log(f"warm-up ours forward (states in and out), batch {B}: {time.perf_counter() - t_first:.1f} s")
        if up is not None:
            warm(f"upstream forward, batch {B}", lambda: up(xw))
        if step_fn_ok:
            def up_step():
                cache = [t.clone() for t in sw.tensors.values()]
                cache[2], cache[3] = cache[2].to(dtype), cache[3].to(dtype)
                up.step(xw[:, 0], *cache)
            warm(f"upstream step (CuTe), batch {B}", up_step)
        else:  # our step() is the baseline
            warm(f"our step, batch {B}", lambda: ours.step(xw[:, 0], sw))
    if args.warm_only:
        log("warm-up done (--warm-only: nothing timed, nothing written)")
        return 0
    rows: list[list] = []
    raw: list[dict] = []
    planned = len(batches) * len(prefills)
    for B in batches:
        _, state = ours(torch.randn(B, 512, d, device=device, dtype=dtype))
        x = torch.randn(B, N, d, device=device, dtype=dtype)
        k = min(N, args.step_tokens)

        if step_fn_ok:
            def step_loop():
                cache = [t.clone() for t in (state.angle_dt_state, state.ssm_state, state.k_state, state.v_state)]
                cache[2], cache[3] = cache[2].to(dtype), cache[3].to(dtype)  # upstream's cache dtypes
                for t in range(k):
                    up.step(x[:, t], *cache)
            baseline = "upstream Mamba3.step loop"
        else:
            def step_loop():
                s = state
                for t in range(k):
                    _, s = ours.step(x[:, t], s)
            baseline = "our step() loop" + ("" if up is None else " (upstream's CuTe step kernel not importable)")
        t_step = median_time(step_loop, repeats=1) * N / k
        t_cont = interleaved_median_times({"cont": lambda: ours(x, state)}, repeats=args.repeats)["cont"]
        log(f"batch {B}: continue {N} tokens {t_cont * 1e3:.2f} ms, {baseline} {t_step * 1e3:.0f} ms "
            f"(ratio {t_cont / t_step:.5f})")
        scaled = " (per-token x N)" if k < N else ""
        row = dict(batch=B, tokens=N, ours_continue_s=t_cont, step_loop_s=t_step, step_loop_measured_tokens=k,
                   step_baseline=baseline)
        raw.append(row)
        for P in prefills:
            xp = torch.randn(B, P, d, device=device, dtype=dtype)
            fns = {"ours": lambda: ours(xp)}
            if up is not None:
                fns["up"] = lambda: up(xp)
            t = interleaved_median_times(fns, repeats=args.repeats)
            row[f"ours_prefill_{P}_s"] = t["ours"]
            row[f"upstream_prefill_{P}_s"] = t.get("up", float("nan"))
            rows.append([B, N, f"{t_cont * 1e3:.2f}", f"{t_step * 1e3:.0f}{scaled}", f"{t_cont / t_step:.5f}", P,
                         f"{t['ours'] * 1e3:.2f}", "n/a" if up is None else f"{t['up'] * 1e3:.2f}",
                         "n/a" if up is None else f"{t['ours'] / t['up']:.3f}"])
            log(" | ".join(map(str, rows[-1])))
            if write:
                _write(args, cfg, dtype, up, why_not, raw, rows, planned, warmup_s)
    print(markdown_table(HEADERS, rows))
    log("done" + (": benchmarks/results/bench_mamba3.json and docs/benchmarks.md written" if write else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
