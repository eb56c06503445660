"""GPU tests of StatefulMamba3 against upstream's own Mamba3 (its Triton SISO kernel and its step()), and of the
continuation law on the CUDA path. Upstream's kernels compute in bfloat16, so agreement is measured as a relative
error (norm of the difference over the norm of the reference).

Oracles: upstream's ``Mamba3.forward`` from zero and its ``step()`` loop (through ``InferenceParams``, which needs
its CuTe-DSL step kernel; skipped without it), and our float64 PyTorch reference path on the same weights.
"""

from __future__ import annotations

import pytest
import torch

import mamba_state as ms

pytestmark = [pytest.mark.gpu, pytest.mark.upstream]

DEV = "cuda"


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _upstream_layer(seed=0, d_model=256, d_state=128, headdim=64, outnorm=False, dtype=torch.bfloat16):
    from mamba_ssm.modules.mamba3 import Mamba3

    torch.manual_seed(seed)
    up = Mamba3(d_model, d_state=d_state, headdim=headdim, is_outproj_norm=outnorm, layer_idx=0, chunk_size=64,
                device=DEV, dtype=dtype)
    with torch.no_grad():  # move the biases and norms off their constant init so every term matters
        for name in ("B_bias", "C_bias", "D", "dt_bias"):
            getattr(up, name).add_(0.2 * torch.randn_like(getattr(up, name)))
    return up


def _reference_copy(up):
    """Our float64 PyTorch path on a float64 copy of the same weights."""
    import copy

    return ms.StatefulMamba3(copy.deepcopy(up).double(), state_dtype=torch.float64, backend="reference")


