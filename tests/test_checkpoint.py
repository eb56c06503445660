"""Checkpoint loading: upstream-format directories, transformers models, our own save_pretrained."""

from __future__ import annotations

import json

import pytest
import torch

from mamba_state.adapters import StatefulMambaLM
from mamba_state.errors import StateCompatibilityError, StateFormatError

VOCAB = 23


def _cfg(**kw):
    cfg = dict(d_model=16, n_layer=2, vocab_size=VOCAB, d_intermediate=0, ssm_cfg={"d_state": 4},
               rms_norm=True, fused_add_norm=True, residual_in_fp32=True, tie_embeddings=True,
               pad_vocab_size_multiple=8)
    cfg.update(kw)
    return cfg


def _randomize(model):
    with torch.no_grad():  # every tensor distinct from its init, so a wrong mapping cannot pass
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.upstream
@pytest.mark.parametrize("cfg", [_cfg(), _cfg(d_intermediate=24, rms_norm=False, fused_add_norm=False,
                                              tie_embeddings=False, ssm_cfg={"d_state": 3, "bias": True})])
def test_from_pretrained_reads_upstream_save_pretrained(upstream, tmp_path, cfg):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    up = _randomize(MambaLMHeadModel(MambaConfig(**cfg)))
    up.save_pretrained(str(tmp_path))  # upstream's own writer: config.json + pytorch_model.bin
    loaded = StatefulMambaLM.from_pretrained(tmp_path)
    wrapped = StatefulMambaLM(up)
    assert list(loaded.state_dict()) == list(up.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), up.state_dict().values()))
    ids = torch.randint(0, VOCAB, (2, 9))
    la, sa = loaded(ids[:, :5])
    lb, sb = wrapped(ids[:, :5])
    assert torch.equal(la, lb) and sa.allclose(sb, rtol=0, atol=0)
    # states are interchangeable: a state of one continues in the other
    ca, _ = loaded(ids[:, 5:], sb)
    cb, _ = wrapped(ids[:, 5:], sa)
    assert torch.equal(ca, cb)


@pytest.mark.upstream
def test_from_pretrained_dtype_mirrors_upstream(upstream, tmp_path):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    up = _randomize(MambaLMHeadModel(MambaConfig(**_cfg())))
    up.save_pretrained(str(tmp_path))
    lm = StatefulMambaLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    mixer = lm.backbone.layers[0].mixer
    assert mixer.in_proj.weight.dtype == torch.bfloat16 and mixer.A_log.dtype == torch.float32
    # upstream's from_pretrained casts every tensor of the file to dtype, then loads it
    ref = MambaLMHeadModel(MambaConfig(**_cfg()), dtype=torch.bfloat16)
    ref.load_state_dict({k: v.to(torch.bfloat16) for k, v in up.state_dict().items()})
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), ref.state_dict().values()))
    logits, state = lm(torch.randint(0, VOCAB, (2, 6)))
    assert logits.dtype == torch.bfloat16 and state.dtype == torch.float32


def test_save_pretrained_round_trip_and_safetensors(tmp_path):
    torch.manual_seed(0)
    lm = _randomize(StatefulMambaLM.from_config(_cfg(tie_embeddings=False, d_intermediate=16)))
    lm.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    again = StatefulMambaLM.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), again.state_dict().values()))
    ids = torch.randint(0, VOCAB, (3, 7))
    assert torch.equal(lm(ids)[0], again(ids)[0])


@pytest.mark.upstream
def test_our_checkpoint_loads_into_upstream(upstream, tmp_path):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from safetensors.torch import load_file

    torch.manual_seed(1)
    lm = _randomize(StatefulMambaLM.from_config(_cfg()))
    lm.save_pretrained(tmp_path)
    up = MambaLMHeadModel(MambaConfig(**json.loads((tmp_path / "config.json").read_text())))
    up.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), up.state_dict().values()))


