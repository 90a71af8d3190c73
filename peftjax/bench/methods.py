"""The benchmark's method names and the configs they stand for, per model family.

One table, so every benchmark (CLI, scripts, tests) compares the same things:
a name such as ``lora-r8`` means LoRA(r=8, alpha=2r) on the family's
attention query and value projections, the choice of the LoRA paper and HF
PEFT's defaults for BERT and Llama. ``lora-rN`` works for any N. ``qlora`` quantises
the layers it adapts, so on query and value alone it saves little;
``qlora-all-linear`` is the QLoRA paper's setting (every linear layer but the head
in NF4 with a rank-8 adapter), and ``lora-all-linear`` the same adapters over a
full-precision base, its baseline. A method that
does not apply to a model (BitFit on Llama, which has no biases; a linear
probe on a causal LM whose head is tied to the embeddings) is reported as
skipped with the reason, not silently dropped.

Convolutional families (ResNet) have no attention: there, only the methods
that select parameters apply (``full``, ``linear_probe``, ``bitfit`` on the
batch norms' and the head's biases, ``ln_tuning`` on the batch norms); the
others are reported as skipped.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from peftjax.errors import BenchError
from peftjax.methods.base import MethodConfig
from peftjax.methods.bitfit import BitFitConfig
from peftjax.methods.bottleneck import BottleneckConfig
from peftjax.methods.dora import DoraConfig
from peftjax.methods.full import FullFineTuningConfig
from peftjax.methods.ia3 import IA3Config
from peftjax.methods.linear_probe import LinearProbeConfig
from peftjax.methods.ln_tuning import LNTuningConfig
from peftjax.methods.lora import LoraConfig
from peftjax.methods.prefix_tuning import PrefixTuningConfig
from peftjax.methods.prompt_tuning import PromptTuningConfig
from peftjax.methods.qlora import QLoraConfig
from peftjax.methods.vera import VeraConfig


@dataclasses.dataclass(frozen=True)
class FamilyTargets:
    """Where a family's methods go: module names as ``targets`` takes them."""

    attention_qv: tuple[str, ...]
    ia3_targets: str | tuple[str, ...]
    ia3_feedforward: str | tuple[str, ...]


FAMILY_TARGETS: dict[str, FamilyTargets] = {
    # BERT / RoBERTa: IA3 scales keys, values and the FFN output projection's input (the paper's l_ff).
    "bert": FamilyTargets(
        attention_qv=("query", "value"),
        ia3_targets=r".*\.(key|value|layer\.\d+\.output\.dense)",
        ia3_feedforward=r".*\.layer\.\d+\.output\.dense",
    ),
    "llama": FamilyTargets(
        attention_qv=("q_proj", "v_proj"),
        ia3_targets=("k_proj", "v_proj", "down_proj"),
        ia3_feedforward=("down_proj",),
    ),
}
FAMILY_TARGETS["roberta"] = FAMILY_TARGETS["bert"]
FAMILY_TARGETS["mistral"] = FAMILY_TARGETS["qwen2"] = FAMILY_TARGETS["llama"]
# Families whose methods need no targets: those that select parameters by kind.
CONV_FAMILIES = ("resnet",)
_SELECTION_METHODS = ("full", "linear_probe", "bitfit", "ln_tuning")

# Name -> config factory given the family's targets. LoRA-type methods use alpha = 2r (s = 2), HF PEFT's usual pairing.
_FIXED: dict[str, Callable[[FamilyTargets], MethodConfig]] = {
    "full": lambda t: FullFineTuningConfig(),
    "linear_probe": lambda t: LinearProbeConfig(),
    "dora": lambda t: DoraConfig(rank=8, alpha=16.0, targets=t.attention_qv),
    "ia3": lambda t: IA3Config(targets=t.ia3_targets, feedforward=t.ia3_feedforward),
    "houlsby": lambda t: BottleneckConfig(variant="houlsby"),
    "pfeiffer": lambda t: BottleneckConfig(variant="pfeiffer"),
    "parallel": lambda t: BottleneckConfig(variant="parallel"),
    "prompt": lambda t: PromptTuningConfig(num_virtual_tokens=20),
    "prefix": lambda t: PrefixTuningConfig(num_virtual_tokens=20),
    "vera": lambda t: VeraConfig(rank=256, targets=t.attention_qv),
    "qlora": lambda t: QLoraConfig(rank=8, alpha=16.0, targets=t.attention_qv),
    "lora-all-linear": lambda t: LoraConfig(rank=8, alpha=16.0, targets="all-linear"),
    "qlora-all-linear": lambda t: QLoraConfig(rank=8, alpha=16.0, targets="all-linear"),
    "bitfit": lambda t: BitFitConfig(),
    "ln_tuning": lambda t: LNTuningConfig(),
}
_LORA = re.compile(r"lora-r(\d+)")

ALL_METHODS = (
    "full", "linear_probe", "lora-r4", "lora-r8", "lora-r16", "dora", "ia3", "houlsby", "pfeiffer", "parallel",
    "prompt", "prefix", "vera", "qlora", "bitfit", "ln_tuning",
)  # fmt: skip


def method_names(spec: str) -> list[str]:
    """``"all"`` or a comma-separated list, checked against the table."""
    names = list(ALL_METHODS) if spec.strip() == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in _FIXED and not _LORA.fullmatch(n)]
    if unknown or not names:
        raise BenchError(f"unknown benchmark method(s) {unknown}; known: {sorted(_FIXED)} and lora-rN (e.g. lora-r8)")
    return names


def method_config(name: str, model_type: str) -> MethodConfig:
    """The config ``name`` stands for on a model of ``model_type`` (``model.config.model_type``)."""
    if model_type in CONV_FAMILIES:
        method_names(name)  # raises with the list of known names
        if name not in _SELECTION_METHODS:
            raise BenchError(
                f"{name} adapts transformer parts (attention, linear projections, token inputs); a {model_type} has "
                f"convolutions and one linear head, so the benchmark runs {', '.join(_SELECTION_METHODS)} on it"
            )
        return _FIXED[name](None)
    if model_type not in FAMILY_TARGETS:
        raise BenchError(
            f"no benchmark targets for model_type {model_type!r}; known: {sorted([*FAMILY_TARGETS, *CONV_FAMILIES])}"
        )
    targets = FAMILY_TARGETS[model_type]
    lora = _LORA.fullmatch(name)
    if lora:
        rank = int(lora.group(1))
        return LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets.attention_qv)
    if name not in _FIXED:
        method_names(name)  # raises with the list of known names
    return _FIXED[name](targets)
