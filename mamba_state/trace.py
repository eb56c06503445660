"""Introspection: the recurrent state of a Mamba layer (or of every layer of a model) over a sequence.

* :func:`trace_layer` runs one layer over ``x`` and keeps its states after every token (a *full trace*), or only
  after chosen token counts (``positions``) or every ``stride`` tokens: the conv and SSM states of a Mamba-1/2
  layer, the four named tensors of a Mamba-3 layer (``angle_dt_state``, ``ssm_state``, ``k_state``, ``v_state``).
* :func:`trace_model` does the same for every layer of a :class:`~mamba_state.adapters.lm.StatefulMambaLM`.

States come straight from the layer's forward with ``return_states_at`` (the scan is cut into segments at the
requested positions, each continuing from the previous segment's final state: every token is processed once).
Row ``i`` of a trace's state tensors is the state after ``positions[i]`` tokens; a full trace has
``positions = [0, 1, ..., L]``, so row 0 is the initial state and row ``L`` the final one.

Memory: a full trace holds ``(L + 1) * B * (state elements per row)`` numbers. Before allocating one larger
than ``warn_bytes`` (default :data:`FULL_TRACE_WARN_BYTES`, 256 MiB) a :class:`TraceSizeWarning` names the size;
pass ``positions`` or ``stride`` to keep fewer states.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

from mamba_state.kernels.dispatch import device_ops
from mamba_state.kernels.scan_positions import check_positions

from .adapters._state_checks import check_reset
from .errors import StateCompatibilityError, StateError, StateShapeError
from .state import MambaInferenceState, MambaModelState

__all__ = ["LayerTrace", "ModelTrace", "trace_layer", "trace_model", "FULL_TRACE_WARN_BYTES", "TraceSizeWarning",
           "trace_positions"]

FULL_TRACE_WARN_BYTES = 256 * 2 ** 20
"""A full trace larger than this (in bytes, states only) warns before it is allocated."""


class TraceSizeWarning(UserWarning):
    """A full trace is about to allocate more than the warning threshold (shown by default, unlike
    ``ResourceWarning``)."""


@dataclass
class LayerTrace:
    """The states of one layer over a sequence (time-major).

    Attributes:
        outputs: ``[L, B, d_model]`` the layer's output at every token.
        ssm_states: ``[T, B, d_inner, d_state]`` (Mamba-1) or ``[T, B, nheads, headdim, d_state]`` (Mamba-2,
            Mamba-3).
        conv_states: ``[T, B, conv_channels, d_conv]`` (the conv window: last ``d_conv`` conv inputs, oldest
            first); ``None`` for a Mamba-3 layer, which has no conv.
        positions: the ``T`` token counts the state rows follow (``[0, 1, ..., L]`` for a full trace).
        layer_idx: the layer's index (None for an unindexed layer).
        states: every named tensor of the layer's family, ``{name: [T, B, ...]}`` (Mamba-1/2: ``conv_state`` and
            ``ssm_state``, the two tensors above; Mamba-3: ``angle_dt_state``, ``ssm_state``, ``k_state``,
            ``v_state``). Filled from ``conv_states`` / ``ssm_states`` when not given.
    """

    outputs: torch.Tensor
    ssm_states: torch.Tensor
    conv_states: torch.Tensor | None
    positions: list[int]
    layer_idx: int | None = None
    states: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.states:
            if self.conv_states is None:
                raise StateError("LayerTrace: expected conv_states (Mamba-1/2) or states={name: tensor} (Mamba-3), "
                                 "found neither")
            self.states = {"conv_state": self.conv_states, "ssm_state": self.ssm_states}

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def kind(self) -> str:
        """The layer's family: ``"mamba1"``, ``"mamba2"`` or ``"mamba3"``."""
        if "angle_dt_state" in self.states:
            return "mamba3"
        return "mamba1" if self.ssm_states.dim() == 4 else "mamba2"

    @property
    def nbytes(self) -> int:
        """Bytes held by the outputs and states."""
        return sum(t.numel() * t.element_size() for t in (self.outputs, *self.states.values()))

    def state_at(self, i: int) -> MambaInferenceState:
        """Row ``i`` as a :class:`MambaInferenceState` (views; the state after ``positions[i]`` tokens)."""
        if not -len(self) <= i < len(self):
            raise StateError(f"trace row: expected an index in [{-len(self)}, {len(self)}), found {i}")
        return MambaInferenceState.from_tensors({name: t[i] for name, t in self.states.items()})

    def norms(self, name: str) -> torch.Tensor:
        """``[T, B]``: the L2 norm of each row's tensor ``name`` (one of :attr:`states`; float64 on CPU)."""
        if name not in self.states:
            raise StateCompatibilityError(f"trace: expected one of the layer's tensors {list(self.states)}, found "
                                          f"{name!r}")
        return self.states[name].detach().double().flatten(2).norm(dim=-1).cpu()

    def ssm_norms(self) -> torch.Tensor:
        """``[T, B]``: the L2 norm of each row's SSM state (float64 on CPU)."""
        return self.norms("ssm_state")

    def conv_norms(self) -> torch.Tensor:
        """``[T, B]``: the L2 norm of each row's conv window (float64 on CPU); a Mamba-3 trace has none
        (``StateCompatibilityError``; see :meth:`norms`)."""
        if self.conv_states is None:
            raise StateCompatibilityError(f"trace: expected a Mamba-1/2 layer for conv_norms(), found a {self.kind} "
                                          f"layer, which has no conv (its tensors: {list(self.states)})")
        return self.norms("conv_state")


