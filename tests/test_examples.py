"""Every script in examples/ runs to completion (a smoke test, so the examples never rot).

Scripts are found by globbing, so new examples are picked up without editing this file. A script whose source
mentions an ``--out`` option gets ``--out <tmp_path>/out``; every script runs with its working directory in
``tmp_path`` so nothing lands in the checkout. Each script checks its own results (asserts) and must exit 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))
TIMEOUT_S = 300


def test_examples_exist():
    assert SCRIPTS, f"expected example scripts in {EXAMPLES}, found none"


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_example_runs(script: Path, tmp_path: Path):
    cmd = [sys.executable, str(script)]
    if "--out" in script.read_text(encoding="utf-8"):
        cmd += ["--out", str(tmp_path / "out")]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (
        f"{script.name}: expected exit status 0, found {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    )


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_example_help_prints_usage_without_running(script: Path, tmp_path: Path):
    """``--help`` prints a usage line and exits 0 without doing the work (nothing is written)."""
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not any(tmp_path.iterdir()), f"{script.name} --help wrote {sorted(p.name for p in tmp_path.iterdir())}"
