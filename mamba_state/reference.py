"""Pure-PyTorch references: the exact semantics every fast path must reproduce.

* :func:`selective_scan_ref` — the sequential oracle of Mamba-1's selective scan with ``initial_state``,
  ``return_last_state`` and per-step ``reset``. Any float dtype (float64 for tests), differentiable.
* :func:`selective_scan_chunked` — the same function, parallel within chunks; the fast CPU path.
* :func:`causal_conv1d_ref` — causal depthwise conv1d with a conv state in and out and resets, with the window
  semantics of upstream's ``Mamba.step`` (the state holds the last ``d_conv`` inputs, oldest first).
* :func:`selective_state_update_ref` — one decoding step (upstream ``selective_state_update``) with resets.

Recurrence, per batch row ``b``, channel ``d``, state ``n`` and step ``t``::

    dt      = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    x_t     = exp(dt_t * A[d, n]) * (0 if reset[b, t] else x_{t-1}) + dt_t * B_t[n] * u_t
    y_t     = sum_n C_t[n] * x_t[n]  (+ D[d] * u_t)  (* silu(z_t))

with ``x_{-1} = initial_state`` (zeros when absent). Arithmetic runs in float32 for half and float32 inputs,
float64 when any input is float64; the output has ``u``'s dtype and the last state the compute dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import StateError, StateShapeError
from .scan_inputs import check_scan_inputs, compute_dtype

__all__ = ["selective_scan_ref", "selective_scan_chunked", "causal_conv1d_ref", "selective_state_update_ref"]


def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reset):
    """Validate, cast to the compute dtype and apply bias/softplus. Returns the tensors and shape info."""
    shape = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, reset)
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    return shape, ct, dt


def _bc_at(t: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C as a tensor broadcastable to [batch, dim, seqlen, dstate] (no copy for groups)."""
    if t.dim() == 2:  # [dim, dstate], constant over time
        return t[None, :, None, :]
    if t.dim() == 3:  # [batch, dstate, seqlen]
        return t.transpose(1, 2)[:, None]
    b, g, n, L = t.shape  # [batch, groups, dstate, seqlen] -> [batch, dim, seqlen, dstate]
    return t.permute(0, 1, 3, 2)[:, :, None].expand(b, g, dim // g, L, n).reshape(b, dim, L, n)


def _finish(y, u, D, z, ct, out_dtype):
    if D is not None:
        y = y + u.to(ct) * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(out_dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None, reset=None):
    """Sequential selective scan (the oracle). Shapes as in :mod:`mamba_state.scan_inputs`.

    Returns ``out`` [batch, dim, seqlen] in ``u.dtype``, or ``(out, last_state)`` with ``last_state``
    [batch, dim, dstate] in the compute dtype (float32, or float64 for float64 inputs).
    """
    shape, ct, dt = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reset)
    Bt = _bc_at(B.to(ct), shape.dim)
    Ct = _bc_at(C.to(ct), shape.dim)
    Af = A.to(ct)
    du = dt * u.to(ct)
    x = (initial_state.to(ct) if initial_state is not None
         else torch.zeros(shape.batch, shape.dim, shape.dstate, dtype=ct, device=u.device))
    ys = []
    for t in range(shape.seqlen):
        decayed = torch.exp(dt[:, :, t, None] * Af) * x
        if reset is not None:
            decayed = torch.where(reset[:, t, None, None], torch.zeros_like(decayed), decayed)
        x = decayed + du[:, :, t, None] * Bt[:, :, min(t, Bt.shape[2] - 1)]
        ys.append((x * Ct[:, :, min(t, Ct.shape[2] - 1)]).sum(-1))
    out = _finish(torch.stack(ys, dim=2), u, D, z, ct, u.dtype)
    return (out, x) if return_last_state else out


def _default_chunk(seqlen: int) -> int:
    # Two loops of `chunk` vectorised steps plus one of seqlen / chunk steps: about sqrt(L) / 4 balanced the
    # per-step dispatch cost against the work per step on CPU (measured by benchmarks/bench_reference.py).
    return int(min(64, max(8, 2 ** round(math.log2(max(1.0, math.sqrt(seqlen) / 4))))))


def _groups(t: torch.Tensor) -> int:
    return 0 if t.dim() == 2 else (1 if t.dim() == 3 else int(t.shape[1]))


