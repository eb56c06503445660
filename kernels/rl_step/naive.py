"""References of the fused collection step's two kernels, in plain PyTorch (float64-capable, out of place):

* :func:`mamba_policy_step_ref`: a small Mamba-1 actor-critic's one-token step from packed weights
  (:class:`~.weights.MambaPolicyWeights`), with per-row reset, followed by the sampler ``argmax(probs / q)``
  and the chosen action's log-probability;
* :func:`recall_env_step_ref` and :func:`recall_observation_ref`: one step of the delayed-recall environment
  (``mamba_state.rl.envs.DelayedRecall``'s dynamics, its random draws given), as the graph-ready collector
  runs it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .weights import GRUPolicyWeights, MambaPolicyWeights

__all__ = ["mamba_policy_step_ref", "gru_policy_step_ref", "recall_env_step_ref", "recall_observation_ref"]


def _linear(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


def _layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], w.to(x.dtype), b.to(x.dtype), eps)


def mamba_policy_step_ref(w: MambaPolicyWeights, obs: Tensor, reset: Tensor, q: Tensor, conv: Tensor, ssm: Tensor
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One collection step of the packed policy for ``N`` rows, computed in ``obs``'s dtype.

    Args:
        obs: ``[N, O]`` float; reset: bool ``[N]`` (clear the row's states first); q: ``[N, NA]`` the sampler's
            Exp(1) draws; conv: ``[L, N, DI, K]`` and ssm: ``[L, N, DI, NS]`` the carried states (not modified).

    Returns:
        ``(action [N] int64, logp [N], value [N], conv_new, ssm_new)``.
    """
    dt_rank, ns = w.dt_w.shape[2], w.A.shape[2]
    keep = (~reset).to(obs.dtype)
    h = _linear(obs, w.emb_w, w.emb_b)
    convs, ssms = [], []
    for i in range(w.A.shape[0]):
        u = _layer_norm(h, w.norm_w[i], w.norm_b[i], w.eps)
        xz = _linear(u, w.in_w[i], None if w.in_b is None else w.in_b[i])
        x_in, z = xz.chunk(2, dim=-1)
        window = torch.cat([conv[i, :, :, 1:].to(obs.dtype) * keep[:, None, None], x_in[:, :, None]], dim=-1)
        xc = (window * w.conv_w[i].to(obs.dtype)).sum(-1)
        if w.conv_b is not None:
            xc = xc + w.conv_b[i].to(obs.dtype)
        xc = F.silu(xc)
        dtin, B, C = torch.split(_linear(xc, w.x_w[i], None), [dt_rank, ns, ns], dim=-1)
        dt = F.softplus(_linear(dtin, w.dt_w[i], w.dt_b[i]))
        s = ssm[i].to(obs.dtype) * keep[:, None, None]
        s = torch.exp(dt[:, :, None] * w.A[i].to(obs.dtype)) * s + (dt * xc)[:, :, None] * B[:, None, :]
        y = (s * C[:, None, :]).sum(-1) + w.D[i].to(obs.dtype) * xc
        y = y * F.silu(z)
        h = h + _linear(y, w.out_w[i], None if w.out_b is None else w.out_b[i])
        convs.append(window)
        ssms.append(s)
    hf = _layer_norm(h, w.fin_w, w.fin_b, w.eps)
    logits = _linear(hf, w.act_w, w.act_b)
    value = hf @ w.crit_w.to(obs.dtype) + w.crit_b.to(obs.dtype)
    action, logp = _sample(logits, q)
    return action, logp, value, torch.stack(convs).to(conv.dtype), torch.stack(ssms).to(ssm.dtype)


