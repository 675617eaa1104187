#!/usr/bin/env bash
# Prepares, on this (GPU-less) machine, what scripts/device-check.sh needs on the lent GPU
# machine, which has CUDA and PyTorch but no Rust and no network: everything goes into
# .device/ (git-ignored), to be carried there with the device tool's `carry: [".device"]`.
#   .device/wisp.gz           the release binary, stripped and compressed (~8 MB)
#   .device/minilm/           all-MiniLM-L6-v2 with its weights in fp16 (~45 MB; the GPU
#                             computes in fp16 anyway, and the CPU reference reads the same)
#   .device/tokenizer/        the tokenizer plugin and tokenizer.json of minilm_embed
# The working tree travels too (64 MiB in all): keep the carry under ~55 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
./scripts/build-plugins.sh
cargo build --release -p wisp
WISP_BIN=target/release/wisp ./scripts/fetch-models.sh
rm -rf .device && mkdir -p .device/minilm .device/tokenizer
strip -o .device/wisp target/release/wisp
gzip -9 .device/wisp
cp model_repository/minilm_embed_tokenizer/1/model.wasm model_repository/minilm_embed_tokenizer/1/tokenizer.json .device/tokenizer/
src=model_repository/minilm_embed_encoder/1
cp -r "$src/config.json" "$src/modules.json" "$src/1_Pooling" .device/minilm/
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check numpy==2.4.6 safetensors==0.8.0
.venv/bin/python - "$src/model.safetensors" .device/minilm/model.safetensors <<'PY'
import sys
import numpy as np
from safetensors.numpy import load_file, save_file
tensors = load_file(sys.argv[1])
save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in tensors.items()}, sys.argv[2])
PY
du -sh .device .device/*
