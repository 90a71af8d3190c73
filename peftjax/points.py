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
``BranchOutput``       ``point(out_btd, residual_btd, norm)``: a        the new ``out_btd``
                                              residual branch's output before the residual add,
                                              the residual stream it is added to, and the
                                              LayerNorm applied after the add (post-LN models
                                              such as BERT; None for pre-LN ones)
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

An ``AttentionKeyValue`` point that prepends keys says how many in
``num_prefix_positions``. Text models then number their tokens from there,
N, N + 1, ..., as a KV cache of N positions would (HF PEFT feeds prefix
tuning's prefixes as one): absolute position embeddings and RoPE count from
N, and position ids a caller passes are shifted by N. ViT's positions belong
to its patches and do not move.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
from flax import nnx

from peftjax.errors import PeftError


class InsertionPoint(nnx.Module):
    """Base type of every insertion point: methods select points by this type."""


class BranchOutput(InsertionPoint):
    """A residual branch's output (after attention or after the MLP)."""

    def __call__(self, out_btd: jax.Array, residual_btd: jax.Array, norm: nnx.Module | None) -> jax.Array:
        del residual_btd, norm  # adapters read them; the identity does not
        return out_btd


class AttentionKeyValue(InsertionPoint):
    """Attention keys and values, where prefix tuning prepends its prefixes.

    ``num_prefix_positions``: how many key positions the point puts before the
    tokens' own (none here; a wrapper that prepends reports its count).
    """

    num_prefix_positions = 0

    def __call__(self, k_bsnh: jax.Array, v_bsnh: jax.Array, mask_bs: jax.Array):
        return k_bsnh, v_bsnh, mask_bs


class InputEmbeddings(InsertionPoint):
    """Input embeddings, where prompt tuning prepends its virtual tokens."""

    def __call__(self, x_btd: jax.Array, mask_bt: jax.Array):
        return x_btd, mask_bt


def prefix_positions(points: Iterable[nnx.Module]) -> int:
    """The first position of the tokens: the number of key positions the
    ``AttentionKeyValue`` points put before them, which every point that
    prepends any must agree on."""
    counts = {point.num_prefix_positions for point in points} - {0}
    if len(counts) > 1:
        raise PeftError(
            f"the attention layers prepend different numbers of key positions {sorted(counts)}, so the tokens' "
            "positions are ambiguous; give every prefix-tuned layer the same num_virtual_tokens"
        )
    return counts.pop() if counts else 0
