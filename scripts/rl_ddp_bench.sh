#!/usr/bin/env bash
# Training throughput of `mamba-state rl` with 1 process and with W processes (torchrun, DDP).
#
#   scripts/rl_ddp_bench.sh [DEVICE] [W] [CONTROLLERS] [ENV COUNTS] [extra rl options...]
#   scripts/rl_ddp_bench.sh cpu 2 "mamba gru" "16 64"                 # the CPU figure of docs/rl.md
#   scripts/rl_ddp_bench.sh cuda 2 "mamba gru" "64 256" --horizon 1000 --total-updates 6   # two GPUs
#
# Prints one line per (controller, environment count): the median training environment steps/s over all
# environments (summary.json's train_steps_per_s_median) with 1 and with W processes, and their ratio.
# --num-envs is the total: with W processes each runs NUM_ENVS / W environments.
set -euo pipefail
DEVICE=${1:-cpu}
W=${2:-2}
CONTROLLERS=${3:-"mamba gru"}
ENVS=${4:-"16 64"}
shift $(( $# < 4 ? $# : 4 ))
OUT=${RL_BENCH_OUT:-$(mktemp -d)}
COMMON=(--horizon 16 --num-bits 1 --total-updates 12 --lr 3e-3 --minibatches 2 --d-model 32 --n-layer 1
        --gru-hidden 32 --device "$DEVICE" --no-progress --eval-envs 8 --checkpoint-every 0)
[ "$DEVICE" = cpu ] && COMMON+=(--backend reference --threads 1)
for ctrl in $CONTROLLERS; do
  for n in $ENVS; do
    one="$OUT/${ctrl}_${n}_w1" many="$OUT/${ctrl}_${n}_w$W"
    rm -rf "$one" "$many"
    python -m mamba_state rl --controller "$ctrl" --num-envs "$n" "${COMMON[@]}" "$@" --out "$one" >/dev/null
    torchrun --standalone --nproc_per_node="$W" -m mamba_state.cli rl --controller "$ctrl" --num-envs "$n" \
      "${COMMON[@]}" "$@" --out "$many" >/dev/null 2>&1
    python - "$one/summary.json" "$many/summary.json" "$ctrl" "$n" "$W" <<'PY'
import json, sys
a, b = (json.load(open(p))["train_steps_per_s_median"] for p in sys.argv[1:3])
ctrl, n, w = sys.argv[3:]
print(f"{ctrl:5s} num_envs={n:>4s}  1 process: {a:8.0f} steps/s   {w} processes: {b:8.0f} steps/s   ratio {b / a:.2f}")
PY
  done
done
