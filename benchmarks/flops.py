"""Model arithmetic: forward FLOPs counted by XLA, training FLOPs as 3x forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Backward ~ 2x forward (gradients w.r.t. activations and w.r.t. weights), so a gradient ~ 3x.
TRAIN_FACTOR = 3.0
METHOD = (
    "forward FLOPs per example from XLA's cost analysis of the jitted eval-mode forward pass "
    "(jax.jit(apply).lower(...).compile().cost_analysis()['flops'], batch 8, divided by 8); "
    "a gradient counts 3x forward (backward ~ 2x forward)"
)


def forward_flops_per_example(model, variables: dict, image_shape_nhwc: tuple[int, ...], batch: int = 8) -> float:
    """XLA-counted FLOPs of one example's forward pass (eval mode)."""
    inputs = jnp.zeros((batch,) + tuple(image_shape_nhwc), jnp.float32)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    cost = forward.lower(variables, inputs).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returns one dict per computation
        cost = cost[0]
    return float(cost["flops"]) / batch


def train_flops(forward_per_example: float, examples: int) -> float:
    """FLOPs of a gradient over ``examples`` examples (forward + backward)."""
    return TRAIN_FACTOR * forward_per_example * examples
