"""Packed variable-length sequences (``cu_seqlens``) through Mamba-2: the SSD scan (``ssd_scan_ref`` /
``ssd_scan_chunked`` / ``ssd_scan_packed``) and ``StatefulMamba2(x, state=rows, cu_seqlens=cu)``. Packed equals
each sequence run alone from its own state: outputs, final states (and conv windows), gradients of every input,
the initial states included. On the CPU against float64 per-sequence runs; gpu-marked tests run the Triton path
(our conv kernel, upstream's chunk scan) at realistic sizes.

Tolerances: float32 SSD against float64 on the same inputs. An output sums at most ~100 decayed terms of
unit-scale products, computed in float32 by chunks (relative error ~1e-6): 1e-4 absolute and relative leaves a
margin of about 100. float64 packed against float64 per-sequence: the same operations in another order, 1e-10.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mamba_state as ms
from mamba_state.adapters.mamba2 import StatefulMamba2
from mamba_state.errors import StateError, StateShapeError
from mamba_state.kernels.ssd import ssd_scan_chunked, ssd_scan_packed, ssd_scan_ref

F64 = torch.float64


def _cu(lengths: list[int], device="cpu") -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def _ssd_inputs(lengths, h, p, g, n, seed, reset_p=0.1):
    gen = torch.Generator().manual_seed(seed)
    T, N = sum(lengths), len(lengths)

    def r(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, dtype=F64)

    ins = dict(x=r(1, T, h, p), dt=r(1, T, h, scale=0.5), A=-torch.rand(h, generator=gen, dtype=F64) - 0.2,
               B=r(1, T, g, n), C=r(1, T, g, n), D=r(h), z=r(1, T, h, p), dt_bias=r(h, scale=0.3),
               initial_state=r(N, h, p, n))
    reset = torch.rand(1, T, generator=gen) < reset_p
    weights = (r(1, T, h, p), r(N, h, p, n))
    return ins, reset, weights


_GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def _ssd_separately(ins, reset, weights, lengths, dt_limit=(0.0, float("inf"))):
    """The oracle: each sequence alone through the unpacked float64 reference from its own initial state."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in ins.items()}
    ys, finals, pos = [], [], 0
    for i, n in enumerate(lengths):
        h0 = leaves["initial_state"][i:i + 1]
        if n == 0:
            finals.append(h0)
            continue
        sl = slice(pos, pos + n)
        y, f = ssd_scan_ref(leaves["x"][:, sl], leaves["dt"][:, sl], leaves["A"], leaves["B"][:, sl],
                            leaves["C"][:, sl], D=leaves["D"], z=leaves["z"][:, sl], initial_state=h0,
                            reset=reset[:, sl], dt_bias=leaves["dt_bias"], dt_softplus=True, dt_limit=dt_limit,
                            return_final_state=True)
        ys.append(y)
        finals.append(f)
        pos += n
    y = torch.cat(ys, dim=1) if ys else torch.zeros_like(leaves["x"])
    f = torch.cat(finals, dim=0)
    loss = (y * weights[0]).sum() + (f * weights[1]).sum() + sum(t.sum() * 0 for t in leaves.values())
    loss.backward()
    return y.detach(), f.detach(), [leaves[k].grad for k in _GRAD_NAMES]


def _ssd_packed(fn, ins, reset, weights, lengths, dtype=torch.float32, dt_limit=(0.0, float("inf")), **kw):
    leaves = {k: v.detach().to(dtype).clone().requires_grad_(True) for k, v in ins.items()}
    y, f = fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"], z=leaves["z"],
              initial_state=leaves["initial_state"], reset=reset, dt_bias=leaves["dt_bias"], dt_softplus=True,
              dt_limit=dt_limit, return_final_state=True, cu_seqlens=_cu(lengths), **kw)
    loss = ((y.double() * weights[0]).sum() + (f.double() * weights[1]).sum()
            + sum(t.sum() * 0 for t in leaves.values()))
    loss.backward()
    return y.detach().double(), f.detach().double(), [leaves[k].grad.double() for k in _GRAD_NAMES]


