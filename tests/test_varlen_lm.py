"""Packed variable-length sequences through the Mamba-1 adapter and the LM (``cu_seqlens``), on the CPU.

Law: running the packed row with one state row per sequence gives, for every sequence, the outputs, the new
state (conv window and SSM state) and the gradients (of the inputs, the parameters and the incoming states)
of running that sequence alone from its own row. The oracle is the unpacked forward of the same module.
"""

from __future__ import annotations

import pytest
import torch

from mamba_state import MambaInferenceState, MambaModelState
from mamba_state.adapters import StatefulMamba, StatefulMambaLM
from mamba_state.errors import StateError, StateShapeError

D_MODEL, D_STATE = 16, 4
LENS = [5, 0, 1, 11, 3]  # an empty sequence, a one-token one (shorter than the conv window), longer ones


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def _layer(dtype, backend, seed=0):
    torch.manual_seed(seed)
    layer = StatefulMamba.from_config(D_MODEL, d_state=D_STATE, backend=backend, dtype=dtype,
                                      state_dtype=dtype)
    with torch.no_grad():
        layer.D.uniform_(0.5, 1.5)
    return layer


def _state(layer, rows, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return MambaInferenceState(torch.randn(rows, layer.d_inner, layer.d_conv, generator=g, dtype=dtype),
                               0.5 * torch.randn(rows, layer.d_inner, layer.d_state, generator=g, dtype=dtype))


def _leaf_state(s):
    return MambaInferenceState(s.conv_state.clone().requires_grad_(), s.ssm_state.clone().requires_grad_())


def _close(a, b, tol):
    scale = max(1e-3, b.abs().max().item())
    return (a.double() - b.double()).abs().max().item() <= tol * scale


CASES = [(torch.float64, "reference", 1e-10), (torch.float32, "triton", 2e-5)]  # float32: one rounding per op


@pytest.mark.parametrize("dtype,backend,tol", CASES, ids=["reference-f64", "triton-f32"])
def test_layer_packed_equals_each_sequence_alone(dtype, backend, tol):
    layer = _layer(dtype, backend)
    L = sum(LENS)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, L, D_MODEL, generator=g, dtype=dtype).requires_grad_()
    reset = torch.rand(1, L, generator=g) < 0.1
    s0 = _leaf_state(_state(layer, len(LENS), dtype, 2))
    y, new = layer(x, state=s0, reset=reset, cu_seqlens=_cu(LENS))
    assert new.batch_size == len(LENS)
    gy = torch.randn(y.shape, generator=g, dtype=dtype)
    gconv = torch.randn(new.conv_state.shape, generator=g, dtype=dtype)
    gssm = torch.randn(new.ssm_state.shape, generator=g, dtype=dtype)
    torch.autograd.backward([y, new.conv_state, new.ssm_state], [gy, gconv, gssm])
    packed_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()

    cu = _cu(LENS).tolist()
    xr = x.detach().clone().requires_grad_()
    sr = _leaf_state(MambaInferenceState(s0.conv_state.detach(), s0.ssm_state.detach()))
    for s, n in enumerate(LENS):
        a, b = cu[s], cu[s + 1]
        row = MambaInferenceState(sr.conv_state[s:s + 1], sr.ssm_state[s:s + 1])
        if n == 0:  # no tokens: the state passes through
            assert torch.equal(new.conv_state[s], s0.conv_state[s].detach())
            assert torch.equal(new.ssm_state[s], s0.ssm_state[s].detach())
            torch.autograd.backward([row.conv_state, row.ssm_state], [gconv[s:s + 1], gssm[s:s + 1]])
            continue
        ys, ns = layer(xr[:, a:b], state=row, reset=reset[:, a:b])
        assert _close(y[:, a:b], ys, tol), s
        assert _close(new.conv_state[s:s + 1], ns.conv_state, tol) and _close(new.ssm_state[s:s + 1], ns.ssm_state,
                                                                             tol), s
        torch.autograd.backward([ys, ns.conv_state, ns.ssm_state], [gy[:, a:b], gconv[s:s + 1], gssm[s:s + 1]])
    assert _close(x.grad, xr.grad, 10 * tol)
    assert _close(s0.conv_state.grad, sr.conv_state.grad, 10 * tol)
    assert _close(s0.ssm_state.grad, sr.ssm_state.grad, 10 * tol)
    for n, p in layer.named_parameters():  # sums over sequences: the same terms in another order
        # A_log stays float32 in a float64 layer (as upstream's): its gradient is rounded to float32
        assert _close(packed_grads[n], p.grad, max(10 * tol, 1e-6 if p.dtype == torch.float32 else 0.0)), n


