#!/usr/bin/env bash
# The GPU encoder's device checks, in one run on the lent GPU machine (see
# scripts/device-prepare.sh, which builds what this needs, and docs/MEASUREMENTS.md,
# where the results are recorded). Writes logs under $OUT:
#   info.json, nvidia-smi.txt   the card
#   check.txt                   every kernel vs its CPU twin; GPU vs CPU encoder on the
#                               real MiniLM and a random BERT-base (max error, cosine)
#   torch.jsonl                 PyTorch eager fp16 BertModel, same shapes (the anchor)
#   bench.jsonl                 wisp gpu bench: BERT-base b1/b64/b256 × 128, mixed
#                               lengths packed vs padded, 3-layer b256
#   http.csv, http.txt          minilm_embed on the GPU over HTTP, wisp perf sweep
#   summary.txt                 ratios wisp / PyTorch
# Usage there: bash scripts/device-check.sh [quick]   ("quick": 1 s per case)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/wisp-device-out}
mkdir -p "$OUT"
work=$(mktemp -d)
seconds=3
[ "${1:-}" = quick ] && seconds=1
export WISP_CUDA_HOME=${WISP_CUDA_HOME:-/usr/local/cuda}
export WISP_KERNEL_CACHE="$work/kernels"
export PYTHONUNBUFFERED=1
gunzip -c .device/wisp.gz > "$work/wisp" && chmod +x "$work/wisp"
wisp="$work/wisp"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$wisp" gpu info | tee "$OUT/info.json"

echo "== PyTorch baseline (and the checkpoints both engines run)"
timeout 300 python3 bench/gpu/torch_baseline.py --out "$OUT/torch.jsonl" --save "$work/ckpt" \
    --seconds "$seconds" 2>&1 | tail -n 20

echo "== kernels vs CPU twins, models vs the CPU encoder"
timeout 240 "$wisp" gpu check --checkpoint .device/minilm --checkpoint "$work/ckpt/bert-base" \
    2>&1 | tee "$OUT/check.txt"

echo "== wisp gpu bench"
{
    timeout 120 "$wisp" gpu bench --checkpoint "$work/ckpt/bert-base" --batch 1,64,256 --seq 128 \
        --mixed --seconds "$seconds"
    timeout 60 "$wisp" gpu bench --checkpoint "$work/ckpt/bert-3layer" --batch 256 --seq 128 \
        --seconds "$seconds"
    timeout 60 "$wisp" gpu bench --checkpoint "$work/ckpt/bert-base" --batch 1 --seq 128 \
        --seconds "$seconds" --no-graphs
} 2>&1 | tee "$OUT/bench.jsonl"

echo "== minilm_embed on the GPU over HTTP"
repo="$work/repository"
mkdir -p "$repo"
for m in minilm_embed minilm_embed_tokenizer minilm_embed_encoder; do
    mkdir -p "$repo/$m/1" && cp "model_repository/$m/config.toml" "$repo/$m/"
done
cp .device/tokenizer/* "$repo/minilm_embed_tokenizer/1/"
cp -r .device/minilm/* "$repo/minilm_embed_encoder/1/"
sed -i 's/^kind = "cpu"/kind = "gpu"/' "$repo/minilm_embed_encoder/config.toml"
printf 'precision = "fp16"\n' >> "$repo/minilm_embed_encoder/config.toml"
"$wisp" serve --model-repository "$repo" --http-address 127.0.0.1 --http-port 18000 \
    --metrics-port 18002 > "$OUT/http-server.log" 2>&1 &
server=$!
for _ in $(seq 150); do
    curl -sf 127.0.0.1:18000/v2/health/ready > /dev/null && break
    sleep 0.2
done
python3 bench/sentences.py > "$work/sentences.json"
timeout 150 "$wisp" perf -m minilm_embed -u 127.0.0.1:18000 --input-data "$work/sentences.json" \
    --concurrency-range 1:64:8 -p 1500 -f "$OUT/http.csv" 2>&1 | tee "$OUT/http.txt"
curl -s 127.0.0.1:18002/metrics | grep -E "^nv_gpu|^nv_inference_(count|exec_count)" >> "$OUT/http.txt"
kill "$server"; wait "$server"

echo "== summary"
python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, sys
out = sys.argv[1]
def lines(name):
    try:
        return [json.loads(l) for l in open(f"{out}/{name}") if l.startswith("{")]
    except FileNotFoundError:
        return []
torch = {(r["layers"], r["case"]): r for r in lines("torch.jsonl") if r["engine"] == "torch-eager"}
for r in lines("bench.jsonl"):
    if "seq_per_s" not in r:
        print(json.dumps(r)); continue
    t = torch.get((r.get("layers"), r["case"]))
    ratio = f"{r['seq_per_s'] / t['seq_per_s']:.2f}x torch ({t['seq_per_s']:.0f} seq/s)" if t else ""
    print(f"{r['case']:<28} layers {r.get('layers')} graphs {r.get('graphs', '')}: {r['seq_per_s']:9.0f} seq/s  "
          f"median {r['median_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  {ratio}")
PY
rm -rf "$work"
