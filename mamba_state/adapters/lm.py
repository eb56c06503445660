"""``StatefulMambaLM``: a whole upstream ``MambaLMHeadModel`` with an explicit model state in and out.

The wrapper registers the upstream model's own modules under upstream's names (``backbone.embedding``,
``backbone.layers.N.norm``, ``backbone.layers.N.mixer.*``, ``backbone.layers.N.norm2`` / ``.mlp`` when
``d_intermediate > 0``, ``backbone.norm_f``, ``lm_head``), so ``state_dict()`` keys and tensors are upstream's
(tied embeddings stay tied). Mixers are wrapped in :class:`StatefulMamba` (or ``StatefulMamba2``). The upstream
model itself is never registered, patched or changed.

Block math, in plain PyTorch for both of upstream's variants (``fused_add_norm`` only fuses the same math into
one Triton kernel; with the Triton backend and no gradient needed, ours does too for RMSNorm:
``mamba_state.kernels.add_rms_norm``)::

    residual = hidden + residual            (hidden alone in the first block)
    hidden   = mixer(norm(residual))        (residual kept in float32 when residual_in_fp32)
    [residual = hidden + residual; hidden = mlp(norm2(residual))]     when the block has an MLP
    logits   = lm_head(norm_f(hidden + residual))

Models with attention layers (``attn_layer_idx``) are refused at wrap time: their KV cache grows with the
sequence and is not part of a Mamba state.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any, Sequence, cast

import torch
import torch.nn as nn

from mamba_state.kernels._host import host_tensor
from mamba_state.kernels.dispatch import DeviceOps, device_ops
from mamba_state.kernels.scan_positions import check_positions
from mamba_state.kernels.selective_scan.packed import check_varlen_positions, seq_bounds

from ..errors import StateCompatibilityError, StateError, StateShapeError
from ..state import MambaModelState
from ..state.layers import is_attention_layer
from ._state_checks import check_reset
from .checkpoint import adopt_hf, load_pretrained, save_pretrained
from .mamba import StatefulMamba
from .modules import norm_apply, normalize_config

if TYPE_CHECKING:
    from ..generation.sampling import SamplingConfig
    from .mamba2 import StatefulMamba2

__all__ = ["StatefulMambaLM"]


def _wrap_mixer(mixer: nn.Module, idx: int, state_dtype: torch.dtype, backend: str | None
                ) -> StatefulMamba | StatefulMamba2:
    if is_attention_layer(mixer):
        raise StateCompatibilityError(
            f"layer {idx}: expected a Mamba or Mamba2 mixer, found an attention layer (MHA); models with "
            "attention layers are not supported (their KV cache is not a Mamba state)"
        )
    if hasattr(mixer, "state_layout") and hasattr(mixer, "new_state"):  # already one of our adapters
        return cast("StatefulMamba | StatefulMamba2", mixer)
    if type(mixer).__name__ == "Mamba3" or hasattr(mixer, "num_rope_angles"):  # before Mamba-2: both have nheads
        from .mamba3 import StatefulMamba3

        return cast("StatefulMamba2", StatefulMamba3(mixer, state_dtype=state_dtype, backend=backend))
    if hasattr(mixer, "nheads") or type(mixer).__name__ in ("Mamba2", "Mamba2Simple", "Mamba2Mixer"):
        try:
            from .mamba2 import StatefulMamba2
        except ImportError as exc:
            raise StateCompatibilityError(
                f"layer {idx}: found a Mamba-2 mixer, which needs mamba_state.adapters.mamba2.StatefulMamba2 ({exc})"
            ) from None
        return StatefulMamba2(mixer, state_dtype=state_dtype, backend=backend)
    return StatefulMamba(mixer, state_dtype=state_dtype, backend=backend,
                         layer_idx=idx if getattr(mixer, "layer_idx", None) is None else None)


@functools.lru_cache(maxsize=None)
def _kernel_add_norm():
    """The Triton launches of ``mamba_state.kernels.add_rms_norm`` as ``(inference, autograd)``, or None without
    Triton (cached: asked by every block)."""
    try:
        from mamba_state.kernels.add_norm import add_rms_norm_autograd, add_rms_norm_triton
    except Exception:  # triton missing
        return None
    return add_rms_norm_triton, add_rms_norm_autograd


def _one_pass_add_norm(hidden: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module,
                       ops: DeviceOps) -> bool:
    """Whether the add + RMSNorm of a ``fused_add_norm`` block runs as one Triton kernel each way: an RMSNorm
    without bias, not float64, and the Triton backend for ``hidden``'s device (CUDA, or forced)."""
    if isinstance(norm, nn.LayerNorm) or getattr(norm, "bias", None) is not None or hidden.dtype == torch.float64:
        return False
    return ops.triton and _kernel_add_norm() is not None


