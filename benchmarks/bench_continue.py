"""Continue a stream from a saved state: ours (chunked calls) vs upstream's step() loop; prefill from zero.

GPU run (issue 4, item 7): a 130m-shaped ``MambaLMHeadModel`` (d_model 768, 24 layers, vocab 50277, bf16), batch
1 and 8, N in {256, 2048, 8192}:

* continue N tokens from a state: ours = ``StatefulMambaLM`` forward from the state (chunks of at most
  ``--chunk`` tokens); upstream = ``model(token, inference_params)`` once per token (its ``step()`` path, eager).
  Upstream's step costs the same for every token, so it is timed over ``--step-tokens`` tokens and scaled to N
  (marked "per-token x N" in the table);
* prefill N tokens from zero: ours vs upstream's fused forward.

Targets: ours / upstream stepping <= 1/100 at N=2048; our prefill within 1.2x of upstream's forward. Writes
``benchmarks/results/bench_continue.json`` and the "Continue from a state" section of ``docs/benchmarks.md``.

``--smoke`` runs a tiny model on the CPU (upstream's columns need its CUDA kernels and are left out; our own
``step()`` loop stands in as the token-by-token baseline) and writes nothing unless ``--write`` is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    LM_130M, environment, environment_line, interleaved_median_times, markdown_table, median_time, replace_section,
    upstream_lm, write_json,
)

from mamba_state.adapters import StatefulMambaLM  # noqa: E402

SECTION = "Continue from a state"


def _config(smoke: bool) -> dict:
    if smoke:
        return dict(d_model=64, n_layer=2, vocab_size=256, ssm_cfg={}, rms_norm=True, fused_add_norm=False,
                    residual_in_fp32=True, pad_vocab_size_multiple=8, tie_embeddings=True)
    return dict(LM_130M)

@torch.no_grad()  # prefill and continuation are inference: no autograd on either side
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, quick")
    p.add_argument("--device", default=None)
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8; smoke 1,2)")
    p.add_argument("--tokens", default=None, help="comma-separated N (default 256,2048,8192; smoke 16,64)")
    p.add_argument("--chunk", type=int, default=8192,
                   help="our continuation runs in chunks of at most this many tokens (default: one call up to 8192)")
    p.add_argument("--step-tokens", type=int, default=64, help="tokens over which upstream's step loop is timed")
    p.add_argument("--repeats", type=int, default=10,
                   help="timed rounds; each round runs our continuation, our prefill and upstream's forward in turn")
    p.add_argument("--write", action="store_true", help="with --smoke: still write the JSON and the doc section")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    batches = [int(b) for b in (args.batches or ("1,2" if args.smoke else "1,8")).split(",")]
    lengths = [int(n) for n in (args.tokens or ("16,64" if args.smoke else "256,2048,8192")).split(",")]
    cfg = _config(args.smoke)
    up, why_not = upstream_lm(cfg, device, dtype)
    if up is not None:
        lm = StatefulMambaLM(up)  # the same weights
    else:
        torch.manual_seed(0)
        lm = StatefulMambaLM.from_config(cfg, device=device, dtype=dtype)
    lm.eval()
    vocab = cfg["vocab_size"]
    rows, raw = [], []
    for B in batches:
        _, state = lm(torch.randint(0, vocab, (B, 128), device=device))
        for N in lengths:
            ids = torch.randint(0, vocab, (B, N), device=device)

            def ours_continue():
                s = state
                for a in range(0, N, args.chunk):
                    _, s = lm(ids[:, a:a + args.chunk], s, num_last_tokens=1)
                return s

            def ours_prefill():  # one call, as upstream's forward below
                return lm(ids, num_last_tokens=1)[1]

            k = min(N, args.step_tokens)
            if up is not None:
                from mamba_ssm.utils.generation import InferenceParams

                from mamba_state import set_model_state

                def up_steps():
                    ip = InferenceParams(max_seqlen=128 + N, max_batch_size=B)
                    set_model_state(up, state, ip)
                    for t in range(k):
                        up(ids[:, t:t + 1], inference_params=ip)
                        ip.seqlen_offset += 1

                t_step = median_time(up_steps, repeats=1) * N / k
                # in turns, so that the host's slow spells fall on both sides alike (short prefills are host-bound)
                t = interleaved_median_times({"cont": ours_continue, "pref": ours_prefill,
                                              "up": lambda: up(ids, num_last_tokens=1)}, repeats=args.repeats)
                t_cont, t_pref, t_up_pref = t["cont"], t["pref"], t["up"]
                baseline = "upstream step() loop"
            else:
                def our_steps():
                    s = state
                    for t in range(k):
                        _, s = lm.step(ids[:, t], s)

                t_step = median_time(our_steps, repeats=1) * N / k
                t = interleaved_median_times({"cont": ours_continue, "pref": ours_prefill}, repeats=args.repeats)
                t_cont, t_pref, t_up_pref = t["cont"], t["pref"], float("nan")
                baseline = "our step() loop"
            scaled = " (per-token x N)" if k < N else ""
            raw.append(dict(batch=B, tokens=N, ours_continue_s=t_cont, step_loop_s=t_step, step_loop_measured_tokens=k,
                            step_baseline=baseline, ours_prefill_s=t_pref, upstream_prefill_s=t_up_pref))
            rows.append([B, N, f"{t_cont * 1e3:.1f}", f"{t_step * 1e3:.0f}{scaled}", f"{t_cont / t_step:.4f}",
                         f"{t_pref * 1e3:.1f}", "n/a" if up is None else f"{t_up_pref * 1e3:.1f}",
                         "n/a" if up is None else f"{t_pref / t_up_pref:.2f}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    headers = ["batch", "N", "ours: continue (ms)", f"{'upstream' if up is not None else 'our'} step loop (ms)",
               "ours / step loop", "ours: prefill (ms)", "upstream forward (ms)", "ours / upstream prefill"]
    table = markdown_table(headers, rows)
    print(table)
    if not args.smoke or args.write:
        env = environment()
        shape = "tiny smoke model" if args.smoke else "130m-shaped model (d_model 768, 24 layers, vocab 50277)"
        note = "" if up is not None else f"\n\nUpstream columns not measured: {why_not}."
        body = (f"{environment_line(env)}\n\n{shape}, {str(dtype).replace('torch.', '')}, state from a 128-token "
                f"prefill. Targets: ours / upstream stepping <= 1/100 at N=2048; our prefill <= 1.2x upstream's "
                f"forward. Ours: the continuation runs from the state in chunks of at most {args.chunk} tokens, the "
                f"prefill in one call (as upstream's forward); both with `num_last_tokens=1`. Upstream's step loop "
                f"is timed over {args.step_tokens} tokens and scaled to N (its cost per token is constant)."
                f" Both sides run under `torch.no_grad()`. Medians of {args.repeats} rounds, each round timing our "
                f"continuation, our prefill and upstream's forward in turn (the short prefills are bound by the "
                f"host's Python, whose speed drifts: turns expose both sides to the same drift)."
                f"{note}\n\n{table}\n\n`python benchmarks/profile_prefill.py` shows where a forward's GPU time "
                f"goes (torch.profiler per kernel, and each piece of one layer alone); "
                f"`python benchmarks/profile_overhead.py` its host time (Python and launches).\n")
        write_json("bench_continue", {"config": cfg, "dtype": str(dtype), "results": raw}, env)
        replace_section(SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
