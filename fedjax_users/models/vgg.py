"""VGG in Flax: breaching's CIFAR ``VGG11/13/16/19`` and torchvision's ``vgg11..19`` / ``vgg*_bn``.

Both share torchvision's layer configurations (breaching's ``vgg.py`` lists the same ones under
its own names) and the ``features`` Sequential of 3x3 convolutions (each followed by a BatchNorm
where the model has them) and ReLUs, with 2x2 max pools at the "M" entries; submodules are named
by their Sequential index as in torch, so ``fedjax_users.interop`` pairs the weights by name.

* breaching's CIFAR VGG (``model_preparation.py``: ``norm="BatchNorm2d"``, ``head="CIFAR"``,
  ``drop_rate=0``, ``classical_weight_init=True``): BatchNorm after every conv, a final
  ``AvgPool2d(1, 1)`` (the identity) and one ``Linear(512, classes)`` named ``classifier``;
  its input must pool down to 1x1 (32x32 CIFAR images).
* torchvision's VGG (breaching's ImageNet data): ``AdaptiveAvgPool2d((7, 7))`` and the classifier
  ``Linear(25088, 4096), ReLU, Dropout, Linear(4096, 4096), ReLU, Dropout, Linear(4096, classes)``
  at Sequential indices 0, 3, 6. Dropout (p=0.5) is random in train mode: see
  ``fedjax_users.models.stochastic``.

Initialisation is the torch models' own (kaiming-normal fan-out convolutions, zero biases,
N(0, 0.01) linear weights), which breaching asks for with ``classical_weight_init``.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_users.batchnorm import BatchNorm
from fedjax_users.models.dtypes import Dtype, layer_dtypes
from fedjax_users.models.stochastic import Dropout
from fedjax_users.models.vision import (
    Momentum,
    VisionModel,
    flatten_channel_major,
    torch_conv,
    torch_max_pool,
)

Array = jax.Array

# torchvision's ``cfgs`` "A", "B", "D", "E" = breaching's "VGG11", "VGG13", "VGG16", "VGG19".
CONFIGS: dict[int, tuple[Union[int, str], ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}

# torch's kaiming_normal_(mode="fan_out", nonlinearity="relu") and normal_(0, 0.01).
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
LINEAR_INIT = nn.initializers.normal(0.01)


def adaptive_avg_pool(x: Array, size: tuple[int, int]) -> Array:
    """``torch.nn.AdaptiveAvgPool2d(size)`` on NHWC: output cell ``i`` averages input rows
    ``floor(i * n / size)`` to ``ceil((i + 1) * n / size)`` (exclusive), bins may overlap."""

    def pooling_matrix(n: int, out: int) -> Array:
        rows = []
        for i in range(out):
            start, end = (i * n) // out, -((-(i + 1) * n) // out)
            rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(n)])
        return jnp.asarray(rows, x.dtype)

    (_, height, width, _), (out_h, out_w) = x.shape, size
    if (height, width) == (out_h, out_w):
        return x
    return jnp.einsum("nhwc,Hh,Ww->nHWc", x, pooling_matrix(height, out_h), pooling_matrix(width, out_w))


class Features(nn.Module):
    """VGG's ``features`` Sequential: conv (+ BatchNorm) + ReLU per width, max pool per "M"."""

    config: Sequence[Union[int, str]]
    batch_norm: bool
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array, train: bool, mask: Optional[Array], momentum: Momentum) -> Array:
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        index = 0
        for entry in self.config:
            if entry == "M":
                x = torch_max_pool(x, 2)
                index += 1
                continue
            x = torch_conv(entry, 3, 1, 1, name=str(index), kernel_init=CONV_INIT, **dtypes)(x)
            if self.batch_norm:
                x = BatchNorm(name=str(index + 1), **dtypes)(x, train, mask, momentum)
            x = nn.relu(x)
            index += 3 if self.batch_norm else 2
        return x


class VGG(VisionModel):
    """breaching's CIFAR ``VGG<depth>``: BatchNorm features and one Linear on 512 features."""

    depth: int = 11

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Momentum = 0.1
    ) -> Array:
        x = self.check_inputs(x)
        x = Features(CONFIGS[self.depth], True, name="features", **self.dtypes)(x, train, mask, momentum)
        x = flatten_channel_major(x)
        if x.shape[-1] != 512:
            # torch's Linear(512, classes) would fail on these features; do not grow another head.
            raise ValueError(
                f"VGG{self.depth} (CIFAR head) needs inputs that pool to 1x1 (32x32 images), "
                f"got {x.shape[-1]} features from the image shape"
            )
        return nn.Dense(self.num_classes, name="classifier", kernel_init=LINEAR_INIT, **self.dtypes)(x)


class Classifier(nn.Module):
    """torchvision VGG's ``classifier``: Linear-ReLU-Dropout twice, then the output Linear."""

    num_classes: int
    dropout: float
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        for index in (0, 3):
            x = nn.relu(nn.Dense(4096, name=str(index), kernel_init=LINEAR_INIT, **dtypes)(x))
            x = Dropout(self.dropout, name=str(index + 2))(x, train)
        return nn.Dense(self.num_classes, name="6", kernel_init=LINEAR_INIT, **dtypes)(x)


class TorchvisionVGG(VisionModel):
    """torchvision's ``vgg<depth>`` (``batch_norm``: ``vgg<depth>_bn``) for 3-channel images."""

    num_classes: int = 1000
    depth: int = 11
    batch_norm: bool = False
    dropout: float = 0.5

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Momentum = 0.1
    ) -> Array:
        x = self.check_inputs(x)
        features = Features(CONFIGS[self.depth], self.batch_norm, name="features", **self.dtypes)
        x = flatten_channel_major(adaptive_avg_pool(features(x, train, mask, momentum), (7, 7)))
        return Classifier(self.num_classes, self.dropout, name="classifier", **self.dtypes)(x, train)


def torchvision_constructor(cls: type, **fields) -> Callable[..., nn.Module]:
    """A registry constructor for the model breaching gets from ``torchvision.models`` on ImageNet data.

    breaching calls ``torchvision.models.<name>(pretrained=...)`` without the data's classes or
    channels and only replaces a ``.fc`` layer (ResNets); VGG and DenseNet keep torchvision's
    1000 outputs and 3 input channels, so ``num_classes`` is not used and other channel counts
    are refused (breaching's model would fail on them).
    """

    def build(num_classes: int = 1000, num_channels: int = 3, **dtypes) -> nn.Module:
        del num_classes  # breaching keeps torchvision's 1000 classes for models without .fc
        if num_channels != 3:
            raise ValueError(
                f"torchvision's {cls.__name__} takes 3-channel images (breaching builds it "
                f"without the data's channel count), got num_channels={num_channels}"
            )
        return cls(num_classes=1000, num_channels=3, **fields, **dtypes)

    return build


# breaching's CIFAR names -> constructors.
MODELS: dict[str, Callable[..., nn.Module]] = {
    f"VGG{depth}": functools.partial(VGG, depth=depth) for depth in CONFIGS
}

# torchvision's names (breaching's ImageNet data) -> constructors.
IMAGENET_MODELS: dict[str, Callable[..., nn.Module]] = {
    f"vgg{depth}{suffix}": torchvision_constructor(TorchvisionVGG, depth=depth, batch_norm=bool(suffix))
    for depth in CONFIGS
    for suffix in ("", "_bn")
}
