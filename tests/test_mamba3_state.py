"""Mamba-3 states outside the layer: state files (format version 2), upstream's InferenceParams cache, tracing,
the command line and the decode loop's routing. Collectives and host offload of Mamba-3 states are tested in
tests/test_distributed.py and tests/test_offload.py beside the other families; the layer itself in
tests/test_mamba3.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct

import pytest
import torch
from hypothesis import given, strategies as st

import mamba_state as ms
from mamba_state import (MambaInferenceState, MambaModelState, StateCompatibilityError, StateError, StateFormatError,
                         StateShapeError)
from mamba_state.io import FORMAT_VERSION, _digest, load_state, read_metadata
from state_builders import bit_identical, bits, model_bit_identical, rand_state

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
D64 = torch.float64


# ---------------------------------------------------------------------------------------------- builders
def m3_state(batch=2, nheads=2, headdim=3, d_state=4, nangles=2, rank=1, dtypes=(torch.float32,) * 4, seed=0):
    """A Mamba-3 state of random values (angle, ssm, k, v dtypes in ``dtypes``), NaN / -0.0 / inf included."""
    g = torch.Generator().manual_seed(seed)

    def r(shape, dtype):
        t = torch.randn(shape, generator=g, dtype=D64).to(dtype)
        flat = t.view(-1)
        if flat.numel() >= 3:
            flat[0], flat[1], flat[2] = float("nan"), -0.0, float("inf")
        return t

    a, s, k, v = dtypes
    return MambaInferenceState(ssm_state=r((batch, nheads, headdim, d_state), s),
                               angle_dt_state=r((batch, nheads, nangles), a),
                               k_state=r((batch, rank, nheads, d_state), k), v_state=r((batch, nheads, headdim), v))


@st.composite
def layer_states(draw, batch):
    kind = draw(st.sampled_from(["mamba1", "mamba2", "mamba3"]))
    seed = draw(st.integers(0, 2**16))
    if kind == "mamba3":
        d_state = draw(st.sampled_from([2, 4, 8]))
        return m3_state(batch, nheads=draw(st.integers(1, 3)), headdim=draw(st.integers(1, 4)), d_state=d_state,
                        nangles=draw(st.integers(1, d_state // 2)), rank=draw(st.integers(1, 2)),
                        dtypes=tuple(draw(st.sampled_from(DTYPES)) for _ in range(4)), seed=seed)
    return rand_state(kind, batch, draw(st.sampled_from(DTYPES)), seed=seed, d_inner=draw(st.integers(1, 5)),
                      d_state=draw(st.integers(1, 4)), nheads=draw(st.integers(1, 2)))


# ---------------------------------------------------------------------------------------------- files
@given(data=st.data(), batch=st.integers(0, 3), container=st.sampled_from(["model", "layer"]),
       offset=st.integers(0, 10**9), note=st.text(max_size=12))
def test_round_trip_every_family_bit_for_bit(tmp_path_factory, data, batch, container, offset, note):
    """Law 3 for files: any mix of Mamba-1/2/3 layers (dtypes per tensor, batch 0 included) loads back bit for bit;
    the version written is 1 without Mamba-3 layers (0.1.0 reads those files) and 2 with one."""
    path = tmp_path_factory.mktemp("rt") / "s.safetensors"
    if container == "layer":
        state = data.draw(layer_states(batch))
        state.save(path, metadata={"note": note})
        back = MambaInferenceState.load(path)
        assert bit_identical(back, state) and back.kind == state.kind
        kinds = [state.kind]
    else:
        idx = data.draw(st.lists(st.integers(0, 40), min_size=1, max_size=4, unique=True))
        state = MambaModelState({i: data.draw(layer_states(batch)) for i in idx}, seqlen_offset=offset,
                                metadata={"note": note})
        ms.save_model_state(state, path)
        assert model_bit_identical(ms.load_model_state(path), state)
        assert model_bit_identical(load_state(path, device="cpu"), state)
        kinds = [s.kind for _, s in state.items()]
    meta = read_metadata(path)
    assert int(meta["format_version"]) == (FORMAT_VERSION if "mamba3" in kinds else 1)
    assert [e["kind"] for e in meta["layers"]] == kinds


def _fixture_values():
    # the values tests/fixtures/format2-mamba3-*.safetensors were written with (format version 2)
    g = torch.Generator().manual_seed(2027)

    def st_(shape, dtype):
        return torch.randn(shape, generator=g, dtype=D64).to(dtype)

    m3 = MambaInferenceState(ssm_state=st_((2, 2, 4, 8), torch.float32), angle_dt_state=st_((2, 2, 2), torch.float32),
                             k_state=st_((2, 1, 2, 8), torch.bfloat16), v_state=st_((2, 2, 4), torch.bfloat16))
    m1 = MambaInferenceState(st_((2, 6, 4), torch.float16), st_((2, 6, 5), torch.float32))
    model = MambaModelState({0: m3, 2: m1, 5: m3.clone()}, seqlen_offset=7, metadata={"family": "mamba3", "n": [1]})
    layer = MambaInferenceState(ssm_state=st_((1, 2, 4, 8), D64), angle_dt_state=st_((1, 2, 1), D64),
                                k_state=st_((1, 1, 2, 8), D64), v_state=st_((1, 2, 4), D64))
    return model, layer


def test_format2_fixtures_load_bit_for_bit():
    """Files of format version 2 (tests/fixtures/format2-*) keep loading, as the 0.1.0 fixtures do."""
    model, layer = _fixture_values()
    assert model_bit_identical(MambaModelState.load(os.path.join(FIXTURES, "format2-mamba3-model.safetensors")), model)
    path = os.path.join(FIXTURES, "format2-mamba3-layer.safetensors")
    assert bit_identical(MambaInferenceState.load(path), layer)
    meta = read_metadata(path)
    assert meta["format_version"] == "2" and meta["user_metadata"] == {"who": "format 2"}


def _split(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _forge(src, dst, meta=None, layers=None, tensors=None):
    """A copy of ``src`` with metadata / layer entries / tensor entries changed and a valid checksum."""
    header, body = _split(src)
    m = header["__metadata__"]
    m.pop("checksum")
    m.update(meta or {})
    if layers is not None:
        m["layers"] = json.dumps(layers(json.loads(m["layers"])))
    for name, change in (tensors or {}).items():
        header[name] = {**header[name], **change}
    m["checksum"] = _digest(header, body)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + body)


def _edit(k, **fields):
    def f(L):
        L = [dict(e) for e in L]
        L[k].update(fields)
        return L
    return f


@pytest.mark.parametrize("change,words", [
    ({"meta": {"format_version": "1"}}, ["format_version 1", "'mamba3'"]),
    ({"meta": {"format_version": "3"}}, ["format_version <= 2", "upgrade"]),
    ({"layers": _edit(0, k_shape=[2, 2, 8])}, ["k_shape", "4 integers"]),
    ({"layers": _edit(0, angle_dtype="int8")}, ["angle_dtype", "int8"]),
    ({"layers": lambda L: [{k: v for k, v in L[0].items() if k != "v_dtype"}] + L[1:]}, ["missing", "v_dtype"]),
    ({"layers": _edit(0, kind="mamba2")}, ["conv_shape", "missing"]),
    ({"layers": _edit(1, kind="mamba3")}, ["angle_shape", "missing"]),
    ({"layers": _edit(0, device=7)}, ["device"]),
    ({"tensors": {"layers.0.k_state": {"shape": [2, 1, 2, 9]}}}, ["layers.0.k_state", "shape"]),
    ({"tensors": {"layers.5.angle_dt_state": {"dtype": "F16"}}}, ["layers.5.angle_dt_state", "dtype"]),
])
def test_hostile_mamba3_entries_are_refused(tmp_path, change, words):
    """The reader's checks cover the Mamba-3 layout: every forged entry (valid checksum) is refused by name."""
    bad = tmp_path / "bad.st"
    _forge(os.path.join(FIXTURES, "format2-mamba3-model.safetensors"), bad, **change)
    for load in (load_state, MambaModelState.load, read_metadata):
        with pytest.raises(StateFormatError) as info:
            load(bad)
        text = str(info.value)
        assert str(bad) in text and "expected" in text and "found" in text, text
        assert all(w in text for w in words), (words, text)


