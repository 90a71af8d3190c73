"""Compilation apart from stepping, and a run's FLOPs as XLA counts them, shape by shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from peftjax.rank_search.cost import CompileClock, StepShapes, program_flops


def layer(w, x):
    return jnp.tanh(x @ w).sum()


def test_compile_clock_sees_the_first_call_of_each_shape_only():
    step = jax.jit(jax.grad(layer))
    w, four, eight = jnp.ones((16, 16)), jnp.ones((4, 16)), jnp.ones((8, 16))  # made outside: jnp.ones compiles too
    with CompileClock() as first:
        step(w, four).block_until_ready()
    with CompileClock() as again:
        step(w, four).block_until_ready()
    with CompileClock() as outer, CompileClock() as inner:
        step(w, eight).block_until_ready()
    assert first.seconds > 0 and first.compiles == 1
    assert again.seconds == 0 and again.compiles == 0
    assert outer.seconds == inner.seconds > 0 and outer.compiles == inner.compiles == 1  # nested clocks both count


def test_a_runs_flops_sum_the_programs_flops_over_its_steps_by_shape():
    step = jax.jit(jax.grad(layer))
    w = jnp.ones((16, 16))
    shapes = StepShapes()
    for rows in (4, 8, 4, 4, 8):
        x = jnp.ones((rows, 16))
        step(w, x)
        shapes.add({"x": x})
    assert shapes.counts == {(("['x']", (4, 16)),): 3, (("['x']", (8, 16)),): 2}
    flops = {rows: program_flops(step.lower(w, jnp.ones((rows, 16)))) for rows in (4, 8)}
    # The forward matmul alone is 2 * rows * 16 * 16; the gradient adds another.
    assert flops[4] >= 2 * 2 * 4 * 16 * 16 and flops[8] > flops[4]
    with CompileClock() as clock:
        total = shapes.total_flops(lambda batch: step.lower(w, batch["x"]))
    assert total == pytest.approx(3 * flops[4] + 2 * flops[8])
    assert clock.compiles == 0  # the programs were found in JAX's caches: counting compiled nothing new