class _Block(nn.Module):
    """One residual block: shares ``norm``, ``mixer`` (wrapped), ``norm2`` and ``mlp`` with the upstream block."""

    def __init__(self, block: Any, idx: int, residual_in_fp32: bool, fused_add_norm: bool,
                 state_dtype: torch.dtype, backend: str | None):
        super().__init__()
        self.norm = block.norm
        self.mixer = _wrap_mixer(block.mixer, idx, state_dtype, backend)
        mlp = getattr(block, "mlp", None)
        if mlp is not None:
            self.norm2 = block.norm2
        self.mlp = mlp
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.backend = backend

    def add_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module, ops: DeviceOps):
        """``(norm(hidden + residual), hidden + residual)`` with upstream's dtypes for either variant."""
        if self.fused_add_norm and _one_pass_add_norm(hidden, residual, norm, ops):
            eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-5)))
            weight = cast(torch.Tensor, norm.weight)
            infer, train = _kernel_add_norm()
            grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                   for t in (hidden, residual, weight))
            return (train if grad else infer)(hidden, residual, weight, eps,
                                              torch.float32 if self.residual_in_fp32 else hidden.dtype)
        if self.fused_add_norm:  # upstream's kernel adds in float32 and normalises in float32
            ct = torch.float64 if hidden.dtype == torch.float64 else torch.float32
            r = hidden.to(ct) if residual is None else hidden.to(ct) + residual.to(ct)
            out = norm_apply(norm, r).to(hidden.dtype)
            return out, (r if self.residual_in_fp32 else r.to(hidden.dtype))
        r = hidden if residual is None else hidden + residual
        out = norm_apply(norm, r.to(cast(torch.Tensor, norm.weight).dtype))  # every supported norm has a weight
        return out, (r.to(torch.promote_types(r.dtype, torch.float32)) if self.residual_in_fp32 else r)

    def forward(self, hidden, residual, state, reset, one_step: bool, ops: DeviceOps, positions=None,
                bounds: list[int] | None = None, fresh: bool = False):
        """``(hidden, residual, new_state)``, plus the mixer's states at ``positions`` when they are given.
        ``bounds``: packed sequences (``cu_seqlens`` as a list; the mixer's ``_forward_packed``; ``fresh``: the
        caller passed no state, every row starts from zeros)."""
        hidden, residual = self.add_norm(hidden, residual, self.norm, ops)
        states_at = None
        # the mixers' unchecked internals: StatefulMambaLM.check_state has checked the state, ids, reset and
        # positions once for every layer
        if bounds is not None:
            out = cast(Any, self.mixer)._forward_packed(hidden, state, reset, bounds, positions, fresh=fresh)
            hidden, state = out[0], out[1]
            states_at = out[2] if positions is not None else None
        elif one_step:
            if state is None:
                state = self.mixer.new_state(hidden.shape[0], device=hidden.device)
            hidden, state = self.mixer._step(hidden, state, None if reset is None else reset[:, 0])
        elif positions is not None:
            hidden, state, states_at = self.mixer._forward(hidden, state, reset, positions)
        else:
            hidden, state = self.mixer._forward(hidden, state, reset, None)
        if self.mlp is not None:
            hidden, residual = self.add_norm(hidden, residual, self.norm2, ops)
            hidden = self.mlp(hidden)
        if positions is not None:
            return hidden, residual, state, states_at
        return hidden, residual, state


def _layer_idx(block: _Block) -> int:
    """The block's layer index: an int for every mixer of an LM (upstream numbers them; :func:`_wrap_mixer`
    numbers a Mamba-1 mixer without one)."""
    return int(cast(int, block.mixer.layer_idx))


