#!/usr/bin/env bash
# One device call: install test wheels, set up upstream's CUDA kernels, run the GPU tests and the scan benchmark.
# Usage (on the GPU machine, from the repo root): bash benchmarks/gpu_run.sh [bench args...]
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
[ -d .upstream ] && source .upstream/device_setup.sh > "$OUT/setup.log" 2>&1
tail -n 2 "$OUT/setup.log"
# the package as installed: kernels/ appears as mamba_state.kernels
[ -e mamba_state/kernels ] || ln -s ../kernels mamba_state/kernels
export PYTHONPATH=$PWD:$PYTHONPATH
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total --format=csv | tee "$OUT/gpu.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest tests/test_kernel_gpu.py -q -p no:cacheprovider -rA 2>&1 | tail -n 60 | tee "$OUT/pytest.log"
fi
timeout ${BENCH_TIMEOUT:-400} python3 benchmarks/bench_scan.py "$@" 2>&1 | tee "$OUT/bench.log"
