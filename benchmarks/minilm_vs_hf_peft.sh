#!/usr/bin/env bash
# (c) MiniLM-L6 (the packaged checkpoint), peftjax vs PyTorch + HF PEFT on this machine's CPU, batch 32 x 64, fp32:
# LoRA(query, value, r=8) and full fine-tuning; 5 alternating rounds of 10 steps per side, plus the forward-only
# breakdown. Dropout off on both sides (the first pair), then on (the checkpoint's 0.1) for LoRA.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=benchmarks/results
mkdir -p "$OUT"
for method in lora full; do
    "$PYTHON" benchmarks/compare_hf_peft.py --model minilm --method "$method" --batch 32 --seq 64 --steps 10 \
        --rounds 5 --breakdown --json "$OUT/minilm_${method}_vs_hf_peft.json"
done
"$PYTHON" benchmarks/compare_hf_peft.py --model minilm --method lora --batch 32 --seq 64 --steps 10 --rounds 5 \
    --dropout --json "$OUT/minilm_lora_dropout_vs_hf_peft.json"
