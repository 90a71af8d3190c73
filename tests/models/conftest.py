"""The models' lean backward passes switched back to JAX's own differentiation."""

import functools

import jax
import pytest
from flax import nnx

from peftjax.models import common, lean_backward


@pytest.fixture
def differentiated_by_jax(monkeypatch):
    """Call it to have JAX differentiate the forward operations of ``lean_backward``'s
    GELU, LayerNorm, RMSNorm and attention (``explicit_attention``) until the test ends."""

    def switch() -> None:
        monkeypatch.setitem(common.ACTIVATIONS, "gelu", functools.partial(jax.nn.gelu, approximate=False))
        monkeypatch.setattr(lean_backward.LayerNorm, "__call__", nnx.LayerNorm.__call__)
        monkeypatch.setattr(lean_backward.RMSNorm, "__call__", nnx.RMSNorm.__call__)
        monkeypatch.setattr(common, "dot_product_attention", common.explicit_attention)

    return switch
