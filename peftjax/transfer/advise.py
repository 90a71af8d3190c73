"""A strategy and method for a dataset, with the reasons: ``peftjax advise DATA.yaml``.

The decision framework of the transfer-learning textbooks, in three inputs:

* labelled data size, as examples in the smallest class: ``few`` (fewer than
  ``FEW``), ``small`` (fewer than ``LARGE``) or ``large``;
* domain similarity, as the proxy A-distance between the dataset and a
  source dataset of the same task (``--source``): ``close`` up to ``CLOSE``
  (the middle of its 0-2 scale), else ``distant``; unknown without a source;
* the compute budget: ``low``, ``medium`` or ``high``.

and what it recommends:

=====================  ==========  ======================================================
labels                 similarity  recommendation
=====================  ==========  ======================================================
none (``--unlabelled``)  close     LoRA on the source, pseudo-labelling the target
                       distant     LoRA on the source, DANN against the target
few                    any         a linear probe (too few labels for more parameters)
small                  any         LoRA on query and value
large                  any         full fine-tuning with a high budget; else LoRA, on
                                   query and value (close) or every linear layer at a
                                   higher rank (distant: the features must move more)
=====================  ==========  ======================================================

With a low budget the advice never trains every parameter. A very distant
source (proxy A-distance above ``VERY_DISTANT``) with labels adds a warning to
check for negative transfer (``peftjax negative-transfer``). The experiment
READMEs (``experiments/domain_adaptation``, ``experiments/few_shot_yelp``)
compare this advice with measured outcomes; the thresholds are stated, not fitted.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Literal

import yaml

from peftjax.config import DataConfig, ExperimentConfig
from peftjax.errors import PeftError
from peftjax.schema import ConfigDumper
from peftjax.transfer.similarity import DatasetProfile, Encoder, check_same_labels, read_dataset, similarity

FEW = 32  # examples in the smallest class below which labels are "few"
LARGE = 1000  # and from which they are "large"
CLOSE = 1.0  # proxy A-distance up to which two domains are "close"
VERY_DISTANT = 1.8

Budget = Literal["low", "medium", "high"]

_LORA_QV = {"type": "lora", "targets": ["query", "value"], "rank": 8, "alpha": 16}
_LORA_ALL = {"type": "lora", "targets": "all-linear", "rank": 16, "alpha": 32}
_HEAD = [r"classifier\..*"]
# Learning rates: the usual ones for each kind of method (AdamW).
_RATES = {"linear_probe": 1e-2, "lora": 1e-3, "full": 5e-5}


@dataclasses.dataclass(frozen=True)
class Advice:
    """A recommendation: the setting it read, the method and strategies, and why."""

    setting: dict[str, Any]
    method: dict[str, Any]
    strategies: tuple[dict[str, Any], ...]
    reasons: tuple[str, ...]

    @property
    def summary(self) -> str:
        """``lora (query, value) + dann``: the method, what it targets, the strategies."""
        targets = self.method.get("targets")
        where = f" ({targets if isinstance(targets, str) else ', '.join(targets)})" if targets else ""
        return " + ".join([self.method["type"] + where] + [s["type"] for s in self.strategies])


def size_class(smallest_class: int) -> str:
    return "few" if smallest_class < FEW else "small" if smallest_class < LARGE else "large"


def similarity_class(proxy_a_distance: float | None) -> str:
    if proxy_a_distance is None:
        return "unknown"
    return "close" if proxy_a_distance <= CLOSE else "distant"


def recommend(profile: DatasetProfile, *, proxy_a_distance: float | None = None, labelled: bool = True,
              has_source: bool = False, budget: Budget = "medium") -> Advice:
    """The framework's answer for a dataset (see the module docstring)."""
    size = size_class(profile.smallest_class) if labelled else "none"
    near = similarity_class(proxy_a_distance)
    setting = {"labels": size, "similarity": near, "budget": budget, "rows": profile.rows,
               "smallest_class": profile.smallest_class, "proxy_a_distance": proxy_a_distance}
    reasons = [f"{profile.rows} rows, {profile.classes} classes, {profile.smallest_class} in the smallest: "
               + (f"labels are '{size}' (few < {FEW} <= small < {LARGE} <= large per class)" if labelled
                  else "its labels are not to be used (--unlabelled)")]
    if proxy_a_distance is None:
        reasons.append("no source dataset: similarity unknown, read as close to what the encoder was pretrained on")
    else:
        reasons.append(f"proxy A-distance to the source {proxy_a_distance:.2f}: '{near}' (close <= {CLOSE})")
    strategies: tuple[dict[str, Any], ...] = ()
    if not labelled:
        if not has_source:
            raise PeftError("an unlabelled dataset needs a labelled source of the same task to learn from; "
                            "pass --source SOURCE.yaml, or leave out --unlabelled")
        method = {**_LORA_QV, "also_train": _HEAD}
        if near == "close":
            strategies = ({"type": "pseudo_label", "threshold": 0.9, "rounds": 3, "start": 0.5},)
            reasons.append("no target labels and a close source: train on the source and self-train on the "
                           "target's confident predictions (pseudo-labels are mostly right when the domains are close)")
        else:
            strategies = ({"type": "dann"},)
            reasons.append("no target labels and a distant source: align the domains' features adversarially "
                           "(DANN) while training on the source")
    elif size == "few":
        method = {"type": "linear_probe"}
        reasons.append("few labels: a linear probe on the pretrained features; more trainable parameters "
                       "would fit the few examples rather than the task")
    elif size == "small":
        method = {**_LORA_QV, "also_train": _HEAD}
        reasons.append("a small labelled set: LoRA on query and value adapts the features with few parameters, "
                       "which a few hundred examples per class can support")
    elif budget == "high":
        method = {"type": "full"}
        reasons.append("a large labelled set and a high compute budget: full fine-tuning, which large data "
                       "can support")
    elif near == "distant":
        method = {**_LORA_ALL, "also_train": _HEAD}
        reasons.append("a large labelled set from a distant domain without a high budget: LoRA on every "
                       "linear layer at rank 16, so the features can move further")
    else:
        method = {**_LORA_QV, "also_train": _HEAD}
        reasons.append("a large labelled set close to the pretraining, without a high budget: LoRA on query "
                       "and value")
    if labelled and proxy_a_distance is not None and proxy_a_distance > VERY_DISTANT:
        reasons.append(f"warning: the source is very distant (> {VERY_DISTANT}); check that pretraining helps "
                       "with `peftjax negative-transfer`")
    return Advice(setting, method, strategies, tuple(reasons))


