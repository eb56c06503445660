"""kernels/_host.py: small host-built tensors reach the device with their values and dtype, and on CUDA without a
host-device synchronisation (checked with torch's sync debug mode, which raises on one)."""

from __future__ import annotations

import pytest
import torch

from mamba_state.kernels import _host
from mamba_state.kernels._host import cached_on_device, host_tensor, to_device


def test_host_tensor_on_the_cpu_keeps_values_and_dtype():
    for dtype in (torch.int32, torch.long):
        t = host_tensor(range(3, 9), dtype, "cpu")
        assert t.dtype == dtype and t.tolist() == [3, 4, 5, 6, 7, 8]
    mask = torch.tensor([True, False, True])
    assert torch.equal(to_device(mask, torch.device("cpu")), mask)


def test_cached_on_device_keeps_nothing_for_the_cpu():
    calls = []

    def build():
        calls.append(1)
        return torch.arange(4)

    a, b = cached_on_device(("k",), build, "cpu"), cached_on_device(("k",), build, "cpu")
    assert a.tolist() == b.tolist() == [0, 1, 2, 3] and len(calls) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cached_on_device_keeps_small_tensors_by_key_and_evicts_the_oldest(monkeypatch):
    monkeypatch.setattr(_host, "_cache", type(_host._cache)())
    monkeypatch.setattr(_host, "CACHE_ENTRIES", 2)
    a = cached_on_device(("a",), lambda: torch.arange(8, dtype=torch.int32), "cuda")
    assert cached_on_device(("a",), lambda: torch.zeros(1), "cuda") is a  # a hit does not build
    assert a.device.type == "cuda" and a.tolist() == list(range(8))
    b = cached_on_device(("b",), lambda: torch.ones(3), "cuda")
    assert b is not a and b.tolist() == [1.0, 1.0, 1.0]
    cached_on_device(("c",), lambda: torch.ones(2), "cuda")  # the third entry evicts "a", the oldest
    assert cached_on_device(("a",), lambda: torch.full((2,), 7), "cuda").tolist() == [7, 7]
    big = lambda: torch.zeros(_host.CACHE_MAX_BYTES // 4 + 1, dtype=torch.int32)  # noqa: E731
    assert cached_on_device(("big",), big, "cuda") is not cached_on_device(("big",), big, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_tensor_to_cuda_does_not_synchronise():
    values = list(range(0, 4000, 7))
    busy = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            busy = busy @ busy  # queued work the copies must not wait for
            t = host_tensor(values, torch.int32, "cuda")
            m = to_device(torch.arange(10) % 3 == 0, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert t.device.type == "cuda" and t.dtype == torch.int32 and t.tolist() == values
    assert m.tolist() == [i % 3 == 0 for i in range(10)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_states_at_positions_do_not_synchronise():
    """A layer's forward with ``return_states_at`` (marks, conv windows, stacked states) and the trace leave the
    host free while the GPU works: no operation in them waits for the device (the batch-8 positions cost on the
    H200 looked like such a wait). Mamba-1 only: Mamba-2's chunked scan is upstream's code. Warm-up first: compiles and first allocations are allowed to synchronise."""
    import mamba_state as ms
    from mamba_state.trace import trace_layer

    torch.manual_seed(0)
    layer = ms.StatefulMamba.from_config(256, d_state=16, layer_idx=0, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(8, 512, 256, device="cuda", dtype=torch.bfloat16)
    s0 = layer.new_state(8)
    reset = torch.rand(8, 512, device="cuda") < 0.01
    eight = [64 * i for i in range(1, 9)]
    calls = [lambda: layer(x, s0, return_states_at=eight), lambda: layer(x, s0, reset=reset, return_states_at=eight),
             lambda: trace_layer(layer, x, s0, stride=64)]
    with torch.no_grad():
        for call in calls:
            call()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for call in calls:
                call()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cached_on_device_keys_by_stream_and_resolved_device(monkeypatch):
    monkeypatch.setattr(_host, "_cache", type(_host._cache)())
    a = cached_on_device(("s",), lambda: torch.arange(4), "cuda")
    assert cached_on_device(("s",), lambda: torch.zeros(1), torch.device("cuda", torch.cuda.current_device())) is a
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # another stream: its own copy, ordered on that stream
        b = cached_on_device(("s",), lambda: torch.arange(4), "cuda")
        assert b is not a and cached_on_device(("s",), lambda: torch.zeros(1), "cuda") is b
    assert cached_on_device(("s",), lambda: torch.zeros(1), "cuda") is a
