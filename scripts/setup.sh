#!/usr/bin/env bash
# Set up mamba-state for development and tests in the current Python environment (idempotent).
#
# - torch: left alone when already installed (GPU users bring their own build); otherwise the CPU build 2.13.0.
# - mamba-ssm 2.3.2.post1 (optional upstream, used by the tests as an oracle): on a machine without CUDA it is
#   installed without compiling its CUDA extension (MAMBA_SKIP_CUDA_BUILD); with CUDA, install it yourself
#   (pip install "mamba-state[upstream]") to get its kernels.
# - the package itself, editable, with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch 2.13.0 (CPU build)"
    pip_install "torch==2.13.0"
fi
if ! "$PY" -m pip show -q mamba-ssm >/dev/null 2>&1; then
    if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "setup: CUDA present; skipping mamba-ssm (pip install 'mamba-state[upstream]' builds its kernels)"
    else
        echo "setup: installing mamba-ssm 2.3.2.post1 without its CUDA extension (tests use its pure-Python parts)"
        pip_install einops transformers packaging
        MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip_install --no-build-isolation --no-deps "mamba-ssm==2.3.2.post1"
    fi
fi
echo "setup: installing mamba-state (editable) with its test extra"
pip_install -e ".[test]"
"$PY" -c "import mamba_state, mamba_state.kernels; print('setup: mamba-state', mamba_state.__version__, 'ready')"
