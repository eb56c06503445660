"""Hostile and broken state files (issue 21): every loader refuses with a StateError subclass naming the file,
what was expected and what was found; nothing blocks, nothing reads without bound, nothing is half-written."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch

import mamba_state as ms
from mamba_state import MambaInferenceState, MambaModelState, StateError, StateFormatError
from mamba_state.io import _digest, load_state, read_metadata
from mamba_state.state import files as msfiles
from mamba_state.state import format as fmt
from state_builders import bit_identical, model_bit_identical, rand_model_state

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file types and permissions")
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")

LOADERS = {
    "MambaModelState.load": MambaModelState.load,
    "MambaInferenceState.load": MambaInferenceState.load,
    "load_model_state": ms.load_model_state,
    "load_state": load_state,
    "read_metadata": read_metadata,
}


def refused(path, cls=StateFormatError, *words):
    """Every loader raises ``cls`` naming ``path`` and the words, in the expected/found form."""
    for name, load in LOADERS.items():
        with pytest.raises(cls) as info:
            load(path)
        text = str(info.value)
        assert os.fspath(path) in text, (name, text)
        assert "expected" in text and "found" in text, (name, text)
        assert all(w in text for w in words), (name, words, text)
    return text


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.st"
    rand_model_state(seed=3, metadata={"k": "v"}).save(path)
    return path


def split(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_raw(path, header_text: bytes, data: bytes) -> None:
    header_text += b" " * (-len(header_text) % 8)
    path.write_bytes(struct.pack("<Q", len(header_text)) + header_text + data)


def forge(src, dst, meta=None, tensors=None, raw_meta=None, data=None):
    """A copy of ``src`` with metadata entries / tensor entries changed and a valid checksum: a well-formed
    safetensors file whose contents a checksum cannot reject."""
    header, body = split(src)
    body = body if data is None else data
    header["__metadata__"].pop("checksum")
    header["__metadata__"].update(meta or {})
    for name, change in (tensors or {}).items():
        header[name] = change if not isinstance(change, dict) else {**header[name], **change}
    header["__metadata__"]["checksum"] = _digest(header, body)
    if raw_meta is not None:  # values json.dumps cannot make (non-string metadata values): checksum over them too
        header["__metadata__"].pop("checksum")
        header["__metadata__"].update(raw_meta)
        header["__metadata__"]["checksum"] = _digest(header, body)
    write_raw(dst, json.dumps(header).encode(), body)


# ------------------------------------------------------------------ file versions kept
def _fixture_values():
    # the values tests/fixtures/v0.1.0-*.safetensors were written with, by mamba-state 0.1.0
    g = torch.Generator().manual_seed(2026)

    def st(shape, dtype):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    l1 = MambaInferenceState(st((2, 6, 4), torch.float32), st((2, 6, 5), torch.float32))
    l2 = MambaInferenceState(st((2, 10, 4), torch.bfloat16), st((2, 2, 3, 2), torch.float16))
    model = MambaModelState({0: l1, 3: l2}, seqlen_offset=42, metadata={"prompt": "héllo", "n": [1, 2, {"k": None}]})
    layer = MambaInferenceState(st((1, 6, 4), torch.float64), st((1, 6, 5), torch.float64))
    return model, layer


def test_files_written_by_0_1_0_load_bit_for_bit():
    model, layer = _fixture_values()
    got = MambaModelState.load(os.path.join(FIXTURES, "v0.1.0-model.safetensors"))
    assert model_bit_identical(got, model)
    assert bit_identical(MambaInferenceState.load(os.path.join(FIXTURES, "v0.1.0-layer.safetensors")), layer)
    meta = read_metadata(os.path.join(FIXTURES, "v0.1.0-layer.safetensors"))
    assert meta["library_version"] == "0.1.0" and meta["user_metadata"] == {"who": "0.1.0"}


# ------------------------------------------------------------------ 1. exception types and canonical forms
@pytest.mark.parametrize("change,words", [
    ({"raw_meta": {"seqlen_offset": 5}}, ["seqlen_offset", "string value"]),
    ({"raw_meta": {"format_version": None}}, ["format_version", "string value"]),
    ({"raw_meta": {"format_version": [1]}}, ["format_version", "string value"]),
    ({"raw_meta": {"library_version": 1.5}}, ["library_version"]),
    ({"meta": {"format_version": " 1 "}}, ["format_version", "' 1 '"]),
    ({"meta": {"format_version": "+1"}}, ["format_version", "'+1'"]),
    ({"meta": {"format_version": "\uff11"}}, ["format_version"]),
    ({"meta": {"format_version": "01"}}, ["format_version", "'01'"]),
    ({"meta": {"seqlen_offset": "Infinity"}}, ["seqlen_offset", "'Infinity'"]),
    ({"meta": {"seqlen_offset": "9" * 40}}, ["seqlen_offset"]),
    ({"meta": {"user_metadata": "null"}}, ["user_metadata", "object", "NoneType"]),
    ({"meta": {"user_metadata": "[1, 2]"}}, ["user_metadata", "object"]),
    ({"meta": {"user_metadata": '{"a": 1, "a": 2}'}}, ["user_metadata", "duplicate key 'a'"]),
])
def test_metadata_values_are_type_checked(tmp_path, good, change, words):
    bad = tmp_path / "bad.st"
    forge(good, bad, **change)
    refused(bad, StateFormatError, *words)


def _layers(good):
    return json.loads(split(good)[0]["__metadata__"]["layers"])


@pytest.mark.parametrize("edit,words", [
    (lambda L: [L[0], L[0], L[1]], ["layer 0 twice"]),
    (lambda L: [dict(L[0], conv_shape=[2, 6, 4.0]), L[1]], ["conv_shape", "4.0"]),
    (lambda L: [dict(L[0], conv_shape=[2, 6, -4]), L[1]], ["conv_shape", "-4"]),
    (lambda L: [dict(L[0], conv_shape=[2, 6, True]), L[1]], ["conv_shape"]),
    (lambda L: [dict(L[0], ssm_shape=[2, 6, 2**63]), L[1]], ["ssm_shape"]),
    (lambda L: [dict(L[0], ssm_dtype=["float32"]), L[1]], ["ssm_dtype"]),
    (lambda L: [dict(L[0], device=7), L[1]], ["device", "7"]),
    (lambda L: [dict(L[0], device="nonsense:x"), L[1]], ["device", "nonsense"]),
    (lambda L: [{k: v for k, v in L[0].items() if k != "ssm_shape"}, L[1]], ["missing ['ssm_shape']"]),
    (lambda L: [L[0], "layer"], ["layer entry 1", "object"]),
])
def test_layer_entries_are_type_checked(tmp_path, good, edit, words):
    bad = tmp_path / "bad.st"
    forge(good, bad, meta={"layers": json.dumps(edit(_layers(good)))})
    refused(bad, StateFormatError, *words)


def test_layer_list_longer_than_the_limit(tmp_path, good, monkeypatch):
    monkeypatch.setattr(fmt, "MAX_LAYERS", 1)
    refused(good, StateFormatError, "1..1")


@pytest.mark.parametrize("name,change,words", [
    ("layers.0.conv_state", {"data_offsets": [0.0, 192]}, ["data_offsets", "0.0"]),
    ("layers.0.conv_state", {"data_offsets": [-1, 191]}, ["data_offsets", "-1"]),
    ("layers.0.conv_state", {"data_offsets": [True, 193]}, ["data_offsets"]),
    ("layers.0.conv_state", {"shape": [2, 6, 4.0]}, ["shape", "4.0"]),
    ("layers.0.conv_state", {"extra": 1}, ["keys", "extra"]),
])
def test_tensor_entries_are_type_checked(tmp_path, good, name, change, words):
    bad = tmp_path / "bad.st"
    forge(good, bad, tensors={name: change})
    refused(bad, StateFormatError, *words)


def test_gaps_and_overlaps_between_tensors(tmp_path, good):
    header, body = split(good)
    order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    first, second = order[0], order[1]
    b0, e0 = header[first]["data_offsets"]
    b1, e1 = header[second]["data_offsets"]
    bad = tmp_path / "bad.st"
    # the second tensor moved 8 bytes into the first (overlap) and the data shortened to keep the total length
    forge(good, bad, tensors={second: {"data_offsets": [b1 - 8, e1 - 8]}})
    refused(bad, StateFormatError, "overlap")
    # a gap of 8 bytes before the second tensor, the data padded to keep every range in the file
    shifted = {k: {"data_offsets": [header[k]["data_offsets"][0] + 8, header[k]["data_offsets"][1] + 8]}
               for k in order[1:]}
    forge(good, bad, tensors=shifted, data=body[:e0] + b"\0" * 8 + body[e0:])
    refused(bad, StateFormatError, "gap")


def test_duplicate_keys_in_the_header(tmp_path, good):
    header, body = split(good)
    text = json.dumps(header)
    meta = json.dumps(header["__metadata__"])
    # a second __metadata__ (json.loads would keep the last one silently)
    dup = text[:-1] + ', "__metadata__": ' + meta + "}"
    bad = tmp_path / "bad.st"
    write_raw(bad, dup.encode(), body)
    refused(bad, StateFormatError, "duplicate key '__metadata__'")


def test_non_standard_json_constants_in_the_header(tmp_path, good):
    header, body = split(good)
    header["layers.0.conv_state"]["shape"] = [2, 6, float("nan")]
    bad = tmp_path / "bad.st"
    write_raw(bad, json.dumps(header).encode(), body)
    refused(bad, StateFormatError, "NaN")


# ------------------------------------------------------------------ 2. bounded work
def test_deeply_nested_json_is_refused_before_parsing(tmp_path, good):
    bad = tmp_path / "bad.st"
    deep = "[" * 100_000 + "]" * 100_000  # json.loads: RecursionError
    forge(good, bad, meta={"user_metadata": '{"a": ' + deep + "}"})
    refused(bad, StateFormatError, "user_metadata", "nesting at most")
    forge(good, bad, meta={"layers": deep})
    refused(bad, StateFormatError, "layers", "nesting at most")
    header, body = split(good)
    write_raw(bad, (json.dumps(header)[:-1] + ', "x": ' + deep + "}").encode(), body)
    refused(bad, StateFormatError, "safetensors header", "nesting at most")


def test_nesting_at_the_limit_loads(tmp_path):
    depth = fmt.MAX_JSON_DEPTH - 1  # plus the metadata object itself
    value = json.loads("[" * depth + "]" * depth)
    s = rand_model_state(metadata={"deep": value})
    s.save(tmp_path / "deep.st")
    assert MambaModelState.load(tmp_path / "deep.st").metadata == {"deep": value}


def test_metadata_too_deep_to_load_is_refused_at_save(tmp_path):
    deep: list = []
    for _ in range(200):  # saved by 0.1 (json.dumps manages it); deeper than any reader limit allows
        deep = [deep]
    s = rand_model_state(metadata={"deep": deep})
    with pytest.raises(StateError, match="nesting at most"):
        s.save(tmp_path / "deep.st")
    assert not os.listdir(tmp_path)


def test_memory_amplification_is_bounded(tmp_path, good):
    """A header of many empty arrays is refused by counting brackets, before json.loads allocates for them."""
    header, body = split(good)
    count = fmt.MAX_JSON_CONTAINERS + 1
    text = json.dumps(header)[:-1] + ', "x": [' + ",".join(["[]"] * count) + "]}"
    bad = tmp_path / "bad.st"
    write_raw(bad, text.encode(), body)
    t0 = time.perf_counter()
    refused(bad, StateFormatError, "arrays and objects")
    assert time.perf_counter() - t0 < 10 * len(LOADERS)


def test_header_length_over_the_limit(tmp_path, good, monkeypatch):
    monkeypatch.setattr(fmt, "MAX_HEADER_BYTES", 64)
    refused(good, StateFormatError, "header of at most 64 bytes")


# ------------------------------------------------------------------ 3. files that are not regular files, OS errors
@posix_only
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.st"
    os.mkfifo(fifo)
    outcome: dict = {}

    def load_all():
        try:
            refused(fifo, StateFormatError, "FIFO")
            outcome["ok"] = True
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc

    worker = threading.Thread(target=load_all, daemon=True)
    worker.start()
    worker.join(20)
    if worker.is_alive():  # unblock the reader so that the thread can end, then fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("a load of a FIFO blocked")
    if "error" in outcome:
        raise outcome["error"]


@posix_only
@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_device_files_and_links_to_them_are_refused(tmp_path, device):
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    refused(device, StateFormatError, "character device")
    link = tmp_path / "link.st"
    link.symlink_to(device)
    refused(link, StateFormatError, "character device")


def test_directory_and_missing_file_from_every_loader(tmp_path):
    refused(tmp_path, StateFormatError, "directory")
    text = refused(tmp_path / "absent.st", fmt.StateFileNotFoundError, "no such file")
    assert "absent.st" in text
    with pytest.raises(FileNotFoundError):
        read_metadata(tmp_path / "absent.st")


@posix_only
def test_os_errors_are_named(tmp_path, good):
    refused(good / "below", fmt.StateFileAccessError, "not a directory")  # a file used as a directory
    loop = tmp_path / "loop.st"
    loop.symlink_to(loop)
    with pytest.raises(fmt.StateFileAccessError) as info:
        load_state(loop)
    assert info.value.errno == errno.ELOOP and "symlink loop" in str(info.value)
    refused(tmp_path / ("x" * 300), fmt.StateFileAccessError, "name too long")


@posix_only
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads every file")
def test_unreadable_file(tmp_path, good):
    good.chmod(0)
    try:
        refused(good, fmt.StateFileAccessError, "no permission")
    finally:
        good.chmod(0o600)


@pytest.mark.parametrize("path,words", [("bad\0name.st", ["NUL"]), (3.5, ["float"]), ("", ["non-empty"])])
def test_paths_that_cannot_name_a_file(path, words):
    for load in LOADERS.values():
        with pytest.raises(StateError) as info:
            load(path)
        assert all(w in str(info.value) for w in words), str(info.value)
    if isinstance(path, str):  # (a non-path object: the containers' own os.fspath raises TypeError first)
        with pytest.raises(StateError, match=words[0]):
            rand_model_state().save(path)


# ------------------------------------------------------------------ 5. writes
@posix_only
def test_save_through_a_symlink_writes_its_target(tmp_path):
    real = tmp_path / "real.st"
    rand_model_state(seed=1).save(real)
    link = tmp_path / "link.st"
    link.symlink_to("real.st")
    s = rand_model_state(seed=2)
    s.save(link)
    assert link.is_symlink() and os.readlink(link) == "real.st"
    assert model_bit_identical(MambaModelState.load(real), s)
    dangling = tmp_path / "dangling.st"
    dangling.symlink_to("new.st")
    s.save(dangling)
    assert dangling.is_symlink() and model_bit_identical(MambaModelState.load(tmp_path / "new.st"), s)
    loop = tmp_path / "loop.st"
    loop.symlink_to(loop)
    with pytest.raises(StateError, match="symlink loop"):
        s.save(loop)
    assert sorted(os.listdir(tmp_path)) == ["dangling.st", "link.st", "loop.st", "new.st", "real.st"]


def _stale_temp(path, age=3600.0, size=1024):
    fd, tmp = msfiles.open_temp_beside(path)
    os.write(fd, b"\0" * size)
    os.close(fd)
    old = time.time() - age
    os.utime(tmp, (old, old))
    return tmp


def test_stale_temp_files_are_swept_by_the_next_save(tmp_path):
    path = tmp_path / "s.st"
    stale = [_stale_temp(path) for _ in range(3)]
    fresh = _stale_temp(path, age=0)  # a save that may still be under way
    other = _stale_temp(tmp_path / "other.st")  # another path's
    unrelated = tmp_path / ".s.st.notours.tmp"
    unrelated.write_bytes(b"x")
    rand_model_state().save(path)
    left = set(os.listdir(tmp_path))
    assert not any(os.path.basename(t) in left for t in stale)
    assert {os.path.basename(fresh), os.path.basename(other), unrelated.name, "s.st"} == left


@pytest.mark.skipif(msfiles.fcntl is None, reason="needs flock")
def test_a_locked_temp_file_of_a_live_save_is_kept(tmp_path):
    path = tmp_path / "s.st"
    live = _stale_temp(path)  # old, but locked by a save still running
    fd = os.open(live, os.O_RDONLY)
    msfiles.lock_temp(fd)
    try:
        rand_model_state().save(path)
        assert os.path.exists(live)
    finally:
        os.close(fd)
    rand_model_state().save(path)
    assert not os.path.exists(live)


@posix_only
def test_killed_save_leaves_a_temp_file_the_next_save_removes(tmp_path):
    """kill -9 during a save (the write made to hang): the temporary file stays, the next save removes it."""
    path = tmp_path / "s.st"
    rand_model_state(seed=1).save(path)
    before = path.read_bytes()
    script = (
        "import os, sys, time\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from state_builders import rand_model_state\n"
        "import mamba_state.state.format as fmt\n"
        "def hang(fd, data):\n"
        "    os.write(fd, data[:100]); print('writing', flush=True); time.sleep(60)\n"
        "fmt._write_all = hang\n"
        "rand_model_state(seed=2).save(sys.argv[1])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(path), os.path.dirname(__file__)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()
        proc.wait()
    temps = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(temps) == 1 and path.read_bytes() == before
    old = time.time() - 3600
    os.utime(tmp_path / temps[0], (old, old))
    rand_model_state(seed=3).save(path)
    assert os.listdir(tmp_path) == ["s.st"]


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "disk is full"), (errno.EDQUOT, "quota"),
                                        (errno.EIO, "Input/output error")])
def test_full_disk_raises_a_state_error_and_keeps_the_old_file(tmp_path, monkeypatch, code, words):
    path = tmp_path / "s.st"
    rand_model_state(seed=1).save(path)
    before = path.read_bytes()

    def full(fd, data):
        os.write(fd, bytes(data[:64]))  # part of it went out before the disk filled
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fmt, "_write_all", full)
    with pytest.raises(StateError) as info:
        rand_model_state(seed=2).save(path)
    assert isinstance(info.value, OSError) and info.value.errno == code
    assert words in str(info.value) and str(path) in str(info.value) and "expected" in str(info.value)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["s.st"]


@posix_only
def test_save_to_a_special_file_is_refused(tmp_path):
    fifo = tmp_path / "pipe.st"
    os.mkfifo(fifo)
    with pytest.raises(StateError, match="FIFO"):
        rand_model_state().save(fifo)
    assert sorted(os.listdir(tmp_path)) == ["pipe.st"]
