"""``make demo``: LoRA on a small frozen network, end to end in a few seconds.

A randomly initialised two-layer MLP is the frozen base; LoRA(r=4) on both
hidden layers learns a regression target the base cannot fit. Prints the
trainable-parameter summary and the falling loss.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import peftjax


class MLP(nnx.Module):
    def __init__(self, *, d_in=32, d_hidden=128, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(d_in, d_hidden, rngs=rngs)
        self.fc2 = nnx.Linear(d_hidden, d_hidden, rngs=rngs)
        self.head = nnx.Linear(d_hidden, 1, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.gelu(self.fc2(jax.nn.gelu(self.fc1(x)))))


def main() -> None:
    model = MLP(rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (256, 32))
    y = jnp.sin(x[:, :1] * 3.0) + x[:, 1:2] * x[:, 2:3]
    peftjax.apply(model, peftjax.LoraConfig(rank=4, alpha=8, targets=["fc1", "fc2"]))
    optimizer = peftjax.make_optimizer(model, optax.adamw(3e-3))
    print(peftjax.summary(model, optimizer.labels))
    state = peftjax.TrainState.create(model, optimizer)
    step = peftjax.make_train_step(lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2))
    for i in range(301):
        state, metrics = step(state, (x, y))
        if i % 50 == 0:
            print(f"step {i:4d}  loss {float(metrics['loss']):.4f}")


if __name__ == "__main__":
    main()
