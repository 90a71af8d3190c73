#!/usr/bin/env bash
# (b) llama-1b (every method that applies) and llama-8b (the headline methods), abstract: shapes only (jax.eval_shape), lowering and
# compilation; nothing allocated, nothing timed. bf16 compute with fp32 parameters (train.precision=bf16),
# causal LM, batch 4 x 512 tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
PEFTJAX=${PEFTJAX:-.venv/bin/peftjax}
OUT=benchmarks/results
mkdir -p "$OUT/charts"
# llama-8b takes the headline methods only: each of its 32-layer programs takes minutes to compile on 2 cores.
for model in llama-1b llama-8b; do
    name=${model//-/_}_abstract
    methods=all
    [ "$model" = llama-8b ] && methods=${METHODS_8B:-full,lora,qlora,ia3,bottleneck:variant=pfeiffer}
    "$PEFTJAX" bench --model "$model" --methods "$methods" --batch 4 --seq 512 --dtype bf16 --abstract \
        --json "$OUT/$name.json" --charts "$OUT/charts" | tee "$OUT/$name.txt"
done
# QLoRA saves memory by quantising the layers it adapts: on every linear layer (the QLoRA paper's setting), against
# LoRA on the same layers over the full-precision base.
"$PEFTJAX" bench --model llama-1b --methods lora:targets=all-linear,qlora:targets=all-linear --batch 4 --seq 512 --dtype bf16 \
    --abstract --json "$OUT/llama_1b_abstract_all_linear.json" --charts "$OUT/charts" | tee "$OUT/llama_1b_abstract_all_linear.txt"
