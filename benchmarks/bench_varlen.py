"""Packed prefill of many sessions (``cu_seqlens``) vs a padded batch vs one call per session: the selective scan.

The 130m shape (d_inner 1536, dstate 16, bf16, the layer's configuration: D, z, delta_bias, softplus), 64
sessions, each from its own initial state, lengths drawn from 16 to 4096 tokens in two ways: uniform (mean about
max / 2) and log-uniform (mean under max / 4, the case of issue 18's target). Contenders, timed in turns
(:func:`common.interleaved_median_times`):

* ``packed``: one call over the packed row with ``cu_seqlens`` (every session's final state returned); without
  a backward, each sequence runs in its own programs;
* ``packed, row schedule`` (forward only): the same call with ``MAMBA_STATE_PACKED_FWD=row``, the packed row
  scanned as one long row (sequentially, or chunk-parallel: summaries, carry, outputs), as before;
* ``padded``: one batch of 64 rows right-padded to the longest session (its cost only: the padded rows' final
  states would be wrong, which makes it a lower bound of what padding costs);
* ``per-session``: 64 calls, one per session (batch 1);
* ``equal``: one batch of 64 rows of the mean length (the sum-of-tokens cost packing aims at: issue 18 asks
  packed <= 1.1x this).

Forward only by default (prefill); ``--backward`` also times forward + backward. Writes
benchmarks/results/bench_varlen.json and the section "Packed sequences (cu_seqlens)" of docs/benchmarks.md.
``--model``: the same sessions through the whole 130m-shaped LM (``StatefulMambaLM`` over upstream's
``MambaLMHeadModel`` with random weights, bf16, each session's last logits only, as a server's prefill) instead of
one scan: writes benchmarks/results/bench_varlen_model.json and the section "Packed prefill (130m LM)".
``--profile`` writes nothing: per contender (forward, uniform lengths) the wall time next to the device time and
the top kernels by device time (torch.profiler), which splits a slow contender into kernel and host time.

    python benchmarks/bench_varlen.py            # on a GPU
    python benchmarks/bench_varlen.py --backward
    python benchmarks/bench_varlen.py --profile
    python benchmarks/bench_varlen.py --model
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, environment_line, interleaved_median_times, markdown_table, replace_section, write_json  # noqa: E402,E501

DIM, DSTATE, SESSIONS, LO, HI = 1536, 16, 64, 16, 4096
TITLE = "Packed sequences (cu_seqlens)"
MODEL_TITLE = "Packed prefill (130m LM)"


def draw_lengths(kind: str, seed: int = 0) -> list[int]:
    """64 session lengths in [16, 4096]: uniform, or log-uniform (more short sessions)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.randint(LO, HI + 1, (SESSIONS,), generator=g).tolist()
    logs = torch.rand(SESSIONS, generator=g) * (math.log(HI) - math.log(LO)) + math.log(LO)
    return [int(v) for v in logs.exp().round().clamp(LO, HI).tolist()]


def layer_inputs(batch: int, L: int, device, dtype, seed: int) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    return dict(u=r(batch, DIM, L).to(dtype), delta=(0.5 * r(batch, DIM, L) - 1.0).to(dtype),
                A=-torch.exp(0.5 * r(DIM, DSTATE)), B=r(batch, DSTATE, L).to(dtype), C=r(batch, DSTATE, L).to(dtype),
                D=r(DIM), z=r(batch, DIM, L).to(dtype), delta_bias=0.1 * r(DIM), delta_softplus=True,
                return_last_state=True)


def contenders(lens: list[int], device, dtype, backward: bool) -> dict:
    from mamba_state.kernels import selective_scan_fn

    total, longest, mean = sum(lens), max(lens), round(sum(lens) / len(lens))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # on the host: no sync
    packed = layer_inputs(1, total, device, dtype, 1)
    padded = layer_inputs(SESSIONS, longest, device, dtype, 2)
    equal = layer_inputs(SESSIONS, mean, device, dtype, 3)
    h0 = torch.randn(SESSIONS, DIM, DSTATE, device=device)
    starts = cu.tolist()
    pieces = [{k: (v[..., a:b] if isinstance(v, torch.Tensor) and v.dim() == 3 else v) for k, v in packed.items()}
              for a, b in zip(starts[:-1], starts[1:])]
    grads = ("u", "delta", "B", "C", "z")

    def run(inp, **kw):
        if not backward:
            with torch.no_grad():
                return selective_scan_fn(**inp, **kw)
        leaves = {k: (v.detach().requires_grad_() if k in grads else v) for k, v in inp.items()}
        out, last = selective_scan_fn(**leaves, **kw)
        (out.float().sum() + last.sum()).backward()

    def row_schedule():  # the packed row's schedule, which no-grad packed calls took before by-sequence programs
        os.environ["MAMBA_STATE_PACKED_FWD"] = "row"
        try:
            return run(packed, initial_state=h0, cu_seqlens=cu)
        finally:
            del os.environ["MAMBA_STATE_PACKED_FWD"]

    extra = {} if backward else {"packed, row schedule": row_schedule}
    return {
        "packed": lambda: run(packed, initial_state=h0, cu_seqlens=cu), **extra,
        "padded": lambda: run(padded, initial_state=h0),
        "per-session": lambda: [run(p, initial_state=h0[s:s + 1]) for s, p in enumerate(pieces)],
        "equal": lambda: run(equal, initial_state=h0),
    }


