"""Where a 130m-shaped prefill spends its GPU time: torch.profiler tables per shape, plus one-layer timings.

Used to find what keeps ``StatefulMambaLM``'s prefill from upstream's fused forward (issue 4, item 7). Prints the
top CUDA kernels by total time for ``--shapes`` (batch x seqlen) and times the pieces of one Mamba layer
(projections, conv, scan) in isolation. Writes nothing into docs; ``--out DIR`` keeps the tables as text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LM_130M, median_time  # noqa: E402

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
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_prefill: needs a CUDA GPU")
        return 0
    lm = StatefulMambaLM.from_config(CFG, device="cuda", dtype=torch.bfloat16).eval()
    report = []
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
