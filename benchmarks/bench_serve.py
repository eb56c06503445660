"""Serving: time to first token from a cached prefix, continuous-batching decode throughput, a multi-turn chat trace.

GPU run (issue 19, item 5): a 130m-shaped model (d_model 768, 24 layers, vocab 50277, bf16 weights, float32
states, random init) behind :class:`mamba_state.serve.Engine` and :class:`mamba_state.cache.StateCache`, all in
one process, the engine stepped in this thread (no HTTP):

(a) TTFT of a 4096-token prompt whose first 4000 tokens are cached (the state at 4000 inserted by
    ``StateCache.fill``) vs the same prompt cold (nothing cached): ``submit`` to the first token, greedy. Every
    repeat uses a new 96-token tail (warm) or a new prompt (cold), so no repeat hits what the previous inserted.
    Target: >= 10x faster.
(b) decode throughput with 64 concurrent sessions (128-token prompts, 256 new tokens each, greedy) through the
    engine, vs 64 sequential ``generate`` calls (batch 1 each) and vs one static batch of 64
    (``generate`` on ``[64, 128]``). End to end (prefills included) and decode only. Target: engine >= 0.8x the
    static batch's tokens/s. The engine is configured for the workload as ``generate`` is: every prompt admitted
    in the first step (``prefill_tokens_per_step``) and prefilled in one packed forward (``prefill_chunk_size``
    64 x 128, where the default 2048 makes four).
(c) a multi-turn chat trace: 8 conversations x 6 turns; each turn's prompt is the whole conversation so far (its
    prompts and replies) plus 64-192 new tokens, 64 new tokens per reply, the 8 conversations' turns submitted
    together. Cache hit rate (lookups that hit; prompt tokens served from the cache) and mean TTFT per turn, with
    the cache vs without it (budgets 0).
(d) a burst: N requests (``--burst``, default 64) with prompts of mixed lengths (log-uniform in 16-2048 tokens,
    nothing cached) submitted at once, one new token each, greedy, all admitted in one engine step: TTFT (mean,
    median, the last request's) with packed prefill (``Engine(packed_prefill=True)``: packed forwards of at most
    ``prefill_chunk_size`` tokens) vs one request at a time (``packed_prefill=False``, short prompts through the
    prefill graphs). New prompts every repeat.

Writes ``benchmarks/results/serve_gpu.json`` and the "Serving" section of ``docs/benchmarks.md``. Without CUDA
the script says so and exits 0; ``--quick`` runs every part at tiny sizes on the CPU to check the script (nothing
written unless ``--write``, then to ``serve_quick.json``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, cast

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LM_130M, environment, environment_line, markdown_table, replace_section, write_json  # noqa: E402

from mamba_state.adapters import StatefulMambaLM  # noqa: E402
from mamba_state.cache import StateCache  # noqa: E402
from mamba_state.generation import generate  # noqa: E402
from mamba_state.serve import Engine  # noqa: E402

SECTION = "Serving"
TINY = dict(d_model=32, n_layer=2, vocab_size=97, ssm_cfg={}, rms_norm=True, fused_add_norm=True,
            residual_in_fp32=True, pad_vocab_size_multiple=8, tie_embeddings=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _ids(n: int, vocab: int, gen: torch.Generator) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


# ---------------------------------------------------------------------------------------------- (a) TTFT
def bench_ttft(lm, vocab: int, prompt: int, cached: int, repeats: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(1)
    cache = StateCache(lm, device=device)
    engine = Engine(lm, cache, max_batch=1)
    prefix = _ids(cached, vocab, gen)
    cache.fill(lm, prefix, num_last_tokens=1)  # the state at `cached`

    def one(ids: list[int]) -> tuple[float, int]:
        _sync(device)
        t0 = time.perf_counter()
        h = engine.submit(ids, max_new_tokens=1)
        engine.run_until_idle()
        h.result()
        assert h.first_token_at is not None
        return h.first_token_at - t0, h.cached_tokens

    for _ in range(2):  # warm-up: kernels, allocator, both paths
        one(_ids(prompt, vocab, gen))
        one(prefix + _ids(prompt - cached, vocab, gen))
    cold, warm, hits = [], [], []
    for _ in range(repeats):
        cold.append(one(_ids(prompt, vocab, gen))[0])
        t, n = one(prefix + _ids(prompt - cached, vocab, gen))
        warm.append(t)
        hits.append(n)
    assert all(n == cached for n in hits), hits
    c, w = statistics.median(cold), statistics.median(warm)
    return dict(prompt=prompt, cached=cached, cold_ttft_s=c, cached_ttft_s=w, speedup=c / w, repeats=repeats)


# ---------------------------------------------------------------------------------------------- (b) decode
def bench_decode(lm, vocab: int, sessions: int, prompt: int, new: int, device: torch.device,
                 sequential: bool) -> dict:
    gen = torch.Generator().manual_seed(2)
    prompts = [_ids(prompt, vocab, gen) for _ in range(sessions)]
    batch_ids = torch.tensor(prompts, device=device)

    def engine_run(cache_budget: int = 0) -> tuple[float, float, list[list[int]]]:
        engine = Engine(lm, StateCache(lm, device_bytes=cache_budget, host_bytes=0, device=device),
                        max_batch=sessions, prefill_tokens_per_step=sessions * prompt,
                        prefill_chunk_size=sessions * prompt)
        _sync(device)
        t0 = time.perf_counter()
        handles = [engine.submit(p, max_new_tokens=new) for p in prompts]
        engine.step()  # admits (prefills) every session and runs the first decode step
        _sync(device)
        t1 = time.perf_counter()
        engine.run_until_idle()
        _sync(device)
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1, [h.result() for h in handles]

    def static_run(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        out = generate(lm, batch_ids, max_new_tokens=n, temperature=0)
        _sync(device)
        assert out.sequences.shape == (sessions, prompt + n)
        return time.perf_counter() - t0

    engine_run()  # warm-up: one CUDA graph per bucket size
    static_run(new)
    static_run(1)
    e_total, e_decode, e_tokens = engine_run()
    s_total, s_ttft = static_run(new), static_run(1)
    static = generate(lm, batch_ids, max_new_tokens=new, temperature=0).sequences[:, prompt:].tolist()
    agree = sum(a == b for ea, sa in zip(e_tokens, static) for a, b in zip(ea, sa)) / (sessions * new)
    out = dict(sessions=sessions, prompt=prompt, new_tokens=new, engine_total_s=e_total,
               engine_tok_s=sessions * new / e_total, engine_decode_tok_s=sessions * (new - 1) / e_decode,
               static_total_s=s_total, static_tok_s=sessions * new / s_total,
               static_decode_tok_s=sessions * (new - 1) / max(s_total - s_ttft, 1e-9),
               greedy_token_agreement_engine_vs_static=agree)
    if sequential:
        generate(lm, batch_ids[:1], max_new_tokens=new, temperature=0)  # warm-up at batch 1
        _sync(device)
        t0 = time.perf_counter()
        for i in range(sessions):
            generate(lm, batch_ids[i:i + 1], max_new_tokens=new, temperature=0)
        _sync(device)
        out.update(sequential_total_s=time.perf_counter() - t0)
        out["sequential_tok_s"] = sessions * new / out["sequential_total_s"]
    out["engine_over_static"] = out["engine_tok_s"] / out["static_tok_s"]
    out["engine_decode_over_static_decode"] = out["engine_decode_tok_s"] / out["static_decode_tok_s"]
    return out


# ---------------------------------------------------------------------------------------------- (c) chat trace
def bench_chat(lm, vocab: int, conversations: int, turns: int, new: int, user: tuple[int, int],
               device: torch.device) -> dict:
    def run(with_cache: bool) -> dict:
        gen = torch.Generator().manual_seed(3)
        budget: dict[str, Any] = {} if with_cache else dict(device_bytes=0, host_bytes=0)
        cache = StateCache(lm, device=device, **budget)
        engine = Engine(lm, cache, max_batch=conversations)
        convo: list[list[int]] = [[] for _ in range(conversations)]
        ttft: list[list[float]] = []
        prompt_tokens = cached_tokens = 0
        t0 = time.perf_counter()
        for _ in range(turns):
            handles = []
            for c in range(conversations):
                n = int(torch.randint(user[0], user[1] + 1, (1,), generator=gen))
                convo[c] = convo[c] + _ids(n, vocab, gen)
                handles.append(engine.submit(convo[c], max_new_tokens=new))
            engine.run_until_idle()
            row = []
            for c, h in enumerate(handles):
                convo[c] = convo[c] + h.result()
                assert h.first_token_at is not None
                row.append(h.first_token_at - h.submitted_at)
                prompt_tokens += h.prompt_tokens
                cached_tokens += h.cached_tokens
            ttft.append(row)
        total = time.perf_counter() - t0
        s = cache.stats()
        lookups = s["hits"] + s["misses"]
        return dict(mean_ttft_s_per_turn=[statistics.mean(r) for r in ttft],
                    mean_ttft_s=statistics.mean(t for r in ttft for t in r), total_s=total,
                    hit_rate=s["hits"] / lookups if lookups else 0.0,
                    cached_token_fraction=cached_tokens / prompt_tokens, final_conversation_tokens=len(convo[0]),
                    cache_bytes=s["bytes"])

    run(True)  # warm-up
    warm, cold = run(True), run(False)
    return dict(conversations=conversations, turns=turns, new_tokens=new, user_tokens=list(user), cached=warm,
                uncached=cold, ttft_speedup=cold["mean_ttft_s"] / warm["mean_ttft_s"])


# ---------------------------------------------------------------------------------------------- (d) burst
def bench_burst(lm, vocab: int, requests: int, lengths: tuple[int, int], repeats: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(4)
    lo, hi = lengths

    def prompts() -> list[list[int]]:
        u = torch.rand(requests, generator=gen)
        ns = torch.exp(torch.log(torch.tensor(float(lo))) + u * (torch.log(torch.tensor(float(hi))) -
                                                                 torch.log(torch.tensor(float(lo)))))
        return [_ids(int(n), vocab, gen) for n in ns.round().long().tolist()]

    def run(packed: bool, batch: list[list[int]]) -> tuple[list[float], list[int], dict]:
        engine = Engine(lm, StateCache(lm, device=device), max_batch=requests, packed_prefill=packed,
                        prefill_tokens_per_step=sum(len(p) for p in batch))
        _sync(device)
        handles = [engine.submit(p, max_new_tokens=1) for p in batch]
        engine.run_until_idle()
        ttft = []
        for h in handles:
            h.result()
            assert h.first_token_at is not None
            ttft.append(h.first_token_at - h.submitted_at)
        return ttft, [h.tokens[0] for h in handles], engine.stats()

    for packed in (True, False):  # warm-up: kernels, graphs, allocator
        run(packed, prompts())
    out: dict = dict(requests=requests, lengths=list(lengths), repeats=repeats)
    stats: dict[bool, list[float]] = {True: [], False: []}
    means: dict[bool, list[float]] = {True: [], False: []}
    agree = total = 0
    seqs_per_batch = []
    for _ in range(repeats):
        batch = prompts()
        results = {packed: run(packed, batch) for packed in (True, False)}
        for packed, (ttft, _, _) in results.items():
            means[packed].append(statistics.mean(ttft))
            stats[packed].extend(ttft)
        agree += sum(a == b for a, b in zip(results[True][1], results[False][1]))
        total += requests
        st = results[True][2]
        seqs_per_batch.append(st["prefill_batch_sequences"] / max(st["prefill_batches"], 1))
        out.setdefault("prompt_tokens", []).append(sum(len(p) for p in batch))
    for packed, name in ((True, "packed"), (False, "one_at_a_time")):
        out[f"{name}_mean_ttft_s"] = statistics.median(means[packed])
        out[f"{name}_median_ttft_s"] = statistics.median(stats[packed])
        out[f"{name}_last_ttft_s"] = max(stats[packed]) if repeats == 1 else statistics.median(
            [max(stats[packed][i * requests:(i + 1) * requests]) for i in range(repeats)])
    out["mean_ttft_speedup"] = out["one_at_a_time_mean_ttft_s"] / out["packed_mean_ttft_s"]
    out["last_ttft_speedup"] = out["one_at_a_time_last_ttft_s"] / out["packed_last_ttft_s"]
    out["sequences_per_packed_forward"] = statistics.mean(seqs_per_batch)
    out["first_token_agreement"] = agree / total
    return out


# ---------------------------------------------------------------------------------------------- main
@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", "--tiny", action="store_true", help="tiny model and sizes on the CPU")
    p.add_argument("--parts", default="a,b,c,d", help="which parts to run (comma-separated of a, b, c, d)")
    p.add_argument("--burst", type=int, default=None, help="(d): requests arriving at once (default 64; quick 6)")
    p.add_argument("--repeats", type=int, default=None, help="TTFT repeats (default 10; quick 2)")
    p.add_argument("--no-sequential", action="store_true", help="(b): skip the 64 sequential generate calls")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--write", action="store_true", help="with --quick: write serve_quick.json (never the doc)")
    args = p.parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        print("bench_serve: needs a CUDA GPU (the 130m-shaped model); nothing measured. Use --quick to check the "
              "script on the CPU.")
        return 0
    device = torch.device("cpu" if args.quick else "cuda")
    cfg = TINY if args.quick else dict(LM_130M)
    torch.manual_seed(0)
    lm = StatefulMambaLM.from_config(cfg, device=device, dtype=torch.float32 if args.quick else torch.bfloat16
                                     ).eval()
    vocab = int(cast(int, cfg["vocab_size"]))
    parts = set(args.parts.split(","))
    q = args.quick
    result: dict = {"model": "tiny (quick)" if q else "130m-shaped, bf16 weights, float32 states"}
    if "a" in parts:
        result["ttft"] = bench_ttft(lm, vocab, 64 if q else 4096, 56 if q else 4000, args.repeats or (2 if q else 10),
                                    device)
        print("(a)", result["ttft"], flush=True)
    if "b" in parts:
        result["decode"] = bench_decode(lm, vocab, 4 if q else 64, 8 if q else 128, 8 if q else 256, device,
                                        sequential=not args.no_sequential)
        print("(b)", result["decode"], flush=True)
    if "c" in parts:
        result["chat"] = bench_chat(lm, vocab, 2 if q else 8, 3 if q else 6, 4 if q else 64,
                                    (4, 8) if q else (64, 192), device)
        print("(c)", {k: v for k, v in result["chat"].items()}, flush=True)

    if "d" in parts:
        result["burst"] = bench_burst(lm, vocab, args.burst or (6 if q else 64), (2, 24) if q else (16, 2048),
                                      args.repeats or (2 if q else 5), device)
        print("(d)", result["burst"], flush=True)

    tables = []
    if "ttft" in result:
        a = result["ttft"]
        tables.append(f"(a) Time to first token, {a['prompt']}-token prompt (median of {a['repeats']}); target "
                      ">= 10x\n\n" + markdown_table(
                          ["cold (ms)", f"first {a['cached']} tokens cached (ms)", "speedup"],
                          [[f"{a['cold_ttft_s'] * 1e3:.2f}", f"{a['cached_ttft_s'] * 1e3:.2f}",
                            f"{a['speedup']:.1f}x"]]))
    if "decode" in result:
        b = result["decode"]
        rows = [["engine (continuous batching)", f"{b['engine_tok_s']:.0f}", f"{b['engine_decode_tok_s']:.0f}"],
                ["one static batch (`generate`)", f"{b['static_tok_s']:.0f}", f"{b['static_decode_tok_s']:.0f}"]]
        if "sequential_tok_s" in b:
            rows.append([f"{b['sessions']} sequential `generate` calls", f"{b['sequential_tok_s']:.0f}", "-"])
        tables.append(f"(b) Decode, {b['sessions']} sessions x {b['new_tokens']} new tokens ({b['prompt']}-token "
                      f"prompts, greedy; the engine admits and prefills them all in its first step, one packed "
                      f"forward); engine / static = {b['engine_over_static']:.2f} end to end, "
                      f"{b['engine_decode_over_static_decode']:.2f} decode only (target >= 0.8); greedy tokens "
                      f"equal between engine and static batch: {b['greedy_token_agreement_engine_vs_static']:.3f}"
                      "\n\n" + markdown_table(["contender", "tokens/s end to end", "tokens/s decode only"], rows))
    if "chat" in result:
        c = result["chat"]
        rows = [[name, f"{r['hit_rate']:.2f}", f"{r['cached_token_fraction']:.2f}", f"{r['mean_ttft_s'] * 1e3:.2f}",
                 " / ".join(f"{t * 1e3:.1f}" for t in r["mean_ttft_s_per_turn"])]
                for name, r in (("with the state cache", c["cached"]), ("without (budgets 0)", c["uncached"]))]
        tables.append(f"(c) Multi-turn chat trace: {c['conversations']} conversations x {c['turns']} turns, "
                      f"{c['user_tokens'][0]}-{c['user_tokens'][1]} new prompt tokens and {c['new_tokens']} reply "
                      f"tokens per turn (conversation length at the end: "
                      f"{c['cached']['final_conversation_tokens']}); mean TTFT {c['ttft_speedup']:.1f}x faster "
                      "with the cache\n\n" + markdown_table(
                          ["run", "lookup hit rate", "prompt tokens from cache", "mean TTFT (ms)",
                           "mean TTFT per turn (ms)"], rows))
    if "burst" in result:
        d = result["burst"]
        rows = [[name, f"{d[k + '_mean_ttft_s'] * 1e3:.2f}", f"{d[k + '_median_ttft_s'] * 1e3:.2f}",
                 f"{d[k + '_last_ttft_s'] * 1e3:.2f}"]
                for name, k in (("packed prefill", "packed"), ("one request at a time", "one_at_a_time"))]
        tables.append(f"(d) Burst: {d['requests']} requests arriving at once, prompts of "
                      f"{d['lengths'][0]}-{d['lengths'][1]} tokens (log-uniform, mean "
                      f"{statistics.mean(d['prompt_tokens']) / d['requests']:.0f}), nothing cached, one new token "
                      f"each (medians over {d['repeats']} bursts); packed: {d['mean_ttft_speedup']:.2f}x faster mean "
                      f"TTFT, {d['last_ttft_speedup']:.2f}x faster last TTFT, "
                      f"{d['sequences_per_packed_forward']:.1f} sequences per packed forward; first tokens equal "
                      f"between the two: {d['first_token_agreement']:.3f}\n\n" + markdown_table(
                          ["prefill", "mean TTFT (ms)", "median TTFT (ms)", "last TTFT (ms)"], rows))
    body = "\n\n".join(tables)
    print(body)
    if args.no_write or (q and not args.write):
        return 0
    env = environment()
    path = write_json("serve_quick" if q else "serve_gpu", result, env)
    print(f"wrote {path}")
    if not q:
        intro = ("`benchmarks/bench_serve.py` (issue 19): `mamba_state.serve.Engine` over "
                 "`mamba_state.cache.StateCache`, the engine stepped in the benchmark's thread (no HTTP), "
                 + result["model"] + ". " + environment_line(env)
                 + (f" Commit {os.environ['MAMBA_STATE_COMMIT']}." if os.environ.get("MAMBA_STATE_COMMIT") else ""))
        replace_section(SECTION, intro + "\n\n" + body)
        print("updated docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
