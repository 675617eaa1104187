#!/usr/bin/env bash
# The GPU encoder's device checks, in one run on the lent GPU machine (see
# scripts/device-prepare.sh, which builds what this needs, and docs/MEASUREMENTS.md,
# where the results are recorded). The whole run ends within $WISP_DEVICE_BUDGET
# seconds (default 480; one device command may run 600): every step has a cap, cut
# to what is left. At most 8 files come back from a device run, so it writes these
# under $OUT:
#   summary.txt      written first, updated as each step ends: status and time of
#                    every step, then wisp / PyTorch ratios
#   info.json        `wisp gpu info`: the card, driver, NVRTC, cuBLASLt, the libraries
#                    loaded and where from, registers/local memory of every kernel
#   check.txt        every kernel vs its CPU twin; GPU vs CPU encoder on the real
#                    MiniLM and a random BERT-base; one instance capturing graphs while
#                    others are built on another thread
#   torch.jsonl      PyTorch eager fp16 BertModel, same shapes (the anchor)
#   bench.jsonl      wisp gpu bench: BERT-base b1/b64/b256 × 128, mixed lengths packed
#                    vs padded, 3-layer b256, b1 without graphs
#   http.txt         minilm_embed over HTTP with TWO GPU instances on one GPU (the
#                    capture/setup ordering), `wisp perf` sweep, metrics, log findings
#   sanitizer.txt    compute-sanitizer memcheck and racecheck over `wisp gpu check`
#   logs.tar.gz      everything else (nvidia-smi, server and step logs, perf CSV)
# Usage there: bash scripts/device-check.sh [quick]   ("quick": 1 s per case)
# Here, without a GPU: WISP_DEVICE_LOCAL=1 bash scripts/device-check.sh quick runs the
# same steps (GPU steps fail fast; the HTTP step uses CPU instances) to test the script.
# WISP_DEVICE_STEPS="setup torch check bench" runs only those steps (a kernel change's
# re-check, in less device time).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/wisp-device-out}
mkdir -p "$OUT"
BUDGET=${WISP_DEVICE_BUDGET:-480}
LOCAL=${WISP_DEVICE_LOCAL:-0}
started=$SECONDS
work=$(mktemp -d)
logs="$work/logs"
mkdir -p "$logs"
seconds=2
[ "${1:-}" = quick ] && seconds=1
export WISP_CUDA_HOME=${WISP_CUDA_HOME:-/usr/local/cuda}
export WISP_KERNEL_CACHE="$work/kernels"
export PYTHONUNBUFFERED=1
export PATH="$PATH:$WISP_CUDA_HOME/bin"

steps=(setup torch check http bench sanitizer)
selected=" ${WISP_DEVICE_STEPS:-${steps[*]}} "
declare -A state
for s in "${steps[@]}"; do
    state[$s]=pending
    [[ $selected == *" $s "* ]] || state[$s]="skipped (WISP_DEVICE_STEPS)"
done

write_summary() {
    {
        echo "wisp device check, $(date -u +%FT%TZ): $((SECONDS - started)) s of a ${BUDGET} s budget"
        for s in "${steps[@]}"; do printf '  %-10s %s\n' "$s" "${state[$s]}"; done
        [ -s "$work/ratios.txt" ] && { echo; cat "$work/ratios.txt"; }
        [ -s "$work/findings.txt" ] && { echo; cat "$work/findings.txt"; }
        true
    } > "$OUT/summary.txt.tmp"
    mv "$OUT/summary.txt.tmp" "$OUT/summary.txt"
}

# The cap of a step: its own, or what is left of the budget less a reserve for packing.
cap() {
    local own=$1 rest=$((BUDGET - (SECONDS - started) - 20))
    ((rest < own)) && own=$rest
    ((own < 1)) && own=1
    echo "$own"
}