@dataclass
class ModelTrace:
    """Per-layer traces of a whole model over one chunk of tokens.

    Attributes:
        layers: ``{layer_idx: LayerTrace}``.
        logits: ``[B, L, vocab]`` the model's logits (as ``lm(input_ids, state)`` gives them).
        final_state: the :class:`MambaModelState` after the chunk.
        positions: the token counts of every layer trace's rows.
        start_offset: ``seqlen_offset`` of the state the chunk started from.
    """

    layers: dict[int, LayerTrace]
    logits: torch.Tensor
    final_state: MambaModelState
    positions: list[int] = field(default_factory=list)
    start_offset: int = 0

    @property
    def layer_indices(self) -> list[int]:
        return sorted(self.layers)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.layers.values())

    def state_at(self, i: int) -> MambaModelState:
        """Row ``i`` of every layer as a :class:`MambaModelState` (``seqlen_offset`` = ``start_offset`` +
        ``positions[i]``); tensors are views into the trace."""
        states = {k: t.state_at(i) for k, t in self.layers.items()}
        return MambaModelState(states, seqlen_offset=self.start_offset + self.positions[i % len(self.positions)])


def trace_positions(seqlen: int, positions: Any = None, stride: int | None = None) -> list[int]:
    """The token counts a trace keeps: ``positions`` (checked), ``0, stride, 2*stride, ... <= seqlen``, or all
    of ``0..seqlen`` when both are None."""
    if positions is not None and stride is not None:
        raise StateError(f"trace: expected positions or stride, not both; found positions={positions!r} and "
                         f"stride={stride!r}")
    if stride is not None:
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise StateError(f"stride: expected a positive int, found {stride!r}")
        return list(range(0, seqlen + 1, stride))
    if positions is not None:
        return check_positions(positions, seqlen, name="positions")
    return list(range(seqlen + 1))


