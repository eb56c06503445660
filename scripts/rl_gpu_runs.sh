#!/usr/bin/env bash
# The GPU results of issue 7 (docs/rl.md, "Results"), sized for ONE device call of about 8 minutes on one H100.
#
#   scripts/rl_gpu_runs.sh [DIR]      # DIR defaults to $OUT/rl_gpu when $OUT is set (the device tool's
#                                     # folder that comes back), else runs/rl_gpu
#   RL_GPU_SMOKE=1 scripts/rl_gpu_runs.sh /tmp/x    # CPU dry run of the whole pipeline (~1 min, tiny runs)
#
# Needs mamba_state importable: installed, or the device setup of benchmarks/gpu_session.sh (carry .whl/ and
# .upstream/; done here when the import fails). Writes under DIR: h32/, h256/, h1000/ (each
# a `mamba-state rl --scale` sweep: scale_results.json, scale.png, one folder per run with config, metrics,
# summary and policy.pt, the trained parameters; full checkpoints are dropped at the end unless
# RL_GPU_KEEP_CHECKPOINTS=1), results.md (markdown tables + the exact commands), rl.md (docs/rl.md with the tables
# between its <!-- rl-gpu-results --> markers) and rl_gpu_h*.png. It also updates docs/rl.md and
# docs/img/rl_gpu_h*.png of the tree it runs in; on the device machine that copy does not come back, so take
# DIR/rl.md and the PNGs from $OUT.
#
# Why this shape (CPU measurements and estimates; docs/rl.md "Recipe" has the numbers):
# * Training AT horizons 5000-20000 does not fit. Collection is one policy.step per environment step, and a
#   step is launch-bound on a GPU: about 150 small ops for the 2-layer Mamba policy (fewer for the 1-layer one
#   used here), 15 for the GRU, plus about 60 for sampling and the environment: roughly 1-2 ms (Mamba) and
#   0.5-0.7 ms (GRU) per step whatever --num-envs is. One update at the rollout length 2 * (H + 2) costs at
#   least ~2-4 s / ~1.5 s at H = 1000, 10-20 s / 7 s at 5000, 40-80 s / 28 s at 20000, before the replay. On
#   CPU, horizon 32 took 40-200 updates to leave chance; a from-scratch run at H >= 1000 in this budget would
#   get a handful of updates.
# * What fits is a time-boxed curriculum (each stage --init-from the previous one, fresh optimizer):
#   stage 1, horizon 32 from scratch (2 seeds, 512 environments, 35 s each; ~0.3-0.5 s per update, so ~70-120
#   updates of 1024 episodes); stage 2, horizon 256 (2 seeds, 20 s each); stage 3, horizon 1000 (seed 0, 20 s
#   each, ~5-8 updates). After stages 2 and 3 the policies are evaluated greedily at 1000, 5000, 10000 and
#   20000 (--eval-horizons: open loop, whole episodes through forward_sequence in chunks of 2048, so the cost
#   is the environment's 36,000 steps at ~0.3-0.5 ms, ~10-20 s per run). This tests whether the learned
#   memory HOLDS at long horizons after training at <= 1000; it is not training at 5000-20000, and the
#   docs say so. On CPU the Mamba trained at 32 fell from 1.0 at 128 to 0.72 at 512 (a decaying trace) while
#   the small GRUs held 1.0 to 4000; stage 2 and 3 show whether longer training horizons change that.
#
# Expected time on one H100 (estimates, not measured): a warm-up run that compiles the Triton kernels into
# the on-disk cache (~30-60 s) so no timed run pays for it; stage 1: 4 x (35 s + ~5 s start + ~1 s
# evaluation) ~ 2.7 min; stage 2: 4 x (20 s + ~2 s
# overrun + ~15 s long evaluations + ~5 s) ~ 3 min; stage 3: 2 x (20 s + <= 5 s overrun + ~2 s + ~15 s + 5 s)
# ~ 1.5 min. Total ~8 min. Each stage runs under `timeout` (its cap, or what is left of 560 s), so the script
# ends before 10 minutes; a sweep writes its JSON after every run, so a stage cut short still leaves its
# finished runs in the tables, and a stage whose source runs are missing fails with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${OUT:+$OUT/rl_gpu}}
DIR=${DIR:-runs/rl_gpu}
mkdir -p "$DIR"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ! "$PY" -c "import mamba_state.rl, mamba_state.kernels" 2>/dev/null; then
  # Not installed: the device machine's setup of benchmarks/gpu_session.sh (carry .whl/ and .upstream/).
  ls .whl/*.whl >/dev/null 2>&1 && "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    .whl/*.whl 2>/dev/null || true
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  if [ -d .upstream ]; then set +eu; source .upstream/device_setup.sh > "$DIR/setup.log" 2>&1; set -eu; fi
  [ -e mamba_state/kernels ] || ln -s ../kernels mamba_state/kernels
  export PYTHONPATH=$PWD:$PYTHONPATH
fi
"$PY" -c "import mamba_state.rl, mamba_state.kernels" || { echo "mamba_state is not importable (see $DIR/setup.log)"; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$DIR/gpu.txt" || true

# The CPU recipe (docs/rl.md "Recipe"; now the defaults): 1 bit, noise channels of std 0.1, lr 3e-3, the
# CPU-tested small models (Mamba d_model 32 x 1 layer, 10,403 parameters; GRU hidden 32, 10,019). More
# environments than on CPU: with 32 environments Mamba learned horizon 32 in 3 of 8 runs, with 128 the seed
# that had failed learned at update 40; 512 cost about the same per step as 32 on a GPU (launch-bound).
COMMON=(--num-bits 1 --noise-std 0.1 --lr 3e-3 --d-model 32 --n-layer 1 --gru-hidden 32 --device cuda
        --no-progress --checkpoint-every 0 --eval-envs 256 --minibatches 4)
LONG=(1000 5000 10000 20000)
# Knobs for a second call (defaults: the ~8-minute plan below): seconds of training per run in each stage,
# and the environments of stages 1-2.
T32=${RL_T32:-35} T256=${RL_T256:-20} T1000=${RL_T1000:-20} ENVS=${RL_ENVS:-512}
S32=(rl --scale --horizons 32 --seeds 0 1 --controllers mamba gru --num-envs "$ENVS" --total-updates 2000
     --max-seconds "$T32" --eval-horizons 128 "${COMMON[@]}" --out "$DIR/h32")
S256=(rl --scale --horizons 256 --seeds 0 1 --controllers mamba gru --num-envs "$ENVS" --total-updates 2000
      --max-seconds "$T256" --init-from "$DIR/h32/{controller}_h32_s{seed}" --eval-horizons "${LONG[@]}"
      "${COMMON[@]}" --out "$DIR/h256")
S1000=(rl --scale --horizons 1000 --seeds 0 --controllers mamba gru --num-envs 256 --total-updates 2000
       --max-seconds "$T1000" --init-from "$DIR/h256/{controller}_h256_s{seed}" --eval-horizons 5000 10000 20000
       "${COMMON[@]}" --out "$DIR/h1000")
if [ "${RL_GPU_SMOKE:-0}" = 1 ]; then  # a CPU dry run of the whole pipeline in ~1 minute (tiny everything)
  SMOKE=(--num-bits 1 --device cpu --threads 1 --backend reference --d-model 16 --n-layer 1 --gru-hidden 16
         --eval-envs 16 --num-envs 8 --max-seconds 2 --no-progress --checkpoint-every 0 --total-updates 1000)
  S32=(rl --scale --horizons 4 --seeds 0 1 --controllers mamba gru --eval-horizons 8 "${SMOKE[@]}" --out "$DIR/h32")
  S256=(rl --scale --horizons 8 --seeds 0 1 --controllers mamba gru --init-from "$DIR/h32/{controller}_h4_s{seed}"
        --eval-horizons 20 50 "${SMOKE[@]}" --out "$DIR/h256")
  S1000=(rl --scale --horizons 12 --seeds 0 --controllers mamba gru --init-from "$DIR/h256/{controller}_h8_s{seed}"
         --eval-horizons 50 "${SMOKE[@]}" --out "$DIR/h1000")
fi
DOC=docs/rl.md IMG=docs/img
if [ "${RL_GPU_SMOKE:-0}" = 1 ]; then  # leave the tree's docs alone: work on a copy under DIR
  cp docs/rl.md "$DIR/rl_doc_copy.md"
  DOC=$DIR/rl_doc_copy.md IMG=$DIR/img
fi

t0=$(date +%s)
phase() {  # phase NAME CAP_SECONDS ARGS...: run one sweep under min(CAP, what is left of 560 s)
  local name=$1 cap=$2; shift 2
  local left=$(( 560 - ($(date +%s) - t0) ))
  [ "$left" -lt "$cap" ] && cap=$left
  echo "== $name ($(date -u +%H:%M:%S), $(( $(date +%s) - t0 )) s so far, cap $cap s)"
  if [ "$cap" -lt 45 ]; then echo "skipped: too little time left"; return 0; fi
  timeout "$cap" "$PY" -m mamba_state "$@" || echo "$name ended with status $? (124: cut by the cap)"
}
# Warm-up: compile Triton's kernels (step, chunked scan with resets, forward and backward) into the on-disk
# cache, so that the first timed run does not spend its --max-seconds compiling.
WARM=(rl --controller mamba --horizon 4 --total-updates 1 --num-envs 8 --eval-horizons 8 "${COMMON[@]}"
      --out "$DIR/warmup")
[ "${RL_GPU_SMOKE:-0}" = 1 ] && WARM=(rl --controller mamba --horizon 4 --eval-horizons 8 "${SMOKE[@]}" --out "$DIR/warmup")
phase "warm-up (Triton compilation)" 120 "${WARM[@]}"
phase "horizon 32 (2 seeds, from scratch)" 240 "${S32[@]}"
phase "horizon 256 (2 seeds, from the horizon-32 policies)" 230 "${S256[@]}"
phase "horizon 1000 (seed 0, from the horizon-256 policies)" 200 "${S1000[@]}"
echo "== tables ($(( $(date +%s) - t0 )) s so far)"

"$PY" - "$DIR" "$DOC" "$IMG" "mamba-state ${S32[*]}" "mamba-state ${S256[*]}" "mamba-state ${S1000[*]}" <<'PY'
import json, shutil, sys
from pathlib import Path
from mamba_state.rl.scale import results_markdown, update_markdown_section

out, doc, img = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
cmds = sys.argv[4:7]
gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "?"
parts = [f"Produced by `scripts/rl_gpu_runs.sh` on {gpu}. A curriculum: each stage starts from the previous "
         "stage's policies (`--init-from`, fresh optimizer); every stage is time-boxed (`--max-seconds`), so "
         "the updates column says how much training each run got. Success at longer horizons is the trained "
         "policy evaluated there without further training.", ""]
titles = ["Stage 1: horizon 32 from scratch", "Stage 2: horizon 256, from stage 1",
          "Stage 3: horizon 1000, from stage 2 (seed 0)"]
for name, title, cmd in zip(("h32", "h256", "h1000"), titles, cmds):
    res = out / name / "scale_results.json"
    parts += [f"#### {title}", "", "```", cmd.replace(str(out), "DIR"), "```", ""]
    parts.append(results_markdown(json.loads(res.read_text())) if res.exists()
                 else "(no run of this stage finished)\n")
body = "\n".join(parts)
(out / "results.md").write_text(body)
update_markdown_section(doc, "rl-gpu-results", body)
shutil.copy(doc, out / "rl.md")
img.mkdir(parents=True, exist_ok=True)
for name in ("h32", "h256", "h1000"):
    png = out / name / "scale.png"
    if png.exists():
        shutil.copy(png, img / f"rl_gpu_{name}.png")
        shutil.copy(png, out / f"rl_gpu_{name}.png")
print(body)
# Keep DIR small for the trip back: each run's policy parameters (policy.pt, enough to evaluate it again)
# instead of the full checkpoint (environment and carried states of hundreds of environments).
if not __import__("os").environ.get("RL_GPU_KEEP_CHECKPOINTS"):
    import torch
    from mamba_state.rl.checkpoint import load_checkpoint
    for ckpt in [*out.glob("*/*/checkpoint.pt"), *out.glob("*/checkpoint.pt")]:
        torch.save(load_checkpoint(ckpt)["trainer"]["policy"], ckpt.parent / "policy.pt")
        ckpt.unlink()
PY
echo "total $(( $(date +%s) - t0 )) s"
