"""A lower bound on a training step's memory: only what any compiled step must hold.

::

    floor = arguments                     the train state and the batch, as stored (exact)
          + activations                   what the backward pass needs, live together
                                          when the forward pass ends

*Arguments* are the step's inputs: frozen state (kernels, NF4 codes, VeRA matrices,
RNG state), trainable parameters and the optimizer's state, and the batch. XLA's
plan counts them byte for byte; outputs alias the donated inputs.

*Activations.* When the loss is known, the backward pass has not started, so every
tensor it will need is alive at once. The floor counts, for each of them, the
smallest tensor XLA could keep instead, under two rules:

* a tensor that is an elementwise function of tensors already kept (or of the
  arguments, gathers included) need not be kept: XLA fuses such producers into
  their consumers (a LayerNorm output from its input and two row statistics, a GELU
  output from its input, a cast, a dequantised kernel, a dropout mask from its key);
* a dot's output must be kept: XLA does not recompute matrix products.

Hence per layer (n = B T' query tokens, T' = T + prompt tuning's virtual tokens;
S = T' + prefix tuning's prefix; a = B H T' S attention entries; c = bytes of the
compute dtype; f = 4), for the parts the backward pass goes through:

===============================  ========================  ===============================================
tensor                           bytes                     why it cannot be derived
===============================  ========================  ===============================================
norm input (each LN / RMSNorm)   c n d + f n (RMS) / 2f n  the residual sum of a dot output; its statistics
q, k, v                          c n (q_dim + 2 kv_dim)    dot outputs (a prefix's own keys are arguments);
                                                           q only for dk, k only for dq, v for either
softmax                          c a                       scores are a dot output (probabilities or scores)
FFN (GELU)                       c n F                     the up projection's output
FFN (SwiGLU)                     2 c n F                   the gate's and the up projection's outputs
context                          c n q_dim                 a dot output; kept when the output projection trains
===============================  ========================  ===============================================

A frozen kernel keeps nothing (its input gradient needs only the kernel). A trained
kernel's input is a norm output (derivable) or the context (above), or the FFN
activation (derivable from the FFN term). What methods add: LoRA, QLoRA, DoRA: x A
(c n r); DoRA also its unscaled output (c n k, for the magnitude) where the
attention term does not already keep that projection's output; VeRA: x A once
per input and shared A (q and v share one) and ((x A) d) B per matrix (c n k);
bottleneck adapters: the bottleneck pre-activation (c n b); IA3: nothing (the scaled
tensors are elementwise in what is kept). In the lowest layer with something trainable, only
what lies above it counts. A causal LM adds its final norm's input and the logits
(c B (T-1) V; the log-softmax is elementwise in them and a row statistic).

What the floor leaves out is therefore what XLA chooses to keep beyond it: the
softmax's extra float32 copies and the boolean mask, the GELU's erf terms, LayerNorm's
centred input and normalised output, bf16 copies of float32 kernels, gradients
(XLA may update each parameter as soon as its gradient exists), and scratch.
``benchmarks/floor_check.py`` measures that gap per term from XLA's own peak.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from flax import nnx

from peftjax.bench.analytic import LAYER_PATH, ModelDims, tree_bytes
from peftjax.core.inject import iter_wrappers
from peftjax.methods.base import FROZEN
from peftjax.methods.bottleneck import BottleneckAdapter
from peftjax.methods.dora import DoraLinear
from peftjax.methods.ia3 import IA3Linear
from peftjax.methods.lora import LoraLinear
from peftjax.methods.prefix_tuning import PrefixTuning
from peftjax.methods.prompt_tuning import PromptTuning
from peftjax.methods.vera import VeraLinear

F32 = 4

# Per family: where a path inside a layer sits, and that site's rank in forward order.
_SITES = {
    "bert": [
        (r"attention\.self\.query", "q", 0), (r"attention\.self\.key", "k", 0), (r"attention\.self\.value", "v", 0),
        (r"attention\.self\.attention_kv", "prefix", 0), (r"attention\.output\.dense", "o", 2),
        (r"after_attention", "after_attention", 3), (r"attention\.output\.LayerNorm", "norm_attention", 4),
        (r"intermediate\.dense", "ffn_in", 5), (r"output\.dense", "ffn_out", 7), (r"after_mlp", "after_mlp", 8),
        (r"output\.LayerNorm", "norm_output", 9),
    ],
    "llama": [
        (r"input_layernorm", "norm_input", 0), (r"self_attn\.q_proj", "q", 1), (r"self_attn\.k_proj", "k", 1),
        (r"self_attn\.v_proj", "v", 1), (r"self_attn\.attention_kv", "prefix", 1), (r"self_attn\.o_proj", "o", 3),
        (r"after_attention", "after_attention", 4), (r"post_attention_layernorm", "norm_attention", 5),
        (r"mlp\.gate_proj", "ffn_gate", 6), (r"mlp\.up_proj", "ffn_in", 6), (r"mlp\.down_proj", "ffn_out", 8),
        (r"after_mlp", "after_mlp", 9),
    ],
}  # fmt: skip
# Rank of the parameter-free FFN activation.
_ACT = {"bert": 6, "llama": 7}
# The norm whose output each input-reading site reads (None: the layer's input).
_READS = {
    "bert": {"q": None, "k": None, "v": None, "ffn_in": "norm_attention", "parallel": "norm_attention"},
    "llama": {"q": "norm_input", "k": "norm_input", "v": "norm_input", "ffn_in": "norm_attention",
              "ffn_gate": "norm_attention", "parallel": "norm_attention"},
}  # fmt: skip


def _site(family: str, rest: str) -> tuple[str, int] | None:
    for pattern, name, rank in _SITES[family]:
        if re.match(pattern + r"(\.|$)", rest):
            return name, rank
    return None


def _reads_input(wrapper: Any | None, trained_kernel: bool) -> bool:
    """Whether the site's trainable part needs the kernel's input (for a weight gradient)."""
    if trained_kernel or isinstance(wrapper, (LoraLinear, VeraLinear)):
        return True
    return isinstance(wrapper, IA3Linear) and wrapper.scales_input


class _Layers:
    """What trains where: sites per layer index, the wrappers at them, and what lies below."""

    def __init__(self, model: nnx.Module, labels: dict[str, str], family: str):
        self.family = family
        self.trained: dict[int, dict[str, int]] = {}  # layer -> site -> rank
        self.kernels: dict[int, set[str]] = {}  # layer -> sites whose kernel itself trains
        self.wrappers: dict[int, dict[str, Any]] = {}
        self.embeddings = False  # something below every layer trains
        self.outside = False  # something outside the layers trains (head, final norm, embeddings)
        wrappers = [(p, w) for p, w in iter_wrappers(model) if w.active and not w.merged]
        for path, wrapper in wrappers:
            found = LAYER_PATH.match(path)
            if isinstance(wrapper, PromptTuning):
                self.embeddings = True
            elif found and (site := _site(family, found["rest"].replace(".base", ""))):
                self.wrappers.setdefault(int(found["index"]), {})[site[0]] = wrapper
        for path, label in labels.items():
            if label == FROZEN:
                continue
            found = LAYER_PATH.match(path.replace(".base", ""))
            site = _site(family, found["rest"]) if found else None
            if site is None:
                self.outside = True
                self.embeddings |= ".embeddings." in path or "embed_tokens" in path
                continue
            layer = int(found["index"])
            self.trained.setdefault(layer, {})[site[0]] = site[1]
            if path.endswith(".kernel"):
                self.kernels.setdefault(layer, set()).add(site[0])

    @property
    def lowest(self) -> int | None:
        return 0 if self.embeddings else min(self.trained, default=None)

    def before(self, layer: int, rank: int) -> bool:
        """Whether something trains below ``rank`` of ``layer``: the backward pass goes through it."""
        if self.embeddings or any(lower < layer for lower in self.trained):
            return True
        return any(r < rank for r in self.trained.get(layer, {}).values())

    def sites(self, layer: int) -> dict[str, int]:
        return self.trained.get(layer, {})

    def wrapper(self, layer: int, site: str) -> Any | None:
        return self.wrappers.get(layer, {}).get(site)

    def reads_input(self, layer: int, site: str) -> bool:
        return site in self.sites(layer) and _reads_input(self.wrapper(layer, site), site in self.kernels.get(layer, ()))


def _layer_floor(layers: _Layers, layer: int, dims: ModelDims, *, c: int, n: int, entries: int) -> dict[str, int]:
    """The floor's terms for one layer (see the module docstring)."""
    family, sites, ranks = layers.family, layers.sites(layer), dict((s, r) for _, s, r in _SITES[layers.family])
    terms = dict.fromkeys(("norms", "attention", "ffn", "context", "kernel_inputs", "adapters"), 0)
    stats = (1 if family == "llama" else 2) * F32 * n
    kept_norms = set()
    for name in ("norm_input", "norm_attention", "norm_output"):
        if name in ranks and (layers.before(layer, ranks[name]) or name in sites):
            kept_norms.add(name)
            terms["norms"] += c * n * dims.hidden + stats
    # Attention: dq needs k, dk needs q, either needs v; any of the three needs the probabilities.
    x_grad = layers.before(layer, ranks["q"])
    ia3 = {s for s in ("q", "k", "v") if isinstance(layers.wrapper(layer, s), IA3Linear) and s in sites}
    dq = x_grad or "q" in sites
    dk = x_grad or "k" in sites or "prefix" in sites
    dv = x_grad or "v" in sites or "prefix" in sites
    q_kept, k_kept, v_kept = dk or "q" in ia3, dq or "k" in ia3, dq or dk or "v" in ia3
    terms["attention"] = c * n * (dims.q_dim * q_kept + dims.kv_dim * (k_kept + v_kept))
    terms["attention"] += c * entries * (dq or dk or dv)
    # FFN: the activation's backward needs its input(s); the down projection's weight its input.
    act_back = layers.before(layer, _ACT[family])
    if family == "llama" and act_back and not layers.before(layer, ranks["ffn_gate"]) and "ffn_gate" not in sites:
        terms["ffn"] = c * n * dims.ffn  # only the up projection trains: d(up) needs the gate's output alone
    elif act_back:
        terms["ffn"] = (2 if family == "llama" else 1) * c * n * dims.ffn
    elif layers.reads_input(layer, "ffn_out"):
        terms["ffn"] = c * n * dims.ffn
    if layers.reads_input(layer, "o"):
        terms["context"] = c * n * dims.q_dim
    if isinstance(layers.wrapper(layer, "o"), IA3Linear) and "o" in sites and not layers.wrapper(layer, "o").scales_input:
        terms["context"] += c * n * dims.hidden  # the unscaled output of the output projection
    # Inputs read from a norm output that is not kept (its input is), or from a layer input that is not.
    readers = {s for s in ("q", "k", "v", "ffn_in", "ffn_gate") if layers.reads_input(layer, s)}
    parallel = layers.wrapper(layer, "after_mlp")
    if isinstance(parallel, BottleneckAdapter) and parallel.variant == "parallel" and "after_mlp" in sites:
        readers.add("parallel")
    sources = {_READS[family].get(s) for s in readers}
    for source in sources:
        if source is None:  # the layer's input: the previous layer's last norm output, or embedding gathers
            last = "norm_output" if family == "bert" else None
            previous_kept = last is not None and (layers.before(layer - 1, ranks[last]) or last in layers.sites(layer - 1))
            terms["kernel_inputs"] += 0 if layer == 0 or previous_kept else c * n * dims.hidden
        elif source not in kept_norms and not (source == "norm_input" and layer == 0):
            terms["kernel_inputs"] += c * n * dims.hidden
    kept = {"q": q_kept, "k": k_kept, "v": v_kept}
    terms["adapters"] = _adapter_floor(layers, layer, c=c, n=n, kept=kept)
    return terms


