"""Flax versions of breaching's CIFAR ResNets and torchvision's ImageNet ResNets.

breaching's ``cases/models/resnets.py`` is a modification of torchvision's ``models/resnet.py``:
both build stages of BasicBlocks or Bottlenecks whose submodules have the same names (``conv1``,
``bn1``, ..., ``downsample.0`` / ``downsample.1``), so one set of blocks serves both. They differ
in the stem, the stage container and the head:

* breaching (CIFAR data, ``_construct_vision_model``): a 3x3 stem ``stem.0`` / ``stem.1``, the
  stages in ``layers.<i>``, the classifier ``linear``; BatchNorm, or GroupNorm with a quarter as
  many groups as channels (``ResNetGN<d>``, norm ``groupnorm4th``).
* torchvision (ImageNet data): a 7x7 stride-2 stem ``conv1`` / ``bn1`` and a 3x3 stride-2 max
  pool, the stages ``layer1`` .. ``layer4``, the classifier ``fc`` (which breaching replaces by a
  ``Linear`` with the data's number of classes).

Submodule names mirror the torch module paths, so ``fedjax_users.interop`` maps weights by name.
Inputs are NHWC. Models follow the package's model contract (``fedjax_users.models.vision``):
``__call__(x, train=False, mask=None, momentum=0.1)``, and take ``dtype`` / ``param_dtype``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_users.batchnorm import BatchNorm
from fedjax_users.models.dtypes import Dtype, layer_dtypes
from fedjax_users.models.vision import Momentum, VisionModel, global_avg_pool, torch_conv

Array = jax.Array

BATCHNORM = "BatchNorm2d"
GROUPNORM_4TH = "groupnorm4th"
BASIC = "basic"
BOTTLENECK = "bottleneck"
EXPANSION = {BASIC: 1, BOTTLENECK: 4}


class GroupNorm(nn.Module):
    """``torch.nn.GroupNorm(num_channels // divisor, num_channels)`` over the last (channel) axis.

    As torch: each example's channels are split into consecutive groups, each group normalised
    over its channels and positions with its mean and biased variance (``epsilon`` inside the
    square root), then a per-channel affine ``scale`` (torch's ``weight``) and ``bias``. The
    statistics are each example's own, so ``train``, ``mask`` and ``momentum`` change nothing.
    """

    divisor: int = 4
    epsilon: float = 1e-5
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Momentum = 0.1
    ) -> Array:
        channels = x.shape[-1]
        groups = channels // self.divisor
        if groups < 1 or channels % groups:
            # torch.nn.GroupNorm refuses these shapes too.
            raise ValueError(f"GroupNorm: {channels} channels do not split into {groups} groups")
        param_dtype = x.dtype if self.param_dtype is None else self.param_dtype
        scale = self.param("scale", nn.initializers.ones, (channels,), param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), param_dtype)
        if self.dtype is not None:
            x, scale, bias = x.astype(self.dtype), scale.astype(self.dtype), bias.astype(self.dtype)
        grouped = x.reshape(x.shape[:-1] + (groups, channels // groups))
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)  # positions and the channels of a group
        mean = jnp.mean(grouped, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
        normalised = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return normalised * scale + bias


def norm_layer(norm: str, name: str, dtypes: dict) -> nn.Module:
    """The normalisation breaching's ``get_layer_functions`` builds for ``norm``."""
    if norm == BATCHNORM:
        return BatchNorm(name=name, **dtypes)
    if norm == GROUPNORM_4TH:
        return GroupNorm(divisor=4, name=name, **dtypes)
    raise ValueError(f"unknown ResNet norm {norm!r}; known: {[BATCHNORM, GROUPNORM_4TH]}")


@dataclasses.dataclass(frozen=True)
class BlockKind:
    """What every block of a net shares: ``block`` type, a Bottleneck's ``base_width``, ``norm``."""

    block: str = BASIC
    base_width: int = 64
    norm: str = BATCHNORM

    @property
    def expansion(self) -> int:
        """Output channels per plane: 1 for a BasicBlock, 4 for a Bottleneck."""
        return EXPANSION[self.block]


class ConvNorm(nn.Module):
    """A Sequential of a bias-free conv (index 0) and a normalisation (index 1).

    Used for breaching's stem (followed by ReLU) and the type-"B" downsample shortcut.
    """

    features: int
    kernel: int
    stride: int
    padding: int
    norm: str = BATCHNORM
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array, train: bool, mask: Optional[Array], momentum: Momentum) -> Array:
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        conv = torch_conv(
            self.features, self.kernel, self.stride, self.padding, use_bias=False, name="0", **dtypes
        )
        return norm_layer(self.norm, "1", dtypes)(conv(x), train, mask, momentum)


class Block(nn.Module):
    """A BasicBlock (two 3x3 convs) or Bottleneck (1x1, strided 3x3, 1x1 to ``4 * planes``).

    Each conv is followed by its normalisation (``bn<i>``) and ReLU, the last ReLU after the
    (projected, ``downsample``) shortcut is added. A Bottleneck's inner width is
    ``int(planes * base_width / 64)``, as in both torch files (one group).
    """

    planes: int
    stride: int
    project_shortcut: bool
    kind: BlockKind = BlockKind()
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array, train: bool, mask: Optional[Array], momentum: Momentum) -> Array:
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        kind, planes = self.kind, self.planes
        if kind.block == BASIC:
            # (features, kernel, stride, padding) of conv1, conv2.
            convs = ((planes, 3, self.stride, 1), (planes, 3, 1, 1))
        else:
            width = int(planes * (kind.base_width / 64.0))
            convs = ((width, 1, 1, 0), (width, 3, self.stride, 1), (planes * kind.expansion, 1, 1, 0))
        out = x
        for index, (features, kernel, stride, padding) in enumerate(convs, start=1):
            out = torch_conv(features, kernel, stride, padding, use_bias=False, name=f"conv{index}", **dtypes)(out)
            out = norm_layer(kind.norm, f"bn{index}", dtypes)(out, train, mask, momentum)
            if index < len(convs):
                out = nn.relu(out)
        shortcut = x
        if self.project_shortcut:
            shortcut = ConvNorm(planes * kind.expansion, 1, self.stride, 0, kind.norm, name="downsample", **dtypes)(
                x, train, mask, momentum
            )
        return nn.relu(out + shortcut)


