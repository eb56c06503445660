#!/usr/bin/env bash
# One device call for the GPU checks and benchmarks, step by step, each under its own time limit.
# Usage (GPU machine, repo root, .upstream/ and .whl/ carried):
#     OUT=/some/dir STEPS="tests gen cont" bash benchmarks/gpu_session.sh
# STEPS (default "tests gen cont"), in the order given:
#   tests   the gpu-marked tests of no other step (TESTS1 and TESTS2 below)  (TEST_TIMEOUT, 540 s: 95-460 s, more
#           than 390 s on a fresh machine without a carried Triton cache)
#   tests1, tests2  each half of them alone                      (TEST_TIMEOUT, 300 s)
#   kernel  tests/test_kernel_gpu.py (long sequences: slow)      (KERNEL_TIMEOUT, 300 s)
#   gen     benchmarks/bench_generate.py                         (GEN_TIMEOUT, 150 s)
#   cont    benchmarks/bench_continue.py                         (CONT_TIMEOUT, 150 s)
#   scan    benchmarks/bench_scan.py --no-chunked                (SCAN_TIMEOUT, 200 s)
#   trace   benchmarks/bench_trace.py                            (TRACE_TIMEOUT, 100 s)
#   overhead benchmarks/profile_overhead.py (host cost per forward) (OVERHEAD_TIMEOUT, 150 s)
#   train   benchmarks/bench_train.py (130m training step, ours vs upstream) (TRAIN_TIMEOUT, 150 s)
#   ptrain  benchmarks/profile_train.py (device time per kernel of that step) (PTRAIN_TIMEOUT, 150 s)
#   m3      (after benchmarks/triton_prewarm.py fills the Triton cache, PREWARM_WORKERS copies in parallel, each
#           PREWARM_TIMEOUT, 200 s) benchmarks/bench_mamba3.py (M3_BENCH_TIMEOUT, 300 s: without a carried Triton cache upstream autotunes ~2 min per variant, 3 variants), then tests/test_mamba3_gpu.py without its gradient
#           test (M3_TEST_TIMEOUT, 240 s), autotune results shared through TRITON_CACHE_AUTOTUNING=1
#   m3grad  the Mamba-3 gradient test alone: upstream's backward autotunes ~200 configs (M3GRAD_TIMEOUT, 500 s)
#   varlen  packed sequences and one-pass positions: test_states_at_one_pass.py, tests/test_varlen_{gpu,conv,mamba2}.py
#           (gpu; VARLEN_TESTS overrides the files; Mamba-2's autotunes upstream's kernels: slow) (VARLEN_TIMEOUT, 300 s)
#   varlen2 tests/test_varlen_mamba2.py's gpu tests after a prewarm (upstream's Mamba-2 kernels autotune)
#           (VARLEN2_TIMEOUT, 240 s)
#   fvarlen benchmarks/bench_varlen.py (forward only: the prefill table)                 (FVARLEN_TIMEOUT, 150 s)
#   mvarlen benchmarks/bench_varlen.py --model (the packed prefill through the 130m LM)  (MVARLEN_TIMEOUT, 200 s)
#   ptile   benchmarks/probe_varlen_tile.py (the packed forward's channels per program)  (PTILE_TIMEOUT, 120 s)
#   bvarlen benchmarks/bench_varlen.py --backward (packed vs padded vs per session; compiles many variants) (BVARLEN_TIMEOUT, 300 s)
#   pvarlen benchmarks/bench_varlen.py --profile (wall vs device time per contender, top kernels) (PVARLEN_TIMEOUT, 120 s)
#   mimo    tests/test_mamba3_mimo_gpu.py                        (MIMO_TIMEOUT, 200 s)
#   serve   benchmarks/bench_serve.py (TTFT, decode throughput, chat trace, bursts)  (SERVE_TIMEOUT, 240 s)
#   pengine benchmarks/profile_engine.py (host sections of an engine decode step vs device time) (PENGINE_TIMEOUT, 150 s)
#   pytest  the GPU tests of $PYTEST_FILES (e.g. PYTEST_FILES="tests/test_rl_collect.py")  (PYTEST_TIMEOUT, 300 s)
#   prlc    benchmarks/profile_rl_collect.py (kernels and device time per collection step)  (PRLC_TIMEOUT, 200 s)
#   rlfused the fused collection step's tests on the GPU: its kernels against their float64 references, the
#           captured replay and the graph path (tests/test_kernel_rl_step.py, the fused tests of
#           tests/test_rl_collect.py; no -m gpu filter)  (RLFUSED_TIMEOUT, 200 s)
#   rlc     benchmarks/bench_rl_collect.py (graphed vs eager collection; RLC_ARGS)   (RLC_TIMEOUT, 200 s)
#   probes  benchmarks/probe_conv_fwd.py, probe_conv_bwd.py and probe_scan_bwd.py (kernel variants; PROBE_TIMEOUT, 200 s)
#   pbwd    benchmarks/probe_scan_bwd.py $PBWD_ARGS (default --tp --maxnreg)   (PBWD_TIMEOUT, 480 s)
#   pfwd    benchmarks/probe_scan_fwd.py (the forward's schedule and tile for few long rows) (PFWD_TIMEOUT, 120 s)
#   prefill benchmarks/profile_prefill.py --vs-upstream at 1x16384 and 1x65536 (PREFILL_TIMEOUT, 150 s)
#   ppos    benchmarks/profile_positions.py $PPOS_ARGS (e.g. --host; states at positions and the LM verify step: wall vs device time, top kernels, waiting runtime calls) (PPOS_TIMEOUT, 150 s)
#   grad    the training path's GPU tests (conv backward, training layout) (GRAD_TIMEOUT, 150 s)
# The Triton cache comes back as $OUT/triton_cache.tar.xz when the call ends inside its limit: copy it to
# build/triton_cache.tar.xz and carry that path in the next call (see the note where it is restored); a call that
# runs this script from an extracted archive copies it along, e.g.
#     tar xf build/head.tar -C /tmp/w && cp -r .upstream /tmp/w/ && mkdir -p /tmp/w/build &&
#     { cp build/triton_cache.tar.xz /tmp/w/build/ 2>/dev/null || true; } && cd /tmp/w && ... bash benchmarks/gpu_session.sh
# Logs land in $OUT as <step>.log (the GPU's name in setup.log), and results.tar holds benchmarks/results and docs/benchmarks.md. Keep what is
# under $OUT small: a call whose $OUT cannot be read back returns nothing.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
[ -d .upstream ] && source .upstream/device_setup.sh > "$OUT/setup.log" 2>&1
tail -n 1 "$OUT/setup.log"
[ -e mamba_state/kernels ] || ln -s ../kernels mamba_state/kernels
# Triton's cache (compiled kernels and, with TRITON_CACHE_AUTOTUNING=1, autotune results) survives loans when the
# previous call's $OUT/triton_cache.tar.xz is carried back as build/triton_cache.tar.xz: a fresh machine then
# skips the compiles and upstream's Mamba-3 autotuning (about 2 minutes per kernel variant) it already paid for.
# Entries are keyed by source, Triton version and GPU, so a changed kernel still recompiles.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache} TRITON_CACHE_AUTOTUNING=1
mkdir -p "$TRITON_CACHE_DIR"
[ -f build/triton_cache.tar.xz ] && tar xJf build/triton_cache.tar.xz -C "$TRITON_CACHE_DIR" \
    && echo "triton cache restored: $(find "$TRITON_CACHE_DIR" -type f | wc -l) files"
