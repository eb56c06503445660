"""Short prefills (the tail after a cached prefix) as CUDA graphs, one per power-of-two length.

A forward over a few dozen tokens is bound by the host issuing a few hundred kernel launches (about 15 ms for a
130m-shaped model, whatever the length up to a few thousand tokens), so continuing a 4000-token cached prefix by
96 tokens would cost nearly as much as the cold prefill. Here the forward of ``L`` tokens of one sequence from a
state, ``lm(ids [1, L], state, num_last_tokens=1)``, is captured once per ``L`` in 1, 2, 4, ..., ``max_len``; a
tail of ``n`` tokens runs as the replays of its binary decomposition (96 = 64 + 32), each continuing from the
state the previous one left: a handful of launches instead of hundreds.

The capture is checked once per length against the eager forward (logits and state, at the dtype's tolerance);
a capture that fails or disagrees turns graphs off for good, with a warning, and the eager forward serves. With
``use_graphs=False`` (and on the CPU) the same decomposition runs eagerly: the tests check it there.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..state import MambaInferenceState, MambaModelState

__all__ = ["PrefillGraphs", "pieces"]


def pieces(n: int, max_len: int) -> list[int]:
    """The lengths ``n`` is cut into: powers of two, largest first, each at most ``max_len``."""
    out = []
    while n > 0:
        p = 1 << (n.bit_length() - 1)
        p = min(p, max_len)
        out.append(p)
        n -= p
    return out


def _copy_state(dst: MambaModelState, src: MambaModelState) -> None:
    for idx, layer in dst.items():
        other = src[idx].tensors
        for name, t in layer.tensors.items():
            t.copy_(other[name])


def _clone(state: MambaModelState, seqlen_offset: int) -> MambaModelState:
    return MambaModelState({i: MambaInferenceState.from_tensors({k: t.clone() for k, t in s.tensors.items()})
                            for i, s in state.items()}, seqlen_offset=seqlen_offset)


class _Captured:
    """``lm(ids, state_in, num_last_tokens=1)`` for one length, captured; static inputs and outputs."""

    def __init__(self, lm: Any, length: int, template: MambaModelState):
        device = template.device
        self.ids = torch.zeros(1, length, dtype=torch.long, device=device)
        self.state_in = _clone(template, 0)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # compile kernels and settle the allocator outside the capture
            for _ in range(2):
                lm(self.ids, self.state_in, num_last_tokens=1)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, self.state_out = lm(self.ids, self.state_in, num_last_tokens=1)

    def run(self, ids: torch.Tensor, state: MambaModelState) -> tuple[torch.Tensor, MambaModelState]:
        self.ids.copy_(ids)
        _copy_state(self.state_in, state)
        self.graph.replay()
        return self.logits, self.state_out


class PrefillGraphs:
    """Prefill of up to ``max_len`` tokens of one sequence from a state, by replays of captured forwards.

    Args:
        lm: a :class:`~mamba_state.adapters.StatefulMambaLM` in eval mode.
        max_len: the longest captured length (a power of two); longer tails are not handled here.
        use_graphs: capture CUDA graphs (only on CUDA); False runs the same pieces eagerly.
    """

    def __init__(self, lm: Any, max_len: int = 256, use_graphs: bool = True):
        self.lm = lm
        self.max_len = max_len
        self.device = next(lm.parameters()).device
        kinds = {layout.get("kind") for layout in lm.state_layouts().values()}
        self.use_graphs = bool(use_graphs) and self.device.type == "cuda" and kinds <= {"mamba1", "mamba2"}
        self._graphs: dict[int, _Captured] = {}
        self._checked: set[int] = set()

    def handles(self, n: int) -> bool:
        """Whether a tail of ``n`` tokens is run here (1 <= n <= max_len)."""
        return 1 <= n <= self.max_len

    def _eager(self, ids: torch.Tensor, state: MambaModelState) -> tuple[torch.Tensor, MambaModelState]:
        return self.lm(ids, state, num_last_tokens=1)

    def _piece(self, ids: torch.Tensor, state: MambaModelState) -> tuple[torch.Tensor, MambaModelState]:
        length = ids.shape[1]
        if not self.use_graphs:
            return self._eager(ids, state)
        try:
            g = self._graphs.get(length)
            if g is None:
                g = self._graphs[length] = _Captured(self.lm, length, state)
            logits, out = g.run(ids, state)
            if length not in self._checked:  # once per length: the replay must equal the eager forward
                ref_logits, ref_state = self._eager(ids, state)
                tol = 2e-2 if ref_logits.dtype in (torch.bfloat16, torch.float16) else 1e-4
                if not (torch.allclose(logits.float(), ref_logits.float(), rtol=tol, atol=tol)
                        and out.allclose(ref_state, rtol=tol, atol=tol)):
                    raise RuntimeError(f"the replay of length {length} disagrees with the eager forward")
                self._checked.add(length)
            return logits, out
        except Exception as exc:  # decode on without graphs rather than fail (or be wrong)
            warnings.warn(f"PrefillGraphs: CUDA graphs for short prefills turned off ({type(exc).__name__}: {exc}); "
                          "prefilling eagerly", RuntimeWarning, stacklevel=3)
            self.use_graphs = False
            self._graphs.clear()
            return self._eager(ids, state)

    def run(self, tokens: list[int], state: MambaModelState) -> tuple[torch.Tensor, MambaModelState]:
        """``(last-token logits [1, vocab_padded], new state)`` after feeding ``tokens`` (1 to ``max_len``) from
        ``state`` (batch 1; not modified); the new state is a fresh copy with ``seqlen_offset`` advanced."""
        ids = torch.as_tensor(tokens, dtype=torch.long).to(self.device, non_blocking=True)[None]
        start = state.seqlen_offset
        done = 0
        logits = None
        for length in pieces(len(tokens), self.max_len):
            logits, state = self._piece(ids[:, done:done + length], state)
            done += length
        assert logits is not None
        return logits[:, -1].clone(), _clone(state, start + done)
