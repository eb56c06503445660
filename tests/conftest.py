"""Test configuration.

* Hypothesis profiles: ``ci`` (small, derandomized; the default under CI=true) and ``dev`` (larger, random).
  Choose with ``HYPOTHESIS_PROFILE=dev``.
* PyPI's mamba-ssm imports its compiled ``selective_scan_cuda`` unconditionally. On a machine without it we
  register an empty placeholder module here, only for the tests and only when the real import fails, so that
  upstream's pure-Python modules (``Mamba``, ``MambaLMHeadModel``, ``selective_scan_ref``) can serve as oracles.
  The library itself never needs or installs this placeholder.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

from pathlib import Path

# A checkout's root holds kernels/, which installs as mamba_state.kernels. `python -m pytest` puts the root (or
# "") first on sys.path, where kernels/ would stand in for the PyPI package "kernels" that transformers imports
# (5.x: `from kernels import ...` fails on ours). The tests import the installed (editable) mamba_state, so the
# root leaves sys.path, unless mamba_state cannot be found without it (a checkout run without installing).
_ROOT = Path(__file__).resolve().parents[1]
_saved_path = list(sys.path)
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]
if "mamba_state" not in sys.modules and importlib.util.find_spec("mamba_state") is None:
    sys.path[:] = _saved_path

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton kernels run in Triton's interpreter on machines without a GPU. Set before anything imports triton
# kernels (upstream's modules decorate theirs at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=12, derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=100, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def _install_upstream_placeholder() -> bool:
    """Make ``import mamba_ssm`` work without its CUDA extension; True when mamba_ssm is importable."""
    try:
        importlib.import_module("selective_scan_cuda")
    except ImportError:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    try:
        importlib.import_module("mamba_ssm")
        return True
    except Exception:
        return False


UPSTREAM_AVAILABLE = _install_upstream_placeholder()
CUDA_AVAILABLE = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run the gpu-marked tests on a GPU machine)")
    skip_up = pytest.mark.skip(reason="needs upstream mamba-ssm (pip install mamba-state[upstream])")
    for item in items:
        if "gpu" in item.keywords and not CUDA_AVAILABLE:
            item.add_marker(skip_gpu)
        if "upstream" in item.keywords and not UPSTREAM_AVAILABLE:
            item.add_marker(skip_up)


@pytest.fixture
def upstream():
    """The upstream ``mamba_ssm`` package (importable thanks to the placeholder above)."""
    return importlib.import_module("mamba_ssm")


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch CPU thread (small ops on a shared machine run faster without oversubscription)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
