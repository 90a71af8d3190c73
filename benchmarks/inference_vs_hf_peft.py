"""Inference with LoRA: the base model, the adapters unmerged, and merged, on both sides.

MiniLM-L6 (the packaged checkpoint, a new 2-label head), eval mode, fp32, batch 32 x
64, LoRA(query, value, r=8, alpha=16) with random non-zero B (a fresh adapter adds
nothing and could be skipped). Six forward passes (logits, no gradients) alternate in
rounds in one process, in an order rotated per round:

* peftjax: the base model; LoRA unmerged; LoRA merged (``peftjax.merge``), each a
  jitted forward;
* PyTorch: transformers' model; HF PEFT unmerged; merged (``merge_and_unload``), under
  ``torch.inference_mode``.

Reported: median forward time per variant, merged / base and unmerged / base on each
side, and beside the unmerged overhead its FLOPs: XLA's count (unmerged minus base) and
the analytic formula (``analytic.forward_overhead``: 2r(d+k) + k + k[s != 1] per token
per adapted matrix). Merged must equal base within noise; the logits of merged and
unmerged are checked equal within fp32 rounding. Needs a quiet machine.

    python benchmarks/inference_vs_hf_peft.py --json benchmarks/results/minilm_inference_vs_hf_peft.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from comparison import Source, make_batch, set_targets, uptime  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import peftjax  # noqa: E402
from peftjax.bench import analytic  # noqa: E402
from peftjax.models import from_pretrained  # noqa: E402
from peftjax.train.tasks import call_model  # noqa: E402

RANK, ALPHA = 8, 16.0


def randomise_lora_b(model: nnx.Module, seed: int = 0) -> None:
    key = jax.random.key(seed)
    for _, wrapper in peftjax.iter_wrappers(model):
        key, sub = jax.random.split(key)
        wrapper.lora_b[...] = 0.02 * jax.random.normal(sub, wrapper.lora_b.shape, wrapper.lora_b.dtype)


class JaxForward:
    def __init__(self, name: str, model: nnx.Module, inputs: dict):
        self.name, self.model = name, model
        graphdef, state = nnx.split(model)
        self.fn = jax.jit(lambda state, inputs: call_model(nnx.merge(graphdef, state), inputs))
        self.args = (state, inputs)
        lowered = self.fn.lower(*self.args)
        self.flops = float(lowered.compile().cost_analysis()["flops"])

    def __call__(self):
        return jax.block_until_ready(self.fn(*self.args))


class TorchForward:
    def __init__(self, name: str, model: torch.nn.Module, inputs: dict):
        self.name, self.model, self.inputs, self.flops = name, model.eval(), inputs, None

    def __call__(self):
        with torch.inference_mode():
            return self.model(**self.inputs).logits


def peftjax_variants(source: Source, options, batch: dict) -> list[JaxForward]:
    inputs = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items() if k != "labels"}

    def load() -> nnx.Module:
        model = from_pretrained(source.folder, task=source.task.head, num_labels=2, ignore_mismatched_sizes=True)
        model.eval()
        return model

    base = load()
    unmerged = peftjax.apply(load(), peftjax.LoraConfig(rank=RANK, alpha=ALPHA, targets=options.targets))
    randomise_lora_b(unmerged)
    merged = peftjax.merge(nnx.clone(unmerged))
    return [JaxForward("peftjax base", base, inputs), JaxForward("peftjax LoRA unmerged", unmerged, inputs),
            JaxForward("peftjax LoRA merged", merged, inputs)]  # fmt: skip


def hf_variants(source: Source, options, batch: dict) -> list[TorchForward]:
    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.utils.logging.disable_progress_bar()
    inputs = {k: torch.as_tensor(v) for k, v in batch.items() if k != "labels"}

    def load() -> torch.nn.Module:
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification.from_pretrained(source.folder, num_labels=2)

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(options.targets))
    unmerged = get_peft_model(load(), config)
    torch.manual_seed(1)
    for name, parameter in unmerged.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    merged = get_peft_model(load(), config)
    merged.load_state_dict(unmerged.state_dict())
    return [TorchForward("HF base", load(), inputs), TorchForward("HF PEFT LoRA unmerged", unmerged, inputs),
            TorchForward("HF PEFT LoRA merged", merged.merge_and_unload(), inputs)]  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--calls", type=int, default=10, help="timed forward passes per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    options = types.SimpleNamespace(method="lora", batch=args.batch, seq=args.seq, targets=None)
    source = Source.resolve("minilm")
    set_targets(options, source)
    batch = make_batch(options, source)
    torch.set_num_threads(2)
    ours, theirs = peftjax_variants(source, options, batch), hf_variants(source, options, batch)
    variants = ours + theirs
    # Merged equals unmerged on each side (the function is the same; the order of the sums is not).
    np.testing.assert_allclose(np.asarray(ours[2]()), np.asarray(ours[1]()), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(theirs[2]().numpy(), theirs[1]().numpy(), rtol=1e-4, atol=1e-5)
    load_before = uptime()
    for variant in variants:
        for _ in range(3):
            variant()
    times = {v.name: [] for v in variants}
    for index in range(args.rounds):
        for variant in variants[index % len(variants):] + variants[: index % len(variants)]:
            for _ in range(args.calls):
                start = time.perf_counter()
                variant()
                times[variant.name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    tokens = args.batch * args.seq
    overhead, formula = analytic.forward_overhead(ours[1].model, tokens)
    result = {
        "config": {"model": "minilm", "batch": args.batch, "seq": args.seq, "rank": RANK, "alpha": ALPHA,
                   "targets": list(options.targets), "calls": args.calls, "rounds": args.rounds, "dtype": "fp32",
                   "torch_threads": torch.get_num_threads()},
        "median_forward_s": median,
        "forward_times_s": times,
        "ratios": {
            "peftjax merged / base": median["peftjax LoRA merged"] / median["peftjax base"],
            "peftjax unmerged / base": median["peftjax LoRA unmerged"] / median["peftjax base"],
            "HF merged / base": median["HF PEFT LoRA merged"] / median["HF base"],
            "HF unmerged / base": median["HF PEFT LoRA unmerged"] / median["HF base"],
            "peftjax base / HF base": median["peftjax base"] / median["HF base"],
        },
        "unmerged_overhead_flops": {"xla": ours[1].flops - ours[0].flops, "analytic": overhead, "formula": formula,
                                    "xla_base": ours[0].flops, "xla_merged_minus_base": ours[2].flops - ours[0].flops},
        "load": {"before": load_before, "after": uptime()},
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
    }  # fmt: skip
    for name, value in median.items():
        print(f"{name:28s} {value * 1e3:8.2f} ms")
    print(json.dumps(result["ratios"], indent=2))
    print(json.dumps(result["unmerged_overhead_flops"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result



if __name__ == "__main__":
    main()
