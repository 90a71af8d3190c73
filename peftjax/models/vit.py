"""Vision Transformer (ViT) image classifier in Flax NNX.

Module paths follow the Hugging Face checkpoints (``vit.embeddings.
patch_embeddings.projection``, ``vit.encoder.layer.N.attention.attention.query``,
``...attention.output.dense``, ``...intermediate.dense``, ``...output.dense``,
``layernorm_before``/``layernorm_after``, ``vit.layernorm``, ``classifier``),
which is the layout checkpoints on the Hub and transformers' own
``save_pretrained`` use, even though transformers 5 renames its in-memory
modules. Inputs are ``pixel_values`` (batch, channels, height, width) as image
processors produce them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax.numpy as jnp
from flax import nnx

from peftjax.models import common
from peftjax.models.bert import BertIntermediate, BertSelfAttention
from peftjax.models.common import Array, ModelOutput
from peftjax.points import BranchOutput, InputEmbeddings


# transformers 5's in-memory names of ViT's modules, from the checkpoint's: its conversion_mapping's
# "ViTModel" renames, in order. HF PEFT's target_modules and adapter keys name modules this way.
HF_MODULE_RENAMES = (
    (r"encoder\.layer\.", "layers."),
    (r"attention\.query", "q_proj"),
    (r"attention\.key", "k_proj"),
    (r"attention\.value", "v_proj"),
    (r"attention\.output\.dense", "attention.o_proj"),
    (r"intermediate\.dense", "mlp.fc1"),
    (r"output\.dense", "mlp.fc2"),
)


def _square(name: str, value: Any) -> int:
    """transformers allows (h, w) pairs; peftjax supports square images/patches."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"ViTConfig.{name}={value!r}: only square sizes are supported.")
        return int(value[0])
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTConfig:
    """Hyper-parameters of a ViT (transformers' field names; square images)."""

    model_type: str = "vit"
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    encoder_stride: int = 16
    pooler_output_size: int | None = None
    pooler_act: str = "tanh"
    num_labels: int = 2
    label_names: tuple[str, ...] = ()
    remat: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", _square("image_size", self.image_size))
        object.__setattr__(self, "patch_size", _square("patch_size", self.patch_size))
        if self.pooler_output_size is None:
            object.__setattr__(self, "pooler_output_size", self.hidden_size)
        common.require_choice(self, "model_type", ("vit",))
        common.require_positive(
            self,
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "image_size",
            "patch_size",
            "num_channels",
            "pooler_output_size",
        )
        common.require_probability(self, "hidden_dropout_prob", "attention_probs_dropout_prob")
        common.require_choice(self, "hidden_act", common.ACTIVATIONS)
        common.require_choice(self, "pooler_act", common.ACTIVATIONS)
        common.require_labels(self)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"ViTConfig.hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads}."
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ViTConfig.image_size={self.image_size} must be a multiple of "
                f"patch_size={self.patch_size}."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def base_model_prefix(self) -> str:
        return "vit"

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> ViTConfig:
        """Builds a config from a transformers ViT ``config.json`` dict."""
        fields = common.known_fields(cls, d)
        fields.pop("label_names", None)
        fields.pop("num_labels", None)
        fields.update(common.labels_from_hf(d))
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("label_names", "num_labels", "remat"):
            d.pop(name)
        d.update(common.labels_to_hf(self))
        return d


class ViTPatchEmbeddings(nnx.Module):
    """Non-overlapping patches projected to the hidden size by a strided conv."""

    def __init__(self, config: ViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.config = config
        patch = config.patch_size
        self.projection = nnx.Conv(
            config.num_channels,
            config.hidden_size,
            kernel_size=(patch, patch),
            strides=(patch, patch),
            padding="VALID",
            kernel_init=common.normal_init(config.initializer_range),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, pixel_values_bchw: Array) -> Array:
        _, channels, height, width = pixel_values_bchw.shape
        size = self.config.image_size
        if channels != self.config.num_channels or (height, width) != (size, size):
            raise ValueError(
                f"pixel_values_bchw has (channels, height, width)=({channels}, {height}, {width}); this "
                f"ViT expects ({self.config.num_channels}, {size}, {size}) (ViTConfig.num_channels, image_size). "
                "The model takes (batch, channels, height, width) as transformers does; peftjax's image "
                "loaders give (batch, height, width, channels), which the train step transposes, and resize "
                "to data.image_size (by default the model's)."
            )
        x_bhwc = jnp.transpose(pixel_values_bchw, (0, 2, 3, 1))
        x_bhwd = self.projection(x_bhwc)
        return x_bhwd.reshape(x_bhwd.shape[0], -1, x_bhwd.shape[-1])


class ViTEmbeddings(nnx.Module):
    """[CLS] + patch embeddings + learned positions, then dropout.

    ``input_embeddings`` sees the sequence after positions are added, so
    positions a method prepends carry no position embedding.
    """

    def __init__(self, config: ViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.truncated_normal(stddev=config.initializer_range)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, config.hidden_size), param_dtype))
        self.position_embeddings = nnx.Param(
            init(rngs.params(), (1, config.num_patches + 1, config.hidden_size), param_dtype)
        )
        self.patch_embeddings = ViTPatchEmbeddings(
            config, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)
        self.input_embeddings = InputEmbeddings()

    def __call__(self, pixel_values_bchw: Array) -> tuple[Array, Array]:
        x_bpd = self.patch_embeddings(pixel_values_bchw)
        batch, _, hidden = x_bpd.shape
        cls_b1d = jnp.broadcast_to(self.cls_token[...], (batch, 1, hidden)).astype(x_bpd.dtype)
        x_btd = jnp.concatenate([cls_b1d, x_bpd], axis=1)
        x_btd = x_btd + self.position_embeddings[...].astype(x_btd.dtype)
        mask_bt = jnp.ones(x_btd.shape[:2], dtype=bool)
        x_btd, mask_bt = self.input_embeddings(x_btd, mask_bt)
        return self.dropout(x_btd), mask_bt