def test_inconsistent_mamba3_shapes_and_flipped_bytes_are_refused(tmp_path):
    src = os.path.join(FIXTURES, "format2-mamba3-model.safetensors")
    bad = tmp_path / "bad.st"
    # v_state's headdim disagrees with ssm_state's, shapes and offsets kept consistent in the file itself
    header, body = _split(src)
    _forge(src, bad, layers=_edit(0, v_shape=[2, 4, 2]), tensors={"layers.0.v_state": {"shape": [2, 4, 2]}})
    with pytest.raises(StateFormatError, match="consistent mamba-state file.*nheads"):
        MambaModelState.load(bad)
    data = bytearray(open(src, "rb").read())
    data[-5] ^= 0x40
    bad.write_bytes(bytes(data))
    with pytest.raises(StateFormatError, match="checksum"):
        MambaModelState.load(bad)
    with pytest.raises(StateFormatError, match="expected a model state, found a single-layer state"):
        MambaModelState.load(os.path.join(FIXTURES, "format2-mamba3-layer.safetensors"))


def _upstream_m3(d_model=32, d_state=16, headdim=8, layer_idx=0, dtype=torch.float32):
    from mamba_ssm.modules.mamba3 import Mamba3

    torch.manual_seed(layer_idx)
    return Mamba3(d_model, d_state=d_state, headdim=headdim, layer_idx=layer_idx, dtype=dtype)