def _assert_all_close(got, want, atol, rtol):
    torch.testing.assert_close(got[0], want[0], atol=atol, rtol=rtol, msg=lambda m: f"y: {m}")
    torch.testing.assert_close(got[1], want[1], atol=atol, rtol=rtol, msg=lambda m: f"final state: {m}")
    for name, a, r in zip(_GRAD_NAMES, got[2], want[2]):
        torch.testing.assert_close(a, r, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}")


@given(lengths=st.lists(st.one_of(st.integers(0, 2), st.integers(0, 30)), min_size=1, max_size=5),
       seed=st.integers(0, 2**31 - 1), groups=st.sampled_from([1, 2]), reset_p=st.sampled_from([0.0, 0.2]),
       chunk=st.sampled_from([None, 4]))
def test_ssd_packed_equals_each_sequence_alone(lengths, seed, groups, reset_p, chunk):
    ins, reset, weights = _ssd_inputs(lengths, h=4, p=3, g=groups, n=5, seed=seed, reset_p=reset_p)
    want = _ssd_separately(ins, reset, weights, lengths)
    got = _ssd_packed(ssd_scan_chunked, ins, reset, weights, lengths, chunk_size=chunk)
    _assert_all_close(got, want, atol=1e-4, rtol=1e-4)


def test_ssd_packed_float64_reference_and_dt_limit():
    """float64 through the packed chunked path and the packed reference, with a dt limit (clamped before
    padding, so the padded steps stay no-ops), empty sequences first and last, int64 boundaries."""
    lengths = [0, 7, 1, 0, 12, 0]
    ins, reset, weights = _ssd_inputs(lengths, h=2, p=2, g=1, n=3, seed=4, reset_p=0.15)
    limit = (0.05, 0.6)
    want = _ssd_separately(ins, reset, weights, lengths, dt_limit=limit)
    for fn in (ssd_scan_chunked, ssd_scan_ref, functools.partial(ssd_scan_packed, scan=ssd_scan_chunked)):
        got = _ssd_packed(fn, ins, reset, weights, lengths, dtype=F64, dt_limit=limit)
        _assert_all_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("case", ["decreasing", "last", "float", "batch", "rows"])
def test_ssd_packed_bad_input(case):
    ins, reset, _ = _ssd_inputs([3, 4], h=2, p=2, g=1, n=3, seed=1)
    cu = _cu([3, 4])
    expect = {"decreasing": "non-decreasing", "last": "packed length 7", "float": "int32", "batch": "batch 1",
              "rows": "one state per packed sequence"}[case]
    if case == "decreasing":
        cu = torch.tensor([0, 5, 3, 7], dtype=torch.int32)
        ins["initial_state"] = torch.randn(3, 2, 2, 3, dtype=F64)
    elif case == "last":
        cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    elif case == "float":
        cu = cu.double()
    elif case == "batch":
        for k in ("x", "dt", "B", "C", "z"):
            ins[k] = ins[k].expand(2, *ins[k].shape[1:])
        reset = reset.expand(2, -1)
    elif case == "rows":
        ins["initial_state"] = ins["initial_state"][:1]
    for fn in (ssd_scan_chunked, ssd_scan_ref):
        with pytest.raises(StateShapeError, match=expect):
            fn(**ins, reset=reset, dt_softplus=True, return_final_state=True, cu_seqlens=cu)


# ------------------------------------------------------------------ the layer

LAYER_CONFIGS = {
    "groups2": dict(d_model=16, d_state=8, headdim=4, ngroups=2),
    "mlp_nonorm_hdimD": dict(d_model=16, d_state=4, headdim=8, d_ssm=16, rmsnorm=False, D_has_hdim=True, d_conv=3),
    "gate_first_bias_limit": dict(d_model=24, d_state=6, headdim=6, ngroups=2, norm_before_gate=True, bias=True,
                                  conv_bias=False, dt_limit=(0.01, 0.3), expand=1),
}


