"""Named insertion points: where reference models let adapter methods in.

A model places an insertion point where a method may change the computation
(after the attention branch, after the MLP branch, at the attention keys and
values, at the input embeddings). Each point is an identity module with no
parameters, so a model with no adapters computes exactly what it would without
them. Adapter methods wrap a point the same way LoRA wraps a linear layer: the
injection engine finds points by their dotted path and type.

Every point is called with the same arguments by every model, so one adapter
implementation serves BERT, Llama and ViT alike:

=====================  ===============================================  ==========================
point                  called as                                        returns
=====================  ===============================================  ==========================
``BranchOutput``       ``point(out_btd, in_btd)``: a residual branch's  the new ``out_btd``
                                              output before the residual add, and its input
``AttentionKeyValue``  ``point(k_bsnh, v_bsnh, mask_bs)``: keys and     ``(k, v, mask)`` with any
                                              values after projection (and RoPE), and the      extra positions prepended
                                              boolean key mask (True = attend)
``InputEmbeddings``    ``point(x_btd, mask_bt)``: token (or patch)      ``(x, mask)`` with any
                                              embeddings and the boolean input mask            extra positions prepended
=====================  ===============================================  ==========================

Models that call ``InputEmbeddings`` keep their outputs aligned with the
caller's tokens: the number of prepended positions is ``x.shape[1] -
input_len``; classification pools at the original position shifted by it and
token-level outputs drop the prepended positions. Attention that meets a
longer key sequence than query sequence treats the extra keys as a visible
prefix (the causal mask is offset by ``kv_len - q_len``).
"""

from __future__ import annotations

import jax
from flax import nnx


class InsertionPoint(nnx.Module):
    """Base type of every insertion point: methods select points by this type."""


class BranchOutput(InsertionPoint):
    """A residual branch's output (after attention or after the MLP)."""

    def __call__(self, out_btd: jax.Array, in_btd: jax.Array) -> jax.Array:
        del in_btd  # parallel adapters read it; the identity does not
        return out_btd


class AttentionKeyValue(InsertionPoint):
    """Attention keys and values, where prefix tuning prepends its prefixes."""

    def __call__(self, k_bsnh: jax.Array, v_bsnh: jax.Array, mask_bs: jax.Array):
        return k_bsnh, v_bsnh, mask_bs


class InputEmbeddings(InsertionPoint):
    """Input embeddings, where prompt tuning prepends its virtual tokens."""

    def __call__(self, x_btd: jax.Array, mask_bt: jax.Array):
        return x_btd, mask_bt
