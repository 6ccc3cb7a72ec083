"""breaching's CIFAR VGGs in Flax compute what breaching's own VGG computes, given the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fedjax_users import models
from fedjax_users.models import vgg
from parity import reference

import zoo

CLASSES = 10
# VGG11 carries every layer type; the deeper ones only repeat them (and cost seconds each here).
DEPTHS = [
    pytest.param("VGG11"),
    pytest.param("VGG13", marks=pytest.mark.heavy),
    pytest.param("VGG16", marks=pytest.mark.heavy),
    pytest.param("VGG19", marks=pytest.mark.heavy),
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


@pytest.mark.heavy
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


@pytest.mark.heavy  # initialising VGG11 runs its forward pass once
def test_classical_weight_init():
    """kaiming-normal fan-out convolutions, zero biases, N(0, 0.01) classifier, as breaching asks."""
    params = jax.jit(models.get("VGG11").init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    kernel = np.asarray(params["features"]["8"]["kernel"])  # 3x3, 128 -> 256
    assert abs(kernel.std() / np.sqrt(2.0 / (9 * 256)) - 1) < 0.02
    assert not np.any(params["features"]["8"]["bias"])
    assert abs(np.asarray(params["classifier"]["kernel"]).std() / 0.01 - 1) < 0.05


# ----------------------------------------------------------------------------------------------
# torchvision's VGGs (breaching's ImageNet data): 132M+ parameters each, so every named one is heavy.
# 64x64 images: the features leave 2x2 positions, which AdaptiveAvgPool2d((7, 7)) spreads over 7x7
# overlapping bins; one case runs at 224x224, where that pool is the identity.
IMAGENET = [pytest.param(f"vgg{d}{s}", 64, marks=pytest.mark.heavy) for d in (11, 13, 16, 19) for s in ("", "_bn")]
IMAGENET.append(pytest.param("vgg11_bn", 224, marks=pytest.mark.heavy))


@pytest.mark.parametrize("name, side", IMAGENET)
def test_torchvision_vgg_matches_breachings_imagenet_model(name, side):
    zoo.assert_breaching_model_matches(name, side, data_name="ImageNet")  # dropout on torch's draws


@pytest.mark.parametrize("side, out", [(2, 7), (5, 7), (13, 7), (7, 7), (9, 4)])
def test_adaptive_avg_pool_is_torchs(side, out):
    x = torch.randn(2, 3, side, side + 1, dtype=torch.float64)
    expected = torch.nn.functional.adaptive_avg_pool2d(x, (out, out))
    ours = vgg.adaptive_avg_pool(jnp.asarray(x.permute(0, 2, 3, 1).numpy()), (out, out))
    # float32 on our side (no x64 here): agreement to its rounding.
    np.testing.assert_allclose(np.asarray(ours), expected.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)


def test_imagenet_vgg_keeps_torchvisions_classes_and_channels():
    # breaching replaces only a `.fc` layer; torchvision's VGG has none, so 1000 outputs stay.
    model = models.for_data("vgg16_bn", "ImageNet", num_classes=CLASSES)
    assert (model.num_classes, model.depth, model.batch_norm) == (1000, 16, True)
    with pytest.raises(ValueError, match="3-channel"):
        models.for_data("vgg11", "ImageNet", num_channels=1)
