#!/usr/bin/env bash
# The per-call cost of a no-op plugin, Rust against Python, side by side: simple_identity (Rust,
# plugins/identity) and its Python twin (bench/plugins/identity_py, built with `wisp plugin
# build`), one 16-byte BYTES element per request at concurrency 1, each concurrency level for both
# models in turn (`wisp perf --compare`). The "server compute" column is the plugin call as the
# server measures it (compute input + infer + output per request). Needs scripts/serve.sh's setup
# (release build, plugins) and scripts/plugin-toolchains.sh. Writes bench-results/plugin_call_cost.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${PORT:-18400}
. bench/serve.sh
repo=$(mktemp -d)
cleanup() { rm -rf "$repo"; }
trap cleanup EXIT
mkdir -p "$repo/simple_identity/1" bench-results
cp model_repository/simple_identity/config.toml "$repo/simple_identity/"
cp model_repository/simple_identity/1/model.wasm "$repo/simple_identity/1/"
target/release/wisp plugin build bench/plugins/identity_py --install "$repo/identity_py" >/dev/null
rm -f bench/plugins/identity_py/model.wasm
serve "$repo" "$port" bench-results/plugin_call_cost_server.log
grep "loaded and started" bench-results/plugin_call_cost_server.log | sed 's/.*model=//'
target/release/wisp perf -m simple_identity --compare identity_py -u "127.0.0.1:$port" \
    --shape INPUT0:1 --concurrency-range "${CONCURRENCY:-1:1:1}" -p "${INTERVAL_MS:-3000}" "$@" \
    | tee bench-results/plugin_call_cost.txt
