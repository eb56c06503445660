"""The SSD block decomposition of Mamba-2's scan, :func:`ssd_scan_chunked` (quadratic inside chunks, a
recurrence across them, resets handled by segment masks): the fast CPU path, same arguments, results and dtypes
as :func:`~mamba_state.kernels.ssd.naive.ssd_scan_ref`."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from mamba_state.errors import StateError

from ..scan_inputs import compute_dtype
from .naive import _NO_LIMIT, _finish, _heads, _prep_dt, check_ssd_inputs
from .packed import ssd_scan_packed

__all__ = ["ssd_scan_chunked"]


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum_{k=j+1..i} a[..., k]`` for ``j <= i``, ``-inf`` above the diagonal.

    Summing masked copies (rather than differences of a cumsum) keeps it exact and free of cancellation.
    """
    T = a.shape[-1]
    rep = a[..., :, None].expand(*a.shape, T)  # rep[..., i, j] = a_i
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    out = torch.cumsum(rep.masked_fill(~below, 0), dim=-2)
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device))
    return out.masked_fill(~keep, -math.inf)


def _default_chunk(seqlen: int) -> int:
    # Cost is O(L * T) inside chunks plus a Python loop of L / T steps across them.
    return int(min(64, max(8, 2 ** round(math.log2(max(1.0, math.sqrt(seqlen)))))))


def ssd_scan_chunked(x, dt, A, B, C, D=None, z=None, initial_state=None, reset=None, dt_bias=None,
                     dt_softplus=False, dt_limit=_NO_LIMIT, return_final_state=False, chunk_size=None,
                     cu_seqlens=None):
    """SSD scan by blocks: same arguments, results and dtypes as :func:`ssd_scan_ref`.

    With ``cu_seqlens`` (packed sequences, batch 1; ``initial_state`` and the final state one row per sequence)
    it runs :func:`~mamba_state.kernels.ssd.packed.ssd_scan_packed` over this function.

    Inside a chunk of ``T`` steps the output is a masked ``T x T`` mixing (decays from a segment sum); each
    chunk's end state from zero is one contraction; a short loop over chunks carries the true state in.
    Resets split a row into segments (``seg = cumsum(reset)``): mixing, end states and carried states only
    connect positions of the same segment, the initial state belonging to segment 0. Masks multiply finite
    decays, so gradients stay finite. Memory O(batch * nheads * seqlen * (T + headdim * dstate / T)).
    """
    if cu_seqlens is not None:
        return ssd_scan_packed(x, dt, A, B, C, D, z, initial_state, reset, dt_bias, dt_softplus, dt_limit,
                               return_final_state, cu_seqlens=cu_seqlens,
                               scan=functools.partial(ssd_scan_chunked, chunk_size=chunk_size))
    s = check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state, reset)
    b, L, h, p, _, n = s
    ct = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_state)
    T = int(chunk_size) if chunk_size is not None else _default_chunk(L)
    if T < 1:
        raise StateError(f"chunk_size: expected a positive int, found {chunk_size}")
    state = (initial_state.to(ct) if initial_state is not None
             else torch.zeros(b, h, p, n, dtype=ct, device=x.device))
    if L == 0:
        y = x.new_zeros(x.shape)
        return (y, state) if return_final_state else y
    K = -(-L // T)
    pad = K * T - L
    dtc = _prep_dt(dt, dt_bias, dt_softplus, dt_limit, ct)  # [b, L, h]
    xdt = x.to(ct) * dtc[..., None]  # [b, L, h, p]
    Bh, Ch = _heads(B.to(ct), h), _heads(C.to(ct), h)
    dA = dtc * A.to(ct)  # [b, L, h], log decays (<= 0 for A <= 0)
    seg = (torch.cumsum(reset.long(), dim=1) if reset is not None
           else torch.zeros(b, L, dtype=torch.long, device=x.device))
    if pad:  # padded steps: no input, no decay, same segment as the last real step
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        Bh = F.pad(Bh, (0, 0, 0, 0, 0, pad))
        Ch = F.pad(Ch, (0, 0, 0, 0, 0, pad))
        dA = F.pad(dA, (0, 0, 0, pad))
        seg = torch.cat([seg, seg[:, -1:].expand(b, pad)], dim=1)
    xdt = xdt.view(b, K, T, h, p)
    Bh = Bh.view(b, K, T, h, n)
    Ch = Ch.view(b, K, T, h, n)
    dA = dA.view(b, K, T, h).permute(0, 3, 1, 2)  # [b, h, K, T]
    seg = seg.view(b, K, T)
    cs = torch.cumsum(dA, dim=-1)  # [b, h, K, T]
    same = (seg[:, :, :, None] == seg[:, :, None, :]).to(ct)  # [b, K, T(i), T(j)]
    # 1. inside each chunk: y_i += sum_{j<=i, same segment} C_i.B_j exp(sum_{j<k<=i} dA_k) dt_j x_j
    mix = torch.exp(_segsum(dA)) * same[:, None]  # [b, h, K, T, T]
    y = torch.einsum("bkihn,bkjhn,bhkij,bkjhp->bkihp", Ch, Bh, mix, xdt)
    # 2. each chunk's end state from zero (only its last segment survives to the end)
    last_seg = seg[:, :, -1]  # [b, K]
    to_end = torch.exp(cs[..., -1:] - cs) * (seg == last_seg[..., None]).to(ct)[:, None]  # [b, h, K, T]
    local = torch.einsum("bkjhn,bhkj,bkjhp->bkhpn", Bh, to_end, xdt)  # [b, K, h, p, n]
    # 3. the state entering each chunk, and which segment it belongs to
    prev_seg = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=x.device), last_seg[:, :-1]], dim=1)  # [b, K]
    chunk_decay = torch.exp(cs[..., -1]) * (last_seg == prev_seg).to(ct)[:, None]  # [b, h, K]
    entering_list = []
    for k in range(K):
        entering_list.append(state)
        state = chunk_decay[:, :, k, None, None] * state + local[:, k]
    entering = torch.stack(entering_list, dim=1)  # [b, K, h, p, n]
    # 4. the entering state's contribution to every position of its segment
    from_start = torch.exp(cs) * (seg == prev_seg[..., None]).to(ct)[:, None]  # [b, h, K, T]
    y = y + torch.einsum("bkihn,bkhpn,bhki->bkihp", Ch, entering, from_start)
    y = y.reshape(b, K * T, h, p)[:, :L]
    y = _finish(y, x, D, z, ct, x.dtype)
    return (y, state) if return_final_state else y
