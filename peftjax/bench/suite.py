"""Benchmark PEFT methods on one model: counts, XLA's FLOPs and memory plan, step time.

For each method the suite builds the model, applies the method, and compiles the
same jitted train step ``peftjax train`` runs (AdamW, the runner's loss), then reports

* trainable and total parameters, and the adapter's size (its arrays; with real
  arrays also the saved folder's bytes);
* the step's FLOPs from XLA's cost analysis and their ratio to full fine-tuning's;
  forward (inference) FLOPs without the method, with it unmerged, and merged, with
  the overhead set against ``analytic.forward_overhead``;
* XLA's compiled memory plan beside ``floor.memory_floor`` (a lower bound), and the device's
  peak bytes where the backend reports them (GPU; None on CPU);
* unless ``abstract``: the median step time over ``steps`` steps after ``warmup``
  steps (compilation excluded, each step blocked on), tokens (images, for an image
  model) per second and, on a GPU with a known peak, MFU = step FLOPs / step time /
  peak FLOP/s.

Image models (ResNet) take a batch of ``image_size`` x ``image_size`` images. No
analytic activation model is written for them, so their rows carry XLA's memory
plan and no analytic floor.

With ``abstract=True`` nothing is allocated: states are ``jax.eval_shape`` shapes
and only lowering and compilation run, so llama-8b's plan fits on a laptop.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from peftjax.bench import analytic
from peftjax.bench import floor as floor_model
from peftjax.bench.methods import method_config, method_names
from peftjax.core.adapter_io import adapter_variables, save_adapter
from peftjax.core.counting import count_params
from peftjax.core.inject import apply, iter_wrappers
from peftjax.core.labels import make_optimizer
from peftjax.errors import BenchError, PeftError
from peftjax.models import registry
from peftjax.models.factory import PRESETS, from_config
from peftjax.models.loading import from_pretrained
from peftjax.models.names import PACKAGED_CHECKPOINTS, packaged_checkpoint
from peftjax.train.state import TrainState, TrainStep, make_train_step
from peftjax.train.tasks import call_model, loss_and_stats

# Dense peak FLOP/s of accelerators we may meet, by compute dtype (vendor data sheets, SXM parts).
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
}
LEARNING_RATE = 1e-4  # any value: FLOPs, memory and time do not depend on it


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """What to benchmark.

    Attributes:
      model: a preset (``bert-base``, ``llama-8b``, ...), ``minilm`` (the packaged
        MiniLM-L6 checkpoint) or a checkpoint folder.
      methods: YAML method types with optional settings, as ``peftjax.bench.methods``
        reads them (``lora``, ``lora:rank=16``, ``ia3``, ``prefix_tuning``, ...).
      batch, seq: examples per step and tokens per example (text models).
      image_size: side of the square images of an image model (default 224).
      dtype: compute dtype, ``fp32`` or ``bf16`` (as ``train.precision``).
      param_dtype: storage dtype of the base's parameters (adapter parameters stay float32).
      abstract: shapes only: FLOPs and the memory plan, no allocation, no timing.
      steps, warmup: timed steps and untimed steps before them.
      task: ``classification`` (2 labels), ``causal_lm`` or ``image_classification``
        (2 labels); None = the family's natural one (BERT: classification, Llama:
        causal LM, ResNet: image classification).
      dropout: keep the model's dropout rates; by default they are set to 0 so the
        numbers measure the method, not the random-number generator.
    """

    model: str
    methods: tuple[str, ...]
    batch: int = 8
    seq: int = 128
    image_size: int = 224
    dtype: str = "fp32"
    param_dtype: str = "fp32"
    abstract: bool = False
    steps: int = 10
    warmup: int = 2
    task: str | None = None
    dropout: bool = False

    def __post_init__(self) -> None:
        for flag, least in (("batch", 1), ("seq", 1), ("image_size", 1), ("steps", 1), ("warmup", 0)):
            value = getattr(self, flag)
            if not isinstance(value, int) or value < least:
                raise BenchError(f"--{flag.replace('_', '-')} {value!r}: must be an integer of at least {least}")
    seed: int = 0


# ----------------------------------------------------------------------------
# Model, batch and state.
# ----------------------------------------------------------------------------


def resolve_model(name: str) -> tuple[registry.ModelConfig, Path | None]:
    """The model's config and its checkpoint folder (None for a preset)."""
    if name in PRESETS:
        return PRESETS[name], None
    folder = packaged_checkpoint(name) or Path(name)
    if not (folder / "config.json").is_file():
        raise BenchError(f"--model {name!r}: not a preset ({', '.join(PRESETS)}), a packaged checkpoint "
                        f"({', '.join(PACKAGED_CHECKPOINTS)}), or a checkpoint folder")
    return registry.config_from_hf_dict(json.loads((folder / "config.json").read_text())), folder


