#!/usr/bin/env bash
# The embedding pipeline over HTTP: starts `wisp serve` (release) on the default repository and
# measures minilm_embed with `wisp perf` on real sentences (one per request, the sentences of
# /work/shared/bench's short-sentence set), at a concurrency sweep. Writes bench-results/minilm_http.csv.
# Needs scripts/serve.sh's setup (plugins, release build, fetched weights).
set -euo pipefail
cd "$(dirname "$0")/.."
port=${PORT:-18000}
mkdir -p bench-results
python3 bench/sentences.py > bench-results/minilm_sentences.json
target/release/wisp serve --model-repository model_repository --http-address 127.0.0.1 \
    --http-port "$port" --metrics-port $((port + 2)) > bench-results/minilm_http_server.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 100); do
    curl -sf "127.0.0.1:$port/v2/health/ready" >/dev/null && break
    sleep 0.2
done
target/release/wisp perf -m minilm_embed -u "127.0.0.1:$port" --input-data bench-results/minilm_sentences.json \
    --concurrency-range "${CONCURRENCY:-1:13:4}" -f bench-results/minilm_http.csv "$@"
