"""Smoke test of an installed mamba-state wheel (run with the virtual environment's Python, outside the checkout).

Checks: the package is imported from the environment's site-packages (not from a checkout or an editable
install); ``mamba_state.kernels`` imports and no top-level ``kernels`` module comes with it; the ``mamba-state``
console script's ``info`` runs; a model state saves and loads bit-identically; the scan runs from a state; a small
LM continues from its state; and, in a CPU-only install, triton was not pulled in (the CPU path does not need it).
Prints ``wheel_smoke: ok`` and exits 0, or raises.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch


def environment() -> str:
    """What decides float32 results on this machine, for failure messages."""
    return (f"torch {torch.__version__}, {platform.machine()}, CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, float32 matmul precision "
            f"{torch.get_float32_matmul_precision()}")


def close_to_float64(what: str, got: torch.Tensor, ref: torch.Tensor, steps: int) -> None:
    """``got`` (float32) within float32's accumulated rounding of ``ref`` (float64), relative to ``ref``'s scale.

    Each step of the recurrence rounds a decayed state plus an input and a readout summed over dstate (8 here):
    a few units of float32's 2**-24 per step, and decays below 1 do not amplify them. ``steps * 16 * 2**-24`` of
    the largest magnitude (2.3e-5 at 24 steps) bounds that with room, is about 200 times what a correct run
    shows here (about 1e-7), and far under a real error (a wrong state is off by O(1))."""
    scale = max(1.0, ref.abs().max().item())
    err = (got.double() - ref).abs().max().item()
    tol = steps * 16 * 2.0 ** -24 * scale
    assert err <= tol, (f"{what}: expected within {tol:.2e} of the float64 reference (largest magnitude "
                        f"{scale:.3g}), found a max error of {err:.3e} on {environment()}")


def main() -> None:
    import mamba_state as ms
    import mamba_state.kernels as kernels

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    for mod in (ms, kernels):
        where = Path(mod.__file__).resolve()
        assert site in where.parents, f"{mod.__name__}: expected a file under {site}, found {where}"
    spec = importlib.util.find_spec("kernels")
    assert spec is None or site not in Path(spec.origin or "").resolve().parents, (
        f"expected no top-level 'kernels' from the wheel, found {spec.origin}"
    )
    print(f"wheel_smoke: mamba_state {ms.__version__} from {Path(ms.__file__).parent}")

    exe = shutil.which("mamba-state", path=os.path.dirname(sys.executable))
    assert exe, f"expected the mamba-state console script next to {sys.executable}, found none"
    info = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, f"mamba-state info: expected exit 0, found {info.returncode}: {info.stderr[-2000:]}"
    print("wheel_smoke: mamba-state info ->", info.stdout.strip().splitlines()[0])

    gen = torch.Generator().manual_seed(0)
    layers = {i: ms.MambaInferenceState(torch.randn(3, 24, 4, generator=gen), torch.randn(3, 24, 8, generator=gen))
              for i in range(2)}
    state = ms.MambaModelState(layers, seqlen_offset=17, metadata={"smoke": True})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.safetensors")
        ms.save_model_state(state, path)
        back = ms.load_model_state(path)
    assert back.seqlen_offset == 17 and back.metadata == {"smoke": True}
    for i in layers:
        for name in ("conv_state", "ssm_state"):
            a, b = getattr(state[i], name), getattr(back[i], name)
            assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), (i, name)
    print("wheel_smoke: save/load round trip bit-identical")

    u, dt = torch.randn(2, 24, 32, generator=gen), torch.rand(2, 24, 32, generator=gen)
    A = -torch.rand(24, 8, generator=gen)
    B, C = torch.randn(2, 8, 32, generator=gen), torch.randn(2, 8, 32, generator=gen)
    h0 = back[0].ssm_state[:2].float()
    y, last = kernels.selective_scan_fn(u, dt, A, B, C, initial_state=h0, return_last_state=True)
    y1, mid = kernels.selective_scan_fn(u[..., :20], dt[..., :20], A, B[..., :20], C[..., :20], initial_state=h0,
                                        return_last_state=True)
    y2, last2 = kernels.selective_scan_fn(u[..., 20:], dt[..., 20:], A, B[..., 20:], C[..., 20:], initial_state=mid,
                                          return_last_state=True)
    # the judge is a float64 run of the sequential reference, not the float32 whole-chunk result: both float32
    # runs must be close to it (a difference between two float32 runs says nothing about which one is off)
    y64, last64 = kernels.selective_scan_fn(u.double(), dt.double(), A.double(), B.double(), C.double(),
                                            initial_state=h0.double(), return_last_state=True, backend="reference")
    rerun = kernels.selective_scan_fn(u, dt, A, B, C, initial_state=h0)
    if not torch.equal(rerun, y):  # not our contract, but the first thing to know when the checks below fail
        print(f"wheel_smoke: WARNING the same float32 scan twice gave different results "
              f"(max difference {(rerun - y).abs().max().item():.3e}) on {environment()}")
    close_to_float64("scan, whole chunk: y", y, y64, steps=24)
    close_to_float64("scan, whole chunk: last state", last, last64, steps=24)
    close_to_float64("scan, 20 + 4 tokens: y", torch.cat([y1, y2], dim=-1), y64, steps=24)
    close_to_float64("scan, 20 + 4 tokens: last state", last2, last64, steps=24)
    print("wheel_smoke: scan continues from a state")

    config = dict(d_model=32, n_layer=2, vocab_size=50)
    lm = ms.StatefulMambaLM.from_config(config)
    lm64 = ms.StatefulMambaLM.from_config(config, dtype=torch.float64, state_dtype=torch.float64)
    lm64.load_state_dict(lm.state_dict())  # the same weights, in float64
    ids = torch.randint(0, 50, (2, 24), generator=gen)
    with torch.no_grad():
        full64, _ = lm64(ids)
        full, _ = lm(ids)
        _, mid_state = lm(ids[:, :10])
        more, _ = lm(ids[:, 10:], state=mid_state)
    close_to_float64("LM, whole chunk: logits", full, full64, steps=24 * 2)
    close_to_float64("LM, 10 + 14 tokens: logits", more, full64[:, 10:], steps=24 * 2)
    print("wheel_smoke: an LM continues from its state")

    if not torch.cuda.is_available():
        spec = importlib.util.find_spec("triton")
        assert spec is None, f"CPU-only install: expected no triton, found one at {spec.origin}"
        print("wheel_smoke: no triton in a CPU-only install")
    print("wheel_smoke: ok")


if __name__ == "__main__":
    main()
