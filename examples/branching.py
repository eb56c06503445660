"""Best-of-n from one prefilled prompt: prefill once, copy the state n ways, sample n continuations in one batch,
keep the most likely one and continue it.

Runs on the CPU in seconds with a tiny random model (the tokens are meaningless; the mechanics are the point):

    python examples/branching.py [--n 8] [--new 24]

Steps:

1. ``generate(prompt, max_new_tokens=0)`` consumes the prompt except its last token (the resume law: the state has
   consumed every token of ``.sequences`` but the last), so every branch samples its own first token.
2. ``MambaModelState.cat([state] * n)`` makes n copies of that state, one per batch row: no re-prefill.
3. One batched, sampled call (``do_sample=True``; generation is greedy by default) with one seed per row
   (``seed=[s_1, ..., s_n]``): row i's tokens depend only on ``s_i`` and the positions, so each branch is
   reproducible alone (checked below against a separate call).
4. Score each branch by the model's mean log-probability of its tokens (``output_scores=True`` returns the logits
   each token was drawn from; with temperature 1 and no filters they are the model's logits).
5. ``state.select(best)`` keeps the winner's state; resuming from it continues that branch exactly.
"""

from __future__ import annotations

import argparse
import time

import torch

from mamba_state import MambaModelState
from mamba_state.adapters import StatefulMambaLM

CONFIG = dict(d_model=64, n_layer=4, vocab_size=1000, d_intermediate=0, ssm_cfg={"d_state": 16}, rms_norm=True,
              fused_add_norm=True, residual_in_fp32=True, pad_vocab_size_multiple=8, tie_embeddings=True)


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8, help="number of branches")
    p.add_argument("--new", type=int, default=24, help="new tokens per branch")
    p.add_argument("--prompt", type=int, default=256, help="prompt length")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    lm = StatefulMambaLM.from_config(CONFIG).eval()
    prompt = torch.randint(0, CONFIG["vocab_size"], (1, args.prompt))

    # 1. prefill once (chunked forward); the last prompt token is left for the branches
    t0 = time.perf_counter()
    pre = lm.generate(prompt, max_new_tokens=0)
    t_prefill = time.perf_counter() - t0
    print(f"prefilled {pre.state.seqlen_offset} tokens in {t_prefill * 1e3:.1f} ms")

    # 2. n copies of the state, 3. n branches in one batch, one seed per row
    seeds = list(range(100, 100 + args.n))
    branches = MambaModelState.cat([pre.state] * args.n)
    last = prompt[:, -1:].expand(args.n, 1)
    t0 = time.perf_counter()
    out = lm.generate(last, state=branches, max_new_tokens=args.new, do_sample=True, seed=seeds,
                      output_scores=True)
    t_branch = time.perf_counter() - t0
    new = out.sequences[:, 1:]  # [n, new]

    # 4. mean log-probability of each branch's tokens
    logp = torch.stack([s.log_softmax(-1).gather(1, tok[:, None])[:, 0] for s, tok in zip(out.scores, new.T)], 1)
    score = logp.mean(1)
    best = int(score.argmax())
    for i in range(args.n):
        mark = "  <- best" if i == best else ""
        print(f"branch {i} (seed {seeds[i]}): mean log p = {score[i]:.3f}  tokens {new[i, :8].tolist()}...{mark}")
    print(f"{args.n} branches x {args.new} tokens in {t_branch * 1e3:.0f} ms, without re-reading the prompt")

    # the winning branch is reproducible alone: same seed, same state, batch of one
    alone = lm.generate(prompt[:, -1:], state=pre.state, max_new_tokens=args.new, do_sample=True,
                        seed=[seeds[best]])
    assert torch.equal(alone.sequences, out.sequences[best:best + 1]), "branch differs from its separate call"
    print(f"branch {best} re-generated alone: identical")

    # 5. continue the winner from its own state
    state = out.state.select(slice(best, best + 1))
    more = lm.generate(out.sequences[best:best + 1, -1:], state=state, max_new_tokens=8, do_sample=True,
                       seed=[seeds[best]])
    print(f"continued branch {best}: {more.sequences[0, 1:].tolist()} (state now at token {more.state.seqlen_offset})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
