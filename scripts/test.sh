#!/usr/bin/env bash
# The whole test suite, stage by stage, with each stage's time. Called by `make test` (which
# has built .venv and the extension first) and so by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
# The suite must exercise the native kernels, never the reference compared with itself.
export HLORA_BACKEND=rust
# cargo test links libtorch from the installed torch wheel.
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

stage() {
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name"
  "$@"
  echo "=== $name: $((SECONDS - t0)) s"
}

stage "cargo fmt --check" cargo fmt --check
stage "cargo clippy (both providers)" cargo clippy --release --all-targets --features tch -- -D warnings
stage "cargo clippy (view provider only)" cargo clippy --release --all-targets -- -D warnings
stage "cargo test" cargo test --release --features tch
stage "ruff" "$PY" -m ruff check python tests scripts notebooks examples
stage "pytest" "$PY" -m pytest -q -ra --durations=15 "$@"
# The kernel, training and file tests again on the torch-agnostic view provider (the run above used
# the tch provider, which make builds too). tests/test_versions.py runs them on other torches.
VIEW_TESTS=(tests/test_kernels.py tests/test_errors.py tests/test_design_formulas.py tests/test_contract_fuzz.py
            tests/test_cuda.py tests/test_testing.py tests/test_backend.py tests/test_recorder.py
            tests/test_regularizer.py tests/test_hf.py tests/test_importance_files.py)
if [ $# -eq 0 ]; then
  stage "pytest (view provider)" env HLORA_PROVIDER=view HLORA_EXPECT_PROVIDER=view \
    "$PY" -m pytest -q -ra -p no:cacheprovider -k "not nvrtc_compiles and not cached_on_disk" "${VIEW_TESTS[@]}"
fi
