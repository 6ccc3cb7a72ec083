"""breaching's NFNet-F0 in Flax equals breaching's own NFNet class, given the same weights and random draws.

breaching 0.1.2's ``construct_model`` cannot build ``nfnet`` (``activation="ReLU"`` is not a key of
``nfnets.activations_dict``); the reference is its ``NFNet`` class with ``activation="relu"``
(``parity.reference.nfnet_model``). In train mode torch draws stochastic-depth and dropout masks from
its own generator: the tests record those masks with forward hooks and hand them to the Flax model
through ``flax.linen.intercept_methods``, so both frameworks compute on the same draws.
"""

import sys

import jax
import jax.numpy as jnp
import pytest
import torch

from fedjax_users import interop, models
from fedjax_users.models import nfnet
from fedjax_users.models.vision import flatten_channel_major
from parity import reference

import zoo
from test_vision import assert_close_scaled

CLASSES = 10


def nfnets_module():
    reference.models_module()
    return sys.modules[f"{reference.PACKAGE}.cases.models.nfnets"]


def randomize_gains(torch_model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial skip gains (zero at init: every residual branch would be switched off) and conv gains."""
    zoo.randomize_named(torch_model, "gain", seed, 0.5, 1.5)


class Flattened(torch.nn.Module):
    """A torch block under the container name ``model`` (which interop drops), its output flattened."""

    def __init__(self, block):
        super().__init__()
        self.model = block

    def forward(self, x):
        return torch.flatten(self.model(x), 1)


def breaching_block(**kwargs):
    torch.manual_seed(0)
    block = nfnets_module().NFBlock(alpha=0.2, se_ratio=0.5, activation="relu", pad=0, **kwargs)
    return Flattened(block)


class FlaxBlock(nfnet.NFBlock):
    """An NFBlock called like a model, its NHWC output flattened in torch's order."""

    def __call__(self, x, train=False, mask=None, momentum=0.1):
        return flatten_channel_major(super().__call__(x, train))


BLOCKS = {  # identity shortcut (relu in place), strided projection, width-changing projection
    "identity": dict(in_channels=32, out_channels=32, stride=1, beta=0.9, stochdepth_rate=0.2),
    "strided": dict(in_channels=16, out_channels=32, stride=2, beta=1.0, stochdepth_rate=0.1),
    "projected": dict(in_channels=16, out_channels=32, stride=1, beta=0.8, stochdepth_rate=0.0),
}


@pytest.mark.parametrize("kind", list(BLOCKS))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_block_matches_breaching_nfblock(kind, train):
    cfg = BLOCKS[kind]
    torch_block = breaching_block(group_size=8, **cfg)
    randomize_gains(torch_block)
    flax_block = FlaxBlock(cfg["in_channels"], cfg["out_channels"], cfg["stride"], cfg["beta"], 0.2, 0.5,
                           cfg["stochdepth_rate"], "relu", 0, group_size=8)
    images = zoo.images(4, cfg["in_channels"], 6)
    zoo.assert_round_trip(torch_block, flax_block, images)
    zoo.assert_forward_matches(torch_block, flax_block, images, train, interceptor=zoo.TorchDraws(torch_block))
    # float64 gradients (a compile of tens of seconds here) for the block with the in-place
    # shortcut, in train mode: eval mode runs the same layers without the draws.
    if train and kind == "identity":
        labels = torch.tensor([0, 1, 2, 3])
        zoo.float64_gradients_match(torch_block, flax_block, images, labels, train, interceptor=zoo.TorchDraws(torch_block))


def test_weight_standardisation_is_torchs_with_unbiased_variance():
    torch.manual_seed(1)
    conv = nfnets_module().WSConv2D(8, 12, kernel_size=3, stride=2, padding=1, groups=4).double()
    randomize_gains(conv)
    images = zoo.images(2, 8, 7, dtype=torch.float64)
    with jax.enable_x64(True):
        flax_conv = _Conv(12, 3, 2, 1, 4)
        variables = zoo.convert(conv, flax_conv, images)
        out = flax_conv.apply(variables, interop.nchw_to_nhwc(images))
        with torch.no_grad():
            expected = conv(images)
        assert_close_scaled(out, interop.nchw_to_nhwc(expected), 1e-12, "WSConv2D output")
    # The buffers travel too: eps and fan_in are in named_buffers(), so in breaching's payload.
    assert {"eps", "fan_in"} == set(variables["batch_stats"])
    assert float(variables["batch_stats"]["fan_in"]) == 2 * 3 * 3


class _Conv(nfnet.WSConv2d):
    def __call__(self, x, train=False, mask=None, momentum=0.1):
        return super().__call__(x)


@pytest.mark.heavy
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_nfnet_f0_matches_breaching_nfnet(train):
    # 16x16 images: the CIFAR stem's unpadded convs leave 8x8, the strided stages 4, 2 and 1.
    torch.manual_seed(0)
    torch_model = reference.vision_model("nfnet", CLASSES, (3, 16, 16))
    randomize_gains(torch_model)
    flax_model = models.get("nfnet", num_classes=CLASSES)
    images = zoo.images(2, 3, 16)
    zoo.assert_round_trip(torch_model, flax_model, images)
    zoo.assert_forward_matches(torch_model, flax_model, images, train, interceptor=zoo.TorchDraws(torch_model))


def test_train_mode_needs_a_dropout_key():
    """Without torch's generator, train mode draws from the ``dropout`` stream, and says so when it is missing."""
    flax_model = models.get("nfnet", num_classes=CLASSES)
    variables = jax.eval_shape(flax_model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda v: flax_model.apply(v, jnp.zeros((1, 16, 16, 3)), train=True), variables)
