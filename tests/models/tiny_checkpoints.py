"""Tiny random checkpoints for the reference-model tests.

They are written by transformers PyTorch, whose initialisation costs
milliseconds, instead of by ``from_config``, whose first random
initialisation in a process compiles dozens of small XLA programs. Loading a checkpoint compiles almost nothing, so every test can
afford a fresh model of its own.

This is a plain module, not a ``conftest.py``: tests elsewhere import the
root conftest by module name, which a second conftest would shadow.
"""

import os

# Before transformers/huggingface_hub read it: these tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

from peftjax import models  # noqa: E402
from peftjax.models import registry  # noqa: E402


def checkpoint_factory(tmp_path_factory) -> Callable[..., Path]:
    """``make(preset, task, num_labels=3)`` -> folder, each built once per factory."""
    cache: dict[tuple, Path] = {}

    def make(preset: str, task: str, num_labels: int = 3) -> Path:
        key = (preset, task, num_labels)
        if key not in cache:
            config = models.PRESETS[preset]
            hf_dict = config.to_hf_dict()
            hf_dict.update(id2label={str(i): f"LABEL_{i}" for i in range(num_labels)})
            hf_dict.pop("label2id")
            family = registry.family(config.model_type)
            model_cls = registry.model_class(config.model_type, task)
            architecture = family.hf_prefix + model_cls.hf_architecture_suffix
            torch.manual_seed(len(cache))
            reference = getattr(transformers, architecture)(
                transformers.AutoConfig.for_model(**hf_dict)
            )
            folder = tmp_path_factory.mktemp(f"{preset}-{task}")
            reference.save_pretrained(folder)
            cache[key] = folder
        return cache[key]

    return make


def perturb_batch_norms(reference: torch.nn.Module, seed: int) -> None:
    """Random affine parameters and running statistics in every ``BatchNorm2d``, so
    that a test cannot pass with transformers' initial identity batch norms."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(1 + 0.3 * torch.randn(n, generator=generator))
                module.bias.copy_(0.3 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.5 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.num_batches_tracked.fill_(7)
