"""GPU tests of StatefulMamba3 over a MIMO layer against upstream's own Mamba3 (its ``step()``: Triton rotary and
the CuTe-DSL ``mamba3_step_fn``; its TileLang forward where TileLang is importable) and against our float64 path.
Upstream's kernels compute in bfloat16, so agreement is a relative error (norm of the difference over the norm of
the reference).

Run: ``pytest -m gpu tests/test_mamba3_mimo_gpu.py``. Upstream's MIMO layer is built through
``tests/_mamba3_mimo.py`` (a stand-in for its TileLang import during construction only, where TileLang is
missing). Tests needing upstream's CuTe-DSL step or TileLang skip without them; the others need only CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mamba_state as ms
from mamba_state.adapters.mamba3 import _upstream_mimo_scan, _upstream_mimo_step

from _mamba3_mimo import upstream_mimo_mamba3

pytestmark = [pytest.mark.gpu, pytest.mark.upstream]

DEV = "cuda"
D_MODEL, D_STATE, HEADDIM, RANK, CHUNK = 256, 128, 64, 4, 16
B, L, SPLIT, RESET_AT = 2, 128, 40, 70


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def up():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    layer = upstream_mimo_mamba3(D_MODEL, d_state=D_STATE, headdim=HEADDIM, mimo_rank=RANK, chunk_size=CHUNK,
                                 layer_idx=0, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():  # move the constant inits so every term matters
        for name in ("B_bias", "C_bias", "D", "dt_bias", "mimo_x", "mimo_z", "mimo_o"):
            getattr(layer, name).add_(0.2 * torch.randn_like(getattr(layer, name)))
    return layer


@pytest.fixture(scope="module")
def x():
    return torch.randn(B, L, D_MODEL, device=DEV, dtype=torch.bfloat16, generator=torch.Generator(DEV).manual_seed(1))


def _reference(up):
    """Our float64 PyTorch path on a float64 copy of the same weights (on the GPU)."""
    return ms.StatefulMamba3(copy.deepcopy(up).double(), state_dtype=torch.float64, backend="reference")


def test_chunk_from_state_matches_upstream_step_loop(up, x):
    if _upstream_mimo_step() is None:
        pytest.skip("upstream's CuTe-DSL mamba3_step_fn is not importable (nvidia-cutlass-dsl, quack-kernels)")
    ours = ms.StatefulMamba3(up)
    with torch.no_grad():
        _, s = ours(x[:, :SPLIT])
        y, s_end = ours(x[:, SPLIT:], s)
        cache = [s.angle_dt_state.float().clone(), s.ssm_state.float().clone(),
                 s.k_state.to(torch.bfloat16).clone(), s.v_state.to(torch.bfloat16).clone()]
        y_up = torch.stack([up.step(x[:, t], *cache)[0] for t in range(SPLIT, L)], 1)
    assert _rel(y, y_up) < 3e-2
    assert _rel(s_end.ssm_state, cache[1]) < 3e-2 and _rel(s_end.k_state, cache[2]) < 3e-2
    assert _rel(torch.cos(s_end.angle_dt_state), torch.cos(cache[0])) < 1e-2  # upstream's step does not wrap


def test_step_on_cuda_matches_float64_path(up, x):
    ours, ref = ms.StatefulMamba3(up), _reference(up)
    with torch.no_grad():
        _, s = ours(x[:, :SPLIT])
        s64 = s.to(dtype=torch.float64)
        for t in range(SPLIT, SPLIT + 4):
            y, s = ours.step(x[:, t], s)
            y64, s64 = ref.step(x[:, t].double(), s64)
            assert _rel(y, y64) < 3e-2, t
    assert _rel(s.ssm_state, s64.ssm_state) < 3e-2


def test_continuation_and_resets_on_cuda(up, x):
    lay = ms.StatefulMamba3(copy.deepcopy(up).float())
    xf = x.float()
    with torch.no_grad():
        y, s = lay(xf)
        y1, s1 = lay(xf[:, :SPLIT])
        y2, s2 = lay(xf[:, SPLIT:], s1)
        assert _rel(torch.cat([y1, y2], 1), y) < 1e-4 and _rel(s2.ssm_state, s.ssm_state) < 1e-4
        reset = torch.zeros(B, L, dtype=torch.bool, device=DEV)
        reset[0, RESET_AT] = True
        yr, _ = lay(xf, s1, reset=reset)
        yf, _ = lay(xf[:1, RESET_AT:])
        assert _rel(yr[:1, RESET_AT:], yf) < 1e-4


def test_tilelang_prefill_matches_our_path(up, x):
    if _upstream_mimo_scan() is None:
        pytest.skip("TileLang is not importable: upstream's MIMO forward cannot run")
    ours = ms.StatefulMamba3(up)
    with torch.no_grad():
        y_tl, s_tl = ours(x)  # from zero, no gradient: upstream's TileLang kernel
        y, s = ours(x, ours.new_state(B))  # an explicit state: our chunked path
        y_up = up(x)  # upstream's own forward
    assert _rel(y_tl, y) < 3e-2 and _rel(y_up, y) < 3e-2
    for name in ("ssm_state", "k_state", "v_state"):
        assert _rel(s_tl.tensors[name], s.tensors[name]) < 3e-2, name


def test_gradients_into_the_state_on_cuda(up, x):
    lay, ref = ms.StatefulMamba3(copy.deepcopy(up).float()), _reference(up)
    g = torch.Generator(DEV).manual_seed(2)
    s0 = lay.new_state(B)
    for t in s0.tensors.values():
        t.normal_(generator=g)
    grads = []
    for layer, dtype in ((lay, torch.float32), (ref, torch.float64)):
        leaves = {k: t.to(dtype).clone().requires_grad_() for k, t in s0.tensors.items()}
        y, s = layer(x[:, :32].to(dtype), ms.MambaInferenceState.from_tensors(leaves))
        (y.square().sum() + s.ssm_state.sum()).backward()
        grads.append([leaves[k].grad for k in leaves])
    for a, b in zip(*grads):
        assert _rel(a, b) < 1e-3
