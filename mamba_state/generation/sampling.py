"""How each new token is chosen from the logits: :class:`SamplingConfig` (the one list of sampling options,
checked once, when it is made), the greedy-or-sample rule that turns it into the form a call decodes with, the
processing of the logits and the seeded draw.

:func:`~mamba_state.generation.generate` and :func:`~mamba_state.generation.stream` take the options either as a
``sampling=SamplingConfig(...)`` or as keywords of the same names; the module docs of
:mod:`mamba_state.generation.decode` give their meaning.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..errors import StateError

__all__ = ["SamplingConfig", "step_seed"]

_MASK64 = (1 << 64) - 1


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside this package."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # mamba_state/
    frame: Any = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(pkg + os.sep):
        frame, level = frame.f_back, level + 1
    return level


# ---------------------------------------------------------------------------------------------- the options
@dataclass(frozen=True)
class SamplingConfig:
    """How each new token is chosen from the logits: the sampling options of one or many calls, checked once.

    Pass it as ``generate(lm, ids, sampling=cfg, ...)`` (or ``lm.generate`` / ``stream`` / ``lm.stream``); the
    same options also work as keywords of the same names, and a call that gets both a config and a keyword that
    disagrees with it raises a :class:`~mamba_state.errors.StateError`. A config is frozen (its fields cannot be
    assigned; ``dataclasses.replace(cfg, top_p=0.9)`` makes a checked copy) and equal configs decode alike.

    It holds what chooses a token from the logits: the greedy-or-sample switch, the four sampling options and the
    repetition penalty (which changes the logits, greedy or sampled). What a call decodes (``max_new_tokens``,
    ``eos_token_id``, ...) stays a keyword of the call, and so does ``seed``: it keys the random draws of one call
    (per row, so it depends on the batch) and a config is meant to be reused. A seed still counts as a sampling
    option for the default rule: with ``do_sample=None`` a call with a seed samples.

    Args:
        do_sample: None (sample when a sampling option, ``temperature``, ``top_k``, ``top_p``, ``min_p``, or the
            call's ``seed``, is given; else greedy), True (sample) or False (greedy; sampling options given are
            ignored with a ``UserWarning``).
        temperature: a finite number >= 0; None means 1 when sampling. 0 selects greedy decoding (argmax), and is
            refused with ``do_sample=True``.
        top_k: keep the ``top_k`` most likely tokens, an int >= 0 (None or 0: no limit).
        top_p: nucleus filter, a number in [0, 1]: keep the smallest set of most likely tokens whose probability
            reaches ``top_p`` (None, 0 or 1: off).
        min_p: drop tokens less likely than ``min_p`` times the most likely one, a number in [0, 1) (None or 0:
            off).
        repetition_penalty: a finite number > 0 (1: off). The logits of tokens already seen (``context_ids``,
            ``input_ids`` and the new tokens) are divided by it, multiplied when negative; it applies to greedy
            decoding too.

    Raises:
        StateError: for any value outside the ranges above, naming the expected and the found value.
    """

    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        do_sample, temperature, top_k = self.do_sample, self.temperature, self.top_k
        top_p, min_p, repetition_penalty = self.top_p, self.min_p, self.repetition_penalty
        if do_sample is not None and not isinstance(do_sample, bool):
            raise StateError(f"do_sample: expected None, True or False, found {do_sample!r}")
        if temperature is not None and (not _is_real(temperature) or temperature < 0):
            raise StateError(f"temperature: expected a finite number >= 0 (0 = greedy), found {temperature!r}")
        if top_k is not None and (not _is_int(top_k) or top_k < 0):
            raise StateError(f"top_k: expected an int >= 0 (0 = no limit), found {top_k!r}")
        if top_p is not None and (not _is_real(top_p) or not 0 <= top_p <= 1):
            raise StateError(f"top_p: expected a number in [0, 1] (0 or 1 = no filter), found {top_p!r}")
        if min_p is not None and (not _is_real(min_p) or not 0 <= min_p < 1):
            raise StateError(f"min_p: expected a number in [0, 1) (0 = no filter), found {min_p!r}")
        if not _is_real(repetition_penalty) or repetition_penalty <= 0:
            raise StateError(
                f"repetition_penalty: expected a finite number > 0 (1 = none), found {repetition_penalty!r}")
        if do_sample and temperature == 0:
            raise StateError("temperature with do_sample=True: expected a number > 0, found 0 (temperature=0 is "
                             "greedy decoding: use do_sample=False)")

    def _resolve(self, vocab: int, seed: Any = None) -> _Sampling:
        """The form one call decodes with, after the default rule (``seed``: the call's, only whether it is
        given counts); warns when ``do_sample=False`` ignores options."""
        given = {k: v for k, v in (("temperature", self.temperature), ("top_k", self.top_k), ("top_p", self.top_p),
                                   ("min_p", self.min_p), ("seed", seed)) if v is not None}
        t = 1.0 if self.temperature is None else float(self.temperature)
        if self.do_sample is None:
            sample = bool(given) and t != 0
        elif self.do_sample:
            sample = True
        else:
            ignored = {k: v for k, v in given.items() if not (k == "temperature" and v == 0)}
            if ignored:
                warnings.warn("mamba_state.generation: do_sample=False decodes greedily; ignoring "
                              + ", ".join(f"{k}={v!r}" for k, v in ignored.items()), UserWarning,
                              stacklevel=_user_stacklevel())
            sample = False
        p = 1.0 if self.top_p is None or self.top_p == 0 else float(self.top_p)
        return _Sampling(t, 0 if self.top_k is None else int(self.top_k), p,
                         0.0 if self.min_p is None else float(self.min_p), float(self.repetition_penalty), vocab,
                         sample)


# the option names and the keyword defaults that mean "not given": the fields of SamplingConfig
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(SamplingConfig)}


def _same(a: Any, b: Any) -> bool:
    """Whether two option values are the same (None, a bool or a number; anything else only when identical)."""
    if a is b:
        return True
    numbers = (int, float)
    return (isinstance(a, numbers) and isinstance(b, numbers) and isinstance(a, bool) == isinstance(b, bool)
            and a == b)


def _sampling_config(sampling: Any, keywords: dict[str, Any]) -> SamplingConfig:
    """The options of one call: ``sampling`` itself when given (every keyword then at its default or equal to the
    config's field), else a config made (and so checked) from the keywords."""
    if sampling is None:
        return SamplingConfig(**keywords)
    if not isinstance(sampling, SamplingConfig):
        raise StateError(f"sampling: expected None or a mamba_state.SamplingConfig, found {type(sampling).__name__}")
    clash = [k for k, v in keywords.items() if not _same(v, _DEFAULTS[k]) and not _same(v, getattr(sampling, k))]
    if clash:
        found = ", ".join(f"{k}={keywords[k]!r} and sampling.{k}={getattr(sampling, k)!r}" for k in clash)
        raise StateError(f"sampling options given twice: expected each option either in sampling= or as a "
                         f"keyword (or the same value in both), found {found}")
    return sampling


# ---------------------------------------------------------------------------------------------- resolved form
@dataclass(frozen=True)
class _Sampling:
    """The options one call decodes with (``top_p`` 1 when off; ``do_sample`` after the default rule)."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    vocab: int
    do_sample: bool = True

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


# ---------------------------------------------------------------------------------------------- logits and draw
def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, position: int) -> int:
    """The generator seed for the token at absolute ``position`` of a stream sampled with ``seed`` (63 bits)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64)) >> 1