def _wrap_layer(layer: Any) -> Any:
    """Our adapter for ``layer`` (adapters pass through; upstream Mamba / Mamba2 / Mamba3 layers get wrapped)."""
    if hasattr(layer, "state_layout") and hasattr(layer, "new_state"):
        return layer
    from .state.layers import layer_layout

    layout = layer_layout(layer)
    if layout is None and not hasattr(layer, "num_heads"):
        raise StateCompatibilityError(f"layer: expected a Mamba, Mamba-2 or Mamba-3 layer, found "
                                      f"{type(layer).__name__}")
    if layout is not None and layout["kind"] == "mamba3":
        from .adapters.mamba3 import StatefulMamba3

        return StatefulMamba3(layer)
    if layout is not None and layout["kind"] == "mamba1":
        from .adapters.mamba import StatefulMamba

        return StatefulMamba(layer)
    from .adapters.mamba2 import StatefulMamba2

    return StatefulMamba2(layer)


def _state_bytes(layer: Any, batch: int, rows: int, dtype: Any) -> int:
    layout = layer.state_layout()
    per_row = sum(math.prod(shape) for key, shape in layout.items() if key.endswith("_shape"))
    return rows * batch * per_row * torch.empty((), dtype=dtype).element_size()


def _warn_if_large(nbytes: int, rows: int, warn_bytes: int | None, what: str) -> None:
    limit = FULL_TRACE_WARN_BYTES if warn_bytes is None else warn_bytes
    if nbytes > limit:
        warnings.warn(f"{what}: a full trace of {rows} states needs {nbytes} bytes ({nbytes / 2 ** 20:.1f} MiB), "
                      f"over the {limit}-byte threshold; pass positions= or stride= to keep fewer states",
                      TraceSizeWarning, stacklevel=3)


def _grad_mode(requires_grad: bool):
    return torch.enable_grad() if requires_grad else torch.no_grad()


def _run_layer(layer: nn.Module, x: torch.Tensor, state: MambaInferenceState | None, reset: torch.Tensor | None,
               positions: list[int]) -> tuple[torch.Tensor, MambaInferenceState, LayerTrace]:
    """One layer's forward with states at ``positions``: ``(y [B, L, d_model], new_state, trace)``."""
    fast = getattr(layer, "_forward_stacked_states", None)
    if positions and fast is not None:  # the states come stacked: no state object per position
        y, new, stacked = fast(x, state, reset, positions)
    elif positions:
        y, new, states = layer(x, state=state, reset=reset, return_states_at=positions)
        stacked = {name: torch.stack([s.tensors[name] for s in states]) for name in new.tensor_names}
    else:  # no rows: empty tensors with the right trailing shape
        y, new, _ = layer(x, state=state, reset=reset, return_states_at=positions)
        stacked = {name: t.new_zeros((0, *t.shape)) for name, t in new.tensors.items()}
    trace = LayerTrace(outputs=y.transpose(0, 1), ssm_states=stacked["ssm_state"],
                       conv_states=stacked.get("conv_state"), positions=list(positions),
                       layer_idx=getattr(layer, "layer_idx", None), states=stacked)
    return y, new, trace


def trace_layer(layer: nn.Module, x: torch.Tensor, state: MambaInferenceState | None = None,
                positions: Sequence[int] | torch.Tensor | None = None, stride: int | None = None,
                reset: torch.Tensor | None = None, warn_bytes: int | None = None,
                requires_grad: bool = False) -> LayerTrace:
    """Run ``layer`` over ``x`` and keep its states after every token (or after chosen token counts).

    Args:
        layer: a :class:`~mamba_state.StatefulMamba` / :class:`~mamba_state.StatefulMamba2` /
            :class:`~mamba_state.StatefulMamba3`, or an upstream ``Mamba`` / ``Mamba2`` / ``Mamba3`` layer (wrapped
            on the fly; parameters shared).
        x: ``[B, L, d_model]``.
        state: the state before ``x`` (zeros when None); not modified.
        positions: token counts in ``[0, L]``, non-decreasing: keep only the states after those.
        stride: keep the states after ``0, stride, 2*stride, ...`` tokens (not with ``positions``).
        reset: bool ``[B, L]`` as in the layer's forward.
        warn_bytes: threshold of the full-trace size warning (default :data:`FULL_TRACE_WARN_BYTES`).
        requires_grad: build the autograd graph (default: run under ``torch.no_grad()``).

    Returns:
        :class:`LayerTrace` with ``outputs`` ``[L, B, d_model]`` and states with a leading axis of ``L + 1``
        (full trace; row 0 the initial state) or ``len(positions)``.
    """
    layer = _wrap_layer(layer)
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        found = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise StateShapeError(f"x: expected [batch, seqlen, d_model], found {found}")
    batch, seqlen = x.shape[0], x.shape[1]
    rows = trace_positions(seqlen, positions, stride)
    if positions is None and stride is None:
        dtype = state.ssm_state.dtype if state is not None else layer.state_dtype
        _warn_if_large(_state_bytes(layer, batch, len(rows), dtype), len(rows), warn_bytes, "trace_layer")
    with _grad_mode(requires_grad):
        _, _, trace = _run_layer(layer, x, state, reset, rows)
    return trace