@pytest.mark.parametrize("outnorm", [False, True])
def test_forward_from_zero_matches_upstream(outnorm):
    up = _upstream_layer(outnorm=outnorm)
    ours = ms.StatefulMamba3(up)
    x = torch.randn(4, 512, 256, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        y_up = up(x)
        y, _ = ours(x)
        y_ref, _ = _reference_copy(up)(x.double())
    err_up, err_ref, up_vs_ref = _rel(y, y_up), _rel(y, y_ref), _rel(y_up, y_ref)
    print(f"ours vs upstream {err_up:.2e}, ours vs float64 {err_ref:.2e}, upstream vs float64 {up_vs_ref:.2e}")
    assert err_up < 1e-2
    assert err_ref < 2 * up_vs_ref + 1e-2


def test_continuation_from_a_state_equals_one_call():
    up = _upstream_layer(1)
    ours = ms.StatefulMamba3(up)
    x = torch.randn(2, 1000, 256, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        y, s = ours(x)
        y1, s1 = ours(x[:, :333])
        y2, s2 = ours(x[:, 333:], s1)
        y_ref, s_ref = _reference_copy(up)(x.double())
    print(f"continued vs one call {_rel(torch.cat([y1, y2], 1), y):.2e}, vs float64 {_rel(y2, y_ref[:, 333:]):.2e}")
    assert _rel(torch.cat([y1, y2], 1), y) < 2e-2
    assert _rel(y2, y_ref[:, 333:]) < 3e-2
    assert _rel(s2.ssm_state, s.ssm_state) < 2e-2 and _rel(s2.ssm_state, s_ref.ssm_state) < 3e-2
    assert _rel(s2.v_state, s.v_state) < 1e-2 and _rel(s2.k_state, s_ref.k_state) < 2e-2


def test_resets_inside_the_chunk_match_the_reference():
    up = _upstream_layer(2)
    ours = ms.StatefulMamba3(up)
    x = torch.randn(3, 300, 256, device=DEV, dtype=torch.bfloat16)
    s0 = ours.new_state(3)
    for t in s0.tensors.values():
        t.normal_(std=0.5)
    reset = torch.zeros(3, 300, dtype=torch.bool, device=DEV)
    reset[0, 0] = reset[0, 150] = reset[1, 77] = True
    with torch.no_grad():
        y, s = ours(x, s0, reset=reset)
        y_ref, s_ref = _reference_copy(up)(x.double(), s0.to(dtype=torch.float64), reset=reset)
    print(f"resets: y {_rel(y, y_ref):.2e}, ssm {_rel(s.ssm_state, s_ref.ssm_state):.2e}")
    assert _rel(y, y_ref) < 3e-2 and _rel(s.ssm_state, s_ref.ssm_state) < 3e-2


def test_step_matches_upstream_step_and_one_chunk():
    from mamba_ssm.modules import mamba3 as up_mod
    from mamba_ssm.utils.generation import InferenceParams

    if up_mod.mamba3_step_fn is None:
        pytest.skip("upstream's CuTe-DSL Mamba-3 step kernel is not importable (nvidia-cutlass-dsl, quack-kernels)")
    up = _upstream_layer(3)
    ours = ms.StatefulMamba3(up)
    b, L0, n = 2, 256, 32
    x = torch.randn(b, L0 + n, 256, device=DEV, dtype=torch.bfloat16)
    params = InferenceParams(max_seqlen=L0 + n, max_batch_size=b)
    with torch.no_grad():
        up(x[:, :L0], inference_params=params)  # prefill fills the cache
        cache = params.key_value_memory_dict[0]  # (angle_dt_state, ssm_state, k_state, v_state), updated in place
        # upstream's step() on [batch, d_model] tokens (its forward hands step() the [batch, 1, d_model] input)
        y_up = torch.stack([up.step(x[:, t], *cache)[0] for t in range(L0, L0 + n)], 1)
        _, s = ours(x[:, :L0])
        st, ys = s, []
        for t in range(L0, L0 + n):
            yt, st = ours.step(x[:, t:t + 1], st)
            ys.append(yt)
        y_steps = torch.cat(ys, 1)
        y_chunk, s_chunk = ours(x[:, L0:], s)
    print(f"ours step vs upstream step {_rel(y_steps, y_up):.2e}, ours chunk vs upstream step {_rel(y_chunk, y_up):.2e}")
    assert _rel(y_steps, y_up) < 2e-2 and _rel(y_chunk, y_up) < 3e-2
    up_ssm = params.key_value_memory_dict[0][1]
    assert _rel(s_chunk.ssm_state, up_ssm) < 3e-2


def test_gradients_into_the_initial_state_match_the_reference():
    up = _upstream_layer(4, dtype=torch.float32)
    ours = ms.StatefulMamba3(up)
    ref = _reference_copy(up)
    x = torch.randn(2, 200, 256, device=DEV)
    s0 = ours.new_state(2)
    for t in s0.tensors.values():
        t.normal_(std=0.5)
    grads = []
    for lay, dtype in ((ours, torch.float32), (ref, torch.float64)):
        leaves = {k: t.to(dtype).clone().requires_grad_() for k, t in s0.tensors.items()}
        y, s = lay(x.to(dtype), ms.MambaInferenceState.from_tensors(leaves))
        (y.float().square().mean() + s.ssm_state.float().square().mean()).backward()
        grads.append({k: t.grad for k, t in leaves.items()})
    for k in ("ssm_state", "k_state", "v_state", "angle_dt_state"):
        print(f"grad {k}: {_rel(grads[0][k], grads[1][k]):.2e}")
        assert _rel(grads[0][k], grads[1][k]) < 5e-2, k


def test_lm_of_mamba3_blocks_continues_and_generates():
    """The docs/mamba3.md recipe on the GPU (cuda_graph=False: the graph cache keys on conv_state for now)."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.modules.mamba3 import Mamba3

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=256, n_layer=2, vocab_size=512, ssm_cfg={"layer": "Mamba2"}, rms_norm=True,
                      fused_add_norm=True, residual_in_fp32=True)
    model = MambaLMHeadModel(cfg, device=DEV, dtype=torch.bfloat16)
    for i, block in enumerate(model.backbone.layers):
        block.mixer = Mamba3(256, d_state=128, headdim=64, layer_idx=i, device=DEV, dtype=torch.bfloat16)
    lm = ms.StatefulMambaLM(model)
    ids = torch.randint(0, 512, (2, 300), device=DEV)
    with torch.no_grad():
        logits, s = lm(ids)
        l1, s1 = lm(ids[:, :200])
        l2, _ = lm(ids[:, 200:], s1)
        out = lm.generate(ids[:, :16], max_new_tokens=8, temperature=0, cuda_graph=False)
    print(f"LM continuation vs one call {_rel(torch.cat([l1, l2], 1), logits):.2e}")
    assert _rel(torch.cat([l1, l2], 1), logits) < 2e-2
    assert out.sequences.shape == (2, 24) and out.state[0].kind == "mamba3"
