"""XLA's own counts against the analytic models of ``peftjax.bench.analytic``, on bert-base.

Everything is abstract (``jax.eval_shape`` states, lowering and compilation only):
nothing is allocated and nothing is timed. bert-base, LoRA(query, value) as the
benchmark table defines it (r = 8, alpha = 2r), batch 8 x 128 tokens, float32.

* step FLOPs: LoRA <= 0.70 x full fine-tuning (a frozen base costs ~4N, not 6N);
* inference: the unmerged adapters' extra FLOPs equal the written-down formula, whose
  matmul part is 2r(d+k) per token per adapted matrix; merged, the extra is zero;
* memory: XLA's compiled plan for the LoRA step is above the floor of ``peftjax.bench.floor``.
"""

import dataclasses

import jax
import pytest
from flax import nnx

from peftjax.bench import analytic, floor
from peftjax.bench.methods import method_config
from peftjax.bench.suite import BenchSpec, ModelBuilder, build_state, forward_flops, merged_copy, step_flops
from peftjax.core.inject import apply
from peftjax.train.state import make_train_step
from peftjax.train.tasks import loss_and_stats

B, T = 8, 128
L, D, K = 12, 768, 768  # bert-base: layers, query/value fan-in and fan-out
ADAPTED = 2 * L  # query and value in every layer


@pytest.fixture(scope="module")
def builder():
    return ModelBuilder(BenchSpec(model="bert-base", methods=("lora",), batch=B, seq=T, abstract=True))


@pytest.fixture(scope="module")
def lora_step(builder):
    """The compiled LoRA-r8 step and its state (shapes only)."""
    state = build_state(builder, method_config("lora", "bert"))
    loss = loss_and_stats("classification")
    batch = builder.batch(concrete=False)
    compiled = make_train_step(lambda m, b: loss(m, b)).lower(state, batch).compile()
    return state, batch, compiled


def test_lora_step_flops_at_most_70_percent_of_full(builder, lora_step):
    full = step_flops(builder, "full")
    lora = float(lora_step[2].cost_analysis()["flops"])
    ratio = lora / full
    assert ratio <= 0.70, f"LoRA/full step FLOPs = {ratio:.3f}"
    assert ratio >= 0.60, f"LoRA/full = {ratio:.3f}: under 2/3 would mean work went missing"


def _lora_model(builder, rank: int, alpha: float) -> nnx.Module:
    config = dataclasses.replace(method_config("lora", "bert"), rank=rank, alpha=alpha)
    return nnx.eval_shape(lambda: apply(builder(), config))


def test_unmerged_lora_forward_overhead_is_the_formula_and_merged_is_free(builder):
    batch = builder.batch(concrete=False)
    base = forward_flops(nnx.eval_shape(builder), batch)
    model = _lora_model(builder, rank=8, alpha=16.0)  # s = 2: the scale's multiply is counted
    overhead = forward_flops(model, batch) - base
    analytic_overhead, _ = analytic.forward_overhead(model, B * T)
    per_matrix = 2 * 8 * (D + K) + K + K  # matmuls + add + scale, per token
    assert analytic_overhead == B * T * ADAPTED * per_matrix
    assert abs(overhead - analytic_overhead) <= 0.01 * analytic_overhead, (overhead, analytic_overhead)
    assert forward_flops(merged_copy(model), batch) == base


def test_lora_matmul_flops_are_2r_d_plus_k_per_token_per_matrix(builder):
    """Two ranks with the same scale s differ only in the matmuls: 2 (r2 - r1)(d + k)."""
    batch = builder.batch(concrete=False)
    low = forward_flops(_lora_model(builder, rank=8, alpha=16.0), batch)
    high = forward_flops(_lora_model(builder, rank=16, alpha=32.0), batch)
    expected = B * T * ADAPTED * 2 * (16 - 8) * (D + K)
    assert abs((high - low) - expected) <= 0.01 * expected, (high - low, expected)


def test_lora_compiled_memory_is_above_the_floor(builder, lora_step):
    state, batch, compiled = lora_step
    memory = analytic.compiled_memory(compiled)
    activations = floor.activation_floor(
        state.model(), state.tx.labels, batch=B, seq=T, compute_dtype=builder.dtype, causal_lm=False
    )
    bound = floor.memory_floor(state, batch, activations["total"])
    assert memory["total"] >= bound["total"], f"XLA {memory} below the floor {bound}"
    # The state and batch are XLA's arguments, byte for byte (less the 4-byte step counter), donated
    # trainable and optimizer buffers come back aliased, and the activations are among the temporaries.
    assert 0 <= memory["argument"] - (bound["total"] - bound["activations"]) <= 4
    assert memory["alias"] >= bound["trainable"] + bound["optimizer_state"]
    assert memory["temp"] >= activations["total"]


def test_abstract_analysis_allocates_nothing(builder, lora_step):
    state = lora_step[0]
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves((state.trainable, state.frozen)))
