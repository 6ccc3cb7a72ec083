"""BatchNorm with PyTorch's semantics, and the pure running-statistics update it uses.

Flax's ``nn.BatchNorm`` differs from ``torch.nn.BatchNorm2d`` in ways that change the numbers an
attack sees: it stores the *biased* batch variance in its running average, has no cumulative
average (PyTorch's ``momentum=None``), no ``num_batches_tracked`` and its momentum is the weight of
the *old* value. This layer reproduces PyTorch:

* train mode normalises with the biased batch variance, but the running variance is updated with
  the unbiased one (``n / (n - 1)``, ``n`` = examples x spatial positions);
* ``momentum`` is the weight of the new batch statistic; ``momentum=None`` is the cumulative
  average ``running + (batch - running) / (num_batches_tracked + 1)``;
* ``num_batches_tracked`` grows by one per train-mode call;
* an optional per-example ``mask`` restricts the batch statistics to the valid examples, so a
  padded (shorter) step of ``local_update`` behaves exactly like PyTorch on the short batch.

Variables are declared in ``torch.nn.BatchNorm2d``'s order: params ``scale`` (weight), ``bias``;
batch_stats ``mean``, ``var``, ``num_batches_tracked``.

``param_dtype`` is the dtype of the parameters and running statistics (as ``module.double()``
makes torch's buffers float64 too), ``dtype`` the dtype the layer computes in; ``None`` (the
default) follows the inputs for both, as the layer always did.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

STAT_KEYS = ("mean", "var", "num_batches_tracked")


def batch_moments(x: Array, mask: Optional[Array]) -> tuple[Array, Array, Array]:
    """Per-feature mean, biased variance and element count over all axes but the last."""
    reduce_axes = tuple(range(x.ndim - 1))
    if mask is None:
        count = jnp.asarray(x.size // x.shape[-1], x.dtype)
        mean = jnp.mean(x, axis=reduce_axes)
        var = jnp.mean(jnp.square(x - mean), axis=reduce_axes)
        return mean, var, count
    chex.assert_shape(mask, (x.shape[0],))
    weights = mask.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    per_example = x.size // (x.shape[0] * x.shape[-1])
    count = jnp.sum(weights) * per_example
    mean = jnp.sum(x * weights, axis=reduce_axes) / count
    var = jnp.sum(jnp.square(x - mean) * weights, axis=reduce_axes) / count
    return mean, var, count


def update_running_stats(
    stats: Mapping[str, Array], mean: Array, unbiased_var: Array, momentum: Optional[float]
) -> dict[str, Array]:
    """One PyTorch running-average step of a single layer's ``{mean, var, num_batches_tracked}``."""
    tracked = stats["num_batches_tracked"] + 1
    if momentum is None:
        factor = 1.0 / tracked.astype(mean.dtype)
    else:
        factor = jnp.asarray(momentum, mean.dtype)
    return {
        "mean": (1.0 - factor) * stats["mean"] + factor * mean,
        "var": (1.0 - factor) * stats["var"] + factor * unbiased_var,
        "num_batches_tracked": tracked,
    }


def _is_layer_stats(node: Any) -> bool:
    return isinstance(node, Mapping) and set(node.keys()) == set(STAT_KEYS)


def map_layers(fn, *trees):
    """Apply ``fn`` to every BatchNorm layer's stats dict of one or more same-shaped trees.

    A buffer outside any BatchNorm layer (a fixed table such as breaching's sinusoidal positions,
    which no step changes) is taken from the first tree as it is.
    """
    first = trees[0]
    if _is_layer_stats(first):
        return fn(*trees)
    if not isinstance(first, Mapping):
        return first
    return {name: map_layers(fn, *(t[name] for t in trees)) for name in first}


def fold_batch_stats(
    stats: Mapping[str, Any], per_batch_stats: Mapping[str, Any], momentum: Optional[float]
) -> dict[str, Any]:
    """Fold a sequence of batch statistics (leading axis) into running stats, one batch at a time.

    ``per_batch_stats`` holds, per layer, the *batch* mean and unbiased variance of each batch
    (as produced by calling the model with ``momentum=1.0``). This reproduces PyTorch looping
    over the batches in order, which is what the reference does for per-example clipping.
    """

    def fold_layer(layer, batches):
        def step(carry, batch):
            return update_running_stats(carry, batch["mean"], batch["var"], momentum), None

        folded, _ = jax.lax.scan(step, dict(layer), {"mean": batches["mean"], "var": batches["var"]})
        return folded

    return map_layers(fold_layer, stats, per_batch_stats)


def _cast(dtype: Any, *arrays: Array) -> tuple[Array, ...]:
    """``arrays`` in ``dtype``, or unchanged when it is ``None``."""
    return arrays if dtype is None else tuple(a.astype(dtype) for a in arrays)


class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm{1,2}d`` over the last (feature) axis, with PyTorch's running statistics."""

    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        train: bool,
        mask: Optional[Array] = None,
        momentum: Optional[float] = 0.1,
    ) -> Array:
        """Normalise ``x``; in train mode update the running statistics (when mutable)."""
        features = x.shape[-1]
        param_dtype = x.dtype if self.param_dtype is None else self.param_dtype
        scale = self.param("scale", nn.initializers.ones, (features,), param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), param_dtype)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), param_dtype)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), param_dtype)
        tracked = self.variable("batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32)
        # No dtype: no cast, the arithmetic promotes as it always did.
        x, scale, bias = _cast(self.dtype, x, scale, bias)

        if train:
            mean, var, count = batch_moments(x, mask)
            if not self.is_initializing():
                # Bessel's correction with the count of valid elements, as torch does.
                unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
                new = update_running_stats(
                    {"mean": running_mean.value, "var": running_var.value,
                     "num_batches_tracked": tracked.value},
                    mean, unbiased, momentum,
                )
                running_mean.value = new["mean"]
                running_var.value = new["var"]
                tracked.value = new["num_batches_tracked"]
        else:
            mean, var = _cast(self.dtype, running_mean.value, running_var.value)
        inv = jax.lax.rsqrt(var + self.epsilon) * scale
        return (x - mean) * inv + bias
