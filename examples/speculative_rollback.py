"""Speculative decoding with state rollback: verify draft tokens in one forward, keep the state at the last
accepted token, recompute nothing.

A recurrent model cannot "truncate its cache" after rejected draft tokens the way a Transformer drops KV entries:
its state after the rejected tokens has already absorbed them. ``StatefulMambaLM.forward(..., return_states_at=...)``
returns the state after every verified position from the same forward (the scan runs in segments cut at those
positions), so rolling back is picking one of them.

Greedy scheme, per round (``pending``: the newest token, already emitted, not yet fed to the target):

1. the draft model proposes ``k`` tokens after ``pending`` (one ``step`` each);
2. the target runs ``[pending, d_1..d_k]`` from its state in one forward, with the states after every position;
3. accept the longest prefix ``d_1..d_n`` that matches the target's own greedy choices; the target's choice after
   it becomes the next ``pending``; the target state rolls back to "after pending, d_1..d_n" (one list lookup).

The output is exactly the target's greedy decoding (checked at the end), with fewer sequential target calls.
Runs on CPU in seconds with tiny random models (the draft is the target with perturbed weights).

    python examples/speculative_rollback.py --new-tokens 48 --draft-len 4
"""

from __future__ import annotations

import argparse
import copy

import torch

from mamba_state import StatefulMambaLM


def greedy_reference(lm: StatefulMambaLM, prompt: torch.Tensor, n: int) -> list[int]:
    """The target's own greedy decoding, one token at a time (what speculative decoding must reproduce)."""
    logits, state = lm(prompt)
    out = []
    for _ in range(n):
        tok = logits[:, -1].argmax(-1)
        out.append(int(tok))
        logits, state = lm(tok[:, None], state)
    return out


def speculative(target: StatefulMambaLM, draft: StatefulMambaLM, prompt: torch.Tensor, n: int, k: int):
    """Greedy speculative decoding of at least ``n`` tokens with drafts of ``k`` tokens.

    Returns ``(tokens, stats, state)``: every emitted token (the last round may pass ``n``), and the target state
    before the last (pending) token.
    """
    # both models hold the state *before* the pending token
    pending = prompt[:, -1:]
    _, t_state = target(prompt[:, :-1]) if prompt.shape[1] > 1 else (None, target.new_state(1))
    _, d_state = draft(prompt[:, :-1]) if prompt.shape[1] > 1 else (None, draft.new_state(1))
    out: list[int] = []
    rounds = accepted_total = 0
    while len(out) < n:
        rounds += 1
        # 1. draft k tokens (keeping the draft's state after each fed token, for its own rollback)
        drafts, d_states, tok, s = [], [], pending, d_state
        for _ in range(k):
            logits, s = draft.step(tok, s)
            d_states.append(s)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            drafts.append(tok)
        proposal = torch.cat([pending, *drafts], dim=1)  # [1, 1 + k]
        # 2. verify all of them in one target forward, with the state after every position
        logits, _, states = target(proposal, t_state, return_states_at=range(1, k + 2))
        choice = logits.argmax(-1)[0]  # choice[i]: the target's token after proposal[:, : i + 1]
        # 3. accept the matching prefix; the target's next choice becomes the pending token
        n_ok = 0
        while n_ok < k and int(drafts[n_ok]) == int(choice[n_ok]):
            n_ok += 1
        accepted_total += n_ok
        out.extend(int(d) for d in drafts[:n_ok])
        out.append(int(choice[n_ok]))
        t_state = states[n_ok]  # after pending + d_1..d_n: rollback by lookup, nothing recomputed
        d_state = d_states[n_ok] if n_ok < k else draft.step(drafts[-1], d_states[-1])[1]
        pending = choice[n_ok].view(1, 1)
    stats = {"rounds": rounds, "target_forwards": rounds, "accepted_draft_tokens": accepted_total,
             "acceptance": accepted_total / (rounds * k)}
    return out, stats, t_state


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Greedy speculative decoding with Mamba state rollback.")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--draft-len", type=int, default=4)
    parser.add_argument("--noise", type=float, default=0.005,
                        help="draft = target + noise * std(tensor) * N(0, 1) per parameter tensor (default 0.005)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    cfg = dict(d_model=64, n_layer=2, vocab_size=64, ssm_cfg={"d_state": 8}, pad_vocab_size_multiple=8)
    target = StatefulMambaLM.from_config(cfg).eval()
    with torch.no_grad():  # at upstream's (tiny) initial scale a random model repeats one token: make it livelier
        for p in target.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    draft = copy.deepcopy(target)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(args.noise * p.std() * torch.randn_like(p))  # relative to each tensor's scale
    prompt = torch.randint(0, 64, (1, 12))

    with torch.no_grad():
        ref = greedy_reference(target, prompt, args.new_tokens)
        toks, stats, state = speculative(target, draft, prompt, args.new_tokens, args.draft_len)
        assert toks[: args.new_tokens] == ref, "speculative decoding must reproduce the target's greedy tokens"
        # the rolled-back state is the state of the accepted text: the same as running that text in one go
        text = torch.cat([prompt, torch.tensor([toks[:-1]])], dim=1)  # the last token is still pending
        _, direct = target(text)
        assert state.seqlen_offset == direct.seqlen_offset and state.layer_indices == direct.layer_indices
        for i in state.layer_indices:  # equal up to float32 rounding (relative to each tensor's scale)
            for a, b in ((state[i].conv_state, direct[i].conv_state), (state[i].ssm_state, direct[i].ssm_state)):
                assert (a - b).abs().max() <= 1e-5 * b.abs().max(), "rolled-back state differs from a direct run"
    print(f"{args.new_tokens} tokens, identical to greedy decoding; {stats['target_forwards']} target forwards "
          f"instead of {args.new_tokens}; draft acceptance {stats['acceptance']:.0%}")
    return stats


if __name__ == "__main__":
    main()
