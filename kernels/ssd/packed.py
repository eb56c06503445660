"""Packed variable-length SSD scans (``cu_seqlens``, batch 1): every sequence from its own initial state, one
final state per sequence, differentiable in everything.

:func:`ssd_scan_packed` lays the sequences side by side as a batch of ``num_seqs`` rows padded to the longest
(:class:`PackedLayout`: one gather in, one gather out, no host loop over sequences) and runs an unpacked scan
over the rows with ``initial_state`` [num_seqs, ...] and ``return_final_state``. The padded steps are exact no-ops:
``dt`` is processed here (bias, softplus, limits) and padded with zeros, so a padded step decays by exp(0) = 1 and
adds dt * x * B = 0, and the scan runs with ``dt_bias=None, dt_softplus=False``; each row's final state is its
sequence's. The scan is :func:`~mamba_state.kernels.ssd.chunked.ssd_scan_chunked` on the CPU; the Mamba-2
adapter passes upstream's Triton ``mamba_chunk_scan_combined`` on CUDA (whose own ``cu_seqlens`` path is
forward-only and takes one initial state per batch row, not per sequence). Padding costs the work of
``num_seqs x longest`` steps; see docs/mamba2.md for when the adapter takes upstream's native packed path.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .._host import host_tensor
from ..scan_inputs import compute_dtype
from ..varlen import check_cu_seqlens
from .naive import _NO_LIMIT, _prep_dt, check_packed_states, check_ssd_inputs

__all__ = ["PackedLayout", "ssd_scan_packed"]


class PackedLayout:
    """Where every packed step goes in the padded batch, from host boundaries ``bounds`` (cu_seqlens as a
    list) on ``device``: ``index`` [num_seqs, longest] (packed position of each padded step, 0 where padded),
    ``valid`` bool [num_seqs, longest], and for every packed step its row ``seq`` and column ``col`` [total]."""

    def __init__(self, bounds: list[int], device: torch.device):
        cu = host_tensor(bounds, torch.long, device)
        starts, lengths = cu[:-1], cu[1:] - cu[:-1]
        self.num_seqs = len(bounds) - 1
        self.total = bounds[-1]
        self.longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        steps = torch.arange(self.longest, device=device)
        self.valid = steps[None, :] < lengths[:, None]
        self.index = torch.where(self.valid, starts[:, None] + steps[None, :], 0)
        self.seq = torch.repeat_interleave(torch.arange(self.num_seqs, device=device), lengths,
                                           output_size=self.total)
        self.col = torch.arange(self.total, device=device) - starts[self.seq]

    def pad(self, t: Tensor) -> Tensor:
        """[1, total, ...] -> [num_seqs, longest, ...], zeros at padded steps (bool: False)."""
        g = t[0][self.index]
        mask = self.valid.view(*self.valid.shape, *([1] * (t.dim() - 2)))
        return g & mask if g.dtype == torch.bool else g * mask.to(g.dtype)

    def unpad(self, t: Tensor) -> Tensor:
        """[num_seqs, longest, ...] -> [1, total, ...]."""
        return t[self.seq, self.col][None]


def ssd_scan_packed(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                    z: Optional[Tensor] = None, initial_state: Optional[Tensor] = None,
                    reset: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
                    dt_limit: tuple[float, float] = _NO_LIMIT, return_final_state: bool = False, *,
                    cu_seqlens: Any, scan: Callable[..., Any]) -> Any:
    """SSD over packed sequences; shapes as :func:`~mamba_state.kernels.ssd.ssd_scan_ref` with batch 1
    (``x`` [1, total, nheads, headdim], ...), plus:

    Args:
        cu_seqlens: int32/int64 [num_seqs + 1] (or a list), sequence i is steps cu[i]:cu[i + 1] (may be empty).
        initial_state: [num_seqs, nheads, headdim, dstate] or None (zeros); any float dtype.
        reset: bool [1, total]; still restarts a sequence from zero inside it.
        scan: the unpacked scan run over the padded rows (:func:`ssd_scan_chunked` on the CPU): called as
            ``scan(x, dt, A, B, C, D=, z=, initial_state=, reset=, dt_bias=None, dt_softplus=False,
            return_final_state=True)`` with batch num_seqs, returning ``(y, final)``.

    Returns:
        ``y`` [1, total, nheads, headdim] in x's dtype, or ``(y, final_state)`` with ``final_state``
        [num_seqs, nheads, headdim, dstate] in the compute dtype (an empty sequence's is its initial state).
    Raises:
        StateShapeError: bad boundaries (:func:`~mamba_state.kernels.varlen.check_cu_seqlens`), batch != 1,
            initial states whose rows are not num_seqs, or any shape :func:`check_ssd_inputs` refuses.
    """
    s = check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, None, reset)
    cu = cu_seqlens if isinstance(cu_seqlens, Tensor) else torch.tensor(cu_seqlens, dtype=torch.int64)
    num_seqs = check_cu_seqlens(cu, s.seqlen, s.batch)
    check_packed_states(initial_state, num_seqs, s.nheads, s.headdim, s.dstate)
    ct = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_state)
    h0 = (initial_state.to(ct) if initial_state is not None
          else torch.zeros(num_seqs, s.nheads, s.headdim, s.dstate, dtype=ct, device=x.device))
    if s.seqlen == 0:
        y = x.new_zeros(x.shape)
        return (y, h0) if return_final_state else y
    layout = PackedLayout([int(v) for v in cu.tolist()], x.device)
    dtp = _prep_dt(dt, dt_bias, dt_softplus, dt_limit, ct)  # processed here: padded steps get dt = 0 exactly
    y, final = scan(layout.pad(x), layout.pad(dtp), A, layout.pad(B), layout.pad(C), D=D,
                    z=None if z is None else layout.pad(z), initial_state=h0,
                    reset=None if reset is None else layout.pad(reset), dt_bias=None, dt_softplus=False,
                    return_final_state=True)
    y = layout.unpad(y)
    return (y, final.to(ct)) if return_final_state else y
