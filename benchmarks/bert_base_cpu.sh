#!/usr/bin/env bash
# (a) bert-base preset, every method, on this machine's CPU: batch 8 x 128 tokens, fp32.
# Counts, XLA's step FLOPs and memory plan beside the analytic floor, median step time.
# The load average before and after goes beside the results: timings on a shared machine are noisy.
set -euo pipefail
cd "$(dirname "$0")/.."
PEFTJAX=${PEFTJAX:-.venv/bin/peftjax}
OUT=benchmarks/results
mkdir -p "$OUT/charts"
{ echo "before: $(uptime)"; } > "$OUT/bert_base_cpu.uptime"
"$PEFTJAX" bench --model bert-base --methods all --batch 8 --seq 128 --dtype fp32 --steps "${STEPS:-10}" --warmup 2 \
    --json "$OUT/bert_base_cpu.json" --charts "$OUT/charts" | tee "$OUT/bert_base_cpu.txt"
{ echo "after:  $(uptime)"; } >> "$OUT/bert_base_cpu.uptime"
