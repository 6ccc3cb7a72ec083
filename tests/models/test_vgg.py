"""breaching's CIFAR VGGs in Flax compute what breaching's own VGG computes, given the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fedjax_users import models
from parity import reference

import zoo

CLASSES = 10
# VGG11 carries every layer type; the deeper ones only repeat them (and cost seconds each here).
DEPTHS = [
    pytest.param("VGG11"),
    pytest.param("VGG13", marks=pytest.mark.slow),
    pytest.param("VGG16", marks=pytest.mark.slow),
    pytest.param("VGG19", marks=pytest.mark.slow),
]


def build(name: str, dtype=torch.float32):
    torch.manual_seed(0)
    torch_model = reference.vision_model(name, CLASSES, (3, 32, 32)).to(dtype)
    return torch_model, models.get(name, num_classes=CLASSES)


@pytest.mark.parametrize("name", DEPTHS)
def test_forward_and_running_stats_match_breaching_in_eval_and_train_mode(name):
    torch_model, flax_model = build(name)
    images = zoo.images(2, 3, 32)
    zoo.assert_round_trip(torch_model, flax_model, images)
    for train in (False, True):
        zoo.assert_forward_matches(torch_model, flax_model, images, train)


@pytest.mark.slow
def test_float64_gradients_match_breaching_in_train_mode():
    torch_model, flax_model = build("VGG11")
    labels = torch.tensor([3, 7])
    zoo.float64_gradients_match(torch_model, flax_model, zoo.images(2, 3, 32), labels, train=True)


def test_names_resolve_like_breaching():
    # model_preparation matches "vgg" in the lower-cased name, then indexes its table with the name.
    assert {"VGG11", "VGG13", "VGG16", "VGG19"} <= set(models.names("vision"))
    assert models.get("VGG16").depth == 16


def test_image_that_does_not_pool_to_one_cell_is_refused():
    flax_model = models.get("VGG11")
    with pytest.raises(ValueError, match="32x32"):
        jax.eval_shape(flax_model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def test_classical_weight_init():
    """kaiming-normal fan-out convolutions, zero biases, N(0, 0.01) classifier, as breaching asks."""
    params = models.get("VGG11").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    kernel = np.asarray(params["features"]["8"]["kernel"])  # 3x3, 128 -> 256
    assert abs(kernel.std() / np.sqrt(2.0 / (9 * 256)) - 1) < 0.02
    assert not np.any(params["features"]["8"]["bias"])
    assert abs(np.asarray(params["classifier"]["kernel"]).std() / 0.01 - 1) < 0.05