def test_layer_states_at_positions_per_sequence():
    layer = _layer(torch.float64, "reference")
    lens, positions = [4, 0, 7], [[0, 1, 4], [0], [2, 7]]
    x = torch.randn(1, sum(lens), D_MODEL, dtype=torch.float64)
    s0 = _state(layer, 3, torch.float64, 3)
    y, new, at = layer(x, state=s0, cu_seqlens=_cu(lens), return_states_at=positions)
    assert [len(a) for a in at] == [3, 1, 2]
    cu = _cu(lens).tolist()
    for s, ps in enumerate(positions):
        row = s0.select(slice(s, s + 1))
        if lens[s] == 0:
            assert all(a.allclose(row) for a in at[s])
            continue
        _, _, want = layer(x[:, cu[s]:cu[s + 1]], state=row, return_states_at=ps)
        for got, ref in zip(at[s], want):
            assert got.batch_size == 1 and got.allclose(ref, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- the LM

def _lm(dtype, backend, seed=0):
    cfg = dict(d_model=D_MODEL, n_layer=2, vocab_size=32, ssm_cfg={"d_state": D_STATE}, rms_norm=True,
               fused_add_norm=True, residual_in_fp32=True, pad_vocab_size_multiple=8, tie_embeddings=True)
    torch.manual_seed(seed)
    lm = StatefulMambaLM.from_config(cfg, backend=backend).to(dtype)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith(".D"):
                p.uniform_(0.5, 1.5)
    return lm


def _model_state(lm, rows, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    base = lm.new_state(rows, dtype=dtype)
    return MambaModelState({i: MambaInferenceState(torch.randn(s.conv_state.shape, generator=g, dtype=dtype),
                                                   0.5 * torch.randn(s.ssm_state.shape, generator=g, dtype=dtype))
                            for i, s in base.items()}, seqlen_offset=7)


@pytest.mark.parametrize("dtype,backend,tol", CASES, ids=["reference-f64", "triton-f32"])
def test_lm_packed_equals_each_sequence_alone(dtype, backend, tol):
    lm = _lm(dtype, backend)
    L = sum(LENS)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 32, (1, L), generator=g)
    state = _model_state(lm, len(LENS), dtype, 5)
    logits, new = lm(ids, state=state, cu_seqlens=_cu(LENS))
    assert new.batch_size == len(LENS) and new.seqlen_offset == 7 + max(LENS)
    glog = torch.randn(logits.shape, generator=g, dtype=dtype)
    (logits * glog).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    lm.zero_grad()
    cu = _cu(LENS).tolist()
    for s, n in enumerate(LENS):
        if n == 0:
            assert new.select(slice(s, s + 1)).allclose(state.select(slice(s, s + 1)), rtol=0, atol=0)
            continue
        a, b = cu[s], cu[s + 1]
        ls, ns = lm(ids[:, a:b], state=state.select(slice(s, s + 1)))
        assert _close(logits[:, a:b].detach(), ls.detach(), tol), s
        for i in new.layer_indices:
            assert _close(new[i].ssm_state[s:s + 1].detach(), ns[i].ssm_state.detach(), tol), (s, i)
            assert _close(new[i].conv_state[s:s + 1].detach(), ns[i].conv_state.detach(), tol), (s, i)
        (ls * glog[:, a:b]).sum().backward()
    for name, p in lm.named_parameters():
        if name in packed_grads:
            assert _close(packed_grads[name], p.grad, max(10 * tol, 1e-6 if p.dtype == torch.float32 else 0.0)), name


def test_lm_packed_states_at_positions():
    lm = _lm(torch.float64, "reference")
    lens, positions = [3, 6], [[1, 3], [0, 6]]
    ids = torch.randint(0, 32, (1, 9), generator=torch.Generator().manual_seed(6))
    state = _model_state(lm, 2, torch.float64, 7)
    _, new, at = lm(ids, state=state, cu_seqlens=_cu(lens), return_states_at=positions)
    assert [[m.seqlen_offset for m in a] for a in at] == [[8, 10], [7, 13]]
    _, _, want = lm(ids[:, 3:], state=state.select(slice(1, 2)), return_states_at=[0, 6])
    assert at[1][0].allclose(want[0], rtol=1e-10, atol=1e-12) and at[1][1].allclose(want[1], rtol=1e-10, atol=1e-12)
    assert at[1][1].allclose(new.select(slice(1, 2)), rtol=1e-10, atol=1e-12)


def test_lm_packed_bad_input():
    lm = _lm(torch.float32, "reference")
    ids = torch.randint(0, 32, (1, 9))
    state = lm.new_state(3)
    before = state.clone()
    with pytest.raises(StateShapeError, match="expected 2 rows .one per sequence of cu_seqlens., found 3"):
        lm(ids, state=state, cu_seqlens=_cu([4, 5]))
    with pytest.raises(StateShapeError, match="batch 1, found batch 2"):
        lm(torch.cat([ids, ids]), cu_seqlens=_cu([4, 5]))
    with pytest.raises(StateShapeError, match="non-decreasing"):
        lm(ids, state=state, cu_seqlens=torch.tensor([0, 6, 4, 9], dtype=torch.int32))
    with pytest.raises(StateError, match=r"num_last_tokens: expected 0 \(every position\) or 1"):
        lm(ids, state=state, cu_seqlens=_cu([4, 5, 0]), num_last_tokens=2)
    with pytest.raises(StateShapeError, match=r"reset: expected a bool tensor \[batch, seqlen\] = \[1, 9\]"):
        lm(ids, state=state, cu_seqlens=_cu([4, 5, 0]), reset=torch.zeros(3, 9, dtype=torch.bool))
    assert state.allclose(before, rtol=0, atol=0)  # nothing changed
    layer = lm.backbone.blocks()[0].mixer
    with pytest.raises(StateShapeError, match="expected 2 rows"):
        layer(torch.randn(1, 9, D_MODEL), state=layer.new_state(3), cu_seqlens=_cu([4, 5]))


def test_lm_packed_last_token_logits_only():
    """num_last_tokens=1 with cu_seqlens: each sequence's last-token logits, [1, num_seqs, vocab] (an empty
    sequence's row NaN), equal to those rows of the full logits; the states are the same."""
    lm = _lm(torch.float64, "reference")
    lengths = [4, 0, 6, 1]
    ids = torch.randint(0, 32, (1, sum(lengths)), generator=torch.Generator().manual_seed(3))
    state = lm.new_state(len(lengths), dtype=torch.float64)
    cu = _cu(lengths)
    with torch.no_grad():
        full, new_full = lm(ids, state=state, cu_seqlens=cu)
        last, new_last = lm(ids, state=state, cu_seqlens=cu, num_last_tokens=1)
    assert last.shape == (1, len(lengths), full.shape[-1])
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if b > a:
            torch.testing.assert_close(last[0, s], full[0, b - 1], rtol=1e-12, atol=1e-12)
        else:
            assert torch.isnan(last[0, s]).all()
    assert new_last.allclose(new_full, rtol=0, atol=0)
