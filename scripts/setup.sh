#!/usr/bin/env bash
# Set up mamba-state for development and tests in the current Python environment (idempotent). Run it inside a
# virtual environment (README, "Install"): Debian's system Python refuses pip installs outside one.
#
# 1. torch: left alone when already installed (GPU users bring their own build); otherwise the CPU build 2.13.0,
#    with numpy (torch warns at import without it).
# 2. the package itself, editable, with its test extra (pytest, hypothesis, transformers, tqdm, matplotlib and
#    triton, whose interpreter runs our kernels on the CPU in the tests).
# 3. mamba-ssm 2.3.2.post1 (optional upstream; the tests use it as an oracle): on a machine without CUDA it is
#    installed last, without compiling its CUDA extension (MAMBA_SKIP_CUDA_BUILD) and without the GPU-only
#    packages it lists (--no-deps: tilelang, quack-kernels, apache-tvm-ffi, ninja), after the pure-Python ones its
#    modules import. Installing it last keeps pip's resolver from warning that those GPU packages are missing.
#    With CUDA, install it yourself (pip install "mamba-state[upstream]") to get its kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
t0=$SECONDS

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch 2.13.0 (CPU build) and numpy"
    pip_install "torch==2.13.0" numpy
else
    echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
fi
echo "setup: installing mamba-state (editable) with its test extra (pytest, hypothesis, transformers, tqdm," \
     "matplotlib, triton)"
pip_install -e ".[test]"
if ! "$PY" -m pip show -q mamba-ssm >/dev/null 2>&1; then
    if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "setup: CUDA present; skipping mamba-ssm (pip install 'mamba-state[upstream]' builds its kernels)"
    else
        echo "setup: installing mamba-ssm 2.3.2.post1 without its CUDA extension and GPU-only dependencies" \
             "(the tests use its pure-Python parts), with einops and packaging"
        pip_install einops packaging
        MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip_install --no-build-isolation --no-deps "mamba-ssm==2.3.2.post1"
    fi
else
    echo "setup: keeping the installed mamba-ssm $("$PY" -m pip show mamba-ssm 2>/dev/null | sed -n 's/^Version: //p')"
fi
"$PY" -c "import mamba_state, mamba_state.kernels; print('setup: mamba-state', mamba_state.__version__, 'ready')"
echo "setup: done in $(( SECONDS - t0 )) s"
