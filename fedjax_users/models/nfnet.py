"""breaching's NFNet-F0 (``nfnets.py``, from benjs/nfnets_pytorch) in Flax.

``model_preparation.py`` builds ``NFNet(channels, classes, variant="F0", stochdepth_rate=0.25,
alpha=0.2, se_ratio=0.5, activation="ReLU", stem=..., use_dropout=True)``. breaching 0.1.2 itself
cannot: ``nfnets.activations_dict`` has the keys ``"relu"`` and ``"gelu"`` only, so
``activation="ReLU"`` is a ``KeyError``. The model here is that NFNet with the one ReLU the file
has (``VPReLU``) and every other argument as ``model_preparation.py`` gives it (see
docs/models.md); the parity reference is breaching's own class built the same way.

What follows torch exactly:

* Scaled weight standardisation (``WSConv2D``): per output channel, ``(w - mean) *
  rsqrt(max(var * fan_in, eps)) * gain`` with torch's *unbiased* variance (``torch.var``) over
  (in, kh, kw); ``eps`` and ``fan_in`` are torch buffers (non-persistent, but listed by
  ``named_buffers()`` and so part of breaching's server payload), here ``batch_stats`` entries
  read by the forward pass and never changed by it.
* ``VPReLU`` is ``relu(x) * 1.7139588594436646`` computed *in place* on its input: in a block
  without projection the identity shortcut therefore carries ``relu(x)``, not ``x``.
* Per block ``beta = 1 / expected_std`` and the stochastic-depth rate ``0.25 * index / 12``, as
  breaching's loop computes them; ``skip_gain`` starts at zero.
* Train mode is random in torch (stochastic depth per example, dropout 0.2 before the Linear):
  here the draws come from the ``dropout`` RNG stream (``fedjax_users.models.stochastic``).
  Eval mode is deterministic and exactly torch's.
"""

from __future__ import annotations

import math
from typing import ClassVar, Optional

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_users.models.dtypes import Dtype, layer_dtypes
from fedjax_users.models.stochastic import Dropout, StochasticDepth
from fedjax_users.models.vision import Momentum, VisionModel

Array = jax.Array

# nfnets.nfnet_params["F0"]; stride pattern (1, 2, 2, 2), group size 128, expansion 0.5.
F0_WIDTHS = (256, 512, 1536, 1536)
F0_DEPTHS = (1, 2, 6, 3)
F0_DROP_RATE = 0.2
GROUP_SIZE = 128
EXPANSION = 0.5
# The variance-preserving gains of VPReLU / VPGELU.
ACTIVATION_GAINS = {"relu": 1.7139588594436646, "gelu": 1.7015043497085571}
# WSConv2D's eps buffer: torch.tensor(1e-4), a float32 scalar.
WS_EPS = float(np.float32(1e-4))
XAVIER_NORMAL = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")


def activation(name: str, x: Array) -> Array:
    """breaching's ``VPReLU`` / ``VPGELU`` (exact, erf-based GELU)."""
    core = nn.relu(x) if name == "relu" else nn.gelu(x, approximate=False)
    return core * ACTIVATION_GAINS[name]


def standardized_kernel(kernel: Array, gain: Array, eps: Array, fan_in: Array) -> Array:
    """WSConv2D's weight for an HWIO ``kernel`` and torch-shaped ``gain`` (out, 1, 1, 1)."""
    axes = (0, 1, 2)  # torch's dims (1, 2, 3) of OIHW
    mean = jnp.mean(kernel, axis=axes, keepdims=True)
    var = jnp.var(kernel, axis=axes, keepdims=True, ddof=1)  # torch.var is unbiased
    scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps))
    return (kernel - mean) * scale * gain.reshape(1, 1, 1, -1)


class WSConv2d(nn.Module):
    """breaching's ``WSConv2D``: a conv (bias, groups, symmetric zero padding) on standardised weights."""

    features: int
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        param_dtype = jnp.float32 if self.param_dtype is None else self.param_dtype
        in_per_group = x.shape[-1] // self.groups
        shape = (self.kernel, self.kernel, in_per_group, self.features)
        kernel = self.param("kernel", XAVIER_NORMAL, shape, param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), param_dtype)
        gain = self.param("gain", nn.initializers.ones, (self.features, 1, 1, 1), param_dtype)
        eps = self.variable("batch_stats", "eps", lambda: jnp.asarray(WS_EPS, param_dtype))
        fan_in = self.variable(
            "batch_stats", "fan_in", lambda: jnp.asarray(in_per_group * self.kernel**2, param_dtype)
        )
        # As Flax's own layers: compute in ``dtype``, or in the promoted dtype of inputs and parameters.
        x, kernel, gain, bias, eps, fan_in = promote_dtype(
            x, kernel, gain, bias, eps.value, fan_in.value, dtype=self.dtype
        )
        weight = standardized_kernel(kernel, gain, eps, fan_in)
        y = jax.lax.conv_general_dilated(
            x, weight, (self.stride, self.stride), [(self.padding, self.padding)] * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups,
        )
        return y + bias


class Stem(nn.Module):
    """``Stem``: four unpadded WSConvs (16, 32, 64, 128 channels), the first and last with ``stride``."""

    stride: int
    activation: str
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        for index, (features, stride) in enumerate(((16, self.stride), (32, 1), (64, 1), (128, self.stride))):
            x = WSConv2d(features, 3, stride, name=f"conv{index}", **dtypes)(x)
            if index < 3:
                x = activation(self.activation, x)
        return x