def _m3_lm(n_layer=2, dtype=D64):
    """docs/mamba3.md's recipe: upstream's MambaLMHeadModel with every mixer replaced by a Mamba3."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.modules.mamba3 import Mamba3

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=32, n_layer=n_layer, vocab_size=64,
                      ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 8}, rms_norm=True, fused_add_norm=False,
                      residual_in_fp32=True, pad_vocab_size_multiple=8)
    model = MambaLMHeadModel(cfg)
    for i, block in enumerate(model.backbone.layers):
        block.mixer = Mamba3(32, d_state=16, headdim=8, layer_idx=i)
    return model.to(dtype)


def test_save_with_model_records_and_checks_the_mamba3_layout(upstream, tmp_path):
    model = _m3_lm()
    lm = ms.StatefulMambaLM(model, state_dtype=D64)
    state = lm(torch.randint(0, 64, (2, 5)))[1]
    path = tmp_path / "s.st"
    state.save(path, model=lm)
    assert model_bit_identical(MambaModelState.load(path, model=lm), state)
    assert model_bit_identical(MambaModelState.load(path, model=model), state)  # the upstream model's layout too
    layout = json.loads(_split(path)[0]["__metadata__"]["model_layout"])
    assert layout["0"] == {"kind": "mamba3", "angle_shape": [8, 4], "ssm_shape": [8, 8, 16], "k_shape": [1, 8, 16],
                           "v_shape": [8, 8]}
    other = _m3_lm(n_layer=2)
    other.backbone.layers[1].mixer = type(other.backbone.layers[1].mixer)(32, d_state=32, headdim=8, layer_idx=1)
    with pytest.raises(StateCompatibilityError, match=r"layer 1 angle_shape: expected \[8, 8\] \(model\), found "
                                                      r"\[8, 4\]"):
        MambaModelState.load(path, model=other)
    with pytest.raises(StateCompatibilityError, match="layer 1 angle_shape"):
        state.save(tmp_path / "no.st", model=other)
    assert not (tmp_path / "no.st").exists()


# ---------------------------------------------------------------------------------------------- interop
def test_interop_with_upstream_mamba3_cache(upstream):
    """get / set / zero on upstream's InferenceParams for a Mamba3 layer: the 4-tuple upstream's
    ``_get_states_from_cache`` keeps (angle and ssm float32, k and v in the parameters' dtype), copied in place."""
    from mamba_ssm.utils.generation import InferenceParams

    layer = _upstream_m3(dtype=torch.bfloat16)
    ip = InferenceParams(max_seqlen=16, max_batch_size=3)
    assert ms.get_inference_state(layer, ip) is None
    want = layer._get_states_from_cache(InferenceParams(max_seqlen=16, max_batch_size=3), 3)  # upstream's allocation
    state = m3_state(3, nheads=8, headdim=8, d_state=16, nangles=4, seed=1, dtypes=(D64,) * 4)
    ms.set_inference_state(layer, state, ip)
    cached = ip.key_value_memory_dict[0]
    assert len(cached) == 4
    assert [(t.shape, t.dtype) for t in cached] == [(t.shape, t.dtype) for t in want]
    ptrs = [t.data_ptr() for t in cached]
    got = ms.get_inference_state(layer, ip)
    assert got.kind == "mamba3" and got.tensor_names == ms.state.containers.FAMILY_TENSORS["mamba3"]
    for name, t in got.tensors.items():  # cast into upstream's dtypes, as Tensor.copy_ casts (NaN, inf kept)
        assert torch.equal(bits(t), bits(state.tensors[name].to(t.dtype))), name
    second = m3_state(3, nheads=8, headdim=8, d_state=16, nangles=4, seed=2, dtypes=(torch.float32,) * 4)
    ms.set_inference_state(layer, second, ip)  # in place: upstream's step reads these very tensors
    assert [t.data_ptr() for t in ip.key_value_memory_dict[0]] == ptrs
    ms.zero_inference_state(layer, ip)
    assert all(t.abs().sum() == 0 for t in ip.key_value_memory_dict[0])
    # wrong family, wrong shape, wrong batch: refused by name, the cache unchanged
    ms.set_inference_state(layer, second, ip)
    before = [t.clone() for t in ip.key_value_memory_dict[0]]
    with pytest.raises(StateCompatibilityError, match="kind: expected mamba3 .layer., found mamba1"):
        ms.set_inference_state(layer, rand_state("mamba1", 3), ip)
    with pytest.raises(StateCompatibilityError, match="angle_shape: expected \\[8, 4\\]"):
        ms.set_inference_state(layer, m3_state(3, nheads=8, headdim=8, d_state=16, nangles=2), ip)
    with pytest.raises(StateShapeError, match="batch size 3"):
        ms.set_inference_state(layer, m3_state(2, nheads=8, headdim=8, d_state=16, nangles=4), ip)
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(before, ip.key_value_memory_dict[0]))
    ip.key_value_memory_dict[0] = before[:2]
    with pytest.raises(StateCompatibilityError, match="angle_dt_state, ssm_state, k_state, v_state. tuple"):
        ms.get_inference_state(layer, ip)


