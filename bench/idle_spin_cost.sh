#!/usr/bin/env bash
# Server CPU per request against latency, with and without the instances' idle spin:
# `simple` over gRPC at concurrency 1 with `wisp perf`, the server's CPU time read from
# /proc before and after each run (two runs per setting, interleaved).
#
#     cargo build --release && bench/idle_spin_cost.sh [SPIN_US ...]   (default: 0 300)
set -euo pipefail
cd "$(dirname "$0")/.."
WISP=${WISP_BIN:-target/release/wisp}
SPINS=("${@:-0 300}")
repo=$(mktemp -d)
trap 'rm -rf "$repo"' EXIT
cp -r model_repository/simple "$repo/"
ticks_per_s=$(getconf CLK_TCK)
echo "| idle spin (µs) | throughput (req/s) | p50 (µs) | server CPU per request (µs) |"
echo "|---|---|---|---|"
for round in 1 2; do
  for spin in ${SPINS[*]}; do
    "$WISP" serve --model-repository "$repo" --http-address 127.0.0.1 --http-port 18300 \
      --grpc-port 18301 --metrics-port 18302 --instance-idle-spin-us "$spin" >/dev/null 2>&1 &
    pid=$!
    for _ in $(seq 100); do
      curl -sf 127.0.0.1:18300/v2/health/ready >/dev/null && break
      sleep 0.1
    done
    cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
    count() {
      curl -s 127.0.0.1:18300/v2/models/simple/stats |
        python3 -c "import sys, json; print(json.load(sys.stdin)['model_stats'][0]['inference_stats']['success']['count'])"
    }
    t0=$(cpu); n0=$(count)
    row=$("$WISP" perf -m simple -i grpc -u 127.0.0.1:18301 -p 1000 -r 3 -s 100 2>/dev/null | tail -1)
    t1=$(cpu); n1=$(count)
    kill "$pid"; wait "$pid" 2>/dev/null || true
    throughput=$(echo "$row" | cut -d'|' -f3 | tr -d ' ')
    p50=$(echo "$row" | cut -d'|' -f4 | tr -d ' ')
    per=$(python3 -c "print(round(($t1 - $t0) / $ticks_per_s * 1e6 / max($n1 - $n0, 1), 1))")
    echo "| $spin | $throughput | $p50 | $per |"
  done
done
