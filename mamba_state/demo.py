"""``mamba-state demo``: the end-to-end job (README's first command).

By default, offline, in well under two minutes on a CPU (the default ``--device auto`` takes a GPU if there is one):

1. trains in-process a tiny Mamba LM (a :class:`StatefulMambaLM` built from config, no mamba_ssm needed) on a
   synthetic associative-recall language: ``key value`` pairs, then queries ``? key`` answered by the value;
2. checks that a long stream processed in chunks of random lengths (1 token and shorter than ``d_conv``
   included) equals one pass (max abs difference of logits and states);
3. saves the state reached after the key:value part, loads it in a fresh process (``python -c``) with the model
   read back from an upstream-format checkpoint, and checks that it answers the queries as the live model does,
   correctly, while a zero state does not;
4. times continuing from the state in one chunk vs token by token (``step``).

``--model DIR`` runs checks 2-4 on an upstream-format checkpoint (step 3 then compares the fresh process's
continuation with the live one and with a zero state); ``--device`` is ``auto`` by default (a GPU when torch sees
one, else the CPU; ``--device cpu`` forces the CPU). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._cli_util import CommandLineError, resolve_device
from .demo_cli import add_arguments  # the options live in a module without torch (fast --help); kept here too
from .state import MambaModelState

__all__ = ["add_arguments", "run", "RecallLanguage", "train_recall_model"]


# ---------------------------------------------------------------------------------------------- the language
@dataclass(frozen=True)
class RecallLanguage:
    """``k1 v1 k2 v2 ... kP vP ? kq vq ? kq' vq' ...``: P distinct keys with random values, then queries.

    Tokens: ``0`` is ``?``; keys ``1..n_keys`` print as letters; values follow and print as digits.
    """

    n_keys: int = 4
    n_values: int = 8
    n_pairs: int = 4
    n_queries: int = 8

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_keys + self.n_values

    def key(self, i: torch.Tensor) -> torch.Tensor:
        return 1 + i

    def value(self, i: torch.Tensor) -> torch.Tensor:
        return 1 + self.n_keys + i

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(context [B, 2P], queries [B, Q, 3] as '? k v', key->value table [B, n_keys] (-1 if absent))``."""
        keys = torch.argsort(torch.rand(batch, self.n_keys, generator=generator), 1)[:, : self.n_pairs]
        vals = torch.randint(0, self.n_values, (batch, self.n_pairs), generator=generator)
        context = torch.stack([self.key(keys), self.value(vals)], 2).reshape(batch, 2 * self.n_pairs)
        pick = torch.randint(0, self.n_pairs, (batch, self.n_queries), generator=generator)
        qk, qv = keys.gather(1, pick), vals.gather(1, pick)
        queries = torch.stack([torch.zeros_like(qk), self.key(qk), self.value(qv)], 2)
        table = torch.full((batch, self.n_keys), -1, dtype=torch.long).scatter_(1, keys, vals)
        return context, queries, table

    def render(self, tokens) -> str:
        out = []
        for t in [int(x) for x in tokens]:
            if t == 0:
                out.append("?")
            elif t <= self.n_keys:
                out.append("abcdefghijklmnopqrstuvwxyz"[t - 1])
            else:
                out.append(str(t - 1 - self.n_keys))
        return " ".join(out)


def _model_config(lang: RecallLanguage) -> dict:
    # One Mamba layer learns this recall within a few hundred steps (two layers take several times longer).
    return {"d_model": 32, "n_layer": 1, "d_intermediate": 0, "vocab_size": lang.vocab_size,
            "ssm_cfg": {"d_state": 16, "d_conv": 4, "expand": 2}, "rms_norm": True, "residual_in_fp32": True,
            "fused_add_norm": False, "pad_vocab_size_multiple": 8, "tie_embeddings": True}


