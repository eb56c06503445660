"""One Mamba-2 layer on a GPU: continue N tokens from a state, ours (one chunked call) vs upstream's step() loop,
and prefill from zero, ours vs upstream's fused forward. Prints one JSON line (and a markdown table).

Needs CUDA and mamba_ssm (with causal-conv1d for upstream's fused path). Usage:
    python benchmarks/bench_mamba2_layer.py [--d-model 768] [--batch 8] [--tokens 2048] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json

import torch


def cuda_time(fn, warmup: int = 2, iters: int = 5) -> float:
    """Median milliseconds of ``fn()`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--profile", action="store_true", help="also print the CUDA kernel time of our prefill")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    from mamba_ssm import Mamba2
    from mamba_ssm.utils.generation import InferenceParams

    from mamba_state.adapters.mamba2 import StatefulMamba2

    torch.manual_seed(0)
    up = Mamba2(args.d_model, d_state=128, headdim=64, layer_idx=0, device="cuda", dtype=dtype)
    ours = StatefulMamba2(up)
    B, N = args.batch, args.tokens
    x = torch.randn(B, N, args.d_model, device="cuda", dtype=dtype)
    prefix = torch.randn(B, 64, args.d_model, device="cuda", dtype=dtype)
    with torch.no_grad():
        _, state = ours(prefix)

        def ours_continue():
            ours(x, state)

        def upstream_step_loop():
            ip = InferenceParams(max_seqlen=N + 64, max_batch_size=B)
            ip.seqlen_offset = 1  # take upstream's step() path from its zero cache
            for t in range(N):
                up(x[:, t:t + 1], inference_params=ip)

        res = {
            "device": torch.cuda.get_device_name(), "d_model": args.d_model, "batch": B, "tokens": N,
            "dtype": args.dtype,
            "ours_continue_ms": cuda_time(ours_continue),
            "upstream_step_loop_ms": cuda_time(upstream_step_loop, warmup=1, iters=1),
            "ours_prefill_ms": cuda_time(lambda: ours(x)),
            "upstream_fused_prefill_ms": cuda_time(lambda: up(x)),
        }
        # the same two calls with our PyTorch conv instead of the causal_conv1d package's
        import mamba_state.adapters.mamba2 as m2

        saved = m2._causal_conv1d_fn
        m2._causal_conv1d_fn = lambda: None
        try:
            res["ours_continue_torch_conv_ms"] = cuda_time(ours_continue)
            res["ours_prefill_torch_conv_ms"] = cuda_time(lambda: ours(x))
        finally:
            m2._causal_conv1d_fn = saved
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                ours(x)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    res["continue_ratio"] = res["ours_continue_ms"] / res["upstream_step_loop_ms"]
    res["prefill_ratio"] = res["ours_prefill_ms"] / res["upstream_fused_prefill_ms"]
    print(json.dumps(res))
    print("| what | ms |\n| --- | --- |")
    for k in ("ours_continue_ms", "upstream_step_loop_ms", "ours_prefill_ms", "upstream_fused_prefill_ms",
              "ours_continue_torch_conv_ms", "ours_prefill_torch_conv_ms"):
        print(f"| {k} | {res[k]:.2f} |")


if __name__ == "__main__":
    main()
