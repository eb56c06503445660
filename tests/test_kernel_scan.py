"""CPU tests of the Triton selective scan (run in Triton's interpreter: conftest sets TRITON_INTERPRET=1).

Every check compares the Triton path (backend='triton', tiny shapes) with ``selective_scan_ref`` run in
float64 on the same (possibly half-rounded) inputs; gradients come from torch.autograd on the float64 reference.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_state.errors import StateError, StateShapeError
from mamba_state.kernels import selective_scan_fn, selective_state_update
from mamba_state.kernels._launch import backward_mode, default_chunk
from mamba_state.reference import selective_scan_ref, selective_state_update_ref

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Output/gradient rounding of each dtype (arithmetic is float32 throughout): a few units of its epsilon.
RTOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _close(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    rtol = RTOL[dtype]
    scale = ref.abs().max().item()
    err = (ours.double() - ref.double()).abs()
    bound = rtol * ref.abs() + rtol * max(scale, 1e-6)
    assert (err <= bound).all(), f"{what}: max excess {(err - bound).max().item():.3g} (scale {scale:.3g})"


def _make(b, d, L, n, groups, dtype, seed, *, init, reset_kind, D, z, bias):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc = (b, n, L) if groups == 0 else (b, groups, n, L)
    inp = dict(u=r(b, d, L).to(dtype), delta=(0.5 * r(b, d, L)).to(dtype), A=-torch.exp(0.5 * r(d, n)),
               B=r(*bc).to(dtype), C=r(*bc).to(dtype))
    inp["D"] = r(d) if D else None
    inp["z"] = r(b, d, L).to(dtype) if z else None
    inp["delta_bias"] = 0.3 * r(d) if bias else None
    inp["initial_state"] = r(b, d, n) if init else None
    if reset_kind == "none":
        inp["reset"] = None
    elif reset_kind == "random":
        inp["reset"] = torch.rand(b, L, generator=g) < 0.25
    elif reset_kind == "first":
        inp["reset"] = torch.zeros(b, L, dtype=torch.bool)
        inp["reset"][:, 0] = True
    else:  # "all"
        inp["reset"] = torch.ones(b, L, dtype=torch.bool)
    return {k: (v.to(DEV) if v is not None else None) for k, v in inp.items()}


@contextmanager
def _env(**kw):
    """Set MAMBA_STATE_SCAN_<key> variables for the duration (None removes one), restoring them after."""
    names = {f"MAMBA_STATE_SCAN_{k}": v for k, v in kw.items()}
    saved = {k: os.environ.get(k) for k in names}
    try:
        for k, v in names.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _leaves(inp, dtype_of_ref=None):
    out = {}
    for k, v in inp.items():
        if v is None or not v.is_floating_point():
            out[k] = v
        else:
            v = v.detach().clone() if dtype_of_ref is None else v.detach().to(dtype_of_ref)
            out[k] = v.requires_grad_()
    return out


@st.composite
def scan_cases(draw):
    b = draw(st.integers(1, 2))
    n = draw(st.integers(1, 8))
    L = draw(st.sampled_from([1, 2, 5, 8, 9, 13, 16, 23, 31, 37, 40]))
    groups = draw(st.sampled_from([0, 1, 2, 3]))
    d = draw(st.integers(1, 8)) if groups in (0, 1) else groups * draw(st.integers(1, 8 // groups))
    return dict(
        b=b, d=d, L=L, n=n, groups=groups, dtype=draw(st.sampled_from(list(DTYPES))), seed=draw(st.integers(0, 999)),
        init=draw(st.booleans()), reset_kind=draw(st.sampled_from(["none", "random", "first", "all"])),
        D=draw(st.booleans()), z=draw(st.booleans()), bias=draw(st.booleans()), softplus=draw(st.booleans()),
        chunk=draw(st.sampled_from([None, 8, 16])), last=draw(st.booleans()), seqpar=draw(st.booleans()),
        bwd=draw(st.sampled_from(["seq", "chunk", "tp"])), split=draw(st.sampled_from([None, 1, 2])),
    )


@settings(max_examples=8)
@given(case=scan_cases())
def test_forward_and_gradients_match_float64_reference(case):
    dtype = DTYPES[case["dtype"]]
    inp = _make(case["b"], case["d"], case["L"], case["n"], case["groups"], dtype, case["seed"], init=case["init"],
                reset_kind=case["reset_kind"], D=case["D"], z=case["z"], bias=case["bias"])
    if not case["softplus"]:  # dt is a step size: without softplus a negative delta makes exp(dt * A) grow, and the
        # exact gradient then leaves fp16's range (seen: -2.1e5 at b1 d7 L31 n2 fp16, found by the dev profile)
        inp["delta"] = inp["delta"].abs()
        if inp["delta_bias"] is not None:  # the step is delta + delta_bias: a negative bias grows it as well (seen:
            # fp16 outputs past 65504 at b2 d6 L37 n8 groups 3, seed 103, found by the dev profile)
            inp["delta_bias"] = inp["delta_bias"].abs()
    ours, ref = _leaves(inp), _leaves(inp, torch.float64)
    kw = dict(delta_softplus=case["softplus"], return_last_state=True)
    # both forward schedules: one program per channel block, or split along the sequence (chunk summaries,
    # a pass over chunk boundaries, then outputs); both backward schedules likewise (sequential walk over the
    # chunks, or chunk-parallel, with 1, 2 or the default number of programs per channel block)
    with _env(SEQPAR="1" if case["seqpar"] else "0"):
        out, last = selective_scan_fn(**ours, **kw, backend="triton", chunk_size=case["chunk"])
    rout, rlast = selective_scan_ref(**ref, **kw)
    assert out.dtype == dtype and out.shape == rout.shape
    assert last.dtype == torch.float32 and last.shape == rlast.shape
    _close(out, rout, dtype, "out")
    _close(last, rlast, torch.float32, "last_state")
    g = torch.Generator().manual_seed(case["seed"] + 1)
    gout = torch.randn(rout.shape, generator=g).to(dtype).to(DEV)
    glast = torch.randn(rlast.shape, generator=g).to(DEV)
    use_last = case["last"]
    with _env(BWD=case["bwd"], BWD_SPLIT=case["split"]):
        torch.autograd.backward([out, last] if use_last else [out], [gout, glast.float()] if use_last else [gout])
    torch.autograd.backward([rout, rlast] if use_last else [rout],
                            [gout.double(), glast.double()] if use_last else [gout.double()])
    for k, v in ours.items():
        if v is None or not v.is_floating_point():
            continue
        assert v.grad is not None and v.grad.dtype == v.dtype and v.grad.shape == v.shape, k
        _close(v.grad, ref[k].grad, v.dtype if v.dtype != torch.float32 else torch.float32, f"grad {k}")


def test_gradient_through_last_state_only_and_continuation():
    inp = _make(2, 4, 19, 3, 0, torch.float32, 7, init=True, reset_kind="random", D=True, z=True, bias=True)
    ours, ref = _leaves(inp), _leaves(inp, torch.float64)
    _, last = selective_scan_fn(**ours, delta_softplus=True, return_last_state=True, backend="triton", chunk_size=8)
    _, rlast = selective_scan_ref(**ref, delta_softplus=True, return_last_state=True)
    last.square().sum().backward()
    rlast.square().sum().backward()
    for k in ("u", "delta", "A", "B", "delta_bias", "initial_state"):
        _close(ours[k].grad, ref[k].grad, torch.float32, f"grad {k}")
    for k in ("C", "D", "z"):  # the last state does not depend on them
        assert ours[k].grad is None or not ours[k].grad.any(), k
    # continuation law: running [0, 11) then [11, 19) from the carried state equals one call
    cut = 11
    full, full_last = selective_scan_fn(**inp, delta_softplus=True, return_last_state=True, backend="triton")
    first = {k: (v[..., :cut] if k in ("u", "delta", "z", "B", "C", "reset") else v) for k, v in inp.items()}
    second = {k: (v[..., cut:] if k in ("u", "delta", "z", "B", "C", "reset") else v) for k, v in inp.items()}
    o1, s1 = selective_scan_fn(**first, delta_softplus=True, return_last_state=True, backend="triton")
    second["initial_state"] = s1
    o2, s2 = selective_scan_fn(**second, delta_softplus=True, return_last_state=True, backend="triton")
    torch.testing.assert_close(torch.cat([o1, o2], -1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, full_last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seqpar", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_reads_strided_bc_and_half_bias_as_they_are(seqpar, dtype):
    """What the adapters pass without autograd: B and C as views of one projection (time stride 1), the dt
    bias in the parameters' (half) dtype; the scan reads them in place and skips the pre-gate output."""
    from mamba_state.kernels.selective_scan.ops import scan_forward

    b, d, L, n, rank = 2, 6, 21, 4, 3
    g = torch.Generator().manual_seed(11)
    x_dbl = torch.randn(b, rank + 2 * n, L, generator=g).to(dtype).to(DEV)
    B, C = x_dbl[:, rank:rank + n], x_dbl[:, rank + n:]
    assert not B.is_contiguous() and B.stride(-1) == 1
    u, delta, z = (torch.randn(b, d, L, generator=g).to(dtype).to(DEV) for _ in range(3))
    A = -torch.exp(0.5 * torch.randn(d, n, generator=g)).to(DEV)
    D = torch.randn(d, generator=g).to(DEV)
    bias = (0.3 * torch.randn(d, generator=g)).to(dtype).to(DEV)
    h0 = torch.randn(b, d, n, generator=g).to(DEV)
    with torch.no_grad(), _env(SEQPAR=seqpar):
        out, last = selective_scan_fn(u, delta, A, B, C, D, z, bias, True, True, h0, backend="triton", chunk_size=8)
        four = (u, delta, A, B.unsqueeze(1), C.unsqueeze(1), D, z, bias, h0, None, True, 8)
        kept = scan_forward(*four)
        skipped = scan_forward(*four, keep_ypre=False)
    ref = [t.double() if t is not None else None for t in (u, delta, A, B, C, D, z, bias, h0)]
    rout, rlast = selective_scan_ref(*ref[:8], delta_softplus=True, return_last_state=True, initial_state=ref[8])
    _close(out, rout, dtype, "out")
    _close(last, rlast, torch.float32, "last_state")
    assert skipped[3].numel() == 0 and kept[3].shape == u.shape  # the pre-gate output, only when kept
    torch.testing.assert_close(skipped[0], kept[0], rtol=0, atol=0)
    torch.testing.assert_close(skipped[1], kept[1], rtol=0, atol=0)


