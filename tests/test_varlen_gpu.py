"""GPU tests of packed variable-length sequences (``cu_seqlens``): the compiled Triton kernels at realistic sizes.

Oracle: every sequence run alone through ``selective_scan_chunked`` in float64 on the GPU (the non-packed
reference path, same semantics as ``selective_scan_ref``), from its own initial state. Errors are relative L2
norms, as in tests/test_kernel_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from mamba_state.kernels import selective_scan_fn
from mamba_state.reference import selective_scan_chunked

pytestmark = pytest.mark.gpu

DEV = "cuda"
TIME_VARYING = ("u", "delta", "z", "B", "C")


def _lens(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    lens[1], lens[2] = 0, 1  # an empty sequence and a single-token one among them
    return lens


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)


def _inputs(lens, d, n, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    L, ns = sum(lens), len(lens)
    r = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
    inp = dict(u=r(1, d, L).to(dtype), delta=(0.5 * r(1, d, L) - 1.0).to(dtype), A=-torch.exp(0.5 * r(d, n)),
               B=r(1, n, L).to(dtype), C=r(1, n, L).to(dtype), D=r(d), z=r(1, d, L).to(dtype),
               delta_bias=0.1 * r(d), initial_state=r(ns, d, n))
    reset = torch.rand(1, L, device=DEV, generator=g) < 0.002
    return inp, reset


def _separately(inp, reset, lens):
    cu = [0, *torch.tensor(lens).cumsum(0).tolist()]
    outs, lasts = [], []
    for s in range(len(lens)):
        a, b = cu[s], cu[s + 1]
        if a == b:
            lasts.append(inp["initial_state"][s])
            continue
        part = {k: (v[..., a:b] if k in TIME_VARYING else v) for k, v in inp.items()}
        part["initial_state"] = inp["initial_state"][s:s + 1]
        o, last = selective_scan_chunked(**part, delta_softplus=True, return_last_state=True, reset=reset[:, a:b])
        outs.append(o)
        lasts.append(last[0])
    return torch.cat(outs, dim=-1), torch.stack(lasts)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seqpar,bwd", [("0", "seq"), ("1", "chunk"), ("auto", "auto")])
def test_packed_forward_backward_realistic(monkeypatch, dtype, seqpar, bwd):
    if seqpar != "auto":
        monkeypatch.setenv("MAMBA_STATE_SCAN_SEQPAR", seqpar)
    monkeypatch.setenv("MAMBA_STATE_SCAN_BWD", bwd)
    lens = _lens(16, 16, 1024, seed=1)
    d, n = 768, 16
    inp, reset = _inputs(lens, d, n, dtype)
    ours = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    ref = {k: v.detach().double().requires_grad_() for k, v in inp.items()}
    out, last = selective_scan_fn(**ours, delta_softplus=True, return_last_state=True, reset=reset,
                                  cu_seqlens=_cu(lens), backend="triton")
    rout, rlast = _separately(ref, reset, lens)
    assert out.dtype == dtype and last.dtype == torch.float32 and last.shape == (len(lens), d, n)
    # fp32: float32 arithmetic; bf16: the same bf16 inputs, the output rounded to bf16 (2^-8)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _rel(out, rout) < tol and _rel(last, rlast) < 1e-5
    gout, glast = torch.randn_like(rout), torch.randn_like(rlast)
    torch.autograd.backward([out, last], [gout.to(dtype), glast.float()])
    torch.autograd.backward([rout, rlast], [gout.to(dtype).double(), glast])
    for k in ours:
        assert torch.isfinite(ours[k].grad).all(), k
        # float32 accumulation over up to L * dim terms; bf16: the input gradients rounded to bf16
        assert _rel(ours[k].grad, ref[k].grad) < (1e-4 if dtype == torch.float32 else 2e-2), k


@pytest.mark.parametrize("schedule", ["sequence", "row"])
def test_packed_benchmark_shape_forward(monkeypatch, schedule):
    # the benchmark's shape: 64 sessions of 16-4096 tokens, 130m's d_inner 1536, dstate 16, bf16, inference; each
    # sequence in its own programs (the default without a backward) and the packed row's schedule
    monkeypatch.setenv("MAMBA_STATE_PACKED_FWD", schedule)
    lens = _lens(64, 16, 4096, seed=2)
    inp, reset = _inputs(lens, 1536, 16, torch.bfloat16, seed=3)
    with torch.no_grad():
        out, last = selective_scan_fn(**inp, delta_softplus=True, return_last_state=True, reset=reset,
                                      cu_seqlens=_cu(lens))
        rout, rlast = _separately({k: v.double() for k, v in inp.items()}, reset, lens)
    assert _rel(out, rout) < 1e-2 and _rel(last, rlast) < 1e-5


def test_packed_states_at_positions():
    lens = _lens(8, 16, 512, seed=4)
    inp, reset = _inputs(lens, 256, 16, torch.float32, seed=5)
    positions = [[0, n // 2, n] for n in lens]
    with torch.no_grad():
        out, last, states = selective_scan_fn(**inp, delta_softplus=True, return_last_state=True, reset=reset,
                                              cu_seqlens=_cu(lens), return_states_at=positions)
        rout, rlast = _separately({k: v.double() for k, v in inp.items()}, reset, lens)
    assert _rel(out, rout) < 1e-5 and _rel(last, rlast) < 1e-5
    for s in range(len(lens)):
        assert _rel(states[s][2], rlast[s]) < 1e-5 and torch.equal(states[s][0], inp["initial_state"][s])


def test_packed_lm_matches_each_sequence_alone():
    from mamba_state.adapters import StatefulMambaLM

    cfg = dict(d_model=256, n_layer=2, vocab_size=256, ssm_cfg={"d_state": 16}, rms_norm=True, fused_add_norm=True,
               residual_in_fp32=True, pad_vocab_size_multiple=8)
    torch.manual_seed(0)
    lm = StatefulMambaLM.from_config(cfg, device=DEV).eval()
    lens = _lens(6, 8, 300, seed=6)
    ids = torch.randint(0, 256, (1, sum(lens)), device=DEV)
    state = lm.new_state(len(lens))
    with torch.no_grad():
        _, state = lm(torch.randint(0, 256, (len(lens), 17), device=DEV), state=state)  # non-zero states
        logits, new = lm(ids, state=state, cu_seqlens=_cu(lens))
        cu = [0, *torch.tensor(lens).cumsum(0).tolist()]
        for s, n in enumerate(lens):
            if n == 0:
                continue
            ls, ns = lm(ids[:, cu[s]:cu[s + 1]], state=state.select(slice(s, s + 1)))
            assert _rel(logits[:, cu[s]:cu[s + 1]], ls) < 1e-4, s
            for i in new.layer_indices:
                assert _rel(new[i].ssm_state[s:s + 1], ns[i].ssm_state) < 1e-4, (s, i)
                assert _rel(new[i].conv_state[s:s + 1], ns[i].conv_state) < 1e-5, (s, i)
