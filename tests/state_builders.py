"""Small builders shared by the test files (tiny states, tiny upstream models, bitwise comparison)."""

from __future__ import annotations

import torch

from mamba_state import MambaInferenceState, MambaModelState


def rand_state(kind: str = "mamba1", batch: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0,
               d_inner: int = 6, d_conv: int = 4, d_state: int = 5, nheads: int = 2, headdim: int = 3,
               ngroups: int = 1) -> MambaInferenceState:
    """A state of random (never zero) values; Mamba-2 conv channels = nheads*headdim + 2*ngroups*d_state; Mamba-3:
    ``d_state // 2`` rotary angles (``d_inner`` and ``d_conv`` unused)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "mamba3":
        def r(*shape):
            return torch.randn(shape, generator=g).to(dtype)

        return MambaInferenceState(ssm_state=r(batch, nheads, headdim, d_state),
                                   angle_dt_state=r(batch, nheads, max(1, d_state // 2)),
                                   k_state=r(batch, 1, nheads, d_state), v_state=r(batch, nheads, headdim))
    if kind == "mamba1":
        conv, ssm = (batch, d_inner, d_conv), (batch, d_inner, d_state)
    else:
        conv, ssm = (batch, nheads * headdim + 2 * ngroups * d_state, d_conv), (batch, nheads, headdim, d_state)
    return MambaInferenceState(torch.randn(conv, generator=g).to(dtype), torch.randn(ssm, generator=g).to(dtype))


def rand_model_state(batch: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0, seqlen_offset: int = 5,
                     metadata=None) -> MambaModelState:
    return MambaModelState({0: rand_state("mamba1", batch, dtype, seed), 3: rand_state("mamba2", batch, dtype, seed + 1)},
                           seqlen_offset=seqlen_offset, metadata=metadata)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (so NaNs and -0.0 compare exactly)."""
    return t.detach().cpu().contiguous().view(torch.uint8)


def bit_identical(a: MambaInferenceState, b: MambaInferenceState) -> bool:
    """Same family, and every named tensor with the same dtype, shape, device and bytes."""
    return a.tensor_names == b.tensor_names and all(
        x.dtype == y.dtype and x.shape == y.shape and x.device == y.device and torch.equal(bits(x), bits(y))
        for x, y in zip(a.tensors.values(), b.tensors.values()))


def model_bit_identical(a: MambaModelState, b: MambaModelState) -> bool:
    return (a.layer_indices == b.layer_indices and a.seqlen_offset == b.seqlen_offset and a.metadata == b.metadata
            and all(bit_identical(a[i], b[i]) for i in a.layer_indices))


def tiny_lm(kind: str = "mamba1", n_layer: int = 2, d_model: int = 16, d_state: int = 8, attn: bool = False, seed: int = 0):
    """A tiny upstream MambaLMHeadModel on CPU-friendly paths (no fused add-norm, LayerNorm)."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(seed)
    ssm_cfg = {"d_state": d_state}
    if kind == "mamba2":
        ssm_cfg.update(layer="Mamba2", headdim=8, chunk_size=16)
    extra = {"attn_layer_idx": [n_layer - 1], "attn_cfg": {"num_heads": 2}} if attn else {}
    cfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=32, ssm_cfg=ssm_cfg, rms_norm=False,
                      fused_add_norm=False, pad_vocab_size_multiple=8, **extra)
    return MambaLMHeadModel(cfg)


def same_weight_lms(d_model: int, vocab_size: int, first: dict, second: dict, seed: int = 0):
    """Two ``StatefulMambaLM.from_config`` models with the same weights (2 layers, RMSNorm, fused add-norm, fp32
    residual, tied embeddings); ``first`` / ``second``: their other ``from_config`` arguments (device, backend).
    The configuration is ``first_model.config``."""
    from mamba_state.adapters import StatefulMambaLM

    cfg = dict(d_model=d_model, n_layer=2, vocab_size=vocab_size, ssm_cfg={}, rms_norm=True, fused_add_norm=True,
               residual_in_fp32=True, pad_vocab_size_multiple=8, tie_embeddings=True)
    torch.manual_seed(seed)
    a = StatefulMambaLM.from_config(cfg, **first).eval()
    b = StatefulMambaLM.from_config(cfg, **second).eval()
    b.load_state_dict(a.state_dict())
    return a, b
