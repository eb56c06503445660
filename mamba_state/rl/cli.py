"""``mamba-state rl``: recurrent PPO on DelayedRecall (one run), or ``--scale`` for the horizon sweep.

One run::

    mamba-state rl --controller {mamba,gru} --horizon H --num-bits K --num-envs N --total-updates U \\
        --seed S --device D --out DIR [--resume]

Sweep (both controllers, every horizon, every seed; results JSON and plot under DIR)::

    mamba-state rl --scale --horizons H1 H2 ... --seeds 0 1 --out DIR [--resume]

Data-parallel (DistributedDataParallel; ``--num-envs`` is the total over all processes)::

    torchrun --standalone --nproc_per_node=W -m mamba_state.cli rl ... [--scale ...]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .train import DEFAULTS

__all__ = ["add_arguments", "run", "options_from_args"]

D = DEFAULTS
# --scale's lists when not given (argparse defaults stay None so that run() can refuse them without --scale)
SWEEP_DEFAULTS: dict[str, list] = {"horizons": [8, 16, 32], "seeds": [0, 1], "controllers": ["mamba", "gru"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``rl`` options on ``parser``."""
    g = parser.add_argument_group("run")
    g.add_argument("--controller", choices=["mamba", "gru"], default=D["controller"])
    g.add_argument("--horizon", type=int, default=D["horizon"], help="distractor steps between bits and cue")
    g.add_argument("--num-bits", type=int, default=D["num_bits"], help="bits to remember (2**K actions)")
    g.add_argument("--num-envs", type=int, default=D["num_envs"], help="default: %(default)s")
    g.add_argument("--total-updates", type=int, default=D["total_updates"], help="default: %(default)s")
    g.add_argument("--seed", type=int, default=D["seed"], help="default: %(default)s")
    g.add_argument("--device", default=D["device"], help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    g.add_argument("--out", default=D["out"], help="output folder (config, metrics, checkpoint, summary); default: %(default)s")
    g.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt (exactly) if present")
    g.add_argument("--checkpoint-every", type=int, default=D["checkpoint_every"], help="updates (0: only at the end)")
    g.add_argument("--eval-envs", type=int, default=D["eval_envs"], help="greedy evaluation episodes at the end")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    g.add_argument("--threads", type=int, default=D["threads"], help="torch CPU threads (default: torch's)")
    g.add_argument("--max-seconds", type=float, default=D["max_seconds"],
                   help="stop training after the first update that ends past this many seconds, then evaluate (0: no limit)")
    g.add_argument("--init-from", default=D["init_from"], metavar="RUN",
                   help="start from the policy parameters of another run (DIR or DIR/checkpoint.pt; curriculum); "
                        "{controller} and {seed} are filled in, e.g. runs/h32/{controller}_h32_s{seed}")
    g.add_argument("--eval-horizons", type=int, nargs="+", default=D["eval_horizons"],
                   help="also evaluate the trained policy greedily at these horizons (summary: eval_at_horizons)")
    p = parser.add_argument_group("PPO")
    p.add_argument("--rollout-len", type=int, default=D["rollout_len"], help="steps per rollout (default 2*(H+2))")
    p.add_argument("--lr", type=float, default=D["lr"])
    p.add_argument("--epochs", type=int, default=D["epochs"])
    p.add_argument("--minibatches", type=int, default=D["minibatches"], help="minibatches over environments")
    p.add_argument("--gamma", type=float, default=D["gamma"])
    p.add_argument("--gae-lambda", type=float, default=D["gae_lambda"])
    p.add_argument("--clip-coef", type=float, default=D["clip_coef"])
    p.add_argument("--ent-coef", type=float, default=D["ent_coef"])
    p.add_argument("--vf-coef", type=float, default=D["vf_coef"])
    p.add_argument("--max-grad-norm", type=float, default=D["max_grad_norm"])
    p.add_argument("--bptt", choices=["rollout", "episode"], default=D["bptt"],
                   help="truncate backprop at the rollout start, or backprop through whole episodes")
    m = parser.add_argument_group("model")
    m.add_argument("--d-model", type=int, default=D["d_model"])
    m.add_argument("--num-layers", type=int, default=D["num_layers"])
    m.add_argument("--d-state", type=int, default=D["d_state"])
    m.add_argument("--gru-hidden", type=int, default=D["gru_hidden"])
    m.add_argument("--gru-layers", type=int, default=D["gru_layers"])
    m.add_argument("--dt-min", type=float, default=D["dt_min"],
                   help="Mamba: smallest initial step size dt (upstream's dt_min; floored at 1e-4 like upstream's "
                        "dt_init_floor); default: %(default)s")
    m.add_argument("--dt-max", type=float, default=D["dt_max"],
                   help="Mamba: largest initial dt; a channel keeps exp(A * dt) of its state per step, so smaller "
                        "dt starts with longer memory; default: %(default)s")
    m.add_argument("--backend", choices=["auto", "reference", "triton"], default=D["backend"],
                   help="Mamba scan backend (default: MAMBA_STATE_BACKEND or auto)")
    e = parser.add_argument_group("environment")
    e.add_argument("--noise-channels", type=int, default=D["noise_channels"])
    e.add_argument("--noise-std", type=float, default=D["noise_std"])
    e.add_argument("--distractor-bits", action="store_true",
                   help="random +-1 on the bit channels between the first step and the cue (default: zeros)")
    e.add_argument("--shaping", type=float, default=D["shaping"], help="partial credit per right bit (0: off)")
    s = parser.add_argument_group("scale sweep")
    s.add_argument("--scale", action="store_true", help="train both controllers across --horizons and --seeds")
    shown = {k: "default: " + " ".join(map(str, v)) for k, v in SWEEP_DEFAULTS.items()}
    s.add_argument("--horizons", type=int, nargs="+", default=None, help=shown["horizons"])
    s.add_argument("--seeds", type=int, nargs="+", default=None, help=shown["seeds"])
    s.add_argument("--controllers", nargs="+", choices=["mamba", "gru"], default=None, help=shown["controllers"])


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The option dict of :func:`mamba_state.rl.train.train` from parsed arguments."""
    return {k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)}


def run(args: argparse.Namespace) -> int:
    """Entry point of ``mamba-state rl``; returns the exit status."""
    from ..errors import StateError
    from .ddp import distributed

    opts = options_from_args(args)
    where = ""
    sweep_only = [f"--{k}" for k in ("horizons", "seeds", "controllers") if getattr(args, k, None) is not None]
    if sweep_only and not args.scale:
        print(f"mamba-state rl: error: {' '.join(sweep_only)} only apply with --scale (one run takes --horizon, "
              "--seed and --controller)", file=sys.stderr)
        return 2
    try:
        # Under torchrun: one process group for the whole command (a sweep trains many runs in it).
        with distributed(opts.get("device")) as ctx:
            where = f" (rank {ctx.rank} of {ctx.world_size})" if ctx.enabled else ""
            if args.scale:
                from .scale import run_scale

                sweep = {k: v if (v := getattr(args, k)) is not None else d for k, d in SWEEP_DEFAULTS.items()}
                run_scale(opts, sweep["horizons"], controllers=sweep["controllers"], seeds=sweep["seeds"])
            else:
                from .train import train

                train(opts)
    except StateError as exc:  # bad options or a mismatched checkpoint: a message, not a traceback
        print(f"mamba-state rl: error{where}: {exc}", file=sys.stderr)
        return 2
    return 0
