"""Where a decode step of the serving engine spends its time: host sections against the GPU's time per step.

A diagnostic for ``bench_serve.py`` part (b): the 130m-shaped model (random weights, bf16), 64 sessions of 128-token
prompts decoding greedily through :class:`mamba_state.serve.Engine`, next to ``generate`` on one static batch of 64.
For the engine's decode steps it reports the wall time per step, the host time of each section of
``Engine._decode`` (the graph replay's launch, the token choice, the copies, the loop over rows, the flush of the
previous step's tokens; timed with ``time.perf_counter`` without synchronising, so each is what the host spends
there), the first, last and slowest steps, the garbage collections during the run, and the device time per step
(torch.profiler). Then the first step (admission: setup, the packed prefill, the join, the first decode) and the
last step (the sessions parked) split into sections timed with a device synchronisation on both sides, so each
section's time includes its kernels (inclusive: a section holds the sections it calls). Prints tables; writes
nothing.

    python benchmarks/profile_engine.py            # on a GPU
    python benchmarks/profile_engine.py --quick    # tiny model on the CPU (checks the script)
"""

from __future__ import annotations

import argparse
import collections
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LM_130M  # noqa: E402

import mamba_state.serve.batch as batch_mod  # noqa: E402
import mamba_state.serve.engine as engine_mod  # noqa: E402
from mamba_state.adapters import StatefulMambaLM  # noqa: E402
from mamba_state.cache import StateCache  # noqa: E402
from mamba_state.generation import generate  # noqa: E402
from mamba_state.serve import Engine  # noqa: E402

TINY = dict(d_model=32, n_layer=2, vocab_size=97, ssm_cfg={}, rms_norm=True, fused_add_norm=True,
            residual_in_fp32=True, pad_vocab_size_multiple=8, tie_embeddings=True)
SECTIONS = collections.defaultdict(list)


def _timed(owner, name: str, label: str) -> None:
    """Wrap ``owner.name`` so that each call's host time is recorded under ``label``."""
    fn = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SECTIONS[label].append(time.perf_counter() - t)

    setattr(owner, name, wrapper)


def first_and_last_steps(engine_run, lm, sync) -> None:
    """Split the first and the last engine step into synchronised sections (see the module docstring)."""
    import mamba_state.cache as cache_mod

    timed: dict[str, list[float]] = collections.defaultdict(list)
    originals = []

    def wrap(owner, name: str, label: str) -> None:
        fn = getattr(owner, name)
        originals.append((owner, name, fn))

        def wrapper(*args, **kwargs):
            sync()
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                timed[label].append(time.perf_counter() - t)

        setattr(owner, name, wrapper)

    E, B = engine_mod.Engine, batch_mod.DecodeBatch
    for owner, name, label in ((E, "step", "step"), (E, "_admit", "_admit"), (E, "_setup", "_setup"),
                               (E, "_prefill_packed", "_prefill_packed"),
                               (type(lm), "__call__", "lm forward"),
                               (engine_mod, "choose_tokens", "choose_tokens"),
                               (E, "_first_token", "_first_token"), (B, "reserve", "batch.reserve"),
                               (E, "_join_rows", "_join_rows"), (E, "_decode", "_decode"),
                               (E, "_flush", "_flush"), (E, "_park", "_park"),
                               (cache_mod.StateCache, "insert", "cache.insert"),
                               (B, "remove_many", "batch.remove_many"), (B, "remove", "batch.remove"),
                               (B, "maybe_shrink", "maybe_shrink")):
        if hasattr(owner, name):
            wrap(owner, name, label)
    marks: list[dict[str, float]] = []
    step_fn = E.step

    def step_with_marks(self):
        before = {k: sum(v) for k, v in timed.items()}
        out = step_fn(self)
        marks.append({k: sum(v) - before.get(k, 0.0) for k, v in timed.items()})
        return out

    E.step = step_with_marks
    try:
        engine_run()
    finally:
        E.step = step_fn
        for owner, name, fn in reversed(originals):
            setattr(owner, name, fn)
    for title, m in (("first step", marks[0]), ("second-last step", marks[-2] if len(marks) > 1 else {}),
                     ("last step", marks[-1])):
        print(f"{title} (synchronised sections, inclusive, slowest first):")
        for label, v in sorted(m.items(), key=lambda kv: -kv[1]):
            if v > 0:
                print(f"  {label:24s} {1e3 * v:9.3f} ms  ({len(timed[label])} calls in the run)")


