#!/usr/bin/env bash
# The host's tokenize import against tokenizers compiled into the component, side by side:
# minilm_embed_tokenizer (Rust, Hugging Face tokenizers built for wasm32 inside the plugin)
# against its Python and JavaScript twins (bench/plugins/tokenize_py, tokenize_js: the SDKs'
# Tokenizer, which the host runs natively), on the same tokenizer.json, short English sentences
# (bench/sentences.py), BATCH (default 8) texts a request, each concurrency level for the three
# in turn (`wisp perf --compare`). Needs scripts/serve.sh's setup (release build, plugins, MiniLM)
# and scripts/plugin-toolchains.sh. Writes bench-results/tokenize_import.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${PORT:-18420}
. bench/serve.sh
mkdir -p "$repo/minilm_embed_tokenizer" bench-results
cp -r model_repository/minilm_embed_tokenizer/. "$repo/minilm_embed_tokenizer/"
for twin in tokenize_py tokenize_js; do
    target/release/wisp plugin build bench/plugins/$twin --install "$repo/$twin" >/dev/null
    rm -f bench/plugins/$twin/model.wasm
    cp model_repository/minilm_embed_tokenizer/1/tokenizer.json "$repo/$twin/1/"
done
batch=${BATCH:-8}
python3 bench/sentences.py 200 "$batch" > "$repo/sentences.json"
serve "$repo" "$port" bench-results/tokenize_import_server.log
target/release/wisp perf -m minilm_embed_tokenizer --compare tokenize_py --compare tokenize_js \
    -u "127.0.0.1:$port" --input-data "$repo/sentences.json" -b "$batch" \
    --concurrency-range "${CONCURRENCY:-1:4:3}" -p "${INTERVAL_MS:-3000}" "$@" \
    | tee bench-results/tokenize_import.txt
