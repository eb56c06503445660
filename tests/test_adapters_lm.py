"""StatefulMambaLM: upstream names and init, agreement with upstream's own step(), continuation laws, interop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import mamba_state as ms
from mamba_state.adapters import StatefulMambaLM
from mamba_state.errors import StateCompatibilityError, StateError, StateShapeError
from mamba_state.state import MambaModelState

from _upstream_cpu import use_upstream_cpu_paths

VOCAB = 29

CONFIGS = [  # (d_intermediate, rms_norm, fused_add_norm, residual_in_fp32, tie_embeddings)
    (0, True, True, True, True),
    (24, False, False, False, False),
    (24, True, False, True, True),
    (0, False, True, False, True),
]


def _cfg(d_int, rms, fused, fp32, tie, n_layer=2, d_model=16, **ssm):
    return dict(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, d_intermediate=d_int,
                ssm_cfg={"d_state": 4, **ssm}, rms_norm=rms, fused_add_norm=fused, residual_in_fp32=fp32,
                tie_embeddings=tie, pad_vocab_size_multiple=8)


def _upstream_model(cfg, seed=0):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(seed)
    model = MambaLMHeadModel(MambaConfig(**cfg))
    with torch.no_grad():  # move norms and D away from their trivial initial values
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm2.weight", "norm_f.weight", ".D")):
                p.uniform_(0.5, 1.5)
    return model


def _upstream_steps(model, ids, inference_params):
    """Upstream's own decoding loop (its step() path), one token at a time, from the cache it holds."""
    outs = []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            outs.append(model(ids[:, t:t + 1], inference_params=inference_params).logits)
            inference_params.seqlen_offset += 1
    return torch.cat(outs, 1)


# ---------------------------------------------------------------------------------------------- names and init
@pytest.mark.upstream
@pytest.mark.parametrize("opts", CONFIGS)
def test_from_config_matches_upstream_init_and_names(upstream, opts):
    cfg = _cfg(*opts)
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(11)
    up = MambaLMHeadModel(MambaConfig(**cfg))
    torch.manual_seed(11)
    ours = StatefulMambaLM.from_config(cfg)
    a, b = up.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert (ours.lm_head.weight is ours.backbone.embedding.weight) == cfg["tie_embeddings"]


@pytest.mark.upstream
def test_wrap_shares_modules_and_leaves_upstream_unchanged(upstream, monkeypatch):
    from mamba_ssm.utils.generation import InferenceParams

    use_upstream_cpu_paths(monkeypatch)
    up = _upstream_model(_cfg(*CONFIGS[2]))
    before = {k: v.clone() for k, v in up.state_dict().items()}
    ids = torch.randint(0, VOCAB, (2, 5))
    ip = InferenceParams(max_seqlen=8, max_batch_size=2)
    ms.set_model_state(up, MambaModelState({i: s for i, s in StatefulMambaLM(up).new_state(2).items()}, 1), ip)
    ref = _upstream_steps(up, ids, ip)

    lm = StatefulMambaLM(up)
    lm(ids)
    assert list(lm.state_dict()) == list(up.state_dict())
    up_params = dict(up.named_parameters())
    assert all(p is up_params[n] for n, p in lm.named_parameters())
    assert all(m is not up for m in lm.modules())
    assert all(torch.equal(before[k], v) for k, v in up.state_dict().items())
    ip2 = InferenceParams(max_seqlen=8, max_batch_size=2)
    ms.set_model_state(up, MambaModelState(dict(lm.new_state(2).items()), 1), ip2)
    assert torch.equal(_upstream_steps(up, ids, ip2), ref)


