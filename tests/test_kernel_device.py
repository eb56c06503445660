"""Triton launches run on the tensors' GPU, not on whichever GPU is current (``kernels/_device.py``)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from mamba_state.kernels._device import launch_device
from state_builders import same_weight_lms


def test_cpu_tensors_need_no_device_switch():
    assert isinstance(launch_device(torch.zeros(2)), contextlib.nullcontext)


def test_switches_only_when_the_tensor_is_on_another_gpu(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda index: entered.append(index) or contextlib.nullcontext())
    on = SimpleNamespace(device=torch.device("cuda", 0))
    other = SimpleNamespace(device=torch.device("cuda", 1))
    assert isinstance(launch_device(on), contextlib.nullcontext) and entered == []
    with launch_device(other):
        pass
    assert entered == [1]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_lm_on_the_second_gpu_while_the_first_is_current():
    """The same weights on cuda:0 and cuda:1 (cuda:0 current): forward, states and the fused decode agree."""
    from mamba_state.generation import generate

    lm0, lm1 = same_weight_lms(64, 64, dict(device="cuda:0"), dict(device="cuda:1"))
    ids = torch.randint(0, 64, (2, 40), device="cuda:0")
    torch.cuda.set_device(0)
    with torch.no_grad():
        l0, s0 = lm0(ids)
        l1, s1 = lm1(ids.to("cuda:1"))
        g0 = generate(lm0, ids, max_new_tokens=8, temperature=0)
        g1 = generate(lm1, ids.to("cuda:1"), max_new_tokens=8, temperature=0)
    torch.testing.assert_close(l1.cpu(), l0.cpu())
    assert s1.to("cpu").allclose(s0.to("cpu"))
    assert torch.equal(g1.sequences.cpu(), g0.sequences.cpu())
