"""The parameters of a small Mamba-1 actor-critic packed for the fused collection step: one contiguous float32
tensor per kind, the layers stacked on a leading axis, so one kernel launch reads every layer."""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

__all__ = ["MambaPolicyWeights", "GRUPolicyWeights"]


class MambaPolicyWeights(NamedTuple):
    """Shapes (``L`` layers, ``O`` observation size, ``DM`` d_model, ``DI`` d_inner, ``NS`` d_state, ``R``
    dt_rank, ``K`` d_conv, ``NA`` actions); every tensor float32 and contiguous.

    The policy is ``h = obs @ emb_w.T + emb_b``, then per layer ``h = h + Mamba(LayerNorm(h))`` (one-token
    update with per-row reset), then ``LayerNorm`` and the heads ``logits = h @ act_w.T + act_b``,
    ``value = h @ crit_w + crit_b``. ``A`` is ``-exp(A_log)`` (computed once per refresh, as the layer does each
    call). Optional biases are None when the layers have none (upstream's default: no in/out projection bias).
    """

    emb_w: Tensor  # [DM, O]
    emb_b: Tensor  # [DM]
    norm_w: Tensor  # [L, DM]
    norm_b: Tensor  # [L, DM]
    in_w: Tensor  # [L, 2 * DI, DM]
    in_b: Optional[Tensor]  # [L, 2 * DI]
    conv_w: Tensor  # [L, DI, K]
    conv_b: Optional[Tensor]  # [L, DI]
    x_w: Tensor  # [L, R + 2 * NS, DI]
    dt_w: Tensor  # [L, DI, R]
    dt_b: Tensor  # [L, DI]
    A: Tensor  # [L, DI, NS]
    D: Tensor  # [L, DI]
    out_w: Tensor  # [L, DM, DI]
    out_b: Optional[Tensor]  # [L, DM]
    fin_w: Tensor  # [DM]
    fin_b: Tensor  # [DM]
    act_w: Tensor  # [NA, DM]
    act_b: Tensor  # [NA]
    crit_w: Tensor  # [DM]
    crit_b: Tensor  # [1]
    eps: float  # the LayerNorms' epsilon (all equal)

    @property
    def sizes(self) -> dict[str, int]:
        """``L, O, DM, DI, NS, R, K, NA`` read off the shapes."""
        L, DI, NS = self.A.shape
        return {"L": L, "O": self.emb_w.shape[1], "DM": self.emb_w.shape[0], "DI": DI, "NS": NS,
                "R": self.dt_w.shape[2], "K": self.conv_w.shape[2], "NA": self.act_w.shape[0]}


class GRUPolicyWeights(NamedTuple):
    """A GRU actor-critic ``obs -> Linear(O, E) -> GRU(H, L layers) -> actor, critic`` (``nn.GRU``'s gate order
    r, z, n), every tensor float32 and contiguous.

    ``w_ih_rest`` stacks layers 1.. (``[max(L - 1, 1), 3H, H]``; with one layer a placeholder the kernel does
    not read)."""

    emb_w: Tensor  # [E, O]
    emb_b: Tensor  # [E]
    w_ih0: Tensor  # [3H, E]
    w_ih_rest: Tensor  # [max(L - 1, 1), 3H, H]
    b_ih: Tensor  # [L, 3H]
    w_hh: Tensor  # [L, 3H, H]
    b_hh: Tensor  # [L, 3H]
    act_w: Tensor  # [NA, H]
    act_b: Tensor  # [NA]
    crit_w: Tensor  # [H]
    crit_b: Tensor  # [1]

    @property
    def sizes(self) -> dict[str, int]:
        """``L, O, E, H, NA`` read off the shapes."""
        return {"L": self.w_hh.shape[0], "O": self.emb_w.shape[1], "E": self.emb_w.shape[0],
                "H": self.w_hh.shape[2], "NA": self.act_w.shape[0]}
