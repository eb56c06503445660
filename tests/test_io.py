"""Persistence: safetensors + JSON metadata, atomic writes, validation of every foreign or damaged file."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct

import pytest
import torch

import mamba_state as ms
from mamba_state import MambaInferenceState, MambaModelState, StateCompatibilityError, StateError, StateFormatError
from mamba_state.io import FORMAT_VERSION, load_state, read_metadata, save_state
from state_builders import bit_identical, model_bit_identical, rand_model_state, rand_state, tiny_lm

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _files(directory):
    return sorted(os.listdir(directory))


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_layer_round_trip_bit_identical(tmp_path, dtype, kind):
    s = rand_state(kind, batch=3, dtype=dtype)
    s.ssm_state[0, 0, 0] = float("nan")
    s.ssm_state[0, 0, 1] = -0.0
    s.conv_state[1, 0, 0] = float("-inf")
    path = tmp_path / "layer.mstate"
    s.save(path, metadata={"who": "test"})
    back = MambaInferenceState.load(path)
    assert bit_identical(s, back)
    assert read_metadata(path)["user_metadata"] == {"who": "test"}
    assert _files(tmp_path) == ["layer.mstate"]  # no temporary file left behind


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_round_trip_keeps_metadata_and_offset(tmp_path, dtype):
    s = rand_model_state(batch=2, dtype=dtype, seqlen_offset=123, metadata={"prompt": "héllo", "n": [1, 2]})
    ms.save_model_state(s, tmp_path / "m.st")
    back = ms.load_model_state(tmp_path / "m.st")
    assert model_bit_identical(s, back) and back.seqlen_offset == 123 and back.metadata["prompt"] == "héllo"
    back2 = MambaModelState.load(str(tmp_path / "m.st"), device="cpu")
    assert model_bit_identical(s, back2)
    meta = read_metadata(tmp_path / "m.st")
    # a file of Mamba-1/2 layers keeps 0.1.0's version 1 (0.1.0 reads it); Mamba-3 layers make it version 2
    assert meta["format"] == "mamba-state" and int(meta["format_version"]) == 1 < FORMAT_VERSION
    assert meta["container"] == "model" and meta["library_version"] == ms.__version__
    assert [e["idx"] for e in meta["layers"]] == [0, 3] and meta["layers"][1]["kind"] == "mamba2"
    assert meta["layers"][0]["ssm_dtype"] == str(dtype).replace("torch.", "")


def test_mixed_dtypes_and_noncontiguous_round_trip(tmp_path):
    conv = torch.randn(2, 4, 6).transpose(1, 2)  # upstream Mamba-2 keeps conv channel-last in memory
    ssm = torch.randn(2, 6, 3, dtype=torch.float64)
    s = MambaInferenceState(conv.to(torch.bfloat16), ssm)
    save_state(s, tmp_path / "a")
    assert bit_identical(s, MambaInferenceState.load(tmp_path / "a"))


def test_container_kinds_are_not_confused(tmp_path):
    rand_state().save(tmp_path / "layer")
    rand_model_state().save(tmp_path / "model")
    with pytest.raises(StateFormatError, match="single-layer"):
        MambaModelState.load(tmp_path / "layer")
    with pytest.raises(StateFormatError, match="model state"):
        MambaInferenceState.load(tmp_path / "model")
    with pytest.raises(StateError, match="MambaModelState"):
        ms.save_model_state(rand_state(), tmp_path / "x")
    with pytest.raises(StateError, match="found str"):
        save_state("not a state", tmp_path / "x")


# ------------------------------------------------------------------ atomic writes
def test_failed_save_leaves_existing_file_untouched(tmp_path):
    path = tmp_path / "keep.st"
    rand_model_state(seed=1).save(path)
    before = path.read_bytes()
    unsaveable = [
        MambaInferenceState(torch.zeros(1, 2, 3).to(torch.float8_e4m3fn), torch.zeros(1, 2, 4)),  # no such dtype in the format
        MambaInferenceState(torch.zeros(1, 2, 3, device="meta"), torch.zeros(1, 2, 4, device="meta")),  # no data
    ]
    for s in unsaveable:
        with pytest.raises(StateError) as exc:
            s.save(path)
        assert "expected" in str(exc.value) and "found" in str(exc.value)
        assert path.read_bytes() == before and _files(tmp_path) == ["keep.st"]


def test_save_interrupted_while_writing(tmp_path, monkeypatch):
    path = tmp_path / "keep.st"
    rand_state(seed=1).save(path)
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        rand_state(seed=2).save(path)
    assert path.read_bytes() == before and _files(tmp_path) == ["keep.st"]


def test_save_into_missing_directory(tmp_path):
    with pytest.raises(StateError) as exc:
        rand_state().save(tmp_path / "nope" / "x.st")
    assert "nope" in str(exc.value)


def test_save_to_a_directory_is_an_argument_error(tmp_path):
    target = tmp_path / "states"
    target.mkdir()
    (target / "inside").write_bytes(b"keep")
    for save in (lambda p: rand_state().save(p), lambda p: rand_model_state().save(p),
                 lambda p: ms.save_model_state(rand_model_state(), p)):
        for path in (target, str(target)):
            with pytest.raises(StateError) as exc:
                save(path)
            assert not isinstance(exc.value, OSError)
            assert str(target) in str(exc.value) and "expected a file path" in str(exc.value)
            assert "found a directory" in str(exc.value)
    assert _files(tmp_path) == ["states"] and _files(target) == ["inside"]  # no temporary file left behind


@pytest.mark.parametrize("device,words", [
    ("nonsense", ["device: expected", "'nonsense'"]),
    (object(), ["device: expected", "object"]),
    pytest.param("cuda", ["device: expected an available device, found cuda (CUDA is not available)"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")),
    pytest.param("cuda:0", ["found cuda:0", "CUDA is not available"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")),
])
def test_bad_load_device_is_an_argument_error(tmp_path, good_file, device, words):
    missing = tmp_path / "absent.st"
    layer_file = tmp_path / "layer.st"
    rand_state().save(layer_file)
    loads = [(MambaModelState.load, good_file), (ms.load_model_state, good_file), (load_state, good_file),
             (MambaInferenceState.load, layer_file)]
    for load, existing in loads:
        for path in (existing, missing):
            with pytest.raises(StateError) as exc:
                load(path, device=device)
            # the argument is blamed, not the file (and the device is checked before the file is read)
            assert not isinstance(exc.value, StateFormatError), str(exc.value)
            assert all(w in str(exc.value) for w in words), str(exc.value)
            assert str(path) not in str(exc.value)


@pytest.mark.gpu
def test_load_on_a_missing_cuda_index(tmp_path, good_file):
    bad = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(StateError) as exc:
        MambaModelState.load(good_file, device=bad)
    assert bad in str(exc.value) and not isinstance(exc.value, StateFormatError)


# ------------------------------------------------------------------ damaged and foreign files
@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.st"
    rand_model_state(seed=3, metadata={"k": "v"}).save(path)
    return path


def _expect_format_error(path, *words):
    with pytest.raises(StateFormatError) as exc:
        load_state(path)
    assert all(w in str(exc.value) for w in words), str(exc.value)
    assert "expected" in str(exc.value) and "found" in str(exc.value)


def test_truncated_files(tmp_path, good_file):
    data = good_file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    for cut in (1, 7, 8, 8 + n // 2, 8 + n, len(data) - 1):
        bad = tmp_path / f"cut{cut}"
        bad.write_bytes(data[:cut])
        _expect_format_error(bad)
    padded = tmp_path / "padded"
    padded.write_bytes(data + b"\0" * 4)
    _expect_format_error(padded)


def test_every_flipped_byte_is_caught(tmp_path, good_file):
    data = good_file.read_bytes()
    bad = tmp_path / "flipped"
    for i in range(len(data)):  # header and data: a checksum covers both
        d = bytearray(data)
        d[i] ^= 0x10 if i % 2 else 0x01
        bad.write_bytes(bytes(d))
        with pytest.raises(StateFormatError):
            load_state(bad)


def test_empty_file_and_directory(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    _expect_format_error(tmp_path / "empty", "empty")
    with pytest.raises(StateFormatError, match="directory"):
        load_state(tmp_path)


def test_missing_file_is_also_file_not_found(tmp_path):
    with pytest.raises(StateFormatError) as exc:
        MambaModelState.load(tmp_path / "absent.st")
    assert isinstance(exc.value, FileNotFoundError) and "absent.st" in str(exc.value)
    with pytest.raises(FileNotFoundError):
        ms.load_model_state(tmp_path / "absent.st")


class _Payload:
    """Unpickling this object would create the marker file: loading must never unpickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "marker"
    blob = pickle.dumps(_Payload(marker))
    buf = io.BytesIO()
    torch.save({"x": _Payload(marker)}, buf)
    for name, data in [("p.pkl", blob), ("t.pt", buf.getvalue()), ("p.st", blob + b"\0" * 64)]:
        (tmp_path / name).write_bytes(data)
        _expect_format_error(tmp_path / name)
        with pytest.raises(StateFormatError):
            MambaModelState.load(tmp_path / name)
        assert not marker.exists()
    pickle.loads(blob)  # the payload is live: it does create the marker when unpickled
    assert marker.exists()


