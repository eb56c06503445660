"""The fast CPU path of the selective scan, :func:`selective_scan_chunked`: parallel within chunks, with a
hand-written chunked backward (an autograd Function), same semantics and dtypes as
:func:`~mamba_state.kernels.selective_scan.naive.selective_scan_ref`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mamba_state.errors import StateError

from .naive import _finish, _prepare
from .packed import check_varlen_state, seq_bounds

__all__ = ["selective_scan_chunked"]


def _default_chunk(seqlen: int) -> int:
    # Forward and backward each take two vectorised steps per position in a chunk plus one small step per chunk
    # boundary: about sqrt(L) steps per chunk balanced the per-step dispatch cost against the work per step on
    # CPU (benchmarks/bench_reference.py, 1x64x1024x16 to 1x64x16384x16 and 1x1536x512x16 in 64-token blocks).
    return int(min(64, max(8, 2 ** round(math.log2(max(1.0, math.sqrt(seqlen)))))))


def _groups(t: torch.Tensor) -> int:
    return 0 if t.dim() == 2 else (1 if t.dim() == 3 else int(t.shape[1]))


def _bc_groups(t: torch.Tensor, G: int, ct: torch.dtype) -> torch.Tensor:
    """B or C as ``[batch, G, dstate, seqlen]`` (time-varying) or ``[dim, dstate]`` (constant), in ``ct``."""
    t = t.to(ct)
    if t.dim() == 3:
        t = t[:, None]
    if t.dim() == 4 and t.shape[1] != G:
        t = t.repeat_interleave(G // t.shape[1], dim=1)
    return t


# Inside a block every per-position tensor is laid out as [T, K, batch, G, dim // G, ...]: step t of every one of
# the K chunks is one contiguous slice, and so is chunk k of a per-chunk tensor [K, batch, G, dim // G, dstate].
def _to_steps(x: torch.Tensor, G: int, K: int, T: int) -> torch.Tensor:
    """[batch, G * e, L] -> [T, K, batch, G, e], contiguous, zero-padded past ``L`` up to ``K * T``."""
    pad = K * T - x.shape[-1]
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(x.shape[0], G, -1, K, T).permute(4, 3, 0, 1, 2).contiguous()


def _from_steps(x: torch.Tensor, L: int) -> torch.Tensor:
    """[T, K, batch, G, e] -> [batch, G * e, L] (drops the padding past ``L``)."""
    T, K, b, G, e = x.shape
    return x.permute(2, 3, 4, 1, 0).reshape(b, G * e, K * T)[..., :L]


def _row_times(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Batched ``v[..., i] @ m[..., i, j]``: [..., i] x [..., i, j] -> [..., j].

    Row-vector-times-matrix ran 5-8x faster on CPU than the same product written matrix-times-column."""
    return torch.matmul(v[..., None, :], m)[..., 0, :]


