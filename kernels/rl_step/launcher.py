"""Launchers of the fused collection step's kernels (CUDA, or the interpreter). Both write into buffers the caller
allocated once (the graph-ready collector's static tensors) and read the step index from a device counter, so a
CUDA graph that captured one launch replays it at every step. No argument checks here beyond shapes the kernels
rely on: the caller (``mamba_state.rl.fused``) builds every tensor."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mamba_state.errors import StateShapeError

from .._device import launch_device
from .weights import GRUPolicyWeights, MambaPolicyWeights

__all__ = ["mamba_policy_step", "gru_policy_step", "gru_step_fits", "recall_env_step", "POLICY_ROWS", "POLICY_CHANNELS", "POLICY_WARPS", "policy_step_fits"]

POLICY_ROWS = 16  # environment rows per program (tl.dot needs 16 or more)
# channels per block and warps a program: compiled for sm_90 (benchmarks/compile_rl_step_sm90.py) 16 channels
# and 8 warps spill nothing at the small and default policies, where 32 channels or 4 warps spill 80-700 B a thread
POLICY_CHANNELS, POLICY_WARPS = 16, 8
_LIMITS = {"O": 256, "DM": 256, "DI": 1024, "NS": 64, "R": 64, "K": 8, "NA": 256}


def _pow2(x: int, least: int = 1) -> int:
    return max(least, 1 << (max(int(x), 1) - 1).bit_length())


def _p2(x: int) -> int:
    return _pow2(x, 16)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def policy_step_fits(sizes: dict[str, int]) -> tuple[bool, str]:
    """Whether the fused policy kernel takes a policy of these sizes (``MambaPolicyWeights.sizes``), and why not:
    every row's activations and one channel block of its states live in registers."""
    over = [f"{k} = {sizes[k]} > {v}" for k, v in _LIMITS.items() if sizes[k] > v]
    return (not over), ("fits" if not over else "too large for the fused kernel: " + ", ".join(over))


def _c(t: Tensor, shape: list[int], name: str) -> None:
    if list(t.shape) != shape or not t.is_contiguous() or t.dtype not in (torch.float32, torch.uint8, torch.int64):
        raise StateShapeError(f"{name}: expected a contiguous tensor {shape}, found {t.dtype} {list(t.shape)} "
                              f"(contiguous: {t.is_contiguous()})")


def _check_step(op: str, fits: tuple[bool, str], s: dict[str, int], obs: Tensor, reset: Tensor, q: Tensor,
                *states: tuple[Tensor, list[int], str]) -> None:
    """The layouts a policy kernel relies on (obs, reset, q and each ``(state, shape, name)``) and its size
    limits (``fits``: a ``*_fits`` answer); raises StateShapeError naming what is off."""
    n = obs.shape[0]
    for tensor, shape, name in ((obs, [n, s["O"]], "obs"), (reset, [n], "reset"), (q, [n, s["NA"]], "q"), *states):
        _c(tensor, shape, name)
    if not fits[0]:
        raise StateShapeError(f"{op}: {fits[1]}")


def mamba_policy_step(w: MambaPolicyWeights, obs: Tensor, reset: Tensor, q: Tensor, t: Tensor, conv: Tensor,
                      ssm: Tensor, obs_buf: Tensor, reset_buf: Tensor, action_buf: Tensor, logp_buf: Tensor,
                      value_buf: Tensor) -> None:
    """The policy step of every row at step ``t`` (int64 ``[1]`` on the device), in place.

    Args:
        obs: float32 ``[N, O]``; reset: uint8 ``[N]`` (1: clear the row's states first; a bool tensor's
            ``view(torch.uint8)``); q: float32 ``[N, NA]`` the sampler's Exp(1) draws.
        conv, ssm: float32 ``[L, N, DI, K]``, ``[L, N, DI, NS]``: read, then overwritten by the new states.
        obs_buf ``[T, N, O]``, reset_buf uint8 ``[T, N]``: receive obs and reset at ``t``; action_buf int64,
            logp_buf and value_buf float32 ``[T, N]``: the sampled action, its log-probability and the value.
    """
    s = w.sizes
    n = obs.shape[0]
    _check_step("mamba_policy_step", policy_step_fits(s), s, obs, reset, q,
                (conv, [s["L"], n, s["DI"], s["K"]], "conv"), (ssm, [s["L"], n, s["DI"], s["NS"]], "ssm"))
    from . import triton_kernels as K  # triton is optional: imported where a kernel runs

    with launch_device(obs):
        K._mamba_policy_step_kernel[(_cdiv(n, POLICY_ROWS),)](
            obs, reset, q, t, conv, ssm,
            w.emb_w, w.emb_b, w.norm_w, w.norm_b, w.in_w, w.in_b, w.conv_w, w.conv_b, w.x_w, w.dt_w, w.dt_b, w.A,
            w.D, w.out_w, w.out_b, w.fin_w, w.fin_b, w.act_w, w.act_b, w.crit_w, w.crit_b,
            obs_buf, reset_buf, action_buf, logp_buf, value_buf,
            n, float(w.eps),
            O=s["O"], DM=s["DM"], DI=s["DI"], NS=s["NS"], R=s["R"], K=s["K"], NA=s["NA"], L=s["L"],
            BN=POLICY_ROWS, OP=_p2(s["O"]), DMP=_p2(s["DM"]), NSP=_p2(s["NS"]), RP=_p2(s["R"]), AP=_p2(s["NA"]),
            BD=POLICY_CHANNELS, num_warps=POLICY_WARPS)


