"""Where states at positions spend their time on a GPU (issue 19, item 6): a 130m-shaped Mamba-1 layer (d_model
768, d_state 16, bf16, 2048 tokens, batch 1 and 8) and its scan alone, each plain and with 8 positions, and the
layer's full trace; then the verify step of speculative decoding (a 130m-shaped LM, 5 tokens from a state) plain
and with the state after each token. Prints the wall time per call (median of 20, synchronised), the device time
per call and the top kernels by device time, so a gap splits into kernel time (which kernels grew) and host time
(wall minus device), and the CUDA runtime calls that can make the host wait. A diagnostic, not a benchmark of
record: ``bench_trace.py`` writes the table. ``--host`` instead profiles the Python side of the batch-1 layer,
plain and with 8 positions (cProfile over many calls): the functions whose own time per call the positions add.

    python benchmarks/profile_positions.py [--rows 8] [--host]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time  # noqa: E402
from profile_prefill import _kernel_table  # noqa: E402

from mamba_state import StatefulMamba, StatefulMambaLM  # noqa: E402
from mamba_state.kernels import selective_scan_fn  # noqa: E402


def _scan_inputs(batch: int, dim: int, L: int, n: int, dev: str) -> dict:
    g = torch.Generator(dev).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=dev, generator=g)  # noqa: E731
    return dict(u=r(batch, dim, L).bfloat16(), delta=(0.5 * r(batch, dim, L) - 1).bfloat16(),
                A=-torch.exp(0.5 * r(dim, n)), B=r(batch, n, L).bfloat16(), C=r(batch, n, L).bfloat16(),
                D=r(dim), z=r(batch, dim, L).bfloat16(), delta_bias=0.1 * r(dim))


# CUDA runtime calls that can make the host wait for the device (explicitly or, for pinned allocations, inside
# the driver): a host-bound forward that makes one serialises its host and device time
_WAITING = ("Synchronize", "cudaMemcpy", "cudaHostAlloc", "cudaMallocHost", "cudaFreeHost", "cudaMalloc",
            "cudaFree", "cudaStreamWaitEvent", "cudaEventQuery")


def _runtime_calls(fn, steps: int = 3) -> str:
    """Per call of ``fn``: the CUDA runtime calls that may wait (see _WAITING) with their counts and host time,
    and the number of kernel launches, from torch.profiler's CPU-side events."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    found, launches = [], 0
    for e in prof.key_averages():
        if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC"):
            launches += e.count
        elif any(w in e.key for w in _WAITING) and e.key != "cudaDeviceSynchronize":
            found.append(f"{e.key} {e.count / steps:g}x {e.cpu_time_total / steps / 1e3:.3f} ms")
    return f"{launches / steps:g} launches; " + ("; ".join(found) if found else "no waiting runtime call")


def _host_profile(fn, calls: int) -> dict[str, tuple[float, int]]:
    """cProfile of ``calls`` calls of ``fn``: ``{function: (own microseconds per call of fn, calls per call)}``."""
    import cProfile
    import pstats

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    return {f"{Path(k[0]).name}:{k[1]}({k[2]})": (1e6 * v[2] / calls, round(v[1] / calls, 2))
            for k, v in stats.items()}


