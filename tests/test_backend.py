"""Backend selection: argument, MAMBA_STATE_BACKEND, and why each choice was made."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mamba_state import StateError
from mamba_state.backend import BACKENDS, requested_backend, resolve_backend, triton_usable


def test_requested_backend_argument_env_default(monkeypatch):
    monkeypatch.delenv("MAMBA_STATE_BACKEND", raising=False)
    assert requested_backend() == "auto"
    monkeypatch.setenv("MAMBA_STATE_BACKEND", " Reference ")
    assert requested_backend() == "reference"
    assert requested_backend("TRITON") == "triton"  # the argument wins over the environment
    assert set(BACKENDS) == {"auto", "reference", "triton"}


def test_bad_backend_names_the_source(monkeypatch):
    with pytest.raises(StateError) as exc:
        requested_backend("cuda")
    assert "backend" in str(exc.value) and "'cuda'" in str(exc.value) and "reference" in str(exc.value)
    monkeypatch.setenv("MAMBA_STATE_BACKEND", "fast")
    with pytest.raises(StateError, match="MAMBA_STATE_BACKEND.*'fast'"):
        resolve_backend("cpu")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_answers_are_cached_but_follow_the_environment(monkeypatch):
    """resolve_backend caches its answers (every layer asks), yet a changed environment takes effect at once,
    a bad value is refused every time, and an odd argument gets the named error, not a cache's TypeError."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MAMBA_STATE_BACKEND", "triton")
    assert resolve_backend("cpu") == resolve_backend(torch.device("cpu")) and resolve_backend("cpu")[0] == "triton"
    monkeypatch.setenv("MAMBA_STATE_BACKEND", "reference")
    assert resolve_backend("cpu")[0] == "reference"
    monkeypatch.setenv("MAMBA_STATE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for _ in range(2):
        with pytest.raises(StateError, match="Triton"):
            resolve_backend("cpu")
    monkeypatch.setenv("MAMBA_STATE_BACKEND", "bogus")
    for _ in range(2):
        with pytest.raises(StateError, match="MAMBA_STATE_BACKEND"):
            resolve_backend("cpu")
    with pytest.raises(StateError, match="backend"):
        resolve_backend("cpu", ["triton"])  # type: ignore[arg-type]


def test_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("MAMBA_STATE_BACKEND", raising=False)
    ok, why = triton_usable("cpu")
    assert not ok and ("cpu" in why or "not installed" in why)
    name, why = resolve_backend("cpu")
    assert name == "reference" and why.startswith("auto")
    with pytest.raises(StateError, match="Triton"):
        resolve_backend("cpu", "triton")
    assert resolve_backend("cpu", "reference")[0] == "reference"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_interpreter_makes_triton_usable_but_auto_stays_on_reference_for_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("MAMBA_STATE_BACKEND", raising=False)
    ok, why = triton_usable("cpu")
    assert ok and "TRITON_INTERPRET" in why
    assert resolve_backend("cpu")[0] == "reference"
    name, why = resolve_backend("cpu", "triton")
    assert name == "triton" and "forced" in why
    monkeypatch.setenv("MAMBA_STATE_BACKEND", "triton")
    assert resolve_backend("cpu")[0] == "triton"


def test_cuda_device_without_cuda(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, why = triton_usable("cuda")
    assert not ok and ("CUDA is not available" in why or "not installed" in why)


@pytest.mark.gpu
def test_auto_uses_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("MAMBA_STATE_BACKEND", raising=False)
    name, why = resolve_backend("cuda")
    assert name == "triton" and "CUDA device" in why