def _bc_steps(t: torch.Tensor, G: int, K: int, T: int, pad: int, ct: torch.dtype) -> torch.Tensor:
    """B or C laid out per step: ``[T, batch, G, K, 1, dstate]`` (time-varying; a view when possible) or
    ``[1, 1, G, 1, dim // G, dstate]`` (constant ``[dim, dstate]``)."""
    t = t.to(ct)
    if t.dim() == 2:
        d, n = t.shape
        return t.view(1, 1, G, 1, d // G, n)
    if t.dim() == 3:
        t = t[:, None]
    b, g, n, _ = t.shape
    if g != G:
        t = t.repeat_interleave(G // g, dim=1)
    if pad:
        t = F.pad(t, (0, pad))
    return t.view(b, G, n, K, T).permute(4, 0, 1, 3, 2).unsqueeze(4)


def _chunked_block(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None, reset=None, chunk_size=None):
    """One block of :func:`selective_scan_chunked` (the whole sequence when it is short).

    The sequence is cut into ``K`` chunks of ``T = chunk_size`` steps (the last one padded with steps that
    keep the state: decay 1, input 0), laid out as ``[T, batch, groups, K, dim // groups, dstate]`` so that
    every step is one contiguous slice. Then

    1. a loop of ``T`` vectorised steps scans all chunks at once from a zero state (end states only);
    2. a loop over the ``K`` chunk boundaries carries the true state in, using each chunk's total decay
       ``exp(A * sum(dt))`` (zero when the chunk holds a reset);
    3. a second loop of ``T`` steps reruns every chunk from its true entering state and reads ``y`` out with
       a batched matmul against ``C``.

    Rerunning the chunks costs one fused multiply-add per element but stores no per-position states, and the
    slices come from ``unbind`` so that autograd's backward does not allocate a full-size gradient per step.
    Differentiable in every tensor input, ``initial_state`` included.
    """
    shape, ct, dt = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reset)
    b, d, L, n = shape.batch, shape.dim, shape.seqlen, shape.dstate
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise StateError(f"chunk_size: expected a positive int or None, found {chunk_size!r}")
    T = min(int(chunk_size) if chunk_size is not None else _default_chunk(L), L)
    K = -(-L // T)
    pad = K * T - L
    G = math.lcm(max(1, _groups(B)), max(1, _groups(C)))  # every group of B and of C is a union of these
    dg = d // G
    Ag = A.to(ct).view(G, 1, dg, n)
    du = dt * u.to(ct)
    if pad:
        dt, du = F.pad(dt, (0, pad)), F.pad(du, (0, pad))

    def steps(x: torch.Tensor) -> torch.Tensor:  # [b, d, K*T] -> [T, b, G, K, dg, 1]
        return x.view(b, G, dg, K, T).permute(4, 0, 1, 3, 2).unsqueeze(-1)

    dA = (steps(dt) * Ag).exp_()  # [T, b, G, K, dg, n]
    keep = None
    if reset is not None:
        keep = F.pad(~reset, (0, pad), value=True) if pad else ~reset
        keep = keep.view(b, 1, K, T)
        dA = dA * keep.permute(3, 0, 1, 2)[..., None, None].to(ct)
    dBu = steps(du) * _bc_steps(B, G, K, T, pad, ct)
    Cs = _bc_steps(C, G, K, T, pad, ct)
    dA_t, dBu_t = dA.unbind(0), dBu.unbind(0)
    # 1. every chunk's end state from a zero start, all chunks at once
    h = dBu_t[0]
    for t in range(1, T):
        h = torch.addcmul(dBu_t[t], dA_t[t], h)
    total = torch.exp(dt.view(b, G, dg, K, T).sum(-1).transpose(2, 3)[..., None] * Ag)  # [b, G, K, dg, n]
    if keep is not None:
        total = total * keep.all(-1)[..., None, None].to(ct)
    # 2. the true state entering each chunk
    carry = (initial_state.to(ct).view(b, G, dg, n) if initial_state is not None
             else torch.zeros(b, G, dg, n, dtype=ct, device=u.device))
    entering = []
    for h_k, p_k in zip(h.unbind(2), total.unbind(2)):
        entering.append(carry)
        carry = torch.addcmul(h_k, p_k, carry)
    h = torch.stack(entering, dim=2)  # [b, G, K, dg, n]
    # 3. rerun every chunk from its entering state, reading the output as we go
    C_t = Cs.unbind(0) if C.dim() != 2 else None
    ys = []
    for t in range(T):
        h = torch.addcmul(dBu_t[t], dA_t[t], h)
        ys.append(torch.matmul(h, C_t[t].transpose(-1, -2)) if C_t is not None else (h * Cs[0]).sum(-1, keepdim=True))
    y = torch.cat(ys, dim=-1).transpose(2, 3).reshape(b, d, K * T)[:, :, :L]  # [b, G, K, dg, T] -> [b, d, L]
    out = _finish(y, u, D, z, ct, u.dtype)
    return (out, carry.reshape(b, d, n)) if return_last_state else out


_BLOCK_ELEMENTS = 1 << 20  # about 4 MB of float32 per [batch, dim, block, dstate] tensor


def _default_block(batch: int, dim: int, dstate: int) -> int:
    # Blocks whose per-position tensors stay near the size of a CPU cache ran 2-3x faster at 4k-16k tokens than
    # one pass over the whole sequence (benchmarks/bench_reference.py), at the price of a Python loop per block.
    per_token = max(1, batch * dim * dstate)
    return int(min(2048, max(64, 2 ** round(math.log2(max(1.0, _BLOCK_ELEMENTS / per_token))))))


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, initial_state=None, reset=None, chunk_size=None, block_size=None):
    """Selective scan computed in chunks: same arguments, results and dtypes as :func:`selective_scan_ref`.

    The sequence is processed in blocks of ``block_size`` tokens (default: sized so that a ``[batch, dim, block,
    dstate]`` tensor is about 4 MB), each continuing from the previous block's last state; inside a block the
    work is parallel over chunks of ``chunk_size`` steps (see :func:`_chunked_block`). Memory is
    O(batch * dim * block * dstate) for the forward; autograd keeps every block's tensors for the backward.
    Differentiable in every tensor input, ``initial_state`` included.
    """
    shape = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, reset)
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise StateError(f"block_size: expected a positive int or None, found {block_size!r}")
    Lb = block_size if block_size is not None else _default_block(shape.batch, shape.dim, shape.dstate)
    L = shape.seqlen
    if L <= Lb:
        return _chunked_block(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                              initial_state, reset, chunk_size)

    def part(t, s):  # time slice of a time-varying input; constant B/C and None pass through
        return t[..., s] if t is not None and t.dim() >= 3 else t

    outs, state = [], initial_state
    for start in range(0, L, Lb):
        s = slice(start, min(L, start + Lb))
        out, state = _chunked_block(part(u, s), part(delta, s), A, part(B, s), part(C, s), D, part(z, s), delta_bias,
                                    delta_softplus, True, state, reset[:, s] if reset is not None else None,
                                    chunk_size)
        outs.append(out)
    out = torch.cat(outs, dim=-1)
    return (out, state) if return_last_state else out