def _adapter_floor(layers: _Layers, layer: int, *, c: int, n: int, kept: dict[str, bool]) -> int:
    """x A (LoRA, VeRA: once per input and shared A); DoRA's unscaled output unless the
    attention term keeps that projection's output anyway (one is elementwise in the
    other); VeRA's ((x A) d) B; a bottleneck's pre-activation. A sequential bottleneck's
    input is not counted: it and the norm input after it are elementwise in one tensor
    and the residual, and the norm term counts one."""
    total, shared = 0, set()
    for site, wrapper in layers.wrappers.get(layer, {}).items():
        if site not in layers.sites(layer):
            continue
        if isinstance(wrapper, VeraLinear):
            total += c * n * wrapper.layout.fan_out
            reads = _READS[layers.family].get(site, site)
            if (reads, id(wrapper.projection_a)) not in shared:
                shared.add((reads, id(wrapper.projection_a)))
                total += c * n * wrapper.scale_d.shape[-1]
        elif isinstance(wrapper, LoraLinear):
            total += c * n * wrapper.lora_a.shape[-1]
            if isinstance(wrapper, DoraLinear) and not kept.get(site, False):
                total += c * n * wrapper.layout.fan_out
        elif isinstance(wrapper, BottleneckAdapter):
            total += c * n * wrapper.down_bias.shape[-1]
    return total