def _sample(logits: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    action = (torch.softmax(logits, dim=-1) / q.to(logits.dtype)).argmax(-1)
    return action, torch.log_softmax(logits, dim=-1).gather(-1, action[:, None]).squeeze(-1)


def gru_policy_step_ref(w: GRUPolicyWeights, obs: Tensor, reset: Tensor, q: Tensor, h: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One collection step of the packed GRU policy, computed in ``obs``'s dtype with the GRU equations written
    out (``r = sigma(W_ir x + b_ir + W_hr h + b_hr)``, ``z`` likewise, ``n = tanh(W_in x + b_in + r (W_hn h +
    b_hn))``, ``h' = (1 - z) n + z h``). h: ``[N, L, H]`` (not modified). Returns ``(action, logp, value, h_new)``."""
    L, H = w.w_hh.shape[0], w.w_hh.shape[2]
    x = _linear(obs, w.emb_w, w.emb_b)
    keep = (~reset).to(obs.dtype)[:, None]
    new = []
    for i in range(L):
        w_ih = w.w_ih0 if i == 0 else w.w_ih_rest[i - 1]
        gi = _linear(x, w_ih, w.b_ih[i])
        hp = h[:, i].to(obs.dtype) * keep
        gh = _linear(hp, w.w_hh[i], w.b_hh[i])
        r = torch.sigmoid(gi[:, :H] + gh[:, :H])
        z = torch.sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
        n = torch.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
        x = (1 - z) * n + z * hp
        new.append(x)
    logits = _linear(x, w.act_w, w.act_b)
    value = x @ w.crit_w.to(obs.dtype) + w.crit_b.to(obs.dtype)
    action, logp = _sample(logits, q)
    return action, logp, value, torch.stack(new, dim=1).to(h.dtype)


def recall_observation_ref(phase: Tensor, bits: Tensor, horizon: int, noise_bits: Optional[Tensor],
                           noise: Optional[Tensor], noise_std: float) -> Tensor:
    """The delayed-recall observation ``[N, K + 2 + noise channels]`` float32 of the phases ``[N]`` and bits
    ``[N, K]`` (int64), given the step's distractor bits ``[N, K]`` and noise ``[N, C]`` draws (None when off)."""
    shown = phase == 0
    signs = bits.float() * 2 - 1
    if noise_bits is not None:
        distract = ((phase >= 1) & (phase <= horizon))[:, None]
        bit_channels = torch.where(distract, noise_bits.float() * 2 - 1, 0.0)
    else:
        bit_channels = torch.zeros_like(signs)
    parts = [torch.where(shown[:, None], signs, bit_channels), shown.float()[:, None],
             (phase == horizon + 1).float()[:, None]]
    if noise is not None:
        parts.append(noise * noise_std)
    return torch.cat(parts, dim=1)


def recall_env_step_ref(action: Tensor, phase: Tensor, bits: Tensor, ep_return: Tensor, ep_steps: Tensor,
                        new_bits: Tensor, horizon: int, shaping: float) -> dict[str, Tensor]:
    """One delayed-recall step with same-step autoreset, out of place.

    Args:
        action: ``[N]`` int64; phase, ep_steps: ``[N]`` int64; bits, new_bits: ``[N, K]`` int64 (the new
            episodes' bits, drawn for every row); ep_return: ``[N]`` float32.

    Returns:
        ``reward`` float32 ``[N]``, ``done`` bool (at the cue), ``success`` bool, ``episode_return`` (of the
        episodes that end, else 0) and the environment's next ``phase``, ``bits``, ``ep_return``, ``ep_steps``.
    """
    powers = 2 ** torch.arange(bits.shape[1], device=bits.device)
    at_cue = phase == horizon + 1
    correct = action == (bits * powers).sum(-1)
    reward = correct.float()
    if shaping > 0:
        answered = (action[:, None] // powers) % 2
        frac = (answered == bits).float().mean(-1)
        reward = (1 - shaping) * reward + shaping * frac
    reward = torch.where(at_cue, reward, 0.0)
    ret = ep_return + reward
    return {"reward": reward, "done": at_cue, "success": at_cue & correct,
            "episode_return": torch.where(at_cue, ret, 0.0),
            "phase": torch.where(at_cue, 0, phase + 1), "bits": torch.where(at_cue[:, None], new_bits, bits),
            "ep_return": torch.where(at_cue, 0.0, ret), "ep_steps": torch.where(at_cue, 0, ep_steps + 1)}