class _Backbone(nn.Module):
    def __init__(self, backbone: Any, cfg: dict, state_dtype: torch.dtype, backend: str | None):
        super().__init__()
        self.embedding = backbone.embedding
        self.layers = nn.ModuleList(
            _Block(b, i, cfg["residual_in_fp32"], cfg["fused_add_norm"], state_dtype, backend)
            for i, b in enumerate(backbone.layers)
        )
        self.norm_f = backbone.norm_f

    def blocks(self) -> Sequence[_Block]:
        """``layers`` typed as what it holds (a ``ModuleList`` is typed as holding plain Modules)."""
        return cast("Sequence[_Block]", self.layers)


def _refuse_wrong_model(model: Any) -> None:
    """Point at the right constructor when ``model`` is a path or a transformers model (recognised by its class's
    module, so transformers is never imported here)."""
    if isinstance(model, (str, os.PathLike)):
        raise StateCompatibilityError(
            f"model: expected an upstream MambaLMHeadModel, found a path {os.fspath(model)!r}; load a checkpoint "
            "directory with StatefulMambaLM.from_pretrained(path)"
        )
    cls = type(model)
    if cls.__module__.split(".")[0] == "transformers":
        name = cls.__name__
        if "Mamba2" in name:
            hint = ("transformers' Mamba-2 models are not supported (their mixer differs from upstream's): convert "
                    "the checkpoint to upstream's format and use StatefulMambaLM.from_pretrained(directory)")
        else:
            hint = ("wrap a transformers MambaForCausalLM with StatefulMambaLM.from_hf(hf_model), which shares its "
                    "modules (see docs/howto-pretrained.md)")
        raise StateCompatibilityError(f"model: expected an upstream MambaLMHeadModel, found a transformers {name}; "
                                      + hint)


