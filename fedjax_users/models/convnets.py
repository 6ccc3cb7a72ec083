"""breaching's two Sequential ConvNets without BatchNorm: ``convnet-trivial`` and ``convnet_beyond``.

Both are ``torch.nn.Sequential(OrderedDict(...))`` in ``model_preparation.py``; the Flax layers
carry the Sequential's names (``conv``, ``linear``; ``conv1`` .. ``conv4``, ``linear0``,
``linear1``) so ``fedjax_users.interop`` pairs the weights by name. breaching matches both names
case-insensitively (``cfg_model.lower() == ...``), as ``models.get`` does. Initialisers are
Flax's defaults, as for the other ConvNets.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax

from fedjax_users.models.vision import Momentum, VisionModel, flatten_channel_major, global_avg_pool, torch_conv

Array = jax.Array

# convnet_beyond's Linear(12544, 12544): 256 channels on 7x7 positions, i.e. 25x25 to 28x28 images.
BEYOND_FEATURES = 12544


class ConvNetTrivial(VisionModel):
    """``convnet-trivial``: one 3x3 conv to 3072 channels, ReLU, global average pool, one Linear."""

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Momentum = 0.1
    ) -> Array:
        x = nn.relu(torch_conv(3072, 3, 1, 1, name="conv", **self.dtypes)(self.check_inputs(x)))
        return nn.Dense(self.num_classes, name="linear", **self.dtypes)(global_avg_pool(x))


class ConvNetBeyond(VisionModel):
    """``convnet_beyond``: four LeakyReLU convs, two LeakyReLU-separated Linears, then ``Softmax``.

    Its output is a probability vector (torch's ``Softmax(dim=1)`` is the model's last layer, and
    breaching applies its cross-entropy loss to these probabilities, as this model's users do).
    """

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Momentum = 0.1
    ) -> Array:
        x = self.check_inputs(x)
        for index, (features, stride) in enumerate(((32, 2), (64, 1), (128, 2), (256, 1)), start=1):
            # torch.nn.LeakyReLU()'s default slope is 0.01.
            x = nn.leaky_relu(torch_conv(features, 3, stride, 1, name=f"conv{index}", **self.dtypes)(x), 0.01)
        x = flatten_channel_major(x)
        if x.shape[-1] != BEYOND_FEATURES:
            raise ValueError(
                f"convnet_beyond's Linear({BEYOND_FEATURES}, {BEYOND_FEATURES}) needs images of 25x25 to "
                f"28x28 pixels, got {x.shape[-1]} features from the image shape"
            )
        x = nn.leaky_relu(nn.Dense(BEYOND_FEATURES, name="linear0", **self.dtypes)(x), 0.01)
        return nn.softmax(nn.Dense(self.num_classes, name="linear1", **self.dtypes)(x), axis=-1)


MODELS = {"convnet-trivial": ConvNetTrivial, "convnet_beyond": ConvNetBeyond}
