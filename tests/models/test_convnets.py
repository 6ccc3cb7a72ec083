"""breaching's Sequential ConvNets (convnet-trivial, convnet_beyond) in Flax equal breaching's own."""

import jax
import jax.numpy as jnp
import pytest
import torch

from fedjax_users import models
from parity import reference

import zoo

CLASSES = 10


def build(name: str, shape):
    torch.manual_seed(0)
    return reference.vision_model(name, CLASSES, shape), models.get(name, num_classes=CLASSES, num_channels=shape[0])


def test_convnet_trivial_matches_breaching_and_converts_both_ways():
    # Global average pooling: any image size; 8x8 keeps the 3072-channel conv cheap.
    torch_model, flax_model = build("convnet-trivial", (3, 8, 8))
    images = zoo.images(2, 3, 8)
    zoo.assert_round_trip(torch_model, flax_model, images)
    zoo.assert_forward_matches(torch_model, flax_model, images, train=True)
    zoo.float64_gradients_match(torch_model, flax_model, images, torch.tensor([1, 4]), train=True)


@pytest.mark.heavy  # 158M parameters (the 12544 x 12544 Linear)
def test_convnet_beyond_matches_breaching_on_28x28_images():
    torch_model, flax_model = build("convnet_beyond", (1, 28, 28))
    images = zoo.images(2, 1, 28)
    zoo.assert_round_trip(torch_model, flax_model, images)
    zoo.assert_forward_matches(torch_model, flax_model, images, train=True)


def test_convnet_beyond_refuses_images_its_linear_cannot_take():
    flax_model = models.get("convnet_beyond", num_channels=3)
    with pytest.raises(ValueError, match="28x28"):
        jax.eval_shape(flax_model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert jax.eval_shape(flax_model.init, jax.random.key(0), jnp.zeros((1, 25, 25, 3)))


@pytest.mark.parametrize("name, expected", [
    ("convnetsmall", "ConvNetSmall"), ("CONVNET", "ConvNet"), ("ConvNet-Trivial", "ConvNetTrivial"),
    ("convnet_beyond", "ConvNetBeyond"),
])
def test_names_resolve_case_insensitively_like_breaching(name, expected):
    assert type(models.get(name)).__name__ == expected