class _ChunkedScan(torch.autograd.Function):
    """The bare recurrence of one block, with a hand-written backward.

    Inputs (all in the compute dtype): ``dt``, ``u`` [batch, dim, L]; ``A`` [dim, n]; ``B``, ``C`` [batch, G, n, L]
    or [dim, n]; ``h0`` [batch, dim, n] or None; ``keep`` bool [batch, L] (False where the state resets) or None;
    ``T`` the chunk length. Outputs ``y`` [batch, dim, L] (``sum_n C * x``, no D or z) and the last state
    [batch, dim, n].

    States are held as [..., n, dim // G] so that the channel axis is the contiguous one: broadcasting ``dt`` and
    ``B`` and reducing over ``n`` then run along long contiguous rows, and ``y = C . x`` is a row-times-matrix.

    Forward: (1) all K chunks scanned at once from a zero state, ``T`` vectorised steps, keeping only their end
    states; (2) a loop over the K chunk boundaries carries the true state in with each chunk's total decay; (3)
    every chunk rerun from its entering state, writing all states into one buffer that gives ``y`` in one
    batched matmul and is kept for the backward (with ``exp(dt * A)``).

    Backward: the adjoint ``lam_t = C_t g_t + exp(dt_{t+1} A) lam_{t+1}`` runs the same three passes in reverse
    (the gradient of the last state enters at the last chunk's end); every input gradient is then a handful of
    whole-block products and reductions of ``lam`` with the saved states. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, dt, u, A, B, C, h0, keep, T: int):
        b, d, L = u.shape
        n = A.shape[1]
        G = next((t.shape[1] for t in (B, C) if t.dim() == 4), 1)
        dg, K = d // G, -(-L // T)
        pad = K * T - L
        ct = dt.dtype
        At = A.view(G, dg, n).transpose(1, 2).contiguous()  # [G, n, dg]
        dt_s = _to_steps(dt, G, K, T)  # [T, K, b, G, dg]; padded steps: decay 1, input 0
        u_s = _to_steps(u, G, K, T)
        dA = torch.mul(dt_s[..., None, :], At).exp_()  # [T, K, b, G, n, dg]
        keep_k = None
        if keep is not None:
            keep_s = F.pad(keep, (0, pad), value=True).view(b, K, T).permute(2, 1, 0)  # [T, K, b]
            keep_k = keep_s.all(0)[..., None, None, None].to(ct)
            dA.mul_(keep_s[..., None, None, None].to(ct))
        Bs = _to_steps(B.reshape(b, G * n, L), G, K, T) if B.dim() == 4 else None  # [T,K,b,G,n]
        Cs = _to_steps(C.reshape(b, G * n, L), G, K, T) if C.dim() == 4 else None
        # hs[t + 1] will hold the state after step t; it first holds that step's input dt * B * u (one buffer
        # less to allocate: large fresh allocations cost page faults on every call)
        hs = torch.empty((T + 1, K, b, G, n, dg), dtype=ct, device=u.device)
        torch.mul((dt_s * u_s)[..., None, :], Bs[..., None] if Bs is not None else B.view(G, dg, n).transpose(1, 2),
                  out=hs[1:])
        hs_t, dA_t = hs.unbind(0), dA.unbind(0)  # one call for all the step views, not one per step
        dBu_t = hs_t[1:]
        carry = (h0.reshape(b, G, dg, n).transpose(2, 3) if h0 is not None
                 else torch.zeros(b, G, n, dg, dtype=ct, device=u.device))
        total = None
        if K == 1:  # one chunk: it starts from h0, nothing to carry
            hs[0, 0] = carry
        else:
            # 1. every chunk's end state from a zero start
            h = dBu_t[0]
            for t in range(1, T):
                h = torch.addcmul(dBu_t[t], dA_t[t], h)
            total = torch.mul(dt_s.sum(0)[..., None, :], At).exp_()  # [K, b, G, n, dg]: 0 across a reset
            if keep_k is not None:
                total.mul_(keep_k)
            # 2. the true state entering each chunk
            entering = [carry]
            for h_k, total_k in zip(h.unbind(0)[:-1], total.unbind(0)[:-1]):
                carry = torch.addcmul(h_k, total_k, carry)
                entering.append(carry)
            torch.stack(entering, out=hs[0])
            del h, entering
        # 3. rerun every chunk from its entering state, keeping every state (in place over the inputs)
        for t in range(T):
            hs_t[t + 1].addcmul_(dA_t[t], hs_t[t])
        del dBu_t
        if Cs is not None:
            y = _row_times(Cs, hs[1:])
        else:
            y = (hs[1:] * C.view(G, dg, n).transpose(1, 2)).sum(-2)
        ctx.save_for_backward(dt_s, u_s, At, B, C, Bs, Cs, dA, hs, total)
        ctx.dims = (b, d, L, n, G, K, T, h0 is not None)
        # the last state is copied out (a view of hs cannot be modified in place by the caller, e.g. reset_);
        # padded steps keep the state, so the last chunk's last row is the state after step L - 1
        return _from_steps(y, L), hs[T, K - 1].transpose(2, 3).reshape(b, d, n).clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, glast):
        dt_s, u_s, At, B, C, Bs, Cs, dA, hs, total = ctx.saved_tensors
        b, d, L, n, G, K, T, has_h0 = ctx.dims
        dg = d // G
        need = ctx.needs_input_grad

        def per_channel(t):  # [G, n, dg] -> [dim, n]
            return t.transpose(1, 2).reshape(d, n)

        g_s = _to_steps(gy, G, K, T)  # [T, K, b, G, dg]
        lam = g_s[..., None, :] * (Cs[..., None] if Cs is not None else C.view(G, dg, n).transpose(1, 2))
        dA_t, lam_t = dA.unbind(0), lam.unbind(0)
        carry = glast.reshape(b, G, dg, n).transpose(2, 3)  # the last state's gradient enters at the end
        if K == 1:
            lam_t[T - 1][0].add_(carry)
        else:
            # 1. every chunk's adjoint at its first step from a zero end, folded into the step before the chunk
            mu = lam_t[T - 1]
            for t in range(T - 2, -1, -1):
                mu = torch.addcmul(lam_t[t], dA_t[t + 1], mu)
            w_k, total_k = (dA_t[0] * mu).unbind(0), total.unbind(0)
            # 2. the true adjoint entering each chunk from the right
            entering: list[torch.Tensor] = [carry] * K  # every slot is overwritten below
            for k in range(K - 1, 0, -1):
                entering[k] = carry
                carry = torch.addcmul(w_k[k], total_k[k], carry)
            entering[0] = carry
            lam_t[T - 1].add_(torch.stack(entering))
            del mu, w_k, entering
        # 3. the adjoint at every step
        for t in range(T - 2, -1, -1):
            lam_t[t].addcmul_(dA_t[t + 1], lam_t[t + 1])
        g_h0 = None
        if has_h0 and need[5]:  # h0 enters only the first step of chunk 0
            g_h0 = (dA_t[0][0] * lam_t[0][0]).transpose(2, 3).reshape(b, d, n)
        g_dt = g_u = g_A = g_B = g_C = None
        du_s = dt_s * u_s
        LB = None
        if need[0] or need[1]:
            LB = (_row_times(Bs, lam) if Bs is not None
                  else (lam * B.view(G, dg, n).transpose(1, 2)).sum(-2))  # dL/d(dt * u) [T, K, b, G, dg]
            if need[1]:
                g_u = _from_steps(dt_s * LB, L)
        if need[3]:
            if Bs is not None:
                g_B = _from_steps(_row_times(du_s, lam.transpose(-1, -2)), L).reshape(b, G, n, L)
            else:
                g_B = per_channel((lam * du_s[..., None, :]).sum((0, 1, 2)))
        if need[4]:
            if Cs is not None:
                g_C = _from_steps(_row_times(g_s, hs[1:].transpose(-1, -2)), L).reshape(b, G, n, L)
            else:
                g_C = per_channel((hs[1:] * g_s[..., None, :]).sum((0, 1, 2)))
        if need[0] or need[2]:
            # dL/d(dt * A) per element: lam_t * x_{t-1} * exp(dt_t A) (zero at resets, where dA is zero), in
            # lam's buffer (lam is not needed any more; the saved tensors stay untouched for a retained graph)
            X = lam.mul_(hs[:-1]).mul_(dA)
            if need[0]:
                assert LB is not None  # computed above whenever need[0]
                g_dt = _from_steps(torch.addcmul((X * At).sum(-2), u_s, LB), L)
            if need[2]:
                g_A = per_channel(X.mul_(dt_s[..., None, :]).sum((0, 1, 2)))
        return g_dt, g_u, g_A, g_B, g_C, g_h0, None, None


_BLOCK_ELEMENTS = 1 << 20  # about 4 MB of float32 per [batch, dim, block, dstate] tensor


def _default_block(batch: int, dim: int, dstate: int) -> int:
    # Blocks whose per-position tensors stay near the size of a CPU cache ran 2-3x faster at 4k-16k tokens than
    # one pass over the whole sequence (benchmarks/bench_reference.py), at the price of a Python loop per block.
    per_token = max(1, batch * dim * dstate)
    return int(min(2048, max(64, 2 ** round(math.log2(max(1.0, _BLOCK_ELEMENTS / per_token))))))


def _check_size(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise StateError(f"{name}: expected a positive int or None, found {value!r}")


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, initial_state=None, reset=None, chunk_size=None, block_size=None,
                           cu_seqlens=None):
    """Selective scan computed in chunks: same arguments, results and dtypes as :func:`selective_scan_ref`.

    The sequence is processed in blocks of ``block_size`` tokens (default: sized so that a ``[batch, dim, block,
    dstate]`` tensor is about 4 MB), each continuing from the previous block's last state; inside a block the
    work is parallel over chunks of ``chunk_size`` steps (see :class:`_ChunkedScan`). Memory is
    O(batch * dim * block * dstate) for the forward; for the backward every block keeps its states and decays
    (two float tensors of [batch, dim, block, dstate]). Differentiable in every tensor input, ``initial_state``
    included (once: the backward is hand-written and not itself differentiable).

    With ``cu_seqlens`` (packed sequences, batch 1; ``initial_state`` and the last state [num_seqs, dim, dstate])
    the sequences are laid side by side as a batch of num_seqs rows padded to the longest, the padded steps made
    no-ops (dt = 0: decay 1, input 0), so every row ends on its own final state (see :func:`_chunked_packed`).
    """
    if cu_seqlens is not None:
        return _chunked_packed(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                               initial_state, reset, chunk_size, block_size, cu_seqlens)
    shape, ct, dt = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reset)
    _check_size("chunk_size", chunk_size)
    _check_size("block_size", block_size)
    G = math.lcm(max(1, _groups(B)), max(1, _groups(C)))  # every group of B and of C is a union of these
    Bg, Cg = _bc_groups(B, G, ct), _bc_groups(C, G, ct)
    keep = ~reset if reset is not None else None
    state = initial_state.to(ct) if initial_state is not None else None
    y, state = _scan_blocks(dt, u.to(ct), A.to(ct), Bg, Cg, state, keep, chunk_size, block_size, shape.dstate)
    out = _finish(y, u, D, z, ct, u.dtype)
    return (out, state) if return_last_state else out


def _scan_blocks(dt, uf, Af, Bg, Cg, state, keep, chunk_size, block_size, dstate):
    """The bare recurrence (no D, no gate) in blocks of ``block_size`` steps, each continuing from the previous
    block's last state: ``(y [batch, dim, L], last state)``. Inputs in the compute dtype, B/C as
    :func:`_bc_groups` gives them, ``keep`` bool [batch, L] (False at resets) or None."""
    batch, dim, L = uf.shape
    Lb = block_size if block_size is not None else _default_block(batch, dim, dstate)

    def part(t, s):  # time slice of a time-varying input; constant B/C and None pass through
        return t[..., s] if t is not None and t.dim() >= 3 else t

    ys = []
    for start in range(0, L, Lb):
        s = slice(start, min(L, start + Lb))
        n_steps = s.stop - s.start
        T = min(chunk_size if chunk_size is not None else _default_chunk(n_steps), n_steps)
        y, state = _ChunkedScan.apply(dt[..., s], uf[..., s], Af, part(Bg, s), part(Cg, s), state,
                                      keep[:, s] if keep is not None else None, T)
        ys.append(y)
    return (ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)), state


def _chunked_packed(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state, reset,
                    chunk_size, block_size, cu_seqlens):
    """:func:`selective_scan_chunked` with ``cu_seqlens``: one padded batch of sequences, gathered in and out."""
    shape, ct, dt = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, None, reset)
    _check_size("chunk_size", chunk_size)
    _check_size("block_size", block_size)
    bounds = seq_bounds(cu_seqlens, shape.seqlen, shape.batch)
    nseq = len(bounds) - 1
    check_varlen_state(initial_state, nseq, shape.dim, shape.dstate)
    dev, L = u.device, shape.seqlen
    starts = torch.tensor(bounds[:-1], device=dev)
    lens = torch.tensor(bounds[1:], device=dev) - starts
    M = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))  # >= 1: seqlen >= 1
    steps = torch.arange(M, device=dev)
    valid = steps < lens[:, None]  # [nseq, M]
    idx = (starts[:, None] + steps).clamp_(max=L - 1)  # padded steps read any valid step: dt = 0 there

    def rows(t):  # [1, ..., L] -> [nseq, ..., M]
        g = t[0][..., idx]  # [..., nseq, M]
        return g.movedim(-2, 0)

    dtp = rows(dt) * valid[:, None].to(ct)
    G = math.lcm(max(1, _groups(B)), max(1, _groups(C)))
    Bg, Cg = _bc_groups(B, G, ct), _bc_groups(C, G, ct)
    Bp = rows(Bg) if Bg.dim() == 4 else Bg
    Cp = rows(Cg) if Cg.dim() == 4 else Cg
    keep = None if reset is None else torch.where(valid, ~reset[0][idx], True)
    state = (initial_state.to(ct) if initial_state is not None
             else torch.zeros(nseq, shape.dim, shape.dstate, dtype=ct, device=dev))
    y, last = _scan_blocks(dtp, rows(u.to(ct)), A.to(ct), Bp, Cp, state, keep, chunk_size, block_size,
                           shape.dstate)
    seq_of = torch.repeat_interleave(torch.arange(nseq, device=dev), lens, output_size=L)
    flat = seq_of * M + torch.arange(L, device=dev) - starts[seq_of]  # packed step t -> (its row, its offset)
    y = y.transpose(0, 1).reshape(shape.dim, nseq * M)[:, flat][None]
    out = _finish(y, u, D, z, ct, u.dtype)
    return (out, last) if return_last_state else out
