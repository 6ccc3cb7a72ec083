"""The Flax vision models compute what breaching's torch models compute, given the same weights."""

import copy
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fedjax_users import interop, models
from parity import reference

# name -> (batch, image side). Models whose Linear input is fixed by breaching need 32x32;
# the global-pooling ones run on smaller images to stay cheap (XLA's float64 convs are slow),
# but resnet18 keeps 2x2 positions in its last stage: BatchNorm over 2 values is ill-conditioned.
CASES = {
    "linear": (4, 32),
    "MLP": (4, 32),
    "lenet_zhu": (4, 32),
    "ConvNetSmall": (2, 8),
    "ConvNet": (2, 32),
    "cnn6": (4, 32),
    "resnet18": (2, 16),
    "resnet20": (4, 8),
}
BATCHNORM_MODELS = ("ConvNet", "resnet18", "resnet20")
# Without BatchNorm, train and eval mode are the same function: check those models once.
# resnet18 and ConvNet are the same classes as resnet20 and ConvNetSmall (breaching's ResNet, its
# ConvNet at another width) at many times their compile time: their float64 checks run in
# `make test-full`, their float32 checks here.
FLOAT64_IN_SLOW_TIER = ("resnet18", "ConvNet")
GRADIENT_CASES = [
    pytest.param(name, train, id=f"{name}-{'train' if train else 'eval'}",
                 marks=[pytest.mark.slow] if name in FLOAT64_IN_SLOW_TIER else [])
    for name in CASES
    for train in ((False, True) if name in BATCHNORM_MODELS else (True,))
]
# float32 forward passes agree to ~1e-6 of the logit scale. Gradients are compared in float64:
# in float32 a ReLU input within rounding of zero can fall on either side of the kink in the two
# frameworks, which moves whole gradient rows by up to ~1e-3 of their scale.
FLOAT32_RTOL = 1e-5
FLOAT64_RTOL = 1e-10
CLASSES = 10