class SqueezeExcite(nn.Module):
    """``SqueezeExcite``: mean over positions, Linear, activation, Linear, sigmoid (per channel)."""

    features: int
    se_ratio: float
    activation: str
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        hidden = max(1, int(self.features * self.se_ratio))
        out = jnp.mean(x, axis=(1, 2))
        out = activation(self.activation, nn.Dense(hidden, name="linear", **dtypes)(out))
        out = nn.sigmoid(nn.Dense(self.features, name="linear_1", **dtypes)(out))
        return out[:, None, None, :]


class NFBlock(nn.Module):
    """``NFBlock``: bottleneck of grouped WSConvs with squeeze-excite, scaled by ``alpha * skip_gain``."""

    # torch registers the shortcut after conv2 but this module calls it first: breaching's list
    # order (``fedjax_users.interop.order``).
    torch_children: ClassVar[tuple[str, ...]] = (
        "conv0", "conv1", "conv1b", "conv2", "conv_shortcut", "squeeze_excite"
    )

    in_features: int
    features: int
    stride: int
    beta: float
    alpha: float
    se_ratio: float
    stochdepth_rate: float
    activation: str
    pad: int
    group_size: int = GROUP_SIZE
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        groups = int(self.features * EXPANSION) // self.group_size
        width = self.group_size * groups
        activated = activation(self.activation, x)
        if self.activation == "relu":
            # VPReLU runs F.relu(x, inplace=True): the block's input itself becomes relu(x).
            x = nn.relu(x)
        out = activated * self.beta
        if self.stride > 1:
            pooled = nn.avg_pool(out, (2, 2), strides=(2, 2), padding=[(self.pad, self.pad)] * 2)
            shortcut = WSConv2d(self.features, 1, name="conv_shortcut", **dtypes)(pooled)
        elif self.in_features != self.features:
            shortcut = WSConv2d(self.features, 1, name="conv_shortcut", **dtypes)(out)
        else:
            shortcut = x
        out = activation(self.activation, WSConv2d(width, 1, name="conv0", **dtypes)(out))
        out = activation(self.activation, WSConv2d(width, 3, self.stride, 1, groups, name="conv1", **dtypes)(out))
        out = activation(self.activation, WSConv2d(width, 3, 1, 1, groups, name="conv1b", **dtypes)(out))
        out = WSConv2d(self.features, 1, name="conv2", **dtypes)(out)
        excite = SqueezeExcite(self.features, self.se_ratio, self.activation, name="squeeze_excite", **dtypes)
        out = (excite(out) * 2) * out
        if 0.0 < self.stochdepth_rate < 1.0:
            out = StochasticDepth(self.stochdepth_rate, name="stoch_depth")(out, train)
        param_dtype = jnp.float32 if self.param_dtype is None else self.param_dtype
        skip_gain = self.param("skip_gain", nn.initializers.zeros, (), param_dtype)
        return out * self.alpha * skip_gain + shortcut


def block_settings(stochdepth_rate: float, alpha: float) -> list[dict]:
    """Per block of F0: in/out width, stride, ``beta`` and stochastic-depth rate, as NFNet.__init__ computes them."""
    settings, expected_std, index = [], 1.0, 0
    in_features = F0_WIDTHS[0] // 2
    num_blocks = sum(F0_DEPTHS)
    for width, depth, stride in zip(F0_WIDTHS, F0_DEPTHS, (1, 2, 2, 2)):
        for block_index in range(depth):
            settings.append(dict(in_features=in_features, features=width, stride=stride if block_index == 0 else 1,
                                 beta=1.0 / expected_std, stochdepth_rate=stochdepth_rate * index / num_blocks))
            in_features = width
            index += 1
            if block_index == 0:
                expected_std = 1.0
            expected_std = math.sqrt(expected_std**2 + alpha**2)
    return settings


class Body(nn.Module):
    """``NFNet.body``: the F0 blocks named by Sequential index."""

    stochdepth_rate: float
    alpha: float
    se_ratio: float
    activation: str
    pad: int
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        for index, setting in enumerate(block_settings(self.stochdepth_rate, self.alpha)):
            block = NFBlock(**setting, alpha=self.alpha, se_ratio=self.se_ratio, activation=self.activation,
                            pad=self.pad, name=str(index), **dtypes)
            x = block(x, train)
        return x


class NFNet(VisionModel):
    """breaching's NFNet-F0 with ``model_preparation.py``'s settings (``stem`` "CIFAR" or "ImageNet")."""

    stem: str = "CIFAR"
    stochdepth_rate: float = 0.25
    alpha: float = 0.2
    se_ratio: float = 0.5
    activation: str = "relu"
    use_dropout: bool = True

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Momentum = 0.1
    ) -> Array:
        x = self.check_inputs(x)
        stride, pad = (1, 0) if self.stem == "CIFAR" else (2, 1)
        x = Stem(stride, self.activation, name="stem", **self.dtypes)(x)
        x = Body(self.stochdepth_rate, self.alpha, self.se_ratio, self.activation, pad, name="body",
                 **self.dtypes)(x, train)
        x = activation(self.activation, WSConv2d(2 * F0_WIDTHS[-1], 1, name="final_conv", **self.dtypes)(x))
        pooled = jnp.mean(x, axis=(1, 2))
        if self.use_dropout:
            pooled = Dropout(F0_DROP_RATE, name="dropout")(pooled, train)
        linear = nn.Dense(self.num_classes, name="linear", kernel_init=nn.initializers.normal(0.01), **self.dtypes)
        return linear(pooled)


MODELS = {"nfnet": NFNet}
