# Sourced by the benchmark scripts: makes a temporary model repository folder, $repo, removed
# when the script exits (with any folder added to $scratch); `serve REPOSITORY PORT LOG` starts
# the release server on 127.0.0.1:PORT (metrics on PORT+2, no gRPC) in the background, stops it
# when the script exits, and waits until it is ready.
repo=$(mktemp -d)
scratch=("$repo")
cleanup() { rm -rf "${scratch[@]}"; }
trap cleanup EXIT

serve() {
    local repository=$1 port=$2 log=$3
    target/release/wisp serve --model-repository "$repository" --http-address 127.0.0.1 \
        --http-port "$port" --metrics-port $((port + 2)) --allow-grpc false > "$log" 2>&1 &
    server=$!
    trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; cleanup 2>/dev/null || true' EXIT
    for _ in $(seq 600); do
        curl -sf "127.0.0.1:$port/v2/health/ready" >/dev/null && return 0
        kill -0 $server 2>/dev/null || { echo "wisp exited; see $log" >&2; return 1; }
        sleep 0.2
    done
    echo "wisp was not ready within 120 s; see $log" >&2
    return 1
}