def randomize_batchnorm(torch_model: torch.nn.Module, seed: int) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in torch_model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                size = module.num_features
                module.weight.copy_(0.5 + torch.rand(size, generator=generator))
                module.bias.copy_(0.1 * torch.randn(size, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
                module.num_batches_tracked.fill_(3)


def build(name: str, seed: int = 0, dtype=torch.float32):
    """A torch model, its Flax twin holding the same weights, and a batch for both."""
    batch, side = CASES[name]
    torch.manual_seed(seed)
    torch_model = reference.vision_model(name, CLASSES, (3, side, side)).to(dtype)
    randomize_batchnorm(torch_model, seed)
    images = torch.randn(batch, 3, side, side).to(dtype)
    labels = torch.randint(0, CLASSES, (batch,))
    flax_model = models.get(name, num_classes=CLASSES)
    inputs = interop.nchw_to_nhwc(images)
    template = jax.eval_shape(flax_model.init, jax.random.key(0), inputs)
    variables = interop.variables_from_torch(torch_model, template)
    return torch_model, flax_model, variables, images, inputs, labels


def mean_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """torch.nn.CrossEntropyLoss() (mean reduction)."""
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def assert_close_scaled(actual, expected, rtol: float, what: str) -> None:
    """max |actual - expected| <= rtol * max |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    error = np.max(np.abs(actual - expected), initial=0.0)
    scale = np.max(np.abs(expected), initial=0.0)
    assert error <= rtol * scale, f"{what}: max error {error:.3g} vs scale {scale:.3g}"


def float64_reference(torch_model: torch.nn.Module, images: torch.Tensor, train: bool, seed: int = 0):
    """A float64 copy of the torch model as it is (taken before its float32 run changes its
    statistics), the same copy after a forward pass on ``images``, and that pass's logits; random
    layers are seeded as the float32 run (``torch.manual_seed(seed)``)."""
    before = copy.deepcopy(torch_model).double().train(train)
    after = copy.deepcopy(before)
    with torch.no_grad():
        torch.manual_seed(seed)
        logits = after(images.double().clone())
    return before, after, logits


def assert_float64_stats_match(flax_model, before: torch.nn.Module, after: torch.nn.Module, images: torch.Tensor,
                               train: bool, seed: int = 0, interceptor=None, rtol: float = 1e-10,
                               logits: Optional[torch.Tensor] = None) -> None:
    """In float64 our model, given the reference's weights and statistics (``before``), updates its
    statistics to the reference's (``after``), and, given the reference's float64 ``logits``, gives
    them. Running statistics are compared here rather than in float32, where a deep net's running
    variances pick up rounding of a size that says nothing about what is computed."""
    with jax.enable_x64(True):
        inputs = interop.nchw_to_nhwc(images.double())
        variables = interop.variables_from_torch(before, jax.eval_shape(flax_model.init, jax.random.key(0), inputs))

        @jax.jit
        def run(variables, inputs):
            return flax_model.apply(variables, inputs, train=train, mutable=["batch_stats"],
                                    rngs={"dropout": jax.random.key(seed)})

        if interceptor is None:
            ours, state = run(variables, inputs)
        else:
            with nn.intercept_methods(interceptor):
                ours, state = run(variables, inputs)
        if logits is not None:
            assert_close_scaled(np.asarray(ours), logits.numpy(), rtol, "float64 logits")
        assert_stats_match(state.get("batch_stats", {}), after, rtol)


def reference_spread(torch_model: torch.nn.Module, images: torch.Tensor, exact: torch.Tensor, train: bool,
                     seed: int = 0) -> float:
    """Worst distance to ``exact`` of the reference's float32 logits over runs on weights, statistics
    and images perturbed as the parity suite perturbs them (``interop.parity_check.jitter``): how far
    float32 rounding alone moves the reference's own result."""
    from fedjax_users.interop.parity_check import SPREAD_DRAWS, jitter

    generator = torch.Generator().manual_seed(seed + 31)
    worst = 0.0
    for _ in range(SPREAD_DRAWS):
        moved = copy.deepcopy(torch_model).float().train(train)
        with torch.no_grad():
            for tensor in list(moved.parameters()) + list(moved.buffers()):
                if tensor.is_floating_point():
                    tensor.copy_(jitter(tensor, generator))
            torch.manual_seed(seed)
            logits = moved(jitter(images.float(), generator))
        worst = max(worst, float(torch.max(torch.abs(logits.double() - exact.double()))))
    return worst


def assert_close_to_reference(actual, expected, exact, rtol: float, what: str,
                              spread: Optional[Callable[[], float]] = None) -> None:
    """Our float32 ``actual`` equals the reference's float32 ``expected`` within ``rtol`` (relative to
    its largest entry), or, where a deep net amplifies float32 rounding past that in both frameworks
    alike, is no further from the reference's own float64 result ``exact`` than twice the reference's
    float32 result is, or (given ``spread``, the reference's worst distance over perturbed runs, see
    ``reference_spread``) than twice that spread: the parity suite's rule
    (``fedjax_users.interop.parity_check.check_parity``)."""
    actual, expected, exact = (np.asarray(a, np.float64) for a in (actual, expected, exact))
    assert actual.shape == expected.shape == exact.shape, what
    scale = np.max(np.abs(expected), initial=0.0)
    error = np.max(np.abs(actual - expected), initial=0.0)
    if error <= rtol * scale:
        return
    ours, theirs = (np.max(np.abs(a - exact), initial=0.0) for a in (actual, expected))
    if ours <= 2 * theirs:
        return
    worst = spread() if spread is not None else None
    assert worst is not None and ours <= 2 * worst, (
        f"{what}: max error {error:.3g} vs scale {scale:.3g}; from float64 ours {ours:.3g}, the reference's "
        f"{theirs:.3g}" + ("" if worst is None else f", the reference's over perturbed runs up to {worst:.3g}"))


def assert_stats_match(batch_stats, torch_model, rtol: float) -> None:
    """Flax batch_stats equal the torch model's buffers (num_batches_tracked exactly)."""
    for (name, expected), actual in zip(
        torch_model.named_buffers(), interop.buffers_to_torch_list(batch_stats, torch_model)
    ):
        if name.endswith("num_batches_tracked"):
            assert int(actual) == int(expected), name
        else:
            assert_close_scaled(actual.numpy(), expected.numpy(), rtol, name)


def assert_stats_moved(variables, torch_model, train: bool) -> None:
    """Train mode changed the running statistics and eval mode did not: matching is not vacuous."""
    initial = interop.buffers_to_torch_list(variables["batch_stats"], torch_model)
    assert any(not torch.equal(a, b) for a, b in zip(initial, torch_model.buffers())) == train


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(CASES))
def test_float32_logits_and_running_stats_match_torch(name, train):
    torch_model, flax_model, variables, images, inputs, _ = build(name)
    torch_model.train(train)
    with torch.no_grad():
        torch_logits = torch_model(images)
    logits, state = flax_model.apply(variables, inputs, train=train, mutable=["batch_stats"])
    assert logits.dtype == jnp.float32
    assert_close_scaled(logits, torch_logits.numpy(), FLOAT32_RTOL, "logits")
    if name in BATCHNORM_MODELS:  # momentum 0.1, torch's default
        assert_stats_match(state["batch_stats"], torch_model, FLOAT32_RTOL)
        assert_stats_moved(variables, torch_model, train)


@pytest.mark.parametrize("name, train", GRADIENT_CASES)
def test_float64_logits_gradients_and_running_stats_match_torch(name, train):
    with jax.enable_x64(True):
        built = build(name, dtype=torch.float64)
        torch_model, flax_model, variables, images, inputs, labels = built
        leaves = jax.tree_util.tree_leaves(variables)
        assert all(x.dtype == jnp.float64 for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))
        torch_model.train(train)
        torch_logits = torch_model(images)
        torch.nn.functional.cross_entropy(torch_logits, labels).backward()

        def loss(params):
            logits, state = flax_model.apply(
                {**variables, "params": params}, inputs, train=train, mutable=["batch_stats"]
            )
            return mean_cross_entropy(logits, jnp.asarray(labels.numpy())), (logits, state)

        grads, (logits, state) = jax.grad(loss, has_aux=True)(variables["params"])
        assert_close_scaled(logits, torch_logits.detach().numpy(), FLOAT64_RTOL, "logits")
        # One scale for all gradients: the conv biases in front of a train-mode BatchNorm have
        # (mathematically) zero gradient, so their own scale is rounding noise.
        torch_grads = [p.grad for p in torch_model.parameters()]
        scale = max(float(g.abs().max()) for g in torch_grads)
        ours = interop.grads_to_torch_list(grads, torch_model)
        for (param_name, _), mine, theirs in zip(torch_model.named_parameters(), ours, torch_grads):
            assert mine.dtype == torch.float64
            error = float((mine - theirs).abs().max())
            assert error <= FLOAT64_RTOL * scale, f"{param_name}: {error:.3g} vs scale {scale:.3g}"
        if name in BATCHNORM_MODELS:
            assert_stats_match(state["batch_stats"], torch_model, FLOAT64_RTOL)
            assert_stats_moved(variables, torch_model, train)


