"""Checks shared by the model-zoo tests: a Flax model against its torch reference, same weights."""

from __future__ import annotations

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import torch

from fedjax_users import interop
from test_vision import (FLOAT32_RTOL, assert_close_scaled, assert_close_to_reference, assert_float64_stats_match,
                         assert_stats_match, float64_reference, randomize_batchnorm)


def convert(torch_model: torch.nn.Module, flax_model, images: torch.Tensor) -> dict:
    """The torch model's parameters and buffers as variables of ``flax_model`` (shapes from eval_shape)."""
    inputs = interop.nchw_to_nhwc(images)
    template = jax.eval_shape(flax_model.init, jax.random.key(0), inputs)
    return interop.variables_from_torch(torch_model, template)


def assert_round_trip(torch_model: torch.nn.Module, flax_model, images: torch.Tensor) -> None:
    """torch -> Flax -> torch (into a zeroed copy) gives back every parameter and buffer exactly."""
    variables = convert(torch_model, flax_model, images)
    target = copy.deepcopy(torch_model)
    with torch.no_grad():
        for tensor in list(target.parameters()) + list(target.buffers()):
            if tensor.is_floating_point():
                tensor.zero_()
    interop.variables_to_torch(variables, target)
    for (name, expected), actual in zip(torch_model.state_dict().items(), target.state_dict().values()):
        assert torch.equal(expected, actual), name


def assert_forward_matches(
    torch_model: torch.nn.Module,
    flax_model,
    images: torch.Tensor,
    train: bool,
    rtol: float = FLOAT32_RTOL,
    seed: int = 0,
    interceptor=None,
) -> dict:
    """Logits (and, in train mode, running statistics) of both models agree; returns the variables.

    ``interceptor`` (a ``flax.linen.intercept_methods`` function) supplies torch's random draws.
    """
    randomize_batchnorm(torch_model, seed)
    variables = convert(torch_model, flax_model, images)
    torch_model.train(train)
    inputs = interop.nchw_to_nhwc(images)
    before, after, exact = float64_reference(torch_model, images, train, seed)
    with torch.no_grad():  # a clone: in-place activations (NFNet's VPReLU) may overwrite their input
        torch.manual_seed(seed)  # the float64 run's draws
        expected = torch_model(images.clone())

    # One compiled program: eager dispatch compiles every layer's shapes apart (minutes for DenseNet).
    @jax.jit
    def run_jitted(variables, inputs):
        return flax_model.apply(
            variables, inputs, train=train, mutable=["batch_stats"], rngs={"dropout": jax.random.key(seed)}
        )

    def run():
        return run_jitted(variables, inputs)

    if interceptor is None:
        logits, state = run()
    else:


        with nn.intercept_methods(interceptor):
            logits, state = run()
    assert logits.dtype == inputs.dtype
    assert_close_to_reference(logits, expected.numpy(), exact.numpy(), rtol, "logits")
    if any(True for _ in torch_model.buffers()) and "batch_stats" in variables:
        assert_float64_stats_match(flax_model, before, after, images, train, seed, interceptor)
    return variables


def float64_gradients_match(torch_model: torch.nn.Module, flax_model, images, labels, train: bool,
                            rtol: float = 1e-10, interceptor=None) -> None:
    """float64 logits, parameter gradients of the mean cross-entropy and statistics agree."""
    with jax.enable_x64(True):
        torch_model = torch_model.to(torch.float64)
        images = images.to(torch.float64)
        randomize_batchnorm(torch_model, 0)
        variables = convert(torch_model, flax_model, images)
        torch_model.train(train)
        torch_logits = torch_model(images.clone())
        torch.nn.functional.cross_entropy(torch_logits, labels).backward()
        inputs = interop.nchw_to_nhwc(images)

        def loss(params):
            logits, state = flax_model.apply(
                {**variables, "params": params}, inputs, train=train, mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(0)},
            )
            log_probs = jax.nn.log_softmax(logits)
            nll = -jnp.mean(jnp.take_along_axis(log_probs, jnp.asarray(labels.numpy())[:, None], axis=1))
            return nll, (logits, state)

        if interceptor is None:
            grads, (logits, state) = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
        else:


            with nn.intercept_methods(interceptor):
                grads, (logits, state) = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
        assert_close_scaled(logits, torch_logits.detach().numpy(), rtol, "logits")
        torch_grads = [p.grad for p in torch_model.parameters()]
        scale = max(float(g.abs().max()) for g in torch_grads)
        ours = interop.grads_to_torch_list(grads, torch_model)
        for (name, _), mine, theirs in zip(torch_model.named_parameters(), ours, torch_grads):
            error = float((mine - theirs).abs().max())
            assert error <= rtol * scale, f"{name}: {error:.3g} vs scale {scale:.3g}"
        if "batch_stats" in variables:
            assert_stats_match(state["batch_stats"], torch_model, rtol)


def randomize_named(torch_model: torch.nn.Module, suffix: str, seed: int, low: float = 0.5,
                    high: float = 1.5) -> None:
    """Give every parameter whose name ends in ``suffix`` values drawn from U(low, high)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in torch_model.named_parameters():
            if name.endswith(suffix):
                parameter.copy_(low + (high - low) * torch.rand(parameter.shape, generator=generator))


def images(batch: int, channels: int, side: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """A random NCHW batch."""
    return torch.randn(batch, channels, side, side, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class TorchDraws:
    """Records the masks torch's Dropout and breaching's StochDepth modules draw; an
    ``nn.intercept_methods`` interceptor handing them to the Flax layers' ``keep_mask``."""

    def __init__(self, torch_model: torch.nn.Module):
        self.masks = {}
        for name, module in torch_model.named_modules():
            path = tuple(name.split(".")[1:] if name.startswith("model.") else name.split("."))
            # breaching's nfnets.StochDepth, matched by name (its module is loaded by path).
            if isinstance(module, torch.nn.Dropout) or type(module).__name__ == "StochDepth":
                module.register_forward_hook(self._recorder(path, isinstance(module, torch.nn.Dropout)))

    def _recorder(self, path, is_dropout):
        def record(module, inputs, output):
            if is_dropout:  # where the input is zero the draw does not matter
                self.masks[path] = (output != 0).numpy()
            else:  # x * floor(u + keep): each example's output is its input or zero
                kept = [float(torch.equal(o, i)) for o, i in zip(output, inputs[0])]
                self.masks[path] = torch.tensor(kept).reshape(-1, 1, 1, 1).numpy()
        return record

    def __call__(self, next_fun, args, kwargs, context):
        if context.method_name == "keep_mask":
            return jnp.asarray(self.masks[tuple(context.module.path)])
        return next_fun(*args, **kwargs)


def assert_breaching_model_matches(name: str, side: int, data_name: str = "CIFAR10", classes: int = 10) -> None:
    """breaching's model ``name`` for ``data_name`` (built by its own ``construct_model`` code) and
    ours convert both ways and agree in eval and train mode (random layers on torch's own draws)."""
    from fedjax_users import models
    from parity import reference

    torch.manual_seed(0)
    torch_model = reference.vision_model(name, classes, (3, side, side), data_name=data_name)
    flax_model = models.for_data(name, data_name, num_classes=classes)
    batch = images(2, 3, side)
    assert_round_trip(torch_model, flax_model, batch)
    for train in (False, True):
        assert_forward_matches(torch_model, flax_model, batch, train, interceptor=TorchDraws(torch_model))
