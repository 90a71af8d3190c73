"""Elastic weight consolidation (Kirkpatrick et al. 2017): protect what an
earlier task needed while training on a later one.

After task A, the diagonal Fisher information of the trained model on A's
data says how much each parameter mattered to A:

    F_i = 1/N sum_n E_y[(d log p(y | x_n; w) / d w_i)^2]

with y drawn from the model (``labels: model``, the Fisher itself, computed
exactly over the classes) or the data's label (``labels: empirical``, the
empirical Fisher; the only choice for a causal LM). ``diagonal_fisher``
computes it from per-example gradients; ``save_fisher`` writes it with the
anchor weights w* (A's trained values) as safetensors, and ``peftjax fisher``
does both for a trained adapter folder (``fisher_for_config``).

Training task B with ``strategies: [{type: ewc, fisher: FILE}]`` adds

    lambda / 2 * sum_i F_i (w_i - w*_i)^2

over the file's parameters (``strength`` is lambda). The file holds the
parameters the methods train, less the head, which belongs to task A alone:
the shared encoder for full or partial fine-tuning, the adapters for an
adapter method that task B goes on training. F and w* are ``FixedBuffer``
arrays beside the frozen parameters, never checkpointed; a parameter that
does not train in B adds exactly zero. Logged as ``ewc_loss`` and
``ewc_distance`` (the sum without lambda / 2).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from peftjax.core.labels import param_labels
from peftjax.core.layer_groups import layer_groups
from peftjax.errors import PeftError
from peftjax.methods.base import FROZEN
from peftjax.schema import require
from peftjax.strategies.anchors import Anchors, params_by_path
from peftjax.strategies.base import StepContext, Strategy, register_strategy
from peftjax.train.tasks import call_model, logits_loss

FORMAT = "peftjax-ewc-fisher"
FisherLabels = Literal["model", "empirical"]


def fisher_parameters(model: nnx.Module) -> list[str]:
    """The parameters a Fisher file covers by default: those the methods train, less the head."""
    heads = tuple(path + "." for group in layer_groups(model) if group.kind == "head" for path in group.paths)
    return sorted(path for path, label in param_labels(model).items()
                  if label != FROZEN and not path.startswith(heads))


def _fisher_of_batch(graphdef, wrt, rest, batch, task: str, labels: str):
    """sum_n weight_n F_n over the batch's examples (per-example gradients under vmap)."""
    loss_of = logits_loss(task)

    def logits(params, row):
        model = nnx.merge(graphdef, params, rest)
        return call_model(model, jax.tree.map(lambda x: x[None], row))

    def log_likelihood(params, row):  # of the data's labels: minus the summed loss
        one = jax.tree.map(lambda x: x[None], row)
        return -loss_of(logits(params, row), {**one, "weights": jnp.ones(1)})[1]["loss_sum"]

    def one_example(row):
        if labels == "empirical":
            return jax.tree.map(jnp.square, jax.grad(log_likelihood)(wrt, row))

        def log_probabilities(params):
            log_p = jax.nn.log_softmax(logits(params, row)[0].astype(jnp.float32))
            return log_p, log_p

        # One forward pass, one backward pass per class: sum_c p_c (d log p_c / dw)^2, exactly.
        jacobian, log_p = jax.jacrev(log_probabilities, has_aux=True)(wrt)
        probability = jax.lax.stop_gradient(jnp.exp(log_p))
        return jax.tree.map(lambda j: jnp.tensordot(probability, jnp.square(j), axes=1), jacobian)

    weights = batch["weights"]
    rows = {k: v for k, v in batch.items() if k != "weights"}
    per_example = jax.vmap(one_example)(rows)
    return jax.tree.map(lambda f: jnp.tensordot(weights, f.astype(jnp.float32), axes=1), per_example)


_FISHER_STEP = jax.jit(_fisher_of_batch, static_argnums=(0, 4, 5))


def diagonal_fisher(
    model: nnx.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    task: str = "classification",
    labels: FisherLabels = "model",
    paths: Iterable[str] | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """The diagonal Fisher of ``model`` (in eval mode) over ``batches`` (loader batches;
    rows of weight 0 are left out) for the parameters ``paths`` (default
    ``fisher_parameters``), by dotted path, and the number of examples."""
    if labels == "model" and task == "causal_lm":
        raise PeftError("labels: model draws a class per example; for a causal LM use labels: empirical")
    wanted = set(fisher_parameters(model) if paths is None else paths)
    known = params_by_path(model)
    if missing := sorted(wanted - set(known)):
        raise PeftError(f"the model has no parameters {missing[:5]}; pick paths among its parameters")
    model.eval()
    graphdef, wrt, rest = nnx.split(model, lambda path, v: isinstance(v, nnx.Param) and ".".join(map(str, path)) in wanted, ...)
    total, count = jax.tree.map(lambda v: jnp.zeros(v.shape, jnp.float32), wrt), 0.0
    for batch in batches:
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        batch.setdefault("weights", jnp.ones(len(next(iter(batch.values())))))
        total = jax.tree.map(jnp.add, total, _FISHER_STEP(graphdef, wrt, rest, batch, task, labels))
        count += float(batch["weights"].sum())
    if count == 0:
        raise PeftError("the Fisher needs at least one example; the batches held none")
    fisher = {".".join(map(str, path)): np.asarray(value / count) for path, value in nnx.to_flat_state(total)}
    return fisher, int(count)


def _architecture(model: nnx.Module) -> dict[str, Any]:
    """What identifies the model's architecture: its config (transformers' form) less the
    head's size and labels, which a later task may change; empty for a model without one."""
    to_hf_dict = getattr(getattr(model, "config", None), "to_hf_dict", None)
    if to_hf_dict is None:
        return {}
    return {k: v for k, v in to_hf_dict().items()
            if "label" not in k and k not in ("architectures", "dtype", "torch_dtype")}


def save_fisher(path: str | os.PathLike, model: nnx.Module, fisher: Mapping[str, np.ndarray], *, examples: int,
                labels: str, source: str = "") -> pathlib.Path:
    """Writes ``fisher`` and the model's current values of its parameters (the anchors)
    to a safetensors file, atomically."""
    params = params_by_path(model)
    tensors = {}
    for name, values in fisher.items():
        tensors[f"fisher/{name}"] = np.ascontiguousarray(values, np.float32)
        tensors[f"anchor/{name}"] = np.ascontiguousarray(jax.device_get(params[name].get_value()))
    metadata = {"format": FORMAT, "model": type(model).__name__, "examples": str(examples), "labels": labels,
                "architecture": json.dumps(_architecture(model), sort_keys=True), "source": source}
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(staging), metadata=metadata)
    os.replace(staging, path)
    return path


