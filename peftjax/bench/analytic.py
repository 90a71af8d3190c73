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

Memory: the analytic floor
--------------------------
::

    floor = frozen state                      every non-trainable array as stored (kernels, NF4 codes, VeRA matrices)
          + trainable x (param + 2 Adam moments)
          + max(activations, gradients)      see below
          + the batch

*Gradients and activations are not alive together.* The backward pass walks the
layers top-down: layer l's kept activations are freed as its gradients appear,
so the peak is at the start of the backward pass (nearly every activation, few
gradients) or, when gradients outweigh activations (full fine-tuning of a big
model at a small batch), at its end. ``max`` is the floor of both orders.

*Activations kept for backward* (the model JAX's differentiation rules lead to,
checked against ``jax``'s saved-residual listing in ``tests/bench``). Write
n = B T' query tokens, m = B S key tokens, a = B H T' S attention entries (H
query heads), c = bytes of the compute dtype, f = 4 (float32). T' = T plus prompt
tuning's virtual tokens; S = T' plus prefix tuning's prefix. For every layer the
backward pass goes through (all of them, unless only the head trains):

========================  ================================  =====================================================
op                        kept (bytes)                      why
========================  ================================  =====================================================
2 norms (Layer/RMSNorm)   6 f n d                           centred input, its square, normalised x scale: float32
q, k, v                   c (n q_dim + 2 m kv_dim)          the score and value products need each other's inputs
softmax                   (2 f + c) a + a + 2 f B H T'      masked scores and exp in float32, the probabilities, the
                                                            boolean mask, two row statistics
RoPE (Llama)              4 c n head_dim                    cos and sin broadcast for q and for k
FFN, BERT (erf GELU)      3 c n F                           GELU's derivative: x, erfc, exp terms
FFN, Llama (SwiGLU)       5 c n F                           gate and up outputs, three SiLU terms
norm statistics           2 f n
========================  ================================  =====================================================

A frozen kernel keeps nothing: its activation gradient needs only the kernel.
What a method adds, per layer (kernel inputs are counted once per distinct
input: q, k and v read the same tensor, so LoRA on query and value keeps one):

* a trained kernel (full fine-tuning): its input, for the weight gradient;
* LoRA / QLoRA: the adapted kernel's input and x A (r per token); QLoRA also keeps
  the dequantised kernel in float32 (4 bytes per weight) for the backward matmul;
* DoRA: LoRA's, plus two outputs (k per token) for the magnitude's gradient;
* VeRA: the input, two rank-sized tensors and one output-sized one;
* IA3: the tensor each vector scales (the input for feed-forward targets, else the output);
* a bottleneck adapter: its input (d) and 4 b per token (2 b and a boolean mask for ReLU);
  Pfeiffer's in a post-LN model also the LayerNorm it reads through, LN(o + x) (3 f d + f
  per token), except in the lowest layer when no gradient goes below its adapter;
* prompt tuning, prefix tuning: nothing of their own; T' and S grow.