class ResNetStage(nn.Module):
    """One ``_make_layer`` Sequential: blocks named by index, the first strided (and projected)."""

    planes: int
    blocks: int
    stride: int
    project_first: bool
    kind: BlockKind = BlockKind()
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array, train: bool, mask: Optional[Array], momentum: Momentum) -> Array:
        for index in range(self.blocks):
            first = index == 0
            block = Block(
                self.planes,
                self.stride if first else 1,
                self.project_first and first,
                self.kind,
                name=str(index),
                **layer_dtypes(self.dtype, self.param_dtype),
            )
            x = block(x, train, mask, momentum)
        return x


def stage_plan(
    stage_sizes: Sequence[int], in_planes: int, first_planes: int, expansion: int
) -> list[tuple[int, int, int, bool]]:
    """``(planes, blocks, stride, project_first)`` of each stage, as ``_make_layer`` chooses them.

    Stage ``i`` has ``first_planes * 2**i`` planes and stride 1 for the first stage, 2 after; its
    first block projects its shortcut (downsample "B") when the stride or the width changes.
    """
    plan = []
    for index, blocks in enumerate(stage_sizes):
        planes = first_planes * 2**index
        stride = 1 if index == 0 else 2
        plan.append((planes, blocks, stride, stride != 1 or in_planes != planes * expansion))
        in_planes = planes * expansion
    return plan


class ResNetStages(nn.Module):
    """breaching's ``ResNet.layers``: the stages named by index."""

    stage_sizes: Sequence[int]
    width: int
    kind: BlockKind = BlockKind()
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array, train: bool, mask: Optional[Array], momentum: Momentum) -> Array:
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        plan = stage_plan(self.stage_sizes, self.width, self.width, self.kind.expansion)
        for index, (planes, blocks, stride, project) in enumerate(plan):
            x = ResNetStage(planes, blocks, stride, project, self.kind, name=str(index), **dtypes)(x, train, mask, momentum)
        return x


