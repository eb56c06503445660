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
a later run reuses the autotune results from disk (they were tuned for this run's shapes: use it for repeated runs
of the same command only).
"""

from __future__ import annotations

import argparse
import os
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
    p.add_argument("--cache-autotuning", action="store_true",
                   help="set TRITON_CACHE_AUTOTUNING=1 (reuse upstream's autotune results of an earlier run)")
    args = p.parse_args(argv)
    if args.cache_autotuning:  # before upstream's Triton modules are imported (_layers imports them)
        os.environ["TRITON_CACHE_AUTOTUNING"] = "1"

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    batches = [int(b) for b in (args.batches or ("1,2" if args.smoke else "1,8")).split(",")]
    N = args.tokens or (64 if args.smoke else 2048)
    prefills = [int(n) for n in (args.prefill or ("64" if args.smoke else "2048,8192")).split(",")]
    bad = [n for n in [N, *prefills, args.step_tokens] if n % 16 or n < 16]
    if bad:
        p.error(f"lengths must be multiples of 16 (no new kernel variants to compile), found {bad}")
    up, ours, cfg, why_not = _layers(args.smoke, device, dtype)
    d = cfg["d_model"]
    step_fn_ok = False
    if up is not None:
        from mamba_ssm.modules import mamba3 as up_mod

        step_fn_ok = up_mod.mamba3_step_fn is not None
    # one pass over every kernel path before anything is timed: compiles and autotuning happen here
    t0 = time.perf_counter()
    for B in batches:
        xw = torch.randn(B, 64, d, device=device, dtype=dtype)
        _, sw = ours(xw)
        ours(xw, sw)
        ours.step(xw[:, 0], sw)
        if up is not None:
            up(xw)
            if step_fn_ok:
                cache = [t.clone() for t in sw.tensors.values()]
                cache[2], cache[3] = cache[2].to(dtype), cache[3].to(dtype)
                up.step(xw[:, 0], *cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"warm-up (compiles, autotuning) {time.perf_counter() - t0:.1f} s", flush=True)
    rows, raw = [], []
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
        scaled = " (per-token x N)" if k < N else ""
        row = dict(batch=B, tokens=N, ours_continue_s=t_cont, step_loop_s=t_step, step_loop_measured_tokens=k,
                   step_baseline=baseline)
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
            print(" | ".join(map(str, rows[-1])), flush=True)
        raw.append(row)
    headers = ["batch", "N", "ours: continue (ms)", "step loop (ms)", "continue / step loop", "prefill tokens",
               "ours: prefill (ms)", "upstream forward (ms)", "ours / upstream prefill"]
    table = markdown_table(headers, rows)
    print(table)
    if not args.smoke or args.write:
        env = environment()
        note = "" if up is not None else f"\n\nUpstream columns not measured: {why_not}."
        body = (f"{environment_line(env)}\n\nOne Mamba-3 SISO layer (d_model {d}, d_state {cfg['d_state']}, headdim "
                f"{cfg['headdim']}, expand 2), {str(dtype).replace('torch.', '')}, state from a 512-token prefill. "
                f"Targets: continue / step loop <= 1/100; our prefill <= 1.05x upstream's forward. Ours continues "
                f"N tokens from the state in one call; the step loop ({raw[0]['step_baseline']}) is timed over "
                f"{args.step_tokens} tokens and scaled to N. Both sides under `torch.no_grad()`; medians of "
                f"{args.repeats} rounds, the two prefills timed in turns.{note}\n\n{table}\n")
        write_json("bench_mamba3", {"config": cfg, "dtype": str(dtype), "results": raw}, env)
        replace_section(SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