def causal_conv1d_ref(x, weight, bias=None, conv_state=None, reset=None, activation=None):
    """Causal depthwise conv1d with a carried window.

    Args:
        x: [batch, channels, seqlen].
        weight: [channels, width] (or nn.Conv1d's [channels, 1, width]).
        bias: [channels] or None.
        conv_state: [batch, channels, width], the last ``width`` inputs before ``x``, oldest first (zeros if None).
        reset: bool [batch, seqlen]; True at t clears the window before t (row starts afresh at t).
        activation: None or "silu".

    Returns:
        (out [batch, channels, seqlen] in x.dtype, new_conv_state [batch, channels, width] in conv_state's dtype
        (x's when conv_state is None)): the last ``width`` inputs, with inputs from before a reset zeroed.
    """
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight[:, 0]
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise StateShapeError(
            f"causal_conv1d: expected x [batch, channels, seqlen] and weight [channels, width], found x "
            f"{list(x.shape)} and weight {list(weight.shape)}"
        )
    if activation not in (None, "silu", "swish"):
        raise StateError(f"activation: expected None or 'silu', found {activation!r}")
    bsz, ch, L = x.shape
    W = weight.shape[1]
    if conv_state is not None and list(conv_state.shape) != [bsz, ch, W]:
        raise StateShapeError(f"conv_state: expected [batch, channels, width] = {[bsz, ch, W]}, found {list(conv_state.shape)}")
    if reset is not None and (reset.dtype != torch.bool or list(reset.shape) != [bsz, L]):
        raise StateShapeError(f"reset: expected a bool tensor {[bsz, L]}, found {reset.dtype} {list(reset.shape)}")
    ct = compute_dtype(x, weight, bias, conv_state)
    state_dtype = conv_state.dtype if conv_state is not None else x.dtype
    prev = (conv_state.to(ct) if conv_state is not None else torch.zeros(bsz, ch, W, dtype=ct, device=x.device))
    full = torch.cat([prev, x.to(ct)], dim=-1)  # [b, ch, W + L]; position j < W is from the state
    if reset is not None:
        # segment of each position: inputs are visible only within their segment
        seg_x = torch.cumsum(reset.long(), dim=1)
        seg = torch.cat([torch.zeros(bsz, W, dtype=torch.long, device=x.device), seg_x], dim=1)  # [b, W + L]
        windows = full[:, :, 1:].unfold(-1, W, 1)  # [b, ch, L, W]: inputs t-W+1 .. t
        seg_win = seg[:, 1:].unfold(-1, W, 1)  # [b, L, W]
        visible = (seg_win == seg_x[:, :, None]).to(ct)
        out = (windows * visible[:, None] * weight.to(ct)[None, :, None, :]).sum(-1)
        last = full[:, :, -W:] * (seg[:, -W:] == seg[:, -1:]).to(ct)[:, None, :]
    else:
        out = F.conv1d(full[:, :, 1:], weight.to(ct)[:, None, :], groups=ch)
        last = full[:, :, -W:]
    if bias is not None:
        out = out + bias.to(ct)[None, :, None]
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype), last.to(state_dtype)


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                               reset=None):
    """One step of the scan, updating ``state`` in place (upstream ``selective_state_update`` semantics).

    Mamba-1 form: state [batch, dim, dstate]; x, dt, z [batch, dim]; A [dim, dstate]; B, C [batch, dstate] or
    [batch, ngroups, dstate]; D, dt_bias [dim]. Multi-head form: state [batch, nheads, headdim, dstate];
    x, dt, z [batch, nheads, headdim]; A [nheads, headdim, dstate]; B, C [batch, ngroups, dstate];
    D, dt_bias [nheads, headdim]. ``reset`` bool [batch] zeroes a row's state before the step.
    Returns out in x.dtype, shaped like x.
    """
    multihead = state.dim() == 4
    if not multihead:
        # Channel groups of B/C (as in the scan) become heads: [batch, dim] -> [batch, G, dim // G].
        G = math.lcm(*(t.shape[1] if t.dim() == 3 else 1 for t in (B, C)))
        if state.dim() != 3 or state.shape[1] % G:
            raise StateShapeError(
                f"selective_state_update: expected state [batch, dim, dstate] with dim divisible by the {G} groups "
                f"of B and C, found {list(state.shape)}")
        B, C = (t.repeat_interleave(G // t.shape[1], dim=1) if t.dim() == 3 else t for t in (B, C))
        bsz, dim = state.shape[:2]
        heads_of = lambda t: t.unflatten(-1, (G, dim // G))  # noqa: E731  (a view: writes reach `state`)
        state4 = state.unflatten(1, (G, dim // G))
        x4, dt4 = heads_of(x), heads_of(dt)
        A4 = A.view(G, dim // G, A.shape[-1])
        D4 = heads_of(D) if D is not None else None
        z4 = heads_of(z) if z is not None else None
        bias4 = heads_of(dt_bias) if dt_bias is not None else None
    else:
        state4, x4, dt4, A4, D4, z4, bias4 = state, x, dt, A, D, z, dt_bias
    bsz, h, p, n = state4.shape
    if list(x4.shape) != [bsz, h, p] or list(dt4.shape) != [bsz, h, p] or list(A4.shape) != [h, p, n]:
        raise StateShapeError(
            f"selective_state_update: expected x, dt {[bsz, h, p]} and A {[h, p, n]}, found x {list(x.shape)}, "
            f"dt {list(dt.shape)}, A {list(A.shape)}"
        )
    ct = compute_dtype(state, x, dt, A, B, C)
    dtf = dt4.to(ct)
    if bias4 is not None:
        dtf = dtf + bias4.to(ct)
    if dt_softplus:
        dtf = F.softplus(dtf)

    def heads(t):  # [batch, n] or [batch, g, n] -> [batch, h, 1, n]
        t = t.to(ct)
        if t.dim() == 2:
            return t[:, None, None, :]
        g = t.shape[1]
        return t[:, :, None, None, :].expand(bsz, g, h // g, 1, n).reshape(bsz, h, 1, n)

    prev = state4.to(ct)
    if reset is not None:
        prev = torch.where(reset.view(-1, 1, 1, 1), torch.zeros_like(prev), prev)
    new = torch.exp(dtf[..., None] * A4.to(ct)) * prev + (dtf * x4.to(ct))[..., None] * heads(B)
    out = (new * heads(C)).sum(-1)
    if D4 is not None:
        out = out + x4.to(ct) * D4.to(ct)
    if z4 is not None:
        out = out * F.silu(z4.to(ct))
    state4.copy_(new.to(state.dtype))
    return out.to(x.dtype).reshape(x.shape)
