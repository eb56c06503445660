"""Resumable, streaming, sampled decoding for :class:`~mamba_state.adapters.StatefulMambaLM`.

How a call runs:

1. **Prefill** (prompts of two or more tokens): ``input_ids`` go through the stateful chunked forward,
   ``prefill_chunk_size`` tokens at a time, never token by token; only the last position's logits are computed.
2. **Decode**: every later token, and a prompt of exactly one token, goes through one decode step: ``lm.step``,
   or on CUDA for Mamba-1 models with RMSNorm and fused add-norm the lean in-place step of
   :mod:`mamba_state.fused_decode` (``fused_step``); both use the single-step Triton kernel there. On CUDA the
   step runs as a CUDA graph captured once per (model, batch size, state layout, parameter dtype, device, step
   kind) and replayed with static buffers; ``cuda_graph=False`` turns that off. CPU runs ``lm.step`` eagerly.
   Models of Mamba-3 blocks take ``lm.step`` (upstream's Triton ``mamba3_siso_step`` on CUDA; the fused step is
   Mamba-1 only), captured the same way: the static buffers and the graph key hold every named tensor of the state
   (angle, SSM, key and value states). A capture that fails warns and decodes eagerly.

**Resume law.** ``out.sequences`` is ``input_ids`` followed by the new tokens and ``out.state`` has consumed every
token of ``out.sequences`` except the last one. Because a one-token input takes the very same decode step as the
tokens inside the loop, ``generate(lm, out.sequences[:, -1:], state=out.state, ...)`` continues exactly where the
call stopped: the tokens equal those of one longer call, bit for bit on the same device, for greedy decoding and
for seeded sampling (the random draw of each token depends only on ``seed`` and the token's absolute position
``state.seqlen_offset``, never on how the work was split into calls). With ``repetition_penalty != 1`` pass the
earlier tokens as ``context_ids`` too (the state does not remember token ids).

**Passing the whole sequence again is refused.** The state returned by :func:`generate` (and by a finished or
closed :class:`TokenStream`) records a fingerprint of ``sequences`` in ``state.metadata["mamba_state.generation"]``
(``seqlen_offset``, batch size, length and a SHA-256 of the token ids; saved with the state). A later call with
that state whose ``input_ids`` (two or more tokens) end with exactly those ``sequences`` would feed tokens the state
has already consumed a second time, and so produce other tokens: it raises a :class:`~mamba_state.errors.StateError`
that says to pass only the new tokens. The record holds only while ``state.seqlen_offset`` is unchanged, so
genuinely new input (e.g. ``cat([out.sequences[:, -1:], next_turn], 1)``) is never refused; to feed the same tokens
again on purpose, delete the record from ``state.metadata``.

**The sampling options** (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``)
are the fields of :class:`~mamba_state.generation.SamplingConfig`, defined and checked there
(:mod:`mamba_state.generation.sampling`); a call takes them as ``sampling=SamplingConfig(...)`` or as keywords.

**Greedy or sampled: one rule.** ``do_sample=None`` (the default) samples when any sampling option is given
(``temperature``, ``top_k``, ``top_p``, ``min_p`` or ``seed`` not None) and decodes greedily (argmax) otherwise, so
two calls with only ``max_new_tokens`` give the same tokens, as upstream ``mamba_ssm`` (``top_k=1``) and
transformers (``do_sample=False``) do. ``do_sample=True`` samples (``temperature`` defaults to 1);
``do_sample=False`` decodes greedily and warns (``UserWarning``) that the sampling options given are ignored, as
transformers does. ``temperature=0`` always means greedy (with ``do_sample=True`` it is refused). Options left at
None mean: ``temperature=1``, ``top_k=0`` (no limit), ``top_p=1`` (off; ``top_p=0`` is off too, as upstream),
``min_p=0`` (off).

**Sampling** (the meaning of upstream ``mamba_ssm`` ``generate``'s arguments), applied in this order to float32
logits restricted to the real vocabulary (``lm.config["vocab_size"]``; padding rows of the head are never drawn):
repetition penalty (logits of tokens already seen are divided by the penalty when positive, multiplied when
negative; seen = ``context_ids`` + ``input_ids`` + tokens generated so far), temperature, top-k (keep the k
largest), top-p (keep the smallest set of most likely tokens whose probability reaches ``top_p``), min-p (drop
tokens whose probability is below ``min_p`` times the largest). Greedy decoding takes the argmax of the
penalised logits (no temperature or filter). A token is drawn with the exponential-race form of categorical sampling,
``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d. per vocabulary entry: an exact draw from ``p`` that needs no
cumulative sums and no host synchronisation.

**Seeds.** ``seed=None`` draws from PyTorch's global generator of the device (not reproducible across calls).
An int seeds a generator afresh for every token with a hash of ``(seed, position)``, and one ``[batch, vocab]``
draw serves the whole batch. A sequence of ``batch`` ints gives each row its own stream, keyed by
``(seed[row], position)``: a row's draws then do not depend on the other rows, so a batch of n branches with
seeds ``s_1..s_n`` gives the tokens of n separate calls with those seeds (best-of-n without re-prefilling), up to
the last-bit rounding differences between matrix kernels for different batch sizes, which can flip a near-tie.
Seeded results are reproducible on the same device type; CPU and CUDA draw different numbers.

**End of sequence.** With ``eos_token_id`` (an int or several), a row that emits one is finished: its later
tokens are ``pad_token_id`` (default: the first ``eos_token_id``) and decoding stops once every row is finished.
Finished rows keep feeding their pad token to the model, so the returned state still satisfies the resume law
literally; a resumed call treats every row as live again.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Generator, Iterator, Sequence

import torch

from ..errors import StateError, StateShapeError
from ..state import MambaModelState
from .sampling import SamplingConfig, _choose, _is_int, _process, _Sampling, _sampling_config
from .sampling import step_seed  # noqa: F401  (a name of this module in 0.1)

__all__ = ["GenerationOutput", "TokenStream", "generate", "stream", "clear_graph_cache"]


# ---------------------------------------------------------------------------------------------- output object
@dataclass
class GenerationOutput:
    """What :func:`generate` returns.

    Attributes:
        sequences: int64 ``[batch, len(input_ids) + n_new]``: ``input_ids`` then the new tokens.
        state: the model state after every token of ``sequences`` except the last one (its metadata records a
            fingerprint of ``sequences``, so that passing them again with this state is refused).
        scores: with ``output_scores=True``, a tuple of ``n_new`` float32 ``[batch, vocab]`` tensors: the processed
            logits each token was chosen from (after penalty, temperature and filtering; filtered entries are
            ``-inf``); else None.
    """

    sequences: torch.Tensor
    state: MambaModelState
    scores: tuple[torch.Tensor, ...] | None = None


# ---------------------------------------------------------------------------------------------- argument checks
def _resolve_length(max_new_tokens: Any, max_length: Any, seqlen: int) -> int:
    """``max_new_tokens`` from ``max_new_tokens`` and / or ``max_length`` (= len(input_ids) + max_new_tokens)."""
    if max_new_tokens is not None and (not _is_int(max_new_tokens) or max_new_tokens < 0):
        raise StateError(f"max_new_tokens: expected an int >= 0, found {max_new_tokens!r}")
    if max_length is None:
        if max_new_tokens is None:
            raise StateError("max_new_tokens: expected an int >= 0 (or max_length, the length of input_ids plus "
                             "the new tokens), found neither")
        return max_new_tokens
    if not _is_int(max_length) or max_length < seqlen:
        raise StateError(f"max_length: expected an int >= {seqlen} (input_ids' length: max_length counts input_ids "
                         f"plus the new tokens), found {max_length!r}")
    if max_new_tokens is not None and max_length != seqlen + max_new_tokens:
        raise StateError(f"max_length and max_new_tokens disagree: expected max_length = len(input_ids) + "
                         f"max_new_tokens = {seqlen} + {max_new_tokens} = {seqlen + max_new_tokens}, found "
                         f"max_length={max_length} (give one of the two)")
    return max_length - seqlen


def _check_sampling(do_sample: Any, temperature: Any, top_k: Any, top_p: Any, min_p: Any, seed: Any,
                    repetition_penalty: Any, vocab: int) -> _Sampling:
    """Validate the sampling options (None = not given) and apply the default rule (see the module docs)."""
    return SamplingConfig(do_sample, temperature, top_k, top_p, min_p, repetition_penalty)._resolve(vocab, seed)


def _check_int_ids(name: str, t: Any, batch: int | None) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype.is_floating_point or t.dtype.is_complex or (
            t.dtype == torch.bool):
        found = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise StateShapeError(f"{name}: expected an integer tensor [batch, seqlen], found {found}")
    if batch is not None and t.shape[0] != batch:
        raise StateShapeError(f"{name} batch size: expected {batch} (input_ids'), found {t.shape[0]}")


def _eos_list(eos_token_id: Any) -> list[int]:
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if _is_int(eos_token_id) else eos_token_id
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    if not isinstance(ids, (list, tuple)) or not ids or not all(_is_int(i) and i >= 0 for i in ids):
        raise StateError(f"eos_token_id: expected None, a non-negative int or a non-empty list of them, "
                         f"found {eos_token_id!r}")
    return list(ids)


def _check_arguments(lm: Any, input_ids: Any, state: Any, max_new_tokens: Any, max_length: Any, sampling: Any,
                     sampling_keywords: dict[str, Any], eos_token_id: Any, pad_token_id: Any, seed: Any,
                     prefill_chunk_size: Any, context_ids: Any):
    """Validate everything before any work; returns (max_new_tokens, resolved sampling, eos list, pad id, seeds,
    state). ``sampling``: the call's SamplingConfig or None; ``sampling_keywords``: its keywords of the same names."""
    if not all(hasattr(lm, a) for a in ("step", "forward", "new_state", "config")):
        raise StateError(f"lm: expected a StatefulMambaLM (step, forward, new_state, config), found {type(lm).__name__}")
    lm._check_ids(input_ids, check_range=True)  # once per call, on any device
    batch = input_ids.shape[0]
    param = next(lm.parameters())
    if input_ids.device != param.device:
        raise StateError(f"input_ids device: expected {param.device} (the model's), found {input_ids.device}")
    max_new_tokens = _resolve_length(max_new_tokens, max_length, input_ids.shape[1])
    vocab = int(lm.config["vocab_size"])
    resolved = _sampling_config(sampling, sampling_keywords)._resolve(vocab, seed)
    eos = _eos_list(eos_token_id)
    if pad_token_id is not None and (not _is_int(pad_token_id) or pad_token_id < 0):
        raise StateError(f"pad_token_id: expected None or a non-negative int, found {pad_token_id!r}")
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else None)
    for name, ids in (("eos_token_id", eos), ("pad_token_id", [] if pad is None else [pad])):
        if any(i >= vocab for i in ids):
            raise StateError(f"{name}: expected ids below the vocabulary size {vocab}, found {ids}")
    seeds: int | list[int] | None
    if seed is None:
        seeds = None
    elif _is_int(seed):
        seeds = int(seed)
    elif isinstance(seed, (list, tuple)) and all(_is_int(s) for s in seed):
        if len(seed) != batch:
            raise StateShapeError(f"seed: expected an int or one int per row ({batch}), found {len(seed)} ints")
        seeds = [int(s) for s in seed]
    else:
        raise StateError(f"seed: expected None, an int or a list of {batch} ints, found {seed!r}")
    if not _is_int(prefill_chunk_size) or prefill_chunk_size < 1:
        raise StateError(f"prefill_chunk_size: expected an int >= 1, found {prefill_chunk_size!r}")
    if context_ids is not None:
        _check_int_ids("context_ids", context_ids, batch)
        if context_ids.device != input_ids.device:
            raise StateError(f"context_ids device: expected {input_ids.device} (input_ids'), found {context_ids.device}")
    device = input_ids.device
    if state is not None:
        if isinstance(state, MambaModelState) and state.batch_size != batch:
            raise StateShapeError(f"state batch size: expected {batch} (input_ids'), found {state.batch_size}")
        state = lm.check_state(state, batch, device)  # the model's one check: every layer, before any work
        _refuse_consumed_input(input_ids, state)
    return max_new_tokens, resolved, eos, pad, seeds, state


