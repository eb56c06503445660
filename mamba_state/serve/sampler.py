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

__all__ = ["RowSampler", "choose_device", "choose_tokens"]


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

    def observe(self, token: torch.Tensor) -> None:
        """Mark ``token`` (int64 ``[1]`` on the device) as seen, without a host sync."""
        if self.seen is not None:
            self.seen.index_fill_(0, token.clamp(max=self.cfg.vocab), True)


def choose_device(logits: torch.Tensor, rows: Sequence[tuple[int, RowSampler, int]],
                  vocab: int | None = None) -> torch.Tensor:
    """int64 ``[R]`` on the logits' device: for each ``(row index, sampler, absolute position)`` of ``rows`` its
    next token at that row (other rows: the argmax, meaningless). No host sync.

    ``logits``: ``[R, vocab_padded]`` raw logits of the decode batch (any float dtype). When every listed row is
    greedy without a penalty this is one argmax over the batch. ``vocab``: the vocabulary size, given when
    ``rows`` lists only the rows that need their own choice (every other row then takes the argmax, which is
    its greedy token); without it an empty ``rows`` gives zeros.
    """
    if vocab is not None and (not isinstance(vocab, int) or isinstance(vocab, bool)
                              or not 1 <= vocab <= logits.shape[-1]):
        raise StateError(f"vocab: expected an int in [1, {logits.shape[-1]}] (the logits' last dimension), found "
                         f"{vocab!r}")
    if vocab is None:
        if not rows:
            return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        vocab = rows[0][1].cfg.vocab
    # greedy rows: the argmax _process + _choose take of the float32 logits, read in the logits' own dtype (the
    # cast to float32 is exact and keeps the order, so the same index wins, ties to the first): no cast launch
    tokens = logits[:, :vocab].argmax(-1)
    for r, sampler, position in rows:
        if not sampler.batched_greedy:
            tok = sampler.choose(logits[r:r + 1], position)
            tokens[r:r + 1] = tok
            sampler.observe(tok)
    return tokens


def choose_tokens(logits: torch.Tensor, rows: Sequence[tuple[int, RowSampler, int]]) -> list[int]:
    """The next token of each ``(row index into logits, sampler, absolute position)`` as host ints (one sync)."""
    if not rows:
        return []
    host = choose_device(logits, rows).tolist()
    return [int(host[r]) for r, _, _ in rows]