def test_random_bytes(tmp_path):
    g = torch.Generator().manual_seed(0)
    for i, size in enumerate((9, 100, 4096)):
        path = tmp_path / f"r{i}"
        path.write_bytes(bytes(torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8).tolist()))
        _expect_format_error(path)


def test_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.randn(3, 4)}, tmp_path / "w.safetensors")
    _expect_format_error(tmp_path / "w.safetensors", "something else")
    save_file({"weight": torch.randn(3, 4)}, tmp_path / "f.safetensors", metadata={"format": "pt"})
    _expect_format_error(tmp_path / "f.safetensors", "'pt'")


def _rewrite_metadata(src, dst, **changes):
    """Copy a state file with metadata entries changed and a valid checksum (a well-formed but different file)."""
    from mamba_state.io import _digest

    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"].pop("checksum")
    header["__metadata__"].update(changes)
    header["__metadata__"]["checksum"] = _digest(header, data[8 + n:])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def test_newer_format_version(tmp_path, good_file):
    newer = tmp_path / "newer.st"
    _rewrite_metadata(good_file, newer, format_version=str(FORMAT_VERSION + 1), library_version="9.9")
    _expect_format_error(newer, f"format_version <= {FORMAT_VERSION}", str(FORMAT_VERSION + 1), "9.9")
    _rewrite_metadata(good_file, newer, format_version="0")
    _expect_format_error(newer, "format_version")
    _rewrite_metadata(good_file, newer, format_version="one")
    _expect_format_error(newer, "'one'")