def train_recall_model(lang: RecallLanguage, device: torch.device, seed: int, max_steps: int, max_seconds: float,
                       backend: str | None = None, log=print):
    """Train a tiny StatefulMambaLM on the language; returns ``(model, steps, seconds, train accuracy)``.

    Loss on the query answers only (the rest is random). Stops at ``max_steps``, ``max_seconds`` or once the
    mean answer accuracy of the last 20 batches exceeds 0.98.
    """
    from .adapters.lm import StatefulMambaLM

    torch.manual_seed(seed)
    lm = StatefulMambaLM.from_config(_model_config(lang), device=device, backend=backend)
    threads = torch.get_num_threads()
    if device.type == "cpu":  # tiny ops: one thread avoids oversubscription stalls on busy machines
        torch.set_num_threads(1)
    try:
        return _train(lm, lang, device, seed, max_steps, max_seconds, log)
    finally:
        torch.set_num_threads(threads)


def _train(lm, lang: RecallLanguage, device: torch.device, seed: int, max_steps: int, max_seconds: float, log):
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2, betas=(0.9, 0.98), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    P = 2 * lang.n_pairs
    answer_pos = torch.arange(P + 1, P + 3 * lang.n_queries, 3, device=device)  # the query key predicts the value
    recent: list[float] = []
    start = time.perf_counter()
    step = 0
    for step in range(1, max_steps + 1):
        context, queries, _ = lang.sample(32, gen)
        seq = torch.cat([context, queries.flatten(1)], 1).to(device)
        logits, _ = lm(seq[:, :-1])
        pred, target = logits[:, answer_pos], seq[:, 1:][:, answer_pos]
        loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1))
        for group in opt.param_groups:
            group["lr"] = 1e-2 * min(1.0, step / 30)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent = (recent + [(pred.argmax(-1) == target).float().mean().item()])[-20:]
        if step % 100 == 0:
            log(f"  step {step:5d}  loss {loss.item():.3f}  answer accuracy {sum(recent) / len(recent):.2f}  "
                f"({time.perf_counter() - start:.0f} s)")
        if len(recent) == 20 and sum(recent) / 20 > 0.98:
            break
        if time.perf_counter() - start > max_seconds:
            break
    lm.eval()
    return lm, step, time.perf_counter() - start, sum(recent) / max(1, len(recent))


# ---------------------------------------------------------------------------------------------- checks
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_state_diff(a: MambaModelState, b: MambaModelState) -> float:
    return max(max((sa.conv_state - b[i].conv_state).abs().max().item(),
                   (sa.ssm_state - b[i].ssm_state).abs().max().item()) for i, sa in a.items())


@torch.no_grad()
def check_chunks(lm, vocab: int, tokens: int, device: torch.device, gen: torch.Generator) -> tuple[bool, str]:
    """A long stream in chunks of random lengths (1 and < d_conv included) vs one pass."""
    ids = torch.randint(0, vocab, (2, tokens), generator=gen).to(device)
    full, s_full = lm(ids)
    sizes = [1, 2, 3]
    while sum(sizes) < tokens:
        sizes.append(int(torch.randint(1, 200, (1,), generator=gen)))
    sizes[-1] -= sum(sizes) - tokens
    sizes = [s for s in sizes if s > 0]
    state, parts, pos = None, [], 0
    for size in sizes:
        out, state = lm(ids[:, pos:pos + size], state)
        parts.append(out)
        pos += size
    assert state is not None  # sizes is never empty
    d_logits = (torch.cat(parts, 1) - full).abs().max().item()
    d_state = _max_state_diff(state, s_full)
    scale = max(1.0, full.abs().max().item())
    tol = (1e-4 if full.dtype == torch.float32 else 3e-2) * scale
    ok = d_logits <= tol and d_state <= tol and state.seqlen_offset == tokens
    return ok, (f"{tokens} tokens x batch 2 in {len(sizes)} chunks of 1..199 tokens vs one pass: max |logits diff| "
                f"{d_logits:.2e}, max |state diff| {d_state:.2e} (tolerance {tol:.0e})")


_CHILD = r"""
import json, sys, torch
import mamba_state as ms
from mamba_state.adapters import StatefulMambaLM
from safetensors.torch import load_file, save_file
model_dir, state_path, probe_path, out_path, device = sys.argv[1:6]
lm = StatefulMambaLM.from_pretrained(model_dir, device=device).eval()
state = ms.MambaModelState.load(state_path, device=device, model=lm)
probes = load_file(probe_path)["probes"].to(device)        # [B, Q, T]: each probe continues the saved state
zero = lm.new_state(state.batch_size, device=device)
with torch.no_grad():
    from_state = torch.stack([lm(probes[:, q], state)[0] for q in range(probes.shape[1])], 1)
    from_zero = torch.stack([lm(probes[:, q], zero)[0] for q in range(probes.shape[1])], 1)
save_file({"from_state": from_state.float().cpu().contiguous(), "from_zero": from_zero.float().cpu().contiguous()},
          out_path)
print(json.dumps({"layers": len(state), "seqlen_offset": state.seqlen_offset}))
"""


