"""The ResNets compute what breaching's and torchvision's own model code computes, given the same weights.

The references are built by ``parity.reference``: breaching's ``_construct_vision_model`` on CIFAR
data (its ``resnets.py``) and on ImageNet data (torchvision 0.28.0's ``models/resnet.py``, loaded
by path, with breaching's replaced ``fc``).
"""

import copy
import sys

import jax
import jax.numpy as jnp
import pytest
import torch

from fedjax_users import interop, models
from fedjax_users.models import resnets
from parity import reference

from test_vision import (assert_close_scaled, assert_close_to_reference, assert_float64_stats_match, float64_reference,
                         reference_spread)

CLASSES = 7
FLOAT32_RTOL = 1e-5
FLOAT64_RTOL = 1e-10
# Image sides that leave 2x2 positions for the last BatchNorm (two images x 4 values; over fewer
# it is ill-conditioned): three-stage CIFAR nets downsample 4x, four-stage 8x, torchvision's 32x.
SIDES = {3: 8, 4: 16}
IMAGENET_SIDE = 64
# Each check takes ~10-30 s on a loaded 2-core CPU, so most are ``heavy``; the fast ones are one
# net (GroupNorm: resnet20 with BatchNorm is in test_vision.py), one small configuration of
# torchvision's classes (``test_small_configurations``) and the structure of a few names.
FAST = {"ResNetGN20", "torchvision-bottleneck"}
FAST_STRUCTURE = {"ResNet32-10", "ResNetGN18", "ResNet20-4", "resnet50"}


def _side(name: str, data: str) -> int:
    if data == "ImageNet":
        return IMAGENET_SIDE
    depth = int("".join(filter(str.isdigit, name.split("-")[0])))
    return SIDES[len(resnets.DEPTHS[depth][1])]


def _params(cases, fast=FAST) -> list:
    return [pytest.param(*case, marks=[] if case[0] in fast else [pytest.mark.heavy], id=f"{case[1]}-{case[0]}")
            for case in cases]


# Every width-1 depth, both norms at every depth, and the widened nets breaching's case files use.
NUMERIC = [(name, "CIFAR10") for name in resnets.MODELS if "-" not in name] + [
    ("ResNet32-10", "CIFAR10"), ("ResNet20-2", "CIFAR10"), ("ResNet50-2", "CIFAR10")
] + [(name, "ImageNet") for name in resnets.IMAGENET_MODELS]