# ---------------------------------------------------------------------------------------------- agreement and interop
@pytest.mark.upstream
@pytest.mark.parametrize("opts", CONFIGS)
def test_logits_and_states_match_upstream_step_loop(upstream, monkeypatch, opts):
    """Upstream's prefill needs its CUDA scan; on CPU its own step() loop from a zero cache is the oracle."""
    from mamba_ssm.utils.generation import InferenceParams

    use_upstream_cpu_paths(monkeypatch)
    up = _upstream_model(_cfg(*opts), seed=3)
    lm = StatefulMambaLM(up)
    ids = torch.randint(0, VOCAB, (2, 9))
    logits, state = lm(ids)
    ip = InferenceParams(max_seqlen=16, max_batch_size=2)
    ms.set_model_state(up, MambaModelState(dict(lm.new_state(2).items()), seqlen_offset=1), ip)
    ref = _upstream_steps(up, ids, ip)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)
    got = ms.get_model_state(up, ip)
    assert got.allclose(state, rtol=1e-4, atol=1e-5)
    assert state.seqlen_offset == 9


@pytest.mark.upstream
def test_interop_both_ways(upstream, monkeypatch):
    from mamba_ssm.utils.generation import InferenceParams

    use_upstream_cpu_paths(monkeypatch)
    up = _upstream_model(_cfg(*CONFIGS[0]), seed=4)
    lm = StatefulMambaLM(up)
    ids = torch.randint(0, VOCAB, (3, 12))
    full, s_full = lm(ids)
    # upstream prefills 7 tokens (its step loop on CPU), the adapter continues from get_model_state
    ip = InferenceParams(max_seqlen=16, max_batch_size=3)
    ms.set_model_state(up, MambaModelState(dict(lm.new_state(3).items()), seqlen_offset=1), ip)
    _upstream_steps(up, ids[:, :7], ip)
    taken = ms.get_model_state(up, ip)
    cont, s_cont = lm(ids[:, 7:], taken)
    torch.testing.assert_close(cont, full[:, 7:], rtol=1e-4, atol=1e-5)
    assert s_cont.allclose(s_full, rtol=1e-4, atol=1e-5)
    # the adapter prefills 7 tokens in one chunk, upstream's step() continues after set_model_state
    _, s7 = lm(ids[:, :7])
    assert s7.seqlen_offset == 7
    ip2 = InferenceParams(max_seqlen=16, max_batch_size=3)
    ms.set_model_state(up, s7, ip2)
    torch.testing.assert_close(_upstream_steps(up, ids[:, 7:], ip2), full[:, 7:], rtol=1e-4, atol=1e-5)
    assert ms.get_model_state(up, ip2).allclose(s_full, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- laws
@st.composite
def _lm_case(draw):
    opts = draw(st.sampled_from(CONFIGS))
    n_layer = draw(st.integers(1, 2))
    d_model = draw(st.sampled_from([8, 16]))
    d_conv = draw(st.integers(2, 4))
    B, L = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    cuts = sorted(draw(st.sets(st.integers(1, L - 1), max_size=4))) if L > 1 else []
    return opts, n_layer, d_model, d_conv, B, L, [0] + cuts + [L], draw(st.booleans()), draw(st.integers(0, 999))


@given(_lm_case())
def test_lm_continuation_equals_one_pass(case):
    opts, n_layer, d_model, d_conv, B, L, bounds, with_reset, seed = case
    torch.manual_seed(seed)
    lm = StatefulMambaLM.from_config(_cfg(*opts, n_layer=n_layer, d_model=d_model, d_conv=d_conv)).double()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, L), generator=g)
    reset = (torch.rand(B, L, generator=g) < 0.2) if with_reset else None
    _, start = lm(torch.randint(0, VOCAB, (B, 3), generator=g), lm.new_state(B, dtype=torch.float64))
    full, s_full = lm(ids, start, reset=reset)
    s, parts = start, []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out, s = lm(ids[:, a:b], s, reset=None if reset is None else reset[:, a:b])
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-9, atol=1e-10)
    assert s.allclose(s_full, rtol=1e-9, atol=1e-10) and s.seqlen_offset == s_full.seqlen_offset == 3 + L
    # token by token through step() gives the same
    s, steps = start, []
    for t in range(L):
        out, s = lm.step(ids[:, t], s, reset=None if reset is None else reset[:, t])
        steps.append(out)
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-9, atol=1e-10)
    assert s.allclose(s_full, rtol=1e-9, atol=1e-10)