def _fresh_process(model_dir: str, state: MambaModelState, lm, probes: torch.Tensor, tmp: str, device: str):
    """Save ``state``, then run the probes from it (and from zeros) in a new Python process."""
    from safetensors.torch import load_file, save_file

    state_path = os.path.join(tmp, "state.safetensors")
    probe_path = os.path.join(tmp, "probes.safetensors")
    out_path = os.path.join(tmp, "child_logits.safetensors")
    state.save(state_path, model=lm)
    save_file({"probes": probes.cpu().contiguous()}, probe_path)
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", _CHILD, model_dir, state_path, probe_path, out_path, device],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the fresh process failed:\n{proc.stderr.strip()[-2000:]}")
    out = load_file(out_path)
    timings = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["from_state"], out["from_zero"], os.path.getsize(state_path), timings


@torch.no_grad()
def check_recall_in_fresh_process(lm, lang: RecallLanguage, model_dir: str, device: torch.device,
                                  gen: torch.Generator, tmp: str, log=print) -> tuple[bool, str]:
    """State after the key:value part -> disk -> fresh process -> answers to queries.

    The answers are compared with the live model's and with those from a zero state.
    """
    n = 64
    context, queries, table = lang.sample(n, gen)
    _, state = lm(context.to(device))  # the state after the key:value part
    probes = queries[:, :, :2]  # '? k' -> the next token should be the value
    live = torch.stack([lm(probes[:, q].to(device), state)[0] for q in range(probes.shape[1])], 1).float().cpu()
    from_state, from_zero, nbytes, info = _fresh_process(model_dir, state, lm, probes, tmp, str(device))
    answer = queries[:, :, 2]
    acc_state = (from_state[:, :, -1].argmax(-1) == answer).float().mean().item()
    acc_zero = (from_zero[:, :, -1].argmax(-1) == answer).float().mean().item()
    same = (from_state - live).abs().max().item()
    chance = 1.0 / lang.n_values
    example = lang.render(context[0]) + " | " + lang.render(probes[0, 0]) + " -> " + \
        lang.render([from_state[0, 0, -1].argmax().item()]) + f" (expected {lang.render([answer[0, 0].item()])})"
    log(f"  example: {example}")
    ok = same <= 1e-5 * max(1.0, live.abs().max().item()) and acc_state >= 0.9 and acc_zero <= chance + 0.25
    return ok, (f"state after the key:value part saved ({nbytes} bytes, seqlen_offset {info['seqlen_offset']}) and "
                f"loaded in a fresh process: answers {acc_state:.0%} of {answer.numel()} queries correctly "
                f"(live model: same logits, max diff {same:.1e}); from a zero state: {acc_zero:.0%} "
                f"(chance {chance:.0%})")


@torch.no_grad()
def check_probe_in_fresh_process(lm, vocab: int, model_dir: str, device: torch.device, gen: torch.Generator,
                                 tmp: str) -> tuple[bool, str]:
    """For any checkpoint: the fresh process continues the saved state exactly as the live model; zeros differ."""
    prefix = torch.randint(0, vocab, (2, 64), generator=gen).to(device)
    probes = torch.randint(0, vocab, (2, 2, 8), generator=gen)
    _, state = lm(prefix)
    live = torch.stack([lm(probes[:, q].to(device), state)[0] for q in range(2)], 1).float().cpu()
    from_state, from_zero, nbytes, _ = _fresh_process(model_dir, state, lm, probes, tmp, str(device))
    same = (from_state - live).abs().max().item()
    differ = (from_zero - live).abs().max().item()
    tol = 1e-5 * max(1.0, live.abs().max().item())
    ok = same <= tol and differ > 100 * max(tol, 1e-6)
    return ok, (f"state after 64 tokens saved ({nbytes} bytes), loaded in a fresh process: continuation logits "
                f"equal the live model's (max diff {same:.1e}); from a zero state they differ by up to {differ:.2f}")


