"""``Engine``: continuous batching of generation requests over one :class:`StatefulMambaLM`.

Requests join and leave the decode batch between steps (:class:`~mamba_state.serve.batch.DecodeBatch`). A request:

1. starts from a parked session (``session_id`` that exists: the session's state and the token it has not fed
   yet), else from the longest cached prefix of its prompt (:class:`~mamba_state.cache.StateCache`), else from
   zeros;
2. prefills the tokens its state has not consumed in chunked forwards (the states after the prompt, and every
   ``cache_every`` tokens, go into the cache), packed with the other requests admitted in the same step where the
   model runs packed sequences (:mod:`mamba_state.serve.packed_prefill`); a single token goes straight to the
   decode batch, as in :func:`~mamba_state.generation.generate`;
3. decodes in the batch, one token per engine step, chosen by its own sampler
   (:mod:`mamba_state.serve.sampler`, the generation layer's rule: the draw of the token at absolute position
   ``p`` is keyed by ``(seed, p)``);
4. leaves when it reaches ``max_new_tokens``, emits an end-of-sequence id, or is cancelled; its state (which has
   consumed every token but the last one, the resume law of the generation layer) is parked under its
   ``session_id`` with that last token, and inserted into the cache under prompt + output (less the last token).

So a request's tokens are those of a solo ``generate(prompt, state, max_new_tokens=..., seed=...)``, whatever
joins or leaves the batch meanwhile (up to the last-bit differences of matrix kernels between batch sizes, which
can flip a near-tie in float32), and a session resumed later continues as ``generate(out.sequences[:, -1:] ++
new tokens, state=out.state)`` would.

Threads: :meth:`Engine.submit` may be called from any thread; the work runs in the engine's own thread
(:meth:`Engine.start`) or in the caller's (:meth:`Engine.step`, :meth:`Engine.run_until_idle`).
"""

from __future__ import annotations

import collections
import gc
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..cache import StateCache
from ..cache.keys import check_session_id
from ..errors import StateError
from ..generation.sampling import SamplingConfig
from ..state import MambaModelState
from .batch import DecodeBatch
from .packed_prefill import (RowViews, cache_positions, first_insert, packed_capabilities, plan_forwards,
                             rows_view, serves_prefix, write_rows)
from .prefill_graphs import PrefillGraphs
from .sampler import RowSampler, choose_device, choose_tokens

__all__ = ["Engine", "RequestHandle", "EngineOverloadedError", "EngineStoppedError", "MAX_NEW_TOKENS"]

MAX_NEW_TOKENS = 1 << 20


class EngineOverloadedError(StateError):
    """The engine's queue is full: try again later (HTTP 503)."""


class EngineStoppedError(StateError):
    """The engine was stopped before the request finished."""


@dataclass(slots=True)
class _Event:
    kind: str  # "token" | "done" | "error"
    token: int | None = None
    info: dict[str, Any] | None = None
    error: BaseException | None = None


class RequestHandle:
    """A submitted request: its tokens as they come, and how it ended.

    Iterate it (blocking) for the new tokens; :meth:`result` waits for all of them. ``listener`` (a callable
    taking each event, called from the engine's thread) serves asynchronous consumers. Attributes once done:
    ``finish_reason`` (``"length"``, ``"stop"`` or ``"cancelled"``), ``cached_tokens`` (tokens the state already
    held: a cached prefix or the session), ``prompt_tokens``.
    """

    def __init__(self, request_id: str, listener: Callable[[_Event], None] | None = None):
        self.id = request_id
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.cached_tokens = 0
        self.prompt_tokens = 0
        self.error: BaseException | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self._events: queue.SimpleQueue[_Event] = queue.SimpleQueue()  # a C queue: a put per token is cheap
        self._listener = listener
        self._cancel = threading.Event()
        self._done = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to stop this request at its next step (its state is parked as for a finished one)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _push_token(self, token: int) -> None:
        """``_emit`` of a token event (the engine's per-token path, without the event-kind branches)."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens.append(token)
        ev = _Event("token", token)
        self._events.put(ev)
        if self._listener is not None:
            self._listener(ev)

    def _emit(self, ev: _Event) -> None:
        if ev.kind == "token":
            assert ev.token is not None
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self.tokens.append(ev.token)
        elif ev.kind == "done":
            self.finish_reason = (ev.info or {}).get("finish_reason")
        else:
            self.error = ev.error
        if ev.kind != "token":
            self._done.set()
        self._events.put(ev)
        if self._listener is not None:
            self._listener(ev)

    def __iter__(self):
        while True:
            ev = self._events.get()
            if ev.kind == "token":
                yield ev.token
            elif ev.kind == "error":
                assert ev.error is not None
                raise ev.error
            else:
                return

    def result(self, timeout: float | None = None) -> list[int]:
        """All new tokens (waits up to ``timeout`` seconds; ``TimeoutError`` after that)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id}: expected it to finish within {timeout} s, found it running")
        if self.error is not None:
            raise self.error
        return list(self.tokens)