def test_inconsistent_metadata(tmp_path, good_file):
    bad = tmp_path / "bad.st"
    meta = read_metadata(good_file)
    layers = meta["layers"]
    cases = [
        ({"container": "stack"}, ["container", "'stack'"]),
        ({"layers": "not json"}, ["JSON", "layers"]),
        ({"layers": "[]"}, ["non-empty"]),
        ({"layers": json.dumps([dict(layers[0], ssm_shape=[2, 6, 4]), layers[1]])}, ["shape", "[2, 6, 4]"]),
        ({"layers": json.dumps([dict(layers[0], ssm_dtype="float64"), layers[1]])}, ["dtype", "float64"]),
        ({"layers": json.dumps([dict(layers[0], idx=-2), layers[1]])}, ["idx", "-2"]),
        ({"layers": json.dumps([layers[0]])}, ["extra entries"]),
        ({"seqlen_offset": "-3"}, ["seqlen_offset"]),
        ({"user_metadata": "{"}, ["user_metadata"]),
        # a forged kind (valid checksum) that disagrees with the tensors
        ({"layers": json.dumps([dict(layers[0], kind="mamba2"), layers[1]])},
         [f"layer {layers[0]['idx']} kind", "expected 'mamba1'", "found 'mamba2'"]),
        ({"layers": json.dumps([layers[0], dict(layers[1], kind="mamba1")])},
         [f"layer {layers[1]['idx']} kind", "expected 'mamba2'", "found 'mamba1'"]),
        ({"layers": json.dumps([dict(layers[0], kind="mamba3"), layers[1]])}, ["kind", "'mamba3'"]),
    ]
    for change, words in cases:
        _rewrite_metadata(good_file, bad, **change)
        _expect_format_error(bad, *words)


