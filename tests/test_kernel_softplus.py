"""The kernels' float32 softplus (``kernels/_jit.py::_softplus``, used for dt by the scan, the decoding step and
the fused decode) against float64 softplus: a few ulps everywhere, including the range of Mamba's dt (0.001-0.1),
where ``log(1 + exp(x))`` loses the low bits of exp(x) (docs/kernel.md, "Numerics")."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mamba_state.kernels._jit import _softplus

# float32's unit roundoff is 2^-24 (6e-8); exp, log and the division each add about one rounding
MAX_REL_ERR = 8 * 2.0 ** -24


@triton.jit
def _softplus_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, _softplus(x), mask=mask)


def _kernel_softplus(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    block = 1024
    _softplus_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), BLOCK=block)
    return out


def test_softplus_is_accurate_to_a_few_ulps_over_the_whole_range():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(7)
    # dt's range (softplus(x) in 1e-3 .. 0.1: x in -7 .. -2.25), then everything from -30 to 30, and the
    # thresholds at +-20
    x = torch.cat([torch.empty(4096).uniform_(-7.0, -2.25, generator=g),
                   torch.empty(4096).uniform_(-30.0, 30.0, generator=g),
                   torch.tensor([-20.0, -19.999, 0.0, 19.999, 20.0, 20.001])]).to(device)
    got = _kernel_softplus(x).double()
    ref = torch.nn.functional.softplus(x.double())
    rel = ((got - ref).abs() / ref).max().item()
    assert rel < MAX_REL_ERR, f"expected softplus within {MAX_REL_ERR:.2e} relative, found {rel:.2e}"


def test_softplus_rounds_better_than_log_of_one_plus_exp_in_dts_range():
    """The reason for the formula: the naive form misses by several times more where dt lives (this fails if
    _softplus goes back to log(1 + exp(x)))."""
    x = torch.linspace(-7.0, -2.25, 4096)
    ref = torch.nn.functional.softplus(x.double())
    naive = torch.log(1.0 + torch.exp(x)).double()
    got = _kernel_softplus(x.to("cuda" if torch.cuda.is_available() else "cpu")).double().cpu()
    err_naive = ((naive - ref).abs() / ref).max().item()
    err_got = ((got - ref).abs() / ref).max().item()
    assert err_got * 3 < err_naive, (err_got, err_naive)
