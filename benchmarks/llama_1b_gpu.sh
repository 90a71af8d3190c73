#!/usr/bin/env bash
# (d) GPU: llama-1b (the Llama-3.2-1B shapes, random weights) full fine-tuning, LoRA and QLoRA in bf16, peftjax
# against PyTorch + HF PEFT, alternating rounds in one process (benchmarks/compare_hf_peft.py; its docstring says
# what bf16 means on each side). Target: LoRA at >= 1.3x HF PEFT's tokens/s and <= 0.9x its peak memory.
#
# Batch 4 x 512 tokens, the same as (b): full fine-tuning is what must fit. peftjax's compiled plan for full at
# 4 x 512 is 37 GB with fp32 parameters (llama_1b_abstract.json); bf16 parameters halve its parameters, gradients
# and AdamW moments (19.8 -> 9.9 GB), about 27 GB. Both frameworks stay resident in the one process (JAX keeps its
# buffers, PyTorch's caching allocator its pool), so the pair needs about twice that on an 80 GB H100; batch 8
# would double the activations of both and not fit. Override with BATCH=... SEQ=... (e.g. on a larger card), and
# METHODS="lora" to run fewer.
#
# Needs a CUDA GPU that both JAX and PyTorch see (jax[cuda12] and a CUDA build of torch; the dev extra pins a CPU
# torch) and, for qlora, bitsandbytes. Refuses to run otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=benchmarks/results
METHODS=${METHODS:-full lora qlora}
BATCH=${BATCH:-4}
SEQ=${SEQ:-512}

if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "llama_1b_gpu.sh: no NVIDIA GPU here (nvidia-smi failed); item (d) is a GPU benchmark. Run it on a GPU machine." >&2
    exit 1
fi
# Checked up front, not by the script after the first methods have run for minutes.
"$PYTHON" - "$METHODS" <<'EOF'
import importlib.util, sys
import jax, torch
problems = []
if jax.default_backend() != "gpu":
    problems.append(f"JAX runs on {jax.default_backend()!r}, not the GPU: pip install 'jax[cuda12]'")
if not torch.cuda.is_available():
    problems.append(f"PyTorch {torch.__version__} sees no CUDA device: install a CUDA build of torch")
if "qlora" in sys.argv[1].split() and importlib.util.find_spec("bitsandbytes") is None:
    problems.append("qlora's HF side needs bitsandbytes: pip install bitsandbytes (or METHODS='full lora')")
if problems:
    sys.exit("llama_1b_gpu.sh: cannot run item (d) here:\n  " + "\n  ".join(problems))
print(f"JAX: {jax.devices()[0].device_kind}; PyTorch: {torch.cuda.get_device_name()}", file=sys.stderr)
EOF

mkdir -p "$OUT"
for method in $METHODS; do
    name="$OUT/llama_1b_gpu_${method}_vs_hf_peft"
    "$PYTHON" benchmarks/compare_hf_peft.py --model llama-1b --method "$method" --dtype bf16 --batch "$BATCH" \
        --seq "$SEQ" --steps 10 --rounds 3 --warmup 3 --breakdown --json "$name.json" 2>&1 | tee "$name.txt"
done

"$PYTHON" - $METHODS <<'EOF'
import json, sys
for method in sys.argv[1:]:
    r = json.load(open(f"benchmarks/results/llama_1b_gpu_{method}_vs_hf_peft.json"))
    speed, memory = r["ratio"]["tokens_per_s"], r["ratio"]["peak_memory"]
    line = f"{method:6s} tokens/s x{speed:.2f} HF PEFT's, peak memory x{memory or float('nan'):.2f}"
    if method == "lora":
        met = speed >= 1.3 and memory is not None and memory <= 0.9
        line += f"  (target >= 1.30 and <= 0.90: {'met' if met else 'missed'})"
    print(line)
EOF
