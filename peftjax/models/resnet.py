"""ResNet image classifier (He et al. 2016) in Flax NNX, laid out like transformers'.

Module paths are the checkpoints' names (``microsoft/resnet-50`` and
transformers' own ``save_pretrained``): the stem ``resnet.embedder.embedder``
(a 7x7 stride-2 ``convolution`` and its ``normalization``, then a 3x3 stride-2
max pool), stages ``resnet.encoder.stages.S.layers.L`` whose residual layers
hold ``layer.K`` (convolution + batch norm + activation) and, where the
shape changes, a ``shortcut`` (1x1 convolution + batch norm), global average
pooling, and the head ``classifier.1`` (index 0 is transformers' parameterless
``Flatten``). ``layer_type="basic"`` builds ResNet-18/34's two 3x3
convolutions per layer, ``"bottleneck"`` ResNet-50's 1x1 / 3x3 / 1x1.

Inputs are ``pixel_values`` (batch, channels, height, width) as image
processors produce them; the network runs channels-last internally.
``last_hidden_state`` is returned channels-first, as transformers returns it,
and ``pooler_output`` as (batch, channels) (transformers keeps two trailing
axes of size 1). Batch norm follows PyTorch's update rule
(``peftjax.models.batch_norm``), so running statistics match the reference in
training mode too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models import common
from peftjax.models.batch_norm import BatchNorm
from peftjax.models.common import Array, ModelOutput

LAYER_TYPES = ("basic", "bottleneck")
BOTTLENECK_REDUCTION = 4  # a bottleneck's inner width is its output width / 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResNetConfig:
    """Hyper-parameters of a ResNet (transformers' field names).

    ``hidden_sizes[s]`` and ``depths[s]`` are stage s's output channels and
    number of residual layers. ``remat`` recomputes each residual layer's
    activations in the backward pass.
    """

    model_type: str = "resnet"
    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[int, ...] = (3, 4, 6, 3)
    layer_type: str = "bottleneck"
    hidden_act: str = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    num_labels: int = 2
    label_names: tuple[str, ...] = ()
    remat: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_sizes", tuple(self.hidden_sizes))
        object.__setattr__(self, "depths", tuple(self.depths))
        common.require_choice(self, "model_type", ("resnet",))
        common.require_choice(self, "layer_type", LAYER_TYPES)
        common.require_choice(self, "hidden_act", common.ACTIVATIONS)
        common.require_positive(self, "num_channels", "embedding_size")
        common.require_labels(self)
        for name in ("hidden_sizes", "depths"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
                raise ValueError(f"ResNetConfig.{name} must be a non-empty list of positive integers, got {values!r}.")
        if len(self.hidden_sizes) != len(self.depths):
            raise ValueError(
                f"ResNetConfig.hidden_sizes has {len(self.hidden_sizes)} stages but depths has "
                f"{len(self.depths)}; give one output width and one depth per stage."
            )
        if self.layer_type == "bottleneck" and min(self.hidden_sizes) < BOTTLENECK_REDUCTION:
            raise ValueError(
                f"ResNetConfig.hidden_sizes={self.hidden_sizes!r}: bottleneck layers need at least "
                f"{BOTTLENECK_REDUCTION} channels per stage (their inner width is a quarter of it)."
            )

    @property
    def base_model_prefix(self) -> str:
        return "resnet"

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> ResNetConfig:
        """Builds a config from a transformers ResNet ``config.json`` dict."""
        fields = common.known_fields(cls, d)
        fields.pop("label_names", None)
        fields.pop("num_labels", None)
        fields.update(common.labels_from_hf(d))
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("label_names", "num_labels", "remat"):
            d.pop(name)
        d["hidden_sizes"], d["depths"] = list(self.hidden_sizes), list(self.depths)
        d.update(common.labels_to_hf(self))
        return d


# transformers' ``_init_weights``: convolutions kaiming_normal(fan_out, relu); the
# head as torch's ``nn.Linear`` resets itself, U(+-1/sqrt(fan_in)) for weight and bias.
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
_LINEAR_KERNEL_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _linear_bias_init(fan_in: int) -> nnx.Initializer:
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class ResNetConvLayer(nnx.Module):
    """``convolution`` (no bias, "same"-style padding k // 2), ``normalization``, activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        activation: str | None = "relu",
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        pad = kernel_size // 2
        self.convolution = nnx.Conv(
            in_channels,
            out_channels,
            kernel_size=(kernel_size, kernel_size),
            strides=(stride, stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            kernel_init=_CONV_INIT,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.normalization = BatchNorm(out_channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.activation = activation

    def __call__(self, x_bhwc: Array) -> Array:
        x_bhwc = self.normalization(self.convolution(x_bhwc))
        return common.activation(self.activation)(x_bhwc) if self.activation else x_bhwc


class ResNetEmbeddings(nnx.Module):
    """The stem: ``embedder`` (7x7, stride 2) then a 3x3 stride-2 max pool."""

    def __init__(self, config: ResNetConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_channels = config.num_channels
        self.embedder = ResNetConvLayer(
            config.num_channels, config.embedding_size, kernel_size=7, stride=2, activation=config.hidden_act,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip

    def __call__(self, pixel_values_bchw: Array) -> Array:
        if pixel_values_bchw.ndim != 4 or pixel_values_bchw.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values have shape {tuple(pixel_values_bchw.shape)}; this model expects "
                f"(batch, {self.num_channels}, height, width) in channels-first layout."
            )
        x_bhwc = self.embedder(jnp.transpose(pixel_values_bchw, (0, 2, 3, 1)))
        # -inf padding, as torch's MaxPool2d(kernel_size=3, stride=2, padding=1).
        return nnx.max_pool(x_bhwc, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResNetShortCut(nnx.Module):
    """Projects the residual to the layer's output width (and stride): 1x1 conv + batch norm."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, dtype, param_dtype, rngs: nnx.Rngs):
        self.convolution = nnx.Conv(
            in_channels,
            out_channels,
            kernel_size=(1, 1),
            strides=(stride, stride),
            padding="VALID",
            use_bias=False,
            kernel_init=_CONV_INIT,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.normalization = BatchNorm(out_channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_bhwc: Array) -> Array:
        return self.normalization(self.convolution(x_bhwc))


class ResNetResidualLayer(nnx.Module):
    """act(layer(x) + shortcut(x)); ``layer`` is the basic or bottleneck stack of conv layers.

    The shortcut is the identity (``None``, no parameters) when the input
    already has the output's width and resolution.
    """

    def __init__(
        self, config: ResNetConfig, in_channels: int, out_channels: int, *, stride: int, dtype, param_dtype,
        rngs: nnx.Rngs,
    ):  # fmt: skip
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.shortcut = (
            ResNetShortCut(in_channels, out_channels, stride=stride, **kwargs)
            if in_channels != out_channels or stride != 1
            else None
        )
        if config.layer_type == "basic":
            convs = [
                ResNetConvLayer(in_channels, out_channels, stride=stride, **kwargs),
                ResNetConvLayer(out_channels, out_channels, activation=None, **kwargs),
            ]
        else:
            inner = out_channels // BOTTLENECK_REDUCTION
            first_stride, middle_stride = (stride, 1) if config.downsample_in_bottleneck else (1, stride)
            convs = [
                ResNetConvLayer(in_channels, inner, kernel_size=1, stride=first_stride, **kwargs),
                ResNetConvLayer(inner, inner, stride=middle_stride, **kwargs),
                ResNetConvLayer(inner, out_channels, kernel_size=1, activation=None, **kwargs),
            ]
        self.layer = nnx.List(convs)
        self.activation = config.hidden_act

    def __call__(self, x_bhwc: Array) -> Array:
        residual_bhwc = self.shortcut(x_bhwc) if self.shortcut is not None else x_bhwc
        for conv in self.layer:
            x_bhwc = conv(x_bhwc)
        return common.activation(self.activation)(x_bhwc + residual_bhwc)


class ResNetStage(nnx.Module):
    """``layers``: a stage's residual layers; the first one changes width and stride."""

    def __init__(
        self, config: ResNetConfig, in_channels: int, out_channels: int, *, stride: int, depth: int, dtype,
        param_dtype, rngs: nnx.Rngs,
    ):  # fmt: skip
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.remat = config.remat
        self.layers = nnx.List(
            [ResNetResidualLayer(config, in_channels, out_channels, stride=stride, **kwargs)]
            + [ResNetResidualLayer(config, out_channels, out_channels, stride=1, **kwargs) for _ in range(depth - 1)]
        )

    def __call__(self, x_bhwc: Array) -> Array:
        return common.run_layers(self.layers, x_bhwc, remat=self.remat)


class ResNetEncoder(nnx.Module):
    """``stages``: every stage but the first halves the resolution."""

    def __init__(self, config: ResNetConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        widths = (config.embedding_size, *config.hidden_sizes)
        strides = (2 if config.downsample_in_first_stage else 1,) + (2,) * (len(config.depths) - 1)
        self.stages = nnx.List(
            [
                ResNetStage(
                    config, widths[s], widths[s + 1], stride=strides[s], depth=config.depths[s],
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                )  # fmt: skip
                for s in range(len(config.depths))
            ]
        )

    def __call__(self, x_bhwc: Array) -> Array:
        for stage in self.stages:
            x_bhwc = stage(x_bhwc)
        return x_bhwc


def _stage_groups(config: ResNetConfig, prefix: str) -> tuple[tuple[str, str], ...]:
    groups = [("stem", f"{prefix}embedder")]
    groups += [(f"stage{s + 1}", f"{prefix}encoder.stages.{s}") for s in range(len(config.depths))]
    return tuple(groups)


class ResNetModel(nnx.Module):
    """The bare ResNet: ``embedder`` (stem), ``encoder`` (stages), global average pooling."""

    output_head_names: ClassVar[tuple[str, ...]] = ()
    hf_architecture_suffix: ClassVar[str] = "Model"

    def __init__(
        self,
        config: ResNetConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embedder = ResNetEmbeddings(config, **kwargs)
        self.encoder = ResNetEncoder(config, **kwargs)

    def get_input_embeddings(self) -> None:
        """ResNet has no token embedding table."""
        return None

    def layer_groups(self) -> tuple[tuple[str, str], ...]:
        """The ordered groups, input to output, as (name, module path): the stem, then
        ``stage1`` ... ``stageN``. A parameter belongs to the group whose module path
        its own path starts with."""
        return _stage_groups(self.config, "")

    def __call__(self, pixel_values: Array) -> ModelOutput:
        x_bhwc = self.encoder(self.embedder(pixel_values))
        pooled_bc = x_bhwc.mean(axis=(1, 2))
        return ModelOutput(last_hidden_state=jnp.transpose(x_bhwc, (0, 3, 1, 2)), pooler_output=pooled_bc)


class ResNetForImageClassification(nnx.Module):
    """ResNet plus a linear head on the pooled features (``classifier.1``)."""

    output_head_names: ClassVar[tuple[str, ...]] = ("classifier",)
    hf_architecture_suffix: ClassVar[str] = "ForImageClassification"

    def __init__(
        self,
        config: ResNetConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.resnet = ResNetModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        features = config.hidden_sizes[-1]
        head = nnx.Linear(
            features,
            config.num_labels,
            kernel_init=_LINEAR_KERNEL_INIT,
            bias_init=_linear_bias_init(features),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.classifier = nnx.List([None, head])  # transformers' Sequential(Flatten(), Linear)

    def get_input_embeddings(self) -> None:
        return None

    def layer_groups(self) -> tuple[tuple[str, str], ...]:
        """The ordered groups, input to output, as (name, module path): ``stem``,
        ``stage1`` ... ``stageN``, ``head``. A parameter belongs to the group whose
        module path its own path starts with."""
        return (*_stage_groups(self.config, "resnet."), ("head", "classifier"))

    def __call__(self, pixel_values: Array) -> ModelOutput:
        out = self.resnet(pixel_values)
        return out.replace(logits=self.classifier[1](out.pooler_output))


__all__ = ["ResNetConfig", "ResNetModel", "ResNetForImageClassification"]