# ---------------------------------------------------------------------------------------------- resume record
_RECORD = "mamba_state.generation"  # state.metadata key: what the call that returned the state produced


def _fingerprint(ids: torch.Tensor) -> str:
    a = ids.detach().to("cpu", torch.int64).contiguous().numpy()
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()


def _without_record(state: MambaModelState) -> MambaModelState:
    """``state`` without the resume record (a new object sharing the tensors; ``state`` itself when it has none)."""
    if _RECORD not in state.metadata:
        return state
    meta = {k: v for k, v in state.metadata.items() if k != _RECORD}
    return MambaModelState(dict(state.items()), seqlen_offset=state.seqlen_offset, metadata=meta)


def _with_record(state: MambaModelState, sequences: torch.Tensor) -> MambaModelState:
    """A new state object (sharing the tensors) whose metadata records ``sequences`` (which it has consumed but
    for the last token); unchanged when there is nothing a later call could feed twice (one token)."""
    if sequences.shape[1] < 2:
        return state
    record = {"seqlen_offset": state.seqlen_offset, "batch": int(sequences.shape[0]),
              "length": int(sequences.shape[1]), "sha256": _fingerprint(sequences)}
    return MambaModelState(dict(state.items()), seqlen_offset=state.seqlen_offset,
                           metadata={**state.metadata, _RECORD: record})


