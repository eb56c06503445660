"""Choosing each request's next token from a batch of logits, exactly as a solo ``generate`` would.

Each request keeps its own resolved sampling options, seed and repetition-penalty set. The draw for the token at
absolute position ``p`` of a request seeded with ``s`` uses the generator seeded with ``step_seed(s, p)`` (the
generation layer's rule, :mod:`mamba_state.generation.sampling`), so a request's tokens do not depend on which
other requests share the batch, nor on which row it sits in. Rows decoded greedily without a repetition penalty
are chosen together (one argmax over the batch); every other row goes through the generation layer's own
``_process`` and ``_choose`` with a batch of one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import StateError
from ..generation.sampling import SamplingConfig, _choose, _process, _Sampling, _sampling_config

__all__ = ["RowSampler", "choose_tokens"]


@dataclass
class RowSampler:
    """One request's token choice.

    Attributes:
        cfg: the resolved options (greedy or not, temperature, filters, penalty, vocabulary size).
        seed: None (the device's global generator) or an int keying every draw by position.
        seen: bool ``[vocab + 1]`` tokens seen so far (only with a repetition penalty; the extra column absorbs
            ids outside the vocabulary), else None.
    """

    cfg: _Sampling
    seed: int | None
    seen: torch.Tensor | None = None
    generator: torch.Generator | None = None

    @classmethod
    def make(cls, sampling: SamplingConfig | None, seed: Any, vocab: int, context: Sequence[int],
             device: torch.device) -> "RowSampler":
        """Check and resolve the options of a request; ``context``: the ids the request feeds (for the penalty)."""
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise StateError(f"seed: expected None or an int, found {seed!r}")
        cfg = _sampling_config(sampling, {})._resolve(vocab, seed)
        seen = None
        if cfg.repetition_penalty != 1.0:
            seen = torch.zeros(vocab + 1, dtype=torch.bool, device=device)
            if context:
                ids = torch.as_tensor(list(context), dtype=torch.long, device=device)
                seen[torch.where((ids >= 0) & (ids < vocab), ids, vocab)] = True
        gen = torch.Generator(device=device) if seed is not None else None
        return cls(cfg, seed, seen, gen)

    @property
    def batched_greedy(self) -> bool:
        return self.cfg.greedy and self.seen is None

    def choose(self, logits_row: torch.Tensor, position: int) -> torch.Tensor:
        """int64 ``[1]``: the token for absolute ``position`` from raw logits ``[1, vocab_padded]``."""
        x = _process(logits_row, self.cfg, None if self.seen is None else self.seen[None, :self.cfg.vocab])
        return _choose(x, self.cfg, None if self.seed is None else [self.seed], position, self.generator)

    def observe(self, token: int) -> None:
        if self.seen is not None:
            self.seen[min(token, self.cfg.vocab)] = True


def choose_tokens(logits: torch.Tensor, rows: Sequence[tuple[int, RowSampler, int]]) -> list[int]:
    """The next token of each ``(row index into logits, sampler, absolute position)``; one host sync in all.

    ``logits``: ``[R, vocab_padded]`` raw logits of the decode batch (any float dtype).
    """
    if not rows:
        return []
    out: list[torch.Tensor | None] = [None] * len(rows)
    greedy = [i for i, (_, s, _) in enumerate(rows) if s.batched_greedy]
    if greedy:
        vocab = rows[greedy[0]][1].cfg.vocab
        index = torch.as_tensor([rows[i][0] for i in greedy], dtype=torch.long, device=logits.device)
        picked = logits.index_select(0, index)[:, :vocab].to(torch.float32).argmax(-1)
        for j, i in enumerate(greedy):
            out[i] = picked[j:j + 1]
    for i, (r, sampler, position) in enumerate(rows):
        if out[i] is None:
            out[i] = sampler.choose(logits[r:r + 1], position)
    tokens = torch.cat([t for t in out if t is not None]).tolist()
    for (_, sampler, _), tok in zip(rows, tokens):
        sampler.observe(int(tok))
    return [int(t) for t in tokens]
