"""``mamba-state rl``: recurrent PPO on DelayedRecall (one run), or ``--scale`` for the horizon sweep.

One run::

    mamba-state rl --controller {mamba,gru} --horizon H --num-bits K --num-envs N --total-updates U \\
        --seed S --device D --out DIR [--resume]

Sweep (both controllers, every horizon, every seed; results JSON and plot under DIR)::

    mamba-state rl --scale --horizons H1 H2 ... --seeds 0 1 --out DIR [--resume]

The original claim's command lines work as they were written (``--mode quick`` is one run, ``--mode scale`` is
``--scale``)::

    mamba-state rl --mode quick --controller mamba --horizon 20000 --num-bits 4 --total-updates 300
    mamba-state rl --mode scale --horizons 1000 5000 10000 20000

Data-parallel (DistributedDataParallel; ``--num-envs`` is the total over all processes)::

    torchrun --standalone --nproc_per_node=W -m mamba_state.cli rl ... [--scale ...]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .._cli_util import BACKEND_HELP, DEVICE_HELP, add_deprecated_alias, one_line, resolve_device
from .defaults import DEFAULTS, SWEEP_DEFAULTS

# This module only imports torch inside run(): ``mamba-state rl --help`` builds its parser without it.
__all__ = ["add_arguments", "run", "options_from_args"]

D = DEFAULTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``rl`` options on ``parser`` (defaults: :data:`mamba_state.rl.defaults.DEFAULTS`)."""
    g = parser.add_argument_group("run")
    g.add_argument("--mode", choices=["quick", "scale"], default=None,
                   help="the original claim's spelling: 'quick' is one run (the default), 'scale' the sweep "
                        "(the same as --scale)")
    g.add_argument("--controller", choices=["mamba", "gru"], default=D["controller"], help="recurrent policy")
    g.add_argument("--horizon", type=int, default=D["horizon"], help="distractor steps between bits and cue")
    g.add_argument("--num-bits", type=int, default=D["num_bits"], help="bits to remember (2**K actions)")
    g.add_argument("--num-envs", type=int, default=D["num_envs"],
                   help="environments run side by side (under torchrun: the total over all processes)")
    g.add_argument("--total-updates", type=int, default=D["total_updates"], help="PPO updates to train for")
    g.add_argument("--seed", type=int, default=D["seed"], help="random seed (policy, environments, sampling)")
    g.add_argument("--device", default=D["device"], help=DEVICE_HELP + "; under torchrun, rank r uses cuda:LOCAL_RANK")
    g.add_argument("--out", default=D["out"], help="output folder (config, metrics, checkpoint, summary)")
    g.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt (exactly) if present")
    g.add_argument("--checkpoint-every", type=int, default=D["checkpoint_every"],
                   help="write the checkpoint every this many updates (0: only at the end)")
    g.add_argument("--eval-envs", type=int, default=D["eval_envs"], help="greedy evaluation episodes at the end")
    g.add_argument("--eval-mode", choices=["step", "open-loop"], default=D["eval_mode"],
                   help="final evaluation at the training horizon: step by step, or open loop (whole episodes "
                        "through forward_sequence in chunks; the same episodes and answers, fast at long horizons)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (tqdm, with an ETA; without tqdm a line every 10 updates)")
    g.add_argument("--threads", type=int, default=D["threads"],
                   help="torch CPU threads; 0: torch's own count (default: 1 on a CPU device, as the demo; "
                        "torch's own count on a GPU)")
    g.add_argument("--max-seconds", type=float, default=D["max_seconds"],
                   help="stop training after the first update that ends past this many seconds, then evaluate "
                        "(default: no limit)")
    g.add_argument("--init-from", default=D["init_from"], metavar="RUN",
                   help="start from the policy parameters of another run (DIR or DIR/checkpoint.pt; curriculum); "
                        "{controller} and {seed} are filled in, e.g. runs/h32/{controller}_h32_s{seed} "
                        "(default: a fresh policy)")
    g.add_argument("--eval-horizons", type=int, nargs="+", default=D["eval_horizons"], metavar="H",
                   help="also evaluate the trained policy greedily at these horizons (summary: eval_at_horizons; "
                        "default: none)")
    g.add_argument("--collect", choices=["auto", "eager", "graph", "graph-compiled", "graph-fused"],
                   default=D["collect"],
                   help="rollout collection: 'graph' captures one step (policy, sampling, environment, storage) "
                        "as CUDA graphs and replays them (run eagerly on a CPU, same transitions), "
                        "'graph-compiled' the same with the policy step through torch.compile (fewer kernels, "
                        "equal up to float rounding), 'graph-fused' the same with the Mamba policy step and the "
                        "environment step as two Triton kernels (equal up to float rounding), 'eager' one "
                        "policy.step per time step from Python (0.1's "
                        "path); auto: graph on CUDA, else eager")
    g.add_argument("--graph-steps", type=int, default=D["graph_steps"],
                   help="time steps per captured CUDA graph with --collect graph")
    p = parser.add_argument_group("PPO")
    p.add_argument("--rollout-len", type=int, default=D["rollout_len"],
                   help="steps per rollout (default: 2*(H+2), at least 32)")
    p.add_argument("--lr", type=float, default=D["lr"], help="Adam learning rate")
    p.add_argument("--epochs", type=int, default=D["epochs"], help="passes over each rollout")
    p.add_argument("--minibatches", type=int, default=D["minibatches"], help="minibatches over environments")
    p.add_argument("--gamma", type=float, default=D["gamma"], help="discount")
    p.add_argument("--gae-lambda", type=float, default=D["gae_lambda"], help="GAE lambda")
    p.add_argument("--clip-coef", type=float, default=D["clip_coef"], help="PPO ratio clip")
    p.add_argument("--ent-coef", type=float, default=D["ent_coef"], help="entropy bonus")
    p.add_argument("--vf-coef", type=float, default=D["vf_coef"], help="value loss weight")
    p.add_argument("--max-grad-norm", type=float, default=D["max_grad_norm"], help="gradient norm clip")
    p.add_argument("--bptt", choices=["rollout", "episode"], default=D["bptt"],
                   help="truncate backprop at the rollout start, or backprop through whole episodes")
    m = parser.add_argument_group("model")
    m.add_argument("--d-model", type=int, default=D["d_model"], help="Mamba: width")
    m.add_argument("--n-layer", dest="num_layers", metavar="N_LAYER", type=int, default=D["num_layers"],
                   help="Mamba: layers (upstream's n_layer)")
    add_deprecated_alias(m, "--num-layers", "--n-layer", dest="num_layers", type=int)
    m.add_argument("--d-state", type=int, default=D["d_state"], help="Mamba: SSM state size")
    m.add_argument("--gru-hidden", type=int, default=D["gru_hidden"], help="GRU: hidden size")
    m.add_argument("--gru-layers", type=int, default=D["gru_layers"], help="GRU: layers")
    m.add_argument("--dt-min", type=float, default=D["dt_min"],
                   help="Mamba: smallest initial step size dt (upstream's dt_min; floored at 1e-4 like upstream's "
                        "dt_init_floor)")
    m.add_argument("--dt-max", type=float, default=D["dt_max"],
                   help="Mamba: largest initial dt; a channel keeps exp(A * dt) of its state per step, so smaller "
                        "dt starts with longer memory")
    m.add_argument("--dt-init-floor", type=float, default=D["dt_init_floor"],
                   help="Mamba: clamp of the initial dt (upstream's dt_init_floor); lower it for --dt-min < 1e-4")
    m.add_argument("--dt-bias-init", choices=["upstream", "chrono"], default=D["dt_bias_init"],
                   help="Mamba: 'chrono' draws each channel's time scale 1/dt uniformly in [1, --chrono-tmax] "
                        "(Tallec & Ollivier 2018; docs/rl.md)")
    m.add_argument("--chrono-tmax", type=float, default=D["chrono_tmax"],
                   help="Mamba: the longest time scale of --dt-bias-init chrono (default: horizon + 2)")
    m.add_argument("--a-init", choices=["upstream", "memory"], default=D["a_init"],
                   help="Mamba: 'memory' gives --memory-fraction of the channels A such that their per-step "
                        "retention at the initial dt lies in --memory-retention (an LRU-style ring, Orvieto et al. "
                        "2023; docs/rl.md)")
    m.add_argument("--memory-fraction", type=float, default=D["memory_fraction"],
                   help="Mamba: fraction of channels re-initialised by --a-init memory")
    m.add_argument("--memory-retention", type=float, nargs=2, default=D["memory_retention"],
                   metavar=("R_MIN", "R_MAX"), help="Mamba: per-step retention range of --a-init memory")
    m.add_argument("--backend", choices=["auto", "reference", "triton"], default=D["backend"],
                   help="Mamba " + BACKEND_HELP)
    e = parser.add_argument_group("environment")
    e.add_argument("--noise-channels", type=int, default=D["noise_channels"], help="observation noise channels")
    e.add_argument("--noise-std", type=float, default=D["noise_std"], help="standard deviation of the noise")
    e.add_argument("--distractor-bits", action="store_true",
                   help="random +-1 on the bit channels between the first step and the cue (default: zeros)")
    e.add_argument("--shaping", type=float, default=D["shaping"], help="partial credit per right bit (0: off)")
    s = parser.add_argument_group("scale sweep")
    s.add_argument("--scale", action="store_true", help="train both controllers across --horizons and --seeds")
    shown = {k: "default: " + " ".join(map(str, v)) for k, v in SWEEP_DEFAULTS.items()}
    s.add_argument("--horizons", type=int, nargs="+", default=None, metavar="H", help=f"({shown['horizons']})")
    s.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S", help=f"({shown['seeds']})")
    s.add_argument("--controllers", nargs="+", choices=["mamba", "gru"], default=None,
                   help=f"({shown['controllers']})")


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The option dict of :func:`mamba_state.rl.train.train` from parsed arguments."""
    return {k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)}


def run(args: argparse.Namespace) -> int:
    """Entry point of ``mamba-state rl``; returns the exit status."""
    from ..errors import StateError
    from .ddp import distributed

    if getattr(args, "mode", None) == "scale":  # the claim's spelling of --scale
        args.scale = True
    elif getattr(args, "mode", None) == "quick" and args.scale:
        print("mamba-state rl: error: --mode quick is one run; --scale (or --mode scale) is the sweep",
              file=sys.stderr)
        return 2
    opts = options_from_args(args)
    resolve_device(opts.get("device"))  # a malformed device or CUDA without CUDA: one line, before any work
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
        print(f"mamba-state rl: error{where}: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0
