"""B and C with different channel-group counts (one of them 1, or both > 1): the Triton scan and the Triton
decoding step equal the float64 references, values and (for the scan) gradients. The kernels read B and C with
one group index per channel block, so the launchers give both the least common multiple of their counts; before
2026-12-03 the kernels took B's count for both and read C (or B) out of bounds."""

from __future__ import annotations

import pytest
import torch

from mamba_state.kernels import selective_scan_fn, selective_state_update
from mamba_state.kernels.scan_inputs import match_groups
from mamba_state.kernels.selective_scan.naive import selective_scan_ref
from mamba_state.kernels.state_update.naive import selective_state_update_ref

F64 = torch.float64
CASES = [(2, 0), (0, 2), (2, 3), (4, 2)]  # (groups of B, groups of C); 0: the 3-D form without a group axis


def _bc(g, b, n, L, gen):
    shape = (b, g, n, L) if g else (b, n, L)
    return torch.randn(*shape, generator=gen, dtype=F64)


@pytest.mark.parametrize("gb, gc", CASES)
def test_scan_with_mixed_groups_matches_the_reference(gb, gc):
    gen = torch.Generator().manual_seed(gb * 10 + gc)
    b, d, n, L = 2, 12, 4, 20
    inp = dict(u=torch.randn(b, d, L, generator=gen, dtype=F64),
               delta=0.5 * torch.randn(b, d, L, generator=gen, dtype=F64) - 1.0,
               A=-torch.exp(0.5 * torch.randn(d, n, generator=gen, dtype=F64)),
               B=_bc(gb, b, n, L, gen), C=_bc(gc, b, n, L, gen), D=torch.randn(d, generator=gen, dtype=F64),
               z=torch.randn(b, d, L, generator=gen, dtype=F64))
    h0 = torch.randn(b, d, n, generator=gen, dtype=F64)
    w = torch.randn(b, d, L, generator=gen, dtype=F64)
    ref_leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    ref_out, ref_last = selective_scan_ref(**ref_leaves, delta_softplus=True, return_last_state=True,
                                           initial_state=h0)
    ref_grads = torch.autograd.grad((ref_out * w).sum() + ref_last.sum(), list(ref_leaves.values()))
    leaves = {k: v.float().requires_grad_() for k, v in inp.items()}
    out, last = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True, initial_state=h0.float(),
                                  backend="triton", chunk_size=8)
    grads = torch.autograd.grad((out.double() * w).sum() + last.double().sum(), list(leaves.values()))
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last.double(), ref_last, rtol=1e-4, atol=1e-5)
    for name, got, ref in zip(leaves, grads, ref_grads):
        assert got.shape == ref.shape, name
        torch.testing.assert_close(got.double(), ref, rtol=2e-4, atol=2e-4, msg=name)


@pytest.mark.parametrize("gb, gc", [(2, 1), (1, 2), (2, 3)])
def test_decoding_step_with_mixed_groups_matches_the_reference(gb, gc):
    gen = torch.Generator().manual_seed(gb * 10 + gc + 1)
    b, d, n = 2, 12, 4
    state = torch.randn(b, d, n, generator=gen)
    x, dt, z = (torch.randn(b, d, generator=gen) for _ in range(3))
    A = -torch.exp(0.5 * torch.randn(d, n, generator=gen))
    B, C = torch.randn(b, gb, n, generator=gen), torch.randn(b, gc, n, generator=gen)
    D, dt_bias = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    ref_state = state.double()
    ref = selective_state_update_ref(ref_state, x.double(), dt.double(), A.double(), B.double(), C.double(),
                                     D.double(), z.double(), dt_bias.double(), True)
    got_state = state.clone()
    got = selective_state_update(got_state, x, dt, A, B, C, D, z, dt_bias, True, backend="triton")
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_state.double(), ref_state, rtol=1e-4, atol=1e-5)


def test_match_groups_keeps_each_channels_rows():
    B = torch.randn(1, 2, 3, 5)
    C = torch.randn(1, 3, 3, 5)
    B6, C6 = match_groups(B, C)
    assert B6.shape[1] == C6.shape[1] == 6
    dim = 12
    for c in range(dim):  # channel c reads group c // (dim // g) of each
        assert torch.equal(B6[:, c // 2], B[:, c // 6]) and torch.equal(C6[:, c // 2], C[:, c // 4])
    one = torch.randn(1, 1, 3, 5)
    wide, same = match_groups(one, C)
    assert wide.stride(1) == 0 and same is C  # a single group is widened as a view