def test_model_interop_over_mamba3_blocks(upstream):
    """get_model_state / set_model_state over an upstream model of Mamba3 blocks and over its StatefulMambaLM: the
    state a forward of ours returns goes into upstream's cache and comes back equal (cast into upstream's dtypes)."""
    from mamba_ssm.utils.generation import InferenceParams

    model = _m3_lm(dtype=torch.float32)
    lm = ms.StatefulMambaLM(model)
    _, state = lm(torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0)))
    state.seqlen_offset = 6
    for target in (model, lm):
        ip = InferenceParams(max_seqlen=32, max_batch_size=2)
        assert ms.get_model_state(target, ip) is None
        ms.set_model_state(target, state, ip)
        assert ip.seqlen_offset == 6 and len(ip.key_value_memory_dict[1]) == 4
        back = ms.get_model_state(target, ip)
        assert back.seqlen_offset == 6 and back.allclose(state, rtol=0, atol=0)
        ms.zero_model_state(target, ip)
        assert ip.seqlen_offset == 0 and all(t.abs().sum() == 0 for t in ip.key_value_memory_dict[0])
    # all or nothing: layer 1 of the wrong family leaves layer 0's cache as it was
    ip = InferenceParams(max_seqlen=32, max_batch_size=2)
    ms.set_model_state(model, state, ip)
    before = [t.clone() for t in ip.key_value_memory_dict[0]]
    bad = MambaModelState({0: state[0].clone().zero_(), 1: rand_state("mamba2", 2)})
    with pytest.raises(StateCompatibilityError, match="layer 1 kind"):
        ms.set_model_state(model, bad, ip)
    assert all(torch.equal(a, b) for a, b in zip(before, ip.key_value_memory_dict[0]))