# step NAME CAP FUNCTION: runs FUNCTION in a shell of its own under a time-out.
step() {
    local name=$1 t s0=$SECONDS rc
    [[ $selected == *" $name "* ]] || return 0
    t=$(cap "$2")
    state[$name]="running (cap ${t} s)"
    write_summary
    echo "== $name (cap ${t} s)"
    timeout -k 5 "$t" bash -c "$3" > "$logs/$name.log" 2>&1
    rc=$?
    tail -n 25 "$logs/$name.log"
    case $rc in
        0) state[$name]="ok ($((SECONDS - s0)) s)" ;;
        124 | 137) state[$name]="TIMED OUT at its cap of ${t} s" ;;
        *) state[$name]="FAILED (exit $rc after $((SECONDS - s0)) s; see logs.tar.gz $name.log)" ;;
    esac
    write_summary
}

finish() {
    write_summary
    cp "$OUT"/*.log "$logs/" 2> /dev/null
    tar -czf "$OUT/logs.tar.gz" -C "$work" logs 2> /dev/null
    rm -rf "$work"
}
trap finish EXIT
write_summary

export work logs seconds LOCAL OUT
wisp="$work/wisp"
export wisp

step setup 30 '
    set -e
    if [ -f .device/wisp.gz ]; then gunzip -c .device/wisp.gz > "$wisp"; else cp target/release/wisp "$wisp"; fi
    chmod +x "$wisp"
    nvidia-smi > "$logs/nvidia-smi.txt" 2>&1 || true
    "$wisp" gpu info | tee "$OUT/info.json"
'

step torch 90 '
    set -e
    [ "$LOCAL" = 1 ] && { echo "local run: no PyTorch baseline"; exit 0; }
    python3 bench/gpu/torch_baseline.py --out "$OUT/torch.jsonl" --save "$work/ckpt" --seconds "$seconds"
'

step check 100 '
    set -o pipefail
    extra=()
    [ -d "$work/ckpt/bert-base" ] && extra=(--checkpoint "$work/ckpt/bert-base")
    "$wisp" gpu check --checkpoint .device/minilm "${extra[@]}" 2>&1 | tee "$OUT/check.txt"
'

step http 90 '
    set -o pipefail
    repo="$work/repository"
    for m in minilm_embed minilm_embed_tokenizer minilm_embed_encoder; do
        mkdir -p "$repo/$m/1" && cp "model_repository/$m/config.toml" "$repo/$m/"
    done
    cp .device/tokenizer/* "$repo/minilm_embed_tokenizer/1/"
    cp -r .device/minilm/* "$repo/minilm_embed_encoder/1/"
    config="$repo/minilm_embed_encoder/config.toml"
    # Two instances on one GPU: one is built and warmed up while the other serves.
    sed -i "s/^count = 1/count = 2/" "$config"
    if [ "$LOCAL" = 1 ]; then
        sed -i "s/^count = 2/count = 1/" "$config"
    else
        sed -i "s/^kind = \"cpu\"/kind = \"gpu\"/" "$config"
        printf "precision = \"fp16\"\n" >> "$config"
    fi
    {
        echo "# minilm_embed_encoder config"; cat "$config"
    } > "$OUT/http.txt"
    "$wisp" serve --model-repository "$repo" --http-address 127.0.0.1 --http-port 18000 \
        --metrics-port 18002 --allow-grpc false > "$logs/http-server.log" 2>&1 &
    server=$!
    trap "kill $server 2> /dev/null" EXIT
    ready=0
    for _ in $(seq 150); do
        if python3 -c "import urllib.request as u; u.urlopen(\"http://127.0.0.1:18000/v2/health/ready\", timeout=1)" 2> /dev/null; then
            ready=1; break
        fi
        sleep 0.2
    done
    [ $ready = 1 ] || { echo "the server did not become ready"; tail -n 30 "$logs/http-server.log"; exit 1; }
    python3 bench/sentences.py > "$work/sentences.json"
    "$wisp" perf -m minilm_embed -u 127.0.0.1:18000 --input-data "$work/sentences.json" \
        --concurrency-range 1:64:8 -p 1500 -f "$logs/http.csv" 2>&1 | tee -a "$OUT/http.txt"
    {
        echo "# metrics"
        python3 -c "import urllib.request; print(urllib.request.urlopen(\"http://127.0.0.1:18002/metrics\").read().decode())" \
            | grep -E "^(nv_gpu|nv_inference_(count|exec_count)|wisp_model_instances_out_of_service|wisp_model_ready)"
        echo "# server log: instances, captures, faults"
        grep -E "encoder loaded|kernel loaded|capture|out of service|ERROR|WARN" "$logs/http-server.log" | head -n 60
    } >> "$OUT/http.txt"
    kill $server; wait $server 2> /dev/null
    ! grep -qE "capture failed|out of service" "$logs/http-server.log"
'

step bench 90 '
    set -o pipefail
    [ -d "$work/ckpt/bert-base" ] || { echo "no BERT-base checkpoint (the torch step failed)"; exit 1; }
    {
        timeout 50 "$wisp" gpu bench --checkpoint "$work/ckpt/bert-base" --batch 1,64,256 --seq 128 \
            --mixed --seconds "$seconds"
        timeout 20 "$wisp" gpu bench --checkpoint "$work/ckpt/bert-3layer" --batch 256 --seq 128 \
            --seconds "$seconds"
        timeout 20 "$wisp" gpu bench --checkpoint "$work/ckpt/bert-base" --batch 1 --seq 128 \
            --seconds "$seconds" --no-graphs
    } 2>&1 | tee "$OUT/bench.jsonl"
'

step sanitizer 100 '
    sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    if [ ! -x "$sanitizer" ]; then
        echo "compute-sanitizer is not on this machine" | tee "$OUT/sanitizer.txt"; exit 0
    fi
    status=0
    for tool in memcheck racecheck; do
        echo "== compute-sanitizer --tool $tool wisp gpu check" >> "$OUT/sanitizer.txt"
        timeout 45 "$sanitizer" --tool "$tool" --error-exitcode 3 "$wisp" gpu check \
            >> "$OUT/sanitizer.txt" 2>&1
        rc=$?
        echo "== $tool: exit $rc" >> "$OUT/sanitizer.txt"
        [ $rc -ne 0 ] && status=1
    done
    tail -n 40 "$OUT/sanitizer.txt"
    exit $status
'

python3 - "$OUT" > "$work/ratios.txt" 2>> "$logs/summary.log" <<'PY'
import json, sys
out = sys.argv[1]
def lines(name):
    try:
        return [json.loads(l) for l in open(f"{out}/{name}") if l.startswith("{")]
    except (FileNotFoundError, json.JSONDecodeError):
        return []
torch = {(r["layers"], r["case"]): r for r in lines("torch.jsonl") if r.get("engine") == "torch-eager"}
for r in lines("bench.jsonl"):
    if "seq_per_s" not in r:
        print(json.dumps(r)); continue
    t = torch.get((r.get("layers"), r["case"]))
    ratio = f"{r['seq_per_s'] / t['seq_per_s']:.2f}x torch ({t['seq_per_s']:.0f} seq/s)" if t else ""
    print(f"{r['case']:<28} layers {r.get('layers')} graphs {r.get('graphs', '')}: {r['seq_per_s']:9.0f} seq/s  "
          f"median {r['median_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  {ratio}")
PY
grep -E '"passed": false|FAILED|all GPU checks passed' "$OUT/check.txt" 2> /dev/null | head -n 20 > "$work/findings.txt"
grep -E "ERROR SUMMARY|RACECHECK SUMMARY|exit [0-9]+" "$OUT/sanitizer.txt" 2> /dev/null >> "$work/findings.txt"
write_summary
cat "$OUT/summary.txt"