@torch.no_grad()
def time_continuation(lm, vocab: int, tokens: int, device: torch.device, gen: torch.Generator) -> tuple[bool, str]:
    """Continue ``tokens`` tokens from a state: one chunked call vs ``step`` per token (same results)."""
    _, state = lm(torch.randint(0, vocab, (1, 32), generator=gen).to(device))
    ids = torch.randint(0, vocab, (1, tokens), generator=gen).to(device)
    lm(ids, state)  # warm-up at the timed shapes (Triton compiles per shape on a GPU)
    lm.step(ids[:, 0], state)
    _sync(device)
    t0 = time.perf_counter()
    chunk_logits, chunk_state = lm(ids, state)
    _sync(device)
    t_chunk = time.perf_counter() - t0
    t0 = time.perf_counter()
    s, outs = state, []
    for t in range(tokens):
        out, s = lm.step(ids[:, t], s)
        outs.append(out)
    _sync(device)
    t_step = time.perf_counter() - t0
    diff = (torch.stack(outs, 1) - chunk_logits).abs().max().item()
    tol = (1e-4 if chunk_logits.dtype == torch.float32 else 3e-2) * max(1.0, chunk_logits.abs().max().item())
    return diff <= tol, (f"continue {tokens} tokens from a state: one chunk {t_chunk * 1e3:.1f} ms, token by token "
                         f"{t_step * 1e3:.0f} ms ({t_step / max(t_chunk, 1e-9):.1f}x the time); same logits "
                         f"(max diff {diff:.1e})")


# ---------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> int:
    from .adapters.lm import StatefulMambaLM

    t_start = time.perf_counter()
    try:
        device = resolve_device(getattr(args, "device", "auto"))
    except CommandLineError as exc:
        print(f"mamba-state demo: error: {exc}", file=sys.stderr)
        return 2
    backend = getattr(args, "backend", None)
    gen = torch.Generator().manual_seed(args.seed + 7)
    results: list[tuple[str, bool, str]] = []
    with tempfile.TemporaryDirectory(prefix="mamba-state-demo-") as tmp:
        if args.model:
            lm = StatefulMambaLM.from_pretrained(args.model, device=device, backend=backend).eval()
            model_dir, lang = args.model, None
            n_params = sum(p.numel() for p in lm.parameters())
            print(f"loaded {args.model}: {len(lm.layer_indices)} layers, d_model {lm.config['d_model']}, "
                  f"{n_params:,} parameters, on {device}")
        else:
            lang = RecallLanguage()
            print(f"training a tiny Mamba LM on an associative-recall language ({lang.n_pairs} key:value pairs of "
                  f"{lang.n_keys} keys and {lang.n_values} values, then '? key' queries), on {device}")
            lm, steps, secs, acc = train_recall_model(lang, device, args.seed, args.train_steps, args.train_seconds,
                                                      backend=backend)
            print(f"  trained {steps} steps in {secs:.0f} s; answer accuracy on the last batches {acc:.0%}")
            model_dir = args.save_model or os.path.join(tmp, "model")
            lm.save_pretrained(model_dir)
            print(f"  model written in upstream's format to {model_dir}" if args.save_model else
                  "  model written in upstream's format to a temporary directory")
        vocab = int(lm.config["vocab_size"])
        ok, msg = check_chunks(lm, vocab, args.stream_tokens, device, gen)
        results.append(("chunks == one pass", ok, msg))
        if lang is not None:
            ok, msg = check_recall_in_fresh_process(lm, lang, model_dir, device, gen, tmp)
            results.append(("saved state answers the query", ok, msg))
        else:
            ok, msg = check_probe_in_fresh_process(lm, vocab, model_dir, device, gen, tmp)
            results.append(("saved state continues in a fresh process", ok, msg))
        ok, msg = time_continuation(lm, vocab, args.continue_tokens, device, gen)
        results.append(("continue in chunks vs token by token", ok, msg))
    print()
    for name, ok, msg in results:
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {msg}")
    failed = [name for name, ok, _ in results if not ok]
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed in {time.perf_counter() - t_start:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
