"""StatefulMamba: parameter sharing, upstream agreement, continuation, resets, step, interop, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import mamba_state as ms
from mamba_state.adapters import StatefulMamba
from mamba_state.errors import StateCompatibilityError, StateError, StateShapeError
from mamba_state.state import MambaInferenceState

from _upstream_cpu import upstream_layer_forward_ref, use_upstream_cpu_paths


def _layer(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    layer = StatefulMamba.from_config(layer_idx=0, **kw).to(dtype)
    with torch.no_grad():  # make D, biases and dt varied (the defaults are ones / zeros)
        layer.D.uniform_(-1, 1)
        if layer.conv1d.bias is not None:
            layer.conv1d.bias.uniform_(-0.5, 0.5)
    return layer


def _split_points(draw, L):
    cuts = sorted(draw(st.sets(st.integers(1, L - 1), max_size=min(5, L - 1)))) if L > 1 else []
    return [0] + cuts + [L]


@st.composite
def _case(draw):
    d_model = draw(st.sampled_from([8, 12, 16]))
    kw = dict(d_model=d_model, d_state=draw(st.integers(1, 6)), d_conv=draw(st.integers(2, 4)),
              expand=draw(st.sampled_from([1, 2])), bias=draw(st.booleans()), conv_bias=draw(st.booleans()))
    B, L = draw(st.integers(1, 3)), draw(st.integers(1, 14))
    bounds = _split_points(draw, L)
    reset_p = draw(st.sampled_from([0.0, 0.2]))
    return kw, B, L, bounds, reset_p, draw(st.integers(0, 2**16))


# ---------------------------------------------------------------------------------------------- sharing
@pytest.mark.upstream
@pytest.mark.parametrize("opts", [
    dict(d_model=16, d_state=4),
    dict(d_model=24, d_state=3, d_conv=2, expand=1, dt_rank=5, bias=True, conv_bias=False, dt_init="constant"),
])
def test_from_config_matches_upstream_init(upstream, opts):
    from mamba_ssm.modules.mamba_simple import Mamba

    torch.manual_seed(7)
    up = Mamba(layer_idx=3, **opts)
    torch.manual_seed(7)
    ours = StatefulMamba.from_config(layer_idx=3, **opts)
    a, b = up.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert ours.layer_idx == 3 and ours.d_inner == up.d_inner and ours.dt_rank == up.dt_rank


@pytest.mark.upstream
def test_wrap_shares_parameters_and_leaves_upstream_unchanged(upstream, monkeypatch):
    from mamba_ssm.modules.mamba_simple import Mamba

    use_upstream_cpu_paths(monkeypatch)
    torch.manual_seed(1)
    up = Mamba(16, d_state=4, layer_idx=0)
    before = {k: v.clone() for k, v in up.state_dict(keep_vars=True).items()}
    modules_before = [(n, type(m)) for n, m in up.named_modules()]
    x = torch.randn(2, 1, 16)
    conv, ssm = torch.randn(2, 32, 4), torch.randn(2, 32, 4)
    y_before, _, _ = up.step(x, conv.clone(), ssm.clone())

    ours = StatefulMamba(up)
    ours(torch.randn(2, 9, 16))  # running the adapter must not touch upstream either
    ours.step(torch.randn(2, 16), ours.new_state(2))

    for name, p in ours.named_parameters():  # the very same tensors, same names
        assert p is dict(up.named_parameters())[name]
    assert all(m is not up for m in ours.modules())
    after = up.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [(n, type(m)) for n, m in up.named_modules()] == modules_before
    y_after, _, _ = up.step(x, conv.clone(), ssm.clone())
    assert torch.equal(y_before, y_after)


@pytest.mark.upstream
def test_load_state_dict_both_ways(upstream):
    from mamba_ssm.modules.mamba_simple import Mamba

    up = Mamba(16, d_state=4, bias=True, layer_idx=0)
    ours = StatefulMamba.from_config(16, d_state=4, bias=True, layer_idx=0)
    ours.load_state_dict(up.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), up.state_dict().values()))
    ours2 = StatefulMamba.from_config(16, d_state=4, bias=True)
    up.load_state_dict(ours2.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours2.state_dict().values(), up.state_dict().values()))


# ---------------------------------------------------------------------------------------------- upstream agreement
@pytest.mark.upstream
@pytest.mark.parametrize("opts", [dict(d_model=16, d_state=4), dict(d_model=8, d_state=6, d_conv=3, bias=True, conv_bias=False)])
def test_forward_matches_upstream_reference(upstream, opts):
    from mamba_ssm.modules.mamba_simple import Mamba

    torch.manual_seed(2)
    up = Mamba(layer_idx=0, **opts)
    with torch.no_grad():
        up.D.uniform_(-1, 1)
    x = torch.randn(3, 13, opts["d_model"])
    ref = upstream_layer_forward_ref(up, x)
    y, state = StatefulMamba(up)(x)
    assert y.dtype == torch.float32 and state.ssm_state.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    # the conv state is what upstream's forward stores: the last d_conv conv inputs (in_proj's x half)
    xs = (x @ up.in_proj.weight.t() + (up.in_proj.bias if up.in_proj.bias is not None else 0))[..., : up.d_inner]
    torch.testing.assert_close(state.conv_state, xs[:, -up.d_conv:].transpose(1, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.upstream
def test_step_matches_upstream_step(upstream, monkeypatch):
    from mamba_ssm.modules.mamba_simple import Mamba

    use_upstream_cpu_paths(monkeypatch)
    torch.manual_seed(3)
    up = Mamba(16, d_state=5, layer_idx=0)
    ours = StatefulMamba(up)
    conv, ssm = torch.randn(2, 32, 4), torch.randn(2, 32, 5)
    state = MambaInferenceState(conv.clone(), ssm.clone())
    for _ in range(4):
        x = torch.randn(2, 1, 16)
        y_up, conv, ssm = up.step(x, conv, ssm)
        y, state = ours.step(x, state)
        torch.testing.assert_close(y, y_up, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state.conv_state, conv)
        torch.testing.assert_close(state.ssm_state, ssm, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- laws
@given(_case())
def test_continuation_equals_one_pass(case):
    kw, B, L, bounds, reset_p, seed = case
    layer = _layer(seed % 97, **kw)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, kw["d_model"], generator=g, dtype=torch.float64)
    reset = (torch.rand(B, L, generator=g) < reset_p) if reset_p else None
    start = MambaInferenceState(torch.randn(B, layer.d_inner, layer.d_conv, generator=g, dtype=torch.float64),
                                torch.randn(B, layer.d_inner, layer.d_state, generator=g, dtype=torch.float64))
    y_full, s_full = layer(x, start, reset=reset)
    s, ys = start, []
    for a, b in zip(bounds[:-1], bounds[1:]):  # chunks of any length, 1 and < d_conv included
        y, s = layer(x[:, a:b], s, reset=None if reset is None else reset[:, a:b])
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_full, rtol=1e-9, atol=1e-10)
    assert s.allclose(s_full, rtol=1e-9, atol=1e-10)


@given(_case())
def test_steps_equal_chunk(case):
    kw, B, L, _, reset_p, seed = case
    layer = _layer(seed % 89, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, L, kw["d_model"], generator=g, dtype=torch.float64)
    reset = (torch.rand(B, L, generator=g) < reset_p) if reset_p else None
    s = layer.new_state(B, dtype=torch.float64)  # float64 state: the comparison is exact to rounding
    y_full, s_full = layer(x, s, reset=reset)
    ys = []
    for t in range(L):
        y, s = layer.step(x[:, t], s, reset=None if reset is None else reset[:, t])
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), y_full, rtol=1e-9, atol=1e-10)
    assert s.allclose(s_full, rtol=1e-9, atol=1e-10)


def test_reset_starts_a_fresh_sequence():
    layer = _layer(4, d_model=16, d_state=4, d_conv=4)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 12, 16, generator=g, dtype=torch.float64)
    start = layer.new_state(2, dtype=torch.float64)
    start.ssm_state.normal_(generator=g)
    start.conv_state.normal_(generator=g)
    reset = torch.zeros(2, 12, dtype=torch.bool)
    reset[0, 5] = True
    y, s = layer(x, start, reset=reset)
    y0, s0 = layer(x[:1, 5:], layer.new_state(1, dtype=torch.float64))  # row 0 afresh from token 5
    torch.testing.assert_close(y[:1, 5:], y0, rtol=1e-10, atol=1e-12)
    assert s.select(0).allclose(s0, rtol=1e-10, atol=1e-12)
    y1, _ = layer(x[1:], start.select(1))  # row 1 unaffected
    torch.testing.assert_close(y[1:], y1, rtol=1e-10, atol=1e-12)


def test_state_not_modified_and_fp32_default():
    layer = StatefulMamba.from_config(16, d_state=4, layer_idx=0)
    s0 = layer.new_state(2)
    s0.ssm_state.normal_()
    copy = s0.clone()
    _, s1 = layer(torch.randn(2, 3, 16), s0)
    _, s2 = layer.step(torch.randn(2, 1, 16), s0)
    assert s0.allclose(copy, rtol=0, atol=0)
    assert s1.ssm_state.dtype == s1.conv_state.dtype == torch.float32
    assert s2.ssm_state.dtype == torch.float32
    assert layer.state_layout() == {"kind": "mamba1", "conv_shape": [32, 4], "ssm_shape": [32, 4]}
    from mamba_state.layers import layer_layout

    assert layer_layout(layer) == layer.state_layout()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_no_state_is_a_zero_state(backend, state_dtype):
    """``state=None`` (zeros, not materialised on the fast paths) gives exactly what an explicit zero state
    gives, and the new state comes back in ``state_dtype``; also for chunks shorter than the conv window."""
    layer = StatefulMamba.from_config(8, d_state=4, layer_idx=0, state_dtype=state_dtype, backend=backend)
    x = torch.randn(2, 7, 8)
    for L in (2, 7):
        with torch.no_grad():
            y0, s0 = layer(x[:, :L])
            y1, s1 = layer(x[:, :L], layer.new_state(2))
        torch.testing.assert_close(y0, y1, rtol=0, atol=0)
        assert s0.conv_state.dtype == s0.ssm_state.dtype == state_dtype
        assert s0.allclose(s1, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_parameters(dtype):
    torch.manual_seed(5)
    ref = StatefulMamba.from_config(16, d_state=4, layer_idx=0)
    half = StatefulMamba.from_config(16, d_state=4, layer_idx=0, dtype=dtype)
    half.load_state_dict(ref.state_dict())
    assert half.A_log.dtype == torch.float32 and half.in_proj.weight.dtype == dtype  # as upstream
    x = torch.randn(2, 10, 16)
    y_ref, s_ref = ref(x)
    y, s = half(x.to(dtype))
    assert y.dtype == dtype and s.ssm_state.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref, rtol=5e-2, atol=5e-2)
    # continuation in half precision agrees with one pass within the dtype's rounding
    y1, s1 = half(x[:, :3].to(dtype))
    y2, s2 = half(x[:, 3:].to(dtype), s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1).float(), y.float(), rtol=2e-2, atol=2e-2)


def test_gradients_reach_initial_state_and_parameters():
    layer = _layer(6, d_model=8, d_state=3)
    s = layer.new_state(2, dtype=torch.float64)
    conv = torch.randn_like(s.conv_state, requires_grad=True)
    ssm = torch.randn_like(s.ssm_state, requires_grad=True)
    y, out = layer(torch.randn(2, 5, 8, dtype=torch.float64), MambaInferenceState(conv, ssm))
    (y.square().sum() + out.ssm_state.sum()).backward()
    assert conv.grad is not None and conv.grad.abs().sum() > 0
    assert ssm.grad is not None and ssm.grad.abs().sum() > 0
    assert layer.A_log.grad is not None and layer.in_proj.weight.grad is not None


# ---------------------------------------------------------------------------------------------- interop
@pytest.mark.upstream
def test_interop_both_ways_with_inference_params(upstream, monkeypatch):
    from mamba_ssm.modules.mamba_simple import Mamba
    from mamba_ssm.utils.generation import InferenceParams

    use_upstream_cpu_paths(monkeypatch)
    torch.manual_seed(8)
    up = Mamba(16, d_state=4, layer_idx=0)
    ours = StatefulMamba(up)
    x = torch.randn(2, 9, 16)
    y_full, s_full = ours(x)
    # upstream's own prefill on a CPU: its step() from a zero cache, token by token
    ip = InferenceParams(max_seqlen=16, max_batch_size=2)
    ms.set_inference_state(up, ours.new_state(2), ip)
    ip.seqlen_offset = 1
    with torch.no_grad():
        for t in range(5):
            up(x[:, t:t + 1], inference_params=ip)
    taken = ms.get_inference_state(up, ip)
    y2, s2 = ours(x[:, 5:], taken)  # upstream's state continues in the adapter
    torch.testing.assert_close(y2, y_full[:, 5:], rtol=1e-4, atol=1e-5)
    assert s2.allclose(s_full, rtol=1e-4, atol=1e-5)
    # and an adapter state continues in upstream's step()
    _, s5 = ours(x[:, :5])
    ip2 = InferenceParams(max_seqlen=16, max_batch_size=2)
    ms.set_inference_state(up, s5, ip2)
    ip2.seqlen_offset = 5
    with torch.no_grad():
        ys = [up(x[:, t:t + 1], inference_params=ip2) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(ys, 1), y_full[:, 5:], rtol=1e-4, atol=1e-5)
    assert ms.get_inference_state(up, ip2).allclose(s_full, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_named_errors():
    layer = StatefulMamba.from_config(16, d_state=4, layer_idx=0)
    with pytest.raises(StateShapeError, match="d_model=16"):
        layer(torch.randn(2, 3, 8))
    with pytest.raises(StateShapeError, match="batch size"):
        layer(torch.randn(2, 3, 16), layer.new_state(3))
    other = StatefulMamba.from_config(16, d_state=5)
    with pytest.raises(StateCompatibilityError, match="layout"):
        layer(torch.randn(2, 3, 16), other.new_state(2))
    with pytest.raises(StateShapeError, match="reset"):
        layer(torch.randn(2, 3, 16), reset=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(StateError, match="MambaInferenceState"):
        layer(torch.randn(2, 3, 16), state=(torch.zeros(1), torch.zeros(1)))
    with pytest.raises(StateShapeError, match="x_t"):
        layer.step(torch.randn(2, 2, 16), layer.new_state(2))
    with pytest.raises(StateCompatibilityError, match="Mamba-1"):
        StatefulMamba(torch.nn.Linear(3, 3))
    with pytest.raises(StateError, match="backend"):
        StatefulMamba.from_config(16, backend="fastest")(torch.randn(1, 2, 16))


@pytest.mark.gpu
@pytest.mark.upstream
def test_gpu_matches_upstream_cuda_forward_and_step(upstream):
    from mamba_ssm.modules.mamba_simple import Mamba
    from mamba_ssm.utils.generation import InferenceParams

    torch.manual_seed(9)
    up = Mamba(256, d_state=16, layer_idx=0, device="cuda", dtype=torch.bfloat16)
    ours = StatefulMamba(up)
    x = torch.randn(4, 300, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y_up = up(x)
        y, s = ours(x)
    torch.testing.assert_close(y.float(), y_up.float(), rtol=3e-2, atol=3e-2)
    ip = InferenceParams(max_seqlen=400, max_batch_size=4)
    ms.set_inference_state(up, s, ip)
    ip.seqlen_offset = 300
    x2 = torch.randn(4, 8, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ys = torch.cat([up(x2[:, t:t + 1], inference_params=ip) for t in range(8)], 1)
        y2, _ = ours(x2, s)
    torch.testing.assert_close(y2.float(), ys.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_path_matches_reference_and_continues(dtype):
    torch.manual_seed(10)
    layer = StatefulMamba.from_config(64, d_state=16, layer_idx=0, device="cuda", dtype=dtype)
    ref = StatefulMamba(layer, backend="reference")  # the same parameters through the PyTorch path
    x = torch.randn(3, 200, 64, device="cuda", dtype=dtype)
    reset = torch.rand(3, 200, device="cuda") < 0.02
    y, s = layer(x, reset=reset)
    y_ref, s_ref = ref(x, reset=reset)
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol)
    assert s.allclose(s_ref, rtol=tol, atol=tol)
    y1, s1 = layer(x[:, :3], reset=reset[:, :3])
    y2, s2 = layer(x[:, 3:], s1, reset=reset[:, 3:])
    torch.testing.assert_close(torch.cat([y1, y2], 1).float(), y.float(), rtol=tol, atol=tol)
    assert s2.allclose(s, rtol=tol, atol=tol)
    steps, st = [], s
    x3 = torch.randn(3, 5, 64, device="cuda", dtype=dtype)
    for t in range(5):
        out, st = layer.step(x3[:, t], st)
        steps.append(out)
    y3, _ = layer(x3, s)
    torch.testing.assert_close(torch.stack(steps, 1).float(), y3.float(), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------- forced backend
def test_forced_triton_backend_reaches_the_kernel_on_cpu(monkeypatch):
    """``backend="triton"`` on the adapter runs the Triton scan and step kernels (here in Triton's interpreter),
    never the reference the kernel entry would pick for CPU tensors on its own; the results match the reference
    backend's in float32."""
    import mamba_state.kernels.selective_scan.launcher as ks
    import mamba_state.kernels.state_update.launcher as ku

    def refuse(*args, **kwargs):
        raise AssertionError("the reference path ran although backend='triton' was forced")

    torch.manual_seed(3)
    tri = _layer(seed=3, dtype=torch.float32, d_model=8, d_state=4, backend="triton")
    ref = StatefulMamba(tri, backend="reference")
    x, x_t = torch.randn(2, 11, 8), torch.randn(2, 1, 8)
    reset = torch.zeros(2, 11, dtype=torch.bool)
    reset[1, 6] = True
    with torch.no_grad():
        y_ref, s_ref = ref(x, reset=reset)
        yt_ref, st_ref = ref.step(x_t, s_ref)
        monkeypatch.setattr(ks, "selective_scan_chunked", refuse)
        monkeypatch.setattr(ku, "selective_state_update_ref", refuse)
        y, s = tri(x, reset=reset)
        yt, st_ = tri.step(x_t, s)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    assert s.allclose(s_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(yt, yt_ref, rtol=1e-4, atol=1e-5)
    assert st_.allclose(st_ref, rtol=1e-4, atol=1e-5)