@dataclass(eq=False)  # compared by identity (list membership, dict keys)
class _Request:
    handle: RequestHandle
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingConfig | None
    seed: int | None
    eos: frozenset[int]
    session_id: str | None
    prompt_np: Any = None  # the prompt as int64 numpy (cache keys are computed from it without conversions)
    # filled while running
    feed: list[int] = field(default_factory=list)  # tokens the start state has not consumed
    history: list[int] | None = None  # every token from a zero state up to the state (when known)
    sampler: RowSampler | None = None
    offset: int = 0  # tokens consumed by the row's state
    pending: int | None = None  # the last token chosen, not fed yet
    slot: int | None = None
    produced: int = 0


def _to_host(tokens: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``(host copy, event)`` of device ``tokens``: on CUDA an asynchronous copy into pinned memory and the event
    recorded after it; on the CPU the tensor itself and None."""
    if tokens.device.type != "cuda":
        return tokens, None
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class Engine:
    """Continuous batching over ``lm`` (see the module docstring).

    Args:
        lm: a :class:`~mamba_state.adapters.StatefulMambaLM` (put in eval mode here).
        cache: a :class:`~mamba_state.cache.StateCache` for prefixes and sessions (None: a new one with the
            default budgets on the model's device; pass one with ``directory=`` for sessions that survive
            restarts).
        max_batch: most requests decoding at once.
        max_queue: most requests waiting to start; beyond it :meth:`submit` raises
            :class:`EngineOverloadedError`.
        cache_every: also cache the prompt's states at every multiple of this many tokens (None: at the end of
            each prompt only).
        prefill_chunk_size: prompt tokens per forward.
        prefill_tokens_per_step: prompt tokens prefilled between two decode steps (at least one request).
        cuda_graph: CUDA graphs per batch bucket on CUDA.
        max_prompt_tokens: longest prompt accepted.
        overlap: emit each step's tokens during the next step (None: on CUDA). Steps with a request that has an
            ``eos_token_id`` are synchronous either way.
        prefill_graphs: run prefills of at most ``prefill_graph_tokens`` tokens (the tail after a cached prefix)
            as replays of CUDA graphs, :class:`~mamba_state.serve.prefill_graphs.PrefillGraphs` (None: on CUDA
            with ``cuda_graph``; True elsewhere runs the same pieces eagerly).
        prefill_graph_tokens: the longest such prefill (a power of two).
        packed_prefill: prefill the requests admitted in one step together, in packed forwards of at most
            ``prefill_chunk_size`` tokens (``cu_seqlens``), when the model runs packed sequences (asked of it
            once); a request alone in its step still prefills alone (and its short tail through the prefill
            graphs). False: one request at a time (the comparison in ``bench_serve.py``).
        freeze_gc: collect garbage once and freeze every object alive now (the model, its modules, the imported
            libraries: ``gc.freeze()``), so that Python's full garbage collections, which a long decode triggers
            now and then, walk only the objects made afterwards. With torch and a model loaded a full collection
            walks about 200,000 objects and takes 70-130 ms, a stall of that length in one decode step (seen on
            the H200: one step of 67 ms among steps of 0.8 ms). None: on CUDA (where steps take about a
            millisecond), not on the CPU. Process-wide: frozen objects are never collected, so garbage cycles
            among them stay until ``gc.unfreeze()``; objects freed by reference counting are freed as always.
    """

    def __init__(self, lm: Any, cache: StateCache | None = None, *, max_batch: int = 64, max_queue: int = 256,
                 cache_every: int | None = None, prefill_chunk_size: int = 2048,
                 prefill_tokens_per_step: int = 8192, cuda_graph: bool = True, max_prompt_tokens: int = 1 << 20,
                 overlap: bool | None = None, prefill_graphs: bool | None = None, prefill_graph_tokens: int = 256,
                 packed_prefill: bool = True, freeze_gc: bool | None = None):
        for name, v, lo in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0),
                            ("prefill_chunk_size", prefill_chunk_size, 1),
                            ("prefill_tokens_per_step", prefill_tokens_per_step, 1),
                            ("max_prompt_tokens", max_prompt_tokens, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise StateError(f"{name}: expected an int >= {lo}, found {v!r}")
        if cache_every is not None and (not isinstance(cache_every, int) or isinstance(cache_every, bool)
                                        or cache_every < 1):
            raise StateError(f"cache_every: expected None or an int >= 1, found {cache_every!r}")
        if freeze_gc is not None and not isinstance(freeze_gc, bool):
            raise StateError(f"freeze_gc: expected None, True or False, found {freeze_gc!r}")
        if not all(hasattr(lm, a) for a in ("step", "new_state", "config")):
            raise StateError(f"lm: expected a StatefulMambaLM, found {type(lm).__name__}")
        self.lm = lm.eval()
        self.device = next(lm.parameters()).device
        self.vocab = int(lm.config["vocab_size"])
        self.cache = cache if cache is not None else StateCache(lm)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.cache_every, self.prefill_chunk_size = cache_every, prefill_chunk_size
        self.prefill_tokens_per_step, self.max_prompt_tokens = prefill_tokens_per_step, max_prompt_tokens
        self.batch = DecodeBatch(lm, max_batch, cuda_graph=cuda_graph)
        self.overlap = self.device.type == "cuda" if overlap is None else bool(overlap)
        if prefill_graphs is None:
            prefill_graphs = self.device.type == "cuda" and cuda_graph
        if (not isinstance(prefill_graph_tokens, int) or prefill_graph_tokens < 1
                or prefill_graph_tokens & (prefill_graph_tokens - 1)):
            raise StateError(f"prefill_graph_tokens: expected a power of two >= 1, found {prefill_graph_tokens!r}")
        self.prefill_graphs = (PrefillGraphs(lm, prefill_graph_tokens, use_graphs=cuda_graph) if prefill_graphs
                               else None)
        self.packed_prefill = bool(packed_prefill)
        # (packed forwards, with states at positions), asked of the model now: two small forwards, which a
        # first burst of requests would otherwise wait for
        self._pack_caps: tuple[bool, bool] | None = packed_capabilities(lm) if self.packed_prefill else None
        self._zero: MambaModelState | None = None  # the zero start state of a new request (read only, shared)
        # the step whose tokens are still on their way to the host: (host tensor, CUDA event, rows)
        self._pending: tuple[torch.Tensor, Any, list[tuple[_Request, int, MambaModelState | None]]] | None = None
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: list[_Request] = []
        self._sessions_busy: set[str] = set()
        self._lock = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.counters: collections.Counter[str] = collections.Counter()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) for tokens/s
        self._recent_lock = threading.Lock()
        if self.device.type == "cuda" if freeze_gc is None else freeze_gc:
            gc.collect()
            gc.freeze()  # last: everything built above is long-lived too

    # ------------------------------------------------------------------ submitting
    def submit(self, prompt: Sequence[int] | torch.Tensor, *, max_new_tokens: int,
               sampling: SamplingConfig | None = None, seed: int | None = None,
               eos_token_id: int | Sequence[int] | None = None, session_id: str | None = None,
               listener: Callable[[_Event], None] | None = None) -> RequestHandle:
        """Queue a request; returns its :class:`RequestHandle` at once.

        Args:
            prompt: token ids (1-D); may be empty only to continue an existing session.
            max_new_tokens: tokens to generate, 1 to ``MAX_NEW_TOKENS``.
            sampling: a :class:`~mamba_state.generation.SamplingConfig` (None: greedy unless ``seed`` is given).
            seed: None or an int (reproducible draws keyed by position).
            eos_token_id: ids that end the request (the id is emitted).
            session_id: continue that session when parked, and park under it at the end.

        Raises ``StateError`` naming the bad argument, ``EngineOverloadedError`` when the queue is full and
        ``EngineStoppedError`` after :meth:`stop`.
        """
        from ..cache.keys import token_array

        ids_np = token_array(prompt, "prompt")
        ids: list[int] = ids_np.tolist()
        if ids and max(ids) >= self.vocab:
            raise StateError(f"prompt: expected token ids in [0, {self.vocab - 1}], found {max(ids)}")
        if len(ids) > self.max_prompt_tokens:
            raise StateError(f"prompt: expected at most {self.max_prompt_tokens} tokens, found {len(ids)}")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or not (
                1 <= max_new_tokens <= MAX_NEW_TOKENS):
            raise StateError(f"max_new_tokens: expected an int in [1, {MAX_NEW_TOKENS}], found {max_new_tokens!r}")
        if sampling is not None and not isinstance(sampling, SamplingConfig):
            raise StateError(f"sampling: expected None or a SamplingConfig, found {type(sampling).__name__}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise StateError(f"seed: expected None or an int, found {seed!r}")
        if eos_token_id is None:
            eos: frozenset[int] = frozenset()
        else:
            raw = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
            if not raw or not all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < self.vocab for e in raw):
                raise StateError(f"eos_token_id: expected an id or ids in [0, {self.vocab - 1}], found "
                                 f"{eos_token_id!r}")
            eos = frozenset(raw)
        if session_id is not None:
            session_id = check_session_id(session_id)
        elif not ids:
            raise StateError("prompt: expected at least one token (or a session_id to continue), found none")
        # the sampling options are checked now (a bad one is the caller's error, not the engine's)
        RowSampler.make(sampling, seed, self.vocab, [], torch.device("cpu"))
        handle = RequestHandle(f"req-{next(self._ids)}", listener)
        req = _Request(handle, ids, max_new_tokens, sampling, seed, eos, session_id, prompt_np=ids_np)
        with self._lock:
            if self._stop:
                raise EngineStoppedError("engine: expected a running engine, found it stopped")
            if len(self._waiting) >= self.max_queue:
                self.counters["rejected"] += 1
                raise EngineOverloadedError(f"engine queue: expected fewer than max_queue={self.max_queue} waiting "
                                            f"requests, found {len(self._waiting)}")
            self._waiting.append(req)
            self.counters["requests"] += 1
            self._lock.notify_all()
        return handle

    # ------------------------------------------------------------------ running
    def start(self) -> None:
        """Run the engine in a background thread (daemon)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="mamba-state-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the thread; requests still running or waiting end with :class:`EngineStoppedError` (running
        ones park their state first)."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._abort_all()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not self._running and self._pending is None:
                    self._lock.wait(0.5)
                if self._stop:
                    return
            try:
                self.step()
            except Exception as exc:  # a bug or a device error: fail the requests in flight, keep serving
                self._fail_all(exc)

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Step in this thread until nothing waits or runs (for tests and benchmarks)."""
        for _ in range(max_steps):
            if not self.step():
                return
        raise StateError(f"run_until_idle: expected idle within {max_steps} steps, found work left")

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._waiting and not self._running and self._pending is None

    def step(self) -> bool:
        """One engine iteration: cancellations, admissions (prefills), one decode step. False when idle."""
        with torch.no_grad():
            self._reap_cancelled()
            admitted = self._admit()
            stepped = self._decode()
        return admitted or stepped or not self.idle

    # ------------------------------------------------------------------ admission
    def _next_waiting(self) -> _Request | None:
        with self._lock:
            for i, req in enumerate(self._waiting):
                if req.session_id is None or req.session_id not in self._sessions_busy:
                    del self._waiting[i]
                    if req.session_id is not None:
                        self._sessions_busy.add(req.session_id)
                    return req
            return None

    def _admit(self) -> bool:
        """Take waiting requests (up to ``prefill_tokens_per_step`` prompt tokens and ``max_batch`` rows), set up
        their states and prefill them: together in packed forwards when there are several and the model runs
        packed sequences (:meth:`_prefill_packed`), else one at a time."""
        budget = self.prefill_tokens_per_step
        admitted = False
        with self._lock:
            several = len(self._waiting) >= 2
        pack, positions = self._packing() if several else (False, False)
        group: list[tuple[_Request, MambaModelState]] = []
        marks: list[tuple[Any, int]] = []  # per group member: its ids from zero, the first position it caches
        held: list[_Request] = []
        while budget > 0 and len(self._running) + len(group) < self.max_batch:
            req = self._next_waiting()
            if req is None:
                break
            admitted = True
            if req.handle.cancelled:
                self._finish_unstarted(req)
                continue
            if marks and self._waits_for(req, marks):
                held.append(req)
                continue
            try:
                state = self._setup(req)
                budget -= len(req.feed)
                if len(req.feed) == 1:  # one token: the decode step, as generate does
                    self._join(req, state, req.feed[0])
                elif pack and (positions or not self._fills_inside(req, state)):
                    group.append((req, state))
                    ids = self._known_ids(req, state.seqlen_offset)[1]
                    if ids is not None:
                        marks.append((np.asarray(ids, dtype=np.int64),
                                      first_insert(state.seqlen_offset, len(req.feed), self.cache_every)))
                else:
                    self._prefill_one(req, state)
            except Exception as exc:
                self._release_session(req)
                req.handle._emit(_Event("error", error=exc))
        if held:  # first in line at the next step, whose lookup will find the states cached meanwhile
            for req in held:
                self._release_session(req)
            with self._lock:
                self._waiting.extendleft(reversed(held))
        if len(group) == 1:
            req, state = group[0]
            try:
                self._prefill_one(req, state)
            except Exception as exc:
                self._release_session(req)
                req.handle._emit(_Event("error", error=exc))
        elif group:
            self._prefill_packed(group)
        return admitted

    def _packing(self) -> tuple[bool, bool]:
        """``(packed, positions)``: whether prefills run packed, and with states at positions (asked of the
        model once, :func:`~mamba_state.serve.packed_prefill.packed_capabilities`)."""
        if not self.packed_prefill:
            return False, False
        if self._pack_caps is None:
            self._pack_caps = packed_capabilities(self.lm)
        return self._pack_caps

    @staticmethod
    def _waits_for(req: _Request, marks: list[tuple[Any, int]]) -> bool:
        """Whether ``req``'s prompt would start from a state that a request packed in this step is about to
        cache (``marks``: its ids from zero and the first position it caches). Then ``req`` waits a step and
        starts from that state, as it would have prefilled after that request one at a time."""
        if req.prompt_np is None or len(req.prompt) < 2:
            return False
        return any(serves_prefix(req.prompt_np, ids, first) for ids, first in marks)

    def _fills_inside(self, req: _Request, state: MambaModelState) -> bool:
        """Whether ``req``'s prefill caches a state strictly inside its feed (a ``cache_every`` multiple before
        its end), which a packed forward can give only where the model has packed states at positions."""
        every, start = self.cache_every, state.seqlen_offset
        known = req.history is not None and len(req.history) == start
        return bool(known and every and (start // every + 1) * every < start + len(req.feed))

    def _setup(self, req: _Request) -> MambaModelState:
        """``req``'s start state (batch 1: its parked session, the longest cached prefix of its prompt, or
        zeros); sets ``req.feed`` (the tokens that state has not consumed), its history and sampler."""
        state: MambaModelState | None = None
        parked = None
        if req.session_id is not None:
            parked = self.cache.get_session(req.session_id, device=self.device)
            if parked is not None:
                state, extra = parked
                pending = extra.get("pending")
                req.feed = ([int(pending)] if isinstance(pending, int) else []) + req.prompt
                hist = extra.get("history")
                req.history = list(hist) if isinstance(hist, list) else None
                req.handle.cached_tokens = state.seqlen_offset
        if state is None:
            req.feed, req.history = list(req.prompt), []
            if len(req.prompt) >= 2:
                n, hit = self.cache.lookup(req.prompt_np[:-1], device=self.device)
                if hit is not None:
                    state, req.feed, req.history = hit, req.prompt[n:], req.prompt[:n]
                    req.handle.cached_tokens = n
        if not req.feed:
            raise StateError(f"session {req.session_id}: expected a parked session or prompt tokens, found neither "
                             "(unknown or evicted session and an empty prompt)")
        req.handle.prompt_tokens = len(req.prompt)
        # the repetition penalty sees generate's input: the whole prompt (a cached prefix included), or for a
        # resumed session the pending token and the new prompt (the resume law's input)
        context = req.feed if parked is not None else req.prompt
        req.sampler = RowSampler.make(req.sampling, req.seed, self.vocab, context, self.device)
        self.counters["prompt_tokens"] += len(req.prompt)
        self.counters["cached_tokens"] += req.handle.cached_tokens
        if state is None:
            state = self._zero_state()
        req.offset = state.seqlen_offset
        return state

    def _zero_state(self) -> MambaModelState:
        """The zero state of batch 1, one object shared by every new request: nothing modifies a start state in
        place (the forwards return new states, the batch and the group state copy it), and allocating one
        per request costs a zero fill per state tensor (48 launches at 24 layers)."""
        if self._zero is None:
            self._zero = self.lm.new_state(1, device=self.device)
        return self._zero

    def _prefill_one(self, req: _Request, state: MambaModelState) -> None:
        """Prefill ``req`` alone from ``state`` and choose its first token."""
        logits, state = self._prefill(req, state)
        req.offset = state.seqlen_offset
        assert req.sampler is not None
        self._first_token(req, choose_tokens(logits, [(0, req.sampler, req.offset)])[0], state)

    def _first_token(self, req: _Request, token: int, state: MambaModelState, join: bool = True) -> bool:
        """``req`` prefilled (``state`` has consumed its feed): emit ``token``, then park it, or join the batch
        (with ``join``; else the caller joins it, :meth:`_join_rows`). True when it goes on decoding."""
        self.counters["prefill_tokens"] += len(req.feed)
        req.produced += 1
        self._emit_token(req, token)
        if req.produced >= req.max_new_tokens or token in req.eos:
            self._park(req, state)
            return False
        if join:
            self._join(req, state, token)
        return True

    def _known_ids(self, req: _Request, start: int) -> tuple[list[int] | None, Any]:
        """``(history + feed, the same as int64 numpy)`` when the tokens from zero up to ``start`` are known
        (the cache is filled only then), else ``(None, None)``."""
        history = req.history
        if history is None or len(history) != start:
            return None, None
        full = history + req.feed
        # the prompt's own array when the history is the prompt's start (no conversion)
        full_np = (req.prompt_np if req.prompt_np is not None and len(full) == len(req.prompt)
                   and req.session_id is None else full)
        return full, full_np

    def _prefill_packed(self, group: list[tuple[_Request, MambaModelState]]) -> None:
        """Prefill the requests of ``group`` (each with its start state, batch 1) together: packed forwards of at
        most ``prefill_chunk_size`` tokens (:func:`~mamba_state.serve.packed_prefill.plan_forwards`), each
        request's piece from its own row of one group state; the cache gets the states ``_prefill`` would put
        there (the rows at the end of a piece, and ``return_states_at`` per sequence inside one). A request takes
        its first token (``logits[0, cu[1:] - 1]``) after the forward holding its last piece."""
        reqs = [req for req, _ in group]
        starts = [state.seqlen_offset for _, state in group]
        known = [self._known_ids(req, start) for req, start in zip(reqs, starts)]
        if all(s is self._zero for _, s in group):  # all from zero: a zero batch, not a cat of n copies
            rows = self.lm.new_state(len(group), device=self.device)
        else:
            rows = MambaModelState.cat([MambaModelState(dict(s.items())) for _, s in group])  # [n, ...]
        row = RowViews(rows)  # each request's row as a batch-1 view, for the cache and its first token
        feeds = [np.asarray(req.feed, dtype=np.int64) for req in reqs]
        finished: set[int] = set()
        self.batch.reserve(len(self._running) + len(reqs))  # the bucket they join, reached in one move
        try:
            for pieces in plan_forwards([f.size for f in feeds], self.prefill_chunk_size):
                first, last = pieces[0].seq, pieces[-1].seq
                lengths = [p.hi - p.lo for p in pieces]
                ids = torch.from_numpy(np.concatenate([feeds[p.seq][p.lo:p.hi] for p in pieces]))
                cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
                fills = [cache_positions(starts[p.seq], p.lo, p.hi, feeds[p.seq].size, self.cache_every)
                         if known[p.seq][0] is not None else [] for p in pieces]
                base = [starts[p.seq] + p.lo for p in pieces]
                inside = [[q - b for q in fs if q < b + n] for fs, b, n in zip(fills, base, lengths)]
                x = ids.to(self.device, non_blocking=True)[None]
                sub = rows_view(rows, first, last + 1)
                # logits of each piece's last token only ([1, pieces, vocab]), not of every packed position
                if any(inside):
                    logits, new, states_at = self.lm(x, sub, cu_seqlens=cu, return_states_at=inside,
                                                     num_last_tokens=1)
                else:
                    logits, new = self.lm(x, sub, cu_seqlens=cu, num_last_tokens=1)
                    states_at = [[] for _ in pieces]
                write_rows(rows, first, new)
                self.counters["prefill_batches"] += 1
                self.counters["prefill_batch_sequences"] += len(pieces)
                for j, p in enumerate(pieces):
                    full_np = known[p.seq][1]
                    for q, s in zip(inside[j], states_at[j]):
                        self.cache.insert(full_np[:base[j] + q], MambaModelState(dict(s.items()),
                                                                                 seqlen_offset=base[j] + q))
                    if fills[j] and fills[j][-1] == base[j] + lengths[j]:
                        self.cache.insert(full_np[:fills[j][-1]], row(p.seq, fills[j][-1]))
                done = [j for j, p in enumerate(pieces) if p.hi == feeds[p.seq].size]
                if not done:
                    continue
                ends = torch.as_tensor(done, device=logits.device)  # the pieces are non-empty: row j is piece j
                choose = []
                for k, j in enumerate(done):
                    req = reqs[pieces[j].seq]
                    req.offset = starts[pieces[j].seq] + feeds[pieces[j].seq].size
                    assert req.sampler is not None
                    choose.append((k, req.sampler, req.offset))
                tokens = choose_tokens(logits[0].index_select(0, ends), choose)
                joining: list[tuple[_Request, int, int]] = []
                for k, j in enumerate(done):
                    s = pieces[j].seq
                    req = reqs[s]
                    full = known[s][0]
                    if full is not None:
                        req.history = full
                    if self._first_token(req, tokens[k], row(s, req.offset), join=False):
                        joining.append((req, s, tokens[k]))
                    else:
                        finished.add(s)
                self._join_rows(joining, rows)  # one copy per state tensor for all of them
                finished.update(s for _, s, _ in joining)
        except Exception as exc:  # the requests not prefilled yet fail; those already decoding go on
            for s, req in enumerate(reqs):
                if s not in finished:
                    self._release_session(req)
                    req.handle._emit(_Event("error", error=exc))

    def _prefill(self, req: _Request, state: MambaModelState) -> tuple[torch.Tensor, MambaModelState]:
        """Chunked forward of ``req.feed`` from ``state``; caches the states at ``cache_every`` multiples and at
        the end (when the token history from zero is known). Returns last-token logits ``[1, vocab_padded]``."""
        feed, start = req.feed, state.seqlen_offset
        full, full_np = self._known_ids(req, start)
        every = self.cache_every
        inside = every is not None and (start + len(feed) - 1) // every > start // every
        if self.prefill_graphs is not None and self.prefill_graphs.handles(len(feed)) and not inside:
            tail, state = self.prefill_graphs.run(feed, state)  # a short tail: a few graph replays
            if full is not None:
                self.cache.insert(full_np, state)
                req.history = full
            return tail, state
        logits: torch.Tensor | None = None
        done = 0
        chunk = self.prefill_chunk_size
        while done < len(feed):
            part = feed[done:done + chunk]
            last = done + len(part) == len(feed)
            if full is not None:
                assert full_np is not None
                logits, state = self.cache.fill(self.lm, full_np[:start + done + len(part)], state=None if
                                                start + done == 0 else state, start=start + done,
                                                every=self.cache_every, insert_end=last, num_last_tokens=1)
            else:
                x = torch.as_tensor(part, dtype=torch.long, device=self.device)[None]
                logits, state = self.lm(x, state, num_last_tokens=1)
            done += len(part)
        assert logits is not None
        if full is not None:
            req.history = full
        return logits[:, -1], MambaModelState(dict(state.items()), seqlen_offset=state.seqlen_offset)

    def _join(self, req: _Request, state: MambaModelState, token: int) -> None:
        """Put ``req`` into the decode batch with ``token`` as its next input (its state will consume it)."""
        self._join_rows([(req, 0, token)], state)

    def _join_rows(self, joining: list[tuple[_Request, int, int]], rows: MambaModelState) -> None:
        """:meth:`_join` for several requests at once: ``(request, its row of rows, its next input)`` each."""
        if not joining:
            return
        index = [s for _, s, _ in joining]
        if index == list(range(index[0], index[0] + len(index))):
            sub = rows_view(rows, index[0], index[-1] + 1)
        else:
            sub = rows.select(torch.tensor(index, dtype=torch.long))
        slots = self.batch.add_many([r for r, _, _ in joining], sub, [t for _, _, t in joining])
        for (req, _, token), slot in zip(joining, slots):
            req.slot = slot
            if req.history is not None:
                req.history.append(token)
            self._running.append(req)

    # ------------------------------------------------------------------ decoding
    def _decode(self) -> bool:
        """One batched decode step. The tokens go back into the batch's inputs on the device; the host reads them
        (one copy) and emits them either now (``sync``) or during the next step (``overlap``), so the host's
        bookkeeping runs while the GPU computes. A request that ends by its length leaves at once (its row copied
        out before the next step); one with ``eos_token_id`` makes the step synchronous, so that it leaves
        before its EOS token is fed."""
        if not self._running:
            self._flush()
            if self.batch.capacity:
                self.batch.release()
            return False
        logits = self.batch.step()
        self.counters["decode_steps"] += 1
        self.counters["decode_rows"] += len(self._running)
        # one pass over the rows (the host's work per row and step is what bounds a large batch's decode):
        # positions, the rows needing their own token choice, who leaves after this step
        sampled = []  # rows that are not greedy without a penalty (chosen one by one)
        still: list[_Request] = []
        leaving: list[tuple[_Request, int]] = []
        entries: list[tuple[_Request, int, MambaModelState | None]] = []
        sync = not self.overlap
        for req in self._running:
            slot, sampler = req.slot, req.sampler
            assert sampler is not None and slot is not None
            req.offset += 1
            req.produced += 1
            if not sampler.batched_greedy:
                sampled.append((slot, sampler, req.offset))
            if req.eos:
                sync = True
            if req.produced >= req.max_new_tokens:  # ends by its length: its row leaves now (with the others')
                leaving.append((req, len(entries)))
            else:
                still.append(req)
            entries.append((req, slot, None))
        chosen = choose_device(logits, sampled, vocab=self.vocab)
        assert self.batch.ids is not None
        self.batch.ids.copy_(chosen)  # the next step's inputs, without a host round trip
        host, event = _to_host(chosen)
        if leaving:
            parked = self.batch.remove_many([entries[i][1] for _, i in leaving], [r.offset for r, _ in leaving])
            for (req, i), row in zip(leaving, parked):
                entries[i] = (req, entries[i][1], row)
                req.slot = None
        self._running = still
        self._flush()  # the previous step's tokens (their copy is done or nearly)
        self._pending = (host, event, entries)
        if sync:
            self._flush()
        moved = self.batch.maybe_shrink()
        for req in self._running:
            if req.slot in moved:
                req.slot = moved[req.slot]
        return True

    def _flush(self) -> None:
        """Emit the tokens of the step still pending (waiting for their copy to the host)."""
        if self._pending is None:
            return
        host, event, entries = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        values = host.tolist()
        ended = []
        self._count_tokens(len(entries))
        for req, slot, parked in entries:
            token = values[slot]
            req.pending = token
            req.handle._push_token(token)
            if parked is not None:
                self._park(req, parked)
            elif token in req.eos:  # only in a synchronous step: the token has not been fed yet
                assert req.slot is not None
                ended.append(req)
                self._park(req, self.batch.remove(req.slot, req.offset))
                req.slot = None
            elif req.history is not None:
                req.history.append(token)  # it is the row's next input
        if ended:
            self._running = [r for r in self._running if r not in ended]

    def _emit_token(self, req: _Request, token: int) -> None:
        """Hand ``token`` to the client (``req.pending`` is the last token emitted)."""
        req.pending = token
        self._count_tokens(1)
        req.handle._push_token(token)

    def _count_tokens(self, n: int) -> None:
        """Count ``n`` tokens emitted now (the counter and the window of :meth:`tokens_per_second`)."""
        self.counters["tokens"] += n
        now = time.perf_counter()
        with self._recent_lock:
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - 10.0:
                self._recent.popleft()

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Tokens emitted per second over the last ``window`` seconds (at most 10)."""
        now = time.perf_counter()
        with self._recent_lock:  # read from other threads (/metrics) while the engine appends
            recent = sum(n for t, n in self._recent if t >= now - window)
        return recent / window

    # ------------------------------------------------------------------ leaving
    def _park(self, req: _Request, state: MambaModelState, reason: str | None = None) -> None:
        """Park the finished request's state (consumed all but its last token) and tell the client."""
        last = req.pending
        if reason is None:
            reason = "stop" if last in req.eos else "length"
        try:
            if req.history is not None and len(req.history) == state.seqlen_offset and req.history:
                self.cache.insert(req.history, state)
            if req.session_id is not None:
                extra: dict[str, Any] = {"pending": last}
                if req.history is not None and len(req.history) == state.seqlen_offset:
                    extra["history_length"] = len(req.history)
                self.cache.put_session(req.session_id, state, extra)
        except Exception as exc:  # the request's tokens stand; its state could not be kept
            self._release_session(req)
            req.handle._emit(_Event("error", error=exc))
            return
        self._release_session(req)
        self.counters["finished"] += 1
        req.handle._emit(_Event("done", info={"finish_reason": reason, "seqlen_offset": state.seqlen_offset}))

    def _release_session(self, req: _Request) -> None:
        if req.session_id is not None:
            with self._lock:
                self._sessions_busy.discard(req.session_id)
                self._lock.notify_all()

    def _finish_unstarted(self, req: _Request) -> None:
        self._release_session(req)
        req.handle._emit(_Event("done", info={"finish_reason": "cancelled"}))

    def _reap_cancelled(self) -> None:
        if not any(req.handle.cancelled for req in self._running):
            return
        self._flush()  # emit what was chosen; the rows' states have consumed all but their last token
        keep = []
        for req in self._running:
            if req.handle.cancelled:
                assert req.slot is not None
                if req.history:
                    req.history.pop()  # the row's next input, not consumed
                self._park(req, self.batch.remove(req.slot, req.offset), reason="cancelled")
            else:
                keep.append(req)
        self._running = keep

    def _fail_all(self, exc: BaseException) -> None:
        if self._pending is not None:
            self._running += [req for req, _, parked in self._pending[2] if parked is not None]
            self._pending = None
        for req in self._running:
            if req.slot is not None and self.batch.capacity:
                self.batch.slots[req.slot] = None
            self._release_session(req)
            req.handle._emit(_Event("error", error=exc))
        self._running = []
        self.batch.release()

    def _abort_all(self) -> None:
        with torch.no_grad():
            self._flush()
            for req in list(self._running):
                assert req.slot is not None
                if req.history:
                    req.history.pop()  # the row's next input, not consumed
                self._park(req, self.batch.remove(req.slot, req.offset), reason="cancelled")
        self._running = []
        self.batch.release()
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for req in waiting:
            req.handle._emit(_Event("error", error=EngineStoppedError("engine: stopped before the request started")))

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict[str, Any]:
        with self._lock:
            waiting = len(self._waiting)
        return {**{k: self.counters.get(k, 0) for k in ("requests", "finished", "rejected", "tokens",
                                                          "prompt_tokens", "cached_tokens", "prefill_tokens",
                                                          "decode_steps", "decode_rows", "prefill_batches",
                                                          "prefill_batch_sequences")},
                "running": len(self._running), "waiting": waiting, "batch_capacity": self.batch.capacity,
                "tokens_per_second": self.tokens_per_second(), "cache": self.cache.stats()}
