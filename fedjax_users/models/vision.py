"""Flax versions of breaching's CIFAR-size vision models (the ResNets are in ``resnets.py``).

Each model reproduces the layer order, shapes, padding, strides, pooling, activations and bias
flags of its PyTorch counterpart in breaching's ``model_preparation.py`` / ``resnets.py``.
Submodule names mirror the torch module paths (``body.0``, ``layers.1.0.downsample.1``, ...), so
``fedjax_users.interop`` maps weights by name. Inputs are NHWC.

All models follow the package's model contract: ``__call__(x, train=False, mask=None,
momentum=0.1)``; ``mask`` and ``momentum`` go to every BatchNorm layer, models without BatchNorm
ignore them. Initialisers are Flax's defaults except where the torch model's own initialisation
is part of its identity (LeNetZhu's uniform init, which gradient-inversion attacks rely on).

Every model and submodule takes ``dtype`` (computation) and ``param_dtype`` (parameters), passed
to each of its layers; ``None`` (the default) keeps the layers' own defaults
(``fedjax_users.models.dtypes``).
"""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_users.batchnorm import BatchNorm
from fedjax_users.models.dtypes import Dtype, layer_dtypes

Array = jax.Array
Momentum = Optional[float]  # None: PyTorch's cumulative running average


def torch_conv(
    features: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    use_bias: bool = True,
    **kwargs,
) -> nn.Conv:
    """A ``torch.nn.Conv2d`` look-alike: square kernel, explicit symmetric zero padding."""
    # Explicit padding, not 'SAME': for even kernels or strides 'SAME' pads asymmetrically.
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=[(padding, padding), (padding, padding)],
        use_bias=use_bias,
        **kwargs,
    )


def flatten_channel_major(x: Array) -> Array:
    """Flatten NHWC features in torch's NCHW order.

    Flattening in torch's order makes the following Dense kernel a plain transpose of torch's
    ``Linear.weight``, so weights (and gradients) convert without reindexing.
    """
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def torch_max_pool(x: Array, window: int) -> Array:
    """``torch.nn.MaxPool2d(window)``: stride = window, no padding, incomplete windows dropped."""
    return nn.max_pool(x, (window, window), strides=(window, window), padding="VALID")


def global_avg_pool(x: Array) -> Array:
    """``torch.nn.AdaptiveAvgPool2d(1)`` followed by flatten: mean over height and width."""
    return jnp.mean(x, axis=(1, 2))


def symmetric_uniform(limit: float) -> Callable:
    """Initialiser drawing from U(-limit, limit)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


class VisionModel(nn.Module):
    """Fields every vision model has; ``num_channels`` guards against NCHW inputs."""

    num_classes: int = 10
    num_channels: int = 3
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @property
    def dtypes(self) -> dict[str, Dtype]:
        """``dtype`` / ``param_dtype`` as keyword arguments for this model's layers (the set ones)."""
        return layer_dtypes(self.dtype, self.param_dtype)

    def check_inputs(self, x: Array) -> Array:
        """Reject inputs that are not NHWC images with ``num_channels`` channels."""
        # An NCHW batch passed by mistake would otherwise run (convs infer their input width).
        if x.ndim != 4 or x.shape[-1] != self.num_channels:
            raise ValueError(
                f"{type(self).__name__} expects NHWC images with {self.num_channels} channels, "
                f"got shape {x.shape}"
            )
        return x


class Linear(VisionModel):
    """breaching ``linear``: ``Sequential(Flatten, Linear)``, the Linear at index 1."""

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Momentum = 0.1
    ) -> Array:
        x = flatten_channel_major(self.check_inputs(x))
        return nn.Dense(self.num_classes, name="1", **self.dtypes)(x)


class MLP(VisionModel):
    """breaching ``MLP``: three ReLU layers of ``width`` units (torch fixes the input to 3072)."""

    width: int = 1024

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Momentum = 0.1
    ) -> Array:
        x = flatten_channel_major(self.check_inputs(x))
        for index in range(3):
            x = nn.relu(nn.Dense(self.width, name=f"linear{index}", **self.dtypes)(x))
        return nn.Dense(self.num_classes, name="linear3", **self.dtypes)(x)