def _refuse_consumed_input(input_ids: torch.Tensor, state: MambaModelState) -> None:
    """Raise when ``input_ids`` end with the ``sequences`` that ``state`` was returned with (already consumed)."""
    rec = state.metadata.get(_RECORD)
    if not isinstance(rec, dict) or input_ids.shape[1] < 2:
        return
    n = rec.get("length")
    if (rec.get("seqlen_offset") != state.seqlen_offset or rec.get("batch") != input_ids.shape[0]
            or not isinstance(n, int) or isinstance(n, bool) or not 2 <= n <= input_ids.shape[1]):
        return
    if _fingerprint(input_ids[:, -n:]) == rec.get("sha256"):
        raise StateError(
            f"input_ids: expected only the tokens the state has not consumed yet, found {input_ids.shape[1]} tokens "
            f"ending with the {n} tokens of the `sequences` returned with this state, which it has already consumed "
            f"but for the last one; pass only the new tokens, e.g. generate(out.sequences[:, -1:], "
            f"state=out.state, ...) (to feed them again on purpose, delete state.metadata[{_RECORD!r}])")


# ---------------------------------------------------------------------------------------------- CUDA graphs
class _GraphStep:
    """One decode step of ``lm`` captured as a CUDA graph for one batch size and state layout.

    Static buffers: ``ids`` int64 ``[B]``, ``state`` (a :class:`MambaModelState` whose tensors never move) and
    ``logits`` ``[B, vocab_padded]``. A replay reads ``ids`` and ``state``, writes ``logits`` and leaves in
    ``state`` the state after the token: the fused step updates it in place; with ``lm.step`` the copy back is part
    of the graph. A replay needs no host work beyond the launch.
    """

    def __init__(self, lm: Any, template: MambaModelState, fused: Any = None, warmups: int = 2):
        batch = template.batch_size
        device = template.device
        self.ids = torch.zeros(batch, dtype=torch.long, device=device)
        self.state = _private_copy(template, seqlen_offset=0)
        self.fused = fused is not None  # a flag only: the cache must not hold a strong reference to the model
        self.consts = fused.constants() if fused is not None else None  # static per-layer A, D, dt_bias
        self.busy = False
        self.logits: torch.Tensor | None = None
        self._capture(lm, warmups)

    def _step_into_state(self, lm: Any) -> torch.Tensor:
        if self.fused:
            from .fused_decode import FusedDecoder

            return FusedDecoder(lm).step(self.ids, self.state, self.consts)
        logits, new = lm.step(self.ids, self.state)
        for idx, layer in new.items():  # the next replay starts from the state after this token
            _copy_state_into(self.state[idx], layer)
        return logits

    def _capture(self, lm: Any, warmups: int) -> None:
        with torch.cuda.device(self.ids.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compile Triton kernels and settle the allocator outside the capture
                for _ in range(warmups):
                    self._step_into_state(lm)  # (the static state is overwritten by load() before use)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                logits = self._step_into_state(lm)
        self.logits = logits

    def _replay(self) -> None:
        self.graph.replay()

    def load(self, state: MambaModelState, fused: Any = None) -> None:
        """Copy ``state`` into the static state (and the current A, D, dt_bias into the static constants)."""
        if self.fused and fused is not None:
            fused.refresh(self.consts)
        for idx, layer in state.items():
            _copy_state_into(self.state[idx], layer)

    def run(self, tokens: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(tokens)
        self._replay()
        assert self.logits is not None  # set by the capture
        return self.logits

    def snapshot(self, seqlen_offset: int, metadata: dict) -> MambaModelState:
        return _snapshot(self.state, seqlen_offset, metadata)


def _copy_state_into(dst: Any, src: Any) -> None:
    """Copy every named tensor of the layer state ``src`` into ``dst``'s tensors, in place (any family)."""
    for name, t in dst.tensors.items():
        t.copy_(src.tensors[name])


def _private_copy(state: MambaModelState, seqlen_offset: int | None = None) -> MambaModelState:
    """Contiguous copies of every tensor of ``state`` (buffers that decoding may update in place; any family)."""
    from ..state import MambaInferenceState

    return MambaModelState(
        {i: MambaInferenceState.from_tensors({n: t.clone(memory_format=torch.contiguous_format)
                                              for n, t in s.tensors.items()}) for i, s in state.items()},
        seqlen_offset=state.seqlen_offset if seqlen_offset is None else seqlen_offset, metadata=dict(state.metadata))


# lm -> {key: _GraphStep | None}; None marks a key whose capture failed (eager from then on)
_GRAPHS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_GRAPHS_LOCK = threading.Lock()


def _snapshot(buffers: MambaModelState, seqlen_offset: int, metadata: dict) -> MambaModelState:
    return MambaModelState({i: st.clone() for i, st in buffers.items()}, seqlen_offset=seqlen_offset,
                           metadata=dict(metadata))


def _graphs_supported(device: torch.device) -> bool:
    return device.type == "cuda"


def _graph_key(lm: Any, state: MambaModelState, fused: bool) -> tuple:
    p = next(lm.parameters())
    # every named tensor's dtype and non-batch shape (Mamba-1/2: conv and ssm; Mamba-3: angle, ssm, k, v)
    layout = tuple((i, tuple((n, t.dtype, tuple(t.shape[1:])) for n, t in s.tensors.items()))
                   for i, s in state.items())
    return (state.batch_size, str(state.device), p.dtype, str(p.device), layout, fused)


def clear_graph_cache(lm: Any = None) -> None:
    """Drop the captured decode graphs of ``lm`` (all models when None), e.g. after changing its weights' dtype."""
    with _GRAPHS_LOCK:
        if lm is None:
            _GRAPHS.clear()
        else:
            _GRAPHS.pop(lm, None)


def _acquire_graph(lm: Any, state: MambaModelState, fused: Any, fused_auto: bool = False) -> _GraphStep | None:
    """The cached graph for this (lm, batch, layout, step kind), captured on first use; None when busy or not
    capturable. With ``fused_auto``, a fused step that fails to capture is replaced by ``lm.step``."""
    key = _graph_key(lm, state, fused is not None)
    with _GRAPHS_LOCK:
        graphs = _GRAPHS.setdefault(lm, {})
        if key in graphs:
            g = graphs[key]
            if g is None or g.busy:  # another live stream owns the static buffers: run this one eagerly
                return None
            g.busy = True
            return g
    g = None
    for step_kind in ([fused, None] if fused is not None and fused_auto else [fused]):
        try:
            g = _GraphStep(lm, state, step_kind)
            break
        except Exception as exc:  # e.g. an op that cannot be captured: decode another way instead of failing
            then = "trying StatefulMambaLM.step" if step_kind is not None and fused_auto else "decoding eagerly"
            warnings.warn(f"mamba_state.generation: CUDA graph capture of the "
                          f"{'fused' if step_kind is not None else 'model'} decode step failed "
                          f"({type(exc).__name__}: {exc}); {then}", RuntimeWarning, stacklevel=3)
    with _GRAPHS_LOCK:
        _GRAPHS.setdefault(lm, {})[key] = g
        if g is not None:
            g.busy = True
    return g


# ---------------------------------------------------------------------------------------------- the stream
class TokenStream:
    """An iterator over new tokens: each ``next()`` returns int64 ``[batch]`` (pad ids for finished rows).

    While and after iterating, ``.state`` is the model state after every token of ``.sequences`` except the
    last, ``.sequences`` is ``input_ids`` followed by the tokens yielded so far and ``.scores`` the processed
    logits (with ``output_scores=True``). :meth:`close` (or exhausting the stream) releases a captured CUDA
    graph for other calls; from then on ``.state`` also records a fingerprint of ``.sequences``, as
    :func:`generate`'s does.
    """

    def __init__(self, lm: Any, input_ids: torch.Tensor, state: MambaModelState | None, max_new_tokens: int,
                 sampling: _Sampling, eos: list[int], pad: int | None, seeds: Any, output_scores: bool,
                 prefill_chunk_size: int, cuda_graph: bool, context_ids: torch.Tensor | None, fused: Any,
                 fused_auto: bool = False):
        self._lm = lm
        self._input_ids = input_ids
        self._tokens: list[torch.Tensor] = []
        self._scores: list[torch.Tensor] | None = [] if output_scores else None
        self._state = _without_record(state) if state is not None else lm.new_state(input_ids.shape[0],
                                                                                     device=input_ids.device)
        self._start = self._state.seqlen_offset
        self._final: MambaModelState | None = None  # the closed stream's state, with its resume record
        self._fused = fused  # a FusedDecoder (in-place step) or None (lm.step)
        self._fused_auto = fused_auto  # chosen automatically: fall back to lm.step if it fails
        self._mode: str | None = None  # chosen at the first decode step: "graph", "fused" or "model"
        self._graph: _GraphStep | None = None
        self._buffers: MambaModelState | None = None  # the live state in "graph"/"fused" mode (updated in place)
        self._offset = 0
        self._use_graph = bool(cuda_graph) and _graphs_supported(input_ids.device)
        self._gen = self._decode(input_ids, max_new_tokens, sampling, eos, pad, seeds, prefill_chunk_size,
                                 context_ids)

    # -- iteration
    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        try:
            with torch.no_grad():
                return next(self._gen)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop decoding; the state and sequences so far stay available."""
        if self._buffers is not None:
            self._state = _snapshot(self._buffers, self._offset, self._state.metadata)
            self._buffers = None
        if self._graph is not None:
            self._graph.busy = False
            self._graph = None
        self._mode = "closed"
        self._gen.close()

    def __del__(self):
        g = self.__dict__.get("_graph")
        if g is not None:
            g.busy = False

    # -- results
    @property
    def state(self) -> MambaModelState:
        if self._buffers is not None:  # the live state sits in buffers updated in place: hand out a copy
            return _snapshot(self._buffers, self._offset, self._state.metadata)
        if self._mode != "closed":
            return self._state
        if self._final is None:  # closed: record what was produced (see "Passing the whole sequence again")
            seqs = self.sequences
            consumed_all_but_last = self._state.seqlen_offset == self._start + seqs.shape[1] - 1
            self._final = _with_record(self._state, seqs) if consumed_all_but_last else self._state
        return self._final

    @property
    def sequences(self) -> torch.Tensor:
        if not self._tokens:
            return self._input_ids.to(torch.long)
        return torch.cat([self._input_ids.to(torch.long), torch.stack(self._tokens, 1)], 1)

    @property
    def scores(self) -> tuple[torch.Tensor, ...] | None:
        return None if self._scores is None else tuple(self._scores)

    # -- the decode step shared by one-token prompts and the loop
    def _start_decoding(self) -> None:
        if self._use_graph:
            self._graph = _acquire_graph(self._lm, self._state, self._fused, self._fused_auto)
        if self._graph is not None:
            self._mode, self._buffers = "graph", self._graph.state
            self._graph.load(self._state, self._fused)
        elif self._fused is not None:
            self._mode, self._buffers = "fused", _private_copy(self._state)
        else:
            self._mode = "model"
        self._offset = self._state.seqlen_offset

    def _step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Feed ``tokens`` [B] to the model; returns (raw logits [B, vocab_padded], new seqlen_offset)."""
        if self._mode is None:
            self._start_decoding()
        if self._mode == "fused" and self._fused_auto:
            try:
                logits = self._fused.step(tokens, self._buffers)
                self._fused_auto = False  # it works: no more guarding
            except Exception as exc:  # the buffers are a private copy: self._state is intact
                warnings.warn(f"mamba_state.generation: the fused decode step failed ({type(exc).__name__}: {exc}); "
                              "decoding with StatefulMambaLM.step", RuntimeWarning, stacklevel=3)
                self._mode, self._buffers, self._fused = "model", None, None
            else:
                self._offset += 1
                return logits, self._offset
        if self._mode == "model":
            logits, self._state = self._lm.step(tokens, self._state)
            return logits, self._state.seqlen_offset
        if self._mode == "graph":
            assert self._graph is not None
            logits = self._graph.run(tokens)
        else:
            logits = self._fused.step(tokens, self._buffers)
        self._offset += 1
        return logits, self._offset

    # -- the decoding loop behind next()
    def _decode(self, input_ids: torch.Tensor, max_new_tokens: int, cfg: _Sampling, eos: list[int], pad: int | None,
                seeds: Any, chunk: int, context_ids: torch.Tensor | None) -> Generator[torch.Tensor, None, None]:
        """The stream's tokens: prefill, then choose a token and feed it, until ``max_new_tokens`` or every row's EOS
        (the generator behind ``next()``; it keeps ``_state``, ``_tokens`` and ``_scores`` up to date)."""
        lm = self._lm
        batch, seqlen = input_ids.shape
        device = input_ids.device
        ids = input_ids.to(torch.long)
        if max_new_tokens == 0:  # consume all but the last token, so that the resume law holds here too
            for a in range(0, seqlen - 1, chunk):
                _, self._state = lm(ids[:, a:min(a + chunk, seqlen - 1)], self._state, num_last_tokens=1)
            return
        # logits for the first new token: chunked prefill for longer prompts, the decode step for one token
        if seqlen == 1:
            logits, position = self._step(ids[:, 0])
        else:
            for a in range(0, seqlen, chunk):
                logits, self._state = lm(ids[:, a:a + chunk], self._state, num_last_tokens=1)
            logits, position = logits[:, -1], self._state.seqlen_offset
        seen = None
        if cfg.repetition_penalty != 1.0:  # one spare column collects ids outside the vocabulary
            seen = torch.zeros(batch, cfg.vocab + 1, dtype=torch.bool, device=device)
            for t in (ids,) if context_ids is None else (context_ids.to(torch.long), ids):
                seen.scatter_(1, torch.where((t >= 0) & (t < cfg.vocab), t, cfg.vocab), True)
        gen = None
        if seeds is not None:
            gen = torch.Generator(device=device)
        eos_t = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        for n in range(max_new_tokens):
            x = _process(logits, cfg, None if seen is None else seen[:, :cfg.vocab])
            tok = _choose(x, cfg, seeds, position, gen)
            if eos_t is not None:
                tok = torch.where(finished, torch.full_like(tok, pad if pad is not None else 0), tok)  # pad is set
                finished |= torch.isin(tok, eos_t)
            if seen is not None:
                seen.scatter_(1, tok[:, None], True)
            self._tokens.append(tok)
            if self._scores is not None:
                self._scores.append(x)
            yield tok
            if n == max_new_tokens - 1 or (eos_t is not None and bool(finished.all())):
                return  # the state stays before the last token (resume law)
            logits, position = self._step(tok)


def _fused_decoder(lm: Any, state: MambaModelState | None, input_ids: torch.Tensor, fused_step: Any):
    """A FusedDecoder when ``fused_step`` asks for one (or allows one, on CUDA) and the model qualifies; else None."""
    if fused_step is not None and not isinstance(fused_step, bool):
        raise StateError(f"fused_step: expected None, True or False, found {fused_step!r}")
    if fused_step is False or (fused_step is None and input_ids.device.type != "cuda"):
        return None
    try:
        from .fused_decode import FusedDecoder, fused_unsupported_reason
    except ImportError as exc:  # no triton
        why: str | None = f"its kernels cannot be imported ({exc})"
    else:
        probe = state if state is not None else lm.new_state(1, device=input_ids.device)
        why = fused_unsupported_reason(lm, probe)
        if why is None:
            return FusedDecoder(lm)
    if fused_step:
        raise StateError(f"fused_step=True: expected a model the fused decode step supports, found that {why}")
    return None


# ---------------------------------------------------------------------------------------------- entry points
def stream(lm: Any, input_ids: torch.Tensor, state: MambaModelState | None = None, *,
           max_new_tokens: int | None = None, max_length: int | None = None, sampling: SamplingConfig | None = None,
           do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
           top_p: float | None = None, min_p: float | None = None, repetition_penalty: float = 1.0,
           eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
           seed: int | Sequence[int] | None = None, output_scores: bool = False, prefill_chunk_size: int = 2048,
           cuda_graph: bool = True, context_ids: torch.Tensor | None = None,
           fused_step: bool | None = None) -> TokenStream:
    """Decode token by token, yielding each new token int64 ``[batch]`` as soon as it is chosen.

    Arguments as :func:`generate` (greedy unless a sampling option or ``do_sample=True`` is given; the sampling
    options as a :class:`~mamba_state.generation.SamplingConfig` or as keywords). Every argument is checked here,
    before any work. The returned :class:`TokenStream` carries ``.state``, ``.sequences`` and ``.scores``; after
    the last token ``.state`` equals ``generate(...).state``.
    """
    sampling_keywords = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repetition_penalty=repetition_penalty)  # the fields of SamplingConfig
    max_new_tokens, resolved, eos, pad, seeds, state = _check_arguments(
        lm, input_ids, state, max_new_tokens, max_length, sampling, sampling_keywords, eos_token_id, pad_token_id,
        seed, prefill_chunk_size, context_ids)
    fused = _fused_decoder(lm, state, input_ids, fused_step)
    return TokenStream(lm, input_ids, state, max_new_tokens, resolved, eos, pad, seeds, output_scores,
                       prefill_chunk_size, cuda_graph, context_ids, fused, fused_auto=fused_step is None)


def generate(lm: Any, input_ids: torch.Tensor, state: MambaModelState | None = None, *,
             max_new_tokens: int | None = None, max_length: int | None = None,
             sampling: SamplingConfig | None = None, do_sample: bool | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             repetition_penalty: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             seed: int | Sequence[int] | None = None, output_scores: bool = False, prefill_chunk_size: int = 2048,
             cuda_graph: bool = True, context_ids: torch.Tensor | None = None,
             fused_step: bool | None = None) -> GenerationOutput:
    """Prefill ``input_ids`` from ``state`` in chunks, then decode up to ``max_new_tokens`` tokens.

    Greedy (argmax) by default; it samples when ``do_sample=True`` or when any sampling option (``temperature``,
    ``top_k``, ``top_p``, ``min_p``, ``seed``) is given and ``do_sample`` is left at None. ``temperature=0`` is
    always greedy. ``do_sample=False`` is greedy and warns about the sampling options it ignores.

    Args:
        lm: a :class:`~mamba_state.adapters.StatefulMambaLM`.
        input_ids: integer ``[batch, seqlen >= 1]``: the tokens ``state`` has not consumed yet. To resume, pass
            ``out.sequences[:, -1:]`` with ``state=out.state``; input that ends with the whole ``out.sequences``
            of the call that returned ``state`` is refused (those tokens are already in the state).
        state: :class:`MambaModelState` with ``batch`` rows on ``input_ids``' device (zeros when None); not modified.
        max_new_tokens: int >= 0. With 0, ``input_ids[:, :-1]`` are consumed and nothing is generated.
        max_length: instead of ``max_new_tokens``: the length of ``sequences`` at most, ``seqlen + max_new_tokens``
            (tokens the passed-in state consumed earlier do not count). Both given: they must agree.
        sampling: a :class:`~mamba_state.generation.SamplingConfig` holding the six options below, from
            ``do_sample`` to ``repetition_penalty`` (checked when it was made; reuse it across calls). With it, a
            keyword among those six that differs from the config's value raises a StateError; keywords left at
            their defaults are not given. None: the options come from the keywords.
        do_sample: None (sample only when a sampling option is given), True (sample) or False (greedy).
        temperature: >= 0 (sampling default 1); 0 selects greedy decoding (argmax).
        top_k: keep the ``top_k`` most likely tokens (None or 0: no limit).
        top_p: nucleus filter in [0, 1] (None, 0 or 1: off).
        min_p: drop tokens less likely than ``min_p`` times the most likely one, in [0, 1) (None or 0: off).
        repetition_penalty: > 0 (1: off), applied to tokens of ``context_ids``, ``input_ids`` and the new tokens;
            applies to greedy decoding too.
        eos_token_id: int or list of ints that finish a row; None: always ``max_new_tokens`` tokens.
        pad_token_id: what finished rows emit (default: the first ``eos_token_id``).
        seed: None (global RNG), an int, or one int per row; see the module docs for the resume guarantee. A seed
            is a sampling option: with ``do_sample=None`` it turns sampling on.
        output_scores: also return the processed logits of each step.
        prefill_chunk_size: prompt tokens per stateful forward call.
        cuda_graph: on CUDA, replay the decode step as a cached CUDA graph (False: eager).
        context_ids: integer ``[batch, *]`` tokens consumed earlier, used only by ``repetition_penalty``.
        fused_step: decode with :class:`mamba_state.fused_decode.FusedDecoder` (few kernels per layer, state
            updated in place; Mamba-1 models with RMSNorm and fused add-norm). None: on CUDA when the model
            qualifies, else ``lm.step``. True: required (a StateError says why when the model does not qualify).
            False: always ``lm.step``. The two agree to float32 rounding; the resume law holds within either.

    Returns:
        :class:`GenerationOutput` with ``sequences`` int64 ``[batch, seqlen + n_new]`` (``n_new <= max_new_tokens``,
        fewer when every row finished early), ``state`` (after all of ``sequences`` but its last token; its
        metadata records a fingerprint of ``sequences``) and ``scores``.

    Raises:
        StateError: (or its subclass StateShapeError) naming the expected and the found value, for any bad
            argument, before any work: also for ``max_length`` and ``max_new_tokens`` that disagree, neither of
            them given, ``do_sample=True`` with ``temperature=0``, ``sampling=`` with a keyword that disagrees
            with it, and ``input_ids`` that repeat the returned ``sequences`` of ``state``.
    """
    ts = stream(lm, input_ids, state, max_new_tokens=max_new_tokens, max_length=max_length, sampling=sampling,
                do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                seed=seed, output_scores=output_scores, prefill_chunk_size=prefill_chunk_size,
                cuda_graph=cuda_graph, context_ids=context_ids, fused_step=fused_step)
    for _ in ts:
        pass
    ts.close()
    return GenerationOutput(sequences=ts.sequences, state=ts.state, scores=ts.scores)
