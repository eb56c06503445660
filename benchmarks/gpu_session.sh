#!/usr/bin/env bash
# One device call for the whole GPU check: every gpu-marked test, then the generation and continuation benchmarks.
# Usage (GPU machine, repo root, .upstream/ and .whl/ carried): OUT=/some/dir bash benchmarks/gpu_session.sh
# Logs and results land in $OUT (pytest.log, generate.log, continue.log, results.tar).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
[ -d .upstream ] && source .upstream/device_setup.sh > "$OUT/setup.log" 2>&1
tail -n 1 "$OUT/setup.log"
[ -e mamba_state/kernels ] || ln -s ../kernels mamba_state/kernels
export PYTHONPATH=$PWD:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
    tests/test_generation_gpu.py tests/test_trace.py tests/test_adapters_mamba.py tests/test_adapters_lm.py \
    tests/test_adapters_mamba2.py tests/test_kernel_conv.py tests/test_backend.py tests/test_offload.py \
    tests/test_kernel_gpu.py 2>&1 | tail -n 40 > "$OUT/pytest.log"
tail -n 3 "$OUT/pytest.log"; echo "tests: $(( $(date +%s) - t0 )) s"
timeout "${GEN_TIMEOUT:-150}" python3 benchmarks/bench_generate.py --repeats 2 > "$OUT/generate.log" 2>&1
tail -n 8 "$OUT/generate.log"
timeout "${CONT_TIMEOUT:-100}" python3 benchmarks/bench_continue.py --repeats 3 > "$OUT/continue.log" 2>&1
tail -n 9 "$OUT/continue.log"
tar cf "$OUT/results.tar" benchmarks/results docs/benchmarks.md
echo "total: $(( $(date +%s) - t0 )) s"
