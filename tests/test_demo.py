"""The demo (README's main job): the real command, its --model path, and a failing check's exit status."""

from __future__ import annotations

import subprocess
import sys

import torch

from mamba_state.adapters import StatefulMambaLM


def _demo(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "mamba_state", "demo", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_demo_default_run_passes_every_check(tmp_path):
    proc = _demo("--save-model", str(tmp_path / "recall"), "--continue-tokens", "128")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "[PASS] chunks == one pass" in out
    assert "[PASS] saved state answers the query" in out
    assert "[PASS] continue in chunks vs token by token" in out
    assert "3/3 checks passed" in out
    # the trained model was written in upstream's format and loads back
    lm = StatefulMambaLM.from_pretrained(tmp_path / "recall")
    assert lm.config["n_layer"] == 1 and (tmp_path / "recall" / "config.json").is_file()


def test_demo_on_a_checkpoint_directory(tmp_path):
    torch.manual_seed(0)
    cfg = dict(d_model=16, n_layer=2, vocab_size=50, d_intermediate=0, ssm_cfg={"d_state": 4}, rms_norm=True,
               fused_add_norm=True, residual_in_fp32=True, tie_embeddings=True, pad_vocab_size_multiple=8)
    StatefulMambaLM.from_config(cfg).save_pretrained(tmp_path / "ckpt")
    proc = _demo("--model", str(tmp_path / "ckpt"), "--stream-tokens", "300", "--continue-tokens", "64")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[PASS] saved state continues in a fresh process" in proc.stdout
    assert "3/3 checks passed" in proc.stdout


def test_demo_exits_nonzero_when_a_check_fails():
    # two training steps cannot teach recall: the saved-state check must fail and the exit status say so
    proc = _demo("--train-steps", "2", "--stream-tokens", "100", "--continue-tokens", "16")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[FAIL] saved state answers the query" in proc.stdout