def model_contenders(lm, lens: list[int], state, device, vocab: int) -> dict:
    """The LM's prefill of the sessions (each from its row of ``state``), each contender returning every session's
    last logits: packed (one call, ``cu_seqlens``), padded (a batch right-padded to the longest: its cost only,
    the padded rows' logits and states would be wrong), per-session (one call each) and equal (a batch of the
    mean length: the sum-of-tokens cost)."""
    g = torch.Generator(device=device).manual_seed(4)
    total, longest, mean = sum(lens), max(lens), round(sum(lens) / len(lens))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # on the host: no sync
    packed = torch.randint(0, vocab, (1, total), device=device, generator=g)
    padded = torch.randint(0, vocab, (SESSIONS, longest), device=device, generator=g)
    equal = torch.randint(0, vocab, (SESSIONS, mean), device=device, generator=g)
    starts = cu.tolist()
    pieces = [packed[:, a:b] for a, b in zip(starts[:-1], starts[1:])]
    rows = state.split(1)

    def run(ids, st, **kw):
        with torch.no_grad():
            return lm(ids, state=st, num_last_tokens=1, **kw)[0]

    return {
        "packed": lambda: run(packed, state, cu_seqlens=cu),
        "padded": lambda: run(padded, state),
        "per-session": lambda: [run(p, rows[s]) for s, p in enumerate(pieces)],
        "equal": lambda: run(equal, state),
    }


def model_main(repeats: int) -> None:
    """``--model``: the sessions through the 130m-shaped LM; table and JSON."""
    import mamba_state as ms
    from common import LM_130M, upstream_lm

    device = torch.device("cuda")
    model, why = upstream_lm(LM_130M, device, torch.bfloat16)
    if model is None:
        sys.exit(f"bench_varlen.py --model needs upstream's CUDA kernels: {why}")
    lm = ms.StatefulMambaLM(model).eval()
    with torch.no_grad():  # a non-zero state per session: a prefill of 64 other tokens each
        g = torch.Generator(device=device).manual_seed(5)
        _, state = lm(torch.randint(0, LM_130M["vocab_size"], (SESSIONS, 64), device=device, generator=g))
    env = environment()
    rows, results = [], []
    for kind in ("uniform", "log-uniform"):
        lens = draw_lengths(kind)
        fns = model_contenders(lm, lens, state, device, LM_130M["vocab_size"])
        times = interleaved_median_times(fns, repeats=repeats, warmup=2)
        ms_ = {k: 1e3 * v for k, v in times.items()}
        res = dict(lengths=kind, total_tokens=sum(lens), max_len=max(lens), mean_len=sum(lens) / len(lens),
                   ms=ms_, padded_over_packed=ms_["padded"] / ms_["packed"],
                   packed_over_equal=ms_["packed"] / ms_["equal"])
        results.append(res)
        rows.append([kind, sum(lens), f"{res['mean_len']:.0f} / {max(lens)}",
                     *(f"{ms_[k]:.1f}" for k in ("packed", "padded", "per-session", "equal")),
                     f"{res['padded_over_packed']:.2f}x", f"{res['packed_over_equal']:.2f}"])
        print(rows[-1], flush=True)
    write_json("bench_varlen_model", {"model": "130m-shaped MambaLMHeadModel, random weights, bf16",
                                      "sessions": SESSIONS, "results": results}, env)
    commit = os.environ.get("MAMBA_STATE_COMMIT", "")
    body = "\n".join([
        f"`benchmarks/bench_varlen.py --model`: the same {SESSIONS} sessions of {LO}-{HI} tokens as above, each from "
        "its own state (a prefill of 64 other tokens), through the whole 130m-shaped LM (`StatefulMambaLM` over "
        "upstream's `MambaLMHeadModel`, d_model 768, 24 layers, random weights, bf16), under `torch.no_grad()`, "
        "each contender returning every session's last logits (`num_last_tokens=1`), as a server's prefill does. "
        "`packed`: one call with `cu_seqlens` and a 64-row state; `padded`: one batch right-padded to the longest "
        "(its cost only: the shorter rows' logits and states would be wrong); `per-session`: 64 calls; `equal`: "
        "one batch of the mean length. Times in ms, medians of runs in turns.",
        "",
        environment_line(env) + (f" Commit {commit}." if commit else ""),
        "",
        markdown_table(["lengths", "tokens", "mean / max", "packed", "padded", "per-session", "equal",
                        "padded / packed", "packed / equal"], rows),
    ])
    replace_section(MODEL_TITLE, body)