def trace_model(lm: nn.Module, input_ids: torch.Tensor, state: MambaModelState | None = None,
                positions: Sequence[int] | torch.Tensor | None = None, stride: int | None = None,
                reset: torch.Tensor | None = None, warn_bytes: int | None = None,
                requires_grad: bool = False) -> ModelTrace:
    """Trace every layer of a language model over ``input_ids``.

    Args:
        lm: a :class:`~mamba_state.StatefulMambaLM` (an upstream ``MambaLMHeadModel`` is wrapped on the fly).
        input_ids: integer ``[B, L]``.
        state: the :class:`MambaModelState` before the chunk (zeros when None); not modified.
        positions, stride, reset, warn_bytes, requires_grad: as in :func:`trace_layer` (the warning counts all
            layers together).

    Returns:
        :class:`ModelTrace`: ``.layers[layer_idx]`` a :class:`LayerTrace` of that layer's mixer (its input is
        the normalised residual stream, its output what the block adds back), ``.logits`` ``[B, L, vocab]``
        (equal to ``lm(input_ids, state)[0]``) and ``.final_state``.
    """
    from .adapters.lm import StatefulMambaLM

    if not isinstance(lm, StatefulMambaLM):
        lm = StatefulMambaLM(lm)
    lm._check_ids(input_ids)
    batch, seqlen = input_ids.shape
    rows = trace_positions(seqlen, positions, stride)
    state = lm.check_state(state, batch, input_ids.device)  # every layer's state, before anything runs
    check_reset(reset, [batch, seqlen])
    blocks: list[Any] = list(lm.backbone.layers)  # our _Block modules
    if positions is None and stride is None:
        total = sum(_state_bytes(b.mixer, batch, len(rows), state[int(b.mixer.layer_idx)].ssm_state.dtype)
                    for b in blocks)
        _warn_if_large(total, len(rows), warn_bytes, "trace_model")
    layers: dict[int, LayerTrace] = {}
    finals = {}
    with _grad_mode(requires_grad):
        ops = device_ops(input_ids.device, blocks[0].backend)
        hidden = lm.backbone.embedding(input_ids)
        residual = None
        for block in blocks:  # the block math of StatefulMambaLM, keeping the mixer's trace
            idx = int(block.mixer.layer_idx)
            normed, residual = block.add_norm(hidden, residual, block.norm, ops)
            hidden, finals[idx], layers[idx] = _run_layer(block.mixer, normed, state[idx], reset, rows)
            if block.mlp is not None:
                hidden, residual = block.add_norm(hidden, residual, block.norm2, ops)
                hidden = block.mlp(hidden)
        hidden, _ = blocks[0].add_norm(hidden, residual, lm.backbone.norm_f, ops)
        logits = lm.lm_head(hidden)
    final = MambaModelState(finals, seqlen_offset=state.seqlen_offset + seqlen, metadata=dict(state.metadata))
    return ModelTrace(layers=layers, logits=logits, final_state=final, positions=rows,
                      start_offset=state.seqlen_offset)
