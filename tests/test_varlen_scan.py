"""Packed variable-length sequences in the selective scan (``cu_seqlens``), on the CPU.

The oracle is independent of the packing code: every sequence run on its own through the non-packed float64
reference (:func:`selective_scan_ref` without ``cu_seqlens``), from its own initial state. Each path (the packed
reference, the chunked CPU path, the Triton kernels under the interpreter in all four schedules) must give the
same outputs, final states and gradients of every input, the initial states included.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_state.errors import StateError, StateShapeError
from mamba_state.kernels import selective_scan_fn
from mamba_state.reference import selective_scan_chunked, selective_scan_ref

DIM, DSTATE = 8, 4
FLOATS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def _inputs(lens, seed=0, groups=1, reset_p=0.1, dtype=torch.float32):
    """Fresh random packed inputs (batch 1) for sequences of ``lens`` tokens."""
    g = torch.Generator().manual_seed(seed)
    L, n = sum(lens), len(lens)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc = (1, groups, DSTATE, L) if groups > 1 else (1, DSTATE, L)
    inp = dict(u=r(1, DIM, L), delta=0.5 * r(1, DIM, L) - 1.0, A=-torch.exp(0.5 * r(DIM, DSTATE)), B=r(*bc),
               C=r(*bc), D=r(DIM), z=r(1, DIM, L), delta_bias=0.1 * r(DIM), initial_state=r(n, DIM, DSTATE))
    inp = {k: v.to(dtype) for k, v in inp.items()}
    reset = torch.rand(1, L, generator=g) < reset_p
    return inp, reset


def _separately(inp, reset, lens):
    """The oracle: each sequence alone through the non-packed float64 reference. Returns (out, last)."""
    cu = _cu(lens).tolist()
    outs, lasts = [], []
    for s in range(len(lens)):
        a, b = cu[s], cu[s + 1]
        if a == b:
            lasts.append(inp["initial_state"][s])
            continue
        part = {k: (v[..., a:b] if k in ("u", "delta", "z", "B", "C") else v) for k, v in inp.items()}
        part["initial_state"] = inp["initial_state"][s:s + 1]
        o, last = selective_scan_ref(**part, delta_softplus=True, return_last_state=True, reset=reset[:, a:b])
        outs.append(o)
        lasts.append(last[0])
    return torch.cat(outs, dim=-1), torch.stack(lasts)


def _leaves(inp, dtype):
    return {k: v.detach().to(dtype).requires_grad_() for k, v in inp.items()}


def _check_path(fn, lens, seed=0, groups=1, tol=1e-5, gtol=1e-4):
    """``fn(**inputs, reset=, cu_seqlens=)`` against the oracle: outputs, final states, every gradient."""
    inp, reset = _inputs(lens, seed, groups)
    ours, ref = _leaves(inp, torch.float32), _leaves(inp, torch.float64)
    out, last = fn(**ours, reset=reset, cu_seqlens=_cu(lens))
    rout, rlast = _separately(ref, reset, lens)
    assert out.shape == rout.shape and last.shape == (len(lens), DIM, DSTATE)
    # float32 arithmetic against float64 on the same inputs (|a_t| <= 1: errors do not grow along the sequence)
    scale = rout.abs().max().item()
    assert (out.double() - rout).abs().max().item() <= tol * max(1.0, scale)
    assert (last.double() - rlast).abs().max().item() <= tol * max(1.0, rlast.abs().max().item())
    g = torch.Generator().manual_seed(seed + 1)
    gout, glast = torch.randn(rout.shape, generator=g), torch.randn(rlast.shape, generator=g)
    torch.autograd.backward([out, last], [gout.to(out.dtype), glast.float()])
    torch.autograd.backward([rout, rlast], [gout.double(), glast.double()])
    for k in FLOATS:
        want = ref[k].grad
        got = ours[k].grad
        assert got is not None and torch.isfinite(got).all(), k
        # gradients sum up to L * dim float32 terms: relative to the largest entry
        assert (got.double() - want).abs().max().item() <= gtol * max(1e-3, want.abs().max().item()), k


LENS = [3, 0, 13, 1, 20, 0, 9]  # empty sequences first, inside and last, a single-token one, chunk-crossing ones


def _packed_ref(**kw):
    return selective_scan_ref(**kw, delta_softplus=True, return_last_state=True)


def _packed_chunked(**kw):
    return selective_scan_chunked(**kw, delta_softplus=True, return_last_state=True, chunk_size=4, block_size=8)


def _packed_triton(**kw):
    return selective_scan_fn(**kw, delta_softplus=True, return_last_state=True, backend="triton", chunk_size=16)


@pytest.mark.parametrize("fn", [_packed_ref, _packed_chunked], ids=["reference", "chunked"])
@pytest.mark.parametrize("groups", [1, 2])
def test_pytorch_paths_match_separate_runs(fn, groups):
    _check_path(fn, LENS, seed=groups, groups=groups)


@pytest.mark.parametrize("seqpar,bwd", [("0", "seq"), ("1", "chunk")])
def test_triton_matches_separate_runs(monkeypatch, seqpar, bwd):
    # the sequential schedules and the chunk-parallel ones (forward: chunk summaries + carry + outputs; backward:
    # local adjoints + reverse carry + gradients), at a chunk of 16 so that sequences cross chunks
    monkeypatch.setenv("MAMBA_STATE_SCAN_SEQPAR", seqpar)
    monkeypatch.setenv("MAMBA_STATE_SCAN_BWD", bwd)
    _check_path(_packed_triton, LENS, seed=3, groups=2)


def test_triton_mixed_schedules(monkeypatch):
    # sequence-parallel forward with the sequential backward (the other mix runs in the test above's pairs)
    monkeypatch.setenv("MAMBA_STATE_SCAN_SEQPAR", "1")
    monkeypatch.setenv("MAMBA_STATE_SCAN_BWD", "seq")
    _check_path(_packed_triton, [17, 1, 0, 30], seed=4)


def test_triton_inference_path_and_no_initial_state():
    # without autograd the launcher calls the kernels directly; without initial_state the sequences start at zero
    inp, reset = _inputs(LENS, seed=5)
    del inp["initial_state"]
    with torch.no_grad():
        out, last = selective_scan_fn(**inp, delta_softplus=True, return_last_state=True, reset=reset,
                                      cu_seqlens=_cu(LENS), backend="triton", chunk_size=8)
    ref = {k: v.double() for k, v in inp.items()}
    rout, rlast = _separately({**ref, "initial_state": torch.zeros(len(LENS), DIM, DSTATE, dtype=torch.float64)},
                              reset, LENS)
    assert torch.allclose(out.double(), rout, rtol=1e-5, atol=1e-5 * rout.abs().max().item())
    assert torch.allclose(last.double(), rlast, rtol=1e-5, atol=1e-5)
    assert (last[1] == 0).all() and (last[5] == 0).all()  # empty sequences keep their (zero) initial state


def test_empty_sequence_returns_its_initial_state_and_gradient():
    inp, reset = _inputs([0, 5, 0], seed=6)
    h0 = inp["initial_state"].clone().requires_grad_()
    out, last = selective_scan_fn(**{**inp, "initial_state": h0}, delta_softplus=True, return_last_state=True,
                                  reset=reset, cu_seqlens=_cu([0, 5, 0]), backend="triton", chunk_size=8)
    assert torch.equal(last[0], h0[0].detach()) and torch.equal(last[2], h0[2].detach())
    glast = torch.randn_like(last)
    torch.autograd.backward([last], [glast])
    assert torch.equal(h0.grad[0], glast[0]) and torch.equal(h0.grad[2], glast[2])


def test_one_sequence_is_the_unpacked_scan():
    # cu_seqlens = [0, L] is the plain scan from initial_state: same values (the packed kernels on one sequence)
    inp, reset = _inputs([37], seed=7)
    kw = dict(delta_softplus=True, return_last_state=True, reset=reset, backend="triton", chunk_size=16)
    with torch.no_grad():
        out, last = selective_scan_fn(**inp, **kw, cu_seqlens=_cu([37]))
        pout, plast = selective_scan_fn(**inp, **kw)
    assert torch.allclose(out, pout, rtol=1e-6, atol=1e-6) and torch.allclose(last, plast, rtol=1e-6, atol=1e-6)


def test_int64_cu_seqlens_and_reference_backend():
    inp, reset = _inputs([4, 6], seed=8)
    out, last = selective_scan_fn(**inp, delta_softplus=True, return_last_state=True, reset=reset,
                                  cu_seqlens=_cu([4, 6]).long(), backend="reference")
    rout, rlast = _separately({k: v.double() for k, v in inp.items()}, reset, [4, 6])
    assert torch.allclose(out.double(), rout, rtol=1e-5, atol=1e-5)
    assert torch.allclose(last.double(), rlast, rtol=1e-5, atol=1e-5)


lengths = st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=5).filter(lambda x: sum(x) > 0)


@given(lens=lengths, seed=st.integers(0, 2**16))
def test_chunked_any_lengths(lens, seed):
    _check_path(_packed_chunked, lens, seed=seed)


@settings(max_examples=6)  # the interpreter: about a second per example
@given(lens=lengths, seed=st.integers(0, 2**16))
def test_triton_any_lengths(lens, seed):
    _check_path(_packed_triton, lens, seed=seed)


# ---------------------------------------------------------------- states at positions per sequence

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_states_at_positions_per_sequence(backend):
    lens = [5, 0, 9, 1]
    positions = [[0, 2, 5], [0], [3, 3, 9], []]
    inp, reset = _inputs(lens, seed=9)
    ours = _leaves(inp, torch.float32)
    out, last, states = selective_scan_fn(**ours, delta_softplus=True, return_last_state=True, reset=reset,
                                          cu_seqlens=_cu(lens), return_states_at=positions, backend=backend,
                                          chunk_size=8)
    assert [tuple(s.shape) for s in states] == [(3, DIM, DSTATE), (1, DIM, DSTATE), (3, DIM, DSTATE),
                                                (0, DIM, DSTATE)]
    rout, rlast = _separately({k: v.double() for k, v in inp.items()}, reset, lens)
    assert torch.allclose(out.double(), rout, rtol=1e-5, atol=1e-5 * rout.abs().max().item())
    assert torch.allclose(last.double(), rlast, rtol=1e-5, atol=1e-5)
    cu = _cu(lens).tolist()
    for s, ps in enumerate(positions):  # each state against the sequence run alone up to p tokens
        for i, p in enumerate(ps):
            if p == 0:
                want = inp["initial_state"][s].double()
            else:
                a = cu[s]
                part = {k: (v[..., a:a + p] if k in ("u", "delta", "z", "B", "C") else v).double()
                        for k, v in inp.items()}
                part["initial_state"] = part["initial_state"][s:s + 1]
                want = selective_scan_ref(**part, delta_softplus=True, return_last_state=True,
                                          reset=reset[:, a:a + p])[1][0]
            assert torch.allclose(states[s][i].double(), want, rtol=1e-5, atol=1e-5), (s, p)
    # gradients flow through the returned states into the initial states
    sum(x.sum() for x in states if x.numel()).backward()
    assert ours["initial_state"].grad is not None and ours["initial_state"].grad[0].abs().sum() > 0


def test_states_at_positions_bad_form():
    inp, reset = _inputs([3, 4], seed=10)
    with pytest.raises(StateError, match=r"one list of positions per sequence \(2 lists\), found 3 entries"):
        selective_scan_fn(**inp, cu_seqlens=_cu([3, 4]), return_states_at=[[0], [1], [2]])
    with pytest.raises(StateError, match=r"return_states_at\[0\]: expected a list of ints, found int"):
        selective_scan_fn(**inp, cu_seqlens=_cu([3, 4]), return_states_at=[0, 3])
    with pytest.raises(StateError, match=r"return_states_at\[1\]: expected positions in \[0, 4\]"):
        selective_scan_fn(**inp, cu_seqlens=_cu([3, 4]), return_states_at=[[1], [5]])


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("cu,match", [
    (torch.tensor([0, 5, 3, 9], dtype=torch.int32), r"non-decreasing.*cu_seqlens\[1\] = 5 > cu_seqlens\[2\] = 3"),
    (torch.tensor([1, 4, 9], dtype=torch.int32), "first entry 0, found 1"),
    (torch.tensor([0, 4, 10], dtype=torch.int32), "packed length 9, found 10"),
    (torch.tensor([0, 4, 8], dtype=torch.int32), "packed length 9, found 8"),
    (torch.tensor([0.0, 4.0, 9.0]), "dtype int32 .or int64., found torch.float32"),
    (torch.tensor([9], dtype=torch.int32), r"num_seqs >= 1, found shape \[1\]"),
    ([0, 4, 9], "expected an int32 tensor"),
])
def test_bad_cu_seqlens(cu, match):
    inp, _ = _inputs([4, 5], seed=11)
    before = {k: v.clone() for k, v in inp.items()}
    for backend in ("reference", "triton"):
        with pytest.raises(StateShapeError, match=match):
            selective_scan_fn(**inp, cu_seqlens=cu, return_last_state=True, backend=backend)
    with pytest.raises(StateShapeError, match=match):
        selective_scan_ref(**inp, cu_seqlens=cu)
    assert all(torch.equal(inp[k], before[k]) for k in inp)  # nothing changed


def test_bad_batch_and_state_rows():
    inp, _ = _inputs([4, 5], seed=12)
    two = {k: (torch.cat([v, v]) if k in ("u", "delta", "z", "B", "C") else v) for k, v in inp.items()}
    two["initial_state"] = None
    with pytest.raises(StateShapeError, match="batch 1, found batch 2"):
        selective_scan_fn(**two, cu_seqlens=_cu([4, 5]), backend="triton")
    with pytest.raises(StateShapeError, match=r"initial_state: expected \[num_seqs, dim, dstate\] = \[3, 8, 4\].*"
                                              r"found \[2, 8, 4\]"):
        selective_scan_fn(**inp, cu_seqlens=_cu([4, 5, 0]), backend="triton")
    with pytest.raises(StateShapeError, match="initial_state"):
        selective_scan_chunked(**inp, cu_seqlens=_cu([9]))


def test_packed_triton_call_under_torch_compile_matches_eager():
    """torch.compile (aot_eager: the custom ops' fake implementations trace the packed shapes, the kernels run
    under the interpreter) gives eager's outputs, final states and gradients; the per-sequence state rows and
    ``cu_seqlens`` go through the graph like any input (a graph break at the marks is allowed)."""
    lens = [5, 0, 9, 3]
    inp, reset = _inputs(lens, seed=21)
    cu = _cu(lens)

    def f(u, delta, A, B, C, D, z, delta_bias, initial_state):
        out, last = selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, True, True, initial_state, reset,
                                      backend="triton", cu_seqlens=cu, chunk_size=8)
        return (out * out.detach().sign()).sum() + last.square().sum(), out, last

    eager_in, comp_in = _leaves(inp, torch.float32), _leaves(inp, torch.float32)
    loss_e, out_e, last_e = f(**eager_in)
    loss_e.backward()
    torch._dynamo.reset()
    loss_c, out_c, last_c = torch.compile(f, backend="aot_eager")(**comp_in)
    loss_c.backward()
    assert last_c.shape == (len(lens), DIM, DSTATE)
    out64, last64 = _separately({k: v.double() for k, v in inp.items()}, reset, lens)
    torch.testing.assert_close(out_c.double(), out64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last_c.double(), last64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(last_c, last_e, rtol=1e-6, atol=1e-6)
    for k in FLOATS:
        torch.testing.assert_close(comp_in[k].grad, eager_in[k].grad, rtol=1e-5, atol=1e-5, msg=k)


def _inference_check(lens, seed, groups=1, reset_p=0.1, schedule=None, monkeypatch=None, reset_at=()):
    """The no-grad packed call (each sequence in its own programs, or the packed row's schedule) against the
    float64 oracle, outputs and final states, with initial states and resets (random, plus at ``reset_at``)."""
    if schedule is not None:
        monkeypatch.setenv("MAMBA_STATE_PACKED_FWD", schedule)
    inp, reset = _inputs(lens, seed, groups, reset_p=reset_p)
    reset[0, list(reset_at)] = True
    with torch.no_grad():
        out, last = selective_scan_fn(**inp, delta_softplus=True, return_last_state=True, reset=reset,
                                      cu_seqlens=_cu(lens), backend="triton", chunk_size=8)
    rout, rlast = _separately({k: v.double() for k, v in inp.items()}, reset, lens)
    assert out.shape == rout.shape and last.shape == rlast.shape
    assert (out.double() - rout).abs().max().item() <= 1e-5 * max(1.0, rout.abs().max().item())
    assert (last.double() - rlast).abs().max().item() <= 1e-5 * max(1.0, rlast.abs().max().item())
    empty = [s for s, n in enumerate(lens) if n == 0]
    assert torch.equal(last[empty], inp["initial_state"][empty])  # untouched rows keep their initial state


@pytest.mark.parametrize("schedule", ["sequence", "row"])
def test_inference_schedules_match_separate_runs(monkeypatch, schedule):
    # starts and ends off the 8-step tiles (3, 16, 17, ...), a one-token sequence inside a tile, empty ones, and a
    # reset at a sequence's first step (it clears that sequence's initial state)
    lens = [3, 13, 1, 0, 20, 9, 0, 12]  # starts 0, 3, 16, 17, 17, 37, 46, 46
    _inference_check(lens, seed=11, groups=2, schedule=schedule, monkeypatch=monkeypatch, reset_at=(17, 40))


@settings(max_examples=6)  # the interpreter: about a second per example
@given(lens=lengths, seed=st.integers(0, 2**16), reset_p=st.sampled_from([0.0, 0.2, 0.6]))
def test_inference_by_sequence_any_lengths(lens, seed, reset_p):
    _inference_check(lens, seed, reset_p=reset_p)


def test_segment_table_is_longest_first_and_skips_empty_sequences():
    from mamba_state.kernels.selective_scan.ops import segment_table

    bounds = [0, 3, 3, 13, 14, 24]  # lengths 3, 0, 10, 1, 10
    assert segment_table(bounds) == [2, 3, 13, 4, 14, 24, 0, 0, 3, 3, 13, 14]
    assert segment_table([0, 0, 0]) == []


def test_skewed_lengths_take_fewer_channels_a_program(monkeypatch):
    from mamba_state.kernels.selective_scan.ops import _skewed_block, segment_table

    monkeypatch.delenv("MAMBA_STATE_SCAN_BD", raising=False)
    even = segment_table([0, 100, 200, 300, 400])
    assert _skewed_block(16, even, 1536, 1) == 16  # equal lengths: the batch's own choice
    mild = segment_table([0, 400, 500, 600, 700])  # max / mean = 2.3: 16 * 4 / 2.3 = 28 -> 16
    assert _skewed_block(16, mild, 1536, 1) == 16
    skewed = segment_table([0, 4000, 4100, 4200, 4300, 4400, 4500, 4600, 4700])  # max / mean = 6.4: 10 -> 8
    assert _skewed_block(16, skewed, 1536, 1) == 8
    assert _skewed_block(16, segment_table([0, *range(10**6, 10**6 + 100)]), 1536, 1) == 8  # at least 8
    assert _skewed_block(4, skewed, 1536, 1) == 4  # never more than the batch's choice
    monkeypatch.setenv("MAMBA_STATE_SCAN_BD", "16")
    assert _skewed_block(16, skewed, 1536, 1) == 16  # the override wins


def test_more_sequences_than_the_grid_takes_use_the_row_schedule(monkeypatch):
    # the sequences are the by-sequence kernel's second grid axis (at most 65535 on CUDA): beyond, the row's
    # schedule runs, with the same results
    import mamba_state.kernels.selective_scan.launcher as launcher

    def refuse(*args, **kwargs):
        raise AssertionError("the by-sequence kernel ran for more sequences than its grid takes")

    monkeypatch.setattr(launcher, "MAX_SEQUENCES_BY_SEQUENCE", 3)
    monkeypatch.setattr(launcher, "packed_forward_by_sequence", refuse)
    _inference_check([3, 13, 1, 0, 20], seed=12)
