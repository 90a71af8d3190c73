"""A method peftjax does not ship, written through the public extension API
only, in one short file, and trained: the one-file claim, proven.

ScaleShift learns a per-output scale and shift on a linear layer's output
(y = (1 + gamma) * W x + beta), starting at the identity.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from conftest import ToyStack
from flax import nnx

import peftjax


class ScaleShiftParam(peftjax.AdapterParam):
    """gamma and beta: adapter parameters, so they train and nothing else does."""


@peftjax.register_method("scale_shift_test")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaleShiftConfig(peftjax.MethodConfig):
    target_types = (nnx.Linear,)

    def wrap(self, module, *, adapter_name, rngs):
        return ScaleShift(module, adapter_name=adapter_name)


class ScaleShift(peftjax.AdapterWrapper):
    def __init__(self, base, *, adapter_name):
        super().__init__(base, adapter_name=adapter_name)
        self.gamma = ScaleShiftParam(jnp.zeros(base.out_features))
        self.beta = ScaleShiftParam(jnp.zeros(base.out_features))

    def __call__(self, x):
        y = self.base(x)
        return (1 + self.gamma[...]) * y + self.beta[...] if self.adds_output else y


def test_a_new_method_in_one_file_trains(toy, toy_batch, tmp_path):
    x, y = toy_batch
    before = toy(x)
    peftjax.apply(toy, ScaleShiftConfig(targets=["query", "value"]))
    assert (toy(x) == before).all()
    assert peftjax.count_params(toy).trainable == 2 * 2 * 2 * 16
    state = peftjax.TrainState.create(toy, peftjax.make_optimizer(toy, optax.adam(1e-2)))
    frozen = jax.tree.map(jnp.copy, state.frozen)
    step = peftjax.make_train_step(lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2))
    state, first = step(state, toy_batch)
    for _ in range(30):
        state, metrics = step(state, toy_batch)
    assert float(metrics["loss"]) < 0.7 * float(first["loss"])
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), state.frozen, frozen)))
    peftjax.save_adapter(state.model(), tmp_path / "ss")  # save/load come for free
    assert peftjax.config_from_dict(ScaleShiftConfig(targets=["query"]).to_dict()).targets == ("query",)