IMAGE_FAMILIES = ("resnet",)
TASKS = ("classification", "causal_lm", "image_classification")


def default_task(config: registry.ModelConfig) -> str:
    if config.model_type in IMAGE_FAMILIES:
        return "image_classification"
    return "causal_lm" if config.model_type in ("llama", "mistral", "qwen2") else "classification"


def _no_dropout(config: registry.ModelConfig) -> dict[str, float]:
    """Overrides setting every dropout rate of ``config`` to 0."""
    return {
        f.name: 0.0
        for f in dataclasses.fields(config)
        if "dropout" in f.name and isinstance(getattr(config, f.name), float)
    }


class ModelBuilder:
    """Builds the spec's model afresh (each method gets its own copy)."""

    def __init__(self, spec: BenchSpec):
        self.spec = spec
        self.config, self.folder = resolve_model(spec.model)
        self.task = spec.task or default_task(self.config)
        if self.task not in TASKS:
            raise BenchError(f"task {self.task!r}: choose one of {', '.join(TASKS)}")
        model_type = self.config.model_type
        if model_type not in analytic._FAMILY and model_type not in IMAGE_FAMILIES:
            raise BenchError(f"bench supports BERT/RoBERTa, Llama-family and ResNet models, not {model_type!r}")
        if (model_type in IMAGE_FAMILIES) != (self.task == "image_classification"):
            raise BenchError(f"task {self.task!r} does not fit a {model_type} model; leave --task out for its own")
        self.overrides = {} if spec.dropout else _no_dropout(self.config)
        self.dtype = analytic.as_dtype(spec.dtype)
        self.param_dtype = analytic.as_dtype(spec.param_dtype)

    @property
    def num_labels(self) -> int | None:
        return None if self.task == "causal_lm" else 2

    @property
    def images(self) -> bool:
        return self.task == "image_classification"

    @property
    def examples(self) -> int:
        """What one step processes: images, or tokens."""
        return self.spec.batch if self.images else self.spec.batch * self.spec.seq

    def __call__(self) -> nnx.Module:
        kwargs = dict(task=self.task, num_labels=self.num_labels, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.folder is None or self.spec.abstract:
            model = from_config(self.config, seed=self.spec.seed, **kwargs, **self.overrides)
        else:  # the new head stays frozen, as on a preset: the rows measure the method alone
            model = from_pretrained(
                self.folder, seed=self.spec.seed, config_overrides=self.overrides or None, ignore_mismatched_sizes=True,
                freeze_new_head=True, **kwargs,
            )  # fmt: skip
        model.train()
        return model

    def batch(self, *, concrete: bool) -> dict[str, Any]:
        """A batch of the spec's shape: random tokens (or images), or shapes only."""
        if self.images:
            return self._image_batch(concrete=concrete)
        b, t = self.spec.batch, self.spec.seq
        labels_shape = (b,) if self.task == "classification" else (b, t)
        if not concrete:
            ints = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
            return {"input_ids": ints((b, t)), "attention_mask": ints((b, t)), "labels": ints(labels_shape)}
        rng = np.random.default_rng(self.spec.seed)
        ids = rng.integers(min(1000, self.config.vocab_size // 2), self.config.vocab_size, (b, t), dtype=np.int32)
        labels = rng.integers(0, 2, (b,), dtype=np.int32) if self.task == "classification" else ids
        mask = jnp.ones((b, t), jnp.int32)
        return {"input_ids": jnp.asarray(ids), "attention_mask": mask, "labels": jnp.asarray(labels)}

    def _image_batch(self, *, concrete: bool) -> dict[str, Any]:
        # Channels-last, as the data loaders give images (the runner transposes them for the model).
        b, side = self.spec.batch, self.spec.image_size
        shape = (b, side, side, self.config.num_channels)
        if not concrete:
            return {"pixel_values": jax.ShapeDtypeStruct(shape, jnp.float32), "labels": jax.ShapeDtypeStruct((b,), jnp.int32)}
        rng = np.random.default_rng(self.spec.seed)
        pixels = rng.normal(size=shape).astype(np.float32)
        return {"pixel_values": jnp.asarray(pixels), "labels": jnp.asarray(rng.integers(0, 2, (b,), dtype=np.int32))}


def _state_for(model: nnx.Module, config) -> TrainState:
    apply(model, config)
    return TrainState.create(model, make_optimizer(model, optax.adamw(LEARNING_RATE)))


def build_state(builder: ModelBuilder, config) -> TrainState:
    """The train state for ``config``: ``jax.eval_shape`` shapes when abstract."""
    if builder.spec.abstract:
        return jax.eval_shape(lambda: _state_for(builder(), config))
    return _state_for(builder(), config)


# ----------------------------------------------------------------------------
# Measurements.
# ----------------------------------------------------------------------------


def _cost(compiled: jax.stages.Compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, (list, tuple)) else cost


def forward_flops(model: nnx.Module, batch: dict[str, Any]) -> float:
    """XLA's FLOPs of one inference forward pass (eval mode) of ``model`` on ``batch``'s inputs."""
    copy = nnx.eval_shape(lambda m: m, model)
    copy.eval()
    graphdef, state = nnx.split(copy)
    inputs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items() if k != "labels"}

    def forward(state, inputs):
        return call_model(nnx.merge(graphdef, state), inputs)

    return float(_cost(jax.jit(forward).lower(state, inputs).compile())["flops"])


def merged_copy(model: nnx.Module) -> nnx.Module | None:
    """An abstract copy of ``model`` as ``peftjax.merge`` leaves it, or None when an active
    adapter cannot merge. Merging changes kernel values and sets each wrapper's ``merged``
    flag, after which the wrapper calls only its base layer; FLOPs depend on the flag alone,
    so it is set directly (merging itself needs values: DoRA and IA3 check for zeros)."""
    copy = nnx.eval_shape(lambda m: m, model)
    wrappers = [w for _, w in iter_wrappers(copy) if w.active and not w.merged]
    if not all(w.mergeable() for w in wrappers):
        return None
    for wrapper in wrappers:
        wrapper.merged = True
    return copy


def adapter_bytes(model: nnx.Module) -> int:
    """Bytes of the arrays ``save_adapter`` writes (``adapter_state``), computed from shapes."""
    return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in adapter_variables(model).values())


def adapter_file_bytes(model: nnx.Module) -> int:
    """Bytes of the folder ``save_adapter`` writes (weights and config)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_adapter(model, Path(tmp) / "adapter")
        return sum(f.stat().st_size for f in folder.iterdir())


def device_info() -> dict[str, Any]:
    device = jax.devices()[0]
    kind = device.device_kind
    name = f"cpu ({os.cpu_count()} cores)" if device.platform == "cpu" else kind
    return {"device": name, "platform": device.platform, "device_kind": kind, "jax": jax.__version__}


def device_peak_bytes() -> int | None:
    """The backend's peak bytes in use (a process-wide high-water mark; None on CPU)."""
    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def peak_flops(dtype: str) -> float | None:
    kind = jax.devices()[0].device_kind
    return next((table[dtype] for name, table in PEAK_FLOPS.items() if name in kind), None)


def run_compiled(compiled: jax.stages.Compiled, state: TrainState, batch) -> tuple[TrainState, dict]:
    """One step through the compiled executable (what ``TrainStep.__call__`` does, without
    a second compilation)."""
    _, carry, frozen, batch = TrainStep._args(state, batch)
    (step, trainable, opt_state, rest), metrics = compiled(carry, frozen, batch)
    return state.replace(step=step, trainable=trainable, opt_state=opt_state, rest=rest), metrics


def time_steps(compiled, state: TrainState, batch, *, steps: int, warmup: int) -> tuple[list[float], TrainState]:
    """Seconds per step, each blocked on, after ``warmup`` untimed steps."""
    for _ in range(warmup):
        state, metrics = run_compiled(compiled, state, batch)
    jax.block_until_ready((state, metrics) if warmup else state)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = run_compiled(compiled, state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return times, state


# ----------------------------------------------------------------------------
# The suite.
# ----------------------------------------------------------------------------


def step_flops(builder: ModelBuilder, name: str) -> float:
    """XLA's FLOPs of one train step with method ``name`` (shapes only)."""
    state = build_state(builder, method_config(name, builder.config.model_type))
    loss = loss_and_stats(builder.task)
    lowered = make_train_step(lambda m, b: loss(m, b)).lower(state, builder.batch(concrete=False))
    return float(_cost(lowered.compile())["flops"])


def bench_method(builder: ModelBuilder, name: str, *, base_forward: float) -> dict[str, Any]:
    """Every measurement of one method (see the module docstring)."""
    spec = builder.spec
    row: dict[str, Any] = {"method": name}
    try:
        config = method_config(name, builder.config.model_type)
        row["config"] = config.to_dict()
        state = build_state(builder, config)
    except PeftError as err:
        return {**row, "status": "skipped", "reason": str(err)}
    model = state.model()
    labels = state.tx.labels
    counts = count_params(model, labels)
    batch = builder.batch(concrete=not spec.abstract)
    loss = loss_and_stats(builder.task)
    step = make_train_step(lambda m, b: loss(m, b))

    started = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - started
    cost = _cost(compiled)
    memory = analytic.compiled_memory(compiled)

    unmerged = forward_flops(model, batch)
    merged = merged_copy(model)
    merged_flops = forward_flops(merged, batch) if merged is not None else None
    adapted = any(w.active and not w.merged for _, w in iter_wrappers(model))
    if builder.images and adapted:  # the per-token formulas do not describe convolutions
        overhead_analytic, formula = None, None
    else:
        overhead_analytic, formula = analytic.forward_overhead(model, builder.examples)
    if builder.images:
        activations, floor = None, None
    else:
        activations = floor_model.activation_floor(
            model, labels, batch=spec.batch, seq=spec.seq, compute_dtype=builder.dtype,
            causal_lm=builder.task == "causal_lm",
        )  # fmt: skip
        floor = floor_model.memory_floor(state, batch, activations["total"])
    row.update(
        status="ok",
        trainable_params=counts.trainable,
        total_params=counts.total,
        trainable_percent=round(counts.percent, 4),
        adapter_bytes=adapter_bytes(model),
        adapter_file_bytes=None,
        step_flops=float(cost["flops"]),
        step_bytes_accessed=float(cost.get("bytes accessed", float("nan"))),
        forward_flops_base=base_forward,
        forward_flops_unmerged=unmerged,
        forward_flops_merged=merged_flops,
        forward_overhead_flops=unmerged - base_forward,
        forward_overhead_analytic=overhead_analytic,
        forward_overhead_formula=formula,
        merged_overhead_flops=None if merged_flops is None else merged_flops - base_forward,
        compiled_memory_bytes=None if memory is None else memory["total"],
        compiled_memory=memory,
        analytic_floor_bytes=None if floor is None else floor["total"],
        analytic_floor=floor,
        activation_terms=activations,
        compile_s=round(compile_s, 2),
        device_peak_bytes=None,
        step_time_s=None,
        step_times_s=None,
        tokens_per_s=None,
        images_per_s=None,
        mfu=None,
    )
    if memory is not None and floor is not None:
        row["memory_ratio_compiled_vs_analytic"] = memory["total"] / floor["total"]
    if spec.abstract:
        return row
    del model
    row["load_avg_before"] = list(os.getloadavg())
    times, state = time_steps(compiled, state, batch, steps=spec.steps, warmup=spec.warmup)
    row["load_avg_after"] = list(os.getloadavg())
    median = statistics.median(times)
    peak = peak_flops(spec.dtype)
    row.update(
        step_time_s=median,
        step_times_s=times,
        **{"images_per_s" if builder.images else "tokens_per_s": builder.examples / median},
        mfu=None if peak is None else row["step_flops"] / median / peak,
        device_peak_bytes=device_peak_bytes(),
        adapter_file_bytes=adapter_file_bytes(state.model()),
    )
    return row


def run_bench(spec: BenchSpec, *, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Benchmark every method of ``spec``; one row per method (skipped ones say why)."""
    names = method_names(",".join(spec.methods))
    builder = ModelBuilder(spec)
    common = {
        "model": spec.model, "task": builder.task, "batch": spec.batch, "seq": None if builder.images else spec.seq,
        "image_size": spec.image_size if builder.images else None, "dtype": spec.dtype,
        "param_dtype": spec.param_dtype, "abstract": spec.abstract, "steps": None if spec.abstract else spec.steps,
        "warmup": None if spec.abstract else spec.warmup, "dropout": spec.dropout, **device_info(),
    }  # fmt: skip
    shapes_only = ModelBuilder(dataclasses.replace(spec, abstract=True))
    base_forward = forward_flops(nnx.eval_shape(shapes_only), shapes_only.batch(concrete=False))
    rows, full_flops = [], None
    # Full fine-tuning first: every other method's FLOPs ratio refers to it.
    order = sorted(names, key=lambda n: n != "full")
    for name in order:
        log(f"[bench] {spec.model}: {name} ...")
        row = {**common, **bench_method(builder, name, base_forward=base_forward)}
        if name == "full" and row["status"] == "ok":
            full_flops = row["step_flops"]
        rows.append(row)
        gc.collect()
    if full_flops is None:
        log(f"[bench] {spec.model}: full fine-tuning's step FLOPs (for the ratios) ...")
        full_flops = step_flops(shapes_only, "full")
    for row in rows:
        row["full_step_flops"] = full_flops
        row["flops_ratio_vs_full"] = row["step_flops"] / full_flops if row.get("status") == "ok" else None
    rows.sort(key=lambda r: names.index(r["method"]))
    return rows