def test_reset_row_matches_fresh_run():
    torch.manual_seed(0)
    lm = StatefulMambaLM.from_config(_cfg(*CONFIGS[1])).double()
    ids = torch.randint(0, VOCAB, (2, 10))
    reset = torch.zeros(2, 10, dtype=torch.bool)
    reset[1, 4] = True
    out, _ = lm(ids, lm.new_state(2, dtype=torch.float64), reset=reset)
    fresh, _ = lm(ids[1:, 4:], lm.new_state(1, dtype=torch.float64))
    torch.testing.assert_close(out[1:, 4:], fresh, rtol=1e-10, atol=1e-12)


def test_saved_state_continues_identically(tmp_path):
    torch.manual_seed(1)
    lm = StatefulMambaLM.from_config(_cfg(*CONFIGS[0]))
    ids = torch.randint(0, VOCAB, (2, 11))
    full, _ = lm(ids)
    _, s = lm(ids[:, :6])
    s.save(tmp_path / "s.safetensors", model=lm)
    loaded = MambaModelState.load(tmp_path / "s.safetensors", model=lm)
    assert loaded.seqlen_offset == 6
    out, _ = lm(ids[:, 6:], loaded)
    torch.testing.assert_close(out, full[:, 6:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_no_state_is_a_zero_state(layer):
    """``lm(ids)`` (no state: every mixer starts from zeros it need not build) equals ``lm(ids, new_state)``:
    logits, every layer's state, ``seqlen_offset``; and with ``return_states_at`` too."""
    torch.manual_seed(4)
    extra = dict(layer="Mamba2", headdim=8, d_state=8, chunk_size=4) if layer == "Mamba2" else {}
    lm = StatefulMambaLM.from_config(_cfg(*CONFIGS[0], **extra))
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        out0, s0 = lm(ids)
        out1, s1 = lm(ids, lm.new_state(2))
        _, _, at0 = lm(ids, return_states_at=[0, 3])
        _, _, at1 = lm(ids, lm.new_state(2), return_states_at=[0, 3])
    torch.testing.assert_close(out0, out1, rtol=0, atol=0)
    assert s0.seqlen_offset == s1.seqlen_offset == 6
    assert s0.allclose(s1, rtol=0, atol=0)
    assert [a.seqlen_offset for a in at0] == [0, 3]
    assert all(a.allclose(b, rtol=0, atol=0) for a, b in zip(at0, at1))


def test_mamba2_layers_from_config():
    torch.manual_seed(2)
    cfg = _cfg(0, True, True, True, True, n_layer=2, layer="Mamba2", headdim=8, d_state=8, chunk_size=4)
    lm = StatefulMambaLM.from_config(cfg).double()
    assert all(v["kind"] == "mamba2" for v in lm.state_layouts().values())
    ids = torch.randint(0, VOCAB, (2, 9))
    full, s_full = lm(ids, lm.new_state(2, dtype=torch.float64))
    _, s = lm(ids[:, :5], lm.new_state(2, dtype=torch.float64))
    out, s = lm(ids[:, 5:], s)
    torch.testing.assert_close(out, full[:, 5:], rtol=1e-8, atol=1e-9)
    assert s.allclose(s_full, rtol=1e-8, atol=1e-9)


# ---------------------------------------------------------------------------------------------- refusals and errors
def test_attention_layers_refused():
    with pytest.raises(StateCompatibilityError, match="attn_layer_idx"):
        StatefulMambaLM.from_config({**_cfg(*CONFIGS[0]), "attn_layer_idx": [1], "attn_cfg": {"num_heads": 2}})


@pytest.mark.upstream
def test_upstream_attention_model_refused(upstream):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    cfg = {**_cfg(*CONFIGS[1]), "attn_layer_idx": [1], "attn_cfg": {"num_heads": 2}}
    up = MambaLMHeadModel(MambaConfig(**cfg))
    with pytest.raises(StateCompatibilityError, match="attention"):
        StatefulMambaLM(up)


def test_bad_inputs_and_states():
    torch.manual_seed(3)
    lm = StatefulMambaLM.from_config(_cfg(*CONFIGS[0]))
    other = StatefulMambaLM.from_config(_cfg(*CONFIGS[0], n_layer=3))
    ids = torch.randint(0, VOCAB, (2, 4))
    with pytest.raises(StateShapeError, match="input_ids"):
        lm(torch.randn(2, 4))
    with pytest.raises(StateCompatibilityError, match="layers"):
        lm(ids, other.new_state(2))
    with pytest.raises(StateShapeError, match="batch size"):
        lm(ids, lm.new_state(3))
    with pytest.raises(StateShapeError, match="reset"):
        lm(ids, reset=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(StateError, match="MambaModelState"):
        lm(ids, state={0: None})
    with pytest.raises(StateShapeError, match="one token"):
        lm.step(ids)
    rows = lm.backbone.embedding.num_embeddings  # the vocabulary padded to a multiple of 8
    for bad_id in (-1, rows):
        bad = torch.tensor([[1, bad_id]])
        for call in (lambda: lm(bad), lambda: lm.step(bad[:, 1:]), lambda: lm.generate(bad, max_new_tokens=1)):
            with pytest.raises(StateShapeError) as exc:
                call()
            assert f"[0, {rows - 1}]" in str(exc.value) and str(bad_id) in str(exc.value), str(exc.value)
    lm(torch.tensor([[rows - 1, 0]]))  # the padding rows are valid embedding rows
    with pytest.raises(StateCompatibilityError, match="MambaLMHeadModel"):
        StatefulMambaLM(torch.nn.Linear(2, 2))
    with pytest.raises(StateCompatibilityError, match="unknown"):
        StatefulMambaLM.from_config({**_cfg(*CONFIGS[0]), "n_layers": 2})


@pytest.mark.gpu
@pytest.mark.upstream
def test_gpu_lm_matches_upstream_forward_and_interop(upstream):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.utils.generation import InferenceParams

    torch.manual_seed(5)
    cfg = MambaConfig(d_model=256, n_layer=4, vocab_size=1000, ssm_cfg={}, rms_norm=True, fused_add_norm=True,
                      residual_in_fp32=True)
    up = MambaLMHeadModel(cfg, device="cuda", dtype=torch.bfloat16).eval()
    lm = StatefulMambaLM(up)
    ids = torch.randint(0, 1000, (4, 300), device="cuda")
    with torch.no_grad():
        ref = up(ids).logits.float()
        logits, state = lm(ids)
        tol = 0.05 * ref.abs().max().item()
        assert (logits.float() - ref).abs().max().item() <= tol
        # upstream's real prefill (CUDA forward with a cache) -> get_model_state -> the adapter continues
        ip = InferenceParams(max_seqlen=400, max_batch_size=4)
        up(ids[:, :200], inference_params=ip)
        ip.seqlen_offset = 200
        taken = ms.get_model_state(up, ip)
        cont, _ = lm(ids[:, 200:], taken)
        assert (cont.float() - ref[:, 200:]).abs().max().item() <= tol
        # the adapter's state -> upstream's step() continues
        _, s200 = lm(ids[:, :200])
        ip2 = InferenceParams(max_seqlen=400, max_batch_size=4)
        ms.set_model_state(up, s200, ip2)
        outs = []
        for t in range(200, 210):
            outs.append(up(ids[:, t:t + 1], inference_params=ip2).logits.float())
            ip2.seqlen_offset += 1
        assert (torch.cat(outs, 1) - ref[:, 200:210]).abs().max().item() <= tol
