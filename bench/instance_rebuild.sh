#!/usr/bin/env bash
# How long a fresh instance takes after a trap: the Rust hostile plugin (tests/plugins/hostile,
# attack "trap") and the Python one (tests/python/plugins/hostile_py, a loop past its deadline)
# made to fail ROUNDS times each; the server logs each rebuild's time ("instance rebuilt after a
# failure", us = instantiation and init). The first rebuild after a failure waits no delay; in a
# row they back off (50 ms, 100 ms, ...), so the rounds are spaced. Needs the release build,
# scripts/build-plugins.sh and scripts/plugin-toolchains.sh. Writes bench-results/instance_rebuild.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${PORT:-18700}
rounds=${ROUNDS:-10}
. bench/serve.sh
source=$(mktemp -d)
scratch+=("$source")
mkdir -p "$repo/trap_rs/1" bench-results
cp tests/components/wisp_test_hostile.wasm "$repo/trap_rs/1/model.wasm"
cat > "$repo/trap_rs/config.toml" <<'TOML'
backend = "wasm"
max_batch_size = 0
[[input]]
name = "INPUT0"
datatype = "INT32"
dims = [1]
[[output]]
name = "OUTPUT0"
datatype = "BYTES"
dims = [1]
[parameters]
attack = "trap"
TOML
cp -r tests/python/plugins/hostile_py/. "$source/"
target/release/wisp plugin build "$source" --install "$repo/loop_py" >/dev/null
sed -i 's/execution_timeout_ms = 2000/execution_timeout_ms = 200/' "$repo/loop_py/config.toml"
log=bench-results/instance_rebuild_server.log
serve "$repo" "$port" "$log"
for _ in $(seq "$rounds"); do
    curl -s -o /dev/null -X POST "127.0.0.1:$port/v2/models/trap_rs/infer" \
        -d '{"inputs":[{"name":"INPUT0","shape":[1],"datatype":"INT32","data":[1]}]}'
    curl -s -o /dev/null -X POST "127.0.0.1:$port/v2/models/loop_py/infer" \
        -d '{"inputs":[{"name":"TEXT","shape":[1],"datatype":"BYTES","data":["x"]}],"parameters":{"attack":"loop"}}'
    sleep 0.3
done
sleep 1
for model in trap_rs loop_py; do
    grep "instance rebuilt after a failure" "$log" | grep "model=\"$model" | sed 's/.*us=\([0-9]*\).*/\1/' \
        | sort -n | awk -v m="$model" '{v[NR]=$1} END {printf "%s: %d rebuilds, median %d us, min %d, max %d\n", m, NR, v[int((NR+1)/2)], v[1], v[NR]}'
done | tee bench-results/instance_rebuild.txt
