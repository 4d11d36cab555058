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
stage "cargo clippy" cargo clippy --release --all-targets -- -D warnings
stage "cargo test" cargo test --release
stage "ruff" "$PY" -m ruff check python tests scripts notebooks examples
stage "pytest" "$PY" -m pytest -q -ra --durations=15 "$@"
