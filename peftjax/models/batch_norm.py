"""Batch normalisation with PyTorch's semantics, for checkpoints trained in PyTorch.

``nnx.BatchNorm`` normalises a batch the way ``torch.nn.BatchNorm2d`` does, but
updates its running variance with the biased batch variance; PyTorch uses the
unbiased one::

    running_mean <- (1 - m) running_mean + m mean(x)
    running_var  <- (1 - m) running_var  + m var(x) n / (n - 1)

with momentum m = 0.1 and n the number of values per channel (batch x height
x width). After a few training steps on small batches the two drift apart by
far more than float32 rounding, so a model that must track the reference's
running statistics (and save checkpoints transformers reads back) needs this
update. ``BatchNorm`` is a subclass of ``nnx.BatchNorm``: ``model.train()`` /
``model.eval()`` and everything that recognises batch-norm layers by type
treat it as one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

TORCH_MOMENTUM = 0.1
TORCH_EPSILON = 1e-5


class BatchNorm(nnx.BatchNorm):
    """``torch.nn.BatchNorm2d`` on the last (channel) axis, PyTorch's update included.

    Variables: ``scale`` and ``bias`` (``Param``; the checkpoint's ``weight`` and
    ``bias``), ``mean`` and ``var`` (``BatchStat``; ``running_mean`` and
    ``running_var``) and ``num_batches_tracked`` (``BatchStat``, an int32
    count of the updates, kept so that checkpoints round-trip).
    Statistics are computed in float32 whatever the compute dtype.
    """

    def __init__(
        self,
        num_features: int,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            num_features,
            momentum=1.0 - TORCH_MOMENTUM,
            epsilon=TORCH_EPSILON,
            dtype=dtype,
            param_dtype=param_dtype,
            use_fast_variance=False,
            rngs=rngs,
        )
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
        if mask is not None:
            raise NotImplementedError("BatchNorm with PyTorch's update takes no mask")
        if use_running_average is None:
            use_running_average = self.use_running_average
        x32 = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        if use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            mean = x32.mean(axes)
            var = jnp.square(x32 - mean).mean(axes)  # two-pass, as torch computes it
            count = x32.size // x32.shape[-1]
            if count < 2:
                raise ValueError(
                    f"BatchNorm in training mode needs more than one value per channel, got input shape "
                    f"{x.shape}: use a larger batch or images, or call model.eval() first."
                )
            unbiased = var * (count / (count - 1))
            momentum = 1.0 - self.momentum
            # The running statistics are never differentiated.
            self.mean[...] = jax.lax.stop_gradient((1 - momentum) * self.mean[...] + momentum * mean)
            self.var[...] = jax.lax.stop_gradient((1 - momentum) * self.var[...] + momentum * unbiased)
            self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)
