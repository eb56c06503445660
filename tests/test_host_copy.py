"""kernels/_host.py: small host-built tensors reach the device with their values and dtype, and on CUDA without a
host-device synchronisation (checked with torch's sync debug mode, which raises on one)."""

from __future__ import annotations

import pytest
import torch

from mamba_state.kernels._host import host_tensor, to_device


def test_host_tensor_on_the_cpu_keeps_values_and_dtype():
    for dtype in (torch.int32, torch.long):
        t = host_tensor(range(3, 9), dtype, "cpu")
        assert t.dtype == dtype and t.tolist() == [3, 4, 5, 6, 7, 8]
    mask = torch.tensor([True, False, True])
    assert torch.equal(to_device(mask, torch.device("cpu")), mask)


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