def test_torch_save_weights_only(tmp_path):
    s = rand_model_state(metadata={"a": 1})
    torch.save({"model": s, "layer": s[0]}, tmp_path / "s.pt")
    back = torch.load(tmp_path / "s.pt", weights_only=True)
    assert model_bit_identical(back["model"], s) and bit_identical(back["layer"], s[0])
    assert isinstance(back["layer"], MambaInferenceState)


# ------------------------------------------------------------------ compatibility with a model
@pytest.mark.upstream
def test_load_with_model(tmp_path):
    model = tiny_lm("mamba1", n_layer=2, d_state=8)
    layout = ms.layers.model_layout(model)
    good = MambaModelState({i: MambaInferenceState(torch.randn(1, *l["conv_shape"]), torch.randn(1, *l["ssm_shape"]))
                            for i, l in layout.items()})
    good.save(tmp_path / "good.st", model=model)
    assert model_bit_identical(MambaModelState.load(tmp_path / "good.st", model=model), good)
    # a subset of the layers: only without strict
    MambaModelState({0: good[0]}).save(tmp_path / "subset.st")
    with pytest.raises(StateCompatibilityError) as exc:
        MambaModelState.load(tmp_path / "subset.st", model=model)
    assert "[0, 1]" in str(exc.value) and "[0]" in str(exc.value)
    assert MambaModelState.load(tmp_path / "subset.st", model=model, strict=False).layer_indices == [0]
    # an extra layer is refused either way
    MambaModelState({0: good[0], 1: good[1], 5: good[1]}).save(tmp_path / "extra.st")
    for strict in (True, False):
        with pytest.raises(StateCompatibilityError, match=r"5\]"):
            MambaModelState.load(tmp_path / "extra.st", model=model, strict=strict)
    # another model's shapes: the first mismatch is named
    other = tiny_lm("mamba1", n_layer=2, d_state=4)
    with pytest.raises(StateCompatibilityError) as exc:
        MambaModelState.load(tmp_path / "good.st", model=other)
    assert "layer 0 ssm_shape" in str(exc.value) and "[32, 4]" in str(exc.value) and "[32, 8]" in str(exc.value)
    mamba2 = tiny_lm("mamba2", n_layer=2)
    with pytest.raises(StateCompatibilityError, match="layer 0 kind: expected mamba2 .*found mamba1"):
        MambaModelState.load(tmp_path / "good.st", model=mamba2)
    with pytest.raises(StateCompatibilityError):  # saving against a model checks too
        good.save(tmp_path / "x.st", model=other)
    assert not (tmp_path / "x.st").exists()
    rand_state("mamba1").save(tmp_path / "layer.st")
    with pytest.raises(StateError):
        load_state(tmp_path / "layer.st", model=model)


# ------------------------------------------------------------------ what the model check covers, dtypes on load
def _lm(seed=0, dtype=None):
    from mamba_state.adapters import StatefulMambaLM

    torch.manual_seed(seed)
    return StatefulMambaLM.from_config(dict(d_model=16, n_layer=2, vocab_size=32, ssm_cfg={"d_state": 8}), dtype=dtype)


