"""breaching's CIFAR DenseNets in Flax compute what breaching's own DenseNet computes, given the same weights."""

import sys

import pytest
import torch

from fedjax_users import models
from fedjax_users.models import densenet
from parity import reference

import zoo

CLASSES = 10
# 16x16 images: the CIFAR stem keeps the size, three transitions leave 2x2 positions for norm5.
SIDE = 16
SMALL = dict(growth_rate=4, block_config=(2, 3, 2, 2), num_init_features=8)


def breaching_densenet(**config):
    """breaching's DenseNet class with model_preparation's arguments and the given sizes."""
    torch.manual_seed(0)
    reference.models_module()
    densenets = sys.modules[f"{reference.PACKAGE}.cases.models.densenets"]
    return densenets.DenseNet(bn_size=4, drop_rate=0, channels=3, num_classes=CLASSES, memory_efficient=False,
                              norm="BatchNorm2d", nonlin="ReLU", stem="CIFAR", convolution_type="Standard", **config)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_small_densenet_matches_breaching_class(train):
    """Every layer type of the named DenseNets, at a size a test can afford: breaching's own class."""
    torch_model = breaching_densenet(**SMALL)
    flax_model = densenet.DenseNet(num_classes=CLASSES, stem="CIFAR", **SMALL)
    images = zoo.images(2, 3, SIDE)
    zoo.assert_round_trip(torch_model, flax_model, images)
    zoo.assert_forward_matches(torch_model, flax_model, images, train)


@pytest.mark.heavy  # compiling the float64 gradient of even this small DenseNet takes a minute here
def test_small_densenet_float64_gradients_match_breaching_class_in_train_mode():
    torch_model = breaching_densenet(**SMALL)
    flax_model = densenet.DenseNet(num_classes=CLASSES, stem="CIFAR", **SMALL)
    zoo.float64_gradients_match(torch_model, flax_model, zoo.images(2, 3, SIDE), torch.tensor([2, 5]), train=True)


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["DenseNet121", "DenseNet161", "DenseNet169", "DenseNet201"])
def test_named_densenet_matches_breaching(name):
    zoo.assert_breaching_model_matches(name, SIDE)


def test_names_resolve_like_breaching():
    # model_preparation matches "densenet" in the lower-cased name and reads the depth from its digits.
    for depth, (growth, blocks, init) in densenet.CONFIGS.items():
        model = models.get(f"densenet{depth}")
        assert (model.growth_rate, tuple(model.block_config), model.num_init_features, model.stem) == (
            growth, blocks, init, "CIFAR")


# torchvision's DenseNets (breaching's ImageNet data), at 64x64 (the 7x7 stride-2 stem and max pool
# leave 16x16, the transitions 2x2) and one at 224x224.
IMAGENET = [pytest.param(f"densenet{d}", 64, marks=pytest.mark.heavy) for d in densenet.CONFIGS]
IMAGENET.append(pytest.param("densenet121", 224, marks=pytest.mark.heavy))


@pytest.mark.parametrize("name, side", IMAGENET)
def test_torchvision_densenet_matches_breachings_imagenet_model(name, side):
    zoo.assert_breaching_model_matches(name, side, data_name="ImageNet")


def test_small_torchvision_densenet_matches_torchvision_class():
    """The ImageNet stem (7x7 conv, BatchNorm, 3x3 max pool) at a size a test can afford: torchvision's class."""
    torch.manual_seed(0)
    config = dict(growth_rate=4, block_config=(2, 2), num_init_features=8)
    torch_model = reference.torchvision_module("densenet").DenseNet(bn_size=4, num_classes=CLASSES, **config)
    flax_model = densenet.DenseNet(num_classes=CLASSES, stem="ImageNet", **config)
    images = zoo.images(2, 3, 15)  # odd: the padded max pool's edge windows
    zoo.assert_round_trip(torch_model, flax_model, images)
    zoo.assert_forward_matches(torch_model, flax_model, images, train=True)


def test_imagenet_densenet_keeps_torchvisions_classes():
    model = models.for_data("densenet161", "ImageNet", num_classes=CLASSES)
    assert (model.num_classes, model.growth_rate, model.stem) == (1000, 48, "ImageNet")