def test_bad_state_arguments_keep_naming_expected_and_found(upstream):
    from mamba_ssm.utils.generation import InferenceParams

    layer = _upstream_m3()
    with pytest.raises(StateError, match="expected a MambaInferenceState, found str"):
        ms.set_inference_state(layer, "state", InferenceParams(max_seqlen=4, max_batch_size=1))
    s = m3_state(1, nheads=8, headdim=8, d_state=16, nangles=4)
    s.k_state = s.k_state.to(torch.int32)
    with pytest.raises(StateCompatibilityError, match="k_state dtype: expected a real floating dtype"):
        ms.set_inference_state(layer, s, InferenceParams(max_seqlen=4, max_batch_size=1))


# ---------------------------------------------------------------------------------------------- tracing
def _m3_layer(seed=0):
    torch.manual_seed(seed)
    lay = ms.StatefulMamba3.from_config(16, d_state=8, headdim=4, chunk_size=4, layer_idx=0, dtype=D64,
                                        state_dtype=D64)
    with torch.no_grad():  # fresh random parameters (biases and norms are ones at init)
        for p in lay.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return lay


def _random_m3_state(layer, batch, seed):
    s = layer.new_state(batch)
    g = torch.Generator().manual_seed(seed)
    for t in s.tensors.values():
        t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype))
    return s


def test_full_trace_of_a_mamba3_layer_equals_stepping():
    """Row t of every named tensor of a full trace is the state after t tokens (step by step, float64)."""
    from mamba_state.trace import trace_layer

    layer = _m3_layer(1)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(2), dtype=D64)
    s = _random_m3_state(layer, 2, 3)
    tr = trace_layer(layer, x, s)
    assert tr.kind == "mamba3" and tr.conv_states is None and tr.positions == list(range(8))
    assert list(tr.states) == list(s.tensor_names) and tr.ssm_states is tr.states["ssm_state"]
    assert tr.nbytes == tr.outputs.numel() * 8 + sum(t.numel() * 8 for t in tr.states.values())
    assert tr.state_at(0).allclose(s, rtol=0, atol=0)
    for t in range(7):
        y_t, s = layer.step(x[:, t], s)
        torch.testing.assert_close(tr.outputs[t], y_t, rtol=1e-9, atol=1e-10)
        assert tr.state_at(t + 1).allclose(s, rtol=1e-9, atol=1e-10)
    assert tr.norms("k_state").shape == (8, 2) and tr.ssm_norms().dtype == D64
    with pytest.raises(StateCompatibilityError, match="no conv"):
        tr.conv_norms()
    with pytest.raises(StateCompatibilityError, match="conv_state"):
        tr.norms("conv_state")
    part = trace_layer(layer, x, tr.state_at(0), positions=[0, 3, 7])
    for row, p in enumerate([0, 3, 7]):
        assert part.state_at(row).allclose(tr.state_at(p), rtol=1e-9, atol=1e-10)


def test_trace_wraps_an_upstream_mamba3_layer(upstream):
    from mamba_state.trace import trace_layer

    layer = _upstream_m3(dtype=D64)
    x = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(4), dtype=D64)
    tr = trace_layer(layer, x, stride=2)
    y, s = ms.StatefulMamba3(layer)(x)
    torch.testing.assert_close(tr.outputs.transpose(0, 1), y, rtol=1e-9, atol=1e-10)
    assert tr.positions == [0, 2, 4] and tr.state_at(0).ssm_state.abs().sum() == 0


