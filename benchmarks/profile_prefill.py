"""Where a 130m-shaped prefill spends its GPU time: torch.profiler tables per shape, plus one-layer timings.

Used to find what keeps ``StatefulMambaLM``'s prefill from upstream's fused forward (issue 4, item 7; issue 22,
item 2). Prints the top CUDA kernels by total time for ``--shapes`` (batch x seqlen) and times the pieces of one
Mamba layer (projections, conv, scan) in isolation. With ``--vs-upstream`` (needs upstream's CUDA kernels) the
model is upstream's ``MambaLMHeadModel`` and ours wraps it (same weights): both forwards are timed in turns and
both get a table of device time per kernel, so the difference can be read kernel by kernel. Writes nothing into
docs; ``--out DIR`` keeps the tables as text.

    python benchmarks/profile_prefill.py --vs-upstream --shapes 1x16384 1x65536 --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LM_130M, interleaved_median_times, median_time, upstream_lm  # noqa: E402

from mamba_state.adapters import StatefulMambaLM  # noqa: E402

CFG = LM_130M


def _profile(lm, batch: int, seqlen: int, rows: int) -> str:
    ids = torch.randint(0, 50000, (batch, seqlen), device="cuda")
    for _ in range(2):
        lm(ids)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        lm(ids)
        torch.cuda.synchronize()
    ms = median_time(lambda: lm(ids), repeats=5) * 1e3
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)
    return f"### batch {batch} x seqlen {seqlen}: {ms:.2f} ms per forward\n{table}\n"


def _kernel_table(fn, rows: int, steps: int = 3) -> tuple[float, str]:
    """(device ms per call, the top ``rows`` kernels by self device time per call) of ``fn`` under the profiler."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()

    def self_us(e) -> float:  # the attribute was renamed across torch versions
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))

    events = [e for e in prof.key_averages() if self_us(e) > 0]
    total = sum(self_us(e) for e in events) / steps / 1e3
    lines = [f"  {self_us(e) / steps / 1e3:8.3f} ms {e.count // steps:5d}x  {e.key[:100]}"
             for e in sorted(events, key=lambda e: -self_us(e))[:rows]]
    return total, "\n".join(lines)


def _vs_upstream(batch: int, seqlen: int, rows: int) -> str:
    """Upstream's forward and ours on the same weights: wall medians in turns, then device time per kernel."""
    up, why = upstream_lm(CFG, torch.device("cuda"), torch.bfloat16)
    if up is None:
        return f"### batch {batch} x seqlen {seqlen}: upstream unavailable ({why})\n"
    ours = StatefulMambaLM(up).eval()
    ids = torch.randint(0, 50000, (batch, seqlen), device="cuda")
    fns = {"upstream": lambda: up(ids), "ours": lambda: ours(ids)}
    wall = interleaved_median_times(fns, repeats=10, warmup=2)
    out = [f"### batch {batch} x seqlen {seqlen}: upstream {wall['upstream'] * 1e3:.2f} ms, ours "
           f"{wall['ours'] * 1e3:.2f} ms per forward (wall medians in turns; ours / upstream "
           f"{wall['ours'] / wall['upstream']:.3f})"]
    for name, fn in fns.items():
        total, table = _kernel_table(fn, rows)
        out.append(f"== {name}: {total:.2f} ms of device time per forward\n{table}")
    fns.clear()  # the closures hold both models
    torch.cuda.empty_cache()
    return "\n".join(out) + "\n"


def _layer_pieces(lm, batch: int, seqlen: int) -> str:
    """Each piece of one Mamba layer's chunk forward, timed alone (ms)."""
    mixer = lm.backbone.layers[0].mixer
    dt = mixer.in_proj.weight.dtype
    x = torch.randn(batch, seqlen, mixer.d_model, device="cuda", dtype=dt)
    xt = x.transpose(1, 2)
    W = mixer.in_proj.weight
    d_inner = mixer.d_inner
    xs = torch.randn(batch, d_inner, seqlen, device="cuda", dtype=dt)
    state = mixer.new_state(batch, device="cuda")
    pieces = {
        "in_proj matmul(W, x^T) (channel-major)": lambda: torch.matmul(W[:d_inner], xt),
        "in_proj F.linear then transpose (token-major)": lambda: F.linear(x, W).transpose(1, 2),
        "in_proj F.linear + contiguous channel-major": lambda: F.linear(x, W).transpose(1, 2).contiguous(),
        "in_proj bmm(W broadcast, x^T) (channel-major)": lambda: torch.bmm(W[:d_inner].expand(batch, -1, -1), xt),
        "conv (mixer._conv)": lambda: mixer._conv(xs, state.conv_state, None),
        "conv F.conv1d after cat": lambda: F.conv1d(torch.cat([state.conv_state[:, :, 1:].to(dt), xs], -1),
                                                    mixer.conv1d.weight, mixer.conv1d.bias, groups=d_inner),
        "x_proj matmul": lambda: torch.matmul(mixer.x_proj.weight, xs),
        "whole layer forward": lambda: mixer(x, state),
    }
    try:
        from causal_conv1d import causal_conv1d_fn  # type: ignore

        w = mixer.conv1d.weight[:, 0]
        pieces["causal_conv1d_fn (upstream, no state)"] = lambda: causal_conv1d_fn(xs, w, mixer.conv1d.bias,
                                                                                 activation="silu")
    except Exception as exc:  # noqa: BLE001
        pieces[f"causal_conv1d unavailable: {exc}"[:60]] = lambda: None
    lines = [f"### one layer, batch {batch} x seqlen {seqlen}"]
    for name, fn in pieces.items():
        with torch.no_grad():
            lines.append(f"  {name}: {median_time(fn, repeats=10) * 1e3:.3f} ms")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["1x8192", "8x2048", "1x256"])
    p.add_argument("--rows", type=int, default=18)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--vs-upstream", action="store_true",
                   help="upstream's model and ours on its weights, side by side, per kernel")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_prefill: needs a CUDA GPU")
        return 0
    report = []
    if args.vs_upstream:
        for shape in args.shapes:
            b, L = (int(v) for v in shape.split("x"))
            report.append(_vs_upstream(b, L, args.rows))
            print(report[-1], flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "profile_prefill.txt").write_text("\n".join(report))
        return 0
    lm = StatefulMambaLM.from_config(CFG, device="cuda", dtype=torch.bfloat16).eval()
    for shape in args.shapes:
        b, L = (int(v) for v in shape.split("x"))
        report.append(_layer_pieces(lm, b, L))
        report.append(_profile(lm, b, L, args.rows))
        print(report[-2] + report[-1], flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_prefill.txt").write_text("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
