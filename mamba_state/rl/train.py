"""One training run: build the environment, policy and trainer from options, train with a progress bar,
checkpoint, evaluate, and write ``config.json``, ``metrics.jsonl``, ``checkpoint.pt`` and ``summary.json``.

Options are a plain dict (the CLI's arguments); :data:`DEFAULTS` (defined in :mod:`mamba_state.rl.defaults`)
lists every key.

Under torchrun (``WORLD_SIZE > 1``) the same function trains data-parallel (:mod:`mamba_state.rl.ddp`): each
rank runs its slice of the ``num_envs`` environments, metrics are reduced over the ranks, and only rank 0 shows
progress and writes files. Every rank returns the same summary.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import StateCompatibilityError, StateError
from .checkpoint import load_checkpoint, save_checkpoint
from .ddp import DistContext, DistributedPPOTrainer, broadcast_object, distributed, gather_trainer_state
from .ddp import rank_seed, restore_trainer_state
from .defaults import DEFAULTS
from .envs import DelayedRecall
from .policies import count_parameters, make_policy
from .ppo import PPOConfig, PPOTrainer, evaluate, evaluate_open_loop

__all__ = ["DEFAULTS", "train", "auto_rollout_len", "build"]


# Options that change the run (a resumed run must agree on them).
_IDENTITY = ("controller", "horizon", "num_bits", "num_envs", "seed", "rollout_len", "lr", "epochs", "minibatches",
             "gamma", "gae_lambda", "clip_coef", "ent_coef", "vf_coef", "max_grad_norm", "bptt", "d_model",
             "num_layers", "d_state", "gru_hidden", "gru_layers", "noise_channels", "noise_std", "distractor_bits",
             "shaping", "dt_min", "dt_max", "dt_init_floor", "dt_bias_init", "chrono_tmax", "a_init",
             "memory_fraction", "memory_retention")


def auto_rollout_len(horizon: int) -> int:
    """Default rollout length: two episodes (``2 * (horizon + 2)``, at least 32), so that with truncated BPTT
    every environment sees at least one whole episode, bits to cue, inside each rollout."""
    return max(32, 2 * (horizon + 2))


def resolve_device(device: str) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StateError(f"device: expected an available device, found {device!r} without CUDA")
    return dev


def build(opts: dict[str, Any], ctx: DistContext | None = None) -> tuple[DelayedRecall, Any, PPOTrainer]:
    """The environment, policy and trainer for ``opts`` (missing keys take :data:`DEFAULTS`).

    With a data-parallel ``ctx``: this rank's slice of the environments (:func:`~mamba_state.rl.shard.split_counts`)
    with environment and sampling seeds derived from the seed and the rank (rank 0 keeps the one-process seeds),
    the same initial policy on every rank, and a :class:`~mamba_state.rl.ddp.DistributedPPOTrainer`.
    """
    from .shard import split_counts

    o = {**DEFAULTS, **opts}
    ctx = ctx or DistContext()
    device = ctx.device if ctx.enabled else resolve_device(o["device"])
    num_envs = split_counts(int(o["num_envs"]), ctx.world_size)[ctx.rank] if ctx.enabled else o["num_envs"]
    torch.manual_seed(int(o["seed"]))  # policy initialisation (the same on every rank)
    env_seed = rank_seed(int(o["seed"]) + 1, ctx.rank, "env")
    env = DelayedRecall(num_envs, o["horizon"], o["num_bits"], device=device, seed=env_seed,
                        noise_channels=o["noise_channels"], noise_std=o["noise_std"],
                        distractor_bits=o["distractor_bits"], shaping=o["shaping"])
    if o["controller"] == "mamba":
        kw = {"d_model": o["d_model"], "num_layers": o["num_layers"], "d_state": o["d_state"], "backend": o["backend"],
              "dt_min": o["dt_min"], "dt_max": o["dt_max"], "dt_init_floor": o["dt_init_floor"],
              "dt_bias_init": o["dt_bias_init"], "a_init": o["a_init"], "memory_fraction": o["memory_fraction"],
              "memory_retention": tuple(o["memory_retention"]),
              # chrono: characteristic times up to the episode length unless --chrono-tmax says otherwise
              "chrono_tmax": o["chrono_tmax"] if o["chrono_tmax"] is not None else o["horizon"] + 2}
    else:
        kw = {"hidden_size": o["gru_hidden"], "num_layers": o["gru_layers"]}
    policy = make_policy(o["controller"], env.observation_size, env.num_actions, **kw).to(device)
    cfg = PPOConfig(rollout_len=o["rollout_len"] or auto_rollout_len(o["horizon"]), gamma=o["gamma"],
                    gae_lambda=o["gae_lambda"], clip_coef=o["clip_coef"], vf_coef=o["vf_coef"],
                    ent_coef=o["ent_coef"], lr=o["lr"], epochs=o["epochs"], num_minibatches=o["minibatches"],
                    max_grad_norm=o["max_grad_norm"], bptt=o["bptt"],
                    seed=rank_seed(int(o["seed"]) + 2, ctx.rank, "trainer"))
    trainer = (DistributedPPOTrainer(policy, env, cfg, ctx, int(o["num_envs"])) if ctx.enabled
               else PPOTrainer(policy, env, cfg))
    trainer.set_collect(o["collect"], int(o["graph_steps"]))  # auto: CUDA graphs on CUDA, eager elsewhere
    return env, policy, trainer


def _init_policy_from(policy: Any, source: str, log) -> None:
    """Load only the policy's parameters from another run's checkpoint (``DIR`` or ``DIR/checkpoint.pt``): a
    curriculum step, e.g. a policy trained at horizon 32 continues at horizon 1000 with a fresh optimizer,
    environments and counters. The architecture must match."""
    path = Path(source)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise StateError(f"init_from: expected a run folder with checkpoint.pt or a checkpoint file, found {source!r}"
                         " (no such file)")
    params = load_checkpoint(path)["trainer"].get("policy")
    own = policy.state_dict()
    if not isinstance(params, dict) or set(params) != set(own) or any(
            params[k].shape != own[k].shape for k in own):
        found = ({k: list(v.shape) for k, v in params.items() if k not in own or v.shape != own[k].shape}
                 if isinstance(params, dict) else type(params).__name__)
        raise StateCompatibilityError(f"init_from {path}: expected the parameters of this policy "
                                      f"({len(own)} tensors), found a different architecture: {found or 'other names'}")
    policy.load_state_dict(params)
    log(f"initialised the policy from {path}")


def _fmt(x: float, spec: str) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def train(opts: dict[str, Any], log=print) -> dict[str, Any]:
    """Train one controller as ``opts`` says; returns the summary (also written to ``out/summary.json``).

    Data-parallel when launched by torchrun with ``WORLD_SIZE > 1`` (or inside an initialised process group).
    """
    o = {**DEFAULTS, **opts}
    for key in ("total_updates", "max_seconds", "checkpoint_every", "threads"):
        value = o[key]
        if value is None and key in ("max_seconds", "threads"):  # no limit / the device's default
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise StateError(f"{key}: expected a number >= 0, found {value!r}")
    if o["eval_mode"] not in ("step", "open-loop"):
        raise StateError(f"eval_mode: expected 'step' or 'open-loop', found {o['eval_mode']!r}")
    with distributed(o["device"]) as ctx:
        with _cpu_threads(o["threads"], ctx.device if ctx.enabled else resolve_device(o["device"])):
            return _train(o, ctx, log)


@contextlib.contextmanager
def _cpu_threads(threads: int | None, device: torch.device) -> Iterator[None]:
    """torch's CPU thread count for the run, restored afterwards: ``threads`` if given, ``0`` torch's own count,
    ``None`` one thread on a CPU device (the policies are small: one thread avoids the oversubscription stalls of
    busy machines, as the demo does) and torch's own count otherwise."""
    before = torch.get_num_threads()
    wanted = (1 if device.type == "cpu" else 0) if threads is None else int(threads)
    if wanted:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60:02d}:{seconds % 60:02d}"