class _LeNetBody(nn.Module):
    """``LeNetZhu.body``: three 5x5 sigmoid convs at Sequential indices 0, 2 and 4."""

    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = symmetric_uniform(0.5)
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        for index, stride in (("0", 2), ("2", 2), ("4", 1)):
            conv = torch_conv(12, 5, stride, 2, name=index, kernel_init=init, bias_init=init, **dtypes)
            x = nn.sigmoid(conv(x))
        return x


class _LeNetHead(nn.Module):
    """``LeNetZhu.fc``: a Sequential holding one Linear at index 0."""

    num_classes: int
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = symmetric_uniform(0.5)
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        return nn.Dense(self.num_classes, name="0", kernel_init=init, bias_init=init, **dtypes)(x)


class LeNetZhu(VisionModel):
    """breaching ``lenet_zhu`` (the DLG LeNet): sigmoid convs, one Linear on 768 features."""

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Momentum = 0.1
    ) -> Array:
        x = _LeNetBody(name="body", **self.dtypes)(self.check_inputs(x))
        return _LeNetHead(self.num_classes, name="fc", **self.dtypes)(flatten_channel_major(x))


class ConvNetSmall(VisionModel):
    """breaching ``ConvNetSmall``: four ReLU convs, no BatchNorm, global average pooling."""

    width: int = 256

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Momentum = 0.1
    ) -> Array:
        x = self.check_inputs(x)
        w = self.width
        x = nn.relu(torch_conv(w, 3, 1, 1, name="conv0", **self.dtypes)(x))
        x = nn.relu(torch_conv(2 * w, 3, 1, 1, name="conv1", **self.dtypes)(x))
        x = nn.relu(torch_conv(4 * w, 3, 2, 1, name="conv2", **self.dtypes)(x))
        x = torch_max_pool(x, 3)
        x = nn.relu(torch_conv(4 * w, 3, 2, 1, name="conv3", **self.dtypes)(x))
        return nn.Dense(self.num_classes, name="linear", **self.dtypes)(global_avg_pool(x))


# ConvNet's conv widths as multiples of ``width``; "pool" is a MaxPool2d(3) (torch: pool0, pool1).
_CONVNET_LAYERS = (1, 2, 2, 4, 4, 4, "pool", 4, 4, "pool")


class ConvNet(VisionModel):
    """breaching ``ConvNet``: eight conv-BatchNorm-ReLU layers, two max pools, one Linear."""

    width: int = 64

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Momentum = 0.1
    ) -> Array:
        x = self.check_inputs(x)
        conv_index = 0
        for layer in _CONVNET_LAYERS:
            if layer == "pool":
                x = torch_max_pool(x, 3)
                continue
            x = torch_conv(layer * self.width, 3, 1, 1, name=f"conv{conv_index}", **self.dtypes)(x)
            x = BatchNorm(name=f"bn{conv_index}", **self.dtypes)(x, train, mask, momentum)
            x = nn.relu(x)
            conv_index += 1
        return nn.Dense(self.num_classes, name="linear", **self.dtypes)(flatten_channel_major(x))


# cnn6 (the R-GAP model): (features, kernel, stride, padding) of layer0 .. layer5, all bias-free.
_CNN6_LAYERS = (
    (12, 4, 2, 2), (36, 3, 2, 1), (36, 3, 1, 1), (36, 3, 1, 1), (64, 3, 2, 1), (128, 3, 1, 1)
)


class CNN6(VisionModel):
    """breaching ``cnn6``: six bias-free convs with LeakyReLU(0.2) in between, one Linear."""

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Momentum = 0.1
    ) -> Array:
        x = self.check_inputs(x)
        for index, (features, kernel, stride, padding) in enumerate(_CNN6_LAYERS):
            if index > 0:
                x = nn.leaky_relu(x, negative_slope=0.2)
            name = f"layer{index}"
            x = torch_conv(features, kernel, stride, padding, use_bias=False, name=name, **self.dtypes)(x)
        # torch applies the last activation after Flatten; it is elementwise, so the order is moot.
        x = nn.leaky_relu(flatten_channel_major(x), negative_slope=0.2)
        return nn.Dense(self.num_classes, name="fc", **self.dtypes)(x)


# breaching's names -> constructors, called as ``constructor(num_classes=..., num_channels=...)``
# and optionally ``dtype=`` / ``param_dtype=``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "linear": Linear,
    "MLP": MLP,
    "lenet_zhu": LeNetZhu,
    "ConvNetSmall": ConvNetSmall,
    "ConvNet": ConvNet,
    "cnn6": CNN6,
}