def test_fingerprint_covers_the_layout_only(tmp_path):
    """As docs/persistence.md says: layer indices, kinds and state shapes; not the weights, not the dtypes."""
    from mamba_state.layers import layout_fingerprint, model_layout

    lm = _lm()
    layout = model_layout(lm)
    assert layout == {i: {"kind": "mamba1", "conv_shape": [32, 4], "ssm_shape": [32, 8]} for i in (0, 1)}
    # the definition of 0.1.0: files written then must keep loading (a change here needs a fingerprint version)
    assert layout_fingerprint(layout) == "4cb3674a0346ca3e"
    _, state = lm(torch.randint(0, 32, (2, 5)))
    state.save(tmp_path / "s.st", model=lm)
    assert read_metadata(tmp_path / "s.st")["model_fingerprint"] == "4cb3674a0346ca3e"
    other_weights, other_dtype = _lm(seed=1), _lm(dtype=torch.bfloat16)
    assert not torch.equal(other_weights.lm_head.weight, lm.lm_head.weight)
    for model in (other_weights, other_dtype):  # same layout: accepted (the docs say so plainly)
        assert model_bit_identical(MambaModelState.load(tmp_path / "s.st", model=model), state)


@pytest.mark.parametrize("saved", [torch.bfloat16, torch.float64])
def test_load_keeps_the_saved_dtype_whatever_the_model(tmp_path, saved):
    lm = _lm()  # float32 parameters, float32 new states
    ids = torch.randint(0, 32, (2, 7))
    _, state = lm(ids[:, :4])
    state.to(dtype=saved).save(tmp_path / "s.st", model=lm)
    loaded = MambaModelState.load(tmp_path / "s.st", model=lm)
    assert loaded.dtype == saved and model_bit_identical(loaded, state.to(dtype=saved))
    _, after = lm(ids[:, 4:], loaded)  # the model continues it in its own dtype
    assert all(after[i].conv_state.dtype == saved and after[i].ssm_state.dtype == saved for i in after.layer_indices)
    assert loaded.to(dtype=torch.float32).dtype == torch.float32


# ------------------------------------------------------------------ file permissions
def _writers():
    """Every file writer of the library: (name, function writing into a directory, the files it writes)."""
    from mamba_state.rl.checkpoint import save_checkpoint

    def state_file(d):
        rand_model_state().save(d / "s.st")

    def layer_file(d):
        save_state(rand_state(), d / "l.st")

    def checkpoint(d):
        _lm().save_pretrained(d)

    def ppo(d):
        save_checkpoint(d / "ppo.pt", {"step": torch.tensor(3)})

    return [("state", state_file, ["s.st"]), ("layer", layer_file, ["l.st"]),
            ("save_pretrained", checkpoint, ["config.json", "model.safetensors"]), ("ppo", ppo, ["ppo.pt"])]


@pytest.fixture
def umask():
    """Set the process umask for one test; restored afterwards."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")


@posix_only
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
@pytest.mark.parametrize("name,write,files", _writers(), ids=[w[0] for w in _writers()])
def test_new_files_get_the_umask_permissions(tmp_path, umask, mask, name, write, files):
    umask(mask)
    write(tmp_path)
    assert _files(tmp_path) == sorted(files)  # no temporary file left behind
    for f in files:
        assert oct(os.stat(tmp_path / f).st_mode & 0o777) == oct(0o666 & ~mask), f


@posix_only
@pytest.mark.parametrize("name,write,files", _writers(), ids=[w[0] for w in _writers()])
def test_replaced_files_keep_their_permissions(tmp_path, umask, name, write, files):
    umask(0o022)
    write(tmp_path)
    for mode in (0o600, 0o640, 0o444):  # private, shared with the group, read-only: each kept
        for f in files:
            os.chmod(tmp_path / f, mode)
        write(tmp_path)
        assert _files(tmp_path) == sorted(files)
        for f in files:
            assert oct(os.stat(tmp_path / f).st_mode & 0o777) == oct(mode), (f, oct(mode))


@posix_only
def test_failed_save_leaves_mode_and_bytes(tmp_path, umask, monkeypatch):
    umask(0o022)
    path = tmp_path / "keep.st"
    rand_state(seed=1).save(path)
    os.chmod(path, 0o600)
    before = path.read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        rand_state(seed=2).save(path)
    assert path.read_bytes() == before and os.stat(path).st_mode & 0o777 == 0o600 and _files(tmp_path) == ["keep.st"]