def test_trace_model_over_mamba3_blocks(upstream):
    from mamba_state.trace import trace_model

    lm = ms.StatefulMambaLM(_m3_lm(), state_dtype=D64)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    start = lm(ids[:, :3])[1]
    mt = trace_model(lm, ids[:, 3:], start)
    logits, final = lm(ids[:, 3:], start)
    torch.testing.assert_close(mt.logits, logits, rtol=1e-9, atol=1e-10)
    assert mt.final_state.allclose(final, rtol=1e-9, atol=1e-10) and mt.final_state.seqlen_offset == 6
    assert mt.state_at(-1).allclose(final, rtol=1e-9, atol=1e-10) and mt.state_at(-1).seqlen_offset == 6
    assert mt.state_at(0).allclose(start, rtol=0, atol=0)
    assert [mt.layers[i].kind for i in mt.layer_indices] == ["mamba3", "mamba3"]


def test_trace_cli_on_a_mamba3_model(upstream, tmp_path, capsys):
    """``mamba-state trace --mixer mamba3``: a random model of upstream Mamba3 blocks, traced and plotted."""
    pytest.importorskip("matplotlib")
    from mamba_state import cli

    out = tmp_path / "plots"
    code = cli.main(["trace", "--mixer", "mamba3", "--d-model", "32", "--n-layer", "2", "--d-state", "16",
                     "--headdim", "8", "--vocab-size", "64", "--length", "9", "--stride", "3", "--device", "cpu",
                     "--layer", "1", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "traced 9 tokens through 2 layers" in printed.out
    for name in ("norms.png", "ssm_heatmap_layer1.png", "pca2d_layer1.png", "pca3d_layer1.png"):
        assert (out / name).stat().st_size > 0
    assert cli.main(["trace", "--mixer", "mamba3", "--d-model", "32", "--headdim", "7", "--out", str(out),
                     "--device", "cpu"]) == 2
    assert "--headdim: expected a divisor of 2 * d_model = 64, found 7" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_of_a_mamba3_model_round_trips_and_serves(upstream, tmp_path, capsys):
    """save_pretrained of docs/mamba3.md's recipe writes ssm_cfg {"layer": "Mamba3", ...}; from_pretrained builds
    Mamba-3 mixers from it without upstream's model classes, with the same weights, logits, state layout and greedy
    tokens; `mamba-state trace --model DIR` and the serving engine run on the loaded model."""
    from mamba_state.cache import StateCache
    from mamba_state.serve import Engine

    model = _m3_lm(dtype=torch.float32)
    with torch.no_grad():  # biases and norms off their constant init, so a lost parameter shows
        for p_ in model.parameters():
            p_.add_(0.05 * torch.randn_like(p_))
    lm = ms.StatefulMambaLM(model)
    ckpt = tmp_path / "ckpt"
    lm.save_pretrained(ckpt)
    ssm = json.loads((ckpt / "config.json").read_text())["ssm_cfg"]
    assert ssm == {"layer": "Mamba3", "d_state": 16, "expand": 2, "headdim": 8, "ngroups": 1, "rope_fraction": 0.5,
                   "A_floor": 1e-4, "is_outproj_norm": False, "chunk_size": 64}
    back = ms.StatefulMambaLM.from_pretrained(ckpt)
    assert all(isinstance(b.mixer, ms.StatefulMamba3) for b in back.backbone.blocks())
    a, b = lm.state_dict(), back.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        la, sa = lm(ids)
        lb, sb = back(ids)
    # the same float32 weights through the same reference path: equal up to float32 op order
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    assert sb.layout() == sa.layout() and sb.allclose(sa, rtol=1e-5, atol=1e-5)
    greedy = lm.generate(ids[:, :4], max_new_tokens=5, temperature=0).sequences
    assert torch.equal(back.generate(ids[:, :4], max_new_tokens=5, temperature=0).sequences, greedy)
    # the serving engine (what `mamba-state serve --model DIR` runs), greedy: the same tokens
    engine = Engine(back, StateCache(back), max_batch=2)
    handles = [engine.submit(ids[r, :4], max_new_tokens=5) for r in range(2)]
    engine.run_until_idle()
    assert [h.result(timeout=0) for h in handles] == greedy[:, 4:].tolist()
    # the trace command on the checkpoint directory
    if importlib.util.find_spec("matplotlib") is not None:
        from mamba_state import cli

        code = cli.main(["trace", "--model", str(ckpt), "--tokens", "1 2 3 4 5", "--device", "cpu",
                         "--out", str(tmp_path / "plots")])
        printed = capsys.readouterr()
        assert code == 0, printed.err
        assert "traced 5 tokens through 2 layers" in printed.out


def test_checkpoint_config_of_mamba3_mixers_is_checked(upstream, tmp_path):
    """One ssm_cfg describes every layer: unlike Mamba-3 mixers are refused by name; forged Mamba-3 fields in a
    config.json are refused before a model is built."""
    model = _m3_lm(dtype=torch.float32)
    lm = ms.StatefulMambaLM(model)
    lm.backbone.blocks()[1].mixer.chunk_size = 32
    with pytest.raises(StateCompatibilityError, match="configured alike.*chunk_size"):
        lm.save_pretrained(tmp_path / "bad")
    lm.backbone.blocks()[1].mixer.chunk_size = 64
    ckpt = tmp_path / "ckpt"
    lm.save_pretrained(ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    for change, words in (({"rope_fraction": 0.3}, "rope_fraction: expected 0.5 or 1.0"),
                          ({"headdim": "8"}, "headdim: expected an integer"),
                          ({"is_outproj_norm": 1}, "is_outproj_norm: expected true or false"),
                          ({"layer": "Mamba4"}, "layer: expected 'Mamba1', 'Mamba2' or 'Mamba3'"),
                          ({"headdim": 7}, "headdim: expected a divisor")):
        (ckpt / "config.json").write_text(json.dumps({**raw, "ssm_cfg": {**raw["ssm_cfg"], **change}}))
        with pytest.raises(StateError, match=words):
            ms.StatefulMambaLM.from_pretrained(ckpt)


# ---------------------------------------------------------------------------------------------- decoding
def test_decode_graph_buffers_hold_every_mamba3_tensor(upstream):
    """What the CUDA-graph decode step keeps (the static state, the graph key, the copy back after lm.step) covers
    all four Mamba-3 tensors; the copy back is checked here on the CPU against lm.step itself."""
    from mamba_state.generation import decode

    lm = ms.StatefulMambaLM(_m3_lm(), state_dtype=D64)
    ids = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(6))
    state = lm(ids)[1]
    buffers = decode._private_copy(state, seqlen_offset=0)
    assert buffers.allclose(state, rtol=0, atol=0) and buffers.seqlen_offset == 0
    assert all(a.data_ptr() != b.data_ptr() for i in state.layer_indices
               for a, b in zip(buffers[i].tensors.values(), state[i].tensors.values()))
    key = decode._graph_key(lm, state, False)
    assert ("k_state", D64, (1, 8, 16)) in key[4][0][1] and key[0] == 2
    other = state.clone()
    other[0].k_state = other[0].k_state.float()
    assert decode._graph_key(lm, other, False) != key  # another dtype of one tensor: another graph
    g = decode._GraphStep.__new__(decode._GraphStep)  # the step a capture records, run eagerly
    g.fused, g.ids, g.state = False, ids[:, -1].clone(), decode._private_copy(state)
    ptrs = [t.data_ptr() for _, s in g.state.items() for t in s.tensors.values()]
    logits = g._step_into_state(lm)
    want_logits, want = lm.step(ids[:, -1], state)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)
    assert g.state.allclose(want, rtol=0, atol=0)
    assert [t.data_ptr() for _, s in g.state.items() for t in s.tensors.values()] == ptrs  # in place
    g.load(state)
    assert g.state.allclose(state, rtol=0, atol=0)


def test_generate_and_stream_resume_over_mamba3_blocks(upstream):
    """The resume law on a Mamba-3 LM: two calls, the second from the first one's state, equal one longer call."""
    lm = ms.StatefulMambaLM(_m3_lm(), state_dtype=D64)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(7))
    full = lm.generate(ids, max_new_tokens=6, temperature=0)
    first = lm.generate(ids, max_new_tokens=3, temperature=0)
    rest = lm.generate(first.sequences[:, -1:], state=first.state, max_new_tokens=3, temperature=0)
    assert torch.equal(torch.cat([first.sequences, rest.sequences[:, 1:]], 1), full.sequences)
    streamed = list(lm.stream(ids, max_new_tokens=6, temperature=0))
    assert torch.equal(torch.stack(streamed, 1), full.sequences[:, 5:])


