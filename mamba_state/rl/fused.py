"""The packed parameters a fused collection step reads (``collect="graph-fused"``, :mod:`mamba_state.rl.collect`).

:class:`PackedMambaPolicy` (and :class:`PackedGRUPolicy`) keeps one static float32 copy of a
:class:`~mamba_state.rl.policies.MambaPolicy`'s (a ``GRUPolicy``'s) parameters in the layout of
:class:`mamba_state.kernels.rl_step.MambaPolicyWeights` (``GRUPolicyWeights``; layers stacked), allocated once so
that a captured CUDA graph keeps reading the same addresses; :meth:`PackedMambaPolicy.refresh` copies the
current parameters in before each rollout (after every optimizer step they have changed).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import StateError

__all__ = ["PackedMambaPolicy", "PackedGRUPolicy", "pack_policy", "fused_policy_fits"]


def fused_policy_fits(policy: Any) -> tuple[bool, str]:
    """Whether a fused policy kernel can run ``policy`` (a float32 :class:`MambaPolicy` or :class:`GRUPolicy` of
    the sizes the kernels take), and why not."""
    from ..kernels.rl_step import gru_step_fits, policy_step_fits

    from .policies import GRUPolicy, MambaPolicy

    if not isinstance(policy, (MambaPolicy, GRUPolicy)):
        return False, f"the fused policy steps are written for MambaPolicy and GRUPolicy, found {type(policy).__name__}"
    if any(p.dtype != torch.float32 for p in policy.parameters()):
        return False, "the fused policy step needs float32 parameters"
    if isinstance(policy, GRUPolicy):
        return gru_step_fits({"L": policy.num_layers, "O": policy.observation_size, "E": policy.embed.out_features,
                              "H": policy.hidden_size, "NA": policy.num_actions})
    eps = {m.eps for m in [*policy.norms, policy.final_norm]}
    if len(eps) != 1 or any(m.weight is None or m.bias is None for m in [*policy.norms, policy.final_norm]):
        return False, "the fused policy step needs affine LayerNorms with one epsilon"
    return policy_step_fits(_sizes(policy))


def pack_policy(policy: Any) -> "PackedMambaPolicy | PackedGRUPolicy":
    """The packed parameters of ``policy`` for its fused kernel (:func:`fused_policy_fits` must say yes)."""
    from .policies import GRUPolicy

    return PackedGRUPolicy(policy) if isinstance(policy, GRUPolicy) else PackedMambaPolicy(policy)


def _sizes(policy: Any) -> dict[str, int]:
    layer = policy.layers[0]
    return {"L": len(policy.layers), "O": policy.observation_size, "DM": policy.d_model, "DI": layer.d_inner,
            "NS": layer.d_state, "R": layer.dt_rank, "K": layer.d_conv, "NA": policy.num_actions}


class _Packed:
    """Static packed copies of a policy's parameters (see the module docstring): ``_sources`` gives them in the
    kernel's layout, ``weights`` is the kernel's NamedTuple of the static copies."""

    def __init__(self, policy: Any):
        ok, why = fused_policy_fits(policy)
        if not ok:
            raise StateError(f"fused policy step: {why}")
        self.policy = policy
        self._buffers = {name: (None if src is None else src.detach().clone().contiguous())
                         for name, src in self._sources().items()}

    def _sources(self) -> dict[str, torch.Tensor | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the policy's current parameters into the static buffers (in place: the addresses stay)."""
        for name, src in self._sources().items():
            dst = self._buffers[name]
            if dst is None and src is None:
                continue
            if dst is None or src is None or dst.shape != src.shape:
                raise StateError(f"fused policy step: the policy's parameter {name} changed shape or presence "
                                 "since it was packed; build a new collector")
            dst.copy_(src)


class PackedGRUPolicy(_Packed):
    """A :class:`GRUPolicy`'s parameters for the fused GRU kernel (``weights``:
    :class:`mamba_state.kernels.rl_step.GRUPolicyWeights`)."""

    def __init__(self, policy: Any):
        from ..kernels.rl_step import GRUPolicyWeights

        super().__init__(policy)
        self.weights = GRUPolicyWeights(**self._buffers)

    def _sources(self) -> dict[str, torch.Tensor | None]:
        p, g = self.policy, self.policy.gru
        layers = range(p.num_layers)

        def w(kind: str, i: int) -> torch.Tensor:
            return getattr(g, f"{kind}_l{i}").detach()

        rest = ([w("weight_ih", i) for i in layers if i > 0] or [w("weight_hh", 0)])  # placeholder when 1 layer
        return {"emb_w": p.embed.weight, "emb_b": p.embed.bias, "w_ih0": w("weight_ih", 0),
                "w_ih_rest": torch.stack(rest), "b_ih": torch.stack([w("bias_ih", i) for i in layers]),
                "w_hh": torch.stack([w("weight_hh", i) for i in layers]),
                "b_hh": torch.stack([w("bias_hh", i) for i in layers]),
                "act_w": p.actor.weight, "act_b": p.actor.bias, "crit_w": p.critic.weight[0],
                "crit_b": p.critic.bias}


class PackedMambaPolicy(_Packed):
    """A :class:`MambaPolicy`'s parameters for the fused Mamba kernel (``weights``:
    :class:`mamba_state.kernels.rl_step.MambaPolicyWeights`). Raises :class:`StateError` when
    :func:`fused_policy_fits` says no."""

    def __init__(self, policy: Any):
        from ..kernels.rl_step import MambaPolicyWeights

        super().__init__(policy)
        self.weights = MambaPolicyWeights(**self._buffers, eps=float(policy.final_norm.eps))

    def _sources(self) -> dict[str, torch.Tensor | None]:
        """The current parameters in the packed layout (new tensors; the layers stacked)."""
        p = self.policy
        layers = list(p.layers)

        def stack(get: Any) -> torch.Tensor:
            return torch.stack([get(layer).detach().float() for layer in layers])

        def optional(get: Any) -> torch.Tensor | None:
            return None if get(layers[0]) is None else stack(get)

        return {
            "emb_w": p.embed.weight, "emb_b": p.embed.bias,
            "norm_w": torch.stack([n.weight.detach() for n in p.norms]),
            "norm_b": torch.stack([n.bias.detach() for n in p.norms]),
            "in_w": stack(lambda m: m.in_proj.weight), "in_b": optional(lambda m: m.in_proj.bias),
            "conv_w": stack(lambda m: m.conv1d.weight[:, 0]), "conv_b": optional(lambda m: m.conv1d.bias),
            "x_w": stack(lambda m: m.x_proj.weight),
            "dt_w": stack(lambda m: m.dt_proj.weight), "dt_b": stack(lambda m: m.dt_proj.bias),
            "A": stack(lambda m: -torch.exp(m.A_log.float())), "D": stack(lambda m: m.D),
            "out_w": stack(lambda m: m.out_proj.weight), "out_b": optional(lambda m: m.out_proj.bias),
            "fin_w": p.final_norm.weight, "fin_b": p.final_norm.bias,
            "act_w": p.actor.weight, "act_b": p.actor.bias,
            "crit_w": p.critic.weight[0], "crit_b": p.critic.bias,
        }