def _layer(cfg, seed=0, dtype=F64, device="cpu", backend="reference"):
    torch.manual_seed(seed)
    m = StatefulMamba2.from_config(layer_idx=0, dtype=dtype, device=device, backend=backend, chunk_size=8, **cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # off the structured initialisation (ones, zeros), so every parameter matters
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=F64).to(device=device, dtype=p.dtype))
    return m


def _layer_state(m, n, seed, device="cpu", dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    s = m.new_state(n, device="cpu", dtype=F64)
    return ms.MambaInferenceState(torch.randn(s.conv_state.shape, generator=gen, dtype=F64).to(device, dtype),
                                  (0.5 * torch.randn(s.ssm_state.shape, generator=gen, dtype=F64)).to(device, dtype))


def _run_layer(m, x, state, reset, lengths, packed, weights):
    """(y, new state, grads of x, the conv and ssm rows and every parameter), packed or one call per sequence."""
    m.zero_grad()
    xl = x.detach().clone().requires_grad_(True)
    conv = state.conv_state.detach().clone().requires_grad_(True)
    ssm = state.ssm_state.detach().clone().requires_grad_(True)
    if packed:
        y, new = m(xl, ms.MambaInferenceState(conv, ssm), reset=reset, cu_seqlens=_cu(lengths, x.device))
        new_conv, new_ssm = new.conv_state, new.ssm_state
    else:
        ys, convs, ssms, pos = [], [], [], 0
        for i, n in enumerate(lengths):
            si = ms.MambaInferenceState(conv[i:i + 1], ssm[i:i + 1])
            if n > 0:
                yi, si = m(xl[:, pos:pos + n], si, reset=None if reset is None else reset[:, pos:pos + n])
                ys.append(yi)
            convs.append(si.conv_state)
            ssms.append(si.ssm_state)
            pos += n
        y = torch.cat(ys, dim=1)
        new_conv, new_ssm = torch.cat(convs), torch.cat(ssms)
    gy, gc, gs = weights
    loss = ((y.double() * gy).sum() + (new_conv.double() * gc).sum() + (new_ssm.double() * gs).sum())
    loss.backward()
    grads = [xl.grad, conv.grad, ssm.grad] + [p.grad.clone() for p in m.parameters()]
    return [y.detach(), new_conv.detach(), new_ssm.detach()] + grads


def _weights(m, x, n, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    s = m.new_state(n, device="cpu", dtype=F64)
    return tuple(torch.randn(shape, generator=gen, dtype=F64).to(device)
                 for shape in ((1, x.shape[1], m.d_model), s.conv_state.shape, s.ssm_state.shape))


@pytest.mark.parametrize("name", sorted(LAYER_CONFIGS))
def test_layer_packed_equals_each_sequence_alone(name):
    """float64, reference backend: outputs, new conv windows and SSM states, and the gradients of x, of both
    state rows and of every parameter; sequences of length 0, 1, shorter than d_conv and longer than a chunk,
    resets inside sequences and at a sequence's first token."""
    m = _layer(LAYER_CONFIGS[name])
    lengths = [5, 0, 1, 2, 19, 0, 9]
    T, n = sum(lengths), len(lengths)
    x = torch.randn(1, T, m.d_model, generator=torch.Generator().manual_seed(2), dtype=F64)
    state = _layer_state(m, n, seed=3)
    reset = torch.zeros(1, T, dtype=torch.bool)
    reset[0, [3, 8, 14, 27]] = True  # 8: the first token of the 19-long sequence
    weights = _weights(m, x, n, seed=4)
    got = _run_layer(m, x, state, reset, lengths, True, weights)
    want = _run_layer(m, x, state, reset, lengths, False, weights)
    names = ["y", "conv_state", "ssm_state", "dx", "dconv0", "dssm0"] + [f"d{k}" for k, _ in m.named_parameters()]
    for k, a, r in zip(names, got, want):
        # D stays float32 in a float64 layer (as upstream keeps it): its gradient is a float32 sum
        tol = 1e-10 if a.dtype == F64 else 1e-6
        torch.testing.assert_close(a, r, atol=tol, rtol=tol, msg=lambda msg, k=k: f"{k}: {msg}")


@functools.lru_cache(maxsize=1)
def _float32_and_float64_layers():
    m32 = _layer(LAYER_CONFIGS["groups2"], seed=5, dtype=torch.float32)
    return m32, copy.deepcopy(m32).double()  # the same parameter values, in float64


@given(lengths=st.lists(st.integers(0, 12), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1))
def test_layer_packed_any_lengths_float32(lengths, seed):
    """float32 layer (conv through conv1d/packed.py, SSD chunked) against float64 per-sequence runs of the
    same parameters; no state passed (zeros), the new state in state_dtype (float32)."""
    m32, m64 = _float32_and_float64_layers()
    T = sum(lengths)
    x = torch.randn(1, T, 16, generator=torch.Generator().manual_seed(seed), dtype=F64)
    y, s = m32(x.float(), cu_seqlens=_cu(lengths))
    assert s.batch_size == len(lengths) and s.ssm_state.dtype == torch.float32
    ys, pos = [], 0
    for i, n in enumerate(lengths):
        if n > 0:
            yi, si = m64(x[:, pos:pos + n])
            ys.append(yi)
        else:
            si = m64.new_state(1)
        torch.testing.assert_close(s.ssm_state[i:i + 1].double(), si.ssm_state.double(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(s.conv_state[i:i + 1].double(), si.conv_state.double(), atol=1e-5, rtol=1e-5)
        pos += n
    if ys:
        torch.testing.assert_close(y.double(), torch.cat(ys, 1), atol=1e-4, rtol=1e-4)
    assert y.shape == (1, T, 16)


@pytest.mark.parametrize("case", ["float", "decreasing", "batch", "rows", "reset", "positions"])
def test_layer_packed_bad_input_changes_nothing(case):
    m = _layer(LAYER_CONFIGS["groups2"])
    x = torch.randn(1, 7, 16, dtype=F64)
    cu = _cu([3, 4])
    state = _layer_state(m, 2, seed=1)
    reset = None
    kw = {}
    err, expect = StateShapeError, {"float": "int32", "decreasing": "non-decreasing", "batch": "batch 1",
                                    "rows": "expected 2 rows", "reset": "reset", "positions": "return_states_at"}[case]
    if case == "float":
        cu = cu.float()
    elif case == "decreasing":
        cu = torch.tensor([0, 5, 4, 7], dtype=torch.int32)
        state = _layer_state(m, 3, seed=1)
    elif case == "batch":
        x = x.expand(2, -1, -1)
    elif case == "rows":
        state = _layer_state(m, 3, seed=1)
    elif case == "reset":
        reset = torch.zeros(2, 7, dtype=torch.bool)
    elif case == "positions":
        err, kw = StateError, {"return_states_at": [[1], [2]]}
    before = state.clone()
    with pytest.raises(err, match=expect):
        m(x, state, reset=reset, cu_seqlens=cu, **kw)
    assert state.allclose(before, rtol=0, atol=0)


# ------------------------------------------------------------------ GPU (Triton: our conv, upstream's SSD)

def _gpu_layer(dtype=torch.float32, backend=None):
    # the Mamba-2 130m mixer's shape: d_model 768, d_state 128, headdim 64 (24 heads), chunk 256
    torch.manual_seed(0)
    m = StatefulMamba2.from_config(768, d_state=128, headdim=64, layer_idx=0, device="cuda", dtype=dtype,
                                   backend=backend)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen).to(device="cuda", dtype=p.dtype))
    return m


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.upstream
@pytest.mark.parametrize("with_reset", [False, True])
def test_gpu_layer_packed_matches_each_sequence_alone(upstream, with_reset):
    """16 sessions of 1-700 tokens (and an empty one), each from its own random state, through the Triton path
    packed (our packed conv kernel, upstream's chunk scan over padded rows) against one Triton call per
    sequence: outputs, new states and gradients (x, both state rows, every parameter). float32; relative L2
    error 5e-3, as tests/test_adapters_mamba2.py allows between the Triton and reference paths (upstream's
    kernels use tf32 in their chunk products)."""
    m = _gpu_layer()
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 701, (16,), generator=gen).tolist()
    lengths[4], lengths[9] = 0, 1
    T, n = sum(lengths), len(lengths)
    x = torch.randn(1, T, 768, generator=gen).cuda()
    state = _layer_state(m, n, seed=6, device="cuda", dtype=torch.float32)
    reset = None
    if with_reset:
        reset = torch.rand(1, T, generator=gen) < 0.003
        reset[0, int(_cu(lengths)[2])] = True
        reset = reset.cuda()
    weights = _weights(m, x, n, seed=7, device="cuda")
    got = _run_layer(m, x, state, reset, lengths, True, weights)
    want = _run_layer(m, x, state, reset, lengths, False, weights)
    names = ["y", "conv_state", "ssm_state", "dx", "dconv0", "dssm0"] + [f"d{k}" for k, _ in m.named_parameters()]
    for k, a, r in zip(names, got, want):
        assert _rel(a, r) < 5e-3, k


@pytest.mark.gpu
@pytest.mark.upstream
def test_gpu_layer_packed_triton_matches_reference_path(upstream):
    """The packed Triton path against the packed reference path (our conv1d/packed.py and chunked SSD, in
    float32 on the GPU): independent implementations of the same packed layer, with states and resets."""
    m = _gpu_layer()
    gen = torch.Generator().manual_seed(8)
    lengths = [300, 0, 17, 513, 2, 64]
    T, n = sum(lengths), len(lengths)
    x = torch.randn(1, T, 768, generator=gen).cuda()
    state = _layer_state(m, n, seed=9, device="cuda", dtype=torch.float32)
    reset = (torch.rand(1, T, generator=gen) < 0.005).cuda()
    weights = _weights(m, x, n, seed=10, device="cuda")
    results = {}
    for backend in ("triton", "reference"):
        m.backend = backend
        results[backend] = _run_layer(m, x, state, reset, lengths, True, weights)
    m.backend = None
    for i, (a, r) in enumerate(zip(results["triton"], results["reference"])):
        assert _rel(a, r) < 5e-3, i


@pytest.mark.gpu
@pytest.mark.upstream
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_layer_packed_fresh_prefill_native_path(upstream, dtype):
    """No state passed, no resets, no autograd, no empty sequence: upstream's own packed forward (seq_idx,
    return_varlen_states) serves; it must agree with the padded path (a state of zeros passed explicitly)
    and with one call per sequence. 64 sessions of 16-1024 tokens. bf16: relative L2 error 2e-2 (outputs
    rounded to bf16 in each of the two paths, and the conv input in bf16)."""
    m = _gpu_layer(dtype)
    gen = torch.Generator().manual_seed(11)
    lengths = torch.randint(16, 1025, (64,), generator=gen).tolist()
    T = sum(lengths)
    x = torch.randn(1, T, 768, generator=gen).to("cuda", dtype)
    cu = _cu(lengths, "cuda")
    tol = 5e-3 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        y_native, s_native = m(x, cu_seqlens=cu)
        y_padded, s_padded = m(x, m.new_state(64), cu_seqlens=cu)
        assert _rel(y_native, y_padded) < tol
        assert _rel(s_native.ssm_state, s_padded.ssm_state) < tol
        assert torch.equal(s_native.conv_state, s_padded.conv_state)
        pos = 0
        for i in (0, 17, 63):
            a = int(cu[i])
            yi, si = m(x[:, a:a + lengths[i]])
            assert _rel(y_native[:, a:a + lengths[i]], yi) < tol, i
            assert _rel(s_native.ssm_state[i], si.ssm_state[0]) < tol, i
            pos += 1


def test_lm_of_mamba2_mixers_runs_packed():
    """A StatefulMambaLM of Mamba-2 mixers takes cu_seqlens through the layers' _forward_packed: logits and every
    layer's state row equal each sequence run alone from its own rows (float64, reference backend)."""
    from mamba_state.adapters.lm import StatefulMambaLM

    torch.manual_seed(2)
    cfg = dict(d_model=16, n_layer=2, vocab_size=64, d_intermediate=0, rms_norm=True, fused_add_norm=True,
               residual_in_fp32=True, tie_embeddings=True, pad_vocab_size_multiple=8,
               ssm_cfg={"d_state": 8, "layer": "Mamba2", "headdim": 8, "chunk_size": 4})
    lm = StatefulMambaLM.from_config(cfg).double()
    lengths = [4, 0, 7, 1]
    cu = _cu(lengths)
    ids = torch.randint(0, 64, (1, sum(lengths)), generator=torch.Generator().manual_seed(3))
    state = lm.new_state(len(lengths), dtype=F64)
    gen = torch.Generator().manual_seed(4)
    for i in state.layer_indices:
        state[i].ssm_state.copy_(torch.randn(state[i].ssm_state.shape, generator=gen, dtype=F64))
        state[i].conv_state.copy_(torch.randn(state[i].conv_state.shape, generator=gen, dtype=F64))
    with torch.no_grad():
        logits, new = lm(ids, state, cu_seqlens=cu)
        for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            alone = state.select(slice(s, s + 1))
            if b > a:
                logits_s, alone = lm(ids[:, a:b], alone)
                torch.testing.assert_close(logits[:, a:b], logits_s, atol=1e-10, rtol=1e-10)
            for i in new.layer_indices:
                torch.testing.assert_close(new[i].ssm_state[s:s + 1], alone[i].ssm_state, atol=1e-10, rtol=1e-10)
                torch.testing.assert_close(new[i].conv_state[s:s + 1], alone[i].conv_state, atol=1e-10, rtol=1e-10)


def test_lm_of_mamba2_mixers_refuses_packed_positions_before_running(monkeypatch):
    """States at positions of packed sequences are a Mamba-1 feature: an LM with Mamba-2 mixers refuses them by
    name before any layer runs; without a state (every sequence fresh) the packed forward equals zeros passed."""
    from mamba_state.adapters.lm import StatefulMambaLM
    from mamba_state.adapters.mamba2 import StatefulMamba2
    from mamba_state.errors import StateCompatibilityError

    torch.manual_seed(5)
    cfg = dict(d_model=16, n_layer=2, vocab_size=64, d_intermediate=0, rms_norm=True, fused_add_norm=True,
               residual_in_fp32=True, tie_embeddings=True, pad_vocab_size_multiple=8,
               ssm_cfg={"d_state": 8, "layer": "Mamba2", "headdim": 8, "chunk_size": 4})
    lm = StatefulMambaLM.from_config(cfg).double()
    lengths = [3, 5]
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(6))
    ran = []
    real = StatefulMamba2._forward_packed
    monkeypatch.setattr(StatefulMamba2, "_forward_packed", lambda self, *a, **k: ran.append(1) or real(self, *a, **k))
    with pytest.raises(StateCompatibilityError, match="StatefulMamba2"):
        lm(ids, cu_seqlens=_cu(lengths), return_states_at=[[1], [2]])
    assert not ran
    with torch.no_grad():
        fresh_logits, fresh = lm(ids, cu_seqlens=_cu(lengths))
        zero_logits, zero = lm(ids, lm.new_state(2), cu_seqlens=_cu(lengths))  # the default state dtype
    torch.testing.assert_close(fresh_logits, zero_logits, rtol=0, atol=1e-12)
    for i in fresh.layer_indices:
        torch.testing.assert_close(fresh[i].ssm_state, zero[i].ssm_state, rtol=0, atol=1e-12)
