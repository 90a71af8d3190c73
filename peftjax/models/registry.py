"""Which class builds which checkpoint: ``model_type`` x task -> model class.

Loading and presets both need the same dispatch (a config's ``model_type``
picks the family, the task picks the head), so it lives here once.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from flax import nnx

from peftjax.models.bert import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)
from peftjax.models.errors import UnsupportedModelError
from peftjax.models.llama import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
)
from peftjax.models.resnet import ResNetConfig, ResNetForImageClassification, ResNetModel
from peftjax.models.vit import ViTConfig, ViTForImageClassification, ViTModel

logger = logging.getLogger("peftjax")

# One spelling of each task everywhere: ``task=`` in Python, ``data.task`` in YAML,
# ``peftjax bench --task``. The three tasks a run can train are the data tasks.
BASE = "base"
SEQUENCE_CLASSIFICATION = "classification"
TOKEN_CLASSIFICATION = "token_classification"
CAUSAL_LM = "causal_lm"
IMAGE_CLASSIFICATION = "image_classification"
TASKS = (BASE, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, CAUSAL_LM, IMAGE_CLASSIFICATION)

# Other spellings still accepted, with a notice: the hyphenated names ``task=`` took
# before, and the Hugging Face pipeline names people already type.
TASK_ALIASES = {
    "sequence-classification": SEQUENCE_CLASSIFICATION,
    "sequence_classification": SEQUENCE_CLASSIFICATION,
    "token-classification": TOKEN_CLASSIFICATION,
    "causal-lm": CAUSAL_LM,
    "image-classification": IMAGE_CLASSIFICATION,
    "feature-extraction": BASE,
    "text-classification": SEQUENCE_CLASSIFICATION,
    "text-generation": CAUSAL_LM,
}

# transformers class-name suffixes, for reading ``architectures``.
_SUFFIX_TASKS = {
    "Model": BASE,
    "ForSequenceClassification": SEQUENCE_CLASSIFICATION,
    "ForTokenClassification": TOKEN_CLASSIFICATION,
    "ForCausalLM": CAUSAL_LM,
    "ForImageClassification": IMAGE_CLASSIFICATION,
}


@dataclasses.dataclass(frozen=True)
class Family:
    """One ``model_type``: its config class, HF class prefix and head classes."""

    config_class: type
    hf_prefix: str
    classes: Mapping[str, type]
    default_task: str
    labelled_task: str  # chosen when only ``num_labels`` says a head is wanted


_BERT_CLASSES = {
    BASE: BertModel,
    SEQUENCE_CLASSIFICATION: BertForSequenceClassification,
    TOKEN_CLASSIFICATION: BertForTokenClassification,
}
_LLAMA_CLASSES = {
    BASE: LlamaModel,
    CAUSAL_LM: LlamaForCausalLM,
    SEQUENCE_CLASSIFICATION: LlamaForSequenceClassification,
}
_VIT_CLASSES = {BASE: ViTModel, IMAGE_CLASSIFICATION: ViTForImageClassification}
_RESNET_CLASSES = {BASE: ResNetModel, IMAGE_CLASSIFICATION: ResNetForImageClassification}

FAMILIES: Mapping[str, Family] = {
    "bert": Family(BertConfig, "Bert", _BERT_CLASSES, BASE, SEQUENCE_CLASSIFICATION),
    "roberta": Family(BertConfig, "Roberta", _BERT_CLASSES, BASE, SEQUENCE_CLASSIFICATION),
    "llama": Family(LlamaConfig, "Llama", _LLAMA_CLASSES, CAUSAL_LM, SEQUENCE_CLASSIFICATION),
    "mistral": Family(LlamaConfig, "Mistral", _LLAMA_CLASSES, CAUSAL_LM, SEQUENCE_CLASSIFICATION),
    "qwen2": Family(LlamaConfig, "Qwen2", _LLAMA_CLASSES, CAUSAL_LM, SEQUENCE_CLASSIFICATION),
    "vit": Family(ViTConfig, "ViT", _VIT_CLASSES, BASE, IMAGE_CLASSIFICATION),
    "resnet": Family(ResNetConfig, "ResNet", _RESNET_CLASSES, BASE, IMAGE_CLASSIFICATION),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

ModelConfig = BertConfig | LlamaConfig | ViTConfig | ResNetConfig


def family(model_type: str | None) -> Family:
    """The family of ``model_type``; the error lists what is supported."""
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by peftjax.models; supported "
            f"model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return FAMILIES[model_type]


def config_from_hf_dict(d: Mapping[str, Any]) -> ModelConfig:
    """Parses a transformers ``config.json`` dict with the right config class."""
    return family(d.get("model_type")).config_class.from_hf_dict(d)


def canonical_task(task: str) -> str:
    """``task`` in its one spelling; an old spelling is accepted with a notice."""
    if task in TASK_ALIASES:
        logger.warning("task %r is spelled %r now (the old spelling still works)", task, TASK_ALIASES[task])
        return TASK_ALIASES[task]
    if task not in TASKS:
        close = difflib.get_close_matches(str(task), TASKS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnsupportedModelError(f"task {task!r} is unknown; choose one of {list(TASKS)}.{hint}")
    return task


def task_from_architectures(architectures: Sequence[str] | None) -> str | None:
    """The task of the first architecture name peftjax implements, if any."""
    for name in architectures or ():
        for suffix, task in _SUFFIX_TASKS.items():
            if name.endswith(suffix):
                return task
    return None


def resolve_task(
    model_type: str,
    task: str | None,
    *,
    architectures: Sequence[str] | None = None,
    num_labels: int | None = None,
) -> str:
    """Picks the head: explicit ``task``, else ``architectures``, else defaults.

    A ``num_labels`` without a task or head in the checkpoint asks for the
    family's classifier; otherwise the family default applies (the bare
    encoder for BERT/ViT, the language model for decoders).
    """
    fam = family(model_type)
    if task is None:
        task = task_from_architectures(architectures)
        if task not in fam.classes:
            task = fam.labelled_task if num_labels is not None else fam.default_task
    task = canonical_task(task)
    if task not in fam.classes:
        raise UnsupportedModelError(
            f"task {task!r} is not available for model_type {model_type!r}; "
            f"choose one of {list(fam.classes)}."
        )
    return task


def model_class(model_type: str, task: str) -> type[nnx.Module]:
    return family(model_type).classes[canonical_task(task)]


def hf_architecture(model: nnx.Module) -> str:
    """transformers' class name for ``model`` (e.g. ``RobertaForSequenceClassification``)."""
    prefix = family(model.config.model_type).hf_prefix
    return prefix + type(model).hf_architecture_suffix