def randomize_norms(torch_model: torch.nn.Module, seed: int) -> None:
    """Give every BatchNorm / GroupNorm non-trivial affine parameters (and running statistics)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in torch_model.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                size = module.weight.shape[0]
                module.weight.copy_(0.5 + torch.rand(size, generator=generator))
                module.bias.copy_(0.1 * torch.randn(size, generator=generator))
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=generator))


def assert_matches_reference(torch_model: torch.nn.Module, flax_model, side: int) -> None:
    """Same logits and running statistics in eval and train mode, and the weights convert back."""
    randomize_norms(torch_model, 0)
    reference_state = {key: value.clone() for key, value in torch_model.state_dict().items()}
    images = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    inputs = interop.nchw_to_nhwc(images)
    variables = interop.variables_from_torch(torch_model, jax.eval_shape(flax_model.init, jax.random.key(0), inputs))
    apply = jax.jit(flax_model.apply, static_argnames=("train", "mutable"))
    for train in (False, True):
        torch_model.train(train)
        before, after, exact = float64_reference(torch_model, images, train)
        with torch.no_grad():
            expected = torch_model(images)
        logits, state = apply(variables, inputs, train=train, mutable=("batch_stats",))
        assert_close_to_reference(logits, expected.numpy(), exact.numpy(), FLOAT32_RTOL, f"logits (train={train})",
                                  spread=lambda: reference_spread(before.float(), images, exact, train))
        # In float64, where rounding says nothing, the logits and statistics are the reference's.
        assert_float64_stats_match(flax_model, before, after, images, train, logits=exact)
    # And back: a zeroed copy of the torch model given our variables holds the reference's state.
    fresh = copy.deepcopy(torch_model)
    with torch.no_grad():
        for tensor in fresh.state_dict().values():
            tensor.zero_()
    interop.variables_to_torch(variables, fresh)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, reference_state[key]), key


@pytest.mark.parametrize("name, data", _params(NUMERIC))
def test_logits_and_running_stats_match_reference_and_weights_convert_back(name, data):
    side = _side(name, data)
    torch.manual_seed(0)
    torch_model = reference.vision_model(name, CLASSES, (3, side, side), data_name=data)
    assert_matches_reference(torch_model, models.for_data(name, data, num_classes=CLASSES), side)


def _breaching_resnets():
    reference.models_module()
    return sys.modules[f"{reference.PACKAGE}.cases.models.resnets"]


@pytest.mark.parametrize("source, block, norm", [
    pytest.param(source, block, norm, id=f"{source}-{block}" + (f"-{norm}" if norm else ""),
                 marks=[] if f"{source}-{block}" in FAST and not norm else [pytest.mark.heavy])
    for source, block, norm in [("breaching", "bottleneck", "BatchNorm2d"), ("breaching", "bottleneck", "groupnorm4th"),
                                ("torchvision", "basic", None), ("torchvision", "bottleneck", None)]
])
def test_small_configurations_of_the_reference_classes(source, block, norm):
    """One block per stage of the reference's own classes: every block type, norm, stem and head."""
    torch.manual_seed(0)
    if source == "breaching":
        torch_resnets = _breaching_resnets()
        torch_block = torch_resnets.Bottleneck if block == "bottleneck" else torch_resnets.BasicBlock
        torch_model = torch_resnets.ResNet(torch_block, [1, 1, 1, 1], 3, CLASSES, norm=norm, stem="CIFAR",
                                           downsample="B", width_per_group=64)
        flax_model = resnets.ResNet(CLASSES, stage_sizes=(1, 1, 1, 1), block=block, norm=norm)
        side = SIDES[4]
    else:
        torch_resnets = reference.torchvision_module("resnet")
        torch_block = torch_resnets.Bottleneck if block == "bottleneck" else torch_resnets.BasicBlock
        torch_model = torch_resnets.ResNet(torch_block, [1, 1, 1, 1], num_classes=CLASSES)
        flax_model = resnets.TorchvisionResNet(CLASSES, stage_sizes=(1, 1, 1, 1), block=block)
        side = IMAGENET_SIDE
    assert_matches_reference(torch_model, flax_model, side)


def _meta_reference(name: str, data: str, side: int) -> torch.nn.Module:
    """The reference model's structure without its memory (the widest nets hold billions of weights)."""
    with torch.device("meta"):
        return reference.vision_model(name, CLASSES, (3, side, side), data_name=data)


REGISTERED = [(name, "CIFAR10") for name in resnets.MODELS] + [(name, "ImageNet") for name in resnets.IMAGENET_MODELS]


