#!/usr/bin/env bash
# Where the GPU encoder's time goes, kernel by kernel: Nsight Compute (`ncu`, clocks left
# alone) over `wisp gpu bench` without CUDA graphs, on a random BERT-base, at b256 × 128
# (throughput) and b1 × 128 (latency). Run on the lent GPU machine after
# scripts/device-prepare.sh, with `carry: [".device"]`; ends within ~200 s. Writes under
# $OUT: profile.txt (per kernel kind: launches, total and mean time, SM and DRAM
# throughput as % of peak) and the raw CSVs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/wisp-profile-out}
mkdir -p "$OUT"
work=$(mktemp -d)
gunzip -c .device/wisp.gz > "$work/wisp" && chmod +x "$work/wisp"
export WISP_CUDA_HOME=${WISP_CUDA_HOME:-/usr/local/cuda} WISP_KERNEL_CACHE="$work/kernels"
export PATH="$PATH:$WISP_CUDA_HOME/bin"
timeout 60 python3 - "$work/bert-base" <<'PY'
import sys, torch
from transformers import BertConfig, BertModel
torch.manual_seed(0)
BertModel(BertConfig()).save_pretrained(sys.argv[1], safe_serialization=True)
PY
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | head -n 1)
metrics=gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed
# One forward pass is ~86 launches; skip the first five passes (warm-up, plan creation).
for batch in 256 1; do
    timeout 70 "$ncu" --clock-control none --metrics "$metrics" --csv --print-units base --launch-skip 430 \
        --launch-count 172 "$work/wisp" gpu bench --checkpoint "$work/bert-base" \
        --batch "$batch" --seq 128 --seconds 0 --no-graphs > "$OUT/ncu-b$batch.csv" 2> "$OUT/ncu-b$batch.log"
    echo "ncu b$batch: exit $?"
done
python3 - "$OUT" <<'PY' | tee "$OUT/profile.txt"
import csv, collections, sys
out = sys.argv[1]
for batch in (256, 1):
    rows = []
    try:
        lines = [l for l in open(f"{out}/ncu-b{batch}.csv") if l.startswith('"')]
        rows = list(csv.DictReader(lines))
    except FileNotFoundError:
        pass
    kernels = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in rows:
        name = r.get("Kernel Name", "?")
        short = name.split("(")[0][:60]
        value = r.get("Metric Value", "0").replace(",", "")
        scale = {"nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9}.get(r.get("Metric Unit"), 1)
        try:
            kernels[(r.get("ID"), short)][r.get("Metric Name")].append(float(value) * scale)
        except ValueError:
            pass
    per_kind = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    for (_, short), m in kernels.items():
        t = sum(m.get("gpu__time_duration.sum", [0]))
        k = per_kind[short]
        k[0] += 1
        k[1] += t
        k[2] += sum(m.get("sm__throughput.avg.pct_of_peak_sustained_elapsed", [0])) * t
        k[3] += sum(m.get("dram__throughput.avg.pct_of_peak_sustained_elapsed", [0])) * t
    total = sum(k[1] for k in per_kind.values())
    print(f"== b{batch} x 128, BERT-base, {len(kernels)} kernels profiled, {total / 1e6:.3f} ms of kernel time "
          f"(~{total / 2e6:.3f} ms per forward pass)")
    print(f"{'kernel':<62}{'launches':>9}{'total ms':>10}{'share':>7}{'mean us':>9}{'SM %':>6}{'DRAM %':>7}")
    for short, (n, t, sm, dram) in sorted(per_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"{short:<62}{n:>9}{t / 1e6:>10.3f}{t / max(total, 1):>7.1%}{t / n / 1e3:>9.1f}"
              f"{sm / max(t, 1):>6.0f}{dram / max(t, 1):>7.0f}")
PY
rm -rf "$work"
