"""Decode speed: ``StatefulMambaLM.generate`` (CUDA-graph decode step) vs upstream ``generate(cg=True)``.

GPU run (issue 5, item 5): a 130m-shaped ``MambaLMHeadModel`` (d_model 768, 24 layers, vocab 50277, bf16, random
init), one set of weights shared by upstream's model and ``StatefulMambaLM(model)`` in one process. For batch 1, 8
and 64, a 128-token prompt and 512 new tokens (greedy, no EOS, so every call produces exactly 512 tokens):

* time to first token (TTFT): prefill of the prompt + the first token (``max_new_tokens=1`` /
  ``max_length=prompt+1``);
* end-to-end time for 512 new tokens; decode tokens/s = batch x 511 / (end-to-end - TTFT), and overall
  tokens/s = batch x 512 / end-to-end (the figure upstream quotes: 765 tokens/s at batch 1, 6125 at batch 8).

Both sides are warmed up at each batch size first, so CUDA-graph capture (ours: once per batch size; upstream's:
once per batch size and max length) is excluded from the timings. Target: ours >= upstream at every batch size.
Writes ``benchmarks/results/generate_gpu.json`` and the "Generation" section of ``docs/benchmarks.md``. If
upstream (with its CUDA kernels) is not importable, ours is still timed on a model built by ``from_config``.

On a machine without CUDA the script prints a message and exits with status 0; ``--smoke`` runs a tiny model on
the CPU instead (to check the script; nothing is written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    LM_130M, environment, environment_line, markdown_table, median_time, replace_section, upstream_lm, write_json,
)

from mamba_state.adapters import StatefulMambaLM  # noqa: E402
from mamba_state import generation as G  # noqa: E402
from mamba_state.generation import generate  # noqa: E402

SECTION = "Generation"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _config(smoke: bool) -> dict:
    if smoke:
        return dict(d_model=32, n_layer=2, vocab_size=97, ssm_cfg={}, rms_norm=True, fused_add_norm=True,
                    residual_in_fp32=True, pad_vocab_size_multiple=8, tie_embeddings=True)
    return dict(LM_130M)

def _decode_path(lm, batch: int) -> dict:
    """Which decode step ours ran at this batch size (a failed capture or fused step falls back with a warning)."""
    graphs = [g for g in G._GRAPHS.get(lm, {}).values() if g is not None and g.ids.shape[0] == batch]
    return dict(ours_cuda_graph=bool(graphs), ours_fused_step=any(g.fused for g in graphs))


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, to check the script")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,64; smoke 1,2)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128; smoke 8)")
    p.add_argument("--new", type=int, default=None, help="new tokens (default 512; smoke 16)")
    p.add_argument("--state-dtype", choices=list(DTYPES), default="fp32", help="dtype of our decoding state")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--write", action="store_true", help="with --smoke: still write the JSON and the doc section")
    p.add_argument("--no-model-step", action="store_true", help="skip timing ours through lm.step (fused_step=False)")
    args = p.parse_args(argv)

    if not args.smoke and not torch.cuda.is_available():
        print("bench_generate: needs a CUDA GPU (decode under CUDA graphs vs upstream generate(cg=True)); "
              "nothing measured. Use --smoke to check the script on the CPU.")
        return 0
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    state_dtype = DTYPES[args.state_dtype]
    batches = [int(b) for b in (args.batches or ("1,2" if args.smoke else "1,8,64")).split(",")]
    prompt = args.prompt or (8 if args.smoke else 128)
    new = args.new or (16 if args.smoke else 512)
    cfg = _config(args.smoke)
    up, why_not = upstream_lm(cfg, device, dtype)
    if up is not None:
        lm = StatefulMambaLM(up, state_dtype=state_dtype).eval()  # the same weights
    else:
        torch.manual_seed(0)
        lm = StatefulMambaLM.from_config(cfg, device=device, dtype=dtype, state_dtype=state_dtype).eval()
    vocab = cfg["vocab_size"]

    rows, raw = [], []
    for B in batches:
        ids = torch.randint(0, vocab, (B, prompt), device=device)

        def ours(n, fused=None):
            return lambda: generate(lm, ids, max_new_tokens=n, temperature=0, fused_step=fused)

        out = ours(new)()  # warm-up: Triton compilation and the CUDA-graph capture for this batch size
        assert out.sequences.shape == (B, prompt + new)
        t_ttft = median_time(ours(1), repeats=args.repeats)
        t_all = median_time(ours(new), repeats=args.repeats)
        r = dict(batch=B, prompt=prompt, new_tokens=new, ours_ttft_s=t_ttft, ours_total_s=t_all,
                 ours_decode_tok_s=B * (new - 1) / max(t_all - t_ttft, 1e-9), ours_tok_s=B * new / t_all,
                 **_decode_path(lm, B))
        if not args.no_model_step:  # the same, decoding through lm.step (the general path) instead of the fused step
            ours(new, False)()
            t_model = median_time(ours(new, False), repeats=args.repeats)
            r.update(ours_model_step_total_s=t_model, ours_model_step_tok_s=B * new / t_model)
        if up is not None:
            def theirs(n):
                return lambda: up.generate(ids, max_length=prompt + n, cg=True, top_k=1, return_dict_in_generate=True)

            u_out = theirs(new)()  # warm-up: upstream captures its graph for (batch, max_length)
            assert u_out.sequences.shape == (B, prompt + new)
            u_ttft = median_time(theirs(1), repeats=args.repeats)
            u_all = median_time(theirs(new), repeats=args.repeats)
            agree = (out.sequences[:, prompt:] == u_out.sequences[:, prompt:]).float().mean().item()
            r.update(upstream_ttft_s=u_ttft, upstream_total_s=u_all,
                     upstream_decode_tok_s=B * (new - 1) / max(u_all - u_ttft, 1e-9), upstream_tok_s=B * new / u_all,
                     greedy_token_agreement=agree)
        raw.append(r)
        na = "n/a"
        rows.append([
            B, f"{r['ours_ttft_s'] * 1e3:.1f}", na if up is None else f"{r['upstream_ttft_s'] * 1e3:.1f}",
            f"{r['ours_tok_s']:.0f}", na if up is None else f"{r['upstream_tok_s']:.0f}",
            na if up is None else f"{r['ours_tok_s'] / r['upstream_tok_s']:.2f}",
            f"{r['ours_decode_tok_s']:.0f}", na if up is None else f"{r['upstream_decode_tok_s']:.0f}",
            f"{r['ours_model_step_tok_s']:.0f}" if "ours_model_step_tok_s" in r else na,
            na if up is None else f"{r['greedy_token_agreement']:.2f}",
        ])
        print(" | ".join(map(str, rows[-1])), flush=True)

    headers = ["batch", "TTFT ours (ms)", "TTFT upstream (ms)", f"tokens/s ours ({new} new)",
               "tokens/s upstream", "ours / upstream", "decode-only tokens/s ours", "decode-only upstream",
               "tokens/s ours via lm.step", "greedy tokens equal (fraction)"]
    table = markdown_table(headers, rows)
    print(table)
    if (not args.smoke or args.write) and not args.no_write:
        env = environment()
        note = "" if up is not None else f"\n\nUpstream columns not measured: {why_not}."
        paths = sorted({(r["ours_cuda_graph"], r["ours_fused_step"]) for r in raw})
        note += "\n\nOur decode path in this run: " + "; ".join(
            f"CUDA graph {'yes' if g else 'NO'}, fused step {'yes' if f else 'NO'}" for g, f in paths) + "."
        shape = "tiny smoke model" if args.smoke else "130m-shaped model (d_model 768, 24 layers, vocab 50277)"
        body = (f"{environment_line(env)}\n\n{shape}, random init, "
                f"{str(dtype).replace('torch.', '')} weights, our state in {args.state_dtype}; prompt {prompt} "
                f"tokens, {new} new tokens, greedy, no EOS. Ours: `StatefulMambaLM.generate` (chunked prefill, "
                f"decode step replayed as a CUDA graph; the fused decode step of `mamba_state.fused_decode` where the "
                f"model qualifies; the column 'via lm.step' decodes through the general "
                f"`StatefulMambaLM.step` instead, `fused_step=False`); upstream: `MambaLMHeadModel.generate(cg=True, top_k=1)` on "
                f"the same weights. Both warmed up at each batch size first: CUDA-graph capture is not in the "
                f"timings. tokens/s = batch x {new} / end-to-end time (TTFT included); decode-only = batch x "
                f"{new - 1} / (end-to-end - TTFT). Median of {args.repeats}. Target: ours >= upstream at every "
                f"batch size. The last column compares greedy tokens (random weights have near-ties, and the two "
                f"implementations round differently, so 1.00 is not expected).{note}\n\n{table}\n")
        write_json("generate_gpu", {"config": cfg, "dtype": str(dtype), "state_dtype": args.state_dtype,
                                    "results": raw}, env)
        replace_section(SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
