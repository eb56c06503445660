"""Where one RL collection step goes (issue 20's collection target): ``torch.profiler`` over one rollout of each
collection path, per controller, at the campaign's setting (512 environments, the small policies).

For every (controller, path) it prints the wall time per environment step (all ``--num-envs`` environments), the
kernels launched per step and their device time per step, and the kernels with the most device time; so the
next change to the collection can be aimed at the step's largest item: kernel count (launch-bound) or one slow
kernel. On a CPU (no CUDA activity) it reports the operators instead, which is only a smoke test of the script.
Writes ``profile_rl_collect.txt`` into ``--out``.

    python benchmarks/profile_rl_collect.py --out DIR                  # GPU: eager, graph, graph-compiled, fused
    python benchmarks/profile_rl_collect.py --quick --out /tmp         # CPU smoke run (seconds)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rl_collect import add_setting_args, trainer  # noqa: E402


def _device_us(e) -> float:
    """Self device time (us) of a profiler event average (the attribute was renamed across torch versions)."""
    return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))


def profile_path(controller: str, size: str, path: str, args, device: torch.device, top: int) -> list[str]:
    """One warm rollout of ``path`` profiled: the lines of its report."""
    tr = trainer(controller, size, path, args, device)
    tr.collect()  # capture / compile outside the profile
    tr.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        tr.collect()
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    steps = args.rollout_len
    if cuda:
        events = [e for e in prof.key_averages() if _device_us(e) > 0]
        weight = _device_us
    else:
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        weight = lambda e: float(e.self_cpu_time_total)  # noqa: E731
    launches = sum(e.count for e in events)
    busy = sum(weight(e) for e in events)
    what = "kernels" if cuda else "operators"
    lines = [f"== {controller} ({size}), {path}: {wall / steps * 1e6:.0f} us wall a step "
             f"({args.num_envs * steps / wall:,.0f} env steps/s under the profiler), {launches / steps:.1f} {what} "
             f"a step, {busy / steps:.1f} us of {'device' if cuda else 'CPU'} time a step"]
    for e in sorted(events, key=lambda e: -weight(e))[:top]:
        lines.append(f"  {weight(e) / steps:8.2f} us  {e.count / steps:6.2f}x  {e.key[:100]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_setting_args(p)
    p.add_argument("--size", default="small", choices=["small", "default"])
    p.add_argument("--paths", nargs="+", default=None, choices=["eager", "graph", "graph-compiled", "graph-fused"],
                   help="collection paths (default: all four on CUDA, eager and graph on a CPU)")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 16 envs, 24 steps")
    p.add_argument("--out", default=".")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.quick:
        a.num_envs, a.rollout_len, a.horizon, a.graph_steps = 16, 24, 12, 8
    paths = a.paths or (["eager", "graph", "graph-compiled", "graph-fused"] if device.type == "cuda"
                        else ["eager", "graph"])
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"# benchmarks/profile_rl_collect.py on {name}, {when}, torch {torch.__version__}, "
             f"{a.num_envs} envs, rollout {a.rollout_len}, horizon {a.horizon}, {a.size} policies"]
    for controller in a.controllers:
        for path in paths:
            lines += profile_path(controller, a.size, path, a, device, a.top)
            print("\n".join(lines[-(a.top + 1):]), flush=True)
    out = Path(a.out) / "profile_rl_collect.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
