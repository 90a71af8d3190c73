#!/usr/bin/env bash
# (k) ResNets, the methods that apply to a CNN (full, linear probe, BitFit, batch-norm tuning), fp32, batch 8 x
# 224x224 images: resnet-18 and resnet-34 timed on this machine's CPU, resnet-50 abstract (shapes only: XLA's
# FLOPs and memory plan, nothing allocated or timed). The load average before and after goes beside the timed
# results: timings on a shared machine are noisy.
set -euo pipefail
cd "$(dirname "$0")/.."
PEFTJAX=${PEFTJAX:-.venv/bin/peftjax}
OUT=benchmarks/results
METHODS=full,linear_probe,bitfit,ln_tuning
mkdir -p "$OUT/charts"
for model in resnet-18 resnet-34; do
    name=${model//-/_}_cpu
    { echo "before: $(uptime)"; } > "$OUT/$name.uptime"
    "$PEFTJAX" bench --model "$model" --methods "$METHODS" --batch 8 --image-size 224 --dtype fp32 \
        --steps "${STEPS:-5}" --warmup 2 --json "$OUT/$name.json" --charts "$OUT/charts" | tee "$OUT/$name.txt"
    { echo "after:  $(uptime)"; } >> "$OUT/$name.uptime"
done
"$PEFTJAX" bench --model resnet-50 --methods "$METHODS" --batch 8 --image-size 224 --dtype fp32 --abstract \
    --json "$OUT/resnet_50_abstract.json" --charts "$OUT/charts" | tee "$OUT/resnet_50_abstract.txt"