save_triton_cache() {  # at most 15 MB comes back (the limit is 16 MiB a file): compiled kernels, else autotune only
    (cd "$TRITON_CACHE_DIR" && XZ_OPT=-T0 tar cJf "$OUT/triton_cache.tar.xz" . 2>/dev/null)
    if [ "$(stat -c %s "$OUT/triton_cache.tar.xz" 2>/dev/null || echo 0)" -gt 15000000 ]; then
        (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 | tar cJf "$OUT/triton_cache.tar.xz" --null -T -)
    fi
}
export PYTHONPATH=$PWD:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/setup.log"
t_all=$(date +%s)

# the gpu-marked tests of no other step, in two halves (tests1: state, I/O and kernel checks; tests2: adapters,
# generation, RL), each about half of the "tests" step
TESTS1="tests/test_host_copy.py tests/test_trace.py tests/test_inplace_states.py tests/test_io.py
        tests/test_backend.py tests/test_offload.py tests/test_kernel_device.py tests/test_kernel_add_norm.py
        tests/test_kernel_conv.py tests/test_mamba3_state.py tests/test_rl_collect.py"
TESTS2="tests/test_generation_gpu.py tests/test_adapters_mamba.py tests/test_adapters_lm.py
        tests/test_adapters_mamba2.py tests/test_rl_ppo.py tests/test_rl_env.py"

