"""Packaging: imports without mamba-ssm, mamba_state.kernels, no top-level `kernels`, the console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


import mamba_state

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args] + (["-c", code] if code else []), capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO.parent)


def test_import_with_mamba_ssm_hidden():
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('mamba_ssm', 'selective_scan_cuda', 'causal_conv1d'):
            raise ImportError('hidden: ' + name)
        return None
sys.meta_path.insert(0, Block())
import torch
import mamba_state as ms
import mamba_state.kernels, mamba_state.reference, mamba_state.io, mamba_state.interop
s = ms.MambaInferenceState(torch.randn(1, 4, 3), torch.randn(1, 4, 2))
assert ms.MambaModelState({0: s}).batch_size == 1
assert not any(m.split('.')[0] == 'mamba_ssm' for m in sys.modules), 'mamba_ssm was imported'
print('ok')
"""
    res = _run(code)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_import_does_not_load_mamba_ssm():
    res = _run("import sys, mamba_state; print(any(m.startswith('mamba_ssm') for m in sys.modules))")
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr[-2000:]


def test_kernels_subpackage():
    import mamba_state.kernels as k

    assert Path(k.__file__).resolve().parent == REPO / "kernels"


def test_no_top_level_kernels_module():
    res = _run("import importlib.util; s = importlib.util.find_spec('kernels'); print(s.origin if s else None)")
    assert res.returncode == 0, res.stderr
    origin = res.stdout.strip()
    if origin != "None":  # another distribution's `kernels` may be installed (transformers 5 pulls one in; the
        # environment may live inside the checkout, as CI's build/ci-venv does); it must not be ours
        assert not Path(origin).resolve().is_relative_to(REPO / "kernels"), origin


def test_version_matches_distribution():
    from importlib.metadata import version

    assert mamba_state.__version__ == version("mamba-state")


def test_cli_info():
    exe = shutil.which("mamba-state")
    cmd = [exe, "info"] if exe else [sys.executable, "-m", "mamba_state.cli", "info"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout.lower()
    for word in ("torch", "triton", "mamba-ssm", "cuda", "backend", "reference"):
        assert word in out, (word, res.stdout)


def test_cli_demo():
    """README's main job, as it runs on a fresh machine (about 40 s here: it trains a tiny model)."""
    res = _run("", "-m", "mamba_state.cli", "demo", timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


def _project_table() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_runtime_requirements_are_bounded_and_minimal():
    """Every runtime requirement has a floor; torch and triton also a ceiling (the first untested minor); the CPU
    install pulls neither triton (1 GB, only the interpreter tests need it) nor einops (imported nowhere)."""
    from packaging.requirements import Requirement

    project = _project_table()
    runtime = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    assert "triton" not in runtime and "einops" not in runtime, sorted(runtime)
    for name, req in runtime.items():
        assert any(s.operator in (">=", "==", "~=") for s in req.specifier), f"{name}: expected a floor, found {req}"
    assert any(s.operator == "<" for s in runtime["torch"].specifier), runtime["torch"]
    extras = project["optional-dependencies"]
    for extra in ("triton", "test"):
        tri = [Requirement(r) for r in extras[extra] if Requirement(r).name == "triton"]
        assert tri and any(s.operator == "<" for s in tri[0].specifier), (extra, extras[extra])
    assert (REPO / "mamba_state" / "py.typed").is_file()


def test_readme_has_the_two_commands_that_ci_runs():
    """README keeps exactly the two set-up commands, and .ci/run reads the test command from README itself."""
    text = (REPO / "README.md").read_text()
    demo = "bash scripts/setup.sh && mamba-state demo"
    tests = "bash scripts/setup.sh && python3 -m pytest -q"
    assert text.count(demo) == 1 and text.count(tests) == 1, "README: expected each set-up command once"
    res = subprocess.run(["awk", "/^# 2\\. set everything up and run the tests/ { getline; print; exit }",
                          str(REPO / "README.md")], capture_output=True, text=True, timeout=30)
    assert res.stdout.strip() == tests, f"expected .ci/run's README extraction to give {tests!r}, found {res.stdout!r}"
    ci = (REPO / ".ci" / "run").read_text()
    assert "README.md" in ci and "-m venv" in ci and "--system-site-packages" not in ci
