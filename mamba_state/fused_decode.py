"""A lean decode step for Mamba-1 language models: six kernels per layer, state updated in place.

``StatefulMambaLM.step`` is written for clarity and for every model variant; on a GPU its cost per token is the
launch latency of about 30 small kernels per layer. For the common pretrained layout (Mamba-1 mixers, RMSNorm,
``fused_add_norm``, no MLP) this module runs the same math with three Triton kernels of its own:

* the add-norm kernel of ``mamba_state.kernels.add_rms_norm`` (shared with the prefill): residual add
  (float32) and RMSNorm in one pass, as upstream's fused add-norm;
* ``_conv_step_kernel``: shift the conv window in place, insert the new input, depthwise dot + bias + SiLU;
* ``_ssm_step_kernel``: the ``dt`` projection, softplus, one SSM step in place, ``D`` skip and SiLU(z) gate, reading
  ``B``, ``C`` and ``z`` where they lie in the projection outputs (no copies).

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
import triton
import triton.language as tl

from mamba_state.kernels._device import launch_device
from mamba_state.kernels.add_norm import add_rms_norm_triton

from .state import MambaInferenceState, MambaModelState

__all__ = ["FusedDecoder", "fused_unsupported_reason"]


@triton.jit
def _conv_step_kernel(x_ptr, sxb, state_ptr, w_ptr, b_ptr, out_ptr, C, K,
                      HAS_BIAS: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """Channels [cb*BC, (cb+1)*BC) of row b: window <- (window[1:], x); out = silu(sum(window * w) + bias).

    state [B, C, K] contiguous (updated in place, its dtype kept); x [B, C] with row stride ``sxb``; w [C, K].
    """
    b = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    k = tl.arange(0, BK)
    cm = c < C
    last = k[None, :] == K - 1
    base = state_ptr + b * C * K + c[:, None] * K + k[None, :]
    shifted = tl.load(base + 1, mask=cm[:, None] & (k[None, :] < K - 1), other=0.0)
    x = tl.load(x_ptr + b * sxb + c, mask=cm, other=0.0).to(state_ptr.dtype.element_ty)
    win = tl.where(last, x[:, None], shifted)
    tl.store(base, win, mask=cm[:, None] & (k[None, :] < K))
    w = tl.load(w_ptr + c[:, None] * K + k[None, :], mask=cm[:, None] & (k[None, :] < K), other=0.0).to(tl.float32)
    acc = tl.sum(win.to(tl.float32) * w, axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
    out = acc / (1.0 + tl.exp(-acc))
    tl.store(out_ptr + b * C + c, out.to(out_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus with its default threshold (20)
    return tl.where(x > 20.0, x, tl.where(x < -20.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def _ssm_step_kernel(state_ptr, x_ptr, xdb_ptr, sxdb, w_ptr, swd, swr, A_ptr, D_ptr, bias_ptr, z_ptr, sz, out_ptr,
                     dim, dstate, R, BD: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    """Channels [pid*BD, (pid+1)*BD) of row b: dt = softplus(W_dt @ xdb[:R] + bias) (rounded to xdb's dtype before
    the bias, where ``F.linear`` rounds it), then one SSM step in place and the gated output.

    state [B, dim, dstate] contiguous; x, out [B, dim]; xdb [B, R + 2*dstate] (dt input, B, C) with row stride
    ``sxdb``; W_dt [dim, R] with strides (swd, swr); A [dim, dstate], D and bias [dim] float32; z [B, dim] with
    row stride ``sz``. Arithmetic in float32; the state keeps its dtype.
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, BN)
    j = tl.arange(0, BR)
    md = d < dim
    mn = n < dstate
    mdn = md[:, None] & mn[None, :]
    row = xdb_ptr + b * sxdb
    dtin = tl.load(row + j, mask=j < R, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + d[:, None] * swd + j[None, :] * swr, mask=md[:, None] & (j[None, :] < R),
                other=0.0).to(tl.float32)
    dt = tl.sum(w * dtin[None, :], 1).to(xdb_ptr.dtype.element_ty).to(tl.float32)
    dt = _softplus(dt + tl.load(bias_ptr + d, mask=md, other=0.0))
    Bv = tl.load(row + R + n, mask=mn, other=0.0).to(tl.float32)
    Cv = tl.load(row + R + dstate + n, mask=mn, other=0.0).to(tl.float32)
    st_off = (b * dim + d[:, None]) * dstate + n[None, :]
    s = tl.load(state_ptr + st_off, mask=mdn, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * dim + d, mask=md, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + d[:, None] * dstate + n[None, :], mask=mdn, other=0.0)
    s = tl.exp(dt[:, None] * A) * s + (dt * x)[:, None] * Bv[None, :]
    tl.store(state_ptr + st_off, s.to(state_ptr.dtype.element_ty), mask=mdn)
    y = tl.sum(s * Cv[None, :], 1) + x * tl.load(D_ptr + d, mask=md, other=0.0)
    zv = tl.load(z_ptr + b * sz + d, mask=md, other=0.0).to(tl.float32)
    y = y * zv / (1.0 + tl.exp(-zv))
    tl.store(out_ptr + b * dim + d, y.to(out_ptr.dtype.element_ty), mask=md)


def _is_rmsnorm(norm: nn.Module) -> bool:
    return not isinstance(norm, nn.LayerNorm) and getattr(norm, "bias", None) is None and hasattr(norm, "weight")


def fused_unsupported_reason(lm: Any, state: MambaModelState) -> str | None:
    """None when :class:`FusedDecoder` can run ``lm`` on ``state``; else why not (one line)."""
    from .adapters.mamba import StatefulMamba

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
    from .backend import requested_backend

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
        batch = u.shape[0]
        xz = mixer.in_proj(u)  # [B, 2 * d_inner]
        d_inner, k = mixer.d_inner, mixer.d_conv
        xc = torch.empty(batch, d_inner, device=u.device, dtype=u.dtype)
        bias = mixer.conv1d.bias
        bc = 64
        _conv_step_kernel[(batch, triton.cdiv(d_inner, bc))](
            xz, xz.stride(0), st.conv_state, mixer.conv1d.weight, bias if bias is not None else xc, xc, d_inner, k,
            HAS_BIAS=bias is not None, BC=bc, BK=triton.next_power_of_2(k), num_warps=2)
        x_db = mixer.x_proj(xc)  # [B, dt_rank + 2 * d_state]: dt input, B, C
        A, D, dt_bias = consts
        # dt projection + SSM step + gate in one kernel; B, C and z are read where they lie (no copies)
        r, n = mixer.dt_rank, mixer.d_state
        y = torch.empty_like(xc)
        w, z = mixer.dt_proj.weight, xz[:, d_inner:]
        bn = triton.next_power_of_2(n)
        bd = min(max(1, 128 // bn), triton.next_power_of_2(d_inner))  # as the single-step kernel's H100 tuning
        _ssm_step_kernel[(triton.cdiv(d_inner, bd), batch)](
            st.ssm_state, xc, x_db, x_db.stride(0), w, w.stride(0), w.stride(1), A, D, dt_bias, z, z.stride(0), y,
            d_inner, n, r, BD=bd, BN=bn, BR=triton.next_power_of_2(r), num_warps=max(1, min(8, bd * bn // 512)))
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