run_step() {  # name, timeout, command...
    local name=$1 limit=$2; shift 2
    local t0; t0=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $(( $(date +%s) - t0 )) s"; tail -n "${TAIL:-12}" "$OUT/$name.log"
    tar cf "$OUT/results.tar" benchmarks/results docs/benchmarks.md  # after every step: a cut-off call keeps them
}

# Upstream's Mamba-3 kernels autotune over many configurations, compiled one after the other (minutes): fill the
# Triton cache first with PREWARM_WORKERS copies of the same work, each compiling its share (0 turns this off).
# prewarm "<pytest args>" [python3 script args...]: the tests given, then (if given) the script.
prewarm() {
    local tests=$1; shift
    [ "${PREWARM_WORKERS:-14}" -gt 0 ] || return 0
    if [ $# -gt 0 ]; then
        timeout "${PREWARM_TIMEOUT:-200}" python3 benchmarks/triton_prewarm.py --workers "${PREWARM_WORKERS:-14}" \
            --timeout "${PREWARM_TIMEOUT:-200}" --log-dir /tmp/prewarm_script -- "$@" | tee -a "$OUT/prewarm.log"
    fi
    eval "set -- $tests"
    timeout "${PREWARM_TIMEOUT:-200}" python3 benchmarks/triton_prewarm.py --workers "${PREWARM_WORKERS:-14}" \
        --timeout "${PREWARM_TIMEOUT:-200}" --log-dir /tmp/prewarm_tests -- python3 -m pytest -q -m gpu \
        -p no:cacheprovider "$@" | tee -a "$OUT/prewarm.log"
}

for step in ${STEPS:-tests gen cont}; do
    case $step in
        tests) run_step tests "${TEST_TIMEOUT:-540}" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
                   --durations=10 $TESTS1 $TESTS2 ;;
        tests1) run_step tests1 "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
                   --durations=10 $TESTS1 ;;
        tests2) run_step tests2 "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
                   --durations=10 $TESTS2 ;;
        pytest) run_step pytest "${PYTEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
                   $PYTEST_FILES ;;
        kernel) run_step kernel "${KERNEL_TIMEOUT:-300}" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
                   tests/test_kernel_gpu.py ;;
        gen) run_step gen "${GEN_TIMEOUT:-150}" python3 benchmarks/bench_generate.py --repeats 2 ;;
        cont) run_step cont "${CONT_TIMEOUT:-150}" python3 benchmarks/bench_continue.py --repeats "${CONT_REPEATS:-10}" ;;
        scan) run_step scan "${SCAN_TIMEOUT:-200}" python3 benchmarks/bench_scan.py --no-chunked ;;
        overhead) run_step overhead "${OVERHEAD_TIMEOUT:-150}" python3 benchmarks/profile_overhead.py --out "$OUT" ;;
        trace) run_step trace "${TRACE_TIMEOUT:-100}" python3 benchmarks/bench_trace.py ;;
        train) run_step train "${TRAIN_TIMEOUT:-150}" python3 benchmarks/bench_train.py ;;
        ptrain) run_step ptrain "${PTRAIN_TIMEOUT:-150}" python3 benchmarks/profile_train.py --out "$OUT" ;;
        m3) prewarm "tests/test_mamba3_gpu.py -k 'not gradients'" python3 benchmarks/bench_mamba3.py --warm-only
            run_step m3 $(( ${M3_BENCH_TIMEOUT:-300} + ${M3_TEST_TIMEOUT:-240} + 5 )) \
                   bash -c "timeout ${M3_BENCH_TIMEOUT:-300} python3 benchmarks/bench_mamba3.py; \
                   timeout ${M3_TEST_TIMEOUT:-240} python3 -m pytest -v -s -m gpu -p no:cacheprovider -rfE \
                   tests/test_mamba3_gpu.py -k 'not gradients'"
            save_triton_cache ;;  # the autotuning paid for here must survive a later step's cut-off
        m3grad) prewarm "tests/test_mamba3_gpu.py -k gradients"
            run_step m3grad "${M3GRAD_TIMEOUT:-500}" python3 -m pytest -v -s -m gpu \
                   -p no:cacheprovider -rfE tests/test_mamba3_gpu.py -k gradients
            save_triton_cache ;;
        varlen) run_step varlen "${VARLEN_TIMEOUT:-300}" bash -c "python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
                   --durations=5 ${VARLEN_TESTS:-tests/test_states_at_one_pass.py tests/test_varlen_gpu.py \
                   tests/test_varlen_conv.py tests/test_varlen_mamba2.py}" ;;
        varlen2) prewarm "tests/test_varlen_mamba2.py"
            run_step varlen2 "${VARLEN2_TIMEOUT:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
                   --durations=5 tests/test_varlen_mamba2.py
            save_triton_cache ;;
        fvarlen) run_step fvarlen "${FVARLEN_TIMEOUT:-150}" python3 benchmarks/bench_varlen.py ;;
        ptile) run_step ptile "${PTILE_TIMEOUT:-120}" python3 benchmarks/probe_varlen_tile.py ;;
        bvarlen) run_step bvarlen "${BVARLEN_TIMEOUT:-300}" python3 benchmarks/bench_varlen.py --backward ;;
        mvarlen) run_step mvarlen "${MVARLEN_TIMEOUT:-200}" python3 benchmarks/bench_varlen.py --model ;;
        pengine) run_step pengine "${PENGINE_TIMEOUT:-150}" python3 benchmarks/profile_engine.py ;;
        pvarlen) run_step pvarlen "${PVARLEN_TIMEOUT:-120}" python3 benchmarks/bench_varlen.py --profile ;;
        mimo) run_step mimo "${MIMO_TIMEOUT:-200}" python3 -m pytest -q -s -m gpu -p no:cacheprovider -rfE \
                   tests/test_mamba3_mimo_gpu.py ;;
        serve) run_step serve "${SERVE_TIMEOUT:-240}" python3 benchmarks/bench_serve.py ;;
        prlc) run_step prlc "${PRLC_TIMEOUT:-200}" python3 benchmarks/profile_rl_collect.py --out "$OUT" ;;
        rlfused) run_step rlfused "${RLFUSED_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -rfE \
                   tests/test_kernel_rl_step.py tests/test_rl_collect.py -k "fused or rl_step or policy or env" ;;
        rlc) run_step rlc "${RLC_TIMEOUT:-200}" python3 benchmarks/bench_rl_collect.py ${RLC_ARGS:-} ;;
        probes) run_step probes "${PROBE_TIMEOUT:-200}" bash -c "python3 benchmarks/probe_conv_fwd.py; \
                   python3 benchmarks/probe_conv_bwd.py; python3 benchmarks/probe_scan_bwd.py" ;;
        prefill) run_step prefill "${PREFILL_TIMEOUT:-150}" python3 benchmarks/profile_prefill.py --vs-upstream \
                   --shapes ${PREFILL_SHAPES:-1x16384 1x65536} --out "$OUT" ;;
        pbwd) run_step pbwd "${PBWD_TIMEOUT:-480}" python3 benchmarks/probe_scan_bwd.py ${PBWD_ARGS:---tp --maxnreg} ;;
        pfwd) run_step pfwd "${PFWD_TIMEOUT:-120}" python3 benchmarks/probe_scan_fwd.py ;;
        ppos) run_step ppos "${PPOS_TIMEOUT:-150}" python3 benchmarks/profile_positions.py ${PPOS_ARGS:-} ;;
        grad) run_step grad "${GRAD_TIMEOUT:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
                   tests/test_kernel_conv_grad.py tests/test_training_layout.py ;;
        *) echo "unknown step $step" ;;
    esac
done
tar cf "$OUT/results.tar" benchmarks/results docs/benchmarks.md
save_triton_cache
echo "total: $(( $(date +%s) - t_all )) s"