# a program holds the gates' whole [BN, H] x [H, H] products: compiled for sm_90, hidden 32 / embed 64 (the RL
# recipe's GRU) on 4 warps spills nothing, hidden 64 / embed 64 on 8 warps 0.3 KB a thread, and wider ones
# (hidden 120) KBs, so those keep the graph path's policy step
_GRU_LIMITS = {"O": 256, "E": 64, "H": 64, "NA": 256}


def gru_warps(sizes: dict[str, int]) -> int:
    """Warps a program of the GRU kernel: 4 at hidden <= 32 (no spills), else 8 (4 spill KBs)."""
    return 4 if sizes["H"] <= 32 else 8


def gru_step_fits(sizes: dict[str, int]) -> tuple[bool, str]:
    """Whether the fused GRU kernel takes a policy of these sizes (``GRUPolicyWeights.sizes``), and why not."""
    over = [f"{k} = {sizes[k]} > {v}" for k, v in _GRU_LIMITS.items() if sizes[k] > v]
    return (not over), ("fits" if not over else "too large for the fused kernel: " + ", ".join(over))


def gru_policy_step(w: GRUPolicyWeights, obs: Tensor, reset: Tensor, q: Tensor, t: Tensor, h: Tensor,
                    obs_buf: Tensor, reset_buf: Tensor, action_buf: Tensor, logp_buf: Tensor,
                    value_buf: Tensor) -> None:
    """The GRU policy's step of every row at step ``t``, in place: as :func:`mamba_policy_step`, with the carried
    state h float32 ``[N, L, H]`` (read, then overwritten)."""
    s = w.sizes
    n = obs.shape[0]
    _check_step("gru_policy_step", gru_step_fits(s), s, obs, reset, q, (h, [n, s["L"], s["H"]], "h"))
    from . import triton_kernels as K
    with launch_device(obs):
        K._gru_policy_step_kernel[(_cdiv(n, POLICY_ROWS),)](
            obs, reset, q, t, h, w.emb_w, w.emb_b, w.w_ih0, w.w_ih_rest, w.b_ih, w.w_hh, w.b_hh,
            w.act_w, w.act_b, w.crit_w, w.crit_b, obs_buf, reset_buf, action_buf, logp_buf, value_buf, n,
            O=s["O"], E=s["E"], H=s["H"], NA=s["NA"], L=s["L"], BN=POLICY_ROWS, OP=_p2(s["O"]),
            EP=_p2(s["E"]), HP=_p2(s["H"]), AP=_p2(s["NA"]), num_warps=gru_warps(s))


def recall_env_step(t: Tensor, action_buf: Tensor, phase: Tensor, bits: Tensor, ep_return: Tensor,
                    ep_steps: Tensor, reset: Tensor, obs: Tensor, new_bits: Tensor, noise_bits: Optional[Tensor],
                    noise: Optional[Tensor], reward_buf: Tensor, done_buf: Tensor, successes: Tensor,
                    episodes: Tensor, return_sum: Tensor, horizon: int, shaping: float, noise_std: float,
                    age: Optional[Tensor] = None) -> None:
    """One delayed-recall step of every row at step ``t`` in place (``recall_env_step_ref`` and the next
    ``recall_observation_ref``).

    Args:
        action_buf: int64 ``[T, N]`` (reads row ``t``); phase, ep_steps: int64 ``[N]``; bits, new_bits and
            noise_bits (None: no distractor bits): int64 ``[N, K]``; ep_return: float32 ``[N]``; noise: float32
            ``[N, C]`` or None; reset uint8 ``[N]`` and obs float32 ``[N, K + 2 + C]``: overwritten with the next
            step's; reward_buf float32 and done_buf uint8 ``[T, N]`` (row ``t`` written); successes, episodes:
            int64 ``[]``, return_sum: float64 ``[]`` (added to); age: int64 ``[N]`` or None (advanced first).
    """
    n, kb = bits.shape
    nc = 0 if noise is None else noise.shape[1]
    from . import triton_kernels as K

    block = 128
    with launch_device(obs):
        K._recall_env_step_kernel[(_cdiv(n, block),)](
            action_buf, t, phase, bits, ep_return, ep_steps, age, reset, obs, new_bits, noise_bits, noise,
            reward_buf, done_buf, successes, episodes, return_sum,
            n, int(horizon), float(noise_std), float(1 - shaping), float(shaping),
            KB=kb, NC=nc, SHAPING=shaping > 0, BLOCK=block, KBP=_pow2(kb),
            NCP=_pow2(nc), num_warps=4)