def _length(profile: DatasetProfile) -> int:
    """A max_length that fits 95% of the rows: the 95th percentile rounded up to 16."""
    return int(min(max(16 * math.ceil(profile.length_p95 / 16), 32), profile.max_length))


def experiment(advice: Advice, data: DataConfig, *, profile: DatasetProfile, model: str,
               source: DataConfig | None, name: str) -> ExperimentConfig:
    """The ready-to-train experiment config for ``advice``."""
    length = _length(profile)
    labelled = advice.setting["labels"] != "none"
    target = dataclasses.replace(data, max_length=length, bucket_lengths=None)
    train_data = target if labelled else dataclasses.replace(source, max_length=length, bucket_lengths=None)
    strategies = [{**s, "target": target.to_dict()} for s in advice.strategies]
    rate = _RATES.get(advice.method["type"], 1e-3)
    batch = min(32, max(8, 2 ** int(math.log2(max(profile.rows // 8, 1)))))
    if advice.setting["labels"] == "few":
        train = {"batch_size": min(batch, profile.smallest_class * profile.classes), "steps": 60}
    else:
        train = {"batch_size": batch, "epochs": 3 if advice.setting["labels"] == "small" else 1}
    tree = {
        "name": name,
        "model": {"name": model},
        "methods": [advice.method],
        "strategies": strategies,
        "data": {**train_data.to_dict(), "group_by_length": True},
        "optim": {"name": "adamw", "learning_rate": rate, "weight_decay": 0.01},
        "schedule": {"warmup_ratio": 0.06, "decay": "linear"},
        "train": {**train, "log_every": 10},
    }
    return ExperimentConfig.from_dict(tree)


def advise(data_path: str | pathlib.Path, *, source_path: str | pathlib.Path | None = None, labelled: bool = True,
           budget: Budget = "medium", model: str = "minilm", examples: int = 500, seed: int = 0) -> tuple[Advice, ExperimentConfig]:
    """Reads the dataset (and the source, measuring their similarity with ``model``'s
    pooled embeddings) and returns the advice and its experiment config."""
    data = read_dataset(data_path)
    encoder = Encoder.load(model)
    task = encoder.load_data(data)
    profile = DatasetProfile.of(task)
    source, distance = None, None
    if source_path is not None:
        source = read_dataset(source_path)
        source_task = encoder.load_data(source)
        check_same_labels(source_task, task, str(source_path), str(data_path))
        found = similarity(encoder.embed(source_task, examples=examples, seed=seed),
                           encoder.embed(task, examples=examples, seed=seed), seed=seed)
        distance = found["proxy_a_distance"]
    advice = recommend(profile, proxy_a_distance=distance, labelled=labelled, has_source=source is not None,
                       budget=budget)
    name = f"{pathlib.Path(data_path).stem}_advised"
    return advice, experiment(advice, data, profile=profile, model=model, source=source, name=name)


def to_yaml(advice: Advice, config: ExperimentConfig, command: str) -> str:
    """The experiment YAML, headed by the advice and its reasons as comments."""
    header = [f"# {command}", f"# Recommendation: {advice.summary}"] + [f"#  - {reason}" for reason in advice.reasons]
    return "\n".join(header) + "\n" + yaml.dump(config.to_dict(), Dumper=ConfigDumper, sort_keys=False)