class ViTOutput(nnx.Module):
    """A branch's projection back to the hidden size and dropout (the residual is the layer's).

    It closes both branches: ``attention.output`` projects the attention heads
    (``din`` = hidden size), ``output`` the MLP's hidden units (``din`` =
    intermediate size).
    """

    def __init__(self, config: ViTConfig, din: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dense = common.linear(config, din, config.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, h_btf: Array) -> Array:
        return self.dropout(self.dense(h_btf))


class ViTAttention(nnx.Module):
    """``attention`` (the attention proper) and ``output`` (its projection)."""

    def __init__(self, config: ViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention = BertSelfAttention(config, bias=config.qkv_bias, **kwargs)
        self.output = ViTOutput(config, config.hidden_size, **kwargs)

    def __call__(self, x_btd: Array, mask_bt: Array) -> Array:
        return self.output(self.attention(x_btd, mask_bt))


class ViTLayer(nnx.Module):
    """Pre-norm block; its points see each branch's output and the residual stream it joins."""

    def __init__(self, config: ViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention = ViTAttention(config, **kwargs)
        self.intermediate = BertIntermediate(config, **kwargs)
        self.output = ViTOutput(config, config.intermediate_size, **kwargs)
        self.layernorm_before = common.layer_norm(config, **kwargs)
        self.layernorm_after = common.layer_norm(config, **kwargs)
        self.after_attention = BranchOutput()
        self.after_mlp = BranchOutput()

    def __call__(self, x_btd: Array, mask_bt: Array) -> Array:
        h_btd = self.layernorm_before(x_btd)
        x_btd = x_btd + self.after_attention(self.attention(h_btd, mask_bt), x_btd, None)
        h_btd = self.layernorm_after(x_btd)
        out_btd = self.output(self.intermediate(h_btd))
        return x_btd + self.after_mlp(out_btd, x_btd, None)


class ViTModel(nnx.Module):
    """The bare ViT: ``embeddings``, ``encoder``, final ``layernorm``, optional ``pooler``."""

    output_head_names: ClassVar[tuple[str, ...]] = ()
    hf_architecture_suffix: ClassVar[str] = "Model"
    hf_module_renames: ClassVar[tuple[tuple[str, str], ...]] = HF_MODULE_RENAMES

    def __init__(
        self,
        config: ViTConfig,
        *,
        add_pooling_layer: bool = True,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = ViTEmbeddings(config, **kwargs)
        self.encoder = common.Encoder(config, ViTLayer, **kwargs)
        self.layernorm = common.layer_norm(config, **kwargs)
        self.pooler = (
            common.Pooler(config, config.pooler_output_size, config.pooler_act, **kwargs) if add_pooling_layer else None
        )

    def get_input_embeddings(self) -> None:
        """ViT has no token embedding table."""
        return None

    def __call__(self, pixel_values: Array) -> ModelOutput:
        x_btd, mask_bt = self.embeddings(pixel_values)
        extra = common.num_prepended(x_btd, self.config.num_patches + 1)
        x_btd = self.layernorm(self.encoder(x_btd, mask_bt))[:, extra:]
        pooled_bd = self.pooler(x_btd) if self.pooler is not None else None
        return ModelOutput(last_hidden_state=x_btd, pooler_output=pooled_bd)


class ViTForImageClassification(common.ModelWithHead):
    """ViT plus a linear ``classifier`` on the final [CLS] state."""

    base_model_class: ClassVar[type[nnx.Module]] = ViTModel
    output_head_names: ClassVar[tuple[str, ...]] = ("classifier",)
    hf_architecture_suffix: ClassVar[str] = "ForImageClassification"
    hf_module_renames: ClassVar[tuple[tuple[str, str], ...]] = HF_MODULE_RENAMES

    def _base_options(self, config: ViTConfig) -> dict[str, Any]:
        return {"add_pooling_layer": False}

    def _init_head(self, config: ViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
        self.classifier = common.linear(
            config, config.hidden_size, config.num_labels, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, pixel_values: Array) -> ModelOutput:
        out = self.vit(pixel_values)
        return out.replace(logits=self.classifier(out.last_hidden_state[:, 0]))


__all__ = ["ViTConfig", "ViTModel", "ViTForImageClassification"]