def _process(logits: torch.Tensor, cfg: _Sampling, seen: torch.Tensor | None) -> torch.Tensor:
    """Float32 ``[B, vocab]`` processed logits from raw ``[B, >= vocab]`` logits (always a fresh tensor)."""
    x = logits[:, :cfg.vocab].to(torch.float32, copy=True)
    if seen is not None:
        x = torch.where(seen, torch.where(x < 0, x * cfg.repetition_penalty, x / cfg.repetition_penalty), x)
    if cfg.greedy:
        return x
    if cfg.temperature != 1.0:
        x = x / cfg.temperature
    if 0 < cfg.top_k < cfg.vocab:
        kth = torch.topk(x, cfg.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p < 1.0:
        srt, order = torch.sort(x, dim=-1)  # ascending: drop the unlikely tail whose mass is <= 1 - top_p
        drop_sorted = srt.softmax(-1).cumsum(-1) <= 1 - cfg.top_p
        drop_sorted[:, -1] = False  # the most likely token always stays
        x = x.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    if cfg.min_p > 0:
        p = x.softmax(-1)
        x = x.masked_fill(p < cfg.min_p * p.amax(-1, keepdim=True), float("-inf"))
    return x


def _exp_noise(shape: tuple[int, ...], device: torch.device, seeds: Any, position: int,
               gen: torch.Generator | None) -> torch.Tensor:
    """``Exp(1)`` noise ``[B, vocab]``, keyed by (seed, position) when seeded."""
    if seeds is None:
        return torch.empty(shape, device=device, dtype=torch.float32).exponential_()
    assert gen is not None  # seeded draws always come with a generator
    if isinstance(seeds, int):
        gen.manual_seed(step_seed(seeds, position))
        return torch.empty(shape, device=device, dtype=torch.float32).exponential_(generator=gen)
    rows = []
    for s in seeds:
        gen.manual_seed(step_seed(s, position))
        rows.append(torch.empty((1, shape[1]), device=device, dtype=torch.float32).exponential_(generator=gen))
    return torch.cat(rows)


def _choose(x: torch.Tensor, cfg: _Sampling, seeds: Any, position: int, gen: torch.Generator | None) -> torch.Tensor:
    """int64 ``[B]`` tokens from processed logits ``x`` for the tokens at absolute ``position``."""
    if cfg.greedy:
        return x.argmax(-1)
    probs = x.softmax(-1)
    noise = _exp_noise(tuple(x.shape), x.device, seeds, position, gen).clamp_min_(torch.finfo(torch.float32).tiny)
    return (probs / noise).argmax(-1)