def _hf_model(tie=True):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2,
                                   expand=2, conv_kernel=3, use_bias=False, use_conv_bias=True,
                                   tie_word_embeddings=tie, residual_in_fp32=True)
    torch.manual_seed(2)
    return _randomize(transformers.MambaForCausalLM(cfg)).eval()


def _hf_torch_paths(monkeypatch):
    """transformers binds upstream's CUDA scan when mamba_ssm imports (the test placeholder makes it import); point
    its kernel-or-fallback functions back at transformers' own PyTorch implementations (tests only)."""
    import transformers.models.mamba.modeling_mamba as mm

    for name in dir(mm):
        fn = getattr(mm, name)
        if callable(fn) and not isinstance(fn, type) and getattr(fn, "__wrapped__", None) is not None \
                and getattr(fn, "__module__", "") == mm.__name__:
            monkeypatch.setattr(mm, name, fn.__wrapped__)


def test_from_hf_matches_transformers_logits(monkeypatch):
    hf = _hf_model()
    _hf_torch_paths(monkeypatch)
    lm = StatefulMambaLM.from_hf(hf)
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        ref = hf(ids).logits
    logits, state = lm(ids)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)
    # shared modules, upstream's names
    assert lm.backbone.embedding is hf.backbone.embeddings
    assert "backbone.embedding.weight" in lm.state_dict()
    assert lm.backbone.layers[1].mixer.layer_idx == 1
    # chunked continuation from the adopted model's state
    _, s = lm(ids[:, :4])
    out, _ = lm(ids[:, 4:], s)
    torch.testing.assert_close(out, ref[:, 4:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_hf_checkpoint_directory_and_from_hf_agree(tmp_path, tie):
    hf = _hf_model(tie=tie)
    hf.save_pretrained(str(tmp_path))
    from_dir = StatefulMambaLM.from_pretrained(tmp_path)
    adopted = StatefulMambaLM.from_hf(hf)
    a, b = from_dir.state_dict(), adopted.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, VOCAB, (2, 8))
    la, sa = from_dir(ids[:, :3])
    lb, sb = adopted(ids[:, :3])
    assert torch.equal(la, lb) and sa.allclose(sb, rtol=0, atol=0)
    assert torch.equal(from_dir(ids[:, 3:], sb)[0], adopted(ids[:, 3:], sa)[0])


def test_mamba2_hf_model_refused():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=16, state_size=8, num_hidden_layers=1,
                                    num_heads=4, head_dim=8, n_groups=1, expand=2)
    with pytest.raises(StateCompatibilityError, match="Mamba2ForCausalLM"):
        StatefulMambaLM.from_hf(transformers.Mamba2ForCausalLM(cfg))


def test_bad_checkpoints(tmp_path):
    with pytest.raises(StateFormatError, match="config.json"):
        StatefulMambaLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_cfg()))
    with pytest.raises(StateFormatError, match="model.safetensors"):
        StatefulMambaLM.from_pretrained(tmp_path)
    # weights of another shape
    torch.manual_seed(3)
    StatefulMambaLM.from_config(_cfg(d_model=8)).save_pretrained(tmp_path / "small")
    (tmp_path / "small" / "config.json").write_text(json.dumps(_cfg()))
    with pytest.raises(StateCompatibilityError, match="expected shape"):
        StatefulMambaLM.from_pretrained(tmp_path / "small")
    # a pickle that is not plain tensors is refused by weights-only loading
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text(json.dumps(_cfg()))
    torch.save({"x": torch.zeros(1), "obj": _Evil()}, evil / "pytorch_model.bin")
    with pytest.raises(StateFormatError, match="pytorch_model.bin"):
        StatefulMambaLM.from_pretrained(evil)
    (tmp_path / "bad.json").mkdir()
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("{not json")
    with pytest.raises(StateFormatError, match="JSON"):
        StatefulMambaLM.from_pretrained(tmp_path / "x")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))
