"""Every method trains: MiniLM on an SST-2 subset from ../shared/data, a short
run per method, beats the majority-class baseline on held-out dev rows, with
every frozen weight bitwise unchanged.

One data load and one checkpoint read serve every method; each method gets a
fresh copy of the pretrained base and the same batches. The new classifier
head trains alongside every method (it starts random); linear probing trains
the head alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peftjax
from peftjax.config import DataConfig
from peftjax.train.data import load_data, load_tokenizer, require_shared_data
from peftjax.train.runner import evaluate, loss_and_stats
from peftjax.train.sharding import global_batch, make_mesh

HEAD = (r"classifier\..*",)
QV = ["query", "value"]
METHODS = {
    "lora": peftjax.LoraConfig(rank=8, alpha=16, targets=QV, also_train=HEAD),
    "lora_plus": peftjax.LoraConfig(rank=8, alpha=16, targets=QV, also_train=HEAD, loraplus_lr_ratio=4.0),
    "dora": peftjax.DoraConfig(rank=8, alpha=16, targets=QV, also_train=HEAD),
    "qlora": peftjax.QLoraConfig(rank=8, alpha=16, targets=QV, also_train=HEAD),
    "vera": peftjax.VeraConfig(rank=64, targets=QV, also_train=HEAD),
    "ia3": peftjax.IA3Config(targets=r".*\.(key|value|output\.dense)", feedforward=r".*layer\.\d+\.output\.dense",
                             also_train=HEAD),
    "houlsby": peftjax.BottleneckConfig(variant="houlsby", also_train=HEAD),
    "pfeiffer": peftjax.BottleneckConfig(variant="pfeiffer", also_train=HEAD),
    "parallel": peftjax.BottleneckConfig(variant="parallel", also_train=HEAD),
    "prompt": peftjax.PromptTuningConfig(num_virtual_tokens=8, also_train=HEAD),
    "prefix": peftjax.PrefixTuningConfig(num_virtual_tokens=8, also_train=HEAD),
    "bitfit": peftjax.BitFitConfig(also_train=HEAD),
    "ln_tuning": peftjax.LNTuningConfig(also_train=HEAD),
    "linear_probe": peftjax.LinearProbeConfig(),
    "full": peftjax.FullFineTuningConfig(),
}
STEPS, BATCH = 24, 16
# A short run's rate for few trainable parameters is 1e-2; LoRA+ multiplies B's by 4; full fine-tuning
# moves 22M weights and wants a small one.
LEARNING_RATE = {"full": 5e-5, "lora_plus": 3e-3}


@pytest.fixture(scope="module")
def sst2():
    require_shared_data("sst2/train.tsv")
    from peftjax.config import ModelSpec

    checkpoint = ModelSpec(name="minilm").checkpoint_dir()
    config = DataConfig(source="shared:sst2", train_split="train.tsv", eval_split="dev.tsv", test_split=None,
                        text_columns=("sentence",), label_column="label", max_length=32, bucket_lengths=(32,),
                        max_train_rows=STEPS * BATCH, max_eval_rows=192)
    task = load_data(config, load_tokenizer(checkpoint))
    from peftjax.models import from_pretrained

    base = from_pretrained(checkpoint, task="sequence-classification", num_labels=2)
    batches = list(task.train_loader(BATCH, seed=0).iterate(stop_epoch=1))
    return base, batches, task, task["eval"].labels


@pytest.mark.parametrize("name", METHODS)
def test_method_beats_majority_on_sst2(sst2, name):
    base, batches, task, eval_labels = sst2
    model = nnx.clone(base)
    peftjax.apply(model, METHODS[name])
    model.train()
    loss_fn, mesh = loss_and_stats("classification"), make_mesh()
    optimizer = peftjax.make_optimizer(model, optax.adamw(LEARNING_RATE.get(name, 1e-2)))
    state = peftjax.TrainState.create(model, optimizer)
    frozen_before = jax.tree.map(jnp.copy, state.frozen)
    step = peftjax.make_train_step(loss_fn)
    for batch in batches:
        state, metrics = step(state, global_batch(batch, mesh))
    assert np.isfinite(float(metrics["loss"]))
    same = jax.tree.map(lambda a, b: bool((a == b).all()), state.frozen, frozen_before)
    assert all(jax.tree.leaves(same)), f"{name}: a frozen weight changed"
    scores = evaluate(state.model(), task.eval_loader(64, "eval"), loss_fn, mesh)
    positive = float(np.mean(np.asarray(eval_labels)))
    majority = max(positive, 1 - positive)
    assert scores["accuracy"] > majority, f"{name}: {scores['accuracy']:.3f} <= majority {majority:.3f}"