def load_fisher(path: str | os.PathLike, model: nnx.Module) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(fisher, anchors)`` by parameter path from a file ``save_fisher`` wrote, checked
    against ``model``: the same architecture, and every parameter it names the model's,
    with its shape."""
    path = pathlib.Path(path)
    make = "compute it with `peftjax fisher CONFIG --checkpoint ADAPTER_FOLDER --out FILE` after the earlier task"
    if not path.is_file():
        raise PeftError(f"ewc.fisher: {path} not found; {make}")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise PeftError(f"ewc.fisher: {path} cannot be read ({err}); {make}") from None
    if metadata.get("format") != FORMAT:
        raise PeftError(f"ewc.fisher: {path} is not a Fisher file (no format {FORMAT!r} in its metadata); {make}")
    fisher = {key.removeprefix("fisher/"): value for key, value in arrays.items() if key.startswith("fisher/")}
    anchors = {key.removeprefix("anchor/"): value for key, value in arrays.items() if key.startswith("anchor/")}
    shapes = {name: tuple(p.get_value().shape) for name, p in params_by_path(model).items()}
    missing = sorted(set(fisher) - set(shapes))
    wrong = [f"{k}: file {fisher[k].shape}, model {shapes[k]}" for k in sorted(set(fisher) & set(shapes))
             if fisher[k].shape != shapes[k] or anchors.get(k, np.empty(0)).shape != shapes[k]]
    theirs, ours = json.loads(metadata.get("architecture", "{}")), _architecture(model)
    differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
    if missing or wrong or differ or fisher.keys() != anchors.keys():
        raise PeftError(f"ewc.fisher: {path} was computed for a {metadata.get('model')} that is not this "
                        f"{type(model).__name__}: parameters it lacks {missing[:5]}, shape mismatches {wrong[:5]}, "
                        f"config differences {[f'{k}: {theirs.get(k)} vs {ours.get(k)}' for k in differ][:5]}. "
                        "Compute the Fisher on the model this run starts from, with the same methods applied")
    return fisher, anchors


@register_strategy("ewc")
@dataclasses.dataclass(frozen=True, kw_only=True)
class EwcConfig(Strategy):
    """lambda/2 sum_i F_i (w_i - w*_i)^2 with F and w* from ``fisher``.

    Attributes:
      fisher: the safetensors file ``peftjax fisher`` wrote for the earlier task.
      strength: lambda.
    """

    fisher: str
    strength: float = 1.0

    def _validate(self) -> None:
        require(bool(self.fisher.strip()), "fisher", "must name the Fisher file of the earlier task")
        require(self.strength >= 0, "strength", f"must not be negative, got {self.strength}")

    def setup(self, model: nnx.Module, *, rngs: nnx.Rngs) -> nnx.Module:
        fisher, anchors = load_fisher(self.fisher, model)
        params = params_by_path(model)
        as_model = {name: jnp.asarray(value, params[name].get_value().dtype) for name, value in anchors.items()}
        return Anchors(as_model, {name: jnp.asarray(value, jnp.float32) for name, value in fisher.items()})

    def loss(self, ctx: StepContext) -> tuple[jax.Array, dict[str, jax.Array]]:
        distance = ctx.module(self).distance(ctx.model)
        return self.strength / 2 * distance, {"distance": distance}


def fisher_for_config(config, checkpoint: str, out: str, *, split: str = "train", examples: int = 1000,
                      labels: FisherLabels = "model") -> dict[str, Any]:
    """``peftjax fisher``: the Fisher of the adapter folder ``checkpoint`` on the first
    ``examples`` rows of the config's ``split`` (``train``, ``eval``, ``test``), saved to ``out``."""
    from peftjax.core.adapter_io import load_adapter
    from peftjax.train.runner import build_model, load_task

    task, _ = load_task(config)
    if split not in task.splits:
        raise PeftError(f"--split {split}: the config's data has splits {sorted(task.splits)}")
    model = load_adapter(build_model(config, task.num_labels), checkpoint)
    loader = task.eval_loader(config.train.eval_batch_size, split)
    chosen = min(examples, loader.num_examples)
    size = loader.batch_size
    batches = (loader.batch(np.arange(start, min(start + size, chosen))) for start in range(0, chosen, size))
    fisher, count = diagonal_fisher(model, batches, task=config.data.task, labels=labels)
    source = json.dumps({"checkpoint": str(checkpoint), "split": split, "config": config.name})
    save_fisher(out, model, fisher, examples=count, labels=labels, source=source)
    return {"out": str(out), "examples": count, "parameters": len(fisher),
            "scalars": int(sum(v.size for v in fisher.values())), "labels": labels}