def test_fused_decode_step_refuses_a_mamba3_model_by_name(upstream):
    """The fused in-place decode step is Mamba-1 only: asked for on a Mamba-3 model it says why; left to choose,
    decoding takes lm.step."""
    lm = ms.StatefulMambaLM(_m3_lm(), state_dtype=D64)
    ids = torch.randint(0, 64, (1, 3), generator=torch.Generator().manual_seed(8))
    with pytest.raises(StateError, match="fused_step=True: expected a model the fused decode step supports"):
        lm.generate(ids, max_new_tokens=2, fused_step=True)
    assert lm.generate(ids, max_new_tokens=2, fused_step=None).sequences.shape == (1, 5)


@pytest.mark.gpu
def test_gpu_mamba3_state_files_restore_the_device(tmp_path):
    """A CUDA Mamba-3 state saves from the GPU and loads back onto it (device=None), bit for bit."""
    s = m3_state(2, nheads=4, headdim=8, d_state=16, nangles=4, dtypes=(torch.float32, torch.float32,
                                                                       torch.bfloat16, torch.bfloat16)).to("cuda")
    model = MambaModelState({0: s, 1: rand_state("mamba2", 2).to("cuda")}, seqlen_offset=3)
    model.save(tmp_path / "g.st")
    back = MambaModelState.load(tmp_path / "g.st")
    assert back.device.type == "cuda" and model_bit_identical(back, model)
    assert MambaModelState.load(tmp_path / "g.st", device="cpu").device == torch.device("cpu")


