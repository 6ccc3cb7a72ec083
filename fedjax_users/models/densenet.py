"""DenseNet-BC in Flax: breaching's CIFAR ``DenseNet121/161/169/201`` and torchvision's ``densenet121..201``.

breaching's ``densenets.py`` is torchvision's DenseNet with other stems; ``model_preparation.py``
builds it with ``stem="CIFAR"`` (a single bias-free 3x3 conv, no norm, no pooling), ``bn_size=4``,
``drop_rate=0``, BatchNorm and ReLU. torchvision's (breaching's ImageNet data) has the 7x7
stride-2 stem with BatchNorm, ReLU and a 3x3 stride-2 max pool. Both then run the same dense
blocks (each layer: BatchNorm-ReLU-1x1 conv to ``bn_size * growth_rate`` channels,
BatchNorm-ReLU-3x3 conv to ``growth_rate``, its output concatenated to its input), transitions
(BatchNorm-ReLU-1x1 conv halving the channels, 2x2 average pool), a final BatchNorm, ReLU,
global average pool and one Linear. Layer names are torch's (``features.denseblock1.denselayer1.
norm1``, ``features.transition1.conv``, ``features.norm5``, ``classifier``), so
``fedjax_users.interop`` pairs the weights by name.

Convolutions start as torch's (``kaiming_normal_``: fan-in, gain sqrt 2), the Linear with Flax's
default kernel and zero bias.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_users.batchnorm import BatchNorm
from fedjax_users.models.dtypes import Dtype, layer_dtypes
from fedjax_users.models.vgg import torchvision_constructor
from fedjax_users.models.vision import Momentum, VisionModel, global_avg_pool, torch_conv

Array = jax.Array

# depth -> (growth_rate, block_config, num_init_features): breaching's densenet_depths_to_config,
# which are also torchvision's densenet121/161/169/201.
CONFIGS: dict[int, tuple[int, tuple[int, ...], int]] = {
    121: (32, (6, 12, 24, 16), 64),
    161: (48, (6, 12, 36, 24), 96),
    169: (32, (6, 12, 32, 32), 64),
    201: (32, (6, 12, 48, 32), 64),
}
BN_SIZE = 4
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _norm_relu_conv(parent_dtypes: dict, x: Array, train: bool, mask: Optional[Array], momentum: Momentum,
                    norm: str, conv: str, features: int, kernel: int) -> Array:
    """BatchNorm (named ``norm``), ReLU, bias-free conv (named ``conv``), in the calling module."""
    x = nn.relu(BatchNorm(name=norm, **parent_dtypes)(x, train, mask, momentum))
    padding = (kernel - 1) // 2
    return torch_conv(features, kernel, 1, padding, use_bias=False, name=conv, kernel_init=CONV_INIT,
                      **parent_dtypes)(x)


class DenseLayer(nn.Module):
    """torchvision's ``_DenseLayer``: the ``growth_rate`` new channels computed from all earlier ones."""

    growth_rate: int
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array, train: bool, mask: Optional[Array], momentum: Momentum) -> Array:
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        x = _norm_relu_conv(dtypes, x, train, mask, momentum, "norm1", "conv1", BN_SIZE * self.growth_rate, 1)
        return _norm_relu_conv(dtypes, x, train, mask, momentum, "norm2", "conv2", self.growth_rate, 3)


class DenseBlock(nn.Module):
    """``_DenseBlock``: layers ``denselayer1..n``, each fed the concatenation of all before it."""

    num_layers: int
    growth_rate: int
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array, train: bool, mask: Optional[Array], momentum: Momentum) -> Array:
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        for index in range(1, self.num_layers + 1):
            new = DenseLayer(self.growth_rate, name=f"denselayer{index}", **dtypes)(x, train, mask, momentum)
            x = jnp.concatenate([x, new], axis=-1)  # torch.cat(features, 1): channels, in order
        return x


class Transition(nn.Module):
    """``_Transition``: BatchNorm, ReLU, 1x1 conv to ``features`` channels, 2x2 average pool."""

    features: int
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array, train: bool, mask: Optional[Array], momentum: Momentum) -> Array:
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        x = _norm_relu_conv(dtypes, x, train, mask, momentum, "norm", "conv", self.features, 1)
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class Features(nn.Module):
    """DenseNet's ``features`` Sequential: stem, dense blocks and transitions, ``norm5``."""

    growth_rate: int
    block_config: Sequence[int]
    num_init_features: int
    stem: str
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array, train: bool, mask: Optional[Array], momentum: Momentum) -> Array:
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        if self.stem == "CIFAR":
            x = torch_conv(self.num_init_features, 3, 1, 1, use_bias=False, name="conv0", kernel_init=CONV_INIT,
                           **dtypes)(x)
        else:  # torchvision's ImageNet stem
            x = torch_conv(self.num_init_features, 7, 2, 3, use_bias=False, name="conv0", kernel_init=CONV_INIT,
                           **dtypes)(x)
            x = nn.relu(BatchNorm(name="norm0", **dtypes)(x, train, mask, momentum))
            # MaxPool2d(3, stride 2, padding 1): torch's implicit padding never wins a max.
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        features = self.num_init_features
        for index, num_layers in enumerate(self.block_config, start=1):
            x = DenseBlock(num_layers, self.growth_rate, name=f"denseblock{index}", **dtypes)(x, train, mask, momentum)
            features += num_layers * self.growth_rate
            if index != len(self.block_config):
                features //= 2
                x = Transition(features, name=f"transition{index}", **dtypes)(x, train, mask, momentum)
        return BatchNorm(name="norm5", **dtypes)(x, train, mask, momentum)


class DenseNet(VisionModel):
    """DenseNet-BC (``CONFIGS`` holds the named depths) with the ``"CIFAR"`` or ``"ImageNet"`` stem."""

    growth_rate: int = 32
    block_config: Sequence[int] = (6, 12, 24, 16)
    num_init_features: int = 64
    stem: str = "CIFAR"

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Momentum = 0.1
    ) -> Array:
        features = Features(self.growth_rate, tuple(self.block_config), self.num_init_features, self.stem,
                            name="features", **self.dtypes)
        x = nn.relu(features(self.check_inputs(x), train, mask, momentum))
        return nn.Dense(self.num_classes, name="classifier", bias_init=nn.initializers.zeros, **self.dtypes)(
            global_avg_pool(x)
        )


def _fields(config: tuple[int, tuple[int, ...], int]) -> dict:
    growth_rate, block_config, num_init_features = config
    return dict(growth_rate=growth_rate, block_config=block_config, num_init_features=num_init_features)


# breaching's CIFAR names -> constructors.
MODELS: dict[str, Callable[..., nn.Module]] = {
    f"DenseNet{depth}": functools.partial(DenseNet, **_fields(config), stem="CIFAR") for depth, config in CONFIGS.items()
}

# torchvision's names (breaching's ImageNet data) -> constructors (torchvision's 1000 classes).
IMAGENET_MODELS: dict[str, Callable[..., nn.Module]] = {
    f"densenet{depth}": torchvision_constructor(DenseNet, **_fields(config), stem="ImageNet")
    for depth, config in CONFIGS.items()
}
