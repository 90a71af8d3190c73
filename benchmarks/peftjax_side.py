"""peftjax's side of a comparison with HF PEFT (``compare_hf_peft.py`` describes both): JAX only."""

from __future__ import annotations

import os

import comparison  # noqa: F401  (sets the environment before JAX starts)
import jax
import jax.numpy as jnp
import numpy as np
import optax
from comparison import LEARNING_RATE, WEIGHT_DECAY, Source, Task, dtype_names
from flax import nnx

import peftjax
from peftjax.bench.suite import run_compiled
from peftjax.models import from_config, from_pretrained
from peftjax.train.tasks import loss_and_stats
from peftjax.variables import AdapterParam

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def peftjax_method(args, task: Task) -> peftjax.MethodConfig:
    if args.method == "full":
        return peftjax.FullFineTuningConfig()
    config = peftjax.QLoraConfig if args.method == "qlora" else peftjax.LoraConfig
    return config(rank=args.rank, alpha=args.alpha, targets=args.targets, also_train=task.also_train)


def upcast_adapters(model: nnx.Module) -> None:
    """HF PEFT's ``autocast_adapter_dtype``: float32 adapter weights over a bf16 model
    (peftjax's models give adapters their layer's ``param_dtype``)."""
    for _, variable in nnx.iter_graph(model):
        if isinstance(variable, AdapterParam) and variable[...].dtype != jnp.float32:
            variable.set_value(variable[...].astype(jnp.float32))


def peftjax_model(args, source: Source) -> nnx.Module:
    """The model in training mode with the method applied (works under ``nnx.eval_shape``)."""
    task, dtype = source.task, DTYPES[args.dtype]
    kwargs = dict(task=task.head, num_labels=task.num_labels, dtype=dtype, param_dtype=dtype)
    overrides = source.dropout_overrides(args.dropout)
    if source.folder is None:
        model = from_config(source.config, **kwargs, **overrides)
    else:
        model = from_pretrained(source.folder, ignore_mismatched_sizes=True, config_overrides=overrides or None,
                                **kwargs)
    model.train()
    peftjax.apply(model, peftjax_method(args, task))
    upcast_adapters(model)
    return model


class PeftjaxSide:
    name = "peftjax"

    def __init__(self, args, source: Source, batch: dict[str, np.ndarray]):
        model = peftjax_model(args, source)
        tx = peftjax.make_optimizer(model, optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY))
        self.counts = peftjax.count_params(model, tx.labels)
        self.state = peftjax.TrainState.create(model, tx)
        self.param_dtypes = {"trainable": dtype_names(jax.tree.leaves(self.state.trainable)),
                             "frozen": dtype_names(jax.tree.leaves(self.state.frozen))}
        self.batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
        loss = loss_and_stats(source.task.loss)
        self.compiled = peftjax.make_train_step(lambda m, b: loss(m, b)).lower(self.state, self.batch).compile()
        graphdef = self.state.graphdef

        def forward(trainable, frozen, rest, batch):
            return loss(nnx.merge(graphdef, trainable, frozen, rest), batch)[0]

        self.forward_fn = jax.jit(forward)
        device = jax.devices()[0]
        self.device = f"cpu ({os.cpu_count()} cores)" if device.platform == "cpu" else device.device_kind

    def step(self) -> jax.Array:
        """One step; returns its loss (of the parameters before the update), left on the device."""
        self.state, metrics = run_compiled(self.compiled, self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        return metrics["loss"]

    def forward(self) -> None:
        s = self.state
        jax.block_until_ready(self.forward_fn(s.trainable, s.frozen, s.rest, self.batch))

    def peak_memory(self) -> int | None:
        stats = jax.devices()[0].memory_stats()
        return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