# ---------------------------------------------------------------------------------------------- benchmark script
def test_bench_mamba3_smoke_writes_after_every_row(monkeypatch, capsys):
    """benchmarks/bench_mamba3.py --smoke --write on the CPU: timestamped progress, and the JSON and the doc section
    rewritten after every row (``complete`` false until the last), so a run cut short keeps its rows."""
    import importlib.util
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))
    spec = importlib.util.spec_from_file_location("bench_mamba3_under_test", bench_dir / "bench_mamba3.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_mamba3_under_test", bench)
    spec.loader.exec_module(bench)
    written, sections = [], []
    monkeypatch.setattr(bench, "write_json",  # a copy: the script keeps appending to the lists it wrote
                        lambda name, payload, env: written.append((name, json.loads(json.dumps(payload)), env)))
    monkeypatch.setattr(bench, "replace_section", lambda title, body: sections.append((title, body)))
    monkeypatch.setattr(bench, "_commit", lambda: "abc123")
    assert bench.main(["--smoke", "--write", "--repeats", "1", "--batches", "1,2", "--tokens", "16",
                       "--prefill", "16,32", "--step-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "warm-up ours forward" in out and " UTC +" in out
    assert [w[1]["complete"] for w in written] == [False, False, False, True]  # 2 batches x 2 prefill lengths
    assert [len(w[1]["results"]) for w in written] == [1, 1, 2, 2] and written[-1][2]["commit"] == "abc123"
    assert all(t == "Mamba-3 layer" for t, _ in sections) and "Partial run**: 1 of 4" in sections[0][1]
    assert "Partial" not in sections[-1][1] and "Commit abc123" in sections[-1][1]
    row = written[-1][1]["results"][1]
    assert row["batch"] == 2 and row["ours_continue_s"] > 0 and "ours_prefill_32_s" in row
