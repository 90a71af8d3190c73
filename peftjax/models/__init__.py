"""Reference Flax NNX models that load Hugging Face checkpoints.

BERT/RoBERTa, Llama/Mistral/Qwen2, ViT and ResNet, with module paths equal to
the checkpoints' names, plain ``nnx.Linear`` (and ``nnx.Conv``) layers for
adapters to wrap, and the insertion points of ``peftjax.points`` in every
transformer layer.
"""

from peftjax.models.bert import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)
from peftjax.models.common import ModelOutput
from peftjax.models.errors import (
    CheckpointNotFoundError,
    ModelLoadError,
    UnsupportedModelError,
)
from peftjax.models.llama import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    RopeParameters,
)
from peftjax.models.loading import LoadReport, checkpoint_architecture, from_pretrained, save_pretrained
from peftjax.models.factory import PRESETS, count_parameters, from_config, presets
from peftjax.models.registry import SUPPORTED_MODEL_TYPES, TASKS
from peftjax.models.resnet import ResNetConfig, ResNetForImageClassification, ResNetModel
from peftjax.models.vit import ViTConfig, ViTForImageClassification, ViTModel

__all__ = [
    "BertConfig",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "CheckpointNotFoundError",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaForSequenceClassification",
    "LlamaModel",
    "LoadReport",
    "ModelLoadError",
    "ModelOutput",
    "PRESETS",
    "ResNetConfig",
    "ResNetForImageClassification",
    "ResNetModel",
    "RopeParameters",
    "SUPPORTED_MODEL_TYPES",
    "TASKS",
    "UnsupportedModelError",
    "ViTConfig",
    "ViTForImageClassification",
    "ViTModel",
    "count_parameters",
    "from_config",
    "checkpoint_architecture",
    "from_pretrained",
    "presets",
    "save_pretrained",
]
