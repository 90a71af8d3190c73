"""The benchmark's method names and the configs they stand for, per model family.

A benchmark method is named as YAML names it: the method's ``type``
(``lora``, ``prefix_tuning``, ``bottleneck``, ...), optionally followed by
settings that change the benchmark's default config for that type,
``type:field=value[:field=value]`` (``lora:rank=16``,
``bottleneck:variant=pfeiffer``, ``qlora:targets=all-linear``; values are read
as YAML scalars, and a LoRA-type ``rank`` without ``alpha`` keeps alpha = 2r).
One table of defaults, so every benchmark (CLI, scripts, tests) compares the
same things: ``lora`` means LoRA(r=8, alpha=16) on the family's attention query
and value projections, the choice of the LoRA paper and HF PEFT's defaults for
BERT and Llama. ``qlora`` quantises the layers it adapts, so on query and value
alone it saves little; ``qlora:targets=all-linear`` is the QLoRA paper's setting
(every linear layer but the head in NF4 with a rank-8 adapter), and
``lora:targets=all-linear`` the same adapters over a full-precision base, its
baseline. The names the benchmark used before (``lora-r8``, ``houlsby``,
``prefix``, ...) are still accepted, with a notice. A method that does not
apply to a model (BitFit on Llama, which has no biases; a linear probe on a
causal LM whose head is tied to the embeddings) is reported as skipped with the
reason, not silently dropped.

Convolutional families (ResNet) have no attention: there, only the methods
that select parameters apply (``full``, ``linear_probe``, ``bitfit`` on the
batch norms' and the head's biases, ``ln_tuning`` on the batch norms); the
others are reported as skipped.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from collections.abc import Callable
from typing import Any

import yaml

from peftjax.errors import BenchError
from peftjax.methods.base import MethodConfig, config_from_dict


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

# Type -> the benchmark's default settings on a family with targets ``t`` (YAML form).
# LoRA-type methods use alpha = 2r (s = 2), HF PEFT's usual pairing.
_DEFAULTS: dict[str, Callable[[FamilyTargets | None], dict[str, Any]]] = {
    "full": lambda t: {},
    "linear_probe": lambda t: {},
    "lora": lambda t: {"rank": 8, "alpha": 16.0, "targets": t.attention_qv},
    "dora": lambda t: {"rank": 8, "alpha": 16.0, "targets": t.attention_qv},
    "qlora": lambda t: {"rank": 8, "alpha": 16.0, "targets": t.attention_qv},
    "vera": lambda t: {"rank": 256, "targets": t.attention_qv},
    "ia3": lambda t: {"targets": t.ia3_targets, "feedforward": t.ia3_feedforward},
    "bottleneck": lambda t: {"variant": "houlsby"},
    "prompt_tuning": lambda t: {"num_virtual_tokens": 20},
    "prefix_tuning": lambda t: {"num_virtual_tokens": 20},
    "bitfit": lambda t: {},
    "ln_tuning": lambda t: {},
}
_ALPHA_FOLLOWS_RANK = ("lora", "dora", "qlora")
# The names the benchmark used before it spoke YAML's.
_OLD_NAMES = {
    "houlsby": "bottleneck",
    "pfeiffer": "bottleneck:variant=pfeiffer",
    "parallel": "bottleneck:variant=parallel",
    "prompt": "prompt_tuning",
    "prefix": "prefix_tuning",
    "lora-all-linear": "lora:targets=all-linear",
    "qlora-all-linear": "qlora:targets=all-linear",
}
_OLD_LORA = re.compile(r"lora-r(\d+)")

ALL_METHODS = (
    "full", "linear_probe", "lora:rank=4", "lora", "lora:rank=16", "dora", "ia3", "bottleneck",
    "bottleneck:variant=pfeiffer", "bottleneck:variant=parallel", "prompt_tuning", "prefix_tuning", "vera", "qlora",
    "bitfit", "ln_tuning",
)  # fmt: skip
logger = logging.getLogger("peftjax")


def _parse(name: str) -> tuple[str, dict[str, Any]]:
    """``"lora:rank=4"`` -> ``("lora", {"rank": 4})``; raises naming the known types."""
    kind, *settings = name.split(":")
    if kind not in _DEFAULTS:
        close = difflib.get_close_matches(kind, [*_DEFAULTS, *_OLD_NAMES], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise BenchError(
            f"unknown benchmark method {name!r}.{hint} Methods are YAML method types ({', '.join(_DEFAULTS)}), "
            "optionally with settings: type:field=value (lora:rank=16, bottleneck:variant=pfeiffer)"
        )
    parsed = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise BenchError(f"benchmark method {name!r}: {setting!r} is not field=value")
        parsed[key] = yaml.safe_load(value)
    return kind, parsed


def canonical_name(name: str) -> str:
    """``name`` as YAML spells it; an old benchmark name is translated with a notice."""
    old = _OLD_LORA.fullmatch(name)
    new = _OLD_NAMES.get(name) or (None if old is None else "lora" if old.group(1) == "8" else f"lora:rank={old.group(1)}")
    if new is None:
        _parse(name)
        return name
    logger.warning("benchmark method %r is spelled %r now, as YAML names it (the old name still works)", name, new)
    return new


def method_names(spec: str) -> list[str]:
    """``"all"`` or a comma-separated list, checked against the table and spelled as YAML spells them."""
    names = list(ALL_METHODS) if spec.strip() == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise BenchError(f"no benchmark method given; methods are YAML method types: {', '.join(_DEFAULTS)}")
    return [canonical_name(name) for name in names]


def method_config(name: str, model_type: str) -> MethodConfig:
    """The config ``name`` stands for on a model of ``model_type`` (``model.config.model_type``)."""
    kind, settings = _parse(canonical_name(name))
    if model_type in CONV_FAMILIES:
        if kind not in _SELECTION_METHODS:
            raise BenchError(
                f"{name} adapts transformer parts (attention, linear projections, token inputs); a {model_type} has "
                f"convolutions and one linear head, so the benchmark runs {', '.join(_SELECTION_METHODS)} on it"
            )
        targets = None
    elif model_type not in FAMILY_TARGETS:
        raise BenchError(
            f"no benchmark targets for model_type {model_type!r}; known: {sorted([*FAMILY_TARGETS, *CONV_FAMILIES])}"
        )
    else:
        targets = FAMILY_TARGETS[model_type]
    fields = _DEFAULTS[kind](targets)
    if kind in _ALPHA_FOLLOWS_RANK and "rank" in settings and "alpha" not in settings:
        settings["alpha"] = 2.0 * settings["rank"]
    return config_from_dict({"type": kind, **fields, **settings})
