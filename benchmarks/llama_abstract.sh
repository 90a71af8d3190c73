#!/usr/bin/env bash
# (b) llama-1b and llama-8b, every method that applies, abstract: shapes only (jax.eval_shape), lowering and
# compilation; nothing allocated, nothing timed. bf16 compute with fp32 parameters (train.precision=bf16),
# causal LM, batch 4 x 512 tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
PEFTJAX=${PEFTJAX:-.venv/bin/peftjax}
OUT=benchmarks/results
mkdir -p "$OUT/charts"
for model in llama-1b llama-8b; do
    name=${model//-/_}_abstract
    "$PEFTJAX" bench --model "$model" --methods all --batch 4 --seq 512 --dtype bf16 --abstract \
        --json "$OUT/$name.json" --charts "$OUT/charts" | tee "$OUT/$name.txt"
done