def _prefix_length(wrapper: PrefixTuning) -> int:
    source = wrapper.prefix_keys if not wrapper.projected else wrapper.encoder.embedding
    return source.shape[0]


def activation_floor(
    model: nnx.Module, labels: dict[str, str], *, batch: int, seq: int, compute_dtype: Any, causal_lm: bool
) -> dict[str, int]:
    """The activations any compiled step keeps for backward, by term; ``total`` sums them."""
    dims = ModelDims.of(model)
    c = np.dtype(compute_dtype).itemsize
    wrappers = [w for _, w in iter_wrappers(model) if w.active and not w.merged]
    t_q = seq + sum(w.num_virtual_tokens for w in wrappers if isinstance(w, PromptTuning))
    t_k = t_q + max([_prefix_length(w) for w in wrappers if isinstance(w, PrefixTuning)] or [0])
    layers = _Layers(model, labels, dims.family)
    terms = dict.fromkeys(("norms", "attention", "ffn", "context", "kernel_inputs", "adapters", "head"), 0)
    lowest = layers.lowest
    for layer in range(lowest if lowest is not None else dims.layers, dims.layers):
        found = _layer_floor(layers, layer, dims, c=c, n=batch * t_q, entries=batch * dims.heads * t_q * t_k)
        for key, value in found.items():
            terms[key] += value
    if causal_lm and (lowest is not None or layers.outside):
        # The final norm's input (or, when only the head trains, the head's input) and the logits.
        terms["head"] = c * batch * seq * dims.hidden + c * batch * (seq - 1) * dims.vocab
    terms["total"] = sum(terms.values())
    return terms


def memory_floor(state: Any, batch: Any, activations: int) -> dict[str, int]:
    """The floor of the module docstring from a (possibly abstract) ``TrainState``."""
    terms = {
        "frozen_state": tree_bytes(state.frozen) + tree_bytes(state.rest),
        "trainable": tree_bytes(state.trainable),
        "optimizer_state": tree_bytes(state.opt_state),
        "batch": tree_bytes(batch),
        "activations": activations,
    }
    terms["total"] = sum(terms.values())
    return terms