@pytest.mark.parametrize("name", ["ConvNet", "resnet20"])
def test_cumulative_running_average_matches_torch_momentum_none(name):
    torch_model, flax_model, variables, images, inputs, _ = build(name, seed=1)
    for module in torch_model.modules():  # what breaching's single-step user does
        if hasattr(module, "momentum"):
            module.momentum = None
    torch_model.train()
    with torch.no_grad():
        torch_model(images)
    _, state = flax_model.apply(
        variables, inputs, train=True, momentum=None, mutable=["batch_stats"]
    )
    assert_stats_match(state["batch_stats"], torch_model, FLOAT32_RTOL)
    assert_stats_moved(variables, torch_model, True)


def test_mask_reaches_every_batchnorm():
    """Masked-out examples change no statistic: masked batch == the valid examples alone."""
    _, flax_model, variables, _, inputs, _ = build("resnet20")
    mask = jnp.array([True, True, False, False])
    masked_logits, masked = flax_model.apply(
        variables, inputs, train=True, mask=mask, mutable=["batch_stats"]
    )
    short_logits, short = flax_model.apply(
        variables, inputs[:2], train=True, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(masked_logits[:2], short_logits, rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), masked, short
    )


def test_get_knows_breaching_names_and_rejects_others():
    assert set(CASES) <= set(models.names("vision"))
    assert isinstance(models.get("convnet"), type(models.get("ConvNet")))
    # The close names, and where the whole table is (not all 71 names in one line).
    with pytest.raises(ValueError, match=r"unknown vision model 'resnet19'; did you mean 'resnet18'.*"
                                         r"vision models: fedjax_users.models.names\('vision'\)"):
        models.get("resnet19")


def test_register_refuses_duplicate_names():
    with pytest.raises(ValueError, match="already registered"):
        models.register("vision", {"ConvNet": models.vision.ConvNet})


def test_nchw_input_is_rejected():
    flax_model = models.get("cnn6")
    with pytest.raises(ValueError, match="NHWC"):
        flax_model.init(jax.random.key(0), jnp.zeros((2, 3, 32, 32)))


def test_flatten_is_channel_major():
    """The first Dense kernel is torch's Linear weight transposed, nothing reindexed."""
    x = jnp.arange(2 * 2 * 3 * 4, dtype=jnp.float32).reshape(2, 2, 3, 4)  # NHWC
    torch_flat = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).flatten(1)
    np.testing.assert_array_equal(models.vision.flatten_channel_major(x), torch_flat.numpy())
