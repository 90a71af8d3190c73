"""Analytic FLOPs and memory, written down so that XLA's own counts can be checked against them.

FLOPs
-----
An unmerged LoRA adapter on a kernel with d inputs and k outputs costs, per token,

    2 r (d + k)          the two matmuls (x A: 2 d r, then (x A) B: 2 r k)
    + k                  adding the low-rank output to the base output
    + k  if s != 1       scaling it by s = alpha / r (XLA drops a multiply by 1)

and a merged one costs nothing. A training step with a frozen base costs about
4N FLOPs per token (forward 2N, activation gradients 2N) against full
fine-tuning's 6N, so LoRA's step FLOPs sit near 2/3 of full fine-tuning's.

Memory
------
``peftjax.bench.floor`` bounds a step's memory from below; ``compiled_memory`` reads
XLA's plan to set beside it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.core.inject import iter_wrappers
from peftjax.methods.ia3 import IA3Linear
from peftjax.methods.lora import LoraLinear
from peftjax.methods.vera import VeraLinear

# Per family: kernel name (path suffix inside a layer) -> the input it reads. Kernels
# reading the same input share it: LoRA on q and v keeps one copy.
_INPUT_SITES = {
    "bert": [
        (r"attention\.self\.(query|key|value)", "x"),
        (r"attention\.output\.dense", "context"),
        (r"intermediate\.dense", "h"),
        (r"output\.dense", "act"),
    ],
    "llama": [
        (r"self_attn\.(q_proj|k_proj|v_proj)", "x"),
        (r"self_attn\.o_proj", "context"),
        (r"mlp\.(gate_proj|up_proj)", "h"),
        (r"mlp\.down_proj", "act"),
    ],
}
_FAMILY = {"bert": "bert", "roberta": "bert", "llama": "llama", "mistral": "llama", "qwen2": "llama"}
LAYER_PATH = re.compile(r"^(?P<prefix>.*?\.(layer|layers))\.(?P<index>\d+)\.(?P<rest>.*)$")


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """The sizes the formulas need, read from ``model.config``."""

    family: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, model: nnx.Module) -> ModelDims:
        config = model.config
        family = _FAMILY.get(config.model_type)
        if family is None:
            raise ValueError(f"no analytic model for model_type {config.model_type!r}; known: {sorted(_FAMILY)}")
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(
            family, config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads, kv_heads,
            config.head_dim, config.vocab_size,
        )  # fmt: skip

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def site_width(self, site: str) -> int:
        return {"x": self.hidden, "context": self.q_dim, "h": self.hidden, "act": self.ffn}[site]


def input_site(dims: ModelDims, module_path: str) -> tuple[str, str] | None:
    """``(layer, input name)`` of a layer kernel at ``module_path``, or None outside the layers."""
    found = LAYER_PATH.match(module_path.replace(".base", ""))
    if not found:
        return None
    for pattern, site in _INPUT_SITES[dims.family]:
        if re.fullmatch(pattern, found["rest"]):
            return found["index"], site
    return None


# ----------------------------------------------------------------------------
# FLOPs.
# ----------------------------------------------------------------------------


def forward_overhead(model: nnx.Module, tokens: int) -> tuple[int | None, str | None]:
    """Analytic extra forward FLOPs of the model's unmerged adapters, and the formula.

    Written for LoRA (the module docstring), VeRA and IA3 (one multiply per scaled
    entry). VeRA's A is one buffer shared by every kernel of its shape, so kernels that
    read the same input (q and v) share x A too, and XLA computes it once: 2 d r per
    token per distinct (input, A), then per kernel r (scale by d) + 2 r k (B) + k (scale
    by b) + k (add). None for methods without a closed form here (DoRA's norms, QLoRA's
    dequantisation, bottleneck activations, prompt and prefix tuning's longer sequences).
    """
    wrappers = [(p, w) for p, w in iter_wrappers(model) if w.active and not w.merged]
    if not wrappers:
        return 0, "no adapter in the forward pass"
    try:
        dims = ModelDims.of(model)
    except (AttributeError, ValueError):
        dims = None
    total, kinds, shared = 0, set(), set()
    for path, w in wrappers:
        if type(w) is LoraLinear:
            layout, rank = w.layout, w.lora_a.shape[-1]
            total += tokens * (2 * rank * (layout.fan_in + layout.fan_out) + layout.fan_out * (1 + (w.scale != 1.0)))
            kinds.add("LoRA: 2r(d+k) + k + k[s!=1] per token per adapted matrix")
        elif type(w) is VeraLinear:
            layout, rank = w.layout, w.scale_d.shape[-1]
            total += tokens * (rank + 2 * rank * layout.fan_out + 2 * layout.fan_out)
            site = (input_site(dims, path) if dims else None) or path
            if (site, id(w.projection_a)) not in shared:
                shared.add((site, id(w.projection_a)))
                total += tokens * 2 * layout.fan_in * rank
            kinds.add("VeRA: 2dr per distinct (input, A) + r + 2rk + 2k per token per adapted matrix")
        elif type(w) is IA3Linear:
            total += tokens * (w.layout.fan_in if w.scales_input else w.layout.fan_out)
            kinds.add("IA3: one multiply per scaled entry")
        else:
            return None, None
    return total, "; ".join(sorted(kinds))


# ----------------------------------------------------------------------------
# Memory.
# ----------------------------------------------------------------------------


def _itemsize(dtype: Any) -> int:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return 8  # a PRNG key: two uint32 words (threefry); RNG state is a few keys at most
    return np.dtype(dtype).itemsize


def tree_bytes(tree: Any) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf of ``tree``."""
    return int(sum(math.prod(x.shape) * _itemsize(x.dtype) for x in jax.tree.leaves(tree)))


def compiled_memory(compiled: jax.stages.Compiled) -> dict[str, int] | None:
    """XLA's memory plan: argument, output, alias, temporary and generated-code bytes, and
    ``total`` = arguments + outputs - aliased (donated buffers reused) + temporaries + code."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    found = {
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),
        "temp": int(stats.temp_size_in_bytes),
        "generated_code": int(stats.generated_code_size_in_bytes),
    }
    found["total"] = found["argument"] + found["output"] - found["alias"] + found["temp"] + found["generated_code"]
    return found


def as_dtype(name: str) -> Any:
    return {"fp32": jnp.float32, "bf16": jnp.bfloat16, "float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