def profile(device, dtype) -> None:
    """Wall time (median of 10) and device time per call of every forward contender, with its top kernels."""
    from common import median_time
    from profile_prefill import _kernel_table

    lens = draw_lengths("uniform")
    for name, fn in contenders(lens, device, dtype, backward=False).items():
        wall = 1e3 * median_time(fn, repeats=10, warmup=2)
        dev_ms, table = _kernel_table(fn, 8)
        print(f"## {name}: wall {wall:.2f} ms, device {dev_ms:.2f} ms\n{table}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backward", action="store_true", help="also time forward + backward")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="device time per kernel of each contender; no files")
    ap.add_argument("--model", action="store_true", help="the sessions through the 130m-shaped LM instead")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_varlen.py needs a CUDA GPU (the Triton kernels; the CPU path is not what it measures)")
    device, dtype = torch.device("cuda"), torch.bfloat16
    if args.model:
        model_main(args.repeats)
        return
    if args.profile:
        profile(device, dtype)
        return
    env = environment()
    rows, results = [], []
    for kind in ("uniform", "log-uniform"):
        lens = draw_lengths(kind)
        for mode in (["fwd", "fwd+bwd"] if args.backward else ["fwd"]):
            times = interleaved_median_times(contenders(lens, device, dtype, mode == "fwd+bwd"),
                                             repeats=args.repeats, warmup=2)
            ms = {k: 1e3 * v for k, v in times.items()}
            res = dict(lengths=kind, mode=mode, total_tokens=sum(lens), max_len=max(lens),
                       mean_len=sum(lens) / len(lens), ms=ms, padded_over_packed=ms["padded"] / ms["packed"],
                       packed_over_equal=ms["packed"] / ms["equal"])
            results.append(res)
            rows.append([kind, mode, sum(lens), f"{res['mean_len']:.0f} / {max(lens)}",
                         *(f"{ms[k]:.2f}" if k in ms else "n/a"
                           for k in ("packed", "packed, row schedule", "padded", "per-session", "equal")),
                         f"{res['padded_over_packed']:.2f}x", f"{res['packed_over_equal']:.2f}"])
            print(rows[-1], flush=True)
    write_json("bench_varlen", {"shape": dict(sessions=SESSIONS, dim=DIM, dstate=DSTATE, dtype="bf16"),
                                "results": results}, env)
    body = "\n".join([
        f"`benchmarks/bench_varlen.py`: {SESSIONS} sessions of {LO}-{HI} tokens, each from its own state, "
        f"through the selective scan at the 130m shape (d_inner {DIM}, dstate {DSTATE}, bf16, D/z/delta_bias/"
        "softplus). `packed`: one call with `cu_seqlens` (without a backward each sequence in its own programs); "
        "`packed, row schedule`: the same call with `MAMBA_STATE_PACKED_FWD=row` (the packed row scanned as one "
        "long row, the schedule before, forward only); `padded`: one batch right-padded to the longest "
        "(its cost only, a lower bound: its padded rows' final states would be wrong); `per-session`: one "
        "call per session; `equal`: one batch of the mean length (the sum-of-tokens cost). Times in ms, "
        "medians of runs in turns. Targets (issue 18): padded / packed >= 2 when mean < max / 4; packed / "
        "equal <= 1.1.",
        "",
        environment_line(env),
        "",
        markdown_table(["lengths", "mode", "tokens", "mean / max", "packed", "packed, row schedule", "padded",
                        "per-session", "equal",
                        "padded / packed", "packed / equal"], rows),
    ])
    replace_section(TITLE, body)


if __name__ == "__main__":
    main()