class StatefulMambaLM(nn.Module):
    """An upstream ``MambaLMHeadModel`` run with explicit state.

    Args:
        model: upstream ``MambaLMHeadModel`` (or :class:`~mamba_state.adapters.modules.MambaLMParameters`).
        state_dtype: dtype of new states (float32 by default).
        backend: ``None``/``"auto"``, ``"reference"`` or ``"triton"``.

    Raises ``StateCompatibilityError`` for models with attention layers or unknown mixers, and for a transformers
    model (use :meth:`from_hf`) or a path (use :meth:`from_pretrained`), saying which to use.
    """

    def __init__(self, model: Any, state_dtype: torch.dtype = torch.float32, backend: str | None = None):
        super().__init__()
        _refuse_wrong_model(model)
        if not all(hasattr(model, a) for a in ("backbone", "lm_head", "config")):
            raise StateCompatibilityError(
                f"model: expected an upstream MambaLMHeadModel (backbone, lm_head, config), found {type(model).__name__}"
            )
        cfg = normalize_config(model.config)
        if cfg["attn_layer_idx"]:
            raise StateCompatibilityError(
                f"model attn_layer_idx: expected no attention layers (their KV cache is not a Mamba state), found "
                f"{cfg['attn_layer_idx']}"
            )
        self.config = cfg
        self.backbone = _Backbone(model.backbone, cfg, state_dtype, backend)
        self.lm_head = model.lm_head
        self.state_dtype = state_dtype
        self.backend = backend
        idx = [_layer_idx(layer) for layer in self.backbone.blocks()]
        if len(set(idx)) != len(idx):
            raise StateCompatibilityError(f"model: expected unique mixer layer_idx values, found {idx}")

    # ------------------------------------------------------------------ construction and loading
    @classmethod
    def from_config(cls, config: Any, device: Any = None, dtype: torch.dtype | None = None,
                    state_dtype: torch.dtype = torch.float32, backend: str | None = None) -> "StatefulMambaLM":
        """A new model with upstream's parameters and initialisation for ``config`` (no mamba_ssm needed)."""
        from .modules import MambaLMParameters

        return cls(MambaLMParameters(config, device=device, dtype=dtype, state_dtype=state_dtype, backend=backend),
                   state_dtype=state_dtype, backend=backend)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: Any = None, dtype: torch.dtype | None = None,
                        state_dtype: torch.dtype = torch.float32, backend: str | None = None) -> "StatefulMambaLM":
        """Load a local upstream-format (or transformers-format Mamba) checkpoint directory; see
        :func:`mamba_state.adapters.checkpoint.load_pretrained`.

        Hub ids are not downloaded: fetch the repository first (``hf download org/name --local-dir name`` or
        ``huggingface_hub.snapshot_download("org/name")``, which returns the directory), then pass the directory."""
        return cls(load_pretrained(path, device=device, dtype=dtype, state_dtype=state_dtype, backend=backend),
                   state_dtype=state_dtype, backend=backend)

    @classmethod
    def from_hf(cls, hf_model: nn.Module, state_dtype: torch.dtype = torch.float32,
                backend: str | None = None) -> "StatefulMambaLM":
        """Adopt a transformers ``MambaForCausalLM`` (sharing its modules, exposing upstream's names)."""
        return cls(adopt_hf(hf_model), state_dtype=state_dtype, backend=backend)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` in upstream's format (readable by :meth:`from_pretrained`)."""
        save_pretrained(self, path)

    # ------------------------------------------------------------------ state
    @property
    def layer_indices(self) -> list[int]:
        return [_layer_idx(layer) for layer in self.backbone.blocks()]

    def state_layouts(self) -> dict[int, dict[str, Any]]:
        return {_layer_idx(layer): layer.mixer.state_layout() for layer in self.backbone.blocks()}

    def new_state(self, batch_size: int, device: Any = None, dtype: torch.dtype | None = None) -> MambaModelState:
        """A zero state for every layer (``seqlen_offset`` 0)."""
        return MambaModelState({_layer_idx(layer): layer.mixer.new_state(batch_size, device=device, dtype=dtype)
                                for layer in self.backbone.blocks()}, seqlen_offset=0)

    def check_state(self, state: Any, batch_size: int, device: torch.device | str | None = None) -> MambaModelState:
        """``state`` when it fits this model: a :class:`MambaModelState` with exactly the model's layers, each
        with its mixer's layout, ``batch_size`` rows and on ``device`` (default: the parameters' device); a zero
        state for None. Else a :class:`~mamba_state.errors.StateError` subclass naming what was expected and
        found, before any work. The one check of a model state: ``forward``, ``step``, ``generate``, ``stream``
        and the tracing functions run it, and the layers below trust it."""
        device = torch.device(device) if device is not None else next(self.parameters()).device
        if state is None:
            return self.new_state(batch_size, device=device)
        if not isinstance(state, MambaModelState):
            raise StateError(f"state: expected a MambaModelState or None, found {type(state).__name__}")
        if state.layer_indices != sorted(self.layer_indices):
            raise StateCompatibilityError(
                f"state layers: expected {sorted(self.layer_indices)} (the model's), found {state.layer_indices}"
            )
        for layer in self.backbone.blocks():  # every layer's layout, batch and device before any work
            layer.mixer.check_state(state[_layer_idx(layer)], batch_size, device)
        return state

    def _check_ids(self, input_ids: Any, check_range: bool | None = None) -> None:
        """Shape and dtype of ``input_ids``; the id range too when ``check_range`` (default: for CPU tensors
        only, since on CUDA reading the range back is a host sync that would stall back-to-back chunked calls)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1 or (
                input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool):
            found = (f"{input_ids.dtype} {list(input_ids.shape)}" if isinstance(input_ids, torch.Tensor)
                     else type(input_ids).__name__)
            raise StateShapeError(f"input_ids: expected an integer tensor [batch, seqlen >= 1], found {found}")
        if check_range or (check_range is None and not input_ids.is_cuda):
            self._check_id_range(input_ids)

    def _check_id_range(self, input_ids: torch.Tensor) -> None:
        """Token ids within the embedding's rows (a raw IndexError, or a device-side assert on CUDA, otherwise).
        A host sync on CUDA; skipped while a CUDA graph is being captured."""
        if input_ids.numel() == 0 or input_ids.is_meta or (input_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        rows = self.backbone.embedding.num_embeddings
        lo, hi = torch.aminmax(input_ids)
        lo_i, hi_i = int(lo), int(hi)
        if lo_i < 0 or hi_i >= rows:
            raise StateShapeError(f"input_ids: expected token ids in [0, {rows - 1}] (the embedding's rows), found "
                                  f"ids from {lo_i} to {hi_i}")

    def _run(self, input_ids, state, reset, one_step: bool, num_last_tokens: int = 0, return_states_at=None,
             cu_seqlens=None):
        if cu_seqlens is not None:
            return self._run_packed(input_ids, state, reset, num_last_tokens, return_states_at, cu_seqlens)
        batch, seqlen = input_ids.shape
        positions = None if return_states_at is None else check_positions(return_states_at, seqlen)
        check_reset(reset, [batch, seqlen])
        if state is not None:
            state = self.check_state(state, batch, input_ids.device)
        # state None: every mixer starts from its own zero state (not materialised here)
        offset, metadata = (0, {}) if state is None else (state.seqlen_offset, state.metadata)
        ops = device_ops(input_ids.device, self.backend)  # the LM's own kernels (add-norm), decided once a call
        hidden = self.backbone.embedding(input_ids)
        residual = None
        new_layers = {}
        layers_at: dict[int, list] = {}
        for layer in self.backbone.blocks():
            idx = _layer_idx(layer)
            layer_state = None if state is None else state[idx]
            if positions is None:
                hidden, residual, new_layers[idx] = layer(hidden, residual, layer_state, reset, one_step, ops)
            else:
                hidden, residual, new_layers[idx], layers_at[idx] = layer(hidden, residual, layer_state, reset,
                                                                          False, ops, positions)
        first = self.backbone.blocks()[0]
        if num_last_tokens > 0:  # the final add-norm works per token: only the kept tokens need it
            hidden = hidden[:, -num_last_tokens:]
            residual = None if residual is None else residual[:, -num_last_tokens:]
        hidden, _ = first.add_norm(hidden, residual, self.backbone.norm_f, ops)
        logits = self.lm_head(hidden)
        new_state = MambaModelState(new_layers, seqlen_offset=offset + seqlen, metadata=dict(metadata))
        if positions is None:
            return logits, new_state
        states_at = [MambaModelState({idx: layers_at[idx][i] for idx in layers_at},
                                     seqlen_offset=offset + p, metadata=dict(metadata))
                     for i, p in enumerate(positions)]
        return logits, new_state, states_at

    def _run_packed(self, input_ids, state, reset, num_last_tokens: int, return_states_at, cu_seqlens):
        """:meth:`forward` with ``cu_seqlens``: every check first (boundaries, positions, reset, a state with one
        row per sequence, mixers that run packed sequences), then the layers' ``_forward_packed``."""
        batch, seqlen = input_ids.shape
        bounds = seq_bounds(cu_seqlens, seqlen, batch)
        nseq = len(bounds) - 1
        if num_last_tokens not in (0, 1):
            raise StateError(f"num_last_tokens: expected 0 (every position) or 1 (each sequence's last token) with "
                             f"cu_seqlens, found {num_last_tokens}")
        positions = None if return_states_at is None else check_varlen_positions(return_states_at, bounds)
        check_reset(reset, [1, seqlen])
        unpacked = [type(layer.mixer).__name__ for layer in self.backbone.blocks()
                    if not hasattr(layer.mixer, "_forward_packed")]
        if unpacked:
            raise StateCompatibilityError(f"cu_seqlens: expected mixers that run packed sequences (Mamba-1, "
                                          f"Mamba-2), found {sorted(set(unpacked))}")
        no_positions = [type(layer.mixer).__name__ for layer in self.backbone.blocks()
                        if not getattr(layer.mixer, "packed_states_at", False)]
        if positions is not None and no_positions:  # refused before any layer runs
            raise StateCompatibilityError(f"return_states_at with cu_seqlens: expected Mamba-1 mixers (states at "
                                          f"positions of packed sequences), found {sorted(set(no_positions))}")
        fresh = state is None
        if state is not None and isinstance(state, MambaModelState) and state.batch_size != nseq:
            raise StateShapeError(f"state: expected {nseq} rows (one per sequence of cu_seqlens), found "
                                  f"{state.batch_size}")
        state = self.check_state(state, nseq, input_ids.device)
        offset, metadata = state.seqlen_offset, state.metadata
        ops = device_ops(input_ids.device, self.backend)
        hidden = self.backbone.embedding(input_ids)
        residual = None
        new_layers = {}
        layers_at: dict[int, list] = {}
        for layer in self.backbone.blocks():
            idx = _layer_idx(layer)
            out = layer(hidden, residual, state[idx], reset, False, ops, positions, bounds=bounds, fresh=fresh)
            hidden, residual, new_layers[idx] = out[0], out[1], out[2]
            if positions is not None:
                layers_at[idx] = out[3]
        lasts = [b - 1 for a, b in zip(bounds[:-1], bounds[1:]) if b > a] if num_last_tokens else None
        if lasts is not None:  # only each sequence's last token reaches the norm and the head
            at = host_tensor(lasts, torch.long, hidden.device)
            hidden = hidden.index_select(1, at)
            residual = residual.index_select(1, at) if residual is not None else None
        hidden, _ = self.backbone.blocks()[0].add_norm(hidden, residual, self.backbone.norm_f, ops)
        logits = self.lm_head(hidden)
        if lasts is not None and len(lasts) < nseq:  # an empty sequence has no last token: NaN logits mark it
            full = logits.new_full((1, nseq, logits.shape[-1]), float("nan"))
            keep = host_tensor([s for s in range(nseq) if bounds[s + 1] > bounds[s]], torch.long, logits.device)
            logits = full.index_copy(1, keep, logits)
        longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        new_state = MambaModelState(new_layers, seqlen_offset=offset + longest, metadata=dict(metadata))
        if positions is None:
            return logits, new_state
        states_at = [[MambaModelState({idx: layers_at[idx][s][i] for idx in layers_at}, seqlen_offset=offset + p,
                                      metadata=dict(metadata)) for i, p in enumerate(ps)]
                     for s, ps in enumerate(positions)]
        return logits, new_state, states_at

    def forward(self, input_ids: torch.Tensor, state: MambaModelState | None = None,
                reset: torch.Tensor | None = None, num_last_tokens: int = 0, return_states_at: Any = None,
                cu_seqlens: torch.Tensor | None = None):
        """Run a chunk of tokens from ``state`` (zeros when None); ``state`` is not modified.

        Args:
            input_ids: integer ``[B, L]``, ids in ``[0, embedding rows)`` (checked for CPU tensors; on CUDA the
                check would be a host sync per call, so a bad id there is PyTorch's device-side assert).
            state: :class:`MambaModelState` with every layer of the model.
            reset: bool ``[B, L]``; True at ``t`` makes row ``b`` start afresh at token ``t`` (every layer).
            num_last_tokens: when > 0, logits of the last ``num_last_tokens`` positions only.
            return_states_at: None, or non-decreasing ints in ``[0, L]``: also return the model state after
                ``p`` tokens of this chunk for each ``p`` (0: ``state``; a reset at token ``p`` is not applied
                yet), taken from segmented scans (no token is processed twice). For rollback (speculative
                decoding) and prefix caching at arbitrary positions.
            cu_seqlens: None, or int32/int64 ``[num_seqs + 1]`` (starts at 0, non-decreasing, ends at L):
                ``input_ids`` ``[1, L]`` holds ``num_seqs`` sequences packed one after another (sequence ``s`` is
                tokens ``cu_seqlens[s]:cu_seqlens[s + 1]``, possibly none) and ``state`` has one row per sequence
                (zeros when None). Each sequence runs exactly as it would alone from its row (Mamba-1 mixers);
                the new state has one row per sequence and ``seqlen_offset`` advanced by the longest
                sequence's length (one offset is kept for all rows). ``reset`` is ``[1, L]``;
                ``return_states_at`` is one list of positions per sequence, and ``states`` one list per sequence
                of batch-1 :class:`MambaModelState`. ``num_last_tokens`` is 0 (logits ``[1, L, vocab]``) or 1:
                each sequence's last-token logits only, ``[1, num_seqs, vocab]`` (NaN for an empty sequence,
                which has no last token). See docs/varlen.md.

        Returns:
            ``(logits [B, L, vocab], new_state)`` with ``new_state.seqlen_offset = state.seqlen_offset + L``.
            With ``return_states_at``: ``(logits, new_state, states)``, ``states`` a list of
            :class:`MambaModelState` (one per position, ``seqlen_offset = state.seqlen_offset + p``).
        """
        self._check_ids(input_ids)
        return self._run(input_ids, state, reset, one_step=False, num_last_tokens=num_last_tokens,
                         return_states_at=return_states_at, cu_seqlens=cu_seqlens)

    def step(self, input_ids: torch.Tensor, state: MambaModelState | None = None,
             reset: torch.Tensor | None = None) -> tuple[torch.Tensor, MambaModelState]:
        """One token per row through every layer's ``step`` (upstream's decoding math).

        Args:
            input_ids: integer ``[B]`` or ``[B, 1]``.
            reset: optional bool ``[B]`` (rows that start afresh at this token).

        Returns:
            ``(logits, new_state)``: logits ``[B, vocab]`` for ``[B]`` input, ``[B, 1, vocab]`` for ``[B, 1]``.
        """
        squeeze = isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1
        ids = input_ids[:, None] if squeeze else input_ids
        self._check_ids(ids)
        if ids.shape[1] != 1:
            raise StateShapeError(f"input_ids: expected one token per row ([batch] or [batch, 1]), found {list(ids.shape)}")
        check_reset(reset, [ids.shape[0]])
        if reset is not None:
            reset = reset[:, None]
        logits, state = self._run(ids, state, reset, one_step=True)
        return (logits[:, 0] if squeeze else logits), state

    # ------------------------------------------------------------------ generation (mamba_state.generation)
    def generate(self, input_ids: torch.Tensor, state: MambaModelState | None = None, *,
                 max_new_tokens: int | None = None, max_length: int | None = None,
                 sampling: SamplingConfig | None = None, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float = 1.0,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 seed: int | Sequence[int] | None = None, output_scores: bool = False,
                 prefill_chunk_size: int = 2048, cuda_graph: bool = True, context_ids: torch.Tensor | None = None,
                 fused_step: bool | None = None) -> Any:
        """Prefill ``input_ids`` (int ``[batch, L]``, the tokens ``state`` has not consumed) in chunks from
        ``state``, then decode up to ``max_new_tokens`` tokens (or up to ``max_length`` tokens in all). Greedy
        unless ``do_sample=True`` or a sampling option (``temperature``, ``top_k``, ``top_p``, ``min_p``,
        ``seed``) is given; the sampling options as ``sampling=SamplingConfig(...)`` or as keywords. Returns a
        :class:`~mamba_state.generation.GenerationOutput` (``.sequences``, ``.state``, ``.scores``); resume with
        ``generate(out.sequences[:, -1:], state=out.state, ...)``. Every argument as in
        :func:`mamba_state.generation.generate`."""
        from ..generation import generate

        return generate(self, input_ids, state, max_new_tokens=max_new_tokens, max_length=max_length,
                        sampling=sampling, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                        min_p=min_p, repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id, seed=seed, output_scores=output_scores,
                        prefill_chunk_size=prefill_chunk_size, cuda_graph=cuda_graph, context_ids=context_ids,
                        fused_step=fused_step)

    def stream(self, input_ids: torch.Tensor, state: MambaModelState | None = None, *,
               max_new_tokens: int | None = None, max_length: int | None = None,
               sampling: SamplingConfig | None = None, do_sample: bool | None = None,
               temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
               min_p: float | None = None, repetition_penalty: float = 1.0,
               eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
               seed: int | Sequence[int] | None = None, output_scores: bool = False,
               prefill_chunk_size: int = 2048, cuda_graph: bool = True, context_ids: torch.Tensor | None = None,
               fused_step: bool | None = None) -> Any:
        """Like :meth:`generate`, but yields each new token int64 ``[batch]`` as it is produced; the final state
        is the returned stream's ``.state`` at the end (:func:`mamba_state.generation.stream`)."""
        from ..generation import stream

        return stream(self, input_ids, state, max_new_tokens=max_new_tokens, max_length=max_length,
                      sampling=sampling, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                      min_p=min_p, repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                      pad_token_id=pad_token_id, seed=seed, output_scores=output_scores,
                      prefill_chunk_size=prefill_chunk_size, cuda_graph=cuda_graph, context_ids=context_ids,
                      fused_step=fused_step)