def _train(o: dict[str, Any], ctx: DistContext, log) -> dict[str, Any]:
    main = ctx.is_main
    if not main:  # one voice: rank 0 logs, shows progress and writes files
        log = lambda *a, **k: None  # noqa: E731
    out = Path(o["out"])
    if main:
        out.mkdir(parents=True, exist_ok=True)
    env, policy, trainer = build(o, ctx)
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    run_id = {k: o[k] for k in _IDENTITY}
    # Every rank reads the checkpoint (DIR must be visible to all ranks); rank 0 decides whether there is one.
    resuming = broadcast_object(bool(o["resume"] and ckpt_path.exists()), ctx)
    exact = True
    if resuming:
        payload = load_checkpoint(ckpt_path)
        # an option newer than the checkpoint counts as its default (the value every older run used)
        saved = {k: payload["run"].get(k, DEFAULTS[k]) for k in _IDENTITY}
        if saved != run_id:
            diff = {k: (saved[k], run_id[k]) for k in _IDENTITY if saved[k] != run_id[k]}
            raise StateCompatibilityError(f"resume {ckpt_path}: options differ from the checkpoint's "
                                          f"(checkpoint, now): {diff}")
        exact = restore_trainer_state(trainer, payload, ctx, int(o["seed"]))
        saved_world = (payload.get("world") or {}).get("world_size", 1)
        log(f"resumed from {ckpt_path} at update {trainer.updates}"
            + ("" if exact else f" (written by {saved_world} process(es), now {ctx.world_size}: same model, "
                                f"optimizer and environments, new random streams)"))
        if main and metrics_path.exists():  # drop lines written after the checkpoint
            keep = [ln for ln in metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["update"] <= trainer.updates]
            metrics_path.write_text("".join(ln + "\n" for ln in keep))
    else:
        if o["init_from"]:
            # "{controller}" and "{seed}" are filled in, so one --scale sweep can continue a whole earlier sweep
            _init_policy_from(policy, str(o["init_from"]).format(controller=o["controller"], seed=o["seed"]), log)
        if main:
            metrics_path.write_text("")
    counts = getattr(trainer, "counts", [env.num_envs])
    config = {**o, "device": str(env.device), "rollout_len": trainer.config.rollout_len,
              "parameters": count_parameters(policy), "torch": torch.__version__,
              "world_size": ctx.world_size, "envs_per_rank": counts, "backend": ctx.backend,
              "torch_threads": torch.get_num_threads(), "collect_resolved": trainer.collect_mode}
    if main:
        (out / "config.json").write_text(json.dumps(config, indent=2))
    total = int(o["total_updates"])
    bar = None
    if o["progress"] and main:
        try:
            from tqdm.auto import tqdm

            desc = f"{o['controller']} H={o['horizon']}" + (f" x{ctx.world_size}" if ctx.enabled else "")
            bar = tqdm(total=total, initial=trainer.updates, desc=desc, unit="upd", dynamic_ncols=True,
                       bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed} elapsed, eta {remaining}, "
                                  "{rate_fmt}{postfix}]")
        except ImportError:
            bar = None
    sps: list[float] = []
    csps: list[float] = []
    first_update = trainer.updates
    t_start = time.perf_counter()
    last: dict[str, Any] = {}
    budget = float(o["max_seconds"]) if o["max_seconds"] else None
    stopped_early = False
    with (metrics_path.open("a") if main else open(os.devnull, "w")) as mf:  # only rank 0 writes the file
        while trainer.updates < total:
            last = trainer.train_update()  # metrics already reduced over the ranks
            sps.append(last["steps_per_s"])
            csps.append(last["collect_steps_per_s"])
            mf.write(json.dumps(_json_safe(last)) + "\n")
            mf.flush()
            post = {"success": _fmt(last["window_success_rate"], ".3f"),
                    "return": _fmt(last["window_mean_return"], ".3f"), "steps/s": _fmt(last["steps_per_s"], ".0f")}
            if bar is not None:
                bar.update(1)
                bar.set_postfix(post)
            elif o["progress"] and (trainer.updates % 10 == 0 or trainer.updates == total):  # no tqdm: plain lines
                spent = time.perf_counter() - t_start
                eta = spent / max(1, trainer.updates - first_update) * (total - trainer.updates)
                log(f"update {trainer.updates}/{total} " + " ".join(f"{k}={v}" for k, v in post.items())
                    + f" elapsed={_eta(spent)} eta={_eta(eta)}")
            # A time budget (--max-seconds): rank 0's clock decides for every rank, so all stop after the same update.
            stopped_early = (budget is not None and trainer.updates < total
                             and broadcast_object(time.perf_counter() - t_start >= budget, ctx))
            every = int(o["checkpoint_every"] or 0)  # 0: only at the end (or at an early stop)
            if trainer.updates == total or stopped_early or (every and trainer.updates % every == 0):
                gathered = gather_trainer_state(trainer, ctx)  # a collective: every rank takes part
                if gathered is not None:  # rank 0
                    save_checkpoint(ckpt_path, gathered[0], run_id, world=gathered[1])
            if stopped_early:
                log(f"stopping after update {trainer.updates}/{total}: --max-seconds {budget:g} reached")
                break
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - t_start
    summary = None
    if main:  # the parameters are the same on every rank: one evaluation, the same as a single process's
        summary = _summarise(o, env, policy, trainer, last, sps, train_seconds, ctx)
        summary["stopped_early"] = stopped_early
        summary["collect"] = trainer.collect_mode
        summary["collect_steps_per_s_median"] = sorted(csps)[len(csps) // 2] if csps else None
        summary["train_seconds_total"] = trainer.train_seconds
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log(f"{o['controller']} H={o['horizon']} seed={o['seed']}: eval success {summary['eval_success_rate']:.3f} "
            f"(chance {summary['chance']:.3f}), train steps/s {_fmt(summary['train_steps_per_s_median'], '.0f')}"
            + (f" ({ctx.world_size} processes)" if ctx.enabled else ""))
    return broadcast_object(summary, ctx)


def _summarise(o: dict[str, Any], env: DelayedRecall, policy: Any, trainer: PPOTrainer, last: dict[str, Any],
               sps: list[float], train_seconds: float, ctx: DistContext) -> dict[str, Any]:
    # open loop: the same episodes and answers through forward_sequence in chunks (fast at long horizons)
    ev = (evaluate if o["eval_mode"] == "step" else evaluate_open_loop)(
        policy, o["horizon"], o["num_bits"], num_envs=int(o["eval_envs"]), seed=int(o["seed"]) + 1000,
        noise_channels=o["noise_channels"], noise_std=o["noise_std"], distractor_bits=o["distractor_bits"],
        shaping=o["shaping"])
    summary = {
        "controller": o["controller"], "horizon": o["horizon"], "num_bits": o["num_bits"], "seed": o["seed"],
        "num_envs": o["num_envs"], "rollout_len": trainer.config.rollout_len, "updates": trainer.updates,
        "env_steps": trainer.env_steps, "parameters": count_parameters(policy), "device": str(env.device),
        "device_name": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu",
        "world_size": ctx.world_size,
        "eval_success_rate": ev["success_rate"], "eval_episodes": ev["episodes"],
        "eval_steps_per_s": ev["steps_per_s"], "eval_mode": o["eval_mode"],
        "train_success_rate_last": last.get("window_success_rate", math.nan),
        "train_steps_per_s_median": sorted(sps)[len(sps) // 2] if sps else math.nan,
        "train_seconds_this_session": train_seconds,
        "chance": 1.0 / env.num_actions,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    # Transfer: greedy evaluation at other horizons (a policy that latches the bits and ignores the distractors
    # answers right at any horizon; one that relies on a decaying trace does not). Open loop: whole episodes
    # through forward_sequence in chunks, so horizon 20000 costs ~10 policy calls, not 20,002.
    transfer = {}
    for h in o["eval_horizons"] or ():
        t0 = time.perf_counter()
        ev_h = evaluate_open_loop(policy, int(h), o["num_bits"], num_envs=int(o["eval_envs"]),
                                  seed=int(o["seed"]) + 1000, noise_channels=o["noise_channels"],
                                  noise_std=o["noise_std"], distractor_bits=o["distractor_bits"],
                                  shaping=o["shaping"])
        transfer[str(int(h))] = {"success_rate": ev_h["success_rate"], "seconds": time.perf_counter() - t0,
                                 "episodes": ev_h["episodes"]}
    if transfer:
        summary["eval_at_horizons"] = transfer
    return _json_safe(summary)
