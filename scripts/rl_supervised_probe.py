"""Supervised probe of DelayedRecall: can a policy's recurrent core learn the memory at all, without RL?

Trains each controller with cross-entropy on the answer at the cue (fresh episodes every step, no pre-roll)
and prints the training accuracy averaged over blocks of 50 steps. Separates "the architecture cannot hold
the bits through the noise" from "PPO's signal is too weak" (docs/rl.md, CPU observations).

    python scripts/rl_supervised_probe.py --horizon 16 --noise-channels 4 --lr 3e-3 --steps 300
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mamba_state.rl.envs import DelayedRecall
from mamba_state.rl.policies import GRUPolicy, MambaPolicy


def episodes(n: int, horizon: int, noise: int, seed: int, noise_std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` whole episodes: observations ``[n, horizon + 2, O]`` and the right answers ``[n]``."""
    env = DelayedRecall(n, horizon, 1, seed=seed, random_offsets=False, noise_channels=noise, noise_std=noise_std)
    obs, _ = env.reset()
    answers = env.targets().clone()
    seq = [obs]
    for _ in range(horizon + 1):
        obs, *_ = env.step(torch.zeros(n, dtype=torch.long))
        seq.append(obs)
    return torch.stack(seq, 1), answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--horizon", type=int, default=16)
    ap.add_argument("--noise-channels", type=int, default=4)
    ap.add_argument("--noise-std", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--num-layers", type=int, default=1)
    ap.add_argument("--gru-hidden", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    obs_size = 1 + 2 + args.noise_channels
    for name in ("gru", "mamba"):
        torch.manual_seed(0)
        policy = (GRUPolicy(obs_size, 2, hidden_size=args.gru_hidden) if name == "gru"
                  else MambaPolicy(obs_size, 2, d_model=args.d_model, num_layers=args.num_layers, backend="reference"))
        opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
        accs, t0 = [], time.perf_counter()
        for step in range(args.steps):
            x, y = episodes(args.batch, args.horizon, args.noise_channels, step, args.noise_std)
            reset = torch.zeros(x.shape[:2], dtype=torch.bool)
            logits, _, _ = policy.forward_sequence(x, policy.initial_state(args.batch), reset)
            loss = F.cross_entropy(logits[:, -1], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            accs.append(float((logits[:, -1].argmax(-1) == y).float().mean()))
        blocks = [round(sum(accs[i:i + 50]) / len(accs[i:i + 50]), 2) for i in range(0, len(accs), 50)]
        print(f"{name}: horizon {args.horizon}, noise {args.noise_channels} x std {args.noise_std}, lr {args.lr}: "
              f"accuracy per 50 steps {blocks} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