@pytest.mark.parametrize("name, data", _params(REGISTERED, fast=FAST_STRUCTURE))
def test_every_name_has_the_reference_parameters_and_buffers(name, data):
    """breaching's name parsing and ours agree: each torch entry pairs with a Flax entry of its shape."""
    side = _side(name, data)
    torch_model = _meta_reference(name, data, side)
    flax_model = models.for_data(name, data, num_classes=CLASSES)
    template = jax.eval_shape(flax_model.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))
    for collection, named in (("params", torch_model.named_parameters()), ("batch_stats", torch_model.named_buffers())):
        named = list(named)
        tree = template.get(collection, {})
        links = interop.link_all([entry for entry, _ in named], tree, collection)
        flat = {path: leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
        shapes = {tuple(key.key for key in path): leaf.shape for path, leaf in flat.items()}
        for link, (_, tensor) in zip(links, named):
            expected = tuple(tensor.shape)
            if link.flax_path[-1] == "kernel":  # (out, in, h, w) -> (h, w, in, out)
                expected = expected[2:] + expected[1::-1]
            assert shapes[link.flax_path] == expected, link.describe()


def test_torchvision_state_dict_with_its_own_head_converts():
    """A torchvision ``resnet18`` state dict (1000-class ``fc``, as pretrained files hold) fills our model."""
    torch.manual_seed(0)
    torch_model = reference.torchvision_model("resnet18").eval()
    randomize_norms(torch_model, 0)
    images = torch.randn(2, 3, 64, 64)
    flax_model = models.for_data("resnet18", "ImageNet", num_classes=1000)
    inputs = interop.nchw_to_nhwc(images)
    variables = interop.variables_from_torch(torch_model, jax.eval_shape(flax_model.init, jax.random.key(0), inputs))
    with torch.no_grad():
        expected = torch_model(images)
    assert_close_scaled(jax.jit(flax_model.apply)(variables, inputs), expected.numpy(), FLOAT32_RTOL, "logits")


@pytest.mark.parametrize("channels, shape", [(16, (2, 5, 3)), (8, (1, 1, 1))])
def test_groupnorm_matches_torch_in_float64(channels, shape):
    generator = torch.Generator().manual_seed(channels)
    x = torch.randn((shape[0], channels) + shape[1:], generator=generator, dtype=torch.float64) * 3 + 1
    torch_norm = torch.nn.GroupNorm(channels // 4, channels).double()
    with torch.no_grad():
        torch_norm.weight.copy_(torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5)
        torch_norm.bias.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
    with jax.enable_x64(True):
        norm = resnets.GroupNorm(param_dtype=jnp.float64)
        inputs = interop.nchw_to_nhwc(x)
        variables = {"params": {"scale": jnp.asarray(torch_norm.weight.detach().numpy()),
                                "bias": jnp.asarray(torch_norm.bias.detach().numpy())}}
        assert jax.tree_util.tree_structure(norm.init(jax.random.key(0), inputs)) == jax.tree_util.tree_structure(
            variables)
        ours = norm.apply(variables, inputs, train=True)
    assert_close_scaled(interop.nhwc_to_nchw(ours), torch_norm(x).detach().numpy(), FLOAT64_RTOL, "GroupNorm")


def test_groupnorm_refuses_fewer_than_four_channels():
    with pytest.raises(ValueError, match="2 channels"):
        resnets.GroupNorm().init(jax.random.key(0), jnp.ones((1, 2, 2, 2)))


def test_names_cover_breachings_resnets_once_each():
    vision, imagenet = models.names("vision"), models.names("imagenet")
    assert {"ResNet32-10", "ResNet50", "ResNetGN18", "ResNet152", "resnet20"} <= set(vision)
    assert {f"resnet{depth}" for depth in (18, 34, 50, 101, 152)} <= set(imagenet)
    # Lookups ignore case, so two entries differing only in case would hide one another.
    assert len({name.lower() for name in vision}) == len(vision)
    assert models.get("ResNet18") == models.get("resnet18")
    assert models.for_data("resnet18", "ImageNet") != models.get("resnet18")


def test_torchvision_resnets_refuse_other_channel_counts():
    model = models.for_data("resnet18", "ImageNet", num_channels=1)
    with pytest.raises(ValueError, match="3-channel"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))


def test_torchvision_sources_missing_is_one_line_naming_make_venv_test(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="make venv-test") as error:
        reference.torchvision_source()
    assert "\n" not in str(error.value)


def test_breachings_imagenet_fallbacks_still_reached():
    """Names torchvision lacks raise AttributeError, which breaching's ImageNet branch catches."""
    reference.models_module()
    tv_models = sys.modules["torchvision"].models
    with pytest.raises(AttributeError):
        getattr(tv_models, "nfnet")
    assert reference.vision_model("linear", CLASSES, (3, 4, 4), data_name="ImageNet").model[1].in_features == 48
