#!/usr/bin/env bash
# The per-call cost of a no-op plugin, Rust against Python and JavaScript, side by side:
# simple_identity (Rust, plugins/identity) and its Python and JavaScript twins
# (bench/plugins/identity_py, identity_js, built with `wisp plugin build`), one 16-byte BYTES element per request at concurrency 1, each concurrency level for both
# models in turn (`wisp perf --compare`). The "server compute" column is the plugin call as the
# server measures it (compute input + infer + output per request). Needs scripts/serve.sh's setup
# (release build, plugins) and scripts/plugin-toolchains.sh (componentize-py, componentize-js). Writes bench-results/plugin_call_cost.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${PORT:-18400}
. bench/serve.sh
mkdir -p "$repo/simple_identity/1" bench-results
cp model_repository/simple_identity/config.toml "$repo/simple_identity/"
cp model_repository/simple_identity/1/model.wasm "$repo/simple_identity/1/"
for twin in identity_py identity_js; do
    target/release/wisp plugin build bench/plugins/$twin --install "$repo/$twin" >/dev/null
    rm -f bench/plugins/$twin/model.wasm
done
serve "$repo" "$port" bench-results/plugin_call_cost_server.log
grep "loaded and started" bench-results/plugin_call_cost_server.log | sed 's/.*model=//'
target/release/wisp perf -m simple_identity --compare identity_py --compare identity_js -u "127.0.0.1:$port" \
    --shape INPUT0:1 --concurrency-range "${CONCURRENCY:-1:1:1}" -p "${INTERVAL_MS:-3000}" "$@" \
    | tee bench-results/plugin_call_cost.txt