def profile_first_step(engine_run) -> None:
    """cProfile of the first engine step alone (no synchronisation added): the host's own time by function,
    a wait for the device showing as the time of the call that blocks (``tolist``, ``synchronize``)."""
    import cProfile
    import io
    import pstats

    E = engine_mod.Engine
    step_fn = E.step
    prof = cProfile.Profile()
    seen = [0]

    def first_profiled(self):
        seen[0] += 1
        if seen[0] != 1:
            return step_fn(self)
        prof.enable()
        try:
            return step_fn(self)
        finally:
            prof.disable()

    E.step = first_profiled
    try:
        engine_run()
    finally:
        E.step = step_fn
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    print("first step under cProfile (host time by function, top 25):")
    print("\n".join(line[:160] for line in out.getvalue().splitlines() if line.strip()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model on the CPU")
    ap.add_argument("--new", type=int, default=256, help="new tokens per session")
    args = ap.parse_args()
    if not args.quick and not torch.cuda.is_available():
        sys.exit("profile_engine.py needs a CUDA GPU (or --quick)")
    device = torch.device("cpu" if args.quick else "cuda")
    cfg = TINY if args.quick else dict(LM_130M)
    torch.manual_seed(0)
    lm = StatefulMambaLM.from_config(cfg, device=device, dtype=torch.float32 if args.quick else torch.bfloat16).eval()
    vocab = int(cfg["vocab_size"])
    sessions, prompt, new = (4, 8, 8) if args.quick else (64, 128, args.new)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, vocab, (prompt,), generator=gen).tolist() for _ in range(sessions)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def engine_run() -> list[float]:  # the packed first step as in bench_serve.py (b)
        engine = Engine(lm, StateCache(lm, device_bytes=0, host_bytes=0, device=device), max_batch=sessions,
                        prefill_tokens_per_step=sessions * prompt, prefill_chunk_size=sessions * prompt)
        for p in prompts:
            engine.submit(p, max_new_tokens=new)
        engine.step()
        sync()
        steps = []
        while True:
            t = time.perf_counter()
            if not engine.step():
                break
            steps.append(time.perf_counter() - t)
        sync()
        return steps

    engine_run()  # warm-up (graphs per bucket)
    SECTIONS.clear()
    for owner, name, label in ((batch_mod.DecodeBatch, "step", "batch.step (replay launch)"),
                               (engine_mod, "choose_device", "choose_device (argmax launch)"),
                               (engine_mod, "_to_host", "_to_host (pinned copy + event)"),
                               (engine_mod.Engine, "_flush", "_flush (wait + emit previous step)"),
                               (engine_mod.Engine, "_admit", "_admit (nothing waiting)"),
                               (engine_mod.Engine, "_reap_cancelled", "_reap_cancelled"),
                               (batch_mod.DecodeBatch, "maybe_shrink", "maybe_shrink")):
        _timed(owner, name, label)
    pauses: list[tuple[int, float]] = []  # (generation, seconds) of each garbage collection in the timed run
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((info["generation"], time.perf_counter() - started[0]))

    gc.callbacks.append(on_gc)
    try:
        steps = engine_run()
    finally:
        gc.callbacks.remove(on_gc)
    per_step = statistics.median(steps[5:-5] or steps)
    print(f"engine: {len(steps)} decode steps, median wall per step {1e3 * per_step:.3f} ms (host, not synced); "
          f"sum {1e3 * sum(steps):.1f} ms; first {[round(1e3 * t, 2) for t in steps[:3]]} ms, last "
          f"{[round(1e3 * t, 2) for t in steps[-3:]]} ms, slowest {round(1e3 * max(steps), 2)} ms at step "
          f"{steps.index(max(steps))}")
    for gen in sorted({g for g, _ in pauses}):
        ts = [t for g, t in pauses if g == gen]
        print(f"  garbage collections of generation {gen}: {len(ts)}, longest {1e3 * max(ts):.2f} ms")
    for label, ts in SECTIONS.items():
        print(f"  {label:40s} median {1e6 * statistics.median(ts):8.1f} us  ({len(ts)} calls)")
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            steps = engine_run()
        dev_us = sum(e.device_time_total for e in prof.key_averages()) / max(len(steps) + 1, 1)
        print(f"engine device time per step (profiled run): {dev_us / 1e3:.3f} ms")
    first_and_last_steps(engine_run, lm, sync)
    profile_first_step(engine_run)
    ids = torch.tensor(prompts, device=device)
    generate(lm, ids, max_new_tokens=new, temperature=0)
    sync()
    t = time.perf_counter()
    generate(lm, ids, max_new_tokens=new, temperature=0)
    sync()
    total = time.perf_counter() - t
    t = time.perf_counter()
    generate(lm, ids, max_new_tokens=1, temperature=0)
    sync()
    first = time.perf_counter() - t
    print(f"static generate: {1e3 * (total - first) / (new - 1):.3f} ms per decode step")


if __name__ == "__main__":
    main()
