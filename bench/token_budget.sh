#!/usr/bin/env bash
# Token-budget batching against count-based batching, side by side: the default MiniLM encoder
# twice in one repository (weights hard-linked), both `dispatch = "eager"` and max_batch_size 64,
# one with `max_batch_tokens = ${BUDGET:-2048}`; `wisp perf --compare` over mixed-length token-id
# requests (bench/mixed_lengths.py, 8-256 tokens) at each concurrency in turn for both models.
# Writes bench-results/token_budget.{svg,txt}. Needs scripts/serve.sh's setup (plugins, release
# build, fetched weights) and the test venv (tokenizers).
set -euo pipefail
cd "$(dirname "$0")/.."
port=${PORT:-18300}
. bench/serve.sh
for name in enc_count enc_budget; do
    mkdir -p "$repo/$name/1"
    cp -al model_repository/minilm_embed_encoder/1/. "$repo/$name/1/"
    cp model_repository/minilm_embed_encoder/config.toml "$repo/$name/config.toml"
done
sed -i 's/^dispatch = "eager"$/dispatch = "eager"\nmax_batch_tokens = '"${BUDGET:-2048}"'/' "$repo/enc_budget/config.toml"
grep -q max_batch_tokens "$repo/enc_budget/config.toml"
mkdir -p bench-results
.venv/bin/python bench/mixed_lengths.py > bench-results/mixed_lengths.json
serve "$repo" "$port" bench-results/token_budget_server.log
target/release/wisp perf -m enc_count --compare enc_budget -u "127.0.0.1:$port" \
    --input-data bench-results/mixed_lengths.json --concurrency-range "${CONCURRENCY:-4:32:4}" \
    -p "${INTERVAL_MS:-4000}" --plot bench-results/token_budget.svg "$@" | tee bench-results/token_budget.txt
