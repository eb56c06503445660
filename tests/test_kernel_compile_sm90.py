"""The scan's Triton kernels compile for sm_90 (the H100/H200) on this machine, GPU or not: every schedule, with
and without packed-sequence marks (``benchmarks/compile_scan_sm90.py``, run in its own process because the
tests run Triton's interpreter, which accepts code the compiler rejects). Skipped where the Triton wheel brings
no NVIDIA backend (its bundled ptxas)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _has_nvidia_backend() -> bool:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return ptxas.exists()


@pytest.mark.skipif(not _has_nvidia_backend(), reason="this Triton has no NVIDIA backend (ptxas) to compile with")
def test_scan_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a real compile, not a cached one
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_scan_sm90.py")], capture_output=True,
                         text=True, env=env, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert run.stdout.count("ok   ") == 17 and "all compiled" in run.stdout, run.stdout


@pytest.mark.skipif(not _has_nvidia_backend(), reason="this Triton has no NVIDIA backend (ptxas) to compile with")
def test_rl_step_kernels_compile_for_sm90_without_spills(tmp_path):
    """The fused collection step's kernels (``benchmarks/compile_rl_step_sm90.py``) at the RL recipe's policies and
    the environment's options: they compile, and at the recipe's small policies and the default Mamba policy the
    launch plan spills no registers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_rl_step_sm90.py")], capture_output=True,
                         text=True, env=env, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert run.stdout.count("ok   ") == 7, run.stdout
    spills = [line for line in run.stdout.splitlines() if "spills" in line]
    assert len(spills) == 7, run.stdout
    recipe = [line for line in spills if "small" in line or "default policy" in line or "_recall_env" in line]
    assert len(recipe) == 6 and all("spills 0 B stored" in line for line in recipe), run.stdout