class ResNet(VisionModel):
    """breaching's CIFAR ResNet: 3x3 stem, stages of ``block``, downsample "B", ``norm``.

    ``width`` is breaching's ``width_per_group``. As breaching's constructor: a BasicBlock net's
    stem and first stage have ``width`` channels (Bottlenecks keep 64 of torch's planes there and
    use ``width`` as their base width instead).
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    width: int = 64
    block: str = BASIC
    norm: str = BATCHNORM

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Momentum = 0.1
    ) -> Array:
        x = self.check_inputs(x)
        stem_width = self.width if self.block == BASIC else 64
        base_width = self.width if self.block == BOTTLENECK else 64
        stem = ConvNorm(stem_width, 3, 1, 1, self.norm, name="stem", **self.dtypes)
        x = nn.relu(stem(x, train, mask, momentum))
        kind = BlockKind(self.block, base_width, self.norm)
        stages = ResNetStages(tuple(self.stage_sizes), stem_width, kind, name="layers", **self.dtypes)
        x = stages(x, train, mask, momentum)
        return nn.Dense(self.num_classes, name="linear", **self.dtypes)(global_avg_pool(x))


def torch_max_pool_padded(x: Array, window: int, stride: int, padding: int) -> Array:
    """``torch.nn.MaxPool2d(window, stride, padding)``: padded positions never win (-inf)."""
    pad = [(padding, padding), (padding, padding)]
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pad)


class TorchvisionResNet(VisionModel):
    """torchvision's ``ResNet`` with breaching's ``fc`` (``Linear(in_features, num_classes)``).

    A 7x7 stride-2 conv ``conv1``, ``bn1``, ReLU, a 3x3 stride-2 max pool, ``layer1`` .. ``layer4``
    of 64 .. 512 planes, global average pooling, ``fc``. torchvision fixes ``conv1`` to three
    input channels, so other channel counts are refused.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = BASIC

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Momentum = 0.1
    ) -> Array:
        if self.num_channels != 3:
            raise ValueError(f"torchvision's ResNets take 3-channel images (conv1 is fixed), not {self.num_channels}")
        x = self.check_inputs(x)
        x = torch_conv(64, 7, 2, 3, use_bias=False, name="conv1", **self.dtypes)(x)
        x = nn.relu(BatchNorm(name="bn1", **self.dtypes)(x, train, mask, momentum))
        x = torch_max_pool_padded(x, 3, 2, 1)
        kind = BlockKind(self.block)
        for index, (planes, blocks, stride, project) in enumerate(stage_plan(self.stage_sizes, 64, 64, kind.expansion)):
            stage = ResNetStage(planes, blocks, stride, project, kind, name=f"layer{index + 1}", **self.dtypes)
            x = stage(x, train, mask, momentum)
        return nn.Dense(self.num_classes, name="fc", **self.dtypes)(global_avg_pool(x))


# breaching's ``resnet_depths_to_config``: depth -> (block, blocks per stage). torchvision's
# resnet18/34/50/101/152 use the four-stage entries.
DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: (BASIC, (2, 2, 2, 2)),
    20: (BASIC, (3, 3, 3)),
    32: (BASIC, (5, 5, 5)),
    34: (BASIC, (3, 4, 6, 3)),
    50: (BOTTLENECK, (3, 4, 6, 3)),
    56: (BASIC, (9, 9, 9)),
    101: (BOTTLENECK, (3, 4, 23, 3)),
    110: (BASIC, (18, 18, 18)),
    152: (BOTTLENECK, (3, 8, 36, 3)),
}
# The widths registered as ``ResNet<depth>-<width>`` (breaching's case files use ResNet32-10).
WIDTHS = (2, 4, 8, 10)
TORCHVISION_DEPTHS = (18, 34, 50, 101, 152)


def cifar_resnet(depth: int, width: int = 1, norm: str = BATCHNORM) -> Callable[..., nn.Module]:
    """The constructor of breaching's ``ResNet<depth>-<width>`` (or ``ResNetGN<depth>``).

    As ``_construct_vision_model``: ``width_per_group`` is 16 (three stages) or 64 (four) times
    ``width``. Fields left at their defaults are not passed, so e.g. ``resnet20`` equals
    ``ResNet(stage_sizes=(3, 3, 3), width=16)``.
    """
    block, stages = DEPTHS[depth]
    fields = dict(stage_sizes=stages, width=(16 if len(stages) < 4 else 64) * width)
    if block != BASIC:
        fields["block"] = block
    if norm != BATCHNORM:
        fields["norm"] = norm
    return functools.partial(ResNet, **fields)


def _cifar_models() -> dict[str, Callable[..., nn.Module]]:
    table = {}
    for depth in DEPTHS:
        # resnet18 and resnet20 keep the names they were registered under first (lookups ignore case).
        table[f"resnet{depth}" if depth in (18, 20) else f"ResNet{depth}"] = cifar_resnet(depth)
        for width in WIDTHS:
            table[f"ResNet{depth}-{width}"] = cifar_resnet(depth, width)
        table[f"ResNetGN{depth}"] = cifar_resnet(depth, norm=GROUPNORM_4TH)
    return table


# breaching's CIFAR-table names -> constructors, called as ``constructor(num_classes=...,
# num_channels=...)`` and optionally ``dtype=`` / ``param_dtype=``.
MODELS: dict[str, Callable[..., nn.Module]] = _cifar_models()
# torchvision's names, for ImageNet data (``fedjax_users.models.for_data``).
IMAGENET_MODELS: dict[str, Callable[..., nn.Module]] = {
    f"resnet{depth}": functools.partial(
        TorchvisionResNet, stage_sizes=DEPTHS[depth][1], **({"block": BOTTLENECK} if DEPTHS[depth][0] != BASIC else {})
    )
    for depth in TORCHVISION_DEPTHS
}