def test_dispatch_reference_and_constant_bc():
    inp = _make(1, 3, 10, 4, 0, torch.float32, 3, init=True, reset_kind="random", D=True, z=False, bias=False)
    ref = selective_scan_ref(**inp, return_last_state=True)
    for backend in ("reference", None):
        if DEV == "cpu":  # auto on CPU tensors: the PyTorch reference path
            out = selective_scan_fn(**inp, return_last_state=True, backend=backend)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    const = dict(inp, B=torch.randn(3, 4, device=DEV), C=torch.randn(3, 4, device=DEV))
    torch.testing.assert_close(selective_scan_fn(**const, backend="triton"), selective_scan_ref(**const),
                               rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_state_errors():
    inp = _make(1, 4, 8, 2, 0, torch.float32, 0, init=False, reset_kind="none", D=False, z=False, bias=False)
    with pytest.raises(StateShapeError, match="initial_state"):
        selective_scan_fn(**dict(inp, initial_state=torch.zeros(1, 4, 3, device=DEV)), backend="triton")
    with pytest.raises(StateShapeError, match="reset"):
        selective_scan_fn(**dict(inp, reset=torch.zeros(1, 8, device=DEV)), backend="triton")
    with pytest.raises(StateError, match="chunk_size"):
        selective_scan_fn(**inp, backend="triton", chunk_size=12)
    with pytest.raises(StateError, match="backend"):
        selective_scan_fn(**inp, backend="cuda-please")


def test_shape_messages_say_where_the_expectation_comes_from():
    # u [2, 5, 6] and A [5, 2]: dstate 2 comes from A, so a B with dstate 3 is a disagreement with A
    g = torch.Generator().manual_seed(4)
    u, delta = torch.randn(2, 5, 6, generator=g), torch.rand(2, 5, 6, generator=g)
    A = -torch.rand(5, 2, generator=g)
    B, C = torch.randn(2, 2, 6, generator=g), torch.randn(2, 2, 6, generator=g)
    cases = [
        (dict(B=torch.randn(2, 3, 6, generator=g)),
         "B: expected [batch, dstate, seqlen] = [2, 2, 6] (batch 2 and seqlen 6 from u, dstate 2 from A), "
         "found [2, 3, 6]"),
        (dict(C=torch.randn(5, 3, generator=g)), "C: expected [dim, dstate] = [5, 2] (dim 5 from u, dstate 2 from A)"),
        (dict(B=torch.randn(2, 1, 3, 6, generator=g)), "dstate 2 from A"),
        (dict(initial_state=torch.randn(2, 5, 3, generator=g)), "initial_state: expected [batch, dim, dstate] = "
         "[2, 5, 2] (batch and dim from u, dstate 2 from A), found [2, 5, 3]"),
    ]
    for change, message in cases:
        args = dict(dict(u=u, delta=delta, A=A, B=B, C=C), **change)
        for backend in ("reference", "triton"):
            with pytest.raises(StateShapeError) as exc:
                selective_scan_fn(**args, backend=backend)
            assert message in str(exc.value), str(exc.value)


def test_state_update_messages_name_the_state():
    g = torch.Generator().manual_seed(5)
    state = torch.randn(2, 5, 3, generator=g)  # [batch, dim, dstate=3]
    x, dt = torch.randn(2, 5, generator=g), torch.rand(2, 5, generator=g)
    A, B, C = -torch.rand(5, 3, generator=g), torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    before = state.clone()
    cases = [
        (dict(state=torch.randn(2, 5, 4, generator=g)),
         "A: expected [5, 4] (state [2, 5, 4] without its batch), found [5, 3]: A and state disagree"),
        (dict(A=-torch.rand(5, 4, generator=g)), "A: expected [5, 3] (state [2, 5, 3] without its batch), found [5, 4]"),
        (dict(B=torch.randn(2, 4, generator=g)), "(batch and dstate from state [2, 5, 3]), found [2, 4]"),
        (dict(D=torch.randn(4, generator=g)), "D: expected [5] (from state [2, 5, 3]), found [4]"),
        (dict(reset=torch.zeros(3, dtype=torch.bool)), "reset: expected a bool tensor [batch] = [2] (batch from state)"),
    ]
    for change, message in cases:
        args = dict(dict(state=state, x=x, dt=dt, A=A, B=B, C=C), **change)
        with pytest.raises(StateShapeError) as exc:
            selective_state_update(**args)
        assert message in str(exc.value), str(exc.value)
    assert torch.equal(state, before)



@pytest.mark.parametrize("name,dtype", [("state", torch.int64), ("state", torch.bool), ("x", torch.int32),
                                        ("A", torch.int64)])
def test_state_update_refuses_non_floating_tensors(name, dtype):
    """An integer state would be truncated in place: every tensor must be floating, checked before any write."""
    g = torch.Generator().manual_seed(6)
    args = dict(state=torch.randn(2, 5, 3, generator=g) * 4, x=torch.randn(2, 5, generator=g),
                dt=torch.rand(2, 5, generator=g), A=-torch.rand(5, 3, generator=g) * 3,
                B=torch.randn(2, 3, generator=g), C=torch.randn(2, 3, generator=g))
    args[name] = args[name].to(dtype)
    before = args["state"].clone()
    with pytest.raises(StateError) as exc:
        selective_state_update(**args)
    assert f"{name}: expected a floating dtype, found {dtype}" in str(exc.value)
    assert torch.equal(args["state"], before)


def test_default_chunk_is_a_multiple_of_8():
    for L in (1, 7, 40, 2048, 16384, 10**6):
        c = default_chunk(L)
        assert c % 8 == 0 and 8 <= c <= 1024


@settings(max_examples=10)
@given(multihead=st.booleans(), dtype=st.sampled_from(list(DTYPES)), state_dtype=st.sampled_from(["fp32", "bf16"]),
       groups=st.sampled_from([0, 1, 2]), n=st.integers(1, 8), seed=st.integers(0, 999), opts=st.booleans())
def test_state_update_matches_reference(multihead, dtype, state_dtype, groups, n, seed, opts):
    dtype, sdtype = DTYPES[dtype], DTYPES[state_dtype]
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    b = 2
    lead = (b, 4, 3) if multihead else (b, 6)
    inner = lead[1:]
    if multihead and groups == 0:
        groups = 1  # the multi-head form takes [batch, ngroups, dstate]
    if not multihead:
        groups = 0  # the Mamba-1 form takes [batch, dstate] (as upstream and the reference do)
    bc = (b, groups, n) if groups else (b, n)
    # without softplus dt is used as given, so it must be a step size (>= 0): a negative dt times a negative A
    # grows the state by up to exp(20) per step, beyond fp16's range in the output (and in any real model)
    dt = r(*lead) if opts else r(*lead).abs()
    args = dict(x=r(*lead).to(dtype), dt=dt.to(dtype), A=-torch.exp(r(*inner, n)), B=r(*bc).to(dtype),
                C=r(*bc).to(dtype), D=r(*inner) if opts else None, z=r(*lead).to(dtype) if opts else None,
                dt_bias=r(*inner) if opts else None)
    args = {k: (v.to(DEV) if v is not None else None) for k, v in args.items()}
    reset = (torch.rand(b, generator=g) < 0.5).to(DEV) if opts else None
    state = r(*lead, n).to(sdtype).to(DEV)
    s_ours, s_ref = state.clone(), state.double()
    out = selective_state_update(s_ours, **args, dt_softplus=opts, reset=reset, backend="triton")
    rout = selective_state_update_ref(s_ref, **{k: (v.double() if v is not None else None) for k, v in args.items()},
                                      dt_softplus=opts, reset=reset)
    assert out.shape == args["x"].shape and out.dtype == dtype and s_ours.dtype == sdtype
    _close(out, rout, dtype if sdtype == torch.float32 else torch.bfloat16, "step out")
    _close(s_ours, s_ref, sdtype, "state")


def test_fake_implementations_give_the_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    b, d, L, n, c = 2, 6, 13, 3, 8
    inp = _make(b, d, L, n, 2, torch.bfloat16, 1, init=True, reset_kind="random", D=True, z=True, bias=True)
    B4, C4 = inp["B"], inp["C"]
    args = (inp["u"], inp["delta"], inp["A"], B4, C4, inp["D"], inp["z"], inp["delta_bias"], inp["initial_state"],
            inp["reset"], True, c)
    real = torch.ops.mamba_state.scan_fwd(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = torch.ops.mamba_state.scan_fwd(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    for r_, f_ in zip(real, fake):
        assert r_.shape == f_.shape and r_.dtype == f_.dtype
    torch.library.opcheck(torch.ops.mamba_state.scan_fwd.default, args, test_utils=("test_schema", "test_faketensor"))
    assert real[3].shape == inp["u"].shape  # the pre-gate output, kept for the backward when z is given
    bwd_args = (inp["u"], inp["delta"], inp["A"], B4, C4, inp["D"], inp["z"], inp["delta_bias"], inp["reset"], real[2],
                real[3], torch.randn_like(real[0]), torch.randn_like(real[1]), True, c)
    torch.library.opcheck(torch.ops.mamba_state.scan_bwd.default, bwd_args, test_utils=("test_schema", "test_faketensor"))
    state = torch.randn(b, d, n, device=DEV)
    step_args = (state, inp["u"][..., 0], inp["delta"][..., 0], inp["A"], B4[..., 0], C4[..., 0], inp["D"],
                 inp["z"][..., 0], inp["delta_bias"], inp["reset"][:, 0], True)
    torch.library.opcheck(torch.ops.mamba_state.state_update.default, step_args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("n", [1, 17, 256])
def test_dstate_extremes(n):
    inp = _make(1, 3, 9, n, 0, torch.float32, n, init=True, reset_kind="random", D=True, z=True, bias=True)
    ours, ref = _leaves(inp), _leaves(inp, torch.float64)
    out, last = selective_scan_fn(**ours, delta_softplus=True, return_last_state=True, backend="triton")
    rout, rlast = selective_scan_ref(**ref, delta_softplus=True, return_last_state=True)
    _close(out, rout, torch.float32, "out")
    _close(last, rlast, torch.float32, "last_state")
    gout = torch.randn_like(rout)
    torch.autograd.backward([out, last], [gout.float(), torch.ones_like(last)])
    torch.autograd.backward([rout, rlast], [gout, torch.ones_like(rlast)])
    for k in ("u", "delta", "A", "B", "C", "initial_state"):
        _close(ours[k].grad, ref[k].grad, torch.float32, f"grad {k}")


# ------------------------------------------------------------------------------ backward schedules, both forced

def _resets(b, L, where, seed):
    """bool [b, L]: True at the listed steps (those < L) in every row, plus a sparse random pattern."""
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(b, L, generator=g) < 0.1
    for t in where:
        if t < L:
            r[:, t] = True
    return r


# (b, d, L, n, groups, chunk, resets at, init, D/z/bias, dtype): seqlen 1, primes, non-multiples of 8 and of the
# chunk, exact multiples, resets at step 0 and on chunk boundaries (8, 16, 32), grouped B/C, dstate 1 and odd
BWD_CASES = [
    (1, 3, 1, 2, 0, 8, (), True, True, torch.float32),
    (2, 4, 1, 3, 0, 8, (0,), True, True, torch.float32),
    (2, 4, 13, 3, 2, 8, (0, 8), True, True, torch.float32),
    (1, 5, 37, 4, 0, 16, (16, 32), True, False, torch.float32),
    (2, 6, 40, 1, 3, 8, (8, 16, 24, 32), False, True, torch.float32),
    (1, 4, 23, 5, 1, 8, (7, 9), True, True, torch.bfloat16),
    (2, 4, 61, 3, 0, 16, (), True, True, torch.float16),
    (1, 20, 19, 4, 0, 8, (0, 8), True, True, torch.float32),  # 20 channels in one masked block of 32
]


@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: f"b{c[0]}d{c[1]}L{c[2]}n{c[3]}g{c[4]}c{c[5]}{c[9]}"[:40])
def test_both_backward_schedules_match_float64_reference(case):
    b, d, L, n, groups, chunk, where, init, extras, dtype = case
    inp = _make(b, d, L, n, groups, dtype, 11 * L + n, init=init, reset_kind="none", D=extras, z=extras,
                bias=extras)
    inp["reset"] = _resets(b, L, where, L).to(DEV) if where else None
    ref = _leaves(inp, torch.float64)
    rout, rlast = selective_scan_ref(**ref, delta_softplus=True, return_last_state=True)
    g = torch.Generator().manual_seed(L)
    gout = torch.randn(rout.shape, generator=g).to(dtype).to(DEV)
    glast = torch.randn(rlast.shape, generator=g).to(DEV)
    torch.autograd.backward([rout, rlast], [gout.double(), glast.double()])
    grads = {}
    # chunk-parallel with one program per channel block (every chunk in one program, in order), two (strided
    # chunks) and the default; then the sequential walk; each walking its tiles whole (half 0) or as two halves
    # of 4 steps, the state between them recomputed (1) or kept in the scratch (2); and the time-parallel pass
    # (every chunk's gradients by associative scans along time, one state at a time)
    plans = (("chunk", 1, 0), ("chunk", 2, 0), ("chunk", None, 0), ("seq", None, 0), ("seq", None, 1),
             ("seq", None, 2), ("chunk", 2, 2), ("seq", None, 3), ("tp", None, 0))
    for mode, split, half in plans:
        ours = _leaves(inp)
        out, last = selective_scan_fn(**ours, delta_softplus=True, return_last_state=True, backend="triton",
                                      chunk_size=chunk)
        with _env(BWD=mode, BWD_SPLIT=split, BWD_HALF=half):
            torch.autograd.backward([out, last], [gout, glast])
        grads[(mode, split, half)] = {k: v.grad for k, v in ours.items() if v is not None and v.is_floating_point()}
        for k, gr in grads[(mode, split, half)].items():
            assert gr is not None and gr.dtype == inp[k].dtype and gr.shape == inp[k].shape, (mode, k)
            _close(gr, ref[k].grad, gr.dtype, f"{mode}/{split}/half {half} grad {k}")
    # the schedules sum the same float32 terms in different orders: they agree to float32 rounding (before the
    # final cast to the input dtype)
    for key, gs in grads.items():
        for k, gr in gs.items():
            _close(gr, grads[("seq", None, 0)][k], gr.dtype, f"{key} vs seq: grad {k}")


def test_chunk_backward_gradient_of_initial_state_only_through_last_state():
    # only last_state carries a gradient: the local adjoints are all zero and the carry pass alone moves the
    # gradient of last_state back to initial_state through every chunk's decay product
    inp = _make(2, 3, 29, 4, 0, torch.float32, 5, init=True, reset_kind="none", D=True, z=True, bias=True)
    ours, ref = _leaves(inp), _leaves(inp, torch.float64)
    _, last = selective_scan_fn(**ours, delta_softplus=True, return_last_state=True, backend="triton", chunk_size=8)
    _, rlast = selective_scan_ref(**ref, delta_softplus=True, return_last_state=True)
    with _env(BWD="chunk", BWD_SPLIT=2):
        last.sum().backward()
    rlast.sum().backward()
    for k in ("u", "delta", "A", "B", "delta_bias", "initial_state"):
        _close(ours[k].grad, ref[k].grad, torch.float32, f"grad {k}")


def test_backward_mode_choice_and_bad_value():
    u = torch.zeros(1, 1, 1)
    with _env(BWD=None):
        assert backward_mode(u, 1, 1536, 16, 64) == "seq"  # auto: CPU tensors never take the chunk schedule
    for mode in ("seq", "chunk", "tp"):
        with _env(BWD=mode):
            assert backward_mode(u, 8, 1536, 16, 1) == mode
    with _env(BWD="parallel"), pytest.raises(StateError, match="MAMBA_STATE_SCAN_BWD.*seq.*chunk.*parallel"):
        backward_mode(u, 1, 8, 16, 4)


def test_register_cap_options():
    from mamba_state.kernels._launch import register_cap

    with _env(BWD_MAXNREG=None, FWD_MAXNREG=None):
        assert register_cap("BWD") == {} and register_cap("FWD") == {}
    with _env(BWD_MAXNREG="168", FWD_MAXNREG="128"):
        assert register_cap("BWD") == {"maxnreg": 168} and register_cap("FWD") == {"maxnreg": 128}
    for bad in ("12", "300", "many"):
        with _env(BWD_MAXNREG=bad), pytest.raises(StateError, match="MAMBA_STATE_SCAN_BWD_MAXNREG.*24, 255"):
            register_cap("BWD")


def test_chunk_backward_split_plan():
    from mamba_state.kernels._launch import _chunk_plan, backward_splits

    resident = 8 * 132  # an H100: 132 SMs, 8 resident backward programs each
    # (programs, chunks) -> (splits, cost in chunk-times), the rows of docs/kernel.md's table
    assert _chunk_plan(1536, 16, resident) == (2, 24)   # 8x1536x2048
    assert _chunk_plan(2048, 16, resident) == (1, 32)   # 8x2048x2048: no better than sequential (2 x 16)
    assert _chunk_plan(192, 64, resident) == (16, 12)   # 1x1536x16384: against 64 sequential (11 ties, uneven)
    for programs, chunks in ((1, 977), (7, 3), (5000, 40)):
        g, cost = _chunk_plan(programs, chunks, resident)
        assert 1 <= g <= chunks and g * programs <= max(programs, 4 * resident)  # grid at most 4 waves
    with _env(BWD_SPLIT=5):
        assert backward_splits(1, 192, 64, torch.device("cpu")) == 5
    with _env(BWD_SPLIT=500):
        assert backward_splits(1, 192, 64, torch.device("cpu")) == 64  # never more than the chunks
