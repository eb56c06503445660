#!/usr/bin/env bash
# Release checks, run by .ci/run after the test suite: lint (ruff), types (mypy), docs (mkdocs --strict and the API
# coverage check), notebooks (executed, < 60 s each), and the distribution (sdist + wheel built, the wheel installed
# into a fresh virtual environment and smoke-tested). Every step is timed; any failing step fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export NO_MKDOCS_2_WARNING=1 PYTHONUNBUFFERED=1
OUT=build/ci_release
rm -rf "$OUT" && mkdir -p "$OUT"

# step NAME COMMAND...: run and time one step. errexit stays in force inside it (a command in an `if` or `||`
# would switch it off), so the first failing command ends the script; the EXIT trap names the step that failed.
CURRENT="" T0=$SECONDS
step() {
    CURRENT=$1; shift
    T0=$SECONDS
    echo "ci_release: --- $CURRENT"
    "$@"
    echo "ci_release: $CURRENT ok ($(( SECONDS - T0 )) s)"
    CURRENT=""
}
trap 'rc=$?; if [ "$rc" -ne 0 ] && [ -n "$CURRENT" ]; then
          echo "ci_release: $CURRENT FAILED with exit status $rc ($(( SECONDS - T0 )) s)"; fi' EXIT

install_tools() { "$PY" -m pip install --disable-pip-version-check -q -e ".[docs,dev]"; }

docs() {
    "$PY" -m mkdocs build --strict --site-dir "$OUT/site"
    "$PY" scripts/check_docs_api.py "$OUT/site"
}

wheel() {
    if ! "$PY" -m build --outdir "$OUT/dist" . > "$OUT/build.log" 2>&1; then tail -50 "$OUT/build.log"; return 1; fi
    ls "$OUT"/dist
    local whl sdist
    whl=$(ls "$OUT"/dist/*.whl) && sdist=$(ls "$OUT"/dist/*.tar.gz)
    # the wheel carries mamba_state (kernels inside it as mamba_state/kernels) and nothing else at the top level
    "$PY" - "$whl" "$sdist" <<'PYEOF'
import sys, tarfile, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
top = {n.split("/")[0] for n in names}
extra = {t for t in top if t != "mamba_state" and not t.endswith(".dist-info")}
assert not extra, f"wheel: expected only mamba_state at the top level, found also {sorted(extra)}"
assert "mamba_state/kernels/__init__.py" in names, "wheel: expected mamba_state/kernels/__init__.py, found none"
assert "mamba_state/py.typed" in names, "wheel: expected the PEP 561 marker mamba_state/py.typed, found none"
members = tarfile.open(sys.argv[2]).getnames()
assert any(m.endswith("/kernels/__init__.py") for m in members), "sdist: expected kernels/, found none"
print(f"wheel: {len(names)} files, top level {sorted(top)}; sdist: {len(members)} entries")
PYEOF
    # a new user's install: a fresh environment (no system site packages) with the CPU build of torch, then the
    # wheel with its dependencies resolved by pip from the index, run from outside the repository. A CPU install
    # must not bring triton (about 1 GB installed); wheel_smoke.py checks that too.
    rm -rf "$OUT/venv"
    "$PY" -m venv "$OUT/venv"
    "$OUT/venv/bin/python" -m pip install --disable-pip-version-check -q "torch==2.13.0"
    "$OUT/venv/bin/python" -m pip install --disable-pip-version-check -q "$whl"
    local smoke
    smoke=$(readlink -f scripts/wheel_smoke.py)
    local venv_py="$PWD/$OUT/venv/bin/python"   # not resolved: the symlink is what makes it the venv's Python
    (cd "$OUT" && env -u PYTHONPATH "$venv_py" -I "$smoke")
}

total0=$SECONDS
step "install docs and lint tools (.[docs,dev])" install_tools
step "ruff" "$PY" -m ruff check .
step "mypy (public API modules)" "$PY" -m mypy
step "docs (mkdocs --strict, API coverage)" docs
step "notebooks (examples/*.ipynb, < 60 s each)" "$PY" scripts/run_notebooks.py --limit 60
step "wheel (build, fresh venv, smoke test)" wheel
echo "ci_release: all release checks passed in $(( SECONDS - total0 )) s"
