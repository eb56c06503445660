"""A lean decode step for Mamba-1 language models: six kernels per layer, state updated in place.

``StatefulMambaLM.step`` is written for clarity and for every model variant; on a GPU its cost per token is the
launch latency of about 30 small kernels per layer. For the common pretrained layout (Mamba-1 mixers, RMSNorm,
``fused_add_norm``, no MLP) this module runs the same math with three Triton kernels (in ``mamba_state.kernels``):

* the add-norm kernel of ``mamba_state.kernels.add_rms_norm`` (shared with the prefill): residual add
  (float32) and RMSNorm in one pass, as upstream's fused add-norm;
* ``kernels.decode_step.conv_step``: shift the conv window in place, insert the new input, depthwise dot + bias
  + SiLU;
* ``kernels.decode_step.ssm_step``: the ``dt`` projection, softplus, one SSM step in place, ``D`` skip and SiLU(z)
  gate, reading ``B``, ``C`` and ``z`` where they lie in the projection outputs (no copies).

Per layer: add-norm, ``in_proj``, conv step, ``x_proj``, SSM step, ``out_proj``. ``A = -exp(A_log)``, ``D`` and the
``dt`` bias in float32 are computed once per call (:meth:`FusedDecoder.constants`). Semantics are those of
``StatefulMambaLM.step`` (float32 norms, conv and SSM arithmetic, ``dt`` rounded to the activations' dtype after
its projection as ``F.linear`` rounds it; the state keeps its dtype); results agree with it to rounding, not bit
for bit. Used by :mod:`mamba_state.generation` on CUDA (``fused_step``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from mamba_state.kernels._device import launch_device
from mamba_state.kernels.add_norm import add_rms_norm_triton
from mamba_state.kernels.decode_step import conv_step, ssm_step

from ..state import MambaInferenceState, MambaModelState

__all__ = ["FusedDecoder", "fused_unsupported_reason"]


def _is_rmsnorm(norm: nn.Module) -> bool:
    return not isinstance(norm, nn.LayerNorm) and getattr(norm, "bias", None) is None and hasattr(norm, "weight")


def fused_unsupported_reason(lm: Any, state: MambaModelState) -> str | None:
    """None when :class:`FusedDecoder` can run ``lm`` on ``state``; else why not (one line)."""
    from ..adapters.mamba import StatefulMamba

    cfg = getattr(lm, "config", {})
    if not cfg.get("fused_add_norm", False):
        return "the model does not use fused_add_norm"
    if not _is_rmsnorm(lm.backbone.norm_f):
        return "the model's norms are not RMSNorm"
    for layer in lm.backbone.layers:
        if not isinstance(layer.mixer, StatefulMamba):
            return f"layer {layer.mixer.layer_idx} is not a Mamba-1 mixer"
        if layer.mlp is not None or not _is_rmsnorm(layer.norm):
            return f"layer {layer.mixer.layer_idx} has an MLP or a non-RMSNorm norm"
        if getattr(layer.mixer.dt_proj, "bias", None) is None:
            return f"layer {layer.mixer.layer_idx} has no dt_proj bias"
    if next(lm.parameters()).dtype == torch.float64:
        return "float64 models take the exact eager step"
    if state.device.type != "cuda" and not triton_interpreting():
        return "Triton kernels need CUDA (or TRITON_INTERPRET=1)"
    from mamba_state.kernels.backend import requested_backend

    if any(requested_backend(layer.mixer.backend) == "reference" for layer in lm.backbone.layers):
        return "the reference backend is forced"
    return None


def triton_interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class FusedDecoder:
    """``step(ids [B], state) -> logits [B, vocab_padded]`` updating ``state``'s tensors in place.

    ``state`` must hold contiguous tensors (see :meth:`own`); ``seqlen_offset`` is left to the caller.
    """

    def __init__(self, lm: Any):
        self.lm = lm
        self.residual_in_fp32 = bool(lm.config.get("residual_in_fp32", False))
        self._consts: list | None = None  # computed at the first step that needs them (never inside a capture)

    def constants(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer ``(A = -exp(A_log), D, dt_bias)`` in float32, fresh tensors: computed once per call rather than
        at every token (three kernels per layer less in each step). Weights changed in place while a decode is
        running are therefore not seen by these three until the next call."""
        out = []
        for layer in self.lm.backbone.layers:
            m = layer.mixer
            out.append((-torch.exp(m.A_log.detach().float()), m.D.detach().float().clone(),
                        m.dt_proj.bias.detach().float().clone()))
        return out

    def refresh(self, consts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Write the current ``constants()`` into ``consts`` in place (static buffers of a captured graph)."""
        for dst, src in zip(consts, self.constants()):
            for d, s_ in zip(dst, src):
                d.copy_(s_)

    @staticmethod
    def own(state: MambaModelState) -> MambaModelState:
        """A private contiguous copy of ``state`` for in-place decoding."""
        return MambaModelState(
            {i: MambaInferenceState(s.conv_state.clone(memory_format=torch.contiguous_format),
                                    s.ssm_state.clone(memory_format=torch.contiguous_format))
             for i, s in state.items()}, seqlen_offset=state.seqlen_offset, metadata=dict(state.metadata))

    def _add_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module):
        rdtype = torch.float32 if self.residual_in_fp32 or hidden.dtype == torch.float32 else hidden.dtype
        eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-5)))
        return add_rms_norm_triton(hidden, residual, norm.weight, eps, rdtype)

    def _mixer(self, mixer: Any, u: torch.Tensor, st: MambaInferenceState, consts) -> torch.Tensor:
        xz = mixer.in_proj(u)  # [B, 2 * d_inner]
        d_inner = mixer.d_inner
        xc = conv_step(xz, st.conv_state, mixer.conv1d.weight, mixer.conv1d.bias, d_inner)
        x_db = mixer.x_proj(xc)  # [B, dt_rank + 2 * d_state]: dt input, B, C
        A, D, dt_bias = consts
        # dt projection + SSM step + gate in one kernel; B, C and z are read where they lie (no copies)
        y = ssm_step(st.ssm_state, xc, x_db, mixer.dt_proj.weight, A, D, dt_bias, xz[:, d_inner:], mixer.dt_rank)
        return mixer.out_proj(y)

    def step(self, ids: torch.Tensor, state: MambaModelState, consts=None) -> torch.Tensor:
        """Logits ``[B, vocab_padded]`` for tokens ``ids`` int64 ``[B]``; ``state`` advanced in place.

        ``consts``: the output of :meth:`constants` to use (default: computed at the first call, then kept).
        """
        lm = self.lm
        if consts is None:
            if self._consts is None:
                self._consts = self.constants()
            consts = self._consts
        with launch_device(ids):
            hidden = lm.backbone.embedding(ids)  # [B, d_model]
            residual = None
            for layer, c in zip(lm.backbone.layers, consts):
                normed, residual = self._add_norm(hidden, residual, layer.norm)
                hidden = self._mixer(layer.mixer, normed, state[int(layer.mixer.layer_idx)], c)
            normed, _ = self._add_norm(hidden, residual, lm.backbone.norm_f)
            return lm.lm_head(normed)
