"""Checkpoint loading: upstream-format directories, transformers models, our own save_pretrained."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


# ------------------------------------------------------------------ hints where a user goes wrong
def _fake(module, name, base=torch.nn.Module, **attrs):
    """An instance of a class that claims to live in ``module`` (transformers or mamba_ssm), without importing it."""
    return type(name, (base,), {"__module__": module, **attrs})()


def test_constructor_points_transformers_models_to_from_hf():
    hf = _hf_model()
    with pytest.raises(StateCompatibilityError) as exc:
        StatefulMambaLM(hf)
    msg = str(exc.value)
    assert "found a transformers MambaForCausalLM" in msg and "StatefulMambaLM.from_hf(hf_model)" in msg
    assert StatefulMambaLM.from_hf(hf).layer_indices == [0, 1]  # the hint is right
    # without transformers installed the check is the same: the class's module is all it looks at
    fake = _fake("transformers.models.mamba.modeling_mamba", "MambaForCausalLM")
    with pytest.raises(StateCompatibilityError, match=r"from_hf\(hf_model\)"):
        StatefulMambaLM(fake)
    with pytest.raises(StateCompatibilityError, match="Mamba-2 models are not supported"):
        StatefulMambaLM(_fake("transformers.models.mamba2.modeling_mamba2", "Mamba2ForCausalLM"))
    for path in ("path/to/mamba-130m", Path("ckpt")):
        with pytest.raises(StateCompatibilityError, match=r"found a path .*from_pretrained\(path\)"):
            StatefulMambaLM(path)
    upstream_like = _fake("mamba_ssm.models.mixer_seq_simple", "MambaLMHeadModel", config=None)
    with pytest.raises(StateCompatibilityError, match=r"wrap an upstream MambaLMHeadModel with StatefulMambaLM\(model\)"):
        StatefulMambaLM.from_hf(upstream_like)


def test_from_pretrained_of_a_hub_id_says_to_download_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StateFormatError) as exc:
        StatefulMambaLM.from_pretrained("state-spaces/mamba-130m")
    msg = str(exc.value)
    assert "looks like a Hugging Face Hub id" in msg and "never downloads" in msg
    assert "hf download state-spaces/mamba-130m --local-dir mamba-130m" in msg
    assert "snapshot_download('state-spaces/mamba-130m')" in msg and "from_pretrained('mamba-130m')" in msg
    assert "\n" not in msg  # one line, as the command line prints it
    for path in ("nope", "./org/name", "/no/such/dir", "a/b/c"):  # missing paths that are not Hub ids
        with pytest.raises(StateFormatError) as exc:
            StatefulMambaLM.from_pretrained(path)
        assert "no such directory" in str(exc.value) and "Hub" not in str(exc.value), path
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(StateFormatError, match="found a file; pass the directory that holds it"):
        StatefulMambaLM.from_pretrained("weights.safetensors")
    # a local directory named like a Hub id is read as a directory
    (tmp_path / "org" / "name").mkdir(parents=True)
    with pytest.raises(StateFormatError, match="config.json, found none"):
        StatefulMambaLM.from_pretrained("org/name")
    StatefulMambaLM.from_config(_cfg()).save_pretrained(tmp_path / "org" / "name")
    assert StatefulMambaLM.from_pretrained("org/name").layer_indices == [0, 1]


def test_interop_with_transformers_model_says_what_it_accepts(monkeypatch):
    import mamba_state as ms

    hf = _hf_model()
    _hf_torch_paths(monkeypatch)
    with torch.no_grad():
        out = hf(torch.randint(0, VOCAB, (1, 5)), use_cache=True)
    cache = getattr(out, "cache_params", None) or getattr(out, "past_key_values", None)
    assert cache is not None and type(cache).__module__.startswith("transformers")
    with pytest.raises(StateCompatibilityError) as exc:
        ms.get_model_state(hf, cache)
    msg = str(exc.value)
    assert msg.startswith("get_model_state: expected an upstream mamba_ssm model")
    assert "InferenceParams" in msg and "StatefulMambaLM included" in msg
    assert f"found model a transformers MambaForCausalLM and inference_params a transformers {type(cache).__name__}" in msg
    assert "StatefulMambaLM.from_hf(hf_model)" in msg and "docs/howto-pretrained.md" in msg
    lm = StatefulMambaLM.from_hf(hf)
    state = lm.new_state(1)
    for call in (lambda: ms.set_model_state(hf, state, cache), lambda: ms.zero_model_state(hf, cache),
                 lambda: ms.get_model_state(lm, cache)):  # either argument from transformers is named
        with pytest.raises(StateCompatibilityError, match="from_hf"):
            call()
    mixer = hf.backbone.layers[0].mixer
    for call in (lambda: ms.get_inference_state(mixer, cache), lambda: ms.zero_inference_state(mixer, cache),
                 lambda: ms.set_inference_state(mixer, state[0], cache)):
        with pytest.raises(StateCompatibilityError, match=r"found layer a transformers MambaMixer.*StatefulMamba\(mixer\)"):
            call()


def test_interop_refuses_transformers_caches_without_transformers():
    import mamba_state as ms

    lm = StatefulMambaLM.from_config(_cfg())
    cache = _fake("transformers.cache_utils", "MambaCache", object, key_value_memory_dict={})  # even one that looks right
    with pytest.raises(StateCompatibilityError, match="found inference_params a transformers MambaCache"):
        ms.get_model_state(lm, cache)
    # upstream's InferenceParams shape still works with our model
    params = type("InferenceParams", (), {"key_value_memory_dict": {}, "seqlen_offset": 0})()
    assert ms.get_model_state(lm, params) is None


# ------------------------------------------------------------------ hostile and broken directories (issue 21)
def _saved(tmp_path, name="ck"):
    torch.manual_seed(0)
    lm = _randomize(StatefulMambaLM.from_config(_cfg()))
    lm.save_pretrained(tmp_path / name)
    return lm, tmp_path / name


def test_weights_checksum_catches_a_flipped_bit(tmp_path):
    import struct

    _, ck = _saved(tmp_path)
    data = bytearray((ck / "model.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    assert b"mamba_state_checksum" in data[8:8 + n]
    data[8 + n + 17] ^= 0x04  # one bit of one weight
    (ck / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(StateFormatError, match="mamba_state_checksum.*corrupted"):
        StatefulMambaLM.from_pretrained(ck)


def test_weights_without_a_checksum_load_with_a_warning(tmp_path):
    from safetensors.torch import save_file

    from mamba_state.adapters.checkpoint import UnverifiedWeightsWarning

    lm, ck = _saved(tmp_path)
    # as 0.1 wrote it: safetensors' own writer, no checksum
    save_file({k: v.contiguous().clone() for k, v in lm.state_dict().items()}, ck / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.warns(UnverifiedWeightsWarning, match="cannot be verified"):
        again = StatefulMambaLM.from_pretrained(ck)
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("change,words", [
    ({"d_model": "16"}, ["d_model", "'16'"]),
    ({"d_model": None}, ["d_model"]),
    ({"n_layer": 2.0}, ["n_layer", "2.0"]),
    ({"n_layer": True}, ["n_layer"]),
    ({"ssm_cfg": [1]}, ["ssm_cfg", "object"]),
    ({"ssm_cfg": {"d_state": -4}}, ["d_state", "-4"]),
    ({"vocab_size": 2**40}, ["vocab_size"]),
    ({"n_layer": 10**7}, ["n_layer"]),
    ({"rms_norm": "yes"}, ["rms_norm"]),
])
def test_config_fields_are_checked_before_the_model_is_built(tmp_path, change, words):
    _, ck = _saved(tmp_path)
    (ck / "config.json").write_text(json.dumps(_cfg(**change)))
    with pytest.raises(StateFormatError) as info:
        StatefulMambaLM.from_pretrained(ck)
    assert all(w in str(info.value) for w in words) and "expected" in str(info.value), str(info.value)


def test_config_implying_more_parameters_than_the_weights_hold(tmp_path):
    _, ck = _saved(tmp_path)
    (ck / "config.json").write_text(json.dumps(_cfg(d_model=4096, n_layer=64)))  # within the bounds, not the file
    with pytest.raises(StateFormatError, match="parameters"):
        StatefulMambaLM.from_pretrained(ck)


def test_config_missing_fields_and_deep_json(tmp_path):
    _, ck = _saved(tmp_path)
    cfg = _cfg()
    del cfg["d_model"]
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StateFormatError, match="d_model"):
        StatefulMambaLM.from_pretrained(ck)
    (ck / "config.json").write_text('{"d_model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(StateFormatError, match="nesting at most"):
        StatefulMambaLM.from_pretrained(ck)
    (ck / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": "64"}))
    with pytest.raises(StateFormatError, match="hidden_size"):
        StatefulMambaLM.from_pretrained(ck)


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="POSIX FIFOs")
def test_fifo_config_is_refused(tmp_path):
    import os

    _, ck = _saved(tmp_path)
    os.unlink(ck / "config.json")
    os.mkfifo(ck / "config.json")
    with pytest.raises(StateFormatError, match="FIFO"):
        StatefulMambaLM.from_pretrained(ck)


def test_save_pretrained_on_a_full_disk_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    import errno
    import os

    import mamba_state.adapters.checkpoint as ckpt
    from mamba_state.errors import StateError

    lm, ck = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in ck.iterdir()}

    def full(fd, data):
        os.write(fd, bytes(data[:32]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "_write_all", full)
    with pytest.raises(StateError, match="disk is full") as info:
        _randomize(lm).save_pretrained(ck)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before


@settings(max_examples=settings().max_examples * 3, deadline=None)
@given(data=st.data())
def test_any_config_loads_or_raises_a_state_error(tmp_path_factory, data):
    """Any config.json field replaced by arbitrary JSON: from_pretrained builds the model or raises a StateError
    subclass (never KeyError / TypeError / RuntimeError), without building a model the weights cannot fill."""
    from mamba_state.adapters.checkpoint import UnverifiedWeightsWarning
    from mamba_state.errors import StateError

    global _FUZZ_CK
    if _FUZZ_CK is None:
        _FUZZ_CK = _saved(tmp_path_factory.mktemp("fuzzck"))[1]
    cfg = json.loads((_FUZZ_CK / "config.json").read_text())
    values = st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats(allow_nan=False) | st.text(max_size=5) \
        | st.lists(st.integers(0, 3), max_size=2) | st.dictionaries(st.sampled_from(["d_state", "layer", "expand"]),
                                                                     st.integers(-2, 2**20) | st.text(max_size=6))
    changed = dict(cfg)
    for _ in range(data.draw(st.integers(1, 3))):
        changed[data.draw(st.sampled_from(sorted(cfg) + ["model_type"]))] = data.draw(values)
    path = _FUZZ_CK / "config.json"
    original = path.read_text()
    path.write_text(json.dumps(changed))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnverifiedWeightsWarning)
            StatefulMambaLM.from_pretrained(_FUZZ_CK)
    except StateError:
        pass
    finally:
        path.write_text(original)


_FUZZ_CK = None
