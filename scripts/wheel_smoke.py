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
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch


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
    torch.testing.assert_close(torch.cat([y1, y2], dim=-1), y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last2, last, rtol=1e-4, atol=1e-4)
    print("wheel_smoke: scan continues from a state")

    lm = ms.StatefulMambaLM.from_config(dict(d_model=32, n_layer=2, vocab_size=50))
    ids = torch.randint(0, 50, (2, 24), generator=gen)
    with torch.no_grad():
        full, _ = lm(ids)
        _, mid_state = lm(ids[:, :10])
        more, _ = lm(ids[:, 10:], state=mid_state)
    torch.testing.assert_close(more, full[:, 10:], rtol=1e-4, atol=1e-4)
    print("wheel_smoke: an LM continues from its state")

    if not torch.cuda.is_available():
        spec = importlib.util.find_spec("triton")
        assert spec is None, f"CPU-only install: expected no triton, found one at {spec.origin}"
        print("wheel_smoke: no triton in a CPU-only install")
    print("wheel_smoke: ok")


if __name__ == "__main__":
    main()
