"""mamba_state.offload: host offload, restore and the pool of parked states.

CPU tests run everywhere (plain copies); tests marked ``gpu`` check the pinned, asynchronous path and its
synchronisation rules on a CUDA device.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mamba_state import MambaInferenceState, MambaModelState, StateError
from mamba_state.offload import HostStatePool, OffloadHandle, offload_state, restore_state
from mamba_state._packing import state_tensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _fill(shape, dtype, gen, device="cpu"):
    t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    flat = t.view(-1)
    flat[0], flat[1], flat[2] = float("nan"), -0.0, float("-inf")
    return t.to(device)


def make_layer(kind, batch, dtype, seed, device="cpu", d_inner=6):
    gen = torch.Generator().manual_seed(seed)
    if kind == "mamba1":
        return MambaInferenceState(_fill((batch, d_inner, 4), dtype, gen, device),
                                   _fill((batch, d_inner, 3), dtype, gen, device))
    if kind == "mamba3":  # nheads 2, headdim 3, d_state 4, 2 angles; angle and ssm in float32 as upstream keeps them
        return MambaInferenceState(ssm_state=_fill((batch, 2, 3, 4), torch.float32, gen, device),
                                   angle_dt_state=_fill((batch, 2, 2), torch.float32, gen, device),
                                   k_state=_fill((batch, 1, 2, 4), dtype, gen, device),
                                   v_state=_fill((batch, 2, 3), dtype, gen, device))
    return MambaInferenceState(_fill((batch, 10, 4), dtype, gen, device), _fill((batch, 2, 3, 2), dtype, gen, device))


def make_model(batch, dtype, seed, device="cpu"):
    return MambaModelState({1: make_layer("mamba1", batch, dtype, seed, device),
                            4: make_layer("mamba2", batch, dtype, seed + 1, device),
                            5: make_layer("mamba1", batch, torch.float32, seed + 2, device, d_inner=5),
                            6: make_layer("mamba3", batch, dtype, seed + 4, device)},
                           seqlen_offset=seed + 3, metadata={"stream": f"s{seed}"})


def make(container, batch, dtype, seed, device="cpu"):
    return make_model(batch, dtype, seed, device) if container == "model" else make_layer(container, batch, dtype,
                                                                                            seed, device)


def same_bits(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    v = _INT_VIEW[a.element_size()]
    return torch.equal(a.detach().cpu().contiguous().view(v), b.detach().cpu().contiguous().view(v))


def assert_same_state(got, want):
    assert type(got) is type(want)
    if isinstance(want, MambaModelState):
        assert got.layer_indices == want.layer_indices
        assert got.seqlen_offset == want.seqlen_offset and got.metadata == want.metadata
    for g, w in zip(state_tensors(got), state_tensors(want), strict=True):
        assert same_bits(g, w)


# ---------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("container", ["mamba1", "mamba2", "mamba3", "model"])
def test_offload_restore_round_trip_cpu(container, dtype):
    state = make(container, 3, dtype, seed=11)
    handle = offload_state(state)
    assert isinstance(handle, OffloadHandle)
    if not torch.cuda.is_available():
        assert handle.ready() and handle.event is None and not handle.pinned
    host = handle.wait()
    assert host is handle.state and host.device == torch.device("cpu")
    assert_same_state(host, state)
    back = restore_state(host, "cpu")
    assert_same_state(back, state)
    # copies, not aliases: writing the source or the restored state leaves the host copy alone
    for t in state_tensors(state) + state_tensors(back):
        t.fill_(7.0)
    assert_same_state(host, make(container, 3, dtype, seed=11))
    assert handle.nbytes >= state.nbytes


@given(batch=st.integers(0, 5), d_inner=st.integers(1, 9), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_offload_round_trip_property(batch, d_inner, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    conv = torch.randn(batch, d_inner, 4, generator=gen).to(dtype)
    ssm = torch.randn(batch, d_inner, 16, generator=gen, dtype=torch.float64).to(dtype)
    state = MambaModelState({0: MambaInferenceState(conv, ssm), 2: MambaInferenceState(conv * 2, ssm - 1)},
                            seqlen_offset=batch, metadata={"k": [1, 2]})
    assert_same_state(restore_state(offload_state(state).wait(), "cpu"), state)


def test_packed_buffer_detection():
    """The single-copy path recognises exactly the packed layout of one allocation."""
    from mamba_state._packing import build_state, state_spec, unpack
    from mamba_state.offload import _packed_buffer

    state = make_model(2, torch.bfloat16, 3)
    spec = state_spec(state)
    buf = torch.zeros(spec.nbytes(), dtype=torch.uint8)
    packed = build_state(spec, unpack(buf, spec.tensor_specs()))
    assert all((t.storage_offset() * t.element_size()) % 64 == 0 for t in state_tensors(packed))
    flat = _packed_buffer(packed)
    assert flat is not None and flat.data_ptr() == buf.data_ptr() and flat.numel() == buf.numel()
    assert _packed_buffer(state) is None
    shifted = build_state(spec, unpack(torch.zeros(spec.nbytes() + 64, dtype=torch.uint8)[64:], spec.tensor_specs()))
    assert _packed_buffer(shifted) is None  # does not start at the allocation's first byte
    host = offload_state(state).wait()
    if not state_tensors(host)[0].is_pinned():  # unpinned: one host tensor each, not views of one buffer
        assert len({t.untyped_storage().data_ptr() for t in state_tensors(host)}) == len(state_tensors(host))


def test_offload_rejects_bad_input():
    with pytest.raises(StateError, match="found dict"):
        offload_state({"conv": 1})
    mixed = MambaModelState({0: make_layer("mamba1", 1, torch.float32, 0),
                             1: make_layer("mamba1", 1, torch.float32, 1).to("meta")})
    with pytest.raises(StateError, match="one device"):
        offload_state(mixed)
    with pytest.raises(StateError, match="torch device"):
        restore_state(make_layer("mamba1", 1, torch.float32, 0), "nowhere")
    with pytest.raises(StateError, match="Stream"):
        offload_state(make_layer("mamba1", 1, torch.float32, 0).to("meta"), stream="side")


def test_pool_park_get_fetch_discard_cpu():
    pool = HostStatePool()
    states = {f"stream-{i}": make(c, 1 + i % 3, d, seed=i)
              for i, (c, d) in enumerate([("mamba1", torch.float32), ("mamba2", torch.bfloat16),
                                          ("model", torch.float16), ("model", torch.float64)])}
    for key, s in states.items():
        pool.park(key, s)
    assert len(pool) == 4 and set(pool.keys()) == set(states) and "stream-2" in pool
    assert pool.nbytes == sum(pool.handle(k).nbytes for k in states) >= sum(s.nbytes for s in states.values())
    for s in states.values():  # the pool holds copies: the caller may reuse its buffers
        for t in state_tensors(s):
            t.zero_()
    originals = {f"stream-{i}": make(c, 1 + i % 3, d, seed=i)
                 for i, (c, d) in enumerate([("mamba1", torch.float32), ("mamba2", torch.bfloat16),
                                             ("model", torch.float16), ("model", torch.float64)])}
    assert_same_state(pool.get("stream-1"), originals["stream-1"])
    assert "stream-1" in pool  # get keeps it parked
    back = pool.fetch("stream-2")
    assert_same_state(back, originals["stream-2"]) and "stream-2" not in pool
    assert back.device == torch.device("cpu")
    pool.discard("stream-0")
    assert sorted(pool) == ["stream-1", "stream-3"]
    pool.wait_all()
    with pytest.raises(StateError, match="expected a parked key"):
        pool.fetch("stream-0")
    with pytest.raises(StateError, match="already parked"):
        pool.park("stream-1", originals["stream-1"])
    pool.park("stream-1", originals["stream-3"], replace=True)
    assert_same_state(pool.fetch("stream-1"), originals["stream-3"])
    with pytest.raises(StateError, match="hashable"):
        pool.park(["list"], originals["stream-1"])
    with pytest.raises(StateError, match="MambaInferenceState or MambaModelState"):
        pool.park("x", "not a state")
    assert len(pool) == 1
    pool.clear()
    assert len(pool) == 0 and pool.nbytes == 0


def test_pool_max_bytes():
    one = make_layer("mamba1", 2, torch.float32, 0)
    size = offload_state(one).nbytes
    pool = HostStatePool(max_bytes=2 * size)
    pool.park(0, one)
    pool.park(1, one)
    with pytest.raises(StateError, match="max_bytes"):
        pool.park(2, one)
    assert sorted(pool) == [0, 1]
    pool.park(1, make_layer("mamba1", 2, torch.float32, 5), replace=True)  # replacing frees its own share
    with pytest.raises(StateError, match="max_bytes"):
        HostStatePool(max_bytes=-1)


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("container", ["mamba1", "mamba2", "mamba3", "model"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_offload_pinned_round_trip(container, dtype):
    state = make(container, 4, dtype, 21, device="cuda")
    handle = offload_state(state)
    assert handle.pinned and handle.event is not None
    assert all(t.is_pinned() for t in state_tensors(handle.state))
    assert len({t.untyped_storage().data_ptr() for t in state_tensors(handle.state)}) == 1
    host = handle.wait()
    assert handle.ready()
    assert_same_state(host, state)
    back = restore_state(host, "cuda")
    assert back.device.type == "cuda"
    torch.cuda.current_stream().synchronize()
    assert_same_state(back, state)
    # the restored state is one allocation: offloading it again takes the single-copy path
    assert len({t.untyped_storage().data_ptr() for t in state_tensors(back)}) == 1
    assert_same_state(offload_state(back).wait(), state)


@pytest.mark.gpu
def test_gpu_offload_waits_for_pending_writes_on_current_stream():
    want = make_model(8, torch.float32, 5, device="cuda")
    state = want.clone().zero_()
    torch.cuda._sleep(50_000_000)  # keep the current stream busy, then write the real values behind it
    for dst, src in zip(state_tensors(state), state_tensors(want)):
        dst.copy_(src)
    handle = offload_state(state)
    assert_same_state(handle.wait(), want)


@pytest.mark.gpu
def test_gpu_source_may_be_written_after_wait_stream_and_freed_at_once():
    want = make_model(8, torch.bfloat16, 6, device="cuda")
    state = want.clone()
    torch.cuda._sleep(50_000_000)
    handle = offload_state(state)
    handle.wait_stream()  # GPU-side: the in-place write below runs after the copy
    state.zero_()
    assert_same_state(handle.wait(), want)

    state = want.clone()
    handle = offload_state(state)
    del state  # record_stream keeps the memory from being reused before the copy
    junk = [torch.full((1 << 20,), 3.0, device="cuda") for _ in range(8)]
    assert_same_state(handle.wait(), want)
    del junk


@pytest.mark.gpu
def test_gpu_restore_on_side_stream_and_pool_fetch():
    want = make_model(4, torch.float16, 7, device="cuda")
    pool = HostStatePool()
    for k in range(16):
        pool.park(k, want)
    side = torch.cuda.Stream()
    got = pool.fetch(3, stream=side)
    torch.cuda.current_stream().wait_stream(side)
    assert_same_state(got, want)
    assert_same_state(pool.fetch(4), want)  # current stream, no host wait
    assert_same_state(pool.fetch(5, device="cpu"), want)
    assert len(pool) == 13
    pool.wait_all()
    assert all(pool.handle(k).ready() for k in pool)