With parameters stored in float32 and computed in bf16, every kernel the backward
pass uses is also kept as a bf16 copy (``c`` x its size). A causal LM keeps its final
norm (6 f n d, like a layer's two) and the softmax over the vocabulary in float32 (4 B (T-1) V).
Left out, all under 1% at the sizes benchmarked: the embedding LayerNorm under full
fine-tuning, the pooler, per-example loss terms.
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
from peftjax.core.paths import dotted
from peftjax.methods.base import FROZEN
from peftjax.methods.bottleneck import BottleneckAdapter
from peftjax.methods.dora import DoraLinear
from peftjax.methods.ia3 import IA3Linear
from peftjax.methods.lora import LoraLinear
from peftjax.methods.prefix_tuning import PrefixTuning
from peftjax.methods.prompt_tuning import PromptTuning
from peftjax.methods.qlora import QLoraLinear
from peftjax.methods.vera import VeraLinear

F32 = 4
ADAM_MOMENTS = 2  # AdamW keeps two moments per trainable parameter (the bench's optimizer)

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
_LAYER = re.compile(r"^(?P<prefix>.*?\.(layer|layers))\.(?P<index>\d+)\.(?P<rest>.*)$")


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
    found = _LAYER.match(module_path.replace(".base", ""))
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


def _prefix_length(wrapper: PrefixTuning) -> int:
    source = wrapper.prefix_keys if not wrapper.projected else wrapper.encoder.embedding
    return source.shape[0]


def layer_kernel_elements(model: nnx.Module) -> int:
    """Elements of every kernel inside the layers, quantised ones (QLoRA) at their float size."""
    kernels = sum(
        math.prod(value.shape)
        for path, value in nnx.iter_graph(model)
        if isinstance(value, nnx.Param) and dotted(path).endswith(".kernel") and _LAYER.match(dotted(path))
    )
    quantised = sum(math.prod(w.base.kernel_shape) for _, w in iter_wrappers(model) if isinstance(w, QLoraLinear))
    return kernels + quantised


def _first_layer_skips(dims: ModelDims, wrappers: list, trained: list[str]) -> dict[str, float]:
    """Per-layer terms the lowest layer does not keep, as fractions of one layer's term (the
    norms term holds two norms). When nothing at the embeddings trains, no gradient flows
    below the lowest trained part: Llama's first norm (pre-norm, below attention) keeps
    nothing; with bottleneck adapters alone, nothing below the first adapter does (after
    attention: Houlsby; after the FFN: Pfeiffer and parallel)."""
    if any(".embeddings." in p or "embed_tokens" in p for p in trained):
        return {}
    if any(isinstance(w, PromptTuning) for _, w in wrappers):
        return {}
    llama = dims.family == "llama"
    skips = {"norms": 0.5} if llama else {}
    only_bottleneck = wrappers and all(isinstance(w, BottleneckAdapter) for _, w in wrappers)
    if not only_bottleneck or not all(p.startswith(tuple(w + "." for w, _ in wrappers)) for p in trained):
        return skips
    points = {path.rsplit(".", 1)[-1] for path, _ in wrappers if re.search(r"\.0\.[^.]+$", path)}
    if "after_attention" in points:
        return {**skips, "qkv": 1.0, "softmax": 1.0, "rope": 1.0}
    if "after_mlp" in points:
        # BERT's post-attention LayerNorm is below the FFN's adapter, its last one above; Llama's two are below.
        return {"qkv": 1.0, "softmax": 1.0, "rope": 1.0, "ffn": 1.0, "norms": 1.0 if llama else 0.5}
    return skips


def activation_bytes(
    model: nnx.Module,
    labels: dict[str, str],
    *,
    batch: int,
    seq: int,
    compute_dtype: Any,
    param_dtype: Any,
    causal_lm: bool,
) -> dict[str, int]:
    """The activations kept for backward, by term (see the module docstring); ``total`` sums them."""
    dims = ModelDims.of(model)
    c, f = np.dtype(compute_dtype).itemsize, F32
    wrappers = [(p, w) for p, w in iter_wrappers(model) if w.active and not w.merged]
    prompt = sum(w.num_virtual_tokens for _, w in wrappers if isinstance(w, PromptTuning))
    prefix = max([_prefix_length(w) for _, w in wrappers if isinstance(w, PrefixTuning)] or [0])
    t_q = seq + prompt
    t_k = t_q + prefix
    n, m, a = batch * t_q, batch * t_k, batch * dims.heads * t_q * t_k

    trained = [p for p, label in labels.items() if label != FROZEN]
    in_layers = any(_LAYER.match(p) or ".embeddings." in p or "embed_tokens" in p for p in trained)
    in_layers = in_layers or bool(wrappers)
    layers = dims.layers if in_layers else 0
    terms: dict[str, int] = {}
    ffn_tensors = 3 if dims.family == "bert" else 5
    per_layer = {
        "norms": 6 * f * n * dims.hidden + 2 * f * n,
        "qkv": c * (n * dims.q_dim + 2 * m * dims.kv_dim),
        "softmax": (2 * f + c) * a + a + 2 * f * batch * dims.heads * t_q,
        "ffn": ffn_tensors * c * n * dims.ffn,
        "rope": 4 * c * n * dims.head_dim if dims.family == "llama" else 0,
    }
    skipped = _first_layer_skips(dims, wrappers, trained) if layers else {}
    for key, value in per_layer.items():
        terms[key] = layers * value - round(skipped.get(key, 0.0) * value)

    # Inputs of trained or adapted kernels, once per distinct (layer, input).
    sites: set[tuple[str, str]] = set()
    for p in trained:
        if p.endswith(".kernel") and not any(p.startswith(wp + ".") for wp, _ in wrappers):
            site = input_site(dims, p[: -len(".kernel")])
            if site:
                sites.add(site)
    extra = 0
    for path, w in wrappers:
        layout = getattr(w, "layout", None)
        if isinstance(w, (LoraLinear, VeraLinear)) or (isinstance(w, IA3Linear) and w.scales_input):
            site = input_site(dims, path)
            if site:
                sites.add(site)
        if isinstance(w, VeraLinear):
            extra += c * n * (2 * w.scale_d.shape[-1] + layout.fan_out)
        elif isinstance(w, LoraLinear):
            extra += c * n * w.lora_a.shape[-1]
            if isinstance(w, DoraLinear):
                extra += 2 * c * n * layout.fan_out
            if isinstance(w, QLoraLinear):
                extra += f * math.prod(w.base.kernel_shape)
        elif isinstance(w, IA3Linear) and not w.scales_input:
            extra += c * n * layout.fan_out
        elif isinstance(w, BottleneckAdapter):
            b = w.down_bias.shape[-1]
            extra += c * n * dims.hidden + (2 * c * n * b + n * b if w.activation == "relu" else 4 * c * n * b)
            lowest = skipped and re.search(r"\.0\.[^.]+$", path)
            if w.variant == "pfeiffer" and dims.family == "bert" and not lowest:
                extra += 3 * f * n * dims.hidden + f * n
    terms["kernel_inputs"] = sum(c * n * dims.site_width(site) for _, site in sites)
    terms["adapters"] = extra

    kernels = layer_kernel_elements(model)
    head = dims.hidden * dims.vocab if causal_lm else 0
    cast = np.dtype(param_dtype) != np.dtype(compute_dtype)
    terms["kernel_casts"] = c * (kernels + head) if (cast and layers) else 0
    if causal_lm and (layers or trained):
        # Final norm (when the layers train) or the head's own input (when only it trains), and the vocabulary softmax.
        below = 3 * f * n * dims.hidden if layers else c * n * dims.hidden
        terms["head"] = below + f * batch * (seq - 1) * dims.vocab
    else:
        terms["head"] = 0
    terms["total"] = sum(terms.values())
    return terms


def analytic_floor(
    state: Any, batch: Any, activations: int
) -> dict[str, int]:
    """The floor of the module docstring from a (possibly abstract) ``TrainState``."""
    trainable = tree_bytes(state.trainable)
    frozen = tree_bytes(state.frozen) + tree_bytes(state.rest)
    optimizer = ADAM_MOMENTS * trainable
    gradients = trainable
    terms = {
        "frozen_state": frozen,
        "trainable": trainable,
        "optimizer_state": optimizer,
        "gradients": gradients,
        "activations": activations,
        "batch": tree_bytes(batch),
    }
    terms["total"] = frozen + trainable + optimizer + max(activations, gradients) + terms["batch"]
    return terms


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
