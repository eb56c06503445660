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
