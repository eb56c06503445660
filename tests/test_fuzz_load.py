"""Fuzzing the loaders with mutated real state files (issue 21).

Property: a mutated file either loads as exactly the state that was saved (bit for bit) or every loader raises a
``StateError`` subclass, each load within a time bound and a bound on Python-allocated memory. Two kinds of
mutation: raw bytes (flips, truncation, insertion, a changed header length), which the checksum mostly catches, and
structural ones (a header value replaced by arbitrary JSON, the checksum recomputed), which reach every type
check behind it. The example count follows the hypothesis profile (tests/conftest.py): small and derandomized in
CI, ten times larger locally.
"""

from __future__ import annotations

import json
import struct
import time
import tracemalloc

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_state import MambaInferenceState, MambaModelState, StateError
from mamba_state.io import _digest, load_state, read_metadata
from state_builders import bit_identical, model_bit_identical, rand_model_state, rand_state

EXAMPLES = settings().max_examples * 10  # ci: 120, dev: 1000
TIME_BOUND_S = 2.0
MEMORY_BOUND = 64 * 1024 * 1024  # Python allocations during one load (files here are a few KiB)

_SOURCES = [
    rand_model_state(batch=2, dtype=torch.float32, seed=1, metadata={"k": [1, "v", {"n": None}]}),
    rand_model_state(batch=1, dtype=torch.bfloat16, seed=2, seqlen_offset=0),
    rand_state("mamba2", batch=2, dtype=torch.float16, seed=3),
    rand_state("mamba1", batch=0, dtype=torch.float64, seed=4),
    # format version 2: a Mamba-3 layer beside Mamba-1/2 ones, and a single Mamba-3 layer
    MambaModelState({0: rand_state("mamba1", 2, seed=5), 1: rand_state("mamba3", 2, torch.bfloat16, seed=6),
                     4: rand_state("mamba2", 2, seed=7)}, seqlen_offset=9, metadata={"m3": True}),
    rand_state("mamba3", batch=1, dtype=torch.float32, seed=8),
]


def _bytes_of(state) -> bytes:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        state.save(Path(d) / "s.st")
        return (Path(d) / "s.st").read_bytes()


_FILES = [_bytes_of(s) for s in _SOURCES]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)


@st.composite
def raw_mutation(draw, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "length"]))
        if op == "flip" and out:
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del out[draw(st.integers(0, len(out))):]
        elif op == "insert":
            i = draw(st.integers(0, len(out)))
            out[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and out:
            i = draw(st.integers(0, len(out) - 1))
            del out[i:i + draw(st.integers(1, 16))]
        elif op == "length" and len(out) >= 8:
            out[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    return bytes(out)


@st.composite
def structural_mutation(draw, data: bytes) -> bytes:
    """A header value (metadata, layer entry field or tensor field) replaced, the checksum made valid again."""
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    meta = header["__metadata__"]
    meta.pop("checksum")
    where = draw(st.sampled_from(["meta", "layer", "tensor"]))
    value = draw(json_values)
    if where == "meta":
        key = draw(st.sampled_from(sorted(meta) + ["extra"]))
        # metadata values are strings on the wire; sometimes a raw non-string value, sometimes its JSON text
        meta[key] = value if draw(st.booleans()) else json.dumps(value)
    elif where == "layer":
        layers = json.loads(meta["layers"])
        entry = draw(st.sampled_from(layers))
        entry[draw(st.sampled_from(sorted(entry)))] = value
        if draw(st.booleans()):
            layers.append(draw(st.sampled_from(layers)))  # a layer listed twice
        meta["layers"] = json.dumps(layers)
    else:
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = value
    meta["checksum"] = _digest(header, body)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def _same(got, want, tensors_only: bool) -> bool:
    if isinstance(want, MambaModelState):
        if not isinstance(got, MambaModelState):
            return False
        if tensors_only:  # a recomputed checksum makes another seqlen_offset or user metadata a valid file
            return got.layer_indices == want.layer_indices and all(bit_identical(got[i], want[i])
                                                                   for i in want.layer_indices)
        return model_bit_identical(got, want)
    return isinstance(got, MambaInferenceState) and bit_identical(got, want)


def _check(directory, k: int, mutated: bytes, tensors_only: bool = False) -> None:
    path = directory / "m.st"
    path.write_bytes(mutated)
    for load in (load_state, read_metadata,
                 MambaModelState.load if isinstance(_SOURCES[k], MambaModelState) else MambaInferenceState.load):
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            got = load(path)
        except StateError:
            got = None
        finally:
            elapsed = time.perf_counter() - t0
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert elapsed < TIME_BOUND_S, f"{load.__qualname__} took {elapsed:.2f} s"
        assert peak < MEMORY_BOUND, f"{load.__qualname__} allocated {peak} bytes"
        if got is not None and load is not read_metadata:
            assert _same(got, _SOURCES[k], tensors_only), "a mutated file loaded as another state"


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_raw_mutations_load_the_same_state_or_raise_a_state_error(tmp_path_factory, data):
    k = data.draw(st.integers(0, len(_FILES) - 1))
    _check(tmp_path_factory.getbasetemp(), k, data.draw(raw_mutation(_FILES[k])))


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_structural_mutations_load_the_same_state_or_raise_a_state_error(tmp_path_factory, data):
    k = data.draw(st.integers(0, len(_FILES) - 1))
    _check(tmp_path_factory.getbasetemp(), k, data.draw(structural_mutation(_FILES[k])), tensors_only=True)