def host_main(calls: int = 300, rows: int = 30) -> int:
    """The Python functions whose own time per call the 8 positions add to the batch-1 layer, largest first."""
    import time

    dev, d_model, L = "cuda", 768, 2048
    torch.manual_seed(0)
    layer = StatefulMamba.from_config(d_model, d_state=16, layer_idx=0, device=dev, dtype=torch.bfloat16)
    eight = [round(i * L / 8) for i in range(1, 9)]
    x = torch.randn(1, L, d_model, device=dev, dtype=torch.bfloat16)
    s0 = layer.new_state(1)
    with torch.no_grad():
        plain_fn, at_fn = (lambda: layer(x, s0)), (lambda: layer(x, s0, return_states_at=eight))
        for name, fn in (("plain", plain_fn), ("8 positions", at_fn)):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            host = time.perf_counter() - t0
            torch.cuda.synchronize()
            print(f"host time per call, {name}: {1e6 * host / calls:.1f} us (no sync)", flush=True)
        plain, at = _host_profile(plain_fn, calls), _host_profile(at_fn, calls)
    total = lambda d: sum(v[0] for v in d.values())  # noqa: E731
    print(f"profiled own time per call: plain {total(plain):.1f} us, 8 positions {total(at):.1f} us")
    diff = sorted(((at.get(k, (0.0, 0))[0] - plain.get(k, (0.0, 0))[0], k) for k in set(at) | set(plain)),
                  reverse=True)
    print("| function | plain us | 8 positions us | added us | calls (8 positions) |\n|---|---|---|---|---|")
    for d, k in diff[:rows]:
        print(f"| {k} | {plain.get(k, (0.0, 0))[0]:.1f} | {at.get(k, (0.0, 0))[0]:.1f} | {d:.1f} | "
              f"{at.get(k, (0.0, 0))[1]} |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--host", action="store_true", help="profile the batch-1 layer's Python side instead")
    args = ap.parse_args(argv)
    if args.host:
        return host_main()
    dev, d_model, L = "cuda", 768, 2048
    torch.manual_seed(0)
    layer = StatefulMamba.from_config(d_model, d_state=16, layer_idx=0, device=dev, dtype=torch.bfloat16)
    eight = [round(i * L / 8) for i in range(1, 9)]
    for batch in (1, 8):
        x = torch.randn(batch, L, d_model, device=dev, dtype=torch.bfloat16)
        s0 = layer.new_state(batch)
        inp = _scan_inputs(batch, 2 * d_model, L, 16, dev)
        h0 = torch.zeros(batch, 2 * d_model, 16, device=dev)
        cases = {
            "layer": lambda: layer(x, s0),
            "layer + 8 positions": lambda: layer(x, s0, return_states_at=eight),
            "scan": lambda: selective_scan_fn(**inp, delta_softplus=True, initial_state=h0, return_last_state=True,
                                              backend="triton"),
            "scan + 8 positions": lambda: selective_scan_fn(**inp, delta_softplus=True, initial_state=h0,
                                                            return_last_state=True, backend="triton",
                                                            return_states_at=eight),
            f"layer, full trace ({L + 1} states)": lambda: layer(x, s0, return_states_at=range(L + 1)),
        }
        with torch.no_grad():
            for name, fn in cases.items():
                wall = 1e3 * median_time(fn, repeats=20, warmup=2)
                dev_ms, table = _kernel_table(fn, args.rows)
                print(f"## batch {batch}, {name}: wall {wall:.3f} ms, device {dev_ms:.3f} ms\n{table}", flush=True)
                print(f"   host: {_runtime_calls(fn)}", flush=True)
    # the verify step of speculative decoding (bench_trace.py's last rows): a 130m-shaped LM, 5 tokens from a
    # state, plain and with the state after each token (about 2x a plain verify on the H200, 2026-12-03)
    lm = StatefulMambaLM.from_config(dict(d_model=768, n_layer=24, vocab_size=50277, ssm_cfg={},
                                          pad_vocab_size_multiple=8), device=dev, dtype=torch.bfloat16)
    for batch in (1, 8):
        with torch.no_grad():
            _, state = lm(torch.randint(0, 50277, (batch, 64), device=dev))
            draft = torch.randint(0, 50277, (batch, 5), device=dev)
            for name, fn in {"LM verify 5 tokens": lambda: lm(draft, state),
                             "LM verify 5 tokens + state after each":
                                 lambda: lm(draft, state, return_states_at=range(1, 6))}.items():
                wall = 1e3 * median_time(fn, repeats=20, warmup=2)
                dev_ms, table = _kernel_table(fn, args.rows)
                print(f"## batch {batch}, {name}: wall {wall:.3f} ms, device {dev_ms:.3f} ms\n{table}", flush=True)
                print(f"   host: {_runtime_calls(fn)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
